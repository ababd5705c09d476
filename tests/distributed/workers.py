"""What the ranks of tests/distributed run: train under FSDP2, save and load with DCP."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from eightbit.optim import AdamW8bit
from eightbit.quant import get_codebook
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .launch import join_group

BLOCK = 64
# name -> shape: every layout case of optim/_distributed.py on 1, 2 and 4 ranks
SHAPES = {
    "uneven": (67, 100),  # 34 + 33 rows on 2 ranks; a row is 1 block and a partial one
    "even": (64, 128),  # rows of whole blocks: the flat blocking
    "cube": (9, 4, 24),  # 3-D: a row is 96 elements (1.5 blocks)
    "vector": (5000,),  # 1-D: shards cut blocks of the global grid (2500 = 39 * 64 + 4)
    "small": (67,),  # below min_8bit_size: fp32 state
}
OPTIONS = dict(lr=1e-2, weight_decay=0.1, amsgrad=True, block_size=BLOCK, min_8bit_size=500)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Net(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in SHAPES.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=g)))

    def forward(self, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(((p - targets[n]) ** 2).mean() * (1 + p.abs()).log().sum()
                   for n, p in self.named_parameters())


def build(world_size: int, seed: int):
    model = Net(seed)
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    return model, AdamW8bit(model.parameters(), **OPTIONS)


def train(model, opt, rank: int, first: int, steps: int) -> None:
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
        targets = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
        model(targets).backward()
        opt.step()
        opt.zero_grad()


def full_params(model) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=FULL)


def full_optim_state(model, opt) -> dict:
    """The gathered optimizer state, copied: on one rank (and for the plain ``step`` tensors)
    the full state is the live state, which training goes on to change."""
    return _cloned(get_optimizer_state_dict(model, opt, options=FULL))


def _cloned(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _cloned(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_cloned(v) for v in tree)
    return tree


def save(rank: int, world_size: int, out: str, steps: int) -> None:
    """Train, save with DCP, keep the full state for the checks, then train on (the reference
    of an uninterrupted run)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, opt = build(world_size, seed=0)
    train(model, opt, rank, 0, steps)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=out / "dcp")
    full = full_optim_state(model, opt)
    train(model, opt, rank, steps, steps)
    params = full_params(model)
    if rank == 0:
        torch.save({"optim": full, "params_after": params}, out / "full.pt")


def load(rank: int, world_size: int, out: str, saved_world_size: int, steps: int) -> None:
    """Load the DCP checkpoint into a differently initialized model on ``world_size`` ranks;
    rank 0 compares the state with the saved one and writes what it found to a JSON file; on the
    saved world size, train on and compare with the uninterrupted run."""
    out = Path(out)
    model, opt = build(world_size, seed=1)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=out / "dcp")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    loaded = full_optim_state(model, opt)
    resumed = None
    if world_size == saved_world_size:
        train(model, opt, rank, steps, steps)
        resumed = full_params(model)
    if rank == 0:
        saved = torch.load(out / "full.pt", weights_only=True)
        report = {"loaded_state": compare(saved["optim"]["state"], loaded["state"])}
        if resumed is not None:
            report["resumed_params_equal"] = all(
                torch.equal(resumed[n], saved["params_after"][n]) for n in SHAPES)
        (out / f"load{world_size}.json").write_text(json.dumps(report))
    dist.barrier()


