"""``llp-fast-select``: extra unlabeled images for a trained network (paper §4, Appendix B)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from .. import _checks
from .._progress import Progress, reporter
from ..data.extra import open_pool
from ..data.selection import check_selection_path, write_selection
from ..select import select
from ..train.defaults import default_device
from ..train.trained import load_network
from . import _common

PROG = "llp-fast-select"


def _pool(text: str) -> str:
    """``--source``, checked where parsed (it said "unknown pool ''", naming no flag, and an empty
    ``npz:`` path only once the network was loaded)."""
    if not text.startswith(("npz:", "folder:")) or text in ("npz:", "folder:"):
        hint = _checks.spec_hint(text, (".npz", ".npy"))  # (a pool may be a .npy)
        raise argparse.ArgumentTypeError(f"expected npz:PATH or folder:PATH, got {text!r}{hint}")
    return _checks.expand_spec(text)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Select extra unlabeled images from a large pool with a trained checkpoint (paper §4, "
        "Appendix B): keep each image's P most confident classes, then each class's K most confident images.",
    )
    _common.add_version(ap)
    ap.add_argument(
        "checkpoint", type=_common.path, metavar="CHECKPOINT_OR_RUN_DIR", help="a run's checkpoint.pt, or its directory"
    )
    ap.add_argument(
        "--source",
        type=_pool,
        required=True,
        help="the pool: npz:PATH.npz (uint8 'x', optional 'y'), npz:PATH.npy (uint8 images, memory-mapped) "
        "or folder:PATH",
    )
    ap.add_argument(
        "--out", type=_common.path, required=True, help="SELECTION.npz or SELECTION.json (written atomically)"
    )
    ap.add_argument(
        "--top-classes", type=_common.POSITIVE_INT, default=10, help="P: classes kept per image (default 10)"
    )
    ap.add_argument(
        "--per-class", type=_common.POSITIVE_INT, default=500, help="K: images kept per class (default 500)"
    )
    ap.add_argument(
        "--batch-size", type=_common.POSITIVE_INT, default=256, help="pool images scored at once (default 256)"
    )
    ap.add_argument(
        "--workers", type=_common.THREADS, default=2, help="DataLoader workers decoding a folder pool (default 2)"
    )
    ap.add_argument("--device", type=_common.DEVICE, default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument(
        "--threads", type=_common.THREADS, default=0, help="CPU threads for torch (default: torch's choice)"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress display")
    return ap


def _main(args) -> int:
    t0 = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    progress = Progress(enabled=not args.quiet, prog=PROG)
    _common.not_an_input(args.out, args.checkpoint, args.source, data_flag="--source")
    check_selection_path(args.out)
    pool = open_pool(args.source, workers=args.workers)
    model, cfg, source = load_network(args.checkpoint, _common.cuda_checked(args.device or default_device()))
    with progress.bar(len(pool), "scoring the pool", "img") as bar:
        index, cls, score = select(
            model,
            source,
            pool,
            top_classes=args.top_classes,
            per_class=args.per_class,
            batch_size=args.batch_size,
            progress=reporter(bar),
        )
    meta = {
        "source": pool.spec,
        "checkpoint": os.path.abspath(args.checkpoint),
        "trained_on": cfg.data,
        "top_classes": min(args.top_classes, source.num_classes),  # (what ran: select() caps it; 50 was recorded)
        "per_class": min(args.per_class, max(1, len(pool))),  # (what ran, as for P: the pool caps K)
        "num_classes": source.num_classes,
        "pool_size": len(pool),
        "selected_rows": int(index.shape[0]),
        "selected_images": int(np.unique(index).shape[0]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if pool.truth is not None and index.size:
        t = np.asarray(pool.truth, dtype=np.int64)[index]
        known = (t >= 0) & (t < source.num_classes)  # (labels beyond the network's classes are unknown, as
        # --extra-unlabeled reads them; they counted as disagreeing)
        if known.any():
            meta["label_agreement"] = float((t[known] == cls[known]).mean())
            meta["label_agreement_rows"] = int(known.sum())  # (rows whose pool label is a class of the network)
    if getattr(pool, "truth_ignored", None):  # (the agreement line was left out without a word)
        meta["pool_labels_ignored"] = pool.truth_ignored
    write_selection(args.out, index, cls, score, meta, paths=pool.paths)
    line = (
        f"{PROG}: {meta['selected_rows']} rows ({meta['selected_images']} distinct images) of {meta['pool_size']} "
        f"in {meta['num_classes']} classes (P={meta['top_classes']}, K={meta['per_class']})"
    )
    if "label_agreement" in meta:
        line += f", pool labels agree with the class on {100 * meta['label_agreement']:.1f}%"
        if meta["label_agreement_rows"] < meta["selected_rows"]:  # (the others' labels were left out unsaid)
            line += (
                f" of the {meta['label_agreement_rows']} rows whose pool label is one of the network's "
                f"{source.num_classes} classes"
            )
    if "pool_labels_ignored" in meta:
        line += f", pool labels not compared ({meta['pool_labels_ignored']})"
    if getattr(pool, "skipped", None):  # (as the trainer says its data's)
        print(f"{PROG}: {pool.spec}: {pool.skipped}")
    print(line + f", {meta['seconds']:.1f} s -> {args.out}")
    return 0


def main(argv=None) -> int:
    with _common.sigterm_as_interrupt():
        return _common.run(PROG, _main, _common.parse(parser().parse_args, argv))


if __name__ == "__main__":
    sys.exit(main())
