"""The fused CPU kernels (numba) against the torch path, the oracle, and against brute force.

quantize must give identical codes and absmax for every input, so the inputs are the adversarial
ones: every threshold and its fp32 neighbours, both edges of every bin of the nearest-code table,
a sweep over all fp32 bit patterns in [-1, 1], subnormals, signed zeros, 1e-30..1e30 magnitudes,
and blocks of zeros, inf and NaN.
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from eightbit.quant import (
    _native,
    _torch,
    blockwise,
    create_codebook,
    dequantize_blockwise,
    quantize_blockwise,
)
from eightbit.quant.codebook import midpoints


def _vbmi_search(mids):
    from eightbit.quant import _vbmi

    return _vbmi.search_table(np.asarray(mids, np.float32))

pytest.importorskip("numba")

CODEBOOKS = [(name, signed) for name in ("dynamic", "linear", "normal") for signed in (True, False)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _paths():
    from eightbit.quant import _vbmi

    return ["portable", "vbmi"] if _vbmi.compiled_with_vbmi() else ["portable"]


@pytest.fixture(autouse=True, params=_paths())
def _numba_path(monkeypatch, request):
    """Every test runs on each search path this machine has (EIGHTBIT_CPU_PATH)."""
    monkeypatch.delenv(_native.ENV, raising=False)
    monkeypatch.setenv("EIGHTBIT_CPU_PATH", request.param)
    return request.param


def both(x: torch.Tensor, codebook: torch.Tensor, block_size: int = 256):
    """``(native, torch path)`` results as (codes, absmax) pairs."""
    n_blocks = blockwise.num_blocks(x.numel(), block_size)
    out = []
    for backend in (_native, _torch):
        codes = torch.empty(x.shape, dtype=torch.uint8)
        absmax = torch.empty(n_blocks)
        backend.quantize(x, codes, absmax, codebook, block_size)
        out.append((codes, absmax))
    return out


def assert_identical(x, codebook, block_size=256):
    (c1, a1), (c2, a2) = both(x, codebook, block_size)
    assert torch.equal(c1, c2), f"{(c1 != c2).sum().item()} codes differ"
    assert torch.equal(a1.isnan(), a2.isnan())
    assert torch.equal(a1.nan_to_num(), a2.nan_to_num())


def with_unit_absmax(values: torch.Tensor, block_size: int = 256) -> torch.Tensor:
    """Blocks whose first element is 1.0 and the rest ``values``: y = x / 1 = x exactly."""
    rows = values.reshape(-1)
    per = block_size - 1
    pad = (-rows.numel()) % per
    rows = torch.cat([rows, torch.zeros(pad)]).view(-1, per)
    return torch.cat([torch.ones(rows.shape[0], 1), rows], dim=1).reshape(-1)


def adversarial(codebook: torch.Tensor) -> torch.Tensor:
    """Each threshold, its neighbours two ulps either way, their negatives, and both edges of
    every 16-bit-prefix bin of the table (fp32 values in [-1, 1])."""
    t = midpoints(codebook)
    near = [t]
    for direction in (1.0, -1.0):
        step = t
        for _ in range(2):
            step = torch.nextafter(step, torch.full_like(step, direction))
            near.append(step)
    k = torch.arange((0x3F800000 >> 16) + 1, dtype=torch.int32)
    edges = [(k << 16).view(torch.float32), ((k << 16) | 0xFFFF).view(torch.float32)]
    values = torch.cat([*near, *edges, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45])])
    values = torch.cat([values, -values]).clamp(-1, 1)
    return values


def brute_force_codes(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value in exact (fp64) arithmetic; a tie takes the lower."""
    distance = (y.double()[:, None] - codebook.double()[None, :]).abs()
    return distance.argmin(dim=1).to(torch.uint8)  # argmin returns the first of equal minima


@pytest.mark.parametrize("name,signed", CODEBOOKS)
def test_thresholds_neighbours_and_bin_edges(name, signed):
    codebook = create_codebook(name, signed=signed)
    assert _native.code_table(codebook).table is not None
    values = adversarial(codebook)
    x = with_unit_absmax(values)
    assert_identical(x, codebook)
    (codes, _), _ = both(x, codebook)
    inner = codes.view(-1, 256)[:, 1:].reshape(-1)[: values.numel()]
    assert torch.equal(inner, brute_force_codes(values, codebook))


