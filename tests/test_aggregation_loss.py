"""llp_fast.aggregation_loss: value and gradient against dense float64 logits (docs/method.md §1.3)."""

import numpy as np
import pytest
import torch
from brute import aggregation_grad
from brute import aggregation_loss as brute_loss
from conftest import unit

import llp_fast
from llp_fast.reference import aggregation_loss_backward_ref, aggregation_loss_ref

SHAPES = [  # (B, N, D, labels drawn from)
    (1, 1, 1, 1),
    (1, 12, 5, 3),
    (7, 50, 17, 4),
    (33, 129, 32, 10),
    (64, 40, 128, 2),
]


def _inputs(b, n, d, s, dtype):
    bank = unit(n, d, dtype)
    # Labels: classes >= 0 and instance ids < 0, as in the trainer.
    bank_labels = torch.randint(0, s, (n,))
    instance = torch.rand(n) < 0.3
    bank_labels[instance] = -1 - torch.arange(n)[instance]
    rows = torch.randint(0, n, (b,))
    targets = bank_labels[rows]  # each target is held by at least its own row
    v = (bank[rows].double() + 0.3 * torch.randn(b, d, dtype=torch.float64)).to(dtype)
    return v, bank, bank_labels, targets


def _loss_and_grad(impl, v, bank, bank_labels, targets, w, tau):
    """(loss, d(sum w*loss)/dv) from the public op (autograd) or the reference functions."""
    if impl == "op":
        v = v.clone().requires_grad_()
        loss = llp_fast.aggregation_loss(v, bank, bank_labels, targets, tau=tau)
        (loss * w).sum().backward()
        return loss.detach(), v.grad
    loss, lse_all, lse_pos = aggregation_loss_ref(v, bank, bank_labels, targets, tau)
    grad = aggregation_loss_backward_ref(v, bank, bank_labels, targets, lse_all, lse_pos, w, -w, tau)
    return loss.float(), grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_loss_and_gradient_match_brute_force(shape, dtype, impl, tiles):
    v, bank, bank_labels, targets = _inputs(*shape, dtype)
    w = torch.rand(shape[0])
    loss, grad = _loss_and_grad(impl, v, bank, bank_labels, targets, w, 0.07)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    want_loss = brute_loss(v, bank, bank_labels, targets, 0.07)
    np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-4, atol=1e-4)
    assert grad.dtype == dtype
    want = aggregation_grad(v, bank, bank_labels, targets, 0.07, w)
    # The reference is exact on the rounded inputs; bf16 adds only the rounding of the output.
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (8e-3, 1e-3 * np.abs(want).max())
    np.testing.assert_allclose(grad.float().numpy(), want, rtol=rtol, atol=atol)


def test_gradient_of_lse_outputs():
    """The op's three outputs are each differentiable; all three gradients are exact."""
    v, bank, bank_labels, targets = _inputs(6, 30, 8, 3, torch.float64)
    v.requires_grad_()
    loss, lse_all, lse_pos = torch.ops.llp_fast.aggregation_loss(v, bank, bank_labels, targets, 0.2)
    g = torch.autograd.grad((2 * loss + 3 * lse_all - 5 * lse_pos).sum(), v)[0]
    same = bank_labels[None, :] == targets[:, None]
    dense = lambda x: (
        2 * (torch.logsumexp(x, 1) - torch.logsumexp(x.masked_fill(~same, -torch.inf), 1))
        + 3 * torch.logsumexp(x, 1)
        - 5 * torch.logsumexp(x.masked_fill(~same, -torch.inf), 1)
    ).sum()
    vv = v.detach().clone().requires_grad_()
    want = torch.autograd.grad(dense(vv @ bank.T / 0.2), vv)[0]
    torch.testing.assert_close(g, want)


def test_gradcheck_float64(tiles):
    v, bank, bank_labels, targets = _inputs(5, 23, 6, 3, torch.float64)
    v.requires_grad_()
    f = lambda x: llp_fast.aggregation_loss(x, bank, bank_labels, targets, tau=0.3)
    assert torch.autograd.gradcheck(f, (v,))


def test_bank_gets_no_gradient():
    v, bank, bank_labels, targets = _inputs(4, 10, 3, 2, torch.float32)
    bank.requires_grad_()
    v.requires_grad_()
    llp_fast.aggregation_loss(v, bank, bank_labels, targets).sum().backward()
    assert bank.grad is None and v.grad is not None


def test_instance_ids_make_instance_discrimination():
    """With every row its own group, L_A is the softmax cross-entropy of the own row."""
    bank = unit(20, 6, torch.float64)
    labels = -1 - torch.arange(20)
    v = unit(5, 6, torch.float64)
    rows = torch.tensor([0, 4, 9, 9, 19])
    got = llp_fast.aggregation_loss(v, bank, labels, labels[rows], tau=0.1)
    want = torch.nn.functional.cross_entropy(v @ bank.T / 0.1, rows, reduction="none")
    torch.testing.assert_close(got, want)


def test_backward_at_a_size_that_runs_tiles_in_parallel_workers():
    """Regression: the saved log-sum-exps require grad; worker threads of the CPU kernel do
    not inherit the below-autograd state, so every input must enter the kernel detached."""
    bank = unit(40_000, 32)
    labels = torch.randint(0, 50, (40_000,))
    v = unit(600, 32).requires_grad_()
    targets = labels[:600]
    loss = llp_fast.aggregation_loss(v, bank, labels, targets, tau=0.1)
    loss.sum().backward()
    want = aggregation_grad(v[:3], bank, labels, targets[:3], 0.1)
    np.testing.assert_allclose(v.grad[:3].numpy(), want, rtol=1e-4, atol=1e-4)
