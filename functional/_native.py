"""The fused native CPU path of the 8-bit update rules (numba kernels in :mod:`._numba`).

Each function here has the signature of the torch path it replaces (``adam._adam_torch``,
``rmsprop._rmsprop_torch``, ``lion._lion_torch``, ``sgd._sgd_torch``,
``adagrad._adagrad_torch``): the public functions check their arguments, build the
per-parameter :class:`~._chunked.Quantized` states, and dispatch with one ``if`` on
:func:`serves`. Each function builds its rule's hyperparameter record and calls :func:`_run`:
one kernel call (``functional._numba.update``) per (parameter dtype, gradient dtype) pair
updates all those parameters, given as a table of addresses (:func:`_batches`), in one pass
per block, multi-threaded over the blocks of all of them. Hyperparameters are rounded to fp32
here exactly as torch rounds Python scalars, so the kernels compute what the torch path does.
"""

from __future__ import annotations

import functools
import itertools
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


def _seed(p: torch.Tensor, stochastic: bool) -> int:
    """Seed of a bf16 parameter's stochastic rounding, from torch's default generator (0: off)."""
    if not (stochastic and p.dtype == torch.bfloat16):
        return 0
    return int(torch.randint(1, 2**62, ()))


class _Batch(NamedTuple):
    """The parameters of one kernel call (one parameter dtype and one gradient dtype)."""

    dtypes: tuple  # (parameter dtype, gradient dtype)
    rows: list  # the tensor table's rows (functional._numba.P ... STATES)
    blocks: list  # blocks per parameter
    extras: list  # per-parameter (e0, e1) of the rule
    copies: list  # (tensor, contiguous copy updated in its place)
    written: list  # the tensors the kernel writes: parameters (or their copies) and states
    read: list  # the gradients: keeps a contiguous copy alive while the kernel reads its address


