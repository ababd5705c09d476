"""Move a run between torch.optim and eightbit mid-training: state_dicts converted both ways.

:func:`to_torch_state_dict` gives an 8-bit optimizer's state as the state_dict of its torch.optim
counterpart (8-bit states dequantized to fp32); :func:`load_torch_state_dict` loads a torch.optim
state_dict into the matching 8-bit optimizer (states quantized on load, through the same checked,
all-or-nothing ``load_state_dict``). The counterparts are one table, :data:`COUNTERPARTS`.
"""

from __future__ import annotations

import dataclasses
from itertools import chain
from typing import Any

import torch

from ..quant import dequantize_blockwise, get_codebook, quantize_blockwise
from ._base import Optimizer8bit, local_tensor
from ._checkpoint import state_device
from .adam import Adam8bit, AdamW8bit
from .rmsprop import RMSprop8bit

__all__ = ["COUNTERPARTS", "Counterpart", "load_torch_state_dict", "to_torch_state_dict"]


@dataclasses.dataclass(frozen=True)
class Counterpart:
    """The torch.optim class an 8-bit optimizer converts to and from.

    Both take the same option names and keep the same state names (``exp_avg``, ...), so a
    conversion renames nothing; ``keeps_step`` says whether torch keeps a per-parameter
    ``step`` (torch.optim.SGD does not).
    """

    torch_class: type[torch.optim.Optimizer]
    keeps_step: bool = True

    def torch_defaults(self) -> dict[str, Any]:
        """The options of a torch group of this class, with torch's defaults (read from torch,
        so the options of the installed version)."""
        return dict(self.torch_class([torch.zeros(1, requires_grad=True)]).defaults)


# Lion8bit has none (torch has no Lion): its state_dict is its own.
COUNTERPARTS: dict[type[Optimizer8bit], Counterpart] = {
    Adam8bit: Counterpart(torch.optim.Adam),
    AdamW8bit: Counterpart(torch.optim.AdamW),
    RMSprop8bit: Counterpart(torch.optim.RMSprop),
}


def counterpart(optimizer: Optimizer8bit) -> Counterpart:
    """The table's entry for ``optimizer``'s class (or the nearest base class that has one)."""
    for cls in type(optimizer).__mro__:
        if cls in COUNTERPARTS:
            return COUNTERPARTS[cls]
    known = ", ".join(cls.__name__ for cls in COUNTERPARTS)
    raise TypeError(
        f"{type(optimizer).__name__} has no torch.optim counterpart to convert to or from (those "
        f"that have one: {known}); save and load its own state_dict() instead"
    )


def to_torch_state_dict(optimizer: Optimizer8bit) -> dict:
    r"""The state_dict ``optimizer``'s torch.optim counterpart would have: 8-bit states
    dequantized to fp32 (:math:`c_{q_i} a_b`), fp32 states and ``step`` copied.

    Adam8bit gives a ``torch.optim.Adam`` state_dict, AdamW8bit an ``AdamW`` one, RMSprop8bit an
    ``RMSprop`` one; Lion8bit (torch has no Lion) raises ``TypeError``. Group options are
    torch's keys with this optimizer's values; eightbit's own options (``block_size``,
    ``state_bits``, ...) are left out, other keys (an LR scheduler's ``initial_lr``) kept.

    Example:
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = AdamW8bit(model.parameters())
        >>> model(torch.randn(8, 128)).square().mean().backward(); opt.step()
        >>> torch_opt = torch.optim.AdamW(model.parameters())
        >>> torch_opt.load_state_dict(to_torch_state_dict(opt))
        >>> torch_opt.state[model.weight]["exp_avg"].dtype
        torch.float32
    """
    entry = counterpart(optimizer)
    torch_defaults = entry.torch_defaults()
    saved = optimizer.state_dict()
    groups, group_of_id = [], {}
    for group in saved["param_groups"]:
        out = {key: group.get(key, default) for key, default in torch_defaults.items()}
        out.update({k: v for k, v in group.items() if k not in optimizer.defaults})  # params too
        groups.append(out)
        group_of_id.update(dict.fromkeys(group["params"], group))
    state = {}
    for pid, s in saved["state"].items():
        out = {"step": s["step"].detach().to("cpu", copy=True)} if entry.keeps_step else {}
        for spec in optimizer.state_specs:
            codes, absmax = s.get(spec.codes), s.get(spec.absmax)
            if codes is not None:
                out[spec.name] = dequantize_blockwise(
                    codes, absmax, block_size=group_of_id[pid]["block_size"], dtype=torch.float32,
                    codebook=get_codebook("dynamic", signed=spec.signed, device=codes.device),
                )
            elif spec.name in s:
                out[spec.name] = s[spec.name].detach().clone()
        state[pid] = out
    return {"state": state, "param_groups": groups}


