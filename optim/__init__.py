"""eightbit.optim: torch.optim optimizers whose state is kept in 8 bits.

Change one line of a training loop::

    >>> import torch
    >>> from eightbit.optim import AdamW8bit
    >>> model = torch.nn.Linear(512, 512)
    >>> opt = AdamW8bit(model.parameters(), lr=1e-3)   # was torch.optim.AdamW
    >>> model(torch.randn(4, 512)).square().mean().backward()
    >>> opt.step(); opt.zero_grad()

Adam8bit, AdamW8bit, RMSprop8bit, SGD8bit and Adagrad8bit take their torch counterparts'
arguments (same names, defaults and meaning); Lion8bit follows Chen et al. 2023. All add
``block_size``, ``min_8bit_size``, ``bf16_stochastic_rounding`` and a per-group ``state_bits``
(8 or 32). :func:`to_torch_state_dict` and :func:`load_torch_state_dict` convert checkpoints
to and from the torch.optim counterparts.
"""

from ._base import Optimizer8bit
from ._convert import load_torch_state_dict, to_torch_state_dict
from .adagrad import Adagrad8bit
from .adam import Adam8bit, AdamW8bit
from .lion import Lion8bit
from .rmsprop import RMSprop8bit
from .sgd import SGD8bit

__all__ = [
    "Adagrad8bit",
    "Adam8bit",
    "AdamW8bit",
    "Lion8bit",
    "Optimizer8bit",
    "RMSprop8bit",
    "SGD8bit",
    "load_torch_state_dict",
    "to_torch_state_dict",
]
