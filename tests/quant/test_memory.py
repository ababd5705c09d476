"""Quantizing a large tensor allocates O(chunk) fp32 temporaries, not O(tensor)."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from eightbit.quant import quantize_blockwise, dequantize_blockwise
    n = {n}
    x = torch.randn(n)          # {mib} MiB of fp32
    x.add_(0)                   # touch every page before the baseline
    codes = torch.empty(n, dtype=torch.uint8); codes.fill_(0)
    absmax = torch.empty(n // 256); absmax.fill_(0)
    quantize_blockwise(torch.randn(4096))  # warm up lazy imports and caches
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q = quantize_blockwise(x, out=(codes, absmax))
    mid = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dequantize_blockwise(q, out=x)
    end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((mid - base) // 1024, (end - mid) // 1024)
    """
)


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_chunk():
    mib = 384
    n = mib * 2**20 // 4
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(n=n, mib=mib)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    quantize_growth, dequantize_growth = int(out[0]), int(out[1])
    # With the output buffers preallocated, both directions may only add chunk-sized temporaries
    # (a 2^20-element chunk needs ~20 MiB); an unchunked implementation would add >= 384 MiB.
    assert quantize_growth < 64, f"quantize grew the peak RSS by {quantize_growth} MiB"
    assert dequantize_growth < 64, f"dequantize grew the peak RSS by {dequantize_growth} MiB"
