"""`make gpu-check`: the GPU tests, then the GPU benchmarks, on a machine with a GPU and no network.

Needs torch with CUDA, CuPy and pytest already installed (nothing is downloaded); the Makefile
target installs eightbit itself with ``pip install --no-deps --no-build-isolation -e .`` first.

Steps, within about five minutes on an H100/H200:
1. environment report (device, torch, CuPy, NVRTC);
2. every test marked ``gpu`` (``pytest -m gpu``), slow ones included;
3. the copy bandwidth, quantize/dequantize at 256M elements (tests/benchmarks/gpu_quant.py) and
   optimizer.step() at 1M/16M/256M parameters (tests/benchmarks/gpu_optim.py).

Writes ``results.md`` (tables ready to paste into tests/benchmarks/RESULTS.md), ``pytest.txt``
and ``results.json`` into ``--out`` (default ``gpu-check-out``), prints the short table last,
and exits non-zero when a test failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 180  # leaves the benchmarks about 100 s of a five-minute run


def ensure_importable(out: Path) -> str:
    """Make ``import eightbit`` load this source tree. After the Makefile's editable install it
    does; where that install could not run (no setuptools, no network), a shim package of
    symlinks in ``out`` maps eightbit.quant/.functional/.optim onto the root folders."""
    try:
        import eightbit

        if Path(eightbit.__file__).resolve().parent == ROOT / "eightbit":
            return "editable install"
    except ImportError:
        pass
    shim = out / "shim" / "eightbit"
    shim.mkdir(parents=True, exist_ok=True)
    links = {f.name: f for f in (ROOT / "eightbit").glob("*.py")}
    links.update({layer: ROOT / layer for layer in ("quant", "functional", "optim")})
    for name, target in links.items():
        link = shim / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    sys.modules.pop("eightbit", None)
    sys.path.insert(0, str(shim.parent))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(shim.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return f"source-tree shim in {shim.parent}"


def environment() -> tuple[dict, str | None]:
    """What runs the check, and a reason it cannot run (or None)."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    if not torch.cuda.is_available():
        return info, "torch sees no CUDA device"
    info["device"] = torch.cuda.get_device_name()
    info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
    try:
        import cupy
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as error:
        return info, f"CuPy is not importable ({error}); install cupy-cuda12x or cupy-cuda13x"
    info["cupy"] = cupy.__version__
    info["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    try:
        import pytest
    except ImportError:
        return info, "pytest is not installed; the GPU tests need it"
    info["pytest"] = pytest.__version__
    return info, None


def gpu_test_files() -> list[str]:
    """Test files that hold `gpu`-marked tests (collecting only those keeps optional test
    dependencies of the CPU suite, such as notebooks, out of the way)."""
    files = sorted(
        p
        for p in (ROOT / "tests").rglob("test_*.py")
        if "benchmarks" not in p.parts and "mark.gpu" in p.read_text()
    )
    return [str(p.relative_to(ROOT)) for p in files]


def run_tests(out: Path) -> tuple[int, str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "--durations=10",
        *gpu_test_files(),
    ]
    try:
        result = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=TEST_TIMEOUT_S
        )
        code, text = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        code = 124
        text = (
            (expired.stdout or b"").decode(errors="replace")
            if isinstance(expired.stdout, bytes)
            else (expired.stdout or "")
        )
        text += f"\npytest did not finish within {TEST_TIMEOUT_S} s\n"
    (out / "pytest.txt").write_text(" ".join(cmd) + "\n\n" + text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else "no output"
    return code, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check-out")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    how = ensure_importable(args.out)
    info, problem = environment()
    info["eightbit"] = how
    print("environment:", ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    if problem:
        print(f"gpu-check cannot run: {problem}", file=sys.stderr)
        return 2

    test_code, test_summary = (0, "skipped") if args.skip_tests else run_tests(args.out)
    print(f"gpu tests: {test_summary} (details in {args.out / 'pytest.txt'})", flush=True)

    sys.path.insert(0, str(ROOT))
    from tests.benchmarks import gpu_optim, gpu_quant
    from tests.benchmarks.gpu_timing import copy_bandwidth

    copy = copy_bandwidth()
    quant_rows = gpu_quant.run(copy)
    budget = max(30.0, 270.0 - (time.monotonic() - started))
    optim_rows = gpu_optim.run(copy, budget_s=budget)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"GPU check {date}: {info['device']} ({info['capability']}), torch {info['torch']}, "
        f"CuPy {info['cupy']}, NVRTC {info['nvrtc']}; device-to-device copy "
        f"{copy:.0f} GB/s (read + written)"
    )
    targets = gpu_optim.targets(optim_rows)
    quant_table = gpu_quant.table(quant_rows, copy)
    report = "\n\n".join(
        [
            f"### {header}",
            f"GPU tests: {test_summary}",
            "#### quantize / dequantize (block 256)\n\n" + quant_table,
            "#### optimizer.step()\n\n" + gpu_optim.table(optim_rows, copy),
            "#### targets\n\n" + "\n".join(f"- {t}" for t in targets),
        ]
    )
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "info": info,
                "copy_gbps": copy,
                "tests": test_summary,
                "quant": quant_rows,
                "optim": [dict(r, dtype=str(r["dtype"])) for r in optim_rows],
            },
            indent=1,
        )
    )

    print(f"\nfull tables: {args.out / 'results.md'} ({time.monotonic() - started:.0f} s)\n")
    print(header)
    print(f"GPU tests: {test_summary}")
    print(quant_table)
    print("\n".join(targets))
    return 1 if test_code else 0


if __name__ == "__main__":
    sys.exit(main())
