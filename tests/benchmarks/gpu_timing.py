"""CUDA-event timing for the GPU benchmarks, and the device-to-device copy they are compared to.

A measurement runs the function ``inner`` times between two events and repeats that ``reps``
times; the median of the per-call times is reported. Everything is measured in the same process
and run as the copy it is compared to, so clocks, ECC and driver state are shared.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

GB = 1e9


def time_cuda(fn: Callable[[], object], *, reps: int = 7, inner: int = 5, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def copy_bandwidth(n_bytes: int = 1 << 31) -> float:
    """GB/s of ``dst.copy_(src)`` for ``n_bytes`` (read + written bytes count: 2 * n_bytes)."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src))
    return 2 * n_bytes / seconds / GB