def compare(saved: dict, loaded: dict) -> dict:
    """Per parameter and state tensor: bit-identical or not. For the codes of 1-D parameters
    (absmax per element in a state_dict), also the global blocks that differ and the largest
    difference of the dequantized state in units of the loaded block's absmax."""
    result = {}
    for name, tensors in saved.items():
        for key, value in tensors.items():
            other = loaded[name][key]
            entry = {"equal": torch.equal(value, other)}
            if key.endswith("_codes") and len(SHAPES[name]) == 1:
                state = key[: -len("_codes")]
                codebook = get_codebook("dynamic", signed=state == "exp_avg")
                before = codebook[value.long()] * tensors[f"{state}_absmax"]
                after = codebook[other.long()] * loaded[name][f"{state}_absmax"]
                scale = loaded[name][f"{state}_absmax"].clamp_min(torch.finfo().tiny)
                entry["max_error"] = float(((after - before).abs() / scale).max())
                differ = torch.nonzero(value != other).view(-1)
                entry["blocks"] = sorted(set((differ // BLOCK).tolist()))
            result[f"{name}.{key}"] = entry
    return result


def scenario(rank: int, world_size: int, out: str, steps: int) -> None:
    """Every N -> M case in one launch of 4 processes (each launch costs seconds of imports):
    the ranks regroup between phases. Checkpoints land in ``out/saved{N}``, findings in
    ``out/saved{N}/load{M}.json``."""
    out = Path(out)

    def regroup(phase: str, size: int) -> bool:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        if rank >= size:
            return False
        join_group(str(out / f"store-{phase}"), rank, size)
        return True

    save(rank, world_size, out / "saved4", steps)
    if regroup("a", 2):
        save(rank, 2, out / "saved2", steps)
        load(rank, 2, out / "saved4", 4, steps)
    if regroup("b", 1):
        save(rank, 1, out / "saved1", steps)
        load(rank, 1, out / "saved2", 2, steps)
    if regroup("c", 2):
        load(rank, 2, out / "saved1", 1, steps)
        load(rank, 2, out / "saved2", 2, steps)


# -- a plain run's checkpoint under FSDP2, and back ------------------------------------------

# layout cases of a plain (flat-blocked) state against FSDP2's on 2 ranks, at block 64
CROSS_SHAPES = {
    "uneven": (67, 100),  # the flat grid cuts rows: blocks requantized on every load
    "even": (64, 128),  # rows of whole blocks: both grids agree
    "vector": (1000,),  # 1-D: the global grid is the flat grid; rank 1 starts inside block 7
    "cube": (9, 4, 24),  # 3-D: rows of 96 elements, cut by the flat grid too
}
CROSS_OPTIONS = dict(OPTIONS, amsgrad=False)
CROSS_STEPS = 3
EVERY_RANK = StateDictOptions(full_state_dict=True)  # full tensors on every rank, not just 0


class CrossNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, shape in CROSS_SHAPES.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=g)))

    def forward(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)  # one batch for every rank and the plain run
        return sum(((p - torch.randn(p.shape, generator=g)) ** 2).mean() * (1 + p.abs()).sum()
                   for p in self.parameters())


def cross_train(model, opt, first: int) -> None:
    for step in range(first, first + CROSS_STEPS):
        model(step).backward()  # FSDP2 averages equal gradients: the plain run's gradient
        opt.step()
        opt.zero_grad()


def dequantized(state: dict, rows: torch.Tensor) -> dict:
    """``{name: (values, absmax)}``: each 8-bit state of one parameter's ``state_dict()`` entry
    dequantized at dim-0 indices ``rows``, with each element's block absmax. Takes a plain
    run's flat absmax, a sharded run's (rows, blocks per row) one or its per-element one; a
    DTensor state gives the rows this rank holds (``rows`` are then those)."""
    out = {}
    for key in [k for k in state if k.endswith("_codes")]:
        name = key[: -len("_codes")]
        codes, absmax = (t.to_local() if hasattr(t, "to_local") else t
                         for t in (state[key], state[f"{name}_absmax"]))
        if absmax.shape == codes.shape:  # per element
            scales = absmax
        elif absmax.dim() == 2:  # per row block
            scales = absmax.repeat_interleave(BLOCK, dim=1)[:, : codes[0].numel()]
        else:  # flat blocks
            scales = absmax.repeat_interleave(BLOCK)[: codes.numel()]
        scales = scales.reshape(codes.shape)
        values = get_codebook("dynamic", signed=name == "exp_avg")[codes.long()] * scales
        if codes.shape[0] != rows.numel():  # a whole tensor: keep the rows asked for
            values, scales = values[rows], scales[rows]
        out[name] = (values, scales)
    return out


def _owned_rows(shape, rank: int, world_size: int) -> torch.Tensor:
    """The dim-0 indices FSDP2 gives ``rank``: ``torch.chunk`` pieces."""
    chunks = torch.arange(shape[0]).chunk(world_size)
    return chunks[rank] if rank < len(chunks) else torch.arange(0)


