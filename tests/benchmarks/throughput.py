"""Blockwise quantize / dequantize throughput next to a plain tensor copy.

GB/s counts the bytes an operation must read plus the bytes it must write (10^9 bytes per GB):
for ``n`` fp32 values and block size 256, quantize reads 4n and writes n codes + 4n/256 absmax;
dequantize reads those and writes 4n; a copy reads 4n and writes 4n. Operations are interleaved
round by round like the step timings, and each reports the median of its rounds. eightbit's
operations run once per fused CPU path (contenders.cpu_paths). Before timing, each quantizer's
round trip is run once and its mean absolute error reported, so a fast but wrong result cannot
hide in the table.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from .contenders import cpu_paths, on_env, path_name, quiet_import
from .timing import interleaved, reps_for

BLOCK = 256


@dataclasses.dataclass
class Throughput:
    """One operation: median seconds, GB/s, and the round-trip error of its quantizer pair."""

    name: str
    numel: int
    median_s: float | None = None
    gbps: float | None = None
    roundtrip_err: float | None = None
    note: str = ""


@dataclasses.dataclass
class _Op:
    name: str
    run: Callable[[], object]
    nbytes: int
    roundtrip: Callable[[], torch.Tensor] | None = None


def _eightbit_ops(x: torch.Tensor, n: int, qbytes: int) -> list[_Op]:
    """quantize and dequantize on each fused CPU path (contenders.cpu_paths), named by it."""
    from eightbit.quant import dequantize_blockwise, num_blocks, quantize_blockwise

    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(num_blocks(n, BLOCK))
    q = quantize_blockwise(x, block_size=BLOCK, out=(codes, absmax))
    y = torch.empty_like(x)
    ops = []
    for path, env in cpu_paths() or [(None, ())]:
        env = dict(env)
        ops += [
            _Op(path_name("eightbit quantize_blockwise", path), on_env(env, lambda: (
                quantize_blockwise(x, block_size=BLOCK, out=(codes, absmax)))), 4 * n + qbytes,
                on_env(env, lambda: quantize_blockwise(x, block_size=BLOCK).dequantize())),
            _Op(path_name("eightbit dequantize_blockwise", path),
                on_env(env, lambda: dequantize_blockwise(q, out=y)), qbytes + 4 * n),
        ]
    return ops


def _bitsandbytes_ops(bnb, x: torch.Tensor, n: int, qbytes: int) -> list[_Op]:
    F = bnb.functional
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(-(-n // BLOCK))
    code = F.create_dynamic_map(signed=True)
    F.quantize_blockwise(x, code=code, absmax=absmax, out=codes, blocksize=BLOCK)

    def roundtrip():
        c, state = F.quantize_blockwise(x, code=code, blocksize=BLOCK)
        return F.dequantize_blockwise(c, state)

    return [
        _Op("bitsandbytes quantize_blockwise", lambda: F.quantize_blockwise(
            x, code=code, absmax=absmax, out=codes, blocksize=BLOCK), 4 * n + qbytes, roundtrip),
        _Op("bitsandbytes dequantize_blockwise", lambda: F.dequantize_blockwise(
            codes, absmax=absmax, code=code, blocksize=BLOCK), qbytes + 4 * n),  # no CPU out=
    ]


def _torchao_ops(qu, x: torch.Tensor, n: int, qbytes: int) -> list[_Op]:
    qmap = torch.tensor(qu.create_dynamic_map(signed=True))

    def quantize():
        scaled, scale = qu.scale_tensor(x, BLOCK)
        return qu.quantize_8bit_with_qmap(scaled, qmap), scale

    def roundtrip():
        c, s = quantize()
        return qu.dequant_with_qmap(c, qmap, s)

    codes, scale = quantize()
    return [
        _Op("torchao quantize (eager)", quantize, 4 * n + qbytes, roundtrip),
        _Op("torchao dequantize (eager)", lambda: qu.dequant_with_qmap(codes, qmap, scale),
            qbytes + 4 * n),
    ]


def _timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def measure(
    numel: int, *, reps: int, min_reps: int, budget_s: float, families=None, log=print
) -> list[Throughput]:
    """Throughput of the copy and of every available quantizer on ``numel`` fp32 values
    (of the libraries in ``families`` only, when given).

    After a warm-up call, each operation is timed ``clamp(budget_s / its first timed call,
    min_reps, reps)`` times in all, interleaved with the others.
    """
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    dst = torch.empty_like(x)
    qbytes = numel + 4 * -(-numel // BLOCK)
    ops = [_Op("torch copy_ (fp32)", lambda: dst.copy_(x), 8 * numel)]
    results = []
    for label, module, build in (
        ("eightbit", "eightbit.quant", lambda m: _eightbit_ops(x, numel, qbytes)),
        ("bitsandbytes", "bitsandbytes", lambda m: _bitsandbytes_ops(m, x, numel, qbytes)),
        ("torchao", "torchao.optim.quant_utils", lambda m: _torchao_ops(m, x, numel, qbytes)),
    ):
        if families is not None and label not in families:
            continue
        mod, why = quiet_import(module)
        try:
            ops += build(mod) if mod is not None else []
        except Exception as error:
            why = f"failed: {type(error).__name__}: {error}"
        if why:
            results.append(Throughput(f"{label} quantize / dequantize", numel, note=why))
    timed = {op.name: Throughput(op.name, numel) for op in ops}
    probes = []
    for op in ops:
        if op.roundtrip is not None:  # the round trip doubles as the quantizer's warm-up
            timed[op.name].roundtrip_err = float((op.roundtrip().float() - x).abs().mean())
        else:
            op.run()
        probes.append(_timed(op.run)())
    counts = [reps_for(p, reps=reps, min_reps=min_reps, budget_s=budget_s) - 1 for p in probes]
    # operations of a few ms each: a copy's spinning OpenMP workers would slow the next one
    timings = interleaved([_timed(op.run) for op in ops], counts, settle_s=0.02)
    for op, probe, times in zip(ops, probes, timings, strict=True):
        res = timed[op.name]
        res.median_s = statistics.median([probe] + times)
        res.gbps = op.nbytes / res.median_s / 1e9
        log(f"    {op.name:<36} {res.median_s * 1e3:9.2f} ms {res.gbps:7.2f} GB/s")
    return list(timed.values()) + results
