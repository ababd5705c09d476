"""LLVM-level building blocks of the fused CPU kernels, as numba intrinsics: bit casts, fused
multiply-add, 32-bit integer helpers (numba widens integer arithmetic to 64 bits), raw-memory
array views, :func:`dequantize_run`, which dequantizes 64 codes at a time without gathers where
the CPU has AVX-512 VBMI, and :func:`encode64`, which finds the nearest codes of 64 values the
same way.

An intrinsic emits its IR straight into the calling kernel, so it costs no numba compile of its
own and LLVM sees plain instructions. Used by :mod:`eightbit.quant._numba` and
:mod:`eightbit.functional._numba` only; their cache directory hashes this file too.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of an fp32 value as uint32 (a bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, u):
    """The fp32 value of the low 32 bits of an integer (a bitcast)."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if u.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif u.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` with one rounding (fp32), as torch's CPU kernels compute lerp, addcmul and
    ``add(..., alpha=)``."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def abs_bits(typingctx, f):
    """``|f|`` as uint32 bits: integer order equals float order, and NaN is above inf.

    An intrinsic, as is :func:`umax`: numba widens uint32 arithmetic to 64 bits, and a 64-bit
    running max halves the width of the vectorized loops that keep one.
    """
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.and_(bits, ir.Constant(ir.IntType(32), 0x7FFFFFFF))

    return types.uint32(types.float32), codegen


@intrinsic
def umax(typingctx, a, b):
    """``max(a, b)`` of two uint32 values, in 32-bit arithmetic."""
    if not (a == b == types.uint32):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.icmp_unsigned(">", args[0], args[1]), args[0], args[1])

    return types.uint32(types.uint32, types.uint32), codegen


