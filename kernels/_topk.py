"""Device-side pieces shared by the Triton kernels.

Users: the top-K kernels of ``propagate.py``, ``local_density.py`` and ``topk_scores.py``
(``block_topk`` and through it ``stream_topk``; ``buffer_max``, ``store_partial``) and the
aggregation-loss kernels of ``aggregation_loss.py`` (``dot``, ``load_rows``, ``load_cols``).

``stream_topk`` is the streaming selection of docs/method.md §1.1/§1.2: one program holds a
block of query rows and walks a range of key rows tile by tile, computing

    scores = queries[rows] @ keys[n0:n1].T / tau - bias[n0:n1]     (masked keys -> -inf)

with ``tl.dot`` and keeping, per query row, the K best scores and their key indices in a
register buffer. The score tile never leaves the registers.

Selection. Each row keeps an *unsorted* buffer of K slots whose minimum is the row's running
K-th best score (the threshold). A tile only costs a comparison against the thresholds unless
some score beats its row's threshold; then the tile is merged by repeatedly moving each
row's best remaining tile score into that row's minimum slot while it beats the threshold.
Every round inserts one score per row that still has a better candidate, so a tile costs at
most K rounds (as many as the most insertions any of its rows needs). A row sees about
K * ln(M / K) insertions over a stream of M keys, most of them in the first tiles, so most
tiles cost none or one round (``python bench/merge_rounds.py`` simulates the rounds per tile
on random unit vectors; ``--no-density`` for local density's case). No sort of the tile, no
``tl.sort``/``tl.topk`` (absent from older Triton), only max/min/where reductions. Equal
scores keep the lower key index, as in the CPU kernels: a tile's equal scores enter in column
order, a score equal to the threshold does not enter (its key comes later), and the slot
given up is the highest index among equal minima.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Fixed at import, as triton.jit itself decides there whether to interpret.
_INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. The CPU interpreter multiplies bfloat16 blocks
    as their raw uint16 bits (triton 3.9), so there the operands are widened to fp32 first:
    exact, since every bf16 product is exact in fp32, as on the tensor cores."""
    if _INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def load_rows(ptr, rows, row_ok, D, stride, BLOCK_D: tl.constexpr):
    """(BLOCK_ROWS, BLOCK_D) block of a row-major matrix; rows past the end and the columns
    past D (padding up to the power-of-two BLOCK_D) read as zeros so they add nothing to a dot."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def load_cols(ptr, cols, col_ok, D, stride, BLOCK_D: tl.constexpr):
    """The same rows loaded transposed, (BLOCK_D, BLOCK_COLS): the right operand of q @ k.T."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = ptr + cols.to(tl.int64)[None, :] * stride + offs_d[:, None]
    return tl.load(ptrs, mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)


@triton.jit
def stream_topk(
    q,  # (BLOCK_M, BLOCK_D) query block, already loaded
    row_ok,  # (BLOCK_M,) which rows are real
    k_ptr,
    bias_ptr,
    mask_ptr,
    n_start,
    n_end,
    D,
    stride_k,
    inv_tau,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Top-K of ``q @ keys[n_start:n_end].T * inv_tau - bias`` per row, over keys whose
    ``mask`` is set. Returns (values (BLOCK_M, BLOCK_K) float32, indices int64), unsorted.

    Slots >= K (padding of the buffer up to a power of two) hold +inf so that the row minimum
    (the threshold) ignores them; callers mask them out with ``slot < K``. Slots that no key
    filled hold -inf and index -1 (a range with fewer than K keys, as a split may have)."""
    offs_n = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, BLOCK_K)
    buf_v = tl.full((BLOCK_M, BLOCK_K), float("-inf"), tl.float32)
    buf_v = tl.where(slots[None, :] < K, buf_v, float("inf"))
    buf_i = tl.full((BLOCK_M, BLOCK_K), -1, tl.int64)
    thr = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < n_end
        kt = load_cols(k_ptr, cols, col_ok, D, stride_k, BLOCK_D)
        s = dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INPUT_PRECISION) * inv_tau
        cols64 = cols.to(tl.int64)
        if HAS_BIAS:
            s = s - tl.load(bias_ptr + cols64, mask=col_ok, other=0.0)[None, :]
        if HAS_MASK:
            col_ok = col_ok & (tl.load(mask_ptr + cols64, mask=col_ok, other=0) != 0)
        s = tl.where(row_ok[:, None] & col_ok[None, :], s, float("-inf"))
        # Only a score above its row's K-th best can enter: most tiles stop at this test.
        cmax = tl.max(s, axis=1)
        go = tl.max((cmax > thr).to(tl.int32), axis=0) > 0
        # The while sits inside an if: a bare scf.while in the loop body stops Triton's
        # software pipeliner (no cp.async prefetch of the next key tile); behind an scf.if
        # the loads are pipelined again (checked in the sm_90 PTX).
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
                # Thresholds only rise, so a row with nothing left above its threshold stays
                # done; removing its argmax column too is harmless.
                s = tl.where(offs_n[None, :] == carg[:, None], float("-inf"), s)
                thr = tl.min(buf_v, axis=1)
                cmax = tl.max(s, axis=1)
                go = tl.max((cmax > thr).to(tl.int32), axis=0) > 0
    return buf_v, buf_i


@triton.jit
def block_topk(
    q_ptr,
    k_ptr,
    bias_ptr,
    mask_ptr,
    Q,
    N,
    D,
    stride_q,
    stride_k,
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
    """The common start of the top-K kernels, on a (row blocks, splits) grid: this program's
    query rows (``rows``, ``row_ok``) and their top-K buffer over its split's key range
    ``[split * chunk, (split + 1) * chunk)`` (see :func:`stream_topk`)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Q
    q = load_rows(q_ptr, rows, row_ok, D, stride_q, BLOCK_D)
    n_start = tl.program_id(1) * chunk
    n_end = tl.minimum(n_start + chunk, N)
    buf_v, buf_i = stream_topk(
        q, row_ok, k_ptr, bias_ptr, mask_ptr, n_start, n_end, D, stride_k, inv_tau,
        K, HAS_BIAS, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, INPUT_PRECISION,
    )  # fmt: skip
    return rows, row_ok, buf_v, buf_i


@triton.jit
def buffer_max(buf_v, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row maximum over the K real slots (the +inf padding slots excluded)."""
    slots = tl.arange(0, BLOCK_K)
    return tl.max(tl.where(slots[None, :] < K, buf_v, float("-inf")), axis=1)


@triton.jit
def store_partial(
    vals_ptr, idx_ptr, buf_v, buf_i, rows, row_ok, split, stride_row, K: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Writes a split's K candidates of each row to ``vals[row, split*K : split*K + K]``
    (and their indices), for the merge of the split ranges on the host side."""
    slots = tl.arange(0, BLOCK_K)
    off = rows.to(tl.int64)[:, None] * stride_row + split * K + slots[None, :]
    ok = row_ok[:, None] & (slots[None, :] < K)
    tl.store(vals_ptr + off, buf_v, mask=ok)
    tl.store(idx_ptr + off, buf_i, mask=ok)
