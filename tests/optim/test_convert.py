"""Issue 18: a run moves between torch.optim and eightbit mid-training, both ways, on every row
of the table; torch -> 8-bit -> torch is exactly one quantization round trip of each state."""

from __future__ import annotations

import copy

import pytest
import torch
from eightbit.optim import Lion8bit, load_torch_state_dict, to_torch_state_dict
from eightbit.optim._convert import COUNTERPARTS
from eightbit.quant import get_codebook

from .cases import ROWS, ids, round_trip
from .test_accuracy import TRAJECTORY_RTOL

SHAPES = [(64, 80), (4097,), (7,), (0,)]  # 8-bit, 8-bit with a ragged block, fp32 (small), empty
CONVERTIBLE = [r for r in ROWS if r.cls in COUNTERPARTS]
NOT_CONVERTIBLE = [r for r in ROWS if r.cls not in COUNTERPARTS]


def params_for(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def grads(params, t):
    gen = torch.Generator().manual_seed(100 + t)
    return [(torch.randn(p.shape, generator=gen) * 0.1 + 0.02 * p.float()).to(p.dtype)
            for p in params]


def train(opt, params, steps):
    for t in steps:
        for p, g in zip(params, grads(params, t), strict=True):
            p.grad = g
        opt.step()


def torch_groups(row, params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": row.kwargs["lr"] * 2}]


def ours_groups(row, params, state_bits=8):
    """The same groups; the second keeps fp32 state (and the third parameter is small anyway)."""
    return [{"params": params[:2], "state_bits": state_bits},
            {"params": params[2:], "lr": row.kwargs["lr"] * 2, "state_bits": 32}]


def unsigned_round_trip(x):
    """The round trip of a non-negative optimizer state: the quantizer's nearest code, except
    that a positive value whose nearest code is zero takes code 1 (issue 17's rule (b))."""
    codes, absmax, _ = round_trip(x, signed=False)
    codes = torch.where((codes == 0) & (x > 0), torch.ones_like(codes), codes)
    values = get_codebook("dynamic", signed=False)[codes.long()].view(-1)
    blocks = torch.nn.functional.pad(values, (0, (-values.numel()) % 256)).view(-1, 256)
    return (blocks * absmax[:, None]).view(-1)[: x.numel()].view(x.shape)


@pytest.mark.parametrize("row", CONVERTIBLE, ids=ids(CONVERTIBLE))
def test_torch_to_8bit_to_torch_is_one_quantization_round_trip(row):
    ref_params = params_for()
    ref = row.oracle(torch_groups(row, ref_params))
    train(ref, ref_params, range(3))
    torch_sd = copy.deepcopy(ref.state_dict())

    params = [p.clone() for p in ref_params]
    opt = row.ours(ours_groups(row, params))
    load_torch_state_dict(opt, torch_sd)
    back = to_torch_state_dict(opt)

    assert back["param_groups"] == torch_sd["param_groups"]
    assert back["state"].keys() == torch_sd["state"].keys()
    for pid, state in torch_sd["state"].items():
        assert back["state"][pid].keys() == state.keys()
        assert torch.equal(back["state"][pid]["step"], state["step"])
        eight_bit = pid < 2
        for name, signed in row.states:
            x = state[name]
            if not eight_bit:
                expected = x
            elif signed:
                expected = round_trip(x, signed=True)[2]
            else:
                expected = unsigned_round_trip(x)
            assert torch.equal(back["state"][pid][name], expected), (pid, name)
            assert back["state"][pid][name].dtype == torch.float32
    assert "exp_avg_codes" in opt.state[params[0]] or "square_avg_codes" in opt.state[params[0]]
    assert all(not k.endswith("_codes") for k in opt.state[params[2]])


@pytest.mark.parametrize("row", CONVERTIBLE, ids=ids(CONVERTIBLE))
def test_a_torch_run_continued_in_8bit_keeps_training(row):
    """torch trains, the run moves to eightbit and goes on: it stays as close to torch going on
    as 8-bit training stays to fp32 training (test_accuracy's trajectory bound)."""
    ref_params = params_for()
    ref = row.oracle(torch_groups(row, ref_params))
    train(ref, ref_params, range(3))
    start = [p.clone() for p in ref_params]
    params = [p.clone() for p in ref_params]
    opt = row.ours(ours_groups(row, params))
    load_torch_state_dict(opt, ref.state_dict())
    train(ref, ref_params, range(3, 15))
    train(opt, params, range(3, 15))
    for p, r, s in zip(params[:2], ref_params[:2], start[:2], strict=True):
        assert (p - r).norm() <= TRAJECTORY_RTOL * (r - s).norm()
    for p, r in zip(params[2:], ref_params[2:], strict=True):  # fp32 state: torch's arithmetic
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("row", CONVERTIBLE, ids=ids(CONVERTIBLE))
def test_an_8bit_run_continued_in_torch_keeps_training(row):
    """eightbit trains, the run moves to torch.optim: torch continues from the dequantized state
    as closely as the 8-bit run itself continues."""
    params = params_for()
    opt = row.ours(ours_groups(row, params))
    train(opt, params, range(3))
    start = [p.clone() for p in params]
    ref_params = [p.clone() for p in params]
    ref = row.oracle(torch_groups(row, ref_params))
    ref.load_state_dict(to_torch_state_dict(opt))
    for key in ("lr", "weight_decay"):
        assert [g[key] for g in ref.param_groups] == [g[key] for g in opt.param_groups]
    train(ref, ref_params, range(3, 15))
    train(opt, params, range(3, 15))
    for p, r, s in zip(params[:2], ref_params[:2], start[:2], strict=True):
        assert (p - r).norm() <= TRAJECTORY_RTOL * (r - s).norm()
    for p, r in zip(params[2:], ref_params[2:], strict=True):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("row", NOT_CONVERTIBLE, ids=ids(NOT_CONVERTIBLE))
def test_an_optimizer_without_torch_counterpart_is_refused_clearly(row):
    params = params_for()
    opt = row.ours(params)
    train(opt, params, range(1))
    with pytest.raises(TypeError, match="no torch.optim counterpart"):
        to_torch_state_dict(opt)
    with pytest.raises(TypeError, match="no torch.optim counterpart"):
        load_torch_state_dict(opt, torch.optim.Adam(params).state_dict())


def test_bfloat16_parameters_convert_from_torchs_bfloat16_state():
    """torch keeps the state of bfloat16 parameters in bfloat16; it is quantized the same."""
    row = CONVERTIBLE[0]
    ref_params = params_for(dtype=torch.bfloat16)
    ref = row.oracle(ref_params)
    train(ref, ref_params, range(2))
    assert ref.state[ref_params[0]]["exp_avg"].dtype == torch.bfloat16
    opt = row.ours([p.clone() for p in ref_params])
    load_torch_state_dict(opt, ref.state_dict())
    back = to_torch_state_dict(opt)
    x = ref.state[ref_params[0]]["exp_avg"].float()
    assert torch.equal(back["state"][0]["exp_avg"], round_trip(x, signed=True)[2])
    assert back["state"][2]["exp_avg"].dtype == torch.float32  # fp32 state, cast up exactly
    assert torch.equal(back["state"][2]["exp_avg"], ref.state[ref_params[2]]["exp_avg"].float())


def adam_sd(mutate):
    row = CONVERTIBLE[0]
    params = params_for()
    ref = row.oracle(params)
    train(ref, params, range(2))
    sd = copy.deepcopy(ref.state_dict())
    mutate(sd)
    return sd


REFUSED = [
    ("RMSprop's state into Adam8bit",
     lambda: copy.deepcopy(torch.optim.RMSprop(params_for()).state_dict()), ValueError,
     "not saved by torch.optim.Adam"),
    ("an eightbit state_dict", lambda: copy.deepcopy(
        ROWS[0].ours(params_for()).state_dict()), ValueError, "load it with load_state_dict"),
    ("inf in an 8-bit state", lambda: adam_sd(
        lambda sd: sd["state"][0]["exp_avg"].view(-1)[5].fill_(float("inf"))), ValueError,
     "inf or NaN"),
    ("negative average of squares", lambda: adam_sd(
        lambda sd: sd["state"][1]["exp_avg_sq"].neg_()), ValueError, "negative"),
    ("state of another shape", lambda: adam_sd(
        lambda sd: sd["state"][1].update(exp_avg=torch.zeros(3))), ValueError, "shape"),
    ("a bool step", lambda: adam_sd(
        lambda sd: sd["state"][1].update(step=torch.tensor(True))), TypeError, "real number"),
    ("NaN lr", lambda: adam_sd(lambda sd: sd["param_groups"][0].update(lr=float("nan"))),
     ValueError, "learning rate"),
    ("more groups", lambda: adam_sd(lambda sd: sd["param_groups"].append(
        dict(sd["param_groups"][0], params=[]))), ValueError, "param groups"),
]


@pytest.mark.parametrize("what,make,error,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_torch_state_dict_that_does_not_fit_is_refused_and_changes_nothing(
    what, make, error, message
):
    row = CONVERTIBLE[0]
    params, twin_params = params_for(seed=3), params_for(seed=3)
    opt, twin = row.ours(params), row.ours(twin_params)
    train(opt, params, range(2))
    train(twin, twin_params, range(2))
    with pytest.raises(error, match=message):
        load_torch_state_dict(opt, make())
    train(opt, params, range(2, 3))
    train(twin, twin_params, range(2, 3))
    for a, b in zip(params, twin_params, strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(v, twin.state[b][k]) for k, v in opt.state[a].items())


def test_adamw8bit_keeps_decoupled_decay_when_given_torch_adams_state():
    adamw_row = next(r for r in CONVERTIBLE if r.id == "AdamW")
    params = params_for()
    ref = torch.optim.Adam(params, weight_decay=0.1)
    train(ref, params, range(2))
    opt = adamw_row.ours([p.clone() for p in params], weight_decay=0.1)
    load_torch_state_dict(opt, ref.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert to_torch_state_dict(opt)["param_groups"][0]["decoupled_weight_decay"] is True


def test_lion_is_not_in_the_table():
    assert Lion8bit not in COUNTERPARTS


def test_a_tiny_positive_second_moment_never_decodes_to_zero():
    """exp_avg_sq of 1e-12 next to 1.0 in a block is nearest to code 0; it is stored as the
    smallest positive code (issue 17's rule (b)), so the first step after the load is not lr/eps
    sized. The oracle: the public quantizer's codes with code 0 moved to 1 where x > 0."""
    row = CONVERTIBLE[0]
    params = params_for()
    ref = row.oracle(params)
    train(ref, params, range(2))
    sd = copy.deepcopy(ref.state_dict())
    v = sd["state"][0]["exp_avg_sq"].view(-1)
    v[:256] = 1e-12
    v[0] = 1.0
    opt = row.ours([p.clone() for p in params])
    load_torch_state_dict(opt, sd)
    back = to_torch_state_dict(opt)["state"][0]["exp_avg_sq"]
    assert bool((back.view(-1)[:256] > 0).all())
    assert round_trip(sd["state"][0]["exp_avg_sq"], signed=False)[2].view(-1)[1] == 0
    assert torch.equal(back, unsigned_round_trip(sd["state"][0]["exp_avg_sq"]))


def test_the_readme_checkpoints_example_runs_as_written():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("### Checkpoints")
    code = re.search(r"```python\n(.*?)```", readme[start:], re.S).group(1)
    model = torch.nn.Linear(128, 64)
    torch_adamw = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 128)).square().mean().backward()
    torch_adamw.step()
    namespace = {"model": model, "torch_adamw": torch_adamw}
    exec(code, namespace)
    assert namespace["opt"].state[model.weight]["exp_avg_codes"].dtype == torch.uint8
    assert torch_adamw.state[model.weight]["exp_avg"].dtype == torch.float32
