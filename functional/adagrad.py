r"""Adagrad with an 8-bit (or fp32) sum of squares: one update rule, one dispatch point.

Adagrad: Duchi, Hazan & Singer 2011, "Adaptive Subgradient Methods for Online Learning and
Stochastic Optimization" (JMLR 12), the diagonal variant, with torch.optim.Adagrad's conventions
(lr decay 1 / (1 + (t - 1) lr_decay), eps added after the square root). 8-bit state: Dettmers et
al. 2022 (arXiv:2110.02861).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import _chunked, _native
from ._docs import fill

__all__ = ["adagrad8bit_update", "adagrad32bit_update"]


@fill
def adagrad8bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    sum_codes: Sequence[torch.Tensor],
    sum_absmax: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    block_size: int,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""One Adagrad step with an 8-bit blockwise-quantized sum of squared gradients, in place.

    With :math:`Q_+` the blockwise quantizer on the unsigned dynamic map, :math:`\gamma` = lr,
    :math:`\eta` = lr_decay, :math:`\lambda` = weight_decay and :math:`t` the (already
    incremented) step:

    .. math::

        \begin{aligned}
        g &\leftarrow \nabla f(\theta) \quad (-\nabla f(\theta) \text{ if maximize}), \qquad
        g \leftarrow g + \lambda\theta \\
        \tilde\gamma &\leftarrow \gamma / (1 + (t - 1)\,\eta) \\
        s &\leftarrow Q_+^{-1}(\bar s) + g^2 \\
        \theta &\leftarrow \theta - \tilde\gamma\, \frac{g}{\sqrt{s} + \epsilon}, \qquad
        \bar s \leftarrow Q_+(s)
        \end{aligned}

    ``weight_decay`` is L2 regularization added to the gradient, as in torch.optim.Adagrad.
    torch's ``initial_accumulator_value`` is the state's starting value: the optimizer writes it
    into ``sum`` when it creates the state; this function only updates.

    Args:
        %(params)s
        %(codes)s
            Here ``sum`` (unsigned map).
        steps: 0-dim float32 step counters, already incremented for this step.
        %(lr)s
        lr_decay, weight_decay, eps: as in torch.optim.Adagrad.
        %(maximize)s
        %(block_size)s
        %(bf16_stochastic_rounding)s

    %(chunks)s

    Example:
        >>> import torch
        >>> p, g = torch.randn(1000), torch.randn(1000)
        >>> s_codes = torch.zeros(1000, dtype=torch.uint8)  # code of 0.0 (unsigned map)
        >>> adagrad8bit_update([p], [g], [s_codes], [torch.zeros(4)], [torch.tensor(1.0)],
        ...                    lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
        ...                    maximize=False, block_size=256)
    """
    _chunked.check_params(params, grads, block_size)
    _chunked.check_len(steps, params, "steps")
    state_sums = _chunked.quantized_states(
        sum_codes, sum_absmax, params, signed=False, block_size=block_size, name="sum"
    )
    # Backend dispatch for 8-bit Adagrad: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import ADAGRAD as update  # fused CUDA kernels; CuPy is imported on first launch
    else:  # CPU tensors: the fused numba kernels when numba is installed, else the torch path
        update = _native.adagrad if _native.serves(params) else _adagrad_torch
    update(
        params, grads, state_sums, steps, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
        eps=eps, maximize=maximize, block_size=block_size,
        bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


@fill
def adagrad32bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state_sums: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""The fp32-state twin of :func:`adagrad8bit_update` (same math, :math:`Q_+` = identity).

    Args:
        %(params)s
        state_sums: contiguous float32 sums of the parameters' shapes, updated in place.
        steps, lr, lr_decay, weight_decay, eps, maximize, bf16_stochastic_rounding: as in
            :func:`adagrad8bit_update`.

    Example:
        >>> p, g, s = torch.randn(10), torch.randn(10), torch.zeros(10)
        >>> adagrad32bit_update([p], [g], [s], [torch.tensor(1.0)], lr=1e-2, lr_decay=0.0,
        ...                     weight_decay=0.0, eps=1e-10, maximize=False)
    """
    _chunked.check_params(params, grads, None)
    _chunked.check_len(steps, params, "steps")
    state_sums = _chunked.fp32_states(state_sums, params, name="state_sums")
    # Backend dispatch for fp32-state Adagrad: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import ADAGRAD as update  # fused CUDA kernels; CuPy is imported on first launch
    else:
        update = _adagrad_torch
    update(
        params, grads, state_sums, steps, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
        eps=eps, maximize=maximize, block_size=_chunked.FP32_CHUNK_BLOCK,
        bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


def _adagrad_torch(
    params, grads, state_sums, steps, *, lr, lr_decay, weight_decay, eps, maximize, block_size,
    bf16_stochastic_rounding,
) -> None:
    """The torch path: torch.optim.Adagrad's single-tensor arithmetic, chunk by chunk."""
    lr = _chunked.scalar(lr)
    for p, g, state_sum, step_t in zip(params, grads, state_sums, steps, strict=True):
        step = _chunked.scalar(step_t)
        rule = functools.partial(
            _adagrad_chunk, weight_decay=weight_decay, eps=eps,
            clr=lr / (1 + (step - 1) * lr_decay),
        )
        _chunked.for_each_chunk(
            p, g, (state_sum,), rule, block_size=block_size, maximize=maximize,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
        )


def _adagrad_chunk(p, g, state_sum, *, weight_decay, eps, clr) -> None:
    """One chunk, fp32, in place; the operations and their order are torch.optim.Adagrad's."""
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    state_sum.addcmul_(g, g, value=1)
    std = state_sum.sqrt().add_(eps)
    p.addcdiv_(g, std, value=-clr)
