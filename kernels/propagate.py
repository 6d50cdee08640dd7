"""Fused density-weighted top-K votes (docs/method.md §1.2, the ``propagate`` op).

``propagate_triton`` computes, without the (Q, M) score matrix,

    scores = queries.float() @ labeled.float().T / tau - log_rho          # (Q, M), never stored
    vals, idx = scores.topk(k, dim=1)
    w = torch.exp(vals - vals[:, :1])
    votes = torch.zeros(Q, num_classes).scatter_add_(1, labeled_classes[idx], w)
    labels, conf = votes.argmax(1), votes.max(1).values / votes.sum(1)

Each program streams a block of queries over (a range of) the labeled rows with ``tl.dot``
and keeps a running top-K in registers (``_topk.stream_topk``). With one key range per
query block the vote happens in the same program, so nothing but (label, confidence) is
written. With few queries (the per-step case) the labeled rows are split across programs;
each writes its K candidates per row and a small merge (``topk`` over splits*K) and the vote
finish on the host side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    MAX_K,
    block_d,
    input_precision,
    launch,
    launchable,
    maybe_autotune,
    merge_splits,
    rowmajor,
    split_range,
    supported_embeddings,
    tile_config,
)
from ._topk import load_rows, store_partial, stream_topk

__all__ = ["propagate_triton", "propagate_topk_triton"]


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
    vals_ptr,
    idx_ptr,
    Q,
    M,
    D,
    stride_q,
    stride_k,
    stride_part,
    inv_tau,
    chunk,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    VOTE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Q
    q = load_rows(q_ptr, rows, row_ok, D, stride_q, BLOCK_D)
    n_start = split * chunk
    n_end = tl.minimum(n_start + chunk, M)
    buf_v, buf_i = stream_topk(
        q, row_ok, k_ptr, bias_ptr, bias_ptr, n_start, n_end, D, stride_k, inv_tau,
        K, HAS_BIAS, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, INPUT_PRECISION,
    )  # fmt: skip
    if VOTE:
        label, conf = _vote(buf_v, buf_i, cls_ptr, K, BLOCK_M, BLOCK_K)
        tl.store(labels_ptr + rows, label, mask=row_ok)
        tl.store(conf_ptr + rows, conf, mask=row_ok)
    else:
        store_partial(vals_ptr, idx_ptr, buf_v, buf_i, rows, row_ok, split, stride_part, K, BLOCK_K)


_propagate_kernel_tuned = maybe_autotune(_propagate_kernel, key=["D", "K", "VOTE"])


def _launch(queries, labeled, classes, log_rho, k, tau, *, vote, splits, block_m, block_n):
    """Runs the kernel; returns (True, (labels, conf)) when the vote ran in the kernel, else
    (False, (vals, idx)): the splits' candidates, each (Q, splits*k)."""
    q, keys = rowmajor(queries), rowmajor(labeled)
    n_q, n_k, d = q.shape[0], keys.shape[0], q.shape[1]
    bm, bn, warps, stages = tile_config(q.dtype, d, k, n_q, block_m=block_m, block_n=block_n)
    row_blocks = triton.cdiv(n_q, bm)
    n_splits, chunk = split_range(n_k, row_blocks, bn, q.device, splits)
    vote_here = vote and n_splits == 1
    dev = q.device
    bias = log_rho.to(torch.float32).contiguous() if log_rho is not None else None
    if vote_here:
        labels = torch.empty(n_q, dtype=torch.int64, device=dev)
        conf = torch.empty(n_q, dtype=torch.float32, device=dev)
        vals = idx = labels  # unused pointers
    else:
        vals = torch.empty(n_q, n_splits * k, dtype=torch.float32, device=dev)
        idx = torch.empty(n_q, n_splits * k, dtype=torch.int64, device=dev)
        labels = conf = vals
    args = (
        q, keys, bias if bias is not None else q, classes if classes is not None else idx,
        labels, conf, vals, idx,
        n_q, n_k, d, q.stride(0), keys.stride(0), n_splits * k, 1.0 / tau, chunk,
    )  # fmt: skip
    consts = dict(
        K=k, HAS_BIAS=bias is not None, VOTE=vote_here, BLOCK_D=block_d(d),
        BLOCK_K=max(16, triton.next_power_of_2(k)), INPUT_PRECISION=input_precision(q.dtype),
    )  # fmt: skip
    launch(_propagate_kernel_tuned, n_q, n_splits, args, consts, (bm, bn, warps, stages))
    return vote_here, (labels, conf) if vote_here else (vals, idx)


def _accepts(queries, labeled, k):
    return supported_embeddings(queries, labeled) and launchable(queries, labeled) and 1 <= k <= MAX_K


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
        labels (Q,) int64 and confidence (Q,) float32, or NotImplemented for float64, k > 64
        or D > 256 (the op then runs the reference).
    """
    if not _accepts(queries, labeled, k):
        return NotImplemented
    n_q = queries.shape[0]
    if n_q == 0:
        return (torch.empty(0, dtype=torch.int64, device=queries.device),
                torch.empty(0, dtype=torch.float32, device=queries.device))  # fmt: skip
    classes = labeled_classes.to(torch.int64).contiguous()
    voted, out = _launch(
        queries, labeled, classes, log_rho, k, tau, vote=True, splits=splits, block_m=block_m, block_n=block_n
    )
    if voted:
        return out
    vals, idx = merge_splits(*out, k)
    return _vote_host(vals, idx.clamp_min(0), classes, num_classes)


def propagate_topk_triton(
    queries: torch.Tensor,
    labeled: torch.Tensor,
    log_rho: torch.Tensor | None,
    k: int,
    tau: float,
    *,
    splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
):
    """The neighbours behind :func:`propagate_triton`: ``(queries @ labeled.T / tau -
    log_rho).topk(k, dim=1)`` as (values (Q, k) float32 sorted descending, indices (Q, k)
    int64), without the (Q, M) matrix. NotImplemented where propagate_triton is."""
    if not _accepts(queries, labeled, k):
        return NotImplemented
    _, (vals, idx) = _launch(
        queries, labeled, None, log_rho, k, tau, vote=False, splits=splits, block_m=block_m, block_n=block_n
    )
    return merge_splits(vals, idx, k)
