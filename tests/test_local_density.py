"""llp_fast.local_density (docs/method.md §1.1): the reference against the float64 brute force and
the op (``topk_scores``' kernel for the device, then the log-sum-exp) against the reference, on every
sample of tests/samples.py; the pool mask; the CUDA path (``topk_scores``' Triton kernel and the
log-sum-exp) under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _ext_setup import cpu_tile  # noqa: F401 (a fixture)
from _triton_setup import DEVICE, cuda_only, kernels, triton_tests, unit_rows
from brute import local_density as brute_density
from conftest import unit
from samples import out_dtype, sample, sample_ids

import llp_fast
from llp_fast._topk import log_sum_exp
from llp_fast.reference import local_density_ref

# Native kernels run on odd shapes here: a crash fails this module's tests, not the whole run.
pytestmark = pytest.mark.isolated

DENSITY = torch.ops.llp_fast.local_density.default
TAU = 0.07


@pytest.mark.parametrize("name", sample_ids("local_density", device="cpu"))
def test_reference_matches_brute_force(name):
    labeled, bank, t, tau, mask = sample("local_density", name, device="cpu").args
    got = local_density_ref(labeled, bank, t, tau, mask)
    assert got.shape == (labeled.shape[0],)
    want = brute_density(labeled, bank, t, tau, None if mask is None else mask.tolist())
    rtol = 1e-12 if labeled.dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=rtol)


@pytest.mark.usefixtures("cpu_tile")
@pytest.mark.parametrize("name", sample_ids("local_density"))
def test_op_matches_reference(name):
    """The op as dispatched on every sample; bit for bit the log-sum-exp of ``topk_scores``' top-T."""
    smp = sample("local_density", name)
    labeled, bank, t, tau, mask = smp.args
    out = DENSITY(*smp.args)
    assert out.dtype == out_dtype(smp) and out.shape == (labeled.shape[0],)
    # A log-sum-exp of the t best barely moves when a near-tied neighbour is swapped: no filtering.
    atol = 1e-12 if labeled.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, local_density_ref(*smp.args).to(out.dtype), rtol=0, atol=atol)
    top = llp_fast.topk_scores(labeled, bank, k=t, tau=tau, key_mask=mask)
    assert torch.equal(out, log_sum_exp(top.values).to(out.dtype))


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
# The CUDA path, topk_scores' Triton kernel then the log-sum-exp, against the reference (under
# TRITON_INTERPRET=1 on CPU).


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


def triton_density(labeled, bank, t, mask, **launch):
    """What the op runs on CUDA: ``topk_scores``' Triton kernel, then the log-sum-exp."""
    values, _ = kernels.topk_scores_triton(labeled, bank, t, TAU, None, mask, None, None, 0, **launch)
    return log_sum_exp(values)


class TestTriton:
    pytestmark = triton_tests

    @pytest.mark.parametrize(
        "m,n,d,t,pool,splits,dtype",
        [
            (1, 23, 7, 23, None, None, torch.float32),  # one row, T = pool size = N
            (37, 61, 33, 5, 0.6, None, torch.bfloat16),  # pool mask, odd sizes
            (21, 70, 40, 25, None, 3, torch.float32),  # split-and-merge path
            (30, 50, 24, None, 0.5, None, torch.float16),  # T = pool size under a mask
            (2, 260, 8, 200, 0.95, None, torch.float32),  # T = 200: the two-level selection
        ],
    )
    def test_local_density_matches_reference(self, dtype, m, n, d, t, pool, splits):
        labeled, bank, mask = make_inputs(m, n, d, dtype, pool_fraction=pool, seed=m * 100 + n)
        if t is None:
            t = int(mask.sum())
        out = triton_density(labeled, bank, t, mask, splits=splits)
        ref = local_density_ref(labeled, bank, t, TAU, mask)
        assert out.dtype == torch.float32 and out.shape == (m,)
        # log-sum-exp of the top T is continuous in the scores: ties at the T-th place cannot move it.
        torch.testing.assert_close(out, ref.float(), **TOL)

    def test_local_density_t64_split_with_sparse_mask_gpu_tiles(self):
        """The largest one-level buffer, splits holding fewer than T pool rows (their slots stay
        -inf), and the GPU heuristic's 128 x 64 tiles."""
        labeled, bank, mask = make_inputs(10, 150, 16, torch.bfloat16, pool_fraction=0.5, seed=2)
        t = min(64, int(mask.sum()))
        out = triton_density(labeled, bank, t, mask, splits=4, block_m=128, block_n=64)
        torch.testing.assert_close(out, local_density_ref(labeled, bank, t, TAU, mask).float(), **TOL)

    def test_local_density_mask_is_read_in_place(self):
        """A mask selecting a single row: log_rho is exactly that row's score."""
        labeled, bank, _ = make_inputs(5, 40, 12, torch.float32, seed=4)
        mask = torch.zeros(40, dtype=torch.bool, device=DEVICE)
        mask[17] = True
        torch.testing.assert_close(triton_density(labeled, bank, 1, mask), (labeled @ bank[17]) / TAU, **TOL)

    @cuda_only
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_local_density_cuda_realistic(self, dtype):
        labeled, bank, mask = make_inputs(8192, 120_000, 128, dtype, pool_fraction=0.9, seed=12, device="cuda")
        out = llp_fast.local_density(labeled, bank, t=25, tau=TAU, pool_mask=mask)
        ref = local_density_ref(labeled, bank, 25, TAU, mask)
        torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-4)
