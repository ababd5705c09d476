"""Numba kernels of the CPU path: blockwise quantize and dequantize, and the small helpers the
optimizer driver of ``eightbit.functional._numba`` shares.

Imported by :mod:`eightbit.quant._native` on the first CPU call, never by ``import eightbit``.
Shape of every kernel: a serial ``@njit(cache=True, nogil=True)`` function does part ``part`` of
``parts`` of the blocks (:func:`part_blocks`); ``_native.run_parts`` runs the parts on torch's
OpenMP threads or Python threads (the kernels release the GIL). No fast-math: division, sqrt
and rounding are IEEE fp32, as in the torch path, the oracle these kernels are tested against.

A block is encoded and decoded by two intrinsics, :func:`._intrinsics.encode_block` and
:func:`._intrinsics.decode_run`, which emit the block's whole loop into the kernel (no helper
function to compile). Two search paths find nearest codes: the portable one (a nearest-code
table read by gathers) and, where the CPU has AVX-512 VBMI, the byte-permute one of
:mod:`._vbmi`. The kernels pass the VBMI tables' addresses, ``None`` where the path is off,
and the intrinsics choose by that argument's type: numba compiles a variant of the kernel per
path, holding only that path's loops. Half-precision tensors arrive as
``uint16`` bit patterns with a format flag, :data:`F16` or :data:`BF16` (numba has no CPU
float16 or bfloat16).
"""

from __future__ import annotations

from ._native import set_cache_dir

set_cache_dir()  # before numba is first imported (EIGHTBIT_CACHE_DIR)

import numpy as np  # noqa: E402
from numba import njit, types, uint32, uint64  # noqa: E402
from numba.extending import overload  # noqa: E402

from ._intrinsics import (  # noqa: E402
    NAN_BITS,
    NONFINITE_BITS,
    abs_bits,
    bits_f32,
    decode_run,
    encode_block,
    f32_to_half,
    half_to_f32,
    prefetch,
    umax,
)

F32, F16, BF16 = 0, 1, 2

# Serial parts; numpy's error model: a division gets no zero check (a branch that stops a loop
# from vectorizing).
part_kernel = njit(cache=True, nogil=True, error_model="numpy")
# Element helpers, inlined into the kernels' numba IR.
inline = njit(inline="always", cache=True, error_model="numpy")


@inline
def load_f32(x, i, fmt):
    """``x[i]`` of an fp32 array."""
    return x[i]


@inline
def load_half(x, i, fmt):
    """``x[i]`` of half-precision bits in format ``fmt``, as fp32."""
    return half_to_f32(x[i], fmt)


def load(x, i, fmt):
    """``x[i]`` as fp32 (``x`` float32, or uint16 bits in format ``fmt``)."""


@overload(load, inline="always")
def _load(x, i, fmt):
    return (load_f32 if x.dtype == types.float32 else load_half).py_func


def store(x, i, value, fmt):
    """``x[i] = value`` from fp32 (``x`` float32, or uint16 bits in format ``fmt``)."""


@overload(store, inline="always")
def _store(x, i, value, fmt):
    if x.dtype == types.float32:

        def impl(x, i, value, fmt):
            x[i] = value

        return impl

    def impl(x, i, value, fmt):
        x[i] = np.uint16(f32_to_half(value, fmt))

    return impl


@inline
def part_blocks(part, parts, blocks):
    """The blocks ``[first, last)`` of part ``part`` of ``parts``."""
    return part * blocks // parts, (part + 1) * blocks // parts


@inline
def block_range(b, block_size, n):
    """Element range of block ``b`` as unsigned indices (no negative-index checks)."""
    start = uint64(b) * uint64(block_size)
    end = start + uint64(block_size)
    return start, end if end < uint64(n) else uint64(n)


@inline
def prefetch_next(at, itemsize, start, end):
    """Prefetch the block after ``[start, end)`` of the array at ``at`` (``itemsize``-byte
    elements): the hardware prefetcher alone left quantize a quarter slower on large tensors."""
    ahead = at + np.int64(itemsize) * np.int64(end)
    for line in range(0, np.int64(itemsize) * np.int64(end - start), 64):
        prefetch(ahead + line)


