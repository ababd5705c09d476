"""The functional rules against two oracles, one table row per rule and variant.

Both are about the torch path, the oracle of the native and CUDA backends (tested against it in
their own files), so the fixture below forces it.

1. The fp32-state twins against torch.optim's single-tensor code (bit for bit) and, for Lion,
   against the paper's algorithm written in tests/optim/lion_reference.py.
2. Each 8-bit rule against "dequantize the state, take the fp32 twin's step, quantize the state"
   with eightbit.quant's public quantize_blockwise / dequantize_blockwise and the state rule of
   issue 17 (non-finite elements restart from 0, a positive non-negative state never gets the
   code of zero): bit for bit, since the 8-bit rule promises exactly that composition.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from eightbit.functional import (
    _chunked,
    adagrad8bit_update,
    adagrad32bit_update,
    adam8bit_update,
    adam32bit_update,
    lion8bit_update,
    lion32bit_update,
    rmsprop8bit_update,
    rmsprop32bit_update,
    sgd8bit_update,
    sgd32bit_update,
)
from eightbit.quant import dequantize_blockwise, get_codebook, quantize_blockwise

from tests.optim.lion_reference import LionReference

try:
    from eightbit.functional import _native
except ImportError:  # no native CPU path in this tree
    _native = None

BLOCK = 256


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """These tests are about the torch path, the oracle of the other backends: force it on CPU."""
    if _native is not None:
        monkeypatch.setattr(_native, "serves", lambda params: False)


@dataclasses.dataclass
class Rule:
    id: str
    update8: callable
    update32: callable
    slots: list[tuple[str, bool]]  # (state name, signed) in the functional's positional order
    on: dict[str, bool]  # which optional states the variant uses
    kwargs: dict
    uses_steps: bool
    torch_cls: type | None = None  # the fp32 oracle, constructed with torch_kwargs
    torch_kwargs: dict = dataclasses.field(default_factory=dict)


def adam(id, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled=False):
    kw = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
              decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize)
    return Rule(id, adam8bit_update, adam32bit_update,
                [("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False)],
                {"max_exp_avg_sq": amsgrad}, kw, True, torch.optim.Adam,
                dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                     maximize=maximize, decoupled_weight_decay=decoupled, foreach=False))


def rmsprop(id, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False):
    kw = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
              centered=centered, maximize=maximize)
    return Rule(id, rmsprop8bit_update, rmsprop32bit_update,
                [("square_avg", False), ("momentum_buffer", True), ("grad_avg", True)],
                {"momentum_buffer": momentum > 0, "grad_avg": centered}, kw, False,
                torch.optim.RMSprop, dict(kw, foreach=False))


def lion(id, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
    kw = dict(lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay,
              maximize=maximize)
    return Rule(id, lion8bit_update, lion32bit_update, [("exp_avg", True)], {}, kw, False,
                LionReference, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                    maximize=maximize))


def sgd(id, lr=1e-2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
        maximize=False):
    kw = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    return Rule(id, sgd8bit_update, sgd32bit_update, [("momentum_buffer", True)],
                {"momentum_buffer": momentum != 0}, kw, True, torch.optim.SGD,
                dict(kw, foreach=False))


def adagrad(id, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False):
    kw = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize)
    return Rule(id, adagrad8bit_update, adagrad32bit_update, [("sum", False)], {}, kw, True,
                torch.optim.Adagrad, dict(kw, foreach=False))


RULES = [
    adam("adam"),
    adam("adam-l2-amsgrad-maximize", weight_decay=0.1, amsgrad=True, maximize=True),
    adam("adamw", weight_decay=0.1, decoupled=True),
    adam("adamw-amsgrad", weight_decay=0.1, decoupled=True, amsgrad=True, betas=(0.8, 0.99)),
    rmsprop("rmsprop"),
    rmsprop("rmsprop-momentum-wd", momentum=0.9, weight_decay=0.1),
    rmsprop("rmsprop-centered-maximize", centered=True, maximize=True),
    rmsprop("rmsprop-momentum-centered", momentum=0.5, centered=True, alpha=0.9),
    lion("lion"),
    lion("lion-wd-maximize", weight_decay=0.5, maximize=True),
    sgd("sgd"),
    sgd("sgd-momentum-dampening-wd", momentum=0.9, dampening=0.3, weight_decay=0.1),
    sgd("sgd-nesterov-maximize", momentum=0.8, nesterov=True, maximize=True),
    adagrad("adagrad"),
    adagrad("adagrad-lr_decay-wd-maximize", lr_decay=0.05, weight_decay=0.1, maximize=True),
]
SHAPES = [(1,), (4095,), (4097,), (64, 300), (0,), (3, 0)]


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    # These are properties of the torch path, the oracle; the fused CPU kernels (numba) are
    # checked against it in test_native.py (they use IEEE sqrt where torch's CPU sqrt is not).
    monkeypatch.setenv("EIGHTBIT_CPU_BACKEND", "torch")


def is_on(rule, name):
    return rule.on.get(name, True)


def make_problem(rule, shape, seed=0, dtype=torch.float32, step=3.0):
    """A parameter, a gradient and fp32 states with awkward content (a zero block, an outlier)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(dtype)
    g = (0.1 * torch.randn(shape, generator=gen)).to(dtype)
    states = {}
    for name, signed in rule.slots:
        s = 0.05 * torch.randn(shape, generator=gen)
        s = s if signed else s.square()
        flat = s.view(-1)
        flat[:BLOCK] = 0.0  # a block of zeros (absmax 0)
        if flat.numel() > 2 * BLOCK:
            flat[BLOCK + 7] = 3.0  # an outlier that dominates its block
        states[name] = s
    if "grad_avg" in states:  # a real square average bounds the squared mean: s >= a^2
        states["square_avg"] += states["grad_avg"].square()
    return p, g, states, step


