"""Numba kernels of the fused CPU path: blockwise quantize / dequantize, and the element helpers
the fused optimizer kernels of ``eightbit.functional._numba`` share.

Imported only by :mod:`eightbit.quant._native` (and the functional layer's kernels), on the first
CPU call, never by ``import eightbit``. Every kernel is a serial ``@njit(cache=True,
nogil=True)`` function over one part of the blocks (:func:`part_blocks`), run on numba's
threads by :func:`eightbit.quant._threads.run` (not ``parallel=True``, which compiled about
twice as long); compiled once per argument-type signature and cached on disk in
:func:`cache_dir`. No fast-math anywhere: division, sqrt and rounding are IEEE fp32; the torch
path is the oracle these kernels are tested against.

Rules that keep the loops vectorized (checked in the generated assembly): element loops sit in
the kernels themselves (kernels are compiled with ``noalias`` array arguments, see
:data:`kernel`, which a gathering loop needs; in a plain ``@njit`` helper LLVM must assume that
a store may change the table, and the loop stays scalar); views of memory are built in the kernel (a
helper returning a tuple of arrays, or a row view of a 2-D array, also kept loops scalar);
helpers are plain ``@njit`` functions (called; LLVM does not inline the large ones), or, for
leaf helpers, inlined by numba (:data:`leaf`); divisions stay in the kernels (in a helper, numba's
zero-division check is a branch that stops vectorization); and running maxima stay uint32
(``_intrinsics.abs_bits``, ``umax``: numba widens integer arithmetic to 64 bits, halving the
vector width). What remains is mostly the table lookups: a gathered element costs about a
cycle on Zen 4, more than all the rest of quantize's arithmetic (the gather was 70% of
quantize's loop and 40-55% of an Adam8bit step), and its cost is the instruction's throughput,
not the table's size (a 2 KB table gathered as slowly as the 256 KB one). So where the CPU has
AVX-512 VBMI both directions avoid gathers: dequantization reads the codebook by byte permutes
(``_intrinsics.dequantize_run``), and quantization searches for the nearest code by byte
permutes too, 64 values at a time (``_intrinsics.encode64``, :func:`encode_run`). On this
project's 2-core Zen 4 benchmark machine the search costs 0.18 ns per value against the
gather's 0.31 (one thread, data in L2). Then calls: per block the optimizer kernels dequantize
each state in the kernel itself (``dequantize_run`` is an intrinsic: as a called helper, a step
was 8-12% slower) and requantize it with one call of :func:`requantize`, which takes addresses
(with arrays, the calls of a block passed about thirty arguments each: 5% slower). Then memory:
with the hardware prefetcher alone quantize and dequantize waited on it at 16M values, so they
ask for their input ahead (``_intrinsics.prefetch``; the optimizer kernels were faster without).
At 16M values on 2 cores (``make bench``, 2026-11-29) quantize runs at 69-74% of a copy's
bandwidth (38% with gathers), and an Adam8bit step takes 1.17-1.18x the time of fused fp32 Adam
(10.98-11.70 ms; 1.5-2.2x before this session's last changes). Fused Adam is bound by memory
and these kernels by compute, so the ratio follows the machine's memory speed that day: in the
fastest phase seen (fused Adam 5.44 ms) a same-run A/B measured this structure at 1.86x.
Scalar lookups (1.8x slower than gathers) and gathers interleaved with scalar lookups (no
faster) were tried and dropped.

Half-precision tensors arrive as ``uint16`` bit patterns (numpy has no bfloat16, and numba has no
CPU float16), with a format flag: :data:`F16` or :data:`BF16`.

The nearest-code search (:func:`nearest_code`) is exact without a binary search: a table built by
``_native.code_table`` maps the top 16 bits of ``y`` to the count of thresholds below that bin,
and one integer add against the one threshold inside the bin settles the code (its carry). The
register search of ``encode64`` gives the same codes (tested on every fp32 value in [-1, 1]);
the table serves the ragged ends of blocks, CPUs without VBMI, and codebooks the search does
not fit (``_native.search_tables``).
(bitsandbytes' CPU quantizer uses a 65,536-bin table without that last step, which makes
small values unreachable and turns exact zeros into non-zeros.)
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
from numba import config, int32, njit, types, uint32, uint64
from numba.core import caching, compiler
from numba.extending import overload

from ._intrinsics import (
    abs_bits,
    bits_f32,
    carry_code,
    dequantize_run,
    encode64,
    f32_bits,
    prefetch,
    umax,
    view,
)

F32, F16, BF16 = 0, 1, 2
PREFETCH_AHEAD = 512  # values (``_intrinsics.prefetch``)
TABLE_SIZE = 1 << 16  # entries of a nearest-code table (``_native.code_table``)


def cache_dir() -> str:
    """Where the compiled kernels are cached (``NUMBA_CACHE_DIR`` when the user sets it).

    Default: ``$EIGHTBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/eightbit`` (``~/.cache/eightbit``),
    plus ``numba/<version>-<hash of the kernel sources>``: numba's cache is keyed by the file of
    each kernel only, so helpers inlined from the other kernel file must change the directory.
    """
    if config.CACHE_DIR:
        return config.CACHE_DIR
    return _default_cache_dir()


@functools.lru_cache(maxsize=1)
def _default_cache_dir() -> str:
    from eightbit import __version__

    root = os.environ.get("EIGHTBIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "eightbit"
    )
    here = Path(__file__).resolve()
    digest = hashlib.sha1()
    for source in (here, here.parent / "_intrinsics.py",
                   here.parent.parent / "functional" / "_numba.py"):
        if source.exists():
            digest.update(source.read_bytes())
    return os.path.join(root, "numba", f"{__version__}-{digest.hexdigest()[:12]}")


class _EightbitCacheLocator(caching.UserWideCacheLocator):
    """A numba cache locator that claims eightbit's kernels only and uses :func:`cache_dir`."""

    def __init__(self, py_func, py_file):
        super().__init__(py_func, py_file)
        self._cache_path = os.path.join(cache_dir(), self.get_suitable_cache_subpath(py_file))

    @classmethod
    def from_function(cls, py_func, py_file):
        if config.CACHE_DIR or not (py_func.__module__ or "").startswith("eightbit."):
            return None  # the user's NUMBA_CACHE_DIR wins; other projects' functions are not ours
        return super().from_function(py_func, py_file)


