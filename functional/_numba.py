"""Numba kernels of the fused CPU update rules: one generic block driver, one rule per optimizer.

The driver (:func:`update_part`, one kernel per rule variant built from one source) does,
per block of every parameter in the call: locate the block (the parameters' blocks are one
sequence, :func:`locate`), dequantize the states into fp32 scratch, call the optimizer's rule
per element, store the parameter, apply issue 17's rule (a) (an element whose fresh states are
not all finite gets 0.0 in every state), keep each state's absmax, and requantize each state
(rule (b) for states on the unsigned map: see ``quant._intrinsics.encode_block``).
``quant._native.run_parts`` runs its parts on threads.

A rule is a plain function ``rule(h, f0, f1, p, g, s0, s1, s2, e0, e1) -> (p, s0, s1, s2)`` of
fp32 scalars holding the whole update of one element, as the CUDA ``*Rule::update`` does
(functional/cuda/*.cu): ``h`` is the optimizer's hyperparameter record (a NamedTuple of fp32
values, whose class selects the rule and its variant's flags ``f0, f1`` at compile time,
:func:`update_part`), ``s0..s2`` the dequantized states (a state the variant does not use is
returned as 0), ``e0, e1`` the per-parameter values of this step (Adam's bias corrections,
SGD's first-step flag, Adagrad's step size). The arithmetic is the torch path's
(``functional/adam.py`` ...) operation for operation, with the same fused multiply-adds as
torch's CPU kernels (lerp, addcmul, ``add(..., alpha=)``); sqrt here is IEEE, torch's CPU sqrt
is not always correctly rounded, so a parameter may differ in its last ulps (bounds in
tests/functional/test_native.py).
Hyperparameters arrive rounded to fp32 exactly as torch rounds Python scalars.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import uint32

from ..quant._intrinsics import (
    NONFINITE_BITS,
    abs_bits,
    decode_run,
    encode_block,
    f32_to_half,
    fma,
    half_to_f32,
    offset,
    pointer,
    stochastic_bf16,
    umax,
)
from ..quant._native import TABLE_ENTRIES
from ..quant._numba import inline, part_blocks, part_kernel
from ..quant._vbmi import PLANES_BYTES, SEARCH_BYTES

F32 = np.float32


# A rule's variants (AMSGrad, momentum, centered, Nesterov) are flags on its record's class,
# not fields: the class is part of the kernel's type, so each variant compiles its own loop
# with the flags as constants (:func:`update_part`), and :func:`variant` picks the class.


class AdamHyper(NamedTuple):
    decay: F32  # 1 - lr * weight_decay (AdamW), else 1
    l2: F32  # weight_decay (Adam), else 0
    beta1_weight: F32  # 1 - beta1
    beta2: F32
    one_minus_beta2: F32
    eps: F32
    amsgrad = False


class AMSGradHyper(AdamHyper):
    __slots__ = ()
    amsgrad = True


class RMSpropHyper(NamedTuple):
    l2: F32
    alpha: F32
    one_minus_alpha: F32
    eps: F32
    momentum: F32
    neg_lr: F32
    use_momentum = False
    centered = False


class MomentumRMSpropHyper(RMSpropHyper):
    __slots__ = ()
    use_momentum = True


class CenteredRMSpropHyper(RMSpropHyper):
    __slots__ = ()
    centered = True


class CenteredMomentumRMSpropHyper(RMSpropHyper):
    __slots__ = ()
    use_momentum = centered = True


class LionHyper(NamedTuple):
    decay: F32  # 1 - lr * weight_decay
    beta1: F32
    one_minus_beta1: F32
    beta2: F32
    one_minus_beta2: F32
    neg_lr: F32


class SGDHyper(NamedTuple):
    l2: F32
    momentum: F32
    one_minus_dampening: F32
    neg_lr: F32
    use_momentum = False
    nesterov = False


class MomentumSGDHyper(SGDHyper):
    __slots__ = ()
    use_momentum = True


class NesterovSGDHyper(SGDHyper):
    __slots__ = ()
    use_momentum = nesterov = True


class AdagradHyper(NamedTuple):
    l2: F32
    eps: F32


def variant(record: type, **flags: bool) -> type:
    """The class of ``record``'s family (itself or a subclass) whose flags equal ``flags``.

    Example: ``variant(AdamHyper, amsgrad=True)`` is :class:`AMSGradHyper`.
    """
    for cls in (record, *record.__subclasses__()):
        if all(getattr(cls, name) == value for name, value in flags.items()):
            return cls
    raise ValueError(f"no {record.__name__} variant with {flags}")


ZERO = F32(0.0)


@inline
def lerp(start, end, weight):
    """torch.lerp's CPU formula (exact at both ends; fused multiply-add), branch-free."""
    small = abs(weight) < F32(0.5)
    w = weight if small else weight - F32(1.0)
    return fma(w, end - start, start if small else end)


