"""Benchmark of ``topk_scores`` (the selection behind docs/method.md §1.1/§1.2, on its own):
the fused top-K (the C++ extension on CPU, Triton on a GPU) against chunked PyTorch, and the
streaming use, the keys in chunks merged through ``init``.

    python bench/bench_topk_scores.py                  # GPU: step and ImageNet shapes; CPU: small, sweep
    python bench/bench_topk_scores.py --shapes cpu     # CPU: Q = 20,000 against N = 5,000 keys
    pytest bench/bench_topk_scores.py --benchmark-enable

Providers: ``naive`` (chunked mm + bias + masked topk), ``gemm_tile`` (CPU: one 256 x 512 x D tile's
torch.mm repeated for the same work), ``mm_only`` (chunked torch.mm
producing the same scores, no selection), ``reference`` (llp_fast.reference.topk_scores_ref),
``op`` (the public llp_fast.topk_scores, whatever backend it dispatches to), ``chunked``
(the op over the keys in about 8 chunks of whole 512-key tiles, each merging the previous
result: what a streaming pass over a pool larger than memory does), ``extension`` (torch.ops.llp_fast.topk_scores on the
compiled CPU kernel, csrc/cpu/topk_scores_cpu.cpp; CPU only), ``triton``
(kernels.topk_scores_triton; GPU only), ``faiss`` (CPU: faiss-cpu IndexFlatIP over the
masked keys augmented with the bias). ``Shape.q`` = Q, ``Shape.m`` = N, ``Shape.k`` = k; a
third of the keys is masked out.
"""

from __future__ import annotations

import math
import sys

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common

import llp_fast
from llp_fast.reference import topk_scores_ref

OP = "topk_scores"
SELECTS = True  # common.check: each timed shape's keys too (the CPU kernel's scheme depends on them)
TAU = 0.07
CHUNKS = 8
Shape = common.Shape


def shapes(which: str) -> list[Shape]:
    gpu = torch.cuda.is_available()
    small = [Shape("small", 2000, 500, 128, 10)]
    cpu_spec = [Shape("cpu-spec", 20_000, 5_000, 128, 10)]
    step = [Shape("step", 256, 128_117), Shape("step-1.3M", 256, 1_281_167, 128, 25)]
    imagenet = [Shape("imagenet", 128_117, 1_281_167, 128, 25)]  # the density pass
    if gpu:
        sweep = [Shape("sweep-q", q, 128_117) for q in (16_384, 65_536)]
    else:
        sweep = [Shape("sweep-q", q, 5_000, 128, 10) for q in (5_000, 10_000, 20_000)]
    if gpu:
        ksweep = [Shape(f"k{k}", 65_536, 128_117, 128, k) for k in (10, 64, 100, 200, 1000)]
    else:
        ksweep = [Shape(f"k{k}", 20_000, 5_000, 128, k) for k in (10, 100, 200, 1000)]
    table = {"small": small, "cpu": cpu_spec, "step": step, "imagenet": imagenet, "sweep": sweep, "ksweep": ksweep}
    if which == "auto":
        return step + sweep + imagenet if gpu else small + sweep
    return common.pick_shapes(table, which)


def make_inputs(shape: Shape, dtype: torch.dtype, dev=None, seed: int = 0):
    """(queries, keys, bias, key_mask)."""
    dev = dev or common.device()
    queries = common.unit_rows(shape.q, shape.d, dtype, dev, seed)
    keys = common.unit_rows(shape.m, shape.d, dtype, dev, seed + 1)
    g = torch.Generator(device=dev).manual_seed(seed + 2)
    bias = -(torch.rand(shape.m, generator=g, device=dev) * 2 + 5)
    key_mask = torch.rand(shape.m, generator=g, device=dev) < 2 / 3
    return queries, keys, bias, key_mask


# ----------------------------------------------------------------------------- providers
# Each takes (inputs, shape) and returns (values, indices).


