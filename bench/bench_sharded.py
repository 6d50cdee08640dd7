"""The sharded memory bank against one process (docs/method.md §1.1, §1.6; issue 22's bar): the density
refresh and one training-step propagation + update, P gloo processes with one thread each against one
process with P threads, on the same bank.

    python bench/bench_sharded.py                          # N = 200,000, M = 20,000, D = 128, B = 4,096, P = 2
    python bench/bench_sharded.py --n 50000 --m 5000 --reps 3

Correctness first: the sharded density and the step's labels and confidences are checked against the
single bank's (the same rows: both start from the same seed) before anything is timed; a failed
check (or a worker that dies) ends the workers and exits with status 1. Then the
phases alternate, one process and the sharded group in turn, ``--reps`` times; the medians and
their ratios are printed and written to bench/results/sharded-<cpu>.json (``--out``: by default ``$OUT``
when set, as the other benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _targets(n: int, m: int, classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    targets = torch.full((n,), -1, dtype=torch.long)
    labeled = torch.randperm(n, generator=g)[:m]
    targets[labeled] = torch.randint(0, classes, (m,), generator=g)
    return targets


def _batch(n: int, b: int, d: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:b]
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    return idx, emb


def _phases(bank, args, idx, emb):
    """(density seconds, step seconds, log_rho, labels, confidence) of one refresh and one step."""
    t0 = time.perf_counter()
    log_rho = bank.refresh_density(t=args.t, tau=0.07)
    t1 = time.perf_counter()
    labels, conf = bank.step(idx, emb, k=args.k, tau=0.07)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, log_rho, labels, conf


def _worker(rank: int, world: int, init: str, args, queue) -> None:
    import torch.distributed as dist

    from llp_fast.distributed import ShardedMemoryBank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    targets = _targets(args.n, args.m, args.classes)
    idx, emb = _batch(args.n, args.b, args.d)
    mine = slice(rank * args.b // world, (rank + 1) * args.b // world)
    out = []
    for r in range(args.reps + 1):  # round 0: the correctness run (and warm-up)
        bank = ShardedMemoryBank(targets, args.classes, dim=args.d, seed=3)
        dist.barrier()
        density, step, log_rho, labels, conf = _phases(bank, args, idx[mine], emb[mine])
        if r == 0:
            lab_idx = bank.local.index_of[: bank.local.num_labeled] + bank.start
            out.append({"log_rho": (lab_idx, log_rho), "labels": labels, "conf": conf})
        else:
            out.append({"density": density, "step": step})
        # the next round starts when the parent says so: the one-process run goes in between
        dist.barrier()
        if rank == 0:
            queue.put(("round", r, out[-1]))
        if not _wait(init + f".go{r}", init + ".stop"):
            break  # the parent stopped the run (a failed check): no more rounds
    dist.destroy_process_group()


def _wait(path: str, stop: str) -> bool:
    """Waits for the file ``path``: True when it appears, False when ``stop`` does (or the parent is gone)."""
    path, stop = path.removeprefix("file://"), stop.removeprefix("file://")
    parent = os.getppid()
    while not os.path.exists(path):
        if os.path.exists(stop) or os.getppid() != parent:
            return False
        time.sleep(0.01)
    return True


def _get(queue, procs, timeout: float = 1.0):
    """The next item the workers put, or SystemExit when one of them ended without putting it."""
    import queue as queue_module

    while True:
        try:
            return queue.get(timeout=timeout)
        except queue_module.Empty:
            dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode is not None]
            if dead:
                raise SystemExit(f"worker(s) ended before the round was done (rank, exit code): {dead}") from None


def _end(procs, stop: str, grace: float = 10.0) -> None:
    """Tells the workers to stop (the file ``stop``), then terminates any still running after ``grace`` s."""
    open(stop, "w").close()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def _rounds(args, queue, procs, tmp: str, targets, idx, emb, MemoryBank):
    """The parent's side of every round: the correctness check (round 0), then the timed rounds;
    ({phase: one-process seconds}, {phase: sharded seconds})."""
    single = {"density": [], "step": []}
    sharded = {"density": [], "step": []}
    for r in range(args.reps + 1):
        _, _, got = _get(queue, procs)
        bank = MemoryBank(targets, args.classes, dim=args.d, seed=3)
        density, step, log_rho, labels, conf = _phases(bank, args, idx, emb)
        if r == 0:  # correctness before any timing
            lab_idx, rho = got["log_rho"]
            want = log_rho[bank.row_of[lab_idx]]
            err = (rho - want).abs().max().item()
            same = torch.equal(got["labels"], labels)
            cerr = (got["conf"] - conf).abs().max().item()
            print(f"check: density max error {err:.2e}, step labels identical {same}, confidence error {cerr:.2e}")
            if not (err < 1e-4 and same and cerr < 1e-5):
                raise SystemExit("the sharded bank differs from one process: not timing")
        else:
            single["density"].append(density)
            single["step"].append(step)
            sharded["density"].append(got["density"])
            sharded["step"].append(got["step"])
            print(f"round {r}: one process {density:.2f} s + {step:.3f} s; sharded {got['density']:.2f} s + "
                  f"{got['step']:.3f} s", flush=True)  # fmt: skip
        open(f"{tmp}/rendezvous.go{r}", "w").close()
    return single, sharded


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--m", type=int, default=20_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--b", type=int, default=4096)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--t", type=int, default=25)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--out",
        default=None,
        help="results folder (default: $OUT when set, else bench/results: common.results_dir)",
    )
    args = ap.parse_args(argv)
    for flag in (
        "n",
        "m",
        "d",
        "b",
        "k",
        "t",
        "classes",
        "world",
        "reps",
    ):  # (--world 0: torch's set_num_threads error)
        if getattr(args, flag) < 1:
            ap.error(f"argument --{flag}: must be at least 1, got {getattr(args, flag)}")

    import torch.multiprocessing as mp

    from llp_fast import MemoryBank

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import common

    args.out = args.out or str(common.results_dir())
    torch.set_num_threads(args.world)
    targets = _targets(args.n, args.m, args.classes)
    idx, emb = _batch(args.n, args.b, args.d)
    tmp = tempfile.mkdtemp()
    init = f"file://{tmp}/rendezvous"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world, init, args, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    try:
        single, sharded = _rounds(args, queue, procs, tmp, targets, idx, emb, MemoryBank)
        for p in procs:
            p.join()
    except BaseException:
        _end(procs, f"{tmp}/rendezvous.stop")  # the workers would wait for the next round forever
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if any(p.exitcode for p in procs):
        raise SystemExit(f"worker exit codes {[p.exitcode for p in procs]}: nothing written")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    summary = {
        "shape": {k: getattr(args, k) for k in ("n", "m", "d", "b", "k", "t", "world")},
        "one_process_threads": args.world,
        "median_s": {
            "one_process": {k: med(v) for k, v in single.items()},
            "sharded": {k: med(v) for k, v in sharded.items()},
        },
        "ratio": {k: med(sharded[k]) / med(single[k]) for k in single},
        "device": common.device_name("cpu"),
        "cpu": common.cpu_info(),
        "commit": common.git_commit(),
        "command": common.command_line(),
        "load": os.getloadavg()[0],
        "runs": {"one_process": single, "sharded": sharded},
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sharded-{common.device_slug('cpu')}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
