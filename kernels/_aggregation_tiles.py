"""What the aggregation-loss kernels share (kernels/aggregation_loss.py, forward and backward;
kernels/aggregation_loss_fused.py, both in one pass): the start of a program on the (batch row
blocks, bank splits) grid, one bank tile's scores, the streaming log-sum-exp, and the launch plan
(tile shapes, the split of the bank across programs)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._blocks import dot, load_cols, load_rows
from ._launch import block_d, input_precision, interpreting, rowmajor, split_range, tile_config

# Cap on the per-split partial gradients of the backward (docs/method.md §4: extra memory < 16 MB).
PARTIAL_BYTES = 8 << 20


@triton.jit
def online_lse(m, acc, s):
    """One step of a streaming log-sum-exp: running max ``m`` and sum ``acc`` of exp(x - m)
    per row, updated with the tile ``s``. A row still at -inf uses 0 as its shift, so that
    exp(-inf - -inf) never makes a NaN (rows without a positive yet)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
    return m_new, acc


@triton.jit
def batch_block(v_ptr, targets_ptr, B, N, D, stride_v, chunk, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The common start of the loss kernels (forward, backward, fused), on a (row blocks, splits) grid: this program's
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
def bank_tile(
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


def prepare(v, bank, block_m, block_n, splits, max_splits=None, *, backward=False):
    """The launch plan of a loss kernel: row-major inputs, the bank's split into ``n_splits``
    ranges of ``chunk`` rows, and the tile constants and shape for :func:`kernels._launch.launch`."""
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