if _EightbitCacheLocator not in caching.CacheImpl._locator_classes:
    caching.CacheImpl._locator_classes.insert(0, _EightbitCacheLocator)

class _KernelPipeline(compiler.CompilerBase):
    """numba's nopython pipeline with ``noalias`` array arguments (see :data:`kernel`)."""

    def define_pipelines(self):
        self.state.flags.noalias = True
        return [compiler.DefaultPassBuilder.define_nopython_pipeline(self.state)]


# A kernel call does one part of the blocks, ``kernel(part, parts, ...)`` (:func:`part_blocks`),
# and ``_threads.run`` runs the parts on numba's threads. Two options give them what numba
# gives the body of a parallel loop, and the gathering loops need: array arguments that do not
# alias (LLVM may then keep a table's loads apart from the stores), and numpy's error model
# (a division has no zero check, a branch that would stop vectorization). nogil lets the
# threads run at once.
kernel = njit(cache=True, nogil=True, error_model="numpy", pipeline_class=_KernelPipeline)
# Helpers are only ever called from kernels: no Python or C entry points to build (first use
# of an optimizer compiles about a hundred of them; the wrappers took a third of that time).
HELPER_OPTIONS = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}
helper = njit(cache=True, **HELPER_OPTIONS)
# Leaf helpers (calling only other leaves) are inlined into their callers' numba IR instead: no
# compile of their own, which made an optimizer's first use (cold cache) 9-13% faster. Helpers
# that call ``helper`` functions stay ``helper`` functions themselves, called: numba's IR-level
# inlining of a nested helper call miscompiled here (leaves in leaves, such as encode_run's
# nearest_code, are tested).
leaf = njit(inline="always", **HELPER_OPTIONS)


