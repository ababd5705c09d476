"""Tables (console and Markdown), the PNG chart, and the sections written into RESULTS.md and
the README. Everything here formats numbers measured elsewhere; nothing is timed."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from .contenders import BASELINE, PORTABLE, VBMI, path_name, version_of
from .memory import PeakMemory
from .steps import StepResult
from .throughput import Throughput

BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"


def size_label(numel: int) -> str:
    return f"{numel >> 20}M" if numel % (1 << 20) == 0 else f"{numel:,}"


def cell_label(numel: int, n_tensors: int) -> str:
    return f"{size_label(numel)} x{n_tensors}"


def machine() -> str:
    """One line: CPU model, cores, torch threads, memory, OS."""
    model = platform.processor() or "unknown CPU"
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
        # virtual machines often name only the brand ("AMD EPYC"): the family and model tell
        # the core generation (on AMD, family 25 is Zen 3/4, 26 Zen 5)
        family = re.search(r"cpu family\s*:\s*(\d+)\s+model\s*:\s*(\d+)", info)
        if family:
            model += f" (family {family.group(1)}, model {family.group(2)})"
    except (OSError, AttributeError):
        pass
    try:
        mem_kib = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {mem_kib / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        mem = ""
    return (f"{model}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){mem}, "
            f"{platform.system()} {platform.release()}")


def cpu_features() -> str:
    """The CPU features the fused kernels' speed depends on (``python -m eightbit`` prints the
    same), or the architecture alone where this eightbit cannot say."""
    try:
        from eightbit.__main__ import cpu_features as features
    except ImportError:  # an eightbit older than the feature report
        return platform.machine() or "unknown CPU"
    return features()


def cpu_line(paths: list[str], features: str | None = None) -> str:
    """The header line on the CPU and on which path each eightbit row used: ``paths`` are the
    fused CPU paths timed (contenders.cpu_paths), ``features`` defaults to this CPU's."""
    features = features or cpu_features()
    if VBMI in paths:
        rows = (f"eightbit rows marked ({VBMI}) find codes with AVX-512 VBMI byte permutes, those "
                f"marked ({PORTABLE}) with the portable search (EIGHTBIT_CPU_PATH=portable set "
                "around each of their calls, in the same rounds)")
    elif PORTABLE in paths:
        rows = (f"eightbit rows marked ({PORTABLE}) use the portable search, the only fused path "
                "timed on this machine")
    else:
        rows = "eightbit's fused CPU kernels are not in use here: its rows run the torch path"
    return f"CPU: {features}; {rows}"


def versions() -> str:
    try:
        from eightbit.quant import _native

        cpu_path = _native.describe()
    except Exception as error:  # an older eightbit has no native path to describe
        cpu_path = f"torch path ({type(error).__name__})"
    return (f"python {platform.python_version()}, torch {torch.__version__}, "
            f"eightbit {version_of('eightbit')} (CPU tensors: {cpu_path}), "
            f"bitsandbytes {version_of('bitsandbytes')}, torchao {version_of('torchao')}")


def _cells(results: list[StepResult]) -> list[tuple[int, int]]:
    return sorted({(r.numel, r.n_tensors) for r in results})


def _baseline(results: list[StepResult]) -> dict[tuple[int, int], float | None]:
    return {(r.numel, r.n_tensors): r.median_s for r in results if r.name == BASELINE}


def ratio(result: StepResult, base: dict) -> float | None:
    b = base.get((result.numel, result.n_tensors))
    return result.median_s / b if result.median_s and b else None


def times(x: float) -> str:
    """A ratio: 0.91x, 1.75x, 28.2x, 1,563x."""
    return f"{x:,.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def _step_cell(r: StepResult, base: dict, min_steps: int) -> str:
    if r.median_s is None:
        return r.note or "-"
    ms = r.median_s * 1e3
    text = f"{ms:.3g} ms" if ms < 100 else f"{ms:,.0f} ms"
    x = ratio(r, base)
    text += f" ({times(x)})" if x is not None else ""
    return text + (f" [{r.steps} steps]" if r.steps < min_steps else "")


