"""Peak process memory of one optimizer, measured in a fresh subprocess per contender.

Why a subprocess and the kernel's peak RSS: torch allocates tensor memory outside Python's
allocator, so ``tracemalloc`` does not see it, and a peak in a shared process would hold every
contender's memory at once. Each child imports only its contender's library, makes ``numel`` fp32
parameters as one tensor and their gradients (after a small warm-up run of the same optimizer),
reads its resident set size (``VmRSS`` of
/proc/self/status), resets the kernel's peak (writing 5 to /proc/self/clear_refs), builds the
optimizer, runs ``steps`` steps and reads the peak (``VmHWM``). The difference is what the
optimizer added at its worst moment: its state plus any temporaries of the step (and, for a
compiled contender, the compiler's own memory). ``getrusage().ru_maxrss`` would not do: a child
started by ``subprocess`` inherits the parent's peak through exec. Run as a module::

    python -m tests.benchmarks.memory "torch Adam fused" 16777216 3
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .contenders import all_contenders

ROOT = Path(__file__).resolve().parents[2]  # the child imports tests.benchmarks from here
# glibc raises its mmap threshold after large frees, after which freed, still-resident heap
# memory would be reused unseen; a fixed threshold maps (and unmaps) every large block.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
STEPS = 2  # the first step creates the state, the second is a steady one
# A small run first loads the code the optimizer touches (lazy imports, shared-library pages,
# numba caches), which would otherwise count as the optimizer's memory.
WARMUP_NUMEL = 1 << 16


@dataclasses.dataclass
class PeakMemory:
    """Peak RSS in bytes before the optimizer existed and after its steps."""

    name: str
    numel: int
    before: int | None = None
    peak: int | None = None
    note: str = ""

    @property
    def extra_per_param(self) -> float | None:
        if self.peak is None:
            return None
        return (self.peak - self.before) / self.numel


def _status(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (peak memory needs Linux)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS


def _child(name: str, numel: int, steps: int) -> dict:
    family = name.split()[0]
    contender = next(c for c in all_contenders(family) if c.name == name)
    if contender.missing:
        return {"note": contender.missing}
    gen = torch.Generator().manual_seed(0)
    for n, measured in ((WARMUP_NUMEL, False), (numel, True)):
        params = [torch.nn.Parameter(torch.randn(n, generator=gen))]
        params[0].grad = torch.randn(n, generator=gen) * 1e-2
        before = _status("VmRSS")
        _reset_peak()
        optimizer = contender.make(params)
        for _ in range(steps):
            contender.step(optimizer)
        if measured:
            return {"before": before, "peak": _status("VmHWM")}
        del params, optimizer


def measure(
    names: list[str], numel: int, *, steps: int = STEPS, deadline: float | None = None, log=print
) -> list[PeakMemory]:
    """One subprocess per contender name; failures become notes, never exceptions. Past
    ``deadline`` (a ``time.perf_counter()`` value) no further subprocess starts."""
    results = []
    for name in names:
        res = PeakMemory(name, numel)
        if deadline is not None and time.perf_counter() > deadline:
            res.note = "not measured (time limit)"
            log(f"    {name:<30} {res.note}")
            results.append(res)
            continue
        cmd = [sys.executable, "-m", __name__, name, str(numel), str(steps)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                                  env=CHILD_ENV)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode or not lines:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                res.note = f"failed (exit {proc.returncode}): {last[:120]}"
            else:
                out = json.loads(lines[-1])
                res.before, res.peak = out.get("before"), out.get("peak")
                res.note = out.get("note", "")
        except subprocess.TimeoutExpired:
            res.note = "timed out after 600 s"
        if res.peak is not None:
            log(f"    {name:<30} peak {res.peak / 2**20:8.0f} MiB, "
                f"optimizer +{res.extra_per_param:5.2f} B/param")
        else:
            log(f"    {name:<30} {res.note}")
        results.append(res)
    return results


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
