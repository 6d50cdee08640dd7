"""Streaming top-K of biased scores: the Triton kernel of the ``topk_scores`` op, and through it of
every selection the package makes on CUDA (``local_density`` and ``propagate`` finish its output,
docs/method.md §1.1, §1.2). ``topk_scores_triton`` computes, without the (Q, N) score matrix,

    s = queries.float() @ keys.float().T / tau + bias                 # (Q, N), never stored
    s = s.masked_fill(~mask, -inf)
    values, indices = s.topk(k, dim=1)       # ties to the lower index, -inf / -1 padding

merged with an earlier call's top-k (``init``), indices offset by ``index_offset``.

Programs run on a (query blocks, splits) grid. A split walks its keys (``_stream_topk``): one
contiguous range for K <= 64, the tiles p, p + S, p + 2S, ... for a two-level K (below). It keeps each
row's best K' = min(K, 64) scores and their indices in a register buffer and never writes a score.
Each split writes its K' candidates per row, and
``llp_fast._topk.merge_topk`` merges the S lists on the host side.

Selection in a split. Each row keeps an *unsorted* buffer of K' slots whose minimum is the row's
running K'-th best score (the threshold). A tile only costs a comparison against the thresholds
unless some score beats its row's threshold; then the tile is merged by repeatedly moving each row's
best remaining tile score into that row's minimum slot while it beats the threshold (at most K'
rounds a tile; most tiles need none: ``python bench/merge_rounds.py``). No sort, no ``tl.sort``:
only max/min/where reductions. Equal scores keep the lower key index: a tile's equal scores enter
in column order, a score equal to the threshold does not enter (its key comes later), and the slot
given up is the highest index among equal minima.

K above 64 (up to 1024): a two-level top-K. The buffer stays at 64 slots and the keys are dealt to
S >= 2K / 64 splits, so that the S * 64 candidates of a row hold its top K whenever no split holds
more than 64 of them (the tiles are dealt round-robin, so rows of one cluster stored together are
spread over the splits). That is checked, exactly, per row: a split's list is complete above the
merged K-th value when the list is not full or its worst entry is below that value. Rows that fail
(a query with more than 64 of its top K in one split) are selected again with four times the
splits, and any that fail again by the reference. The result is the exact top-K either way.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._blocks import dot, load_cols, load_rows
from ._launch import block_d, decline_reason, input_precision, launch, maybe_autotune, rowmajor, tile_config

__all__ = ["SLOTS", "TopKPlan", "topk_candidates", "topk_plan", "topk_scores_triton", "topk_scores_triton_declines"]

SLOTS = 64  # K' = the register buffer of a split: K <= 64 in one pass, larger K two-level
CANDIDATE_BYTES = 256 << 20  # per launch, the (rows, splits * K') candidate lists; more rows: launches


@triton.jit
def _stream_topk(
    q, row_ok, k_ptr, bias_ptr, mask_ptr, split, n_splits, chunk, N, D, stride_k, inv_tau,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, STRIDED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Top-K of ``q @ keys.T * inv_tau + bias`` per row over this split's keys (``STRIDED``: the
    tiles ``split``, ``split + n_splits``, ...; else the ``chunk`` keys from ``split * chunk``, a
    loop the software pipeliner prefetches best), keys whose ``mask`` is set. Returns (values
    (BLOCK_M, BLOCK_K) float32, indices int64), unsorted. Slots >= K (padding up to a power of two)
    hold +inf so that the row minimum ignores them; slots that no key filled hold -inf and index -1."""
    offs_n = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, BLOCK_K)
    buf_v = tl.full((BLOCK_M, BLOCK_K), float("-inf"), tl.float32)
    buf_v = tl.where(slots[None, :] < K, buf_v, float("inf"))
    buf_i = tl.full((BLOCK_M, BLOCK_K), -1, tl.int64)
    thr = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    # A loop of unit step over this split's tiles (a runtime step in range() stops Triton's software
    # pipeliner: the loads of the next tile are no longer prefetched).
    if STRIDED:
        base, stride, last = split * BLOCK_N, n_splits * BLOCK_N, N
        count = tl.cdiv(tl.cdiv(N, BLOCK_N) - split, n_splits)
    else:
        base, stride = split * chunk, BLOCK_N
        last = tl.minimum(base + chunk, N)
        count = tl.cdiv(last - base, BLOCK_N)
    for t in range(0, count):
        n0 = base + t * stride
        cols = n0 + offs_n
        col_ok = cols < last
        kt = load_cols(k_ptr, cols, col_ok, D, stride_k, BLOCK_D)
        s = dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INPUT_PRECISION) * inv_tau
        cols64 = cols.to(tl.int64)
        if HAS_BIAS:
            s = s + tl.load(bias_ptr + cols64, mask=col_ok, other=0.0)[None, :]
        if HAS_MASK:
            col_ok = col_ok & (tl.load(mask_ptr + cols64, mask=col_ok, other=0) != 0)
        s = tl.where(row_ok[:, None] & col_ok[None, :], s, float("-inf"))
        # Only a score above its row's K-th best can enter: most tiles stop at this test.
        cmax = tl.max(s, axis=1)
        go = tl.max((cmax > thr).to(tl.int32), axis=0) > 0
        # The while sits inside an if: a bare scf.while in the loop body stops Triton's software
        # pipeliner (no cp.async prefetch of the next key tile); behind an scf.if the loads are
        # pipelined again (checked in the sm_90 PTX).
        if go:
            while go:
                # Per row: the best remaining tile score (first column on ties) ...
                carg = tl.min(tl.where(s == cmax[:, None], offs_n[None, :], BLOCK_N), axis=1)
                take = cmax > thr
                # ... replaces the buffer's worst entry, if it beats it: the minimum, and among
                # equal minima the highest key index (equal scores keep the lower index).
                at_thr = buf_v == thr[:, None]
                worst = tl.max(tl.where(at_thr, buf_i, -2), axis=1)
                slot = tl.min(tl.where(at_thr & (buf_i == worst[:, None]), slots[None, :], BLOCK_K), axis=1)
                put = take[:, None] & (slots[None, :] == slot[:, None])
                buf_v = tl.where(put, cmax[:, None], buf_v)
                buf_i = tl.where(put, (n0 + carg).to(tl.int64)[:, None], buf_i)
                # Thresholds only rise, so a row with nothing left above its threshold stays done;
                # removing its argmax column too is harmless.
                s = tl.where(offs_n[None, :] == carg[:, None], float("-inf"), s)
                thr = tl.min(buf_v, axis=1)
                cmax = tl.max(s, axis=1)
                go = tl.max((cmax > thr).to(tl.int32), axis=0) > 0
    return buf_v, buf_i


