"""The fused CPU path (numba) on its targets, as ratios measured in one run.

    python -m tests.benchmarks.bench_native [--numel 16M] [--rounds 15] [--no-compile]

* optimizer.step() of Adam8bit, Lion8bit and RMSprop8bit at ``numel`` fp32 parameters (one
  tensor) against torch.optim.Adam(fused=True) on the same parameter: target <= 2x;
* quantize_blockwise / dequantize_blockwise bandwidth against a plain tensor copy: target >= 50%
  (bytes read + written, as in throughput.py: quantize moves 5 bytes per fp32 value, a copy 8);
* first use of each kernel in a fresh process: compiling it into an empty cache (target
  < 2 s), and loading it once cached.

Everything is timed round-robin (timing.interleaved) and reported as medians, so load that comes
and goes hits all contenders alike. Functions for ``make bench``: :func:`step_times`,
:func:`quantize_times`, :func:`compile_times`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .timing import interleaved, keep_awake

M = 1 << 20
BLOCK = 256


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_times(numel: int = 16 * M, rounds: int = 15) -> dict[str, float]:
    """Median seconds of one optimizer.step() per contender, and each one's ratio to fused Adam.

    Returns ``{"torch Adam(fused=True)": s, "Adam8bit": s, ..., "Adam8bit / fused": ratio}``.
    """
    from eightbit.optim import Adam8bit, Lion8bit, RMSprop8bit

    gen = torch.Generator().manual_seed(0)
    contenders = {
        "torch Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "Adam8bit": lambda ps: Adam8bit(ps, lr=1e-3, block_size=BLOCK),
        "Lion8bit": lambda ps: Lion8bit(ps, lr=1e-4, block_size=BLOCK),
        "RMSprop8bit": lambda ps: RMSprop8bit(ps, lr=1e-3, block_size=BLOCK),
    }
    runs = []
    for make in contenders.values():
        p = torch.nn.Parameter(torch.randn(numel, generator=gen))
        p.grad = torch.randn(numel, generator=gen) * 1e-2
        opt = make([p])
        opt.step()  # state creation and kernel compilation are not timed
        runs.append(lambda opt=opt: _timed(opt.step))
    times = interleaved(runs, [rounds] * len(runs))
    out = {name: statistics.median(t) for name, t in zip(contenders, times, strict=True)}
    base = out["torch Adam(fused=True)"]
    for name in list(contenders)[1:]:
        out[f"{name} / fused"] = out[name] / base
    return out


def quantize_times(numel: int = 16 * M, rounds: int = 25) -> dict[str, float]:
    """Median seconds of copy, quantize and dequantize (fp32), and bandwidth ratios to the copy."""
    from eightbit.quant import dequantize_blockwise, quantize_blockwise

    x = torch.randn(numel)
    y = torch.empty_like(x)
    q = quantize_blockwise(x, block_size=BLOCK)
    out_codes, out_absmax = torch.empty_like(q.codes), torch.empty_like(q.absmax)
    ops = {
        "copy": lambda: y.copy_(x),
        "quantize": lambda: quantize_blockwise(x, block_size=BLOCK, out=(out_codes, out_absmax)),
        "dequantize": lambda: dequantize_blockwise(q, out=y),
    }
    for op in ops.values():
        op()
    times = interleaved([lambda op=op: _timed(op) for op in ops.values()], [rounds] * len(ops))
    out = {name: statistics.median(t) for name, t in zip(ops, times, strict=True)}
    moved = {"copy": 8 * numel, "quantize": 5 * numel + 4 * numel // BLOCK}
    moved["dequantize"] = moved["quantize"] + 3 * numel
    for name in ops:
        out[f"{name} GB/s"] = moved[name] / out[name] / 1e9
    for name in ("quantize", "dequantize"):
        out[f"{name} / copy bandwidth"] = out[f"{name} GB/s"] / out["copy GB/s"]
    return out


_FIRST_USE = """
import json, sys, time
t = time.perf_counter()
import torch
from eightbit.optim import Adam8bit, Lion8bit, RMSprop8bit
from eightbit.quant import dequantize_blockwise, quantize_blockwise
from eightbit.quant import _native
_native.kernels()  # imports numba and the kernel modules; nothing is compiled yet
out = {"import": time.perf_counter() - t}
what, dtype = sys.argv[1], getattr(torch, sys.argv[2])
if what in ("quantize", "dequantize"):
    x = torch.randn(8192, dtype=dtype)
    q = quantize_blockwise(x) if what == "dequantize" else None
    run = (lambda: quantize_blockwise(x)) if q is None else (lambda: dequantize_blockwise(q))
