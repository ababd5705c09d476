"""The torch path of blockwise quantization: eager torch ops, any device, and the oracle.

Everything works on 1-D segments that start on a block boundary, one chunk at a time, so the
fp32 temporaries are bounded by ``CHUNK_ELEMENTS`` and never grow with the tensor. The layer
above (functional/) composes :func:`quantize_segment` and :func:`dequantize_segment` with its
update rules chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .codebook import midpoints

# 2^20 elements: the fp32 working copy, the scaled values and the int32 codes of one chunk take
# about 12 MiB, whatever the size of the tensor being quantized.
CHUNK_ELEMENTS = 1 << 20


def chunks(numel: int, block_size: int, chunk: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` element ranges of at most ``chunk`` elements, aligned to blocks."""
    step = max(block_size, chunk - chunk % block_size)
    for start in range(0, numel, step):
        yield start, min(start + step, numel)


def _blocks(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """View a 1-D segment as rows of ``block_size``, zero-padding a partial last block."""
    tail = values.numel() % block_size
    if tail:
        values = torch.nn.functional.pad(values, (0, block_size - tail))
    return values.view(-1, block_size)


def quantize_segment(
    values: torch.Tensor, mids: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D segment (any float dtype, starting on a block boundary).

    Returns ``(codes, absmax)``: uint8 codes of the segment's length and fp32 absmax per block.
    A block holding inf or NaN gets absmax NaN and the code of zero, so it dequantizes to NaN.
    """
    n = values.numel()
    rows = _blocks(values.float(), block_size)
    absmax = rows.abs().amax(dim=1)  # NaN propagates through amax
    keep = torch.isfinite(absmax) & (absmax > 0)
    divisor = torch.where(keep, absmax, torch.ones_like(absmax))
    scaled = (rows / divisor[:, None]).masked_fill_(~keep[:, None], 0.0)
    # The nearest code: the number of thresholds strictly below the value (searchsorted's left
    # side counts the entries < value); see codebook.midpoints for why this is exact.
    codes = torch.searchsorted(mids, scaled.view(-1)[:n], out_int32=True).to(torch.uint8)
    absmax = torch.where(torch.isfinite(absmax), absmax, torch.full_like(absmax, float("nan")))
    return codes, absmax


def dequantize_segment(
    codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, block_size: int
) -> torch.Tensor:
    """fp32 ``codebook[codes] * absmax[block]`` of a 1-D segment that starts on a block boundary."""
    n = codes.numel()
    rows = _blocks(codebook[codes.long()], block_size)
    return (rows * absmax[:, None]).view(-1)[:n]


def quantize(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
) -> None:
    """Quantize the flat view of ``x`` into the flat ``codes`` and ``absmax``, chunk by chunk."""
    flat, flat_codes = x.reshape(-1), codes.view(-1)
    mids = midpoints(codebook)
    for start, end in chunks(flat.numel(), block_size):
        c, a = quantize_segment(flat[start:end], mids, block_size)
        flat_codes[start:end] = c
        absmax[start // block_size : start // block_size + a.numel()] = a


def dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
    out: torch.Tensor,
) -> None:
    """Dequantize the flat ``codes`` into the flat, contiguous ``out`` (any float dtype)."""
    flat_codes, flat_out = codes.reshape(-1), out.view(-1)
    for start, end in chunks(flat_codes.numel(), block_size):
        first = start // block_size
        last = first + (end - start + block_size - 1) // block_size
        flat_out[start:end] = dequantize_segment(
            flat_codes[start:end], absmax[first:last], codebook, block_size
        )
