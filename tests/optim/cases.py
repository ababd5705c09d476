"""The optimizer table: one row per optimizer and variant; every generic test iterates over it.

A new optimizer (or variant) is one more row: our class, its fp32 oracle, the constructor
arguments both take, and the states it keeps (torch's names; ``signed`` picks the codebook).
"""

from __future__ import annotations

import dataclasses

import torch
from eightbit.optim import Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit
from eightbit.quant import dequantize_blockwise, get_codebook, quantize_blockwise

from .lion_reference import LionReference


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    cls: type
    ref: type
    kwargs: dict
    states: tuple[tuple[str, bool], ...]  # (torch state name, signed) of the states in use

    def ours(self, params, **extra):
        return self.cls(params, **{**self.kwargs, **extra})

    def oracle(self, params, **extra):
        foreach = {} if self.ref is LionReference else {"foreach": False}
        return self.ref(params, **{**self.kwargs, **foreach, **extra})


ADAM_STATES = (("exp_avg", True), ("exp_avg_sq", False))
AMSGRAD_STATES = (*ADAM_STATES, ("max_exp_avg_sq", False))

ROWS = [
    Row("Adam", Adam8bit, torch.optim.Adam, dict(lr=1e-3), ADAM_STATES),
    Row("Adam-l2-amsgrad", Adam8bit, torch.optim.Adam,
        dict(lr=1e-3, weight_decay=0.1, amsgrad=True), AMSGRAD_STATES),
    Row("Adam-maximize", Adam8bit, torch.optim.Adam, dict(lr=1e-3, maximize=True), ADAM_STATES),
    Row("AdamW", AdamW8bit, torch.optim.AdamW, dict(lr=1e-3), ADAM_STATES),
    Row("AdamW-amsgrad", AdamW8bit, torch.optim.AdamW,
        dict(lr=1e-3, weight_decay=0.1, amsgrad=True, betas=(0.8, 0.99)), AMSGRAD_STATES),
    Row("RMSprop", RMSprop8bit, torch.optim.RMSprop, dict(lr=1e-3), (("square_avg", False),)),
    Row("RMSprop-momentum", RMSprop8bit, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9),
        (("square_avg", False), ("momentum_buffer", True))),
    Row("RMSprop-centered-momentum-wd", RMSprop8bit, torch.optim.RMSprop,
        dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=0.01),
        (("square_avg", False), ("momentum_buffer", True), ("grad_avg", True))),
    Row("Lion", Lion8bit, LionReference, dict(lr=1e-4), (("exp_avg", True),)),
    Row("Lion-wd-maximize", Lion8bit, LionReference,
        dict(lr=1e-4, weight_decay=0.1, maximize=True), (("exp_avg", True),)),
]
# One row per optimizer class, for the slower tests.
CLASS_ROWS = [ROWS[0], ROWS[3], ROWS[7], ROWS[8]]


def ids(rows):
    return [r.id for r in rows]


def dequantized(state: dict, name: str, signed: bool, block_size: int = 256) -> torch.Tensor:
    """The fp32 value of an 8-bit state (or the fp32 state itself)."""
    if name in state:
        return state[name]
    return dequantize_blockwise(
        state[f"{name}_codes"], state[f"{name}_absmax"],
        codebook=get_codebook("dynamic", signed=signed), block_size=block_size,
        dtype=torch.float32,
    )


def round_trip(x: torch.Tensor, signed: bool, block_size: int = 256):
    """quantize_blockwise of ``x`` on the state's codebook: (codes, absmax, dequantized)."""
    q = quantize_blockwise(x, codebook=get_codebook("dynamic", signed=signed),
                           block_size=block_size)
    return q.codes, q.absmax, q.dequantize(dtype=torch.float32)
