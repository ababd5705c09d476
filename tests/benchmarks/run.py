"""`make bench`: eightbit's optimizers against torch.optim, bitsandbytes and torchao on the CPU.

Run from the repository root::

    python -m tests.benchmarks.run            # full run (< 10 min on 2 cores), writes the results
                                              # (python tests/benchmarks/run.py works too)
    python -m tests.benchmarks.run --quick    # about a minute, prints only
    python -m tests.benchmarks.run --only eightbit bitsandbytes --sizes 16M --layouts 1

Measures, in one process with the contenders interleaved (see steps.py for the method):
optimizer.step() time at each size and layout, as a ratio to torch.optim.Adam(fused=True) in the
same run; optimizer-state bytes per parameter; quantize / dequantize throughput next to a copy
(throughput.py); and peak process memory per contender in fresh subprocesses (memory.py).
eightbit runs on each of its fused CPU paths this machine has (AVX-512 VBMI and portable, or
portable only; contenders.cpu_paths), and the header names the CPU's features. The
full run writes tests/benchmarks/RESULTS.md (its CPU section), cpu_bench.png, and the table in
the README's Performance section.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, python tests/benchmarks/run.py (PEP 366)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.benchmarks"

from . import bench_native, memory, report, steps, throughput  # noqa: E402
from .contenders import BASELINE, all_contenders, cpu_paths, select  # noqa: E402
from .timing import keep_awake, parse_size  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MIN_STEPS = 20  # the median is over at least this many steps unless the cell says otherwise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a one-minute look: 1M and 16M parameters, fewer steps, no memory "
                         "subprocesses, nothing written")
    ap.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                    help="parameter counts, e.g. 1M,16M,64M (default; quick: 1M,16M)")
    ap.add_argument("--layouts", type=lambda s: [int(x) for x in s.split(",")],
                    help="number of equal tensors the parameters are cut into (default 1,64)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="contenders whose name contains one of these (the baseline always runs)")
    ap.add_argument("--reps", type=int, help="timed steps per contender and cell, at most "
                    "(default 40; quick 15)")
    ap.add_argument("--min-reps", type=int, help="timed steps at least, however slow "
                    "(default 5; quick 3)")
    ap.add_argument("--budget", type=float, help="seconds of timed steps per contender and cell "
                    "before the step count drops below --reps (default 10; quick 2)")
    ap.add_argument("--max-step-s", type=float, help="a contender whose step takes longer is not "
                    "timed at that size (default 5; quick 1.5)")
    ap.add_argument("--memory-size", type=parse_size, default=16 << 20,
                    help="parameters for the state and peak-memory table (default 16M)")
    ap.add_argument("--throughput-size", type=parse_size,
                    help="fp32 values for the quantize / dequantize throughput (default 16M; "
                         "quick 4M)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--keep-awake", action=argparse.BooleanOptionalAction, default=True,
                    help="while timing, keep the CPUs out of idle with a SCHED_IDLE busy loop per "
                         "core (default on; see timing.keep_awake)")
    ap.add_argument("--time-limit", type=float,
                    help="seconds the run aims to stay within (default 480; quick 70): when the "
                         "step timings pass 65%% of it, the remaining sizes time only fast "
                         "optimizers with fewer steps, and memory subprocesses that would start "
                         "after it are left out")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction,
                    help="write RESULTS.md, the PNG and the README table (default: full runs only)")
    args = ap.parse_args(argv)
    quick = args.quick
    defaults = dict(sizes=[1 << 20, 16 << 20] if quick else [1 << 20, 16 << 20, 64 << 20],
                    layouts=[1, 64], reps=15 if quick else 40,
                    min_reps=3 if quick else 5, budget=2.0 if quick else 10.0,
                    max_step_s=1.5 if quick else 5.0, write=not quick,
                    time_limit=70.0 if quick else 480.0,
                    throughput_size=4 << 20 if quick else 16 << 20)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.no_memory = args.no_memory or quick
    args.late_cells = []  # cells timed with the LATE settings
    if min(args.reps, args.min_reps) < 1 or args.min_reps > args.reps:
        ap.error("need 1 <= --min-reps <= --reps")
    for n in args.sizes:
        for k in args.layouts:
            if k < 1 or n % k:
                ap.error(f"{k} tensors do not divide {n} parameters evenly")
    return args


def _log(text: str = "") -> None:
    print(text, flush=True)


def _predictions(done: list[steps.StepResult], n_tensors: int, numel: int) -> dict[str, float]:
    """Each contender's step time at ``numel``, scaled linearly from its largest smaller size."""
    out = {}
    for r in done:
        if r.n_tensors == n_tensors and r.median_s and r.numel < numel:
            out[r.name] = r.median_s * numel / r.numel
    return out


# Past this fraction of --time-limit, the remaining step timings shrink to these settings.
STEPS_SHARE, LATE = 0.65, dict(min_reps=3, budget_s=2.0, max_step_s=1.5)