def step_table(results: list[StepResult], *, min_steps: int) -> list[list[str]]:
    """Rows: contenders; columns: cells; each entry 'median (ratio to the baseline)'."""
    cells, base = _cells(results), _baseline(results)
    names = list(dict.fromkeys(r.name for r in results))
    by = {(r.name, r.numel, r.n_tensors): r for r in results}
    header = ["optimizer.step()"] + [cell_label(*c) for c in cells]
    rows = [[n] + [_step_cell(by[(n, *c)], base, min_steps) if (n, *c) in by else "-"
                   for c in cells] for n in names]
    return [header] + rows


def first_step_table(results: list[StepResult]) -> list[list[str]]:
    """The untimed first step of each contender and cell: state creation, plus compilation for
    compiled contenders (the compile time is about first step - median step)."""
    cells = _cells(results)
    by = {(r.name, r.numel, r.n_tensors): r for r in results}
    rows = [["first step"] + [cell_label(*c) for c in cells]]
    for name in dict.fromkeys(r.name for r in results):
        row = [name]
        for c in cells:
            r = by.get((name, *c))
            row.append(f"{r.first_step_s:.2f} s" if r and r.first_step_s is not None else "-")
        if any(e != "-" for e in row[1:]):
            rows.append(row)
    return rows


TARGET_CELL = (16 << 20, 1)  # the cell the CPU targets are stated for: 16M parameters, one tensor


def first_use_table(first_use: dict) -> list[list[str]]:
    """First use of each fused CPU kernel in a fresh process (bench_native.compile_times)."""
    rows = [["first call in a fresh process", "path", "empty cache (compiles): median (runs)",
             "cached"]]
    for name, row in first_use.items():
        cold, warm = row["cold"]["first use"], row["warm"]["first use"]
        runs = ", ".join(f"{t:.2f}" for t in row.get("cold runs", []))
        rows.append([name, row["cold"].get("path", "-"),
                     f"{cold:.2f} s" + (f" ({runs})" if runs else ""), f"{warm:.2f} s"])
    return rows


# Issue 21's targets for the portable path; the VBMI path is held to the same figures for
# information (its own target there is no slowdown, which needs an A/B of two versions).
STEP_GOALS = (("Adam8bit", 1.5), ("Lion8bit", 1.0), ("RMSprop8bit", 1.0))  # step / BASELINE
QUANTIZE_GOAL = 0.5  # quantize_blockwise GB/s / a copy's GB/s
BITSANDBYTES_GOAL = 10.0  # bitsandbytes Adam8bit step / eightbit Adam8bit step
FIRST_USE_GOAL_S = 2.0  # first call of a kernel in a fresh process, compiling into an empty cache


