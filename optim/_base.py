"""The bookkeeping every 8-bit optimizer shares: option checks, lazy state, the size rule.

A frontend (Adam8bit, RMSprop8bit, Lion8bit) declares its states (:class:`StateSpec`), checks its
own options (``check_options``) and calls its functional rule; this base class does everything
else once. Checkpoint loading lives in :mod:`._checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..quant import FLOAT_DTYPES, check_block_size, get_codebook
from . import _checkpoint, _distributed
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

    @functools.cached_property
    def codes(self) -> str:
        """The state key of its 8-bit codes: ``<name>_codes``."""
        return f"{self.name}_codes"

    @functools.cached_property
    def absmax(self) -> str:
        """The state key of its blocks' absmax: ``<name>_absmax``."""
        return f"{self.name}_absmax"


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


def check_real(
    name: str, value: Any, *, high: float = math.inf, high_open: bool = False,
    tensor: bool = False,
) -> float:
    """``value`` as a float if it is a finite real number in ``[0, high]`` (``[0, high)`` with
    ``high_open``); ``TypeError``/``ValueError`` in torch.optim's words otherwise. ``tensor``
    also takes a one-element real tensor (a tensor ``lr``)."""
    if tensor and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor {name} must have one element, got shape "
                             f"{tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"a tensor {name} must be real, got {value.dtype}")
        number = float(value.item()) if value.device.type != "meta" else 0.0
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"Invalid {name}: {value!r} is not a real number")
    inside = number < high if high_open else number <= high
    if not (math.isfinite(number) and 0.0 <= number and inside):
        raise ValueError(f"Invalid {name}: {value}")
    return number


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool if it is one (or the int 0 or 1); ``TypeError`` otherwise."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_betas(betas: Any, *, high_open: bool) -> tuple[float, float]:
    """Two decay rates in ``[0, 1)`` (``[0, 1]`` when not ``high_open``), as a tuple of floats."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    return tuple(check_real(f"beta parameter at index {i}", beta, high=1.0, high_open=high_open,
                            tensor=True) for i, beta in enumerate(betas))


def check_param(p: Any) -> None:
    """Refuse what no 8-bit optimizer can update: non-tensors, integer/complex, sparse."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, but one of the params is "
                        f"{type(p).__name__}")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"a parameter of shape {tuple(p.shape)} is {p.dtype}; 8-bit optimizers update "
            "float32, float16 or bfloat16 parameters (leave integer or complex tensors out)"
        )
    if p.layout != torch.strided:
        raise TypeError(f"a parameter has layout {p.layout}; 8-bit optimizers take dense "
                        "(strided) parameters")


def check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    """Refuse a gradient the update rules cannot use, before any state changes."""
    check_param(p)
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(
            f"8-bit optimizers do not support sparse gradients (got {grad.layout}); use dense "
            "gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam"
        )
    if grad.dtype not in FLOAT_DTYPES or grad.shape != p.shape or grad.device != p.device:
        raise ValueError(
            f"a gradient of shape {tuple(grad.shape)} ({grad.dtype}, {grad.device}) does not "
            f"fit its parameter of shape {tuple(p.shape)} ({p.dtype}, {p.device})"
        )


