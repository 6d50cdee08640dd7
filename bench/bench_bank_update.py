"""bank_update_ at the trainer's batch (B = 256, D = 128): the naive index chain against the
compiled kernel (csrc/cpu/bank_update_cpu.cpp; csrc/cuda/bank_update_cuda.cu on a GPU).

Providers, on the same bank and batch (with repeated indices, so every path does the ordered work):

    naive      the plain PyTorch chain for a batch: gather, blend, F.normalize, scatter, one round per
               multiplicity of an index (llp_fast.reference.bank_update_ref_: what the op's default
               body runs)
    extension  torch.ops.llp_fast.bank_update_ on the compiled kernel (one launch on CUDA)

    PYTHONPATH=. python bench/bench_bank_update.py [--n 100000] [--b 256] [--reps 200]

Correctness is checked before timing; medians of interleaved runs (CUDA events on the GPU).
docs/method.md §4 bar on a GPU: one kernel launch, >= 5x faster than the naive chain. JSON rows go to
``<out>/bank_update-<device>.json``, one file per device the rows were measured on (the CPU's, and the
GPU's when there is one; ``common.device_slug``); ``--out``: by default ``$OUT`` when set, else
bench/results.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llp_fast import _ext  # noqa: E402

try:
    from . import common
except ImportError:  # run as a script
    import common  # noqa: E402
from llp_fast.reference import bank_update_ref_  # noqa: E402


def count_launches(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(dev: str, dtype: torch.dtype, args) -> list[dict]:
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(args.n, args.d, device=dev), dim=1).to(dtype)
    # A realistic batch draws distinct rows; a few repeats make every provider do ordered rounds.
    indices = torch.randperm(args.n, device=dev)[: args.b]
    indices[-args.repeats :] = indices[: args.repeats]
    values = F.normalize(torch.randn(args.b, args.d, device=dev), dim=1).to(dtype)
    op = torch.ops.llp_fast.bank_update_.default

    a, b = bank.clone(), bank.clone()
    op(a, indices, values, 0.5)
    bank_update_ref_(b, indices, values, 0.5)
    err = (a.double() - b.double()).abs().max().item()
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    print(f"  check {dev}/{str(dtype)[6:]}: max |extension - reference| = {err:.2e} (tol {tol:g})")
    if err > tol:
        sys.exit("correctness check failed: not timing")

    providers = {
        "naive": lambda: bank_update_ref_(bank, indices, values, 0.5),
        "extension": lambda: op(bank, indices, values, 0.5),
    }
    launches = None
    if dev == "cuda":
        launches = count_launches(providers["extension"])
        print(f"  CUDA kernel launches per extension call: {launches}")
    times = {k: [] for k in providers}
    for fn in providers.values():
        for _ in range(5):
            fn()
    for _ in range(args.reps):
        for name, fn in providers.items():
            times[name].append(common.timed_call(fn, dev == "cuda"))
    med = {k: statistics.median(v) for k, v in times.items()}
    # The 10th percentile too: on a shared CPU the median of a ~100 us op can be dominated by
    # thread-team wake-ups (the naive chain's ATen ops go parallel), the low percentile is not.
    p10 = {k: sorted(v)[len(v) // 10] for k, v in times.items()}
    rows = []
    for name, ms in med.items():
        print(
            f"{dev:<6}{str(dtype)[6:]:<10}{name:<11}{ms * 1e3:>11.1f}{med['naive'] / ms:>10.2f}"
            f"{p10[name] * 1e3:>10.1f}{p10['naive'] / p10[name]:>10.2f}"
        )
        rows.append(
            dict(
                op="bank_update_",
                provider=name,
                shape=f"n={args.n},b={args.b},d={args.d},repeats={args.repeats}",
                dtype=str(dtype)[6:],
                median_ms=ms,
                p10_ms=p10[name],
                speedup_vs_naive=med["naive"] / ms,
                p10_speedup_vs_naive=p10["naive"] / p10[name],
                kernel_launches=launches if name == "extension" else None,
                reps=args.reps,
                device=common.device_name(dev),
                cpu=common.cpu_info() if dev == "cpu" else None,
                torch=torch.__version__,
                python=platform.python_version(),
                commit=common.git_commit(),
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="bank rows")
    p.add_argument("--b", type=int, default=256, help="batch")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=8, help="entries that repeat an earlier index (1 to b / 2)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument(
        "--out",
        type=Path,
        default=common.results_dir(),
        help="results folder (default: $OUT when set, else bench/results)",
    )
    args = p.parse_args(argv)
    for flag in ("n", "b", "d", "reps"):  # (--reps 0: "no median for empty data" after the warm-up)
        if getattr(args, flag) < 1:
            p.error(f"argument --{flag}: must be at least 1, got {getattr(args, flag)}")
    if args.b > args.n:  # (the op's own error, a traceback)
        p.error(f"argument --b: a batch of {args.b} rows needs a bank of at least as many (--n {args.n})")
    if not 1 <= args.repeats <= args.b // 2:  # indices[-r:] = indices[:r]: 0 copied the whole batch over itself
        p.error(f"argument --repeats: from 1 to half the batch --b ({args.b // 2}), got {args.repeats}")
    if _ext.load() is None:
        sys.exit("the C++ extension could not be built or loaded: nothing to benchmark")

    devices = ["cpu"] + (["cuda"] if _ext.has_kernel("bank_update_", "cuda") and torch.cuda.is_available() else [])
    print(f"bank_update_: N={args.n} B={args.b} D={args.d}, {args.repeats} repeated indices; devices {devices}")
    print(f"{'dev':<6}{'dtype':<10}{'provider':<11}{'median us':>11}{'naive/x':>10}{'p10 us':>10}{'naive/x':>10}")
    by_device = {dev: [] for dev in devices}
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16):
            by_device[dev] += run(dev, dtype, args)
    args.out.mkdir(parents=True, exist_ok=True)
    for dev, rows in by_device.items():  # each device's rows under its own name (a GPU's held CPU rows)
        path = args.out / f"bank_update-{common.device_slug(dev)}.json"
        path.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
