"""Launch plumbing shared by the launchers: device checks, block sizes, split counts.

Launch settings come from a heuristic; ``LLP_FAST_AUTOTUNE=1`` turns on ``triton.autotune``
over a few configurations instead (see each kernel module).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

# Feature widths the kernels hold in one register tile (the whole row of D); above this the
# launchers return NotImplemented and the op falls back to the reference.
MAX_D = 256

LOW_PRECISION = (torch.bfloat16, torch.float16)


# triton.jit decides between compiling and interpreting when a kernel is decorated, that is
# when this package is imported; the launchers follow the same decision.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the kernels were built under ``TRITON_INTERPRET=1`` (they then run on CPU
    tensors with NumPy)."""
    return _INTERPRET


def autotune_enabled() -> bool:
    return os.environ.get("LLP_FAST_AUTOTUNE", "0") == "1" and not interpreting()


def launchable(*tensors: torch.Tensor) -> bool:
    """Triton can run on these tensors: CUDA tensors, or any tensors under the interpreter."""
    if interpreting():
        return True
    return all(t.is_cuda for t in tensors)


def decline_reason(*tensors: torch.Tensor, k: int | None = None, max_k: int = 1024) -> str | None:
    """Why the kernels do not take these operands (query-like matrices first, the key matrix
    last), or None when they do: float32 / bfloat16 / float16 matrices of one dtype with
    1 <= D <= MAX_D, at least one key row, on a CUDA device, and 1 <= ``k`` <= ``max_k``.

    float64 is left to the reference (tensor cores have no float64 path worth a kernel), and
    so are empty key sets, which the public functions reject or answer without a search."""
    dt = tensors[0].dtype
    if dt not in (torch.float32, *LOW_PRECISION):
        return f"dtype {str(dt).removeprefix('torch.')} (the kernels take float32, bfloat16, float16)"
    if any(t.dtype != dt for t in tensors):
        return "operands of different dtypes"
    if any(t.dim() != 2 for t in tensors):
        return "operands not 2-D"
    d = tensors[0].shape[1]
    if not 1 <= d <= MAX_D:
        return f"D={d} > {MAX_D}" if d > MAX_D else f"D={d}"
    if tensors[-1].shape[0] == 0:
        return "no key rows"
    if not launchable(*tensors):
        return "operands not on a CUDA device"
    if k is not None and not 1 <= k <= max_k:
        return f"k={k} > {max_k}" if k > max_k else f"k={k}"
    return None


def rowmajor(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along D (the kernels take a row stride only)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def block_d(d: int) -> int:
    # tl.dot needs every block dimension >= 16; padded columns are loaded as zeros.
    return max(16, triton.next_power_of_2(d))


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in full fp32 ("ieee"): tf32 rounds the inputs to 10
    mantissa bits, enough to reorder near neighbours and break agreement with the reference.
    The argument is ignored for bf16/fp16, which run on the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs worth launching to fill the machine: a few waves of the SMs."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1  # the interpreter runs programs one after another: splitting buys nothing


def split_range(n: int, row_blocks: int, block_n: int, device: torch.device, splits: int | None, max_splits=None):
    """(splits, chunk): the key axis of length ``n`` cut into ``splits`` ranges of ``chunk``
    keys (a multiple of ``block_n``), so that ``row_blocks * splits`` programs fill the GPU
    when there are few query rows (the per-step case: a few hundred queries against up to
    1.3M keys). ``splits`` forces a count (tests use it to exercise the merge)."""
    if splits is None:
        splits = max(1, target_programs(device) // max(row_blocks, 1))
        # Keep each split long enough (>= 4 tiles) that its running top-K pays for itself.
        splits = min(splits, triton.cdiv(n, 4 * block_n))
    if max_splits is not None:
        splits = min(splits, max_splits)
    splits = max(1, min(splits, triton.cdiv(n, block_n)))
    chunk = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    return triton.cdiv(n, chunk), chunk


def tile_config(dtype: torch.dtype, d: int, k: int = 1, n_rows: int | None = None, *, block_m=None, block_n=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the top-K kernels, from a heuristic.

    GPU, bf16/fp16 at D <= 128: 128 x 64 score tiles on 8 warps. Every row block streams
    all the keys, so the key traffic from L2 is (Q / BLOCK_M) * M * D * 2 bytes: at the
    ImageNet shape 660 GB with BLOCK_M = 64 (about the time of the matmul itself at L2
    bandwidth), half that with 128. At this shape ptxas (sm_90) fits the K = 10 and T = 25
    kernels in the registers without spills: ``python tests/_compile_kernels.py 90`` prints
    the registers and spills of every variant. Fewer rows than a block: the block shrinks to
    the next power of two (>= 16, the smallest tl.dot). fp32 (FMA, no tensor cores) and
    D > 128: 64 x 32 tiles on 4 warps.

    Under the interpreter the smallest legal tiles, so that tiny test shapes still cross
    several tiles."""
    if interpreting():
        bm, bn, warps, stages = 16, 16, 1, 1
    else:
        if dtype in LOW_PRECISION and d <= 128:
            bm, bn, warps = 128, 64, 8
        else:
            bm, bn, warps = 64, 32, 4 if k <= 32 else 8
        if n_rows is not None:
            bm = min(bm, max(16, triton.next_power_of_2(n_rows)))
        stages = 3 if d <= 128 else 2
    return block_m or bm, block_n or bn, warps, stages


def maybe_autotune(kernel, key: list[str]):
    """``kernel`` wrapped in ``triton.autotune`` over tile shape, warps and stages when
    ``LLP_FAST_AUTOTUNE=1`` (decided at import), else ``kernel`` itself.

    Host-side sizes do not depend on the tuned values: the grid's row axis follows the tuned
    BLOCK_M, split ranges are multiples of the heuristic BLOCK_N (a tuned BLOCK_N that does
    not divide them is still correct: the last tile of a range is masked), partial buffers
    are sized by rows and splits only. Every kernel overwrites its outputs, so the tuner's
    repeated launches are harmless."""
    if not autotune_enabled():
        return kernel
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]
    return triton.autotune(configs=configs, key=key)(kernel)


def launch(kernel, n_rows: int, n_splits: int, args, consts: dict, tiles: tuple[int, int, int, int]):
    """Launches a kernel made by :func:`maybe_autotune` on a (row blocks, splits) grid,
    passing the heuristic ``tiles`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) only when
    they are not being tuned. It runs on the GPU of its tensors, whichever is current: Triton
    launches on the current device's current stream, and tensors on ``cuda:1`` while ``cuda:0``
    is current (``--device cuda:1``, a torchrun rank >= 1 of the labeller) were read from the wrong
    GPU."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        if isinstance(kernel, triton.runtime.Autotuner):
            kernel[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), n_splits)](*args, **consts)
        else:
            bm, bn, warps, stages = tiles
            grid = (triton.cdiv(n_rows, bm), n_splits)
            kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
