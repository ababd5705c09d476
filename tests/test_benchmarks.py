"""`make bench`'s bookkeeping, on synthetic results: the targets table, the CPU-feature header,
the per-path contenders and their environment switch. Nothing here is timed or asserts a time."""

import argparse
import os
import time

import pytest
from eightbit.quant import _vbmi

from eightbit.__main__ import cpu_features, report
from tests.benchmarks import contenders, throughput, writeup
from tests.benchmarks import report as bench_report
from tests.benchmarks.contenders import BASELINE, PORTABLE, VBMI, Contender
from tests.benchmarks.steps import StepResult
from tests.benchmarks.throughput import Throughput

M16 = 16 << 20
# powers of two, so that every ratio below is exact in floating point
BASE_S = 2.0**-7


def _step(name: str, ratio: float, numel: int = M16, n_tensors: int = 1) -> StepResult:
    return StepResult(name, numel, n_tensors, median_s=ratio * BASE_S, steps=20)


def _results(paths: dict[str, dict[str, float]], bnb: float | None = 16.0) -> list[StepResult]:
    """Step results at the target cell: the baseline, each path's optimizers at the given ratios
    to it, and bitsandbytes; plus a 1M cell whose ratios would fail every target."""
    out = [_step(BASELINE, 1.0), _step(BASELINE, 1.0, numel=1 << 20)]
    for path, ratios in paths.items():
        for name, r in ratios.items():
            out += [_step(f"eightbit {name} ({path})", r),
                    _step(f"eightbit {name} ({path})", 64.0, numel=1 << 20)]
    if bnb is not None:
        out.append(_step("bitsandbytes Adam8bit", bnb))
    return out


def _through(quantize: dict[str, float], copy: float = 8.0) -> list[Throughput]:
    out = [Throughput("torch copy_ (fp32)", M16, median_s=1.0, gbps=copy)]
    out += [Throughput(f"eightbit quantize_blockwise ({p})", M16, median_s=1.0, gbps=g)
            for p, g in quantize.items()]
    return out


def _by_row(rows: list[list[str]]) -> dict[tuple[str, str], tuple[str, str]]:
    assert rows[0] == ["target (16M fp32 parameters, one tensor)", "path", "measured", "met"]
    table = {(what, path): (measured, met) for what, path, measured, met in rows[1:]}
    assert len(table) == len(rows) - 1, "a target row is repeated"
    return table


ADAM = f"Adam8bit step <= 1.5x {BASELINE}"
LION = f"Lion8bit step <= 1x {BASELINE}"
RMSPROP = f"RMSprop8bit step <= 1x {BASELINE}"
QUANTIZE = "quantize_blockwise >= 50% of a copy's GB/s"
BNB = "Adam8bit step >= 10x faster than bitsandbytes Adam8bit"
INFO = f"{VBMI} (for information)"


def test_targets_hold_the_portable_path_to_issue_21_and_show_vbmi_for_information():
    results = _results({
        PORTABLE: {"Adam8bit": 1.5, "Lion8bit": 1.25, "RMSprop8bit": 1.0},
        VBMI: {"Adam8bit": 1.0, "Lion8bit": 0.5, "RMSprop8bit": 0.75},
    }, bnb=16.0)
    first_use = {"Adam8bit float32": {"cold": {"first use": 1.5, "path": VBMI},
                                      "warm": {"first use": 0.25, "path": VBMI}},
                 "quantize float32": {"cold": {"first use": 2.5, "path": VBMI},
                                      "warm": {"first use": 0.25, "path": VBMI}}}
    rows = _by_row(bench_report.targets_table(
        results, _through({PORTABLE: 3.0, VBMI: 4.0}), first_use))
    assert rows == {
        (ADAM, PORTABLE): ("1.50x", "yes"),  # the bounds are inclusive
        (LION, PORTABLE): ("1.25x", "no"),
        (RMSPROP, PORTABLE): ("1.00x", "yes"),
        (QUANTIZE, PORTABLE): ("38%", "no"),
        (BNB, PORTABLE): ("10.7x", "yes"),  # 16 / 1.5
        (ADAM, INFO): ("1.00x", "yes"),
        (LION, INFO): ("0.50x", "yes"),
        (RMSPROP, INFO): ("0.75x", "yes"),
        (QUANTIZE, INFO): ("50%", "yes"),
        (BNB, INFO): ("16.0x", "yes"),
        ("first use of Adam8bit float32 < 2 s (compiling, fresh cache)", VBMI): ("1.50 s", "yes"),
        ("first use of quantize float32 < 2 s (compiling, fresh cache)", VBMI): ("2.50 s", "no"),
    }


