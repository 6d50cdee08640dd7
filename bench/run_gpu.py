"""Everything a GPU session runs for the Triton kernels, in one call (docs/method.md §4):

    python bench/run_gpu.py                  # tests on the GPU, then all benchmarks
    python bench/run_gpu.py --quick          # tests, then per-step shapes only (3 to 5 minutes)

1. correctness: the Triton kernel tests (``-m triton`` in ``tests/test_<op>.py``, the
   ``cuda``-marked realistic shapes included) run on the GPU, not the interpreter;
2. timing: ``bench_propagate``, ``bench_local_density`` and ``bench_aggregation_loss``
   (``bench_topk_scores`` with ``--ops topk_scores``; each checks its providers against the
   reference before timing) on the step, sweep and ImageNet shapes;
3. a short table of the docs/method.md §4 ratios (triton vs naive, vs mm_only, vs one read of the
   bank, extra memory) to ``$OUT/summary-<ops>.md`` when ``$OUT`` is set (else
   bench/results), beside the JSON rows.

The tests stop after ``--test-timeout`` seconds (default 300: ``--quick`` then fits one
10-minute device call with room to spare; bench/run_gpu_trainer.sh's outer ``timeout`` must
exceed it by the benchmarks' time). Slow baselines stop after ``--max-seconds`` of runs.
Everything together may take longer than one 10-minute device call; split it:

    python bench/run_gpu.py --quick                                  # tests + per-step shapes
    python bench/run_gpu.py --skip-tests --ops propagate
    python bench/run_gpu.py --skip-tests --ops local_density
    python bench/run_gpu.py --skip-tests --ops aggregation_loss
    python bench/run_gpu.py --skip-tests --ops topk_scores

Every argument (``--ops``, the shapes each op resolves, ``--dtypes``) is checked before the tests
start: a bad one is an argparse error (exit 2), not a "FAILED" line after minutes of tests.

The training-step overhead (docs/method.md §4's last bar) is its own call:
``python bench/bench_step_overhead.py`` (ResNet-18, 224 px, batch 128, AMP, an ImageNet-size bank).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import common  # noqa: E402

# The ops with Triton kernels: tests/test_<op>.py and bench/bench_<op>.py for each.
OPS = ("propagate", "local_density", "aggregation_loss", "topk_scores")


def run_tests(timeout: float) -> int:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
    env.pop("LLP_FAST_AUTOTUNE", None)  # correctness of the heuristic settings
    env["LLP_FAST_REQUIRE_EXT"] = "1"  # the CUDA extension's tests fail, not skip, where it did not build
    # the Triton kernels' tests, and the CUDA extension's (the bank update): a failed CUDA build fell
    # back to the CPU one with a warning and these skipped
    tests = [str(ROOT / "tests" / f"test_{op}.py") for op in (*OPS, "bank_update")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "triton or cuda", *tests]
    print("$", " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"tests timed out after {timeout:.0f} s")
        return 124


def ratios(rows) -> list[str]:
    """docs/method.md §4's bars, one line per (op, shape, dtype) that has a triton row."""
    by = {}
    for r in rows:
        by.setdefault((r.op, r.shape, r.dtype), {})[r.provider] = r
    lines = ["| op | shape | dtype | kernel, ms | vs naive (bar >= 10x) | vs mm_only (bar >= 1x) | notes |",
             "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    for (op, shape, dtype), provs in by.items():
        for name in ("triton", "triton_fused"):
            if name in provs:
                lines.append(_ratio_line(op, shape, dtype, name, provs))
    return lines


def _ratio_line(op, shape, dtype, kernel: str, p: dict) -> str:
    t = p[kernel].median_ms
    vs = lambda baseline: f"{p[baseline].median_ms / t:.2f}x" if baseline in p else "-"
    notes = [f"{p[kernel].extra.get('tflops', '')} TFLOP/s"]
    if "bank_read" in p:
        notes.append(f"{t / p['bank_read'].median_ms:.2f}x one bank read (bar <= 3x)")
    if "extra_mb" in p[kernel].extra:
        notes.append(f"extra {p[kernel].extra['extra_mb']} MB (bar < 16)")
    return f"| {op} | {shape} | {dtype} | {kernel} {t:.3f} | {vs('naive')} | {vs('mm_only')} | {'; '.join(notes)} |"


def _validate(p, args):
    """(ops, shapes argument, {op: its bench module}) once every argument checks out, else ``p.error``
    (exit 2): all of it before anything runs, so that a typo costs no GPU time."""
    ops = args.ops.split(",")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"--ops: unknown {', '.join(map(repr, unknown))} (a comma list of {', '.join(OPS)})")
    if len(set(ops)) != len(ops):
        p.error(f"--ops {args.ops!r}: an op named twice")
    try:  # the benchmarks' own check: 'half' or 'float' passed here and then stopped them after the tests
        common.dtypes_arg(args.dtypes)
    except argparse.ArgumentTypeError as e:
        p.error(f"--dtypes: {e}")
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if not args.max_seconds > 0:
        p.error("--max-seconds must be positive")
    if not args.test_timeout > 0:
        p.error("--test-timeout must be positive")
    modules = {name: importlib.import_module(f"bench_{name}") for name in ops}
    shapes = "step" if args.quick else "step,sweep,imagenet"
    for name, module in modules.items():
        try:
            if not module.shapes(shapes):
                raise KeyError(shapes)
        except KeyError as exc:
            p.error(f"bench_{name}.py has no shapes {exc} (asked: {shapes})")
    return ops, shapes, modules


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="per-step shapes only")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument(
        "--test-timeout",
        type=float,
        default=300.0,
        help="seconds before the tests are stopped (the first H200 run: 34 Triton tests in 125 s; now 59)",
    )
    p.add_argument("--ops", default="propagate,local_density,aggregation_loss", help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=6.0)
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--autotune", action="store_true", help="time the kernels with LLP_FAST_AUTOTUNE=1")
    args = p.parse_args(argv)
    if args.autotune:
        # Read when llp_fast.kernels is first imported, which happens at the first kernel call.
        os.environ["LLP_FAST_AUTOTUNE"] = "1"
    ops, shapes, modules = _validate(p, args)

    import torch

    if not torch.cuda.is_available():
        print("run_gpu.py needs a CUDA GPU; on CPU run bench/bench_<op>.py directly", file=sys.stderr)
        return 2
    import llp_fast

    print(llp_fast.describe_backends(), flush=True)  # which implementation serves each op here
    out = common.results_dir()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    status = 0 if args.skip_tests else run_tests(timeout=args.test_timeout)
    print(f"tests: exit {status} ({time.time() - t0:.0f} s)", flush=True)

    rows = []
    for name in ops:
        t1 = time.time()
        argv_b = ["--shapes", shapes, "--reps", str(args.reps), "--max-seconds", str(args.max_seconds),
                  "--dtypes", args.dtypes, "--out", str(out)]  # fmt: skip
        try:
            rows += modules[name].main(argv_b)
        except (Exception, SystemExit) as exc:  # keep going: one op's failure must not hide the others' numbers
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            status = status or 1
        print(f"{name}: {time.time() - t1:.0f} s", flush=True)

    head = [
        f"# Triton kernels on {common.device_name()}",
        f"torch {torch.__version__}, triton {common.triton_version()}, commit {common.git_commit()}",
        f"tests exit status: {status}; command: python bench/run_gpu.py {' '.join(argv or sys.argv[1:])}",
        "",
    ]
    text = "\n".join(head + ratios(rows) + ["", common.table(rows)]) + "\n"
    # One summary per invocation, so that runs split over several calls do not overwrite
    # each other: summary-<ops>[-quick].md.
    path = out / f"summary-{'-'.join(ops)}{'-quick' if args.quick else ''}.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path} ({time.time() - t0:.0f} s in all)")
    return status


if __name__ == "__main__":
    sys.exit(main())
