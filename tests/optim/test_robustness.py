"""Rare rows and non-finite gradients (issue 17), over the optimizer table of cases.py, against
the fp32 oracles on the same gradients.

1. Sparse-gradient embedding: rows of a 4099 x 64 table get a gradient on some steps and none on
   others, next to frequent rows whose gradients are 10^2 to 10^5 times larger in the same
   block. Nearest rounding used to store such a row's second moment as exactly 0 while its first
   moment stayed non-zero, and the next step was lr * m / eps (about 1 at lr 1e-3).
2. One NaN, one inf and one 1e30 gradient element in one block: as many non-finite parameters
   as torch.optim, and the rest of the block keeps training.

Each test runs on the CPU backend that serves by default and on the torch path explicitly.
"""

from __future__ import annotations

import math

import pytest
import torch
from eightbit.functional import adam8bit_update
from eightbit.functional._docs import DOCS
from eightbit.quant import get_codebook, get_midpoints

from .cases import ROWS, dequantized, ids
from .lion_reference import LionReference
from .test_accuracy import TRAJECTORY_RTOL, relative_deviation

# ----------------------------------------------------------------------------- the bound
# One requantization changes a state element as follows (c_j codes, t_j the threshold between
# c_j and c_j+1, y = value / absmax):
# * unsigned map (second moments): with the round-up rule a positive v never decodes to 0. It
#   decodes to c_1 * absmax >= v when y <= t_0, else to c_j with t_j-1 < y <= t_j, so
#   Q(v) / v >= c_j / t_j >= RHO_V = min_{j >= 1} c_j / t_j.
# * signed map (first moments, momentum): |Q(m)| / |m| <= c_j+1 / t_j on the positive side
#   (c_j / t_j on the negative side), at most M_INFLATION; the sign is kept.
# The step of Adam (m / sqrt(v)), RMSprop (g / sqrt(s), plus the momentum buffer) and Adagrad
# (g / sqrt(sum)) from states that went through one requantization is therefore at most
# M_INFLATION / sqrt(RHO_V) times the step from exact states; AMSGrad's max of two such values
# keeps the bound. Without the round-up rule RHO_V is 0 and there is no bound.
# Over a trajectory the states have been through several requantizations, whose factors could in
# principle compound; the test holds the whole 10-step scenario to the one-requantization K.


def codebook_constants() -> tuple[float, float]:
    """(RHO_V, M_INFLATION) of the dynamic maps, computed from the codebooks themselves."""
    c = get_codebook("dynamic", signed=False).double()
    t = get_midpoints("dynamic", signed=False).double()
    rho_v = (c[1:255] / t[1:255]).min().item()
    c = get_codebook("dynamic", signed=True).double()
    t = get_midpoints("dynamic", signed=True).double()
    up = torch.where(t > 0, c[1:] / t, c[:-1] / t)  # the code a value just beyond t_j gets
    return rho_v, up.max().item()


RHO_V, M_INFLATION = codebook_constants()  # 0.5345 (j = 2), 2.0 (the smallest signed code)
# fp32 rounding of the update itself (a few roundings of 2^-24 each), as a relative slack
FP32_SLACK = 1e-5


def step_bound(row) -> float:
    """K: the largest ratio of an 8-bit step to the exact step that one requantization allows.

    A signed state may inflate the numerator by M_INFLATION and an unsigned state may deflate
    the denominator's square by RHO_V. Rules with a sign update (Lion) have |step| = lr whatever
    the state, well within this K. Centered RMSprop subtracts two quantized states (s - a^2), so
    its denominator has no such bound where s and a^2 nearly agree; the scenario here keeps the
    variance far from zero (rows of few steps) and is checked against the same K.
    """
    signed = any(s for _, s in row.states)
    unsigned = any(not s for _, s in row.states)
    return (M_INFLATION if signed else 1.0) / (math.sqrt(RHO_V) if unsigned else 1.0)


