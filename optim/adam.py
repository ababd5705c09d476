"""Adam8bit and AdamW8bit: torch.optim.Adam / AdamW with 8-bit state."""

from __future__ import annotations

import torch

from ..functional import adam8bit_update, adam32bit_update
from ._base import (
    EXTRA_ARGS_DOC,
    Optimizer8bit,
    StateSpec,
    check_betas,
    check_flag,
    check_real,
)

__all__ = ["Adam8bit", "AdamW8bit"]


class Adam8bit(Optimizer8bit):
    __doc__ = f"""Adam with 8-bit state: a drop-in replacement for :class:`torch.optim.Adam`.

    The first moment ``exp_avg`` is kept as codes of the signed dynamic map, the second moment
    ``exp_avg_sq`` (and AMSGrad's ``max_exp_avg_sq``) as codes of the unsigned map, with one fp32
    absmax per block: 2.03 bytes per parameter instead of 8. The rule, with the quantization in
    it, is :func:`eightbit.functional.adam8bit_update`.

    ``weight_decay`` is L2 regularization added to the gradient, as in torch.optim.Adam (not
    bitsandbytes' Adam8bit, which decays like AdamW); use :class:`AdamW8bit` for decoupled decay.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr (float or Tensor): learning rate (default 1e-3).
        betas (tuple[float, float]): decay of the moment averages (default (0.9, 0.999)).
        eps (float): added to the denominator (default 1e-8).
        weight_decay (float): L2 penalty (default 0).
        amsgrad (bool): use AMSGrad's running max of the second moment (default False).
        maximize (bool): maximize the objective (default False).
        decoupled_weight_decay (bool): decay like AdamW (default False).
        {EXTRA_ARGS_DOC}

    State per parameter: ``step`` (a 0-dim float32 tensor, as in torch), and ``exp_avg_codes``
    (uint8, the parameter's shape) with ``exp_avg_absmax`` (float32, one per block), likewise
    ``exp_avg_sq_*`` and ``max_exp_avg_sq_*``; parameters with fp32 state use torch's keys
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``.

    Example:
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = Adam8bit(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> opt.state[model.weight]["exp_avg_codes"].dtype
        torch.uint8
    """

    state_specs = (
        StateSpec("exp_avg", signed=True),
        StateSpec("exp_avg_sq", signed=False),
        StateSpec("max_exp_avg_sq", signed=False, enabled=lambda group: group["amsgrad"]),
    )

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        state_bits: int = 8,
        bf16_stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(
            params, defaults, block_size=block_size, min_8bit_size=min_8bit_size,
            state_bits=state_bits, bf16_stochastic_rounding=bf16_stochastic_rounding,
            foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable,
        )

    @classmethod
    def check_options(cls, options):
        out = super().check_options(options)
        out["betas"] = check_betas(out["betas"], high_open=True)
        check_real("epsilon value", out["eps"])
        for key in ("amsgrad", "decoupled_weight_decay"):
            out[key] = check_flag(key, out[key])
        return out

    def _update(self, group, params, grads, states, eight_bit):
        beta1, beta2 = group["betas"]
        kw = dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            bf16_stochastic_rounding=group["bf16_stochastic_rounding"],
        )
        steps = [s["step"] for s in states]
        if eight_bit:
            adam8bit_update(params, grads, *self._state_lists(states, True), steps,
                            block_size=group["block_size"], **kw)
        else:
            adam32bit_update(params, grads, *self._state_lists(states, False), steps, **kw)


class AdamW8bit(Adam8bit):
    __doc__ = f"""AdamW with 8-bit state: a drop-in replacement for :class:`torch.optim.AdamW`.

    :class:`Adam8bit` with decoupled weight decay (the parameter is multiplied by
    ``1 - lr * weight_decay`` before the update; Loshchilov & Hutter, arXiv:1711.05101) and
    torch.optim.AdamW's default ``weight_decay=1e-2``. Same state and extra arguments.

    Args:
        params, lr, betas, eps, amsgrad, maximize: as in :class:`Adam8bit`.
        weight_decay (float): decoupled decay (default 1e-2).
        {EXTRA_ARGS_DOC}

    Example:
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.01)

    Decoupled decay is what makes it AdamW: it stays on when a param group or a loaded
    checkpoint (Adam8bit's, say) says ``decoupled_weight_decay=False``, as torch.optim.AdamW
    keeps it when it loads torch.optim.Adam's state_dict.
    """

    fixed_options = {"decoupled_weight_decay": True}

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        state_bits: int = 8,
        bf16_stochastic_rounding: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, block_size=block_size, min_8bit_size=min_8bit_size,
            state_bits=state_bits, bf16_stochastic_rounding=bf16_stochastic_rounding,
        )
