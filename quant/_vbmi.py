"""The AVX-512 VBMI accelerator of the CPU kernels, all of it: detection, the switch, the
tables and their byte layout, and the two LLVM-level operations that use byte permutes.

Why: a gathered table load costs about a cycle per element on Zen 4, more than the rest of a
quantize loop. AVX-512 VBMI's two-table byte permute (vpermi2b) looks up 64 bytes at once in a
128-byte table held in registers, so where the CPU has it
  * :func:`decode64_ir` reads 64 codebook values by permuting the codebook's four byte planes,
    and
  * :func:`encode64_ir` finds the nearest codes of 64 values by a three-level byte search.
Everything else (and every CPU without VBMI) takes the portable path; the block intrinsics of
``_intrinsics`` (``encode_block``, ``decode_run``) emit these bodies where :func:`tables` gave
the kernel tables, and only the portable loop where it gave ``None``. Measurements are in
docs/cpu-kernels.md.

The switch: ``EIGHTBIT_CPU_PATH=auto`` (default: VBMI where the CPU numba compiles for has it),
``portable`` (never), ``vbmi`` (an error where it is not available).
"""

from __future__ import annotations

import functools
import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._intrinsics import _function, _indices, _ptr, _splat, compiled_features, raise_positive

PATH_ENV = "EIGHTBIT_CPU_PATH"
_PATHS = ("auto", "portable", "vbmi")
_NEEDED = ("avx512f", "avx512bw", "avx512vbmi")


@functools.cache
def compiled_with_vbmi() -> bool:
    """Whether the code numba generates in this process may use AVX-512 VBMI."""
    return all(f in compiled_features() for f in _NEEDED)


def path_choice() -> str:
    """The value of ``EIGHTBIT_CPU_PATH`` (a ValueError names the accepted ones)."""
    choice = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if choice not in _PATHS:
        raise ValueError(f"{PATH_ENV}={os.environ[PATH_ENV]!r} is not one of {', '.join(_PATHS)}")
    if choice == "vbmi" and not compiled_with_vbmi():
        raise ValueError(f"{PATH_ENV}=vbmi but this CPU (as numba compiles for it) has no "
                         "AVX-512 VBMI; unset the variable or use 'portable'")
    return choice


def in_use() -> bool:
    """Whether the kernels use the VBMI path now (per call: tests switch it)."""
    return path_choice() != "portable" and compiled_with_vbmi()


def describe() -> str:
    """The path, in words, for ``python -m eightbit``."""
    if in_use():
        return "AVX-512 VBMI byte permutes"
    why = f"{PATH_ENV}=portable" if compiled_with_vbmi() else "no AVX-512 VBMI"
    return f"portable table lookups ({why})"


# -- The tables ---------------------------------------------------------------------------

# Bytes of one codebook's tables: the four byte planes, and the search table (search_table).
PLANES_BYTES, SEARCH_BYTES = 1024, 1536


