"""The fused CPU update kernels (numba) against the torch path, the oracle, one row per variant.

What must agree, and why not always bit for bit: both paths compute the same fp32 expressions in
the same order (with the same fused multiply-adds as torch's CPU kernels), except two steps of
the parameter update. torch's CPU ``sqrt`` is vectorized through MKL's VML and is not always
correctly rounded (about 15% of fp32 results are one ulp off); the kernels use IEEE sqrt. And
Adam's kernel computes ``sqrt(v) / bc2_sqrt + eps`` as one fused multiply-add by the rounded
reciprocal of ``bc2_sqrt`` (a division less per element). So

* states that do not depend on a square root (Adam's m and v, RMSprop's square and gradient
  averages, Lion's m) have identical codes and absmax after a step;
* a parameter differs by at most ``SQRT_ULPS`` relative ulps of its step plus one rounding of the
  parameter itself (fp32, or one ulp of fp16/bf16 when the rounding falls the other way);
* states that do depend on it (RMSprop's momentum buffer), and all states after several steps
  (L2 decay feeds the parameter back into the gradient), differ only at code boundaries: in
  fewer than ``BOUNDARY_FRACTION`` of the codes, by one code.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from eightbit.functional import (
    _native,
    adagrad8bit_update,
    adam8bit_update,
    lion8bit_update,
    rmsprop8bit_update,
    sgd8bit_update,
)
from eightbit.quant import _native as quant_native
from eightbit.quant import dequantize_blockwise, get_codebook, quantize_blockwise

pytest.importorskip("numba")

BLOCK = 256
# Adam's step, to first order in u = 2^-24 (a rounding's relative error): torch's sqrt is within
# one ulp of the exact root (2u), ours within half an ulp (u); torch then rounds s / bc2_sqrt and
# + eps (2u), the kernel rounds 1 / bc2_sqrt and the fused s * (1 / bc2_sqrt) + eps (2u); eps > 0
# only dilutes these relative errors, so the denominators differ by at most 7u, and each path
# rounds its quotient (2u): 9u = 4.5 relative ulps of the step (2^-23 each). RMSprop's step has
# the sqrt difference and fewer roundings. 5 leaves room for the second-order terms.
SQRT_ULPS = 5
BOUNDARY_FRACTION = 1e-3
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


@dataclasses.dataclass
class Row:
    id: str
    update: callable
    slots: list[tuple[str, bool, bool]]  # (state, signed, used) in positional order
    kwargs: dict
    uses_steps: bool = False
    sqrt_free: tuple[str, ...] = ()  # states computed before any square root


def adam(id, amsgrad=False, **kw):
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, amsgrad=amsgrad, maximize=False) | kw
    slots = [("exp_avg", True, True), ("exp_avg_sq", False, True),
             ("max_exp_avg_sq", False, amsgrad)]
    return Row(id, adam8bit_update, slots, kwargs, True,
               ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


def rmsprop(id, momentum=0.0, centered=False, **kw):
    kwargs = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=momentum,
                  centered=centered, maximize=False) | kw
    slots = [("square_avg", False, True), ("momentum_buffer", True, momentum > 0),
             ("grad_avg", True, centered)]
    return Row(id, rmsprop8bit_update, slots, kwargs, False, ("square_avg", "grad_avg"))


def lion(id, **kw):
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False) | kw
    return Row(id, lion8bit_update, [("exp_avg", True, True)], kwargs, False, ("exp_avg",))


def sgd(id, momentum=0.9, **kw):
    kwargs = dict(lr=1e-2, momentum=momentum, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False) | kw
    return Row(id, sgd8bit_update, [("momentum_buffer", True, momentum != 0)], kwargs, True,
               ("momentum_buffer",))


def adagrad(id, **kw):
    kwargs = dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False) | kw
    return Row(id, adagrad8bit_update, [("sum", False, True)], kwargs, True, ("sum",))


ROWS = [
    adam("adam"),
    adam("adam-l2-amsgrad", amsgrad=True, weight_decay=0.1),
    adam("adamw-maximize", weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    rmsprop("rmsprop"),
    rmsprop("rmsprop-momentum-l2", momentum=0.9, weight_decay=0.01),
    rmsprop("rmsprop-centered", centered=True),
    rmsprop("rmsprop-centered-momentum-maximize", momentum=0.5, centered=True, maximize=True),
    lion("lion"),
    lion("lion-decay-maximize", weight_decay=0.5, maximize=True),
    sgd("sgd-momentum"),
    sgd("sgd-plain-l2", momentum=0.0, weight_decay=0.01),
    sgd("sgd-nesterov-dampening-maximize", nesterov=True, dampening=0.0, maximize=True,
        weight_decay=0.1),
    sgd("sgd-dampening", dampening=0.3),
    adagrad("adagrad"),
    adagrad("adagrad-decay-l2-maximize", lr_decay=0.01, weight_decay=0.1, maximize=True),
]
BY_NAME = {row.id: row for row in ROWS}


def rows(*names):
    """The rows of these ids (a KeyError names a row that does not exist)."""
    return [BY_NAME[name] for name in names]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _paths():
    from eightbit.quant import _vbmi

    return ["portable", "vbmi"] if _vbmi.compiled_with_vbmi() else ["portable"]


PATHS = _paths()


@pytest.fixture(params=["portable", "vbmi"])
def path(request):
    """A search path of the kernels (EIGHTBIT_CPU_PATH); VBMI only where the CPU has it."""
    if request.param not in PATHS:
        pytest.skip("this CPU has no AVX-512 VBMI")
    return request.param


def make_problem(row, shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(dtype)
    states = {}
    for name, signed, used in row.slots:
        if used:
            values = torch.randn(shape, generator=gen) * 0.01 if signed else (
                torch.rand(shape, generator=gen) * 1e-4)
            q = quantize_blockwise(values, codebook=get_codebook(signed=signed), block_size=BLOCK)
            states[name] = (q.codes, q.absmax)
    return p, states, gen


def run(row, p, states, g, monkeypatch, backend, step=1):
    """One step (number ``step``) of ``backend`` on copies; returns the parameter and states."""
    if backend == "torch":
        monkeypatch.setenv(quant_native.ENV, "torch")
    else:
        monkeypatch.delenv(quant_native.ENV, raising=False)
    p = p.clone()
    states = {k: (c.clone(), a.clone()) for k, (c, a) in states.items()}
    args = []
    for name, _, used in row.slots:
        args += [[states[name][0]], [states[name][1]]] if used else [None, None]
    if row.uses_steps:
        args.append([torch.tensor(float(step))])
    row.update([p], [g], *args, block_size=BLOCK, **row.kwargs)
    return p, states


def check_step(row, p, states, g, monkeypatch, step=1):
    """One step of both paths from the same state; returns the torch path's result."""
    ours = run(row, p, states, g, monkeypatch, "native", step)
    theirs = run(row, p, states, g, monkeypatch, "torch", step)
    check_param(ours[0], theirs[0], p, p.dtype, momentum_term(row, g, theirs[1]))
    for name, (codes, absmax) in theirs[1].items():
        if name in row.sqrt_free:
            assert torch.equal(ours[1][name][0], codes), name
            assert torch.equal(ours[1][name][1].nan_to_num(), absmax.nan_to_num()), name
        else:
            assert_codes_near(ours[1][name], (codes, absmax))
    return theirs


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values at ``x`` (fp32 tensor), subnormals included."""
    _, exponent = torch.frexp(x)
    smallest = {torch.float32: -149, torch.float16: -24, torch.bfloat16: -133}[dtype]
    return torch.ldexp(torch.ones_like(x), (exponent - 1 - MANTISSA_BITS[dtype]).clamp(smallest))


def momentum_term(row, g, states):
    """RMSprop with momentum moves p by lr * (momentum * buf + g / avg), which may cancel: the
    square root's ulps are those of lr * |g| / avg, bounded with avg >= sqrt(var) + eps."""
    if "momentum_buffer" not in states or "square_avg" not in states:  # (SGD: no square root)
        return 0.0
    dequantize = functools.partial(dequantize_blockwise, block_size=BLOCK)
    var = dequantize(*states["square_avg"], codebook=get_codebook(signed=False))
    if "grad_avg" in states:
        var = var - dequantize(*states["grad_avg"], codebook=get_codebook(signed=True)) ** 2
    avg = var.clamp_min(0).sqrt() + row.kwargs["eps"]
    return 2 * row.kwargs["lr"] * g.float().abs() / avg