@inline
def maximum(a, b):
    """torch.maximum: NaN if either is NaN."""
    return a if (a > b or a != a) else b


@inline
def adam_rule(h, amsgrad, _f1, p, g, m, v, v_max, inv_bc2_sqrt, neg_step_size):
    """Adam/AdamW (states m, v, max of v); ``inv_bc2_sqrt`` = 1 / sqrt(1 - beta2^t) rounded
    once, ``neg_step_size`` = -lr / (1 - beta1^t)."""
    p = p * h.decay
    g = fma(h.l2, p, g) if h.l2 != 0 else g
    m = lerp(m, g, h.beta1_weight)
    v = fma(h.one_minus_beta2 * g, g, v * h.beta2)
    v_max = maximum(v_max, v) if amsgrad else ZERO
    v_hat = v_max if amsgrad else v
    p = p + (neg_step_size * m) / fma(np.sqrt(v_hat), inv_bc2_sqrt, h.eps)
    return p, m, v, v_max


@inline
def rmsprop_rule(h, use_momentum, centered, p, g, square_avg, buf, grad_avg, _e0, _e1):
    """RMSprop (states square_avg, momentum_buffer, grad_avg)."""
    g = fma(h.l2, p, g) if h.l2 != 0 else g
    square_avg = fma(h.one_minus_alpha * g, g, square_avg * h.alpha)
    if centered:
        grad_avg = lerp(grad_avg, g, h.one_minus_alpha)
        var = fma(-grad_avg, grad_avg, square_avg)
        avg = np.sqrt(ZERO if var < 0 else var) + h.eps
    else:
        grad_avg = ZERO
        avg = np.sqrt(square_avg) + h.eps
    if use_momentum:
        buf = buf * h.momentum + g / avg
        p = fma(h.neg_lr, buf, p)
    else:
        buf = ZERO
        p = p + (h.neg_lr * g) / avg
    return p, square_avg, buf, grad_avg


@inline
def lion_rule(h, _f0, _f1, p, g, m, _s1, _s2, _e0, _e1):
    """Lion (arXiv:2302.06675, Algorithm 2; state m)."""
    c = fma(h.one_minus_beta1, g, m * h.beta1)
    sign = F32(ZERO < c) - F32(c < ZERO)
    p = fma(h.neg_lr, sign, p * h.decay)
    m = fma(h.one_minus_beta2, g, m * h.beta2)
    return p, m, ZERO, ZERO


@inline
def sgd_rule(h, use_momentum, nesterov, p, g, buf, _s1, _s2, first_step, _e1):
    """SGD with momentum, dampening, Nesterov (state momentum_buffer); ``first_step`` is 1.0 on
    a buffer's first step (torch sets it to the gradient), else 0.0."""
    g = fma(h.l2, p, g) if h.l2 != 0 else g
    if use_momentum:
        buf = g if first_step != 0 else fma(h.one_minus_dampening, g, buf * h.momentum)
        g = fma(h.momentum, buf, g) if nesterov else buf
    else:
        buf = ZERO
    return fma(h.neg_lr, g, p), buf, ZERO, ZERO


@inline
def adagrad_rule(h, _f0, _f1, p, g, state_sum, _s1, _s2, neg_clr, _e1):
    """Adagrad (state sum); ``neg_clr`` = -lr / (1 + (t - 1) lr_decay)."""
    g = fma(h.l2, p, g) if h.l2 != 0 else g
    state_sum = fma(g, g, state_sum)
    p = p + (neg_clr * g) / (np.sqrt(state_sum) + h.eps)
    return p, state_sum, ZERO, ZERO


# Each family's number, the names of its flags, and the state slots (s0, s1, s2) a variant's
# rule uses, from its class. The number picks the family's rule in :func:`update_part`.
ADAM, RMSPROP, LION, SGD, ADAGRAD = range(5)
RULES = {AdamHyper: (ADAM, ("amsgrad",), lambda c: (True, True, c.amsgrad)),
         RMSpropHyper: (RMSPROP, ("use_momentum", "centered"),
                        lambda c: (True, c.use_momentum, c.centered)),
         LionHyper: (LION, (), lambda c: (True, False, False)),
         SGDHyper: (SGD, ("use_momentum", "nesterov"), lambda c: (c.use_momentum, False, False)),
         AdagradHyper: (ADAGRAD, (), lambda c: (True, False, False))}


