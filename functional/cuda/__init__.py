"""Fused CUDA kernels of the 8-bit update rules: one launch, one pass over memory per step.

:func:`adam8bit`, :func:`rmsprop8bit` and :func:`lion8bit` take the list arguments of
:func:`eightbit.functional.adam8bit_update`, :func:`~eightbit.functional.rmsprop8bit_update` and
:func:`~eightbit.functional.lion8bit_update` (which dispatch CUDA tensors here) and compute the
same update: per element, load the parameter, the gradient and the 8-bit states, dequantize, apply
the rule in fp32, store the parameter, requantize (block absmax and the codebook search of
``quant/cuda/eightbit_quant.cuh``) and store codes and absmax. Parameters of every size share one
multi-tensor launch per (parameter dtype, gradient dtype); ``lr`` (a CUDA tensor) and the step
counters are read on the device, so ``optimizer.step()`` can be captured in a CUDA graph.
:func:`adam32bit`, :func:`rmsprop32bit` and :func:`lion32bit` run the same kernels on float32
states (``state_bits=32``: parameters below ``min_8bit_size`` and fp32 param groups).

Bytes moved per fp32 parameter: Adam 16 (read p, g, m, v; write p, m, v), Lion and RMSprop 14,
against 28 for torch's fused fp32 Adam (DESIGN.md, cost model).

The argument lists are checked once, by those public rules (lengths, shapes, dtypes, the states
a feature needs), before they dispatch here; the launcher adds its dtype/device/contiguity
checks. Call the public rules rather than these functions.

Kernels: ``adam.cu``, ``rmsprop.cu``, ``lion.cu`` with the driver ``eightbit_optim.cuh``,
templated on the parameter and gradient types. This package does not import CuPy; the runtime
of :mod:`eightbit.quant.cuda` does, on the first launch.

Example (GPU and CuPy)::

    >>> p = torch.randn(1 << 20, device="cuda"); g = torch.randn_like(p)
    >>> m = torch.full_like(p, 127, dtype=torch.uint8); v = torch.zeros_like(p, dtype=torch.uint8)
    >>> am = torch.zeros(4096, device="cuda"); av = torch.zeros(4096, device="cuda")
    >>> adam8bit([p], [g], [m], [am], [v], [av], None, None, [torch.ones((), device="cuda")],
    ...          lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
    ...          decoupled_weight_decay=True, amsgrad=False, maximize=False, block_size=256)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._launch import KERNEL_DIR, launch

__all__ = [
    "KERNEL_DIR",
    "adam8bit",
    "adam32bit",
    "lion8bit",
    "lion32bit",
    "rmsprop8bit",
    "rmsprop32bit",
]

# The fp32-state twins have no quantization blocks; this only sets the kernels' tile (2048).
FP32_STATE_TILE_BLOCK = 256


def adam8bit(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg_codes: Sequence[torch.Tensor],
    exp_avg_absmax: Sequence[torch.Tensor],
    exp_avg_sq_codes: Sequence[torch.Tensor],
    exp_avg_sq_absmax: Sequence[torch.Tensor],
    max_exp_avg_sq_codes: Sequence[torch.Tensor] | None,
    max_exp_avg_sq_absmax: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    block_size: int,
    bf16_stochastic_rounding: bool = False,
) -> None:
    """Adam / AdamW step of ``adam.cu``: the math of :func:`eightbit.functional.adam8bit_update`."""
    launch(
        "adam_kernel",
        "adam.cu",
        params,
        grads,
        [
            (exp_avg_codes, exp_avg_absmax),
            (exp_avg_sq_codes, exp_avg_sq_absmax),
            (max_exp_avg_sq_codes, max_exp_avg_sq_absmax) if amsgrad else (None, None),
        ],
        steps,
        (beta1, beta2, eps, weight_decay, int(decoupled_weight_decay), int(amsgrad), int(maximize)),
        lr=lr,
        block_size=block_size,
        state_bits=8,
        stochastic_rounding=bf16_stochastic_rounding,
    )


def rmsprop8bit(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_avg_codes: Sequence[torch.Tensor],
    square_avg_absmax: Sequence[torch.Tensor],
    momentum_buffer_codes: Sequence[torch.Tensor] | None,
    momentum_buffer_absmax: Sequence[torch.Tensor] | None,
    grad_avg_codes: Sequence[torch.Tensor] | None,
    grad_avg_absmax: Sequence[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    block_size: int,
    bf16_stochastic_rounding: bool = False,
) -> None:
    """RMSprop step of ``rmsprop.cu``: the math of ``eightbit.functional.rmsprop8bit_update``."""
    launch(
        "rmsprop_kernel",
        "rmsprop.cu",
        params,
        grads,
        [
            (square_avg_codes, square_avg_absmax),
            (momentum_buffer_codes, momentum_buffer_absmax) if momentum != 0 else (None, None),
            (grad_avg_codes, grad_avg_absmax) if centered else (None, None),
        ],
        None,
        (alpha, eps, weight_decay, momentum, int(centered), int(maximize)),
        lr=lr,
        block_size=block_size,
        state_bits=8,
        stochastic_rounding=bf16_stochastic_rounding,
    )


def lion8bit(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg_codes: Sequence[torch.Tensor],
    exp_avg_absmax: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    block_size: int,
    bf16_stochastic_rounding: bool = False,
) -> None:
    """Lion step of ``lion.cu`` (the math of :func:`eightbit.functional.lion8bit_update`)."""
    launch(
        "lion_kernel",
        "lion.cu",
        params,
        grads,
        [(exp_avg_codes, exp_avg_absmax)],
        None,
        (beta1, beta2, weight_decay, int(maximize)),
        lr=lr,
        block_size=block_size,
        state_bits=8,
        stochastic_rounding=bf16_stochastic_rounding,
    )


def adam32bit(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    bf16_stochastic_rounding: bool = False,
) -> None:
    """The fp32-state Adam / AdamW step (``adam.cu``, ``state_bits=32``): the math of
    :func:`eightbit.functional.adam32bit_update` on float32 state tensors."""
    launch(
        "adam_kernel",
        "adam.cu",
        params,
        grads,
        [(exp_avgs, None), (exp_avg_sqs, None), (max_exp_avg_sqs if amsgrad else None, None)],
        steps,
        (beta1, beta2, eps, weight_decay, int(decoupled_weight_decay), int(amsgrad), int(maximize)),
        lr=lr,
        block_size=FP32_STATE_TILE_BLOCK,
        state_bits=32,
        stochastic_rounding=bf16_stochastic_rounding,
    )


def rmsprop32bit(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_avgs: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    grad_avgs: Sequence[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    bf16_stochastic_rounding: bool = False,
) -> None:
    """The fp32-state RMSprop step (``rmsprop.cu``, ``state_bits=32``): the math of
    :func:`eightbit.functional.rmsprop32bit_update` on float32 state tensors."""
    launch(
        "rmsprop_kernel",
        "rmsprop.cu",
        params,
        grads,
        [
            (square_avgs, None),
            (momentum_buffers if momentum != 0 else None, None),
            (grad_avgs if centered else None, None),
        ],
        None,
        (alpha, eps, weight_decay, momentum, int(centered), int(maximize)),
        lr=lr,
        block_size=FP32_STATE_TILE_BLOCK,
        state_bits=32,
        stochastic_rounding=bf16_stochastic_rounding,
    )


def lion32bit(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    bf16_stochastic_rounding: bool = False,
) -> None:
    """The fp32-state Lion step (``lion.cu``, ``state_bits=32``): the math of
    :func:`eightbit.functional.lion32bit_update` on float32 state tensors."""
    launch(
        "lion_kernel",
        "lion.cu",
        params,
        grads,
        [(exp_avgs, None)],
        None,
        (beta1, beta2, weight_decay, int(maximize)),
        lr=lr,
        block_size=FP32_STATE_TILE_BLOCK,
        state_bits=32,
        stochastic_rounding=bf16_stochastic_rounding,
    )
