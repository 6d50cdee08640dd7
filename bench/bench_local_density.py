"""Benchmark of ``local_density`` (docs/method.md §1.1, §4): ``topk_scores``' fused top-T selection
(Triton on a GPU, the C++ extension on CPU) and the log-sum-exp, against chunked PyTorch baselines.

    python bench/bench_local_density.py                 # GPU: ImageNet shape and sweep; CPU: small, sweep
    python bench/bench_local_density.py --shapes cpu    # CPU: M = 5,000 against a 20,000-row pool
    pytest bench/bench_local_density.py --benchmark-enable

Providers: ``naive`` (chunked mm + pool mask + topk + logsumexp), ``mm_only`` (chunked
torch.mm producing the same similarities), ``gemm_tile`` (CPU: one 256 x 512 x D tile's torch.mm
repeated for the same work), ``reference`` (local_density_ref), ``op`` (the
public llp_fast.local_density), ``triton`` (kernels.topk_scores_triton, then the log-sum-exp; GPU
only), ``extension`` (torch.ops.llp_fast.local_density: the compiled CPU top-K of csrc/cpu/topk.h,
then the log-sum-exp; CPU only), ``faiss`` (CPU: faiss-cpu IndexFlatIP over the
pool rows, then the same logsumexp; the index is built outside the timing). Shapes follow
docs/method.md §4: the M labeled rows are the queries, the bank (pool = unlabeled rows, given
by a mask) the keys; ``Shape.q`` = M, ``Shape.m`` = N, ``Shape.k`` = T. Bars as for
propagate (bench_propagate.py).
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
from llp_fast._topk import log_sum_exp
from llp_fast.reference import local_density_ref

OP = "local_density"
SELECTS = True  # common.check: each timed shape's keys too (the CPU kernel's scheme depends on them)
TAU = 0.07
Shape = common.Shape


def shapes(which: str) -> list[Shape]:
    gpu = torch.cuda.is_available()
    small = [Shape("small", 500, 2_500, 128, 25)]
    cpu_spec = [Shape("cpu-spec", 5_000, 25_000, 128, 25)]  # docs/method.md §4's CPU shape, roles swapped
    # ImageNet, 10% labeled: M = 128,117 labeled rows against the N = 1,281,167 bank.
    imagenet = [Shape("imagenet", 128_117, 1_281_167, 128, 25)]
    step = [Shape("small-labeled", 1_024, 1_281_167, 128, 25)]  # few labeled rows: the split path
    if gpu:
        sweep = [Shape("sweep-m", m, 262_144, 128, 25) for m in (16_384, 32_768, 65_536)]
        sweep += [Shape("sweep-n", 32_768, n, 128, 25) for n in (131_072, 262_144, 524_288)]
    else:
        sweep = [Shape("sweep-m", m, 25_000, 128, 25) for m in (1_250, 2_500, 5_000)]
        sweep += [Shape("sweep-n", 5_000, n, 128, 25) for n in (10_000, 15_000, 25_000)]
    if gpu:  # T from 25 to 1000 (two-level above 64)
        ksweep = [Shape(f"t{t}", 32_768, 262_144, 128, t) for t in (25, 64, 100, 200, 1000)]
    else:  # 5,000 labeled rows against a 20,000-row pool: the propagate sweep's 10^8 scores
        ksweep = [Shape(f"t{t}", 5_000, 25_000, 128, t) for t in (25, 100, 200, 1000)]
    table = {"small": small, "cpu": cpu_spec, "step": step, "imagenet": imagenet, "sweep": sweep, "ksweep": ksweep}
    if which == "auto":
        return step + sweep + imagenet if gpu else small + sweep
    return common.pick_shapes(table, which)


def make_inputs(shape: Shape, dtype: torch.dtype, dev=None, seed: int = 0):
    """(labeled, bank, pool_mask): the first M bank rows are the labeled ones (as in the
    trainer), the pool is every other row."""
    dev = dev or common.device()
    bank = common.unit_rows(shape.m, shape.d, dtype, dev, seed)
    labeled = bank[: shape.q]
    pool = torch.ones(shape.m, dtype=torch.bool, device=dev)
    pool[: shape.q] = False
    return labeled, bank, pool


def naive(inputs, shape):
    """Chunked PyTorch: the (rows, N) similarity block materialised, masked, topk, logsumexp."""
    labeled, bank, pool = inputs
    rc = min(common.row_chunk(bank.shape[0], labeled.shape[0]), labeled.shape[0])
    out = torch.empty(labeled.shape[0], dtype=torch.float32, device=labeled.device)
    kt, off_pool = bank.T, ~pool
    for r0 in range(0, labeled.shape[0], rc):
        s = (labeled[r0 : r0 + rc] @ kt).float().mul_(1.0 / TAU).masked_fill_(off_pool, -math.inf)
        out[r0 : r0 + rc] = torch.logsumexp(s.topk(shape.k, dim=1).values, dim=1)
    return out


def mm_only(inputs, shape):
    return common.mm_only(inputs[0], inputs[1], TAU)


def gemm_tile(inputs, shape):
    labeled, bank, pool = inputs
    return common.gemm_tile(labeled, bank)


def reference(inputs, shape):
    return local_density_ref(*inputs[:2], shape.k, TAU, inputs[2])


def op(inputs, shape):
    labeled, bank, pool = inputs
    return llp_fast.local_density(labeled, bank, t=shape.k, tau=TAU, pool_mask=pool, check_finite=False)


def triton(inputs, shape):
    labeled, bank, pool = inputs
    values, _ = common.triton_kernels().topk_scores_triton(labeled, bank, shape.k, TAU, None, pool, None, None, 0)
    return log_sum_exp(values)


def extension(inputs, shape):
    return torch.ops.llp_fast.local_density.default(*inputs[:2], shape.k, TAU, inputs[2])


def faiss_density(inputs, shape):
    labeled, bank, pool = inputs
    rows = common.kept_for(_POOL, (bank, pool), lambda: bank[pool])  # copied once per bank (outside the timing)
    sims, _ = common.faiss_search(labeled, rows, shape.k, TAU)
    return torch.logsumexp(sims / TAU, dim=1)


_POOL: dict = {}  # (bank, pool) -> the pool's rows

PROVIDERS = {
    "naive": naive,
    "mm_only": mm_only,
    "gemm_tile": gemm_tile,
    "reference": reference,
    "op": op,
    "triton": triton,
    "extension": extension,
    "faiss": faiss_density,
}


def check_shape() -> Shape:
    gpu = torch.cuda.is_available()
    return Shape("check", 2048 if gpu else 1024, 50_000 if gpu else 6500, 128, 25)


def compare(out, ref, dtype, inputs=None, *, shape=None, rounded=False) -> str:
    """log_rho is a log-sum-exp of the top T: continuous in the scores, so ties at the T-th
    place cannot move it; it must agree to :func:`common.slack` (1e-3 on a GPU, 2e-5 on CPU). A
    provider whose similarities are rounded to a bf16 or fp16 output (``rounded``) moves each score
    by at most one unit in the last place of the row's largest similarity over tau, and the
    log-sum-exp of the top T by no more (it is 1-Lipschitz in the largest change): that bound, row
    by row, plus 1e-3."""
    err = (out.float() - ref.float()).abs()
    tol = torch.full_like(err, 1e-3 if rounded else common.slack())
    if rounded:
        labeled, bank, pool = inputs
        top = (labeled.float() @ bank.float().T).masked_fill_(~pool, 0).abs().amax(dim=1)
        tol += common.score_ulp(top, dtype) / TAU
    msg = f"max |log_rho error| {err.max().item():.1e} (tolerance {tol.min().item():.1e}-{tol.max().item():.1e})"
    assert bool((err <= tol).all()), msg
    return msg


available = common.available
flops = common.matmul_flops
skip = common.skip_slow_reference


main, test_local_density = common.entry_points(sys.modules[__name__])

if __name__ == "__main__":
    main(sys.argv[1:])
