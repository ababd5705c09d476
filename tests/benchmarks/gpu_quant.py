"""GPU benchmark of quantize_blockwise / dequantize_blockwise (issue 3), in GB/s next to a copy.

Bytes per element: quantize reads the input (4 B fp32, 2 B bf16) and writes one code, plus 4 B
of absmax per block; dequantize reads the code and absmax and writes the output. The target is
>= 85% of the device-to-device copy bandwidth measured in the same run.

Run alone: ``python -m tests.benchmarks.gpu_quant`` (needs a GPU and CuPy).
"""

from __future__ import annotations

import torch
from eightbit.quant import dequantize_blockwise, num_blocks, quantize_blockwise

from .gpu_timing import GB, copy_bandwidth, time_cuda

N = 1 << 28  # 256M elements
BLOCK_SIZE = 256


def run(copy_gbps: float, n: int = N) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += _measure(dtype, n, copy_gbps)
        torch.cuda.empty_cache()
    return rows


def _measure(dtype: torch.dtype, n: int, copy_gbps: float) -> list[dict]:
    x = torch.randn(n, device="cuda", dtype=dtype)
    codes = torch.empty(n, dtype=torch.uint8, device="cuda")
    absmax = torch.empty(num_blocks(n, BLOCK_SIZE), device="cuda")
    out = torch.empty_like(x)
    q = quantize_blockwise(x, block_size=BLOCK_SIZE, out=(codes, absmax))
    moved = n * x.element_size() + n + 4 * absmax.numel()
    rows = []
    for op, fn in (
        ("quantize", lambda: quantize_blockwise(x, block_size=BLOCK_SIZE, out=(codes, absmax))),
        ("dequantize", lambda: dequantize_blockwise(q, out=out)),
    ):
        seconds = time_cuda(fn)
        gbps = moved / seconds / GB
        rows.append(
            dict(
                op=op,
                dtype=str(dtype).removeprefix("torch."),
                elements=n,
                ms=seconds * 1e3,
                gbps=gbps,
                of_copy=gbps / copy_gbps,
            )
        )
    return rows


def table(rows: list[dict], copy_gbps: float) -> str:
    lines = [
        f"| op | dtype | elements | ms | GB/s | % of copy ({copy_gbps:.0f} GB/s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['elements'] / 2**20:.0f}M | {r['ms']:.3f} | "
            f"{r['gbps']:.0f} | {100 * r['of_copy']:.0f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    copy = copy_bandwidth()
    print(table(run(copy), copy))