def tables(codebook: np.ndarray, mids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(planes, search)`` of a float32 codebook and its sorted midpoints; ``None`` where the
    VBMI path is off (:func:`in_use`) or, for ``search``, the thresholds do not fit it. A kernel
    given ``None`` is compiled without that VBMI loop (``_intrinsics.encode_block`` and
    ``decode_run``).

    ``planes``: the codebook's four byte planes (1,024 bytes: byte k of value c at ``256 k + c``).
    ``search``: the three-level search table of :func:`encode64` (:func:`search_table`).
    """
    if not in_use():
        return None, None
    return _cached_tables(codebook.tobytes(), mids.tobytes())


@functools.lru_cache(maxsize=16)
def _cached_tables(codebook_bytes: bytes, mids_bytes: bytes):
    from ._native import aligned  # (64-byte vector loads of both tables)

    codebook = np.frombuffer(codebook_bytes, np.float32)
    planes = aligned(codebook.view(np.uint8).reshape(256, 4).T.reshape(-1))
    search = search_table(np.frombuffer(mids_bytes, np.float32))
    assert planes.size == PLANES_BYTES and (search is None or search.size == SEARCH_BYTES)
    return planes, None if search is None else aligned(search)


def _order_keys(values: np.ndarray) -> np.ndarray:
    """The order-preserving uint32 keys of fp32 values: ``a < b`` exactly when ``key(a) <
    key(b)`` (the sign bit flipped for positive values, every bit for negative ones)."""
    u = values.astype(np.float32).view(np.uint32)
    return np.where(u >> np.uint32(31) == 1, ~u, u | np.uint32(0x80000000)).astype(np.uint32)


def search_table(mids: np.ndarray) -> np.ndarray | None:
    """The register-search table of :func:`encode64_ir` for sorted fp32 thresholds, or
    ``None`` when they do not fit it.

    1,536 bytes. Per row (the sign and octave of y: bits 23..31 of its key; the 128 octaves
    from 2**-62 to 1 of each sign, in the order encode64 reads them (:data:`SEARCH_ROWS`), the
    smaller octaves sharing the row of 2**-62): a control byte (bits 0-2: 7 minus the mantissa
    bits r that split the row into cells holding at most one threshold; bit 6: the row holds no
    threshold; bit 7: the row's cells are 256..511) and the row's first cell (mod 256). Per
    cell (512), the index j of the threshold the value is compared with: the one inside the
    cell, else the row's next one, else (the cells past the row's last threshold) that last
    one, so that the compare never leaves the row; the code is ``j + (y > threshold j)``, and
    in a row without thresholds j is the count below the row and the compare is skipped. Then
    the three low byte planes of the thresholds' keys (256 slots): within a row the top byte
    is the same for every key. Rows without a threshold take one cell, shared by neighbours
    with the same count. A row needing more than 7 bits, more than 512 cells, a threshold at
    zero (whose two keys, +0 and -0, would split equal values) or one below 2**-62 in
    magnitude (inside the shared row) make it ``None``.
    """
    keys = _order_keys(mids)
    if (keys.size > 255 or np.any(np.abs(mids) < np.float32(2.0**-62))
            or np.any(np.diff(keys.astype(np.int64)) <= 0)):
        return None
    control, first = np.zeros(256, np.uint8), np.zeros(256, np.uint8)
    compare_with = np.zeros(512, np.uint8)
    rows = keys >> np.uint32(23)
    used, shared = 0, (None, 0)  # cells used; (count, cell) of the last row without thresholds
    for row in list(range(128, 256)) + list(range(128)):  # negative rows have the smaller keys
        whole = row + 0x100 if row < 128 else row  # bits 23..31 of the row's keys
        lowest = np.uint32(whole << 23)
        inside, below = keys[rows == whole], int(np.searchsorted(keys, lowest))
        if inside.size == 0 and shared[0] == below:
            cell, bits = shared[1], 0
        else:
            bits = next((r for r in range(8) if np.bincount(
                (inside >> np.uint32(23 - r)) & np.uint32((1 << r) - 1), minlength=1).max() <= 1),
                None)
            if bits is None:
                return None
            n = 1 << bits
            if used % 256 + n > 256:  # a row's cells stay within one half of the 512
                used = -(-used // 256) * 256
            cell, used = used, used + n
            if used > 512:
                return None
            starts = lowest + (np.arange(n, dtype=np.uint32) << np.uint32(23 - bits))
            j = np.searchsorted(keys, starts)  # the thresholds below each cell
            if inside.size:  # past the row's last threshold: compare with that one
                j = np.where(starts > inside[-1], j - 1, j)
            compare_with[cell : cell + n] = j
        shared = (below, cell) if inside.size == 0 else (None, 0)
        empty = 0x40 if inside.size == 0 else 0
        control[row], first[row] = (7 - bits) | empty | ((cell >> 8) << 7), cell & 0xFF
    planes = np.zeros((3, 256), np.uint8)  # slots past the last threshold: never compared
    for k in range(3):
        planes[k, : keys.size] = keys >> np.uint32(8 * k)
    return np.concatenate([control[SEARCH_ROWS], first[SEARCH_ROWS], compare_with,
                           planes.reshape(-1)])


# The rows in the order encode64 reads them: it clamps the row R to 64..191 (R < 64 and
# R > 191 are the octaves below 2**-62 of either sign) and looks up its low 7 bits, so
# position p holds row 128 + p (negative octaves) for p < 64 and row p (positive) after.
SEARCH_ROWS = np.r_[128:192, 64:128]


# Byte offsets in the search table (:func:`search_table`).
SEARCH_CONTROL, SEARCH_FIRST, SEARCH_COMPARE, SEARCH_KEYS = 0, 128, 256, 768

# -- LLVM IR -------------------------------------------------------------------------------
#
# Dequantizing: each byte plane is read for 64 codes by two permutes and a select on the code's
# top bit; unpacking the four planes byte-by-word and then word-by-dword reassembles the values.
# The unpacks interleave within 128-bit lanes, so the codes are first permuted in 4-byte groups
# (_LANE_ORDER) so that the values come out in order.
#
# Encoding: the nearest code of y is the number of thresholds below y. With the
# order-preserving integer key K of a float (the sign bit flipped for y >= 0, every bit for
# y < 0), the search is three byte lookups deep, 64 values at once:
#   row  R = (K >> 23) & 0xFF, the sign and octave of y, clamped to 64..191;
#   cell g = first[R] + (the top r[R] mantissa bits of K), r[R] the fewest bits that put at
#        most one threshold in each cell of the row;
#   j    = the threshold of the row that settles the cell, and code = j + (K > key[j]),
#        compared on three byte planes (within a row the keys' top bytes are equal); in a row
#        without thresholds j is the code and the compare is masked off.
# tests/quant/test_native.py checks it against np.searchsorted on every fp32 value in [-1, 1].

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_PERMUTE = "llvm.x86.avx512.vpermi2var.qi.512"
_MULTISHIFT = "llvm.x86.avx512.pmultishift.qb.512"
_SHUFFLE_BYTES = "llvm.x86.avx512.pshuf.b.512"


def _vector(element, n):
    return ir.VectorType(element, n)


def _unpack(per_lane, high):
    """Shuffle indices of vpunpckl*/vpunpckh* on 512-bit vectors of ``per_lane`` elements per
    128-bit lane: the low (or high) halves of each lane of two vectors, interleaved."""
    n, half, order = 4 * per_lane, per_lane // 2, []
    for lane in range(4):
        for i in range(half):
            source = lane * per_lane + i + (half if high else 0)
            order += [source, n + source]
    return order


# codes[16 * lane + 4 * k + r] <- codes[16 * k + 4 * lane + r]: after the two unpack rounds,
# vector k holds lane-by-lane the values 16 * k + 4 * lane + r, that is 16k .. 16k + 15 in order.
_LANE_ORDER = [16 * k + 4 * lane + r for lane in range(4) for k in range(4) for r in range(4)]


def _const_bytes(values):
    return ir.Constant(_vector(_I8, len(values)), [ir.Constant(_I8, v & 0xFF) for v in values])


def _lut128(builder, index, tables):
    """``tables[index & 127]`` for 64 byte indices: two 64-byte vectors, one vpermi2b."""
    v64 = _vector(_I8, 64)
    permute = _function(builder, _PERMUTE, v64, [v64, v64, v64])
    return builder.call(permute, [tables[0], index, tables[1]])


def _lut256(builder, index, tables):
    """``tables[index]`` for 64 byte indices: ``tables`` are four 64-byte vectors (256 bytes);
    vpermi2b reads the low 7 bits of each index, so 0..127 and 128..255 are two permutes."""
    low, high = _lut128(builder, index, tables[:2]), _lut128(builder, index, tables[2:])
    upper = builder.icmp_signed("<", index, _const_bytes([0] * 64))
    return builder.select(upper, high, low)


def _lookup_vbmi(builder, codes_ptr, planes_ptr):
    """The four ``<16 x float>`` codebook values of 64 codes, by byte-plane permutes."""
    v64 = _vector(_I8, 64)
    codes = builder.load(builder.bitcast(codes_ptr, v64.as_pointer()), align=1)
    codes = builder.shuffle_vector(codes, ir.Constant(v64, ir.Undefined), _indices(_LANE_ORDER))
    quarters = builder.bitcast(planes_ptr, v64.as_pointer())
    planes = []
    for k in range(4):
        q = [builder.load(builder.gep(quarters, [ir.Constant(_I32, 4 * k + j)]), align=1)
             for j in range(4)]
        planes.append(_lut256(builder, codes, q))
    def interleave(a, b, per_lane, high, as_type):
        return builder.bitcast(builder.shuffle_vector(a, b, _indices(_unpack(per_lane, high))),
                               as_type)

    # bytes of planes 0 and 1 (2 and 3) to words, then words of both pairs to fp32 values
    words = {(pair, high): interleave(planes[2 * pair], planes[2 * pair + 1], 16, high,
                                      _vector(_I16, 32))
             for pair in (0, 1) for high in (False, True)}
    return [interleave(words[0, high_b], words[1, high_b], 8, high_w, _vector(_F32, 16))
            for high_b in (False, True) for high_w in (False, True)]


def _search_vbmi(builder, values, search_ptr):
    """The 64 codes (a ``<64 x i8>``) of four ``<16 x i32>`` fp32 bit patterns (|y| <= 1)."""
    v64 = _vector(_I8, 64)
    quarters = builder.bitcast(search_ptr, v64.as_pointer())

    def table(offset, n):
        return [builder.load(builder.gep(quarters, [ir.Constant(_I32, offset // 64 + j)]),
                             align=1) for j in range(n)]

    def splat(byte):
        return _const_bytes([byte] * 64)

    as_bytes = [builder.bitcast(u, v64) for u in values]
    # byte planes of the values, in value order: pairs of vectors first, then the halves
    def planes(high, low):
        pick = [4 * j + high for j in range(32)] + [4 * j + low for j in range(32)]
        ab = builder.shuffle_vector(as_bytes[0], as_bytes[1], _indices(pick))
        cd = builder.shuffle_vector(as_bytes[2], as_bytes[3], _indices(pick))
        first = builder.shuffle_vector(ab, cd, _indices(list(range(32)) + list(range(64, 96))))
        second = builder.shuffle_vector(ab, cd,
                                        _indices(list(range(32, 64)) + list(range(96, 128))))
        return first, second

    y3, y2 = planes(3, 2)
    y1, y0 = planes(1, 0)
    # the key's byte planes: every bit flipped where y < 0, else the sign bit
    negative = builder.icmp_signed("<", y3, splat(0))
    k3 = builder.select(negative, builder.xor(y3, splat(0xFF)), builder.xor(y3, splat(0x80)))
    k2, k1, k0 = (builder.select(negative, builder.xor(y, splat(0xFF)), y) for y in (y2, y1, y0))
    # R = (K >> 23) & 0xFF = 2 * K3 + (top bit of K2), clamped to 64..191
    row = builder.add(builder.add(k3, k3),
                      builder.zext(builder.icmp_signed("<", k2, splat(0)), v64))
    row = builder.select(builder.icmp_unsigned("<", row, splat(191)), row, splat(191))
    row = builder.select(builder.icmp_unsigned(">", row, splat(64)), row, splat(64))
    control = _lut128(builder, row, table(SEARCH_CONTROL, 2))
    first = _lut128(builder, row, table(SEARCH_FIRST, 2))
    shift = builder.and_(control, splat(7))
    # vpmultishiftqb: byte p takes 8 bits of its quadword from bit 8 * (p % 8) + shift
    multishift = _function(builder, _MULTISHIFT, v64, [v64, v64])
    starts = builder.add(shift, _const_bytes([8 * (p % 8) for p in range(64)]))
    field = builder.call(multishift, [starts, k2])
    masks = _const_bytes(([(1 << (7 - s)) - 1 for s in range(8)] + [0] * 8) * 4)
    shuffle = _function(builder, _SHUFFLE_BYTES, v64, [v64, v64])
    cell = builder.add(first, builder.and_(field, builder.call(shuffle, [masks, shift])))
    compare_with = table(SEARCH_COMPARE, 8)
    upper_half = builder.icmp_signed("<", control, splat(0))  # the row's cells are 256..511
    j = builder.select(upper_half, _lut256(builder, cell, compare_with[4:]),
                       _lut256(builder, cell, compare_with[:4]))
    key = [_lut256(builder, j, table(SEARCH_KEYS + 256 * k, 4)) for k in range(3)]
    above = builder.icmp_unsigned(">", k0, key[0])
    for mine, theirs in ((k1, key[1]), (k2, key[2])):
        above = builder.or_(builder.icmp_unsigned(">", mine, theirs),
                            builder.and_(builder.icmp_unsigned("==", mine, theirs), above))
    has_thresholds = builder.icmp_unsigned("==", builder.and_(control, splat(0x40)), splat(0))
    return builder.add(j, builder.zext(builder.and_(has_thresholds, above), v64))




def _is_address(*values) -> bool:
    return all(isinstance(v, types.Integer) for v in values)


def decode64_ir(builder, codes, planes, scale, out):
    """Emit ``out[k] = codebook[codes[k]] * scale`` for ``k < 64`` (IR values: the addresses
    ``codes`` (uint8), ``planes`` (:func:`tables`) and ``out`` (fp32), and the fp32 ``scale``);
    nothing where the code is not compiled with VBMI (its callers never run it there)."""
    if not compiled_with_vbmi():
        return
    vectors = _lookup_vbmi(builder, _ptr(builder, codes, _I8), _ptr(builder, planes, _I8))
    out_ptr = _ptr(builder, out, _F32)
    scale16 = _splat(builder, scale, 16)
    for j, v in enumerate(vectors):
        at = builder.gep(out_ptr, [ir.Constant(_I32, 16 * j)])
        builder.store(builder.fmul(v, scale16),
                      builder.bitcast(at, _vector(_F32, 16).as_pointer()), align=4)


def encode64_ir(builder, values, scale, search, codes, floor):
    """Emit ``codes[k]`` = the nearest code of ``values[k] / scale`` for ``k < 64``, raised to
    at least ``floor`` where ``values[k] > 0`` (:func:`~._intrinsics.raise_positive`); IR values:
    the addresses ``values`` (fp32, ``|values| <= scale``), ``search`` (:func:`tables`) and
    ``codes`` (uint8), the fp32 ``scale`` and the integer ``floor``. Nothing where the code is
    not compiled with VBMI, as :func:`decode64_ir`."""
    if not compiled_with_vbmi():
        return
    x_ptr = _ptr(builder, values, _F32)
    scale16 = _splat(builder, scale, 16)
    words = []
    for k in range(4):
        at = builder.bitcast(builder.gep(x_ptr, [ir.Constant(_I32, 16 * k)]),
                             _vector(_F32, 16).as_pointer())
        y = builder.fdiv(builder.load(at, align=4), scale16)
        words.append(builder.bitcast(y, _vector(_I32, 16)))
    result = _search_vbmi(builder, words, _ptr(builder, search, _I8))
    result = raise_positive(builder, result, words, floor)
    builder.store(result, _ptr(builder, codes, _vector(_I8, 64)), align=1)


@intrinsic
def encode64(typingctx, values, scale, search, codes, floor):
    """:func:`encode64_ir` as a numba function (addresses, an fp32 ``scale``, an integer
    ``floor``), for the tests that sweep the search on its own; the kernels emit
    :func:`encode64_ir` through ``_intrinsics.encode_block``."""
    if not (_is_address(values, search, codes) and scale == types.float32
            and isinstance(floor, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        encode64_ir(builder, *args)
        return context.get_dummy_value()

    return types.void(values, scale, search, codes, floor), codegen
