"""Shared set-up of the C++ extension tests (the ``TestExtension`` class of each tests/test_<op>.py)."""

from __future__ import annotations

import pytest
import torch

from llp_fast import _ext


def require_ext(*ops: str, device: str = "cpu"):
    """The loaded extension, or skip (with the reason) when it cannot be built or loaded here or
    registers no ``device`` kernel for one of ``ops``."""
    if _ext.disabled():
        pytest.skip("LLP_FAST_DISABLE_EXT=1")
    module = _ext.load()
    if module is None:
        pytest.skip("the C++ extension could not be built or loaded (see the RuntimeWarning)")
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    for op in ops:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"llp_fast::{op}", key):
            pytest.skip(f"the extension registers no {key} kernel for llp_fast::{op} (built without it)")
    return module


@pytest.fixture(params=[None, "8,16", "5,7"], ids=["default-tile", "tile-8x16", "tile-5x7"])
def cpu_tile(request, monkeypatch):
    """Runs a test with the CPU top-K's default tile and with small ones (LLP_FAST_CPU_TILE), so
    that small shapes cross tile edges."""
    if request.param is not None:
        monkeypatch.setenv("LLP_FAST_CPU_TILE", request.param)
    return request.param
