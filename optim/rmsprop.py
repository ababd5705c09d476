"""RMSprop8bit: torch.optim.RMSprop with 8-bit state."""

from __future__ import annotations

import torch

from ..functional import rmsprop8bit_update, rmsprop32bit_update
from ._base import EXTRA_ARGS_DOC, Optimizer8bit, StateSpec, check_flag, check_real

__all__ = ["RMSprop8bit"]


class RMSprop8bit(Optimizer8bit):
    __doc__ = f"""RMSprop with 8-bit state: a drop-in replacement for :class:`torch.optim.RMSprop`.

    ``square_avg`` is kept as codes of the unsigned dynamic map; the momentum buffer (when
    ``momentum > 0``) and the centered gradient average (when ``centered``) as codes of the signed
    map, all with one fp32 absmax per block. The rule, with the quantization in it, is
    :func:`eightbit.functional.rmsprop8bit_update`. Momentum and centered are supported (unlike
    bitsandbytes' RMSprop8bit).

    Args:
        params: parameters or param groups.
        lr (float or Tensor): learning rate (default 1e-2).
        alpha (float): smoothing constant of the square average (default 0.99).
        eps (float): added to the denominator (default 1e-8).
        weight_decay (float): L2 penalty (default 0).
        momentum (float): momentum factor (default 0).
        centered (bool): normalize by the estimated variance of the gradient (default False).
        maximize (bool): maximize the objective (default False).
        {EXTRA_ARGS_DOC}

    State per parameter: ``step``, ``square_avg_codes`` / ``square_avg_absmax`` and, when used,
    ``momentum_buffer_*`` and ``grad_avg_*``; fp32-state parameters use torch's keys
    ``square_avg``, ``momentum_buffer``, ``grad_avg``.

    Example:
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = RMSprop8bit(model.parameters(), lr=1e-3, momentum=0.9, centered=True)
    """

    state_specs = (
        StateSpec("square_avg", signed=False),
        StateSpec("momentum_buffer", signed=True, enabled=lambda group: group["momentum"] > 0),
        StateSpec("grad_avg", signed=True, enabled=lambda group: group["centered"]),
    )

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        fused: bool | None = None,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        state_bits: int = 8,
        bf16_stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, maximize=maximize,
        )
        super().__init__(
            params, defaults, block_size=block_size, min_8bit_size=min_8bit_size,
            state_bits=state_bits, bf16_stochastic_rounding=bf16_stochastic_rounding,
            foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable,
        )

    @classmethod
    def check_options(cls, options):
        out = super().check_options(options)
        for key, name in (("eps", "epsilon value"), ("momentum", "momentum value"),
                          ("alpha", "alpha value")):
            check_real(name, options[key])
        out["centered"] = check_flag("centered", options["centered"])
        return out

    def _update(self, group, params, grads, states, eight_bit):
        kw = dict(
            lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
            weight_decay=group["weight_decay"], momentum=group["momentum"],
            centered=group["centered"], maximize=group["maximize"],
            bf16_stochastic_rounding=group["bf16_stochastic_rounding"],
        )
        if eight_bit:
            rmsprop8bit_update(params, grads, *self._state_lists(states, True),
                               block_size=group["block_size"], **kw)
        else:
            rmsprop32bit_update(params, grads, *self._state_lists(states, False), **kw)
