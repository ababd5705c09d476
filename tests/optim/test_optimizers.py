"""What torch users rely on, for every row of the table: state layout, the size rule, param groups,
schedulers, closures, zero_grad, hooks, GradScaler, and clear errors.

With ``state_bits=32`` our optimizers run torch's own fp32 arithmetic, so those tests demand
bit-equality with torch.optim (Lion: the paper's rule in tests/, up to rounding order).
"""

from __future__ import annotations

import pytest
import torch
from eightbit.optim import (
    Adagrad8bit,
    Adam8bit,
    AdamW8bit,
    Lion8bit,
    Optimizer8bit,
    RMSprop8bit,
    SGD8bit,
)
from eightbit.quant import num_blocks

from .cases import CLASS_ROWS, ROWS, dequantized, ids, rows
from .lion_reference import LionReference

SIZES = [(1,), (4095,), (4096,), (4097,), (64, 300), (0,), (3, 0)]


def assert_same(row, a, b):
    if row.ref is LionReference:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(a, b)


def grads(params, t):
    gen = torch.Generator().manual_seed(t)
    return [torch.randn(p.shape, generator=gen) for p in params]


def run(opt, params, steps, *, skip=None):
    """``steps`` steps with fixed gradients; ``skip`` = (param index, step) left without a grad."""
    for t in range(steps):
        for i, (p, g) in enumerate(zip(params, grads(params, t), strict=True)):
            p.grad = None if skip == (i, t) else g
        opt.step()


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_state_layout_and_size_rule(row):
    params = [torch.randn(s) for s in SIZES]
    opt = row.ours(params)
    run(opt, params, 1)
    for p in params:
        state = opt.state[p]
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
        assert state["step"].item() == 1.0
        if p.numel() >= 4096:  # min_8bit_size: 8-bit state, torch's names + _codes / _absmax
            assert set(state) == {"step"} | {
                f"{name}_{part}" for name, _ in row.states for part in ("codes", "absmax")
            }
            for name, _ in row.states:
                assert state[f"{name}_codes"].dtype == torch.uint8
                assert state[f"{name}_codes"].shape == p.shape
                assert state[f"{name}_absmax"].dtype == torch.float32
                assert state[f"{name}_absmax"].shape == (num_blocks(p.numel(), 256),)
        else:  # small parameters keep fp32 state under torch's exact keys
            assert set(state) == {"step"} | {name for name, _ in row.states}
            for name, _ in row.states:
                assert state[name].dtype == torch.float32 and state[name].shape == p.shape


@pytest.mark.parametrize("row", CLASS_ROWS, ids=ids(CLASS_ROWS))
def test_min_8bit_size_and_block_size(row):
    params = [torch.randn(s) for s in SIZES]
    opt = row.ours(params, min_8bit_size=0, block_size=64)
    run(opt, params, 2)
    name = row.states[0][0]
    for p in params:
        assert opt.state[p][f"{name}_absmax"].numel() == num_blocks(p.numel(), 64)


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_state_bits_32_is_torch_bit_for_bit(row):
    """Groups, a grad that is None for a step, add_param_group, zero-size and 2-D parameters."""
    shapes = [(4097,), (64, 300), (7,), (0,), (3, 5)]
    ours_p = [torch.randn(s) for s in shapes]
    ref_p = [p.clone() for p in ours_p]

    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:4], "lr": row.kwargs["lr"] * 3}]

    ours = row.ours(groups(ours_p), state_bits=32)
    ref = row.oracle(groups(ref_p))
    for opt, params in ((ours, ours_p), (ref, ref_p)):
        run(opt, params[:4], 3, skip=(1, 1))
        opt.add_param_group({"params": params[4:], "lr": row.kwargs["lr"] / 2})
        run(opt, params, 2)
    for a, b in zip(ours_p, ref_p, strict=True):
        assert_same(row, a, b)
    assert ours.state[ours_p[1]]["step"].item() == 4.0  # no grad at step 1: not counted


