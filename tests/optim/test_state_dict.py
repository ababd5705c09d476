"""Checkpoints: save, load (weights_only), continue == an uninterrupted run, bit for bit; dtypes
kept; other devices; a state_dict that does not fit is refused and changes nothing."""

from __future__ import annotations

import io

import pytest
import torch
from eightbit.optim import Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit

from .cases import ROWS, ids

SHAPES = [(4097,), (40, 120), (7,), (0,)]  # 8-bit, 8-bit, fp32 (small), empty


def make_params(dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).to(device) for s in SHAPES]


def grads_for(step: int, params):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p) for p in params]


def train(opt, params, steps: range):
    for t in steps:
        for p, g in zip(params, grads_for(t, params), strict=True):
            p.grad = None if t % 3 == 2 and p.numel() == 7 else g  # a grad that is None
        opt.step()


def two_groups(row, params, **extra):
    """Two groups, the second with fp32 state and its own lr."""
    return row.ours([{"params": params[:2]},
                     {"params": params[2:], "state_bits": 32, "lr": row.kwargs["lr"] * 2}],
                    **extra)


def save(opt) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_save_load_continue_is_bit_exact(row, dtype):
    params = make_params(dtype)
    opt = two_groups(row, params)
    train(opt, params, range(3))
    data = save(opt)
    resumed_params = [p.clone() for p in params]
    train(opt, params, range(3, 6))  # the uninterrupted run

    resumed = two_groups(row, resumed_params)
    resumed.load_state_dict(load(data))
    train(resumed, resumed_params, range(3, 6))
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed_params, strict=True):
        sa, sb = opt.state[a], resumed.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("row", ROWS[::3], ids=ids(ROWS[::3]))
def test_load_keeps_state_dtypes_for_bf16_params(row):
    """torch would cast floating state (and, for float params, the codes) to the param dtype."""
    params = make_params(torch.bfloat16)
    opt = two_groups(row, params)
    train(opt, params, range(2))
    fresh = two_groups(row, [p.clone() for p in params])
    fresh.load_state_dict(load(save(opt)))
    for p in fresh.param_groups[0]["params"][:1] + fresh.param_groups[1]["params"][:1]:
        state = fresh.state[p]
        for key, value in state.items():
            if key == "step":
                assert value.dtype == torch.float32 and value.dim() == 0
                assert value.device.type == "cpu"
            elif key.endswith("_codes"):
                assert value.dtype == torch.uint8
            else:
                assert value.dtype == torch.float32, key  # absmax and fp32 states


def test_loaded_state_does_not_alias_the_state_dict():
    params = make_params()
    opt = Adam8bit(params)
    train(opt, params, range(1))
    sd = opt.state_dict()
    before = {k: v.clone() for k, v in sd["state"][0].items()}
    fresh_params = [p.clone() for p in params]
    fresh = Adam8bit(fresh_params)
    fresh.load_state_dict(sd)
    train(fresh, fresh_params, range(1, 2))
    for key, value in before.items():
        assert torch.equal(sd["state"][0][key], value), key


def test_state_dict_holds_only_tensors_and_plain_values():
    params = make_params()
    opt = RMSprop8bit(params, momentum=0.9, centered=True)
    train(opt, params, range(1))
    sd = load(save(opt))  # weights_only=True refuses anything else
    plain = (int, float, bool, str, type(None), tuple, list, torch.Tensor)
    for group in sd["param_groups"]:
        assert all(isinstance(v, plain) for v in group.values())
    assert set(sd["state"][0]) == {
        "step", "square_avg_codes", "square_avg_absmax", "momentum_buffer_codes",
        "momentum_buffer_absmax", "grad_avg_codes", "grad_avg_absmax",
    }
    assert set(sd["state"][2]) == {"step", "square_avg", "momentum_buffer", "grad_avg"}


def test_load_onto_the_meta_device_moves_state_and_keeps_dtypes():
    params = make_params(torch.bfloat16)
    opt = AdamW8bit(params)
    train(opt, params, range(1))
    meta_params = [torch.empty_like(p, device="meta") for p in params]
    fresh = AdamW8bit(meta_params)
    fresh.load_state_dict(load(save(opt)))
    state = fresh.state[meta_params[0]]
    assert state["exp_avg_codes"].device.type == "meta"
    assert state["exp_avg_codes"].dtype == torch.uint8
    assert state["exp_avg_absmax"].dtype == torch.float32
    assert state["step"].device.type == "cpu"  # like torch, the step of a non-CUDA param


