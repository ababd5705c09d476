"""Numba kernels of the fused CPU update rules: one pass per block, in parallel over blocks.

For each block a kernel dequantizes the states (64 codes per lookup, ``quant._intrinsics.lookup64``)
into a block-sized scratch buffer, applies the rule in fp32 registers, writes the parameter,
keeps the fresh states and their absmax in the scratch buffer, and then requantizes them.
Parameters, gradients and codes are read and written once per step. One call serves any number
of parameters (a table of addresses, below): many small parameters cost one threaded call.

The arithmetic is the torch path's (``functional/adam.py``, ``rmsprop.py``, ``lion.py``)
operation for operation, including where torch's CPU kernels fuse a multiply-add (lerp,
addcmul, ``add(..., alpha=)``). Two differences touch the parameter only, never a state: sqrt
here is IEEE, while torch's CPU sqrt (MKL's VML) is not always correctly rounded, and Adam
multiplies by the rounded reciprocal of its bias correction where torch divides (a division
less per element); so a parameter can differ in its last ulps (bounds in
tests/functional/test_native.py). Hyperparameters arrive as fp32 values rounded by the caller
exactly as torch rounds Python scalars.

Imported by :mod:`eightbit.functional._native` on the first CPU step, never at ``import``.
"""

from __future__ import annotations

import numpy as np
from numba import types, uint32, uint64
from numba.extending import overload

from ..quant._intrinsics import abs_bits, f32_bits, fma, umax, view
from ..quant._numba import (
    BF16,
    HELPER_OPTIONS,
    block_range,
    dequantize_run,
    encode_run,
    fix_degenerate,
    helper,
    kernel,
    leaf,
    load,
    part_blocks,
    set_scale,
    store,
)


def store_param(p, i, value, fmt, seed):
    """Write a parameter element; ``seed != 0`` rounds a bf16 parameter stochastically.

    Stochastic rounding adds 16 random bits below bf16's last bit and truncates (as
    ``functional._chunked.stochastic_round_to_bf16``). The bits come from a counter-based hash
    of ``(seed, i)`` (SplitMix64's finalizer; Steele, Lea & Flood, OOPSLA 2014), so the result
    does not depend on how blocks are spread over threads. An fp32 parameter compiles to a
    plain store (no per-element test of ``seed``).
    """


@overload(store_param, jit_options=HELPER_OPTIONS)
def _store_param(p, i, value, fmt, seed):
    if p.dtype == types.float32:

        def plain(p, i, value, fmt, seed):
            p[i] = value

        return plain

    def impl(p, i, value, fmt, seed):
        if seed != 0 and fmt == BF16:
            z = uint64(seed) + uint64(i) * uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB)
            noise = uint32((z ^ (z >> uint64(31))) & uint64(0xFFFF))
            p[i] = np.uint16((f32_bits(value) + noise) >> uint32(16))
        else:
            store(p, i, value, fmt)

    return impl


@leaf
def lerp(start, end, weight):
    """torch.lerp's CPU formula (exact at both ends; fused multiply-add). The branch on the
    (loop-invariant) weight is written as selects, so the element loop has none."""
    small = abs(weight) < np.float32(0.5)
    w = weight if small else weight - np.float32(1.0)
    return fma(w, end - start, start if small else end)


@leaf
def maximum(a, b):
    """torch.maximum: NaN if either is NaN."""
    return a if (a > b or a != a) else b


@helper
def adam_element(p, g, m, v, decay, l2, beta1_weight, beta2, one_minus_beta2):
    """Adam up to the denominator: the decayed parameter and the new m and v."""
    p = p * decay
    with_l2 = fma(l2, p, g)  # computed always, selected by a loop-invariant test: no branch
    g = with_l2 if l2 != 0 else g
    m = lerp(m, g, beta1_weight)
    v = fma(one_minus_beta2 * g, g, v * beta2)
    return p, m, v


@leaf
def adam_denom(v_hat, inv_bc2_sqrt, eps):
    """Adam's denominator ``sqrt(v_hat) / bc2_sqrt + eps``, as a multiply by the rounded
    reciprocal fused with ``+ eps`` (one rounding each way, as torch's division and addition are
    two): the parameter may move by a few ulps of its step more than the sqrt alone explains
    (tests/functional/test_native.py derives the bound). States never depend on it.

    Divisions stay in the kernels: in a helper, numba's zero-division check would be a branch
    that stops the loop from vectorizing.
    """
    return fma(np.sqrt(v_hat), inv_bc2_sqrt, eps)


