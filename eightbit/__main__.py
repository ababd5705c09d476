"""``python -m eightbit``: an environment report to paste into a bug report."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import sys
from pathlib import Path

# The x86 features the CPU kernels' speed depends on, as /proc/cpuinfo and llvmlite name them.
X86_FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512F"), ("avx512vbmi", "AVX-512 VBMI"))


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


def _cpu_flags(cpuinfo: str | None) -> set[str] | None:
    """The CPU's feature flags: /proc/cpuinfo's ``flags`` (x86) or ``Features`` (Arm) line, else
    llvmlite's host features (macOS, Windows), else None."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    try:
        from llvmlite import binding
    except ImportError:
        return None
    try:
        return {name for name, on in binding.get_host_cpu_features().items() if on}
    except RuntimeError:  # llvmlite cannot query this host
        return None


def cpu_features(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """The CPU features that decide the CPU kernels' speed, in words: AVX2, AVX-512F and
    AVX-512 VBMI on x86, NEON on Arm (e.g. 'x86_64 with AVX2, no AVX-512F, no AVX-512 VBMI').

    ``cpuinfo`` (the text of /proc/cpuinfo) and ``machine`` (``platform.machine()``) default to
    this machine's.
    """
    machine = machine or platform.machine() or "unknown CPU"
    flags = _cpu_flags(cpuinfo)
    if machine.lower() in ("aarch64", "arm64"):
        # Advanced SIMD is part of every AArch64 CPU; Linux lists it as "asimd".
        neon = flags is None or not flags or "asimd" in flags or "neon" in flags
        return f"{machine} with {'NEON' if neon else 'no NEON'}"
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return machine
    if flags is None:
        return f"{machine} (features unknown)"
    return f"{machine} with " + ", ".join(
        label if flag in flags else f"no {label}" for flag, label in X86_FEATURES)


def cpu_path() -> str:
    """The codebook search the CPU kernels use now: 'AVX-512 VBMI', 'portable', or why neither
    (the torch path serves CPU tensors, or a setting is invalid)."""
    from .quant import _native

    try:
        if _native.kernels() is None:
            return "none: the torch path serves CPU tensors"
        from .quant import _vbmi

        return "AVX-512 VBMI" if _vbmi.in_use() else "portable"
    except (ImportError, ValueError) as error:
        return f"none ({error})"


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
    rows.append(("CPU features", f"{cpu_features()}; CPU kernel path: {cpu_path()}"))
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
