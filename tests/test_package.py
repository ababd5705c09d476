"""Packaging: the wheel's layout, a plain install that works, import cost, the report."""

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_TOP_LEVEL = {"quant", "optim", "functional"}  # names of other PyPI packages


def run(*args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(ROOT),
    )
    (path,) = out.glob("eightbit-*.whl")
    return path


@pytest.mark.slow
def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"eightbit"}, f"the wheel installs top-level {sorted(top - {'eightbit'})}"
    assert not top & FORBIDDEN_TOP_LEVEL
    for module in (
        "quant/blockwise.py",
        "quant/cuda/__init__.py",
        "functional/__init__.py",
        "optim/__init__.py",
        "__main__.py",
    ):
        assert f"eightbit/{module}" in names
    kernels = [n for n in names if n.endswith((".cu", ".cuh"))]
    layers = {"quant": ROOT / "quant", "functional": ROOT / "functional"}
    sources = {
        f"eightbit/{layer}/{p.relative_to(folder).as_posix()}"
        for layer, folder in layers.items()
        for p in folder.rglob("*")
        if p.suffix in (".cu", ".cuh")
    }
    assert sources, "no CUDA sources found"
    assert sources == set(kernels), f"CUDA sources missing from the wheel: {sources - set(kernels)}"


@pytest.mark.slow
def test_plain_install_imports_and_quantizes(wheel, tmp_path):
    # A throw-away venv that sees torch/numpy/scipy from the test venv's site-packages as a plain
    # path (so the editable install there is not active), with eightbit installed from the wheel.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    py = venv / "bin" / "python"
    site = Path(
        run(str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel))
    code = textwrap.dedent(
        """
        import sys, torch, eightbit
        from eightbit.quant import quantize_blockwise
        assert eightbit.__file__.startswith(sys.prefix), eightbit.__file__
        q = quantize_blockwise(torch.randn(1000))
        assert q.dequantize().shape == (1000,)
        import importlib.util
        for name in ("quant", "optim", "functional"):
            assert importlib.util.find_spec(name) is None, name
        print("ok", eightbit.__file__)
        """
    )
    out = run(str(py), "-c", code, cwd=str(tmp_path)).stdout
    assert out.startswith("ok ") and str(venv) in out


IMPORT_COST = textwrap.dedent(
    """
    import sys, time
    t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
    import eightbit, eightbit.quant, eightbit.functional, eightbit.optim
    t2 = time.perf_counter()
    heavy = sorted(m for m in ("cupy", "numba", "scipy") if m in sys.modules)
    print(t2 - t1, ",".join(heavy))
    """
)


def test_import_is_cheap_and_never_imports_cupy():
    costs = []
    for _ in range(3):
        cost, heavy = (
            run(sys.executable, "-c", IMPORT_COST, cwd="/").stdout.split("\n")[0].split(" ")
        )
        assert heavy == "", f"import eightbit imported {heavy}"
        costs.append(float(cost))
    assert min(costs) < 0.3, f"import eightbit costs {min(costs):.3f} s on top of import torch"


def test_environment_report():
    out = run(
        sys.executable, "-m", "eightbit", env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    ).stdout
    for key in (
        "eightbit",
        "python",
        "torch",
        "numpy",
        "scipy",
        "cupy",
        "CPU tensors",
        "CPU features",
        "CUDA tensors",
    ):
        assert any(line.startswith(key) for line in out.splitlines()), (key, out)
    assert "cuda device" in out and "none" in out
