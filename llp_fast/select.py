"""``llp-fast-select``: pick extra unlabeled images from a large pool (paper §4, Appendix B).

The rule (Appendix B, after Yalniz et al. 2019): score every pool image with a trained
checkpoint's classifier, ``p = softmax(logits)``; keep each image's P most confident classes
(ties: lower class id); then for each class c keep the K images with the highest ``p_c``
among those that kept c (ties: lower pool index). An image may be selected for several
classes. Defaults P = 10, K = 500 as in the paper.

The pool is streamed (:func:`llp_fast.data.extra.open_pool`): one batch of images, the
(S, K) best scores and indices so far, and the batch's candidates live in memory, so memory is
O(S * K + B * S) whatever the pool size. Images are shown to the network exactly as its
training source shows its held-out images (same channels, size and normalisation,
reconstructed from the checkpoint's config).

Output (written atomically: temporary file, fsync, rename), by extension:

- ``.npz``: ``index`` (E,) int64 pool indices, ``class`` (E,) int64, ``score`` (E,) float32,
  ``path`` (E,) str for folder pools, ``meta`` a JSON string;
- ``.json``: ``{"meta": {...}, "selected": [{"index", "class", "score"[, "path"]}, ...]}``.

Rows are ordered by class, then by decreasing score. ``meta`` records the pool
(``source``, absolute), the checkpoint, P, K, the class count and the pool size; when the pool
carries labels (``y``), also the fraction of selected rows whose label is their class.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from .data import DataError
from .data.extra import native_format, open_pool, to_input
from .train import CHECKPOINT, CheckpointError, load_checkpoint, model_for, saved_config, source_for

PROG = "llp-fast-select"


# -- a trained network and the preprocessing it was trained with ---------------------------------
def load_network(path: str, device="cpu", *, random_init: bool = False):
    """``(model, cfg, source)`` for a checkpoint file or run directory: the network in eval mode
    with its weights, the run's :class:`TrainConfig`, and its training data source rebuilt from
    the config (it holds the preprocessing: channels, sizes, normalisation statistics).
    ``random_init`` keeps the freshly initialised weights (a control for the linear probe)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = saved_config(ckpt, path)
    try:
        source = source_for(cfg, device, workers=0)
    except DataError as e:
        raise DataError(f"the checkpoint's training data ({cfg.data}) fixes its preprocessing: {e}") from None
    model = model_for(cfg, source)
    if not random_init:
        try:
            model.load_state_dict(ckpt["model"])
        except Exception as e:
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise CheckpointError(f"corrupt checkpoint {path} ({type(e).__name__}: {why})") from None
    model = model.to(device).eval()
    return model, cfg, source


# -- the selection rule ---------------------------------------------------------------------
class PerClassTopK:
    """Streaming per-class top-K of candidate scores (Appendix B).

    ``scores`` (S, K) float32 and ``index`` (S, K) int64 hold, for each class, the best K
    candidates seen so far in decreasing score (ties: lower index first; empty slots -inf and
    -1). Candidates must arrive in increasing index order, as a stream over the pool does: a
    stable sort of [kept, new] then breaks ties by index."""

    def __init__(self, num_classes: int, k: int, top_classes: int):
        self.k, self.p = int(k), min(int(top_classes), int(num_classes))
        self.scores = torch.full((num_classes, self.k), float("-inf"))
        self.index = torch.full((num_classes, self.k), -1, dtype=torch.int64)

    def add(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        """``probs`` (B, S) float32 class probabilities of pool images ``index`` (B,)."""
        probs, index = probs.float().cpu(), index.long().cpu()
        s, b = self.scores.shape[0], probs.shape[0]
        # each image's P most confident classes, ties to the lower class id (stable sort)
        top = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, : self.p]
        cand = torch.full_like(probs, float("-inf")).scatter_(1, top, probs.gather(1, top))
        scores = torch.cat([self.scores, cand.T], 1)  # (S, K + B)
        ids = torch.cat([self.index, index.expand(s, b)], 1)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.scores, self.index = scores.gather(1, order), ids.gather(1, order)

    def result(self):
        """``(index, class, score)`` numpy arrays, by class then decreasing score."""
        keep = self.index >= 0
        cls = torch.arange(self.scores.shape[0]).unsqueeze(1).expand_as(self.index)
        return self.index[keep].numpy(), cls[keep].numpy(), self.scores[keep].numpy().astype(np.float32)


@torch.no_grad()
def select(model, source, pool, *, top_classes: int = 10, per_class: int = 500, batch_size: int = 256, progress=None):
    """Runs the rule over ``pool`` with ``model`` (preprocessed as ``source``); returns the
    ``(index, class, score)`` arrays of :meth:`PerClassTopK.result`."""
    if top_classes < 1 or per_class < 1 or batch_size < 1:
        raise ValueError("--top-classes, --per-class and --batch-size must be positive")
    fmt = native_format(source)
    best = PerClassTopK(source.num_classes, per_class, top_classes)
    model.eval()
    done = 0
    for x, idx in pool.batches(batch_size, fmt):
        logits, _ = model(to_input(source, x))
        best.add(torch.softmax(logits.float(), dim=1), idx)
        done += int(idx.shape[0])
        if progress is not None:
            progress(done, len(pool))
    return best.result()