# -- The tensor table ----------------------------------------------------------------------
#
# Every kernel updates any number of parameters in one call (one ``_threads.run``): a table has
# one int64 row per parameter, its columns below; state k's codes and absmax addresses are at
# STATES + 2k and STATES + 2k + 1 (0 for a state that is off). ``block_starts[t]`` is the
# first block of parameter t in the concatenation of all parameters' blocks (its last entry the
# total), and the parts split that concatenation, so many small parameters cost one call.
P, G, NUMEL, SEED, STATES = 0, 1, 2, 3, 4
# ``scratch`` is the address of ``parts`` x 3 blocks of fp32 values: each part's buffers for
# up to three states (bytes per block of one part: SCRATCH * block_size). Passed in, because
# np.empty in a kernel added 0.2 s to its first compile.
SCRATCH = 3 * 4


@leaf
def locate(b, tensor, block_starts):
    """The parameter holding block ``b`` of the concatenation, searching on from ``tensor``."""
    while b >= block_starts[tensor + 1]:
        tensor += 1
    return tensor


@kernel
def adam(
    part, parts, tensors, block_starts, per_tensor, scratch, p_like, p_fmt, g_like, g_fmt,
    m_lut, m_table, m_search, m_zero, v_lut, v_table, v_search, v_zero,
    decay, l2, beta1_weight, beta2, one_minus_beta2, eps, g_sign, block_size,
):  # fmt: skip
    # States: m, v. per_tensor[t] = (1 / bias_correction2_sqrt, -lr / bias_correction1).
    # AMSGrad is the separate kernel below: one kernel for both compiled slower on first use
    # (0.5 s with a run-time flag; 0.2 s with a None argument that numba prunes), and the
    # loops must sit in the kernels to vectorize.
    m_new = view(scratch + SCRATCH * block_size * part, block_size, np.float32)
    v_new = view(scratch + SCRATCH * block_size * part + 4 * block_size, block_size, np.float32)
    first, last = part_blocks(part, parts, block_starts[-1])
    t = np.int64(0)
    for b in range(first, last):
        t = locate(b, t, block_starts)
        n = tensors[t, NUMEL]
        blocks_of_n = (n + block_size - 1) // block_size
        p, g = view(tensors[t, P], n, p_like), view(tensors[t, G], n, g_like)
        m_codes = view(tensors[t, STATES], n, np.uint8)
        m_absmax = view(tensors[t, STATES + 1], blocks_of_n, np.float32)
        v_codes = view(tensors[t, STATES + 2], n, np.uint8)
        v_absmax = view(tensors[t, STATES + 3], blocks_of_n, np.float32)
        inv_bc2_sqrt, neg_step_size = per_tensor[t, 0], per_tensor[t, 1]
        seed, lb = tensors[t, SEED], b - block_starts[t]
        start, end = block_range(lb, block_size, n)
        dequantize_run(m_codes, start, end, m_lut, m_absmax[lb], m_new)
        dequantize_run(v_codes, start, end, v_lut, v_absmax[lb], v_new)
        m_mag, v_mag = uint32(0), uint32(0)
        for i in range(start, end):
            pi, mi, vi = adam_element(
                load(p, i, p_fmt), load(g, i, g_fmt) * g_sign,
                m_new[i - start], v_new[i - start],
                decay, l2, beta1_weight, beta2, one_minus_beta2,
            )
            pi = pi + (neg_step_size * mi) / adam_denom(vi, inv_bc2_sqrt, eps)
            store_param(p, i, pi, p_fmt, seed)
            m_new[i - start], v_new[i - start] = mi, vi
            m_mag = umax(m_mag, abs_bits(mi))
            v_mag = umax(v_mag, abs_bits(vi))
        scale = set_scale(m_absmax, lb, m_mag)
        encode_run(m_new, m_codes, start, end, scale, m_table, m_search)
        fix_degenerate(m_codes, start, end, m_mag, m_zero)
        scale = set_scale(v_absmax, lb, v_mag)
        encode_run(v_new, v_codes, start, end, scale, v_table, v_search)
        fix_degenerate(v_codes, start, end, v_mag, v_zero)


