"""llp_fast.aggregation_loss (docs/method.md §1.3): value and gradient of the public op and its
reference against dense float64 logits, the C++ extension's kernels (``TestExtension``) and the
Triton kernels (``TestTriton``, under TRITON_INTERPRET=1 on CPU) against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _ext_setup import require_ext
from _triton_setup import DEVICE, LOW, cuda_only, kernels, triton_tests, unit_rows
from brute import aggregation_grad, f64
from brute import aggregation_loss as brute_loss
from conftest import unit
from samples import sample, sample_ids

import llp_fast
from llp_fast.ops import _common
from llp_fast.ops.aggregation_loss import _fused_default
from llp_fast.reference import (
    aggregation_loss_backward_ref,
    aggregation_loss_fused_ref,
    aggregation_loss_grad_from_means,
    aggregation_loss_ref,
)

# Native kernels run on odd shapes here: a crash fails this module's tests, not the whole run.
pytestmark = pytest.mark.isolated

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


def test_forward_mode_and_torch_func_are_refused_in_one_line():
    """A JVP came out as zeros (torch.func.jvp), or with no tangent (forward_ad), without a word (the
    op registers a backward only); torch.func.grad and vjp ended in torch's setup_context error."""
    from torch.autograd import forward_ad

    v, bank, bank_labels, targets = _inputs(3, 11, 4, 2, torch.float64)
    f = lambda x: llp_fast.aggregation_loss(x, bank, bank_labels, targets, tau=0.3).sum()
    ones = torch.ones_like(v)
    for transform in (
        lambda: torch.func.jvp(f, (v,), (ones,)),
        lambda: torch.func.grad(f)(v),
        lambda: torch.func.vjp(f, v),
    ):
        with pytest.raises(NotImplementedError, match="take its gradient with backward"):
            transform()
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"), forward_ad.dual_level():
        f(forward_ad.make_dual(v, ones))