def check_param(ours, theirs, before, dtype, term=0.0):
    """|ours - theirs| <= one rounding of the parameter + SQRT_ULPS ulps of its move (or of the
    square-root-dependent ``term`` of the move, when that is larger)."""
    ours, theirs, before = ours.float(), theirs.float(), before.float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    differ = (ours != theirs) & ~theirs.isnan()  # inf equals inf; inf and finite must not meet
    move = torch.maximum((theirs - before).abs(), torch.as_tensor(term))[differ]
    ours, theirs = ours[differ], theirs[differ]
    bound = ulp(theirs, dtype) + SQRT_ULPS * 2.0**-23 * move
    excess = (ours - theirs).abs() - bound
    assert bool((excess <= 0).all()), f"{(excess > 0).sum().item()} elements, max {excess.max()}"


def assert_codes_near(ours, theirs):
    (c1, a1), (c2, a2) = ours, theirs
    different = c1 != c2
    assert different.float().mean().item() <= BOUNDARY_FRACTION
    assert bool(((c1.int() - c2.int()).abs() <= 1).all())
    torch.testing.assert_close(a1, a2, rtol=2.0**-18, atol=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_one_step_matches_the_torch_path(row, dtype, monkeypatch, path):
    monkeypatch.setenv("EIGHTBIT_CPU_PATH", path)
    p, states, gen = make_problem(row, (4097,), dtype)
    check_step(row, p, states, (torch.randn(4097, generator=gen) * 0.1).to(dtype), monkeypatch)


@pytest.mark.parametrize("row", rows("adam", "adamw-maximize", "rmsprop-momentum-l2",
                                     "rmsprop-centered-momentum-maximize", "lion-decay-maximize",
                                     "sgd-momentum", "adagrad"), ids=lambda r: r.id)
def test_steps_along_a_trajectory_on_a_large_ragged_parameter(row, monkeypatch):
    # Each step starts both paths from the torch path's state, so the bounds stay those of one
    # step (a code that differs at a boundary would otherwise change the following steps).
    p, states, gen = make_problem(row, (278011,), torch.float32, seed=1)
    for step in range(1, 5):
        g = torch.randn(278011, generator=gen) * 0.1
        p, states = check_step(row, p, states, g, monkeypatch, step)


@pytest.mark.parametrize("row", rows("adam", "rmsprop-centered-momentum-maximize", "sgd-plain-l2"),
                         ids=lambda r: r.id)
def test_tables_are_stacked_once_per_path_and_switching_paths_between_steps(row, monkeypatch):
    # The kernel's per-slot tables are stacked once and reused (_native._books): a step on the
    # other path must get that path's tables, not the cached ones of the path before.
    monkeypatch.setattr(_native, "_stacked", {})
    p, states, gen = make_problem(row, (5000,), torch.float32, seed=3)
    for step in range(1, 7):
        monkeypatch.setenv("EIGHTBIT_CPU_PATH", PATHS[step % len(PATHS)])
        p, states = check_step(row, p, states, torch.randn(5000, generator=gen), monkeypatch,
                               step)
    assert len(_native._stacked) == len(PATHS)  # one stack per path, built once
    for books, stacked in _native._stacked.values():
        for i, array in enumerate(stacked):
            rows = [b[i] for b in books]
            if 2 <= i <= 3 and any(r is None for r in rows):  # VBMI tables, path off
                assert array is None and all(r is None for r in rows)
            else:
                assert np.array_equal(array, np.stack(rows))


def test_each_path_compiles_only_its_own_search(monkeypatch):
    # The VBMI tables reach the kernels as addresses, or None on the portable path: numba then
    # compiles that path's kernel without the VBMI loops (a smaller, faster first compile).
    from eightbit.functional import _numba as kernels
    from eightbit.quant import _numba as quant_kernels

    calls = []
    run_parts = quant_native.run_parts
    monkeypatch.setattr(quant_native, "run_parts",
                        lambda kernel, count, *args: calls.append((kernel, args))
                        or run_parts(kernel, count, *args))
    row = rows("adam")[0]
    for path in PATHS:
        monkeypatch.setenv("EIGHTBIT_CPU_PATH", path)
        calls.clear()
        p, states, gen = make_problem(row, (3000,), torch.float32, seed=4)
        check_step(row, p, states, torch.randn(3000, generator=gen), monkeypatch)
        monkeypatch.setenv(quant_native.ENV, "auto")  # (check_step ends on the torch path)
        quantize_blockwise(torch.randn(3000), block_size=BLOCK)
        # (planes, searches) of the update; search of quantize, found by parameter name
        adam_f32 = kernels.update_part(kernels.AdamHyper, False, False)
        tables_of_update = _positions(adam_f32, "planes_at", "searches_at")
        tables_of_quantize = _positions(quant_kernels.quantize_part, "search_at")
        update = [[args[i - 2] for i in tables_of_update] for kernel, args in calls
                  if kernel is adam_f32]  # (args: after part and parts)
        quantize = [[args[i - 2] for i in tables_of_quantize] for kernel, args in calls
                    if kernel is quant_kernels.quantize_part]
        assert len(update) == 1 and len(quantize) >= 1
        for tables in update + quantize:
            assert all((t is None) if path == "portable" else isinstance(t, int) for t in tables)
        expected = "none" if path == "portable" else "int64"
        assert any(all(str(s[i]) == expected for i in tables_of_update)
                   for s in adam_f32.signatures)
        assert any(all(str(s[i]) == expected for i in tables_of_quantize)
                   for s in quant_kernels.quantize_part.signatures)


def _positions(kernel, *names: str) -> list[int]:
    """The positions of a kernel's parameters ``names``."""
    parameters = list(inspect.signature(kernel.py_func).parameters)
    return [parameters.index(name) for name in names]


@pytest.mark.parametrize("row", rows("adam-l2-amsgrad", "rmsprop-centered-momentum-maximize",
                                     "lion-decay-maximize", "sgd-nesterov-dampening-maximize",
                                     "adagrad"), ids=lambda r: r.id)
def test_non_contiguous_empty_and_mixed_dtype_parameters(row, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(70, 90, generator=gen).t(), torch.zeros(0),
              torch.randn(300, generator=gen).bfloat16()]
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1 for p in params]
    # fp32 gradients for the bf16 parameter too: the kernels read either
    grads[2] = torch.randn(300, generator=gen) * 0.1
    results = {}
    for backend in ("native", "torch"):
        ps = [p.clone() for p in params]
        states = {}
        for name, signed, used in row.slots:
            if used:
                qs = [quantize_blockwise(torch.randn(p.shape, generator=torch.Generator()
                                                     .manual_seed(6)).abs() * 0.01,
                                         codebook=get_codebook(signed=signed), block_size=BLOCK)
                      for p in params]
                states[name] = ([q.codes for q in qs], [q.absmax for q in qs])
        monkeypatch.setenv(quant_native.ENV, "torch" if backend == "torch" else "auto")
        args = []
        for name, _, used in row.slots:
            args += list(states[name]) if used else [None, None]
        if row.uses_steps:
            args.append([torch.tensor(1.0) for _ in params])
        row.update(ps, grads, *args, block_size=BLOCK, **row.kwargs)
        results[backend] = ps, states
    (ours, our_states), (theirs, their_states) = results["native"], results["torch"]
    assert ours[0].stride() == params[0].stride()  # updated in place, layout kept
    for o, t, p in zip(ours, theirs, params, strict=True):
        check_param(o, t, p, p.dtype)
    for name in their_states:
        for state in zip(*our_states[name], *their_states[name], strict=True):
            if state[0].numel():
                assert_codes_near(state[:2], state[2:])




