"""Run a CPU kernel's parts on numba's thread pool, without numba's ``parallel=True``.

The kernels of :mod:`._numba` and :mod:`eightbit.functional._numba` are plain serial functions
that do one part of the blocks, ``kernel(part, parts, *args)`` (part ``r`` of ``c``: blocks
``[r * blocks // c, (r + 1) * blocks // c)``, :func:`._numba.part_blocks`). :func:`run` hands
the parts to the ``parallel_for`` of numba's threading layer, the entry point that code compiled
with ``parallel=True`` calls. So the kernels run on the same threads as before: with the OpenMP
layer, the OpenMP pool that torch's CPU ops use too. (A pool of Python threads measured 35%
slower on a step that follows a torch op: torch's OpenMP threads keep spinning for a while and
compete with them.)

What changes is the compile time. numba compiles a ``parallel=True`` function about twice: it
types the parallel loop's body again as a function of its own, and LLVM optimizes that again
once it is linked into its caller. The first Adam8bit step in a fresh cache took 2.35 s that
way; the same kernel, serial and run by this module, 1.3 s.

The pool's threads never enter Python. For each kernel signature, :func:`_part_function` emits a
few lines of LLVM IR (through numba's own code generator, a few milliseconds, not cached): a
function in numba's gufunc calling convention that reads the arguments, packed by
:class:`_Packer` into one buffer in their in-memory form, and calls the compiled kernel's C
entry point (numba's ``cfunc`` wrapper, made for every ``@njit`` function) with them. (Calling
back into Python from each thread, under the GIL, cost 50-100 us per call on these VMs.)

Imported by the kernels' callers on the first CPU call, never at ``import eightbit``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import struct
import threading

import numpy as np
import torch
from llvmlite import ir
from numba import config, types
from numba._dispatcher import compute_fingerprint
from numba.core.compiler_lock import global_compiler_lock
from numba.np.ufunc import parallel

# Module of each of numba's threading layers; each exposes the address of its parallel_for.
_LAYER_MODULES = {"omp": "omppool", "tbb": "tbbpool", "workqueue": "workqueue"}

# parallel_for(fn, args, dims, steps, data, inner_ndim, array_count, num_threads) calls
# fn(char **args, intp *dims, intp *steps, void *data) once per index r < dims[0], with args[j]
# advanced by r * steps[j]. ctypes releases the GIL for the call.
_PARALLEL_FOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ssize_t,
                                 ctypes.c_ssize_t, ctypes.c_int)

# Fewest elements per part (torch's at::internal::GRAIN_SIZE): below it, waking a thread costs
# more than it saves.
GRAIN = 32768

_lock = threading.Lock()
_parallel_for = None
_parts: dict[tuple, tuple] = {}  # (kernel, fingerprints) -> (part function, packer, library)


def _pool():
    """numba's ``parallel_for`` (starting its threading layer on the first call)."""
    global _parallel_for
    with _lock:
        if _parallel_for is None:
            parallel._launch_threads()
            layer = importlib.import_module(
                "numba.np.ufunc." + _LAYER_MODULES[parallel.threading_layer()])
            _parallel_for = _PARALLEL_FOR(layer.parallel_for)
    return _parallel_for


class _Packer:
    """Writes ``parts`` and a kernel's arguments into one buffer, each in numba's in-memory
    ("data") form, in 8-byte-aligned slots: the layout :func:`_part_function` reads.

    An array is numba's array struct: meminfo and parent (null: the caller keeps the array
    alive), size, itemsize, data pointer, shape, strides (all 8-byte words).
    """

    _SCALARS = {types.float32: "f", types.float64: "d", types.boolean: "?", types.int64: "q",
                types.uint64: "Q", types.int32: "i", types.uint32: "I", types.uint8: "B"}

    def __init__(self, argtypes):
        fmt, self.slots = "<q", []  # the first slot: parts
        for ty in argtypes:
            if isinstance(ty, types.Array) and ty.layout == "C":
                fmt += "5q" + "q" * (2 * ty.ndim)
                self.slots.append(ty.ndim)
            elif ty in self._SCALARS:
                code = self._SCALARS[ty]
                fmt += code + "x" * (8 - struct.calcsize("<" + code))
                self.slots.append(None)
            else:
                raise TypeError(f"eightbit's thread pool cannot pass a {ty} to a kernel")
        self.format = struct.Struct(fmt)

    def pack(self, parts: int, args) -> ctypes.Array:
        values = [parts]
        for ndim, a in zip(self.slots, args, strict=True):
            if ndim is None:
                values.append(a)
            else:
                values += (0, 0, a.size, a.itemsize, a.ctypes.data, *a.shape, *a.strides)
        buffer = ctypes.create_string_buffer(self.format.size)
        self.format.pack_into(buffer, 0, *values)
        return buffer