@pytest.mark.parametrize("signed", [True, False])
def test_sweep_of_all_fp32_bit_patterns_in_unit_interval(signed):
    codebook = create_codebook("dynamic", signed=signed)
    # every 997th bit pattern of [0, 1] and its negative: about 2.1 million values
    bits = torch.arange(0, 0x3F800001, 997, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    assert_identical(with_unit_absmax(torch.cat([values, -values])), codebook)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,signed", CODEBOOKS)
def test_wide_magnitudes_special_values_and_blocks(dtype, name, signed):
    gen = torch.Generator().manual_seed(3)
    n = 64 * 257 + 13
    magnitudes = torch.logspace(-30, 30, n, dtype=torch.float64).float()
    x = (torch.randn(n, generator=gen) * magnitudes)[torch.randperm(n, generator=gen)]
    x[100:400] = 0.0  # a whole block of zeros (and parts of others)
    x[1000:1010] = -0.0
    x[2000] = float("nan")
    x[3000] = float("inf")
    x[4000] = -float("inf")
    x[5000:5100] = torch.tensor(1e-40).repeat(100) * torch.arange(100)  # subnormals
    x = x.to(dtype)
    for block_size in (64, 256, 4096):
        assert_identical(x, create_codebook(name, signed=signed), block_size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes_sizes_and_non_contiguous_input(dtype):
    codebook = create_codebook("dynamic", signed=True)
    gen = torch.Generator().manual_seed(4)
    for shape in [(1,), (4097,), (278011,), (3, 5, 7)]:
        assert_identical(torch.randn(shape, generator=gen).to(dtype), codebook)
    x = torch.randn(300, 200, generator=gen).to(dtype)
    assert_identical(x.t(), codebook)
    assert_identical(x[:, ::3], codebook, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_length_of_a_last_block_is_encoded_and_decoded_as_the_torch_path(dtype):
    # The block loops take 16 values per step: fewer than 16 in all go through a padded row,
    # and a last step that 16 does not divide overlaps the step before. Lengths 1..80 with
    # blocks of 64 give every remainder, alone and after whole steps and whole blocks.
    codebook = create_codebook("dynamic", signed=True)
    gen = torch.Generator().manual_seed(5)
    for n in range(1, 81):
        x = (torch.randn(n, generator=gen) * 3).to(dtype)
        assert_identical(x, codebook, 64)
        codes, absmax = torch.empty(n, dtype=torch.uint8), torch.empty((n + 63) // 64)
        _torch.quantize(x.float(), codes, absmax, codebook, 64)
        ours, theirs = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
        _native.dequantize(codes, absmax, codebook, 64, ours)
        _torch.dequantize(codes, absmax, codebook, 64, theirs)
        assert torch.equal(ours, theirs), n


@pytest.mark.parametrize("threads", [1, 2])
def test_a_codebook_with_two_thresholds_in_one_bin_uses_the_linear_search(torch_threads,
                                                                          threads):
    torch_threads(threads)  # 2 threads: the search runs in several parts
    values = torch.linspace(-1, 1, 256)
    values[100:110] = 0.5 + torch.arange(10) * 2.0**-20  # thresholds closer than one bin
    codebook = values.sort().values
    assert _native.code_table(codebook).table is None
    x = torch.cat([adversarial(codebook), torch.randn(200_000)])
    assert_identical(x, codebook)
    assert_identical(with_unit_absmax(adversarial(codebook)), codebook)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_the_torch_path(dtype):
    codebook = create_codebook("dynamic", signed=True)
    x = torch.randn(5000) * 1e3
    x[7] = float("nan")  # block 0 dequantizes to NaN
    codes, absmax = torch.empty(5000, dtype=torch.uint8), torch.empty(20)
    _torch.quantize(x, codes, absmax, codebook, 256)
    ours, theirs = torch.empty(5000, dtype=dtype), torch.empty(5000, dtype=dtype)
    _native.dequantize(codes, absmax, codebook, 256, ours)
    _torch.dequantize(codes, absmax, codebook, 256, theirs)
    assert torch.equal(ours.isnan(), theirs.isnan())
    finite = ~theirs.isnan()
    assert torch.equal(ours[finite], theirs[finite])  # NaN payloads may differ


def test_public_functions_use_the_native_path_and_can_be_switched_off(monkeypatch):
    assert blockwise._backend(torch.device("cpu")) is _native
    monkeypatch.setenv(_native.ENV, "torch")
    assert blockwise._backend(torch.device("cpu")) is _torch
    assert "EIGHTBIT_CPU_BACKEND=torch" in _native.describe()
    monkeypatch.setenv(_native.ENV, "fast")
    with pytest.raises(ValueError, match="EIGHTBIT_CPU_BACKEND"):
        quantize_blockwise(torch.randn(10))


def test_without_numba_the_torch_path_serves_and_says_so(monkeypatch):
    monkeypatch.setattr(_native, "_import_kernels", lambda: (None, "No module named 'numba'"))
    assert blockwise._backend(torch.device("cpu")) is _torch
    q = quantize_blockwise(torch.randn(1000))
    assert dequantize_blockwise(q).shape == (1000,)
    assert _native.describe().startswith("torch path")
    monkeypatch.setenv(_native.ENV, "numba")
    with pytest.raises(ImportError, match="pip install numba"):
        quantize_blockwise(torch.randn(10))


def test_describe_names_numba_threads_and_cache():
    text = _native.describe()
    assert text.startswith("numba ") and "threads" in text and "cache: " in text


@pytest.fixture
def torch_threads():
    """Sets torch's thread count for a test (restored after)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "threads, blocks, elements, parts",
    [(1, 100, 2**24, 1), (2, 100, 2**24, 8), (2, 3, 2**24, 3), (2, 1, 2**24, 1),
     (2, 100, 400_000, 3), (2, 100, 200_000, 1), (2, 10, 100_000, 1)],
)
def test_parts_follow_torch_threads_blocks_and_grain(torch_threads, monkeypatch, threads, blocks,
                                                      elements, parts):
    # SPLIT parts per thread, at most one per block and per GRAIN elements (the shipped GRAIN:
    # tests/conftest.py lowers it for every other test)
    monkeypatch.undo()
    assert _native.SPLIT == 4 and _native.GRAIN == 131072
    torch_threads(threads)
    assert _native.parts(blocks, elements) == parts


def test_parts_run_on_torchs_openmp_team_where_torch_uses_openmp():
    # Linux and macOS wheels of torch run their CPU ops on a bundled OpenMP runtime
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch does not run its CPU ops on OpenMP")
    assert _native.team().run is not None, _native.team().why
    assert _native.team().why.startswith("torch's OpenMP threads")


@pytest.mark.parametrize("choice, why", [("python", "Python threads (EIGHTBIT_CPU_THREADS=python)"),
                                         ("openmp", "torch's OpenMP threads")])
def test_threads_setting(monkeypatch, choice, why):
    if choice == "openmp" and _native.team().run is None:
        pytest.skip("no OpenMP runtime here")
    monkeypatch.setenv("EIGHTBIT_CPU_THREADS", choice)
    assert _native.team().why.startswith(why)
    monkeypatch.setenv("EIGHTBIT_CPU_THREADS", "pthreads")
    with pytest.raises(ValueError, match="EIGHTBIT_CPU_THREADS='pthreads' is not one of auto, "
                                         "openmp, python"):
        _native.team()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("choice", ["auto", "python"])
def test_run_parts_runs_every_part_once_and_raises_a_parts_error(torch_threads, monkeypatch,
                                                                 threads, choice):
    monkeypatch.setenv("EIGHTBIT_CPU_THREADS", choice)
    torch_threads(threads)
    seen = []
    lock = threading.Lock()

    def kernel(part, count, out):
        time.sleep(0.002 * (1 + part % 3))  # uneven parts: threads take different numbers
        with lock:
            out.append((part, count, threading.get_ident()))

    _native.run_parts(kernel, 12, seen)
    assert sorted(p for p, _, _ in seen) == list(range(12))
    assert {c for _, c, _ in seen} == {12}
    # uneven parts, taken as threads finish: every thread takes some
    assert len({t for _, _, t in seen}) == threads

    def failing(part, count):
        if part == 7:
            raise ValueError("part 7")

    with pytest.raises(ValueError, match="part 7"):
        _native.run_parts(failing, 12)


@pytest.mark.parametrize("path", ["portable", "vbmi"])
def test_tables_and_scratch_the_kernels_read_start_on_a_cache_line(monkeypatch, path):
    # 64-byte vector loads and stores must not straddle two cache lines (malloc gives 16 bytes)
    from eightbit.quant import _vbmi

    if path == "vbmi" and not _vbmi.compiled_with_vbmi():
        pytest.skip("this CPU has no AVX-512 VBMI")
    monkeypatch.setenv("EIGHTBIT_CPU_PATH", path)
    for shape, dtype in [((3, 256), np.float32), ((5, 3, 100), np.float32), ((37,), np.uint8),
                         ((2, 1 << 16), np.uint32)]:
        a = _native.aligned_empty(shape, dtype)
        assert (a.shape, a.dtype, a.flags.c_contiguous) == (shape, dtype, True)
        assert a.ctypes.data % 64 == 0
    t = _native.code_table(create_codebook("dynamic", signed=False))
    arrays = [t.table, t.codebook, *_native.vbmi_tables(t), _native.scratch(3, 256)]
    assert all(a.ctypes.data % 64 == 0 for a in arrays if a is not None)
    assert (_native.vbmi_tables(t)[1] is not None) == (path == "vbmi")
    copy = _native.aligned(np.arange(1000, dtype=np.int16).reshape(10, 100)[:, ::3])
    assert copy.ctypes.data % 64 == 0
    assert np.array_equal(copy, np.arange(1000, dtype=np.int16).reshape(10, 100)[:, ::3])


@pytest.mark.parametrize("enabled", [True, False])
def test_run_parts_pauses_the_garbage_collector_and_restores_it(torch_threads, enabled):
    # paused while kernels run (a first call compiles, and collector passes slowed that), then
    # left as the caller had it, also when a part raises
    torch_threads(2)
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        seen = []
        _native.run_parts(lambda part, count: seen.append(gc.isenabled()), 4)
        assert seen == [False] * 4
        assert gc.isenabled() == enabled

        def failing(part, count):
            raise ValueError("part")

        with pytest.raises(ValueError):
            _native.run_parts(failing, 4)
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("threads", [1, 2])
def test_every_part_split_gives_the_same_codes(torch_threads, threads):
    # parts split the blocks at different places; the skewed absmax of quantize crosses them
    x = torch.randn(170_001)
    x[84992:85248] = 0.0  # a zero block next to the boundary of two parts
    torch_threads(threads)
    codebook = create_codebook("dynamic", signed=True)
    assert_identical(x, codebook)
    codes, absmax = both(x, codebook)[1]
    ours, theirs = torch.empty(x.shape), torch.empty(x.shape)
    _native.dequantize(codes, absmax, codebook, 256, ours)
    _torch.dequantize(codes, absmax, codebook, 256, theirs)
    assert torch.equal(ours, theirs)


def test_python_threads_quantizing_at_once_each_get_their_own_team(torch_threads):
    # each calling thread is the master of its own OpenMP team (or pool): four threads that
    # quantize at the same time get the codes one thread gets alone
    torch_threads(2)
    codebook = create_codebook("dynamic", signed=True)
    inputs = [torch.randn(300_000, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    alone = [both(x, codebook)[1] for x in inputs]
    results = [None] * 4

    def quantize(k):
        for _ in range(5):
            codes, absmax = torch.empty(300_000, dtype=torch.uint8), torch.empty(1172)
            _native.quantize(inputs[k], codes, absmax, codebook, 256)
        results[k] = codes, absmax

    threads = [threading.Thread(target=quantize, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for (codes, absmax), (want_codes, want_absmax) in zip(results, alone, strict=True):
        assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax)


def _run(code: str, env: dict) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_process_forked_after_the_kernels_ran_uses_them_too():
    # a DataLoader worker, say: the parent's compiled kernels serve it, on Python threads (the
    # parent's kernels ran on torch's OpenMP team, which does not survive a fork). The child
    # compares nothing with torch ops: after the parent used its OpenMP team, torch's own
    # multi-threaded ops hang in a forked child (libgomp), with or without eightbit.
    out = _run(
        """
        import multiprocessing, torch
        from eightbit.quant import _native, quantize_blockwise
        x = torch.randn(300000)
        parent = quantize_blockwise(x).codes.numpy()

        def child(queue):
            torch.set_num_threads(2)
            queue.put((_native.kernels() is not None, _native.team().why,
                       quantize_blockwise(x).codes.numpy()))

        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue,))
        process.start()
        served, why, codes = queue.get(timeout=60)
        process.join()
        print(served, (codes == parent).all(), process.exitcode)
        print(why)
        """,
        {},
    )
    lines = out.splitlines()
    assert lines[0].split() == ["True", "True", "0"]
    assert lines[1].startswith("Python threads (a forked process")


def test_import_eightbit_does_not_import_numba():
    out = _run(
        """
        import sys
        import eightbit, eightbit.quant, eightbit.functional, eightbit.optim
        print("numba" in sys.modules)
        """,
        {},
    )
    assert out.strip() == "False"


@pytest.mark.slow
def test_kernels_are_cached_on_disk_across_processes(tmp_path):
    code = """
        import torch
        from eightbit.quant import _native, _numba, quantize_blockwise
        quantize_blockwise(torch.randn(1000))
        print(_native.cache_dir(), _numba.quantize_part.stats.cache_hits)
        """
    env = {"EIGHTBIT_CACHE_DIR": str(tmp_path), "NUMBA_CACHE_DIR": ""}
    first_dir, first_hits = _run(code, env).split(maxsplit=1)
    assert first_dir.startswith(str(tmp_path)) and first_hits.startswith("Counter()")
    assert list(tmp_path.rglob("*quantize*.nbi")), "no index file in the cache directory"
    second_dir, second_hits = _run(code, env).split(maxsplit=1)
    assert second_dir == first_dir and second_hits.strip() != "Counter()"


def test_other_projects_numba_functions_keep_numba_s_own_cache(tmp_path):
    (tmp_path / "theirs.py").write_text(
        "import numba\n\n@numba.njit(cache=True)\ndef twice(x):\n    return 2 * x\n"
    )
    code = """
        import types, numba, torch
        from eightbit.quant import quantize_blockwise
        quantize_blockwise(torch.randn(10))  # eightbit's kernels are loaded
        import theirs
        print(theirs.twice(21))
        anonymous = types.FunctionType(theirs.twice.py_func.__code__, {})  # __module__ is None
        print(numba.njit(cache=True)(anonymous)(5))
        """
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NUMBA_CACHE_DIR": ""}
    assert _run(code, env).split() == ["42", "10"]
    assert list((tmp_path / "__pycache__").glob("theirs.twice*.nbi"))


def test_table_is_exact_for_every_bin_of_the_dynamic_map():
    # Independent of the kernels: the table entry of each bin, applied to the bin's edges,
    # gives searchsorted's count.
    codebook = create_codebook("dynamic", signed=True)
    table = _native.code_table(codebook).table
    mids = midpoints(codebook).numpy()
    k = np.arange((0x3F800000 >> 16) + 1, dtype=np.uint32)
    for sign in (0, 1):
        for low in (0, 0xFFFF):
            bits = (np.uint32(sign << 31) | (k << np.uint32(16)) | np.uint32(low)).astype(np.uint32)
            y = bits.view(np.float32)
            entry = table[bits >> 16]
            y_low = (bits ^ np.where(sign, 0xFFFF, 0)) & 0xFFFF
            code = (entry + y_low) >> 16  # the carry into bit 16 counts the one inside
            assert np.array_equal(code, np.searchsorted(mids, y))


@functools.cache
def _table_code():
    """The nearest-code table's reading for one fp32 value ``y`` (|y| <= 1) as a numba function,
    as ``quant._intrinsics._encode16`` documents it: ``(entry + low) >> 16``, the entry at the
    top 16 bits of y, ``low`` its low 16 bits (flipped for negative values)."""
    from eightbit.quant._intrinsics import f32_bits
    from numba import njit

    @njit(inline="always")
    def table_code(y, table):
        u = np.uint32(f32_bits(y))
        flip = np.uint32(0xFFFF) if u >> np.uint32(31) else np.uint32(0)
        low = (u ^ flip) & np.uint32(0xFFFF)
        return np.uint8((np.uint64(table[u >> np.uint32(16)]) + np.uint64(low)) >> np.uint64(16))

    return table_code


@functools.cache
def _sweep_kernel():
    """A numba kernel: for every fp32 value in [0, 1] and its negative, 64 at a time, whether
    encode64 (the register search, where the CPU has VBMI) gives the nearest-code table's code
    (:func:`_table_code`, checked above against searchsorted), raised to ``floor`` for positive
    values (issue 17's rule (b)). Returns the mismatches and the values seen."""
    from eightbit.quant._vbmi import encode64
    from numba import njit

    nearest_code = _table_code()

    @njit(error_model="numpy")
    def sweep(table, search, stride, floor):
        values = np.empty(64, np.float32)
        bits = values.view(np.uint32)
        ours, expected = np.empty(64, np.uint8), np.empty(64, np.uint8)
        wrong, seen = 0, 0
        for sign in (np.uint32(0), np.uint32(0x80000000)):
            for first in range(0, 0x3F800000 + 1, 64 * stride):
                for j in range(64):
                    bits[j] = np.uint32(min(first + j * stride, 0x3F800000)) | sign
                encode64(values.ctypes.data, np.float32(1.0), search.ctypes.data, ours.ctypes.data,
                         floor)
                for j in range(64):
                    code = nearest_code(values[j], table)
                    expected[j] = max(code, floor) if values[j] > 0 else code
                for j in range(64):
                    wrong += ours[j] != expected[j]
                seen += 64
        return wrong, seen

    return sweep


def _needs_vbmi():
    from eightbit.quant import _vbmi

    if not _vbmi.compiled_with_vbmi():
        pytest.skip("encode64 runs only on a CPU with AVX-512 VBMI; its search table is checked "
                    "on every CPU by test_the_search_table_read_as_documented_gives_exact_codes")


def _search_model(search: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The codes encode64 finds for fp32 ``y`` (|y| <= 1), read from ``search`` the way
    ``quant._vbmi.search_table`` documents it, in numpy: the table's meaning, checked on every
    CPU (encode64, the same reading in AVX-512 VBMI registers, runs only where the CPU has it)."""
    from eightbit.quant import _vbmi

    key = _vbmi._order_keys(y)
    row = np.clip((key >> 23) & 0xFF, 64, 191)  # the sign and octave; tiny octaves share a row
    control = search[_vbmi.SEARCH_CONTROL + (row & 127)].astype(np.uint32)
    first = search[_vbmi.SEARCH_FIRST + (row & 127)].astype(np.uint32)
    shift = control & 7  # 7 minus the mantissa bits that pick the cell
    field = (((key >> 16) & 0xFF) >> shift) & ((np.uint32(1) << (7 - shift)) - 1)
    cell = ((first + field) & 0xFF) | ((control >> 7) << 8)
    j = search[_vbmi.SEARCH_COMPARE + cell].astype(np.uint32)
    threshold = sum(search[_vbmi.SEARCH_KEYS + 256 * k + j].astype(np.uint32) << (8 * k)
                    for k in range(3))
    above = (key & 0xFFFFFF) > threshold
    return (j + (above & (control & 0x40 == 0))).astype(np.uint8)


def _assert_search_table_exact(codebook: torch.Tensor) -> None:
    """The register search's table of ``codebook``, read by :func:`_search_model`, gives
    np.searchsorted's code on :func:`_edge_values`."""
    mids = midpoints(codebook).numpy()
    search = _vbmi_search(mids)
    assert search is not None and search.size == 1536, "the codebook fits the register search"
    values = _edge_values(codebook)
    wrong = np.flatnonzero(_search_model(search, values) != np.searchsorted(mids, values))
    assert wrong.size == 0, f"{wrong.size} wrong, e.g. y={values[wrong[:4]]}"


@pytest.mark.parametrize(("name", "signed"), CODEBOOKS)
def test_the_search_table_read_as_documented_gives_exact_codes(name, signed):
    # On every CPU: the register search's table, read as search_table documents (a numpy model,
    # _search_model), gives np.searchsorted's code (an independent oracle) on the values where
    # it could go wrong (every threshold, its neighbours, every cell edge) and a strided sweep
    # of all fp32 values in [-1, 1]; where the CPU has VBMI the tests below run encode64 itself.
    _assert_search_table_exact(create_codebook(name, signed=signed))


@pytest.mark.parametrize("seed", range(6))
def test_the_search_table_model_is_exact_on_structured_codebooks(seed):
    codebook = _structured_codebook(seed)
    assert codebook is not None
    _assert_search_table_exact(codebook)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "signed"), CODEBOOKS)
def test_the_register_search_agrees_with_the_table_on_every_fp32_value(name, signed):
    # Every fp32 bit pattern with |y| <= 1 (2.1e9 values) for the default maps, every 7th for
    # the others: the three-level byte search of quant._vbmi.encode64 must give the
    # nearest-code table's code exactly; on the unsigned maps, with rule (b)'s floor (the code
    # after zero's for every positive value) as the optimizer states use them.
    _needs_vbmi()
    t = _native.code_table(create_codebook(name, signed=signed))
    assert _vbmi_search(t.mids).size == 1536, "every built-in codebook fits the register search"
    stride = 1 if name == "dynamic" else 7
    floor = np.uint8(0 if signed else t.zero_code + 1)
    wrong, seen = _sweep_kernel()(t.table, _vbmi_search(t.mids), stride, floor)
    assert seen >= 2 * 0x3F800000 // stride
    assert wrong == 0


def _structured_codebook(seed: int) -> torch.Tensor:
    """256 increasing values with the register search's edge cases: octaves crowded with codes
    (rows split into many cells), octaves with one code, empty octaves between them (rows
    without thresholds, whose neighbours' last cells compare across a gap), thresholds exactly
    at powers of two (values at 0.75 and 1.25 of one) and on cell edges (values on a
    power-of-two grid), different octaves on each side of zero, and zero. Drawn again until the
    register search fits them (at most 512 cells; the first draw does for these seeds)."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        sides = []
        for size in (127, 128):
            octaves = rng.choice(np.arange(-40, 0), size=12, replace=False)
            weights = 0.5 ** np.arange(12)  # half of the values in one octave, a quarter ...
            values = set()
            for octave, per in zip(octaves, rng.multinomial(size - 12, weights / weights.sum())
                                   + 1, strict=True):
                slots = 2 ** int(np.ceil(np.log2(per)))  # thresholds on a 1/(2 slots) grid
                grid = rng.choice(slots, size=per, replace=False) / slots
                values.update(float(1 + m) * 2.0**octave for m in grid)
                if rng.random() < 0.3:
                    values.update((0.75 * 2.0**octave, 1.25 * 2.0**octave))
            values = sorted(values)
            sides.append(rng.choice(values, size=size, replace=False) if len(values) >= size
                         else None)
        if sides[0] is None or sides[1] is None:
            continue
        codebook = np.sort(np.concatenate([-sides[0], [0.0], sides[1]])).astype(np.float32)
        if np.unique(codebook).size == 256 and _vbmi_search(
                midpoints(torch.from_numpy(codebook)).numpy()) is not None:
            return torch.from_numpy(codebook)
    return None


@functools.cache
def _encode_kernel():
    """A numba kernel: ``codes[i]`` = encode64's code of ``values[i]`` (y = values / 1), 64 at
    a time; the caller pads to a multiple of 64."""
    from eightbit.quant._vbmi import encode64
    from numba import njit

    @njit(error_model="numpy")
    def encode(values, table, search, codes):
        for s in range(0, values.size, 64):
            encode64(values.ctypes.data + 4 * s, np.float32(1.0), search.ctypes.data,
                     codes.ctypes.data + s, np.uint8(0))

    return encode


def _edge_values(codebook: torch.Tensor) -> np.ndarray:
    """:func:`adversarial`'s values (every threshold and its neighbours two ulps either way,
    both edges of every 16-bit-prefix bin, which are every cell edge of the search: a row
    splits at most 7 mantissa bits deep), the thresholds' third neighbours, and every 997th
    fp32 value in [-1, 1], both signs; zeros pad them to a multiple of 64."""
    t = midpoints(codebook).numpy().view(np.uint32).astype(np.int64)
    third = (t[:, None] + np.array([-3, 3])[None, :]).reshape(-1)
    sweep = np.arange(0, 0x3F800000 + 1, 997, dtype=np.int64)
    more = np.concatenate([third & 0x7FFFFFFF, sweep]).astype(np.uint32).view(np.float32)
    more = more[np.abs(more) <= 1]
    values = np.concatenate([adversarial(codebook).numpy(), more, -more])
    return np.concatenate([values, np.zeros((-values.size) % 64, np.float32)])


@pytest.mark.parametrize("seed", range(6))
def test_the_register_search_is_exact_on_structured_codebooks(seed):
    # Against np.searchsorted (an independent oracle: the number of thresholds below y), on the
    # values where the search could go wrong, for codebooks built to exercise its edge cases.
    _needs_vbmi()
    codebook = _structured_codebook(seed)
    assert codebook is not None
    mids = midpoints(codebook).numpy()
    t = _native.code_table(codebook)
    assert _vbmi_search(t.mids).size == 1536, "the structured codebooks fit the register search"
    values = _edge_values(codebook)
    codes = np.empty(values.size, np.uint8)
    _encode_kernel()(values, t.table, _vbmi_search(t.mids), codes)
    expected = np.searchsorted(mids, values, side="left")
    wrong = np.flatnonzero(codes != expected)
    assert wrong.size == 0, f"{wrong.size} wrong, e.g. y={values[wrong[:4]]}"
    assert_identical(with_unit_absmax(torch.from_numpy(values)), codebook)
    assert_identical(torch.randn(50_000) * 10.0 ** torch.randint(-12, 1, (50_000,)), codebook)


def test_codebooks_the_register_search_cannot_serve_fall_back_to_the_table():
    # A threshold at exactly zero (its two keys, +0 and -0, would split equal values),
    # octaves that each need all 128 cells (two thresholds 1.5/128 of an octave apart, in five
    # octaves: 640 cells, more than 512), and a threshold below 2**-62: no search table, while
    # the nearest-code table still serves them; quantize stays exact.
    symmetric = torch.linspace(-1, 1, 256)  # the midpoint of -1/255 and 1/255 is 0.0
    assert midpoints(symmetric).eq(0).any()
    crowded = [2.0**-k * (1 + j * 1.5 / 128) for k in range(1, 6) for j in range(3)]
    rest = torch.linspace(-1, -0.01, 256 - len(crowded))
    crowded = torch.cat([rest, torch.tensor(crowded)]).sort().values
    # a threshold below 2**-62 (2**-71, between 0 and 2**-70): inside the row that the search
    # shares among all octaves below 2**-62
    tiny = torch.cat([torch.linspace(-1, -0.01, 127), torch.tensor([0.0, 2.0**-70]),
                      torch.linspace(0.01, 1, 127)])
    for codebook in (symmetric, crowded, tiny):
        assert _vbmi_search(midpoints(codebook).numpy()) is None
        t = _native.code_table(codebook)
        assert t.table is not None and _native.vbmi_tables(t)[1] is None
        assert_identical(with_unit_absmax(adversarial(codebook)), codebook)
        assert_identical(torch.randn(20000), codebook)


@pytest.mark.parametrize(("name", "signed"), CODEBOOKS)
def test_dequantize_reads_every_code_of_every_codebook_exactly(name, signed):
    # 64 codes per lookup (dequantize_run), then a ragged rest one by one: every code, in both
    # halves of the byte-plane tables, against brute force, with scales 0, NaN, inf and subnormal.
    codebook = create_codebook(name, signed=signed)
    gen = torch.Generator().manual_seed(1)
    codes = torch.cat([torch.randperm(256, generator=gen) for _ in range(8)]).to(torch.uint8)
    scales = torch.tensor([1.0, 0.0, float("nan"), float("inf"), 1e-40, -3.5, 7e30, 0.123])
    for n in (2048, 2047, 1985, 64, 63, 1):
        absmax = scales.repeat_interleave(256)[:n:64].contiguous()
        ours = torch.empty(n)
        _native.dequantize(codes[:n], absmax, codebook, 64, ours)
        expected = codebook[codes[:n].long()] * absmax.repeat_interleave(64)[:n]
        assert torch.equal(ours.isnan(), expected.isnan())
        assert torch.equal(ours.nan_to_num(), expected.nan_to_num())


_FALLBACK = """
    import sys, torch
    from eightbit.quant import _vbmi, _native, create_codebook
    from eightbit.optim import Adam8bit, Lion8bit, RMSprop8bit
    assert not _vbmi.compiled_with_vbmi(), "no override"
    out = {"describe": _native.describe()}
    codebook = create_codebook("dynamic", signed=True)
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(20, generator=gen)
    out["dequantized"] = torch.empty(5000)
    _native.dequantize(codes, absmax, codebook, 256, out["dequantized"])
    x = torch.randn(5000, generator=gen) * torch.logspace(-20, 5, 5000)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q = torch.empty(5000, dtype=torch.uint8), torch.empty(20)
        _native.quantize(x.to(dtype), *q, codebook, 256)
        out[f"quantized {dtype}"] = q
    for cls in (Adam8bit, Lion8bit, RMSprop8bit):
        p = torch.nn.Parameter(torch.randn(5000, generator=gen))
        opt = cls([p], lr=1e-2)
        for _ in range(3):
            p.grad = torch.randn(5000, generator=gen)
            opt.step()
        out[cls.__name__] = (p.detach(), {k: v for k, v in opt.state[p].items()})
    # the portable search's code, compiled apart (the kernels' cached code cannot be inspected)
    from numba import njit, types
    from eightbit.quant._intrinsics import encode_block
    probe = njit(lambda x, c, n, m, a, t, z: encode_block(x, c, n, m, a, t, None, z, False))
    i64 = types.int64
    probe.compile((i64, i64, i64, types.uint32, i64, i64, types.uint8))
    out["asm"] = probe.inspect_asm(probe.signatures[0])
    torch.save(out, sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 CPU names")
def test_avx2_code_gathers_and_gets_the_same_numbers(tmp_path):
    # numba compiles for the CPU that NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name (an AVX2 one
    # here), and keys its cache by it: the child takes the portable path, with AVX2's gathers
    # spelled out (LLVM would scalarize llvm.masked.gather for haswell). Its results must be
    # bit-identical to this process's (VBMI where the host has it) for the same inputs.
    result = tmp_path / "fallback.pt"
    env = {"NUMBA_CPU_NAME": "haswell",
           "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2",
           "EIGHTBIT_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_CACHE_DIR": "",
           "EIGHTBIT_CPU_PATH": "auto"}
    subprocess.run([sys.executable, "-c", textwrap.dedent(_FALLBACK), str(result)],
                   env={**os.environ, **env}, check=True, timeout=600)
    theirs = torch.load(result, weights_only=True)
    assert "portable" in theirs["describe"]
    assert "vpgatherdd" in theirs["asm"] and "zmm" not in theirs["asm"]
    local = tmp_path / "local.pt"
    subprocess.run([sys.executable, "-c", textwrap.dedent(_FALLBACK.replace(
        '    assert not _vbmi.compiled_with_vbmi(), "no override"\n',
        "")), str(local)], env={**os.environ, "NUMBA_CACHE_DIR": "", "EIGHTBIT_CPU_PATH": "auto"},
        check=True, timeout=600)
    ours = torch.load(local, weights_only=True)
    assert torch.equal(ours["dequantized"], theirs["dequantized"])
    for dtype in ("float32", "float16", "bfloat16"):
        for mine, other in zip(ours[f"quantized torch.{dtype}"],
                               theirs[f"quantized torch.{dtype}"], strict=True):
            assert torch.equal(mine.isnan(), other.isnan()), dtype  # fp16 overflows to inf
            assert torch.equal(mine.nan_to_num(), other.nan_to_num()), dtype
    for name in ("Adam8bit", "Lion8bit", "RMSprop8bit"):
        (p1, s1), (p2, s2) = ours[name], theirs[name]
        assert torch.equal(p1, p2), name
        assert s1.keys() == s2.keys()
        for key in s1:
            assert torch.equal(s1[key], s2[key]), (name, key)


def test_the_package_uses_only_numba_s_public_api():
    # numba's internals (numba.core, numba._*, numba.np.*) change between releases; the
    # kernels may use numba, numba.extending and llvmlite only.
    root = Path(__file__).resolve().parents[2]
    private = re.compile(r"numba\.(core|_(?!_)\w+|np\.|misc)|from numba import _")
    offenders = [f"{path.relative_to(root)}:{n}: {line.strip()}"
                 for folder in ("quant", "functional", "optim", "eightbit")
                 for path in (root / folder).rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if private.search(line)]
    assert not offenders, "\n".join(offenders)


def test_a_bad_backend_value_is_reported_and_raises_a_clear_error(monkeypatch):
    monkeypatch.setenv(_native.ENV, "bogus")
    assert "bogus" in _native.describe() and "torch" in _native.describe()
    with pytest.raises(ValueError, match="EIGHTBIT_CPU_BACKEND='bogus' is not one of"):
        quantize_blockwise(torch.randn(10))
    monkeypatch.setenv(_native.ENV, "auto")
    monkeypatch.setenv("EIGHTBIT_CPU_PATH", "bogus")
    assert "EIGHTBIT_CPU_PATH='bogus'" in _native.describe()
    with pytest.raises(ValueError, match="EIGHTBIT_CPU_PATH='bogus' is not one of"):
        quantize_blockwise(torch.randn(10))


@pytest.mark.slow
def test_numba_failing_to_import_with_any_error_falls_back_to_the_torch_path(tmp_path):
    # A numba that raises something other than ImportError on import (a broken install, an
    # incompatible llvmlite): the torch path serves, and `python -m eightbit` says why.
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text("raise RuntimeError('numba is broken')\n")
    code = """
        import torch
        from eightbit.__main__ import report
        from eightbit.quant import dequantize_blockwise, quantize_blockwise
        x = torch.randn(1000)
        assert (dequantize_blockwise(quantize_blockwise(x)) - x).abs().max() < 0.1
        print(report())
        """
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           _native.ENV: "auto"}
    out = _run(code, env)
    assert "torch path (numba does not import: RuntimeError: numba is broken)" in out


def test_python_m_eightbit_reports_a_bad_setting_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "eightbit"], capture_output=True, text=True,
                            env={**os.environ, _native.ENV: "bogus"}, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "EIGHTBIT_CPU_BACKEND='bogus' is not one of" in result.stdout
