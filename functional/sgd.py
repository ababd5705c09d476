r"""SGD with momentum, with an 8-bit (or fp32) momentum buffer: one update rule, one dispatch point.

Momentum: Polyak 1964; Nesterov momentum in the form of Sutskever et al. 2013 (ICML, "On the
importance of initialization and momentum in deep learning"), with torch.optim.SGD's conventions
(the buffer starts as the first gradient, dampening scales later gradients). 8-bit state:
Dettmers et al. 2022 (arXiv:2110.02861).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import _chunked, _native
from ._docs import fill

__all__ = ["sgd8bit_update", "sgd32bit_update"]


@fill
def sgd8bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffer_codes: Sequence[torch.Tensor] | None,
    momentum_buffer_absmax: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    block_size: int,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""One SGD step with an 8-bit blockwise-quantized momentum buffer, in place.

    With :math:`Q` the blockwise quantizer on the signed dynamic map, :math:`\gamma` = lr,
    :math:`\lambda` = weight_decay, :math:`\mu` = momentum, :math:`\tau` = dampening and
    :math:`t` the (already incremented) step:

    .. math::

        \begin{aligned}
        g &\leftarrow \nabla f(\theta) \quad (-\nabla f(\theta) \text{ if maximize}), \qquad
        g \leftarrow g + \lambda\theta \\
        b &\leftarrow g \text{ if } t = 1, \text{ else }
            \mu\, Q^{-1}(\bar b) + (1 - \tau)\, g \qquad (\text{if } \mu \neq 0) \\
        g &\leftarrow g + \mu b \text{ if nesterov, else } b \qquad (\text{if } \mu \neq 0) \\
        \theta &\leftarrow \theta - \gamma g, \qquad \bar b \leftarrow Q(b)
        \end{aligned}

    ``weight_decay`` is L2 regularization added to the gradient, as in torch.optim.SGD. With
    ``momentum == 0`` there is no state: pass ``None`` for the buffer's codes and absmax.

    Args:
        %(params)s
        %(codes)s
            Here ``momentum_buffer`` (signed map; when ``momentum != 0``).
        steps: 0-dim float32 step counters, already incremented for this step; a parameter's
            first step (step 1) starts its buffer from the gradient, as torch does.
        %(lr)s
        momentum, dampening, weight_decay, nesterov: as in torch.optim.SGD.
        %(maximize)s
        %(block_size)s
        %(bf16_stochastic_rounding)s

    %(chunks)s

    Example:
        >>> import torch
        >>> p, g = torch.randn(1000), torch.randn(1000)
        >>> b_codes = torch.full((1000,), 127, dtype=torch.uint8)  # code of 0.0 (signed map)
        >>> sgd8bit_update([p], [g], [b_codes], [torch.zeros(4)], [torch.tensor(1.0)], lr=1e-2,
        ...                momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
        ...                maximize=False, block_size=256)
    """
    _chunked.check_params(params, grads, block_size)
    _chunked.check_len(steps, params, "steps")
    if momentum != 0 and momentum_buffer_codes is None:
        raise ValueError("momentum != 0 needs momentum_buffer_codes and momentum_buffer_absmax")
    momentum_buffers = _chunked.quantized_states(
        momentum_buffer_codes if momentum != 0 else None,
        momentum_buffer_absmax if momentum != 0 else None,
        params, signed=True, block_size=block_size, name="momentum_buffer",
    )
    # Backend dispatch for 8-bit SGD: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import SGD as update  # fused CUDA kernels; CuPy is imported on the first launch
    else:  # CPU tensors: the fused numba kernels when numba is installed, else the torch path
        update = _native.sgd if _native.serves(params) else _sgd_torch
    update(
        params, grads, momentum_buffers, steps, lr=lr, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, block_size=block_size,
        bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


@fill
def sgd32bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    bf16_stochastic_rounding: bool = False,
) -> None:
    r"""The fp32-state twin of :func:`sgd8bit_update` (same math, :math:`Q` = identity).

    Args:
        %(params)s
        momentum_buffers: contiguous float32 buffers of the parameters' shapes, updated in place
            (``None`` when ``momentum == 0``).
        steps, lr, momentum, dampening, weight_decay, nesterov, maximize,
        bf16_stochastic_rounding: as in :func:`sgd8bit_update`.

    Example:
        >>> p, g, b = torch.randn(10), torch.randn(10), torch.zeros(10)
        >>> sgd32bit_update([p], [g], [b], [torch.tensor(1.0)], lr=1e-2, momentum=0.9,
        ...                 dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False)
    """
    _chunked.check_params(params, grads, None)
    _chunked.check_len(steps, params, "steps")
    if momentum != 0 and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    momentum_buffers = _chunked.fp32_states(
        momentum_buffers if momentum != 0 else None, params, name="momentum_buffers"
    )
    # Backend dispatch for fp32-state SGD: the one place an implementation is chosen.
    if params and params[0].is_cuda:
        from .cuda import SGD as update  # fused CUDA kernels; CuPy is imported on the first launch
    else:
        update = _sgd_torch
    update(
        params, grads, momentum_buffers, steps, lr=lr, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        block_size=_chunked.FP32_CHUNK_BLOCK, bf16_stochastic_rounding=bf16_stochastic_rounding,
    )


def _sgd_torch(
    params, grads, momentum_buffers, steps, *, lr, momentum, dampening, weight_decay, nesterov,
    maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """The torch path: torch.optim.SGD's single-tensor arithmetic, chunk by chunk."""
    lr = _chunked.scalar(lr)
    for p, g, buf, step_t in zip(params, grads, momentum_buffers, steps, strict=True):
        rule = functools.partial(
            _sgd_chunk, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, first=_chunked.scalar(step_t) == 1,
        )
        _chunked.for_each_chunk(
            p, g, (buf,), rule, block_size=block_size, maximize=maximize,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
        )


def _sgd_chunk(p, g, buf, *, lr, momentum, dampening, weight_decay, nesterov, first) -> None:
    """One chunk, fp32, in place; the operations and their order are torch.optim.SGD's."""
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if buf is not None:
        if first:  # torch: a parameter without a buffer starts it from a copy of the gradient
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.add_(g, alpha=-lr)
