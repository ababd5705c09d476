"""Timing ``optimizer.step()`` for several contenders interleaved in one process.

Method, for one cell (a parameter count cut into ``n_tensors`` equal fp32 tensors):

- every contender gets its own copy of the same initial parameters;
- a pool of ``GRAD_POOL`` gradients is made once; before each step the next one in the rotation is
  copied into the contender's ``.grad`` (outside the timed region), so every step sees a gradient
  that differs from the previous one and was freshly written to memory, as after a backward pass;
- one untimed step first: it creates the state, and for compiled contenders compiles (its time
  is kept as ``first_step_s``); the second step, timed, is the probe that sizes the run;
- a contender runs ``clamp(budget_s / probe, min_reps, reps)`` timed steps in all, the probe
  included: the rest in rounds, each contender that still owes steps doing one per round, its
  steps spread evenly over the rounds, so machine noise (frequency changes, other processes)
  hits all contenders alike. The result is the median of its timed steps;
- a contender whose step is predicted (from a smaller size) to take longer than ``max_step_s``,
  or whose probe took twice that, is not timed at that size (the baseline always is).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from .contenders import BASELINE, Contender
from .timing import interleaved, reps_for

GRAD_POOL = 3
# One probe step can be slowed by noise, so it only skips a contender when clearly too slow.
PROBE_SLACK = 2.0


@dataclasses.dataclass
class StepResult:
    """What one contender did in one cell. ``median_s`` is None when it was not timed
    (``note`` says why)."""

    name: str
    numel: int
    n_tensors: int
    median_s: float | None = None
    steps: int = 0
    first_step_s: float | None = None
    state_bytes: int | None = None
    note: str = ""


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``, each storage counted once.

    Tensor subclasses that wrap other tensors (torchao's ``OptimState8bit``: codes, scales and
    codebook) are opened with ``__tensor_flatten__`` and their inner tensors counted.
    """
    seen: dict[tuple[int, int], int] = {}

    def visit(t: torch.Tensor) -> None:
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
            names, _ = t.__tensor_flatten__()
            for name in names:
                visit(getattr(t, name))
            return
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()

    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                visit(value)
    return sum(seen.values())


class _Runner:
    """One contender's parameters, optimizer and counters inside a cell."""

    def __init__(self, contender: Contender, init: list[torch.Tensor]):
        self.contender = contender
        self.params = [torch.nn.Parameter(t.clone()) for t in init]
        for p in self.params:
            p.grad = torch.empty_like(p)
        self.optimizer = contender.make(self.params)
        self.count = 0
        self.reps = 0
        self.probe = 0.0

    def step(self, pool: list[list[torch.Tensor]]) -> float:
        for p, g in zip(self.params, pool[self.count % len(pool)], strict=True):
            p.grad.copy_(g)
        self.count += 1
        start = time.perf_counter()
        self.contender.step(self.optimizer)
        return time.perf_counter() - start


def time_cell(
    contenders: list[Contender],
    numel: int,
    n_tensors: int,
    *,
    reps: int,
    min_reps: int,
    budget_s: float,
    max_step_s: float,
    predicted: dict[str, float] | None = None,
    log=print,
) -> list[StepResult]:
    """Time every available contender at ``numel`` parameters in ``n_tensors`` tensors.

    ``predicted`` maps a contender name to a step time expected at this size (e.g. scaled from
    a smaller size); contenders predicted above ``max_step_s`` are skipped before they start.
    """
    size = numel // n_tensors
    gen = torch.Generator().manual_seed(numel + n_tensors)
    init = [torch.randn(size, generator=gen) for _ in range(n_tensors)]
    pool = [[torch.randn(size, generator=gen) * 1e-2 for _ in range(n_tensors)]
            for _ in range(GRAD_POOL)]
    results = {c.name: StepResult(c.name, numel, n_tensors) for c in contenders}
    runners: list[_Runner] = []
    for c in contenders:
        res = results[c.name]
        guess = (predicted or {}).get(c.name)
        if c.missing:
            res.note = c.missing
        elif guess is not None and guess > max_step_s and c.name != BASELINE:
            res.note = f"skipped (~{guess:.1f} s/step predicted)"
        else:
            try:
                runner = _Runner(c, init)
                res.first_step_s = runner.step(pool)
                runner.probe = runner.step(pool)
            except Exception as error:  # a contender that fails is reported, the run goes on
                res.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
                log(f"    {c.name}: {res.note}")
                continue
            if runner.probe > PROBE_SLACK * max_step_s and c.name != BASELINE:
                res.note = f"skipped ({runner.probe:.1f} s/step)"
                res.state_bytes = state_nbytes(runner.optimizer)
                continue
            runner.reps = reps_for(runner.probe, reps=reps, min_reps=min_reps, budget_s=budget_s)
            runners.append(runner)
    timings = interleaved([lambda r=r: r.step(pool) for r in runners],
                          [r.reps - 1 for r in runners])
    for r, times in zip(runners, timings, strict=True):
        res = results[r.contender.name]
        res.median_s = statistics.median([r.probe] + times)
        res.steps = 1 + len(times)
        res.state_bytes = state_nbytes(r.optimizer)
    return [results[c.name] for c in contenders]
