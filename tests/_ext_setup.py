"""Shared set-up of the C++ extension tests (the ``TestExtension`` class of each tests/test_<op>.py)."""

from __future__ import annotations

import os

import pytest
import torch

from llp_fast import _ext

REQUIRE_ENV = "LLP_FAST_REQUIRE_EXT"  # set (bench/run_gpu.py does): a missing kernel fails, not skips


def require_ext(*ops: str, device: str = "cpu"):
    """The loaded extension, or skip (with the reason) when it cannot be built or loaded here or
    registers no ``device`` kernel for one of ``ops``; with ``LLP_FAST_REQUIRE_EXT=1`` those fail
    (on a GPU machine a CUDA build that failed fell back to the CPU one with a warning, and its
    tests skipped: a green run that had never launched the kernel)."""
    give_up = pytest.fail if os.environ.get(REQUIRE_ENV) == "1" else pytest.skip
    if _ext.disabled():
        give_up("LLP_FAST_DISABLE_EXT=1")
    module = _ext.load()
    if module is None:
        give_up("the C++ extension could not be built or loaded (see the RuntimeWarning)")
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    for op in ops:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"llp_fast::{op}", key):
            give_up(f"the extension registers no {key} kernel for llp_fast::{op} (built without it)")
    return module


@pytest.fixture(params=[None, "8,16", "5,7"], ids=["default-tile", "tile-8x16", "tile-5x7"])
def cpu_tile(request, monkeypatch):
    """Runs a test with the CPU top-K's default tile and with small ones (LLP_FAST_CPU_TILE), so
    that small shapes cross tile edges."""
    if request.param is not None:
        monkeypatch.setenv("LLP_FAST_CPU_TILE", request.param)
    return request.param
