"""The fused native CPU path: which path serves CPU tensors, and its quantize and dequantize.

CPU tensors are served by numba kernels (:mod:`eightbit.quant._numba`) when numba is installed,
and by the torch path otherwise. Set ``EIGHTBIT_CPU_BACKEND=torch`` to force the torch path, or
``=numba`` to make a missing numba an error. This module imports neither numba nor the kernels
until the first CPU call, so ``import eightbit`` stays fast.

Both paths compute the same function: identical codes and absmax (see
:mod:`eightbit.quant.blockwise`). The kernels process a tensor in one pass per block, in parallel
over blocks, with ``torch.get_num_threads()`` threads (at most numba's ``NUMBA_NUM_THREADS``, and
at most one per 32,768 elements, ``_threads.GRAIN``). Compiled kernels are cached on disk
(:func:`describe` says where): the first call of a kernel signature in a fresh cache compiles it
(0.2 to 2 s, ``make bench`` says how long each), later processes load it in a few
tenths of a second. A process forked after its parent used the kernels
(a DataLoader worker, say) uses the torch path: numba's OpenMP threading layer is not fork-safe.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from typing import NamedTuple

import numpy as np
import torch

from .codebook import midpoints

ENV = "EIGHTBIT_CPU_BACKEND"
_CHOICES = ("auto", "numba", "torch")


def _choice() -> str:
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(_CHOICES)}")
    return choice


@functools.lru_cache(maxsize=1)
def _import_kernels():
    """``(module, None)`` when the numba kernels import, else ``(None, reason)``."""
    try:
        from . import _numba
    except ImportError as error:  # numba missing, or installed against another numpy
        return None, str(error)
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
    if module is not None:
        if _first_use_pid() != os.getpid():
            # A process forked after the parent ran the kernels: numba's OpenMP layer is not
            # fork-safe (the child would be terminated), so the torch path serves it.
            return None
    return module


@functools.lru_cache(maxsize=1)
def _first_use_pid() -> int:
    """The process that first used the kernels (a forked child inherits the cached value)."""
    return os.getpid()


def describe() -> str:
    """Which path serves CPU tensors, in words, e.g. for ``python -m eightbit``.

    Example:
        >>> describe()  # doctest: +SKIP
        'numba 0.68.1 (fused, up to 2 threads, threading layer omp, codebook lookups by AVX-512 VBMI
        byte permutes, cache: /root/.cache/eightbit/numba/0.1.0-3f2a9c0d1e4b)'
    """
    if _choice() == "torch":
        return f"torch path ({ENV}=torch)"
    try:
        module = kernels()
    except ImportError as error:
        return f"unavailable: {error}"
    if module is None and _import_kernels()[0] is not None:
        return "torch path (a child forked after its parent used the kernels; not fork-safe)"
    if module is None:
        try:
            importlib.metadata.version("numba")
        except importlib.metadata.PackageNotFoundError:
            return "torch path (numba not installed: `pip install numba` for the fused kernels)"
        return f"torch path (numba does not import: {_import_kernels()[1]})"
    import numba

    from ._intrinsics import lookup_method
    from ._threads import threads

    try:
        layer = numba.threading_layer()
    except ValueError:  # known once a kernel has run
        layer = numba.config.THREADING_LAYER
    return (
        f"numba {numba.__version__} (fused, up to {threads()} threads, "
        f"threading layer {layer}, codebook lookups by {lookup_method()}, "
        f"cache: {module.cache_dir()})"
    )


class CodeTable(NamedTuple):
    """A codebook's nearest-code table for :func:`eightbit.quant._numba.nearest_code`.

    ``table`` is ``None`` when some bin would hold two thresholds (never for the codebooks of
    :func:`~eightbit.quant.create_codebook`); ``thresholds`` (ending with +inf) then serve a
    linear search instead. ``lut`` serves dequantization
    (``eightbit.quant._intrinsics.dequantize_run``): 512 float32 slots, the 256 codebook values
    and then their four byte planes (1,024 bytes: byte k of value c at byte ``256 * k + c``).
    ``search`` serves quantization 64 values at a time (``eightbit.quant._intrinsics.encode64``,
    :func:`search_tables`); empty when the codebook's thresholds do not fit it.
    """

    table: np.ndarray | None
    zero_code: np.uint8
    thresholds: np.ndarray
    lut: np.ndarray
    search: np.ndarray


def code_table(codebook: torch.Tensor) -> CodeTable:
    """The (cached) nearest-code table of a CPU float32 codebook."""
    return _code_table(codebook.numpy().tobytes())


@functools.lru_cache(maxsize=16)
def _code_table(codebook_bytes: bytes) -> CodeTable:
    codebook = torch.from_numpy(np.frombuffer(codebook_bytes, dtype=np.float32).copy())
    lut = np.empty(2 * codebook.numel(), dtype=np.float32)
    lut[:256] = codebook.numpy()
    lut[256:].view(np.uint8)[:] = codebook.numpy().view(np.uint8).reshape(256, 4).T.reshape(-1)
    mids = midpoints(codebook).numpy()
    thresholds = np.append(mids, np.float32(np.inf)).astype(np.float32)
    zero_code = np.uint8(np.searchsorted(mids, np.float32(0.0)))
    # Bin k of each sign: the fp32 magnitudes whose bits >> 16 equal k, up to that of 1.0.
    k = np.arange((0x3F800000 >> 16) + 1, dtype=np.uint32)
    smallest = (k << np.uint32(16)).view(np.float32)
    largest = ((k << np.uint32(16)) | np.uint32(0xFFFF)).view(np.float32)
    # counts of thresholds below the bin's lowest and below its highest value, per sign
    lo = np.concatenate([np.searchsorted(mids, smallest), np.searchsorted(mids, -largest)])
    hi = np.concatenate([np.searchsorted(mids, largest), np.searchsorted(mids, -smallest)])
    if (hi - lo).max() > 1:  # then search_tables would refuse too (a row needs 8 bits or more)
        return CodeTable(None, zero_code, thresholds, lut, np.zeros(0, np.uint8))
    inside = thresholds[np.minimum(lo, 255)].view(np.uint32) & np.uint32(0xFFFF)
    inside[k.size :] ^= np.uint32(0xFFFF)  # negative bins compare flipped low bits
    # entry + low carries into bit 16 exactly when low > the threshold's low bits; a bin
    # without a threshold never carries (low <= 0xFFFF)
    below = np.where(hi > lo, np.uint32(0xFFFF) - inside, np.uint32(0)).astype(np.uint32)
    entries = (lo.astype(np.uint32) << np.uint32(16)) + below
    # indexed by the top 16 bits of y: positive bins at k, negative ones at 0x8000 + k; the
    # entries for |y| > 1 (inf and NaN included) are never used but keep every lookup in bounds
    table = np.zeros(1 << 16, dtype=np.uint32)
    table[: k.size], table[0x8000 : 0x8000 + k.size] = entries[: k.size], entries[k.size :]
    search = search_tables(mids)
    return CodeTable(table, zero_code, thresholds, lut,
                     np.zeros(0, np.uint8) if search is None else search)


def _order_keys(values: np.ndarray) -> np.ndarray:
    """The order-preserving uint32 keys of fp32 values: ``a < b`` exactly when ``key(a) <
    key(b)`` (the sign bit flipped for positive values, every bit for negative ones)."""
    u = values.astype(np.float32).view(np.uint32)
    return np.where(u >> np.uint32(31) == 1, ~u, u | np.uint32(0x80000000)).astype(np.uint32)


def search_tables(mids: np.ndarray) -> np.ndarray | None:
    """The register-search table of ``_intrinsics.encode64`` for sorted fp32 thresholds, or
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


