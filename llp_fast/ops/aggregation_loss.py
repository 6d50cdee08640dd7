"""``llp_fast.aggregation_loss``: the bank softmax loss of docs/method.md §1.3, differentiable in v.

Two ops compute it; neither holds a B x N matrix.

``llp_fast::aggregation_loss``: forward, two online log-sum-exps over the bank (all rows; rows
whose stored label equals the target), returning ``(loss, lse_all, lse_pos)`` so that the
backward (``llp_fast::aggregation_loss_backward``) needs no second pass for the normalisers;
that backward recomputes the scores tile by tile, ``dv = (sum_j (p_j - q_j) m_j) / tau``.

``llp_fast::aggregation_loss_fused``: the forward also accumulates the softmax-weighted bank
means ``sum_j p_j m_j`` and ``sum_j q_j m_j`` (B x D each, kept for the backward), so the
backward is elementwise and the bank is read once per step instead of twice. The public
function takes it where it pays: on CUDA, in bf16/fp16, when ``v`` needs a gradient (its
Triton kernel serves it; its reference body takes two passes).
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from .. import _validate as check
from .._interop import accepts_arrays
from ..reference import (
    aggregation_loss_backward_ref,
    aggregation_loss_fused_ref,
    aggregation_loss_grad_from_means,
    aggregation_loss_ref,
)
from ._common import compiled_first, out_float_dtype, register_cuda


@compiled_first("aggregation_loss")
def _forward_default(v, bank, bank_labels, targets, tau):
    dt = out_float_dtype(v, bank)
    return tuple(x.to(dt) for x in aggregation_loss_ref(v, bank, bank_labels, targets, tau))


@compiled_first("aggregation_loss_backward")
def _backward_default(v, bank, bank_labels, targets, lse_all, lse_pos, coef_all, coef_pos, tau):
    return aggregation_loss_backward_ref(v, bank, bank_labels, targets, lse_all, lse_pos, coef_all, coef_pos, tau)


aggregation_loss_op = torch.library.custom_op(
    "llp_fast::aggregation_loss",
    _forward_default,
    mutates_args=(),
    schema="(Tensor v, Tensor bank, Tensor bank_labels, Tensor targets, float tau) -> (Tensor, Tensor, Tensor)",
)
aggregation_loss_backward_op = torch.library.custom_op(
    "llp_fast::aggregation_loss_backward",
    _backward_default,
    mutates_args=(),
    schema="(Tensor v, Tensor bank, Tensor bank_labels, Tensor targets, Tensor lse_all, Tensor lse_pos,"
    " Tensor coef_all, Tensor coef_pos, float tau) -> Tensor",
)


@aggregation_loss_op.register_fake
def _(v, bank, bank_labels, targets, tau):
    dt = out_float_dtype(v, bank)
    return tuple(v.new_empty(v.shape[0], dtype=dt) for _ in range(3))


@aggregation_loss_backward_op.register_fake
def _(v, bank, bank_labels, targets, lse_all, lse_pos, coef_all, coef_pos, tau):
    return torch.empty_like(v)


register_cuda(aggregation_loss_op, "aggregation_loss", _forward_default)
register_cuda(aggregation_loss_backward_op, "aggregation_loss_backward", _backward_default)


def _setup_context(ctx, inputs, output):
    v, bank, bank_labels, targets, tau = inputs
    _, lse_all, lse_pos = output
    ctx.save_for_backward(v, bank, bank_labels, targets, lse_all, lse_pos)
    ctx.tau = tau


def _coefficients(g_loss, g_all, g_pos, like):
    """The gradients of (loss, lse_all, lse_pos) folded into the coefficients of lse_all and
    lse_pos (loss = lse_all - lse_pos); a missing gradient counts as zero."""
    zero = torch.zeros_like(like)
    g_loss, g_all, g_pos = (zero if g is None else g for g in (g_loss, g_all, g_pos))
    return g_loss + g_all, g_pos - g_loss


def _backward(ctx, g_loss, g_all, g_pos):
    v, bank, bank_labels, targets, lse_all, lse_pos = ctx.saved_tensors
    coef_all, coef_pos = _coefficients(g_loss, g_all, g_pos, lse_all)
    grad_v = aggregation_loss_backward_op(v, bank, bank_labels, targets, lse_all, lse_pos, coef_all, coef_pos, ctx.tau)
    return grad_v, None, None, None, None


aggregation_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _no_second_derivative(ctx, *grads):
    raise NotImplementedError(
        "llp_fast.aggregation_loss has no second derivative (its gradient is a kernel of its own): a loss "
        "differentiated twice through it (a gradient penalty) is not supported"
    )


# (without it, a second backward was torch's "no autograd formula was registered" for an op the user never called)
aggregation_loss_backward_op.register_autograd(_no_second_derivative, setup_context=lambda ctx, inputs, output: None)


@compiled_first("aggregation_loss_fused")
def _fused_default(v, bank, bank_labels, targets, tau):
    dt = out_float_dtype(v, bank)
    return tuple(x.to(dt) for x in aggregation_loss_fused_ref(v, bank, bank_labels, targets, tau))


aggregation_loss_fused_op = torch.library.custom_op(
    "llp_fast::aggregation_loss_fused",
    _fused_default,
    mutates_args=(),
    schema="(Tensor v, Tensor bank, Tensor bank_labels, Tensor targets, float tau)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


@aggregation_loss_fused_op.register_fake
def _(v, bank, bank_labels, targets, tau):
    dt = out_float_dtype(v, bank)
    vec = [v.new_empty(v.shape[0], dtype=dt) for _ in range(3)]
    return (*vec, v.new_empty(v.shape, dtype=dt), v.new_empty(v.shape, dtype=dt))


register_cuda(aggregation_loss_fused_op, "aggregation_loss_fused", _fused_default)


def _fused_setup_context(ctx, inputs, output):
    _, _, _, mean_all, mean_pos = output
    # The means are what the backward needs, not differentiable outputs of their own.
    ctx.mark_non_differentiable(mean_all, mean_pos)
    ctx.save_for_backward(mean_all, mean_pos)
    ctx.tau = inputs[4]
    ctx.v_dtype = inputs[0].dtype


def _fused_backward(ctx, g_loss, g_all, g_pos, _g_mean_all, _g_mean_pos):
    mean_all, mean_pos = ctx.saved_tensors
    coef_all, coef_pos = _coefficients(g_loss, g_all, g_pos, mean_all[:, 0])
    # d lse / dv = (softmax-weighted bank mean) / tau.
    grad_v = aggregation_loss_grad_from_means(mean_all, mean_pos, coef_all, coef_pos, ctx.tau, ctx.v_dtype)
    return grad_v, None, None, None, None


aggregation_loss_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)

# Where the public function takes the fused op on CUDA: bf16/fp16, whose fused kernel fits the
# registers (sm_90, tests/_compile_kernels.py); the fp32 one spills, so fp32 takes the two passes.
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def _transformed(v: torch.Tensor) -> bool:
    """Whether ``v`` is a torch.func transform's wrapper (vmap, grad, jvp, vjp)."""
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(wrapped(v)) if wrapped is not None else False


