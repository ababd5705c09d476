"""eightbit: 8-bit optimizer state for PyTorch.

Swap ``torch.optim.Adam(model.parameters(), lr=1e-3)`` for
``eightbit.optim.Adam8bit(model.parameters(), lr=1e-3)``: the optimizer state drops from 8 to
about 2 bytes per parameter. Layers: :mod:`eightbit.quant` (codebooks, blockwise quantization),
:mod:`eightbit.functional` (fused update rules), :mod:`eightbit.optim` (torch.optim frontends).
``python -m eightbit`` prints an environment report.
"""

__version__ = "0.1.0"

from . import functional, optim, quant  # noqa: E402  (cheap: torch only; CuPy/numba load lazily)

__all__ = ["__version__", "functional", "optim", "quant"]
