"""The fused CPU path (numba) on its targets, as ratios measured in one run.

    python -m tests.benchmarks.bench_native [--numel 16M] [--rounds 15] [--no-compile]

* optimizer.step() of Adam8bit, Lion8bit and RMSprop8bit at ``numel`` fp32 parameters (one
  tensor) against torch.optim.Adam(fused=True) on the same parameter (issue 21's targets on the
  portable path: Adam8bit <= 1.5x, Lion8bit and RMSprop8bit <= 1.0x);
* quantize_blockwise / dequantize_blockwise bandwidth against a plain tensor copy: target >= 50%
  (bytes read + written, as in throughput.py: quantize moves 5 bytes per fp32 value, a copy 8);
* first use of each kernel in a fresh process: compiling it into an empty cache (target
  < 2 s), and loading it once cached.

Where the CPU has AVX-512 VBMI, every eightbit row runs on both fused paths, "(VBMI)" and
"(portable)" (EIGHTBIT_CPU_PATH set around each call; contenders.cpu_paths); elsewhere on the
portable path only. Everything is timed round-robin (timing.interleaved) and reported as
medians, so load that comes and goes hits all contenders alike. Functions for ``make bench``:
:func:`step_times`, :func:`quantize_times`, :func:`compile_times`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .contenders import cpu_paths, on_env, path_name
from .report import cpu_line
from .timing import interleaved, keep_awake, parse_size

M = 1 << 20
BLOCK = 256


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _paths() -> list[tuple[str | None, dict[str, str]]]:
    """Each fused CPU path to time, with its environment; one unnamed entry where the kernels do
    not serve CPU tensors."""
    return [(path, dict(env)) for path, env in cpu_paths()] or [(None, {})]


def step_times(numel: int = 16 * M, rounds: int = 15) -> dict[str, float]:
    """Median seconds of one optimizer.step() per contender, and each one's ratio to fused Adam.

    Returns ``{"torch Adam(fused=True)": s, "Adam8bit (VBMI)": s, ..., "Adam8bit (VBMI) /
    fused": ratio, ...}``, the eightbit names carrying their path (:func:`_paths`).
    """
    from eightbit.optim import Adam8bit, Lion8bit, RMSprop8bit

    gen = torch.Generator().manual_seed(0)
    rules = {
        "Adam8bit": lambda ps: Adam8bit(ps, lr=1e-3, block_size=BLOCK),
        "Lion8bit": lambda ps: Lion8bit(ps, lr=1e-4, block_size=BLOCK),
        "RMSprop8bit": lambda ps: RMSprop8bit(ps, lr=1e-3, block_size=BLOCK),
    }
    base = "torch Adam(fused=True)"
    contenders = {base: (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), {})}
    for path, env in _paths():
        for name, make in rules.items():
            contenders[path_name(name, path)] = (make, env)
    runs = []
    for make, env in contenders.values():
        p = torch.nn.Parameter(torch.randn(numel, generator=gen))
        p.grad = torch.randn(numel, generator=gen) * 1e-2
        opt = make([p])
        runs.append(functools.partial(_timed, on_env(env, opt.step)))
        runs[-1]()  # state creation and kernel compilation are not timed
    times = interleaved(runs, [rounds] * len(runs))
    out = {name: statistics.median(t) for name, t in zip(contenders, times, strict=True)}
    for name in list(contenders)[1:]:
        out[f"{name} / fused"] = out[name] / out[base]
    return out


def quantize_times(numel: int = 16 * M, rounds: int = 25) -> dict[str, float]:
    """Median seconds of copy, quantize and dequantize (fp32; the eightbit operations once per
    path, named by it), and bandwidth ratios to the copy."""
    from eightbit.quant import dequantize_blockwise, quantize_blockwise

    x = torch.randn(numel)
    y = torch.empty_like(x)
    q = quantize_blockwise(x, block_size=BLOCK)
    out_codes, out_absmax = torch.empty_like(q.codes), torch.empty_like(q.absmax)
    moved_q = 5 * numel + 4 * numel // BLOCK
    ops = {"copy": (lambda: y.copy_(x), {}, 8 * numel)}
    for path, env in _paths():
        ops[path_name("quantize", path)] = (
            lambda: quantize_blockwise(x, block_size=BLOCK, out=(out_codes, out_absmax)), env,
            moved_q)
        ops[path_name("dequantize", path)] = (
            lambda: dequantize_blockwise(q, out=y), env, moved_q + 3 * numel)
    runs = [functools.partial(_timed, on_env(env, op)) for op, env, _ in ops.values()]
    for run in runs:
        run()
    times = interleaved(runs, [rounds] * len(ops))
    out = {name: statistics.median(t) for name, t in zip(ops, times, strict=True)}
    for name, (_, _, moved) in ops.items():
        out[f"{name} GB/s"] = moved / out[name] / 1e9
    for name in list(ops)[1:]:
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
from eightbit.quant import _vbmi
out["path"] = ("torch path" if _native.kernels() is None
               else "VBMI" if _vbmi.in_use() else "portable")
print(json.dumps(out))
"""

FIRST_USES = [("quantize", "float32"), ("dequantize", "float32"), ("Adam8bit", "float32"),
              ("Lion8bit", "float32"), ("RMSprop8bit", "float32"), ("Adam8bit", "bfloat16")]


def compile_times(items=FIRST_USES, repeats: int = 3) -> dict[str, dict]:
    """First use of each kernel, as a user meets it: a fresh process whose first call compiles
    (an empty cache: "cold"), then a fresh process that loads it ("warm"). Seconds of the first
    call, and of the imports before it (torch, eightbit, numba and the kernel modules).

    Each cold run gets its own empty cache, so nothing another kernel compiled is reused (except
    that dequantize's input is quantized, and compiled for, before its timer starts). A kernel
    is compiled ``repeats`` times and the run with the median first use is reported as "cold",
    with every run's time in "cold runs": one compile moved by up to a third with the machine's
    phase on the VMs measured. "warm" loads the last cold run's cache.
    """
    out = {}
    for what, dtype in items:
        colds, warm = [], None
        for repeat in range(repeats):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "EIGHTBIT_CACHE_DIR": cache, "NUMBA_CACHE_DIR": ""}
                env.pop("EIGHTBIT_CPU_BACKEND", None)
                for run in ("cold", "warm") if repeat == repeats - 1 else ("cold",):
                    result = subprocess.run([sys.executable, "-c", _FIRST_USE, what, dtype],
                                            env=env, check=True, capture_output=True, text=True)
                    timed = json.loads(result.stdout.strip().splitlines()[-1])
                    if run == "cold":
                        colds.append(timed)
                    else:
                        warm = timed
        colds.sort(key=lambda timed: timed["first use"])
        out[f"{what} {dtype}"] = {"cold": colds[len(colds) // 2], "warm": warm,
                                  "cold runs": [timed["first use"] for timed in colds]}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_native")
    ap.add_argument("--numel", type=parse_size, default=16 * M)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true", help="skip the first-use timings")
    ap.add_argument("--no-keep-awake", action="store_true",
                    help="let idle CPUs sleep while timing (see timing.keep_awake)")
    args = ap.parse_args(argv)
    with keep_awake(not args.no_keep_awake):
        _report(args)


def _report(args: argparse.Namespace) -> None:
    from eightbit.quant import _native

    print(f"CPU tensors: {_native.describe()}; torch threads: {torch.get_num_threads()}")
    print(cpu_line([path for path, _ in cpu_paths()]))
    print(f"\noptimizer.step(), {args.numel / M:g}M fp32 parameters (median of {args.rounds})")
    for name, value in step_times(args.numel, args.rounds).items():
        shown = f"{value:8.2f}x" if "/" in name else f"{value * 1e3:8.2f} ms"
        print(f"  {name:<40} {shown}")
    print(f"\nquantize / dequantize, {args.numel / M:g}M fp32 values, block {BLOCK}")
    for name, value in quantize_times(args.numel, 2 * args.rounds).items():
        unit = " GB/s" if name.endswith(" GB/s") else "x" if "/" in name else " ms"
        shown = value * 1e3 if unit == " ms" else value
        print(f"  {name.removesuffix(' GB/s'):<40} {shown:8.2f}{unit}")
    if not args.no_compile:
        print("\nfirst use in a fresh process (s): empty cache -> cached")
        for name, row in compile_times().items():
            cold, warm = row["cold"], row["warm"]
            print(f"  {name:<24} {cold['first use']:6.2f} -> {warm['first use']:5.2f}"
                  f"   (imports before it: {cold['import']:.2f}; {cold['path']} path)")


if __name__ == "__main__":
    main()
