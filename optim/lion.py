"""Lion8bit: the Lion optimizer (Chen et al. 2023, arXiv:2302.06675) with 8-bit state."""

from __future__ import annotations

import torch

from ..functional import lion8bit_update, lion32bit_update
from ._base import EXTRA_ARGS_DOC, Optimizer8bit, StateSpec, check_betas

__all__ = ["Lion8bit"]


class Lion8bit(Optimizer8bit):
    __doc__ = f"""Lion with an 8-bit momentum (torch has no Lion; the arguments follow its style).

    Lion ("EvoLved Sign Momentum", Chen et al. 2023, arXiv:2302.06675, Algorithm 2) updates each
    coordinate by ``lr * sign(beta1 * m + (1 - beta1) * g)`` and keeps a single momentum ``m``,
    here as codes of the signed dynamic map with one fp32 absmax per block: 1.02 bytes per
    parameter. The rule, with the quantization in it, is
    :func:`eightbit.functional.lion8bit_update`. Use a 3-10x smaller lr than for AdamW and a
    3-10x larger weight_decay (the paper's advice, section 5).

    Args:
        params: parameters or param groups.
        lr (float or Tensor): learning rate (default 1e-4).
        betas (tuple[float, float]): update interpolation and momentum decay (default (0.9, 0.99)).
        weight_decay (float): decoupled weight decay (default 0).
        maximize (bool): maximize the objective (default False).
        {EXTRA_ARGS_DOC}

    State per parameter: ``step``, ``exp_avg_codes`` and ``exp_avg_absmax``; fp32-state
    parameters use ``exp_avg``.

    Example:
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = Lion8bit(model.parameters(), lr=1e-4, weight_decay=0.1)
    """

    state_specs = (StateSpec("exp_avg", signed=True),)

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        state_bits: int = 8,
        bf16_stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay,
            maximize=maximize,
        )
        super().__init__(
            params, defaults, block_size=block_size, min_8bit_size=min_8bit_size,
            state_bits=state_bits, bf16_stochastic_rounding=bf16_stochastic_rounding,
            foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable,
        )

    @classmethod
    def check_options(cls, options):
        out = super().check_options(options)
        out["betas"] = check_betas(options["betas"], high_open=False)
        return out

    def _update(self, group, params, grads, states, eight_bit):
        beta1, beta2 = group["betas"]
        kw = dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            bf16_stochastic_rounding=group["bf16_stochastic_rounding"],
        )
        if eight_bit:
            lion8bit_update(params, grads, *self._state_lists(states, True),
                            block_size=group["block_size"], **kw)
        else:
            lion32bit_update(params, grads, *self._state_lists(states, False), **kw)
