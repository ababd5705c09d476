"""The state of sharded (DTensor) parameters: a layout that DCP can save and reshard.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards a parameter on dim 0 in ``torch.chunk``
pieces. Every state of a DTensor parameter is therefore a DTensor too, with the parameter's mesh
and placements, so that ``torch.distributed.checkpoint`` (DCP) saves each rank's piece at its
global offset and loads it into any other sharding:

- codes: the parameter's shape, sharded like it (one code per element: any resharding is exact).
- parameters with 2 or more dims: blocks tile each dim-0 *row* (a row is the product of the
  other dims; a row's last block may be partial), and absmax is a ``(rows, ceil(row / block))``
  DTensor sharded like the parameter. FSDP2's shard boundaries fall between rows, so they are
  always block boundaries: a checkpoint reshards N -> M bit for bit. When the row length is a
  multiple of ``block_size`` this is exactly the flat blocking of an unsharded parameter.
- 1-D parameters (sharded on elements): blocks lie on the parameter's global grid (block ``b``
  covers elements ``[b * block, (b + 1) * block)``), so a shard may start and end with part of a
  block, which then has one absmax per rank. In ``state_dict()`` their absmax is stored per
  element (each element's block absmax: 4 bytes per element, for 1-D parameters only), and
  loading keeps codes and absmax of every block whose elements share one saved absmax (bit for
  bit) and requantizes only blocks assembled from parts with different absmax.

Plain (non-DTensor) parameters keep the flat layout of :mod:`eightbit.quant` (unchanged).
Either layout loads into the other (a plain run's checkpoint under FSDP2 and back): blocks that
the two grids cut differently are requantized, all others keep their codes and absmax.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from ..quant import get_codebook, get_midpoints, num_blocks
from ..quant._torch import quantize_segment


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor, whose states get the layout of this module.

    torch.distributed.tensor is not imported here (it costs most of a second): where nothing has
    imported it, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor a rank holds: a DTensor's local shard, any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _row_length(p: torch.Tensor) -> int:
    return p[0].numel() if p.dim() >= 2 and p.shape[0] > 0 else max(1, p.numel())


def _check_placements(p) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for placement in p.placements:
        if not (isinstance(placement, Replicate) or placement == Shard(0)):
            raise NotImplementedError(
                f"8-bit state of a DTensor parameter placed as {p.placements} is not supported: "
                "only Shard(0) (FSDP2) and Replicate are. Give this parameter state_bits=32 "
                "(a param group option) to keep its state in fp32."
            )


def _wrap(p, local: torch.Tensor, shape: tuple[int, ...]):
    """``local`` as a DTensor of global ``shape`` on ``p``'s mesh with ``p``'s placements."""
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def _offset(p) -> int:
    """The global dim-0 index (the element of a 1-D DTensor, else the row) where this rank's
    shard starts."""
    from torch.distributed.tensor import Shard

    start, size = 0, p.shape[0]
    coordinate = p.device_mesh.get_coordinate() or [0] * p.device_mesh.ndim
    for placement, index, ranks in zip(p.placements, coordinate, p.device_mesh.shape,
                                       strict=True):
        if isinstance(placement, Shard):  # torch.chunk pieces, nested left to right
            chunk = -(-size // ranks)
            start += min(index * chunk, size)
            size = max(0, min(chunk, size - index * chunk))
    if size != p.to_local().shape[0]:
        raise RuntimeError(f"cannot locate this rank's shard of a DTensor placed as {p.placements}")
    return start


def _segments_1d(offset: int, n: int, block_size: int) -> list[tuple[int, int]]:
    """Local ``[start, end)`` pieces of a shard at global ``offset`` cut by the global grid."""
    head = min((-offset) % block_size, n)
    cuts = [0] + ([head] if 0 < head < n else []) + list(range(head or block_size, n, block_size))
    cuts = sorted(set(cuts)) + [n]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def absmax_shape(p: torch.Tensor, block_size: int) -> tuple[int, ...]:
    """The global shape of an 8-bit state's absmax for ``p`` as ``state_dict()`` holds it."""
    if not is_sharded(p):
        return absmax_shape_flat(p, block_size)
    return absmax_shape_sharded(p, block_size)


