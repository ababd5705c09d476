"""Codebooks: fingerprints against bitsandbytes, invariants, thresholds and caching."""

import hashlib
from fractions import Fraction

import numpy as np
import pytest
import torch
from eightbit.quant import (
    CODEBOOK_NAMES,
    check_codebook,
    create_codebook,
    get_codebook,
    get_midpoints,
    midpoints,
)

# SHA-256 of the 256 little-endian float32 values of bitsandbytes 0.50.2's create_dynamic_map
# (signed=True / signed=False), as given in DESIGN.md.
BNB_DYNAMIC_SHA256_PREFIX = {True: "e732639a65f497b4", False: "305f002cc11278fb"}

ALL = [(name, signed) for name in CODEBOOK_NAMES for signed in (True, False)]


def sha256(cb: torch.Tensor) -> str:
    return hashlib.sha256(cb.numpy().astype("<f4").tobytes()).hexdigest()


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    assert sha256(create_codebook("dynamic", signed=signed)).startswith(
        BNB_DYNAMIC_SHA256_PREFIX[signed]
    )


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_structure(signed):
    # Dettmers et al. 2022: decade 10^(i-6) holds 2^i (signed) or 2^(i+1) (unsigned) values > 0.
    cb = create_codebook("dynamic", signed=signed).double()
    positive = cb[cb > 0]
    for i in range(6):
        in_decade = ((positive >= 10.0 ** (i - 6) * 0.1) & (positive < 10.0 ** (i - 5) * 0.1)).sum()
        assert in_decade == (2**i if signed else 2 ** (i + 1))
    if signed:
        assert cb.min().item() == pytest.approx(-0.99296875)
        assert (cb < 0).sum() == 127


@pytest.mark.parametrize("name,signed", ALL)
def test_invariants(name, signed):
    cb = create_codebook(name, signed=signed)
    check_codebook(cb)
    assert cb.dtype == torch.float32 and cb.shape == (256,)
    assert bool((cb[1:] > cb[:-1]).all())
    assert cb.max().item() == 1.0
    zero_index = 127 if signed else 0
    assert cb[zero_index].item() == 0.0
    assert cb.min().item() >= (-1.0 if signed else 0.0)


@pytest.mark.parametrize("name,signed", ALL)
def test_midpoints_are_exact_midpoints_rounded_down(name, signed):
    cb = create_codebook(name, signed=signed)
    t = midpoints(cb)
    for j in range(255):
        exact = (Fraction(cb[j].item()) + Fraction(cb[j + 1].item())) / 2
        tj = Fraction(t[j].item())
        assert tj <= exact
        above = Fraction(np.nextafter(np.float32(t[j].item()), np.float32(np.inf)).item())
        assert above > exact  # t_j is the largest fp32 value not above the exact midpoint


def test_normal_map_matches_normal_quantiles():
    from scipy.stats import norm

    cb = create_codebook("normal", signed=True).double()
    # The positive half are N(0,1) quantiles scaled by the largest one.
    top = norm.ppf(0.9677083)
    assert cb[-2].item() * top == pytest.approx(norm.ppf(0.9677083 - (0.9677083 - 0.5) / 128))


def test_get_codebook_is_cached_per_device():
    a = get_codebook("dynamic", signed=True)
    assert a is get_codebook("dynamic", signed=True, device="cpu")
    assert torch.equal(a, create_codebook("dynamic", signed=True))
    m = get_codebook("dynamic", signed=True, device="meta")
    assert m.device.type == "meta" and m is not a
    assert get_codebook("dynamic", signed=False) is not a
    assert torch.equal(
        get_midpoints("linear", signed=False), midpoints(create_codebook("linear", signed=False))
    )


def test_create_codebook_returns_a_fresh_copy():
    a = create_codebook()
    a[0] = 5.0
    assert create_codebook()[0].item() != 5.0
    assert get_codebook()[0].item() != 5.0


def test_unknown_codebook_name():
    with pytest.raises(ValueError, match="unknown codebook 'nf4'.*dynamic, linear, normal"):
        create_codebook("nf4")
    with pytest.raises(ValueError, match="unknown codebook"):
        get_codebook("nf4")


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.linspace(-1, 1, 256, dtype=torch.float64), "float32 tensor of 256"),
        (torch.linspace(-1, 1, 255), "float32 tensor of 256"),
        (torch.linspace(-1, 1, 256).flip(0), "strictly increasing"),
        (torch.cat([torch.zeros(2), torch.linspace(0.1, 1, 254)]), "strictly increasing"),
        (torch.cat([torch.linspace(-1, 1, 255), torch.tensor([float("inf")])]), "inf or NaN"),
    ],
)
def test_check_codebook_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        check_codebook(bad)


def test_check_codebook_rejects_non_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_codebook([0.0] * 256)
