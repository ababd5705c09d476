r"""RMSprop with 8-bit (or fp32) state: one update rule, one dispatch point.

RMSprop: Hinton, Lecture 6e of "Neural Networks for Machine Learning" (2012); the centered variant
from Graves 2013 (arXiv:1308.0850, eq. 38-45). Conventions follow torch.optim.RMSprop (eps added
after the square root, momentum buffer holding grad / avg). 8-bit state: Dettmers et al. 2022
(arXiv:2110.02861).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import _chunked, _native
from ._docs import fill

__all__ = ["rmsprop8bit_update", "rmsprop32bit_update"]


@fill
def rmsprop8bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_avg_codes: Sequence[torch.Tensor],
    square_avg_absmax: Sequence[torch.Tensor],
    momentum_buffer_codes: Sequence[torch.Tensor] | None,
    momentum_buffer_absmax: Sequence[torch.Tensor] | None,
    grad_avg_codes: Sequence[torch.Tensor] | None,
    grad_avg_absmax: Sequence[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    block_size: int,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""One RMSprop step with 8-bit blockwise-quantized state, in place.

    With :math:`Q` the blockwise quantizer on the signed dynamic map, :math:`Q_+` on the unsigned
    one, :math:`\gamma` = lr, :math:`\lambda` = weight_decay and :math:`\mu` = momentum:

    .. math::

        \begin{aligned}
        g &\leftarrow \nabla f(\theta) \quad (-\nabla f(\theta) \text{ if maximize}), \qquad
        g \leftarrow g + \lambda\theta \\
        s &\leftarrow \alpha\, Q_+^{-1}(\bar s) + (1 - \alpha)\, g^2 \\
        a &\leftarrow \alpha\, Q^{-1}(\bar a) + (1 - \alpha)\, g \quad \text{(centered)} \\
        d &\leftarrow \sqrt{\max(s - a^2, 0)} + \epsilon \text{ if centered, else }
            \sqrt{s} + \epsilon \\
        b &\leftarrow \mu\, Q^{-1}(\bar b) + g / d, \quad \theta \leftarrow \theta - \gamma b
            \quad \text{if } \mu > 0, \text{ else } \theta \leftarrow \theta - \gamma g / d \\
        \bar s &\leftarrow Q_+(s), \quad \bar a \leftarrow Q(a), \quad \bar b \leftarrow Q(b)
        \end{aligned}

    ``weight_decay`` is L2 regularization added to the gradient, as in torch.optim.RMSprop. The
    centered variance is clamped at 0 before the square root: quantization can make
    :math:`s - a^2` slightly negative, where fp32 state could not.

    %(state_rule)s

    So the step :math:`g / \sqrt{s}` from a requantized square average is at most
    :math:`1 / \sqrt{0.5345} = 1.37` times the step from the exact one, and 2.74 times with
    momentum (the buffer is signed). The centered variance :math:`s - a^2` is a difference of two
    quantized states: where it is within their rounding of 0 it is clamped to 0 and the
    denominator falls to eps, so the centered variant has no such bound.

    Args:
        %(params)s
        %(codes)s
            Here ``square_avg`` (unsigned map), ``momentum_buffer`` (signed; when
            ``momentum > 0``) and ``grad_avg`` (signed; when ``centered``).
        %(lr)s
        alpha, eps, weight_decay, momentum, centered: as in torch.optim.RMSprop.
        %(maximize)s
        %(block_size)s
        %(bf16_stochastic_rounding)s

    %(chunks)s

    Example:
        >>> p, g = torch.randn(1000), torch.randn(1000)
        >>> s_codes, s_absmax = torch.zeros(1000, dtype=torch.uint8), torch.zeros(4)
        >>> rmsprop8bit_update([p], [g], [s_codes], [s_absmax], None, None, None, None,
        ...                    lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
        ...                    centered=False, maximize=False, block_size=256)
    """
    _chunked.check_params(params, grads, block_size)
    if momentum > 0 and momentum_buffer_codes is None:
        raise ValueError("momentum > 0 needs momentum_buffer_codes and momentum_buffer_absmax")
    if centered and grad_avg_codes is None:
        raise ValueError("centered=True needs grad_avg_codes and grad_avg_absmax")
    kw = dict(block_size=block_size, params=params)
    square_avgs = _chunked.quantized_states(
        square_avg_codes, square_avg_absmax, signed=False, name="square_avg", **kw
    )
    momentum_buffers = _chunked.quantized_states(
        momentum_buffer_codes if momentum > 0 else None,
        momentum_buffer_absmax if momentum > 0 else None,
        signed=True, name="momentum_buffer", **kw,
    )
    grad_avgs = _chunked.quantized_states(
        grad_avg_codes if centered else None, grad_avg_absmax if centered else None,
        signed=True, name="grad_avg", **kw,
    )
    # Backend dispatch for 8-bit RMSprop: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import RMSPROP as update  # fused CUDA kernels; CuPy is imported on first launch
    else:  # CPU tensors: the fused numba kernels when numba is installed, else the torch path
        update = _native.rmsprop if _native.serves(params) else _rmsprop_torch
    update(
        params, grads, square_avgs, momentum_buffers, grad_avgs, lr=lr, alpha=alpha, eps=eps,
        weight_decay=weight_decay, momentum=momentum, maximize=maximize, block_size=block_size,
        bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


@fill
def rmsprop32bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_avgs: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    grad_avgs: Sequence[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""The fp32-state twin of :func:`rmsprop8bit_update` (same math, :math:`Q` = identity).

    Args:
        %(params)s
        square_avgs, momentum_buffers, grad_avgs: contiguous float32 states of the parameters'
            shapes, updated in place (``None`` for a feature that is off).
        lr, alpha, eps, weight_decay, momentum, centered, maximize, bf16_stochastic_rounding:
            as in :func:`rmsprop8bit_update`.

    Example:
        >>> p, g, s = torch.randn(10), torch.randn(10), torch.zeros(10)
        >>> rmsprop32bit_update([p], [g], [s], None, None, lr=1e-2, alpha=0.99, eps=1e-8,
        ...                     weight_decay=0.0, momentum=0.0, centered=False, maximize=False)
    """
    _chunked.check_params(params, grads, None)
    if momentum > 0 and momentum_buffers is None:
        raise ValueError("momentum > 0 needs momentum_buffers")
    if centered and grad_avgs is None:
        raise ValueError("centered=True needs grad_avgs")
    # Backend dispatch for fp32-state RMSprop: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import RMSPROP as update  # fused CUDA kernels; CuPy is imported on first launch
    else:
        update = _rmsprop_torch
    update(
        params, grads, _chunked.fp32_states(square_avgs, params, name="square_avgs"),
        _chunked.fp32_states(momentum_buffers if momentum > 0 else None, params,
                             name="momentum_buffers"),
        _chunked.fp32_states(grad_avgs if centered else None, params, name="grad_avgs"),
        lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
        maximize=maximize, block_size=_chunked.FP32_CHUNK_BLOCK,
        bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


def _rmsprop_torch(
    params, grads, square_avgs, momentum_buffers, grad_avgs, *, lr, alpha, eps, weight_decay,
    momentum, maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """The torch path: torch.optim.RMSprop's single-tensor arithmetic, chunk by chunk."""
    rule = functools.partial(
        _rmsprop_chunk, lr=_chunked.scalar(lr), alpha=alpha, eps=eps, weight_decay=weight_decay,
        momentum=momentum,
    )
    states = zip(square_avgs, momentum_buffers, grad_avgs, strict=True)
    for p, g, (s, b, a) in zip(params, grads, states, strict=True):
        _chunked.for_each_chunk(
            p, g, (s, b, a), rule, block_size=block_size, maximize=maximize,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
        )


def _rmsprop_chunk(p, g, square_avg, buf, grad_avg, *, lr, alpha, eps, weight_decay, momentum):
    """One chunk, fp32, in place; the operations and their order are torch.optim.RMSprop's."""
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if grad_avg is not None:
        grad_avg.lerp_(g, 1 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).clamp_min_(0).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(eps)
    if buf is not None:
        buf.mul_(momentum).addcdiv_(g, avg)
        p.add_(buf, alpha=-lr)
    else:
        p.addcdiv_(g, avg, value=-lr)