# -- the selection file -----------------------------------------------------------------------
def write_selection(path: str, index, cls, score, meta: dict, paths=None) -> None:
    """Writes a selection atomically (``.npz`` or ``.json`` by extension)."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {path}: directory {out_dir} does not exist")
    if not path.endswith((".npz", ".json")):
        raise ValueError(f"--out {path}: expected a .npz or .json file name")
    tmp = os.path.join(out_dir, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    sel_paths = None if paths is None else [paths[i] for i in index.tolist()]
    try:
        with open(tmp, "wb") as f:
            if path.endswith(".json"):
                rows = []
                for n, (i, c, s) in enumerate(zip(index.tolist(), cls.tolist(), score.tolist())):
                    row = {"index": i, "class": c, "score": s}
                    if sel_paths is not None:
                        row["path"] = sel_paths[n]
                    rows.append(row)
                f.write(json.dumps({"meta": meta, "selected": rows}, indent=0).encode())
            else:
                arrays = dict(
                    index=np.asarray(index, np.int64),
                    score=np.asarray(score, np.float32),
                    meta=np.array(json.dumps(meta)),
                    **{"class": np.asarray(cls, np.int64)},
                )
                if sel_paths is not None:
                    arrays["path"] = np.array(sel_paths, dtype=str)
                np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_selection(path: str) -> dict:
    """``{"index", "class", "score", "path" (or None), "meta"}`` of a selection file;
    :class:`DataError` on anything wrong."""
    if not os.path.isfile(path):
        raise DataError(f"no selection file at {path}")
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            rows, meta = d["selected"], d["meta"]
            out = {
                "index": np.array([r["index"] for r in rows], dtype=np.int64),
                "class": np.array([r["class"] for r in rows], dtype=np.int64),
                "score": np.array([r["score"] for r in rows], dtype=np.float32),
                "path": np.array([r["path"] for r in rows], dtype=str) if rows and "path" in rows[0] else None,
            }
        else:
            with np.load(path, allow_pickle=False) as f:
                out = {k: f[k] for k in ("index", "class", "score")}
                out["path"] = f["path"] if "path" in f.files else None
                meta = json.loads(str(f["meta"]))
        out["meta"] = meta
        if not isinstance(meta, dict) or "source" not in meta:
            raise KeyError("meta.source")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read selection {path} ({type(e).__name__}: {e})") from None
    n = out["index"].shape[0]
    if out["class"].shape[0] != n or out["score"].shape[0] != n or (out["index"] < 0).any():
        raise DataError(f"bad selection {path}: index, class and score must be equal-length, indices >= 0")
    return out


# -- command line --------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Select extra unlabeled images from a large pool with a trained checkpoint (paper §4, "
        "Appendix B): keep each image's P most confident classes, then each class's K most confident images.",
    )
    ap.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR")
    ap.add_argument("--source", required=True, help="the pool: npz:PATH (uint8 'x', optional 'y') or folder:PATH")
    ap.add_argument("--out", required=True, help="SELECTION.npz or SELECTION.json (written atomically)")
    ap.add_argument("--top-classes", type=int, default=10, help="P: classes kept per image (default 10)")
    ap.add_argument("--per-class", type=int, default=500, help="K: images kept per class (default 500)")
    ap.add_argument("--batch-size", type=int, default=256, help="pool images scored at once (default 256)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding a folder pool")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    ap.add_argument("--quiet", action="store_true")
    return ap


def _one_line(e: BaseException) -> str:
    from .cli import _one_line as one

    return one(e)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        for name in ("top_classes", "per_class", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        pool = open_pool(args.source, workers=args.workers)
        model, cfg, source = load_network(args.checkpoint, device)
        tty = not args.quiet and sys.stderr.isatty()

        def progress(done, total):
            if tty:
                sys.stderr.write(f"\r{PROG}: scored {done}/{total}")
                sys.stderr.flush()

        index, cls, score = select(
            model,
            source,
            pool,
            top_classes=args.top_classes,
            per_class=args.per_class,
            batch_size=args.batch_size,
            progress=progress,
        )
        if tty:
            sys.stderr.write("\n")
        meta = {
            "source": pool.spec,
            "checkpoint": os.path.abspath(args.checkpoint),
            "trained_on": cfg.data,
            "top_classes": args.top_classes,
            "per_class": args.per_class,
            "num_classes": source.num_classes,
            "pool_size": len(pool),
            "selected_rows": int(index.shape[0]),
            "selected_images": int(np.unique(index).shape[0]),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if pool.truth is not None and index.size:
            t = np.asarray(pool.truth, dtype=np.int64)[index]
            known = t >= 0
            if known.any():
                meta["label_agreement"] = float((t[known] == cls[known]).mean())
        write_selection(args.out, index, cls, score, meta, paths=pool.paths)
    except (DataError, CheckpointError, ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    line = (
        f"{PROG}: {meta['selected_rows']} rows ({meta['selected_images']} distinct images) of {meta['pool_size']} "
        f"in {meta['num_classes']} classes (P={args.top_classes}, K={args.per_class})"
    )
    if "label_agreement" in meta:
        line += f", pool labels agree with the class on {100 * meta['label_agreement']:.1f}%"
    print(line + f", {meta['seconds']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