def absmax_shape_flat(p: torch.Tensor, block_size: int) -> tuple[int, ...]:
    """The absmax shape a plain run's state_dict holds for a parameter of ``p``'s shape."""
    return (num_blocks(p.numel(), block_size),)


def absmax_shape_sharded(p: torch.Tensor, block_size: int) -> tuple[int, ...]:
    """The absmax shape a sharded run's full state_dict holds for a parameter of ``p``'s shape."""
    if p.dim() >= 2:
        return (p.shape[0], num_blocks(_row_length(p), block_size))
    return tuple(p.shape) or (1,)


def fresh_state(p, spec, fill: float, dtype: torch.dtype, eight_bit: bool,
                block_size: int) -> dict[str, torch.Tensor]:
    """One state of a DTensor parameter (``spec``, an ``_base.StateSpec``): fp32 (under its
    name) or codes filled with ``fill`` + absmax (under ``spec.codes`` and ``spec.absmax``)."""
    local = p.to_local()
    if not eight_bit:
        return {spec.name: _wrap(p, torch.zeros(local.shape, dtype=dtype, device=local.device),
                                 p.shape)}
    _check_placements(p)
    codes = _wrap(p, torch.full(local.shape, fill, dtype=torch.uint8, device=local.device),
                  p.shape)
    if p.dim() >= 2:
        rows = local.shape[0]
        absmax = _wrap(p, torch.zeros(rows, num_blocks(_row_length(p), block_size),
                                      device=local.device), absmax_shape(p, block_size))
    else:  # kept local; state_dict() stores it per element (see portable_state)
        n = local.numel()
        absmax = torch.zeros(len(_segments_1d(_offset(p), n, block_size)) if n else 0,
                             device=local.device)
    return {spec.codes: codes, spec.absmax: absmax}


def step_views(p: torch.Tensor, state: dict, block_size: int) -> Iterator[tuple]:
    """``(param, grad, state)`` triples of local tensors that the functional rules update.

    A plain parameter is one triple of itself. A DTensor parameter gives its local shard, cut
    where its blocks need it: per row when a row is not a whole number of blocks, and at the
    global block grid for 1-D parameters; every piece's absmax is the matching slice.
    """
    if not is_sharded(p):
        yield local_tensor(p), local_tensor(p.grad), state
        return
    local, grad = p.to_local(), p.grad.to_local()
    st = {k: v.to_local() if is_sharded(v) else v for k, v in state.items()}
    absmax_keys = [k for k in st if k.endswith("_absmax")]
    if not absmax_keys:  # fp32 state
        yield local, grad, st
        return
    if not local.is_contiguous():
        raise RuntimeError("the local shard of a DTensor parameter must be contiguous")
    codes_keys = [k[: -len("absmax")] + "codes" for k in absmax_keys]
    row = _row_length(p)
    if p.dim() >= 2 and row % block_size == 0:
        yield local, grad, {**st, **{k: st[k].view(-1) for k in absmax_keys}}
        return
    if p.dim() >= 2:
        pieces = [(i * row, (i + 1) * row) for i in range(local.shape[0])]
        absmax_of = [slice(i, i + 1) for i in range(local.shape[0])]  # rows of a 2-D absmax
    else:
        pieces = _segments_1d(_offset(p), local.numel(), block_size)
        starts = [0]
        for a, b in pieces:
            starts.append(starts[-1] + num_blocks(b - a, block_size))
        absmax_of = [slice(s, e) for s, e in zip(starts[:-1], starts[1:], strict=True)]
    flat_p, flat_g = local.view(-1), grad.reshape(-1)
    for (a, b), blocks in zip(pieces, absmax_of, strict=True):
        view = {"step": st["step"]}
        for ck, ak in zip(codes_keys, absmax_keys, strict=True):
            view[ck] = st[ck].view(-1)[a:b]
            view[ak] = st[ak][blocks].view(-1)
        yield flat_p[a:b], flat_g[a:b], view


