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
online log-sum-exps, the backward recomputes the scores). ``aggregation_loss_fused_triton``
(``llp_fast::aggregation_loss_fused``, what the public function runs on CUDA in bf16/fp16 when
``v`` needs a gradient) streams it once for both: the forward also accumulates the softmax-weighted bank
means, flash-attention style, and the backward is elementwise. For the per-step batch (B = 256
against N up to 1.3M) the bank is split across programs: the forward writes a partial
log-sum-exp per split (merged with logsumexp), the backward a partial fp32 gradient per
split (summed); the split count is capped so these buffers stay a few MB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    block_d,
    decline_reason,
    input_precision,
    interpreting,
    launch,
    maybe_autotune,
    rowmajor,
    split_range,
    tile_config,
)
from ._topk import dot, load_cols, load_rows

__all__ = [
    "aggregation_loss_triton",
    "aggregation_loss_triton_declines",
    "aggregation_loss_backward_triton",
    "aggregation_loss_backward_triton_declines",
    "aggregation_loss_fused_triton",
    "aggregation_loss_fused_triton_declines",
]

# Cap on the per-split partial gradients of the backward (docs/method.md §4: extra memory < 16 MB).
_PARTIAL_BYTES = 8 << 20


@triton.jit
def _online_lse(m, acc, s):
    """One step of a streaming log-sum-exp: running max ``m`` and sum ``acc`` of exp(x - m)
    per row, updated with the tile ``s``. A row still at -inf uses 0 as its shift, so that
    exp(-inf - -inf) never makes a NaN (rows without a positive yet)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
    return m_new, acc


@triton.jit
def _batch_block(v_ptr, targets_ptr, B, N, D, stride_v, chunk, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The common start of the three kernels, on a (row blocks, splits) grid: this program's
    batch rows (``rows``, ``row_ok``), their embeddings and targets, and its split's bank
    range ``[n_start, n_end)``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    q = load_rows(v_ptr, rows, row_ok, D, stride_v, BLOCK_D)
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    n_start = tl.program_id(1) * chunk
    n_end = tl.minimum(n_start + chunk, N)
    return rows, row_ok, q, tgt, n_start, n_end


@triton.jit
def _bank_tile(
    q,
    tgt,
    bank_ptr,
    labels_ptr,
    n0,
    n_end,
    D,
    stride_bank,
    inv_tau,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One bank tile of the loop of every kernel: bank rows ``[n0, n0 + BLOCK_N)`` (those past
    ``n_end`` masked: ``col_ok``) loaded transposed (``kt``), the scores ``q @ kt / tau`` and
    ``same``, where a row's stored label equals the batch row's target."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_end
    kt = load_cols(bank_ptr, cols, col_ok, D, stride_bank, BLOCK_D)
    s = dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INPUT_PRECISION) * inv_tau
    lab = tl.load(labels_ptr + cols.to(tl.int64), mask=col_ok, other=0)
    same = (lab[None, :] == tgt[:, None]) & col_ok[None, :]
    return kt, s, col_ok, same


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
    rows, row_ok, q, tgt, n_start, n_end = _batch_block(v_ptr, targets_ptr, B, N, D, stride_v, chunk, BLOCK_M, BLOCK_D)
    m_all = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    m_pos = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_all = tl.zeros((BLOCK_M,), tl.float32)
    l_pos = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        _, s, col_ok, same = _bank_tile(
            q, tgt, bank_ptr, labels_ptr, n0, n_end, D, stride_bank, inv_tau, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION
        )
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_all, l_all = _online_lse(m_all, l_all, s)
        # Positives are rare (one class among ~1000, or a row's own instance id), so most
        # tiles skip the second exp pass entirely: the exps, not the dot, bound this loop.
        if tl.max(same.to(tl.int32)) > 0:
            m_pos, l_pos = _online_lse(m_pos, l_pos, tl.where(same, s, float("-inf")))
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
    rows, row_ok, q, tgt, n_start, n_end = _batch_block(v_ptr, targets_ptr, B, N, D, stride_v, chunk, BLOCK_M, BLOCK_D)
    la = tl.load(lse_all_ptr + rows, mask=row_ok, other=0.0)
    lp = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0)
    ca = tl.load(coef_all_ptr + rows, mask=row_ok, other=0.0)
    cp = tl.load(coef_pos_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        kt, s, col_ok, same = _bank_tile(
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
        # with P); its rounding is measured against float64 in the tests.
        acc = dot(w.to(kt.dtype), tl.trans(kt), acc, INPUT_PRECISION)
    offs_d = tl.arange(0, BLOCK_D)
    out = (tl.program_id(1).to(tl.int64) * B + rows.to(tl.int64))[:, None] * D + offs_d[None, :]
    tl.store(grad_ptr + out, acc, mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _online_moments(m, acc, o, s, kt, INPUT_PRECISION: tl.constexpr):
    """``_online_lse`` that also keeps ``o = sum_j exp(s_j - m) * bank_j`` (the softmax
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
    rows, row_ok, q, tgt, n_start, n_end = _batch_block(v_ptr, targets_ptr, B, N, D, stride_v, chunk, BLOCK_M, BLOCK_D)
    m_all = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    m_pos = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_all = tl.zeros((BLOCK_M,), tl.float32)
    l_pos = tl.zeros((BLOCK_M,), tl.float32)
    o_all = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    o_pos = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        kt, s, col_ok, same = _bank_tile(
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
    tl.store(o_ptr + n_splits.to(tl.int64) * B * D + mat, o_pos, mask=ok)


_fwd_tuned = maybe_autotune(_aggregation_fwd_kernel, key=["D"])
_bwd_tuned = maybe_autotune(_aggregation_bwd_kernel, key=["D"])
_fused_tuned = maybe_autotune(_aggregation_fused_kernel, key=["D"])


def _prepare(v, bank, block_m, block_n, splits, max_splits=None, *, backward=False):
    q, keys = rowmajor(v), rowmajor(bank)
    bm, bn, warps, stages = tile_config(q.dtype, q.shape[1], 1, q.shape[0], block_m=block_m, block_n=block_n)
    if not interpreting():
        # From ptxas resource usage at D = 128 on sm_90 (``python tests/_compile_kernels.py
        # 90`` prints it per variant): 64-row blocks (the bank is split across programs, so
        # few rows per block are fine), 8 warps, 32-wide key tiles for the backward and the
        # fused forward (which also hold (BLOCK_M, D) fp32 accumulators) fit the bf16 kernels
        # in the registers without spills, where 4 warps sat at the cap and spilled.
        bm = block_m or min(bm, 64)
        bn = block_n or (32 if backward else bn)  # bn: 64 for bf16/fp16, 32 for fp32 (FMA dots)
        warps = 8
    row_blocks = triton.cdiv(q.shape[0], bm)
    n_splits, chunk = split_range(keys.shape[0], row_blocks, bn, q.device, splits, max_splits)
    consts = dict(BLOCK_D=block_d(q.shape[1]), INPUT_PRECISION=input_precision(q.dtype))
    return q, keys, n_splits, chunk, (consts, (bm, bn, warps, stages))


def aggregation_loss_triton_declines(v, bank, bank_labels, targets, tau):
    """Why the aggregation-loss launchers would hand this call to the reference, or None."""
    return decline_reason(v, bank)


def aggregation_loss_fused_triton_declines(v, bank, bank_labels, targets, tau):
    """Why :func:`aggregation_loss_fused_triton` would hand this call to the reference, or None."""
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
    if decline_reason(v, bank):
        return NotImplemented
    n_b, dev = v.shape[0], v.device
    if n_b == 0:
        return tuple(torch.empty(0, dtype=torch.float32, device=dev) for _ in range(3))
    q, keys, n_splits, chunk, cfg = _prepare(v, bank, block_m, block_n, splits)
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
    if decline_reason(v, bank):
        return NotImplemented
    n_b, d, dev = v.shape[0], v.shape[1], v.device
    if n_b == 0:
        return torch.zeros_like(v)
    max_splits = max(1, _PARTIAL_BYTES // (4 * d * n_b))
    q, keys, n_splits, chunk, cfg = _prepare(v, bank, block_m, block_n, splits, max_splits, backward=True)
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
    if decline_reason(v, bank):
        return NotImplemented
    n_b, d, dev = v.shape[0], v.shape[1], v.device
    if n_b == 0:
        vec = torch.empty(0, dtype=torch.float32, device=dev)
        mat = torch.empty(0, d, dtype=torch.float32, device=dev)
        return vec, vec.clone(), vec.clone(), mat, mat.clone()
    max_splits = max(1, _PARTIAL_BYTES // (8 * d * n_b))  # two (splits, B, D) fp32 partials
    q, keys, n_splits, chunk, cfg = _prepare(v, bank, block_m, block_n, splits, max_splits, backward=True)
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