else:
    p = torch.nn.Parameter(torch.randn(8192, dtype=dtype))
    p.grad = torch.randn_like(p)
    run = {"Adam8bit": Adam8bit, "Lion8bit": Lion8bit, "RMSprop8bit": RMSprop8bit}[what](
        [p], lr=1e-3).step
t = time.perf_counter()
run()
out["first use"] = time.perf_counter() - t
print(json.dumps(out))
"""

FIRST_USES = [("quantize", "float32"), ("dequantize", "float32"), ("Adam8bit", "float32"),
              ("Lion8bit", "float32"), ("RMSprop8bit", "float32"), ("Adam8bit", "bfloat16")]


def compile_times(items=FIRST_USES) -> dict[str, dict[str, float]]:
    """First use of each kernel, as a user meets it: a fresh process whose first call compiles
    (an empty cache: "cold"), then a fresh process that loads it ("warm"). Seconds of the first
    call, and of the imports before it (torch, eightbit, numba and the kernel modules).

    Each item gets its own empty cache, so nothing another kernel compiled is reused (except
    that dequantize's input is quantized, and compiled for, before its timer starts).
    """
    out = {}
    for what, dtype in items:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "EIGHTBIT_CACHE_DIR": cache, "NUMBA_CACHE_DIR": ""}
            env.pop("EIGHTBIT_CPU_BACKEND", None)
            row = {}
            for run in ("cold", "warm"):
                result = subprocess.run([sys.executable, "-c", _FIRST_USE, what, dtype],
                                        env=env, check=True, capture_output=True, text=True)
                row[run] = json.loads(result.stdout.strip().splitlines()[-1])
            out[f"{what} {dtype}"] = row
    return out


def _numel(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * M if text.endswith("M") else int(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_native")
    ap.add_argument("--numel", type=_numel, default=16 * M)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true", help="skip the first-use timings")
    ap.add_argument("--no-keep-awake", action="store_true",
                    help="let idle CPUs sleep while timing (see timing.keep_awake)")
    args = ap.parse_args(argv)
    with keep_awake(not args.no_keep_awake):
        _report(args)


def _report(args: argparse.Namespace) -> None:
    from eightbit.quant import _native

    print(f"CPU path: {_native.describe()}; torch threads: {torch.get_num_threads()}")
    print(f"\noptimizer.step(), {args.numel / M:g}M fp32 parameters (median of {args.rounds})")
    for name, value in step_times(args.numel, args.rounds).items():
        shown = f"{value:8.2f}x" if "/" in name else f"{value * 1e3:8.2f} ms"
        print(f"  {name:<26} {shown}")
    print(f"\nquantize / dequantize, {args.numel / M:g}M fp32 values, block {BLOCK}")
    for name, value in quantize_times(args.numel, 2 * args.rounds).items():
        unit = "" if "/" in name else " GB/s" if "GB/s" in name else " ms"
        shown = value * 1e3 if unit == " ms" else value
        print(f"  {name.replace(' GB/s', ''):<26} {shown:8.2f}{unit}")
    if not args.no_compile:
        print("\nfirst use in a fresh process (s): empty cache -> cached")
        for name, row in compile_times().items():
            print(f"  {name:<24} {row['cold']['first use']:6.2f} -> {row['warm']['first use']:5.2f}"
                  f"   (imports before it: {row['cold']['import']:.2f})")


if __name__ == "__main__":
    main()
