"""The text `make bench` writes: its section of RESULTS.md and the README's Performance section."""

from __future__ import annotations

import os
import textwrap

from .memory import STEPS
from .report import BASELINE, markdown

METHOD = """\
How it was measured (tests/benchmarks/, `make bench`):

- **Step time**: median of the timed `optimizer.step()` calls of each optimizer, fp32 parameters
  and gradients, default hyperparameters (lr 1e-3). All optimizers of a size share one process
  and run interleaved, round by round, so machine noise hits them alike. Before each step a
  fresh gradient is copied in from a pool of 3 pre-made ones (outside the timed region). The
  first step is not timed: it creates the state and, for compiled optimizers, compiles (the
  "First step" table). An optimizer gets `clamp({budget:g} s / its second step's time,
  {min_reps}, {reps})` timed steps, so the fast ones get {reps}; cells marked `[n steps]` had
  fewer than {min_steps}, because each of their steps takes a second or more. An optimizer
  whose step would take more than {max_step_s:g} s at a size (predicted from the next smaller
  size; or its second step took twice that) is skipped there, which keeps the run under 10
  minutes on 2 cores.
- **Idle CPUs**: {awake}
- **Ratios** are to `{baseline}` in the same run and the same cell (lower is faster).
- **eightbit's CPU paths**: where the CPU has AVX-512 VBMI, each eightbit optimizer is timed on
  both codebook searches of its fused kernels, "(VBMI)" and "(portable)", in the same rounds, with
  `EIGHTBIT_CPU_PATH` set around each of its steps and restored after; elsewhere only the
  portable path exists and is shown once. A portable row keeps the same state as its VBMI row,
  so its peak memory is not measured again. The targets table holds the portable path to issue
  21's targets and shows the VBMI path against the same figures for information.
- **State B/param**: bytes of all tensors in `optimizer.state` (each storage once; tensor
  subclasses such as torchao's are opened to their inner tensors) divided by the parameter count.
- **Peak RSS**: a fresh subprocess per optimizer runs it once on 65,536 parameters (so that
  lazily loaded code does not count), then makes {memory_size} fp32 parameters and gradients,
  reads its resident set size (VmRSS), resets the kernel's peak (`/proc/self/clear_refs`),
  builds the optimizer, runs {mem_steps} steps and reads the peak (VmHWM). "Peak added" is
  peak - resident before, per parameter: the state plus the step's worst temporaries (plus the
  compiler, for compiled optimizers). The child runs with `MALLOC_MMAP_THRESHOLD_=131072`, so
  that glibc maps every large block afresh instead of reusing freed, still-resident memory
  unseen. `tracemalloc` cannot see torch's allocations, and `ru_maxrss` of a subprocess
  inherits its parent's peak.
- **Throughput**: GB/s = (bytes read + bytes written) / median time; quantize of n fp32 values
  reads 4n and writes n + 4n/256 bytes, dequantize the reverse, a copy reads and writes 4n.
  Each quantizer's round trip error on randn data is shown so that speed cannot hide a wrong
  result.
- torchao's `AdamW8bit` calls `torch.compile` inside `step()`; the "eager" row runs the same
  code under `torch.compiler.set_stance("force_eager")`.
"""


AWAKE = {
    True: "while timing, one busy loop per core at SCHED_IDLE priority (it runs only when "
          "nothing else wants the core) keeps the CPUs out of idle: on these virtual machines an "
          "idle vCPU at times wakes only at the next 4 ms timer tick, which turned every "
          "multi-threaded step into a multiple of 4 ms (`--no-keep-awake` to measure without).",
    False: "measured without the SCHED_IDLE busy loops (`--no-keep-awake`): on virtual machines "
           "whose idle vCPUs wake at timer ticks, short multi-threaded steps are rounded up.",
}


def _short(entry: str) -> str:
    if entry.startswith("not"):
        return "not installed" if "installed" in entry else "n/a"
    if entry.startswith("skipped"):
        return "skipped"
    if entry.startswith("failed"):
        return "failed"
    return entry.split(" (at ")[0]


def _ratio_only(entry: str) -> str:
    if "(" in entry and "x)" in entry:
        return entry[entry.index("(") + 1: entry.index("x)") + 1]
    return _short(entry)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=100, break_on_hyphens=False)


def _wrap_bullets(text: str) -> str:
    """Re-wrap a Markdown text of "- " bullets (after formatting changed its line lengths)."""
    head, *bullets = text.split("\n- ")
    return "\n".join([head] + [
        textwrap.fill(" ".join(b.split()), width=100, initial_indent="- ", subsequent_indent="  ",
                      break_on_hyphens=False) for b in bullets])