def _contiguous(t: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """``t``, or a contiguous copy that :func:`_finish` copies back into it."""
    if t.is_contiguous():
        return t
    work = t.contiguous()
    batch.copies.append((t, work))
    return work


def _batches(params, grads, states, extras, *, block_size, stochastic):
    """Group the non-empty parameters for the kernel, by (parameter dtype, gradient dtype).

    ``states``: three lists (one per state slot; None for a slot that is off), each of
    Quantized or None per parameter; ``extras``: per parameter, the rule's ``(e0, e1)``.
    Yields the kernel's arguments after ``(parts, h, g_sign)`` and the batch. (The loop below
    runs once per parameter per step: a step of many small parameters spends most of its time
    in it and the checks before it.)
    """
    batches: dict[tuple, _Batch] = {}
    first_column = _kernels().STATES  # state k's codes and absmax: columns first + 2k, + 1
    on = [(first_column + 2 * k, state) for k, state in enumerate(states) if state is not None]
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        n = p.numel()
        if n == 0:
            continue
        g = g.contiguous()
        key = (p.dtype, g.dtype)
        batch = batches.get(key)
        if batch is None:
            batch = batches[key] = _Batch(key, [], [], [], [], [], [])
        work = _contiguous(p, batch)
        row = [work.data_ptr(), g.data_ptr(), n, _seed(p, stochastic), 0, 0, 0, 0, 0, 0]
        for column, state in on:
            q = state[i]
            if q is None:
                continue
            absmax = _contiguous(q.absmax, batch)
            row[column] = q.codes.data_ptr()
            row[column + 1] = absmax.data_ptr()
            batch.written.append(q.codes)
            batch.written.append(absmax)
        batch.rows.append(row)
        batch.blocks.append(-(-n // block_size))
        batch.extras.append(extras[i])
        batch.written.append(work)
        batch.read.append(g)
    for batch in batches.values():
        block_starts = np.array([0, *itertools.accumulate(batch.blocks)], dtype=np.int64)
        tensors = np.array(batch.rows, dtype=np.int64)
        per_tensor = np.array(batch.extras, dtype=np.float32).reshape(len(batch.rows), 2)
        yield (tensors, block_starts, per_tensor, *_formats(*batch.dtypes)), batch


@functools.cache
def _formats(p_dtype: torch.dtype, g_dtype: torch.dtype) -> tuple[int, int]:
    """``(p_fmt, g_fmt)``: the format flags of a kernel's parameters and gradients
    (``quant._native.as_array``)."""
    return (quant_native.as_array(torch.empty(0, dtype=p_dtype))[1],
            quant_native.as_array(torch.empty(0, dtype=g_dtype))[1])


def _scratch(count: int, block_size: int) -> int:
    """The address of three fp32 blocks per part, ``count`` parts in a row: this thread's
    kernel scratch (``quant._native.scratch``, kept between calls and cache-line aligned)."""
    return quant_native.scratch(3 * count, block_size).ctypes.data


def _books(states):
    """Per state slot, stacked over the three slots: codebook, table, VBMI planes, VBMI search
    (``None``: the portable path), code of zero, nonnegative (a slot that is off repeats
    another's, never read)."""
    out = []
    for state in states:
        q = None if state is None else next((q for q in state if q is not None), None)
        if q is None:
            out.append(None)
            continue
        if len({id(s.codebook) for s in state if s is not None}) > 1:
            raise ValueError("the fused CPU kernels need one codebook per state list")
        t = quant_native.code_table(q.codebook)
        if t.table is None:  # not for the dynamic maps the rules use
            raise ValueError("the fused CPU kernels need a codebook with one threshold per bin")
        planes, search = quant_native.vbmi_tables(t)
        out.append((t.codebook, t.table, planes, search, t.zero_code, bool(q.nonnegative)))
    used = next((b for b in out if b is not None), None)
    if used is None:  # no 8-bit state (SGD without momentum): any codebook's tables
        from ..quant import get_codebook

        t = quant_native.code_table(get_codebook("dynamic", signed=True))
        used = (t.codebook, t.table, *quant_native.vbmi_tables(t), t.zero_code, False)
    books = [used if b is None else b for b in out]
    # Stacking copies three 256 KiB nearest-code tables: done once per combination of tables,
    # not per step. The key is the tables' identities; the entry keeps them alive, so no other table
    # can take an id while it is cached.
    key = tuple((*map(id, b[:4]), b[4], b[5]) for b in books)
    hit = _stacked.get(key)
    if hit is None:
        if len(_stacked) >= 8:
            _stacked.clear()
        stacked = tuple(_stack([b[i] for b in books]) for i in range(6))
        hit = _stacked[key] = (books, stacked)
    return hit[1]


_stacked: dict = {}


def _stack(rows):
    """The slots' tables stacked into one aligned array; ``None`` where a slot has no VBMI
    table (VBMI off, or a codebook it does not fit): then every slot takes the portable path."""
    if any(r is None for r in rows):
        return None
    return quant_native.aligned(np.stack(rows))


def _run(h, params, grads, states, extras, *, maximize, block_size, bf16_stochastic_rounding):
    """One step of ``h``'s rule over all parameters: one kernel call per dtype pair."""
    kernels = _kernels()
    states = list(states) + [None] * (3 - len(states))
    given, used = tuple(state is not None for state in states), kernels.slots_of(type(h))
    if given != used:  # the kernel would drop a state it was given, or read one absent
        raise RuntimeError(f"internal error: {type(h).__name__} uses state slots {used}, "
                           f"the call gave {given}")
    books = _books(states)
    g_sign = _f32(-1.0 if maximize else 1.0)
    for args, batch in _batches(params, grads, states, extras, block_size=block_size,
                                stochastic=bf16_stochastic_rounding):
        tensors, block_starts, per_tensor = args[:3]
        blocks = int(block_starts[-1])
        count = quant_native.parts(blocks, int(tensors[:, kernels.NUMEL].sum()))
        common = (h, g_sign, tensors.ctypes.data, block_starts.ctypes.data, blocks,
                  per_tensor.ctypes.data, _scratch(count, block_size), *args[3:],
                  *map(quant_native.address, books[:4]), *books[4:], block_size)
        p_dtype, g_dtype = batch.dtypes
        kernel = kernels.update_part(type(h), p_dtype != torch.float32, g_dtype != torch.float32)
        quant_native.run_parts(kernel, count, *common)
        _finish(batch)


def _finish(batch: _Batch) -> None:
    """After a kernel call: mark what it wrote in place as modified for autograd (an in-place
    torch op would), and copy contiguous copies back into their non-contiguous originals."""
    increment_version(batch.written)
    for t, work in batch.copies:
        t.copy_(work)


def adam(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
    weight_decay, decoupled_weight_decay, maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit Adam/AdamW on CPU parameters (the torch path's ``_adam_torch`` contract)."""
    lr = _chunked.scalar(lr)
    decoupled = weight_decay != 0 and decoupled_weight_decay
    amsgrad = any(v is not None for v in max_exp_avg_sqs)
    counts = [_chunked.scalar(s) for s in steps]
    # per distinct step count; 1 / bias_correction2_sqrt rounded once (fp32 division): the
    # kernel multiplies
    corrections = {step: (_f32(1) / _f32((1 - beta2**step) ** 0.5), _f32(-lr / (1 - beta1**step)))
                   for step in set(counts)}
    extras = [corrections[step] for step in counts]
    k = _kernels()
    h = k.variant(k.AdamHyper, amsgrad=bool(amsgrad))(
        _f32(1 - lr * weight_decay if decoupled else 1.0),
        _f32(weight_decay if not decoupled else 0.0), _f32(1 - beta1), _f32(beta2),
        _f32(1 - beta2), _f32(eps))
    _run(h, params, grads, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None),
         extras, maximize=maximize, block_size=block_size,
         bf16_stochastic_rounding=bf16_stochastic_rounding)


def rmsprop(
    params, grads, square_avgs, momentum_buffers, grad_avgs, *, lr, alpha, eps, weight_decay,
    momentum, maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit RMSprop on CPU parameters (the torch path's ``_rmsprop_torch`` contract)."""
    use_momentum = any(b is not None for b in momentum_buffers)
    centered = any(a is not None for a in grad_avgs)
    k = _kernels()
    h = k.variant(k.RMSpropHyper, use_momentum=use_momentum, centered=centered)(
        _f32(weight_decay), _f32(alpha), _f32(1 - alpha), _f32(eps), _f32(momentum),
        _f32(-_chunked.scalar(lr)))
    _run(h, params, grads, (square_avgs, momentum_buffers if use_momentum else None,
                            grad_avgs if centered else None),
         [(0.0, 0.0)] * len(params), maximize=maximize, block_size=block_size,
         bf16_stochastic_rounding=bf16_stochastic_rounding)


def lion(
    params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize, block_size,
    bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit Lion on CPU parameters (the torch path's ``_lion_torch`` contract)."""
    lr = _chunked.scalar(lr)
    h = _kernels().LionHyper(_f32(1 - lr * weight_decay), _f32(beta1), _f32(1 - beta1),
                             _f32(beta2), _f32(1 - beta2), _f32(-lr))
    _run(h, params, grads, (exp_avgs,), [(0.0, 0.0)] * len(params), maximize=maximize,
         block_size=block_size, bf16_stochastic_rounding=bf16_stochastic_rounding)


def sgd(
    params, grads, momentum_buffers, steps, *, lr, momentum, dampening, weight_decay, nesterov,
    maximize, block_size, bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit SGD on CPU parameters (the torch path's ``_sgd_torch`` contract)."""
    use_momentum = momentum != 0 and any(b is not None for b in momentum_buffers)
    k = _kernels()
    h = k.variant(k.SGDHyper, use_momentum=use_momentum, nesterov=bool(nesterov and use_momentum))(
        _f32(weight_decay), _f32(momentum), _f32(1 - dampening), _f32(-_chunked.scalar(lr)))
    extras = [(1.0 if _chunked.scalar(s) == 1 else 0.0, 0.0) for s in steps]
    _run(h, params, grads, (momentum_buffers if use_momentum else None,), extras,
         maximize=maximize, block_size=block_size,
         bf16_stochastic_rounding=bf16_stochastic_rounding)


def adagrad(
    params, grads, state_sums, steps, *, lr, lr_decay, weight_decay, eps, maximize, block_size,
    bf16_stochastic_rounding,
) -> None:
    """Fused 8-bit Adagrad on CPU parameters (the torch path's ``_adagrad_torch`` contract)."""
    lr = _chunked.scalar(lr)
    extras = [(_f32(-(lr / (1 + (_chunked.scalar(s) - 1) * lr_decay))), 0.0) for s in steps]
    h = _kernels().AdagradHyper(_f32(weight_decay), _f32(eps))
    _run(h, params, grads, (state_sums,), extras, maximize=maximize, block_size=block_size,
         bf16_stochastic_rounding=bf16_stochastic_rounding)
