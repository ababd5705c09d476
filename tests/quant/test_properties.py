"""Property-based tests: random shapes, sizes, dtypes, block sizes and magnitudes vs the oracle."""

import numpy as np
import torch
from eightbit.quant import get_codebook, quantize_blockwise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import oracle

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def tensors(draw):
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
    n = int(np.prod(shape)) if shape else 1
    seed = draw(st.integers(0, 2**31 - 1))
    exponent = draw(st.floats(-30, 30))  # magnitudes 1e-30 .. 1e30
    spread = draw(st.floats(0, 10))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x = x * 10.0 ** (
        exponent + spread * torch.rand(n, generator=gen, dtype=torch.float64) - spread / 2
    )
    x[torch.rand(n, generator=gen) < draw(st.floats(0, 1))] = 0.0  # sprinkle zeros
    return x.to(dtype).reshape(shape)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=tensors(),
    block_size=st.sampled_from([64, 128, 256, 512, 1024, 2048, 4096]),
    signed=st.booleans(),
)
def test_matches_oracle(x, block_size, signed):
    if not signed:
        x = x.abs()
    cb = get_codebook(signed=signed)
    q = quantize_blockwise(x, codebook=cb, block_size=block_size)
    codes, absmax = oracle.quantize(x, cb, block_size)
    assert torch.equal(q.codes.reshape(-1), codes)
    assert torch.allclose(q.absmax, absmax, rtol=0, atol=0, equal_nan=True)
    y = q.dequantize()
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(
        q.dequantize(dtype=torch.float32).reshape(-1),
        oracle.dequantize(q.codes, q.absmax, cb, block_size),
        rtol=0,
        atol=0,
        equal_nan=True,
    )
    # Every element is within the codebook's covering radius of [-1, 1] (or [0, 1]) times its
    # block's scale: half the widest gap, or the distance from an end of the range to the
    # nearest code (the signed map has no -1).
    if x.numel():
        xf = x.float().reshape(-1)
        scale = torch.repeat_interleave(q.absmax, block_size)[: xf.numel()]
        err = (q.dequantize(dtype=torch.float32).reshape(-1) - xf).abs()
        low = -1.0 if signed else 0.0
        radius = max((cb[1:] - cb[:-1]).max().item() / 2, cb[0].item() - low, 1 - cb[-1].item())
        finite = torch.isfinite(scale)  # fp16 overflows to inf above 65504: those blocks are NaN
        assert bool((err <= scale * radius * (1 + 1e-5) + 1e-45)[finite].all())
        assert bool(torch.isnan(q.dequantize().float().reshape(-1)[~finite]).all())
