"""Fused local density (docs/method.md §1.1, the ``local_density`` op).

``local_density_triton`` computes, without the (M, N) similarity matrix,

    s = labeled.float() @ bank.float().T / tau                     # (M, N), never stored
    s = s.masked_fill(~pool_mask, -inf)                            # pool rows only
    log_rho = torch.logsumexp(s.topk(t, dim=1).values, dim=1)

with the same streaming top-T as ``propagate`` (``_topk.stream_topk``): one program per
block of labeled rows walks (a range of) the bank; the pool mask is read per key tile, so
the pool is never copied out of the bank.
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
from ._topk import buffer_max, load_rows, store_partial, stream_topk

__all__ = ["local_density_triton"]


@triton.jit
def _local_density_kernel(
    q_ptr,
    k_ptr,
    mask_ptr,
    out_ptr,
    vals_ptr,
    idx_ptr,
    M,
    N,
    D,
    stride_q,
    stride_k,
    stride_part,
    inv_tau,
    chunk,
    T: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    q = load_rows(q_ptr, rows, row_ok, D, stride_q, BLOCK_D)
    n_start = split * chunk
    n_end = tl.minimum(n_start + chunk, N)
    buf_v, buf_i = stream_topk(
        q, row_ok, k_ptr, mask_ptr, mask_ptr, n_start, n_end, D, stride_k, inv_tau,
        T, False, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, INPUT_PRECISION,
    )  # fmt: skip
    if REDUCE:
        # log-sum-exp of the T real slots, shifted by the row maximum.
        slots = tl.arange(0, BLOCK_K)
        top = buffer_max(buf_v, T, BLOCK_K)
        top = tl.where(top == float("-inf"), 0.0, top)  # padding rows past M: keep them NaN-free
        w = tl.where((slots[None, :] < T) & (buf_i >= 0), tl.exp(buf_v - top[:, None]), 0.0)
        total = tl.sum(w, axis=1)  # >= 1 on real rows (the maximum's own term)
        tl.store(out_ptr + rows, top + tl.log(tl.where(total > 0, total, 1.0)), mask=row_ok)
    else:
        store_partial(vals_ptr, idx_ptr, buf_v, buf_i, rows, row_ok, split, stride_part, T, BLOCK_K)


_local_density_kernel_tuned = maybe_autotune(_local_density_kernel, key=["D", "T", "HAS_MASK", "REDUCE"])


def local_density_triton(
    labeled: torch.Tensor,
    bank: torch.Tensor,
    t: int,
    tau: float,
    pool_mask: torch.Tensor | None,
    *,
    splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
):
    """Launcher for ``llp_fast::local_density``: same arguments as its default body.

    Args:
        labeled: (M, D) float32/bfloat16/float16; bank: (N, D) same dtype, D <= 256.
        t: density neighbours, 1 <= t <= 64 and <= the pool size.
        pool_mask: (N,) bool or None (every bank row).
        splits, block_m, block_n: override the heuristic (tests).

    Returns:
        log_rho (M,) float32, or NotImplemented for float64, t > 64 or D > 256.
    """
    if not (supported_embeddings(labeled, bank) and launchable(labeled, bank) and 1 <= t <= MAX_K):
        return NotImplemented
    q, keys = rowmajor(labeled), rowmajor(bank)
    n_q, n_k, d = q.shape[0], keys.shape[0], q.shape[1]
    dev = q.device
    if n_q == 0:
        return torch.empty(0, dtype=torch.float32, device=dev)
    bm, bn, warps, stages = tile_config(q.dtype, d, t, n_q, block_m=block_m, block_n=block_n)
    row_blocks = triton.cdiv(n_q, bm)
    n_splits, chunk = split_range(n_k, row_blocks, bn, dev, splits)
    reduce_here = n_splits == 1
    # bool -> uint8 is a view (same element size): the kernel reads the mask in place.
    mask = pool_mask.contiguous().view(torch.uint8) if pool_mask is not None else None
    out = torch.empty(n_q, dtype=torch.float32, device=dev)
    if reduce_here:
        vals = idx = out  # unused pointers
    else:
        vals = torch.empty(n_q, n_splits * t, dtype=torch.float32, device=dev)
        idx = torch.empty(n_q, n_splits * t, dtype=torch.int64, device=dev)
    args = (
        q, keys, mask if mask is not None else q, out, vals, idx,
        n_q, n_k, d, q.stride(0), keys.stride(0), n_splits * t, 1.0 / tau, chunk,
    )  # fmt: skip
    consts = dict(
        T=t, HAS_MASK=mask is not None, REDUCE=reduce_here, BLOCK_D=block_d(d),
        BLOCK_K=max(16, triton.next_power_of_2(t)), INPUT_PRECISION=input_precision(q.dtype),
    )  # fmt: skip
    launch(_local_density_kernel_tuned, n_q, n_splits, args, consts, (bm, bn, warps, stages))
    if reduce_here:
        return out
    top, _ = merge_splits(vals, idx, t)
    return torch.logsumexp(top, dim=1)
