r"""Blockwise absmax quantization to 8-bit codes.

A tensor ``x`` of ``n`` elements is flattened and cut into blocks of ``block_size`` elements (the
last block may be partial). For block ``b`` and element ``i`` in it:

.. math::

    a_b = \max_{i \in b} |x_i| \quad(\text{fp32}), \qquad
    y_i = x_i / a_b \quad(\text{IEEE fp32 division}), \qquad
    q_i = \#\{\, j : t_j < y_i \,\}

with ``t_j`` the exact midpoint of codebook values ``c_j`` and ``c_{j+1}`` rounded down to fp32
(:func:`~eightbit.quant.codebook.midpoints`), so ``q_i`` is exactly the index of the codebook
value nearest to ``y_i``, a tie going to the lower index.
Dequantization is :math:`\hat x_i = c_{q_i} \, a_b`. This is block-wise quantization as in
Dettmers et al. 2022 (arXiv:2110.02861, section 2.1); the block bounds the effect of an outlier to
its own ``block_size`` elements.

Special blocks: a block of zeros gets ``a_b = 0`` and the code of zero, and dequantizes to exact
zeros. A block holding inf or NaN gets ``a_b = NaN`` and dequantizes to NaN throughout: non-finite
data is never turned into finite-looking values (and quantizing never synchronises the device to
check for it).

Backends: CUDA tensors use the CuPy kernels of :mod:`eightbit.quant.cuda`, CPU tensors the fused
numba kernels (:mod:`eightbit.quant._native`) when numba imports, every other device the torch
path (:mod:`eightbit.quant._torch`). All give identical codes and absmax.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _torch
from .codebook import check_codebook, get_codebook

__all__ = [
    "FLOAT_DTYPES",
    "QuantizedTensor",
    "check_block_size",
    "dequantize_blockwise",
    "num_blocks",
    "quantize_blockwise",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 64, 4096
# A non-contiguous input is quantized in block-aligned chunks of this many elements, each copied
# contiguous on its own (16 MiB of fp32), so the copy never grows with the tensor.
COPY_CHUNK_ELEMENTS = 1 << 22


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` if it is a power of two in [64, 4096], else raise ``ValueError``."""
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block_size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} "
            f"(64, 128, ..., 4096), got {block_size!r}"
        )
    return block_size


