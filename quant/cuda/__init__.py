"""The CUDA backend of eightbit.quant: CuPy RawKernels compiled from ``blockwise.cu`` at run time.

:func:`quantize` and :func:`dequantize` have the signatures of the torch path
(:mod:`eightbit.quant._torch`) and compute the same codes and absmax bit for bit;
:func:`eightbit.quant.quantize_blockwise` dispatches CUDA tensors here. Importing this module
does not import CuPy: that happens on the first launch (see :mod:`._runtime`).

The runtime (``get_kernel``, ``Kernel.launch``, ``KERNEL_DIR``) is shared with the optimizer
kernels of :mod:`eightbit.functional.cuda`.

Example (on a machine with a GPU and CuPy)::

    >>> x = torch.randn(1 << 20, device="cuda")
    >>> q = eightbit.quant.quantize_blockwise(x)         # runs quantize_blockwise_kernel<float>
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._runtime import COMPILE_OPTIONS, cuda_device, get_kernel, grid_for

__all__ = ["COMPILE_OPTIONS", "KERNEL_DIR", "dequantize", "launch_shape", "quantize"]

KERNEL_DIR = Path(__file__).resolve().parent
_SOURCE = KERNEL_DIR / "blockwise.cu"
ITEMS_PER_THREAD = 8  # eightbit_quant.cuh kItems


def launch_shape(block_size: int) -> tuple[int, int]:
    """``(threads per CTA, elements per CTA tile)`` of the blockwise kernels: a quantization
    block is a group of ``block_size / 8`` threads and a CTA holds whole groups."""
    block = max(256, block_size // ITEMS_PER_THREAD)
    return block, block * ITEMS_PER_THREAD


def _aligned(*pairs: tuple[torch.Tensor, int]) -> int:
    return int(all(t.data_ptr() % alignment == 0 for t, alignment in pairs))


def quantize(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
) -> None:
    """Quantize the flat view of CUDA tensor ``x`` into the flat ``codes`` and ``absmax``."""
    device = cuda_device(x)
    x = x.contiguous()
    n = x.numel()
    kernel = get_kernel(_SOURCE, "quantize_blockwise_kernel", (x.dtype,), device)
    block, tile = launch_shape(block_size)
    kernel.launch(
        x,
        codes,
        absmax,
        codebook,
        n,
        block_size,
        _aligned((x, 16), (codes, 8)),
        grid=grid_for(-(-n // tile), block, device),
        block=block,
    )


def dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
    out: torch.Tensor,
) -> None:
    """Dequantize the flat CUDA ``codes`` into the flat, contiguous ``out`` (any float dtype)."""
    device = cuda_device(codes)
    n = codes.numel()
    kernel = get_kernel(_SOURCE, "dequantize_blockwise_kernel", (out.dtype,), device)
    block, tile = launch_shape(block_size)
    kernel.launch(
        codes,
        absmax,
        codebook,
        out,
        n,
        block_size,
        _aligned((codes, 8), (out, 16)),
        grid=grid_for(-(-n // tile), block, device),
        block=block,
    )
