"""examples/fsdp2_dcp.py runs as documented: torchrun on 2 ranks, resumed on 1, state matched."""

import os
import subprocess
import sys
from pathlib import Path

from .launch import DEADLINE_S

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp2_dcp.py"


def test_fsdp2_dcp_example_resumes_on_another_world_size():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLE)], capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "optimizer state matched: 16 of 16 tensors bit-identical" in run.stdout