# -- checkpoints -------------------------------------------------------------------------------


def portable_state(p: torch.Tensor, state: dict, block_size: int) -> dict:
    """``state`` as ``state_dict()`` holds it: a 1-D DTensor's absmax becomes per element."""
    if not (is_sharded(p) and p.dim() < 2):
        return state
    keys = [k for k, v in state.items() if k.endswith("_absmax") and not is_sharded(v)]
    if not keys:
        return state
    local = p.to_local()
    pieces = _segments_1d(_offset(p), local.numel(), block_size)
    lengths = torch.tensor([b - a for a, b in pieces], dtype=torch.long, device=local.device)
    out = dict(state)
    for k in keys:
        per_element = state[k].repeat_interleave(lengths) if pieces else state[k][:0]
        out[k] = _wrap(p, per_element.view(local.shape), absmax_shape(p, block_size))
    return out


def restore_state(p: torch.Tensor, state: dict, block_size: int, specs) -> None:
    """Turn a loaded state (``portable_state``'s form, any sharding) into ``p``'s layout, in place.

    ``specs``: the optimizer's ``_base.StateSpec``s (their keys and codebook signs).
    """
    for key, value in list(state.items()):
        if key.endswith("_absmax") and _holds_flat_absmax(p, value, block_size):
            # a plain run's blocks cross this rank's bounds: keep them whole (they are small)
            state[key] = value.full_tensor() if is_sharded(value) else value
        elif key != "step" and is_sharded(p):
            if is_sharded(value):
                if value.placements != p.placements or value.device_mesh != p.device_mesh:
                    value = value.redistribute(p.device_mesh, p.placements)
            else:  # a full tensor (a full state_dict): keep this rank's piece
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            state[key] = value
        elif is_sharded(value):
            state[key] = value.full_tensor()
    for spec in specs:
        codes_key, absmax_key, is_signed = spec.codes, spec.absmax, spec.signed
        if absmax_key not in state:
            continue
        absmax = state[absmax_key]
        if is_sharded(p) and not is_sharded(absmax):  # a plain run's (kept whole above)
            state[absmax_key] = _sharded_absmax(p, state[codes_key], absmax, block_size,
                                                is_signed)
        elif is_sharded(p) and p.dim() < 2:  # per element -> the local pieces of the global grid
            codes, scales = state[codes_key].to_local(), absmax.to_local()
            pieces = _segments_1d(_offset(p), codes.numel(), block_size)
            state[absmax_key] = _blocks_from_scales(codes, scales, pieces, block_size, is_signed)
        elif not is_sharded(p) and absmax.shape != (num_blocks(p.numel(), block_size),):
            state[absmax_key] = _flat_absmax(p, state[codes_key], absmax, block_size, is_signed)


def _holds_flat_absmax(p, absmax: torch.Tensor, block_size: int) -> bool:
    """Whether a DTensor parameter's loaded ``absmax`` has a plain run's flat layout."""
    flat = absmax_shape_flat(p, block_size)
    return (is_sharded(p) and tuple(absmax.shape) == flat
            and flat != absmax_shape_sharded(p, block_size))


