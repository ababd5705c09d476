"""Numba intrinsics of the CPU kernels (numba's public extension API, ``@intrinsic``): bit
casts, fused multiply-add, 32-bit integer helpers, a typed pointer from an integer address, and
the two block intrinsics, :func:`encode_block` and :func:`decode_run`.

Why intrinsics: numba has no bit cast between float32 and uint32, no fma, and widens uint32
arithmetic to 64 bits, which halves the width of the vectorized loops that keep a running max.
An intrinsic emits its LLVM instructions straight into the calling kernel; for a block's encode
and decode that also spares each kernel the compile of a helper function of its own.
"""

from __future__ import annotations

import os
import sys

from llvmlite import binding, ir
from numba import types
from numba.extending import intrinsic

_I32 = ir.IntType(32)
# fp32 bit patterns: abs_bits at and above NONFINITE_BITS is inf or NaN; a block holding one
# gets the quiet NaN NAN_BITS as its absmax (as the torch path)
NONFINITE_BITS, NAN_BITS = 0x7F800000, 0x7FC00000


def _u32(builder, value):
    """An integer IR value as i32: truncated, zero-extended, or as it is."""
    width = value.type.width
    return builder.trunc(value, _I32) if width > 32 else builder.zext(value, _I32) \
        if width < 32 else value


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of an fp32 value as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, u):
    """The fp32 value of the low 32 bits of an integer."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(_u32(builder, args[0]), ir.FloatType())

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
    """``|f|`` as uint32 bits: integer order is float order, inf is 0x7F800000, NaN above."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        bits = builder.bitcast(args[0], _I32)
        return builder.and_(bits, ir.Constant(_I32, 0x7FFFFFFF))

    return types.uint32(types.float32), codegen


@intrinsic
def umax(typingctx, a, b):
    """``max(a, b)`` of two uint32 values, in 32-bit arithmetic."""
    if not (a == b == types.uint32):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.icmp_unsigned(">", args[0], args[1]), args[0], args[1])

    return types.uint32(types.uint32, types.uint32), codegen


# fp16 / bf16 bit patterns <-> fp32, in 32-bit integer IR. Why not LLVM's half and bfloat
# types: without F16C or AVX-512 BF16 LLVM lowers their conversions to libgcc calls
# (__extendhfsf2, __truncsfbf2) that older toolchains lack; and as numba functions these two
# were a third of a half-precision kernel's compile time. ``fmt`` is the format flag of
# ``_numba`` (2: bf16, else fp16), a runtime value: both conversions are computed, one selected.
_BF16 = 2


def _is_bf16(builder, fmt):
    return builder.icmp_unsigned("==", _u32(builder, fmt), ir.Constant(_I32, _BF16))


