"""kernels/bank_softmax.py against llp_fast.reference.aggregation_loss_ref and
aggregation_loss_backward_ref (docs/method.md §1.3)."""

from __future__ import annotations

import pytest
import torch
from _triton_setup import DEVICE, HAS_CUDA, INTERPRET, LOW, kernels, unit_rows

from llp_fast.reference import aggregation_loss_backward_ref, aggregation_loss_ref

# The interpreter evaluates log(0) for a row without positives (the loss is then +inf, as in
# the reference); NumPy warns about it.
pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")]

TAU = 0.07


def make_inputs(b, n, d, *, labels=5, seed=0, device=DEVICE):
    """float64 inputs (rounded per test): bank labels mixing classes and instance ids, the
    first row of the batch targeting a label no bank row holds (lse_pos = -inf)."""
    g = torch.Generator().manual_seed(seed)
    v = unit_rows(b, d, torch.float64, device, gen=g)
    bank = unit_rows(n, d, torch.float64, device, gen=g)
    bank_labels = torch.randint(-labels, labels, (n,), generator=g).to(device)
    targets = torch.randint(-labels, labels, (b,), generator=g).to(device)
    targets[0] = 10 * labels
    coef_all = torch.randn(b, generator=g, dtype=torch.float64).to(device)
    coef_pos = torch.randn(b, generator=g, dtype=torch.float64).to(device)
    return v, bank, bank_labels, targets, coef_all, coef_pos


def assert_same_with_infs(out, ref, **tol):
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], **tol)


def rel_err(x, truth):
    return ((x.double() - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "b,n,d,splits",
    [(1, 20, 7, None), (37, 61, 33, None), (23, 67, 40, 3), (16, 48, 16, 2), (70, 150, 40, 2)],
)
def test_forward_and_backward_match_reference(dtype, b, n, d, splits):
    v64, bank64, bank_labels, targets, ca, cp = make_inputs(b, n, d, seed=b * 100 + n)
    v, bank = v64.to(dtype), bank64.to(dtype)
    # The last shape runs the GPU heuristic's tiles (64-row blocks, 32/64-wide key tiles).
    tiles = dict(block_m=64 if b == 70 else None, block_n=64 if b == 70 else None)
    out = kernels.aggregation_loss_triton(v, bank, bank_labels, targets, TAU, splits=splits, **tiles)
    ref = aggregation_loss_ref(v, bank, bank_labels, targets, TAU)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and o.shape == (b,)
        assert_same_with_infs(o, r, rtol=1e-5, atol=1e-5)
    assert out[0][0].item() == float("inf") and out[2][0].item() == float("-inf")

    _, lse_all, lse_pos = ref
    grad = kernels.aggregation_loss_backward_triton(
        v, bank, bank_labels, targets, lse_all, lse_pos, ca.float(), cp.float(), TAU, splits=splits,
        block_m=tiles["block_m"], block_n=32 if b == 70 else None,
    )  # fmt: skip
    assert grad.dtype == dtype and grad.shape == v.shape
    assert bool(torch.isfinite(grad).all())
    grad_ref = aggregation_loss_backward_ref(
        v, bank, bank_labels, targets, lse_all, lse_pos, ca.float(), cp.float(), TAU
    )
    if dtype == torch.float32:
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)
    else:
        # Low precision: no worse than ~2x the same-dtype reference against a float64 truth.
        truth_out = aggregation_loss_ref(v64, bank64, bank_labels, targets, TAU)
        truth = aggregation_loss_backward_ref(v64, bank64, bank_labels, targets, *truth_out[1:], ca, cp, TAU)
        assert rel_err(grad, truth) <= 2 * rel_err(grad_ref, truth) + 1e-6
        fin = torch.isfinite(truth_out[0])
        if fin.any():
            assert rel_err(out[0][fin], truth_out[0][fin]) <= 2 * rel_err(ref[0][fin], truth_out[0][fin]) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,d,splits", [(1, 20, 7, None), (37, 61, 33, None), (23, 67, 40, 3)])
