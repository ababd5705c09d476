"""The fused native CPU path of the 8-bit update rules (numba kernels in :mod:`._numba`).

Each function here has the signature of the torch path it replaces (``adam._adam_torch``,
``rmsprop._rmsprop_torch``, ``lion._lion_torch``): the public functions check their arguments,
build the per-parameter :class:`~._chunked.Quantized` states, and dispatch with one ``if``
on :func:`serves`. One kernel call updates all parameters of one (parameter dtype, gradient
dtype) pair, given as a table of addresses (:func:`_batches`), in one pass per block,
multi-threaded over the blocks of all of them. The hyperparameters are rounded to fp32 here
exactly as torch rounds Python scalars, so the kernels compute what the torch path computes.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import torch
from torch.autograd.graph import increment_version

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


def _threads():
    """:mod:`eightbit.quant._threads` (imports numba: on the first CPU step, not at import)."""
    from ..quant import _threads

    return _threads


def _seed(p: torch.Tensor, stochastic: bool) -> int:
    """Seed of a bf16 parameter's stochastic rounding, from torch's default generator (0: off)."""
    if not (stochastic and p.dtype == torch.bfloat16):
        return 0
    return int(torch.randint(1, 2**62, ()))


class _Batch(NamedTuple):
    """The parameters of one kernel call (one parameter dtype and one gradient dtype)."""

    like: tuple  # (p_like, p_fmt, g_like, g_fmt): empty arrays of the kernel's element types
    rows: list  # the tensor table's rows (see functional._numba.P ... STATES)
    blocks: list  # blocks per parameter
    extras: list  # per-parameter fp32 values the kernel reads (Adam's bias corrections)
    copies: list  # (parameter, contiguous copy updated in its place)
    written: list  # the tensors the kernel writes: parameters (or their copies) and states
    read: list  # the gradients: keeps a contiguous copy alive while the kernel reads its address


def _batches(params, grads, states, extras, *, block_size, stochastic):
    """Group the non-empty parameters for the kernels, by (parameter dtype, gradient dtype).

    ``states``: per state, a list of Quantized (or None where the state is off) per parameter;
    ``extras``: a tuple of floats per parameter, or None. Yields the number of blocks and of
    elements, the kernels' arguments after ``(part, parts)``,
    ``(tensors, block_starts[, per_tensor], scratch, p_like, p_fmt, g_like, g_fmt)``
    (``per_tensor``: the extras, when given), and the batch.
    """
    batches: dict[tuple, _Batch] = {}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if p.numel() == 0:
            continue
        work = p if p.is_contiguous() else p.contiguous()
        g = g.contiguous()
        batch = batches.get((work.dtype, g.dtype))
        if batch is None:
            like = (*quant_native.as_array(work[:0]), *quant_native.as_array(g[:0]))
            batch = batches[work.dtype, g.dtype] = _Batch(like, [], [], [], [], [], [])
        row = [work.data_ptr(), g.data_ptr(), work.numel(), _seed(p, stochastic)]
        for state in states:
            q = state[i]
            row += [q.codes.data_ptr(), q.absmax.data_ptr()] if q is not None else [0, 0]
            if q is not None:
                batch.written.extend((q.codes, q.absmax))
        batch.rows.append(row)
        batch.blocks.append(-(-work.numel() // block_size))
        batch.extras.append(extras[i] if extras is not None else ())
        batch.written.append(work)
        batch.read.append(g)
        if work is not p:
            batch.copies.append((p, work))
    for batch in batches.values():
        block_starts = np.zeros(len(batch.blocks) + 1, dtype=np.int64)
        np.cumsum(batch.blocks, out=block_starts[1:])
        tensors = np.array(batch.rows, dtype=np.int64)
        per_tensor = () if extras is None else (
            np.array(batch.extras, dtype=np.float32).reshape(len(batch.rows), -1),)
        scratch = _scratch(_kernels().SCRATCH * block_size * _threads().threads())
        first = (tensors, block_starts, *per_tensor, scratch.ctypes.data, *batch.like)
        yield (int(block_starts[-1]), int(tensors[:, _kernels().NUMEL].sum())), first, batch


_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """This thread's scratch memory for the kernels' per-part buffers (kept between calls, so a
    step does not allocate and fault in fresh pages)."""
    buffer = getattr(_local, "scratch", None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = _local.scratch = np.empty(nbytes, dtype=np.uint8)
    return buffer


def _tables(states):
    """``(lut, table, search, zero_code)`` of each state list's codebook (one per list: the
    rules use the cached dynamic maps); ``None`` for a list that is off."""
    out = []
    for state in states:
        q = next((q for q in state if q is not None), None)
        if q is None:
            out.append(None)
            continue
        if any(s is not None and s.codebook is not q.codebook for s in state):
            raise ValueError("the fused CPU kernels need one codebook per state list")
        t = quant_native.code_table(q.codebook)
        if t.table is None:  # not for the dynamic maps the rules use
            raise ValueError("the fused CPU kernels need a codebook with one threshold per bin")
        out.append((t.lut, t.table, t.search, t.zero_code))
    return out


def _finish(batch: _Batch) -> None:
    """After a kernel call: mark what it wrote in place as modified for autograd (an in-place
    torch op would), and copy contiguous copies back into their non-contiguous parameters."""
    increment_version(batch.written)
    for p, work in batch.copies:
        p.copy_(work)


def adam(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
    weight_decay, decoupled_weight_decay, maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit Adam/AdamW on CPU parameters (the torch path's ``_adam_torch`` contract)."""
    kernels = _kernels()
    lr = _chunked.scalar(lr)
    decoupled = weight_decay != 0 and decoupled_weight_decay
    amsgrad = any(v is not None for v in max_exp_avg_sqs)
    states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    m, v = _tables(states[:2])
    corrections, extras = {}, []  # per parameter, computed once per distinct step count
    for step_t in steps:
        step = _chunked.scalar(step_t)
        if step not in corrections:
            # 1 / bias_correction2_sqrt rounded once (fp32 division): the kernel multiplies
            corrections[step] = (_f32(1) / _f32((1 - beta2**step) ** 0.5),
                                 _f32(-lr / (1 - beta1**step)))
        extras.append(corrections[step])
    kernel = kernels.adam_amsgrad if amsgrad else kernels.adam
    for size, first, batch in _batches(params, grads, states, extras, block_size=block_size,
                                         stochastic=bf16_stochastic_rounding):
        _threads().run(
            kernel, *size, *first, *m, *v,
            _f32(1 - lr * weight_decay if decoupled else 1.0),
            _f32(weight_decay if not decoupled else 0.0), _f32(1 - beta1), _f32(beta2),
            _f32(1 - beta2), _f32(eps), _f32(-1.0 if maximize else 1.0), block_size,
        )
        _finish(batch)


