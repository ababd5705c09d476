"""`make demo` end to end, shortened: both runs, the table, the PNG."""

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_runs_and_writes_the_table_and_the_plot(tmp_path):
    out = subprocess.run(
        [sys.executable, str(DEMO), "--device", "cpu", "--steps", "5", "--width", "32",
         "--batch", "8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("optimizer state, memory, speed and loss:")[1]
    assert "torch.optim.AdamW " in table and "eightbit.optim.AdamW8bit" in table
    assert "step    5/5" in out.stdout  # progress was shown
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text().count("\n") == 4
