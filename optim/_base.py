"""The bookkeeping every 8-bit optimizer shares: lazy state, the size rule, and checkpoints.

A frontend (Adam8bit, RMSprop8bit, Lion8bit) declares its states (:class:`StateSpec`), validates
its hyperparameters and calls its functional rule; this base class does everything else once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch

from ..quant import check_block_size, get_codebook
from . import _distributed
from ._distributed import local_tensor

# Options every 8-bit optimizer adds to its torch counterpart's, documented once.
EXTRA_ARGS_DOC = """block_size (int): elements per absmax block of the 8-bit states (power of two,
            64 to 4096; default 256).
        min_8bit_size (int): parameters with fewer elements keep fp32 state (default 4096). The
            rule looks at the whole parameter, not a DTensor's shard, so every rank agrees.
        bf16_stochastic_rounding (bool): write bfloat16 parameters with stochastic rounding, so
            updates below half a bfloat16 ulp are not lost on average (default False; no effect
            on float32/float16 parameters). Draws from torch's default generator.
        foreach, fused, capturable (bool, optional): torch's performance hints, accepted for
            drop-in compatibility; every step is already one fused pass per parameter.

        state_bits (int): 8, or 32 to keep fp32 state (default 8). Like any option it can be set
            per param group, e.g. to keep embeddings in 32 bits:
            ``[{"params": emb.parameters(), "state_bits": 32}, {"params": rest}]``."""


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One optimizer state: its torch name, its sign, and when it exists."""

    name: str
    signed: bool
    enabled: Callable[[dict], bool] = lambda group: True


@functools.lru_cache(maxsize=2)
def zero_code(signed: bool) -> int:
    """The code of 0.0 in the dynamic map (what a fresh 8-bit state holds)."""
    return int(torch.nonzero(get_codebook("dynamic", signed=signed) == 0).item())


def _break_graph_at_step() -> None:
    """Make ``Optimizer8bit.step`` a graph break under torch.compile, once, at the first
    construction (before torch patches the subclasses' step): torch.compiler.disable imports
    dynamo, most of a second that ``import eightbit`` does not pay."""
    if not getattr(Optimizer8bit.step, "_eightbit_disabled", False):
        step = torch.compiler.disable(Optimizer8bit.step, reason=(
            "eightbit: the 8-bit optimizer step runs eagerly (fused kernels); with fullgraph=True, "
            "call optimizer.step() outside the compiled function"))
        step._eightbit_disabled = True
        Optimizer8bit.step = step


