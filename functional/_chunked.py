"""The torch path's shared machinery: run an fp32 update rule over a parameter, chunk by chunk.

Every rule (Adam, RMSprop, Lion) is written once as a function of fp32 tensors of one chunk; this
module feeds it. For each block-aligned chunk of at most ``CHUNK_ELEMENTS`` elements it
dequantizes the 8-bit states (or takes a view of the fp32 ones), converts the parameter and the
gradient to fp32, calls the rule, writes the parameter back in its own dtype and requantizes the
states. Temporaries are therefore bounded by the chunk, not by the parameter.

The same loop serves the 8-bit rules and their fp32-state twins, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..quant import FLOAT_DTYPES, check_block_size, get_codebook, get_midpoints, num_blocks
from ..quant._torch import chunks, dequantize_segment, quantize_segment

# fp32 states have no blocks, so their chunks may start anywhere.
FP32_CHUNK_BLOCK = 1


class Quantized(NamedTuple):
    """One 8-bit state of one parameter: codes, absmax, and the codebook they index.

    ``nonnegative``: the state lives on the unsigned map (code of zero at index 0), so a positive
    value whose nearest code is that of zero is stored as code 1 instead (see :func:`requantize`).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    codebook: torch.Tensor
    mids: torch.Tensor
    nonnegative: bool


def quantized_states(
    codes: Sequence[torch.Tensor] | None,
    absmax: Sequence[torch.Tensor] | None,
    params: Sequence[torch.Tensor],
    *,
    signed: bool,
    block_size: int,
    name: str,
) -> list[Quantized | None]:
    """Check one 8-bit state list against ``params`` and pair codes with absmax and codebook.

    ``codes is None`` (a feature that is off, such as AMSGrad's max) gives ``None`` per parameter.
    """
    if codes is None or absmax is None:
        if codes is not None or absmax is not None:
            raise ValueError(f"pass both {name}_codes and {name}_absmax, or neither")
        return [None] * len(params)
    check_len(codes, params, f"{name}_codes")
    check_len(absmax, params, f"{name}_absmax")
    # (runs once per parameter and state at every step: lookups are hoisted out of the loop)
    device = codebook = mids = None  # the maps of the last device seen
    uint8, float32, nonnegative = torch.uint8, torch.float32, not signed
    out = []
    for p, c, a in zip(params, codes, absmax, strict=True):
        if c.dtype != uint8 or c.shape != p.shape or not c.is_contiguous():
            raise ValueError(
                f"{name}_codes must be contiguous uint8 tensors of the parameter's shape "
                f"{tuple(p.shape)}, got {c.dtype} of shape {tuple(c.shape)}"
            )
        blocks = num_blocks(p.numel(), block_size)
        if a.dtype != float32 or a.shape != (blocks,):
            raise ValueError(
                f"{name}_absmax must be float32 of shape ({blocks},) for {p.numel()} elements at "
                f"block_size {block_size}, got {a.dtype} of shape {tuple(a.shape)}"
            )
        on = p.device
        if c.device != on or a.device != on:
            raise ValueError(
                f"{name} state is on {c.device}/{a.device} but the parameter is on {on}; "
                "move the optimizer state to the parameter's device"
            )
        if on != device:
            device = on
            codebook = get_codebook("dynamic", signed=signed, device=on)
            mids = get_midpoints("dynamic", signed=signed, device=on)
        out.append(Quantized(c, a, codebook, mids, nonnegative))
    return out


def fp32_states(
    states: Sequence[torch.Tensor] | None, params: Sequence[torch.Tensor], *, name: str
) -> list[torch.Tensor | None]:
    """Check one fp32 state list against ``params`` (``None``: the feature is off)."""
    if states is None:
        return [None] * len(params)
    check_len(states, params, name)
    for p, s in zip(params, states, strict=True):
        if s.dtype != torch.float32 or s.shape != p.shape or not s.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous float32 tensors of the parameter's shape "
                f"{tuple(p.shape)}, got {s.dtype} of shape {tuple(s.shape)}"
            )
        if s.device != p.device:
            raise ValueError(f"{name} is on {s.device} but the parameter is on {p.device}")
    return list(states)


def check_params(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], block_size: int | None
) -> None:
    """Check the parameter and gradient lists every rule takes."""
    if block_size is not None:
        check_block_size(block_size)
    check_len(grads, params, "grads")
    for p, g in zip(params, grads, strict=True):
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"parameters must be float32, float16 or bfloat16, got {p.dtype}")
        if g.is_sparse:
            raise RuntimeError("8-bit optimizers do not support sparse gradients")
        if g.shape != p.shape or g.device != p.device or g.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"a gradient of shape {tuple(g.shape)} ({g.dtype}, {g.device}) does not match "
                f"its parameter of shape {tuple(p.shape)} ({p.dtype}, {p.device})"
            )


