"""``python -m eightbit``: an environment report to paste into a bug report."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import sys


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return f"{metadata.version(name)} ({name})"
        except metadata.PackageNotFoundError:
            continue
    return None


def _cupy_cache_dir() -> str:
    # CuPy's documented default (CUPY_CACHE_DIR, else ~/.cupy/kernel_cache).
    return os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))


def report() -> str:
    """The report as text: versions, devices, which backend serves which tensors, caches."""
    import torch

    import eightbit

    from .quant import _native

    cupy = _version("cupy-cuda13x", "cupy-cuda12x", "cupy")
    rows = [
        ("eightbit", eightbit.__version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"),
        ("numpy", _version("numpy") or "not installed"),
        ("scipy", _version("scipy") or "not installed"),
        ("numba", _version("numba") or "not installed"),
        ("cupy", cupy or "not installed"),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                (f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
            )
    else:
        rows.append(("cuda device", "none"))
    rows.append(("CPU tensors", _native.describe()))
    if cupy:
        cuda = f"CuPy RawKernels compiled by NVRTC; kernel cache: {_cupy_cache_dir()}"
    else:
        cuda = "unavailable: install CuPy with `pip install eightbit[cuda12]` or `[cuda13]`"
    rows.append(("CUDA tensors", cuda))
    rows.append(("other devices", "torch path (eager, chunked)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    print(report())