def _part_function(cres, packer: _Packer):
    """Emit and compile ``void part(char **args, intp *dims, intp *steps, void *data)``: part
    ``*(int64 *)args[0]`` of the kernel compiled in ``cres``, its other arguments in ``data``.
    Returns ``(address, library)`` (the library must stay alive)."""
    ctx, fndesc = cres.target_context, cres.fndesc
    if fndesc.argtypes[0] != types.int64:
        raise TypeError("a kernel's first argument must be its part, an int64")
    library = ctx.codegen().create_library("eightbit_part")
    module = library.create_ir_module("eightbit_part")
    i64, byte_ptr = ir.IntType(64), ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [byte_ptr.as_pointer(), i64.as_pointer(),
                                           i64.as_pointer(), byte_ptr])
    function = ir.Function(module, fnty, "eightbit_part")
    builder = ir.IRBuilder(function.append_basic_block())
    args, _dims, _steps, data = function.args
    values = [builder.load(builder.bitcast(builder.load(args), i64.as_pointer()))]
    offset = 0
    for ty in fndesc.argtypes[1:]:  # parts, then the kernel's arguments
        data_type = ctx.get_data_type(ty)
        slot = builder.bitcast(builder.gep(data, [ir.Constant(i64, offset)]),
                               data_type.as_pointer())
        values.append(ctx.data_model_manager[ty].from_data(builder, builder.load(slot)))
        offset += -(-ctx.get_abi_sizeof(data_type) // 8) * 8
    if offset != packer.format.size:
        raise TypeError(f"kernel argument layout mismatch ({offset} != {packer.format.size})")
    entry = cres.library.get_pointer_to_function(fndesc.llvm_cfunc_wrapper_name)
    entry_type = ir.FunctionType(ctx.get_value_type(fndesc.restype),
                                 [ctx.get_value_type(ty) for ty in fndesc.argtypes])
    builder.call(builder.inttoptr(ir.Constant(i64, entry), entry_type.as_pointer()), values)
    builder.ret_void()
    library.add_ir_module(module)
    with global_compiler_lock:
        library.finalize()
    return library.get_pointer_to_function("eightbit_part"), library


def _compiled_part(kernel, args):
    """The part function and packer for ``kernel`` and these argument types (compiling the
    kernel for them first, in the calling thread, if needed)."""
    try:
        key = (kernel, *map(compute_fingerprint, args))  # numba's fast dispatch key
    except NotImplementedError:  # a value numba's fast path does not know: its type instead
        key = (kernel, *map(kernel.typeof_pyval, args))
    found = _parts.get(key)
    if found is None:
        argtypes = tuple(kernel.typeof_pyval(a) for a in (0, 1, *args))
        kernel.compile(argtypes)
        cres = kernel.overloads[argtypes]
        packer = _Packer(argtypes[2:])
        address, library = _part_function(cres, packer)
        found = _parts[key] = (ctypes.c_void_p(address), packer, library)
    return found


def threads() -> int:
    """Threads a call uses: torch's intra-op thread count (``torch.set_num_threads``), capped
    by the threads numba's layer starts (``NUMBA_NUM_THREADS``)."""
    return max(1, min(torch.get_num_threads(), config.NUMBA_NUM_THREADS))


def run(kernel, blocks: int, elements: int, *args) -> None:
    """``kernel(part, parts, *args)`` for every ``part < parts``, one part per thread.

    ``parts = min(threads(), blocks, elements // GRAIN)`` (at least 1 when ``blocks > 0``, none
    when ``blocks == 0``); a single part runs in the calling thread, without the pool. A typing
    error (arguments the kernel cannot take) is raised here, before any part runs.

    Example:
        >>> run(kernels.dequantize_f32, absmax.numel(), codes.numel(), codes, absmax, lut, out,
        ...     block_size)
    """
    parts = min(threads(), blocks, max(1, elements // GRAIN))
    if parts <= 1:
        if blocks > 0:
            kernel(0, 1, *args)
        return
    part_function, packer, _ = _compiled_part(kernel, args)
    data = packer.pack(parts, args)
    _pool()(part_function, *_part_indices(parts), ctypes.addressof(data), 0, 1, parts)


@functools.cache
def _part_indices(parts: int) -> tuple:
    """parallel_for's ``args, dims, steps`` for ``parts`` calls: args[0] walks 0..parts-1 (read
    only, so concurrent calls share them)."""
    index = np.arange(parts, dtype=np.int64)
    arrays = (ctypes.c_void_p * 1)(index.ctypes.data)
    arrays._index = index  # keeps the indices alive with the pointer to them
    return arrays, (ctypes.c_ssize_t * 1)(parts), (ctypes.c_ssize_t * 1)(index.itemsize)
