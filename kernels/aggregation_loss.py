"""Fused bank softmax loss (docs/method.md §1.3, the ``aggregation_loss`` ops), forward and backward.

``aggregation_loss_triton`` computes, without the (B, N) logits,

    s = v.float() @ bank.float().T / tau                                  # (B, N), never stored
    lse_all = torch.logsumexp(s, dim=1)
    lse_pos = torch.logsumexp(s.masked_fill(bank_labels[None] != targets[:, None], -inf), dim=1)
    loss = lse_all - lse_pos

and ``aggregation_loss_backward_triton`` the gradient of
``sum_b coef_all_b * lse_all_b + coef_pos_b * lse_pos_b`` with respect to ``v``:

    p = torch.exp(s - lse_all[:, None]);  q = same * torch.exp(s - lse_pos[:, None])
    grad_v = (coef_all[:, None] * p + coef_pos[:, None] * q) @ bank.float() / tau

Both stream the bank once per block of batch rows with ``tl.dot`` (the forward keeps two
online log-sum-exps, the backward recomputes the scores). The fused variant, one pass for
both, is in kernels/aggregation_loss_fused.py. For the per-step batch (B = 256
against N up to 1.3M) the bank is split across programs: the forward writes a partial
log-sum-exp per split (merged with logsumexp), the backward a partial fp32 gradient per
split (summed); the split count is capped so these buffers stay a few MB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llp_fast.reference import check_aggregation_rows

from ._aggregation_tiles import PARTIAL_BYTES, bank_tile, batch_block, online_lse, prepare
from ._blocks import dot
from ._launch import decline_reason, launch, maybe_autotune

__all__ = [
    "aggregation_loss_triton",
    "aggregation_loss_triton_declines",
    "aggregation_loss_backward_triton",
    "aggregation_loss_backward_triton_declines",
]


@triton.jit
def _aggregation_fwd_kernel(
    v_ptr,
    bank_ptr,
    labels_ptr,
    targets_ptr,
    lse_all_ptr,
    lse_pos_ptr,
    B,
    N,
    D,
    stride_v,
    stride_bank,
    inv_tau,
    chunk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows, row_ok, q, tgt, n_start, n_end = batch_block(v_ptr, targets_ptr, B, N, D, stride_v, chunk, BLOCK_M, BLOCK_D)
    m_all = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    m_pos = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_all = tl.zeros((BLOCK_M,), tl.float32)
    l_pos = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        _, s, col_ok, same = bank_tile(
            q, tgt, bank_ptr, labels_ptr, n0, n_end, D, stride_bank, inv_tau, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION
        )
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_all, l_all = online_lse(m_all, l_all, s)
        # Positives are rare (one class among ~1000, or a row's own instance id), so most
        # tiles skip the second exp pass entirely: the exps, not the dot, bound this loop.
        if tl.max(same.to(tl.int32)) > 0:
            m_pos, l_pos = online_lse(m_pos, l_pos, tl.where(same, s, float("-inf")))
    out = tl.program_id(1).to(tl.int64) * B + rows
    # log(0) = -inf: an empty range (or no positive in it) contributes nothing to the merge.
    tl.store(lse_all_ptr + out, m_all + tl.log(l_all), mask=row_ok)
    tl.store(lse_pos_ptr + out, m_pos + tl.log(l_pos), mask=row_ok)


@triton.jit
def _aggregation_bwd_kernel(
    v_ptr,
    bank_ptr,
    labels_ptr,
    targets_ptr,
    lse_all_ptr,
    lse_pos_ptr,
    coef_all_ptr,
    coef_pos_ptr,
    grad_ptr,
    B,
    N,
    D,
    stride_v,
    stride_bank,
    inv_tau,
    chunk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows, row_ok, q, tgt, n_start, n_end = batch_block(v_ptr, targets_ptr, B, N, D, stride_v, chunk, BLOCK_M, BLOCK_D)
    la = tl.load(lse_all_ptr + rows, mask=row_ok, other=0.0)
    lp = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0)
    ca = tl.load(coef_all_ptr + rows, mask=row_ok, other=0.0)
    cp = tl.load(coef_pos_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        kt, s, col_ok, same = bank_tile(
            q, tgt, bank_ptr, labels_ptr, n0, n_end, D, stride_bank, inv_tau, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION
        )
        w = ca[:, None] * tl.exp(s - la[:, None])
        # Positives are rare: most tiles skip their exp pass (see the forward).
        if tl.max(same.to(tl.int32)) > 0:
            # where() rather than a product: lse_pos = -inf (no positive) makes exp overflow,
            # but then no column is a positive and the where never selects it.
            w += tl.where(same, cp[:, None] * tl.exp(s - lp[:, None]), 0.0)
        w = tl.where(row_ok[:, None] & col_ok[None, :], w, 0.0)
        # Second product on the tensor cores in the bank's dtype (as flash-attention does
        # with P); its rounding is measured against float64 in the tests. Not in fp16: a weight
        # is about coef / N (a softmax over the bank), below fp16's normal range (6.1e-5) for
        # small coefficients or large banks, where it lost its digits or flushed to zero; there
        # the weights stay fp32 and the keys are widened (tf32: fp16's mantissa, fp32's range).
        if kt.dtype == tl.float16:
            acc = dot(w, tl.trans(kt.to(tl.float32)), acc, "tf32")
        else:
            acc = dot(w.to(kt.dtype), tl.trans(kt), acc, INPUT_PRECISION)
    offs_d = tl.arange(0, BLOCK_D)
    out = (tl.program_id(1).to(tl.int64) * B + rows.to(tl.int64))[:, None] * D + offs_d[None, :]
    tl.store(grad_ptr + out, acc, mask=row_ok[:, None] & (offs_d[None, :] < D))


_fwd_tuned = maybe_autotune(_aggregation_fwd_kernel, key=["D"])
_bwd_tuned = maybe_autotune(_aggregation_bwd_kernel, key=["D"])


def aggregation_loss_triton_declines(v, bank, bank_labels, targets, tau):
    """Why the aggregation-loss launchers would hand this call to the reference, or None."""
    return decline_reason(v, bank)


def aggregation_loss_backward_triton_declines(v, bank, bank_labels, targets, lse_all, lse_pos, coef_all, coef_pos, tau):
    """Why :func:`aggregation_loss_backward_triton` would hand this call to the reference, or None."""
    return decline_reason(v, bank)


def aggregation_loss_triton(
    v: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    targets: torch.Tensor,
    tau: float,
    *,
    splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
):
    """Launcher for ``llp_fast::aggregation_loss``: same arguments as its default body.

    Args:
        v: (B, D) float32/bfloat16/float16; bank: (N, D) same dtype, D <= 256.
        bank_labels: (N,) int; targets: (B,) int.

    Returns:
        (loss, lse_all, lse_pos), each (B,) float32; NotImplemented for float64 or D > 256.
    """
    check_aggregation_rows(v, bank, bank_labels, targets)
    if decline_reason(v, bank):
        return NotImplemented
    n_b, dev = v.shape[0], v.device
    if n_b == 0:
        return tuple(torch.empty(0, dtype=torch.float32, device=dev) for _ in range(3))
    q, keys, n_splits, chunk, cfg = prepare(v, bank, block_m, block_n, splits)
    part_all = torch.empty(n_splits, n_b, dtype=torch.float32, device=dev)
    part_pos = torch.empty_like(part_all)
    labels = bank_labels.to(torch.int64).contiguous()
    tgt = targets.to(torch.int64).contiguous()
    args = (q, keys, labels, tgt, part_all, part_pos, n_b, keys.shape[0], q.shape[1], q.stride(0), keys.stride(0),
            1.0 / tau, chunk)  # fmt: skip
    launch(_fwd_tuned, n_b, n_splits, args, *cfg)
    # logsumexp over the splits; a split without positives holds -inf and drops out.
    lse_all = torch.logsumexp(part_all, dim=0) if n_splits > 1 else part_all[0]
    lse_pos = torch.logsumexp(part_pos, dim=0) if n_splits > 1 else part_pos[0]
    return lse_all - lse_pos, lse_all, lse_pos


def aggregation_loss_backward_triton(
    v: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    targets: torch.Tensor,
    lse_all: torch.Tensor,
    lse_pos: torch.Tensor,
    coef_all: torch.Tensor,
    coef_pos: torch.Tensor,
    tau: float,
    *,
    splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
):
    """Launcher for ``llp_fast::aggregation_loss_backward``: same arguments as its default
    body. Returns grad_v (B, D) in ``v.dtype``, or NotImplemented for float64 or D > 256."""
    check_aggregation_rows(v, bank, bank_labels, targets, lse_all, lse_pos, coef_all, coef_pos)
    if decline_reason(v, bank):
        return NotImplemented
    n_b, d, dev = v.shape[0], v.shape[1], v.device
    if n_b == 0:
        return torch.zeros_like(v)
    max_splits = max(1, PARTIAL_BYTES // (4 * d * n_b))
    q, keys, n_splits, chunk, cfg = prepare(v, bank, block_m, block_n, splits, max_splits, backward=True)
    part = torch.empty(n_splits, n_b, d, dtype=torch.float32, device=dev)
    f32 = lambda x: x.to(torch.float32).contiguous()
    args = (
        q, keys, bank_labels.to(torch.int64).contiguous(), targets.to(torch.int64).contiguous(),
        f32(lse_all), f32(lse_pos), f32(coef_all), f32(coef_pos), part,
        n_b, keys.shape[0], d, q.stride(0), keys.stride(0), 1.0 / tau, chunk,
    )  # fmt: skip
    launch(_bwd_tuned, n_b, n_splits, args, *cfg)
    grad = part[0] if n_splits == 1 else part.sum(dim=0)
    return grad.div_(tau).to(v.dtype)
