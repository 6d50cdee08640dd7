"""llp_fast.local_density against the float64 brute force (docs/method.md §1.1)."""

import numpy as np
import pytest
import torch
from brute import local_density as brute_density
from conftest import unit

import llp_fast
from llp_fast.reference import local_density_ref

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
