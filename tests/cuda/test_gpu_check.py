"""`make gpu-check` pieces that can be checked without a GPU: what the target runs, which test
files it collects, its refusal without a device, and the benchmark tables and targets."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.benchmarks import gpu_optim, gpu_quant

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def test_make_target_installs_nothing_from_the_network():
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("\ngpu-check:\n", 1)[1].split("\n\n", 1)[0]
    assert "--no-deps --no-build-isolation -e ." in recipe
    assert "venv" not in recipe and "requirements" not in recipe
    assert "scripts/gpu_check.py" in recipe


def test_collects_the_gpu_test_files():
    files = gpu_check.gpu_test_files()
    assert "tests/cuda/test_quant_gpu.py" in files and "tests/cuda/test_optim_gpu.py" in files
    assert not any("benchmarks" in f for f in files)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_refuses_to_run_without_a_device(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "torch sees no CUDA device" in result.stderr


def _row(optimizer, ms, tensors=1, of_copy=0.5):
    return dict(
        size="256M",
        dtype=torch.float32,
        tensors=tensors,
        optimizer=optimizer,
        ms=ms,
        gbps=1000.0,
        of_copy=of_copy,
        skipped=False,
    )


def test_targets_report_pass_and_miss():
    rows = [
        _row("Adam8bit", 1.0, of_copy=0.9),
        _row("torch AdamW fused", 1.6),
        _row("Adam8bit", 1.4, tensors=200),
        dict(size="1M", dtype=torch.bfloat16, tensors=200, skipped=True),
    ]
    assert gpu_optim.targets(rows) == [
        "Adam8bit 256M fp32: 90% of copy (target >= 85%): PASS",
        "Adam8bit vs torch AdamW fused, 256M fp32: 1.60x (target >= 1.5x): PASS",
        "Adam8bit 200 tensors / 1 tensor, 256M fp32: 1.40x (target <= 1.3x): MISS",
    ]
    table = gpu_optim.table(rows, 4000.0)
    assert "| 256M | float32 | 1 | Adam8bit | 1.000 | 1000 | 90% | 1.60x |" in table
    assert "skipped" in table


def test_quant_table():
    rows = [
        dict(op="quantize", dtype="float32", elements=1 << 28, ms=0.3, gbps=4200.0, of_copy=0.95)
    ]
    assert "| quantize | float32 | 256M | 0.300 | 4200 | 95% |" in gpu_quant.table(rows, 4400.0)


def test_bytes_per_parameter_follow_the_cost_model():
    # DESIGN.md: 8-bit Adam 16 B (fp32) / 10 B (bf16), plus the absmax; 1-state rules 14 / 8 B
    adam, lion = gpu_optim.CONTENDERS["Adam8bit"][1], gpu_optim.CONTENDERS["Lion8bit"][1]
    assert adam(4) == 16 + 2 * 8 / 256 and adam(2) == 10 + 2 * 8 / 256
    assert lion(4) == 14 + 8 / 256 and lion(2) == 8 + 8 / 256
    assert gpu_optim.CONTENDERS["torch AdamW fused"][1](4) == 28