def lr_bound(row, steps: int, lr: float, p_max: float) -> float | None:
    """The largest fp32 step of the row's optimizer after ``steps`` steps, in the worst case
    over all gradient histories (None where the rule has no such bound)."""
    kw = row.kwargs
    wd = kw.get("weight_decay", 0.0)
    if row.ref is LionReference:  # sign update plus decoupled decay
        return lr * (1 + wd * p_max)
    if row.ref in (torch.optim.Adam, torch.optim.AdamW):
        # Cauchy-Schwarz on m_t = (1-b1) sum b1^k g_t-k against v_t = (1-b2) sum b2^k g^2_t-k:
        # |m_t| / sqrt(v_t) <= (1-b1) / sqrt(1-b2) * sqrt(sum_k<t (b1^2/b2)^k), then the bias
        # corrections (Kingma & Ba 2015, arXiv:1412.6980, section 2.1 bounds the same ratio).
        b1, b2 = kw.get("betas", (0.9, 0.999))
        ratio = max(
            (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2))
            * math.sqrt(sum((b1 * b1 / b2) ** k for k in range(t)))
            for t in range(1, steps + 1)
        )
        decoupled = wd * p_max if row.ref is torch.optim.AdamW else 0.0
        return lr * (ratio + decoupled)
    if row.ref is torch.optim.RMSprop and not kw.get("centered", False):
        # s >= (1 - alpha) g^2, so |g| / sqrt(s) <= 1 / sqrt(1 - alpha); momentum sums the steps
        alpha, mu = kw.get("alpha", 0.99), kw.get("momentum", 0.0)
        return lr / math.sqrt(1 - alpha) * sum(mu**k for k in range(steps))
    return None


