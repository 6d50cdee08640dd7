"""CPU aggregation_loss forward and backward: the fused C++ kernel (csrc/cpu/aggregation_loss_cpu.cpp)
against the chunked reference and one plain matmul of the same shape (the floor).

    PYTHONPATH=. python bench/bench_cpu_aggregation_loss.py [--b 256] [--n 25000] [--reps 7]

Providers (interleaved rounds, medians of wall and process CPU time, correctness checked first):
    reference  llp_fast.reference.aggregation_loss_ref / aggregation_loss_backward_ref
    extension  torch.ops.llp_fast.aggregation_loss / aggregation_loss_backward (compiled kernel)
    mm_only    v @ bank.T alone (forward) / plus W @ bank (backward): the two matmuls' floor
JSON rows go to bench/results/cpu_aggregation_loss-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_cpu_propagate import cpu_name, git_commit  # noqa: E402

from llp_fast import _ext  # noqa: E402
from llp_fast.reference import aggregation_loss_backward_ref, aggregation_loss_ref  # noqa: E402

TAU = 0.07


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", type=int, default=256)
    p.add_argument("--n", type=int, default=25000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if _ext.load() is None:
        sys.exit("the C++ extension could not be built or loaded: nothing to benchmark")

    torch.manual_seed(0)
    v = F.normalize(torch.randn(args.b, args.d), dim=1)
    bank = F.normalize(torch.randn(args.n, args.d), dim=1)
    labels = torch.randint(0, args.classes, (args.n,))
    targets = labels[torch.randint(0, args.n, (args.b,))]
    fwd, bwd = torch.ops.llp_fast.aggregation_loss.default, torch.ops.llp_fast.aggregation_loss_backward.default

    ref = aggregation_loss_ref(v, bank, labels, targets, TAU)
    got = fwd(v, bank, labels, targets, TAU)
    err_f = max((g - r).abs().max().item() for g, r in zip(got, ref))
    ca, cp = torch.ones(args.b), -torch.ones(args.b)
    g_ref = aggregation_loss_backward_ref(v, bank, labels, targets, ref[1], ref[2], ca, cp, TAU)
    g_ext = bwd(v, bank, labels, targets, got[1], got[2], ca, cp, TAU)
    err_b = ((g_ext - g_ref).abs().max() / g_ref.abs().max()).item()
    print(f"check: forward max |diff| {err_f:.2e}; backward max rel |diff| {err_b:.2e}")
    if err_f > 1e-4 or err_b > 1e-4:
        sys.exit("correctness check failed: not timing")

    w = torch.empty(args.b, args.n)
    suites = {
        "forward": {
            "reference": lambda: aggregation_loss_ref(v, bank, labels, targets, TAU),
            "extension": lambda: fwd(v, bank, labels, targets, TAU),
            "mm_only": lambda: torch.mm(v, bank.T, out=w),
        },
        "backward": {
            "reference": lambda: aggregation_loss_backward_ref(v, bank, labels, targets, ref[1], ref[2], ca, cp, TAU),
            "extension": lambda: bwd(v, bank, labels, targets, got[1], got[2], ca, cp, TAU),
            "mm_only": lambda: torch.mm(torch.mm(v, bank.T, out=w), bank),
        },
    }
    meta = dict(
        device=f"{cpu_name()} x{torch.get_num_threads()} threads",
        torch=torch.__version__,
        python=platform.python_version(),
        commit=git_commit(),
        load_average=os.getloadavg()[0],
    )
    rows = []
    print(f"B={args.b} N={args.n} D={args.d}, float32")
    print(f"{'pass':<10}{'provider':<11}{'wall ms':>9}{'cpu ms':>9}{'ref/x cpu':>11}{'x/mm cpu':>10}")
    for name, providers in suites.items():
        wall = {k: [] for k in providers}
        cpu = {k: [] for k in providers}
        for fn in providers.values():
            fn()
        for _ in range(args.reps):
            for k, fn in providers.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[k].append((time.perf_counter() - t0) * 1e3)
                cpu[k].append((time.process_time() - c0) * 1e3)
        mw = {k: statistics.median(x) for k, x in wall.items()}
        mc = {k: statistics.median(x) for k, x in cpu.items()}
        for k in providers:
            print(
                f"{name:<10}{k:<11}{mw[k]:>9.1f}{mc[k]:>9.1f}{mc['reference'] / mc[k]:>11.2f}"
                f"{mc[k] / mc['mm_only']:>10.2f}"
            )
            rows.append(
                dict(
                    op=f"aggregation_loss_{name}",
                    provider=k,
                    shape=f"b={args.b},n={args.n},d={args.d}",
                    dtype="float32",
                    median_ms=mw[k],
                    median_cpu_ms=mc[k],
                    reps=args.reps,
                    **meta,
                )
            )
    args.out.mkdir(parents=True, exist_ok=True)
    host = "".join(c if c.isalnum() else "-" for c in platform.node().lower()) or "cpu"
    path = args.out / f"cpu_aggregation_loss-{host}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
