"""Where the CPU top-K's time goes beyond the tile's GEMM (docs/performance.md, the K/T sweeps), on
the K-sweep shape (Q = 20,000, M = 5,000, D = 128, one thread), each check of correctness first:

- ``vote``: at K = 10 and 200, the PyTorch body ``_topk.vote_torch`` with the CPU's chunk of rows
  (262,144 entries) and with the old 4M-entry chunks, and the compiled kernel (``_topk.vote``,
  which on a CPU with few classes runs ``llp_fast::vote`` and reads no chunk size); all three
  give the same labels and confidences, checked first;
- ``floor``: ``topk_scores`` at K = 10 plain, and handed each row's exact k-th best as its floor
  (``init=`` the answer itself, as other keys): the time a perfect threshold warm-up would leave
  (each value then twice, the key's own and its copy's); both against the reference first;
- ``dtype``: ``topk_scores`` at K = 10 on float32 and on bfloat16 queries and keys (run it with
  ``LLP_FAST_CPU_BF16_GEMM=1`` or ``=0`` to choose how bf16 tiles are multiplied; bf16 against the
  reference first).

Process CPU time, best and median of ``--reps``.

    OMP_NUM_THREADS=1 python bench/bench_cpu_topk_parts.py [--reps 15]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_propagate  # noqa: E402
import bench_topk_scores  # noqa: E402
import common  # noqa: E402

import llp_fast  # noqa: E402
from llp_fast import _topk  # noqa: E402
from llp_fast.reference import topk_scores_ref  # noqa: E402

TAU = 0.07


def cpu_times(fn, reps: int) -> str:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    ts.sort()
    return f"best {ts[0] * 1e3:.1f} ms, median {ts[len(ts) // 2] * 1e3:.1f} ms"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    if args.reps < 1:  # (an IndexError once the inputs were built)
        ap.error(f"argument --reps: must be at least 1, got {args.reps}")
    torch.set_num_threads(1)
    inputs = {}
    for k in (10, 200):
        shape = bench_propagate.Shape(f"k{k}", 20_000, 5_000, 128, k, 10)
        inputs[k] = bench_propagate.make_inputs(shape, torch.float32, torch.device("cpu"))

    for k in (10, 200):  # vote
        q, m, cls, log_rho = inputs[k]
        values, indices = llp_fast.topk_scores(q, m, k=k, tau=TAU, bias=-log_rho)
        body = functools.partial(_topk.vote_torch, values, indices, 10, table=cls)
        kernel = functools.partial(_topk.vote, values, indices, 10, table=cls)
        chunked = _topk._TABLE
        body(), kernel()  # ATen's exp can round a process's first call differently: warm both up
        want = body()
        got = kernel()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "the kernel's vote differs"
        _topk._TABLE = {"cpu": 1 << 22}
        try:
            got = body()
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "4M-entry chunks differ"
            old = cpu_times(body, args.reps)
        finally:
            _topk._TABLE = chunked
        print(
            f"vote K={k}: PyTorch body, 4M-entry chunks {old}; CPU chunks {cpu_times(body, args.reps)}; "
            f"kernel {cpu_times(kernel, args.reps)}",
            flush=True,
        )

    q, m, _, log_rho = inputs[10]  # floor
    bias = -log_rho
    top = llp_fast.topk_scores(q, m, k=10, tau=TAU, bias=bias, check_finite=False)
    given = llp_fast.topk_scores(q, m, k=10, tau=TAU, bias=bias, init=top, index_offset=m.shape[0])
    # both timed calls against the reference first, every row (a check of the first 1,024 let a
    # wrong answer in the rest be timed): values, and each index through its own score in float64
    ref = topk_scores_ref(q, m, 10, TAU, bias)
    every = torch.ones(m.shape[0], dtype=torch.bool)
    bench_topk_scores.compare(top, ref, torch.float32, (q, m, bias, every))
    assert torch.equal(top.indices, ref[1]), "plain topk_scores: indices differ from the reference's"
    ref_given = topk_scores_ref(q, m, 10, TAU, bias, None, ref[0], ref[1], m.shape[0])
    torch.testing.assert_close(given.values, ref_given[0], rtol=0, atol=common.slack())
    # a key and its copy in init tie exactly, in either order: the same key, index modulo M
    mod = m.shape[0]
    assert torch.equal(given.indices % mod, ref_given[1] % mod), "topk_scores given its k-th best: keys differ"
    assert torch.equal(given.indices.sort(1).values, ref_given[1].sort(1).values), "the pairs differ"
    assert torch.equal(given.values[:, ::2], top.values[:, :5])  # every value twice: the keys and their copy in init
    plain = cpu_times(lambda: llp_fast.topk_scores(q, m, k=10, tau=TAU, bias=bias, check_finite=False), args.reps)
    floor = cpu_times(
        lambda: llp_fast.topk_scores(q, m, k=10, tau=TAU, bias=bias, init=top, index_offset=m.shape[0],
                                     check_finite=False),
        args.reps,
    )  # fmt: skip
    print(f"topk_scores K=10: plain {plain}; given its exact k-th best {floor}", flush=True)

    out = []  # dtype
    for dtype in (torch.float32, torch.bfloat16):
        qd, md = q.to(dtype), m.to(dtype)
        got = llp_fast.topk_scores(qd, md, k=10, tau=TAU, bias=bias)  # every row, indices through their scores
        bench_topk_scores.compare(got, topk_scores_ref(qd, md, 10, TAU, bias), dtype, (qd, md, bias, every))
        run = functools.partial(llp_fast.topk_scores, qd, md, k=10, tau=TAU, bias=bias, check_finite=False)
        out.append(f"{dtype} {cpu_times(run, args.reps)}")
    bf16 = os.environ.get("LLP_FAST_CPU_BF16_GEMM", "unset")
    print(f"topk_scores K=10 (LLP_FAST_CPU_BF16_GEMM={bf16}): " + "; ".join(out), flush=True)


if __name__ == "__main__":
    main()
