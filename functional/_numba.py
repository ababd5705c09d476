"""Numba kernels of the fused CPU update rules: one pass per block, in parallel over blocks.

For each block a kernel dequantizes the states (64 codes per lookup,
``quant._intrinsics.dequantize_run``) into a block-sized scratch buffer, applies the rule in fp32
registers, writes the parameter, keeps the fresh states and their absmax in the scratch buffer,
and then requantizes them (``quant._numba.requantize``, one call per state and block).
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

from ..quant._intrinsics import abs_bits, dequantize_run, f32_bits, fma, umax, view
from ..quant._numba import (
    BF16,
    HELPER_OPTIONS,
    address,
    block_range,
    book,
    helper,
    kernel,
    leaf,
    load,
    part_blocks,
    requantize,
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


# Each kernel dequantizes and requantizes its states in loops over them (``k``: the state's
# column pair in the table, and its scratch buffer at ``buffers + 4 * block_size * k``), so
# that ``dequantize_run``, an intrinsic whose loops are emitted where it is called, appears once
# in a kernel: every copy is more code for LLVM to compile on first use.


@kernel
def adam(
    part, parts, tensors, block_starts, per_tensor, scratch, p_like, p_fmt, g_like, g_fmt,
    m_lut, m_table, m_search, m_zero, v_lut, v_table, v_search, v_zero,
    decay, l2, beta1_weight, beta2, one_minus_beta2, eps, g_sign, block_size,
):  # fmt: skip
    # States: m (k = 0, signed map), v (k = 1). per_tensor[t] = (1 / bias_correction2_sqrt,
    # -lr / bias_correction1). AMSGrad is the separate kernel below: one kernel for both
    # compiled slower on first use (0.5 s with a run-time flag; 0.2 s with a None argument that
    # numba prunes), and the loops must sit in the kernels to vectorize.
    buffers = scratch + SCRATCH * block_size * part
    m_new = view(buffers, block_size, np.float32)
    v_new = view(buffers + 4 * block_size, block_size, np.float32)
    m_lut_at, v_lut_at = address(m_lut), address(v_lut)
    m_book, v_book = book(m_table, m_search, m_zero), book(v_table, v_search, v_zero)
    first, last = part_blocks(part, parts, block_starts[-1])
    t = np.int64(0)
    for b in range(first, last):
        t = locate(b, t, block_starts)
        n = tensors[t, NUMEL]
        blocks_of_n = (n + block_size - 1) // block_size
        p, g = view(tensors[t, P], n, p_like), view(tensors[t, G], n, g_like)
        inv_bc2_sqrt, neg_step_size = per_tensor[t, 0], per_tensor[t, 1]
        seed, lb = tensors[t, SEED], b - block_starts[t]
        start, end = block_range(lb, block_size, n)
        for k in range(2):
            absmax = view(tensors[t, STATES + 2 * k + 1], blocks_of_n, np.float32)
            dequantize_run(tensors[t, STATES + 2 * k], start, end,
                           m_lut_at if k == 0 else v_lut_at, absmax[lb],
                           buffers + 4 * block_size * k)
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
        for k in range(2):
            requantize(buffers + 4 * block_size * k, tensors[t, STATES + 2 * k],
                       tensors[t, STATES + 2 * k + 1], lb, start, end,
                       m_mag if k == 0 else v_mag, m_book if k == 0 else v_book)


@kernel
def adam_amsgrad(
    part, parts, tensors, block_starts, per_tensor, scratch, p_like, p_fmt, g_like, g_fmt,
    m_lut, m_table, m_search, m_zero, v_lut, v_table, v_search, v_zero,
    decay, l2, beta1_weight, beta2, one_minus_beta2, eps, g_sign, block_size,
):  # fmt: skip
    # :func:`adam` with a third state, the running maximum of v (k = 2, v's map), in the
    # denominator.
    buffers = scratch + SCRATCH * block_size * part
    m_new = view(buffers, block_size, np.float32)
    v_new = view(buffers + 4 * block_size, block_size, np.float32)
    vmax_new = view(buffers + 8 * block_size, block_size, np.float32)
    m_lut_at, v_lut_at = address(m_lut), address(v_lut)
    m_book, v_book = book(m_table, m_search, m_zero), book(v_table, v_search, v_zero)
    first, last = part_blocks(part, parts, block_starts[-1])
    t = np.int64(0)
    for b in range(first, last):
        t = locate(b, t, block_starts)
        n = tensors[t, NUMEL]
        blocks_of_n = (n + block_size - 1) // block_size
        p, g = view(tensors[t, P], n, p_like), view(tensors[t, G], n, g_like)
        inv_bc2_sqrt, neg_step_size = per_tensor[t, 0], per_tensor[t, 1]
        seed, lb = tensors[t, SEED], b - block_starts[t]
        start, end = block_range(lb, block_size, n)
        for k in range(3):
            absmax = view(tensors[t, STATES + 2 * k + 1], blocks_of_n, np.float32)
            dequantize_run(tensors[t, STATES + 2 * k], start, end,
                           m_lut_at if k == 0 else v_lut_at, absmax[lb],
                           buffers + 4 * block_size * k)
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
        for k in range(3):
            requantize(buffers + 4 * block_size * k, tensors[t, STATES + 2 * k],
                       tensors[t, STATES + 2 * k + 1], lb, start, end,
                       m_mag if k == 0 else v_mag if k == 1 else vmax_mag,
                       m_book if k == 0 else v_book)


@kernel
def rmsprop(
    part, parts, tensors, block_starts, scratch, p_like, p_fmt, g_like, g_fmt,
    sq_lut, sq_table, sq_search, sq_zero, s_lut, s_table, s_search, s_zero, use_momentum,
    centered,
    l2, alpha, one_minus_alpha, eps, momentum, neg_lr, g_sign, block_size,
):  # fmt: skip
    # States: square_avg (k = 0, unsigned map), momentum_buffer (k = 1) and grad_avg (k = 2;
    # signed map, ``s_``), the last two only when ``use_momentum`` / ``centered`` (their
    # addresses are 0 otherwise).
    buffers = scratch + SCRATCH * block_size * part
    sq_new = view(buffers, block_size, np.float32)
    buf_new = view(buffers + 4 * block_size, block_size, np.float32)
    ga_new = view(buffers + 8 * block_size, block_size, np.float32)
    sq_lut_at, s_lut_at = address(sq_lut), address(s_lut)
    sq_book, s_book = book(sq_table, sq_search, sq_zero), book(s_table, s_search, s_zero)
    first, last = part_blocks(part, parts, block_starts[-1])
    t = np.int64(0)
    for b in range(first, last):
        t = locate(b, t, block_starts)
        n = tensors[t, NUMEL]
        blocks_of_n = (n + block_size - 1) // block_size
        p, g = view(tensors[t, P], n, p_like), view(tensors[t, G], n, g_like)
        seed, lb = tensors[t, SEED], b - block_starts[t]
        start, end = block_range(lb, block_size, n)
        for k in range(3):
            if tensors[t, STATES + 2 * k] != 0:
                absmax = view(tensors[t, STATES + 2 * k + 1], blocks_of_n, np.float32)
                dequantize_run(tensors[t, STATES + 2 * k], start, end,
                               sq_lut_at if k == 0 else s_lut_at, absmax[lb],
                               buffers + 4 * block_size * k)
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
        for k in range(3):
            if tensors[t, STATES + 2 * k] != 0:
                requantize(buffers + 4 * block_size * k, tensors[t, STATES + 2 * k],
                           tensors[t, STATES + 2 * k + 1], lb, start, end,
                           sq_mag if k == 0 else buf_mag if k == 1 else ga_mag,
                           sq_book if k == 0 else s_book)


@kernel
def lion(
    part, parts, tensors, block_starts, scratch, p_like, p_fmt, g_like, g_fmt,
    m_lut, m_table, m_search, m_zero,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, g_sign, block_size,
):  # fmt: skip
    # State: m.
    buffer = scratch + SCRATCH * block_size * part
    m_new = view(buffer, block_size, np.float32)
    m_lut_at, m_book = address(m_lut), book(m_table, m_search, m_zero)
    first, last = part_blocks(part, parts, block_starts[-1])
    t = np.int64(0)
    for b in range(first, last):
        t = locate(b, t, block_starts)
        n = tensors[t, NUMEL]
        blocks_of_n = (n + block_size - 1) // block_size
        p, g = view(tensors[t, P], n, p_like), view(tensors[t, G], n, g_like)
        m_absmax = view(tensors[t, STATES + 1], blocks_of_n, np.float32)
        seed, lb = tensors[t, SEED], b - block_starts[t]
        start, end = block_range(lb, block_size, n)
        dequantize_run(tensors[t, STATES], start, end, m_lut_at, m_absmax[lb], buffer)
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
        requantize(buffer, tensors[t, STATES], tensors[t, STATES + 1], lb, start, end, m_mag,
                   m_book)