class Optimizer8bit(torch.optim.Optimizer):
    """Base class of the 8-bit optimizers; subclasses set ``state_specs`` and ``_update``."""

    state_specs: tuple[StateSpec, ...] = ()

    def __init__(
        self,
        params,
        defaults: dict[str, Any],
        *,
        block_size: int,
        min_8bit_size: int,
        state_bits: int,
        bf16_stochastic_rounding: bool,
        foreach: bool | None,
        fused: bool | None,
        capturable: bool,
        differentiable: bool,
    ) -> None:
        _break_graph_at_step()
        name = type(self).__name__
        if differentiable:
            raise ValueError(
                f"{name} does not support differentiable=True: quantized state has no gradient. "
                f"Use the torch.optim optimizer to differentiate through the step."
            )
        lr = defaults["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= defaults.get("weight_decay", 0.0):
            raise ValueError(f"Invalid weight_decay value: {defaults['weight_decay']}")
        defaults = dict(
            defaults,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=False,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            state_bits=state_bits,
            bf16_stochastic_rounding=bool(bf16_stochastic_rounding),
        )
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(_check_and_stash_state)
        self.register_load_state_dict_post_hook(_restore_state)
        self.register_state_dict_post_hook(_portable_state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, after checking state_bits, block_size and min_8bit_size."""
        options = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if options["state_bits"] not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {options['state_bits']!r}")
        check_block_size(options["block_size"])
        if isinstance(options["min_8bit_size"], bool) or not isinstance(
            options["min_8bit_size"], int
        ) or options["min_8bit_size"] < 0:
            raise ValueError(
                f"min_8bit_size must be a non-negative int, got {options['min_8bit_size']!r}"
            )
        super().add_param_group(param_group)

    # -- state -----------------------------------------------------------------------------

    def _is_8bit(self, p: torch.Tensor, group: dict) -> bool:
        return group["state_bits"] == 8 and p.numel() >= group["min_8bit_size"]

    def _fill_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """Create what is missing: everything on the first step, a newly enabled state later."""
        local = local_tensor(p)
        if not state:
            device = local.device if local.device.type == "cuda" else torch.device("cpu")
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            eight_bit = self._is_8bit(p, group)
        else:
            eight_bit = f"{self.state_specs[0].name}_codes" in state
        for spec in self.state_specs:
            if not spec.enabled(group) or spec.name in state or f"{spec.name}_codes" in state:
                continue
            if _distributed.is_sharded(p):  # DTensor states that DCP can reshard
                state.update(_distributed.fresh_state(
                    p, spec.name, zero_code(spec.signed), torch.float32, eight_bit,
                    group["block_size"]))
            elif eight_bit:
                state[f"{spec.name}_codes"] = torch.full(
                    local.shape, zero_code(spec.signed), dtype=torch.uint8, device=local.device
                )
                state[f"{spec.name}_absmax"] = torch.zeros(
                    _distributed.absmax_shape(local, group["block_size"]), device=local.device
                )
            else:
                state[spec.name] = torch.zeros(local.shape, dtype=torch.float32,
                                               device=local.device)

    # -- step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` re-evaluates the model and returns the loss.

        Under ``torch.compile`` the step runs eagerly (a graph break): the fused kernels are
        opaque to dynamo, and the step is one kernel call per bucket, which compiling would not
        speed up. With ``fullgraph=True`` dynamo refuses the break; compile the forward and
        backward, and call ``step()`` outside the compiled function.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # One functional call per (device, 8-bit or not): each call sees a single device.
            buckets: dict[tuple, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
            steps = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                self._fill_state(p, group, state)
                steps.append(state["step"])
                key = (local_tensor(p).device, f"{self.state_specs[0].name}_codes" in state)
                params, grads, states = buckets[key]
                for local, grad, local_state in _distributed.step_views(
                    p, state, group["block_size"]
                ):
                    params.append(local)
                    grads.append(grad)
                    states.append(local_state)
            if steps:  # one op for the group, as torch.optim's foreach and fused paths do
                torch._foreach_add_(steps, 1)
            for (_, eight_bit), (params, grads, states) in buckets.items():
                self._update(group, params, grads, states, eight_bit)
        return loss

    def _update(self, group, params, grads, states, eight_bit: bool) -> None:
        raise NotImplementedError  # each frontend calls its functional rule

    def _state_lists(self, states: list[dict], eight_bit: bool) -> list:
        """Per state spec: [codes, absmax] lists (8-bit) or one fp32 list; ``None`` when off."""
        out = []
        for spec in self.state_specs:
            keys = [f"{spec.name}_codes", f"{spec.name}_absmax"] if eight_bit else [spec.name]
            for key in keys:
                out.append([s[key] for s in states] if all(key in s for s in states) else None)
        return out


# -- checkpoints -------------------------------------------------------------------------------
# torch's load_state_dict casts every floating state to the parameter's dtype (and, for float
# parameters, the uint8 codes too). The pre-hook checks the whole state_dict before anything
# changes, then hands torch a state_dict without per-parameter state; the post-hook installs that
# state itself, with each tensor's dtype kept and its device set by the parameter.


def _check_and_stash_state(optimizer: Optimizer8bit, state_dict: dict) -> dict:
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{name}.load_state_dict needs a dict with 'state' and 'param_groups'")
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups but this {name} has {len(groups)}; "
            "build the optimizer with the same param groups as the one that was saved"
        )
    params_of_id = {}
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                f"param group {i} holds {len(group['params'])} parameters but the state_dict's "
                f"holds {len(saved['params'])}; the group layout must match the saved one"
            )
        missing = set(optimizer.defaults) - set(saved)
        if missing:
            raise ValueError(
                f"param group {i} of the state_dict lacks {sorted(missing)}: it was not saved by "
                f"{name} (a different optimizer class or a torch.optim optimizer)"
            )
        check_block_size(saved["block_size"])
        for pid, p in zip(saved["params"], group["params"], strict=True):
            params_of_id[pid] = (p, saved)
    for pid, state in state_dict["state"].items():
        if pid not in params_of_id:
            raise ValueError(f"state_dict holds state for parameter id {pid}, which no group lists")
        p, saved = params_of_id[pid]
        _check_param_state(optimizer, state, p, saved, pid)
    optimizer._eightbit_pending_state = (
        [pid for g in saved_groups for pid in g["params"]], state_dict["state"]
    )
    return {**state_dict, "state": {}}


def _check_param_state(optimizer, state: dict, p: torch.Tensor, group: dict, pid) -> None:
    name = type(optimizer).__name__
    specs = optimizer.state_specs
    eight_bit = f"{specs[0].name}_codes" in state
    expected = {}
    for spec in specs:  # shapes are global: a DTensor's, and its states' as state_dict() has them
        if eight_bit:
            absmax = {torch.Size(_distributed.absmax_shape(p, group["block_size"]))}
            if not _distributed.is_sharded(p):  # also a sharded run's full state_dict
                absmax.add(torch.Size(_distributed.absmax_shape_sharded(p, group["block_size"])))
            expected[f"{spec.name}_codes"] = (torch.uint8, {p.shape}, spec)
            expected[f"{spec.name}_absmax"] = (torch.float32, absmax, spec)
        else:
            expected[spec.name] = (torch.float32, {p.shape}, spec)
    unknown = set(state) - set(expected) - {"step"}
    missing = {k for k, (_, _, spec) in expected.items() if spec.enabled(group)} - set(state)
    if unknown or missing or not isinstance(state.get("step"), torch.Tensor):
        raise ValueError(
            f"the state of parameter {pid} has keys {sorted(state)}, which do not fit {name} "
            f"(unknown {sorted(unknown)}, missing {sorted(missing | ({'step'} - set(state)))}); "
            "was it saved by a different optimizer?"
        )
    for key, (dtype, shape, _) in expected.items():
        value = state.get(key)
        if value is not None and (value.dtype != dtype or value.shape not in shape):
            raise ValueError(
                f"state {key!r} of parameter {pid} is {value.dtype} of shape {tuple(value.shape)}, "
                f"but this parameter needs {dtype} of shape "
                f"{' or '.join(str(tuple(s)) for s in shape)} (block_size "
                f"{group['block_size']}); the state_dict belongs to a different model or setting"
            )


def _restore_state(optimizer: Optimizer8bit) -> None:
    pending = optimizer.__dict__.pop("_eightbit_pending_state", None)
    if pending is None:
        return
    saved_ids, saved_state = pending
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    signed = {spec.name: spec.signed for spec in optimizer.state_specs}
    for pid, p in zip(saved_ids, params, strict=True):
        if pid not in saved_state:
            continue
        local = local_tensor(p)
        step_device = local.device if local.device.type == "cuda" else torch.device("cpu")
        state = {
            key: value.to(step_device if key == "step" else local.device, copy=True)
            for key, value in saved_state[pid].items()
        }
        _distributed.restore_state(p, state, group_of[id(p)]["block_size"], signed)
        optimizer.state[p] = state


def _portable_state(optimizer: Optimizer8bit, state_dict: dict) -> dict:
    """state_dict()'s post-hook: each parameter's state in the layout DCP can reshard."""
    state = dict(state_dict["state"])
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        for pid, p in zip(saved["params"], group["params"], strict=True):
            if pid in state:
                state[pid] = _distributed.portable_state(p, state[pid], group["block_size"])
    return {**state_dict, "state": state}