def _rule_of(record: type) -> tuple:
    """``record``'s entry of :data:`RULES` (its family's), or a TypeError naming it."""
    for family, entry in RULES.items():
        if isinstance(record, type) and issubclass(record, family):
            return entry
    raise TypeError(f"{getattr(record, '__name__', record)!s} is not a hyperparameter record "
                    "of a rule")


def slots_of(record: type) -> tuple[bool, bool, bool]:
    """Which of the three state slots the rule of ``record`` (a hyperparameter class) uses.

    Example: ``slots_of(AMSGradHyper)`` is ``(True, True, True)`` (m, v, max of v).
    """
    return _rule_of(record)[2](record)


# The tensor table: one int64 row of COLUMNS per parameter; state k's codes and absmax
# addresses at STATES + 2k and STATES + 2k + 1 (0 for a state that is off). ``block_starts[t]``
# is the first block of parameter t in the sequence of all parameters' blocks.
P, G, NUMEL, SEED, STATES = 0, 1, 2, 3, 4
COLUMNS = STATES + 6
INF_BITS, NO_BITS = uint32(NONFINITE_BITS), uint32(0)


@inline
def locate(b, tensor, block_starts):
    """The parameter holding block ``b`` of the sequence, searching on from ``tensor``."""
    while b >= block_starts[tensor + 1]:
        tensor += 1
    return tensor