@leaf
def half_to_f32(h, fmt):
    """fp16 (``fmt == F16``) or bf16 bits to fp32, exactly (subnormals, inf and NaN included)."""
    h = uint32(h) & uint32(0xFFFF)
    sign = (h & uint32(0x8000)) << uint32(16)
    em = h & uint32(0x7FFF)
    # fp16: shifting exponent and mantissa into fp32 position and scaling by 2^112 rebiases the
    # exponent exactly, subnormals included; inf/NaN keep an all-ones exponent.
    scaled = f32_bits(bits_f32(em << uint32(13)) * np.float32(5.192296858534828e33))
    f16 = sign | (uint32(0x7F800000) | (em << uint32(13)) if em >= uint32(0x7C00) else scaled)
    return bits_f32(h << uint32(16) if fmt == BF16 else f16)


@leaf
def f32_to_half(f, fmt):
    """fp32 to fp16 or bf16 bits, round to nearest even (torch's conversion; NaN stays NaN)."""
    u = f32_bits(f)
    # bf16: the top half of the fp32 bits, rounded to nearest even.
    bf16 = uint32(0x7FC0) if (u & uint32(0x7FFFFFFF)) > uint32(0x7F800000) else (
        (u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))) >> uint32(16)
    )
    sign = (u >> uint32(16)) & uint32(0x8000)
    a = u & uint32(0x7FFFFFFF)
    # fp16 normal range: rebias the exponent (127 - 15 = 112) and round 13 mantissa bits away.
    r = a - uint32(0x38000000)
    normal = (r + uint32(0xFFF) + ((r >> uint32(13)) & uint32(1))) >> uint32(13)
    # fp16 subnormals: adding 0.5 puts |f| on the fp32 grid of step 2^-24 (fp16's subnormal
    # step), so the FPU's round-to-nearest-even does the rounding.
    sub = f32_bits(bits_f32(a) + np.float32(0.5)) - uint32(0x3F000000)
    f16 = sub if a < uint32(0x38800000) else normal
    f16 = uint32(0x7C00) if a >= uint32(0x477FF000) else f16
    f16 = sign | (uint32(0x7E00) if a > uint32(0x7F800000) else f16)
    return uint32(bf16 if fmt == BF16 else f16)


def load(x, i, fmt):
    """``x[i]`` as fp32 (``x`` float32, or uint16 bits in format ``fmt``)."""


@overload(load, jit_options=HELPER_OPTIONS)
def _load(x, i, fmt):
    if x.dtype == types.float32:
        return lambda x, i, fmt: x[i]
    return lambda x, i, fmt: half_to_f32(x[i], fmt)


def store(x, i, value, fmt):
    """``x[i] = value`` from fp32 (``x`` float32, or uint16 bits in format ``fmt``)."""


@overload(store, jit_options=HELPER_OPTIONS)
def _store(x, i, value, fmt):
    if x.dtype == types.float32:

        def impl(x, i, value, fmt):
            x[i] = value

        return impl

    def impl(x, i, value, fmt):
        x[i] = np.uint16(f32_to_half(value, fmt))

    return impl


@leaf
def block_scale(mag_bits):
    """absmax of a block from the max of its ``abs_bits``: 0 for zeros, NaN when non-finite."""
    return bits_f32(uint32(0x7FC00000) if mag_bits >= uint32(0x7F800000) else mag_bits)


@leaf
def nearest_code(y, table):
    """Number of thresholds strictly below fp32 ``y`` (``|y| <= 1``), by one table lookup.

    The bits of ``y`` above bit 16 (sign, exponent, 7 mantissa bits) pick a bin holding at most
    one threshold. Inside a bin the order of fp32 values is the order of their low 16 bits
    (reversed for negative values, so those are flipped: ``low``). The entry is (thresholds
    below the bin) << 16, plus 0xFFFF minus the low bits (flipped likewise) of the threshold
    inside it, if any (see ``_native.code_table``): ``entry + low`` carries into bit 16 exactly
    when ``low`` is above the threshold's, so one add and one shift finish the count (fewer
    instructions than a compare, which shows next to the gather). The constant shift lets the
    gather use 32-bit indices.
    """
    u = f32_bits(y)
    low = (u ^ uint32(int32(u) >> int32(31))) & uint32(0xFFFF)
    return carry_code(table[u >> uint32(16)], low)