@intrinsic
def carry_code(typingctx, entry, low):
    """``uint8((entry + low) >> 16)`` in 32-bit arithmetic (numba would widen the add to 64
    bits, and the vectorized loop would spend four conversions per vector on it)."""
    if not (isinstance(entry, types.Integer) and isinstance(low, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        a, b = (builder.trunc(v, i32) if v.type.width > 32 else builder.zext(v, i32)
                if v.type.width < 32 else v for v in args)
        total = builder.add(a, b)
        return builder.trunc(builder.lshr(total, ir.Constant(i32, 16)), ir.IntType(8))

    return types.uint8(entry, low), codegen


# -- Dequantizing 64 codes at a time without gathers ----------------------------------------
#
# A gathered load costs about a cycle per element on Zen 4, while AVX-512 VBMI's two-table byte
# permute (vpermi2b) looks up 64 bytes at once in a 128-byte table held in registers. So the
# codebook is also stored as four byte planes (byte k of every value: ``lut`` in
# ``_native.code_table``): each plane is read for 64 codes by two permutes and a select on the
# code's top bit, and unpacking the four planes byte-by-word and then word-by-dword reassembles
# the values. The unpacks interleave within 128-bit lanes, so the codes are first permuted in
# 4-byte groups (_LANE_ORDER) so that the values come out in order. Measured on this project's
# benchmark machine: an 8-bit Adam step 27% faster than with gathers.

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_PERMUTE = "llvm.x86.avx512.vpermi2var.qi.512"


def _vector(element, n):
    return ir.VectorType(element, n)


def _indices(values):
    return ir.Constant(_vector(_I32, len(values)), [ir.Constant(_I32, v) for v in values])


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


def has_vbmi(context) -> bool:
    """Whether the code numba generates here may use AVX-512 VBMI byte permutes.

    Read from the target machine numba compiles for (host CPU, or NUMBA_CPU_NAME /
    NUMBA_CPU_FEATURES), which is also part of the key of numba's on-disk cache.
    """
    features = getattr(context.codegen(), "_tm_features", "").split(",")
    return all(f"+{f}" in features for f in ("avx512f", "avx512bw", "avx512vbmi"))


def host_has_vbmi() -> bool:
    """:func:`has_vbmi` for the CPU numba compiles the kernels for in this process."""
    from numba.core.registry import cpu_target

    return has_vbmi(cpu_target.target_context)


def lookup_method() -> str:
    """How :func:`dequantize_run` and :func:`encode64` read their tables on this machine, in words
    (without VBMI: the codebook by scalar loads, the nearest-code table by gathers)."""
    return "AVX-512 VBMI byte permutes" if host_has_vbmi() else "scalar loads (no AVX-512 VBMI)"


def _splat(builder, value, n):
    undef = ir.Constant(_vector(value.type, n), ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, _indices([0] * n))


def _function(builder, name, ret, args):
    module = builder.module
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name)


def _const_bytes(values):
    return ir.Constant(_vector(_I8, len(values)), [ir.Constant(_I8, v & 0xFF) for v in values])


def _const_words(value, n=16):
    """A ``<n x i32>`` constant with every element ``value``."""
    return ir.Constant(_vector(_I32, n), [ir.Constant(_I32, value)] * n)


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


def _lookup_scalar(builder, codes_ptr, codebook_ptr):
    """The same four vectors by 64 scalar loads (CPUs without VBMI; LLVM may form gathers)."""
    vectors = []
    for k in range(4):
        v = ir.Constant(_vector(_F32, 16), ir.Undefined)
        for j in range(16):
            code = builder.load(builder.gep(codes_ptr, [ir.Constant(_I32, 16 * k + j)]))
            value = builder.load(builder.gep(codebook_ptr, [builder.zext(code, _I32)]))
            v = builder.insert_element(v, value, ir.Constant(_I32, j))
        vectors.append(v)
    return vectors


def _address(builder, value, element):
    """An integer address as a pointer to ``element``."""
    i64 = ir.IntType(64)
    if value.type.width < 64:
        value = builder.zext(value, i64)
    return builder.inttoptr(value, element.as_pointer())


def _as_i64(builder, value):
    """An unsigned integer index widened to 64 bits (kernels use uint64 indices)."""
    i64 = ir.IntType(64)
    return builder.zext(value, i64) if value.type.width < 64 else value


@intrinsic
def dequantize_run(typingctx, codes, start, end, lut, scale, out):
    """``out[i - start] = lut[codes[i]] * scale`` for ``start <= i < end``, where ``codes``
    (uint8), ``lut`` (``_native.code_table(...).lut``) and ``out`` (fp32) are addresses
    (integers): 64 codes at a time by byte-plane permutes (or by 64 scalar loads without VBMI),
    the rest (a ragged last block) one by one. The caller keeps every index in bounds.

    An intrinsic that emits the loops into the calling kernel: called as a numba helper it made
    an Adam8bit step 8-12% slower (a call per state and block, same-run A/Bs), and inlined by
    numba (``inline="always"``) it added 0.1 s to the first compile of Adam8bit's kernel.
    """
    if not (all(isinstance(a, types.Integer) for a in (codes, start, end, lut, out))
            and scale == types.float32):
        return None

    def codegen(context, builder, sig, args):
        codes_v, start_v, end_v, lut_v, scale_v, out_v = args
        start_v, end_v = _as_i64(builder, start_v), _as_i64(builder, end_v)
        codes_ptr = builder.gep(_address(builder, codes_v, _I8), [start_v])
        table = _address(builder, lut_v, _F32)
        out_ptr = _address(builder, out_v, _F32)
        i64 = ir.IntType(64)
        count = builder.sub(end_v, start_v)
        full = builder.and_(count, ir.Constant(i64, ~63 & (2**64 - 1)))
        scale16 = _splat(builder, scale_v, 16)
        with cgutils.for_range_slice(builder, ir.Constant(i64, 0), full,
                                     ir.Constant(i64, 64)) as (k, _):
            chunk = builder.gep(codes_ptr, [k])
            if has_vbmi(context):
                vectors = _lookup_vbmi(builder, chunk,
                                       builder.gep(table, [ir.Constant(_I32, 256)]))
            else:
                vectors = _lookup_scalar(builder, chunk, table)
            target = builder.gep(out_ptr, [k])
            for j, v in enumerate(vectors):
                at = builder.gep(target, [ir.Constant(_I32, 16 * j)])
                builder.store(builder.fmul(v, scale16),
                              builder.bitcast(at, _vector(_F32, 16).as_pointer()), align=4)
        with cgutils.for_range_slice(builder, full, count, ir.Constant(i64, 1)) as (k, _):
            code = builder.zext(builder.load(builder.gep(codes_ptr, [k])), i64)
            value = builder.load(builder.gep(table, [code]))
            builder.store(builder.fmul(value, scale_v), builder.gep(out_ptr, [k]))
        return context.get_dummy_value()

    return types.void(codes, start, end, lut, scale, out), codegen


@intrinsic
def prefetch(typingctx, x, start, count):
    """Ask for the cache lines of ``x[start : start + count]`` (a hint: nothing faults, past
    the end of ``x`` included).

    With the hardware prefetcher alone the kernels waited on memory at 16M values on this
    project's 2-core benchmark machine: asking 512 values ahead made quantize 7-23% faster, and
    four blocks ahead made dequantize 10-15% faster (same-run A/B). The optimizer kernels do
    not use it: asking for the block after next first measured 10-12% faster, but later
    same-run A/Bs measured Adam8bit and Lion8bit steps 10-15% slower with it (RMSprop8bit
    2-6%), in L2 as well, and at 16M even one line per stream per block was slower.
    An intrinsic, so that it costs no numba compile of its own (a helper cost 0.04 s per
    array type on first use).
    """
    if not (isinstance(x, types.Array) and isinstance(start, types.Integer)
            and isinstance(count, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        x_a, start_v, count_v = args
        i8p, i64 = ir.IntType(8).as_pointer(), ir.IntType(64)
        fetch = _function(builder, "llvm.prefetch.p0", ir.VoidType(), [i8p, _I32, _I32, _I32])
        data = context.make_array(sig.args[0])(context, builder, x_a).data
        base = builder.bitcast(builder.gep(data, [start_v]), i8p)
        itemsize = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        size = builder.mul(builder.zext(count_v, i64) if count_v.type.width < 64 else count_v,
                           ir.Constant(i64, itemsize))
        with cgutils.for_range_slice(builder, ir.Constant(i64, 0), size,
                                     ir.Constant(i64, 64)) as (offset, _):
            # read, keep in all cache levels, data
            builder.call(fetch, [builder.gep(base, [offset]), ir.Constant(_I32, 0),
                                 ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(x, start, count), codegen


@intrinsic
def view(typingctx, address, size, like):
    """The 1-D array of ``size`` elements at integer ``address``, of ``like``'s dtype (an array)
    or of ``like`` itself (a numpy scalar type such as ``np.uint8``), for kernels that take many
    tensors as a table of addresses. The caller keeps the memory alive.

    The array is built directly (data pointer, shape, strides, no owner), as ``numba.carray``
    builds one from a typed pointer.
    """
    if isinstance(like, types.Array):
        dtype = like.dtype
    elif isinstance(like, types.NumberClass):
        dtype = like.instance_type
    else:
        return None
    if not (isinstance(address, types.Integer) and isinstance(size, types.Integer)):
        return None
    array_type = types.Array(dtype, 1, "C")

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)
        array = context.make_array(array_type)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(dtype)))
        populate_array(
            array,
            data=builder.inttoptr(args[0], context.get_value_type(types.CPointer(dtype))),
            shape=cgutils.pack_array(builder, [builder.sext(args[1], intp)
                                               if args[1].type.width < 64 else args[1]]),
            strides=cgutils.pack_array(builder, [itemsize]),
            itemsize=itemsize,
            meminfo=None,
        )
        return array._getvalue()

    return array_type(address, size, like), codegen


# -- Encoding 64 values at a time without gathers ------------------------------------------
#
# The nearest code of y is the number of thresholds (codebook midpoints) below y. With the
# order-preserving integer key of a float (the sign bit flipped for y >= 0, every bit for y < 0:
# K < K' exactly when y < y'), the search is three byte lookups deep, each a 128-, 256- or
# 512-entry table held as byte planes and read by vpermi2b, 64 values at once:
#   row  R = (K >> 23) & 0xFF, the sign and octave of y, clamped to 64..191 (the octaves below
#        2**-62 share one row per sign; ``_native.SEARCH_ROWS``), so its tables have 128 entries;
#   cell g = first[R] + (the top r[R] mantissa bits of K), where r[R] is the fewest bits that
#        put at most one threshold in each cell of the row (``_native.search_tables``);
#   j    = the threshold of the cell's row that settles it (the one inside the cell, else the
#        row's next one, else its last one), and code = j + (K > key[j]). Since threshold j is
#        in K's row, the keys' top bytes are equal and three byte planes compare them; in a
#        row without thresholds j is the code and the compare is masked off.
# The mantissa bits are cut out by vpmultishiftqb (a per-byte shift count) and a mask; the key
# of threshold j is read as three byte planes and compared byte by byte, most significant first.
# On Zen 4 (one thread, data in L2) the search takes 0.18 ns per value, the gathers it replaced
# 0.31 ns (and a first version that compared all four key bytes and read 256-row tables 0.22 ns);
# tests/quant/test_native.py checks it against the nearest-code table on every fp32 value with
# |y| <= 1, and against np.searchsorted on codebooks built to hit its edge cases.

# Byte offsets in the search table (``_native.search_tables``).
SEARCH_CONTROL, SEARCH_FIRST, SEARCH_COMPARE, SEARCH_KEYS = 0, 128, 256, 768
_MULTISHIFT = "llvm.x86.avx512.pmultishift.qb.512"
_SHUFFLE_BYTES = "llvm.x86.avx512.pshuf.b.512"


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


def _gather16(builder, table_ptr, index):
    """``table[index]`` for a ``<16 x i32>`` of indices (llvm.masked.gather)."""
    v16, i64 = _vector(_I32, 16), ir.IntType(64)
    v16p = _vector(table_ptr.type, 16)
    base = _splat(builder, builder.ptrtoint(table_ptr, i64), 16)
    offsets = builder.shl(builder.zext(index, _vector(i64, 16)),
                          ir.Constant(_vector(i64, 16), [ir.Constant(i64, 2)] * 16))
    pointers = builder.inttoptr(builder.add(base, offsets), v16p)
    mask = _vector(ir.IntType(1), 16)
    gather = _function(builder, "llvm.masked.gather.v16i32.v16p0", v16,
                       [v16p, _I32, mask, v16])
    return builder.call(gather, [pointers, ir.Constant(_I32, 4),
                                 ir.Constant(mask, [ir.Constant(ir.IntType(1), 1)] * 16),
                                 ir.Constant(v16, ir.Undefined)])


def _search_gather(builder, values, table_ptr):
    """The same codes by the nearest-code table (``_numba.nearest_code``), for CPUs without
    VBMI: entry = table[u >> 16], code = (entry + low 16 bits, flipped if negative) >> 16."""
    codes = []
    for u in values:
        index = builder.lshr(u, _const_words(16))
        sign = builder.ashr(u, _const_words(31))
        low = builder.and_(builder.xor(u, sign), _const_words(0xFFFF))
        entry = _gather16(builder, table_ptr, index)
        code = builder.lshr(builder.add(entry, low), _const_words(16))
        codes.append(builder.trunc(code, _vector(_I8, 16)))
    pairs = [builder.shuffle_vector(codes[2 * j], codes[2 * j + 1], _indices(range(32)))
             for j in (0, 1)]
    return builder.shuffle_vector(pairs[0], pairs[1], _indices(range(64)))


def _load_f32x16(builder, ptr, fmt, element):
    """16 values at ``ptr`` as ``<16 x float>``: fp32, or fp16/bf16 bits (``fmt`` 1 or 2)."""
    if element == types.float32:
        return builder.load(builder.bitcast(ptr, _vector(_F32, 16).as_pointer()), align=4)
    bits = builder.load(builder.bitcast(ptr, _vector(_I16, 16).as_pointer()), align=2)
    half = builder.fpext(builder.bitcast(bits, _vector(ir.HalfType(), 16)), _vector(_F32, 16))
    wide = builder.shl(builder.zext(bits, _vector(_I32, 16)), _const_words(16))
    brain = builder.bitcast(wide, _vector(_F32, 16))
    is_bf16 = builder.icmp_signed("==", fmt, ir.Constant(fmt.type, 2))
    return builder.select(is_bf16, brain, half)


@intrinsic
def encode64(typingctx, x, fmt, start, scale, table, search, codes, codes_start):
    """``codes[codes_start + k] = nearest_code(x[start + k] / scale, table)`` for ``k < 64``.

    ``x`` is fp32, or fp16/bf16 bits (``uint16``, format ``fmt``); ``table`` the nearest-code
    table and ``search`` the register-search table of the same codebook
    (``_native.code_table``). With AVX-512 VBMI the codes come from the three-level byte search
    above; without it, from four 16-wide gathers into ``table``. The caller keeps every index in
    bounds (no checks here).
    """
    if not (isinstance(x, types.Array) and x.dtype in (types.float32, types.uint16)
            and table.dtype == types.uint32 and search.dtype == codes.dtype == types.uint8
            and scale == types.float32 and isinstance(fmt, types.Integer)
            and isinstance(start, types.Integer) and isinstance(codes_start, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        x_a, fmt_v, start_v, scale_v, table_a, search_a, codes_a, codes_start_v = args
        x_ptr = builder.gep(context.make_array(sig.args[0])(context, builder, x_a).data,
                            [start_v])
        scale16 = _splat(builder, scale_v, 16)
        v16 = _vector(_I32, 16)
        values = []
        for k in range(4):
            ptr = builder.gep(x_ptr, [ir.Constant(_I32, 16 * k)])
            y = builder.fdiv(_load_f32x16(builder, ptr, fmt_v, sig.args[0].dtype), scale16)
            values.append(builder.bitcast(y, v16))
        if has_vbmi(context):
            search_ptr = context.make_array(sig.args[5])(context, builder, search_a).data
            result = _search_vbmi(builder, values, search_ptr)
        else:
            table_ptr = context.make_array(sig.args[4])(context, builder, table_a).data
            result = _search_gather(builder, values, table_ptr)
        out = builder.gep(context.make_array(sig.args[6])(context, builder, codes_a).data,
                          [codes_start_v])
        builder.store(result, builder.bitcast(out, _vector(_I8, 64).as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(x, fmt, start, scale, table, search, codes, codes_start), codegen
