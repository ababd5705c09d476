r"""Adam and AdamW with 8-bit (or fp32) state: one update rule, one dispatch point.

Adam: Kingma & Ba 2015 (arXiv:1412.6980), with torch.optim.Adam's conventions (bias-corrected
step size, eps added after the bias-corrected square root, AMSGrad as the running max of v).
AdamW: Loshchilov & Hutter 2019 (arXiv:1711.05101). 8-bit state: Dettmers et al. 2022
(arXiv:2110.02861).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import _chunked, _native
from ._docs import fill

__all__ = ["adam8bit_update", "adam32bit_update"]


@fill
def adam8bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg_codes: Sequence[torch.Tensor],
    exp_avg_absmax: Sequence[torch.Tensor],
    exp_avg_sq_codes: Sequence[torch.Tensor],
    exp_avg_sq_absmax: Sequence[torch.Tensor],
    max_exp_avg_sq_codes: Sequence[torch.Tensor] | None,
    max_exp_avg_sq_absmax: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    block_size: int,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""One Adam / AdamW step with 8-bit blockwise-quantized moments, in place.

    With :math:`Q` the blockwise quantizer on the signed dynamic map, :math:`Q_+` on the unsigned
    one, :math:`Q^{-1}` dequantization, :math:`\gamma` = lr, :math:`\lambda` = weight_decay and
    :math:`t` the (already incremented) step:

    .. math::

        \begin{aligned}
        g &\leftarrow \nabla f(\theta) \quad (-\nabla f(\theta) \text{ if maximize}) \\
        g &\leftarrow g + \lambda\theta \quad \text{(Adam: L2 decay)} \qquad
        \theta \leftarrow (1 - \gamma\lambda)\,\theta \quad \text{(AdamW: decoupled)} \\
        m &\leftarrow \beta_1\, Q^{-1}(\bar m) + (1 - \beta_1)\, g \\
        v &\leftarrow \beta_2\, Q_+^{-1}(\bar v) + (1 - \beta_2)\, g^2 \\
        \hat v &\leftarrow \max\big(Q_+^{-1}(\bar v_{\max}),\, v\big) \text{ if amsgrad, else } v \\
        \theta &\leftarrow \theta - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m}{\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon} \\
        \bar m &\leftarrow Q(m), \quad \bar v \leftarrow Q_+(v), \quad
        \bar v_{\max} \leftarrow Q_+(\hat v)
        \end{aligned}

    The parameter update uses the fresh fp32 ``m`` and ``v``, before they are requantized.
    Adam's ``weight_decay`` is L2 regularization added to the gradient (as in torch.optim.Adam;
    bitsandbytes' Adam decays like AdamW instead); ``decoupled_weight_decay=True`` is AdamW.

    %(state_rule)s

    So a step from requantized states is at most :math:`2.0 / \sqrt{0.5345} = 2.74` times the
    step from the exact states (AMSGrad's maximum of two such second moments keeps the bound);
    tests/optim/test_robustness.py checks it on rare embedding rows.

    Args:
        %(params)s
        %(codes)s
        steps: 0-dim float32 step counters, already incremented for this step.
        %(lr)s
        beta1, beta2, eps, weight_decay: as in torch.optim.Adam.
        decoupled_weight_decay: AdamW's decay instead of L2.
        amsgrad: normalize by the running maximum of v (its codes/absmax must then be given).
        %(maximize)s
        %(block_size)s
        %(bf16_stochastic_rounding)s

    %(chunks)s

    Example:
        >>> import torch
        >>> from eightbit.quant import get_codebook
        >>> p, g = torch.randn(1000), torch.randn(1000)
        >>> m_codes = torch.full((1000,), 127, dtype=torch.uint8)  # code of 0.0 (signed map)
        >>> v_codes = torch.zeros(1000, dtype=torch.uint8)          # code of 0.0 (unsigned map)
        >>> m_absmax, v_absmax = torch.zeros(4), torch.zeros(4)
        >>> adam8bit_update([p], [g], [m_codes], [m_absmax], [v_codes], [v_absmax], None, None,
        ...                 [torch.tensor(1.0)], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
        ...                 weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
        ...                 maximize=False, block_size=256)
    """
    _chunked.check_params(params, grads, block_size)
    _chunked.check_len(steps, params, "steps")
    if amsgrad and max_exp_avg_sq_codes is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sq_codes and max_exp_avg_sq_absmax")
    kw = dict(block_size=block_size, params=params)
    exp_avgs = _chunked.quantized_states(
        exp_avg_codes, exp_avg_absmax, signed=True, name="exp_avg", **kw
    )
    exp_avg_sqs = _chunked.quantized_states(
        exp_avg_sq_codes, exp_avg_sq_absmax, signed=False, name="exp_avg_sq", **kw
    )
    max_exp_avg_sqs = _chunked.quantized_states(
        max_exp_avg_sq_codes if amsgrad else None,
        max_exp_avg_sq_absmax if amsgrad else None,
        signed=False, name="max_exp_avg_sq", **kw,
    )
    # Backend dispatch for 8-bit Adam: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import ADAM as update  # fused CUDA kernels; CuPy is imported on the first launch
    else:  # CPU tensors: the fused numba kernels when numba is installed, else the torch path
        update = _native.adam if _native.serves(params) else _adam_torch
    update(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, block_size=block_size,
        bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


@fill
def adam32bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""The fp32-state twin of :func:`adam8bit_update` (same math, :math:`Q` = identity).

    Serves parameters below ``min_8bit_size`` and param groups with ``state_bits=32``. The states
    are float32 whatever the parameter dtype, so bf16 parameters still get fp32 moments.

    Args:
        %(params)s
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs: contiguous float32 states of the parameters'
            shapes, updated in place (``max_exp_avg_sqs`` only with amsgrad, else ``None``).
        steps, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
        bf16_stochastic_rounding: as in :func:`adam8bit_update`.

    Example:
        >>> p, g = torch.randn(10), torch.randn(10)
        >>> m, v = torch.zeros(10), torch.zeros(10)
        >>> adam32bit_update([p], [g], [m], [v], None, [torch.tensor(1.0)], lr=1e-3, beta1=0.9,
        ...                  beta2=0.999, eps=1e-8, weight_decay=0.0,
        ...                  decoupled_weight_decay=True, amsgrad=False, maximize=False)
    """
    _chunked.check_params(params, grads, None)
    _chunked.check_len(steps, params, "steps")
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    # Backend dispatch for fp32-state Adam: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import ADAM as update  # fused CUDA kernels; CuPy is imported on the first launch
    else:
        update = _adam_torch
    update(
        params, grads, _chunked.fp32_states(exp_avgs, params, name="exp_avgs"),
        _chunked.fp32_states(exp_avg_sqs, params, name="exp_avg_sqs"),
        _chunked.fp32_states(max_exp_avg_sqs if amsgrad else None, params, name="max_exp_avg_sqs"),
        steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
        block_size=_chunked.FP32_CHUNK_BLOCK, bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


def _adam_torch(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
    weight_decay, decoupled_weight_decay, maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """The torch path: torch.optim.Adam's single-tensor arithmetic, chunk by chunk."""
    lr = _chunked.scalar(lr)
    for p, g, m, v, v_max, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, strict=True
    ):
        step = _chunked.scalar(step_t)
        rule = functools.partial(
            _adam_chunk, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, step_size=lr / (1 - beta1**step),
            bias_correction2_sqrt=(1 - beta2**step) ** 0.5,
        )
        _chunked.for_each_chunk(
            p, g, (m, v, v_max), rule, block_size=block_size, maximize=maximize,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
        )


def _adam_chunk(
    p, g, m, v, v_max, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, step_size,
    bias_correction2_sqrt,
) -> None:
    """One chunk, fp32, in place; the operations and their order are torch.optim.Adam's."""
    if weight_decay != 0:
        if decoupled_weight_decay:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if v_max is not None:
        torch.maximum(v_max, v, out=v_max)
    denom = ((v if v_max is None else v_max).sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)
