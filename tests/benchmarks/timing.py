"""Interleaved repetition, shared by the step and the throughput benchmarks, and keep_awake."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable

# A busy loop that the kernel runs only when nothing else wants the core (SCHED_IDLE). If the
# policy cannot be set, the child exits instead of competing at normal priority.
_IDLE_SPIN = (
    "import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True: pass"
)


@contextlib.contextmanager
def keep_awake(enabled: bool = True):
    """Keep every CPU out of its idle state while timing, with one SCHED_IDLE busy loop per core.

    Why: on some virtual machines (these among them, at times) a vCPU that went idle wakes only
    at the next timer tick, so every multi-threaded operation that waits for a sleeping worker
    takes a multiple of 4 ms, whatever its real cost. A SCHED_IDLE task never delays a normal
    one (any normal task that becomes runnable preempts it), so it only removes those idle exits.
    """
    procs = []
    if enabled and hasattr(os, "SCHED_IDLE"):
        procs = [subprocess.Popen([sys.executable, "-c", _IDLE_SPIN])
                 for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def parse_size(text: str) -> int:
    """A positive element count from the command line: ``4096``, ``64K``, ``16M``."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    value = int(text[:-1] if scale > 1 else text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return value * scale


def reps_for(predicted_s: float, *, reps: int, min_reps: int, budget_s: float) -> int:
    """``clamp(budget_s / predicted_s, min_reps, reps)``: how many timed runs a thing gets."""
    return max(min_reps, min(reps, int(budget_s / max(predicted_s, 1e-9))))


def interleaved(runs: list[Callable[[], float]], counts: list[int], *,
                settle_s: float = 0.0) -> list[list[float]]:
    """Call ``runs[k]`` ``counts[k]`` times, round-robin, and return each one's timings.

    Each ``run()`` returns the seconds it measured. In every round each run that still owes
    calls makes one, its calls spread evenly over the rounds (Bresenham), so noise that comes
    and goes during the benchmark hits every contender alike. ``settle_s``: a pause after each
    call, outside the timings, so that OpenMP workers still spinning after one contender's
    parallel region (torch's spin for milliseconds) do not slow the next one.
    """
    rounds = max(counts, default=0)
    times: list[list[float]] = [[] for _ in runs]
    for i in range(rounds):
        for run, count, out in zip(runs, counts, times, strict=True):
            if (i + 1) * count // rounds > i * count // rounds:
                out.append(run())
                if settle_s:
                    time.sleep(settle_s)
    return times
