"""Codebooks: the 256 fp32 values an 8-bit code can stand for.

Every codebook here is a 1-D float32 tensor of 256 strictly increasing values in [-1, 1].
A code ``c`` stands for ``codebook[c] * absmax`` of its block (see :mod:`eightbit.quant.blockwise`).

Three families:

* ``"dynamic"`` — the dynamic tree map of Dettmers et al., "8-bit Optimizers via Block-wise
  Quantization" (ICLR 2022, arXiv:2110.02861, section 2.2 and appendix). Seven decades from
  1e-6 to 1, each holding twice as many linearly spaced values as the one below, so small
  magnitudes keep relative precision. Built value for value like bitsandbytes'
  ``create_dynamic_map`` (float32 linspace midpoints times a power of ten).
* ``"linear"`` — evenly spaced values (k / 128 signed, k / 255 unsigned).
* ``"normal"`` — quantiles of N(0, 1), normalised to [-1, 1], like the NF4 data type of
  Dettmers et al., "QLoRA" (arXiv:2305.14314, section 3), extended to 256 levels.

Signed codebooks hold 0 at index 127 and +1.0 at index 255 (no -1.0); unsigned ones hold 0 at
index 0 and 1.0 at index 255, for states that are never negative (Adam's second moment).
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "CODEBOOK_NAMES",
    "check_codebook",
    "create_codebook",
    "get_codebook",
    "get_midpoints",
    "midpoints",
]

CODEBOOK_NAMES = ("dynamic", "linear", "normal")
NUM_CODES = 256

# Tail mass cut off by the normal map: bitsandbytes' create_normal_map default (QLoRA, NF4),
# chosen there so that the largest quantile lands close to the data's absmax.
_NORMAL_OFFSET = 0.9677083


def _dynamic(signed: bool) -> torch.Tensor:
    # Dynamic tree map (arXiv:2110.02861): decade i = 0..6 holds the k midpoints of
    # linspace(0.1, 1, k + 1), scaled by 10^(i - 6); k = 2^i signed, 2^(i+1) unsigned.
    # The arithmetic is float32 torch arithmetic in the same order as bitsandbytes'
    # create_dynamic_map, which makes the two maps equal value for value.
    values = [0.0, 1.0]
    for i in range(7):
        k = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, k + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-6 + i)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _linear(signed: bool) -> torch.Tensor:
    if signed:
        # -127/128 ... 128/128: zero at index 127 and +1.0 at index 255, as in the dynamic map.
        return torch.arange(-127, 129, dtype=torch.float64).div(128).float()
    return torch.arange(0, 256, dtype=torch.float64).div(255).float()


def _normal(signed: bool) -> torch.Tensor:
    from scipy.stats import norm  # imported here: scipy costs ~0.2 s and is needed only for this

    if signed:
        positive = norm.ppf(torch.linspace(_NORMAL_OFFSET, 0.5, 129, dtype=torch.float64)[:-1])
        negative = -norm.ppf(torch.linspace(_NORMAL_OFFSET, 0.5, 128, dtype=torch.float64)[:-1])
        values = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float64)
    else:
        levels = torch.linspace(0.5, _NORMAL_OFFSET, 256, dtype=torch.float64)
        values = torch.tensor(norm.ppf(levels))
        values[0] = 0.0  # ppf(0.5) is 0 up to rounding; make it exact
    return (values / values.abs().max()).float()


_BUILDERS = {"dynamic": _dynamic, "linear": _linear, "normal": _normal}


def create_codebook(name: str = "dynamic", *, signed: bool = True) -> torch.Tensor:
    r"""Build a fresh 256-entry float32 codebook on the CPU.

    Args:
        name: ``"dynamic"`` (dynamic tree map, the optimizers' choice), ``"linear"`` or
            ``"normal"`` (quantiles of N(0, 1)).
        signed: ``True`` for values in [-1, 1]; ``False`` for [0, 1] (non-negative data).

    Returns:
        A new ``torch.float32`` tensor of 256 strictly increasing values; ``max == 1.0``.

    Example:
        >>> cb = create_codebook("dynamic", signed=True)
        >>> cb.shape, cb[127].item(), cb[255].item()
        (torch.Size([256]), 0.0, 1.0)
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown codebook {name!r}; choose one of {', '.join(CODEBOOK_NAMES)}")
    return _BUILDERS[name](bool(signed))


def _cache_key(name: str, signed: bool, device: torch.device | str) -> tuple:
    """``(name, signed, device)`` checked and normalised (``"cuda"`` -> the current CUDA device)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown codebook {name!r}; choose one of {', '.join(CODEBOOK_NAMES)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return name, bool(signed), device


@functools.lru_cache(maxsize=64)
def _cached(name: str, signed: bool, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return create_codebook(name, signed=signed)
    return _cached(name, signed, torch.device("cpu")).to(device)


def get_codebook(
    name: str = "dynamic", *, signed: bool = True, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The shared, cached codebook ``name`` on ``device`` (built once per device and process).

    The cache is keyed by ``(name, signed, device)``, so a codebook never crosses devices. The
    returned tensor is shared: treat it as read-only (use :func:`create_codebook` for a copy).

    Example:
        >>> get_codebook("dynamic", signed=False)[0].item()
        0.0
    """
    return _cached(*_cache_key(name, signed, device))


def midpoints(codebook: torch.Tensor) -> torch.Tensor:
    r"""The 255 decision thresholds of ``codebook``: every backend's one nearest-code table.

    ``t_j`` is the exact midpoint :math:`(c_j + c_{j+1}) / 2` rounded *down* to fp32. For any
    fp32 value ``y``, :math:`t_j < y` holds exactly when the exact midpoint is below ``y``, so

    .. math:: q(y) = \#\{ j : t_j < y \}

    is the index of the nearest codebook value, a tie going to the lower index, using fp32
    comparisons only. (Midpoints computed in fp32 round to nearest and get about a quarter of
    the dynamic map's thresholds wrong by one ulp.) The sum is exact in fp64 whenever
    neighbouring values are within a factor 2^29 of each other or one of them is 0, which holds
    for every codebook of :func:`create_codebook`.

    Example:
        >>> t = midpoints(create_codebook("linear", signed=True))
        >>> t.shape, t[127].item() == 0.5 / 128
        (torch.Size([255]), True)
    """
    wide = codebook.double()
    exact = (wide[:-1] + wide[1:]) * 0.5
    nearest = exact.float()
    return torch.where(
        nearest.double() > exact, torch.nextafter(nearest, torch.full_like(nearest, -1.0)), nearest
    )


@functools.lru_cache(maxsize=64)
def _cached_midpoints(name: str, signed: bool, device: torch.device) -> torch.Tensor:
    return midpoints(_cached(name, signed, torch.device("cpu"))).to(device)


def get_midpoints(
    name: str = "dynamic", *, signed: bool = True, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The cached :func:`midpoints` of ``get_codebook(name, signed=signed, device=device)``."""
    return _cached_midpoints(*_cache_key(name, signed, device))


def check_codebook(codebook: torch.Tensor, *, check_values: bool = True) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``codebook`` is 256 increasing fp32 values.

    ``check_values=False`` checks only dtype and shape (no device synchronisation).
    """
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if codebook.dtype != torch.float32 or codebook.shape != (NUM_CODES,):
        raise ValueError(
            f"codebook must be a 1-D float32 tensor of {NUM_CODES} values, got dtype "
            f"{codebook.dtype} and shape {tuple(codebook.shape)}; build one with "
            "eightbit.quant.create_codebook()"
        )
    if check_values:
        if not bool(torch.isfinite(codebook).all()):
            raise ValueError("codebook holds inf or NaN; every code must stand for a finite value")
        if not bool((codebook[1:] > codebook[:-1]).all()):
            raise ValueError(
                "codebook values must be strictly increasing (sort them, and drop duplicates)"
            )
