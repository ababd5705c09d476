"""Brute-force reference for blockwise quantization (numpy, independent of the package's code)."""

import numpy as np
import torch


def nearest_codes(y: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook value for each fp32 ``y`` (argmin over all 256; ties -> lower).

    Distances are taken in float64, where the difference of two fp32 values in [-1, 1] is exact
    unless one is 2^29 times smaller than the other (then the nearest value is not in doubt).
    """
    out = np.empty(y.shape, dtype=np.uint8)
    cb = codebook.astype(np.float64)
    for start in range(0, y.size, 1 << 16):
        part = y[start : start + (1 << 16)].astype(np.float64)
        out[start : start + part.size] = np.argmin(np.abs(part[:, None] - cb[None, :]), axis=1)
    return out


def quantize(x: torch.Tensor, codebook: torch.Tensor, block_size: int):
    """Reference codes (uint8, flat) and absmax (fp32) for ``x`` (DESIGN.md's numerics contract)."""
    flat = x.detach().reshape(-1).float().numpy()
    cb = codebook.numpy()
    zero_code = nearest_codes(np.zeros(1, np.float32), cb)[0]
    n = flat.size
    nb = -(-n // block_size)
    codes = np.empty(n, np.uint8)
    absmax = np.empty(nb, np.float32)
    for b in range(nb):
        block = flat[b * block_size : (b + 1) * block_size]
        a = np.float32(np.max(np.abs(block)))
        sl = slice(b * block_size, b * block_size + block.size)
        if not np.isfinite(a) or np.isnan(block).any():
            absmax[b], codes[sl] = np.nan, zero_code
        elif a == 0:
            absmax[b], codes[sl] = 0.0, zero_code
        else:
            absmax[b] = a
            codes[sl] = nearest_codes(np.divide(block, a, dtype=np.float32), cb)
    return torch.from_numpy(codes), torch.from_numpy(absmax)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, block_size: int):
    """Reference fp32 values ``codebook[code] * absmax[block]``, flat."""
    values = codebook.numpy()[codes.reshape(-1).numpy()]
    scales = np.repeat(absmax.numpy(), block_size)[: values.size]
    return torch.from_numpy((values * scales).astype(np.float32))
