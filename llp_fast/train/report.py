"""What a run reports: ``metrics.jsonl``, TensorBoard scalars and the per-epoch line.

``RUN_DIR/metrics.jsonl`` holds one JSON object per completed epoch. The checkpoint carries the
same rows (its ``history``), and a resumed run rewrites the file from them: a line torn by a
crash, or a deleted file, is restored from the checkpoint instead of blocking the resume or
losing the history. TensorBoard (optional: the ``tensorboard`` package, the ``tb`` extra) gets
the same scalars in ``RUN_DIR/tb``, in one event file for the run's life; a resumed run opens a
new one that purges events past the checkpoint, so a replayed epoch is not shown twice.

Both are written here, synchronously, through :mod:`llp_fast._files`: a full disk while
appending a row or an event is one :class:`~llp_fast._files.WriteError` naming the file, and
the file is cut back to its last complete line or record. (TensorBoard's own ``SummaryWriter``
writes from a background thread, whose failure would print that thread's traceback and surface
only at the next call.)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import socket
import struct
import time

from .. import _files
from ..errors import DataError
from .checkpoint import CHECKPOINT, CONFIG, METRICS, TENSORBOARD

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
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n} is not valid JSON (a torn line?)") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n} is not a JSON object (one epoch's metrics)")
            rows.append(row)
    return rows


def write_history(run_dir: str, history: list[dict]) -> None:
    """Rewrites ``RUN_DIR/metrics.jsonl`` from ``history``, atomically (a run with no completed
    epoch and no file yet gets none)."""
    path = os.path.join(run_dir, METRICS)
    if not history and not os.path.exists(path):
        return
    with _files.atomic_open(path, "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


def reopen(run_dir: str, history: list[dict], epoch: int, config: dict) -> TensorBoard:
    """What a fit writes before its first step: the checkpoint's metrics rows (the record), the
    settings where they are missing (a second fit of a Trainer whose first stopped before its first
    checkpoint: :func:`forget_unsaved` took them, and the run trained on without a ``config.json``),
    and TensorBoard's writer from ``epoch``."""
    _files.make_dirs(run_dir, what="run directory")  # (removed with the settings, or not made here)
    write_history(run_dir, history)
    if not os.path.exists(os.path.join(run_dir, CONFIG)):
        write_config(run_dir, config)
    return TensorBoard(run_dir, epoch)


def forget_unsaved(run_dir: str, *, made: bool) -> None:
    """After a run stopped before its first checkpoint was written: its metrics rows belong to no
    checkpoint, and go (a new run there was refused as "the metrics of a run whose checkpoint is
    gone", where the error had said the same command starts the run again); and where the run made
    ``run_dir`` itself (``runs/<time>``), what else it wrote there (its settings, TensorBoard's
    folder), then the directory where nothing else is in it (a ``fit`` whose network failed at its
    first step left one behind on every try)."""
    if os.path.exists(os.path.join(run_dir, CHECKPOINT)):
        return
    with contextlib.suppress(OSError):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, METRICS))
        if not made:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, CONFIG))
        shutil.rmtree(os.path.join(run_dir, TENSORBOARD), ignore_errors=True)
        os.rmdir(run_dir)


def append_row(run_dir: str, row: dict) -> None:
    """Adds one line to ``RUN_DIR/metrics.jsonl``, whole or not at all."""
    _files.append(os.path.join(run_dir, METRICS), (json.dumps(row) + "\n").encode())


def write_config(run_dir: str, config: dict) -> None:
    """``RUN_DIR/config.json``, written atomically."""
    _files.write_text(os.path.join(run_dir, CONFIG), json.dumps(config, indent=1))


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row, as TensorBoard scalars (the epoch is the step)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


_EVENT_FILES = itertools.count()


class TensorBoard:
    """The run's scalars in ``RUN_DIR/tb/events.out.tfevents.*`` (TensorBoard's record format:
    length, masked CRC-32C of the length, an ``Event`` protocol buffer, its masked CRC-32C), when
    the ``tensorboard`` package is installed; otherwise nothing. ``epochs_done``: the checkpoint's
    epoch count; events of later epochs in earlier files are purged (a replayed epoch), the way
    ``SummaryWriter(purge_step=...)`` does it."""

    def __init__(self, run_dir: str, epochs_done: int = 0):
        self.path = None
        self.missing = None
        try:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog, SourceMetadata
            from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
            from torch.utils.tensorboard.summary import scalar
        except ImportError:
            self.missing = "no TensorBoard scalars (metrics.jsonl has them): pip install 'llp_fast[tb]' for them"
            return
        self._event, self._scalar, self._crc = Event, scalar, masked_crc32c
        directory = os.path.join(run_dir, TENSORBOARD)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:  # (a file named tb: "error: RUN/tb: File exists")
            if os.path.lexists(directory) and not os.path.isdir(directory):  # (the same command met it again)
                e = OSError(e.errno, f"{e.strerror or e}: a file of that name is in the way (remove or rename it)")
            raise _files.WriteError(directory, e, what="TensorBoard folder") from None
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_EVENT_FILES):06d}"
        )
        self.path = os.path.join(directory, name)
        source = SourceMetadata(writer="llp_fast")
        first = [Event(wall_time=time.time(), file_version="brain.Event:2", source_metadata=source)]
        # (a fresh start too: an attempt that failed before its first checkpoint left its epochs here)
        purge = epochs_done + 1
        first.append(Event(step=purge, file_version="brain.Event:2"))
        first.append(Event(step=purge, session_log=SessionLog(status=SessionLog.START)))
        self._write(first)

    def _write(self, events) -> None:
        records = []
        for event in events:
            data = event.SerializeToString()
            header = struct.pack("<Q", len(data))
            records.append(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))
        _files.append(self.path, b"".join(records), what="TensorBoard file")

    def add(self, row: dict) -> None:
        if self.path is None:
            return
        now = time.time()
        events = []
        for key, value in scalars(row).items():
            events.append(self._event(wall_time=now, step=int(row["epoch"]), summary=self._scalar(key, value)))
        self._write(events)

    def close(self) -> None:
        self.path = None


def _pct(v) -> str:
    return "   n/a" if v is None else f"{100 * v:5.1f}%"  # ("n/a%" where the data has no truth)


def known_base(m: dict) -> str:
    """`` (of N known)`` after a pseudo-label accuracy measured on fewer than all the unlabeled
    examples (with ``--extra-unlabeled`` only the examples whose truth is known count); else ``""``."""
    known, unl = m.get("pseudo_known"), m.get("unlabeled")
    return (
        f" (of {known:,} known)"
        if m.get("pseudo_acc") is not None and known is not None and unl and known < unl
        else ""
    )


def epoch_line(m: dict, epochs: int, supervised_only: bool) -> str:
    tag = "sup" if supervised_only else "llp"
    return (
        f"[{tag}] epoch {m['epoch']:3d}/{epochs} loss {m['train_loss']:.3f} test top-1 {_pct(m['test_top1'])} "
        f"top-5 {_pct(m['test_top5'])} kNN {_pct(m['knn_top1'])} pseudo {_pct(m['pseudo_acc'])}{known_base(m)} "
        f"({m['images_per_s']:,.0f} img/s, {m['epoch_seconds']:.1f} s)"
    )
