"""kernels/local_density.py against llp_fast.reference.local_density_ref (docs/method.md §1.1)."""

from __future__ import annotations

import pytest
import torch
from _triton_setup import DEVICE, HAS_CUDA, INTERPRET, kernels, unit_rows

from llp_fast.reference import local_density_ref

pytestmark = pytest.mark.triton

TAU = 0.07
# fp32 scores carry ~1e-6 relative rounding from the dot's summation order (x 1/tau); on
# the GPU the kernel and the cuBLAS reference sum in different orders.
TOL = dict(rtol=1e-5, atol=3e-5)


def make_inputs(m, n, d, dtype, *, pool_fraction=None, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    labeled = unit_rows(m, d, dtype, device, gen=g)
    bank = unit_rows(n, d, dtype, device, gen=g)
    mask = None
    if pool_fraction is not None:
        mask = (torch.rand(n, generator=g) < pool_fraction).to(device)
    return labeled, bank, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "m,n,d,t,pool,splits",
    [
        (1, 23, 7, 23, None, None),  # one row, T = pool size = N
        (37, 61, 33, 5, 0.6, None),  # pool mask, odd sizes
        (21, 70, 40, 25, None, 3),  # split-and-merge path
        (30, 50, 24, None, 0.5, None),  # T = pool size under a mask
    ],
)
def test_local_density_matches_reference(dtype, m, n, d, t, pool, splits):
    labeled, bank, mask = make_inputs(m, n, d, dtype, pool_fraction=pool, seed=m * 100 + n)
    if t is None:
        t = int(mask.sum())
    out = kernels.local_density_triton(labeled, bank, t, TAU, mask, splits=splits)
    ref = local_density_ref(labeled, bank, t, TAU, mask)
    assert out.dtype == torch.float32 and out.shape == (m,)
    # log-sum-exp of the top T is continuous in the scores: ties at the T-th place cannot move it.
    torch.testing.assert_close(out, ref.float(), **TOL)


def test_local_density_t64_split_with_sparse_mask():
    """The largest buffer, splits holding fewer than T pool rows (their slots stay -inf)."""
    labeled, bank, mask = make_inputs(10, 70, 16, torch.float32, pool_fraction=0.95, seed=2)
    t = min(64, int(mask.sum()))
    out = kernels.local_density_triton(labeled, bank, t, TAU, mask, splits=4)
    torch.testing.assert_close(out, local_density_ref(labeled, bank, t, TAU, mask).float(), **TOL)


def test_local_density_gpu_tile_shape():
    """The GPU heuristic's 128 x 64 tiles with T = 25."""
    labeled, bank, mask = make_inputs(40, 150, 40, torch.bfloat16, pool_fraction=0.8, seed=6)
    out = kernels.local_density_triton(labeled, bank, 25, TAU, mask, block_m=128, block_n=64)
    torch.testing.assert_close(out, local_density_ref(labeled, bank, 25, TAU, mask).float(), **TOL)


def test_local_density_mask_is_read_in_place():
    """A mask selecting a single row: log_rho is exactly that row's score."""
    labeled, bank, _ = make_inputs(5, 40, 12, torch.float32, seed=4)
    mask = torch.zeros(40, dtype=torch.bool, device=DEVICE)
    mask[17] = True
    out = kernels.local_density_triton(labeled, bank, 1, TAU, mask)
    torch.testing.assert_close(out, (labeled @ bank[17]) / TAU, **TOL)


def test_local_density_declines():
    labeled, bank, _ = make_inputs(4, 80, 8, torch.float32)
    assert kernels.local_density_triton(labeled, bank, 65, TAU, None) is NotImplemented
    assert kernels.local_density_triton(labeled.double(), bank.double(), 3, TAU, None) is NotImplemented


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_local_density_cuda_realistic(dtype):
    import llp_fast

    labeled, bank, mask = make_inputs(8192, 120_000, 128, dtype, pool_fraction=0.9, seed=12, device="cuda")
    out = llp_fast.local_density(labeled, bank, t=25, tau=TAU, pool_mask=mask)
    ref = local_density_ref(labeled, bank, 25, TAU, mask)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-4)