def _cross_check(loaded: dict, oracle: dict, rank: int, world_size: int) -> dict:
    """Per parameter and state, on this rank's rows: the loaded state dequantized equals the
    oracle's (bit for bit?), and its largest difference in units of the loaded block absmax."""
    report = {}
    for pid, (name, shape) in enumerate(CROSS_SHAPES.items()):
        rows = _owned_rows(shape, rank, world_size)
        ours = dequantized(loaded["state"][pid], rows)
        theirs = dequantized(oracle["state"][pid], rows)
        for key, (values, scales) in ours.items():
            difference = (values - theirs[key][0]).abs() / scales.clamp_min(torch.finfo().tiny)
            differ = torch.nonzero((values != theirs[key][0]).view(-1)).view(-1)
            report[f"{name}.{key}"] = {
                "equal": torch.equal(values, theirs[key][0]),
                "max_error": float(difference.max()) if difference.numel() else 0.0,
                # of a 1-D parameter: the global blocks that changed
                "blocks": sorted(set((rows[differ] // BLOCK).tolist())) if len(shape) == 1
                else None,
            }
    return report


def _continued(sharded, plain, start: dict) -> dict:
    """The sharded run's parameters against the plain run's after both trained on: bit for bit
    per parameter, and the deviation relative to the distance the plain run travelled."""
    gathered = get_model_state_dict(sharded, options=EVERY_RANK)
    ours = [gathered[n] for n in CROSS_SHAPES]
    theirs = [p.detach() for p in plain.parameters()]
    num = sum((a - b).norm() ** 2 for a, b in zip(ours, theirs, strict=True)) ** 0.5
    den = sum((b - start[n]).norm() ** 2 for b, n in zip(theirs, CROSS_SHAPES, strict=True)) ** 0.5
    return {"equal": {n: torch.equal(a, b) for n, a, b in zip(CROSS_SHAPES, ours, theirs,
                                                              strict=True)},
            "relative_deviation": float(num / den)}


def cross_scenario(rank: int, world_size: int, out: str) -> None:
    """Both directions on ``world_size`` ranks; each rank writes ``out/rank{rank}.json``."""
    out, report = Path(out), {}
    sharded, opt = _plain_to_fsdp2(rank, world_size, out, report)
    _fsdp2_to_plain(sharded, opt, rank, world_size, out, report)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _local_states(opt) -> list[torch.Tensor]:
    return [local for state in opt.state_dict()["state"].values() for t in state.values()
            for local in [t.to_local() if hasattr(t, "to_local") else t]]


def _plain_to_fsdp2(rank: int, world_size: int, out: Path, report: dict):
    """A plain run's full state_dict (by name: ``set_optimizer_state_dict`` takes no ids)
    loaded into FSDP2; then both train on."""
    plain = CrossNet()
    plain_opt = AdamW8bit(plain.parameters(), **CROSS_OPTIONS)
    cross_train(plain, plain_opt, 0)
    if rank == 0:
        torch.save({"by_name": get_optimizer_state_dict(plain, plain_opt),  # the README's
                    "by_id": plain_opt.state_dict()}, out / "plain.pt")
    dist.barrier()
    saved = torch.load(out / "plain.pt", weights_only=True)
    report["plain_absmax_shapes"] = {n: list(saved["by_name"]["state"][n]["exp_avg_absmax"].shape)
                                     for n in CROSS_SHAPES}
    sharded = CrossNet()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world_size,)))
    opt = AdamW8bit(sharded.parameters(), **CROSS_OPTIONS)
    set_model_state_dict(sharded, dict(plain.named_parameters()), options=EVERY_RANK)
    set_optimizer_state_dict(sharded, opt, saved["by_name"], options=EVERY_RANK)
    report["to_fsdp2"] = _cross_check(opt.state_dict(), plain_opt.state_dict(), rank, world_size)
    # the same by the plain optimizer's own state_dict, loaded on every rank
    direct = AdamW8bit(sharded.parameters(), **CROSS_OPTIONS)
    direct.load_state_dict(saved["by_id"])
    report["to_fsdp2_by_id_equal"] = all(
        torch.equal(a, b) for a, b in zip(_local_states(direct), _local_states(opt), strict=True))
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    cross_train(sharded, opt, CROSS_STEPS)
    cross_train(plain, plain_opt, CROSS_STEPS)
    report["to_fsdp2_continued"] = _continued(sharded, plain, start)
    return sharded, opt


def _fsdp2_to_plain(sharded, opt, rank: int, world_size: int, out: Path, report: dict) -> None:
    """The gathered full state_dict of the FSDP2 run loaded into a plain optimizer (every
    rank its own); then both train on."""
    full = get_optimizer_state_dict(sharded, opt, options=FULL)
    params = get_model_state_dict(sharded, options=EVERY_RANK)
    if rank == 0:
        torch.save({"optim": full, "params": params}, out / "sharded.pt")
    dist.barrier()
    saved = torch.load(out / "sharded.pt", weights_only=True)
    report["sharded_absmax_shapes"] = {
        n: list(saved["optim"]["state"][n]["exp_avg_absmax"].shape) for n in CROSS_SHAPES}
    plain = CrossNet()
    plain.load_state_dict(saved["params"])
    plain_opt = AdamW8bit(plain.parameters(), **CROSS_OPTIONS)
    plain_opt.load_state_dict(saved["optim"])
    report["to_plain"] = _cross_check(plain_opt.state_dict(), opt.state_dict(), rank, world_size)
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    cross_train(sharded, opt, 2 * CROSS_STEPS)
    cross_train(plain, plain_opt, 2 * CROSS_STEPS)
    report["to_plain_continued"] = _continued(sharded, plain, start)
