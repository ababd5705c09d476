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

Each part calls back into Python once (a ``ctypes`` callback, under the GIL) only to call the
compiled kernel, which releases the GIL (``nogil=True``) while it runs. That costs a pool
thread tens of microseconds per call (see :data:`GRAIN`), which only mid-sized calls notice.

Imported by the kernels' callers on the first CPU call, never at ``import eightbit``.
"""

from __future__ import annotations

import ctypes
import importlib
import itertools
import threading

import numpy as np
import torch
from numba import config
from numba.np.ufunc import parallel

# Module of each of numba's threading layers; each exposes the address of its parallel_for.
_LAYER_MODULES = {"omp": "omppool", "tbb": "tbbpool", "workqueue": "workqueue"}

# numba's gufunc calling convention: fn(char **args, intp *dims, intp *steps, void *data).
# parallel_for calls it once per index r < dims[0], with args[j] advanced by r * steps[j].
_PART_FN = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)),
                            ctypes.POINTER(ctypes.c_ssize_t), ctypes.POINTER(ctypes.c_ssize_t),
                            ctypes.c_void_p)
# parallel_for(fn, args, dims, steps, data, inner_ndim, array_count, num_threads); ctypes
# releases the GIL for the call, so the pool's threads can run the callbacks.
_PARALLEL_FOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ssize_t,
                                 ctypes.c_ssize_t, ctypes.c_int)

_calls: dict[int, tuple] = {}  # call id -> (kernel, parts, args, errors)
_ids = itertools.count(1)
_lock = threading.Lock()
_parallel_for = None


def _run_part(args, dims, steps, call):
    """One part of a :func:`run` call, on one of the pool's threads (``args[0][0]``: the part)."""
    kernel, parts, kernel_args, errors = _calls[call]
    try:
        kernel(args[0][0], parts, *kernel_args)
    except BaseException as error:  # noqa: BLE001 -- re-raised in the calling thread
        errors.append(error)


_part_fn = _PART_FN(_run_part)  # kept alive for the process' lifetime


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


# Fewest elements per part. A call through the pool costs more than numba's own parallel loop:
# the pool's threads enter Python for their callbacks and wait for the GIL, 50-100 us on these
# VMs (measured, an Adam8bit step: 65536 elements 115 us against 54 us for a parallel=True
# kernel; 262144 elements 355 us against 252 us; 16M elements the same). Below two parts of
# 65536, one thread without the pool is faster (an Adam8bit step: ~1.6 ns per element).
GRAIN = 65536


def threads() -> int:
    """Threads a call uses: torch's intra-op thread count (``torch.set_num_threads``), capped
    by the threads numba's layer starts (``NUMBA_NUM_THREADS``)."""
    return max(1, min(torch.get_num_threads(), config.NUMBA_NUM_THREADS))


def run(kernel, blocks: int, elements: int, *args) -> None:
    """``kernel(part, parts, *args)`` for every ``part < parts``, one part per thread.

    ``parts = min(threads(), blocks, elements // GRAIN)`` (at least 1 when ``blocks > 0``, none
    when ``blocks == 0``); a single part runs in the calling thread, without the pool. An
    exception raised by the kernel (e.g. numba's typing error on its first call) is raised here,
    after all parts have returned.

    Example:
        >>> run(kernels.dequantize_f32, absmax.numel(), codes.numel(), codes, absmax, lut, out,
        ...     block_size)
    """
    parts = min(threads(), blocks, max(1, elements // GRAIN))
    if parts <= 1:
        if blocks > 0:
            kernel(0, 1, *args)
        return
    parallel_for = _pool()
    index = np.arange(parts, dtype=np.int64)
    arrays = (ctypes.c_void_p * 1)(index.ctypes.data)
    dims = (ctypes.c_ssize_t * 1)(parts)
    steps = (ctypes.c_ssize_t * 1)(index.itemsize)
    errors: list[BaseException] = []
    call = next(_ids)
    _calls[call] = (kernel, parts, args, errors)
    try:
        parallel_for(ctypes.cast(_part_fn, ctypes.c_void_p), arrays, dims, steps, call, 0, 1,
                     parts)
    finally:
        del _calls[call]
    if errors:
        raise errors[0]