def _time_steps(args, contenders, started: float) -> list[steps.StepResult]:
    results: list[steps.StepResult] = []
    for n_tensors in args.layouts:
        for numel in sorted(args.sizes):
            _log(f"\noptimizer.step(), {report.cell_label(numel, n_tensors)} "
                 f"({numel:,} fp32 parameters in {n_tensors} tensor(s))")
            settings = dict(min_reps=args.min_reps, budget_s=args.budget,
                            max_step_s=args.max_step_s)
            if time.perf_counter() - started > STEPS_SHARE * args.time_limit:
                settings = {k: min(v, settings[k]) for k, v in LATE.items()}
                args.late_cells.append(report.cell_label(numel, n_tensors))
                _log(f"    behind --time-limit {args.time_limit:g} s: {settings}")
            cell = steps.time_cell(
                contenders, numel, n_tensors, reps=args.reps, **settings,
                predicted=_predictions(results, n_tensors, numel), log=_log)
            base = next(r.median_s for r in cell if r.name == BASELINE)
            for r in cell:
                if r.median_s is not None:
                    _log(f"    {r.name:<30} {r.median_s * 1e3:10.2f} ms  x{r.median_s / base:7.2f}"
                         f"  ({r.steps} steps, first step {r.first_step_s:.2f} s)")
            results += cell
            gc.collect()  # the cell's parameters and states go before the next cell's arrive
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    contenders = select(all_contenders(), args.only)
    cpu = report.cpu_line([path for path, _ in cpu_paths()])
    _log(f"eightbit benchmarks ({'quick' if args.quick else 'full'}) on {report.machine()}")
    _log(report.versions())
    _log(cpu)
    for c in contenders:
        if c.missing:
            _log(f"  {c.name}: {c.missing}")
    with keep_awake(args.keep_awake):
        results = _time_steps(args, contenders, started)
        _log(f"\nquantize / dequantize, {args.throughput_size:,} fp32 values, block 256")
        through = throughput.measure(args.throughput_size, reps=args.reps, min_reps=3,
                                     budget_s=args.budget / 2, log=_log,
                                     families={c.family for c in contenders})
    # memory before first use: the first-use compiles run in full, and took the time limit's
    # share that the peak-memory subprocesses are given
    memory_numel = args.memory_size if args.memory_size in args.sizes else max(args.sizes)
    if 1 not in args.layouts:
        memory_numel = None
    peaks: list[memory.PeakMemory] = []
    if not args.no_memory and memory_numel:
        _log(f"\npeak process memory, {memory_numel:,} parameters, one subprocess per optimizer")
        names = [c.name for c in contenders if not c.missing and not c.twin]  # twins: same state
        peaks = memory.measure(names, memory_numel, log=_log,
                               deadline=started + args.time_limit)
    first_use = {}
    if not args.quick and any(c.family == "eightbit" and not c.missing for c in contenders):
        _log("\nfirst use of the fused CPU kernels, fresh processes (empty cache -> cached)")
        first_use = bench_native.compile_times()
        for name, row in first_use.items():
            _log(f"  {name}: {row['cold']['first use']:.2f} s -> {row['warm']['first use']:.2f} s")
    elapsed = time.perf_counter() - started
    tables = {
        "step": report.step_table(results, min_steps=MIN_STEPS),
        "first": report.first_step_table(results),
        "memory": report.memory_table(results, peaks, memory_numel) if memory_numel else None,
        "throughput": report.throughput_table(through),
        "first use": report.first_use_table(first_use) if first_use else None,
        "targets": report.targets_table(results, through, first_use),
    }
    _log(f"\n{report.console(tables['step'])}\n")
    _log(f"{report.console(tables['first'])}\n")
    if tables["memory"]:
        _log(f"{report.console(tables['memory'])}\n")
    _log(f"{report.console(tables['throughput'])}\n")
    if tables["first use"]:
        _log(f"{report.console(tables['first use'])}\n")
    _log(f"{report.console(tables['targets'])}\n")
    _log(f"benchmark run time: {elapsed:.0f} s")
    if args.write:
        command = " ".join(["python -m tests.benchmarks.run", *(sys.argv[1:] if argv is None
                                                                 else argv)])
        load = (load_at_start, os.getloadavg()[0])
        _write(args, tables, results, peaks, memory_numel, elapsed, command, load, cpu)
    return 0


def _write(args, tables, results, peaks, memory_numel, elapsed, command, load, cpu) -> None:
    from .writeup import readme_section, results_section

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = dict(stamp=stamp, machine=report.machine(), versions=report.versions(), cpu=cpu,
                command=command, elapsed=elapsed, memory_numel=memory_numel,
                min_steps=MIN_STEPS, args=args, late=LATE, load=load)
    png = HERE / "cpu_bench.png"
    report.chart(results, peaks, memory_numel or max(args.sizes), png)
    report.replace_section(HERE / "RESULTS.md", results_section(tables, info),
                           title="# Benchmark results\n")
    report.replace_section(ROOT / "README.md", readme_section(tables, info),
                           before="## Development")
    _log(f"wrote {HERE / 'RESULTS.md'}, {png} and the README's Performance section")


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
