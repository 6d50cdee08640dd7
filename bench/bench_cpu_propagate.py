"""CPU propagate and local_density: the fused C++ top-K against its baselines (docs/method.md §4).

Providers, all on the same inputs, timed in interleaved rounds (so that a change of machine load hits
every provider alike; the ratios are measured in one run) after a correctness check:

    naive      chunked PyTorch: mm + bias + topk + vote (propagate) / + logsumexp (density)
    mm_only    the same chunks' fp32 torch.mm alone, into a reused buffer: the floor to beat
    reference  llp_fast.reference (the spec in code: streaming, column-chunked)
    extension  llp_fast's compiled kernel (csrc/cpu/topk_cpu.cpp) through the op
    faiss      faiss-cpu IndexFlatIP on bias-augmented vectors, plus the same vote / logsumexp:
               query [v, 1] . key [m / tau, -log_rho] = v . m / tau - log_rho = the score

    PYTHONPATH=. python bench/bench_cpu_propagate.py [--q 20000] [--m 5000] [--reps 7] [--scaling]

Prints a table of medians and ratios; writes JSON rows to bench/results/cpu_propagate-<host>.json.
Goal (docs/method.md §4): extension >= 2x faster than naive and within 1.3x of mm_only, both ops.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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

from llp_fast import _ext  # noqa: E402

try:
    from .common import git_commit
except ImportError:  # run as a script
    from common import git_commit  # noqa: E402
from llp_fast.reference import local_density_ref, propagate_ref, tile_shape, vote  # noqa: E402

TAU = 0.07


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Providers. Each returns the op's outputs, so the correctness check and the timing use the same code.


def naive_topk(queries, keys, k, bias):
    """Chunked as the reference's tile budget allows (whole key set per chunk at this shape)."""
    rows, _ = tile_shape(queries.shape[0], keys.shape[0])
    for r0 in range(0, queries.shape[0], rows):
        s = queries[r0 : r0 + rows] @ keys.T
        s.mul_(1.0 / TAU)
        if bias is not None:
            s.sub_(bias)
        v, i = s.topk(k, dim=1)
        yield r0, v, i


def naive_propagate(q, m, cls, rho, k, num_classes):
    labels = torch.empty(q.shape[0], dtype=torch.int64)
    conf = torch.empty(q.shape[0])
    for r0, v, i in naive_topk(q, m, k, rho):
        lab, c = vote(v, cls[i], num_classes)
        labels[r0 : r0 + len(lab)], conf[r0 : r0 + len(c)] = lab, c
    return labels, conf


def naive_density(m, bank, t):
    out = torch.empty(m.shape[0])
    for r0, v, _ in naive_topk(m, bank, t, None):
        out[r0 : r0 + len(v)] = torch.logsumexp(v, dim=1)
    return out


def mm_only(queries, keys):
    rows, _ = tile_shape(queries.shape[0], keys.shape[0])
    buf = torch.empty(rows, keys.shape[0])
    for r0 in range(0, queries.shape[0], rows):
        x = queries[r0 : r0 + rows]
        torch.mm(x, keys.T, out=buf[: x.shape[0]])


def faiss_index(keys, bias):
    import faiss
    import numpy as np

    if bias is None:
        kk = keys.numpy()
    else:
        kk = torch.cat([keys / TAU, -bias[:, None]], dim=1).numpy()
    index = faiss.IndexFlatIP(kk.shape[1])
    index.add(np.ascontiguousarray(kk, dtype=np.float32))
    return index


def faiss_search(index, queries, k, biased):
    import numpy as np

    qq = torch.cat([queries, torch.ones(queries.shape[0], 1)], dim=1) if biased else queries
    d, i = index.search(np.ascontiguousarray(qq.numpy(), dtype=np.float32), k)
    return torch.from_numpy(d), torch.from_numpy(i)


def faiss_propagate(index, q, cls, k, num_classes):
    s, i = faiss_search(index, q, k, True)
    return vote(s, cls[i], num_classes)


def faiss_density(index, m, t):
    s, _ = faiss_search(index, m, t, False)
    return torch.logsumexp(s / TAU, dim=1)


# ---------------------------------------------------------------------------------------------