def test_without_vbmi_the_targets_name_only_the_portable_path():
    results = _results({PORTABLE: {"Adam8bit": 3.0, "Lion8bit": 0.75, "RMSprop8bit": 1.0}})
    rows = _by_row(bench_report.targets_table(results, _through({PORTABLE: 5.0})))
    assert {path for _, path in rows} == {PORTABLE}
    assert rows[(ADAM, PORTABLE)] == ("3.00x", "no")
    assert rows[(LION, PORTABLE)] == ("0.75x", "yes")
    assert rows[(QUANTIZE, PORTABLE)] == ("62%", "yes")
    assert rows[(BNB, PORTABLE)] == ("5.33x", "no")


def test_targets_that_were_not_timed_say_so():
    # no bitsandbytes, Lion8bit skipped, no eightbit quantizer: never a met/unmet guess
    results = _results({PORTABLE: {"Adam8bit": 1.25, "RMSprop8bit": 0.5}}, bnb=None)
    rows = _by_row(bench_report.targets_table(results, _through({})))
    for what in (LION, QUANTIZE, BNB):
        assert rows[(what, PORTABLE)] == ("not measured", "-"), what
    assert rows[(ADAM, PORTABLE)] == ("1.25x", "yes")
    assert [r[1] for r in bench_report.targets_table([], [])[1:]] == [PORTABLE] * 5


@pytest.mark.parametrize("cpuinfo, machine, expected", [
    ("flags\t\t: fpu sse2 avx avx2 fma bmi2\n", "x86_64",
     "x86_64 with AVX2, no AVX-512F, no AVX-512 VBMI"),
    ("flags : avx2 avx512f avx512bw avx512vbmi avx512_vbmi2\n", "x86_64",
     "x86_64 with AVX2, AVX-512F, AVX-512 VBMI"),
    # VBMI2 is another extension: it does not imply VBMI's permutes
    ("flags : avx2 avx512f avx512bw avx512_vbmi2\n", "x86_64",
     "x86_64 with AVX2, AVX-512F, no AVX-512 VBMI"),
    ("processor : 0\nFeatures : fp asimd evtstrm aes crc32\n", "aarch64", "aarch64 with NEON"),
])
def test_cpu_features_read_from_proc_cpuinfo(cpuinfo, machine, expected):
    assert cpu_features(cpuinfo, machine) == expected


def test_python_m_eightbit_names_the_cpu_features_and_the_path(monkeypatch):
    def line() -> str:
        (found,) = [x for x in report().splitlines() if x.startswith("CPU features")]
        return found

    monkeypatch.setenv(_vbmi.PATH_ENV, "portable")
    assert line().endswith("CPU kernel path: portable")
    assert cpu_features() in line()
    monkeypatch.setenv(_vbmi.PATH_ENV, "auto")
    path = "AVX-512 VBMI" if _vbmi.compiled_with_vbmi() else "portable"
    assert line().endswith(f"CPU kernel path: {path}")


def test_cpu_line_names_each_path_that_ran():
    both = bench_report.cpu_line([VBMI, PORTABLE], features="x86_64 with AVX2")
    assert both.startswith("CPU: x86_64 with AVX2; ")
    assert f"({VBMI})" in both and f"({PORTABLE})" in both and "EIGHTBIT_CPU_PATH" in both
    alone = bench_report.cpu_line([PORTABLE], features="aarch64 with NEON")
    assert f"({PORTABLE})" in alone and f"({VBMI})" not in alone
    assert "torch path" in bench_report.cpu_line([], features="x86_64")


class _Recording:
    """A stand-in optimizer whose step notes the path setting it saw, then fails."""

    seen: list[str | None] = []

    def step(self):
        self.seen.append(os.environ.get(_vbmi.PATH_ENV))
        raise RuntimeError("step failed")