@triton.jit
def _topk_scores_kernel(
    q_ptr, k_ptr, bias_ptr, mask_ptr, vals_ptr, idx_ptr, Q, N, D, stride_q, stride_k, stride_part, inv_tau, chunk,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, STRIDED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (row block, split): this split's K candidates of each row, written to
    ``vals[row, split*K : split*K + K]`` (and their indices) for the host-side merge."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Q
    q = load_rows(q_ptr, rows, row_ok, D, stride_q, BLOCK_D)
    split, n_splits = tl.program_id(1), tl.num_programs(1)
    buf_v, buf_i = _stream_topk(
        q, row_ok, k_ptr, bias_ptr, mask_ptr, split, n_splits, chunk, N, D, stride_k, inv_tau,
        K, HAS_BIAS, HAS_MASK, STRIDED, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, INPUT_PRECISION,
    )  # fmt: skip
    slots = tl.arange(0, BLOCK_K)
    off = rows.to(tl.int64)[:, None] * stride_part + split * K + slots[None, :]
    ok = row_ok[:, None] & (slots[None, :] < K)
    tl.store(vals_ptr + off, buf_v, mask=ok)
    tl.store(idx_ptr + off, buf_i, mask=ok)


_topk_scores_kernel_tuned = maybe_autotune(_topk_scores_kernel, key=["D", "K", "HAS_BIAS", "HAS_MASK", "STRIDED"])


@dataclasses.dataclass(frozen=True)
class TopKPlan:
    """How a launch covers (Q, N): row-major operands, tiles, the splits and the slots per split."""

    queries: torch.Tensor
    keys: torch.Tensor
    k: int
    slots: int  # K' = min(k, SLOTS)
    tiles: tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
    n_splits: int

    @property
    def two_level(self) -> bool:
        return self.slots < self.k


def topk_plan(queries, keys, k: int, *, splits=None, block_m=None, block_n=None) -> TopKPlan:
    """Tiles from the launch heuristic; splits enough to fill the GPU when there are few query
    blocks (the per-step case: a few hundred queries against up to 1.3M keys), at least 2K / 64 for
    a two-level K, at most one per key tile (``splits`` forces a count: tests)."""
    from ._launch import target_programs

    q, kk = rowmajor(queries), rowmajor(keys)
    slots = min(k, SLOTS)
    tiles = tile_config(q.dtype, q.shape[1], slots, q.shape[0], block_m=block_m, block_n=block_n)
    n_tiles = triton.cdiv(kk.shape[0], tiles[1])
    if splits is None:
        row_blocks = triton.cdiv(q.shape[0], tiles[0])
        # Keep each split long enough (>= 4 tiles) that its running top-K pays for itself.
        splits = min(max(1, target_programs(q.device) // max(row_blocks, 1)), triton.cdiv(n_tiles, 4))
        if k > slots:
            splits = max(splits, triton.cdiv(2 * k, slots))
    return TopKPlan(q, kk, k, slots, tiles, max(1, min(splits, n_tiles)))


def _launch_rows(plan: TopKPlan, q: torch.Tensor, tau: float, bias, mask, n_splits: int):
    """Every split's candidates for the rows ``q`` (a row range of the plan's queries):
    (values, indices), each (rows, n_splits * K')."""
    keys, slots, dev = plan.keys, plan.slots, q.device
    block_n = plan.tiles[1]
    # One level: each split a contiguous range of whole tiles. Two levels: the tiles dealt round-robin.
    chunk = triton.cdiv(triton.cdiv(keys.shape[0], n_splits), block_n) * block_n
    n_splits = n_splits if plan.two_level else triton.cdiv(keys.shape[0], chunk)
    vals = torch.empty(q.shape[0], n_splits * slots, dtype=torch.float32, device=dev)
    idx = torch.empty(q.shape[0], n_splits * slots, dtype=torch.int64, device=dev)
    args = (
        q, keys, bias if bias is not None else q, mask if mask is not None else q, vals, idx,
        q.shape[0], keys.shape[0], q.shape[1], q.stride(0), keys.stride(0), n_splits * slots, 1.0 / tau, chunk,
    )  # fmt: skip
    consts = dict(
        K=slots,
        BLOCK_D=block_d(q.shape[1]),
        BLOCK_K=max(16, triton.next_power_of_2(slots)),
        INPUT_PRECISION=input_precision(q.dtype),
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        STRIDED=plan.two_level,
    )
    launch(_topk_scores_kernel_tuned, q.shape[0], n_splits, args, consts, plan.tiles)
    return vals, idx


def _unsure(vals: torch.Tensor, idx: torch.Tensor, kth: torch.Tensor, slots: int) -> torch.Tensor:
    """Rows whose merged top-K may miss a key: some split's list is full and its worst entry is not
    below the merged K-th value (that split may hold more keys at or above it)."""
    r = vals.shape[0]
    worst = vals.view(r, -1, slots).amin(dim=2)
    full = (idx.view(r, -1, slots) >= 0).all(dim=2)
    return (full & (worst >= kth[:, None])).any(dim=1)


def topk_candidates(plan: TopKPlan, tau: float, *, bias=None, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (Q, k) float32 sorted descending, indices (Q, k) int64) of
    ``queries @ keys.T / tau + bias`` over the keys where ``mask``: equal values by the lower index,
    -inf / -1 padding. Exact for every k (see the module's two-level scheme)."""
    from llp_fast._topk import merge_topk
    from llp_fast.reference import topk_scores_ref

    q, k, dev = plan.queries, plan.k, plan.queries.device
    values = torch.empty(q.shape[0], k, dtype=torch.float32, device=dev)
    indices = torch.empty(q.shape[0], k, dtype=torch.int64, device=dev)
    bias_f = bias.to(torch.float32).contiguous() if bias is not None else None
    # bool -> uint8 is a view (same element size): the kernel reads the mask in place.
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    step = max(plan.tiles[0], CANDIDATE_BYTES // (12 * plan.n_splits * plan.slots))
    for r0 in range(0, q.shape[0], step):
        rows = q[r0 : r0 + step]
        vals, idx = _launch_rows(plan, rows, tau, bias_f, mask_u8, plan.n_splits)
        v, i = merge_topk(vals, idx, k)
        if plan.two_level:
            again = torch.nonzero(_unsure(vals, idx, v[:, -1], plan.slots)).squeeze(1)
            if again.numel():
                n_tiles = triton.cdiv(plan.keys.shape[0], plan.tiles[1])
                more = min(4 * plan.n_splits, n_tiles)
                vals, idx = _launch_rows(plan, rows[again].contiguous(), tau, bias_f, mask_u8, more)
                v2, i2 = merge_topk(vals, idx, k)
                v[again], i[again] = v2, i2
                still = again[_unsure(vals, idx, v2[:, -1], plan.slots)]
                if still.numel():  # clustered beyond what splits spread: the reference, exactly
                    v[still], i[still] = topk_scores_ref(rows[still], plan.keys, k, tau, bias_f, mask)
        values[r0 : r0 + step], indices[r0 : r0 + step] = v, i
    return values, indices


MAX_K = 1024


def topk_scores_triton_declines(queries, keys, k, tau, bias, key_mask, init_values, init_indices, index_offset):
    """Why :func:`topk_scores_triton` would hand this call to the reference, or None."""
    return decline_reason(queries, keys, k=k, max_k=MAX_K)


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
        k: <= 1024. bias: (N,) added to the scores, or None. key_mask: (N,) bool or None.
        init_values, init_indices: (Q, k) from an earlier call, or None.
        index_offset: added to the key indices.
        splits, block_m, block_n: override the heuristic (tests).

    Returns:
        (values (Q, k) float32, indices (Q, k) int64), or NotImplemented where
        :func:`topk_scores_triton_declines` gives a reason (the op then runs the reference).
    """
    from llp_fast._topk import merge_topk

    if topk_scores_triton_declines(queries, keys, k, tau, bias, key_mask, init_values, init_indices, index_offset):
        return NotImplemented
    plan = topk_plan(queries, keys, k, splits=splits, block_m=block_m, block_n=block_n)
    values, indices = topk_candidates(plan, tau, bias=bias, mask=key_mask)
    indices = torch.where(indices >= 0, indices + index_offset, indices)
    if init_values is not None:
        values = torch.cat([init_values.to(torch.float32), values], dim=1)
        indices = torch.cat([init_indices.to(torch.int64), indices], dim=1)
        values, indices = merge_topk(values, indices, k)
    return values, indices
