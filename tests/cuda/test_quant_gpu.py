"""The CUDA quantize/dequantize kernels against the torch path, bit for bit (needs a GPU).

The oracle is eightbit.quant._torch run on the same CUDA tensors (eager torch ops; its codes
are checked against a brute-force nearest-code search in tests/quant). Codes must be equal and
absmax equal bit for bit; dequantized values equal bit for bit except NaN payloads.
"""

import pytest
import torch
from eightbit.quant import _torch as torch_path
from eightbit.quant import (
    dequantize_blockwise,
    get_codebook,
    midpoints,
    num_blocks,
    quantize_blockwise,
)
from eightbit.quant.cuda import _runtime

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK_SIZES = [64, 128, 256, 512, 1024, 2048, 4096]
SIZES = [1, 63, 64, 4097, 278011, (1 << 20) + 3]


def oracle(x, codebook, block_size):
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(x.numel(), block_size), device=x.device)
    torch_path.quantize(x, codes, absmax, codebook, block_size)
    return codes, absmax


def assert_same_quantization(q, x, codebook, block_size):
    codes, absmax = oracle(x, codebook, block_size)
    assert torch.equal(q.codes, codes), f"{(q.codes != codes).sum().item()} codes differ"
    # bit for bit, NaN (non-finite blocks) included: both write the quiet NaN 0x7fc00000
    assert torch.equal(q.absmax.view(torch.int32), absmax.view(torch.int32))


def assert_same_values(a, b):
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(
        a[~nan].view(torch.int16 if a.element_size() == 2 else torch.int32),
        b[~nan].view(torch.int16 if b.element_size() == 2 else torch.int32),
    )


def data(n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, device="cuda", generator=g)
    # magnitudes over many decades, so every decade of the dynamic map is used
    x *= torch.exp(torch.rand(n, device="cuda", generator=g) * 20 - 15)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_quantize_matches_torch_path(dtype, block_size):
    for signed in (True, False):
        codebook = get_codebook("dynamic", signed=signed, device="cuda")
        for n in SIZES:
            x = data(n, dtype, seed=n)
            x = x if signed else x.abs()
            q = quantize_blockwise(x, codebook=codebook, block_size=block_size)
            assert_same_quantization(q, x, codebook, block_size)
            y = dequantize_blockwise(q)
            ref = torch.empty_like(y)
            torch_path.dequantize(q.codes, q.absmax, codebook, block_size, ref)
            assert_same_values(y, ref)


@pytest.mark.parametrize("name", ["dynamic", "linear", "normal"])
def test_other_codebooks(name):
    codebook = get_codebook(name, signed=True, device="cuda")
    x = data(100_003, torch.float32)
    q = quantize_blockwise(x, codebook=codebook, block_size=256)
    assert_same_quantization(q, x, codebook, 256)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_blocks(dtype):
    block = 64
    x = torch.randn(16 * block, device="cuda")
    x[0:block] = 0.0  # zero block: absmax 0, code of 0.0
    x[block + 5] = float("inf")
    x[2 * block + 7] = float("nan")
    x[3 * block + 1] = float("-inf")
    x[4 * block : 5 * block] = -0.0
    x[5 * block : 6 * block] = 1e-39  # subnormal fp32 (flushes to 0 in fp16/bf16): no FTZ
    x[5 * block + 3] = -3e-39
    x[6 * block] = float("nan")  # NaN first in its block
    x[7 * block - 1] = float("inf")  # inf last in its block
    x = x.to(dtype)
    codebook = get_codebook(device="cuda")
    q = quantize_blockwise(x, codebook=codebook, block_size=block)
    assert_same_quantization(q, x, codebook, block)
    assert torch.isnan(q.absmax[1:4]).all() and q.absmax[0] == 0