@pytest.mark.parametrize("impl", ["extension", "reference"])
def test_raw_ops_refuse_per_row_inputs_of_another_length(impl):
    """The registered ops called directly (the public function checks its own arguments): a (1,)
    lse_pos or coef_pos was read past its end by the CPU kernel (AddressSanitizer; a non-finite
    gradient in a normal build) and broadcast by the reference."""
    if impl == "extension":
        require_ext()
    b, n, d = 64, 600, 8
    v, bank = torch.randn(b, d), torch.randn(n, d)
    labels, targets = torch.zeros(n, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    if impl == "extension":
        forward, backward = torch.ops.llp_fast.aggregation_loss, torch.ops.llp_fast.aggregation_loss_backward
        error = RuntimeError
    else:
        forward, backward, error = aggregation_loss_ref, aggregation_loss_backward_ref, ValueError
    _, la, lp = forward(v, bank, labels, targets, 0.1)
    ones = torch.ones(b)
    for args, name in (
        ((la, lp[:1], ones, ones), "lse_pos"),
        ((la, lp, ones, ones[:1]), "coef_pos"),
        ((la[:-1], lp, ones, ones), "lse_all"),
        ((la, lp, torch.ones(b + 1), ones), "coef_all"),
    ):
        with pytest.raises(error, match=name if impl == "reference" else "one value per row of v"):
            backward(v, bank, labels, targets, *args, 0.1)
    if impl == "reference":
        with pytest.raises(ValueError, match=r"bank_labels must hold one class per bank row \(600,\), got \(599,\)"):
            forward(v, bank, labels[1:], targets, 0.1)
        with pytest.raises(ValueError, match=r"targets must hold one value per row of v \(64,\), got \(1,\)"):
            forward(v, bank, labels, targets[:1], 0.1)
        with pytest.raises(ValueError, match=r"targets must hold one value per row of v \(64,\), got \(1, 64\)"):
            forward(v, bank, labels, targets[None], 0.1)
    assert torch.isfinite(backward(v, bank, labels, targets, la, lp, ones, -ones, 0.1)).all()


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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_matches_brute_force(shape, dtype, tiles):
    """llp_fast::aggregation_loss_fused (its reference body here): the loss, the bank means it
    keeps, and the gradient its backward makes of them, against dense float64 softmaxes."""
    v, bank, bank_labels, targets = _inputs(*shape, dtype)
    w = torch.rand(shape[0])
    vv = v.clone().requires_grad_()
    loss, _, _, mean_all, mean_pos = torch.ops.llp_fast.aggregation_loss_fused(vv, bank, bank_labels, targets, 0.07)
    assert not mean_all.requires_grad and not mean_pos.requires_grad
    (loss * w).sum().backward()
    np.testing.assert_allclose(
        loss.detach().numpy(), brute_loss(v, bank, bank_labels, targets, 0.07), rtol=1e-4, atol=1e-4
    )
    logits = f64(v) @ f64(bank).T / 0.07
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(mean_all.numpy(), (p / p.sum(1, keepdims=True)) @ f64(bank), rtol=1e-4, atol=1e-5)
    want = aggregation_grad(v, bank, bank_labels, targets, 0.07, w)
    assert vv.grad.dtype == dtype
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (8e-3, 1e-3 * np.abs(want).max())
    np.testing.assert_allclose(vv.grad.float().numpy(), want, rtol=rtol, atol=atol)


def test_fused_op_gradients_of_every_output(tiles):
    """The fused op's loss and log-sum-exps are differentiable (exact in float64, gradcheck);
    the means are not (they are what the backward is made of)."""
    v, bank, bank_labels, targets = _inputs(6, 30, 8, 3, torch.float64)
    v.requires_grad_()
    fused = torch.ops.llp_fast.aggregation_loss_fused
    loss, lse_all, lse_pos, _, _ = fused(v, bank, bank_labels, targets, 0.2)
    g = torch.autograd.grad((2 * loss + 3 * lse_all - 5 * lse_pos).sum(), v)[0]
    plain = torch.ops.llp_fast.aggregation_loss(v, bank, bank_labels, targets, 0.2)
    want = torch.autograd.grad((2 * plain[0] + 3 * plain[1] - 5 * plain[2]).sum(), v)[0]
    torch.testing.assert_close(g, want)
    assert torch.autograd.gradcheck(lambda x: fused(x, bank, bank_labels, targets, 0.3)[0], (v,))


# ---------------------------------------------------------------------------------------------
# The fused CPU forward and backward (csrc/cpu/aggregation_loss_cpu.cpp) against the reference,
# over the samples of tests/samples.py (their opcheck: tests/test_ops.py), plus gradcheck through
# the autograd registration that stays in Python (llp_fast/ops/aggregation_loss.py).

FWD = torch.ops.llp_fast.aggregation_loss.default
BWD = torch.ops.llp_fast.aggregation_loss_backward.default
TAU = 0.07


EXT_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}