@accepts_arrays("v", "bank", "bank_labels", "targets")
def aggregation_loss(v, bank, bank_labels, targets, *, tau: float = 0.07, check_finite: bool = True):
    """``L_A(v) = -logsumexp_{j: l_j = target}(v . m_j / tau) + logsumexp_j(v . m_j / tau)``.

    Args:
        v: (B, D) batch embeddings; the gradient flows to ``v`` only.
        bank: (N, D) memory bank (a buffer: it gets no gradient), same dtype and device.
        bank_labels: (N,) int stored labels (class >= 0, instance id -1-j < 0).
        targets: (B,) int stored label of each batch example; its own bank row is in both
            sums, so the positive set is never empty in the trainer's use. A target that no
            bank row holds gives an infinite loss.
        tau: temperature > 0.
        check_finite: reject NaN/Inf in ``v`` and ``bank`` (the bank check is one extra
            read of the bank; the trainer, which writes the bank itself, turns it off).

    Returns:
        (B,) float32 loss (float64 for float64 inputs). Extra memory is O(B), never O(B*N);
        on CUDA in bf16/fp16, when ``v`` needs a gradient, O(B*D) more: the forward keeps the bank means
        its backward is made of (``llp_fast::aggregation_loss_fused``), so the backward does
        not read the bank again.
    """
    check.embeddings(v, "v")
    if not check.tracing() and (forward_ad.unpack_dual(v).tangent is not None or _transformed(v)):
        # (the op registers a backward only: a JVP came out as zeros, or with no tangent, without a
        # word; torch.func's grad and vjp ended in torch's "must override the setup_context")
        raise NotImplementedError(
            "aggregation_loss has no forward-mode derivative and does not run under torch.func transforms "
            "(jvp, jacfwd, vmap, grad, vjp; torch.autograd.forward_ad): take its gradient with backward() or "
            "torch.autograd.grad"
        )
    check.embeddings(bank, "bank", allow_empty=False)
    check.same_space(bank, "bank", v, "v")
    tau = check.temperature(tau)
    check.vector(bank_labels, "bank_labels", bank.shape[0], device=bank.device, kind="int")
    check.vector(targets, "targets", v.shape[0], device=bank.device, kind="int")
    sizes = (check.finite(v, "v"), check.finite(bank, "bank")) if check_finite else (1.0, 1.0)
    check.scores_fit(tau, v, "v", bank, "bank", *sizes)
    if v.is_cuda and v.dtype in _FUSED_DTYPES and v.requires_grad and torch.is_grad_enabled():
        return aggregation_loss_fused_op(v, bank.detach(), bank_labels, targets, tau)[0]
    return aggregation_loss_op(v, bank.detach(), bank_labels, targets, tau)[0]