@kernel
def adam_amsgrad(
    part, parts, tensors, block_starts, per_tensor, scratch, p_like, p_fmt, g_like, g_fmt,
    m_lut, m_table, m_search, m_zero, v_lut, v_table, v_search, v_zero,
    decay, l2, beta1_weight, beta2, one_minus_beta2, eps, g_sign, block_size,
):  # fmt: skip
    # :func:`adam` with a third state, the running maximum of v (v's map), in the denominator.
    m_new = view(scratch + SCRATCH * block_size * part, block_size, np.float32)
    v_new = view(scratch + SCRATCH * block_size * part + 4 * block_size, block_size, np.float32)
    vmax_new = view(scratch + SCRATCH * block_size * part + 8 * block_size, block_size,
                    np.float32)
    first, last = part_blocks(part, parts, block_starts[-1])
    t = np.int64(0)
    for b in range(first, last):
        t = locate(b, t, block_starts)
        n = tensors[t, NUMEL]
        blocks_of_n = (n + block_size - 1) // block_size
        p, g = view(tensors[t, P], n, p_like), view(tensors[t, G], n, g_like)
        m_codes = view(tensors[t, STATES], n, np.uint8)
        m_absmax = view(tensors[t, STATES + 1], blocks_of_n, np.float32)
        v_codes = view(tensors[t, STATES + 2], n, np.uint8)
        v_absmax = view(tensors[t, STATES + 3], blocks_of_n, np.float32)
        vmax_codes = view(tensors[t, STATES + 4], n, np.uint8)
        vmax_absmax = view(tensors[t, STATES + 5], blocks_of_n, np.float32)
        inv_bc2_sqrt, neg_step_size = per_tensor[t, 0], per_tensor[t, 1]
        seed, lb = tensors[t, SEED], b - block_starts[t]
        start, end = block_range(lb, block_size, n)
        dequantize_run(m_codes, start, end, m_lut, m_absmax[lb], m_new)
        dequantize_run(v_codes, start, end, v_lut, v_absmax[lb], v_new)
        dequantize_run(vmax_codes, start, end, v_lut, vmax_absmax[lb], vmax_new)
        m_mag, v_mag, vmax_mag = uint32(0), uint32(0), uint32(0)
        for i in range(start, end):
            pi, mi, vi = adam_element(
                load(p, i, p_fmt), load(g, i, g_fmt) * g_sign,
                m_new[i - start], v_new[i - start],
                decay, l2, beta1_weight, beta2, one_minus_beta2,
            )
            v_hat = maximum(vmax_new[i - start], vi)
            pi = pi + (neg_step_size * mi) / adam_denom(v_hat, inv_bc2_sqrt, eps)
            store_param(p, i, pi, p_fmt, seed)
            m_new[i - start], v_new[i - start], vmax_new[i - start] = mi, vi, v_hat
            m_mag = umax(m_mag, abs_bits(mi))
            v_mag = umax(v_mag, abs_bits(vi))
            vmax_mag = umax(vmax_mag, abs_bits(v_hat))
        scale = set_scale(m_absmax, lb, m_mag)
        encode_run(m_new, m_codes, start, end, scale, m_table, m_search)
        fix_degenerate(m_codes, start, end, m_mag, m_zero)
        scale = set_scale(v_absmax, lb, v_mag)
        encode_run(v_new, v_codes, start, end, scale, v_table, v_search)
        fix_degenerate(v_codes, start, end, v_mag, v_zero)
        scale = set_scale(vmax_absmax, lb, vmax_mag)
        encode_run(vmax_new, vmax_codes, start, end, scale, v_table, v_search)
        fix_degenerate(vmax_codes, start, end, vmax_mag, v_zero)