class TestExtension:
    @pytest.mark.parametrize("name", sample_ids("aggregation_loss", device="cpu"))
    def test_forward_and_backward_match_reference(self, name):
        """The op's CPU kernels on every sample of tests/samples.py against the reference."""
        require_ext("aggregation_loss", "aggregation_loss_backward")
        v, bank, labels, targets, tau = sample("aggregation_loss", name, device="cpu").args
        dtype, b = v.dtype, v.shape[0]
        got = FWD(v, bank, labels, targets, tau)
        ref = aggregation_loss_ref(v, bank, labels, targets, tau)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for g, r in zip(got, ref):
            assert g.dtype == out_dtype and g.shape == (b,)
            torch.testing.assert_close(g, r.to(out_dtype), rtol=EXT_TOL[dtype], atol=EXT_TOL[dtype] * 10)
        coef_all, coef_pos = torch.randn(b, dtype=out_dtype), torch.randn(b, dtype=out_dtype)
        grad = BWD(v, bank, labels, targets, got[1], got[2], coef_all, coef_pos, tau)
        grad_ref = aggregation_loss_backward_ref(v, bank, labels, targets, ref[1], ref[2], coef_all, coef_pos, tau)
        assert grad.dtype == dtype and grad.shape == v.shape
        scale = grad_ref.double().abs().max().item() + 1e-30
        low = dtype in (torch.bfloat16, torch.float16)
        # bf16/fp16 gradients are rounded once at the end, like the reference's: allow a rounding step.
        atol = scale * (2**-7 if low else EXT_TOL[dtype])
        torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=0, atol=atol)

    def test_target_without_positive_gives_infinite_loss(self):
        require_ext("aggregation_loss", "aggregation_loss_backward")
        v, bank, labels, targets, _ = sample("aggregation_loss", "cpu-float32-B37-N300-D33", device="cpu").args
        v, targets = v[:4], targets[:4].clone()
        targets[1] = 12345  # no bank row holds it
        loss, lse_all, lse_pos = FWD(v, bank, labels, targets, TAU)
        ref = aggregation_loss_ref(v, bank, labels, targets, TAU)
        assert lse_pos[1] == float("-inf") and loss[1] == float("inf")
        torch.testing.assert_close(loss[[0, 2, 3]], ref[0][[0, 2, 3]])
        grad = BWD(v, bank, labels, targets, lse_all, lse_pos, torch.ones(4), torch.ones(4), TAU)
        assert torch.isfinite(grad).all()

    def test_far_positive_is_exact(self):
        # A positive whose score is far below the row's maximum: its own online max keeps it exact.
        require_ext("aggregation_loss", "aggregation_loss_backward")
        v = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        bank = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
        labels = torch.tensor([0, 1])
        targets = torch.tensor([1])
        got = FWD(v, bank, labels, targets, 0.01)  # scores 100 and -100
        ref = aggregation_loss_ref(v, bank, labels, targets, 0.01)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r)

    def test_public_function_gradcheck(self):
        require_ext("aggregation_loss", "aggregation_loss_backward")
        v, bank, labels, targets, _ = sample("aggregation_loss", "cpu-float64-B7-N50-D17", device="cpu").args
        v.requires_grad_(True)
        torch.autograd.gradcheck(lambda x: llp_fast.aggregation_loss(x, bank, labels, targets, tau=0.5), (v,))


# ---------------------------------------------------------------------------------------------
# kernels/aggregation_loss.py against the reference (under TRITON_INTERPRET=1 on CPU).


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


def float64_truth(v64, bank64, bank_labels, targets, coef_all, coef_pos):
    """The reference's (loss, lse_all, lse_pos) and gradient on float64 inputs: the truth that
    low-precision results are measured against."""
    out = aggregation_loss_ref(v64, bank64, bank_labels, targets, TAU)
    return out, aggregation_loss_backward_ref(v64, bank64, bank_labels, targets, *out[1:], coef_all, coef_pos, TAU)


def rel_err(x, truth):
    return ((x.double() - truth).norm() / truth.norm()).item()


