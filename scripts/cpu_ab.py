"""A/B of the fused CPU kernels: this checkout against an earlier commit, in one process.

    .venv/bin/python scripts/cpu_ab.py [--baseline 2b6a52b] [--numel 16M] [--rounds 9] [--threads 1]
                                       [--shared [--tensors 64]]

The baseline commit is checked out into a temporary git worktree; both trees are imported side
by side under other package names (``eb_base`` and ``eb_head``: a folder of links to each tree's
layers, which import each other relatively), so that every round times torch's fused Adam, the
baseline's and this checkout's optimizers (and this checkout's portable path) back to back.
Load that comes and goes then hits all of them alike; the ratios to fused Adam are what to
compare. Both compile into a temporary numba cache: code cached under the borrowed package
names would not load in a normal import of the same files. Every call is
followed by a 20 ms pause outside the timings: OpenMP workers (torch's, and the baseline's numba
threading layer) spin for a while after a parallel region, and would otherwise slow whatever runs
next; and ``tests.benchmarks.timing.keep_awake`` keeps idle vCPUs from sleeping, as in
``make bench``.

Check a machine with an A/A run first (``--baseline`` = this checkout's own commit): on an AMD
EPYC VM the two copies of identical code differed by up to a third (docs/cpu-kernels.md).

``--shared`` compares the two trees' optimizers on the same memory instead: per optimizer, one
parameter, the baseline's optimizer and this checkout's, this checkout's state tensors replaced
by the baseline's, so both read and write the same memory and only the code differs; steps
alternate and the median of the per-round ratios (this / baseline) is printed, with CPU time of
the calling thread on one thread (other processes' load does not count) and wall time on more.
Repeat it: the ratio still moves from process to process by up to ~10% on a noisy VM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.benchmarks.timing import keep_awake, parse_size  # noqa: E402

LAYERS = ("quant", "functional", "optim")

MEASURE = r"""
import os, runpy, statistics, sys, time, torch
import eb_base, eb_head
numel, rounds = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
interleaved = runpy.run_path(sys.argv[4])["interleaved"]  # tests/benchmarks/timing.py
gen = torch.Generator().manual_seed(0)

def step_of(cls, **kw):
    p = torch.nn.Parameter(torch.randn(numel, generator=gen) * 0.1)
    p.grad = torch.randn(numel, generator=gen) * 0.01
    return cls([p], lr=1e-3, **kw).step

def portable(fn):
    def run():
        os.environ["EIGHTBIT_CPU_PATH"] = "portable"
        try:
            fn()
        finally:
            del os.environ["EIGHTBIT_CPU_PATH"]
    return run

x, dst = torch.randn(numel, generator=gen), torch.empty(numel)
ops = {"torch Adam(fused=True)": step_of(torch.optim.Adam, fused=True)}
for name in ("Adam8bit", "Lion8bit", "RMSprop8bit"):
    ops[f"baseline {name}"] = step_of(getattr(eb_base.optim, name))
    ops[f"this {name}"] = step_of(getattr(eb_head.optim, name))
    ops[f"this {name} (portable)"] = portable(step_of(getattr(eb_head.optim, name)))
ops["copy"] = lambda: dst.copy_(x)
ops["baseline quantize"] = lambda: eb_base.quant.quantize_blockwise(x)
ops["this quantize"] = lambda: eb_head.quant.quantize_blockwise(x)
ops["this quantize (portable)"] = portable(lambda: eb_head.quant.quantize_blockwise(x))
def timed(fn):
    def run():
        start = time.perf_counter(); fn(); return time.perf_counter() - start
    return run

for fn in ops.values():
    fn(); fn()
times = interleaved([timed(fn) for fn in ops.values()], [rounds] * len(ops), settle_s=0.02)
med = {k: statistics.median(v) for k, v in zip(ops, times)}
fused, copy = med["torch Adam(fused=True)"], med["copy"]
print(f"{numel:,} fp32 values, {torch.get_num_threads()} threads, median of {rounds} rounds; "
      f"torch Adam(fused=True) {fused * 1e3:.1f} ms, copy {copy * 1e3:.1f} ms")
for k in ops:
    if k not in ("torch Adam(fused=True)", "copy"):
        base = "copy" if "quantize" in k else "torch Adam(fused=True)"
        print(f"  {k:<30} {med[k] / med[base]:5.2f}x {base}")
"""


SHARED = r"""
import statistics, sys, time, torch
import eb_base, eb_head
numel, rounds, tensors = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[5])
torch.set_num_threads(int(sys.argv[3]))
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
gen = torch.Generator().manual_seed(0)
print(f"{numel:,} fp32 values in {tensors} tensors, {torch.get_num_threads()} threads, {rounds} "
      f"rounds, shared state; median (range) of this / baseline per round")
for name in ("Adam8bit", "Lion8bit", "RMSprop8bit"):
    params = [torch.nn.Parameter(torch.randn(numel // tensors, generator=gen) * 0.1)
              for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
    base = getattr(eb_base.optim, name)(params, lr=1e-3)
    head = getattr(eb_head.optim, name)(params, lr=1e-3)
    base.step(); head.step()
    def quantized(opt, p):
        return sorted(k for k in opt.state[p] if k.endswith(("_codes", "_absmax")))
    for p in params:
        keys = quantized(base, p)
        assert keys and keys == quantized(head, p), (keys, quantized(head, p))
        for key in keys:  # this checkout's optimizer now updates the baseline's state tensors
            head.state[p][key] = base.state[p][key]
    def timed(opt):
        start = clock(); opt.step(); return clock() - start
    timed(base); timed(head)
    ratios, bs, hs = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            b = timed(base); h = timed(head)
        else:  # alternate which goes first
            h = timed(head); b = timed(base)
        ratios.append(h / b); bs.append(b); hs.append(h)
    print(f"  {name:<12} {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
          f"   medians: baseline {statistics.median(bs) * 1e3:.3f} ms, "
          f"this {statistics.median(hs) * 1e3:.3f} ms")
"""


def _package(tree: Path, name: str, into: Path) -> None:
    """``into/name``: links to ``tree``'s eightbit/*.py and its layer folders."""
    pkg = into / name
    pkg.mkdir()
    for f in (tree / "eightbit").glob("*.py"):
        (pkg / f.name).symlink_to(f)
    for layer in LAYERS:
        (pkg / layer).symlink_to(tree / layer)


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/cpu_ab.py")
    ap.add_argument("--baseline", default="2b6a52b", help="commit to compare with")
    ap.add_argument("--numel", type=parse_size, default=16_000_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tensors", type=int, default=1,
                    help="with --shared: the values split over this many parameters")
    ap.add_argument("--no-keep-awake", dest="keep_awake", action="store_false")
    ap.add_argument("--shared", action="store_true",
                    help="both trees' optimizers on the same state tensors (see above)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base),
                        args.baseline], check=True)
        try:
            _package(base, "eb_base", tmp)
            _package(ROOT, "eb_head", tmp)
            env = {**os.environ, "PYTHONPATH": str(tmp), "NUMBA_CACHE_DIR": str(tmp / "cache")}
            env.pop("EIGHTBIT_CPU_PATH", None)
            with keep_awake() if args.keep_awake else contextlib.nullcontext():
                return subprocess.run([sys.executable, "-c", SHARED if args.shared else MEASURE,
                                       str(args.numel),
                                       str(args.rounds), str(args.threads),
                                       str(ROOT / "tests" / "benchmarks" / "timing.py"),
                                       str(args.tensors)],
                                      env=env).returncode
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False)


if __name__ == "__main__":
    raise SystemExit(main())
