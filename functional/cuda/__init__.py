"""Fused CUDA kernels of the 8-bit update rules: one launch, one pass over memory per step.

Each kernel of this package is a :class:`FusedKernel` (:data:`ADAM`, :data:`RMSPROP`,
:data:`LION`, :data:`SGD`, :data:`ADAGRAD`), called with the arguments of its rule's torch path
(``eightbit.functional.adam._adam_torch`` and so on: parameters, gradients, one list per state,
the step counters if the rule reads them, then the hyperparameters as keywords), so that the
public rules of :mod:`eightbit.functional` dispatch CUDA tensors here with one ``if`` and write
each signature once. It computes the same update: per element, load the parameter, the gradient
and the 8-bit states, dequantize, apply the rule in fp32, store the parameter, requantize (block
absmax and the codebook search of ``quant/cuda/eightbit_quant.cuh``) and store codes and absmax.
Parameters of every size share one multi-tensor launch per (parameter dtype, gradient dtype);
``lr`` (a CUDA tensor) and the step counters are read on the device, so ``optimizer.step()`` can
be captured in a CUDA graph. Lists of float32 state tensors instead of
:class:`~eightbit.functional._chunked.Quantized` states run the same kernel on fp32 state
(``state_bits=32``: parameters below ``min_8bit_size`` and fp32 param groups).

Bytes moved per fp32 parameter: Adam 16 (read p, g, m, v; write p, m, v), one-state rules 14,
against 28 for torch's fused fp32 Adam (DESIGN.md, cost model).

The argument lists are checked once, by the public rules (lengths, shapes, dtypes, the states a
feature needs), before they dispatch here; the launcher adds its dtype/device/contiguity checks.
Call the public rules rather than these kernels.

Kernels: ``adam.cu``, ``rmsprop.cu``, ``lion.cu``, ``sgd.cu``, ``adagrad.cu`` with the driver
``eightbit_optim.cuh``, templated on the parameter and gradient types. A new rule is a ``.cu``
file (its ``Rule::update`` and a ``<stem>_kernel`` calling the driver) and one
:class:`FusedKernel` line below. This package does not import CuPy; the runtime of
:mod:`eightbit.quant.cuda` does, on the first launch.

Example (GPU and CuPy)::

    >>> from eightbit.functional import lion8bit_update
    >>> p = torch.randn(1 << 20, device="cuda"); g = torch.randn_like(p)
    >>> m = torch.full_like(p, 127, dtype=torch.uint8); absmax = torch.zeros(4096, device="cuda")
    >>> lion8bit_update([p], [g], [m], [absmax], lr=1e-4, beta1=0.9, beta2=0.99,
    ...                 weight_decay=0.0, maximize=False, block_size=256)  # runs LION
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from .._chunked import Quantized
from ._launch import KERNEL_DIR, launch

__all__ = ["ADAGRAD", "ADAM", "KERNEL_DIR", "LION", "RMSPROP", "SGD", "FusedKernel", "Present"]

# The fp32-state twins have no quantization blocks; this only sets the kernels' tile (2048).
FP32_STATE_TILE_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class Present:
    """A kernel ``int`` argument that says whether state ``index`` is kept (1) or not (0): the
    torch paths tell AMSGrad or a centered RMSprop by their state lists, not by a flag."""

    index: int


@dataclasses.dataclass(frozen=True)
class FusedKernel:
    """The ``<stem>_kernel`` template of ``source``, callable with its rule's torch-path arguments.

    ``num_states``: the state lists that follow ``params, grads`` (in the kernel's state slots);
    ``steps``: whether a list of step counters follows them; ``scalars``: the kernel's arguments
    between ``lr`` and ``seed`` in C order, each a keyword of the call (``bool`` -> ``int``,
    numbers -> ``double``) or :class:`Present`.
    """

    source: str
    num_states: int
    steps: bool
    scalars: tuple[str | Present, ...]

    def __call__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        *lists: Sequence,
        lr: float | torch.Tensor,
        block_size: int,
        bf16_stochastic_rounding: bool = False,
        **hyper: float | bool,
    ) -> None:
        expected = self.num_states + int(self.steps)
        names = {s for s in self.scalars if isinstance(s, str)}
        if len(lists) != expected or set(hyper) != names:
            raise TypeError(
                f"{self.source} takes params, grads, {expected} lists and the keywords "
                f"{sorted(names)}; got {len(lists)} lists and {sorted(hyper)}"
            )
        states, steps = (lists[:-1], lists[-1]) if self.steps else (lists, None)
        quantized = any(isinstance(s, Quantized) for state in states for s in state)
        slots = [_slot(state) for state in states]
        launch(
            f"{Path(self.source).stem}_kernel",
            self.source,
            params,
            grads,
            slots,
            steps,
            tuple(
                int(slots[s.index][0] is not None) if isinstance(s, Present) else _c(hyper[s])
                for s in self.scalars
            ),
            lr=lr,
            block_size=block_size if quantized else FP32_STATE_TILE_BLOCK,
            state_bits=8 if quantized else 32,
            stochastic_rounding=bf16_stochastic_rounding,
        )


def _slot(state: Sequence[Quantized | torch.Tensor | None]) -> tuple:
    """One state list as the launcher's ``(codes, absmax)`` / ``(fp32 states, None)`` slot."""
    if all(s is None for s in state):
        return (None, None)
    if isinstance(state[0], Quantized):
        return ([s.codes for s in state], [s.absmax for s in state])
    return (list(state), None)


def _c(value: float | bool) -> float | int:
    """A hyperparameter as the kernel's C type: ``int`` for flags, ``double`` for numbers."""
    return int(value) if isinstance(value, bool) else float(value)


ADAM = FusedKernel(
    "adam.cu", num_states=3, steps=True,
    scalars=("beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay", Present(2),
             "maximize"),
)
RMSPROP = FusedKernel(
    "rmsprop.cu", num_states=3, steps=False,
    scalars=("alpha", "eps", "weight_decay", "momentum", Present(2), "maximize"),
)
LION = FusedKernel(
    "lion.cu", num_states=1, steps=False, scalars=("beta1", "beta2", "weight_decay", "maximize")
)
SGD = FusedKernel(
    "sgd.cu", num_states=1, steps=True,
    scalars=("momentum", "dampening", "weight_decay", "nesterov", "maximize"),
)
ADAGRAD = FusedKernel(
    "adagrad.cu", num_states=1, steps=True,
    scalars=("lr_decay", "weight_decay", "eps", "maximize"),
)