@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [1024, 1024 + 37])
@pytest.mark.parametrize("row", rows("adam", "adam-l2-amsgrad",
                                     "rmsprop-centered-momentum-maximize", "lion", "sgd-momentum",
                                     "adagrad"), ids=lambda r: r.id)
def test_nonfinite_gradients_restart_only_their_own_states(row, monkeypatch, n, path):
    # issue 17 rule (a): an element whose fresh states are not all finite gets 0.0 in every
    # state; the rest of its block keeps its exact nearest codes (absmax stays finite), and the
    # parameters follow the torch path (NaN/inf where its fp32 rule gives them).
    monkeypatch.setenv("EIGHTBIT_CPU_PATH", path)
    p, states, _ = make_problem(row, (n,), torch.float32)
    g = torch.randn(n) * 0.1
    g[300] = float("nan")
    g[600] = float("inf")
    g[700] = 1e30  # finite, but v = g * g overflows to inf
    g[1024:] = float("nan")  # and a ragged last block (when there is one)
    ours = run(row, p, states, g, monkeypatch, "native")
    theirs = run(row, p, states, g, monkeypatch, "torch")
    assert torch.equal(ours[0].isnan(), theirs[0].isnan())
    for name, (codes, absmax) in theirs[1].items():
        assert torch.equal(ours[1][name][0], codes), name
        assert torch.equal(ours[1][name][1], absmax), name
        assert bool(absmax.isfinite().all()), name
        signed = dict((s[0], s[1]) for s in row.slots)[name]
        values = dequantize_blockwise(ours[1][name][0], ours[1][name][1], block_size=BLOCK,
                                      codebook=get_codebook(signed=signed))
        assert values[300] == 0 and values[600] == 0, name


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("row", rows("adam", "adam-l2-amsgrad", "rmsprop", "adagrad"),
                         ids=lambda r: r.id)
