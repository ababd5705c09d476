"""eightbit.quant: codebooks and blockwise absmax quantization to 8-bit codes.

This layer knows nothing of optimizers. Users call it directly::

    >>> import torch
    >>> from eightbit.quant import quantize_blockwise, dequantize_blockwise
    >>> q = quantize_blockwise(torch.randn(1024, 1024), block_size=256)
    >>> x = dequantize_blockwise(q)   # or q.dequantize()

CUDA tensors are served by CuPy kernels (``pip install eightbit[cuda12]`` or ``[cuda13]``), CPU
tensors by the fused numba kernels when numba imports, every other device by the torch path; all
give the same codes.
"""

from .blockwise import (
    FLOAT_DTYPES,
    QuantizedTensor,
    check_block_size,
    dequantize_blockwise,
    num_blocks,
    quantize_blockwise,
)
from .codebook import (
    CODEBOOK_NAMES,
    check_codebook,
    create_codebook,
    get_codebook,
    get_midpoints,
    midpoints,
)

__all__ = [
    "CODEBOOK_NAMES",
    "FLOAT_DTYPES",
    "QuantizedTensor",
    "check_block_size",
    "check_codebook",
    "create_codebook",
    "dequantize_blockwise",
    "get_codebook",
    "get_midpoints",
    "midpoints",
    "num_blocks",
    "quantize_blockwise",
]
