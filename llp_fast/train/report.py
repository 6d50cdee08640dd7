"""What a run reports: ``metrics.jsonl``, TensorBoard scalars and the per-epoch line.

``RUN_DIR/metrics.jsonl`` holds one JSON object per completed epoch. The checkpoint carries the
same rows (its ``history``), and a resumed run rewrites the file from them: a line torn by a
crash, or a deleted file, is restored from the checkpoint instead of blocking the resume or
losing the history. TensorBoard (optional: the ``tensorboard`` package, the ``tb`` extra) gets
the same scalars in ``RUN_DIR/tb``, through one writer for the run's life; a resumed run opens a
new one that purges events past the checkpoint, so a replayed epoch is not shown twice.
"""

from __future__ import annotations

import json
import math
import os

from .._files import atomic_open
from ..errors import DataError
from .checkpoint import METRICS

KEYS_FIRST = ("epoch", "test_top1", "test_top5", "knn_top1", "pseudo_acc")


def epoch_row(epoch: int, metrics: dict, stats: dict, lr: float, *, consistency: bool) -> dict:
    """The metrics row of a completed epoch: the evaluation's ``metrics`` (docs/method.md §1.9) and
    the epoch's running ``stats`` (loss sum, steps, images, seconds, the consistency term's share,
    the whole-bank vote's changes)."""
    n_steps = max(stats["loss_n"], 1)
    return {
        "epoch": epoch,
        **{k: metrics[k] for k in KEYS_FIRST[1:]},
        "train_loss": stats["loss_sum"] / n_steps,
        "lr": lr,
        "images_per_s": stats["images"] / max(stats["seconds"], 1e-9),
        "epoch_seconds": stats["seconds"],
        "consistency_share": stats["masked"] / n_steps if consistency else None,
        **{k: stats[k] for k in ("relabel_changed", "relabel_seconds") if k in stats},
        **{k: v for k, v in metrics.items() if k not in KEYS_FIRST},
    }


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics file; :class:`DataError` naming the file and line for a bad line."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n} is not valid JSON (a torn line?)") from None
    return rows


def write_history(run_dir: str, history: list[dict]) -> None:
    """Rewrites ``RUN_DIR/metrics.jsonl`` from ``history``, atomically (a run with no completed
    epoch and no file yet gets none)."""
    path = os.path.join(run_dir, METRICS)
    if not history and not os.path.exists(path):
        return
    with atomic_open(path, "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


def append_row(run_dir: str, row: dict) -> None:
    with open(os.path.join(run_dir, METRICS), "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row, as TensorBoard scalars (the epoch is the step)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class TensorBoard:
    """One ``SummaryWriter`` in ``RUN_DIR/tb`` for as long as the run trains, when the
    ``tensorboard`` package is installed; otherwise nothing but ``missing``, the line that says so.
    ``epochs_done``: the checkpoint's epoch count, past which earlier event files' scalars are
    purged (a replayed epoch)."""

    def __init__(self, run_dir: str, epochs_done: int = 0):
        self.writer = None
        self.missing = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.missing = "no TensorBoard scalars (metrics.jsonl has them): pip install 'llp_fast[tb]' for them"
            return
        purge = epochs_done + 1 if epochs_done else None
        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)

    def add(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _pct(v) -> str:
    return "  n/a" if v is None else f"{100 * v:5.1f}"


def epoch_line(m: dict, epochs: int, supervised_only: bool) -> str:
    tag = "sup" if supervised_only else "llp"
    return (
        f"[{tag}] epoch {m['epoch']:3d}/{epochs} loss {m['train_loss']:.3f} test top-1 {_pct(m['test_top1'])}% "
        f"top-5 {_pct(m['test_top5'])}% kNN {_pct(m['knn_top1'])}% pseudo {_pct(m['pseudo_acc'])}% "
        f"({m['images_per_s']:,.0f} img/s, {m['epoch_seconds']:.1f} s)"
    )
