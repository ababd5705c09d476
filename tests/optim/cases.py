"""The optimizer table: one row per optimizer and variant; every generic test iterates over it.

A new optimizer (or variant) is one more row: our class, its fp32 oracle, the constructor
arguments both take, and the states it keeps (torch's names; ``signed`` picks the codebook).
"""

from __future__ import annotations

import dataclasses

import torch
from eightbit.optim import Adagrad8bit, Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit, SGD8bit
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
    Row("SGD", SGD8bit, torch.optim.SGD, dict(lr=1e-3), ()),
    Row("SGD-momentum-dampening", SGD8bit, torch.optim.SGD,
        dict(lr=1e-3, momentum=0.9, dampening=0.5), (("momentum_buffer", True),)),
    Row("SGD-nesterov-wd", SGD8bit, torch.optim.SGD,
        dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=0.01),
        (("momentum_buffer", True),)),
    Row("SGD-momentum-maximize", SGD8bit, torch.optim.SGD,
        dict(lr=1e-3, momentum=0.8, maximize=True), (("momentum_buffer", True),)),
    Row("Adagrad", Adagrad8bit, torch.optim.Adagrad, dict(lr=1e-2), (("sum", False),)),
    Row("Adagrad-lr_decay-wd-initial", Adagrad8bit, torch.optim.Adagrad,
        dict(lr=1e-2, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
        (("sum", False),)),
    Row("Adagrad-maximize", Adagrad8bit, torch.optim.Adagrad, dict(lr=1e-2, maximize=True),
        (("sum", False),)),
]


def rows(*names: str) -> list[Row]:
    """The rows of these ids, in this order (a name that is not in the table is an error)."""
    by_id = {r.id: r for r in ROWS}
    missing = [n for n in names if n not in by_id]
    if missing:
        raise KeyError(f"no rows {missing} in the table; ids are {sorted(by_id)}")
    return [by_id[n] for n in names]


# One row per optimizer class, for the slower tests (SGD: a row that keeps a buffer).
CLASS_ROWS = rows("Adam", "AdamW", "RMSprop-centered-momentum-wd", "Lion",
                  "SGD-momentum-dampening", "Adagrad")


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
