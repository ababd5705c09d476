"""The fused CUDA optimizer kernels against the torch path (needs a GPU).

Oracle: the same functional rule on CPU copies (eightbit's torch path, or the CPU kernels that
are themselves tested bit for bit against it), from identical quantized states, one step.

Allowed differences. Both sides evaluate the same fp32 formulas on the same dequantized states,
in a different order and with FMA contraction (and flush-to-zero of subnormal intermediates) on
the GPU. About ten roundings lie on the path to the update u = p_new - p_old, each worth at most
2^-24 of the terms involved, so |u_cuda - u_torch| <= 16 * 2^-24 |u| where nothing cancels; then
each side rounds p + u once (half an ulp of p each).

* PARAM: |p_cuda - p_torch| <= 2 ulp(p) + UPDATE_RTOL |u|, UPDATE_RTOL = 2^-16 (16x margin over
  16 roundings), for all but PARAM_OUTLIERS of the elements. The outliers are ill-conditioned
  updates: RMSprop's centered variance s - a^2 cancels when the (independently quantized) states
  nearly agree, and loses digits in proportion. On these test problems, fp32 against fp64 puts
  0.1% of the elements of the centered rules beyond 1e-5 relative (max 1.2%): PARAM_OUTLIERS = 1%.
* fp16/bf16 parameters: the fp32 results above round to the same value except when they
  straddle a rounding boundary of the parameter dtype: at most one ulp of the dtype, in at most
  LOW_PRECISION_FLIPS of the elements (fp32 differences of a few ulp against 2^13 (fp16) or 2^16
  (bf16) fp32 ulps per dtype ulp).
* codes: the fresh fp32 state differs by a few ulp, so a code can differ only where y = s /
  absmax lies within a few ulp of a threshold (probability below ~1e-5 per element: thresholds
  are at least ~1% of |y| apart), plus, for the ill-conditioned elements above, their own codes
  and, when one is its block's maximum, the codes near thresholds in its block (about 7% of 256
  for a 1e-3 shift): a few hundred per million on the centered rules. CODE_FLIPS = 1e-3.
* absmax: equal within ABSMAX_RTOL = 2^-20 except in blocks whose maximum is ill-conditioned:
  ABSMAX_OUTLIERS = 1% of the blocks.
"""

import math

import pytest
import torch
from eightbit.functional import lion8bit_update
from eightbit.optim import Adam8bit, Lion8bit
from eightbit.quant import dequantize_blockwise, get_codebook, quantize_blockwise
from eightbit.quant.cuda import _runtime

from tests.functional.test_rules import (
    BLOCK,
    RULES,
    call8,
    call32,
    is_on,
    make_problem,
    quantize_states,
)
from tests.optim.cases import ROWS

pytestmark = pytest.mark.gpu

UPDATE_RTOL = 2.0**-16
PARAM_OUTLIERS = 1e-2
LOW_PRECISION_FLIPS = 1e-2
CODE_FLIPS = 1e-3
ABSMAX_RTOL = 2.0**-20
ABSMAX_OUTLIERS = 1e-2

SHAPES = [(1,), (4095,), (4097,), (64, 300), (0,), (278011,), (1 << 20,)]


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing above |x| in x's own dtype, as float32."""
    x = x.abs()
    return (torch.nextafter(x, torch.full_like(x, math.inf)) - x).float()


def step_both(rule, p, g, states, step, **extra):
    """One step of the rule on CPU tensors (oracle) and on CUDA copies (kernel)."""
    codes, absmax = quantize_states(rule, states)
    gpu_codes = {k: v.cuda() for k, v in codes.items()}  # copies, before the CPU step
    gpu_absmax = {k: v.cuda() for k, v in absmax.items()}
    cpu_p = p.clone()
    call8(rule, [cpu_p], [g], codes, absmax, [torch.tensor(step)], **extra)
    gpu_p = p.cuda()
    call8(
        rule,
        [gpu_p],
        [g.cuda()],
        gpu_codes,
        gpu_absmax,
        [torch.tensor(step, device="cuda")],
        **extra,
    )
    return (cpu_p, codes, absmax), (
        gpu_p.cpu(),
        {k: v.cpu() for k, v in gpu_codes.items()},
        {k: v.cpu() for k, v in gpu_absmax.items()},
    )


