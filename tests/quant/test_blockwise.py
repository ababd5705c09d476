"""quantize_blockwise / dequantize_blockwise on the CPU against the brute-force oracle."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from eightbit.quant import (
    QuantizedTensor,
    create_codebook,
    dequantize_blockwise,
    get_codebook,
    midpoints,
    quantize_blockwise,
)

from . import oracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK_SIZES = [64, 128, 256, 512, 1024, 2048, 4096]
CODEBOOKS = [(name, signed) for name in ("dynamic", "linear", "normal") for signed in (True, False)]

# Mean absolute / relative round-trip error of bitsandbytes 0.50.2 on 1024x1024 randn with the
# signed dynamic map (DESIGN.md, "Reference figures").
BNB_MEAN_ABS_ERROR = {256: 0.00854, 4096: 0.01003}
BNB_MEAN_REL_ERROR_256 = 0.0154


def assert_matches_oracle(x, q, codebook, block_size):
    codes, absmax = oracle.quantize(x, codebook, block_size)
    assert torch.allclose(q.absmax, absmax, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(q.codes.reshape(-1), codes)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_equal_brute_force_argmin(dtype, block_size):
    torch.manual_seed(block_size)
    # Ragged size, a zero block, values spanning many decades.
    x = torch.randn(3 * block_size + 17) * torch.logspace(-6, 2, 3 * block_size + 17)
    x[block_size : 2 * block_size] = 0
    x = x.to(dtype)
    q = quantize_blockwise(x, block_size=block_size)
    assert q.codes.shape == x.shape and q.absmax.shape == (4,)
    assert_matches_oracle(x, q, get_codebook(), block_size)
    assert torch.equal(
        q.dequantize(dtype=torch.float32),
        oracle.dequantize(q.codes, q.absmax, get_codebook(), block_size),
    )
    assert q.dequantize().dtype == dtype


@pytest.mark.parametrize("name,signed", CODEBOOKS)
def test_every_codebook_against_oracle(name, signed):
    torch.manual_seed(0)
    x = torch.randn(5000)
    if not signed:
        x = x.abs()
    cb = create_codebook(name, signed=signed)
    q = quantize_blockwise(x, codebook=cb, block_size=128)
    assert_matches_oracle(x, q, cb, 128)


@pytest.mark.parametrize("name,signed", CODEBOOKS)
def test_exact_midpoints_and_neighbours(name, signed):
    """Values at, just below and just above every threshold go to the exact nearest code."""
    cb = create_codebook(name, signed=signed)
    t = midpoints(cb).numpy()
    probes = np.concatenate(
        [t, np.nextafter(t, np.float32(-2)), np.nextafter(t, np.float32(2)), cb.numpy()]
    ).astype(np.float32)
    probes = probes[np.abs(probes) <= 1]
    # One block per probe value, with a 1.0 in it so that absmax = 1 and y = x exactly.
    x = torch.from_numpy(np.stack([probes, np.ones_like(probes)], axis=1).reshape(-1))
    x = torch.nn.functional.pad(x.view(-1, 2), (0, 62)).reshape(-1)
    q = quantize_blockwise(x, codebook=cb, block_size=64)
    got = q.codes.view(-1, 64)[:, 0].numpy()
    exact_cb = [Fraction(v) for v in cb.tolist()]
    for y, code in zip(probes.tolist(), got.tolist(), strict=True):
        distances = [abs(Fraction(y) - c) for c in exact_cb]
        want = distances.index(min(distances))  # first minimum: a tie goes to the lower index
        assert code == want, (y, code, want)


def test_round_trip_error_no_worse_than_bitsandbytes():
    torch.manual_seed(0)
    x = torch.randn(1024, 1024)
    for block_size, bnb in BNB_MEAN_ABS_ERROR.items():
        err = (quantize_blockwise(x, block_size=block_size).dequantize() - x).abs()
        assert err.mean().item() <= bnb * 1.005  # within 0.5%: a different random draw
        if block_size == 256:
            rel = (err / x.abs()).mean().item()
            assert rel <= BNB_MEAN_REL_ERROR_256 * 1.005


def test_zero_blocks_dequantize_to_exact_zeros():
    x = torch.zeros(1000)
    x[500] = -0.0
    for signed in (True, False):
        cb = get_codebook(signed=signed)
        q = quantize_blockwise(x, codebook=cb, block_size=64)
        assert (q.absmax == 0).all()
        assert (q.codes == (127 if signed else 0)).all()
        y = q.dequantize()
        assert (y == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_blocks_become_nan_never_finite(bad, dtype):
    x = torch.randn(300).to(dtype)
    x[70] = bad
    q = quantize_blockwise(x, block_size=64)
    assert torch.isnan(q.absmax[1]) and torch.isfinite(q.absmax[[0, 2, 3, 4]]).all()
    y = q.dequantize()
    assert torch.isnan(y[64:128]).all()
    assert torch.isfinite(y[:64]).all() and torch.isfinite(y[128:]).all()
    assert_matches_oracle(x, q, get_codebook(), 64)


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 0, 2), (7, 33), (2, 3, 4, 5), ()])
def test_shapes(shape):
    x = torch.randn(shape)
    q = quantize_blockwise(x, block_size=64)
    assert q.shape == x.shape and q.absmax.numel() == -(-x.numel() // 64)
    y = q.dequantize()
    assert y.shape == x.shape
    if x.numel():
        assert_matches_oracle(x, q, get_codebook(), 64)


@pytest.mark.parametrize("v", [3.5, 1e-30, 1e30, 1e-40])
def test_single_element(v):
    # The element is its own absmax: +v maps to code 255 (1.0) exactly; -v to the most negative
    # code (-0.99296875, the signed map has no -1).
    assert quantize_blockwise(torch.tensor([v])).dequantize().item() == np.float32(v)
    neg = quantize_blockwise(torch.tensor([-v]))
    assert neg.codes.item() == 0
    assert neg.dequantize().item() == np.float32(np.float32(-0.99296875) * np.float32(v))


def test_non_contiguous_views():
    torch.manual_seed(1)
    base = torch.randn(300, 200)
    for view in (base.t(), base[::3, 1::2], base[:, 5]):
        q = quantize_blockwise(view, block_size=128)
        ref = quantize_blockwise(view.contiguous(), block_size=128)
        assert torch.equal(q.codes, ref.codes) and torch.equal(q.absmax, ref.absmax)
        assert_matches_oracle(view, q, get_codebook(), 128)


def test_multi_chunk_tensor_matches_oracle(monkeypatch):
    from eightbit.quant import _torch

    monkeypatch.setattr(_torch, "CHUNK_ELEMENTS", 1000)  # many chunks, not block-aligned
    torch.manual_seed(2)
    x = torch.randn(10_007)
    q = quantize_blockwise(x, block_size=64)
    assert_matches_oracle(x, q, get_codebook(), 64)
    assert torch.equal(q.dequantize(), oracle.dequantize(q.codes, q.absmax, get_codebook(), 64))


def test_out_buffers_both_directions():
    x = torch.randn(5, 100)
    codes = torch.empty(5, 100, dtype=torch.uint8)
    absmax = torch.empty(8)
    q = quantize_blockwise(x, block_size=64, out=(codes, absmax))
    assert q.codes is codes and q.absmax is absmax
    assert torch.equal(codes, quantize_blockwise(x, block_size=64).codes)
    out = torch.empty(5, 100, dtype=torch.bfloat16)
    y = dequantize_blockwise(q, out=out)
    assert y is out
    assert torch.equal(out, q.dequantize(dtype=torch.float32).bfloat16())


def test_out_buffers_that_share_memory_with_an_input_are_refused():
    x = torch.randn(1024)
    q = quantize_blockwise(x, block_size=64)
    raw = x.view(torch.uint8)  # 4096 bytes: x's own memory seen as uint8
    with pytest.raises(ValueError, match="out codes shares memory with x"):
        quantize_blockwise(x, block_size=64, out=(raw[:1024], torch.empty(16)))
    with pytest.raises(ValueError, match="out absmax shares memory with x"):
        quantize_blockwise(x, block_size=64, out=(torch.empty(1024, dtype=torch.uint8), x[:16]))
    as_float = torch.empty(1024 + 16)
    with pytest.raises(ValueError, match="out codes shares memory with out absmax"):
        quantize_blockwise(
            x, block_size=64, out=(as_float.view(torch.uint8)[:1024], as_float[200:216])
        )
    shared = torch.empty(1024)  # 4096 bytes: the codes in its first 1024
    codes = shared.view(torch.uint8)[:1024]
    codes.copy_(q.codes)
    with pytest.raises(ValueError, match="out shares memory with codes"):
        dequantize_blockwise(codes, q.absmax, block_size=64, out=shared)
    shared = torch.empty(1024)  # the absmax in its first 16 values
    shared[:16] = q.absmax
    with pytest.raises(ValueError, match="out shares memory with absmax"):
        dequantize_blockwise(q.codes, shared[:16], block_size=64, out=shared)
    # disjoint views of one storage are fine
    buffer = torch.empty(2 * 1024, dtype=torch.uint8)
    q2 = quantize_blockwise(x, block_size=64, out=(buffer[:1024], torch.empty(16)))
    assert torch.equal(q2.codes, q.codes)


def test_dequantize_from_raw_parts():
    x = torch.randn(1000)
    q = quantize_blockwise(x)
    y = dequantize_blockwise(q.codes, q.absmax)
    assert torch.equal(y, q.dequantize())
    q2 = quantize_blockwise(x, block_size=64, codebook=create_codebook("linear"))
    y2 = dequantize_blockwise(
        q2.codes, q2.absmax, block_size=64, codebook=create_codebook("linear")
    )
    assert torch.equal(y2, q2.dequantize())


def test_quantized_tensor_dict_round_trip(tmp_path):
    q = quantize_blockwise(torch.randn(33, 7).bfloat16(), block_size=64)
    path = tmp_path / "q.pt"
    torch.save(q.to_dict(), path)
    back = QuantizedTensor.from_dict(torch.load(path, weights_only=True))
    assert back.dtype == torch.bfloat16 and back.block_size == 64
    assert torch.equal(back.dequantize(), q.dequantize())
    assert q.nbytes == 33 * 7 + 4 * 4
    moved = q.to("meta")
    assert moved.codes.device.type == "meta" and moved.codebook.device.type == "meta"
    assert "QuantizedTensor(shape=(33, 7)" in repr(q)


def test_from_dict_errors():
    good = quantize_blockwise(torch.randn(100)).to_dict()
    with pytest.raises(ValueError, match=r"missing \['absmax'\]"):
        QuantizedTensor.from_dict({k: v for k, v in good.items() if k != "absmax"})
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        QuantizedTensor.from_dict({**good, "dtype": "float99"})
    with pytest.raises(ValueError, match="absmax has 2 blocks but 100 codes"):
        QuantizedTensor.from_dict({**good, "absmax": torch.zeros(2)})


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.arange(10), "integer dtype torch.int64.*x.float()"),
        (torch.ones(10, dtype=torch.bool), "boolean dtype"),
        (torch.randn(10, dtype=torch.complex64), "complex dtype"),
        (torch.randn(10, dtype=torch.float64), "unsupported floating dtype torch.float64"),
    ],
)
def test_bad_input_dtypes(x, match):
    with pytest.raises(TypeError, match=match):
        quantize_blockwise(x)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        quantize_blockwise([1.0, 2.0])


@pytest.mark.parametrize("block_size", [0, 32, 100, 8192, 256.0, True, -256])
def test_bad_block_sizes(block_size):
    with pytest.raises(ValueError, match="block_size must be a power of two from 64 to 4096"):
        quantize_blockwise(torch.randn(10), block_size=block_size)


def test_mismatched_parts():
    q = quantize_blockwise(torch.randn(1000), block_size=256)
    with pytest.raises(
        ValueError, match="absmax has 4 blocks but 1000 codes at block_size 64 need 16"
    ):
        dequantize_blockwise(q.codes, q.absmax, block_size=64)
    with pytest.raises(TypeError, match="codes must be a uint8 tensor"):
        dequantize_blockwise(q.codes.int(), q.absmax)
    with pytest.raises(TypeError, match="absmax must be a 1-D float32"):
        dequantize_blockwise(q.codes, q.absmax.half())
    with pytest.raises(TypeError, match="needs absmax"):
        dequantize_blockwise(q.codes)
    with pytest.raises(TypeError, match="not both"):
        dequantize_blockwise(q, q.absmax)
    with pytest.raises(ValueError, match="out codes must be a contiguous uint8 tensor"):
        quantize_blockwise(
            torch.randn(10, 10), out=(torch.empty(100, dtype=torch.uint8), torch.empty(1))
        )
    with pytest.raises(ValueError, match="out must be a contiguous tensor of shape"):
        dequantize_blockwise(q, out=torch.empty(999))
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        dequantize_blockwise(q, dtype=torch.float64)


def test_bad_codebooks():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="256 values"):
        quantize_blockwise(x, codebook=torch.linspace(-1, 1, 16))
    with pytest.raises(ValueError, match="strictly increasing"):
        quantize_blockwise(x, codebook=torch.linspace(1, -1, 256))
    with pytest.raises(ValueError, match="codebook is on meta but the data is on cpu"):
        quantize_blockwise(x, codebook=get_codebook(device="meta"))
