"""The CPU kernels' Python side: which path serves CPU tensors, threads, tables, and the
blockwise quantize and dequantize of CPU tensors.

CPU tensors are served by numba kernels (:mod:`eightbit.quant._numba`) when numba imports, and
by the torch path otherwise. ``EIGHTBIT_CPU_BACKEND=torch`` forces the torch path, ``=numba``
makes kernels that cannot be imported an error. ``EIGHTBIT_CPU_PATH=portable`` keeps the
kernels off their AVX-512 VBMI accelerator (:mod:`._vbmi`). Neither numba nor the kernels are
imported before the first CPU call, so ``import eightbit`` stays fast.

Both paths compute the same function: identical codes and absmax (see
:mod:`eightbit.quant.blockwise`). Kernels run in parallel over blocks with
``torch.get_num_threads()`` threads, torch's own OpenMP team where it can be called (at most
one per :data:`GRAIN` elements; :func:`run_parts`).
Compiled kernels are cached on disk by numba (``cache=True``; :func:`cache_dir`): the first
call of a kernel signature in a fresh cache compiles it (docs/cpu-kernels.md has the figures),
later processes load it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.metadata
import os
import sys
import threading
from typing import NamedTuple

import numpy as np
import torch

from .codebook import midpoints

ENV = "EIGHTBIT_CPU_BACKEND"
CACHE_ENV = "EIGHTBIT_CACHE_DIR"
_CHOICES = ("auto", "numba", "torch")
# Fewest elements per part: starting a second thread costs ~40 us (the team's wake-up and the
# GIL handoffs of run_parts), about the one-thread time of this many Adam8bit elements; below
# it a second thread saves less than it costs (docs/cpu-kernels.md).
GRAIN = 131072


def _choice() -> str:
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(_CHOICES)}; "
                         f"unset it for the default ('auto')")
    return choice


def set_cache_dir() -> None:
    """``EIGHTBIT_CACHE_DIR`` becomes numba's ``NUMBA_CACHE_DIR`` (a process-wide numba
    setting) when the user set the first and not the second, before numba is imported."""
    if os.environ.get(CACHE_ENV) and not os.environ.get("NUMBA_CACHE_DIR") \
            and "numba" not in sys.modules:
        os.environ["NUMBA_CACHE_DIR"] = os.environ[CACHE_ENV]


@functools.lru_cache(maxsize=1)
def _import_kernels():
    """``(module, None)`` when the numba kernels import, else ``(None, reason)``."""
    try:
        from . import _numba
    except Exception as error:  # numba missing, broken, or built against another numpy
        return None, f"{type(error).__name__}: {error}"
    return _numba, None


def kernels():
    """The kernel module when CPU tensors should use it, else ``None`` (the torch path)."""
    choice = _choice()
    if choice == "torch":
        return None
    module, reason = _import_kernels()
    if module is None and choice == "numba":
        raise ImportError(
            f"{ENV}=numba but numba's kernels cannot be imported ({reason}); "
            "install it with `pip install numba`, or unset the variable to use the torch path"
        )
    return module


def cache_dir() -> str:
    """Where numba caches the compiled kernels, in words."""
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given:
        return given
    return "numba's default (__pycache__ next to the kernel sources, or numba's user cache)"


def describe() -> str:
    """Which path serves CPU tensors, in words, e.g. for ``python -m eightbit``.

    Example:
        >>> describe()  # doctest: +SKIP
        'numba 0.68.1 (fused, up to 2 threads, codebook search: AVX-512 VBMI byte permutes, ...)'
    """
    try:
        choice = _choice()
    except ValueError as error:
        return f"invalid setting: {error}"
    if choice == "torch":
        return f"torch path ({ENV}=torch)"
    module, reason = _import_kernels()
    if module is None:
        try:
            importlib.metadata.version("numba")
        except importlib.metadata.PackageNotFoundError:
            return "torch path (numba not installed: `pip install numba` for the fused kernels)"
        if choice == "numba":
            return f"unavailable: {ENV}=numba but numba does not import ({reason})"
        return f"torch path (numba does not import: {reason})"
    import numba

    from . import _vbmi

    try:
        search = _vbmi.describe()
    except ValueError as error:
        search = f"invalid setting: {error}"
    try:
        on = team().why
    except (ValueError, RuntimeError) as error:
        on = f"invalid setting: {error}"
    return (f"numba {numba.__version__} (fused, up to {threads()} threads: {on}, codebook "
            f"search: {search}, cache: {cache_dir()})")


def threads() -> int:
    """Threads a call uses: torch's intra-op thread count (``torch.set_num_threads``)."""
    return max(1, torch.get_num_threads())


