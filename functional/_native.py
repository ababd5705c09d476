"""The fused native CPU path of the 8-bit update rules (numba kernels in :mod:`._numba`).

Each function here has the signature of the torch path it replaces (``adam._adam_torch``,
``rmsprop._rmsprop_torch``, ``lion._lion_torch``): the public functions check their arguments,
build the per-parameter :class:`~._chunked.Quantized` states, and dispatch with one ``if``
on :func:`serves`. Per parameter, one kernel call updates the parameter and its states in one
pass per block, multi-threaded over blocks. The hyperparameters are rounded to fp32 here
exactly as torch rounds Python scalars, so the kernels compute what the torch path computes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant import _native as quant_native
from . import _chunked


def serves(params) -> bool:
    """Whether the fused CPU kernels serve these parameters (all on the CPU, numba available)."""
    return (
        len(params) > 0
        and all(p.device.type == "cpu" for p in params)
        and quant_native.kernels() is not None
    )


def _f32(x: float) -> np.float32:
    """A Python float rounded to fp32, as torch casts the scalar arguments of fp32 tensor ops."""
    return np.float32(x)


def _kernels():
    from . import _numba

    return _numba


def _state(q: _chunked.Quantized):
    """``(codes, absmax, lut, table, zero_code)`` arrays of one 8-bit state (``lut``: the
    codebook and its byte planes, see ``quant._native.CodeTable``)."""
    t = quant_native.code_table(q.codebook)
    if t.table is None:  # not for the dynamic maps the rules use
        raise ValueError("the fused CPU kernels need a codebook with one threshold per table bin")
    return q.codes.view(-1).numpy(), q.absmax.numpy(), t.lut, t.table, t.zero_code


def _seed(p: torch.Tensor, stochastic: bool) -> int:
    """Seed of a bf16 parameter's stochastic rounding, from torch's default generator (0: off)."""
    if not (stochastic and p.dtype == torch.bfloat16):
        return 0
    return int(torch.randint(1, 2**62, ()))


def _each(params, grads, *states):
    """Per non-empty parameter: ``(param, contiguous work tensor, param array, fmt, grad array,
    grad fmt, *states)``; the caller copies ``work`` back when it is not ``param``."""
    for p, g, *rest in zip(params, grads, *states, strict=True):
        if p.numel() == 0:
            continue
        work = p if p.is_contiguous() else p.contiguous()
        p_array, p_fmt = quant_native.as_array(work)
        g_array, g_fmt = quant_native.as_array(g.contiguous())
        yield (p, work, p_array, p_fmt, g_array, g_fmt, *rest)


def adam(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
    weight_decay, decoupled_weight_decay, maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit Adam/AdamW on CPU parameters (the torch path's ``_adam_torch`` contract)."""
    kernels = _kernels()
    lr = _chunked.scalar(lr)
    decoupled = weight_decay != 0 and decoupled_weight_decay
    decay = _f32(1 - lr * weight_decay if decoupled else 1.0)
    l2 = _f32(weight_decay if not decoupled else 0.0)
    items = _each(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    for p, work, p_array, p_fmt, g_array, g_fmt, m, v, v_max, step_t in items:
        step = _chunked.scalar(step_t)
        # AMSGrad's kernel takes the running maximum's codes and absmax after v's state
        kernel, extra = (kernels.adam, ()) if v_max is None else (
            kernels.adam_amsgrad, _state(v_max)[:2])
        kernel(
            p_array, p_fmt, g_array, g_fmt, *_state(m), *_state(v), *extra,
            decay, l2, _f32(1 - beta1), _f32(beta2), _f32(1 - beta2),
            # 1 / bias_correction2_sqrt rounded once (fp32 division): the kernel multiplies
            _f32(1) / _f32((1 - beta2**step) ** 0.5), _f32(eps), _f32(-lr / (1 - beta1**step)),
            _f32(-1.0 if maximize else 1.0), _seed(p, bf16_stochastic_rounding), block_size,
        )
        if work is not p:
            p.copy_(work)


def rmsprop(
    params, grads, square_avgs, momentum_buffers, grad_avgs, *, lr, alpha, eps, weight_decay,
    momentum, maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit RMSprop on CPU parameters (the torch path's ``_rmsprop_torch`` contract)."""
    kernel = _kernels().rmsprop
    lr = _chunked.scalar(lr)
    items = _each(params, grads, square_avgs, momentum_buffers, grad_avgs)
    for p, work, p_array, p_fmt, g_array, g_fmt, square_avg, buf, grad_avg in items:
        sq_state = _state(square_avg)
        buf_state = _state(buf) if buf is not None else None
        ga_state = _state(grad_avg) if grad_avg is not None else None
        # A state that is off gets another state's arrays as placeholders; the kernel never
        # touches them (its flags say so).
        signed = buf_state or ga_state or sq_state
        kernel(
            p_array, p_fmt, g_array, g_fmt, *sq_state, *(buf_state or signed)[:2],
            *(ga_state or signed)[:2], *signed[2:], buf is not None,
            grad_avg is not None, _f32(weight_decay), _f32(alpha), _f32(1 - alpha), _f32(eps),
            _f32(momentum), _f32(-lr), _f32(-1.0 if maximize else 1.0),
            _seed(p, bf16_stochastic_rounding), block_size,
        )
        if work is not p:
            p.copy_(work)


def lion(
    params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize, block_size,
    bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit Lion on CPU parameters (the torch path's ``_lion_torch`` contract)."""
    kernel = _kernels().lion
    lr = _chunked.scalar(lr)
    decay = _f32(1 - lr * weight_decay)
    for p, work, p_array, p_fmt, g_array, g_fmt, m in _each(params, grads, exp_avgs):
        kernel(
            p_array, p_fmt, g_array, g_fmt, *_state(m), decay, _f32(beta1), _f32(1 - beta1),
            _f32(beta2), _f32(1 - beta2), _f32(-lr), _f32(-1.0 if maximize else 1.0),
            _seed(p, bf16_stochastic_rounding), block_size,
        )
        if work is not p:
            p.copy_(work)
