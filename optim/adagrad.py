"""Adagrad8bit: torch.optim.Adagrad with an 8-bit sum of squared gradients."""

from __future__ import annotations

import torch

from ..functional import adagrad8bit_update, adagrad32bit_update
from ._base import EXTRA_ARGS_DOC, Optimizer8bit, StateSpec, check_real

__all__ = ["Adagrad8bit"]

ONE_CODE = 255  # the code of 1.0 in the unsigned dynamic map (its last entry)


class Adagrad8bit(Optimizer8bit):
    __doc__ = f"""Adagrad with 8-bit state: a drop-in replacement for :class:`torch.optim.Adagrad`.

    The sum of squared gradients ``sum`` is kept as codes of the unsigned dynamic map with one
    fp32 absmax per block: 1.02 bytes per parameter instead of 4. The rule, with the quantization
    in it, is :func:`eightbit.functional.adagrad8bit_update`.

    Args:
        params: parameters or param groups.
        lr (float or Tensor): learning rate (default 1e-2).
        lr_decay (float): learning rate decay, lr / (1 + (step - 1) lr_decay) (default 0).
        weight_decay (float): L2 penalty (default 0).
        initial_accumulator_value (float): starting value of ``sum`` (default 0); stored exactly
            in 8 bits (code of 1.0, absmax = the value).
        eps (float): added to the denominator (default 1e-10).
        maximize (bool): maximize the objective (default False).
        {EXTRA_ARGS_DOC}

    State per parameter: ``step``, ``sum_codes`` and ``sum_absmax`` (fp32-state parameters:
    torch's ``sum``). torch.optim.Adagrad creates its state in ``__init__``; this class creates
    it at a parameter's first step, like every eightbit optimizer, because the 8-bit or fp32
    choice and the DTensor's local shape are known there. Before the first step the state holds
    only ``initial_accumulator_value``, which it then receives, so the updates are the same; a
    parameter that never gets a gradient has no state (torch: step 0 and the initial sum).

    Example:
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = Adagrad8bit(model.parameters(), lr=1e-2, initial_accumulator_value=0.1)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> opt.state[model.weight]["sum_codes"].dtype
        torch.uint8
    """

    state_specs = (StateSpec("sum", signed=False),)

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        state_bits: int = 8,
        bf16_stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
        )
        super().__init__(
            params, defaults, block_size=block_size, min_8bit_size=min_8bit_size,
            state_bits=state_bits, bf16_stochastic_rounding=bf16_stochastic_rounding,
            foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable,
        )

    @classmethod
    def check_options(cls, options):
        out = super().check_options(options)
        for name, key in (("lr_decay value", "lr_decay"), ("epsilon value", "eps"),
                          ("initial_accumulator_value value", "initial_accumulator_value")):
            out[key] = check_real(name, out[key])
        return out

    def _fill_state(self, p, group, state):
        """The base's state creation, then ``sum`` set to ``initial_accumulator_value``."""
        fresh = "sum" not in state and "sum_codes" not in state
        super()._fill_state(p, group, state)
        value = group["initial_accumulator_value"]
        if not fresh or value == 0:
            return
        if "sum_codes" in state:  # Q_+(value): every block's absmax is the value, codes 1.0
            state["sum_codes"].fill_(ONE_CODE)
            state["sum_absmax"].fill_(value)
        else:
            state["sum"].fill_(value)

    def _update(self, group, params, grads, states, eight_bit):
        kw = dict(
            lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=group["maximize"],
            bf16_stochastic_rounding=group["bf16_stochastic_rounding"],
        )
        steps = [s["step"] for s in states]
        if eight_bit:
            adagrad8bit_update(params, grads, *self._state_lists(states, True), steps,
                               block_size=group["block_size"], **kw)
        else:
            adagrad32bit_update(params, grads, *self._state_lists(states, False), steps, **kw)