def parts(blocks: int, elements: int) -> int:
    """How many parts a call of ``blocks`` blocks and ``elements`` values is cut into: one with
    one thread, else :data:`SPLIT` per thread, each of at least :data:`GRAIN` elements."""
    if threads() == 1:
        return 1
    return max(1, min(SPLIT * threads(), blocks, elements // GRAIN))


# Parts per thread. Threads take parts as they finish (run_parts), so a thread slowed by
# another process, or by torch's OpenMP workers still spinning after an op, takes fewer.
SPLIT = 4


def run_parts(kernel, count: int, *args) -> None:
    """``kernel(part, count, *args)`` for every part, on ``torch.get_num_threads()`` threads
    (the kernels are ``nogil``, so they run in parallel), each thread taking the next part when
    it finishes one. An exception in a part is raised here once every thread has stopped.

    The threads are torch's own OpenMP team where torch runs its CPU ops on an OpenMP runtime
    that can be called (:func:`team`), else a pool of Python threads. Why torch's team: a step
    follows torch ops (the backward pass), after which torch's OpenMP workers keep spinning for
    a while; threads of our own would share the cores with them, while the team's workers take
    our parts at once. Results do not depend on the threads: every block is computed the same
    way whichever part holds it. Python's garbage collector is paused meanwhile
    (:func:`_collector_paused`).

    Example:
        >>> run_parts(lambda part, count, out: out.append(part), 4, [])  # doctest: +SKIP
    """
    with _collector_paused():
        _run_parts(kernel, count, *args)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for the duration (then as it was). A kernel's first
    call compiles it, and numba's compiler makes so many short-lived objects that collector
    passes were a visible part of a first use (docs/cpu-kernels.md); a compiled kernel
    allocates nothing while it runs."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _run_parts(kernel, count: int, *args) -> None:
    workers = min(threads(), count)
    if workers == 1:
        for part in range(count):
            kernel(part, count, *args)
        return
    lock, parts_left, errors = threading.Lock(), iter(range(count)), []

    def work():
        try:
            while not errors:
                with lock:
                    part = next(parts_left, None)
                if part is None:
                    return
                kernel(part, count, *args)
        except BaseException as error:  # raised in the caller's thread, after the others stop
            errors.append(error)

    parallel = team()
    if parallel.run is not None:
        # one ctypes callback per call: each team thread takes the GIL to enter it, and the
        # kernel releases it while it computes
        parallel.run(_TEAM_FUNCTION(lambda _data: work()), None, workers, 0)
    else:
        pool = _pool(workers - 1)
        others = [pool.submit(work) for _ in range(workers - 1)]
        work()
        for future in others:  # wait for all before the caller may free what they write
            future.result()
    if errors:
        raise errors[0]


THREADS_ENV = "EIGHTBIT_CPU_THREADS"
_TEAM_FUNCTION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
# the process that imported this module: a child forked from it gets Python threads, since
# libgomp's team does not survive a fork (torch's own parallel ops hang in such a child)
_IMPORTED_BY = os.getpid()


class Team(NamedTuple):
    """How :func:`run_parts` gets its threads: ``run`` is the OpenMP runtime's
    ``GOMP_parallel(function, data, threads, flags)`` (libgomp's ABI, which LLVM's libomp and
    Intel's libiomp5 also export), or ``None`` for Python threads; ``why`` says which, in
    words."""

    run: object
    why: str


def team() -> Team:
    """The threads :func:`run_parts` uses in this process (``EIGHTBIT_CPU_THREADS=python``
    forces Python threads; ``=openmp`` makes a missing OpenMP runtime an error)."""
    choice = os.environ.get(THREADS_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "openmp", "python"):
        raise ValueError(f"{THREADS_ENV}={os.environ[THREADS_ENV]!r} is not one of auto, "
                         f"openmp, python; unset it for the default ('auto')")
    if choice == "python":
        return Team(None, f"Python threads ({THREADS_ENV}=python)")
    found = _openmp_team() if os.getpid() == _IMPORTED_BY else Team(
        None, "Python threads (a forked process: OpenMP teams do not survive a fork)")
    if found.run is None and choice == "openmp":
        raise RuntimeError(f"{THREADS_ENV}=openmp but {found.why.removeprefix('Python threads ')}"
                           f"; unset it to use Python threads")
    return found


@functools.lru_cache(maxsize=1)
def _openmp_team() -> Team:
    """torch's OpenMP runtime, if torch runs its CPU ops on one that is loaded and exports
    ``GOMP_parallel``. Only an already loaded runtime is used (``RTLD_NOLOAD``), so a second
    one is never brought into the process."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return Team(None, "Python threads (torch's parallel backend is not OpenMP)")
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:
        return Team(None, "Python threads (this platform cannot look up a loaded library)")
    for path in _openmp_libraries():
        try:
            library = ctypes.CDLL(path, mode=noload)
        except OSError:  # not loaded in this process
            continue
        run = getattr(library, "GOMP_parallel", None)
        if run is not None:
            run.argtypes = [_TEAM_FUNCTION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            run.restype = None
            return Team(run, f"torch's OpenMP threads ({os.path.basename(path)})")
    return Team(None, "Python threads (no loaded OpenMP runtime exports GOMP_parallel)")


def _openmp_libraries() -> list[str]:
    """Paths of OpenMP runtimes that may be loaded: those in torch's lib folder first (the one
    torch links), then any other this process mapped (Linux)."""
    import glob

    names = ("libgomp", "libomp", "libiomp5")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    found = sorted(p for name in names for p in glob.glob(os.path.join(torch_lib, f"{name}*")))
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split(maxsplit=5)[-1].strip() for line in maps if "/" in line}
    except OSError:
        mapped = set()
    found += sorted(p for p in mapped if os.path.basename(p).startswith(names)
                    and p not in found)
    return found


def _pool(workers: int):
    """This process's worker threads (at least ``workers``); a forked child makes its own."""
    from concurrent.futures import ThreadPoolExecutor

    size, pool = _pools.get(os.getpid(), (0, None))
    if size < workers:
        if pool is not None:
            pool.shutdown(wait=False)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="eightbit")
        _pools[os.getpid()] = (workers, pool)
    return pool