def test_a_positive_second_moment_never_decodes_to_zero(row, monkeypatch, path):
    # issue 17 rule (b): in a block whose absmax is huge, a tiny positive value of a state on
    # the unsigned map would round to the code of zero (index 0); it is stored as code 1.
    monkeypatch.setenv("EIGHTBIT_CPU_PATH", path)
    p, states, _ = make_problem(row, (1024,), torch.float32)
    states = {name: (torch.zeros_like(c) if not signed else c, torch.zeros_like(a) if not signed
                     else a) for (name, signed, used), (c, a) in
              zip([s for s in row.slots if s[2]], states.values(), strict=True)}
    g = torch.full((1024,), 1e-6)
    g[0] = 100.0  # block 0: absmax of v about 1e4 * (1 - beta2), v of the others about 1e-15
    ours = run(row, p, states, g, monkeypatch, "native")
    theirs = run(row, p, states, g, monkeypatch, "torch")
    for name, (codes, absmax) in theirs[1].items():
        assert torch.equal(ours[1][name][0], codes), name
        assert torch.equal(ours[1][name][1], absmax), name
        if not dict((s[0], s[1]) for s in row.slots)[name]:
            assert bool((codes >= 1).all()), name  # the unsigned map's code 0 is 0.0


@pytest.mark.parametrize("row", rows("adam", "lion", "sgd-momentum", "adagrad"),
                         ids=lambda r: r.id)