def assert_params_close(p0, ref, got):
    n = max(ref.numel(), 1)
    if ref.dtype != torch.float32:
        diff = (got.float() - ref.float()).abs()
        beyond = (diff > ulp(ref)).sum().item()  # more than one ulp: ill-conditioned, as above
        assert beyond <= PARAM_OUTLIERS * n + 2, f"{beyond} of {n} beyond one ulp"
        assert (diff > 0).sum().item() <= LOW_PRECISION_FLIPS * n + 2
        return
    u = (ref - p0).abs()
    diff = (got - ref).abs()
    tight = diff <= 2 * ulp(ref) + UPDATE_RTOL * u
    assert (~tight).sum().item() <= PARAM_OUTLIERS * n + 2, f"{(~tight).sum().item()} of {n}"


def assert_states_close(rule, ref_codes, ref_absmax, codes, absmax):
    for name, _ in rule.slots:
        if not is_on(rule, name):
            continue
        a, b = ref_codes[name].view(-1).long(), codes[name].view(-1).long()
        differ = (a != b).sum().item()
        assert differ <= CODE_FLIPS * a.numel() + 2, f"{name}: {differ} of {a.numel()} codes"
        ra, ga = ref_absmax[name], absmax[name]
        assert torch.equal(torch.isnan(ra), torch.isnan(ga))
        finite = ~torch.isnan(ra)
        off = ((ga[finite] - ra[finite]).abs() > ABSMAX_RTOL * ra[finite].abs()).sum().item()
        assert off <= ABSMAX_OUTLIERS * ra.numel() + 2, f"{name}: {off} absmax differ"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_kernel_matches_torch_path(rule, shape):
    p, g, states, step = make_problem(rule, shape, step=5.0)
    (ref_p, ref_codes, ref_absmax), (p1, codes, absmax) = step_both(rule, p, g, states, step)
    assert_params_close(p, ref_p, p1)
    assert_states_close(rule, ref_codes, ref_absmax, codes, absmax)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_issue_17_state_rule_matches_torch_path(rule, monkeypatch):
    """NaN, inf and 1e30 gradients in one block (rule (a): their states restart from 0, the
    block's absmax stays finite) and tiny second moments next to a large one (rule (b): code 1,
    not the code of zero), against the torch path."""
    monkeypatch.setenv("EIGHTBIT_CPU_BACKEND", "torch")
    p, g, states, step = make_problem(rule, (4097,), step=5.0)
    g[3], g[77], g[200] = float("nan"), float("inf"), 1e30
    # block 1 holds the outlier 3.0 (make_problem): these second moments become ~1e-15, far
    # below the smallest code's threshold (p = 0: no L2 decay enters the gradient)
    p[300:310], g[300:310] = 0.0, 1e-6
    for name, signed in rule.slots:
        if not signed:
            states[name][300:310] = 0.0
    (ref_p, ref_codes, ref_absmax), (p1, codes, absmax) = step_both(rule, p, g, states, step)
    assert torch.equal(ref_p.isfinite(), p1.isfinite())
    finite = ref_p.isfinite()
    assert_params_close(p[finite], ref_p[finite], p1[finite])
    assert_states_close(rule, ref_codes, ref_absmax, codes, absmax)
    for name, signed in rule.slots:
        if is_on(rule, name):
            assert absmax[name].isfinite().all(), name
            if not signed:
                assert bool((codes[name][300:310] == 1).all()), name
                assert torch.equal(codes[name][300:310], ref_codes[name][300:310]), name


@pytest.mark.parametrize("shape", [(1,), (4095,), (64, 300), (0,), (278011,)], ids=str)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_fp32_state_twin_matches_torch_path(rule, shape):
    p, g, states, step = make_problem(rule, shape, step=5.0)
    on = {k: v for k, v in states.items() if is_on(rule, k)}
    cpu_p, cpu_states = p.clone(), {k: v.clone() for k, v in states.items()}
    call32(rule, [cpu_p], [g], cpu_states, [torch.tensor(step)])
    gpu_p, gpu_states = p.cuda(), {k: v.cuda() for k, v in states.items()}
    call32(rule, [gpu_p], [g.cuda()], gpu_states, [torch.tensor(step, device="cuda")])
    assert_params_close(p, cpu_p, gpu_p.cpu())
    for name in on:  # the states obey the parameter's bound, with u the change of the state
        assert_params_close(states[name], cpu_states[name], gpu_states[name].cpu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES[::3], ids=lambda r: r.id)