@pytest.mark.parametrize("row", CLASS_ROWS, ids=ids(CLASS_ROWS))
def test_a_parameter_without_grad_is_untouched(row):
    params = [torch.randn(5000), torch.randn(5000)]
    opt = row.ours(params)
    before = params[1].clone()
    params[0].grad = torch.randn(5000)
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state
    opt.zero_grad()  # set_to_none: nothing to do
    snapshot = params[0].clone()
    opt.step()
    assert torch.equal(params[0], snapshot)
    assert opt.state[params[0]]["step"].item() == 1.0


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("row", CLASS_ROWS, ids=ids(CLASS_ROWS))
def test_lr_schedulers(row, tensor_lr):
    lr = row.kwargs["lr"]
    lr = torch.tensor(lr) if tensor_lr else lr
    ours_p = [torch.randn(300), torch.randn(20, 30)]
    ref_p = [p.clone() for p in ours_p]
    ours = row.ours(ours_p, lr=lr.clone() if tensor_lr else lr, state_bits=32)
    ref = row.oracle(ref_p, lr=lr.clone() if tensor_lr else lr)
    for opt, params in ((ours, ours_p), (ref, ref_p)):
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        for t in range(5):
            for p, g in zip(params, grads(params, t), strict=True):
                p.grad = g
            opt.step()
            sched.step()
    assert float(ours.param_groups[0]["lr"]) == pytest.approx(float(row.kwargs["lr"]) * 0.01)
    for a, b in zip(ours_p, ref_p, strict=True):
        if tensor_lr:  # torch divides a float32 tensor lr; we read it as a Python float
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert_same(row, a, b)


@pytest.mark.parametrize("row", CLASS_ROWS, ids=ids(CLASS_ROWS))
def test_closure_is_called_with_grad_enabled_and_its_loss_returned(row):
    model = torch.nn.Linear(100, 50)
    x, y = torch.randn(16, 100), torch.randn(16, 50)
    opt = row.ours(model.parameters(), min_8bit_size=0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(5)]
    assert losses[-1] < losses[0]