@functools.cache
def update_part(record: type, p_half: bool, g_half: bool):
    """The kernel of one step of the rule and variant of ``record`` (a hyperparameter class),
    for fp32 or half-precision (``p_half``, ``g_half``) parameters and gradients:
    ``kernel(part, parts, h, g_sign, tensors_at, block_starts_at, blocks, per_tensor_at,
    scratch_at, p_fmt, g_fmt, codebooks_at, tables_at, planes_at, searches_at, zero_codes,
    nonnegative, block_size)`` does part ``part`` of ``parts`` of it over the ``blocks``
    blocks of the tensor table. Half-precision elements are uint16 bits in format ``p_fmt`` /
    ``g_fmt`` (fp16 or bf16).

    The ``*_at`` arguments are addresses: the tensor table (int64, :data:`COLUMNS` per
    parameter), the first block of each parameter (int64), the per-parameter values ``e0, e1``
    of the rule (fp32 pairs), three fp32 scratch blocks per part, and tables stacked over the
    three state slots: state k's codebook (256 fp32), its nearest-code table
    (:data:`~eightbit.quant._native.TABLE_ENTRIES` uint32), its VBMI tables (or ``None``: the
    portable decode and encode, compiled without the VBMI ones). State k's code of zero is
    ``zero_codes[k]``; ``nonnegative[k]``: it is on the unsigned map (rule (b)). (Addresses,
    not arrays: the kernel reads these through pointers, and an array argument costs the
    kernel's Python wrapper an unboxing to compile and to run, and the kernel the indexing
    code of a numba array.)

    One generic driver, built per variant: the family, its flags, the state slots it uses and
    the element formats are closure constants of the kernel (numba's cache keys on them), so
    numba types one rule, once, inlined into the element loop, and a slot the variant does not
    use costs no load or store. (A rule chosen by an overload was typed three times, and an
    element loop compiled as a function of its own was compiled twice by LLVM.)

    Example: ``update_part(AdamHyper, False, False)`` is Adam's fp32 kernel.
    """
    family, names, used = _rule_of(record)
    # the flags as two plain constants: numba drops the branches a variant does not take inside
    # the inlined rule (from a tuple of flags it did not, and typed and lowered every branch)
    f0, f1 = (*(getattr(record, name) for name in names), False, False)[:2]
    used0, used1, used2 = used(record)
    p_type, g_type = (np.uint16 if half else np.float32 for half in (p_half, g_half))

    @part_kernel
    def kernel(part, parts, h, g_sign, tensors_at, block_starts_at, blocks, per_tensor_at,
               scratch_at, p_fmt, g_fmt, codebooks_at, tables_at, planes_at, searches_at,
               zero_codes, nonnegative, block_size):
        # element access through typed pointers; scratch rows s0..s2 hold the block's states
        s_at = scratch_at + 12 * block_size * part
        s0 = pointer(s_at, np.float32)
        s1, s2 = pointer(s_at + 4 * block_size, np.float32), \
            pointer(s_at + 8 * block_size, np.float32)
        block_starts = pointer(block_starts_at, np.int64)
        per_tensor = pointer(per_tensor_at, np.float32)
        first, last = part_blocks(part, parts, blocks)
        t = np.int64(0)
        for b in range(first, last):
            t = locate(b, t, block_starts)
            row = pointer(tensors_at + 8 * COLUMNS * t, np.int64)
            p, g = pointer(row[P], p_type), pointer(row[G], g_type)
            e0, e1, seed = per_tensor[2 * t], per_tensor[2 * t + 1], row[SEED]
            lb = b - block_starts[t]
            # (int64, not quant._numba.block_range's unsigned range: pointers, unlike numba
            # arrays, have no negative-index check to avoid)
            start = lb * block_size
            end = min(start + block_size, row[NUMEL])
            for k in range(3):
                if row[STATES + 2 * k] != 0:
                    absmax = pointer(row[STATES + 2 * k + 1], np.float32)
                    decode_run(row[STATES + 2 * k] + start, end - start, codebooks_at + 1024 * k,
                               offset(planes_at, PLANES_BYTES * k), absmax[lb],
                               s_at + 4 * block_size * k)
            mag0 = mag1 = mag2 = NO_BITS
            for i in range(start, end):
                j = i - start
                pv = half_to_f32(p[i], p_fmt) if p_half else p[i]
                gv = (half_to_f32(g[i], g_fmt) if g_half else g[i]) * g_sign
                a = s0[j] if used0 else ZERO
                c = s1[j] if used1 else ZERO
                d = s2[j] if used2 else ZERO
                # family and the flags are constants: numba keeps one branch, before it inlines
                if family == ADAM:
                    pv, a, c, d = adam_rule(h, f0, f1, pv, gv, a, c, d, e0, e1)
                elif family == RMSPROP:
                    pv, a, c, d = rmsprop_rule(h, f0, f1, pv, gv, a, c, d, e0, e1)
                elif family == LION:
                    pv, a, c, d = lion_rule(h, f0, f1, pv, gv, a, c, d, e0, e1)
                elif family == SGD:
                    pv, a, c, d = sgd_rule(h, f0, f1, pv, gv, a, c, d, e0, e1)
                else:
                    pv, a, c, d = adagrad_rule(h, f0, f1, pv, gv, a, c, d, e0, e1)
                if not p_half:
                    p[i] = pv
                elif seed != 0:  # bf16 parameters: stochastic rounding (functional._native._seed)
                    p[i] = stochastic_bf16(pv, seed, i)
                else:
                    p[i] = np.uint16(f32_to_half(pv, p_fmt))
                # (the streams of unused slots cost a sixth of an Adam8bit step)
                if used0:
                    s0[j] = a
                if used1:
                    s1[j] = c
                if used2:
                    s2[j] = d
                mag0 = umax(mag0, abs_bits(a))
                mag1 = umax(mag1, abs_bits(c))
                mag2 = umax(mag2, abs_bits(d))
            if umax(umax(mag0, mag1), mag2) >= INF_BITS:
                # A fresh state is not finite (rare): issue 17's rule (a) in a pass of its own,
                # taken only when the block's max says so, costs nothing in the common case (in
                # the loop above, a tenth of a step).
                mag0 = mag1 = mag2 = NO_BITS
                for j in range(end - start):
                    a = s0[j] if used0 else ZERO
                    c = s1[j] if used1 else ZERO
                    d = s2[j] if used2 else ZERO
                    if (abs_bits(a) >= INF_BITS) | (abs_bits(c) >= INF_BITS) | (
                            abs_bits(d) >= INF_BITS):
                        s0[j] = s1[j] = s2[j] = ZERO  # (an unused slot's scratch: never encoded)
                    else:
                        mag0 = umax(mag0, abs_bits(a))
                        mag1 = umax(mag1, abs_bits(c))
                        mag2 = umax(mag2, abs_bits(d))
            for k in range(3):
                if row[STATES + 2 * k] != 0:
                    mag = mag0 if k == 0 else mag1 if k == 1 else mag2
                    encode_block(s_at + 4 * block_size * k,
                                 row[STATES + 2 * k] + start, end - start, mag,
                                 row[STATES + 2 * k + 1] + 4 * lb,
                                 tables_at + 4 * TABLE_ENTRIES * k,
                                 offset(searches_at, SEARCH_BYTES * k), zero_codes[k],
                                 nonnegative[k])

    return kernel
