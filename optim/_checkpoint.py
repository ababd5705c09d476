"""Transactional ``load_state_dict`` for the 8-bit optimizers, through torch's load hooks.

torch's ``Optimizer.load_state_dict`` casts every floating state to the parameter's dtype (for
float parameters the uint8 codes too) and applies the saved param groups as they are. So the
pre-hook checks the whole state_dict first (layout, every group's options through the class's own
:meth:`~eightbit.optim.Optimizer8bit.check_options`, every state tensor's key, dtype, shape,
layout and values) and prepares every new tensor, on the parameter's device, before anything
changes; it then hands torch the checked groups and no per-parameter state. torch applies the
groups (nothing there can fail: their number and sizes are checked), and the post-hook swaps the
prepared state in, which is plain dict assignment. A refused state_dict leaves the optimizer as it
was, bit for bit.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any

import torch

# _base is a cycle (it registers these hooks): its names are looked up at call time
from . import _base, _distributed

_PENDING = "_eightbit_pending_state"


def register_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` check everything first and install all or nothing."""
    optimizer.register_load_state_dict_pre_hook(check_and_prepare)
    optimizer.register_load_state_dict_post_hook(install)


def expected_state(optimizer, p: torch.Tensor, group: dict, eight_bit: bool) -> dict:
    """``{key: (dtype, shapes, spec)}`` of every state tensor ``p`` may hold (``step`` aside):
    the global shapes ``state_dict()`` gives them (a DTensor's, see :mod:`._distributed`); an
    absmax may come in either layout, a plain run's (flat) or a sharded run's. A spec whose
    ``enabled(group)`` is false may be absent."""
    block_size = group["block_size"]
    absmax = {torch.Size(_distributed.absmax_shape_sharded(p, block_size)),
              torch.Size(_distributed.absmax_shape_flat(p, block_size))}
    out = {}
    for spec in optimizer.state_specs:
        if eight_bit:
            out[spec.codes] = (torch.uint8, {p.shape}, spec)
            out[spec.absmax] = (torch.float32, absmax, spec)
        else:
            out[spec.name] = (torch.float32, {p.shape}, spec)
    return out


def state_device(p: torch.Tensor, key: str) -> torch.device:
    """Where state ``key`` of ``p`` lives: with the parameter; ``step`` on the CPU unless the
    parameter is on CUDA (as torch.optim keeps it, and the CUDA kernels read it there)."""
    device = _base.local_tensor(p).device
    return device if key != "step" or device.type == "cuda" else torch.device("cpu")


def check_and_prepare(optimizer, state_dict: Any) -> dict:
    """The pre-hook: check ``state_dict`` whole, stash the new state, return the checked groups.

    Raises ``ValueError`` (or ``TypeError`` for a value of the wrong type) before anything
    changes.
    """
    optimizer.__dict__.pop(_PENDING, None)  # left by a load that failed after this hook
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{name}.load_state_dict needs a dict with 'state' and 'param_groups'")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, dict):
        raise TypeError("a state_dict's 'param_groups' must be a list and its 'state' a dict")
    groups = optimizer.param_groups
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups but this {name} has {len(groups)}; "
            "build the optimizer with the same param groups as the one that was saved"
        )
    checked_groups, params_of_id = [], {}
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        checked = check_group(optimizer, i, group, saved)
        checked_groups.append(checked)
        for pid, p in zip(checked["params"], group["params"], strict=True):
            if pid in params_of_id:
                raise ValueError(f"parameter id {pid!r} appears twice in the state_dict's groups")
            params_of_id[pid] = (p, checked)
    new_state = {}
    for pid, state in saved_state.items():
        if pid not in params_of_id:
            raise ValueError(f"state_dict holds state for parameter id {pid!r}, which no group "
                             "lists")
        p, group = params_of_id[pid]
        new_state[p] = prepare_param_state(optimizer, state, p, group, pid)
    setattr(optimizer, _PENDING, new_state)
    return {**state_dict, "state": {}, "param_groups": checked_groups}


def check_group(optimizer, i: int, group: dict, saved: Any) -> dict:
    """Saved param group ``i`` checked like a constructor's, as the group torch will apply."""
    name = type(optimizer).__name__
    if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
        raise TypeError(f"param group {i} of the state_dict must be a dict with a 'params' list")
    if len(group["params"]) != len(saved["params"]):
        raise ValueError(
            f"param group {i} holds {len(group['params'])} parameters but the state_dict's "
            f"holds {len(saved['params'])}; the group layout must match the saved one"
        )
    missing = set(optimizer.defaults) - set(saved)
    if missing:
        raise ValueError(
            f"param group {i} of the state_dict lacks {sorted(missing)}: it was not saved by "
            f"{name} (a different optimizer class or a torch.optim optimizer; "
            "load_torch_state_dict converts the latter)"
        )
    options = type(optimizer).check_options({k: v for k, v in saved.items() if k != "params"})
    try:  # torch deep-copies the groups after this hook: make sure that cannot fail
        checked = copy.deepcopy({**options, "params": list(saved["params"])})
    except Exception as error:
        raise TypeError(f"param group {i} of the state_dict holds a value that cannot be "
                        f"copied: {error}") from error
    for pid in checked["params"]:
        try:
            hash(pid)
        except TypeError:
            raise TypeError(f"param group {i} lists an unhashable parameter id {pid!r}") from None
    return checked