class TestTriton:
    # The interpreter evaluates log(0) for a row without positives (the loss is then +inf, as in
    # the reference); NumPy warns about it.
    pytestmark = [*triton_tests, pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")]

    def test_launchers_refuse_per_row_inputs_of_another_length(self):
        """The launchers read B targets, normalisers and coefficients and N bank labels: fewer
        are refused before anything is launched (a GPU would read past their ends)."""
        v64, bank64, bank_labels, targets, ca, cp = make_inputs(9, 30, 8, seed=3)
        v, bank = v64.float(), bank64.float()
        _, la, lp = aggregation_loss_ref(v, bank, bank_labels, targets, TAU)
        with pytest.raises(ValueError, match="coef_pos must hold one value per row of v"):
            kernels.aggregation_loss_backward_triton(v, bank, bank_labels, targets, la, lp, ca, cp[:1], TAU)
        with pytest.raises(ValueError, match="bank_labels must hold one class per bank row"):
            kernels.aggregation_loss_triton(v, bank, bank_labels[:-1], targets, TAU)
        with pytest.raises(ValueError, match="targets must hold one value per row of v"):
            kernels.aggregation_loss_fused_triton(v, bank, bank_labels, targets[:3], TAU)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize(
        "b,n,d,splits",
        [(1, 20, 7, None), (37, 61, 33, None), (23, 67, 40, 3), (16, 48, 16, 2), (70, 150, 40, 2)],
    )
    def test_forward_and_backward_match_reference(self, dtype, b, n, d, splits):
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
            truth_out, truth = float64_truth(v64, bank64, bank_labels, targets, ca, cp)
            assert rel_err(grad, truth) <= 2 * rel_err(grad_ref, truth) + 1e-6
            fin = torch.isfinite(truth_out[0])
            if fin.any():
                assert rel_err(out[0][fin], truth_out[0][fin]) <= 2 * rel_err(ref[0][fin], truth_out[0][fin]) + 1e-6

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("b,n,d,splits", [(1, 20, 7, None), (37, 61, 33, None), (23, 67, 40, 3)])
    def test_fused_forward_means_give_the_gradient(self, dtype, b, n, d, splits):
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
        grad = aggregation_loss_grad_from_means(mean_all, mean_pos, ca, cp, TAU, dtype)
        grad_ref = aggregation_loss_backward_ref(
            v, bank, bank_labels, targets, ref[1], ref[2], ca.float(), cp.float(), TAU
        )
        if dtype == torch.float32:
            torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)
        else:
            _, truth = float64_truth(v64, bank64, bank_labels, targets, ca, cp)
            assert rel_err(grad, truth) <= 2 * rel_err(grad_ref, truth) + 1e-6

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_the_cuda_op_runs_the_fused_kernel(self, dtype, monkeypatch):
        """llp_fast::aggregation_loss_fused's CUDA body, run by the interpreter on CPU tensors:
        the fused kernel serves it, and its outputs (and the gradient made of its means)
        match the reference body's."""
        monkeypatch.setattr(_common, "LAST_CALL", {})
        v64, bank64, bank_labels, targets, ca, cp = make_inputs(29, 83, 24, seed=4)
        v, bank = v64.to(dtype), bank64.to(dtype)
        body = _common.with_fallback("aggregation_loss_fused_triton", _fused_default)
        out = body(v, bank, bank_labels, targets, TAU)
        assert _common.LAST_CALL[("aggregation_loss_fused", "cuda")] == ("triton", "aggregation_loss_fused_triton")
        ref = aggregation_loss_fused_ref(v, bank, bank_labels, targets, TAU)
        for o, r in zip(out[:3], ref[:3]):
            assert_same_with_infs(o, r.float(), rtol=1e-5, atol=1e-5)
        for o, r in zip(out[3:], ref[3:]):
            torch.testing.assert_close(o, r.float(), rtol=1e-4, atol=1e-5 if dtype == torch.float32 else 2e-3)
        grad = aggregation_loss_grad_from_means(out[3], out[4], ca, cp, TAU, dtype)
        grad_ref = aggregation_loss_grad_from_means(ref[3], ref[4], ca, cp, TAU, dtype)
        truth_means = aggregation_loss_fused_ref(v64, bank64, bank_labels, targets, TAU)[3:]
        truth = aggregation_loss_grad_from_means(*truth_means, ca, cp, TAU)
        assert rel_err(grad, truth) <= 2 * rel_err(grad_ref, truth) + 1e-6
        # float64 is the reference's, and the record says why.
        body(v64, bank64, bank_labels, targets, TAU)
        assert _common.LAST_CALL[("aggregation_loss_fused", "cuda")][1].startswith("triton declined: dtype float64")

    def test_backward_float16_and_large_coefficients(self):
        v64, bank64, bank_labels, targets, ca, cp = make_inputs(19, 45, 24, seed=9)
        v, bank = v64.half(), bank64.half()
        _, lse_all, lse_pos = kernels.aggregation_loss_triton(v, bank, bank_labels, targets, TAU)
        ca, cp = ca * 100, cp * 100
        grad = kernels.aggregation_loss_backward_triton(v, bank, bank_labels, targets, lse_all, lse_pos, ca, cp, TAU)
        _, truth = float64_truth(v64, bank64, bank_labels, targets, ca, cp)
        grad_ref = aggregation_loss_backward_ref(v, bank, bank_labels, targets, lse_all, lse_pos, ca, cp, TAU)
        assert rel_err(grad, truth) <= 2 * rel_err(grad_ref, truth) + 1e-6

    @pytest.mark.parametrize("scale", [1e-2, 1e-4])
    def test_backward_float16_with_small_weights(self, scale):
        """Each weight coef * softmax is about coef / N: cast to fp16 below its normal range it lost
        its digits (1.75e-2 relative error at coef 1e-4 against the reference's 4e-4)."""
        v64, bank64, bank_labels, targets, ca, cp = make_inputs(8, 600, 64, seed=11)
        v, bank = v64.half(), bank64.half()
        _, lse_all, lse_pos = kernels.aggregation_loss_triton(v, bank, bank_labels, targets, TAU)
        ca, cp = ca * scale, cp * scale
        grad = kernels.aggregation_loss_backward_triton(v, bank, bank_labels, targets, lse_all, lse_pos, ca, cp, TAU)
        _, truth = float64_truth(v64, bank64, bank_labels, targets, ca, cp)
        grad_ref = aggregation_loss_backward_ref(v, bank, bank_labels, targets, lse_all, lse_pos, ca, cp, TAU)
        assert rel_err(grad, truth) <= 2 * rel_err(grad_ref, truth) + 1e-6

    def test_declines_float64_and_wide_rows(self):
        v, bank, bank_labels, targets, _, _ = make_inputs(4, 10, 8)
        assert kernels.aggregation_loss_triton(v, bank, bank_labels, targets, TAU) is NotImplemented
        v, bank, bank_labels, targets, _, _ = make_inputs(4, 10, 300)
        assert kernels.aggregation_loss_triton(v.float(), bank.float(), bank_labels, targets, TAU) is NotImplemented

    @cuda_only
    @pytest.mark.parametrize("dtype", [torch.float32, *LOW[:1]])
    def test_aggregation_loss_cuda_realistic(self, dtype):
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
        grad_ref = aggregation_loss_backward_ref(
            v.detach(), bank, bank_labels, targets, ra, rp, w.float(), -w.float(), TAU
        )
        # No worse than 2x the same-dtype reference; the slack covers fp32, where both errors are at rounding level.
        assert rel_err(loss.detach(), truth) <= 2 * rel_err(ref_loss, truth) + 1e-6
        assert rel_err(v.grad, grad_truth) <= 2 * rel_err(grad_ref, grad_truth) + 1e-6

        # The public op took the fused forward (the backward made of its means, no second
        # bank pass); the two-pass launchers' means give the same gradient.
        if dtype != torch.float32:  # fp32 takes the two-pass kernels
            assert llp_fast.backends(last=True)["aggregation_loss_fused"]["cuda"][0] == "triton"
        fused = kernels.aggregation_loss_fused_triton(v.detach(), bank, bank_labels, targets, TAU)
        grad_fused = aggregation_loss_grad_from_means(fused[3], fused[4], w, -w, TAU, dtype)
        assert rel_err(grad_fused, grad_truth) <= 2 * rel_err(grad_ref, grad_truth) + 1e-6
