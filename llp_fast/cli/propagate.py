"""``llp-fast-propagate``: LLP labels for precomputed embeddings, streamed from ``.npy`` files
(docs/method.md §1.1-1.2; more than one round: §7). The work is :mod:`llp_fast.embeddings`'s; this
module parses and checks the flags, runs it (alone, under torchrun, or ``--nproc P`` local
processes) and writes the outputs atomically.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .. import distributed
from ..embeddings import outputs
from ..embeddings.settings import DEFAULT_ROUNDS, POOLS
from ..errors import ConfigError
from . import _common

PROG = "llp-fast-propagate"


def _device(text: str) -> str:
    device = _common.DEVICE(text)
    try:
        return _common.cuda_checked(device)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{device}: CUDA is not available on this machine") from None


def _out(text: str) -> str:
    try:
        return outputs.check_path(text, "file")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("file ")) from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="LLP labels for precomputed embeddings: density-weighted votes of the K nearest labeled "
        "neighbours (docs/method.md §1.1-1.2), repeated over rounds in which the most confident rows join the "
        "voters (§7), streamed block by block from memory-mapped .npy files.",
    )
    ap.add_argument("embeddings", help="EMB.npy (N, D) float16/32/64, or a directory of .npy shards (name order)")
    ap.add_argument("labels", help="LABELS.npy (N,) int, -1 = unlabeled (or a directory of shards)")
    ap.add_argument("--out", type=_out, required=True, help="PSEUDO.npy: (N,) int64 labels (labeled rows keep theirs)")
    ap.add_argument("--confidence-out", type=_out, default=None, help="(N,) float32 confidences (1 on labeled rows)")
    ap.add_argument(
        "--probs-out",
        type=_out,
        default=None,
        help="PROBS.npz: 'classes' (N, P) int64 and 'probs' (N, P) float32, each row's --top most likely classes",
    )
    ap.add_argument("--top", type=_common.POSITIVE_INT, default=3, help="P for --probs-out (default 3)")
    ap.add_argument("--voters-out", type=_out, default=None, help="(N, K) int64 rows that voted (-1: none)")
    ap.add_argument("--k", type=_common.POSITIVE_INT, default=10, help="voters per row (at most the voters)")
    ap.add_argument("--t", type=_common.POSITIVE_INT, default=25, help="density neighbours (at most the pool)")
    ap.add_argument("--tau", type=_common.POSITIVE_FLOAT, default=0.07)
    ap.add_argument(
        "--rounds",
        type=_common.POSITIVE_INT,
        default=DEFAULT_ROUNDS,
        help=f"rounds of the vote (default {DEFAULT_ROUNDS}; 1 = the paper's one-shot vote)",
    )
    ap.add_argument(
        "--max-voters",
        type=_common.COUNT,
        default=None,
        help="cap on pseudo-labeled voters (default: none; bounds the cost of many rounds at large N)",
    )
    ap.add_argument(
        "--density-pool",
        choices=POOLS,
        default="auto",
        help="auto (default): unlabeled rows for one round, all rows for more",
    )
    ap.add_argument(
        "--labeled-weight",
        type=_common.POSITIVE_FLOAT,
        default=None,
        help="weight of the labeled voters (default: 1 for one round, 3 for more)",
    )
    ap.add_argument("--no-density-weighting", action="store_true", help="the NoDW ablation: plain weighted kNN")
    ap.add_argument("--no-normalize", action="store_true", help="embeddings are already unit rows")
    ap.add_argument("--chunk", type=_common.POSITIVE_INT, default=65536, help="rows per block (default 65536)")
    ap.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N (Triton kernels)")
    ap.add_argument("--threads", type=_common.POSITIVE_INT, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--nproc", type=_common.POSITIVE_INT, default=1, help="run as P local processes (gloo/NCCL)")
    ap.add_argument("--dist-timeout", type=_common.POSITIVE_FLOAT, metavar="SECONDS", help=_common.DIST_TIMEOUT_HELP)
    ap.add_argument("--quiet", action="store_true", help="no progress display")
    return ap


OUTPUT_FLAGS = ("out", "confidence_out", "probs_out", "voters_out")


def parse(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    outs = {"--" + f.replace("_", "-"): getattr(args, f) for f in OUTPUT_FLAGS}
    try:
        outputs.check_distinct(outs, {"EMBEDDINGS": args.embeddings, "LABELS": args.labels})
    except ConfigError as e:
        ap.error(str(e))
    return args


def settings_of(args):
    from ..embeddings import Settings

    return Settings(
        k=args.k,
        t=args.t,
        tau=args.tau,
        density=not args.no_density_weighting,
        density_pool=args.density_pool,
        labeled_weight=args.labeled_weight,
        rounds=args.rounds,
        max_voters=args.max_voters,
        chunk=args.chunk,
        device=args.device,
    )


def _cost_note(progress, n: int, m: int, settings) -> None:
    """One line when more than one round will cost far more than the one-shot vote: the voters grow
    toward N, so the work is quadratic in N (docs/embeddings.md)."""
    if settings.rounds < 2 or n < 100_000:
        return
    grown = (n - m) * (settings.rounds - 1) // settings.rounds
    voters = m + (grown if settings.max_voters is None else min(grown, settings.max_voters))
    ratio = voters / max(m, 1)
    if ratio >= 20:
        progress.line(
            f"{settings.rounds} rounds on {n:,} rows: about {ratio:,.0f}x the work of --rounds 1 (the voters grow to "
            f"{voters:,}); --rounds 1 or --max-voters V bound it"
        )


def _run(args) -> int:
    import time

    import torch

    from .._progress import Progress
    from ..embeddings import Engine, Rows, read_labels
    from ..embeddings.comm import Local, Ranks

    if args.threads:
        torch.set_num_threads(args.threads)
    comm, rank = Local(), 0
    settings = settings_of(args)
    if distributed.launched():
        rank, _ = distributed.init("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            settings = settings.replace(device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        comm = Ranks(torch.device(settings.device))
    progress = Progress(enabled=not args.quiet and rank == 0, prog=PROG)
    t0 = time.perf_counter()
    rows = Rows(args.embeddings, normalize=not args.no_normalize)
    labels = read_labels(args.labels, rows.n)
    n, m = rows.n, int((labels >= 0).sum())
    _cost_note(progress, n, m, settings)
    engine = Engine(rows, labels, settings, comm=comm, progress=progress)
    result = engine.run(top_classes=args.top if args.probs_out else 0, voter_ids=bool(args.voters_out))
    if rank == 0:
        files = {args.out: ("npy", result.labels.astype(labels.dtype))}
        if args.confidence_out:
            files[args.confidence_out] = ("npy", result.confidence)
        if args.probs_out:
            files[args.probs_out] = ("npz", {"classes": result.top_classes, "probs": result.top_probs})
        if args.voters_out:
            files[args.voters_out] = ("npy", result.voters)
        outputs.write(files)
        rounds = f", {result.rounds_run} round{'s' if result.rounds_run != 1 else ''}"
        print(
            f"{PROG}: labelled {n - m} of {n} rows from {m} labeled{rounds} "
            f"in {time.perf_counter() - t0:.2f} s -> {args.out}"
        )
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _relaunch(args, argv) -> int:
    """``--nproc P``: the same command as P local processes; a lost rank is one line (nothing is
    written: rank 0 writes the outputs at the end, atomically)."""
    return _common.torchrun(args.nproc, "llp_fast.cli.propagate", argv, prog=PROG, kept=lambda: "nothing was written")


def main(argv=None) -> int:
    """``llp-fast-propagate EMB.npy LABELS.npy --out PSEUDO.npy``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    _common.set_dist_timeout(args.dist_timeout)
    if args.nproc > 1 and not distributed.launched():
        return _common.run(PROG, _relaunch, args, argv)
    try:  # SIGTERM cleans up as Ctrl-C does (main thread only)
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:
        previous = None
    try:
        return distributed.finish(_common.run(PROG, _run, args))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