_pools: dict = {}


class CodeTable(NamedTuple):
    """A codebook's tables for the kernels.

    ``table``: the portable nearest-code table (its reading:
    :func:`eightbit.quant._intrinsics.encode_block`), or ``None`` when some bin would hold two
    thresholds (never for the codebooks of :func:`~eightbit.quant.create_codebook`);
    ``thresholds`` (ending with +inf) then serve a linear search. ``codebook``: the values, for
    dequantization. ``zero_code``: the code of 0.
    """

    table: np.ndarray | None
    zero_code: np.uint8
    thresholds: np.ndarray
    codebook: np.ndarray
    mids: np.ndarray


def code_table(codebook: torch.Tensor) -> CodeTable:
    """The (cached) tables of a CPU float32 codebook."""
    return _code_table(codebook.numpy().tobytes())


def address(table: np.ndarray | None) -> int | None:
    """A table's address for a kernel, ``None`` for ``None``: a kernel given ``None`` for a VBMI
    table is compiled without that path (``_intrinsics.encode_block``)."""
    return None if table is None else table.ctypes.data


def vbmi_tables(t: CodeTable) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(planes, search)`` of ``t``'s codebook for the VBMI path; ``None`` where it is off."""
    from . import _vbmi

    return _vbmi.tables(t.codebook, t.mids)


# entries of a portable nearest-code table (indexed by the top 16 bits of an fp32 value)
TABLE_ENTRIES = 1 << 16


