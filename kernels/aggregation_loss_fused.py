"""The aggregation loss in one pass over the bank (``llp_fast::aggregation_loss_fused``, what
``aggregation_loss`` runs on CUDA in bf16/fp16 when ``v`` needs a gradient; docs/method.md §1.3).

Besides the forward's two online log-sum-exps (kernels/aggregation_loss.py), each program
accumulates the softmax-weighted bank means, flash-attention style, so that the backward is
elementwise (``reference.aggregation_loss_grad_from_means``) instead of a second bank pass. The
bank is split across programs as in the forward; per-split partials (max, sum, weighted sum) are
merged on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llp_fast.reference import check_aggregation_rows

from ._aggregation_tiles import PARTIAL_BYTES, bank_tile, batch_block, prepare
from ._blocks import dot
from ._launch import decline_reason, launch, maybe_autotune

__all__ = ["aggregation_loss_fused_triton", "aggregation_loss_fused_triton_declines"]


@triton.jit
def _online_moments(m, acc, o, s, kt, INPUT_PRECISION: tl.constexpr):
    """``online_lse`` that also keeps ``o = sum_j exp(s_j - m) * bank_j`` (the softmax
    "attention output" of flash-attention, unnormalised), rescaled when the maximum moves."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    p = tl.exp(s - shift[:, None])
    acc = acc * alpha + tl.sum(p, axis=1)
    o = dot(p.to(kt.dtype), tl.trans(kt), o * alpha[:, None], INPUT_PRECISION)
    return m_new, acc, o


@triton.jit
def _aggregation_fused_kernel(
    v_ptr,
    bank_ptr,
    labels_ptr,
    targets_ptr,
    m_ptr,  # (2, splits, B): running maxima (all, positives)
    l_ptr,  # (2, splits, B): sums of exp(s - m)
    o_ptr,  # (2, splits, B, D): sums of exp(s - m) * bank row
    B,
    N,
    D,
    stride_v,
    stride_bank,
    inv_tau,
    chunk,
    n_splits,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Forward and the whole of the backward's bank pass at once: besides the two online
    log-sum-exps, the softmax-weighted bank means ``sum_j p_j m_j`` and ``sum_j q_j m_j``
    that the gradient is made of, accumulated like flash-attention's output."""
    rows, row_ok, q, tgt, n_start, n_end = batch_block(v_ptr, targets_ptr, B, N, D, stride_v, chunk, BLOCK_M, BLOCK_D)
    m_all = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    m_pos = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_all = tl.zeros((BLOCK_M,), tl.float32)
    l_pos = tl.zeros((BLOCK_M,), tl.float32)
    o_all = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    o_pos = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        kt, s, col_ok, same = bank_tile(
            q, tgt, bank_ptr, labels_ptr, n0, n_end, D, stride_bank, inv_tau, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION
        )
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_all, l_all, o_all = _online_moments(m_all, l_all, o_all, s, kt, INPUT_PRECISION)
        # Positives are rare: most tiles skip this second exp pass and product.
        if tl.max(same.to(tl.int32)) > 0:
            sp = tl.where(same, s, float("-inf"))
            m_pos, l_pos, o_pos = _online_moments(m_pos, l_pos, o_pos, sp, kt, INPUT_PRECISION)
    vec = tl.program_id(1).to(tl.int64) * B + rows
    tl.store(m_ptr + vec, m_all, mask=row_ok)
    tl.store(l_ptr + vec, l_all, mask=row_ok)
    tl.store(m_ptr + n_splits * B + vec, m_pos, mask=row_ok)
    tl.store(l_ptr + n_splits * B + vec, l_pos, mask=row_ok)
    offs_d = tl.arange(0, BLOCK_D)
    mat = vec.to(tl.int64)[:, None] * D + offs_d[None, :]
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(o_ptr + mat, o_all, mask=ok)
    # n_splits * B * D in int64 through ``vec``: Triton passes an int argument equal to 1 as a plain
    # constant, which has no ``.to`` (the H200 compile of a one-row, one-split call failed on it)
    pos_base = (vec * 0 + n_splits) * B * D
    tl.store(o_ptr + pos_base[:, None] + mat, o_pos, mask=ok)


_fused_tuned = maybe_autotune(_aggregation_fused_kernel, key=["D"])


def aggregation_loss_fused_triton_declines(v, bank, bank_labels, targets, tau):
    """Why :func:`aggregation_loss_fused_triton` would hand this call to the reference, or None."""
    return decline_reason(v, bank)


def _merge_moments(m, sums, o):
    """Merges per-split (max, sum, weighted bank sum) into (lse, normalised mean): the
    log-sum-exp of the splits and ``sum_j softmax_j * bank_j``; zero for a row whose set is
    empty (lse = -inf)."""
    top = m.max(dim=0).values
    shift = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp(m - shift)  # a split with an empty set has m = -inf: weight 0
    total = (w * sums).sum(dim=0)
    lse = shift + torch.log(total)
    mean = (w[..., None] * o).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))[:, None]
    return lse, mean


def aggregation_loss_fused_triton(
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
    """Launcher for ``llp_fast::aggregation_loss_fused``: the forward with the backward's bank
    pass folded in (flash-attention style).

    Computes, without the (B, N) logits, the forward's ``(loss, lse_all, lse_pos)`` and

        mean_all = softmax(s, dim=1) @ bank.float()                    # (B, D)
        mean_pos = softmax(s.masked_fill(~same, -inf), dim=1) @ bank.float()   (0 if no positive)

    so that the gradient of ``sum_b coef_all_b lse_all_b + coef_pos_b lse_pos_b`` is the
    elementwise ``reference.aggregation_loss_grad_from_means``, with no second pass over the
    bank: one bank read and three products per tile (the third only on tiles with a positive)
    instead of two reads and four.

    Returns:
        (loss, lse_all, lse_pos, mean_all, mean_pos) float32, or NotImplemented as
        :func:`aggregation_loss_triton`.
    """
    check_aggregation_rows(v, bank, bank_labels, targets)
    if decline_reason(v, bank):
        return NotImplemented
    n_b, d, dev = v.shape[0], v.shape[1], v.device
    if n_b == 0:
        vec = torch.empty(0, dtype=torch.float32, device=dev)
        mat = torch.empty(0, d, dtype=torch.float32, device=dev)
        return vec, vec.clone(), vec.clone(), mat, mat.clone()
    max_splits = max(1, PARTIAL_BYTES // (8 * d * n_b))  # two (splits, B, D) fp32 partials
    q, keys, n_splits, chunk, cfg = prepare(v, bank, block_m, block_n, splits, max_splits, backward=True)
    m = torch.empty(2, n_splits, n_b, dtype=torch.float32, device=dev)
    sums = torch.empty_like(m)
    o = torch.empty(2, n_splits, n_b, d, dtype=torch.float32, device=dev)
    args = (
        q, keys, bank_labels.to(torch.int64).contiguous(), targets.to(torch.int64).contiguous(), m, sums, o,
        n_b, keys.shape[0], d, q.stride(0), keys.stride(0), 1.0 / tau, chunk, n_splits,
    )  # fmt: skip
    launch(_fused_tuned, n_b, n_splits, args, *cfg)
    lse_all, mean_all = _merge_moments(m[0], sums[0], o[0])
    lse_pos, mean_pos = _merge_moments(m[1], sums[1], o[1])
    return lse_all - lse_pos, lse_all, lse_pos, mean_all, mean_pos
