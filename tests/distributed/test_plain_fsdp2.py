"""A plain run's checkpoint continued under FSDP2, and an FSDP2 run's continued in one process.

One launch of 2 gloo ranks (tests/distributed/workers.py: cross_scenario) trains AdamW8bit
without FSDP, loads its full state_dict (flat absmax) with ``set_optimizer_state_dict`` into
FSDP2, trains on beside the plain run, then loads the gathered full state_dict (row or
per-element absmax) into a fresh plain optimizer and trains both on again. After each load
every rank dequantizes the state of the rows it owns and compares it with the source's.
"""

import json

import pytest

from ..optim.test_accuracy import TRAJECTORY_RTOL
from . import workers
from .launch import launch
from .test_fsdp2_dcp import half_largest_gap

WORLD_SIZE = 2
DIRECTIONS = ("to_fsdp2", "to_plain")
# FSDP2 gives rank 1 elements 500..999 of the 1-D parameter: block 7 is trained in two parts
CUT_BLOCK = 500 // workers.BLOCK


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_fsdp2")
    launch(workers.cross_scenario, WORLD_SIZE, str(out))
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def test_each_checkpoint_holds_the_other_layout(reports):
    # so that every load below converts absmax: flat blocks vs rows / elements
    assert reports[0]["plain_absmax_shapes"] == {"uneven": [105], "even": [128], "vector": [16],
                                                 "cube": [14]}
    assert reports[0]["sharded_absmax_shapes"] == {"uneven": [67, 2], "even": [64, 2],
                                                   "vector": [1000], "cube": [9, 2]}


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_loaded_state_dequantizes_to_the_saved_one(reports, direction):
    for rank, report in enumerate(reports):
        for key, entry in report[direction].items():
            name, state = key.split(".")
            # the grids agree on whole-block rows and, plain -> FSDP2, on the 1-D parameter
            if name == "even" or (name == "vector" and direction == "to_fsdp2"):
                assert entry["equal"], f"{key} on rank {rank}"
            else:  # blocks that the two grids cut differently are requantized
                assert entry["max_error"] <= half_largest_gap(signed=state == "exp_avg")
            if name == "vector":
                assert set(entry["blocks"]) <= {CUT_BLOCK}


def test_a_plain_state_dict_by_id_loads_the_same_on_every_rank(reports):
    # opt.load_state_dict(torch.load(...)) on each rank, instead of set_optimizer_state_dict
    assert all(report["to_fsdp2_by_id_equal"] for report in reports)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_training_continues_as_the_source_run(reports, direction):
    for report in reports:
        continued = report[f"{direction}_continued"]
        assert continued["equal"]["even"]  # same state, same gradient: the same steps
        assert continued["relative_deviation"] < TRAJECTORY_RTOL