@functools.lru_cache(maxsize=16)
def _code_table(codebook_bytes: bytes) -> CodeTable:
    codebook = aligned(np.frombuffer(codebook_bytes, dtype=np.float32))
    mids = midpoints(torch.from_numpy(codebook)).numpy()
    thresholds = np.append(mids, np.float32(np.inf)).astype(np.float32)
    zero_code = np.uint8(np.searchsorted(mids, np.float32(0.0)))
    # Bin k of each sign: the fp32 magnitudes whose bits >> 16 equal k, up to that of 1.0.
    k = np.arange((0x3F800000 >> 16) + 1, dtype=np.uint32)
    smallest = (k << np.uint32(16)).view(np.float32)
    largest = ((k << np.uint32(16)) | np.uint32(0xFFFF)).view(np.float32)
    # counts of thresholds below the bin's lowest and below its highest value, per sign
    lo = np.concatenate([np.searchsorted(mids, smallest), np.searchsorted(mids, -largest)])
    hi = np.concatenate([np.searchsorted(mids, largest), np.searchsorted(mids, -smallest)])
    if (hi - lo).max() > 1:
        return CodeTable(None, zero_code, thresholds, codebook, mids)
    inside = thresholds[np.minimum(lo, 255)].view(np.uint32) & np.uint32(0xFFFF)
    inside[k.size :] ^= np.uint32(0xFFFF)  # negative bins compare flipped low bits
    # entry + low carries into bit 16 exactly when low > the threshold's low bits; a bin
    # without a threshold never carries (low <= 0xFFFF)
    below = np.where(hi > lo, np.uint32(0xFFFF) - inside, np.uint32(0)).astype(np.uint32)
    entries = (lo.astype(np.uint32) << np.uint32(16)) + below
    # indexed by the top 16 bits of y: positive bins at k, negative ones at 0x8000 + k; the
    # entries for |y| > 1 (inf and NaN included) are never used but keep every lookup in bounds
    table = np.zeros(TABLE_ENTRIES, dtype=np.uint32)
    table[: k.size], table[0x8000 : 0x8000 + k.size] = entries[: k.size], entries[k.size :]
    return CodeTable(aligned(table), zero_code, thresholds, codebook, mids)


def as_array(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """A flat numpy view of a contiguous CPU tensor and its format flag (no copy).

    float32 stays float32; float16 and bfloat16 become their uint16 bit patterns.
    """
    from . import _numba

    flat = t.detach().view(-1)
    if t.dtype == torch.float32:
        return flat.numpy(), _numba.F32
    bits = flat.view(torch.int16).numpy().view(np.uint16)
    return bits, _numba.BF16 if t.dtype == torch.bfloat16 else _numba.F16


def scratch(count: int, block_size: int) -> np.ndarray:
    """``count`` fp32 scratch blocks (one per part), reused between calls of this thread."""
    buffers = _local.__dict__.setdefault("scratch", {})
    buffer = buffers.get(block_size)
    if buffer is None or buffer.shape[0] < count:
        buffer = buffers[block_size] = aligned_empty((count, block_size), np.float32)
    return buffer


ALIGNMENT = 64  # bytes: a cache line, and one AVX-512 vector


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a :data:`ALIGNMENT` boundary.

    The kernels read and write scratch blocks and tables 16 or 64 bytes at a time; with
    malloc's 16-byte alignment those accesses could straddle two cache lines, at an offset that
    changed from process to process.

    Example:
        >>> aligned_empty((3, 256), np.float32).ctypes.data % ALIGNMENT
        0
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def aligned(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``array`` on a :data:`ALIGNMENT` boundary (:func:`aligned_empty`)."""
    out = aligned_empty(array.shape, array.dtype)
    out[...] = array
    return out


_local = threading.local()


def quantize(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
) -> None:
    """Quantize the flat view of ``x`` into ``codes`` and ``absmax`` (torch path's contract)."""
    k = kernels()
    values, fmt = as_array(x.contiguous())  # a non-contiguous x is copied, as the torch path does
    flat_codes, flat_absmax = codes.view(-1).numpy(), absmax.numpy()
    t = code_table(codebook)
    blocks, n = flat_absmax.size, flat_codes.size
    if blocks == 0:
        return
    count = parts(blocks, n)
    if t.table is None:
        run_parts(k.quantize_scan, count, values, fmt, flat_codes, flat_absmax, t.thresholds,
                  t.zero_code, block_size)
        return
    args = (values, fmt, flat_codes, flat_absmax, t.table, address(vbmi_tables(t)[1]), t.zero_code,
            block_size, scratch(count, block_size))
    run_parts(k.quantize_part, count, *args)


def dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
    out: torch.Tensor,
) -> None:
    """Dequantize ``codes`` into the contiguous ``out`` (any float dtype), as the torch path."""
    values, fmt = as_array(out)
    k, t = kernels(), code_table(codebook)
    flat_codes, flat_absmax = codes.reshape(-1).numpy(), absmax.contiguous().numpy()
    blocks, n = flat_absmax.size, flat_codes.size
    if blocks == 0:
        return
    count = parts(blocks, n)
    args = (flat_codes, flat_absmax, t.codebook, address(vbmi_tables(t)[0]), values, fmt,
            block_size, scratch(count, block_size))
    run_parts(k.dequantize_part, count, *args)
