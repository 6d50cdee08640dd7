"""Device-side loads and products shared by the Triton kernels (``topk_scores.py``,
``aggregation_loss.py``, ``aggregation_loss_fused.py`` through ``_aggregation_tiles.py``): a row
block of a matrix, the same rows transposed, and ``tl.dot`` with fp32 accumulation that also runs
under the CPU interpreter."""

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