@leaf
def encode_run(values, codes, start, end, scale, table, search):
    """``codes[i] = nearest_code(values[i - start] / scale, table)`` for ``start <= i < end``
    (``values`` fp32): 64 values at a time by ``_intrinsics.encode64`` (``search`` is the
    codebook's ``_native.code_table(...).search``), the rest (a ragged last block) one by one."""
    full = start + (end - start) // uint64(64) * uint64(64)
    if search.size == 0:
        full = start
    for s in range(start, full, uint64(64)):
        encode64(values, F32, s - start, scale, table, search, codes, s)
    for i in range(full, end):
        codes[i] = nearest_code(values[i - start] / scale, table)


@helper
def requantize(values, codes, absmax, b, start, end, mag, book):
    """Block ``b`` of a fresh fp32 state, ``values[: end - start]``, with ``mag`` the max of
    their :func:`~._intrinsics.abs_bits`, to its absmax ``absmax[b]`` and its nearest codes
    ``codes[start:end]`` (:func:`encode_run`; a block of zeros, or one holding inf/NaN, gets the
    code of zero, as in :func:`fix_degenerate`): the optimizer kernels' last step for each
    state. ``values``, ``codes`` (uint8) and ``absmax`` (fp32) are addresses, and ``book`` is
    the codebook's :func:`book`.

    Addresses, not arrays: a call passes each array as its seven fields, and the two calls per
    state with arrays that this replaced (absmax, then ``encode_run``) made an Adam8bit step 5%
    slower (same-run A/Bs). Inlined into the kernels (``inline="always"``) it was no faster,
    and each inlined copy of ``encode64`` is compiled anew (0.3 s of first use for Adam8bit).
    """
    table, search, search_size, zero_code = book
    scale = block_scale(mag)
    view(absmax, b + 1, np.float32)[b] = scale
    codes = view(codes, end, np.uint8)
    if not degenerate(mag):  # (a degenerate block is not encoded: nothing divides by 0)
        encode_run(view(values, end - start, np.float32), codes, start, end, scale,
                   view(table, TABLE_SIZE, np.uint32), view(search, search_size, np.uint8))
    fix_degenerate(codes, start, end, mag, zero_code)


@leaf
def address(x):
    """The address of array ``x``'s data, as the int64 the helpers above take."""
    return np.int64(x.ctypes.data)


@leaf
def book(table, search, zero_code):
    """A codebook's quantization tables for :func:`requantize`, as addresses and sizes: its
    nearest-code table, its search table (and size: 0 without one), and its code of zero."""
    return address(table), address(search), search.size, zero_code


@leaf
def part_blocks(part, parts, blocks):
    """The blocks ``[first, last)`` of part ``part`` of ``parts`` (``_threads.run``'s split)."""
    return part * blocks // parts, (part + 1) * blocks // parts


@leaf
def block_range(b, block_size, n):
    """Element range of block ``b`` as unsigned indices (no negative-index wraparound checks)."""
    start = uint64(b) * uint64(block_size)
    end = start + uint64(block_size)
    return start, end if end < uint64(n) else uint64(n)


@leaf
def degenerate(mag):
    """Whether a block whose values' max :func:`~._intrinsics.abs_bits` is ``mag`` holds only
    zeros, or an inf or NaN: such a block gets the code of zero (:func:`fix_degenerate`)."""
    return mag == 0 or mag >= uint32(0x7F800000)


@leaf
def fix_degenerate(codes, start, end, mag, zero_code):
    """Give a block of zeros, or one holding inf/NaN, the code of zero (the torch path's rule).

    The kernels first encode every block as if it were regular (the loop stays branch-free and
    vectorizable; the table has an entry for every 16-bit prefix, so NaN and inf are safe) and
    call this after. Loops in helpers are not vectorized, so the regular loop is in each kernel.
    """
    if degenerate(mag):
        for i in range(start, end):
            codes[i] = zero_code


