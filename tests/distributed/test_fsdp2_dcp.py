"""FSDP2 + DCP with 8-bit state on gloo CPU ranks: checkpoints reshard N -> M.

One launch of 4 processes (tests/distributed/workers.py: scenario) trains a model holding every
layout case on 4, 2 and 1 ranks, saves each run with ``dcp.save`` and loads the checkpoints on
other world sizes (4->2, 2->1, 1->2, 2->2); rank 0 compares the loaded state, gathered with
``get_optimizer_state_dict(full_state_dict=True)``, with the state the saving run gathered.
"""

import json
import math

import pytest
import torch
from eightbit.quant import get_codebook

from . import workers
from .launch import launch

STEPS = 3


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_dcp")
    launch(workers.scenario, 4, str(out), STEPS)
    return lambda saved, loaded: json.loads((out / f"saved{saved}" / f"load{loaded}.json")
                                            .read_text())["loaded_state"] | {"_out": out}


def half_largest_gap(signed: bool) -> float:
    """Requantizing a value already in [-absmax, absmax] moves it by at most half the largest
    gap between neighbouring codes, in units of the new absmax; plus fp32 rounding of the
    products (a few ulp of 1)."""
    return float(get_codebook("dynamic", signed=signed).diff().max()) / 2 + 4 * torch.finfo().eps


def cut_blocks(world_size: int) -> set[int]:
    """Global blocks of the 1-D parameter that the saving run's shard boundaries cut."""
    n = workers.SHAPES["vector"][0]
    chunk = math.ceil(n / world_size)
    return {b // workers.BLOCK for b in range(chunk, n, chunk) if b % workers.BLOCK}


@pytest.mark.parametrize("saved, loaded", [(2, 2), (1, 2), (2, 1), (4, 2)])
def test_checkpoint_reshards(results, saved, loaded):
    state = results(saved, loaded)
    for key, entry in state.items():
        if key == "_out" or key.startswith("vector."):
            continue
        assert entry["equal"], f"{key} changed from {saved} to {loaded} ranks"  # rows: exact
    cut = cut_blocks(saved)
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        entry = state[f"vector.{name}_codes"]
        assert set(entry["blocks"]) <= cut  # only blocks whose parts came from two ranks
        assert entry["max_error"] <= half_largest_gap(signed=name == "exp_avg")
        if not cut:
            assert entry["equal"] and state[f"vector.{name}_absmax"]["equal"]
    assert state["vector.step"]["equal"]


def test_a_resumed_run_continues_bit_for_bit(results):
    out = results(2, 2)["_out"]
    report = json.loads((out / "saved2" / "load2.json").read_text())
    assert report["resumed_params_equal"]


def test_the_size_rule_sees_the_whole_parameter_on_every_rank(results):
    out = results(4, 2)["_out"]
    state = torch.load(out / "saved4" / "full.pt", weights_only=True)["optim"]["state"]
    # 'cube' (864 elements) is above min_8bit_size=500, each of its 4 shards below it
    assert state["cube"]["exp_avg_codes"].dtype == torch.uint8
    assert "exp_avg" in state["small"]  # 67 elements: fp32 state
