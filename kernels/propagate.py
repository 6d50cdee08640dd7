"""Fused density-weighted top-K votes (docs/method.md §1.2, the ``propagate`` op).

``propagate_triton`` computes, without the (Q, M) score matrix,

    scores = queries.float() @ labeled.float().T / tau - log_rho          # (Q, M), never stored
    vals, idx = scores.topk(k, dim=1)
    w = torch.exp(vals - vals[:, :1])
    votes = torch.zeros(Q, num_classes).scatter_add_(1, labeled_classes[idx], w)
    labels, conf = votes.argmax(1), votes.max(1).values / votes.sum(1)

Each program streams a block of queries over the labeled rows with ``tl.dot`` and keeps a
running top-K in registers (``_topk.block_topk``); the vote happens in the same program, so
nothing but (label, confidence) is written. With few queries (the per-step case) the labeled
rows are split across programs instead: ``topk_scores.topk_candidates`` writes each split's K
candidates per row, merges them, and the vote finishes on the host side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import decline_reason, launch, maybe_autotune
from ._topk import block_topk
from .topk_scores import topk_candidates, topk_plan

__all__ = ["propagate_triton", "propagate_triton_declines"]


@triton.jit
def _vote(buf_v, buf_i, cls_ptr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """docs/method.md §1.2's vote on a (BLOCK_M, BLOCK_K) top-K buffer: label and confidence per row.

    Per-class sums without a (BLOCK_M, num_classes) buffer: for each slot j, the total
    weight of the slots sharing its class. O(K^2) per row, independent of the number of
    classes (1000 for ImageNet would not fit in registers). Ties go to the lowest class id,
    as ``argmax`` over the class axis does in the reference."""
    slots = tl.arange(0, BLOCK_K)
    real = (slots[None, :] < K) & (buf_i >= 0)
    # Subtract the row maximum before exp (docs/method.md §1.2).
    top = tl.max(tl.where(real, buf_v, float("-inf")), axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)  # padding rows past Q: keep them NaN-free
    w = tl.where(real, tl.exp(buf_v - top[:, None]), 0.0)
    cls = tl.load(cls_ptr + tl.where(real, buf_i, 0), mask=real, other=-1)
    total = tl.sum(w, axis=1)
    best = tl.full((BLOCK_M,), -1.0, tl.float32)
    best_c = tl.full((BLOCK_M,), -1, tl.int64)
    for j in range(K):
        cj = tl.sum(tl.where(slots[None, :] == j, cls, 0), axis=1)
        vj = tl.sum(tl.where(cls == cj[:, None], w, 0.0), axis=1)
        better = (vj > best) | ((vj == best) & (cj < best_c))
        best = tl.where(better, vj, best)
        best_c = tl.where(better, cj, best_c)
    return best_c, best / tl.where(total > 0, total, 1.0)


@triton.jit
def _propagate_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    cls_ptr,
    labels_ptr,
    conf_ptr,
    Q,
    N,
    D,
    stride_q,
    stride_k,
    inv_tau,
    chunk,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows, row_ok, buf_v, buf_i = block_topk(
        q_ptr, k_ptr, bias_ptr, bias_ptr, Q, N, D, stride_q, stride_k, inv_tau, chunk,
        K, HAS_BIAS, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, INPUT_PRECISION,
    )  # fmt: skip
    label, conf = _vote(buf_v, buf_i, cls_ptr, K, BLOCK_M, BLOCK_K)
    tl.store(labels_ptr + rows, label, mask=row_ok)
    tl.store(conf_ptr + rows, conf, mask=row_ok)


_propagate_kernel_tuned = maybe_autotune(_propagate_kernel, key=["D", "K"])


def _vote_host(vals, idx, classes, num_classes):
    """The reference vote on merged candidates, in row chunks so that the (rows,
    num_classes) vote buffer stays small."""
    from llp_fast.reference import vote

    n = vals.shape[0]
    step = max(1, (8 << 20) // max(num_classes, 1))
    labels = torch.empty(n, dtype=torch.int64, device=vals.device)
    conf = torch.empty(n, dtype=torch.float32, device=vals.device)
    for r0 in range(0, n, step):
        lab, c = vote(vals[r0 : r0 + step], classes[idx[r0 : r0 + step]], num_classes)
        labels[r0 : r0 + step], conf[r0 : r0 + step] = lab, c
    return labels, conf


def propagate_triton_declines(queries, labeled, labeled_classes, log_rho, k, tau, num_classes):
    """Why :func:`propagate_triton` would hand this call to the reference, or None."""
    return decline_reason(queries, labeled, k=k)


def propagate_triton(
    queries: torch.Tensor,
    labeled: torch.Tensor,
    labeled_classes: torch.Tensor,
    log_rho: torch.Tensor | None,
    k: int,
    tau: float,
    num_classes: int,
    *,
    splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
):
    """Launcher for ``llp_fast::propagate``: same arguments as its default body.

    Args:
        queries: (Q, D) float32/bfloat16/float16; labeled: (M, D) same dtype, D <= 256.
        labeled_classes: (M,) int class ids in [0, num_classes). log_rho: (M,) or None.
        splits, block_m, block_n: override the heuristic (tests use them to force the
            split-and-merge path and multi-tile streams).

    Returns:
        labels (Q,) int64 and confidence (Q,) float32, or NotImplemented where
        :func:`propagate_triton_declines` gives a reason (float64, k > 64, D > 256, ...: the
        op then runs the reference).
    """
    if propagate_triton_declines(queries, labeled, labeled_classes, log_rho, k, tau, num_classes):
        return NotImplemented
    n_q, dev = queries.shape[0], queries.device
    if n_q == 0:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.float32, device=dev)
    classes = labeled_classes.to(torch.int64).contiguous()
    bias = log_rho.to(torch.float32).contiguous() if log_rho is not None else None
    plan = topk_plan(queries, labeled, k, splits=splits, block_m=block_m, block_n=block_n)
    if plan.n_splits > 1:
        vals, idx = topk_candidates(plan, tau, bias=bias)
        return _vote_host(vals, idx.clamp_min(0), classes, num_classes)
    labels = torch.empty(n_q, dtype=torch.int64, device=dev)
    conf = torch.empty(n_q, dtype=torch.float32, device=dev)
    q = plan.queries
    args = (q, plan.keys, bias if bias is not None else q, classes, labels, conf, *plan.args(), 1.0 / tau, plan.chunk)
    launch(_propagate_kernel_tuned, n_q, 1, args, dict(plan.consts(), HAS_BIAS=bias is not None), plan.tiles)
    return labels, conf
