"""llp_fast.local_density (docs/method.md §1.1): the public op and its reference against the
float64 brute force, the C++ extension's kernel (``TestExtension``) and the Triton kernel
(``TestTriton``, under TRITON_INTERPRET=1 on CPU) against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _ext_setup import cpu_tile, require_ext  # noqa: F401 (cpu_tile is a fixture)
from _triton_setup import DEVICE, cuda_only, kernels, triton_tests, unit_rows
from brute import local_density as brute_density
from conftest import unit

import llp_fast
from llp_fast.reference import local_density_ref

# Native kernels run on odd shapes here: a crash fails this module's tests, not the whole run.
pytestmark = pytest.mark.isolated

SHAPES = [  # (M, N, D, t)
    (1, 1, 1, 1),
    (1, 9, 4, 9),  # t = pool size
    (11, 40, 17, 5),
    (30, 97, 33, 25),
    (64, 70, 128, 3),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_local_density_matches_brute_force(shape, dtype, impl, tiles):
    m, n, d, t = shape
    labeled, bank = unit(m, d, dtype), unit(n, d, dtype)
    if impl == "op":
        got = llp_fast.local_density(labeled, bank, t=t, tau=0.07)
    else:
        got = local_density_ref(labeled, bank, t, 0.07)
    assert got.dtype == torch.float32 and got.shape == (m,)
    np.testing.assert_allclose(got.numpy(), brute_density(labeled, bank, t, 0.07), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau", [0.07, 0.5])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_pool_mask_selects_the_pool(tau, impl, tiles):
    labeled, bank = unit(12, 10), unit(50, 10)
    mask = torch.rand(50) < 0.4
    t = min(7, int(mask.sum()))
    if impl == "op":
        got = llp_fast.local_density(labeled, bank, t=t, tau=tau, pool_mask=mask)
    else:
        got = local_density_ref(labeled, bank, t, tau, mask)
    np.testing.assert_allclose(got.numpy(), brute_density(labeled, bank, t, tau, mask.tolist()), rtol=1e-5, atol=1e-5)
    # The mask is the same as passing the pool rows themselves.
    torch.testing.assert_close(got, llp_fast.local_density(labeled, bank[mask], t=t, tau=tau))


def test_t_equal_to_masked_pool_size():
    labeled, bank = unit(5, 6), unit(20, 6)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[3, 8, 15]] = True
    got = llp_fast.local_density(labeled, bank, t=3, pool_mask=mask)
    np.testing.assert_allclose(got.numpy(), brute_density(labeled, bank, 3, 0.07, mask.tolist()), rtol=1e-6)


def test_float64_in_float64_out():
    labeled, bank = unit(6, 5, torch.float64), unit(15, 5, torch.float64)
    got = llp_fast.local_density(labeled, bank, t=4)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), brute_density(labeled, bank, 4, 0.07), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# The fused CPU top-T (csrc/cpu/local_density_cpu.cpp, csrc/cpu/topk.h) against the reference.

DENSITY = torch.ops.llp_fast.local_density.default
TAU = 0.07


def _unit(n, d, dtype):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def _check_density(m, bank, t, mask, *, atol):
    out = DENSITY(m, bank, t, TAU, mask)
    ref = local_density_ref(m, bank, t, TAU, mask)
    expect_dtype = torch.float64 if m.dtype == torch.float64 else torch.float32
    assert out.dtype == expect_dtype and out.shape == (m.shape[0],)
    # A log-sum-exp of the t best barely moves when a near-tied neighbour is swapped: no filtering.
    torch.testing.assert_close(out, ref.to(expect_dtype), rtol=0, atol=atol)


class TestExtension:
    @pytest.mark.parametrize(
        "dtype,atol",
        [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5), (torch.float64, 1e-12)],
    )
    @pytest.mark.parametrize("masked", [False, True], ids=["all", "pool_mask"])
    @pytest.mark.usefixtures("cpu_tile")
    def test_local_density_matches_reference(self, dtype, atol, masked):
        require_ext("local_density")
        m, bank = _unit(120, 17, dtype), _unit(333, 17, dtype)
        mask = torch.rand(333) < 0.6 if masked else None
        _check_density(m, bank, 25, mask, atol=atol)

    @pytest.mark.parametrize(
        "m_rows,n_rows,d,t",
        [(1, 40, 17, 25), (9, 25, 17, 25), (1, 1, 3, 1), (30, 1030, 128, 25), (10, 500, 8, 300)],
        ids=["M=1", "T=N", "M=N=T=1", "N-not-tile-multiple", "large-T"],
    )
    @pytest.mark.usefixtures("cpu_tile")
    def test_local_density_odd_shapes(self, m_rows, n_rows, d, t):
        require_ext("local_density")
        _check_density(_unit(m_rows, d, torch.float32), _unit(n_rows, d, torch.float32), t, None, atol=2e-5)

    def test_local_density_pool_exactly_t(self):
        require_ext("local_density")
        m, bank = _unit(10, 17, torch.float32), _unit(60, 17, torch.float32)
        mask = torch.zeros(60, dtype=torch.bool)
        mask[torch.randperm(60)[:25]] = True  # the pool has exactly t rows: every one is a neighbour
        _check_density(m, bank, 25, mask, atol=2e-5)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_opcheck_local_density(self, dtype):
        require_ext("local_density")
        m, bank = _unit(20, 16, dtype), _unit(50, 16, dtype)
        for mask in (None, torch.rand(50) < 0.7):
            torch.library.opcheck(DENSITY, (m, bank, 5, TAU, mask))


# ---------------------------------------------------------------------------------------------
# kernels/local_density.py against the reference (under TRITON_INTERPRET=1 on CPU).


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


class TestTriton:
    pytestmark = triton_tests

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
    def test_local_density_matches_reference(self, dtype, m, n, d, t, pool, splits):
        labeled, bank, mask = make_inputs(m, n, d, dtype, pool_fraction=pool, seed=m * 100 + n)
        if t is None:
            t = int(mask.sum())
        out = kernels.local_density_triton(labeled, bank, t, TAU, mask, splits=splits)
        ref = local_density_ref(labeled, bank, t, TAU, mask)
        assert out.dtype == torch.float32 and out.shape == (m,)
        # log-sum-exp of the top T is continuous in the scores: ties at the T-th place cannot move it.
        torch.testing.assert_close(out, ref.float(), **TOL)

    def test_local_density_t64_split_with_sparse_mask(self):
        """The largest buffer, splits holding fewer than T pool rows (their slots stay -inf)."""
        labeled, bank, mask = make_inputs(10, 70, 16, torch.float32, pool_fraction=0.95, seed=2)
        t = min(64, int(mask.sum()))
        out = kernels.local_density_triton(labeled, bank, t, TAU, mask, splits=4)
        torch.testing.assert_close(out, local_density_ref(labeled, bank, t, TAU, mask).float(), **TOL)

    def test_local_density_gpu_tile_shape(self):
        """The GPU heuristic's 128 x 64 tiles with T = 25."""
        labeled, bank, mask = make_inputs(40, 150, 40, torch.bfloat16, pool_fraction=0.8, seed=6)
        out = kernels.local_density_triton(labeled, bank, 25, TAU, mask, block_m=128, block_n=64)
        torch.testing.assert_close(out, local_density_ref(labeled, bank, 25, TAU, mask).float(), **TOL)

    def test_local_density_mask_is_read_in_place(self):
        """A mask selecting a single row: log_rho is exactly that row's score."""
        labeled, bank, _ = make_inputs(5, 40, 12, torch.float32, seed=4)
        mask = torch.zeros(40, dtype=torch.bool, device=DEVICE)
        mask[17] = True
        out = kernels.local_density_triton(labeled, bank, 1, TAU, mask)
        torch.testing.assert_close(out, (labeled @ bank[17]) / TAU, **TOL)

    def test_local_density_declines(self):
        labeled, bank, _ = make_inputs(4, 80, 8, torch.float32)
        assert kernels.local_density_triton(labeled, bank, 65, TAU, None) is NotImplemented
        assert kernels.local_density_triton(labeled.double(), bank.double(), 3, TAU, None) is NotImplemented

    @cuda_only
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_local_density_cuda_realistic(self, dtype):
        import llp_fast

        labeled, bank, mask = make_inputs(8192, 120_000, 128, dtype, pool_fraction=0.9, seed=12, device="cuda")
        out = llp_fast.local_density(labeled, bank, t=25, tau=TAU, pool_mask=mask)
        ref = local_density_ref(labeled, bank, 25, TAU, mask)
        torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-4)