def test_low_precision_parameters(rule, dtype):
    p, g, states, step = make_problem(rule, (278011,), dtype=dtype)
    (ref_p, ref_codes, ref_absmax), (p1, codes, absmax) = step_both(rule, p, g, states, step)
    assert p1.dtype == dtype
    assert_params_close(p, ref_p, p1)
    assert_states_close(rule, ref_codes, ref_absmax, codes, absmax)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_one_multi_tensor_launch_equals_one_launch_per_parameter(rule):
    shapes = [(5000,), (0,), (1,), (4097,), (64, 300), (3,), (278011,)]
    problems = [make_problem(rule, s, seed=i) for i, s in enumerate(shapes)]

    def run(together):
        params, results = [], []
        all_codes, all_absmax = {}, {}
        for p, g, states, _ in problems:
            codes, absmax = quantize_states(rule, states)
            params.append((p.cuda(), g.cuda()))
            for k in codes:
                all_codes.setdefault(k, []).append(codes[k].cuda())
                all_absmax.setdefault(k, []).append(absmax[k].cuda())
        steps = [torch.tensor(4.0, device="cuda") for _ in problems]
        if together:
            _call_lists(rule, params, all_codes, all_absmax, steps)
        else:
            for i in range(len(problems)):
                _call_lists(
                    rule,
                    params[i : i + 1],
                    {k: v[i : i + 1] for k, v in all_codes.items()},
                    {k: v[i : i + 1] for k, v in all_absmax.items()},
                    steps[i : i + 1],
                )
        for i, (p, _) in enumerate(params):
            results.append(
                (p, *(all_codes[k][i] for k in all_codes), *(all_absmax[k][i] for k in all_absmax))
            )
        return results

    for a, b in zip(run(True), run(False), strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def _call_lists(rule, params, codes, absmax, steps):
    args = []
    for name, _ in rule.slots:
        on = is_on(rule, name)
        args += [codes[name] if on else None, absmax[name] if on else None]
    if rule.uses_steps:
        args.append(steps)
    rule.update8(
        [p for p, _ in params], [g for _, g in params], *args, block_size=BLOCK, **rule.kwargs
    )


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_optimizer_step_first_steps_match_cpu(row):
    torch.manual_seed(0)
    cpu = [torch.randn(5000), torch.randn(64, 300), torch.randn(70000)]
    gpu = [p.cuda() for p in cpu]
    before = [p.clone() for p in cpu]
    opt_cpu, opt_gpu = row.ours(cpu), row.ours(gpu)
    for p, q in zip(cpu, gpu, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.cuda()
    opt_cpu.step()  # fresh (zero) states: both sides step from the same codes
    opt_gpu.step()
    for p0, p, q in zip(before, cpu, gpu, strict=True):
        assert_params_close(p0, p, q.cpu())
    for p, q in zip(cpu, gpu, strict=True):
        for key, value in opt_cpu.state[p].items():
            if key.endswith("_codes"):
                differ = value != opt_gpu.state[q][key].cpu()
                assert differ.sum().item() <= CODE_FLIPS * value.numel() + 2, key


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_cuda_graph_capture_of_step_with_tensor_lr(row):
    torch.manual_seed(0)
    # default min_8bit_size: the (1,) and (300,) parameters keep fp32 state (the 32-bit twins)
    shapes = [(5000,), (64, 300), (1,), (300,), (70000,)]
    init = [torch.randn(s, device="cuda") for s in shapes]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(6)]
    lr = row.kwargs["lr"]

    def make():
        params = [p.clone() for p in init]
        static_grads = [torch.zeros_like(p) for p in params]
        for p, g in zip(params, static_grads, strict=True):
            p.grad = g
        rate = torch.tensor(lr, device="cuda")
        return params, static_grads, rate, row.ours(params, lr=rate)

    eager_params, eager_grads, eager_lr, eager = make()
    params, static_grads, rate, opt = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: states, compilation, multi-tensor tables
        for i in range(2):
            for s, g in zip(static_grads, grads[i], strict=True):
                s.copy_(g)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(2):
        for s, g in zip(eager_grads, grads[i], strict=True):
            s.copy_(g)
        eager.step()
    for i in range(2, 6):
        if i == 4:  # a new learning rate reaches the captured kernels through the tensor
            rate.fill_(lr / 3)
            eager_lr.fill_(lr / 3)
        for s, e, g in zip(static_grads, eager_grads, grads[i], strict=True):
            s.copy_(g)
            e.copy_(g)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for a, b in zip(params, eager_params, strict=True):
        assert torch.equal(a, b)
    for p, q in zip(params, eager_params, strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(value, eager.state[q][key]), key
    assert opt.state[params[0]]["step"].item() == 6


def test_step_does_not_synchronise_the_host():
    params = [torch.randn(100_000, device="cuda"), torch.randn(100, device="cuda")]  # 8 and 32 bit
    opt = Adam8bit(params, lr=torch.tensor(1e-3, device="cuda"))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # states, compilation
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_each_kernel_compiles_once():
    rule = RULES[0]
    for _ in range(3):
        p, g, states, step = make_problem(rule, (5000,))
        step_both(rule, p, g, states, step)
    keys = [k for k in _runtime.compilations if k[0].endswith("adam.cu")]
    assert keys and all(_runtime.compilations[k] == 1 for k in keys)


# ------------------------------------------------------------------- bf16 stochastic rounding


def lion_on_ones(n, seed, stochastic, lr=1e-4):
    """bf16 parameters at 1.0 with a positive gradient: Lion moves each by exactly -lr, far
    below half a bf16 ulp at 1.0 (2^-9), so round-to-nearest loses the whole update."""
    torch.manual_seed(seed)
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    p.grad = torch.ones_like(p)
    opt = Lion8bit([p], lr=lr, bf16_stochastic_rounding=stochastic)
    opt.step()
    return p


def test_stochastic_rounding_is_unbiased():
    n, lr = 1 << 22, 1e-4
    p = lion_on_ones(n, 0, True, lr).double()
    gap = 2.0**-8  # bf16 spacing just below 1.0
    q = lr / gap  # probability of rounding down to 1 - gap
    assert set(p.unique().tolist()) == {1.0, 1.0 - gap}
    sd = gap * math.sqrt(q * (1 - q) / n)
    assert abs(p.mean().item() - (1.0 - lr)) < 5 * sd
    assert bool((lion_on_ones(n, 0, False, lr) == 1).all())  # round to nearest loses it all


def test_stochastic_rounding_is_deterministic_for_a_seed():
    a, b = lion_on_ones(1 << 16, 7, True), lion_on_ones(1 << 16, 7, True)
    c = lion_on_ones(1 << 16, 8, True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochastic_rounding_leaves_fp32_parameters_alone():
    torch.manual_seed(0)
    p = torch.ones(4096, device="cuda")
    p.grad = torch.ones_like(p)
    Lion8bit([p], lr=1e-4, bf16_stochastic_rounding=True).step()
    assert bool((p == torch.tensor(1.0) - torch.tensor(1e-4)).all())


# ------------------------------------------------------------------- 64-bit indexing


@pytest.mark.slow
def test_parameter_over_2_to_the_31_elements():
    n = (1 << 31) + 1027  # ragged last block
    block = 256
    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(n, dtype=torch.bfloat16, device="cuda", generator=g)
    grad = torch.randn(n, dtype=torch.bfloat16, device="cuda", generator=g)
    signed = get_codebook("dynamic", signed=True, device="cuda")
    m = quantize_blockwise(
        torch.randn(n, dtype=torch.bfloat16, device="cuda", generator=g) * 0.1,
        codebook=signed,
        block_size=block,
    )
    windows = [(0, 1 << 16), ((1 << 31) - (1 << 16), (1 << 31) + (1 << 16)), (n - 3 * block - 5, n)]
    windows = [(s - s % block, e) for s, e in windows]
    before = [
        (
            p[s:e].cpu(),
            grad[s:e].cpu(),
            m.codes[s:e].cpu(),
            m.absmax[s // block : -(-e // block)].cpu(),
        )
        for s, e in windows
    ]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False, block_size=block)
    lion8bit_update([p], [grad], [m.codes], [m.absmax], **kw)
    for (s, e), (p0, g0, c0, a0) in zip(windows, before, strict=True):
        p_before = p0.clone()
        lion8bit_update([p0], [g0], [c0], [a0], **kw)  # the CPU oracle on the window
        assert_params_close(p_before, p0, p[s:e].cpu())
        assert_states_close(
            RULES[-1],
            {"exp_avg": c0},
            {"exp_avg": a0},
            {"exp_avg": m.codes[s:e].cpu()},
            {"exp_avg": m.absmax[s // block : -(-e // block)].cpu()},
        )
    assert dequantize_blockwise(m).isfinite().all()