def check_len(items: Sequence, params: Sequence, name: str) -> None:
    if len(items) != len(params):
        raise ValueError(f"{name} has {len(items)} entries but there are {len(params)} parameters")


def stochastic_round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to bfloat16 stochastically: up with probability equal to the distance.

    bfloat16 is the top 16 bits of an fp32. Adding a uniform random integer in [0, 2^16) to the
    fp32 bit pattern and truncating the low 16 bits rounds the magnitude up with probability
    (low bits) / 2^16, so E[round(x)] = x. Uses torch's default generator for ``x``'s device.
    """
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    return (bits + noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


def for_each_chunk(
    param: torch.Tensor,
    grad: torch.Tensor,
    states: Sequence[torch.Tensor | Quantized | None],
    rule: Callable[..., None],
    *,
    block_size: int,
    maximize: bool,
    bf16_stochastic_rounding: bool,
) -> None:
    """Apply ``rule(p, g, *states)`` to fp32 chunks of one parameter, in place.

    ``rule`` receives fp32 1-D tensors: the parameter chunk (update it in place), the gradient
    chunk (already negated when ``maximize``; it may alias the caller's gradient, so never write
    to it) and one entry per state: a tensor to update in place, or ``None``. Quantized states are
    dequantized before and requantized after; fp32 states are views of the state itself.
    """
    n = param.numel()
    if n == 0:
        return
    contiguous = param.is_contiguous()
    work = param if contiguous else param.contiguous()
    flat_p, flat_g = work.view(-1), grad.reshape(-1)
    to_bf16_stochastic = bf16_stochastic_rounding and param.dtype == torch.bfloat16
    flat_states = [
        s if s is None or isinstance(s, Quantized) else s.view(-1) for s in states
    ]
    for start, end in chunks(n, block_size):
        first, last = start // block_size, num_blocks(end, block_size)
        g = flat_g[start:end].float()
        if maximize:
            g = -g
        p = flat_p[start:end].float()  # a view (updated in place) when the parameter is fp32
        chunk_states = [
            None if s is None
            else dequantize_segment(s.codes.view(-1)[start:end], s.absmax[first:last],
                                    s.codebook, block_size)
            if isinstance(s, Quantized) else s[start:end]
            for s in flat_states
        ]
        rule(p, g, *chunk_states)
        if param.dtype != torch.float32:
            flat_p[start:end] = stochastic_round_to_bf16(p) if to_bf16_stochastic else p
        quantized = [(s, v) for s, v in zip(flat_states, chunk_states, strict=True)
                     if isinstance(s, Quantized)]
        for s, codes, absmax in requantize(quantized, block_size):
            s.codes.view(-1)[start:end] = codes
            s.absmax[first:last] = absmax
    if not contiguous:
        param.copy_(work)


def requantize(
    states: Sequence[tuple[Quantized, torch.Tensor]], block_size: int
) -> list[tuple[Quantized, torch.Tensor, torch.Tensor]]:
    """Codes and absmax of the fresh fp32 values of one chunk's 8-bit states (issue 17's rule).

    (a) An element any of whose fresh states is NaN or +-inf gets 0.0 in every state: the
        codebook has no NaN code, and a non-finite value in a block's absmax would wipe the
        whole block. The element's parameter already carries the non-finite result.
    (b) On the unsigned map (non-negative states), a positive value whose nearest code is the
        code of zero (index 0) is stored as code 1, the smallest positive code, so a positive
        second moment never decodes to 0. Every other value keeps its nearest code.

    ``values`` are modified in place by (a).
    """
    if not states:
        return []
    bad = ~torch.isfinite(states[0][1])
    for _, values in states[1:]:
        bad |= ~torch.isfinite(values)
    out = []
    for s, values in states:
        values.masked_fill_(bad, 0.0)
        codes, absmax = quantize_segment(values, s.mids, block_size)
        if s.nonnegative:
            codes.masked_fill_((codes == 0) & (values > 0), 1)
        out.append((s, codes, absmax))
    return out


def scalar(x: float | torch.Tensor) -> float:
    """A hyperparameter as a Python float (a 0-dim tensor lr is read once per call)."""
    return x.item() if isinstance(x, torch.Tensor) else float(x)