def test_a_0d_parameter_first_in_its_batch_and_a_non_contiguous_absmax(row, monkeypatch):
    # (issue 18) a scalar parameter with 8-bit state (min_8bit_size=0) first in the batch, and
    # absmax given as a strided view: both must give what the torch path gives.
    results = {}
    for backend in ("native", "torch"):
        monkeypatch.setenv(quant_native.ENV, "torch" if backend == "torch" else "auto")
        gen = torch.Generator().manual_seed(3)
        params = [torch.tensor(0.5), torch.randn(300, generator=gen)]
        grads = [torch.tensor(0.25), torch.randn(300, generator=gen) * 0.1]
        args = []
        for _name, signed, used in row.slots:
            if not used:
                args += [None, None]
                continue
            codes = [torch.full(p.shape, 127 if signed else 0, dtype=torch.uint8) for p in params]
            absmax = [torch.zeros(2)[::2], torch.zeros(4)[::2]]  # 1 and 2 blocks, stride 2
            args += [codes, absmax]
        if row.uses_steps:
            args.append([torch.tensor(1.0) for _ in params])
        row.update(params, grads, *args, block_size=BLOCK, **row.kwargs)
        results[backend] = params, args
    for ours, theirs in zip(results["native"][0], results["torch"][0], strict=True):
        check_param(ours, theirs, ours, torch.float32)
    for ours, theirs in zip(results["native"][1], results["torch"][1], strict=True):
        if isinstance(theirs, list):
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a, b)


