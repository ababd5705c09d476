"""Interleaved repetition: the scheduling shared by the step and the throughput benchmarks."""

from __future__ import annotations

from collections.abc import Callable


def reps_for(predicted_s: float, *, reps: int, min_reps: int, budget_s: float) -> int:
    """``clamp(budget_s / predicted_s, min_reps, reps)``: how many timed runs a thing gets."""
    return max(min_reps, min(reps, int(budget_s / max(predicted_s, 1e-9))))


def interleaved(runs: list[Callable[[], float]], counts: list[int]) -> list[list[float]]:
    """Call ``runs[k]`` ``counts[k]`` times, round-robin, and return each one's timings.

    Each ``run()`` returns the seconds it measured. In every round each run that still owes
    calls makes one, its calls spread evenly over the rounds (Bresenham), so noise that comes
    and goes during the benchmark hits every contender alike.
    """
    rounds = max(counts, default=0)
    times: list[list[float]] = [[] for _ in runs]
    for i in range(rounds):
        for run, count, out in zip(runs, counts, times, strict=True):
            if (i + 1) * count // rounds > i * count // rounds:
                out.append(run())
    return times