def num_blocks(numel: int, block_size: int) -> int:
    """``ceil(numel / block_size)``: the length of the absmax vector."""
    return -(-numel // block_size)


def _check_input(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        kind = (
            "complex"
            if x.is_complex()
            else "boolean"
            if x.dtype == torch.bool
            else "integer"
            if not x.is_floating_point()
            else "unsupported floating"
        )
        raise TypeError(
            f"{what} has {kind} dtype {x.dtype}; blockwise quantization takes float32, float16 or "
            f"bfloat16 tensors (convert with {what}.float())"
        )


def _backend(device: torch.device):
    # The one dispatch point of the quantization layer.
    if device.type == "cuda":
        from . import cuda

        return cuda
    if device.type == "cpu":
        from . import _native  # the fused numba kernels when numba is installed

        if _native.kernels() is not None:
            return _native
    return _torch


@dataclasses.dataclass(eq=False)
class QuantizedTensor:
    """The result of :func:`quantize_blockwise`: codes, per-block absmax and how to undo them.

    Attributes:
        codes: ``uint8`` tensor of the original shape.
        absmax: ``float32`` tensor of ``ceil(numel / block_size)`` block scales.
        codebook: the 256 ``float32`` values the codes index.
        block_size: elements per block.
        dtype: the dtype :meth:`dequantize` returns by default (the input's).

    Example:
        >>> x = torch.randn(1000)
        >>> q = quantize_blockwise(x, block_size=256)
        >>> q.codes.dtype, q.absmax.shape, q.nbytes
        (torch.uint8, torch.Size([4]), 2040)
        >>> bool((q.dequantize() - x).abs().max() < 0.05)
        True
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    codebook: torch.Tensor
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        _check_parts(self.codes, self.absmax, self.codebook, self.block_size)
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of codes and absmax (the codebook is shared and not counted)."""
        return self.codes.numel() + 4 * self.absmax.numel()

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"block_size={self.block_size}, device={self.device}, nbytes={self.nbytes})"
        )

    def dequantize(
        self, *, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Same as ``dequantize_blockwise(self, dtype=dtype, out=out)``."""
        return dequantize_blockwise(self, dtype=dtype, out=out)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy on ``device`` (codes, absmax and codebook move together; values are unchanged)."""
        return dataclasses.replace(
            self,
            codes=self.codes.to(device),
            absmax=self.absmax.to(device),
            codebook=self.codebook.to(device),
        )

    def to_dict(self) -> dict:
        """Plain tensors and values: safe for ``torch.load(weights_only=True)``."""
        return {
            "codes": self.codes,
            "absmax": self.absmax,
            "codebook": self.codebook,
            "block_size": self.block_size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_dict(cls, state: dict) -> QuantizedTensor:
        """Rebuild from :meth:`to_dict` output; ``ValueError``/``TypeError`` for missing,
        mismatched or impossible parts (a codebook that is not 256 increasing finite values, a
        negative absmax; NaN is what a block holding inf or NaN gets, so it is kept)."""
        if not isinstance(state, dict):
            raise TypeError(f"a quantized tensor dict must be a dict, got {type(state).__name__}")
        missing = {"codes", "absmax", "codebook", "block_size", "dtype"} - set(state)
        if missing:
            raise ValueError(f"quantized tensor dict is missing {sorted(missing)}")
        dtype = state["dtype"]
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"quantized tensor dict has unknown dtype {state['dtype']!r}")
        q = cls(state["codes"], state["absmax"], state["codebook"], state["block_size"], dtype)
        if q.codebook.device.type != "meta":
            check_codebook(q.codebook)
        if q.absmax.device.type != "meta" and bool((q.absmax < 0).any()):
            raise ValueError("quantized tensor dict has a negative absmax (a block's largest "
                             "magnitude is >= 0): the data is corrupt")
        return q


def _memory(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[first, last)`` that ``t``'s elements span (a strided view's span)."""
    first = t.data_ptr()
    reach = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return first, first + (reach + 1) * t.element_size()


def _check_no_overlap(out: torch.Tensor, out_name: str, inputs: dict[str, torch.Tensor]) -> None:
    """An ``out`` buffer must not share memory with an input: the kernels read and write in
    parallel and assume their arrays are distinct (and the result would depend on the order)."""
    if out.numel() == 0:
        return
    start, end = _memory(out)
    for name, t in inputs.items():
        if t.device != out.device or t.numel() == 0:
            continue
        t_start, t_end = _memory(t)
        if start < t_end and t_start < end:
            raise ValueError(
                f"{out_name} shares memory with {name}; pass an {out_name} buffer of its own "
                "(e.g. a fresh torch.empty_like)"
            )


def _check_parts(
    codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, block_size: int
) -> None:
    check_block_size(block_size)
    check_codebook(codebook, check_values=False)
    for name, t in (("codes", codes), ("absmax", absmax), ("codebook", codebook)):
        if isinstance(t, torch.Tensor) and t.layout != torch.strided:
            raise TypeError(f"{name} has layout {t.layout}; pass a dense tensor (.to_dense())")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise TypeError(
            f"absmax must be a 1-D float32 tensor, got {getattr(absmax, 'dtype', type(absmax))} "
            f"with shape {tuple(getattr(absmax, 'shape', ()))}"
        )
    expected = num_blocks(codes.numel(), block_size)
    if absmax.numel() != expected:
        raise ValueError(
            f"absmax has {absmax.numel()} blocks but {codes.numel()} codes at block_size "
            f"{block_size} need {expected}; codes, absmax and block_size must come from the same "
            "quantize_blockwise call"
        )
    if not (codes.device == absmax.device == codebook.device):
        raise ValueError(
            f"codes ({codes.device}), absmax ({absmax.device}) and codebook ({codebook.device}) "
            "must be on one device; move them with .to(device)"
        )


def _resolve_codebook(codebook: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if codebook is None:
        return get_codebook("dynamic", signed=True, device=device)
    check_codebook(codebook, check_values=False)
    if codebook.device != device:
        raise ValueError(
            f"codebook is on {codebook.device} but the data is on {device}; "
            f"pass codebook.to({str(device)!r})"
        )
    # A user's codebook is checked in full; on an accelerator that costs one synchronisation,
    # which is why the optimizers use the cached codebooks of get_codebook instead.
    check_codebook(codebook)
    return _plain(codebook)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """What the backends take: no autograd history (the CPU kernels read numpy views, which a
    tensor requiring grad refuses) and contiguous memory (a copy only for a strided view)."""
    return t.detach().contiguous()


def _flat_segment(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``x.reshape(-1)[start:end]`` as a contiguous tensor, copying O(end - start) elements of
    ``x`` (``reshape`` would copy all of a non-contiguous ``x``).

    The range covers whole rows of dim 0 plus a partial one at each end: when a row is no longer
    than the range, the rows it touches are copied together (at most three times the range);
    a longer row is cut the same way one dimension down.
    """
    if x.is_contiguous():
        return x.view(-1)[start:end]
    if x.dim() == 1:
        return x[start:end].contiguous()
    row = x[0].numel()
    first, last = start // row, -(-end // row)
    if row <= end - start:
        return x[first:last].contiguous().view(-1)[start - first * row : end - first * row]
    return torch.cat([
        _flat_segment(x[r], max(start, r * row) - r * row, min(end, (r + 1) * row) - r * row)
        for r in range(first, last)
    ])


def quantize_blockwise(
    x: torch.Tensor,
    *,
    codebook: torch.Tensor | None = None,
    block_size: int = 256,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedTensor:
    r"""Quantize ``x`` to 8-bit codes with one fp32 absmax per block of ``block_size`` elements.

    See the module docstring for the math. Works on any shape (flattened in row-major order,
    non-contiguous views included), any size (0 and 1 too) and float32, float16 or bfloat16.

    Args:
        x: the tensor to quantize.
        codebook: 256 strictly increasing float32 values on ``x``'s device; default the signed
            dynamic map (``get_codebook("dynamic", signed=True)``). Use the unsigned map for data
            that is never negative: it has twice the resolution there.
        block_size: power of two from 64 to 4096.
        out: optional ``(codes, absmax)`` buffers to fill: uint8 of ``x``'s shape (contiguous) and
            float32 of ``ceil(x.numel() / block_size)`` elements, on ``x``'s device.

    Returns:
        A :class:`QuantizedTensor`; its ``codes``/``absmax`` are the ``out`` buffers when given.

    Example:
        >>> x = torch.randn(4, 300)
        >>> q = quantize_blockwise(x, block_size=64)
        >>> q.codes.shape, q.absmax.shape
        (torch.Size([4, 300]), torch.Size([19]))
        >>> y = dequantize_blockwise(q)   # float32, shape (4, 300)
    """
    _check_input(x)
    check_block_size(block_size)
    codebook = _resolve_codebook(codebook, x.device)
    if out is None:
        codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        nb = num_blocks(x.numel(), block_size)
        absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    else:
        codes, absmax = out
        _check_parts(codes, absmax, codebook, block_size)
        if codes.shape != x.shape or not codes.is_contiguous():
            raise ValueError(
                f"out codes must be a contiguous uint8 tensor of x's shape {tuple(x.shape)}, "
                f"got shape {tuple(codes.shape)}"
            )
        if not absmax.is_contiguous():
            raise ValueError("out absmax must be contiguous (a fresh torch.empty(n_blocks))")
        _check_no_overlap(codes, "out codes", {"x": x, "out absmax": absmax})
        _check_no_overlap(absmax, "out absmax", {"x": x})
    backend, values = _backend(x.device), x.detach()
    if values.is_contiguous():
        if values.numel():
            backend.quantize(values, codes, absmax, codebook, block_size)
    else:  # chunk by chunk, so no contiguous copy of the whole tensor is made
        flat_codes = codes.view(-1)
        for start, end in _torch.chunks(values.numel(), block_size, COPY_CHUNK_ELEMENTS):
            first = start // block_size
            backend.quantize(_flat_segment(values, start, end), flat_codes[start:end],
                             absmax[first : first + num_blocks(end - start, block_size)],
                             codebook, block_size)
    return QuantizedTensor(codes, absmax, codebook, block_size, x.dtype)


def dequantize_blockwise(
    q: QuantizedTensor | torch.Tensor,
    absmax: torch.Tensor | None = None,
    *,
    codebook: torch.Tensor | None = None,
    block_size: int | None = None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Dequantize: :math:`\hat x_i = c_{q_i} a_b`, computed in fp32 and returned in ``dtype``.

    Call it with a :class:`QuantizedTensor`, or with raw ``codes`` and ``absmax`` (then
    ``codebook`` defaults to the signed dynamic map, ``block_size`` to 256 and ``dtype`` to
    float32).

    Args:
        q: a :class:`QuantizedTensor`, or the uint8 codes.
        absmax: the float32 block scales when ``q`` is raw codes.
        codebook, block_size: how the codes were made (raw codes only).
        dtype: float32, float16 or bfloat16; default the original dtype.
        out: optional contiguous tensor of the codes' shape to write into (its dtype wins).

    Example:
        >>> q = quantize_blockwise(torch.linspace(-1, 1, 512))
        >>> x = dequantize_blockwise(q.codes, q.absmax, block_size=256)
        >>> x.dtype, x.shape
        (torch.float32, torch.Size([512]))
    """
    if isinstance(q, QuantizedTensor):
        if absmax is not None or codebook is not None or block_size is not None:
            raise TypeError(
                "pass either a QuantizedTensor or codes with absmax/codebook/block_size, not both"
            )
        codes, absmax, codebook, block_size = q.codes, q.absmax, q.codebook, q.block_size
        dtype = dtype or q.dtype
    else:
        codes = q
        if absmax is None:
            raise TypeError("dequantize_blockwise(codes, absmax, ...) needs absmax with raw codes")
        block_size = 256 if block_size is None else block_size
        dtype = dtype or torch.float32
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes must be a uint8 tensor, got {type(codes).__name__}")
        codebook = _resolve_codebook(codebook, codes.device)
        _check_parts(codes, absmax, codebook, block_size)
    if out is None:
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    else:
        _check_input(out, "out")
        if out.shape != codes.shape or not out.is_contiguous() or out.device != codes.device:
            raise ValueError(
                f"out must be a contiguous tensor of shape {tuple(codes.shape)} on {codes.device}, "
                f"got shape {tuple(out.shape)} on {out.device}"
            )
        _check_no_overlap(out, "out", {"codes": codes, "absmax": absmax})
    if codes.numel():
        _backend(codes.device).dequantize(_plain(codes), _plain(absmax), _plain(codebook),
                                          block_size, out.detach())
    return out
