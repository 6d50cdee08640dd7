"""The fused CPU aggregation loss (csrc/cpu/aggregation_loss_cpu.cpp): forward (loss, lse_all,
lse_pos) and backward against llp_fast.reference, over dtypes and odd shapes, plus opcheck and
gradcheck through the autograd registration that stays in Python (llp_fast/ops/aggregation_loss.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llp_fast
from llp_fast import _ext
from llp_fast.reference import aggregation_loss_backward_ref, aggregation_loss_ref

FWD = torch.ops.llp_fast.aggregation_loss.default
BWD = torch.ops.llp_fast.aggregation_loss_backward.default
TAU = 0.07


def require_ext():
    if _ext.disabled():
        pytest.skip("LLP_FAST_DISABLE_EXT=1")
    if _ext.load() is None:
        pytest.skip("the C++ extension could not be built or loaded (see the RuntimeWarning)")
    for op in ("aggregation_loss", "aggregation_loss_backward"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"llp_fast::{op}", "CPU"):
            pytest.skip(f"the extension registers no CPU kernel for llp_fast::{op}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _inputs(b, n, d, dtype, classes=10):
    v = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1).to(dtype)
    bank = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
    labels = torch.randint(0, classes, (n,))
    labels[: n // 3] = -1 - torch.arange(n // 3)  # instance ids, as unvisited unlabeled rows hold
    targets = labels[torch.randint(0, n, (b,))]  # each target is some row's label: positives exist
    return v, bank, labels, targets


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "b,n,d", [(37, 1500, 17), (1, 1, 5), (256, 513, 128), (3, 2000, 8)], ids=["odd", "B=N=1", "N=513", "D=8"]
)
def test_forward_and_backward_match_reference(dtype, b, n, d):
    require_ext()
    v, bank, labels, targets = _inputs(b, n, d, dtype)
    got = FWD(v, bank, labels, targets, TAU)
    ref = aggregation_loss_ref(v, bank, labels, targets, TAU)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for g, r in zip(got, ref):
        assert g.dtype == out_dtype and g.shape == (b,)
        torch.testing.assert_close(g, r.to(out_dtype), rtol=TOL[dtype], atol=TOL[dtype] * 10)
    coef_all, coef_pos = torch.randn(b, dtype=out_dtype), torch.randn(b, dtype=out_dtype)
    grad = BWD(v, bank, labels, targets, got[1], got[2], coef_all, coef_pos, TAU)
    grad_ref = aggregation_loss_backward_ref(v, bank, labels, targets, ref[1], ref[2], coef_all, coef_pos, TAU)
    assert grad.dtype == dtype and grad.shape == v.shape
    scale = grad_ref.double().abs().max().item() + 1e-30
    low = dtype in (torch.bfloat16, torch.float16)
    # bf16/fp16 gradients are rounded once at the end, like the reference's: allow a rounding step.
    atol = scale * (2**-7 if low else TOL[dtype])
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=0, atol=atol)


def test_target_without_positive_gives_infinite_loss():
    require_ext()
    v, bank, labels, targets = _inputs(4, 300, 16, torch.float32)
    targets[1] = 12345  # no bank row holds it
    loss, lse_all, lse_pos = FWD(v, bank, labels, targets, TAU)
    ref = aggregation_loss_ref(v, bank, labels, targets, TAU)
    assert lse_pos[1] == float("-inf") and loss[1] == float("inf")
    torch.testing.assert_close(loss[[0, 2, 3]], ref[0][[0, 2, 3]])
    grad = BWD(v, bank, labels, targets, lse_all, lse_pos, torch.ones(4), torch.ones(4), TAU)
    assert torch.isfinite(grad).all()


def test_far_positive_is_exact():
    # A positive whose score is far below the row's maximum: its own online max keeps it exact.
    require_ext()
    v = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    bank = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    targets = torch.tensor([1])
    got = FWD(v, bank, labels, targets, 0.01)  # scores 100 and -100
    ref = aggregation_loss_ref(v, bank, labels, targets, 0.01)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


def test_public_function_gradcheck():
    require_ext()
    v, bank, labels, targets = _inputs(5, 70, 6, torch.float64)
    v.requires_grad_(True)
    torch.autograd.gradcheck(lambda x: llp_fast.aggregation_loss(x, bank, labels, targets, tau=0.5), (v,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    require_ext()
    v, bank, labels, targets = _inputs(6, 40, 16, dtype)
    torch.library.opcheck(FWD, (v.requires_grad_(dtype == torch.float32), bank, labels, targets, TAU))
    out = FWD(v.detach(), bank, labels, targets, TAU)
    coef = torch.randn(6)
    torch.library.opcheck(BWD, (v.detach(), bank, labels, targets, out[1], out[2], coef, -coef, TAU))
