"""Property-based fuzz of checkpoint loading (issue 18): a valid state_dict (or to_dict output)
with random damage (keys dropped and added, other dtypes, shapes and layouts, non-finite values,
values of the wrong type) either loads correctly or raises ValueError/TypeError, and a refused
load leaves the optimizer exactly as it was."""

from __future__ import annotations

import copy
import math

import torch
from eightbit.optim import Adam8bit, RMSprop8bit
from eightbit.quant import QuantizedTensor, quantize_blockwise
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

SHAPES = [(24, 16), (300,), (7,)]  # 8-bit (min_8bit_size=64 below), 8-bit, fp32 (small)
SETUPS = {
    "adam-amsgrad": lambda params: Adam8bit(params, amsgrad=True, min_8bit_size=64,
                                            block_size=64),
    "rmsprop-centered": lambda params: RMSprop8bit(params, lr=1e-3, momentum=0.9, centered=True,
                                                   min_8bit_size=64, block_size=64),
}
LOAD_EXAMPLES = 1000  # the issue asks for >= 1,000 cases in `make test`
FROM_DICT_EXAMPLES = 300


def trained(setup, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = SETUPS[setup](params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params


# Built once: the sources are deep-copied before damage; each target is rebuilt from its pristine
# state_dict (a load that succeeded changed it).
SOURCES = {name: copy.deepcopy(trained(name, 1)[0].state_dict()) for name in SETUPS}
PRISTINE = {name: copy.deepcopy(trained(name, 0)[0].state_dict()) for name in SETUPS}

ODD_VALUES = [
    float("nan"), float("inf"), -1.0, 0.0, 0.5, 2.0, 1e-3, 4, 8, 32, 100, 128, -3, True, False,
    None, "abc", "8", (0.5,), (0.5, 0.5), [0.9, 0.99], (0.9, float("nan")), torch.tensor(0.1),
    torch.tensor([1e-3, 1e-3]), torch.tensor(True), {}, [],
]
ODD_STEPS = [
    torch.tensor(True), torch.tensor(float("nan")), torch.tensor(-1.0), torch.ones(1),
    torch.tensor(3, dtype=torch.int64), torch.tensor(2.5, dtype=torch.float64), 5, 5.5, "5",
    None, torch.tensor(float("inf")), torch.tensor(1 + 1j), torch.zeros(()).to_sparse(),
]
DTYPES = [torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool, torch.float32,
          torch.bfloat16, torch.int8]


# What damage to draw; the state tensors (and their values) are where most can go wrong, so they
# come up more often.
MUTATIONS = ["state tensor"] * 4 + [
    "step", "drop key", "add key", "group option", "group option", "drop group key",
    "add group key", "param state", "param ids", "top level"]
TENSOR_DAMAGE = ["dtype", "shape", "layout", "layout", "value", "value", "value", "type", "device"]


def damaged_tensor(draw, t: torch.Tensor):
    """One kind of damage to a tensor (some of which is harmless)."""
    if t.layout != torch.strided or t.device.type != "cpu":
        return t  # damaged already
    kind = draw(st.sampled_from(TENSOR_DAMAGE))
    if kind == "dtype":
        return t.to(draw(st.sampled_from(DTYPES)))
    if kind == "shape":
        how = draw(st.sampled_from(["drop", "flat", "unsqueeze", "empty", "scalar"]))
        return {"drop": lambda: t.reshape(-1)[:-1] if t.numel() else t.reshape(-1),
                "flat": lambda: t.reshape(-1), "unsqueeze": lambda: t.unsqueeze(0),
                "empty": lambda: t.new_zeros(0), "scalar": lambda: t.reshape(-1)[:1].sum()}[how]()
    if kind == "layout":
        how = draw(st.sampled_from(["transpose", "strided", "sparse"]))
        if how == "transpose" and t.dim() == 2:
            return t.t().contiguous().t()  # same shape, not contiguous: repairable
        if how == "sparse" and t.dim() >= 1:
            return t.to_sparse()
        spread = t.new_zeros((2 * max(t.numel(), 1),))[::2][: t.numel()]
        return spread.copy_(t.reshape(-1)).view_as(t) if t.dim() <= 1 else spread.view(t.shape)
    if kind == "value":
        if t.numel() == 0 or t.is_complex() or t.dtype == torch.bool:
            return t
        out = t.clone()
        where = draw(st.integers(0, t.numel() - 1))
        if t.is_floating_point():
            value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 1e30,
                                          0.0]))
            out.view(-1)[where] = value
        else:
            out.view(-1)[where] = draw(st.integers(0, 255))  # codes: any code is a valid code
        return out
    if kind == "device":
        return t.to("meta")
    return draw(st.sampled_from([None, 0, "codes", [1, 2], t.tolist() if t.numel() < 4 else {}]))


