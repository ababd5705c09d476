r"""Lion with 8-bit (or fp32) state: one update rule, one dispatch point.

Lion ("EvoLved Sign Momentum"): Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms", arXiv:2302.06675, Algorithm 2 (decoupled weight decay). 8-bit state: Dettmers et al.
2022 (arXiv:2110.02861).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import _chunked, _native
from ._docs import fill

__all__ = ["lion8bit_update", "lion32bit_update"]


@fill
def lion8bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg_codes: Sequence[torch.Tensor],
    exp_avg_absmax: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    block_size: int,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""One Lion step with an 8-bit blockwise-quantized momentum, in place.

    With :math:`Q` the blockwise quantizer on the signed dynamic map, :math:`\gamma` = lr and
    :math:`\lambda` = weight_decay (Algorithm 2 of arXiv:2302.06675):

    .. math::

        \begin{aligned}
        g &\leftarrow \nabla f(\theta) \quad (-\nabla f(\theta) \text{ if maximize}),
            \qquad m \leftarrow Q^{-1}(\bar m) \\
        c &\leftarrow \beta_1 m + (1 - \beta_1)\, g \\
        \theta &\leftarrow (1 - \gamma\lambda)\,\theta - \gamma\, \operatorname{sign}(c) \\
        \bar m &\leftarrow Q\big(\beta_2 m + (1 - \beta_2)\, g\big)
        \end{aligned}

    Weight decay is decoupled (applied to the parameter, as in AdamW). Lion has no eps and no
    step counter; its update has the same magnitude :math:`\gamma` in every coordinate, so it wants
    a smaller lr (3-10x) than AdamW.

    %(state_rule)s

    Lion's step is :math:`\pm\gamma` per coordinate whatever the state, so (b) has nothing to
    bound here; (a) keeps a NaN or inf gradient from freezing its block (the element's momentum
    restarts from 0 instead of making the block's absmax NaN).

    Args:
        %(params)s
        %(codes)s
            Here the momentum ``exp_avg`` (signed map).
        %(lr)s
        beta1: interpolation weight of the update direction (paper default 0.9).
        beta2: momentum decay (paper default 0.99).
        weight_decay: decoupled decay.
        %(maximize)s
        %(block_size)s
        %(bf16_stochastic_rounding)s

    %(chunks)s

    Example:
        >>> p, g = torch.randn(1000), torch.randn(1000)
        >>> m_codes = torch.full((1000,), 127, dtype=torch.uint8)  # code of 0.0 (signed map)
        >>> lion8bit_update([p], [g], [m_codes], [torch.zeros(4)], lr=1e-4, beta1=0.9,
        ...                 beta2=0.99, weight_decay=0.0, maximize=False, block_size=256)
    """
    _chunked.check_params(params, grads, block_size)
    exp_avgs = _chunked.quantized_states(
        exp_avg_codes, exp_avg_absmax, params, signed=True, block_size=block_size, name="exp_avg"
    )
    # Backend dispatch for 8-bit Lion: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import LION as update  # fused CUDA kernels; CuPy is imported on the first launch
    else:  # CPU tensors: the fused numba kernels when numba is installed, else the torch path
        update = _native.lion if _native.serves(params) else _lion_torch
    update(
        params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
        maximize=maximize, block_size=block_size,
        bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


@fill
def lion32bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""The fp32-state twin of :func:`lion8bit_update` (same math, :math:`Q` = identity).

    Args:
        %(params)s
        exp_avgs: contiguous float32 momenta of the parameters' shapes, updated in place.
        lr, beta1, beta2, weight_decay, maximize, bf16_stochastic_rounding: as in
            :func:`lion8bit_update`.

    Example:
        >>> p, g, m = torch.randn(10), torch.randn(10), torch.zeros(10)
        >>> lion32bit_update([p], [g], [m], lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0,
        ...                  maximize=False)
    """
    _chunked.check_params(params, grads, None)
    # Backend dispatch for fp32-state Lion: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import LION as update  # fused CUDA kernels; CuPy is imported on the first launch
    else:
        update = _lion_torch
    update(
        params, grads, _chunked.fp32_states(exp_avgs, params, name="exp_avgs"), lr=lr,
        beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
        block_size=_chunked.FP32_CHUNK_BLOCK, bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


def _lion_torch(
    params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize, block_size,
    bf16_stochastic_rounding,
) -> None:
    """The torch path, chunk by chunk."""
    rule = functools.partial(
        _lion_chunk, lr=_chunked.scalar(lr), beta1=beta1, beta2=beta2, weight_decay=weight_decay
    )
    for p, g, m in zip(params, grads, exp_avgs, strict=True):
        _chunked.for_each_chunk(
            p, g, (m,), rule, block_size=block_size, maximize=maximize,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
        )


def _lion_chunk(p, g, m, *, lr, beta1, beta2, weight_decay):
    """One chunk, fp32, in place (arXiv:2302.06675, Algorithm 2)."""
    update = m.mul(beta1).add_(g, alpha=1 - beta1).sign_()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    p.add_(update, alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1 - beta2)
