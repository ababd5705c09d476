"""Shared pytest setup: the `gpu` marker skips where no CUDA device (or no CuPy) is present;
the CPU kernels split work into parts of fewer elements than they do for users."""

import pytest
import torch


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install eightbit[cuda13])"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _small_cpu_parts(monkeypatch):
    # quant._native.GRAIN (the fewest elements per part) is sized for speed; tests use test-sized
    # tensors, and must still cover calls cut into several parts on several threads. Results do
    # not depend on the cut (tests/quant/test_native.py checks the rule with the shipped value).
    from eightbit.quant import _native

    monkeypatch.setattr(_native, "GRAIN", 8192)