def summary_table(tables: dict) -> list[list[str]]:
    """Per optimizer: state bytes per parameter, then the step-time ratio in every cell."""
    step = tables["step"]
    state = {row[0]: row[1] for row in (tables["memory"] or [])[1:]}
    header = ["optimizer", "state B/param"] + [f"step {c}" for c in step[0][1:]]
    rows = [header]
    for row in step[1:]:
        rows.append([row[0], _short(state.get(row[0], "-"))] + [_ratio_only(e) for e in row[1:]])
    return rows


def _method(info: dict) -> str:
    a = info["args"]
    late = ""
    if a.late_cells:
        s = info["late"]
        late = (f"- **Behind the time limit** ({a.time_limit:g} s): the cells "
                f"{', '.join(a.late_cells)} were timed with at least {s['min_reps']} steps, a "
                f"{s['budget_s']:g} s budget, and optimizers slower than {s['max_step_s']:g} "
                "s/step skipped.\n")
    return _wrap_bullets(METHOD.format(
        budget=a.budget, min_reps=a.min_reps, reps=a.reps, min_steps=info["min_steps"],
        max_step_s=a.max_step_s, baseline=BASELINE, mem_steps=STEPS,
        memory_size=f"{(info['memory_numel'] or 0):,}", awake=AWAKE[bool(a.keep_awake)],
    ) + late)


def results_section(tables: dict, info: dict) -> str:
    parts = [
        "## CPU: `make bench`",
        f"Measured {info['stamp']} on {info['machine']}.  \n{info['cpu']}.  \n"
        f"{info['versions']}.  \n"
        f"Command: `{info['command']}` ({info['elapsed'] / 60:.1f} minutes; 1-minute load "
        f"average {info['load'][0]:.1f} at the start, {info['load'][1]:.1f} at the end, on "
        f"{os.cpu_count()} cores; a load above the core count means other work shared the CPUs).",
        "![step time ratios and memory](cpu_bench.png)",
        "### optimizer.step() time: median, and ratio to torch Adam fused in the same cell",
        "Columns: parameters x number of equal tensors.",
        markdown(tables["step"]),
        "### First step: creates the state; for compiled optimizers, includes compiling",
        "The compile time is about the first step minus the median step above.",
        markdown(tables["first"]),
    ]
    if tables["memory"]:
        parts += [f"### Memory at {info['memory_numel']:,} parameters (one tensor)",
                  markdown(tables["memory"])]
    parts += ["### Blockwise quantize / dequantize throughput (block 256)",
              markdown(tables["throughput"])]
    if tables.get("first use"):
        parts += ["### First use of the fused CPU kernels (numba)",
                  "Each in a fresh process with its own empty cache, as on a new machine: the "
                  "first call compiles (numba, then cached on disk), three times, the median "
                  "shown with every run; then a fresh process that loads it. "
                  "Each kernel compiles on its own (they share no compiled helper); numba's "
                  "own start-up (~0.5 s on the Zen 3 VM) is paid once per process, by the first "
                  "kernel.",
                  markdown(tables["first use"])]
    parts += ["### Targets of the fused CPU paths",
              "Issue 21's targets are for the portable path; the VBMI path, where timed, is shown "
              "against the same figures for information.",
              markdown(tables["targets"]), _method(info)]
    return "\n\n".join(parts)


def _baseline_times(tables: dict) -> str:
    header, base = tables["step"][0], next(r for r in tables["step"] if r[0] == BASELINE)
    return ", ".join(f"{entry.split(' (')[0]} at {cell}" for cell, entry in zip(
        header[1:], base[1:], strict=True))


def readme_section(tables: dict, info: dict) -> str:
    intro = (
        "`make bench` times `optimizer.step()` against torch.optim, bitsandbytes and torchao side "
        "by side on your machine (`make bench-quick` for a one-minute look); it installs the peers "
        f"into `.venv` first. On {info['machine']} ({info['stamp'][:10]}), step time relative to "
        "`torch.optim.Adam(fused=True)` in the same run (lower is faster; fp32 parameters; "
        f"columns: parameters x tensors; {BASELINE} itself took {_baseline_times(tables)}) and "
        "optimizer state per parameter:"
    )
    outro = (
        "\"skipped\": a step there would take seconds, more than the 10-minute run allows. Full "
        "tables (milliseconds, peak memory, quantize/dequantize GB/s), the chart and the method: "
        "[tests/benchmarks/RESULTS.md](tests/benchmarks/RESULTS.md)."
    )
    return "\n\n".join(["## Performance", _wrap(intro), markdown(summary_table(tables)),
                        _wrap(f"{info['cpu']}."), _wrap(outro)])
