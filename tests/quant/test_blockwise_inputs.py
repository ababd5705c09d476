"""The public quantizer's boundary takes awkward inputs on every backend: a strided absmax or
codebook, a codebook that requires grad, and a large non-contiguous tensor, quantized chunk by
chunk without a contiguous copy of the whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from eightbit.quant import blockwise, dequantize_blockwise, get_codebook, quantize_blockwise

BACKENDS = ["auto", "torch"]  # auto: the CPU kernels when numba imports


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("EIGHTBIT_CPU_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("n", [1000, 300 * 256])  # below and above the kernels' thread grain
def test_dequantize_takes_a_strided_absmax(backend, n):
    x = torch.randn(n)
    q = quantize_blockwise(x)
    spread = torch.zeros(2 * q.absmax.numel())
    spread[::2] = q.absmax
    strided = spread[::2]
    assert not strided.is_contiguous()
    assert torch.equal(dequantize_blockwise(q.codes, strided), q.dequantize())


def test_a_codebook_that_requires_grad_or_is_strided_works(backend):
    x = torch.randn(70_000)
    plain = get_codebook("dynamic", signed=True)
    with_grad = plain.clone().requires_grad_()
    spread = torch.zeros(512)
    spread[::2] = plain
    strided = spread[::2]
    expected = quantize_blockwise(x, codebook=plain)
    for codebook in (with_grad, strided):
        q = quantize_blockwise(x, codebook=codebook)
        assert torch.equal(q.codes, expected.codes) and torch.equal(q.absmax, expected.absmax)
        assert torch.equal(q.dequantize(), expected.dequantize())
        y = dequantize_blockwise(q.codes, q.absmax, codebook=codebook)
        assert torch.equal(y, expected.dequantize())


def test_an_input_that_requires_grad_is_quantized(backend):
    x = torch.randn(70_000, requires_grad=True)
    assert torch.equal(quantize_blockwise(x).codes, quantize_blockwise(x.detach()).codes)


LAYOUTS = [  # (shape, permutation): rows shorter and longer than a chunk, ragged blocks
    ((3000, 70), (1, 0)),
    ((5, 7, 300), (2, 0, 1)),
    ((2, 5000), (1, 0)),
    ((9000, 3), (1, 0)),
]


@pytest.mark.parametrize("shape,perm", LAYOUTS, ids=str)
def test_non_contiguous_input_reaches_the_backend_in_bounded_contiguous_chunks(
    backend, monkeypatch, shape, perm
):
    """Every piece handed to the backend is contiguous and at most a chunk long, and the codes
    equal those of the contiguous copy (the oracle)."""
    chunk = 1024
    monkeypatch.setattr(blockwise, "COPY_CHUNK_ELEMENTS", chunk)
    real = blockwise._backend(torch.device("cpu"))
    seen = []

    class Recorder:
        @staticmethod
        def quantize(x, codes, absmax, codebook, block_size):
            seen.append((x.numel(), x.is_contiguous()))
            real.quantize(x, codes, absmax, codebook, block_size)

    x = torch.randn(shape).permute(perm)
    assert not x.is_contiguous()
    expected = quantize_blockwise(x.contiguous(), block_size=64)
    monkeypatch.setattr(blockwise, "_backend", lambda device: Recorder)
    q = quantize_blockwise(x, block_size=64)
    assert torch.equal(q.codes, expected.codes) and torch.equal(q.absmax, expected.absmax)
    assert sum(n for n, _ in seen) == x.numel()
    assert all(n <= chunk and contiguous for n, contiguous in seen)
    assert len(seen) == -(-x.numel() // chunk)


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from eightbit.quant import quantize_blockwise
    x = torch.randn(8192, {cols}).t()   # {mib} MiB of fp32, transposed
    codes = torch.empty(x.shape, dtype=torch.uint8); codes.fill_(0)
    absmax = torch.empty(-(-x.numel() // 256)); absmax.fill_(0)
    quantize_blockwise(torch.randn(4096).view(64, 64).t())  # warm up lazy imports and caches
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    quantize_blockwise(x, out=(codes, absmax))
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """
)


@pytest.mark.slow
def test_quantizing_a_transposed_tensor_does_not_copy_it_whole():
    mib = 256
    cols = mib * 2**20 // 4 // 8192
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT.format(cols=cols, mib=mib)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    growth = int(out.split()[-1])
    # A chunk copy is at most 3 x COPY_CHUNK_ELEMENTS fp32 (48 MiB, see blockwise._flat_segment)
    # plus the backend's own temporaries; a whole copy would add 256 MiB.
    assert growth < 128, f"a transposed {mib} MiB tensor grew the peak RSS by {growth} MiB"