def test_bf16_stochastic_rounding_is_unbiased_seeded_and_thread_independent(monkeypatch):
    monkeypatch.delenv(quant_native.ENV, raising=False)
    n = 200_000
    # one Lion step moves every 1.0 by lr = a quarter of bf16's ulp at 1 (2^-8 below 1.0)
    lr = 2.0**-8 / 4

    def step(seed, threads):
        p = torch.ones(n, dtype=torch.bfloat16)
        codes, absmax = torch.full((n,), 127, dtype=torch.uint8), torch.zeros(-(-n // BLOCK))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(seed)
            lion8bit_update([p], [torch.ones(n, dtype=torch.bfloat16)], [codes], [absmax],
                            lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False,
                            block_size=BLOCK, bf16_stochastic_rounding=True)
        finally:
            torch.set_num_threads(before)
        return p

    p = step(0, 2)
    assert set(p.unique().tolist()) == {1.0, 1.0 - 2.0**-8}  # the two neighbours only
    down = (p < 1).float().mean().item()
    assert abs(down - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5  # E[p] = 1 - lr
    assert torch.equal(step(0, 1), p)  # same seed, one thread: same result
    assert not torch.equal(step(1, 2), p)


def test_dispatch_uses_the_kernels_for_cpu_tensors_unless_switched_off(monkeypatch):
    monkeypatch.delenv(quant_native.ENV, raising=False)
    assert _native.serves([torch.zeros(3)])
    assert not _native.serves([])
    assert not _native.serves([torch.zeros(3, device="meta")])
    monkeypatch.setenv(quant_native.ENV, "torch")
    assert not _native.serves([torch.zeros(3)])


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_many_parameters_in_one_call_equal_one_call_each(row, monkeypatch):
    # One kernel call walks all parameters' blocks as one sequence (a table of addresses):
    # it must give each parameter exactly what a call with that parameter alone gives, for
    # sizes around the block size, mixed dtypes, its own step count and stochastic rounding.
    # (The fp32 parameters total more than 2 x quant._native.GRAIN, 8192 in tests: several
    # parts on two threads.)
    monkeypatch.delenv(quant_native.ENV, raising=False)
    sizes = [1, 255, 256, 257, 1000, 4097, 140000, 3]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16] * 2
    problems = [make_problem(row, (n,), dtype, seed=i)
                for i, (n, dtype) in enumerate(zip(sizes, dtypes, strict=True))]
    grads = [(torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype) for p, _, gen in problems]
    kwargs = row.kwargs | {"bf16_stochastic_rounding": True}

    def update(indices):
        ps = [problems[i][0].clone() for i in indices]
        args = []
        for name, _, used in row.slots:
            states = [problems[i][1][name] for i in indices] if used else None
            args += ([[c.clone() for c, _ in states], [a.clone() for _, a in states]]
                     if used else [None, None])
        if row.uses_steps:
            args.append([torch.tensor(float(1 + i % 3)) for i in indices])
        row.update(ps, [grads[i] for i in indices], *args, block_size=BLOCK, **kwargs)
        return ps, args

    torch.manual_seed(0)
    together = update(range(len(sizes)))
    torch.manual_seed(0)
    alone = [update([i]) for i in range(len(sizes))]
    for i, (ps, args) in enumerate(alone):
        assert torch.equal(together[0][i], ps[0]), i
        for ours, theirs in zip(together[1], args, strict=True):  # codes, absmax (and steps)
            if theirs is not None:
                assert torch.equal(ours[i], theirs[0]), i


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_a_step_marks_parameters_and_states_modified_for_autograd(row, backend, monkeypatch):
    # torch's optimizers update in place with torch ops, which bump each tensor's version
    # counter (autograd's check that a saved tensor was not changed); the kernels must too.
    monkeypatch.setenv(quant_native.ENV, "torch" if backend == "torch" else "auto")
    p, states, gen = make_problem(row, (1000,), torch.float32)
    p.requires_grad_(True)
    args = []
    for name, _, used in row.slots:
        args += [[states[name][0]], [states[name][1]]] if used else [None, None]
    if row.uses_steps:
        args.append([torch.tensor(1.0)])
    tensors = [p] + [t for ts in args[:-1 if row.uses_steps else None] if ts for t in ts]
    before = [t._version for t in tensors]
    with torch.no_grad():
        row.update([p], [torch.randn(1000, generator=gen)], *args, block_size=BLOCK, **row.kwargs)
    assert all(t._version > v for t, v in zip(tensors, before, strict=True))


@pytest.mark.slow
def test_each_variant_s_kernel_is_loaded_from_the_disk_cache_by_a_later_process(tmp_path):
    # update_part's kernels are closures, and numba's cache keys them on their closure's
    # pickled contents: a constant that pickled differently in each process (a dispatcher, for
    # one) would make every process compile every kernel again (seconds per optimizer).
    code = textwrap.dedent("""
        import torch
        from eightbit.optim import Adam8bit, Lion8bit
        for cls in (Adam8bit, Lion8bit):
            p = torch.nn.Parameter(torch.randn(8192))  # (smaller ones keep fp32 state)
            p.grad = torch.randn(8192)
            cls([p], lr=1e-3).step()
        from eightbit.functional import _numba as kernels  # (after: numba reads the cache dir)
        for record in (kernels.AdamHyper, kernels.LionHyper):
            stats = kernels.update_part(record, False, False).stats
            print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
        """)
    env = {**os.environ, "EIGHTBIT_CACHE_DIR": str(tmp_path), "NUMBA_CACHE_DIR": "",
           "EIGHTBIT_CPU_BACKEND": "numba"}

    def run():
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert run() == ["0", "1", "0", "1"]  # (hits, misses) of the Adam and Lion kernels
    assert run() == ["1", "0", "1", "0"]


def test_a_kernel_is_built_only_for_a_rule_s_record():
    from eightbit.functional import _numba as kernels

    assert kernels.slots_of(kernels.AMSGradHyper) == (True, True, True)
    assert kernels.slots_of(kernels.MomentumSGDHyper) == (True, False, False)
    for record in (kernels.AdamHyper, kernels.CenteredMomentumRMSpropHyper, kernels.LionHyper,
                   kernels.NesterovSGDHyper, kernels.AdagradHyper):
        assert kernels.update_part(record, False, True) is kernels.update_part(record, False, True)
    for bad in (tuple, 3):
        with pytest.raises(TypeError, match="not a hyperparameter record of a rule"):
            kernels.update_part(bad, False, False)
        with pytest.raises(TypeError, match="not a hyperparameter record of a rule"):
            kernels.slots_of(bad)