@kernel
def rmsprop(
    part, parts, tensors, block_starts, scratch, p_like, p_fmt, g_like, g_fmt,
    sq_lut, sq_table, sq_search, sq_zero, s_lut, s_table, s_search, s_zero, use_momentum,
    centered,
    l2, alpha, one_minus_alpha, eps, momentum, neg_lr, g_sign, block_size,
):  # fmt: skip
    # States: square_avg (unsigned map), momentum_buffer and grad_avg (signed map, ``s_``),
    # the last two only when ``use_momentum`` / ``centered`` (their addresses are 0 otherwise).
    sq_new = view(scratch + SCRATCH * block_size * part, block_size, np.float32)
    buf_new = view(scratch + SCRATCH * block_size * part + 4 * block_size, block_size,
                   np.float32)
    ga_new = view(scratch + SCRATCH * block_size * part + 8 * block_size, block_size,
                  np.float32)
    first, last = part_blocks(part, parts, block_starts[-1])
    t = np.int64(0)
    for b in range(first, last):
        t = locate(b, t, block_starts)
        n = tensors[t, NUMEL]
        blocks_of_n = (n + block_size - 1) // block_size
        p, g = view(tensors[t, P], n, p_like), view(tensors[t, G], n, g_like)
        sq_codes = view(tensors[t, STATES], n, np.uint8)
        sq_absmax = view(tensors[t, STATES + 1], blocks_of_n, np.float32)
        buf_codes = view(tensors[t, STATES + 2], n, np.uint8)
        buf_absmax = view(tensors[t, STATES + 3], blocks_of_n, np.float32)
        ga_codes = view(tensors[t, STATES + 4], n, np.uint8)
        ga_absmax = view(tensors[t, STATES + 5], blocks_of_n, np.float32)
        seed, lb = tensors[t, SEED], b - block_starts[t]
        start, end = block_range(lb, block_size, n)
        dequantize_run(sq_codes, start, end, sq_lut, sq_absmax[lb], sq_new)
        if centered:
            dequantize_run(ga_codes, start, end, s_lut, ga_absmax[lb], ga_new)
        if use_momentum:
            dequantize_run(buf_codes, start, end, s_lut, buf_absmax[lb], buf_new)
        sq_mag, buf_mag, ga_mag = uint32(0), uint32(0), uint32(0)
        for i in range(start, end):
            pi = load(p, i, p_fmt)
            gi = load(g, i, g_fmt) * g_sign
            gi = fma(l2, pi, gi) if l2 != 0 else gi
            sq = fma(one_minus_alpha * gi, gi, sq_new[i - start] * alpha)
            sq_new[i - start] = sq
            sq_mag = umax(sq_mag, abs_bits(sq))
            if centered:
                ga = lerp(ga_new[i - start], gi, one_minus_alpha)
                ga_new[i - start] = ga
                ga_mag = umax(ga_mag, abs_bits(ga))
                var = fma(-ga, ga, sq)
                avg = np.sqrt(np.float32(0.0) if var < 0 else var) + eps
            else:
                avg = np.sqrt(sq) + eps
            if use_momentum:
                buf = buf_new[i - start] * momentum + gi / avg
                buf_new[i - start] = buf
                buf_mag = umax(buf_mag, abs_bits(buf))
                pi = fma(neg_lr, buf, pi)
            else:
                pi = pi + (neg_lr * gi) / avg
            store_param(p, i, pi, p_fmt, seed)
        scale = set_scale(sq_absmax, lb, sq_mag)
        encode_run(sq_new, sq_codes, start, end, scale, sq_table, sq_search)
        fix_degenerate(sq_codes, start, end, sq_mag, sq_zero)
        if centered:
            scale = set_scale(ga_absmax, lb, ga_mag)
            encode_run(ga_new, ga_codes, start, end, scale, s_table, s_search)
            fix_degenerate(ga_codes, start, end, ga_mag, s_zero)
        if use_momentum:
            scale = set_scale(buf_absmax, lb, buf_mag)
            encode_run(buf_new, buf_codes, start, end, scale, s_table, s_search)
            fix_degenerate(buf_codes, start, end, buf_mag, s_zero)


@kernel
def lion(
    part, parts, tensors, block_starts, scratch, p_like, p_fmt, g_like, g_fmt,
    m_lut, m_table, m_search, m_zero,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, g_sign, block_size,
):  # fmt: skip
    # State: m.
    m_new = view(scratch + SCRATCH * block_size * part, block_size, np.float32)
    first, last = part_blocks(part, parts, block_starts[-1])
    t = np.int64(0)
    for b in range(first, last):
        t = locate(b, t, block_starts)
        n = tensors[t, NUMEL]
        blocks_of_n = (n + block_size - 1) // block_size
        p, g = view(tensors[t, P], n, p_like), view(tensors[t, G], n, g_like)
        m_codes = view(tensors[t, STATES], n, np.uint8)
        m_absmax = view(tensors[t, STATES + 1], blocks_of_n, np.float32)
        seed, lb = tensors[t, SEED], b - block_starts[t]
        start, end = block_range(lb, block_size, n)
        dequantize_run(m_codes, start, end, m_lut, m_absmax[lb], m_new)
        m_mag = uint32(0)
        for i in range(start, end):
            gi = load(g, i, g_fmt) * g_sign
            mi = m_new[i - start]
            c = fma(one_minus_beta1, gi, mi * beta1)
            sign = np.float32(np.float32(0.0) < c) - np.float32(c < np.float32(0.0))
            store_param(p, i, fma(neg_lr, sign, load(p, i, p_fmt) * decay), p_fmt, seed)
            mi = fma(one_minus_beta2, gi, mi * beta2)
            m_new[i - start] = mi
            m_mag = umax(m_mag, abs_bits(mi))
        scale = set_scale(m_absmax, lb, m_mag)
        encode_run(m_new, m_codes, start, end, scale, m_table, m_search)
        fix_degenerate(m_codes, start, end, m_mag, m_zero)
