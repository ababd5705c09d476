"""Issue 18: a load_state_dict that refuses changes nothing (a step after it equals a step of an
untouched twin); repairable layouts are repaired; group options pass the constructor's checks;
AdamW8bit stays AdamW; a failing step() changes nothing; parameters that cannot be optimized
(listed twice, integer, complex) are refused when they are added."""

from __future__ import annotations

import copy

import pytest
import torch
from eightbit.optim import Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit

from .cases import CLASS_ROWS, ids

SHAPES = [(64, 80), (4097,), (7,)]  # 8-bit (2-D), 8-bit (ragged last block), fp32 (small)


def build(row, seed=0, steps=2, **extra):
    """``row``'s optimizer after ``steps`` steps on fresh parameters (the same for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = row.ours(params, **extra)
    for t in range(steps):
        step(opt, params, seed=100 * seed + t)
    return opt, params


def step(opt, params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def assert_same(opt_a, params_a, opt_b, params_b):
    """Bit-identical parameters, states and group options."""
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
        assert {k: v for k, v in ga.items() if k != "params"} == {
            k: v for k, v in gb.items() if k != "params"}


def source_state_dict(row):
    """A valid state_dict of the same setup with other values everywhere (state and lr)."""
    opt, _ = build(row, seed=1, steps=3)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5
    return sd


def first_codes(sd, pid=0):
    return next(k for k in sd["state"][pid] if k.endswith("_codes"))


def first_absmax(sd, pid=0):
    return next(k for k in sd["state"][pid] if k.endswith("_absmax"))


def fp32_key(sd, pid=2):
    return next(k for k in sd["state"][pid] if k != "step")


def set_state(pid, key, value):
    def mutate(sd):
        k = key(sd) if callable(key) else key
        sd["state"][pid][k] = value(sd["state"][pid][k]) if callable(value) else value
    return mutate


def set_group(**options):
    return lambda sd: sd["param_groups"][0].update(options)


# (what, mutation of a valid state_dict, exception, message). Every mutation leaves the first
# parameter's state valid (and the lr changed), so a load that installs part of it is caught.
REFUSED = [
    ("step on the meta device (check passes, copy fails)",
     set_state(1, "step", lambda s: torch.empty((), device="meta")), ValueError, "meta"),
    ("step bool", set_state(1, "step", torch.tensor(True)), TypeError, "real number"),
    ("step NaN", set_state(1, "step", torch.tensor(float("nan"))), ValueError, "finite"),
    ("step negative", set_state(1, "step", torch.tensor(-1.0)), ValueError, ">= 0"),
    ("step not 0-d", set_state(1, "step", torch.ones(1)), ValueError, "0-d"),
    ("step a string", set_state(1, "step", "3"), TypeError, "number"),
    ("step complex", set_state(1, "step", torch.tensor(1 + 0j)), TypeError, "real number"),
    ("lr NaN", set_group(lr=float("nan")), ValueError, "learning rate"),
    ("lr a string", set_group(lr="abc"), TypeError, "learning rate"),
    ("lr negative", set_group(lr=-1.0), ValueError, "learning rate"),
    ("weight_decay inf", set_group(weight_decay=float("inf")), ValueError, "weight_decay"),
    ("state_bits 4", set_group(state_bits=4), ValueError, "state_bits"),
    ("block_size 100", set_group(block_size=100), ValueError, "power of two"),
    ("min_8bit_size -1", set_group(min_8bit_size=-1), ValueError, "min_8bit_size"),
    ("differentiable", set_group(differentiable=True), ValueError, "differentiable"),
    ("maximize a string", set_group(maximize="yes"), TypeError, "maximize"),
    ("absmax NaN", set_state(1, first_absmax, lambda a: a.index_fill(0, torch.tensor([1]),
                                                                     float("nan"))),
     ValueError, "block scale"),
    ("absmax negative", set_state(1, first_absmax, lambda a: -a), ValueError, "block scale"),
    ("absmax inf", set_state(1, first_absmax, lambda a: a.index_fill(0, torch.tensor([0]),
                                                                     float("inf"))),
     ValueError, "block scale"),
    ("codes sparse", set_state(1, first_codes, lambda c: c.to_sparse()), ValueError, "layout"),
    ("codes float", set_state(1, first_codes, lambda c: c.float()), ValueError, "torch.uint8"),
    ("codes other shape", set_state(1, first_codes, lambda c: c[:-1]), ValueError, "shape"),
    ("state a list", set_state(1, first_codes, lambda c: c.tolist()), TypeError, "tensor"),
    ("param state not a dict", lambda sd: sd["state"].update({1: [1, 2]}), TypeError, "dict"),
    ("key dropped", lambda sd: sd["state"][1].pop(first_absmax(sd, 1)), ValueError, "missing"),
    ("key added", set_state(1, "surprise", torch.zeros(1)), ValueError, "unknown"),
    ("unknown parameter id", lambda sd: sd["state"].update({9: {}}), ValueError, "9"),
    ("group not a dict", lambda sd: sd["param_groups"].__setitem__(0, [1]), TypeError, "dict"),
    ("param ids not a list", set_group(params=None), TypeError, "params"),
    ("state not a dict", lambda sd: sd.update(state=[]), TypeError, "'state'"),
    ("not a state_dict", lambda sd: sd.pop("state"), ValueError, "'state' and 'param_groups'"),
]


@pytest.mark.parametrize("row", CLASS_ROWS, ids=ids(CLASS_ROWS))
@pytest.mark.parametrize("what,mutate,error,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_load_leaves_the_optimizer_bit_identical(row, what, mutate, error, message):
    opt, params = build(row)
    twin, twin_params = build(row)
    sd = source_state_dict(row)
    mutate(sd)
    with pytest.raises(error, match=message):
        opt.load_state_dict(sd)
    step(opt, params, seed=7)
    step(twin, twin_params, seed=7)
    assert_same(opt, params, twin, twin_params)


UNSIGNED_ROWS = [r for r in CLASS_ROWS if any(not signed for _, signed in r.states)]


@pytest.mark.parametrize("row", UNSIGNED_ROWS, ids=ids(UNSIGNED_ROWS))
def test_an_average_of_squares_below_zero_is_refused(row):
    opt, params = build(row)
    sd = source_state_dict(row)
    name = next(n for n, signed in row.states if not signed)
    sd["state"][2][name] = -sd["state"][2][name].abs() - 1
    with pytest.raises(ValueError, match="average of squares"):
        opt.load_state_dict(sd)


def test_an_unhashable_or_repeated_parameter_id_is_refused():
    row = CLASS_ROWS[0]
    opt, _ = build(row)
    sd = source_state_dict(row)
    sd["param_groups"][0]["params"][1] = sd["param_groups"][0]["params"][0]
    with pytest.raises(ValueError, match="appears twice"):
        opt.load_state_dict(sd)
    sd = source_state_dict(row)
    sd["param_groups"][0]["params"][1] = [1]
    with pytest.raises(TypeError, match="unhashable"):
        opt.load_state_dict(sd)


# -- what loads, and how ---------------------------------------------------------------------------


@pytest.mark.parametrize("row", CLASS_ROWS, ids=ids(CLASS_ROWS))
def test_repairable_layouts_are_repaired_and_loads_equal_the_source(row):
    """Transposed (non-contiguous) codes, a step as an int tensor or a Python number, states
    that require grad: loaded as contiguous, float32-step, detached copies of the same values."""
    source, source_params = build(row, seed=1, steps=3)
    sd = copy.deepcopy(source.state_dict())  # state_dict() shares the live state's dicts
    codes_key = first_codes(sd)
    sd["state"][0][codes_key] = sd["state"][0][codes_key].t().contiguous().t()
    assert not sd["state"][0][codes_key].is_contiguous()
    sd["state"][0]["step"] = torch.tensor(3, dtype=torch.int64)
    sd["state"][1]["step"] = 3
    sd["state"][2][fp32_key(sd)] = sd["state"][2][fp32_key(sd)].clone().requires_grad_()
    opt, params = build(row)
    opt.load_state_dict(sd)
    for p in params:
        for key, value in opt.state[p].items():
            assert value.is_contiguous() and not value.requires_grad, key
        assert opt.state[p]["step"].dtype == torch.float32
    with torch.no_grad():
        for p, q in zip(params, source_params, strict=True):
            p.copy_(q)
    step(opt, params, seed=7)
    step(source, source_params, seed=7)
    assert_same(opt, params, source, source_params)


def test_group_options_are_normalized_like_the_constructors():
    opt, params = build(CLASS_ROWS[0])
    sd = source_state_dict(CLASS_ROWS[0])
    sd["param_groups"][0].update(betas=[0.8, torch.tensor(0.95)], amsgrad=0, lr=1)
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, pytest.approx(0.95)) and type(group["betas"]) is tuple
    assert group["amsgrad"] is False and group["lr"] == 1
    step(opt, params, seed=3)


def test_the_constructor_and_add_param_group_use_the_same_checks():
    for bad, error in [(dict(lr="abc"), TypeError), (dict(lr=float("nan")), ValueError),
                       (dict(betas=(0.9,)), TypeError), (dict(amsgrad="yes"), TypeError),
                       (dict(eps=float("inf")), ValueError)]:
        with pytest.raises(error):
            Adam8bit([torch.randn(10)], **bad)
        opt = Adam8bit([torch.randn(10)])
        with pytest.raises(error):
            opt.add_param_group({"params": [torch.randn(10)], **bad})
        assert len(opt.param_groups) == 1


def test_adamw8bit_keeps_decoupled_decay_when_loading_adam8bit_state_like_torch():
    """torch.optim.AdamW keeps decoupled decay when it loads torch.optim.Adam's state_dict;
    AdamW8bit does the same (and the next step equals AdamW8bit's on the same state)."""
    torch_adamw = torch.optim.AdamW([torch.randn(3)])
    torch_adamw.load_state_dict(torch.optim.Adam([torch.randn(3)]).state_dict())
    assert torch_adamw.param_groups[0]["decoupled_weight_decay"] is True

    adam_row = CLASS_ROWS[0]
    assert adam_row.cls is Adam8bit
    source, _ = build(adam_row, seed=1, steps=3, weight_decay=0.1)
    sd = source.state_dict()
    assert sd["param_groups"][0]["decoupled_weight_decay"] is False
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    twin_params = [p.clone() for p in params]
    adamw = AdamW8bit(params, weight_decay=0.1)
    adamw.load_state_dict(sd)
    assert adamw.param_groups[0]["decoupled_weight_decay"] is True
    as_adamw = copy.deepcopy(source.state_dict())
    as_adamw["param_groups"][0]["decoupled_weight_decay"] = True
    twin = AdamW8bit(twin_params, weight_decay=0.1)
    twin.load_state_dict(as_adamw)
    step(adamw, params, seed=9)
    step(twin, twin_params, seed=9)
    assert_same(adamw, params, twin, twin_params)
    with pytest.raises(TypeError):  # and no param group can turn it off as a non-bool either
        AdamW8bit([torch.randn(3)], weight_decay=0.1).add_param_group(
            {"params": [torch.randn(3)], "amsgrad": "no"})
    opt = AdamW8bit([torch.randn(3)])
    opt.add_param_group({"params": [torch.randn(3)], "decoupled_weight_decay": False})
    assert opt.param_groups[1]["decoupled_weight_decay"] is True


# -- a failing step changes nothing ----------------------------------------------------------------


def sparse_grad(p):
    p.grad = torch.zeros(p.shape).to_sparse()


def integer_param(p):
    p.data = p.data.long()


def reshaped_param(p):
    p.data = torch.randn(p.numel() + 1)


BAD_STEPS = [
    ("sparse gradient", sparse_grad, RuntimeError, "sparse"),
    ("parameter turned integer", integer_param, TypeError, "int64"),
    ("gradient of another shape", reshaped_param, ValueError, "does not fit"),
]


@pytest.mark.parametrize("row", CLASS_ROWS, ids=ids(CLASS_ROWS))
@pytest.mark.parametrize("what,spoil,error,message", BAD_STEPS, ids=[b[0] for b in BAD_STEPS])
@pytest.mark.parametrize("fresh", [True, False], ids=["first-step", "later-step"])
def test_a_failing_step_creates_no_state_and_counts_no_step(row, what, spoil, error, message,
                                                            fresh):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = row.ours([{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}])
    if not fresh:
        step(opt, params, seed=0)
    before = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    values = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape)
    spoil(params[2])  # the last parameter of the last group: every other one would go first
    with pytest.raises(error, match=message):
        opt.step()
    after = opt.state_dict()["state"]
    assert after.keys() == before.keys()
    for i, s in before.items():
        for k, v in s.items():
            assert torch.equal(after[i][k], v), (i, k)
    for p, v in zip(params[:2], values[:2], strict=True):
        assert torch.equal(p, v)


# -- parameters that cannot be optimized are refused when added ---------------------------------


@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit, RMSprop8bit, Lion8bit],
                         ids=lambda c: c.__name__)
def test_duplicate_parameters_are_refused(cls):
    p, q = torch.randn(5000), torch.randn(10)
    with pytest.raises(ValueError, match="appears twice in one parameter group"):
        cls([p, q, p])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        cls([{"params": [p]}, {"params": [q, p]}])
    opt = cls([p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [p]})
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.float64], ids=str)
def test_parameters_of_unsupported_dtypes_are_refused_at_construction(dtype):
    bad = torch.zeros(5, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        Adam8bit([torch.randn(3), bad])
    opt = Adam8bit([torch.randn(3)])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1 and not opt.state