def targets_table(results: list[StepResult], through: list[Throughput],
                  first_use: dict | None = None) -> list[list[str]]:
    """The fused CPU path's targets, each with the path it was measured on, the measured value,
    and whether it is met. The portable rows are the targets; VBMI rows appear where that path
    was timed, for information."""
    at = {r.name: r.median_s for r in results if (r.numel, r.n_tensors) == TARGET_CELL}
    gbps = {t.name: t.gbps for t in through}
    base, bnb = at.get(BASELINE), at.get("bitsandbytes Adam8bit")
    copy = next((v for k, v in gbps.items() if k.startswith("torch copy")), None)
    rows = [["target (16M fp32 parameters, one tensor)", "path", "measured", "met"]]

    def add(what: str, path: str, value: float | None, goal: float, *, at_most: bool,
            unit: str = "x"):
        if value is None:
            rows.append([what, path, "not measured", "-"])
        else:
            met = value <= goal if at_most else value >= goal
            shown = f"{value:.0%}" if unit == "%" else times(value)
            rows.append([what, path, shown, "yes" if met else "no"])

    def per(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    names = {r.name for r in results} | set(gbps)
    timed_vbmi = any(n.endswith(f" ({VBMI})") for n in names)
    for path in (PORTABLE, VBMI) if timed_vbmi else (PORTABLE,):
        shown = path if path == PORTABLE else f"{path} (for information)"
        for name, goal in STEP_GOALS:
            t = at.get(path_name(f"eightbit {name}", path))
            add(f"{name} step <= {goal:g}x {BASELINE}", shown, per(t, base), goal, at_most=True)
        q = gbps.get(path_name("eightbit quantize_blockwise", path))
        add(f"quantize_blockwise >= {QUANTIZE_GOAL:.0%} of a copy's GB/s", shown, per(q, copy),
            QUANTIZE_GOAL, at_most=False, unit="%")
        t = at.get(path_name("eightbit Adam8bit", path))
        add(f"Adam8bit step >= {BITSANDBYTES_GOAL:g}x faster than bitsandbytes Adam8bit",
            shown, per(bnb, t), BITSANDBYTES_GOAL, at_most=False)
    for name, row in (first_use or {}).items():
        cold = row["cold"]["first use"]
        rows.append([f"first use of {name} < {FIRST_USE_GOAL_S:g} s (compiling, fresh cache)",
                     row["cold"].get("path", "-"), f"{cold:.2f} s",
                     "yes" if cold < FIRST_USE_GOAL_S else "no"])
    return rows


def _mib(b: int | None) -> str:
    return f"{b / 2**20:,.0f} MiB" if b is not None else "-"


def _state_result(name: str, results: list[StepResult], numel: int) -> StepResult | None:
    """``name``'s one-tensor result at ``numel`` if its state was measured there, else the
    largest size where it was, else None."""
    measured = sorted((r for r in results if r.name == name and r.n_tensors == 1
                       and r.state_bytes is not None), key=lambda r: (r.numel == numel, r.numel))
    return measured[-1] if measured else None


def _state(name: str, results: list[StepResult], numel: int) -> str:
    """State bytes per parameter, as text (with the size when it is not ``numel``)."""
    r = _state_result(name, results, numel)
    if r is None:
        here = [r.note for r in results if r.name == name and r.numel == numel]
        return (here or ["-"])[0] or "-"
    return f"{r.state_bytes / r.numel:.2f}" + ("" if r.numel == numel else
                                                 f" (at {size_label(r.numel)})")


def memory_table(results: list[StepResult], peaks: list[PeakMemory], numel: int) -> list[list[str]]:
    """State bytes per parameter (from optimizer.state) and peak process memory."""
    peak_by = {p.name: p for p in peaks}
    header = ["optimizer", "state B/param", "peak RSS", "peak added B/param"]
    rows = [header]
    for r in results:
        if r.numel != numel or r.n_tensors != 1:
            continue
        p = peak_by.get(r.name)
        state = _state(r.name, results, numel)
        if p is None:
            peak, extra = "not measured", "-"
        elif p.peak is None:
            peak, extra = p.note, "-"
        else:
            peak, extra = _mib(p.peak), f"{p.extra_per_param:.2f}"
        rows.append([r.name, state, peak, extra])
    return rows


def throughput_table(results: list[Throughput]) -> list[list[str]]:
    copy = next((t.gbps for t in results if t.name.startswith("torch copy")), None)
    rows = [["operation", "time", "GB/s", "vs copy", "round-trip mean abs err"]]
    for t in results:
        if t.gbps is None:
            rows.append([t.name, t.note, "-", "-", "-"])
            continue
        err = f"{t.roundtrip_err:.5f}" if t.roundtrip_err is not None else ""
        rows.append([t.name, f"{t.median_s * 1e3:,.2f} ms", f"{t.gbps:.2f}",
                     f"{t.gbps / copy:.0%}" if copy else "-", err])
    return rows


def console(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def replace_section(
    path: Path, section: str, *, title: str = "", before: str | None = None
) -> None:
    """Put ``section`` between the BEGIN/END markers of ``path``, leaving the rest untouched.

    Without markers the block is added before the first line starting with ``before`` (when
    given and present), else at the end; a missing file is created starting with ``title``.
    """
    block = f"{BEGIN}\n{section.strip()}\n{END}"
    text = path.read_text() if path.exists() else (f"{title}\n" if title else "")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        match = re.search(rf"^{re.escape(before)}", text, re.M) if before else None
        if match:
            text = text[: match.start()] + block + "\n\n" + text[match.start():]
        else:
            text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def _state_per_param(name: str, results: list[StepResult], numel: int) -> float | None:
    r = _state_result(name, results, numel)
    return r.state_bytes / r.numel if r else None


# One colour family per library, so the chart reads by library first.
_PALETTES = {
    "torch": "Greys", "eightbit": "Greens", "bitsandbytes": "Purples", "torchao": "Oranges",
}


def _colors(names: list[str]) -> dict[str, tuple]:
    import matplotlib

    out = {}
    for family, cmap in _PALETTES.items():
        members = [n for n in names if n.split()[0] == family]
        for k, n in enumerate(members):
            out[n] = matplotlib.colormaps[cmap](0.45 + 0.5 * (k + 1) / (len(members) + 1))
    return out


def chart(results: list[StepResult], peaks: list[PeakMemory], numel: int, path: Path) -> None:
    """Left: step time relative to torch's fused Adam per cell (log scale). Right: optimizer
    state bytes per parameter and peak bytes added per parameter at ``numel`` parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, base = _cells(results), _baseline(results)
    every = list(dict.fromkeys(r.name for r in results))
    colors = _colors(every)
    timed = [n for n in every if any(r.name == n and r.median_s for r in results)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 7), width_ratios=[2.3, 1])
    width = 0.8 / max(len(timed), 1)
    by = {(r.name, r.numel, r.n_tensors): r for r in results}
    for k, name in enumerate(timed):
        xs, ys = [], []
        for i, c in enumerate(cells):
            r = by.get((name, *c))
            x = ratio(r, base) if r else None
            if x is not None:
                xs.append(i + (k - (len(timed) - 1) / 2) * width)
                ys.append(x)
        eager = "eager" in name or "torch path" in name  # hatched: the unfused variants
        portable = name.endswith(f"({PORTABLE})")  # dotted: eightbit's portable path
        left.bar(xs, ys, width, label=name, color=colors.get(name), edgecolor="black", lw=0.3,
                 hatch="///" if eager else ".." if portable else None)
    left.set_yscale("log")
    left.axhline(1.0, color="black", lw=0.8)
    left.set_xticks(range(len(cells)), [cell_label(*c) for c in cells])
    left.set_xlabel("parameters x tensors (a missing bar: not run there, see RESULTS.md)")
    left.set_ylabel(f"step time / {BASELINE} (lower is faster)")
    left.set_title("optimizer.step() on the CPU, all in the same run")
    left.legend(fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    peak_by = {p.name: p.extra_per_param for p in peaks}
    mem = [(n, _state_per_param(n, results, numel), peak_by.get(n)) for n in every]
    mem = [m for m in mem if m[1] is not None or m[2] is not None]
    ys = range(len(mem))
    right.barh([y - 0.2 for y in ys], [m[1] or 0 for m in mem], 0.4, label="optimizer.state",
               color="tab:blue")
    right.barh([y + 0.2 for y in ys], [m[2] or 0 for m in mem], 0.4,
               label="peak RSS added by the optimizer", color="tab:red")
    right.set_yticks(list(ys), [m[0] for m in mem], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("bytes per parameter")
    right.set_title(f"memory, {size_label(numel)} fp32 parameters")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