def test_fused_forward_means_give_the_gradient(dtype, b, n, d, splits):
    """aggregation_loss_fused_triton: the forward outputs, and the gradient from its means."""
    v64, bank64, bank_labels, targets, ca, cp = make_inputs(b, n, d, seed=b * 10 + n)
    v, bank = v64.to(dtype), bank64.to(dtype)
    loss, lse_all, lse_pos, mean_all, mean_pos = kernels.aggregation_loss_fused_triton(
        v, bank, bank_labels, targets, TAU, splits=splits
    )
    ref = aggregation_loss_ref(v, bank, bank_labels, targets, TAU)
    for o, r in zip((loss, lse_all, lse_pos), ref):
        assert_same_with_infs(o, r, rtol=1e-5, atol=1e-5)
    assert mean_all.shape == mean_pos.shape == (b, d)
    assert bool((mean_pos[0] == 0).all())  # row 0 has no positive
    grad = kernels.aggregation_loss_grad_from_means(mean_all, mean_pos, ca, cp, TAU, dtype)
    grad_ref = aggregation_loss_backward_ref(v, bank, bank_labels, targets, ref[1], ref[2], ca.float(), cp.float(), TAU)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)
    else:
        truth_out = aggregation_loss_ref(v64, bank64, bank_labels, targets, TAU)
        truth = aggregation_loss_backward_ref(v64, bank64, bank_labels, targets, *truth_out[1:], ca, cp, TAU)
        assert rel_err(grad, truth) <= 2 * rel_err(grad_ref, truth) + 1e-6


def test_backward_float16_and_large_coefficients():
    v64, bank64, bank_labels, targets, ca, cp = make_inputs(19, 45, 24, seed=9)
    v, bank = v64.half(), bank64.half()
    _, lse_all, lse_pos = kernels.aggregation_loss_triton(v, bank, bank_labels, targets, TAU)
    ca, cp = ca * 100, cp * 100
    grad = kernels.aggregation_loss_backward_triton(v, bank, bank_labels, targets, lse_all, lse_pos, ca, cp, TAU)
    truth_out = aggregation_loss_ref(v64, bank64, bank_labels, targets, TAU)
    truth = aggregation_loss_backward_ref(v64, bank64, bank_labels, targets, *truth_out[1:], ca, cp, TAU)
    grad_ref = aggregation_loss_backward_ref(v, bank, bank_labels, targets, lse_all, lse_pos, ca, cp, TAU)
    assert rel_err(grad, truth) <= 2 * rel_err(grad_ref, truth) + 1e-6


def test_declines_float64_and_wide_rows():
    v, bank, bank_labels, targets, _, _ = make_inputs(4, 10, 8)
    assert kernels.aggregation_loss_triton(v, bank, bank_labels, targets, TAU) is NotImplemented
    v, bank, bank_labels, targets, _, _ = make_inputs(4, 10, 300)
    assert kernels.aggregation_loss_triton(v.float(), bank.float(), bank_labels, targets, TAU) is NotImplemented


# ----------------------------------------------------------------------------- GPU, realistic shapes


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, *LOW[:1]])
def test_aggregation_loss_cuda_realistic(dtype):
    """B = 256 against a 200k-row bank through the public op and autograd."""
    import llp_fast

    v64, bank64, bank_labels, targets, _, _ = make_inputs(256, 200_000, 128, labels=100, seed=13, device="cuda")
    targets[0] = bank_labels[0]  # every row has a positive here
    v = v64.to(dtype).requires_grad_(True)
    bank = bank64.to(dtype)
    loss = llp_fast.aggregation_loss(v, bank, bank_labels, targets, tau=TAU)
    (loss * torch.linspace(0.5, 1.5, 256, device="cuda")).sum().backward()

    # loss = lse_all - lse_pos, so d(sum w * loss) has coef_all = w and coef_pos = -w.
    w = torch.linspace(0.5, 1.5, 256, device="cuda", dtype=torch.float64)
    truth, la, lp = aggregation_loss_ref(v64, bank64, bank_labels, targets, TAU)
    grad_truth = aggregation_loss_backward_ref(v64, bank64, bank_labels, targets, la, lp, w, -w, TAU)
    ref_loss, ra, rp = aggregation_loss_ref(v.detach(), bank, bank_labels, targets, TAU)
    grad_ref = aggregation_loss_backward_ref(v.detach(), bank, bank_labels, targets, ra, rp, w.float(), -w.float(), TAU)
    # No worse than 2x the same-dtype reference; the slack covers fp32, where both errors are at rounding level.
    assert rel_err(loss.detach(), truth) <= 2 * rel_err(ref_loss, truth) + 1e-6
    assert rel_err(v.grad, grad_truth) <= 2 * rel_err(grad_ref, grad_truth) + 1e-6

    # The fused forward's means give the same gradient.
    fused = kernels.aggregation_loss_fused_triton(v.detach(), bank, bank_labels, targets, TAU)
    grad_fused = kernels.aggregation_loss_grad_from_means(fused[3], fused[4], w, -w, TAU, dtype)
    assert rel_err(grad_fused, grad_truth) <= 2 * rel_err(grad_ref, grad_truth) + 1e-6