@pytest.mark.parametrize("before", [None, "auto"])
def test_a_path_contender_sets_its_path_only_around_its_step(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(_vbmi.PATH_ENV, raising=False)
    else:
        monkeypatch.setenv(_vbmi.PATH_ENV, before)
    twin = Contender("eightbit X (portable)", "eightbit", None,
                     env=((_vbmi.PATH_ENV, "portable"),), cpu_path=PORTABLE, twin=True)
    _Recording.seen = []
    with pytest.raises(RuntimeError, match="step failed"):
        twin.step(_Recording())
    assert _Recording.seen == ["portable"]
    assert os.environ.get(_vbmi.PATH_ENV) == before


def _eightbit_names() -> list[str]:
    return [c.name for c in contenders.all_contenders("eightbit") if c.cpu_path]


def test_every_eightbit_optimizer_runs_once_per_path(monkeypatch):
    monkeypatch.setenv(_vbmi.PATH_ENV, "portable")
    assert _eightbit_names() == [f"eightbit {n} ({PORTABLE})"
                                 for n in contenders.EIGHTBIT_OPTIMIZERS]
    monkeypatch.setenv(_vbmi.PATH_ENV, "auto")
    paths = [VBMI, PORTABLE] if _vbmi.compiled_with_vbmi() else [PORTABLE]
    rows = [c for c in contenders.all_contenders("eightbit") if c.cpu_path]
    assert [c.name for c in rows] == [f"eightbit {n} ({p})" for n in contenders.EIGHTBIT_OPTIMIZERS
                                      for p in paths]
    assert [c.twin for c in rows] == [p != paths[0] for _ in contenders.EIGHTBIT_OPTIMIZERS
                                      for p in paths]
    assert all(dict(c.env) == {_vbmi.PATH_ENV: c.cpu_path.lower()} for c in rows)
    monkeypatch.setenv("EIGHTBIT_CPU_BACKEND", "torch")  # no fused kernels, no paths
    assert _eightbit_names() == []


def test_quantize_throughput_rows_per_path_give_the_same_codes(monkeypatch):
    monkeypatch.delenv(_vbmi.PATH_ENV, raising=False)
    rows = throughput.measure(5000, reps=2, min_reps=1, budget_s=0.0, families={"eightbit"},
                              log=lambda *_: None)
    paths = [p for p, _ in contenders.cpu_paths()]
    quantizers = {t.name: t for t in rows if "quantize_blockwise" in t.name
                  and "dequantize" not in t.name}
    assert list(quantizers) == [f"eightbit quantize_blockwise ({p})" for p in paths]
    errors = {t.roundtrip_err for t in quantizers.values()}
    assert len(errors) == 1 and 0 < errors.pop() < 0.02  # the signed map's error on randn
    assert os.environ.get(_vbmi.PATH_ENV) is None


def test_results_and_readme_sections_carry_the_cpu_line():
    results = _results({PORTABLE: {"Adam8bit": 2.0}, VBMI: {"Adam8bit": 1.0}})
    tables = {"step": bench_report.step_table(results, min_steps=20),
              "first": bench_report.first_step_table(results), "memory": None,
              "throughput": bench_report.throughput_table(_through({PORTABLE: 4.0})),
              "targets": bench_report.targets_table(results, _through({PORTABLE: 4.0}))}
    args = argparse.Namespace(budget=10.0, min_reps=5, reps=40, max_step_s=5.0, late_cells=[],
                              keep_awake=True, time_limit=540.0)
    cpu = bench_report.cpu_line([VBMI, PORTABLE], features="x86_64 with AVX2")
    info = dict(stamp="2026-12-06 03:00 UTC", machine="a CPU", versions="v", cpu=cpu,
                command="python -m tests.benchmarks.run", elapsed=60.0, memory_numel=None,
                min_steps=20, args=args, late={}, load=(0.5, 1.0))
    flat = " ".join(writeup.results_section(tables, info).split())
    assert cpu in flat
    readme = writeup.readme_section(tables, info)
    assert cpu in " ".join(readme.split())
    assert f"| eightbit Adam8bit ({PORTABLE}) | - | 64.0x | 2.00x |" in readme


def test_interleaved_spreads_calls_round_robin_and_settles_after_each():
    from tests.benchmarks import timing

    order = []

    def run(name):
        def call():
            order.append((name, time.perf_counter()))
            return 0.0
        return call

    times = timing.interleaved([run("a"), run("b")], [4, 2], settle_s=0.005)
    assert [len(t) for t in times] == [4, 2]
    assert [n for n, _ in order] == ["a", "a", "b", "a", "a", "b"]
    gaps = [b - a for (_, a), (_, b) in zip(order[:-1], order[1:], strict=True)]
    assert min(gaps) >= 0.005  # the pause follows every call, outside the timings


def test_first_use_table_shows_the_median_compile_and_every_run():
    first_use = {"Adam8bit float32": {"cold": {"first use": 1.5, "path": PORTABLE},
                                      "warm": {"first use": 0.25, "path": PORTABLE},
                                      "cold runs": [1.2, 1.5, 2.1]}}
    header, row = bench_report.first_use_table(first_use)
    assert header[2] == "empty cache (compiles): median (runs)"
    assert row == ["Adam8bit float32", PORTABLE, "1.50 s (1.20, 1.50, 2.10)", "0.25 s"]