def call8(rule, params, grads, codes, absmax, steps, **extra):
    args = []
    for name, _ in rule.slots:
        on = is_on(rule, name)
        args += [[codes[name]] if on else None, [absmax[name]] if on else None]
    if rule.uses_steps:
        args.append(steps)
    rule.update8(params, grads, *args, block_size=BLOCK, **rule.kwargs, **extra)


def call32(rule, params, grads, states, steps, **extra):
    args = [[states[name]] if is_on(rule, name) else None for name, _ in rule.slots]
    if rule.uses_steps:
        args.append(steps)
    rule.update32(params, grads, *args, **rule.kwargs, **extra)


def quantize_states(rule, states):
    codes, absmax = {}, {}
    for name, signed in rule.slots:
        q = quantize_blockwise(states[name], codebook=get_codebook("dynamic", signed=signed),
                               block_size=BLOCK)
        codes[name], absmax[name] = q.codes, q.absmax
    return codes, absmax


def run8(rule, p, g, states, step, **extra):
    codes, absmax = quantize_states(rule, states)
    p = p.clone()
    call8(rule, [p], [g], codes, absmax, [torch.tensor(step)], **extra)
    return p, codes, absmax


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_fp32_twin_matches_the_fp32_oracle(rule, shape):
    p, g, states, step = make_problem(rule, shape)
    ours_p, ours_states = p.clone(), {k: v.clone() for k, v in states.items()}
    call32(rule, [ours_p], [g], ours_states, [torch.tensor(step)])

    ref_p = p.clone()
    opt = rule.torch_cls([ref_p], **rule.torch_kwargs)
    opt.state[ref_p] = {"step": torch.tensor(step - 1)}
    opt.state[ref_p].update({k: v.clone() for k, v in states.items() if is_on(rule, k)})
    ref_p.grad = g
    opt.step()
    if rule.torch_cls is LionReference:
        # The reference rounds in another order; sign(c) can only flip where c is within a few
        # ulps of 0, which these random values never are.
        torch.testing.assert_close(ours_p, ref_p, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(ours_p, ref_p)
    for name, _ in rule.slots:
        if is_on(rule, name):
            expected = opt.state[ref_p][name]
            if rule.torch_cls is LionReference:
                torch.testing.assert_close(ours_states[name], expected, rtol=1e-6, atol=1e-9)
            else:
                assert torch.equal(ours_states[name], expected), name


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_sgd_first_step_starts_the_buffer_from_the_gradient(nesterov):
    # torch starts a missing buffer from a copy of the gradient (no dampening); the twin reads
    # step 1 as "no buffer yet", whatever the buffer holds.
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0 if nesterov else 0.5, weight_decay=0.1,
              nesterov=nesterov, maximize=False)
    p, g = torch.randn(300), torch.randn(300)
    ours_p, buf = p.clone(), torch.randn(300)
    sgd32bit_update([ours_p], [g], [buf], [torch.tensor(1.0)], **kw)
    ref_p = p.clone()
    opt = torch.optim.SGD([ref_p], foreach=False, **kw)
    ref_p.grad = g
    opt.step()
    assert torch.equal(ours_p, ref_p)
    assert torch.equal(buf, opt.state[ref_p]["momentum_buffer"])


def composed_oracle(rule, p, g, states, step):
    """Dequantize the quantized states, take the fp32 twin's step, quantize the new states."""
    codes, absmax = quantize_states(rule, states)
    fp32 = {}
    for name, signed in rule.slots:
        fp32[name] = dequantize_blockwise(
            codes[name], absmax[name], codebook=get_codebook("dynamic", signed=signed),
            block_size=BLOCK, dtype=torch.float32,
        )
    p = p.clone()
    call32(rule, [p], [g], fp32, [torch.tensor(step)])
    return p, *requantize_issue_17(rule, fp32)