# The block rules of quantize_scan; _intrinsics.encode_block emits the same two in IR.


@inline
def block_scale(mag):
    """absmax from the max of a block's :func:`abs_bits`: 0 for zeros, NaN when non-finite."""
    return bits_f32(uint32(NAN_BITS) if mag >= uint32(NONFINITE_BITS) else mag)


@inline
def degenerate(mag):
    """A block of zeros, or one holding inf/NaN: it gets the code of zero (as the torch path)."""
    return mag == 0 or mag >= uint32(NONFINITE_BITS)


# The block intrinsics take addresses (int64), not arrays: reading ``arr.ctypes.data`` counts a
# reference on the array's owner, an atomic operation that threads sharing a table contend on
# (two threads ran no faster than one). Kernels take each address once per part.


@inline
def address(x):
    """The address of array ``x``'s data."""
    return np.int64(x.ctypes.data)


@part_kernel
def quantize_part(part, parts, x, fmt, codes, absmax, table, search_at, zero_code, block_size,
                  scratch):
    """Part ``part`` of ``parts`` of quantize; ``search_at``: the VBMI search table's address,
    or ``None`` for the portable path (see :func:`._intrinsics.encode_block`)."""
    n = x.size
    first, last = part_blocks(part, parts, absmax.size)
    values = scratch[part]
    values_at, codes_at, absmax_at = address(values), address(codes), address(absmax)
    table_at, x_at = address(table), address(x)
    for b in range(first, last):
        start, end = block_range(b, block_size, n)
        prefetch_next(x_at, x.itemsize, start, end)
        mag = uint32(0)
        for i in range(start, end):
            mag = umax(mag, abs_bits(load(x, i, fmt)))
        at = x_at + 4 * np.int64(start)  # fp32 input is encoded where it is
        if x.itemsize != 4:  # fp16/bf16: converted to fp32 first
            for i in range(start, end):
                values[i - start] = load(x, i, fmt)
            at = values_at
        encode_block(at, codes_at + np.int64(start), np.int64(end - start), mag,
                     absmax_at + 4 * np.int64(b), table_at, search_at, zero_code, False)


@njit(cache=True, nogil=True)
def scan_code(y, thresholds):
    """Number of thresholds below ``y`` by linear search (``thresholds`` ends with +inf), for
    codebooks whose thresholds are too close together for a nearest-code table
    (``_native.code_table``)."""
    code = 0
    while thresholds[code] < y:
        code += 1
    return code


@part_kernel
def quantize_scan(part, parts, x, fmt, codes, absmax, thresholds, zero_code, block_size):
    n = x.size
    first, last = part_blocks(part, parts, absmax.size)
    for b in range(first, last):
        start, end = block_range(b, block_size, n)
        mag = uint32(0)
        for i in range(start, end):
            mag = umax(mag, abs_bits(load(x, i, fmt)))
        scale = absmax[b] = block_scale(mag)
        for i in range(start, end):
            codes[i] = zero_code if degenerate(mag) else np.uint8(
                scan_code(load(x, i, fmt) / scale, thresholds))


@part_kernel
def dequantize_part(part, parts, codes, absmax, codebook, planes_at, out, fmt, block_size,
                    scratch):
    """Part ``part`` of ``parts`` of dequantize; ``planes_at``: the VBMI planes' address, or
    ``None`` for the portable path (see :func:`._intrinsics.decode_run`)."""
    n = codes.size
    first, last = part_blocks(part, parts, absmax.size)
    values = scratch[part]
    values_at, codes_at = address(values), address(codes)
    codebook_at = address(codebook)
    out_at = address(out)
    for b in range(first, last):
        start, end = block_range(b, block_size, n)
        prefetch_next(codes_at, 1, start, end)
        if out.itemsize == 4:  # fp32 output is decoded where it goes
            decode_run(codes_at + np.int64(start), np.int64(end - start), codebook_at,
                       planes_at, absmax[b], out_at + 4 * np.int64(start))
            continue
        decode_run(codes_at + np.int64(start), np.int64(end - start), codebook_at, planes_at,
                   absmax[b], values_at)
        for i in range(start, end):
            store(out, i, values[i - start], fmt)