def test_step_hooks_run():
    params = [torch.randn(5000)]
    opt = AdamW8bit(params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    params[0].grad = torch.randn(5000)
    opt.step()
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("row", CLASS_ROWS, ids=ids(CLASS_ROWS))
def test_grad_scaler_with_fp16_autocast(row):
    """torch's AMP recipe: fp16 autocast, GradScaler unscales, skips the step on inf."""
    results = []
    for make in (row.ours, row.oracle):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 8))
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        x, y = torch.randn(32, 64), torch.randn(32, 8)
        for t in range(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss * (float("inf") if t == 2 else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
        weight = model[0].weight
        if make == row.ours or row.ref is not torch.optim.SGD:  # torch's SGD keeps no step
            assert opt.state[weight]["step"].item() == 3.0  # the inf step was skipped
        results.append(weight.detach())
    # fp16 forward passes, 8-bit state: close to the fp32-state run, step by step
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=10 * row.kwargs["lr"])


def test_adamw_is_adam_with_decoupled_decay_and_torch_defaults():
    p = [torch.randn(10)]
    assert AdamW8bit(p).defaults["weight_decay"] == torch.optim.AdamW(p).defaults["weight_decay"]
    assert AdamW8bit(p).defaults["decoupled_weight_decay"] is True
    for ours, theirs in ((Adam8bit, torch.optim.Adam), (RMSprop8bit, torch.optim.RMSprop),
                         (SGD8bit, torch.optim.SGD), (Adagrad8bit, torch.optim.Adagrad)):
        mine = ours(p).defaults
        for key, value in theirs(p).defaults.items():
            if key not in ("differentiable",):
                assert mine[key] == value, (ours.__name__, key)
    assert Lion8bit(p).defaults["lr"] == 1e-4 and Lion8bit(p).defaults["betas"] == (0.9, 0.99)
    assert issubclass(Lion8bit, Optimizer8bit)


@pytest.mark.parametrize("row", CLASS_ROWS, ids=ids(CLASS_ROWS))
def test_performance_hints_are_accepted(row):
    p = [torch.randn(5000)]
    opt = row.ours(p, foreach=True, fused=True, capturable=True)
    p[0].grad = torch.randn(5000)
    opt.step()
    assert opt.state[p[0]]["step"].item() == 1.0


def test_adagrad_initial_accumulator_value_is_stored_exactly():
    """Q_+(v) of a constant v is exact (code of 1.0, absmax v); a zero gradient keeps it."""
    params = [torch.randn(5000), torch.randn(10)]
    opt = Adagrad8bit(params, initial_accumulator_value=0.3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(dequantized(opt.state[params[0]], "sum", signed=False),
                       torch.full((5000,), 0.3))
    assert torch.equal(opt.state[params[1]]["sum"], torch.full((10,), 0.3))  # fp32: torch's key


BAD_ARGS = [
    (Adam8bit, dict(differentiable=True), "differentiable=True"),
    (Lion8bit, dict(differentiable=True), "differentiable=True"),
    (Adam8bit, dict(lr=-1.0), "learning rate"),
    (Adam8bit, dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
    (AdamW8bit, dict(eps=-1.0), "epsilon"),
    (RMSprop8bit, dict(momentum=-0.1), "momentum"),
    (RMSprop8bit, dict(weight_decay=-1.0), "weight_decay"),
    (Lion8bit, dict(betas=(0.9, 1.5)), "beta parameter at index 1"),
    (Adam8bit, dict(block_size=100), "power of two"),
    (Adam8bit, dict(min_8bit_size=-1), "min_8bit_size"),
    (Adam8bit, dict(lr=torch.tensor([1e-3, 1e-3])), "one element"),
    (SGD8bit, dict(momentum=0.9, nesterov=True, dampening=0.1), "Nesterov"),
    (SGD8bit, dict(nesterov=True), "Nesterov"),
    (SGD8bit, dict(momentum=-0.5), "momentum"),
    (Adagrad8bit, dict(lr_decay=-1.0), "lr_decay"),
    (Adagrad8bit, dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (Adagrad8bit, dict(eps=-1.0), "epsilon"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD_ARGS,
                         ids=[f"{c.__name__}-{m}" for c, _, m in BAD_ARGS])
def test_bad_arguments_get_clear_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([torch.randn(10)], **kwargs)


def test_bad_param_group_options_are_refused():
    opt = Adam8bit([torch.randn(10)])
    with pytest.raises(ValueError, match="state_bits must be 8 or 32"):
        opt.add_param_group({"params": [torch.randn(10)], "state_bits": 16})
    with pytest.raises(ValueError, match="power of two"):
        opt.add_param_group({"params": [torch.randn(10)], "block_size": 3})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="state_bits must be 8 or 32"):
        Adam8bit([{"params": [torch.randn(10)], "state_bits": 4}])


class FakeDTensor(torch.Tensor):
    """Stands for a DTensor: a global parameter whose rank holds only a local shard."""

    @staticmethod
    def __new__(cls, local, global_numel):
        t = torch.Tensor._make_subclass(cls, local)
        t._local, t._global_numel = local, global_numel
        return t

    def to_local(self):
        return self._local

    def numel(self):
        return self._global_numel


def test_state_is_created_from_the_local_tensor_and_the_size_rule_sees_the_whole():
    shard = torch.randn(3000)  # below min_8bit_size on its own
    param = FakeDTensor(shard, global_numel=12000)  # but the parameter is above it
    param.grad = FakeDTensor(torch.randn(3000), global_numel=12000)
    opt = Adam8bit([param])
    before = shard.clone()
    opt.step()
    state = opt.state[param]
    assert state["exp_avg_codes"].shape == shard.shape  # 8-bit, shaped like the shard
    assert state["exp_avg_absmax"].numel() == num_blocks(3000, 256)
    assert not torch.equal(shard, before)  # the update went to the local shard


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_a_real_dtensor_parameter_in_a_one_rank_process_group():
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        full = torch.randn(100, 512)  # rows of whole blocks: the flat blocking, bit for bit
        param = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
        ref = torch.nn.Parameter(full.clone())
        ours, theirs = Adam8bit([param]), Adam8bit([ref])
        for t in range(3):
            g = torch.randn(100, 512, generator=torch.Generator().manual_seed(t))
            param.grad = distribute_tensor(g, mesh, [Shard(0)])
            ref.grad = g
            ours.step(), theirs.step()
        state = ours.state[param]
        codes, absmax = state["exp_avg_codes"], state["exp_avg_absmax"]
        # DTensor states, sharded like the parameter (tests/distributed checks what DCP does)
        assert isinstance(codes, DTensor) and codes.placements == param.placements
        assert isinstance(absmax, DTensor) and absmax.shape == (100, 2)
        same = torch.equal(param.to_local(), ref.detach())  # one rank: the same as unsharded
        same_codes = torch.equal(codes.to_local(), theirs.state[ref]["exp_avg_codes"])
        same_absmax = torch.equal(absmax.to_local().view(-1), theirs.state[ref]["exp_avg_absmax"])
        assert same and same_codes and same_absmax
    finally:
        dist.destroy_process_group()


# These move every weight by at most about lr per step at gradient ~1 (RMSprop's first steps are
# larger; SGD's momentum builds up to (1 - dampening) / (1 - momentum) times the gradient).
SMALL_STEP_ROWS = rows("Adam", "AdamW", "Lion", "SGD", "Adagrad")


@pytest.mark.parametrize("row", SMALL_STEP_ROWS, ids=ids(SMALL_STEP_ROWS))
def test_bf16_stochastic_rounding_option(row):
    """Deterministic under a seed, unbiased: the mean bf16 weight follows the fp32 run."""

    def run_bf16(sr, seed=0):
        torch.manual_seed(seed)
        p = torch.ones(8192, dtype=torch.bfloat16)
        opt = row.ours([p], lr=1e-3, bf16_stochastic_rounding=sr)
        for t in range(10):
            p.grad = torch.full_like(p, 1.0) + 0.1 * torch.randn(8192, generator=torch.Generator()
                                                                 .manual_seed(t)).bfloat16()
            opt.step()
        return p.double()

    a, b = run_bf16(True), run_bf16(True)
    assert torch.equal(a, b) and not torch.equal(a, run_bf16(True, seed=1))
    fp32 = torch.ones(8192)
    opt = row.ours([fp32], lr=1e-3)
    for t in range(10):
        fp32.grad = torch.full_like(fp32, 1.0) + 0.1 * torch.randn(
            8192, generator=torch.Generator().manual_seed(t)).bfloat16().float()
        opt.step()
    # Each stochastic rounding adds at most ulp/2 = 2^-8 of zero-mean noise per weight and step;
    # rounding to nearest would lose every update (~1e-3 per step, below half an ulp at 1.0).
    assert torch.equal(run_bf16(False), torch.ones(8192, dtype=torch.float64))
    sigma = (10 * (2**-8) ** 2 / 8192) ** 0.5
    assert abs(a.mean().item() - fp32.double().mean().item()) < 6 * sigma + 1e-4


@pytest.mark.parametrize("block_size", [64, 4096])
@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_fused_cpu_path_follows_the_torch_path_over_steps(row, block_size, monkeypatch):
    # One optimizer over parameters of ragged sizes (one fused kernel call per step walks all
    # of them) against the same optimizer on the torch path, the oracle. The bounds are those of
    # tests/functional/test_native.py: a parameter may differ in its last bits (IEEE sqrt against
    # torch's), and so, once that feeds back (weight decay, momentum), may a code at a boundary;
    # an element whose code flipped then moves by a code step more or less, so those few
    # elements are bounded by 1% of the distance the parameter travelled.
    from eightbit.quant import _native as quant_native

    sizes = [(1,), (63,), (64,), (65,), (4095,), (4097,), (30, 700)]
    results = []
    for backend in ("auto", "torch"):
        monkeypatch.setenv(quant_native.ENV, backend)
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in sizes]
        opt = row.ours(params, min_8bit_size=0, block_size=block_size)
        for t in range(3):
            for p, g in zip(params, grads(params, t), strict=True):
                p.grad = g
            opt.step()
        results.append((params, opt))
    (ours, ours_opt), (theirs, theirs_opt) = results
    start = torch.Generator().manual_seed(3)
    for p, q in zip(ours, theirs, strict=True):
        travelled = (q.detach() - torch.randn(q.shape, generator=start)).abs().max()
        differ = ~torch.isclose(p, q, rtol=2e-6, atol=1e-7)
        assert differ.float().mean() <= 1e-3 and (p - q).abs().max() <= 0.01 * travelled
        for key, value in theirs_opt.state[q].items():
            mine = ours_opt.state[p][key]
            if key.endswith("_codes"):
                differ = (mine.int() - value.int()).abs()
                assert differ.max() <= 1 and (differ > 0).float().mean() <= 1e-3, key
            else:
                torch.testing.assert_close(mine, value, rtol=2.0**-18, atol=0.0)