def rmsprop(
    params, grads, square_avgs, momentum_buffers, grad_avgs, *, lr, alpha, eps, weight_decay,
    momentum, maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit RMSprop on CPU parameters (the torch path's ``_rmsprop_torch`` contract)."""
    kernel = _kernels().rmsprop
    lr = _chunked.scalar(lr)
    states = [square_avgs, momentum_buffers, grad_avgs]
    sq, buf, ga = _tables(states)
    signed = buf or ga or sq  # an unused placeholder when neither signed state is on
    use_momentum = any(b is not None for b in momentum_buffers)
    centered = any(a is not None for a in grad_avgs)
    for size, first, batch in _batches(params, grads, states, None, block_size=block_size,
                                         stochastic=bf16_stochastic_rounding):
        _threads().run(
            kernel, *size, *first, *sq, *signed, use_momentum,
            centered, _f32(weight_decay), _f32(alpha), _f32(1 - alpha), _f32(eps),
            _f32(momentum), _f32(-lr), _f32(-1.0 if maximize else 1.0), block_size,
        )
        _finish(batch)


def lion(
    params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize, block_size,
    bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit Lion on CPU parameters (the torch path's ``_lion_torch`` contract)."""
    kernel = _kernels().lion
    lr = _chunked.scalar(lr)
    (m,) = _tables([exp_avgs])
    for size, first, batch in _batches(params, grads, [exp_avgs], None,
                                         block_size=block_size,
                                         stochastic=bf16_stochastic_rounding):
        _threads().run(
            kernel, *size, *first, *m,
            _f32(1 - lr * weight_decay), _f32(beta1), _f32(1 - beta1), _f32(beta2),
            _f32(1 - beta2), _f32(-lr), _f32(-1.0 if maximize else 1.0), block_size,
        )
        _finish(batch)
