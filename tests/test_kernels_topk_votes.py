"""kernels/topk_votes.py against llp_fast.reference.propagate_ref (docs/method.md §1.2)."""

from __future__ import annotations

import math

import pytest
import torch
from _triton_setup import DEVICE, HAS_CUDA, INTERPRET, clear_rows, kernels, unit_rows

from llp_fast.reference import propagate_ref, streaming_topk

pytestmark = pytest.mark.triton

TAU = 0.07


def make_inputs(q, m, d, num_classes, dtype, *, seed=0, density=True, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    queries = unit_rows(q, d, dtype, device, gen=g)
    labeled = unit_rows(m, d, dtype, device, gen=g)
    classes = torch.randint(0, num_classes, (m,), generator=g).to(device)
    log_rho = (torch.rand(m, generator=g, dtype=torch.float64) * 2 + 5).float().to(device) if density else None
    return queries, labeled, classes, log_rho


def check_against_reference(queries, labeled, classes, log_rho, k, num_classes, **launch):
    labels, conf = kernels.propagate_triton(queries, labeled, classes, log_rho, k, TAU, num_classes, **launch)
    ref_labels, ref_conf = propagate_ref(queries, labeled, classes, log_rho, k, TAU, num_classes)
    assert labels.dtype == torch.int64 and conf.dtype == torch.float32
    assert labels.shape == conf.shape == (queries.shape[0],)
    clear = clear_rows(queries, labeled, classes, log_rho, k, TAU, num_classes)
    assert clear.float().mean() > 0.5, "test inputs are mostly near-ties: pick another seed"
    assert torch.equal(labels[clear], ref_labels[clear])
    torch.testing.assert_close(conf[clear], ref_conf[clear].float(), rtol=0, atol=5e-5)
    assert bool(((conf > 0) & (conf <= 1 + 1e-6)).all())

    # The selected scores (not the indices, which ties may reorder), sorted descending.
    vals, idx = kernels.propagate_topk_triton(queries, labeled, log_rho, k, TAU, **launch)
    _, ref_vals, _ = next(streaming_topk(queries, labeled, k, TAU, bias=log_rho, row_chunk=1 << 30))
    torch.testing.assert_close(vals, ref_vals.float(), rtol=0, atol=1e-4)
    # Each index really has the score reported for it.
    q, m = queries.double(), labeled.double()
    rescored = (q[:, None, :] * m[idx]).sum(-1) / TAU
    if log_rho is not None:
        rescored = rescored - log_rho.double()[idx]
    torch.testing.assert_close(vals.double(), rescored, rtol=0, atol=1e-4)
    distinct = (idx[:, :, None] != idx[:, None, :]) | torch.eye(k, dtype=torch.bool, device=idx.device)
    assert bool(distinct.all())  # no key selected twice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "q,m,d,k,splits",
    [
        (1, 20, 7, 20, None),  # one query, K = M
        (37, 61, 33, 5, None),  # nothing a multiple of the block
        (40, 70, 40, 10, 3),  # the split-and-merge path (few queries, many keys)
        (17, 50, 16, 1, None),  # K = 1
    ],
)
def test_propagate_matches_reference(dtype, q, m, d, k, splits):
    inputs = make_inputs(q, m, d, 4, dtype, seed=q * 1000 + m)
    check_against_reference(*inputs, k, 4, splits=splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_propagate_gpu_tile_shape(dtype):
    """The GPU heuristic's 128 x 64 tiles (the other tests use 16 x 16 under the interpreter)."""
    inputs = make_inputs(37, 150, 40, 5, dtype, seed=21)
    check_against_reference(*inputs, 10, 5, block_m=128, block_n=64)


def test_propagate_without_density_float16():
    inputs = make_inputs(33, 45, 24, 3, torch.float16, seed=7, density=False)
    check_against_reference(*inputs, 6, 3)


def test_propagate_k64_many_classes():
    """The largest buffer (K = 64), and 1000 classes: the in-kernel vote has no class axis."""
    inputs = make_inputs(20, 70, 20, 1000, torch.float32, seed=3)
    check_against_reference(*inputs, 64, 1000)


def test_propagate_one_class_and_strided_queries():
    queries, labeled, classes, log_rho = make_inputs(9, 30, 12, 1, torch.float32, seed=5)
    wide = torch.zeros(9, 24, device=DEVICE)
    wide[:, ::2] = queries  # a non-unit column stride: the launcher must copy, not misread
    labels, conf = kernels.propagate_triton(wide[:, ::2], labeled, classes, log_rho, 4, TAU, 1)
    assert bool((labels == 0).all())
    torch.testing.assert_close(conf, torch.ones_like(conf))


def test_propagate_exact_score_ties_pick_lowest_class():
    """Two labeled copies of the query in different classes: equal votes, class 0 wins."""
    d = 16
    queries = unit_rows(3, d)
    labeled = torch.cat([queries[:1], queries[:1], -queries[:1]]).contiguous()
    classes = torch.tensor([2, 0, 1], device=DEVICE)
    labels, conf = kernels.propagate_triton(queries[:1], labeled, classes, None, 2, TAU, 3)
    assert labels.tolist() == [0]
    torch.testing.assert_close(conf, torch.full_like(conf, 0.5))


def test_declines_what_it_does_not_cover():
    q64, m64, c, r = make_inputs(4, 8, 8, 2, torch.float64)
    assert kernels.propagate_triton(q64, m64, c, r, 2, TAU, 2) is NotImplemented
    q, m, c, r = make_inputs(4, 80, 8, 2, torch.float32)
    assert kernels.propagate_triton(q, m, c, r, 65, TAU, 2) is NotImplemented
    q, m, c, r = make_inputs(4, 8, 300, 2, torch.float32)
    assert kernels.propagate_triton(q, m, c, r, 2, TAU, 2) is NotImplemented
    q, m, c, r = make_inputs(0, 8, 8, 2, torch.float32)
    labels, conf = kernels.propagate_triton(q, m, c, r, 2, TAU, 2)
    assert labels.shape == conf.shape == (0,)
    q, m, c, r = make_inputs(3, 0, 8, 2, torch.float32)
    assert kernels.propagate_triton(q, m, c, r, 1, TAU, 2) is NotImplemented


# ----------------------------------------------------------------------------- GPU, realistic shapes


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and compiled kernels)")
@pytest.mark.parametrize("q,m,splits", [(4096, 60_000, None), (256, 200_000, None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_propagate_cuda_realistic(dtype, q, m, splits):
    import llp_fast

    num_classes, k = 100, 10
    queries, labeled, classes, log_rho = make_inputs(q, m, 128, num_classes, dtype, seed=11, device="cuda")
    labels, conf = llp_fast.propagate(queries, labeled, classes, log_rho, k=k, tau=TAU, num_classes=num_classes)
    ref_labels, ref_conf = propagate_ref(queries, labeled, classes, log_rho, k, TAU, num_classes)
    clear = clear_rows(queries, labeled, classes, log_rho, k, TAU, num_classes)
    assert clear.float().mean() > 0.8
    assert torch.equal(labels[clear], ref_labels[clear])
    assert (conf[clear] - ref_conf[clear]).abs().max().item() < 1e-3
    assert math.isfinite(conf.sum().item())
