"""`make demo`: train one small model with torch.optim.AdamW and eightbit's AdamW8bit side by side.

The model is a character-level language model (an MLP over the previous characters, after Bengio
et al. 2003) trained on this repository's own source text, so nothing is downloaded. Both runs
start from the same seed and see the same batches; each runs in its own process so that its peak
memory is its own. The script prints a table (optimizer state, peak memory, time per step, final
loss) and writes both loss curves to demo_out/loss_curves.png.

    python examples/demo.py                 # ~2 minutes on a 2-core CPU; uses CUDA when present
    python examples/demo.py --steps 100     # shorter
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("torch.optim.AdamW", "eightbit.optim.AdamW8bit")
CONTEXT = 16


def corpus() -> bytes:
    """The repository's own text (Python sources and Markdown), in a fixed order."""
    files = sorted(p for d in ("quant", "functional", "optim", "tests", "examples")
                   for p in (ROOT / d).rglob("*.py"))
    files.append(ROOT / "README.md")
    text = b"\n".join(f.read_bytes() for f in files if f.is_file())
    return bytes(b if b < 128 else ord("?") for b in text)


class CharMLP(torch.nn.Module):
    """The next byte from the previous CONTEXT bytes: embed, concatenate, two hidden layers."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = torch.nn.Embedding(128, 32)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(CONTEXT * 32, width), torch.nn.GELU(),
            torch.nn.Linear(width, width), torch.nn.GELU(),
            torch.nn.Linear(width, 128),
        )

    def forward(self, x):
        return self.net(self.embed(x).flatten(1))


def batches(data: torch.Tensor, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - CONTEXT - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(CONTEXT + 1)
        window = data[idx]
        yield window[:, :-1], window[:, -1]


def state_mib(opt: torch.optim.Optimizer) -> float:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    ) / 2**20


def rss_mib() -> float:
    """The process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark of resident memory at the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """The high-water mark of resident memory since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def warm_up(make, device) -> None:
    """Two steps on a throwaway model, so that one-time costs (kernel compilation, allocator
    growth) are paid before anything is measured."""
    model = CharMLP(128).to(device)
    opt = make(model.parameters(), lr=1e-3)
    for _ in range(2):
        x = torch.randint(0, 128, (8, CONTEXT), device=device)
        model(x).sum().backward()
        opt.step()


def train(name: str, args) -> dict:
    """One run, in this process: returns the losses and the measurements."""
    import eightbit.optim

    device = torch.device(args.device)
    torch.manual_seed(0)
    data = torch.tensor(list(corpus()), dtype=torch.long)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    model = CharMLP(args.width).to(device)
    make = {"torch.optim.AdamW": torch.optim.AdamW,
            "eightbit.optim.AdamW8bit": eightbit.optim.AdamW8bit}[name]
    warm_up(make, device)
    opt = make(model.parameters(), lr=args.lr, weight_decay=0.01)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base_rss = rss_mib()
        reset_peak_rss()
    losses, step_times = [], []
    stream = batches(train_data, args.batch, seed=1)
    report_every = max(1, args.steps // 10)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = (t.to(device) for t in next(stream))
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step % report_every == 0 or step == args.steps:
            print(f"  {name:<25} step {step:>4}/{args.steps}  loss {losses[-1]:.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    with torch.no_grad():
        model.eval()
        vx, vy = next(batches(val_data, 4096, seed=2))
        val_loss = torch.nn.functional.cross_entropy(model(vx.to(device)), vy.to(device)).item()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the high-water mark of resident memory above what the process held before training
        peak = peak_rss_mib() - base_rss
    steady = step_times[len(step_times) // 5:]  # leave out warm-up
    return {
        "optimizer": name,
        "params": sum(p.numel() for p in model.parameters()),
        "state_mib": state_mib(opt),
        "peak_mib": peak,
        "ms_per_step": 1000 * sum(steady) / len(steady),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "val_loss": val_loss,
        "losses": losses,
    }


def table(results: list[dict], device: str) -> str:
    peak = "peak GPU MiB" if device.startswith("cuda") else "peak RSS MiB above start"
    head = ["optimizer", "state MiB", peak, "ms / step", "final train loss", "val loss"]
    rows = [[r["optimizer"], f"{r['state_mib']:.2f}", f"{r['peak_mib']:.0f}",
             f"{r['ms_per_step']:.1f}", f"{r['final_loss']:.3f}", f"{r['val_loss']:.3f}"]
            for r in results]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
             for r in [head, *rows]]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        losses = torch.tensor(r["losses"])
        k = max(1, len(losses) // 25)  # light smoothing: a moving average over 4% of the run
        smooth = losses.unfold(0, k, 1).mean(1) if k > 1 else losses
        ax.plot(range(k, len(losses) + 1), smooth.tolist(), label=r["optimizer"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    ax.set_title(f"Character-level MLP, {results[0]['params']:,} parameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--steps", type=int, default=600 if cuda else 1000)
    parser.add_argument("--width", type=int, default=4096 if cuda else 2048)
    parser.add_argument("--batch", type=int, default=256 if cuda else 64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out")
    parser.add_argument("--worker", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # a child process: train one optimizer, print its result as JSON last
        print(json.dumps(train(args.worker, args)), flush=True)
        return

    print(f"Training a character-level MLP on this repository's text, on {args.device}, "
          f"{args.steps} steps per optimizer (same seed, same batches).", flush=True)
    results = []
    for name in OPTIMIZERS:
        argv = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        last = ""
        for line in proc.stdout:
            if line.startswith("{"):
                last = line
            else:
                print(line, end="", flush=True)
        if proc.wait() != 0 or not last:
            sys.exit(f"the {name} run failed (exit code {proc.returncode})")
        results.append(json.loads(last))
    print()
    print(f"{results[0]['params']:,} parameters; optimizer state, memory, speed and loss:")
    print(table(results, args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "loss_curves.png")
    (args.out / "results.md").write_text(table(results, args.device) + "\n")
    saved = results[0]["state_mib"] / max(results[1]["state_mib"], 1e-9)
    print(f"\nAdamW8bit keeps {saved:.1f}x less optimizer state. Loss curves: "
          f"{args.out / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
