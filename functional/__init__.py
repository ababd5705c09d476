"""eightbit.functional: stateless update rules with 8-bit (or fp32) optimizer state.

One module per rule: :mod:`.adam` (Adam and AdamW), :mod:`.rmsprop`, :mod:`.lion`, :mod:`.sgd`,
:mod:`.adagrad`. Each public function takes lists of tensors (one entry per parameter)
positionally and hyperparameters as keywords, and updates parameters and states in place:
dequantize -> fp32 update -> requantize.
The optimizers of :mod:`eightbit.optim` gather the tensors and call these; you can too::

    >>> import torch
    >>> from eightbit.functional import lion8bit_update
    >>> p, g = torch.randn(4096), torch.randn(4096)
    >>> codes, absmax = torch.full((4096,), 127, dtype=torch.uint8), torch.zeros(16)
    >>> lion8bit_update([p], [g], [codes], [absmax], lr=1e-4, beta1=0.9, beta2=0.99,
    ...                 weight_decay=0.0, maximize=False, block_size=256)

Each ``*32bit_update`` twin runs the same rule on plain float32 state.
"""

from .adagrad import adagrad8bit_update, adagrad32bit_update
from .adam import adam8bit_update, adam32bit_update
from .lion import lion8bit_update, lion32bit_update
from .rmsprop import rmsprop8bit_update, rmsprop32bit_update
from .sgd import sgd8bit_update, sgd32bit_update

__all__ = [
    "adagrad8bit_update",
    "adagrad32bit_update",
    "adam8bit_update",
    "adam32bit_update",
    "lion8bit_update",
    "lion32bit_update",
    "rmsprop8bit_update",
    "rmsprop32bit_update",
    "sgd8bit_update",
    "sgd32bit_update",
]
