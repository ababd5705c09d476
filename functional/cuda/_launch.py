"""Multi-tensor launches of the fused optimizer kernels: the table, the grid, the scalars.

One launch updates every parameter of a (parameter dtype, gradient dtype) group, whatever their
sizes (see eightbit_optim.cuh for the table layout). The table holds raw device pointers, so it
is a pure function of the tensors' addresses and sizes: it is built once, copied to the device
from pinned memory, and reused while the same tensors come back (the steady state of training,
and a requirement of CUDA graph replay). Nothing here synchronises the host.

This module does not import CuPy: it goes through the runtime of :mod:`eightbit.quant.cuda`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from ...quant import check_block_size, get_codebook, num_blocks
from ...quant.cuda import launch_shape
from ...quant.cuda._runtime import check_tensor, cuda_device, get_kernel, grid_for

KERNEL_DIR = Path(__file__).resolve().parent
FIELDS = 12  # eightbit_optim.cuh kFields
MAX_STATES = 3
_PLANS = 32


@dataclasses.dataclass
class Group:
    """Parameters of one dtype pair on one device, as the kernel will see them."""

    params: list = dataclasses.field(default_factory=list)  # contiguous parameters (or copies)
    grads: list = dataclasses.field(default_factory=list)
    states: list = dataclasses.field(default_factory=list)  # per param: MAX_STATES (codes, absmax)
    steps: list = dataclasses.field(default_factory=list)
    copies: list = dataclasses.field(default_factory=list)  # (original or None, temporary)


def group_params(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[tuple[Sequence[torch.Tensor] | None, Sequence[torch.Tensor] | None]],
    steps: Sequence[torch.Tensor] | None,
) -> dict[tuple[torch.device, torch.dtype, torch.dtype], Group]:
    """Sort parameters into launch groups; skip empty ones; make every tensor kernel-ready.

    A gradient whose dtype is neither the parameter's nor float32 is upcast to float32 (exact);
    a non-contiguous parameter is updated in a contiguous copy that is written back after the
    launch; a CPU step counter is copied to the device.
    """
    if len(grads) != len(params):
        raise ValueError(f"grads has {len(grads)} entries but there are {len(params)} parameters")
    groups: dict = {}
    for index, (p, g) in enumerate(zip(params, grads, strict=True)):
        if p.numel() == 0:
            continue
        device = cuda_device(p)
        if g.dtype not in (p.dtype, torch.float32):
            g = g.float()
        key = (device, p.dtype, g.dtype)
        group = groups.setdefault(key, Group())
        work = p if p.is_contiguous() else p.contiguous()
        if work is not p:
            group.copies.append((p, work))
        group.params.append(work)
        contiguous = g.contiguous()
        if contiguous is not grads[index]:  # an upcast or compacted copy lives for this call only
            group.copies.append((None, contiguous))
        group.grads.append(contiguous)
        group.states.append(
            [
                (codes[index], None if absmax is None else absmax[index])
                if codes is not None
                else (None, None)
                for codes, absmax in states
            ]
            + [(None, None)] * (MAX_STATES - len(states))
        )
        if steps is None:
            group.steps.append(None)
        else:
            step = steps[index]
            if step.device != device or step.dtype != torch.float32:
                step = step.to(device=device, dtype=torch.float32, non_blocking=True)
                group.copies.append((None, step))  # a temporary: the plan is not kept
            group.steps.append(step)
    return groups


def _validate(group: Group, block_size: int, state_bits: int, device: torch.device) -> None:
    for p, g, states, step in zip(
        group.params, group.grads, group.states, group.steps, strict=True
    ):
        n = p.numel()
        check_tensor(p, p.dtype, device, "a parameter")
        check_tensor(g, g.dtype, device, "a gradient")
        if g.numel() != n:
            raise ValueError(f"a gradient has {g.numel()} elements but its parameter has {n}")
        for codes, absmax in states:
            if codes is None:
                continue
            if state_bits == 32:
                check_tensor(codes, torch.float32, device, "an fp32 state")
                if codes.numel() != n:
                    raise ValueError(
                        f"an fp32 state of {codes.numel()} elements does not fit a parameter of {n}"
                    )
                continue
            check_tensor(codes, torch.uint8, device, "state codes")
            check_tensor(absmax, torch.float32, device, "state absmax")
            if codes.numel() != n or absmax.numel() != num_blocks(n, block_size):
                raise ValueError(
                    f"state codes of {codes.numel()} and absmax of {absmax.numel()} entries do not "
                    f"fit a parameter of {n} elements at block_size {block_size}"
                )
        if step is not None:
            check_tensor(step, torch.float32, device, "a step counter")


def _build_table(
    group: Group, tile: int, state_alignment: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    rows, first = [], 0
    for p, g, states, step in zip(
        group.params, group.grads, group.states, group.steps, strict=True
    ):
        n = p.numel()
        pointers = [0 if t is None else t.data_ptr() for pair in states for t in pair]
        aligned = all(x % 16 == 0 for x in (p.data_ptr(), g.data_ptr())) and all(
            x % state_alignment == 0 for x in pointers[0::2]
        )
        rows += [
            p.data_ptr(),
            g.data_ptr(),
            *pointers,
            0 if step is None else step.data_ptr(),
            n,
            first,
            int(aligned),
        ]
        first += -(-n // tile)
    # Pointers above 2^63 do not occur on CUDA (47-bit virtual addresses); int64 holds them.
    host = torch.tensor(rows, dtype=torch.int64)
    if torch.cuda.is_available():
        host = host.pin_memory()
    return host, host.to(device, non_blocking=True), first


@dataclasses.dataclass
class Plan:
    """One launch: the kernel's dtypes and device, and its table on the device (``host`` keeps
    the pinned source of the copy alive)."""

    device: torch.device
    dtypes: tuple[torch.dtype, torch.dtype]
    host: torch.Tensor
    table: torch.Tensor
    num_tensors: int
    num_tiles: int
    copies: list


def _signature(params, grads, states, steps, block_size) -> tuple:
    """What a plan depends on: every address, and the size, dtype and layout of parameters and
    gradients (a transposed view shares its tensor's address). States and steps are the
    optimizer's own contiguous tensors, so their addresses identify them."""
    key = [block_size]
    key += [(p.data_ptr(), p.numel(), p.dtype, p.is_contiguous()) for p in params]
    key += [(g.data_ptr(), g.dtype, g.is_contiguous()) for g in grads]
    for codes, absmax in states:
        if codes is None:
            key.append(None)
        else:
            key += [c.data_ptr() for c in codes]
            key += [a.data_ptr() for a in absmax or ()]
    if steps is not None:
        key += [(t.data_ptr(), t.device.type) for t in steps]
    return tuple(key)


class _Plans:
    """Launch plans by signature, a bounded LRU. A plan used while a CUDA graph is captured is
    never evicted: the graph reads its table at every replay."""

    def __init__(self) -> None:
        self._lru: collections.OrderedDict = collections.OrderedDict()
        self._captured: dict[tuple, list[Plan]] = {}

    def get(self, key: tuple) -> list[Plan] | None:
        plans = self._lru.get(key) or self._captured.get(key)
        if plans is not None:
            if key in self._lru:
                self._lru.move_to_end(key)
            if _capturing(plans[0].device):
                self._captured[key] = plans
        return plans

    def put(self, key: tuple, plans: list[Plan]) -> None:
        if not plans or any(plan.copies for plan in plans):
            return
        if _capturing(plans[0].device):
            self._captured[key] = plans
            return
        self._lru[key] = plans
        while len(self._lru) > _PLANS:
            self._lru.popitem(last=False)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


plans = _Plans()


def _make_plans(params, grads, states, steps, block_size, state_bits, tile) -> list[Plan]:
    made = []
    for (device, p_dtype, g_dtype), group in group_params(params, grads, states, steps).items():
        _validate(group, block_size, state_bits, device)
        alignment = 8 if state_bits == 8 else 16  # uint2 code stores, or float4 state loads
        host, table, num_tiles = _build_table(group, tile, alignment, device)
        made.append(
            Plan(
                device, (p_dtype, g_dtype), host, table, len(group.params), num_tiles, group.copies
            )
        )
    return made


def learning_rate(
    lr: float | torch.Tensor, device: torch.device
) -> tuple[torch.Tensor | None, float]:
    """``(lr_ptr, lr)`` kernel arguments: a CUDA tensor is read by the kernel (graph capture sees
    its current value at each replay); a Python float or CPU tensor is passed by value."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"lr must be a number or a one-element tensor, got shape {tuple(lr.shape)}"
            )
        if lr.device.type == "cuda":
            if lr.device != device:
                raise ValueError(f"lr is on {lr.device} but the parameters are on {device}")
            return lr.reshape(()).to(torch.float32), 0.0
        return None, float(lr)
    return None, float(lr)


def random_seed(dtype: torch.dtype, stochastic: bool, device: torch.device) -> torch.Tensor | None:
    """A fresh int64 Philox key on the device for bf16 stochastic rounding, drawn from torch's
    default CUDA generator (so ``torch.manual_seed`` makes runs repeat; graph-capture safe)."""
    if not (stochastic and dtype == torch.bfloat16):
        return None
    return torch.empty((), dtype=torch.int64, device=device).random_()


def launch(
    kernel_name: str,
    source: str,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[tuple[Sequence[torch.Tensor] | None, Sequence[torch.Tensor] | None]],
    steps: Sequence[torch.Tensor] | None,
    hyper: Sequence,
    *,
    lr: float | torch.Tensor,
    block_size: int,
    state_bits: int,
    stochastic_rounding: bool,
) -> None:
    """Run ``kernel_name`` of ``source`` over all parameters: one launch per dtype group.

    ``states``: per kernel state slot, ``(codes list, absmax list)`` (``state_bits=8``) or
    ``(fp32 state list, None)`` (``state_bits=32``), or ``(None, None)`` for a state not kept.
    ``hyper``: the kernel's arguments after ``lr`` and before ``seed``, in C order.
    """
    check_block_size(block_size)
    block, tile = launch_shape(block_size)
    key = (kernel_name, state_bits, _signature(params, grads, states, steps, block_size))
    todo = plans.get(key)
    if todo is None:
        todo = _make_plans(params, grads, states, steps, block_size, state_bits, tile)
        plans.put(key, todo)
    for plan in todo:
        device = plan.device
        kernel = get_kernel(KERNEL_DIR / source, kernel_name, plan.dtypes, device)
        lr_ptr, lr_value = learning_rate(lr, device)
        kernel.launch(
            plan.table,
            plan.num_tensors,
            plan.num_tiles,
            get_codebook("dynamic", signed=True, device=device),
            get_codebook("dynamic", signed=False, device=device),
            block_size,
            state_bits,
            lr_ptr,
            lr_value,
            *hyper,
            random_seed(plan.dtypes[0], stochastic_rounding, device),
            grid=grid_for(plan.num_tiles, block, device),
            block=block,
        )
        for original, work in plan.copies:
            if original is not None:
                original.copy_(work)
    # the kernels wrote parameters and states behind autograd's back; an in-place op would
    # have marked them modified
    written = [*params, *(t for pair in states for ts in pair if ts is not None for t in ts)]
    torch.autograd.graph.increment_version(written)