# ----------------------------------------------------------------------------- the backends
@pytest.fixture(params=["default", "torch", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request, monkeypatch):
    """The CPU backend that serves by default (the numba kernels where numba imports), the torch
    path explicitly, and the CUDA kernels (our optimizer on the GPU, the oracle on the CPU)."""
    if request.param == "torch":
        monkeypatch.setenv("EIGHTBIT_CPU_BACKEND", "torch")
    return request.param


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


# ----------------------------------------------------------------------------- 1. rare rows
VOCAB, DIM = 4099, 64  # 262,336 elements: 8-bit state, and a ragged last block
STEPS, LR = 10, 1e-3


def embedding_gradients(steps: int = STEPS) -> list[torch.Tensor]:
    """Per step: frequent rows (one in every block of the first 128) with unit gradients, and a
    random 5% of all rows with gradients of 1e-5 to 1e-2; every other row gets none."""
    gen = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(steps):
        g = torch.zeros(VOCAB, DIM)
        g[0:512:4] = torch.randn(128, DIM, generator=gen)
        rare = torch.randperm(VOCAB, generator=gen)[: VOCAB // 20]
        scale = 10.0 ** (-5 + 3 * torch.rand(rare.numel(), 1, generator=gen))
        g[rare] = torch.randn(rare.numel(), DIM, generator=gen) * scale
        grads.append(g)
    return grads


def largest_update(make_opt, grads, device="cpu") -> tuple[float, float]:
    """The largest |change| of one element in one step, and the largest |p| seen."""
    p = (torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(1)) * 0.02).to(device)
    opt = make_opt([p])
    largest, p_max = 0.0, p.abs().max().item()
    for g in grads:
        before = p.detach().clone()
        p.grad = g.to(device)
        opt.step()
        largest = max(largest, (p.detach() - before).abs().max().item())
        p_max = max(p_max, p.detach().abs().max().item())
    return largest, p_max


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_rare_embedding_rows_never_step_much_further_than_fp32(row, backend):
    grads = embedding_gradients()
    ours, p_max = largest_update(lambda ps: row.ours(ps, lr=LR), grads, device_of(backend))
    exact, _ = largest_update(lambda ps: row.oracle(ps, lr=LR), grads)
    k = step_bound(row)
    assert ours <= k * exact * (1 + FP32_SLACK), (ours / LR, exact / LR, k)
    bound = lr_bound(row, STEPS, LR, p_max)
    if bound is not None:
        assert ours <= k * bound, (ours / LR, bound / LR, k)
    if row.ref is LionReference:  # a sign update moves by lr (plus the decay), by construction
        assert ours <= bound * (1 + FP32_SLACK), (ours / LR, bound / LR)


# ----------------------------------------------------------------------------- 2. bad elements
SIZE = 4097  # 8-bit state; ragged last block
BAD = {3: float("nan"), 77: float("inf"), 200: 1e30}  # all in block 0 (elements 0..255)
BLOCK0 = torch.arange(256)
GOOD0 = torch.tensor([i for i in range(256) if i not in BAD])  # the rest of that block
LATER_STEPS = 6


def bad_gradient_run(make_opt, *, bad: bool, device="cpu"):
    """One step with the bad elements (or 0 there when ``bad`` is False), then LATER_STEPS steps
    of ordinary gradients. Returns the parameters after each step (index 0 = the start)."""
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(SIZE, generator=gen).to(device)
    opt = make_opt([p])
    history = [p.detach().to("cpu", copy=True)]
    for t in range(1 + LATER_STEPS):
        g = torch.randn(SIZE, generator=gen) * 0.1
        if t == 0:
            for i, value in BAD.items():
                g[i] = value if bad else 0.0
        p.grad = g.to(device)
        opt.step()
        history.append(p.detach().to("cpu", copy=True))
    return history


def nonfinite(x: torch.Tensor) -> int:
    return int((~x.isfinite()).sum())


def first_step_states(make_opt, device="cpu") -> tuple[torch.Tensor, dict]:
    """One step of the bad gradient from a fresh optimizer: its parameter and state (on the
    CPU)."""
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(SIZE, generator=gen).to(device)
    opt = make_opt([p])
    g = torch.randn(SIZE, generator=gen) * 0.1
    for i, value in BAD.items():
        g[i] = value
    p.grad = g.to(device)
    opt.step()
    return p.detach().cpu(), {k: v.cpu() for k, v in opt.state[p].items()}


def restarted(row) -> torch.Tensor:
    """The elements whose fp32 state (torch.optim's) is non-finite after the bad step."""
    _, state = first_step_states(row.oracle)
    mask = torch.zeros(SIZE, dtype=torch.bool)
    for name, _ in row.states:
        mask |= ~state[name].isfinite()
    return mask


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_a_bad_gradient_element_harms_only_its_own_parameter(row, backend):
    device = device_of(backend)
    ours = bad_gradient_run(row.ours, bad=True, device=device)
    exact = bad_gradient_run(row.oracle, bad=True)
    # as many non-finite parameters as torch.optim, after every step, and the same ones
    for t, (a, b) in enumerate(zip(ours, exact, strict=True)):
        assert torch.equal(a.isfinite(), b.isfinite()), (t, nonfinite(a), nonfinite(b))
    # The rest of the bad block keeps training at torch's pace: every step moves every element
    # of it, by as much on average as torch's step (a frozen Lion block moves by its decay only).
    # A finite state that torch keeps (SGD's momentum after the 1e30 gradient) stays the
    # block's absmax in 8 bits, and the others' momenta round to 0 until it decays: they still
    # move every step, by their gradient's share of torch's step, so only a sign rule (Lion) or a
    # block whose bad states all restart is held to torch's pace.
    at_pace = row.ref is LionReference or bool(restarted(row)[list(BAD)].all())
    for t in range(1, len(ours)):
        assert bool((ours[t][GOOD0] != ours[t - 1][GOOD0]).all()), t
        pace = (ours[t] - ours[t - 1])[GOOD0].abs().mean() / (
            (exact[t] - exact[t - 1])[GOOD0].abs().mean())
        if at_pace:
            assert pace > 1 - TRAJECTORY_RTOL, (t, pace.item())
    # Outside the bad block, the trajectory is as close to torch's as test_accuracy requires.
    assert ours[-1][256:].isfinite().all()
    rest = relative_deviation([ours[-1][256:]], [exact[-1][256:]], [ours[0][256:]])
    assert rest < TRAJECTORY_RTOL, rest
    # Inside it, when every bad element's state restarts (non-finite in fp32: all of them for
    # the rules with a second moment), the others step as in a run where the bad elements had
    # a zero gradient, and stay as close to torch's. A finite state that torch keeps (Lion's
    # momentum after the 1e30 gradient, 1e28) stays the block's absmax for many steps in 8
    # bits too, so the others' momenta round to 0: they still move every step (above).
    if restarted(row)[list(BAD)].all():
        clean = bad_gradient_run(row.ours, bad=False, device=device)
        block = relative_deviation([ours[-1][GOOD0]], [clean[-1][GOOD0]], [ours[0][GOOD0]])
        assert block < TRAJECTORY_RTOL, block
        block = relative_deviation([ours[-1][GOOD0]], [exact[-1][GOOD0]], [ours[0][GOOD0]])
        assert block < TRAJECTORY_RTOL, block


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_bad_elements_restart_their_states_from_zero(row, backend):
    """The codebook has no NaN code: an element whose fresh state is non-finite (in fp32, as
    torch.optim's state shows) gets 0.0 in all its 8-bit states, and every block absmax stays
    finite (a NaN absmax would wipe the state of the whole block)."""
    if not row.states:
        pytest.skip(f"{row.id} keeps no state")
    _, state = first_step_states(row.ours, device_of(backend))
    restart = restarted(row)
    for name, _ in row.states:
        assert state[f"{name}_absmax"].isfinite().all(), name
    assert restart[list(BAD)[:2]].all()  # NaN and inf gradients always give a non-finite state
    for name, signed in row.states:
        values = dequantized(state, name, signed)
        assert bool((values[restart] == 0).all()), name
        assert values.isfinite().all(), name


def test_the_docstrings_state_the_constants_of_the_codebooks():
    text = DOCS["state_rule"]
    assert f"= {RHO_V:.4f}" in text and f"= {M_INFLATION:.1f}" in text
    assert f"= {M_INFLATION / math.sqrt(RHO_V):.2f}" in adam8bit_update.__doc__
