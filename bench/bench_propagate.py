"""Benchmark of ``propagate`` (docs/method.md §1.2, §4): ``topk_scores``' fused selection (Triton on a
GPU, the C++ extension on CPU) and the vote, against chunked PyTorch baselines.

    python bench/bench_propagate.py                    # GPU: step, sweep and ImageNet shapes; CPU: small, sweep
    python bench/bench_propagate.py --shapes cpu       # CPU: Q = 20,000, M = 5,000 (docs/method.md §4's CPU bar)
    python bench/bench_propagate.py --shapes sweep     # linear scaling in Q and in M
    pytest bench/bench_propagate.py --benchmark-enable

Providers: ``naive`` (chunked mm + bias + topk + vote), ``mm_only`` (chunked torch.mm
producing the same scores, no selection: the floor proxy), ``gemm_tile`` (CPU: one 256 x 512 x D
tile's torch.mm repeated for the same work: the fused kernel's GEMM-rate floor), ``reference``
(llp_fast.reference.propagate_ref), ``op`` (the public llp_fast.propagate, whatever backend
it dispatches to), ``triton`` (kernels.topk_scores_triton, then the vote; GPU only),
``extension`` (torch.ops.llp_fast.propagate: the compiled CPU top-K of csrc/cpu/topk.h, then
the vote; CPU only), ``faiss`` (CPU: faiss-cpu IndexFlatIP on bias-augmented vectors,
[v, 1] . [m / tau, -log_rho] = the score, then the same vote; the index is built outside the
timing). On CPU the providers are timed in interleaved rounds, wall and process CPU time.
Bars (docs/method.md §4): CPU, at least 2x faster than naive and within 1.3x of mm_only;
GPU, at least 10x faster than naive and no slower than mm_only.
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
from llp_fast._topk import vote
from llp_fast.reference import propagate_ref

OP = "propagate"
SELECTS = True  # common.check: each timed shape's keys too (the CPU kernel's scheme depends on them)
TAU = 0.07
Shape = common.Shape


def shapes(which: str) -> list[Shape]:
    gpu = torch.cuda.is_available()
    small = [Shape("small", 2000, 500, 128, 10, 10)]
    cpu_spec = [Shape("cpu-spec", 20_000, 5_000, 128, 10, 10)]  # docs/method.md §4's CPU shape
    step = [Shape("step", 256, 128_117), Shape("step-1.3M", 256, 1_281_167)]
    imagenet = [Shape("imagenet", 1_281_167, 128_117)]
    if gpu:
        sweep = [Shape("sweep-q", q, 128_117) for q in (16_384, 32_768, 65_536, 131_072)]
        sweep += [Shape("sweep-m", 131_072, m) for m in (16_384, 32_768, 65_536, 131_072)]
    else:
        sweep = [Shape("sweep-q", q, 5_000, 128, 10, 10) for q in (5_000, 10_000, 20_000)]
        sweep += [Shape("sweep-m", 20_000, m, 128, 10, 10) for m in (1_250, 2_500, 5_000)]
    if gpu:  # K from the paper's 10 to 1000 (two-level above 64)
        ksweep = [Shape(f"k{k}", 65_536, 128_117, 128, k, 1000) for k in (10, 25, 64, 100, 200, 1000)]
    else:
        ksweep = [Shape(f"k{k}", 20_000, 5_000, 128, k, 10) for k in (10, 25, 100, 200, 1000)]
    table = {"small": small, "cpu": cpu_spec, "step": step, "imagenet": imagenet, "sweep": sweep, "ksweep": ksweep}
    if which == "auto":
        return step + sweep + imagenet if gpu else small + sweep
    return common.pick_shapes(table, which)


def make_inputs(shape: Shape, dtype: torch.dtype, dev=None, seed: int = 0):
    dev = dev or common.device()
    queries = common.unit_rows(shape.q, shape.d, dtype, dev, seed)
    labeled = common.unit_rows(shape.m, shape.d, dtype, dev, seed + 1)
    g = torch.Generator(device=dev).manual_seed(seed + 2)
    classes = torch.randint(0, shape.num_classes, (shape.m,), generator=g, device=dev)
    log_rho = torch.rand(shape.m, generator=g, device=dev) * 2 + 5
    return queries, labeled, classes, log_rho


# ----------------------------------------------------------------------------- providers
# Each takes (inputs, shape): inputs = (queries, labeled, classes, log_rho).


def naive(inputs, shape):
    """Chunked PyTorch: the (rows, M) score block materialised, then topk and the vote."""
    queries, labeled, classes, log_rho = inputs
    rc = min(common.row_chunk(max(labeled.shape[0], shape.num_classes), queries.shape[0]), queries.shape[0])
    labels = torch.empty(queries.shape[0], dtype=torch.int64, device=queries.device)
    conf = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    kt = labeled.T
    for r0 in range(0, queries.shape[0], rc):
        s = (queries[r0 : r0 + rc] @ kt).float().mul_(1.0 / TAU).sub_(log_rho)
        vals, idx = s.topk(shape.k, dim=1)
        del s
        lab, c = vote(vals, classes[idx], shape.num_classes)
        labels[r0 : r0 + rc], conf[r0 : r0 + rc] = lab, c
    return labels, conf


def mm_only(inputs, shape):
    return common.mm_only(inputs[0], inputs[1], TAU)


def gemm_tile(inputs, shape):
    return common.gemm_tile(inputs[0], inputs[1])


def reference(inputs, shape):
    return propagate_ref(*inputs, shape.k, TAU, shape.num_classes)


def op(inputs, shape):
    return llp_fast.propagate(*inputs, k=shape.k, tau=TAU, num_classes=shape.num_classes, check_finite=False)


def triton(inputs, shape):
    queries, labeled, classes, log_rho = inputs
    top = common.triton_kernels().topk_scores_triton(queries, labeled, shape.k, TAU, -log_rho, None, None, None, 0)
    return vote(top[0], classes[top[1]], shape.num_classes)


def extension(inputs, shape):
    return torch.ops.llp_fast.propagate.default(*inputs, shape.k, TAU, shape.num_classes)


def faiss_propagate(inputs, shape):
    queries, labeled, classes, log_rho = inputs
    scores, idx = common.faiss_search(queries, labeled, shape.k, TAU, log_rho)
    return vote(scores, classes[idx], shape.num_classes)


PROVIDERS = {
    "naive": naive,
    "mm_only": mm_only,
    "gemm_tile": gemm_tile,
    "reference": reference,
    "op": op,
    "triton": triton,
    "extension": extension,
    "faiss": faiss_propagate,
}


# ----------------------------------------------------------------------------- correctness


def check_shape() -> Shape:
    gpu = torch.cuda.is_available()
    return Shape("check", 2048 if gpu else 1024, 20_000 if gpu else 6500, 128, 10, 50)


VOTES = True  # common.check: also at each timed shape's class count (the vote's dense or sparse path)


def compare(out, ref, dtype, inputs=None, *, shape=None, rounded=False, tau: float = TAU) -> str:
    """Labels and confidences against the reference. A label may differ only on a genuine near-tie,
    found by recomputing that row in float64: its K-th and K+1-th scores within 2 delta and the
    label a class of a key scored within 2 delta of the K-th (the selection can go either way), or
    the label's vote within a factor exp(4 delta) of the best class's (the two best classes tie).
    delta, the error a score may carry: :func:`common.slack`; for a provider whose scores are
    rounded to a bf16 or fp16 output (``rounded``), 1e-3 plus one unit in the last place of the
    row's largest |similarity|, over tau. Confidences of the rows that agree: to delta (rounded:
    exp(4 delta) - 1)."""
    (labels, conf), (ref_labels, ref_conf) = out, ref
    labels, conf, ref_labels, ref_conf = labels.cpu(), conf.float().cpu(), ref_labels.cpu(), ref_conf.float().cpu()
    queries, labeled, classes, log_rho = inputs
    delta = torch.full((labels.shape[0],), 1e-3 if rounded else common.slack(), dtype=torch.float64)
    if rounded:
        sims = (queries.float() @ labeled.float().T).abs().amax(dim=1)
        delta += (common.score_ulp(sims, dtype) / tau).double().cpu()
    same = labels == ref_labels
    agree = same.float().mean().item()
    cerr = (conf - ref_conf).abs()[same]
    ctol = torch.expm1(4 * delta[same]) if rounded else delta[same]
    err = cerr.max().item() if cerr.numel() else 0.0
    msg = f"labels agree {agree:.4f}, max conf error {err:.1e}"
    assert bool((cerr <= ctol).all()), msg
    rows = (~same).nonzero().squeeze(1)
    assert rows.numel() <= max(8, labels.shape[0] // 20), f"{msg}: too many differing rows to be near-ties"
    if rows.numel():
        k = shape.k
        q, m = queries.double().cpu()[rows], labeled.double().cpu()
        scores = q @ m.T / tau - log_rho.double().cpu()
        top = scores.topk(min(k + 1, m.shape[0]), dim=1)
        cls = classes.cpu()
        for j, r in enumerate(rows.tolist()):
            d2 = 2 * delta[r].item()
            vals, idx = top.values[j], top.indices[j]
            w = (vals[:k] - vals[0]).exp()
            votes = torch.zeros(shape.num_classes, dtype=torch.float64).index_add_(0, cls[idx[:k]], w)
            lab = int(labels[r])
            vote_tie = 0 <= lab < shape.num_classes and votes.max().item() <= votes[lab].item() * math.exp(2 * d2)
            near = scores[j] >= vals[k - 1] - d2
            selection_tie = k < vals.shape[0] and vals[k - 1] - vals[k] <= d2 and bool((cls[near] == lab).any())
            assert vote_tie or selection_tie, (
                f"{msg}: row {r} gives class {lab}, the reference {int(ref_labels[r])}, and float64 finds no near-tie "
                f"(votes {votes[lab].item():.4g} against the best {votes.max().item():.4g}; K-th and K+1-th scores "
                f"{vals[k - 1].item():.4f}, {vals[min(k, vals.shape[0] - 1)].item():.4f})"
            )
        msg += f" (the {rows.numel()} differing rows all near-ties in float64)"
    return msg


available = common.available
flops = common.matmul_flops
skip = common.skip_slow_reference


main, test_propagate = common.entry_points(sys.modules[__name__])

if __name__ == "__main__":
    main(sys.argv[1:])
