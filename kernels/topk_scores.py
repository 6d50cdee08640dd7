"""Streaming top-K of biased scores (the ``topk_scores`` op), and the split path that
``propagate`` and ``local_density`` share.

``topk_candidates`` computes, without the (Q, N) score matrix,

    s = queries.float() @ keys.float().T / tau - bias                  # (Q, N), never stored
    s = s.masked_fill(~mask, -inf)
    values, indices = s.topk(k, dim=1)        # ties to the lower index, -inf / -1 padding

Programs on a (query blocks, key splits) grid each stream their key range through
``_topk.block_topk`` and write their K candidates per row; ``reference.merge_topk`` merges
the splits' candidates (Q x splits*K) on the host side. ``topk_scores_triton`` is the op's
launcher: the bias added rather than subtracted, indices offset, and the earlier call's
top-k (``init``) merged in.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._launch import (
    block_d,
    decline_reason,
    input_precision,
    launch,
    maybe_autotune,
    rowmajor,
    split_range,
    tile_config,
)
from ._topk import block_topk, store_partial

__all__ = ["TopKPlan", "topk_candidates", "topk_plan", "topk_scores_triton", "topk_scores_triton_declines"]


@triton.jit
def _topk_scores_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    mask_ptr,
    vals_ptr,
    idx_ptr,
    Q,
    N,
    D,
    stride_q,
    stride_k,
    stride_part,
    inv_tau,
    chunk,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows, row_ok, buf_v, buf_i = block_topk(
        q_ptr, k_ptr, bias_ptr, mask_ptr, Q, N, D, stride_q, stride_k, inv_tau, chunk,
        K, HAS_BIAS, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, INPUT_PRECISION,
    )  # fmt: skip
    store_partial(vals_ptr, idx_ptr, buf_v, buf_i, rows, row_ok, tl.program_id(1), stride_part, K, BLOCK_K)


_topk_scores_kernel_tuned = maybe_autotune(_topk_scores_kernel, key=["D", "K", "HAS_BIAS", "HAS_MASK"])


@dataclasses.dataclass(frozen=True)
class TopKPlan:
    """How a top-K launch covers (Q, N): row-major operands, tiles, and the key splits."""

    queries: torch.Tensor
    keys: torch.Tensor
    k: int
    tiles: tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
    n_splits: int
    chunk: int

    def consts(self) -> dict:
        """The constexprs every top-K kernel takes besides its own switches."""
        return dict(
            K=self.k,
            BLOCK_D=block_d(self.queries.shape[1]),
            BLOCK_K=max(16, triton.next_power_of_2(self.k)),
            INPUT_PRECISION=input_precision(self.queries.dtype),
        )

    def args(self) -> tuple:
        """Q, N, D, the two row strides: the sizes every top-K kernel takes after its pointers."""
        q, keys = self.queries, self.keys
        return (q.shape[0], keys.shape[0], q.shape[1], q.stride(0), keys.stride(0))


def topk_plan(queries, keys, k: int, *, splits=None, block_m=None, block_n=None) -> TopKPlan:
    """Tiles from the launch heuristic and the key axis cut into ``splits`` ranges (from the
    heuristic unless given) so that few query blocks still fill the GPU."""
    q, kk = rowmajor(queries), rowmajor(keys)
    tiles = tile_config(q.dtype, q.shape[1], k, q.shape[0], block_m=block_m, block_n=block_n)
    n_splits, chunk = split_range(kk.shape[0], triton.cdiv(q.shape[0], tiles[0]), tiles[1], q.device, splits)
    return TopKPlan(q, kk, k, tiles, n_splits, chunk)


def topk_candidates(
    plan: TopKPlan, tau: float, *, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (Q, k) float32 sorted descending, indices (Q, k) int64) of
    ``queries @ keys.T / tau - bias`` over the keys where ``mask`` (bias subtracted, as
    ``propagate``'s ``log_rho``): equal values by the lower index, -inf / -1 padding."""
    from llp_fast.reference import merge_topk

    q, k, dev = plan.queries, plan.k, plan.queries.device
    vals = torch.empty(q.shape[0], plan.n_splits * k, dtype=torch.float32, device=dev)
    idx = torch.empty(q.shape[0], plan.n_splits * k, dtype=torch.int64, device=dev)
    if q.shape[0]:
        bias_f = bias.to(torch.float32).contiguous() if bias is not None else None
        # bool -> uint8 is a view (same element size): the kernel reads the mask in place.
        mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
        args = (
            q, plan.keys, bias_f if bias_f is not None else q, mask_u8 if mask_u8 is not None else q, vals, idx,
            *plan.args(), plan.n_splits * k, 1.0 / tau, plan.chunk,
        )  # fmt: skip
        consts = dict(plan.consts(), HAS_BIAS=bias is not None, HAS_MASK=mask is not None)
        launch(_topk_scores_kernel_tuned, q.shape[0], plan.n_splits, args, consts, plan.tiles)
    return merge_topk(vals, idx, k)


def topk_scores_triton_declines(queries, keys, k, tau, bias, key_mask, init_values, init_indices, index_offset):
    """Why :func:`topk_scores_triton` would hand this call to the reference, or None."""
    return decline_reason(queries, keys, k=k)


def topk_scores_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    tau: float,
    bias: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    init_values: torch.Tensor | None,
    init_indices: torch.Tensor | None,
    index_offset: int,
    *,
    splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
):
    """Launcher for ``llp_fast::topk_scores``: same arguments as its default body.

    Args:
        queries: (Q, D) float32/bfloat16/float16; keys: (N, D) same dtype, D <= 256, N >= 1.
        k: <= 64. bias: (N,) added to the scores, or None. key_mask: (N,) bool or None.
        init_values, init_indices: (Q, k) from an earlier call, or None.
        index_offset: added to the key indices.
        splits, block_m, block_n: override the heuristic (tests).

    Returns:
        (values (Q, k) float32, indices (Q, k) int64), or NotImplemented where
        :func:`topk_scores_triton_declines` gives a reason (the op then runs the reference).
    """
    from llp_fast.reference import merge_topk

    if topk_scores_triton_declines(queries, keys, k, tau, bias, key_mask, init_values, init_indices, index_offset):
        return NotImplemented
    plan = topk_plan(queries, keys, k, splits=splits, block_m=block_m, block_n=block_n)
    values, indices = topk_candidates(plan, tau, bias=-bias if bias is not None else None, mask=key_mask)
    indices = torch.where(indices >= 0, indices + index_offset, indices)
    if init_values is not None:
        values = torch.cat([init_values.to(torch.float32), values], dim=1)
        indices = torch.cat([init_indices.to(torch.int64), indices], dim=1)
        values, indices = merge_topk(values, indices, k)
    return values, indices
