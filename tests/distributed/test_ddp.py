"""The README's DDP recipe on 2 gloo CPU ranks: DistributedDataParallel + AdamW8bit.

DDP averages the gradients over the ranks and every rank steps its own optimizer, so the 8-bit
state must come out the same everywhere and equal to one process stepping on the averaged
gradients. One launch (``ranks`` below) trains, checkpoints rank 0's state_dict halfway, resumes
from it in a fresh model and optimizer, and, in parallel on the two ranks, replays the run in a
single process on hand-averaged gradients with AdamW8bit (rank 0) and torch.optim.AdamW (rank 1).
The ranks write what they got to files; the tests below compare them.
"""

from __future__ import annotations

from pathlib import Path

import eightbit.optim
import pytest
import torch
import torch.distributed as dist
from eightbit.optim import AdamW8bit
from torch.nn.parallel import DistributedDataParallel

from ..integrations.readme import run_recipe
from ..optim.test_accuracy import TRAJECTORY_RTOL, relative_deviation
from .launch import launch

STEPS = 10
SAVE_AT = 4
WORLD_SIZE = 2
# Blocks of 64 and min_8bit_size 1024: the 100 x 32 and 67 x 100 weights keep 8-bit state (6700
# is not a multiple of the block), the biases and the 8 x 67 head keep fp32 state.
OPTIONS = dict(lr=1e-2, weight_decay=0.1, block_size=64, min_8bit_size=1024)


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 100), torch.nn.GELU(),
                               torch.nn.Linear(100, 67), torch.nn.GELU(), torch.nn.Linear(67, 8))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``step``: each rank sees its own data."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 32, generator=g)
    return x, x[:, :8].sin() + x[:, 8:16] * x[:, 16:24]


def loss_on_batch(model: torch.nn.Module, step: int, rank: int) -> torch.Tensor:
    x, y = batch(step, rank)
    return torch.nn.functional.mse_loss(model(x), y)


def train(model, opt, rank: int, first: int, last: int) -> None:
    for step in range(first, last):
        loss_on_batch(model, step, rank).backward()  # DDP all-reduces the gradients here
        opt.step()
        opt.zero_grad()


def single_process(optimizer_cls, **options) -> list[torch.Tensor]:
    """The run without DDP: per step, each rank's gradient computed in turn, averaged by hand."""
    model = make_model(seed=0)
    opt = optimizer_cls(model.parameters(), **options)
    for step in range(STEPS):
        grads = []
        for rank in range(WORLD_SIZE):
            model.zero_grad()
            loss_on_batch(model, step, rank).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *per_rank in zip(model.parameters(), *grads, strict=True):
            p.grad = sum(per_rank) / WORLD_SIZE
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def ranks(rank: int, world_size: int, out: str) -> None:
    out = Path(out)
    model = DistributedDataParallel(make_model(seed=0))
    opt = AdamW8bit(model.parameters(), **OPTIONS)
    train(model, opt, rank, 0, SAVE_AT)
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optim": opt.state_dict()},
                   out / "checkpoint.pt")
    train(model, opt, rank, SAVE_AT, STEPS)
    torch.save({"params": [p.detach() for p in model.parameters()], "optim": opt.state_dict()},
               out / f"rank{rank}.pt")

    dist.barrier()  # the checkpoint is on disk; every rank resumes from rank 0's
    model = DistributedDataParallel(make_model(seed=1))
    opt = AdamW8bit(model.parameters(), **OPTIONS)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    model.module.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optim"])
    train(model, opt, rank, SAVE_AT, STEPS)
    torch.save([p.detach() for p in model.parameters()], out / f"resumed{rank}.pt")

    if rank == 0:
        torch.save(single_process(AdamW8bit, **OPTIONS), out / "single_8bit.pt")
    else:
        options = {k: v for k, v in OPTIONS.items() if k in ("lr", "weight_decay")}
        torch.save(single_process(torch.optim.AdamW, **options), out / "single_torch.pt")
    dist.barrier()
    readme(rank, out)


def readme(rank: int, out: Path) -> None:
    """The README's DDP block, given the names it leaves to the user."""
    model = make_model(seed=0)
    names = run_recipe("ddp", dict(
        model=model, loader=[batch(step, rank) for step in range(3)],
        loss_fn=torch.nn.functional.mse_loss, path=out / "readme.pt", torch=torch, dist=dist,
        DistributedDataParallel=DistributedDataParallel, eightbit=eightbit))
    torch.save({"params": [p.detach() for p in model.parameters()],
                "optim": names["opt"].state_dict()}, out / f"readme{rank}.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(ranks, WORLD_SIZE, str(out))
    return lambda name: torch.load(out / f"{name}.pt", weights_only=True)


def assert_equal(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a, b), f"parameter {i} differs by up to {(a - b).abs().max()}"


def test_ddp_steps_like_one_process_on_averaged_gradients(run):
    assert_equal(run("rank0")["params"], run("single_8bit"))


def test_the_ranks_agree_bit_for_bit(run):
    zero, one = run("rank0"), run("rank1")
    assert_equal(zero["params"], one["params"])
    states = zero["optim"]["state"]
    assert states[0]["exp_avg_codes"].dtype == torch.uint8  # the 8-bit path ran
    assert states.keys() == one["optim"]["state"].keys()
    for index, state in states.items():
        for key, value in state.items():
            assert torch.equal(value, one["optim"]["state"][index][key]), (index, key)


def test_a_run_resumed_from_the_state_dict_continues_bit_for_bit(run):
    for rank in range(WORLD_SIZE):
        assert_equal(run(f"resumed{rank}"), run(f"rank{rank}")["params"])


def test_the_trajectory_stays_close_to_torch_adamw(run):
    start = [p.detach() for p in make_model(seed=0).parameters()]
    deviation = relative_deviation(run("rank0")["params"], run("single_torch"), start)
    assert deviation < TRAJECTORY_RTOL


def test_the_readme_recipe_trains_and_loads_on_every_rank(run):
    saved, zero, one = run("readme"), run("readme0"), run("readme1")
    start = [p.detach() for p in make_model(seed=0).parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(zero["params"], start, strict=True))
    assert_equal(zero["params"], one["params"])
    for loaded in (zero["optim"]["state"], one["optim"]["state"]):
        assert loaded[2]["exp_avg_codes"].dtype == torch.uint8  # 6700 elements: 8-bit
        for index, state in saved["optim"]["state"].items():
            for key, value in state.items():
                assert torch.equal(loaded[index][key], value), (index, key)