def naive(inputs, shape):
    """Chunked PyTorch: the (rows, N) score block materialised, biased, masked, topk."""
    queries, keys, bias, mask = inputs
    rc = min(common.row_chunk(keys.shape[0], queries.shape[0]), queries.shape[0])
    values = torch.empty(queries.shape[0], shape.k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(queries.shape[0], shape.k, dtype=torch.int64, device=queries.device)
    kt, off = keys.T, ~mask
    for r0 in range(0, queries.shape[0], rc):
        s = (queries[r0 : r0 + rc] @ kt).float().mul_(1.0 / TAU).add_(bias).masked_fill_(off, -math.inf)
        values[r0 : r0 + rc], indices[r0 : r0 + rc] = s.topk(shape.k, dim=1)
    return values, indices


def mm_only(inputs, shape):
    return common.mm_only(inputs[0], inputs[1], TAU)


def gemm_tile(inputs, shape):
    return common.gemm_tile(inputs[0], inputs[1])


def reference(inputs, shape):
    return topk_scores_ref(*inputs[:2], shape.k, TAU, *inputs[2:], None, None, 0)


def op(inputs, shape):
    queries, keys, bias, mask = inputs
    return llp_fast.topk_scores(queries, keys, k=shape.k, tau=TAU, bias=bias, key_mask=mask, check_finite=False)


def chunked(inputs, shape):
    queries, keys, bias, mask = inputs
    # About N / CHUNKS keys a chunk, rounded up to whole tiles of the CPU kernel (512 keys):
    # a chunk that ends inside a tile pays for the whole tile.
    per_chunk = -(-keys.shape[0] // CHUNKS)
    step, top = -(-per_chunk // 512) * 512, None
    for c0 in range(0, keys.shape[0], step):
        c1 = c0 + step
        top = llp_fast.topk_scores(queries, keys[c0:c1], k=shape.k, tau=TAU, bias=bias[c0:c1], key_mask=mask[c0:c1],
                                   init=top, index_offset=c0, check_finite=False)  # fmt: skip
    return top


def extension(inputs, shape):
    return torch.ops.llp_fast.topk_scores.default(*inputs[:2], shape.k, TAU, *inputs[2:], None, None, 0)


def triton(inputs, shape):
    return common.triton_kernels().topk_scores_triton(*inputs[:2], shape.k, TAU, *inputs[2:], None, None, 0)


_KEPT: dict = {}  # (keys, bias, mask) -> the kept rows' positions, the kept keys and biases


def faiss_topk(inputs, shape):
    """Flat inner-product search over the masked-in keys with -bias as the subtracted term;
    the kept keys are copied once per key set (outside the timing, as the index is)."""
    queries, keys, bias, mask = inputs

    def build():
        where = mask.nonzero().squeeze(1)
        return where, keys[where], -bias[where]

    where, kept_keys, minus_bias = common.kept_for(_KEPT, (keys, bias, mask), build)
    values, idx = common.faiss_search(queries, kept_keys, shape.k, TAU, minus_bias)
    return values, where[idx]


PROVIDERS = {
    "naive": naive,
    "mm_only": mm_only,
    "gemm_tile": gemm_tile,
    "reference": reference,
    "op": op,
    "chunked": chunked,
    "extension": extension,
    "triton": triton,
    "faiss": faiss_topk,
}


# ----------------------------------------------------------------------------- correctness


def check_shape() -> Shape:
    gpu = torch.cuda.is_available()
    return Shape("check", 2048 if gpu else 1024, 20_000 if gpu else 6500, 128, 10)


def compare(out, ref, dtype, inputs=None, *, shape=None, rounded=False) -> str:
    """The selected values to :func:`common.slack` (1e-3 on a GPU, 2e-5 on CPU), and the indices
    through the values: each returned index's score recomputed from the inputs (float64) must be
    its value, to that slack (near-ties may
    reorder indices, so they are not compared to the reference's one by one); padding is -1
    with -inf. A provider whose scores are rounded to a bf16 or fp16 output (``rounded``): 1e-3
    plus one unit in the last place of each reference value's similarity, over tau (twice the
    rounding's worst error: the j-th best moves by no more than the scores near it)."""
    tol = torch.full_like(ref[0].float(), 1e-3 if rounded else common.slack())
    if rounded and inputs is not None:
        bias = inputs[2].float()
        best = ref[0].float()
        finite = torch.isfinite(best)
        # a reference value is dot / tau + bias of one key: |dot| <= tau max |value - bias|
        far = torch.maximum((best - bias.min()).abs(), (best - bias.max()).abs())
        dots = torch.where(finite, far * TAU, torch.zeros_like(best))
        tol += common.score_ulp(dots, dtype) / TAU
    diff = (out[0].float() - ref[0].float()).abs().nan_to_num(0.0)  # -inf padding on both sides: 0
    err = diff.max().item()
    msg = f"max |value error| {err:.1e}"
    assert bool((diff <= tol).all()), f"{msg} (tolerance {tol.max().item():.1e})"
    if inputs is not None:
        queries, keys, bias, mask = inputs
        values, idx = out[0].double().cpu(), out[1].cpu()
        pad = idx < 0
        assert torch.equal(pad, torch.isinf(values) & (values < 0)), f"{msg}; padding and -inf disagree"
        safe = idx.clamp_min(0)
        q, kk, b = queries.double().cpu(), keys.double().cpu(), bias.double().cpu()
        score = (
            torch.cat(
                [torch.einsum("rd,rkd->rk", q[r : r + 64], kk[safe[r : r + 64]]) for r in range(0, q.shape[0], 64)]
            )
            / TAU
            + b[safe]
        )
        assert bool(mask.cpu()[safe][~pad].all()), f"{msg}; a masked key was returned"
        own = (score - values)[~pad].abs()
        ierr = own.max().item() if (~pad).any() else 0.0
        assert bool((own <= tol.cpu().double()[~pad]).all()), f"{msg}; an index's own score differs by {ierr:.1e}"
        assert all(len(set(r[r >= 0].tolist())) == int((r >= 0).sum()) for r in idx), f"{msg}; an index repeats"
        msg += f", indices' own scores to {ierr:.1e}"
    return msg


available = common.available
flops = common.matmul_flops
skip = common.skip_slow_reference


main, test_topk_scores = common.entry_points(sys.modules[__name__])

if __name__ == "__main__":
    main(sys.argv[1:])