def requantize_issue_17(rule, fp32):
    """The public quantizer plus the optimizer-state rule of issue 17: (a) an element with any
    non-finite fresh state gets 0.0 in all its states; (b) on the unsigned map a positive value
    whose nearest code is that of zero (index 0) is stored as code 1."""
    on = [name for name, _ in rule.slots if is_on(rule, name)]
    if not on:  # a rule without state (SGD without momentum)
        return quantize_states(rule, fp32)
    bad = torch.zeros_like(fp32[on[0]], dtype=torch.bool)
    for name in on:
        bad |= ~fp32[name].isfinite()
    fp32 = {name: value.masked_fill(bad, 0.0) for name, value in fp32.items()}
    codes, absmax = quantize_states(rule, fp32)
    for name, signed in rule.slots:
        if not signed:
            codes[name][(codes[name] == 0) & (fp32[name] > 0)] = 1
    return codes, absmax


def assert_same_step(rule, a, b):
    (pa, ca, aa), (pb, cb, ab) = a, b
    assert torch.equal(pa, pb)
    for name, _ in rule.slots:
        if is_on(rule, name):
            assert torch.equal(ca[name], cb[name]), name
            assert torch.equal(aa[name], ab[name]), name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_8bit_rule_is_dequantize_fp32_step_quantize(rule, shape):
    problem = make_problem(rule, shape)
    assert_same_step(rule, run8(rule, *problem), composed_oracle(rule, *problem))


@pytest.mark.parametrize("rule", RULES[::2], ids=lambda r: r.id)
def test_8bit_rule_on_a_large_ragged_parameter(rule):
    problem = make_problem(rule, (278011,), seed=1, step=100.0)
    assert_same_step(rule, run8(rule, *problem), composed_oracle(rule, *problem))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_chunking_does_not_change_the_result(rule, monkeypatch):
    problem = make_problem(rule, (5000,), seed=2)
    whole = run8(rule, *problem)
    monkeypatch.setattr(_chunked, "chunks", functools.partial(_chunked.chunks, chunk=1024))
    assert_same_step(rule, run8(rule, *problem), whole)


@pytest.mark.parametrize("rule", RULES[::3], ids=lambda r: r.id)
def test_non_contiguous_parameter(rule):
    p, g, states, step = make_problem(rule, (70, 90), seed=3)
    p_t = p.t().contiguous().t()  # same values, column-major strides
    assert not p_t.is_contiguous()
    expected = run8(rule, p, g, states, step)
    codes, absmax = quantize_states(rule, states)
    call8(rule, [p_t], [g], codes, absmax, [torch.tensor(step)])
    assert_same_step(rule, (p_t, codes, absmax), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_low_precision_parameters_use_fp32_math(rule, dtype):
    """A bf16/fp16 step is the fp32 step on the same values, rounded once to the dtype."""
    p, g, states, step = make_problem(rule, (4097,), seed=4, dtype=dtype)
    low = run8(rule, p, g, states, step)
    high = run8(rule, p.float(), g.float(), states, step)
    assert low[0].dtype == dtype
    assert_same_step(rule, low, (high[0].to(dtype), high[1], high[2]))


# -- bf16 stochastic rounding --------------------------------------------------------------------


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """bf16 rounding toward zero: the low 16 bits of the fp32 pattern cleared."""
    return x.view(torch.int32).bitwise_and(-65536).view(torch.float32)


@pytest.mark.parametrize("value", [1.0 + 2**-9, -(1.0 + 3 * 2**-9), 3.0e-5 * (1 + 2**-10)])
def test_stochastic_rounding_is_unbiased(value):
    torch.manual_seed(0)
    n = 200_000
    x = torch.full((n,), value, dtype=torch.float32)
    r = _chunked.stochastic_round_to_bf16(x).float()
    lo = truncate_to_bf16(x[:1])
    hi = (lo.view(torch.int32) + 65536).view(torch.float32)  # one bf16 ulp further from zero
    lo, hi = lo.item(), hi.item()
    assert set(r.unique().tolist()) <= {lo, hi}
    p_up = (abs(value) - abs(lo)) / (abs(hi) - abs(lo))
    frac = (r == hi).double().mean().item()
    sigma = (p_up * (1 - p_up) / n) ** 0.5
    assert abs(frac - p_up) < 5 * sigma
    assert abs(r.double().mean().item() - value) < 5 * sigma * abs(hi - lo)


def test_stochastic_rounding_keeps_representable_values_and_specials():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), 65280.0])
    torch.manual_seed(1)
    assert torch.equal(_chunked.stochastic_round_to_bf16(x), x.to(torch.bfloat16))
    assert _chunked.stochastic_round_to_bf16(torch.tensor([float("nan")])).isnan().all()


