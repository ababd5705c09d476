"""GPU benchmark of optimizer.step() (issue 5): the 8-bit optimizers against torch's fused AdamW.

For 1M, 16M and 256M parameters in fp32 and bf16, held in one tensor or split into 200 tensors,
it times ``optimizer.step()`` (Python included, CUDA events) and converts it to GB/s with the
bytes a step must move (DESIGN.md, cost model): per parameter 3 x the parameter size (read p and
g, write p) plus each 8-bit state's code read and written (2 B) and its absmax (8 B per block of
256); torch's fused AdamW moves 7 x the parameter size (p, g, m, v read; p, m, v written).

Targets: Adam8bit at 256M fp32 parameters >= 85% of the copy bandwidth and >= 1.5x faster than
torch.optim.AdamW(fused=True); the 200-tensor step within 1.3x of the one-tensor step.

Run alone: ``python -m tests.benchmarks.gpu_optim`` (needs a GPU and CuPy).
"""

from __future__ import annotations

import time

import torch
from eightbit.optim import Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit

from .gpu_timing import GB, copy_bandwidth, time_cuda

SIZES = {"1M": 1 << 20, "16M": 1 << 24, "256M": 1 << 28}
LAYOUTS = (1, 200)
DTYPES = (torch.float32, torch.bfloat16)


def _states_8bit(count: int, element_size: int) -> float:
    return 3 * element_size + count * (2 + 8 / 256)


# name -> (constructor, bytes per parameter as a function of the parameter's element size)
CONTENDERS = {
    "Adam8bit": (lambda ps: Adam8bit(ps, lr=1e-3), lambda s: _states_8bit(2, s)),
    "AdamW8bit": (
        lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=1e-2),
        lambda s: _states_8bit(2, s),
    ),
    "Lion8bit": (lambda ps: Lion8bit(ps, lr=1e-4), lambda s: _states_8bit(1, s)),
    "RMSprop8bit": (lambda ps: RMSprop8bit(ps, lr=1e-3), lambda s: _states_8bit(1, s)),
    "torch AdamW fused": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
        lambda s: 7 * s,
    ),
}


def _params(total: int, count: int, dtype: torch.dtype) -> list[torch.Tensor]:
    sizes = [total // count + (i < total % count) for i in range(count)]
    params = [torch.randn(n, device="cuda", dtype=dtype) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def run(copy_gbps: float, budget_s: float = 150.0) -> list[dict]:
    """Every cell, largest first; cells left when ``budget_s`` is spent are skipped (reported)."""
    rows, start = [], time.monotonic()
    for size_name, total in reversed(SIZES.items()):
        for dtype in DTYPES:
            for count in LAYOUTS:
                if time.monotonic() - start > budget_s:
                    rows.append(dict(size=size_name, dtype=dtype, tensors=count, skipped=True))
                    continue
                params = _params(total, count, dtype)
                for name, (make, bytes_per_param) in CONTENDERS.items():
                    opt = make(params)
                    big = total >= 1 << 26
                    seconds = time_cuda(opt.step, reps=5 if big else 7, inner=2 if big else 5)
                    moved = total * bytes_per_param(params[0].element_size())
                    rows.append(
                        dict(
                            size=size_name,
                            dtype=dtype,
                            tensors=count,
                            optimizer=name,
                            ms=seconds * 1e3,
                            gbps=moved / seconds / GB,
                            of_copy=moved / seconds / GB / copy_gbps,
                            skipped=False,
                        )
                    )
                    del opt
                del params
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], copy_gbps: float) -> str:
    lines = [
        "| params | dtype | tensors | optimizer | step ms | GB/s "
        f"| % of copy ({copy_gbps:.0f} GB/s) | vs torch AdamW fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    torch_ms = {
        (r["size"], r["dtype"], r["tensors"]): r["ms"]
        for r in rows
        if not r["skipped"] and r["optimizer"] == "torch AdamW fused"
    }
    for r in rows:
        dtype = str(r["dtype"]).removeprefix("torch.")
        if r["skipped"]:
            lines.append(f"| {r['size']} | {dtype} | {r['tensors']} | (skipped: time budget) |||||")
            continue
        speedup = torch_ms.get((r["size"], r["dtype"], r["tensors"]), float("nan")) / r["ms"]
        lines.append(
            f"| {r['size']} | {dtype} | {r['tensors']} | {r['optimizer']} | {r['ms']:.3f} | "
            f"{r['gbps']:.0f} | {100 * r['of_copy']:.0f}% | {speedup:.2f}x |"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's three targets, each with its measured value and PASS/MISS."""

    def cell(optimizer, size="256M", dtype=torch.float32, tensors=1):
        for r in rows:
            if (
                not r["skipped"]
                and r["optimizer"] == optimizer
                and r["size"] == size
                and r["dtype"] == dtype
                and r["tensors"] == tensors
            ):
                return r
        return None

    out = []
    adam, fused, split = cell("Adam8bit"), cell("torch AdamW fused"), cell("Adam8bit", tensors=200)
    if adam:
        ok = adam["of_copy"] >= 0.85
        out.append(
            f"Adam8bit 256M fp32: {100 * adam['of_copy']:.0f}% of copy (target >= 85%): "
            f"{'PASS' if ok else 'MISS'}"
        )
    if adam and fused:
        speedup = fused["ms"] / adam["ms"]
        out.append(
            f"Adam8bit vs torch AdamW fused, 256M fp32: {speedup:.2f}x (target >= 1.5x): "
            f"{'PASS' if speedup >= 1.5 else 'MISS'}"
        )
    if adam and split:
        ratio = split["ms"] / adam["ms"]
        out.append(
            f"Adam8bit 200 tensors / 1 tensor, 256M fp32: {ratio:.2f}x (target <= 1.3x): "
            f"{'PASS' if ratio <= 1.3 else 'MISS'}"
        )
    return out


if __name__ == "__main__":
    copy = copy_bandwidth()
    results = run(copy)
    print(table(results, copy))
    print("\n".join(targets(results)))
