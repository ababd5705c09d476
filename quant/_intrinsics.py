"""Small numba intrinsics of the CPU kernels (numba's public extension API, ``@intrinsic``): bit
casts, fused multiply-add, 32-bit integer helpers, and a typed pointer from an integer address.

Why intrinsics: numba has no bit cast between float32 and uint32, no fma, and widens uint32
arithmetic to 64 bits, which halves the width of the vectorized loops that keep a running max.
An intrinsic emits its few LLVM instructions straight into the calling kernel.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_I32 = ir.IntType(32)


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
        v = args[0]
        if u.bitwidth > 32:
            v = builder.trunc(v, _I32)
        elif u.bitwidth < 32:
            v = builder.zext(v, _I32)
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


@intrinsic
def carry_code(typingctx, entry, low):
    """``uint8((entry + low) >> 16)`` in 32-bit arithmetic (see ``_numba.nearest_code``)."""
    if not (isinstance(entry, types.Integer) and isinstance(low, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a, b = (builder.trunc(v, _I32) if v.type.width > 32 else builder.zext(v, _I32)
                if v.type.width < 32 else v for v in args)
        total = builder.add(a, b)
        return builder.trunc(builder.lshr(total, ir.Constant(_I32, 16)), ir.IntType(8))

    return types.uint8(entry, low), codegen


@intrinsic
def pointer(typingctx, address, like):
    """A typed pointer to integer ``address``, of dtype ``like`` (a numpy scalar type such as
    ``np.float32``, or an array whose dtype is taken), for ``numba.carray(pointer(...), n)``:
    the kernels take many tensors as a table of addresses."""
    if isinstance(like, types.Array):
        dtype = like.dtype
    elif isinstance(like, types.NumberClass):
        dtype = like.instance_type
    else:
        return None
    if not isinstance(address, types.Integer):
        return None
    ptr_type = types.CPointer(dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(address, like), codegen