def _sharded_absmax(p, codes, flat_absmax: torch.Tensor, block_size: int,
                    signed: bool) -> torch.Tensor:
    """A plain run's whole flat absmax as this rank's absmax of ``p``'s layout; blocks whose
    elements the flat grid gave different absmax are requantized (``codes`` in place)."""
    local = codes.to_local()
    start = _offset(p) * (_row_length(p) if p.dim() >= 2 else 1)  # of the first local element
    index = torch.arange(start, start + local.numel(), device=flat_absmax.device) // block_size
    scales = flat_absmax[index]
    if p.dim() < 2:
        pieces = _segments_1d(_offset(p), local.numel(), block_size)
        return _blocks_from_scales(local, scales, pieces, block_size, signed)
    row, per_row = _row_length(p), num_blocks(_row_length(p), block_size)
    pieces = [(r + j * block_size, min(r + (j + 1) * block_size, r + row))
              for r in range(0, local.numel(), row) for j in range(per_row)]
    absmax = _blocks_from_scales(local, scales, pieces, block_size, signed)
    return _wrap(p, absmax.view(local.shape[0], per_row), absmax_shape(p, block_size))


def _blocks_from_scales(codes: torch.Tensor, scales: torch.Tensor, pieces, block_size: int,
                        signed: bool) -> torch.Tensor:
    """One absmax per piece from per-element ones; requantize ``codes`` where they differ."""
    flat_codes, flat_scales = codes.view(-1), scales.view(-1)
    if not pieces:
        return flat_scales[:0].clone()
    lengths = torch.tensor([b - a for a, b in pieces], device=scales.device)
    starts = torch.tensor([a for a, _ in pieces], device=scales.device)
    piece_of = torch.repeat_interleave(torch.arange(len(pieces), device=scales.device), lengths)
    absmax = flat_scales[starts].clone()
    # A piece keeps its codes and absmax when every element carries the first one's absmax.
    mixed = torch.zeros(len(pieces), dtype=torch.bool, device=scales.device)
    mixed.index_put_((piece_of,), flat_scales != absmax[piece_of], accumulate=True)
    # Parts of a block saved with different absmax (by different ranks, or on another run's
    # grid): dequantize, then quantize as one block. Batches of blocks padded with zeros (which
    # change no absmax or code) of at most 2**20 elements: one call each, bounded memory.
    codebook = get_codebook("dynamic", signed=signed, device=scales.device)
    mids = get_midpoints("dynamic", signed=signed, device=scales.device)
    column = torch.arange(block_size, device=scales.device)
    for batch in torch.nonzero(mixed).view(-1).split(max(1, 2**20 // block_size)):
        real = column < lengths[batch, None]
        where = (starts[batch, None] + column)[real]
        values = torch.zeros(len(batch), block_size, device=scales.device)
        values[real] = codebook[flat_codes[where].long()] * flat_scales[where]
        new_codes, new_absmax = quantize_segment(values.view(-1), mids, block_size)
        new_codes = new_codes.view(len(batch), block_size)[real]
        if not signed:  # issue 17 rule (b): a positive second moment never decodes to 0
            new_codes[(values[real] > 0) & (new_codes == 0)] = 1
        flat_codes[where] = new_codes
        absmax[batch] = new_absmax
    return absmax


def _flat_absmax(p, codes, absmax, block_size, signed) -> torch.Tensor:
    """A sharded layout's absmax (per row, or per element for 1-D) for a plain parameter."""
    n = p.numel()
    if p.dim() >= 2 and absmax.shape == (p.shape[0], num_blocks(_row_length(p), block_size)):
        if _row_length(p) % block_size == 0:
            return absmax.reshape(-1).clone()  # the row blocks are the flat blocks
        lengths = [min(block_size, _row_length(p) - j * block_size)
                   for j in range(absmax.shape[1])] * p.shape[0]
        scales = absmax.reshape(-1).repeat_interleave(torch.tensor(lengths, device=absmax.device))
    elif absmax.shape == (n,) or (p.dim() == 0 and absmax.shape == (1,)):
        scales = absmax.reshape(-1)
    else:
        raise ValueError(
            f"an absmax of shape {tuple(absmax.shape)} fits neither the flat layout nor a sharded "
            f"layout of a parameter of shape {tuple(p.shape)} at block_size {block_size}"
        )
    pieces = [(a, min(a + block_size, n)) for a in range(0, n, block_size)]
    return _blocks_from_scales(codes, scales, pieces, block_size, signed)
