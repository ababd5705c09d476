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