def test_stochastic_rounding_is_deterministic_for_a_seed():
    x = torch.randn(10_000)
    torch.manual_seed(7)
    a = _chunked.stochastic_round_to_bf16(x)
    torch.manual_seed(7)
    b = _chunked.stochastic_round_to_bf16(x)
    c = _chunked.stochastic_round_to_bf16(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochastic_rounding_keeps_updates_below_half_an_ulp():
    """Lion moves every weight by lr = 1e-3 per step, a quarter of bf16's ulp at 1.0 (2^-7):
    round-to-nearest never moves the weights, stochastic rounding moves them by lr on average."""
    n, steps, lr = 4096, 20, 1e-3
    kw = dict(lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False, block_size=BLOCK)
    results = {}
    for sr in (False, True):
        torch.manual_seed(0)
        p = torch.ones(n, dtype=torch.bfloat16)
        codes = torch.full((n,), 127, dtype=torch.uint8)
        absmax = torch.zeros(n // BLOCK)
        for _ in range(steps):
            lion8bit_update([p], [torch.ones(n)], [codes], [absmax], bf16_stochastic_rounding=sr,
                            **kw)
        results[sr] = p.double()
    assert torch.equal(results[False], torch.ones(n, dtype=torch.float64))
    expected = 1.0 - steps * lr
    # Each step's rounding has variance <= ulp^2 / 4; the mean of n weights after `steps` steps.
    sigma = (steps * (2**-7) ** 2 / 4 / n) ** 0.5
    assert abs(results[True].mean().item() - expected) < 5 * sigma


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_stochastic_rounding_only_touches_bf16(dtype):
    rule = RULES[0]
    p, g, states, step = make_problem(rule, (4097,), seed=5, dtype=dtype)
    torch.manual_seed(0)
    plain = run8(rule, p, g, states, step)
    codes, absmax = quantize_states(rule, states)
    q = p.clone()
    rule.update8([q], [g], [codes["exp_avg"]], [absmax["exp_avg"]], [codes["exp_avg_sq"]],
                 [absmax["exp_avg_sq"]], None, None, [torch.tensor(step)], block_size=BLOCK,
                 bf16_stochastic_rounding=True, **rule.kwargs)
    assert torch.equal(q, plain[0])


# -- bad input ------------------------------------------------------------------------------------


def adam_args(n=4096, **changes):
    p, g = torch.randn(n), torch.randn(n)
    args = dict(
        params=[p], grads=[g], exp_avg_codes=[torch.zeros(n, dtype=torch.uint8)],
        exp_avg_absmax=[torch.zeros(n // BLOCK)],
        exp_avg_sq_codes=[torch.zeros(n, dtype=torch.uint8)],
        exp_avg_sq_absmax=[torch.zeros(n // BLOCK)], max_exp_avg_sq_codes=None,
        max_exp_avg_sq_absmax=None, steps=[torch.tensor(1.0)],
    )
    args.update(changes)
    return args


BAD_INPUTS = [
    ("codes dtype", dict(exp_avg_codes=[torch.zeros(4096, dtype=torch.int32)]), "uint8"),
    ("codes shape", dict(exp_avg_codes=[torch.zeros(4095, dtype=torch.uint8)]), "shape"),
    ("absmax blocks", dict(exp_avg_absmax=[torch.zeros(15)]), "block_size 256"),
    ("absmax dtype", dict(exp_avg_absmax=[torch.zeros(16, dtype=torch.bfloat16)]), "float32"),
    ("list length", dict(grads=[]), "grads has 0 entries"),
    ("steps length", dict(steps=[]), "steps has 0 entries"),
    ("grad shape", dict(grads=[torch.zeros(4095)]), "does not match"),
    ("integer param", dict(params=[torch.zeros(4096, dtype=torch.int64)]), "float32, float16"),
    ("amsgrad without max", dict(amsgrad=True), "amsgrad=True needs"),
    ("half a state", dict(max_exp_avg_sq_codes=[torch.zeros(4096, dtype=torch.uint8)],
                          amsgrad=True), "both"),
    ("block size", dict(block_size=100), "power of two"),
]


@pytest.mark.parametrize("what,changes,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(what, changes, message):
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decoupled_weight_decay=False, amsgrad=False, maximize=False, block_size=BLOCK)
    for key in ("amsgrad", "block_size"):
        if key in changes:
            kw[key] = changes.pop(key)
    with pytest.raises((ValueError, TypeError), match=message):
        adam8bit_update(**adam_args(**changes), **kw)