def check_propagate(name, got, ref, min_agree):
    labels, conf = got
    agree = (labels == ref[0]).float().mean().item()
    same = labels == ref[0]
    err = (conf[same] - ref[1][same]).abs().max().item() if same.any() else math.inf
    ok = agree >= min_agree and err < 1e-3
    print(f"  check propagate/{name}: labels agree {agree:.5f}, max |conf diff| {err:.2e} -> {'ok' if ok else 'FAIL'}")
    return ok


def check_density(name, got, ref, atol):
    err = (got - ref).abs().max().item()
    ok = err <= atol
    print(f"  check local_density/{name}: max |diff| {err:.2e} -> {'ok' if ok else 'FAIL'}")
    return ok


def interleaved(providers: dict, reps: int):
    """Medians (ms) of ``reps`` rounds; each round runs every provider once, in turn. Returns wall
    medians, process-CPU-time medians (all threads; less sensitive to other jobs on a shared
    machine) and the raw wall times."""
    wall = {name: [] for name in providers}
    cpu = {name: [] for name in providers}
    for fn in providers.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in providers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    med = lambda d: {name: statistics.median(v) for name, v in d.items()}  # noqa: E731
    return med(wall), med(cpu), wall


def scaling(q, m, cls, args, meta):
    """Extension time at Q/4, Q/2, Q (M fixed) and M/4, M/2, M (Q fixed): linear in each (docs/method.md §4)."""
    op = torch.ops.llp_fast.propagate.default
    rho = torch.zeros(m.shape[0])
    rows = []
    print(f"scaling of the extension (propagate, median of {args.reps}):")
    print(f"{'Q':>8}{'M':>8}{'ms':>10}{'ns per Q*M':>12}")
    for nq, nm in [
        (args.q // 4, args.m),
        (args.q // 2, args.m),
        (args.q, args.m),
        (args.q, args.m // 4),
        (args.q, args.m // 2),
    ]:
        qq, mm_, cc, rr = q[:nq], m[:nm], cls[:nm], rho[:nm]
        run = functools.partial(op, qq, mm_, cc, rr, args.k, TAU, args.classes)
        med, _, _ = interleaved({"extension": run}, args.reps)
        ms = med["extension"]
        print(f"{nq:>8}{nm:>8}{ms:>10.1f}{ms * 1e6 / (nq * nm):>12.3f}")
        rows.append(
            dict(
                op="propagate",
                provider="extension-scaling",
                shape=f"q={nq},m={nm},d={args.d},k={args.k}",
                dtype="float32",
                median_ms=ms,
                reps=args.reps,
                **meta,
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--q", type=int, default=20000, help="queries (propagate); pool rows (density)")
    p.add_argument("--m", type=int, default=5000, help="labeled rows")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--t", type=int, default=25)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--scaling", action="store_true", help="also time the extension at Q/4..Q and M/4..M")
    args = p.parse_args(argv)

    if _ext.load() is None:
        sys.exit("the C++ extension could not be built or loaded: nothing to benchmark")
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    use_faiss = faiss_version is not None and not args.no_faiss

    torch.manual_seed(0)
    q = F.normalize(torch.randn(args.q, args.d), dim=1)
    m = F.normalize(torch.randn(args.m, args.d), dim=1)
    cls = torch.randint(0, args.classes, (args.m,))
    op_prop, op_dens = torch.ops.llp_fast.propagate.default, torch.ops.llp_fast.local_density.default
    # Density: the labeled points are the queries, the unlabeled q rows the pool (docs/method.md §1.1).
    print(f"shape: Q={args.q} M={args.m} D={args.d} K={args.k} T={args.t}, float32, {torch.get_num_threads()} threads")
    rho = local_density_ref(m, q, args.t, TAU)

    # Correctness first, on the full problem.
    ref_p = propagate_ref(q, m, cls, rho, args.k, TAU, args.classes)
    ref_d = rho
    ok = check_propagate("extension", op_prop(q, m, cls, rho, args.k, TAU, args.classes), ref_p, 0.999)
    ok &= check_propagate("naive", naive_propagate(q, m, cls, rho, args.k, args.classes), ref_p, 0.999)
    ok &= check_density("extension", op_dens(m, q, args.t, TAU, None), ref_d, 1e-4)
    ok &= check_density("naive", naive_density(m, q, args.t), ref_d, 1e-4)
    if use_faiss:
        idx_p, idx_d = faiss_index(m, rho), faiss_index(q, None)
        ok &= check_propagate("faiss", faiss_propagate(idx_p, q, cls, args.k, args.classes), ref_p, 0.99)
        ok &= check_density("faiss", faiss_density(idx_d, m, args.t), ref_d, 1e-3)
    if not ok:
        sys.exit("correctness check failed: not timing")

    suites = {
        "propagate": {
            "naive": lambda: naive_propagate(q, m, cls, rho, args.k, args.classes),
            "mm_only": lambda: mm_only(q, m),
            "reference": lambda: propagate_ref(q, m, cls, rho, args.k, TAU, args.classes),
            "extension": lambda: op_prop(q, m, cls, rho, args.k, TAU, args.classes),
        },
        "local_density": {
            "naive": lambda: naive_density(m, q, args.t),
            "mm_only": lambda: mm_only(m, q),
            "reference": lambda: local_density_ref(m, q, args.t, TAU),
            "extension": lambda: op_dens(m, q, args.t, TAU, None),
        },
    }
    if use_faiss:
        # Index building (a copy of the keys) is outside the timing, as for the other providers.
        suites["propagate"]["faiss"] = lambda: faiss_propagate(idx_p, q, cls, args.k, args.classes)
        suites["local_density"]["faiss"] = lambda: faiss_density(idx_d, m, args.t)

    meta = dict(
        device=f"{cpu_name()} x{torch.get_num_threads()} threads",
        torch=torch.__version__,
        faiss=faiss_version,
        python=platform.python_version(),
        commit=git_commit(),
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )
    rows = []
    print(
        f"\n{'op':<14}{'provider':<11}{'wall ms':>9}{'naive/x':>9}{'x/mm_only':>10}"
        f"{'cpu ms':>9}{'naive/x':>9}{'x/mm_only':>10}  wall runs (ms)"
    )
    for op, providers in suites.items():
        med, cpu, raw = interleaved(providers, args.reps)
        for name, ms in med.items():
            print(
                f"{op:<14}{name:<11}{ms:>9.1f}{med['naive'] / ms:>9.2f}{ms / med['mm_only']:>10.2f}"
                f"{cpu[name]:>9.1f}{cpu['naive'] / cpu[name]:>9.2f}{cpu[name] / cpu['mm_only']:>10.2f}  "
                + " ".join(f"{x:.0f}" for x in raw[name])
            )
            rows.append(
                dict(
                    op=op,
                    provider=name,
                    shape=f"q={args.q},m={args.m},d={args.d},k={args.k if op == 'propagate' else args.t}",
                    dtype="float32",
                    median_ms=ms,
                    median_cpu_ms=cpu[name],
                    reps=args.reps,
                    speedup_vs_naive=med["naive"] / ms,
                    ratio_to_mm_only=ms / med["mm_only"],
                    cpu_speedup_vs_naive=cpu["naive"] / cpu[name],
                    cpu_ratio_to_mm_only=cpu[name] / cpu["mm_only"],
                    **meta,
                )
            )
        for kind, t in (("wall", med), ("cpu", cpu)):
            ext = t["extension"]
            verdict = (t["naive"] / ext >= 2.0) and (ext / t["mm_only"] <= 1.3)
            print(
                f"{op} ({kind} time): extension {t['naive'] / ext:.2f}x faster than naive, "
                f"{ext / t['mm_only']:.2f}x mm_only"
                + (f", {t['faiss'] / ext:.2f}x faster than faiss" if "faiss" in t else "")
                + f"  -> docs/method.md §4 bar {'met' if verdict else 'NOT met'}"
            )
        print()
    if args.scaling:
        rows += scaling(q, m, cls, args, meta)
    print(f"load average during the run: {os.getloadavg()[0]:.1f} ({meta['device']})")

    args.out.mkdir(parents=True, exist_ok=True)
    host = "".join(c if c.isalnum() else "-" for c in platform.node().lower()) or "cpu"
    path = args.out / f"cpu_propagate-{host}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