@st.composite
def damaged_state_dicts(draw):
    setup = draw(st.sampled_from(sorted(SETUPS)))
    sd = copy.deepcopy(SOURCES[setup])
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one: its effect is seen
        what = draw(st.sampled_from(MUTATIONS))
        pids = sorted(sd["state"], key=str) if isinstance(sd.get("state"), dict) else []
        pid = draw(st.sampled_from(pids)) if pids else None
        state = sd["state"][pid] if pid is not None else None
        groups = sd.get("param_groups")
        group = groups[0] if isinstance(groups, list) and groups and isinstance(
            groups[0], dict) else None
        tensor_keys = sorted((k for k, v in state.items() if isinstance(v, torch.Tensor)
                              and k != "step"), key=str) if isinstance(state, dict) else []
        if what == "state tensor" and tensor_keys:
            key = draw(st.sampled_from(tensor_keys))
            state[key] = damaged_tensor(draw, state[key])
        elif what == "step" and isinstance(state, dict):
            state["step"] = draw(st.sampled_from(ODD_STEPS))
        elif what == "drop key" and isinstance(state, dict) and state:
            state.pop(draw(st.sampled_from(sorted(state, key=str))))
        elif what == "add key" and isinstance(state, dict):
            state[draw(st.sampled_from(["extra", "exp_avg", "square_avg_codes", "step2"]))] = (
                torch.zeros(3))
        elif what == "group option" and group is not None:
            key = draw(st.sampled_from(sorted((k for k in group if k != "params"), key=str)))
            group[key] = draw(st.sampled_from(ODD_VALUES))
        elif what == "drop group key" and group is not None:
            group.pop(draw(st.sampled_from(sorted(group, key=str))))
        elif what == "add group key" and group is not None:
            group[draw(st.sampled_from(["initial_lr", "param_names", "surprise"]))] = 0.1
        elif what == "param state" and pid is not None:
            if draw(st.booleans()):
                del sd["state"][pid]  # a parameter without state: loads (fresh on next step)
            else:
                sd["state"][draw(st.sampled_from([pid, 17, "x"]))] = draw(
                    st.sampled_from([[1], None, {}, {"step": torch.tensor(1.0)}]))
        elif what == "param ids" and group is not None and isinstance(group.get("params"), list):
            ids = group["params"]
            how = draw(st.sampled_from(["repeat", "drop", "extra", "unhashable", "rename"]))
            if how == "repeat" and len(ids) > 1:
                ids[1] = ids[0]
            elif how == "drop" and ids:
                ids.pop()
            elif how == "extra":
                ids.append(99)
            elif how == "unhashable" and ids:
                ids[0] = [ids[0]]
            elif how == "rename" and ids:
                ids[-1] = 42
        elif what == "top level":
            key = draw(st.sampled_from(["state", "param_groups"]))
            how = draw(st.sampled_from(["drop", "list", "none", "extra group"]))
            if how == "drop":
                sd.pop(key, None)
            elif how == "list":
                sd[key] = []
            elif how == "none":
                sd[key] = None
            elif how == "extra group" and isinstance(sd.get("param_groups"), list):
                sd["param_groups"].append({"params": []})
    return setup, sd


def snapshot(opt):
    sd = opt.state_dict()
    return (copy.deepcopy(sd["param_groups"]),
            {pid: {k: (v.dtype, v.device, v.clone()) for k, v in s.items()}
             for pid, s in sd["state"].items()})