@intrinsic
def half_to_f32(typingctx, h, fmt):
    """fp16 or bf16 bits (the low 16 bits of ``h``) to fp32, exactly: subnormals, inf and NaN
    included."""
    if not (isinstance(h, types.Integer) and isinstance(fmt, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        def c(v):
            return ir.Constant(_I32, v)

        b = builder
        bits = b.and_(_u32(b, args[0]), c(0xFFFF))
        sign = b.shl(b.and_(bits, c(0x8000)), c(16))
        em = b.and_(bits, c(0x7FFF))
        shifted = b.shl(em, c(13))
        # fp16: exponent and mantissa moved into fp32 position, then rebiased by 2^112 with one
        # exact multiply (subnormals included); inf and NaN keep an all-ones exponent
        scaled = b.bitcast(b.fmul(b.bitcast(shifted, ir.FloatType()),
                                  ir.Constant(ir.FloatType(), 5.192296858534828e33)), _I32)
        special = b.or_(shifted, c(0x7F800000))
        f16 = b.or_(sign, b.select(b.icmp_unsigned(">=", em, c(0x7C00)), special, scaled))
        bf16 = b.shl(bits, c(16))
        return b.bitcast(b.select(_is_bf16(b, args[1]), bf16, f16), ir.FloatType())

    return types.float32(h, fmt), codegen


@intrinsic
def f32_to_half(typingctx, f, fmt):
    """fp32 to fp16 or bf16 bits (uint32), round to nearest even as torch converts; NaN gives
    torch's NaN (bf16 0x7FC0; fp16 0x7E00 with the sign), overflow gives inf."""
    if not (f == types.float32 and isinstance(fmt, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        def c(v):
            return ir.Constant(_I32, v)

        def rne(b, x, drop):  # x >> drop, rounded to nearest even
            odd = b.and_(b.lshr(x, c(drop)), c(1))
            return b.lshr(b.add(b.add(x, c((1 << (drop - 1)) - 1)), odd), c(drop))

        b = builder
        u = b.bitcast(args[0], _I32)
        a = b.and_(u, c(0x7FFFFFFF))
        nan = b.icmp_unsigned(">", a, c(0x7F800000))
        bf16 = b.select(nan, c(0x7FC0), rne(b, u, 16))
        # fp16 normal range: rebias the exponent (127 - 15 = 112), round 13 mantissa bits away
        normal = rne(b, b.sub(a, c(0x38000000)), 13)
        # fp16 subnormals: + 0.5 puts |f| on the fp32 grid of step 2^-24, and the FPU rounds
        half = b.fadd(b.bitcast(a, ir.FloatType()), ir.Constant(ir.FloatType(), 0.5))
        sub = b.sub(b.bitcast(half, _I32), c(0x3F000000))
        f16 = b.select(b.icmp_unsigned("<", a, c(0x38800000)), sub, normal)
        f16 = b.select(b.icmp_unsigned(">=", a, c(0x477FF000)), c(0x7C00), f16)
        f16 = b.select(nan, c(0x7E00), f16)
        f16 = b.or_(b.and_(b.lshr(u, c(16)), c(0x8000)), f16)
        return b.select(_is_bf16(b, args[1]), bf16, f16)

    return types.uint32(f, fmt), codegen


@intrinsic
def stochastic_bf16(typingctx, value, seed, i):
    """fp32 ``value`` rounded stochastically to bf16 bits (uint16): 16 random bits added below
    bf16's last bit, then truncated (as ``functional._chunked.stochastic_round_to_bf16``).
    The bits are a counter-based hash of ``(seed, i)``, SplitMix64's finalizer (Steele, Lea &
    Flood, OOPSLA 2014), so the result does not depend on how blocks are spread over threads."""
    if not (value == types.float32 and isinstance(seed, types.Integer)
            and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)

        def c(v):
            return ir.Constant(i64, v)

        def wide(v):
            return builder.zext(v, i64) if v.type.width < 64 else v

        b = builder
        z = b.add(wide(args[1]), b.mul(wide(args[2]), c(0x9E3779B97F4A7C15)))
        z = b.mul(b.xor(z, b.lshr(z, c(30))), c(0xBF58476D1CE4E5B9))
        z = b.mul(b.xor(z, b.lshr(z, c(27))), c(0x94D049BB133111EB))
        noise = b.trunc(b.and_(b.xor(z, b.lshr(z, c(31))), c(0xFFFF)), _I32)
        bits = b.add(b.bitcast(args[0], _I32), noise)
        return b.trunc(b.lshr(bits, ir.Constant(_I32, 16)), ir.IntType(16))

    return types.uint16(value, seed, i), codegen


@intrinsic
def offset(typingctx, address, n):
    """``address + n``, or ``None`` where ``address`` is ``None`` (a table that is off): the
    kernels pass a VBMI table's address this way, and a block helper given ``None`` is compiled
    without the VBMI loop (numba prunes ``if x is not None`` on an argument typed ``none``)."""
    if not isinstance(n, types.Integer):
        return None
    if isinstance(address, types.NoneType):
        return types.none(address, n), lambda context, builder, sig, args: \
            context.get_dummy_value()
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        wide = [builder.sext(a, i64) if a.type.width < 64 else a for a in args]
        return builder.add(*wide)

    return types.int64(address, n), codegen


@intrinsic
def pointer(typingctx, address, like):
    """A typed pointer to integer ``address`` of numpy scalar type ``like`` (``np.float32``...):
    ``pointer(at, np.float32)[i]`` reads and writes element ``i`` with no array to unbox or
    index (the optimizer kernel takes its tensors as a table of addresses)."""
    if not (isinstance(like, types.NumberClass) and isinstance(address, types.Integer)):
        return None
    ptr_type = types.CPointer(like.instance_type)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(address, like), codegen


# -- 16 lanes at a time, in target-independent LLVM vector IR ------------------------------
# A loop that stores codes while it gathers from a table is not vectorized by LLVM (a store
# might change the table); these spell the vector loop body out. llvm.masked.gather is lowered
# to the CPU's gather (AVX2, AVX-512) or to scalar loads (NEON) by LLVM itself.

_LANES = 16


def _vec(element):
    return ir.VectorType(element, _LANES)


def _indices(values):
    """A constant ``<n x i32>`` of ``values`` (shuffle masks)."""
    return ir.Constant(ir.VectorType(_I32, len(values)), [ir.Constant(_I32, v) for v in values])


def _splat(builder, value, n=_LANES):
    """``value`` in all ``n`` lanes of a vector."""
    undef = ir.Constant(ir.VectorType(value.type, n), ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, _indices([0] * n))


def _function(builder, name, ret, args):
    """The module's declaration of the LLVM intrinsic ``name``, added on first use."""
    module = builder.module
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name)


def _words(value):
    return ir.Constant(_vec(_I32), [ir.Constant(_I32, value)] * _LANES)


def _ptr(builder, address, element):
    """An integer address (IR value) as a pointer to ``element``."""
    i64 = ir.IntType(64)
    if address.type.width < 64:
        address = builder.zext(address, i64)
    return builder.inttoptr(address, element.as_pointer())


def _gather(builder, base, index):
    """``base[index]`` for 16 i32 indices (``base`` a pointer to i32 table entries).

    The addresses are one vector getelementptr of the scalar base with the 32-bit indices, the
    form LLVM turns into one gather with 32-bit indices (vpgatherdd: 16 lanes on AVX-512, 8 on
    AVX2); pointer arithmetic on 64-bit addresses became gathers with 64-bit indices, half as
    wide. llvmlite's builder types a GEP by walking scalar indices, so the vector result type is
    set here.
    """
    if _avx2_gathers():
        return _gather_avx2(builder, base, index)
    pointers = builder.gep(base, [index], source_etype=_I32)
    pointers.type = _vec(base.type)
    mask = ir.Constant(_vec(ir.IntType(1)), [ir.Constant(ir.IntType(1), 1)] * _LANES)
    vec_t = _vec(_I32)
    fn = _function(builder, "llvm.masked.gather.v16i32.v16p0", vec_t,
                   [pointers.type, _I32, mask.type, vec_t])
    return builder.call(fn, [pointers, ir.Constant(_I32, 4), mask,
                             ir.Constant(vec_t, ir.Undefined)])


def _avx2_gathers() -> bool:
    """Whether to spell gathers as AVX2's vpgatherdd: on AVX2 targets without AVX-512, where
    LLVM's cost model turns llvm.masked.gather into 16 scalar loads for most CPUs (znver*,
    haswell), which made the encode slower even on a Zen 3 (docs/cpu-kernels.md)."""
    features = compiled_features()
    return "avx2" in features and "avx512f" not in features


def _gather_avx2(builder, base, index):
    """``base[index]`` for 16 i32 indices as two 8-lane AVX2 gathers."""
    v8 = ir.VectorType(_I32, 8)
    i8p = ir.IntType(8).as_pointer()
    fn = _function(builder, "llvm.x86.avx2.gather.d.d.256", v8, [v8, i8p, v8, v8, ir.IntType(8)])
    ones = ir.Constant(v8, [ir.Constant(_I32, -1)] * 8)
    at = builder.bitcast(base, i8p)
    halves = []
    for h in range(2):
        idx = builder.shuffle_vector(index, index, _indices(range(8 * h, 8 * h + 8)))
        halves.append(builder.call(fn, [ir.Constant(v8, ir.Undefined), at, idx, ones,
                                        ir.Constant(ir.IntType(8), 4)]))
    return builder.shuffle_vector(halves[0], halves[1], _indices(range(16)))


def compiled_features() -> set[str]:
    """The CPU features numba compiles for: ``NUMBA_CPU_FEATURES`` if set; none known when
    ``NUMBA_CPU_NAME`` names another CPU; else the host's (llvmlite's public query)."""
    given = os.environ.get("NUMBA_CPU_FEATURES", "").strip()
    if given:
        return {f[1:] for f in given.split(",") if f.startswith("+")}
    if os.environ.get("NUMBA_CPU_NAME", "host").strip() not in ("", "host"):
        return set()
    return {name for name, on in binding.get_host_cpu_features().items() if on}


def raise_positive(builder, codes, words, floor):
    """``codes`` (``<16k x i8>``) raised to at least ``floor`` (an integer) where the fp32 bit
    patterns ``words`` (k ``<16 x i32>``, in code order) are above zero: issue 17's rule (b) for
    states on the unsigned map (``floor`` = code of zero + 1; 0 leaves every code as it is)."""
    positive = [builder.icmp_signed(">", w, _words(0)) for w in words]
    while len(positive) > 1:  # concatenated in order, 16 lanes -> 32 -> 64
        pairs = zip(positive[::2], positive[1::2], strict=True)
        positive = [builder.shuffle_vector(a, b, _indices(range(2 * a.type.count)))
                    for a, b in pairs]
    floor8 = builder.trunc(floor, ir.IntType(8)) if floor.type.width > 8 else floor
    splat = _splat(builder, floor8, codes.type.count)
    raised = builder.select(builder.icmp_unsigned(">", codes, splat), codes, splat)
    return builder.select(positive[0], raised, codes)


def _encode16(builder, values, scale, table, codes, floor):
    """Emit ``codes[k]`` = the nearest code of ``values[k] / scale`` for ``k < 16``, raised to
    at least ``floor`` where ``values[k] > 0`` (:func:`raise_positive`); IR values: the
    addresses ``values`` (fp32), ``table`` (uint32, ``_native.code_table``) and ``codes``
    (uint8), the fp32 ``scale`` and the integer ``floor``.

    The table's reading: the bits of y = value / scale above bit 16 pick a bin holding at most
    one threshold; inside a bin the order of fp32 values is the order of their low 16 bits
    (flipped for negative values: ``low``); the entry is (thresholds below the bin) << 16 plus
    0xFFFF minus the low bits of the threshold inside it, if any, so ``entry + low`` carries
    into bit 16 exactly when y is above that threshold: the code is ``(entry + low) >> 16``.
    """
    f32v, i8v = _vec(ir.FloatType()), _vec(ir.IntType(8))
    x = builder.load(_ptr(builder, values, f32v), align=4)
    u = builder.bitcast(builder.fdiv(x, _splat(builder, scale)), _vec(_I32))
    low = builder.and_(builder.xor(u, builder.ashr(u, _words(31))), _words(0xFFFF))
    entry = _gather(builder, _ptr(builder, table, _I32), builder.lshr(u, _words(16)))
    code = builder.trunc(builder.lshr(builder.add(entry, low), _words(16)), i8v)
    builder.store(raise_positive(builder, code, [u], floor), _ptr(builder, codes, i8v), align=1)


def _decode16(builder, codes, codebook, scale, out):
    """Emit ``out[k] = codebook[codes[k]] * scale`` for ``k < 16`` (IR values: the addresses
    ``codes`` (uint8), ``codebook`` (fp32) and ``out`` (fp32), the fp32 ``scale``).

    Not a gather: the codes are read as two 64-bit words, each code shifted out in a general
    register and its value read by one scalar load, then multiplied and stored as one vector.
    Why: loads and shifts are cheap on every core, while gathers are slow on AMD before Zen 4
    (half the speed of this on a Zen 3, docs/cpu-kernels.md), under Intel's GDS microcode
    mitigation, and absent on NEON.
    """
    b, i64, f32 = builder, ir.IntType(64), ir.FloatType()
    words, book = _ptr(b, codes, i64), _ptr(b, codebook, f32)
    values = ir.Constant(_vec(f32), ir.Undefined)
    for w in range(_LANES // 8):
        word = b.load(b.gep(words, [ir.Constant(i64, w)]), align=1)
        for k in range(8):
            shift = 8 * k if sys.byteorder == "little" else 8 * (7 - k)  # code w * 8 + k
            code = b.and_(b.lshr(word, ir.Constant(i64, shift)), ir.Constant(i64, 0xFF))
            values = b.insert_element(values, b.load(b.gep(book, [code])),
                                      ir.Constant(_I32, 8 * w + k))
    b.store(b.fmul(values, _splat(b, scale)), _ptr(b, out, _vec(f32)), align=4)


# -- Whole runs of a block, one intrinsic each ----------------------------------------------
# Why the loops are emitted here rather than written as numba functions: a numba function
# compiled on its own costs a first use its own pipeline, wrappers and a second LLVM pass in
# each kernel it is linked into (a decode helper was ~0.2-0.4 s of an optimizer's first use,
# docs/cpu-kernels.md); these loops are a few IR instructions in the calling kernel.


def _i64(builder, value, numba_type):
    """An integer IR value of ``numba_type`` widened to i64 (by its signedness)."""
    i64 = ir.IntType(64)
    if value.type.width >= 64:
        return value
    return builder.sext(value, i64) if numba_type.signed else builder.zext(value, i64)


def _loop(builder, count, step, body):
    """Emit ``for i in range(0, count - step + 1, step): body(i)`` (``count`` an i64 value,
    ``step`` a Python int): the whole steps of ``count``; returns how many elements they
    covered, ``count // step * step``."""
    i64 = ir.IntType(64)
    whole = builder.mul(builder.udiv(count, ir.Constant(i64, step)), ir.Constant(i64, step))
    before = builder.block
    head, work, done = (builder.append_basic_block(f"run.{name}")
                        for name in ("head", "body", "end"))
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(i64)
    i.add_incoming(ir.Constant(i64, 0), before)
    builder.cbranch(builder.icmp_unsigned("<", i, whole), work, done)
    builder.position_at_end(work)
    body(i)
    i.add_incoming(builder.add(i, ir.Constant(i64, step)), builder.block)
    builder.branch(head).set_metadata("llvm.loop", _not_unrolled(builder.module))
    builder.position_at_end(done)
    return whole


def _not_unrolled(module):
    """Loop metadata asking LLVM not to unroll a loop: the bodies are already 16 or 64 lanes
    wide, and unrolled they were emitted up to three times (a larger compile, no faster)."""
    # a loop's id is a node whose first operand is itself (LLVM LangRef, "llvm.loop")
    loop = module.add_metadata([ir.MetaDataString(module, f"loop{len(module.metadata)}")])
    loop.operands = (loop, module.add_metadata([
        ir.MetaDataString(module, "llvm.loop.unroll.disable")]))
    return loop


def _steps16(builder, start, count, source, source_size, target, target_size, body):
    """Emit ``body(source_at, target_at)`` over elements ``start .. count`` (i64 values), 16 at a
    time: the addresses of 16 elements of ``source_size`` and ``target_size`` bytes from the
    integer addresses ``source`` and ``target``. Where 16 does not divide what is left, the last
    step is the 16 elements ending at ``count``: it overlaps the step before (or the 64-lane
    loop's) and writes the same results again. Fewer than 16 elements in all are copied into a
    zeroed row on the stack and out again. Why: the body appears once in the kernel, and the
    loop is a plain counted loop but for one check when it ends (a tail of its own, scalar or
    masked, was a third of a block loop's code; a select of addresses in every step cost
    dequantize a tenth).
    """
    b, i64 = builder, ir.IntType(64)

    def c(v):
        return ir.Constant(i64, v)

    with b.goto_entry_block():  # (an alloca in the loop would grow the stack each block)
        rows = [b.alloca(ir.ArrayType(ir.IntType(8), 16 * size))
                for size in (source_size, target_size)]
    row_in, row_out = (b.ptrtoint(row, i64) for row in rows)
    small = b.icmp_unsigned("<", count, c(16))
    with b.if_then(small):
        _memset(b, row_in, 0, c(16 * source_size))
        _memcpy(b, row_in, source, b.mul(count, c(source_size)))
    source_v, target_v = b.select(small, row_in, source), b.select(small, row_out, target)
    last = b.sub(b.select(small, c(16), count), c(16))  # where the last step starts
    first = b.select(b.icmp_unsigned("<", start, last), start, last)
    before = b.block
    head, more, done = (b.append_basic_block(f"steps.{name}") for name in ("body", "more", "end"))
    b.cbranch(b.icmp_unsigned("<", start, count), head, done)
    b.position_at_end(head)
    i = b.phi(i64)
    body(_at(b, source_v, i, source_size), _at(b, target_v, i, target_size))
    step = b.add(i, c(16))
    whole = b.cbranch(b.icmp_unsigned("<=", step, last), head, more)
    b.position_at_end(more)  # the overlapping last step, if any
    part = b.cbranch(b.icmp_unsigned("<", step, b.add(last, c(16))), head, done)
    for branch in (whole, part):
        branch.set_metadata("llvm.loop", _not_unrolled(b.module))
    i.add_incoming(first, before)
    i.add_incoming(step, whole.parent)
    i.add_incoming(last, more)
    b.position_at_end(done)
    with b.if_then(small):
        _memcpy(b, target, row_out, b.mul(count, c(target_size)))


def _memcpy(builder, target, source, size):
    """Copy ``size`` bytes (an i64 value) from integer address ``source`` to ``target``."""
    i8, i64 = ir.IntType(8), ir.IntType(64)
    fn = _function(builder, "llvm.memcpy.p0.p0.i64", ir.VoidType(),
                   [i8.as_pointer(), i8.as_pointer(), i64, ir.IntType(1)])
    builder.call(fn, [_ptr(builder, target, i8), _ptr(builder, source, i8), size,
                      ir.Constant(ir.IntType(1), 0)])


def _memset(builder, target, byte, size):
    """Set ``size`` bytes (an i64 value) at integer address ``target`` to ``byte`` (an i8
    value or a Python int)."""
    i8, i64 = ir.IntType(8), ir.IntType(64)
    fn = _function(builder, "llvm.memset.p0.i64", ir.VoidType(),
                   [i8.as_pointer(), i8, i64, ir.IntType(1)])
    byte = ir.Constant(i8, byte) if isinstance(byte, int) else byte
    builder.call(fn, [_ptr(builder, target, i8), byte, size, ir.Constant(ir.IntType(1), 0)])


def _at(builder, base, i, size):
    """The address of element ``i`` (i64) of ``size``-byte elements from address ``base``."""
    return builder.add(base, builder.mul(i, ir.Constant(ir.IntType(64), size)))


def _vbmi_module():
    from . import _vbmi  # (imports this module: taken when a kernel is compiled, not before)

    return _vbmi


@intrinsic
def decode_run(typingctx, codes, n, codebook, planes, scale, out):
    """``out[k] = codebook[codes[k]] * scale`` for ``k < n``; ``codes`` (uint8), ``codebook``
    (fp32, 256 values) and ``out`` (fp32) are addresses.

    The path is chosen here, by the type of ``planes``: ``None`` compiles the portable loop, 16
    codes at a time by scalar loads (:func:`_decode16`); an address (the codebook's VBMI byte
    planes) compiles 64 at a time by byte permutes first (``_vbmi.decode64_ir``). The last
    ``n % 16`` codes go through the 16-lane body from a padded row (:func:`_steps16`).
    """
    if not (isinstance(codes, types.Integer) and isinstance(n, types.Integer)
            and isinstance(codebook, types.Integer) and isinstance(out, types.Integer)
            and isinstance(planes, (types.Integer, types.NoneType)) and scale == types.float32):
        return None
    vbmi = isinstance(planes, types.Integer)

    def codegen(context, builder, sig, args):
        codes_v, n_v, codebook_v, planes_v, scale_v, out_v = args
        b, i64 = builder, ir.IntType(64)
        n_v = _i64(b, n_v, n)
        done = ir.Constant(i64, 0)
        if vbmi:
            done = _loop(b, n_v, 64, lambda i: _vbmi_module().decode64_ir(
                b, _at(b, codes_v, i, 1), planes_v, scale_v, _at(b, out_v, i, 4)))
        _steps16(b, done, n_v, codes_v, 1, out_v, 4,
                 lambda codes_at, out_at: _decode16(b, codes_at, codebook_v, scale_v, out_at))
        return context.get_dummy_value()

    return types.void(codes, n, codebook, planes, scale, out), codegen




@intrinsic
def encode_block(typingctx, values, codes, n, mag, absmax, table, search, zero_code,
                 nonnegative):
    """Quantize one block of ``n`` fp32 values whose largest :func:`abs_bits` is ``mag``:
    ``absmax[0]`` = the block's scale (``mag`` as fp32; NaN when it is inf or NaN) and
    ``codes[k]`` = the nearest code of ``values[k] / scale`` for ``k < n`` (the nearest-code
    table's reading, :func:`_encode16`). A degenerate block (all zeros, or holding inf/NaN) gets
    ``zero_code`` everywhere, as the torch path. With ``nonnegative`` (issue 17's rule (b),
    optimizer states on the unsigned map), a positive value whose nearest code is
    ``zero_code`` gets ``zero_code + 1``. ``values``, ``codes`` (uint8), ``absmax`` (the block's
    fp32 entry) and ``table`` (uint32, ``_native.code_table``) are addresses.

    The path is chosen here, by the type of ``search``: ``None`` compiles the portable loop, 16
    values at a time by table gathers; an address (the VBMI search table) compiles 64 at a time
    by the byte-permute search first (``_vbmi.encode64_ir``). The last ``n % 16`` values go
    through the 16-lane body from a padded row (:func:`_steps16`).
    """
    addresses = (values, codes, absmax, table)
    if not (all(isinstance(a, types.Integer) for a in addresses)
            and isinstance(n, types.Integer) and isinstance(mag, types.Integer)
            and isinstance(zero_code, types.Integer)
            and isinstance(nonnegative, (types.Boolean, types.Integer))
            and isinstance(search, (types.Integer, types.NoneType))):
        return None
    vbmi = isinstance(search, types.Integer)

    def codegen(context, builder, sig, args):
        values_v, codes_v, n_v, mag_v, absmax_v, table_v, search_v, zero_v, nonneg_v = args
        b, i64, i8 = builder, ir.IntType(64), ir.IntType(8)
        n_v, mag_v = _i64(b, n_v, n), _u32(b, mag_v)
        zero_v = b.trunc(zero_v, i8) if zero_v.type.width > 8 else zero_v
        nonfinite = b.icmp_unsigned(">=", mag_v, ir.Constant(_I32, NONFINITE_BITS))
        nan = ir.Constant(_I32, NAN_BITS)
        scale = b.bitcast(b.select(nonfinite, nan, mag_v), ir.FloatType())
        b.store(scale, _ptr(b, absmax_v, ir.FloatType()))
        degenerate = b.or_(b.icmp_unsigned("==", mag_v, ir.Constant(_I32, 0)), nonfinite)
        with b.if_else(degenerate) as (zeros, normal):
            with zeros:
                _memset(b, codes_v, zero_v, n_v)
            with normal:
                raised = b.icmp_unsigned("!=", nonneg_v, ir.Constant(nonneg_v.type, 0))
                floor = b.select(raised, b.add(zero_v, ir.Constant(i8, 1)), ir.Constant(i8, 0))
                done = ir.Constant(i64, 0)
                if vbmi:
                    done = _loop(b, n_v, 64, lambda i: _vbmi_module().encode64_ir(
                        b, _at(b, values_v, i, 4), scale, search_v, _at(b, codes_v, i, 1),
                        floor))
                _steps16(b, done, n_v, values_v, 4, codes_v, 1,
                         lambda values_at, codes_at: _encode16(b, values_at, scale, table_v,
                                                               codes_at, floor))
        return context.get_dummy_value()

    return types.void(values, codes, n, mag, absmax, table, search, zero_code,
                      nonnegative), codegen


@intrinsic
def prefetch(typingctx, address):
    """Hint the CPU to fetch the cache line at integer ``address`` for reading (llvm.prefetch;
    a no-op where the target has no prefetch instruction, never a fault)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        fn = _function(builder, "llvm.prefetch.p0", ir.VoidType(), [i8p, _I32, _I32, _I32])
        ptr = builder.inttoptr(args[0], i8p)
        # read, high temporal locality (keep in all cache levels), data cache
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(address), codegen