@helper
def scan_code(y, thresholds):
    """Number of thresholds below ``y`` by linear search (``thresholds`` ends with +inf): for
    codebooks whose thresholds are too close together for the table of :func:`nearest_code`."""
    code = 0
    while thresholds[code] < y:
        code += 1
    return code


@kernel
def quantize(part, parts, x, fmt, codes, absmax, table, search, zero_code, block_size):
    # Each part walks its blocks in order and computes the absmax of the next block while it
    # encodes this one. With ``search`` (non-empty where the CPU has AVX-512 VBMI), 64 values
    # at a time by register permutes (``_intrinsics.encode64``), asking for the input 512
    # values ahead, then the next block's absmax: at 16M values on 2 cores 54-73% of a copy's
    # bandwidth (38% with the gathers). Without, in one loop with the gathers, so that the
    # next block's reads from memory overlap this block's table lookups: 15% faster than one
    # block at a time.
    n = x.size
    first, last = part_blocks(part, parts, absmax.size)
    start, end = block_range(first, block_size, n)
    next_mag = uint32(0)
    for i in range(start, end):
        next_mag = umax(next_mag, abs_bits(load(x, i, fmt)))
    for b in range(first, last):
        start, end = block_range(b, block_size, n)
        mag = next_mag
        scale = absmax[b] = block_scale(mag)
        # (past the part's last block: another part's first block, or empty past the end)
        ahead, ahead_end = block_range(b + 1, block_size, n)
        next_mag = uint32(0)
        if ahead_end - ahead == end - start and search.size != 0:  # a full block, 64 | size
            for s in range(start, end, uint64(64)):
                prefetch(x, s + uint64(PREFETCH_AHEAD), 64)
                encode64(x, fmt, s, scale, table, search, codes, s)
            for i in range(ahead, ahead_end):
                next_mag = umax(next_mag, abs_bits(load(x, i, fmt)))
        elif ahead_end - ahead == end - start:
            for i in range(start, end):
                next_mag = umax(next_mag, abs_bits(load(x, ahead + (i - start), fmt)))
                codes[i] = nearest_code(load(x, i, fmt) / scale, table)
        else:  # the next block is the ragged last one, or none
            for i in range(start, end):
                codes[i] = nearest_code(load(x, i, fmt) / scale, table)
            for i in range(ahead, ahead_end):
                next_mag = umax(next_mag, abs_bits(load(x, i, fmt)))
        fix_degenerate(codes, start, end, mag, zero_code)


@kernel
def quantize_scan(part, parts, x, fmt, codes, absmax, thresholds, zero_code, block_size):
    # For codebooks without a nearest-code table (:func:`scan_code`); never the built-in ones.
    n = x.size
    first, last = part_blocks(part, parts, absmax.size)
    for b in range(first, last):
        start, end = block_range(b, block_size, n)
        mag = uint32(0)
        for i in range(start, end):
            mag = umax(mag, abs_bits(load(x, i, fmt)))
        scale = absmax[b] = block_scale(mag)
        for i in range(start, end):
            codes[i] = np.uint8(scan_code(load(x, i, fmt) / scale, thresholds))
        fix_degenerate(codes, start, end, mag, zero_code)


@kernel
def dequantize(part, parts, codes, absmax, lut, out, fmt, block_size):
    n = codes.size
    first, last = part_blocks(part, parts, absmax.size)
    for b in range(first, last):
        start, end = block_range(b, block_size, n)
        prefetch(codes, start + uint64(4 * block_size), block_size)
        scale = absmax[b]
        for i in range(start, end):
            store(out, i, lut[codes[i]] * scale, fmt)


@kernel
def dequantize_f32(part, parts, codes, absmax, lut, out, block_size):
    # fp32 output: 64 codes per lookup (``dequantize_run``); fp16/bf16 outputs take ``dequantize``
    n = codes.size
    first, last = part_blocks(part, parts, absmax.size)
    for b in range(first, last):
        start, end = block_range(b, block_size, n)
        # four blocks ahead: 10-15% faster than without at 16M values (same-run A/B)
        prefetch(codes, start + uint64(4 * block_size), block_size)
        dequantize_run(address(codes), start, end, address(lut), absmax[b],
                       address(out) + 4 * np.int64(start))
