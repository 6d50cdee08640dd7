import os
import random

import numpy as np
import pytest
import torch

import llp_fast.reference as reference


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds; inputs are still fresh random draws."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["default", "tiny"])
def tiles(request, monkeypatch):
    """Runs a test with the default tile budget and with tiles of a few hundred elements,
    so that the chunked loops cross many row and column boundaries."""
    if request.param == "tiny":
        monkeypatch.setenv("LLP_FAST_CHUNK_MB", "0.002")
    else:
        monkeypatch.delenv("LLP_FAST_CHUNK_MB", raising=False)
    assert reference.tile_shape(10**6, 10**6)[1] > 0
    return request.param


def unit(n: int, d: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """n random unit vectors in R^d."""
    return torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(device=device, dtype=dtype)


def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("LLP_FAST_NO_CUDA") != "1"
