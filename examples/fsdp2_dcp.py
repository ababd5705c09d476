"""FSDP2 + distributed checkpoints with 8-bit optimizer state, resumed on another world size.

Run on CPU (gloo) or GPUs (nccl):

    torchrun --nproc_per_node 2 examples/fsdp2_dcp.py

It trains a small model sharded over the ranks with AdamW8bit, saves model and optimizer with
``torch.distributed.checkpoint`` (each rank writes its shards), then rank 0 alone (world size 1)
builds the model again, loads the checkpoint, compares the optimizer state with the one the
sharded run had (gathered with ``full_state_dict=True``) and trains on.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from eightbit.optim import AdamW8bit
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(device: torch.device, world_size: int):
    torch.manual_seed(world_size)  # different initial weights: the checkpoint must bring them
    # 67 rows: uneven shards on 2 ranks; rows of 100 and 67 elements: not whole blocks
    model = torch.nn.Sequential(torch.nn.Linear(100, 67), torch.nn.GELU(),
                                torch.nn.Linear(67, 100)).to(device)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=init_device_mesh(device.type, (world_size,)))
    fully_shard(model, mesh=init_device_mesh(device.type, (world_size,)))
    return model, AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024)


def train(model, opt, steps: int, device: torch.device) -> float:
    for _ in range(steps):
        x = torch.randn(32, 100, device=device)
        loss = torch.nn.functional.mse_loss(model(x), x.roll(1, dims=-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def full_state(model, opt) -> dict:
    """The optimizer state gathered on rank 0 (other ranks get an empty dict), copied."""
    gathered = get_optimizer_state_dict(model, opt, options=FULL).get("state", {})
    return {k: {n: v.clone() for n, v in s.items()} for k, s in gathered.items()}


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    torch.manual_seed(100 + rank)  # each rank its own batches

    model, opt = build(device, world_size)
    loss = train(model, opt, 20, device)
    path = [tempfile.mkdtemp(prefix="fsdp2_dcp_") if rank == 0 else None]
    dist.broadcast_object_list(path)
    checkpoint = os.path.join(path[0], "step20")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=checkpoint)
    saved = full_state(model, opt)  # gathered on rank 0
    if rank == 0:
        print(f"trained 20 steps on {world_size} ranks (loss {loss:.4f}), saved {checkpoint}")
    dist.barrier()  # no rank tears down the group while a peer still talks to it
    dist.destroy_process_group()
    if rank != 0:
        return

    # Resume on one rank: a new process group of world size 1.
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    model, opt = build(device, 1)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    loaded = full_state(model, opt)
    same = [f"{name}.{key}" for name, tensors in saved.items() for key, value in tensors.items()
            if torch.equal(value, loaded[name][key])]
    total = sum(len(tensors) for tensors in saved.values())
    verdict = "matched" if len(same) == total else "DIFFERS"
    print(f"resumed on 1 rank: optimizer state {verdict}: {len(same)} of {total} tensors "
          f"bit-identical to the {world_size}-rank run's")
    print(f"trained on: loss {train(model, opt, 5, device):.4f}")
    dist.destroy_process_group()
    if verdict != "matched":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
