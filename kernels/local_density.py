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

from ._launch import decline_reason, launch, maybe_autotune
from ._topk import block_topk, buffer_max
from .topk_scores import topk_candidates, topk_plan

__all__ = ["local_density_triton", "local_density_triton_declines"]


@triton.jit
def _local_density_kernel(
    q_ptr,
    k_ptr,
    mask_ptr,
    out_ptr,
    Q,
    N,
    D,
    stride_q,
    stride_k,
    inv_tau,
    chunk,
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows, row_ok, buf_v, buf_i = block_topk(
        q_ptr, k_ptr, mask_ptr, mask_ptr, Q, N, D, stride_q, stride_k, inv_tau, chunk,
        K, False, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, INPUT_PRECISION,
    )  # fmt: skip
    # log-sum-exp of the T real slots, shifted by the row maximum.
    slots = tl.arange(0, BLOCK_K)
    top = buffer_max(buf_v, K, BLOCK_K)
    top = tl.where(top == float("-inf"), 0.0, top)  # padding rows past M: keep them NaN-free
    w = tl.where((slots[None, :] < K) & (buf_i >= 0), tl.exp(buf_v - top[:, None]), 0.0)
    total = tl.sum(w, axis=1)  # >= 1 on real rows (the maximum's own term)
    tl.store(out_ptr + rows, top + tl.log(tl.where(total > 0, total, 1.0)), mask=row_ok)


_local_density_kernel_tuned = maybe_autotune(_local_density_kernel, key=["D", "K", "HAS_MASK"])


def local_density_triton_declines(labeled, bank, t, tau, pool_mask):
    """Why :func:`local_density_triton` would hand this call to the reference, or None."""
    return decline_reason(labeled, bank, k=t, k_name="t")


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
        log_rho (M,) float32, or NotImplemented where :func:`local_density_triton_declines`
        gives a reason (float64, t > 64, D > 256, ...).
    """
    if local_density_triton_declines(labeled, bank, t, tau, pool_mask):
        return NotImplemented
    n_q, dev = labeled.shape[0], labeled.device
    if n_q == 0:
        return torch.empty(0, dtype=torch.float32, device=dev)
    plan = topk_plan(labeled, bank, t, splits=splits, block_m=block_m, block_n=block_n)
    if plan.n_splits > 1:
        top, _ = topk_candidates(plan, tau, mask=pool_mask)
        return torch.logsumexp(top, dim=1)
    # bool -> uint8 is a view (same element size): the kernel reads the mask in place.
    mask = pool_mask.contiguous().view(torch.uint8) if pool_mask is not None else None
    out = torch.empty(n_q, dtype=torch.float32, device=dev)
    q = plan.queries
    args = (q, plan.keys, mask if mask is not None else q, out, *plan.args(), 1.0 / tau, plan.chunk)
    launch(_local_density_kernel_tuned, n_q, 1, args, dict(plan.consts(), HAS_MASK=mask is not None), plan.tiles)
    return out