def prepare_param_state(optimizer, state: Any, p: torch.Tensor, group: dict, pid) -> dict:
    """The state of one parameter, checked, as fresh tensors on the parameter's device."""
    name = type(optimizer).__name__
    if not isinstance(state, dict):
        raise TypeError(f"the state of parameter {pid!r} must be a dict, got "
                        f"{type(state).__name__}")
    eight_bit = optimizer.state_specs[0].codes in state
    expected = expected_state(optimizer, p, group, eight_bit)
    unknown = set(state) - set(expected) - {"step"}
    required = {k for k, (_, _, spec) in expected.items() if spec.enabled(group)} | {"step"}
    missing = required - set(state)
    if unknown or missing:
        raise ValueError(
            f"the state of parameter {pid!r} has keys {sorted(map(str, state))}, which do not fit "
            f"{name} (unknown {sorted(map(str, unknown))}, missing {sorted(missing)}); was it "
            "saved by a different optimizer?"
        )
    out = {"step": prepare_step(state["step"], state_device(p, "step"), pid)}
    for key, (dtype, shape, spec) in expected.items():
        if key in state:
            value = prepare_tensor(state[key], dtype, shape, state_device(p, key), key, pid, group)
            check_values(_base.local_tensor(value), key, spec, pid)
            out[key] = value
    # into this run's layout (resharded, or requantized where blocks were cut), still before
    # anything changes
    _distributed.restore_state(p, out, group["block_size"], optimizer.state_specs)
    return out


def prepare_step(step: Any, device: torch.device, pid) -> torch.Tensor:
    """A step count (a 0-d real tensor or a Python number, finite and >= 0, as torch.optim
    accepts it) as the 0-d float32 tensor the rules count with."""
    where = f"'step' of parameter {pid!r}"
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.layout != torch.strided:
            raise ValueError(f"{where} must be a 0-d tensor, got shape {tuple(step.shape)}")
        if step.dtype == torch.bool or step.is_complex():
            raise TypeError(f"{where} must be a real number, got {step.dtype}")
        step = _move(step, torch.float32, device, where)
        value = float(step) if step.device.type != "meta" else 0.0
    elif isinstance(step, numbers.Real) and not isinstance(step, bool):
        value = float(step)
        step = torch.tensor(value, dtype=torch.float32, device=device)
    else:
        raise TypeError(f"{where} must be a number or a 0-d tensor, got {type(step).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where} is {value}; a step count is finite and >= 0")
    return step


def prepare_tensor(value: Any, dtype: torch.dtype, shapes: set, device: torch.device,
                   key: str, pid, group: dict) -> torch.Tensor:
    """A copy of one state tensor on ``device``, contiguous, after its dtype/shape/layout check
    (a DTensor is checked by its global shape and stays a DTensor, on its mesh).

    A non-contiguous tensor is repaired (copied contiguous); a sparse one is refused.
    """
    where = f"state {key!r} of parameter {pid!r}"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
    local = _base.local_tensor(value)
    if local.layout != torch.strided:
        raise ValueError(f"{where} has layout {local.layout}; save dense state (.to_dense())")
    if local.dtype != dtype or value.shape not in shapes:
        raise ValueError(
            f"{where} is {local.dtype} of shape {tuple(value.shape)}, but this parameter needs "
            f"{dtype} of shape {' or '.join(str(tuple(s)) for s in shapes)} (block_size "
            f"{group['block_size']}); the state_dict belongs to a different model or setting"
        )
    if _distributed.is_sharded(value):
        return value.detach().to(dtype=dtype, copy=True)
    return _move(local, dtype, device, where)


def _move(t: torch.Tensor, dtype: torch.dtype, device: torch.device, where: str) -> torch.Tensor:
    try:
        return t.detach().to(device=device, dtype=dtype, memory_format=torch.contiguous_format,
                             copy=True)
    except (RuntimeError, NotImplementedError) as error:  # e.g. out of a meta tensor
        raise ValueError(f"{where} cannot be copied to {device}: {error}") from error


def check_values(value: torch.Tensor, key: str, spec, pid) -> None:
    """Values no state can hold: an absmax that is not finite and >= 0 (the quantizer never
    writes one into optimizer state), a negative value of a non-negative fp32 state."""
    if value.device.type == "meta" or value.numel() == 0:
        return
    if key.endswith("_absmax"):
        if not bool((torch.isfinite(value) & (value >= 0)).all()):
            raise ValueError(
                f"state {key!r} of parameter {pid!r} holds a negative or non-finite block scale; "
                "absmax is a maximum of magnitudes (finite, >= 0): the checkpoint is corrupt"
            )
    elif not key.endswith("_codes") and not spec.signed and bool((value < 0).any()):
        raise ValueError(f"state {key!r} of parameter {pid!r} holds negative values, but it is "
                         "an average of squares (>= 0): the checkpoint is corrupt")


def install(optimizer) -> None:
    """The post-hook: swap in the state prepared by :func:`check_and_prepare` (cannot fail)."""
    pending = optimizer.__dict__.pop(_PENDING, None)
    if pending is not None:
        optimizer.state.update(pending)