def assert_unchanged(opt, before):
    groups, state = snapshot(opt)
    assert _same(groups, before[0])
    assert state.keys() == before[1].keys()
    for pid, s in state.items():
        assert s.keys() == before[1][pid].keys()
        for key, (dtype, device, value) in s.items():
            old_dtype, old_device, old = before[1][pid][key]
            assert dtype == old_dtype and device == old_device and torch.equal(value, old)


def _same(a, b):
    """Equality that holds for NaN and tensors in param groups (a group may hold a tensor lr)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def assert_loaded(opt, params, sd):
    """The optimizer holds exactly the state_dict's state (as contiguous copies, the step as
    float32) and its options, and takes a step."""
    for saved_group, group in zip(sd["param_groups"], opt.param_groups, strict=True):
        for key, value in saved_group.items():
            if key not in ("params", "betas", "amsgrad", "centered", "maximize", "capturable",
                           "bf16_stochastic_rounding", "foreach", "fused"):
                assert _same(group[key], value), key
    ids = [pid for g in sd["param_groups"] for pid in g["params"]]
    for pid, p in zip(ids, params, strict=True):
        if pid not in sd["state"]:
            assert not opt.state.get(p)
            continue
        state = opt.state[p]
        assert state.keys() == sd["state"][pid].keys()
        for key, value in sd["state"][pid].items():
            loaded = state[key]
            assert loaded.is_contiguous() and loaded.layout == torch.strided
            if key == "step":
                assert loaded.dtype == torch.float32 and float(loaded) == float(value)
            elif loaded.device.type != "meta":
                assert loaded.dtype == value.dtype, key
                torch.testing.assert_close(loaded, value, rtol=0, atol=0, equal_nan=True)
                if key.endswith("_absmax"):  # a block's largest magnitude
                    assert bool((torch.isfinite(loaded) & (loaded >= 0)).all()), key
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


@settings(max_examples=LOAD_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=damaged_state_dicts())
def test_a_damaged_state_dict_loads_correctly_or_is_refused_and_changes_nothing(case):
    setup, sd = case
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = SETUPS[setup](params)
    opt.load_state_dict(copy.deepcopy(PRISTINE[setup]))
    before = snapshot(opt)
    try:
        opt.load_state_dict(sd)
    except (ValueError, TypeError) as error:
        event(f"refused: {type(error).__name__}")
        assert_unchanged(opt, before)
        return
    event("loaded")
    assert_loaded(opt, params, sd)


@st.composite
def damaged_quantized_dicts(draw):
    x = torch.randn(draw(st.sampled_from([(0,), (5,), (300,), (20, 30)])))
    d = quantize_blockwise(x, block_size=64).to_dict()
    d = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["tensor", "drop", "add", "block_size", "dtype", "type"]))
        if what == "tensor":
            key = draw(st.sampled_from(["codes", "absmax", "codebook"]))
            if isinstance(d.get(key), torch.Tensor):
                d[key] = damaged_tensor(draw, d[key])
        elif what == "drop" and d:
            d.pop(draw(st.sampled_from(sorted(d, key=str))))
        elif what == "add":
            d["surprise"] = 1
        elif what == "block_size":
            d["block_size"] = draw(st.sampled_from([32, 128, 100, "64", None, 64.0, True]))
        elif what == "dtype":
            d["dtype"] = draw(st.sampled_from(["float64", "bfloat16", "float16", "int8", "nope",
                                               5, None, torch.float32, "float32"]))
        else:
            return draw(st.sampled_from([None, [], "dict", 3]))
    return d


@settings(max_examples=FROM_DICT_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(d=damaged_quantized_dicts())
def test_a_damaged_quantized_dict_rebuilds_a_working_tensor_or_is_refused(d):
    try:
        q = QuantizedTensor.from_dict(d)
    except (ValueError, TypeError) as error:
        event(f"refused: {type(error).__name__}")
        return
    event("rebuilt")
    y = q.dequantize()
    assert y.shape == q.codes.shape and y.dtype == q.dtype
    assert bool((q.absmax.isnan() | (q.absmax >= 0)).all()) or q.absmax.device.type == "meta"