def load_torch_state_dict(optimizer: Optimizer8bit, state_dict: dict) -> None:
    r"""Load the state_dict of ``optimizer``'s torch.optim counterpart into it, mid-training.

    States are quantized on load (:math:`q_i`, :math:`a_b` of the blockwise quantizer, on the
    codebook the state uses) for parameters that keep 8-bit state; groups with
    ``state_bits=32`` and parameters below ``min_8bit_size`` take the fp32 state as it is. The
    groups take the torch options (lr, betas, ...) and keep this optimizer's own
    (``block_size``, ``state_bits``, ``min_8bit_size``). As with ``torch.optim.AdamW``, an
    AdamW8bit keeps decoupled decay when given a ``torch.optim.Adam`` state_dict.

    Everything goes through ``optimizer.load_state_dict``'s checks: a state_dict that does not
    fit raises ``ValueError``/``TypeError`` and changes nothing. A state holding inf or NaN, or
    a negative average of squares, cannot be quantized and is refused.

    As in the optimizer's own steps (the rule for non-negative states), a positive value of an
    average of squares whose nearest code is zero is stored as the smallest positive code, so it
    never decodes to 0 (an update of size lr/eps).

    Example:
        >>> model = torch.nn.Linear(128, 64)
        >>> torch_opt = torch.optim.Adam(model.parameters())
        >>> model(torch.randn(8, 128)).square().mean().backward(); torch_opt.step()
        >>> opt = Adam8bit(model.parameters())
        >>> load_torch_state_dict(opt, torch_opt.state_dict())
        >>> opt.state[model.weight]["exp_avg_codes"].dtype
        torch.uint8
    """
    entry = counterpart(optimizer)
    torch_name = entry.torch_class.__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"a torch.optim.{torch_name} state_dict is a dict with 'state' and "
                         "'param_groups'")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, dict):
        raise TypeError("a state_dict's 'param_groups' must be a list and its 'state' a dict")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups but this "
            f"{type(optimizer).__name__} has {len(optimizer.param_groups)}; build it with the "
            "torch optimizer's param groups"
        )
    shared = set(optimizer.defaults) & set(entry.torch_defaults())
    ours_only = set(optimizer.defaults) - shared
    groups = []
    for i, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups, strict=True)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise TypeError(f"param group {i} of the state_dict must be a dict with 'params'")
        if ours_only & set(saved):
            raise ValueError(
                f"param group {i} has eightbit's options {sorted(ours_only & set(saved))}: this "
                "is an eightbit state_dict; load it with load_state_dict"
            )
        if shared - set(saved):
            raise ValueError(
                f"param group {i} lacks {sorted(shared - set(saved))}: it was not saved by "
                f"torch.optim.{torch_name}, the counterpart of {type(optimizer).__name__}"
            )
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {i} holds {len(group['params'])} parameters but the state_dict's "
                f"holds {len(saved['params'])}; the group layout must match the saved one"
            )
        groups.append({**{k: group[k] for k in ours_only}, **saved})
    param_of_id = dict(zip(
        chain.from_iterable(g["params"] for g in saved_groups),
        ((p, g) for g, group in zip(groups, optimizer.param_groups, strict=True)
         for p in group["params"]),
        strict=True,
    ))
    state = {}
    for pid, s in saved_state.items():
        if pid not in param_of_id or not isinstance(s, dict):
            state[pid] = s  # load_state_dict names the problem
            continue
        p, group = param_of_id[pid]
        state[pid] = _quantized_state(optimizer, s, p, group, pid)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _quantized_state(optimizer: Optimizer8bit, state: dict, p: torch.Tensor, group: dict,
                     pid) -> dict:
    """One parameter's torch state in eightbit's form (8-bit when the size rule says so)."""
    local = local_tensor(p)
    eight_bit = optimizer._is_8bit(p, group)
    out = {k: v for k, v in state.items() if k not in {s.name for s in optimizer.state_specs}}
    for spec in optimizer.state_specs:
        value = state.get(spec.name)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            if spec.name in state:
                out[spec.name] = value  # load_state_dict names the problem
            continue
        value = local_tensor(value)
        where = f"state {spec.name!r} of parameter {pid!r}"
        if value.shape != local.shape or value.layout != torch.strided:
            raise ValueError(f"{where} has shape {tuple(value.shape)} ({value.layout}), but the "
                             f"parameter has shape {tuple(local.shape)}")
        if not eight_bit:  # torch may have cast it to the parameter's dtype
            out[spec.name] = value.detach().float()
            continue
        value = value.detach().to(state_device(p, spec.name), torch.float32)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where} holds inf or NaN, which 8-bit state cannot hold; keep this "
                             "parameter in 32 bits (a group with state_bits=32)")
        if not spec.signed and bool((value < 0).any()):
            raise ValueError(f"{where} holds negative values, but it is an average of squares")
        codebook = get_codebook("dynamic", signed=spec.signed, device=value.device)
        q = quantize_blockwise(value, codebook=codebook, block_size=group["block_size"])
        codes = q.codes
        if not spec.signed:  # issue 17's rule (b): a positive value never decodes to 0
            zero = codebook.abs().argmin()
            codes = torch.where((codes == zero) & (value > 0), zero + 1, codes).to(torch.uint8)
        out[spec.codes], out[spec.absmax] = codes, q.absmax
    return out