@pytest.mark.gpu
@pytest.mark.parametrize("row", ROWS[::3], ids=ids(ROWS[::3]))
def test_save_on_one_device_resume_on_another(row):
    """CPU -> CUDA -> CPU: the state follows the parameters; training continues the same way."""
    params = make_params()
    opt = two_groups(row, params)
    train(opt, params, range(2))
    cuda_params = [p.detach().cuda() for p in params]
    on_cuda = two_groups(row, cuda_params)
    on_cuda.load_state_dict(load(save(opt)))
    state = on_cuda.state[cuda_params[0]]
    assert all(v.is_cuda for v in state.values())  # step too: CUDA kernels read it on device
    train(on_cuda, cuda_params, range(2, 4))
    train(opt, params, range(2, 4))
    back_params = [p.detach().cpu() for p in cuda_params]
    back = two_groups(row, back_params)
    back.load_state_dict(load(save(on_cuda)))
    assert all(v.device.type == "cpu" for v in back.state[back_params[0]].values())
    # CUDA and CPU round fp32 differently (FMA), and a code can move at a threshold.
    for a, b in zip(params, back_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


# -- a state_dict that does not fit ---------------------------------------------------------------


def trained(cls, params=None, split=None, **kwargs):
    """``cls`` after one step on ``params``, in one group or split in groups at ``split``."""
    params = params if params is not None else make_params()
    groups = params if split is None else [{"params": params[a:b]} for a, b in split]
    opt = cls(groups, **kwargs)
    train(opt, params, range(1))
    return opt


def tamper(sd, fn):
    fn(sd)
    return sd


MISFITS = [
    ("other 8-bit optimizer", lambda: trained(Lion8bit).state_dict(), "not saved by"),
    ("other states, same group options",  # RMSprop state under Adam's group options
     lambda: tamper(trained(RMSprop8bit).state_dict(), lambda sd: [
         g.update(Adam8bit(make_params()).defaults, params=g["params"])
         for g in sd["param_groups"]]),
     "do not fit"),
    ("torch optimizer", lambda: trained(torch.optim.Adam).state_dict(), "not saved by"),
    ("other shapes", lambda: trained(Adam8bit, [torch.randn(5000), torch.randn(40, 120),
                                                torch.randn(7), torch.randn(0)]).state_dict(),
     "shape"),
    ("more groups", lambda: trained(Adam8bit, split=[(0, 1), (1, 4)]).state_dict(),
     "param groups"),
    ("group layout", lambda: tamper(trained(Adam8bit, split=[(0, 3), (3, 4)]).state_dict(),
                                    lambda sd: sd["param_groups"].pop()), "parameters"),
    ("block_size", lambda: tamper(trained(Adam8bit).state_dict(),
                                  lambda sd: sd["param_groups"][0].update(block_size=128)),
     "block_size 128"),
    ("codes dtype", lambda: tamper(trained(Adam8bit).state_dict(), lambda sd: sd["state"][0]
                                   .update(exp_avg_codes=sd["state"][0]["exp_avg_codes"].float())),
     "torch.uint8"),
    ("unknown parameter", lambda: tamper(trained(Adam8bit).state_dict(),
                                         lambda sd: sd["state"].update({99: {}})), "99"),
    ("not a state_dict", lambda: {"params": []}, "'state' and 'param_groups'"),
]


@pytest.mark.parametrize("what,make,message", MISFITS, ids=[m[0] for m in MISFITS])
def test_a_state_dict_that_does_not_fit_is_refused_and_changes_nothing(what, make, message):
    params = make_params()
    opt = Adam8bit(params, lr=1e-3)
    train(opt, params, range(2))
    before = opt.state_dict()
    before_state = {i: {k: v.clone() for k, v in s.items()} for i, s in before["state"].items()}
    before_groups = [dict(g) for g in before["param_groups"]]
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(make())
    after = opt.state_dict()
    assert after["param_groups"] == before_groups
    assert after["state"].keys() == before_state.keys()
    for i, s in before_state.items():
        assert after["state"][i].keys() == s.keys()
        for k, v in s.items():
            assert torch.equal(after["state"][i][k], v)
