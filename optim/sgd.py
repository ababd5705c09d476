"""SGD8bit: torch.optim.SGD with an 8-bit momentum buffer."""

from __future__ import annotations

import torch

from ..functional import sgd8bit_update, sgd32bit_update
from ._base import EXTRA_ARGS_DOC, Optimizer8bit, StateSpec, check_flag, check_real

__all__ = ["SGD8bit"]


class SGD8bit(Optimizer8bit):
    __doc__ = f"""SGD with an 8-bit momentum buffer: a drop-in replacement for
    :class:`torch.optim.SGD`.

    The momentum buffer is kept as codes of the signed dynamic map with one fp32 absmax per
    block: 1.02 bytes per parameter instead of 4. The rule, with the quantization in it, is
    :func:`eightbit.functional.sgd8bit_update`. Without momentum SGD keeps no buffer (as torch).

    Args:
        params: parameters or param groups.
        lr (float or Tensor): learning rate (default 1e-3).
        momentum (float): momentum factor (default 0).
        dampening (float): dampening of the gradient added to the buffer (default 0).
        weight_decay (float): L2 penalty (default 0).
        nesterov (bool): Nesterov momentum (default False; needs momentum and zero dampening).
        maximize (bool): maximize the objective (default False).
        {EXTRA_ARGS_DOC}

    State per parameter: ``step`` and, when ``momentum != 0``, ``momentum_buffer_codes`` /
    ``momentum_buffer_absmax`` (fp32-state parameters: torch's ``momentum_buffer``). torch's SGD
    keeps no step and starts a buffer from the gradient when it has none; here the buffer is
    created with the state, so the step counter says when it starts (step 1). ``step`` is kept
    without momentum too, like every eightbit optimizer's state.

    Example:
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = SGD8bit(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> opt.state[model.weight]["momentum_buffer_codes"].dtype
        torch.uint8
    """

    state_specs = (
        StateSpec("momentum_buffer", signed=True, enabled=lambda group: group["momentum"] != 0),
    )

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        state_bits: int = 8,
        bf16_stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize,
        )
        super().__init__(
            params, defaults, block_size=block_size, min_8bit_size=min_8bit_size,
            state_bits=state_bits, bf16_stochastic_rounding=bf16_stochastic_rounding,
            foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable,
        )

    @classmethod
    def check_options(cls, options):
        out = super().check_options(options)
        out["momentum"] = check_real("momentum value", out["momentum"])
        out["dampening"] = check_real("dampening value", out["dampening"])
        out["nesterov"] = check_flag("nesterov", out["nesterov"])
        if out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        return out

    def _update(self, group, params, grads, states, eight_bit):
        kw = dict(
            lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=group["weight_decay"], nesterov=group["nesterov"],
            maximize=group["maximize"],
            bf16_stochastic_rounding=group["bf16_stochastic_rounding"],
        )
        steps = [s["step"] for s in states]
        if eight_bit:
            sgd8bit_update(params, grads, *self._state_lists(states, True), steps,
                           block_size=group["block_size"], **kw)
        else:
            sgd32bit_update(params, grads, *self._state_lists(states, False), steps, **kw)