class Optimizer8bit(torch.optim.Optimizer):
    """Base class of the 8-bit optimizers; subclasses set ``state_specs`` and ``_update``."""

    state_specs: tuple[StateSpec, ...] = ()
    # Options a class fixes whatever a group or a checkpoint says (AdamW8bit: decoupled decay).
    fixed_options: dict[str, Any] = {}

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
        if differentiable:
            raise ValueError(
                f"{type(self).__name__} does not support differentiable=True: quantized state has "
                "no gradient. Use the torch.optim optimizer to differentiate through the step."
            )
        defaults = dict(
            defaults,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=False,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            state_bits=state_bits,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
        )
        super().__init__(params, self.check_options(defaults))
        _checkpoint.register_hooks(self)
        self.register_state_dict_post_hook(_portable_state)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options of one param group, checked and normalized (betas a tuple of floats,
        flags bools); ``ValueError``/``TypeError`` naming the bad one.

        The one check of the constructor, :meth:`add_param_group` and ``load_state_dict``;
        subclasses add their own options and call ``super().check_options``.
        """
        options = {**options, **cls.fixed_options}
        out = dict(options)
        check_real("learning rate", options["lr"], tensor=True)
        check_real("weight_decay value", options["weight_decay"])
        if options["state_bits"] not in (8, 32) or isinstance(options["state_bits"], bool):
            raise ValueError(f"state_bits must be 8 or 32, got {options['state_bits']!r}")
        check_block_size(options["block_size"])
        size = options["min_8bit_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"min_8bit_size must be a non-negative int, got {size!r}")
        if options["differentiable"] is not False:
            raise ValueError(
                f"{cls.__name__} does not support differentiable={options['differentiable']!r}: "
                "quantized state has no gradient"
            )
        for key in ("foreach", "fused"):
            if options[key] is not None:
                out[key] = check_flag(key, options[key])
        for key in ("capturable", "bf16_stochastic_rounding", "maximize"):
            out[key] = check_flag(key, options[key])
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, after checking the group's options and parameters.

        Parameters must be floating point (float32, float16 or bfloat16), dense, and listed once:
        a parameter in two groups is refused by torch ("some parameters appear in more than one
        parameter group"); one listed twice in a group is refused here (torch only warns), since
        it would be updated twice per step.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of tensors in sets will change between runs. Please use a list instead."
            )
        else:
            params = list(params)
        seen = set()
        for p in params:
            check_param(p)
            if id(p) in seen:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} appears twice in one parameter group; "
                    "list each parameter once (e.g. dict.fromkeys(params) drops repeats): it would "
                    "be updated twice per step"
                )
            seen.add(id(p))
        options = self.check_options({
            **self.defaults, **{k: v for k, v in param_group.items() if k != "params"}
        })
        super().add_param_group({
            **param_group, **{k: options[k] for k in param_group if k != "params"},
            "params": params,
        })

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
            eight_bit = self.state_specs[0].codes in state
        for spec in self.state_specs:
            if spec.codes in state or spec.name in state or not spec.enabled(group):
                continue
            if _distributed.is_sharded(p):  # DTensor states that DCP can reshard
                state.update(_distributed.fresh_state(
                    p, spec, zero_code(spec.signed), torch.float32, eight_bit,
                    group["block_size"]))
            elif eight_bit:
                state[spec.codes] = torch.full(
                    local.shape, zero_code(spec.signed), dtype=torch.uint8, device=local.device
                )
                state[spec.absmax] = torch.zeros(
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
        # Everything is checked before any state is created or any step counted, so a step
        # that raises changes nothing.
        work = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        for params in work:
            for p in params:
                check_grad(p, p.grad)
        codes = self.state_specs[0].codes
        for group, group_params in zip(self.param_groups, work, strict=True):
            # One functional call per (device, 8-bit or not): each call sees a single device.
            buckets: dict[tuple, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
            steps = []
            for p in group_params:
                state = self.state[p]
                self._fill_state(p, group, state)
                steps.append(state["step"])
                key = (local_tensor(p).device, codes in state)
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
            keys = [spec.codes, spec.absmax] if eight_bit else [spec.name]
            for key in keys:
                out.append([s[key] for s in states] if all(key in s for s in states) else None)
        return out


def _portable_state(optimizer: Optimizer8bit, state_dict: dict) -> dict:
    """state_dict()'s post-hook: each parameter's state in the layout DCP can reshard."""
    state = dict(state_dict["state"])
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        for pid, p in zip(saved["params"], group["params"], strict=True):
            if pid in state:
                state[pid] = _distributed.portable_state(p, state[pid], group["block_size"])
    return {**state_dict, "state": state}