def test_ties_and_neighbours_of_every_threshold():
    # y exactly on each threshold t_j and one ulp either side, in a block whose absmax is 1.0
    for signed in (True, False):
        codebook = get_codebook("dynamic", signed=signed, device="cuda")
        t = midpoints(codebook)
        up = torch.nextafter(t, torch.full_like(t, 2.0))
        down = torch.nextafter(t, torch.full_like(t, -2.0))
        values = torch.cat([t, up, down, codebook])
        rows = -(-values.numel() // 63)
        values = torch.cat([values, torch.zeros(rows * 63 - values.numel(), device="cuda")])
        # 63 values and 1.0 per block of 64: absmax is 1, so y == x exactly
        ones = torch.ones(rows, 1, device="cuda")
        x = torch.cat([values.view(rows, 63), ones], dim=1).reshape(-1)
        q = quantize_blockwise(x, codebook=codebook, block_size=64)
        assert_same_quantization(q, x, codebook, 64)
        # brute force: nearest codebook value, ties to the lower index
        dist = (x.double()[:, None] - codebook.double()[None, :]).abs()
        assert torch.equal(q.codes.long(), dist.argmin(dim=1))


def test_views_unaligned_and_non_contiguous():
    codebook = get_codebook(device="cuda")
    base = data(300_001, torch.bfloat16)
    for x in (base[1:], base[3:-5], base[:300_000].view(600, 500).t()):
        q = quantize_blockwise(x, codebook=codebook, block_size=128)
        assert_same_quantization(q, x.contiguous(), codebook, 128)
    # unaligned output buffers (scalar path)
    x = data(10_000, torch.float32)
    store = torch.empty(10_003, dtype=torch.uint8, device="cuda")
    codes = store[3:]
    absmax = torch.empty(num_blocks(10_000, 64), device="cuda")
    quantize_blockwise(x, codebook=codebook, block_size=64, out=(codes, absmax))
    ref_codes, ref_absmax = oracle(x, codebook, 64)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    out = torch.empty(10_001, device="cuda")[1:]
    dequantize_blockwise(codes, absmax, codebook=codebook, block_size=64, out=out)
    ref = torch.empty(10_000, device="cuda")
    torch_path.dequantize(codes, absmax, codebook, 64, ref)
    assert torch.equal(out, ref)


def test_compiles_once_per_dtype():
    codebook = get_codebook(device="cuda")
    for _ in range(3):
        for dtype in DTYPES:
            q = quantize_blockwise(data(1000, dtype), codebook=codebook, block_size=256)
            dequantize_blockwise(q)
    keys = [k for k in _runtime.compilations if k[0].endswith("blockwise.cu")]
    assert len(keys) == len(DTYPES)
    assert all(_runtime.compilations[k] == 1 for k in keys)


def test_no_host_synchronisation():
    # The default codebook (get_codebook's cached one) is used as the optimizers do: a user's
    # codebook is value-checked once per call, which synchronises.
    x = data(1 << 20, torch.float32)
    quantize_blockwise(x).dequantize()  # compile and load first
    codes = torch.empty(x.shape, dtype=torch.uint8, device="cuda")
    absmax = torch.empty(num_blocks(x.numel(), 256), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        q = quantize_blockwise(x, out=(codes, absmax))
        q.dequantize()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_runs_on_the_current_stream():
    codebook = get_codebook(device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = data(1 << 22, torch.float32)  # produced on `stream`
        q = quantize_blockwise(x, codebook=codebook, block_size=256)
        y = q.dequantize()
    stream.synchronize()
    assert_same_quantization(q, x, codebook, 256)
    ref = torch.empty_like(y)
    torch_path.dequantize(q.codes, q.absmax, codebook, 256, ref)
    assert torch.equal(y, ref)


def test_cuda_graph_capture_and_replay():
    static_x = data(1 << 20, torch.bfloat16)
    codes = torch.empty(static_x.shape, dtype=torch.uint8, device="cuda")
    absmax = torch.empty(num_blocks(static_x.numel(), 256), device="cuda")
    out = torch.empty_like(static_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile) outside the capture
        quantize_blockwise(static_x, out=(codes, absmax)).dequantize(out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quantize_blockwise(static_x, out=(codes, absmax)).dequantize(out=out)
    for seed in (1, 2):
        static_x.copy_(data(1 << 20, torch.bfloat16, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        q = quantize_blockwise(static_x)
        assert torch.equal(codes, q.codes) and torch.equal(absmax, q.absmax)
        assert torch.equal(out, q.dequantize())


@pytest.mark.slow
def test_more_than_2_to_the_31_elements():
    n = (1 << 31) + 4099  # past the int32 range, with a ragged last block
    block = 4096
    codebook = get_codebook(device="cuda")
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    step = 1 << 28
    for start in range(0, n, step):
        x[start : start + step] = data(min(step, n - start), torch.bfloat16, seed=start)
    q = quantize_blockwise(x, codebook=codebook, block_size=block)
    # block-aligned windows at the start, across 2^31 and at the end, against the torch path
    windows = [(0, 1 << 20), ((1 << 31) - (1 << 20), (1 << 31) + (1 << 20)), (n - 5 * block - 3, n)]
    for start, end in windows:
        start -= start % block
        ref_codes, ref_absmax = oracle(x[start:end], codebook, block)
        assert torch.equal(q.codes[start:end], ref_codes)
        first = start // block
        assert torch.equal(q.absmax[first : first + ref_absmax.numel()], ref_absmax)
    y = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    del x
    dequantize_blockwise(q, out=y)
    for start, end in windows:
        start -= start % block
        first = start // block
        ref = torch.empty(end - start, dtype=torch.bfloat16, device="cuda")
        torch_path.dequantize(q.codes[start:end], q.absmax[first:], codebook, block, ref)
        assert torch.equal(y[start:end], ref)