@functools.lru_cache(maxsize=1)
def _permutes() -> bool:
    """Whether the kernels compile for a CPU with AVX-512 VBMI byte permutes."""
    from ._intrinsics import host_has_vbmi

    return host_has_vbmi()


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


def quantize(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
) -> None:
    """Quantize the flat view of ``x`` into ``codes`` and ``absmax`` (torch path's contract)."""
    from ._threads import run

    k = kernels()
    values, fmt = as_array(x.contiguous())  # a non-contiguous x is copied, as the torch path does
    flat_codes, flat_absmax = codes.view(-1).numpy(), absmax.numpy()
    t = code_table(codebook)
    blocks, n = flat_absmax.size, flat_codes.size
    if t.table is None:
        run(k.quantize_scan, blocks, n, values, fmt, flat_codes, flat_absmax, t.thresholds,
            t.zero_code, block_size)
    else:
        # the register search pays where the CPU permutes bytes; elsewhere the gathering loop
        search = t.search if _permutes() else t.search[:0]
        run(k.quantize, blocks, n, values, fmt, flat_codes, flat_absmax, t.table, search,
            t.zero_code, block_size)


def dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
    out: torch.Tensor,
) -> None:
    """Dequantize ``codes`` into the contiguous ``out`` (any float dtype), as the torch path."""
    from ._threads import run

    values, fmt = as_array(out)
    k, lut = kernels(), code_table(codebook).lut
    flat_codes, flat_absmax = codes.reshape(-1).numpy(), absmax.numpy()
    blocks, n = flat_absmax.size, flat_codes.size
    if fmt == k.F32:
        run(k.dequantize_f32, blocks, n, flat_codes, flat_absmax, lut, values, block_size)
    else:
        run(k.dequantize, blocks, n, flat_codes, flat_absmax, lut, values, fmt, block_size)
