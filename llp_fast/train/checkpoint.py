"""Checkpoints: atomic, verified, complete enough to resume exactly.

``RUN_DIR/checkpoint.pt`` holds the model, optimizer and grad-scaler state, the memory bank, every
random generator, the position inside the epoch and the metrics history, so that a resumed run
replays what the uninterrupted one would have done. Each write goes to a temporary file that is
fsynced and then renamed over the old one (:mod:`llp_fast._files`): a crash leaves the previous
complete checkpoint. Each checkpoint stores a SHA-256 digest of its contents (every tensor's
bytes, every number and string, in a canonical order), recomputed on every load, so a file whose
bytes changed on disk is refused as corrupt instead of resuming with different results.

A write that fails (a full disk, a quota, a read-only or failing disk) is one
:class:`~llp_fast._files.WriteError` that says so, that the previous checkpoint is intact (and
its epoch), and the command that resumes from it. When a run starts or resumes, :func:`sweep`
removes what dead writers left in its directory: temporary files of a process killed while it
wrote, and bank files that no checkpoint lists.

Tools that only read checkpoints (``llp-fast-select``, ``-linear-probe``, ``-analyze``) import this
module and :mod:`llp_fast.train.config`, never the training loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex

import torch

from .. import _files
from .._files import WriteError, atomic_open
from ..errors import CheckpointError
from .claim import not_claimed
from .config import TrainConfig, from_dict

# What a run directory holds, named here alone (the tools' --out checks which files a run keeps).
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"  # the resolved settings (report.write_config)
TENSORBOARD = "tb"  # TensorBoard's event files (report.TensorBoard)
VERSION = 2
# An LLP run's supervised-only baseline trains in RUN_DIR/baseline; RUN_DIR/baseline.json marks
# it (a resume of the run resumes the baseline too).
BASELINE_DIR = "baseline"
BASELINE_MARK = "baseline.json"

# Every entry a resume reads, with its type: a checkpoint lacking one is corrupt, not a KeyError.
_ENTRIES = {
    "version": int,
    "sha256": str,
    "config": dict,
    "epoch": int,
    "step_in_epoch": int,
    "global_step": int,
    "order_state": torch.Tensor,
    "epoch_stats": dict,
    "model": dict,
    "optimizer": dict,
    "scaler": dict,
    "bank": (dict, type(None)),
    "ema": (dict, type(None)),
    "targets": torch.Tensor,
    "rng": dict,
    "history": list,
}


def digest(obj, name: str = "checkpoint") -> str:
    """SHA-256 of ``obj`` (nested dicts, lists, tuples, tensors, numbers, strings, bytes, None),
    walked in a canonical order: equal contents give equal digests wherever they were loaded.
    Anything else is a TypeError naming its place, ``name['model']['w']``."""
    h = hashlib.sha256()
    _feed(h, obj, name)
    return h.hexdigest()


def _feed(h, obj, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            h.update(f"{key!r}:".encode())
            _feed(h, obj[key], f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for i, item in enumerate(obj):
            _feed(h, item, f"{where}[{i}]")
    elif isinstance(obj, bytes):
        h.update(f"B{len(obj)};".encode())
        h.update(obj)
    elif obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"{where} is a {type(obj).__name__}: a checkpoint holds tensors, containers and scalars")


def save(state: dict, path: str) -> None:
    """Writes ``state`` (every entry of a checkpoint but its digest) to ``path``, atomically,
    with its digest."""
    payload = dict(state, version=VERSION)
    payload.pop("sha256", None)
    payload["sha256"] = digest(payload)
    with _saving(os.path.dirname(os.path.abspath(path)), path):
        with atomic_open(path, what="checkpoint") as f:
            torch.save(payload, f)


# -- what a failed write says, and how a run continues -------------------------------------------


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def resume_command(run_dir: str, nproc: int | None = None) -> str:
    """The command that continues the run in ``run_dir`` (the LLP run when ``run_dir`` is its
    baseline's directory), with ``--nproc`` when it ran as several processes, and ``--epochs``
    where the run was resumed with more epochs than its last checkpoint holds (a fault before that
    resume's first checkpoint: the command without it ended the run at the old count, unsaid)."""
    run_dir = os.path.normpath(run_dir)
    parent = os.path.dirname(run_dir)
    if os.path.basename(run_dir) == BASELINE_DIR and os.path.exists(os.path.join(parent, BASELINE_MARK)):
        run_dir = parent
    nproc = world_size() if nproc is None else nproc
    command = f"llp-fast-train --resume {shlex.quote(run_dir)}" + (f" --nproc {nproc}" if nproc > 1 else "")
    # config.json holds the settings of the run last started there (a resume writes them before its
    # first checkpoint)
    saved, running = (peek(run_dir) or {}).get("epochs"), read_settings(run_dir).get("epochs")
    running = running if isinstance(running, int) and not isinstance(running, bool) else None
    return command + (f" --epochs {running}" if saved is not None and running not in (None, saved) else "")


def read_settings(run_dir: str) -> dict:
    """``RUN_DIR/config.json`` as a dict, or ``{}`` where it is missing or unreadable (for what a
    message or a check may read from it; a run's own settings come from its checkpoint)."""
    try:
        with open(os.path.join(run_dir, CONFIG), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def peek(path: str) -> dict | None:
    """``{"epoch", "step_in_epoch", "epochs"}`` of the checkpoint at ``path`` (a run directory or a
    file; ``epochs``: its config's), its tensors left on disk (memory-mapped, never read); None when
    there is none or it cannot be read."""
    try:
        ckpt = torch.load(checkpoint_path(path), map_location="cpu", weights_only=True, mmap=True)
        epochs = ckpt.get("config", {}).get("epochs")
        return {"epoch": int(ckpt["epoch"]), "step_in_epoch": int(ckpt["step_in_epoch"]), "epochs": epochs}
    except Exception:
        return None


def files_differ(ckpt: dict, fingerprint: str | None) -> bool:
    """Whether a checkpoint's training images (``data_files``: folder data's digest of its files'
    names, array data's of its pixels) are not those of ``fingerprint`` (its source's now);
    checkpoints without one (written before it was kept) are not compared."""
    saved = ckpt.get("data_files")
    return bool(saved and fingerprint and saved != fingerprint)


def describe(info: dict) -> str:
    """ "epoch 3", or "epoch 3 and 14 steps of epoch 4" for a checkpoint written on a signal."""
    text = f"epoch {info['epoch']}"
    steps = info["step_in_epoch"]
    return text + (f" and {steps} step{'s' if steps != 1 else ''} of epoch {info['epoch'] + 1}" if steps else "")


def last_checkpoint(run_dir: str, nproc: int | None = None, *, previous: bool = False) -> str:
    """What a user reads when a run stops on a fault: which checkpoint is kept and the command
    that continues from it (``previous``: the one before a checkpoint that failed to write)."""
    info = peek(run_dir)
    if info is None:
        return f"{run_dir} holds no checkpoint yet: the same command starts the run again"
    which = "the previous checkpoint" if previous else "the last complete checkpoint"
    return f"{which} ({describe(info)}) is intact; continue with: {resume_command(run_dir, nproc)}"


@contextlib.contextmanager
def _saving(run_dir: str, path: str):
    """A failed write of a checkpoint's files says which checkpoint is kept and how to resume."""
    try:
        yield
    except WriteError as e:
        raise e.noted(last_checkpoint(run_dir, previous=True)) from e.__cause__


_NOT_CHECKPOINTS = (".npz", ".npy", ".json", ".jsonl", ".txt", ".csv", ".png", ".jpg", ".html")


def load(path: str, map_location="cpu", *, need=None) -> dict:
    """The checkpoint at ``path``, verified: the digest equal to the contents, and the entries a
    resume reads (or only those named in ``need``, for a tool that reads a few) present with
    their types. :class:`CheckpointError` (one line) on anything wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a torn zip, a truncated pickle, bytes that decode to nonsense
        # (it said "delete it to start over", which -select, -linear-probe and -analyze also printed)
        ext = os.path.splitext(path)[1].lower()
        if ext in _NOT_CHECKPOINTS:  # (a pool or metrics file given in its place read as "corrupt")
            raise CheckpointError(
                f"{path} is not a checkpoint (a {ext} file): give a run directory or its checkpoint.pt"
            ) from None
        raise CheckpointError(f"corrupt checkpoint {path} ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"corrupt checkpoint {path} (not a checkpoint)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {ckpt.get('version')!r}, this llp_fast reads {VERSION}"
        )
    for key in need if need is not None else _ENTRIES:
        kind = _ENTRIES[key]
        if key not in ckpt or not isinstance(ckpt[key], kind) or (kind is int and isinstance(ckpt[key], bool)):
            raise CheckpointError(f"corrupt checkpoint {path} (entry {key!r} missing or malformed)")
    stored = ckpt.pop("sha256", None)
    if digest(ckpt) != stored:
        raise CheckpointError(f"corrupt checkpoint {path} (its contents do not match their digest)")
    return ckpt


def config_of(ckpt: dict, path: str) -> TrainConfig:
    """The run's :class:`TrainConfig` stored in a loaded checkpoint."""
    try:
        return from_dict(ckpt["config"])
    except TypeError as e:
        raise CheckpointError(f"corrupt checkpoint {path} (bad config: {e})") from None


def held_by(run_dir: str, resume: str) -> str | None:
    """Why a new run must not start over in ``run_dir`` (``resume``: how to continue a run), or
    None: it holds a run's checkpoint, or the metrics of an epoch a run finished (a run whose
    checkpoint was deleted to save space lost its record to the next run there)."""
    if os.path.exists(os.path.join(run_dir, CHECKPOINT)):
        return f"{run_dir} already holds a run: continue it with {resume}"
    metrics = os.path.join(run_dir, METRICS)
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        return (
            f"{run_dir} holds the metrics of a run whose {CHECKPOINT} is gone (a new run would replace them): "
            f"remove {metrics} to start over there"
        )
    return None


def open_run(run_dir: str) -> tuple[TrainConfig, dict]:
    """``(config, checkpoint)`` of the run in ``run_dir``, loaded once, verified; the config's
    ``run_dir`` is ``run_dir`` (the directory may have moved since it was written)."""
    path = os.path.join(run_dir, CHECKPOINT)
    not_claimed(run_dir)  # (a run training there replaces its pieces: they read as corrupt)
    ckpt = load(path)
    cfg = config_of(ckpt, path)
    cfg.run_dir = run_dir
    cfg.stop_after_steps = None
    return cfg, ckpt


def corrupt(path: str, e: BaseException) -> CheckpointError:
    """The one error for a checkpoint whose contents do not fit what reads them (a state dict for
    another network, a tensor of the wrong shape): the file's path and the reader's complaint."""
    why = str(e).splitlines()[0][:200] if str(e) else ""
    return CheckpointError(f"corrupt checkpoint {path} ({type(e).__name__}: {why})")


def evaluated_weights(ckpt: dict) -> dict:
    """The weights a run reports its accuracy with: the weight average when the run keeps one
    (docs/method.md §8.3), else the trained weights."""
    ema = ckpt.get("ema")
    return {k: v for k, v in ema.items() if k != "steps"} if ema else ckpt["model"]


def checkpoint_path(path: str) -> str:
    """``path`` itself, or the checkpoint inside it when it is a run directory."""
    return os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path


# -- the bank's rows -----------------------------------------------------------------------------
# A bank that holds every row (one process, or replicated) is stored inline as one piece. A sharded
# bank is stored as one file per rank, RUN_DIR/bank-<step>-r<rank>.pt, each with the rows that rank
# owns and their digest; the checkpoint lists the files and digests, so no rank ever gathers the
# whole bank, and pieces written at one world size load at any other. Files carry the step in their
# name, so the previous checkpoint's files survive until the new checkpoint.pt has replaced it; a
# second save at the same step (a run resumed at an epoch's last step saves again at its end) takes
# the next free name, bank-<step>.<n>-r<rank>.pt: rewritten in place, the kept checkpoint's file
# changed under it, and a failed save then removed it.

_BANK_FILE = re.compile(r"^bank-\d+(\.\d+)?-r\d+\.pt$")


def is_bank_file(name: str) -> bool:
    """Whether a file name in a run directory is one of its bank pieces (a kept checkpoint's, or a
    stale one a killed writer left)."""
    return _BANK_FILE.match(name) is not None


def _new_bank_name(run_dir: str, tag: int, rank: int) -> str:
    """A name no file in ``run_dir`` has: ``bank-<tag>-r<rank>.pt``, or with ``.1``, ``.2``, ...
    after the tag where a file (the kept checkpoint's) has it."""
    name, n = f"bank-{tag}-r{rank}.pt", 0
    while os.path.lexists(os.path.join(run_dir, name)):
        n += 1
        name = f"bank-{tag}.{n}-r{rank}.pt"
    return name


def save_bank(bank, run_dir: str, tag: int, rank: int, world: int) -> dict:
    """The checkpoint's ``bank`` entry (collective for a sharded bank: every rank writes its file)."""
    piece = bank.rows_state()
    if piece["start"] == 0 and piece["end"] == len(bank):
        return {"pieces": [piece]}
    piece_digest = digest(piece)
    os.makedirs(run_dir, exist_ok=True)
    name = _new_bank_name(run_dir, tag, rank)
    path = os.path.join(run_dir, name)
    failed = None
    try:
        with _saving(run_dir, path), atomic_open(path, what="checkpoint") as f:
            torch.save(dict(piece, sha256=piece_digest), f)
    except WriteError as e:  # (the others learn of it below, not by a lost peer)
        failed = e
    mine = {"file": name, "start": piece["start"], "end": piece["end"], "sha256": piece_digest}
    entries = [None] * world
    torch.distributed.all_gather_object(entries, mine if failed is None else {"error": failed})
    # A rank whose file failed (a full disk) ended alone, and the files the others had written stayed,
    # listed by no checkpoint: each rank removes its own; a rank that failed ends with its own line,
    # the others with the first failure's (the same line, said once).
    first = next((e["error"] for e in entries if "error" in e), None)
    if first is not None:
        if failed is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        raise failed if failed is not None and str(failed) == str(first) else first
    return {"files": entries}


def bank_pieces(entry: dict, run_dir: str, start: int = 0, end: int | None = None) -> list[dict]:
    """The pieces of a ``bank`` entry that overlap dataset indices [start, end), loaded and
    verified against their digests."""
    if "pieces" in entry:
        return entry["pieces"]
    out = []
    for e in entry.get("files", []):
        if e["end"] <= start or (end is not None and e["start"] >= end):
            continue
        path = os.path.join(run_dir, e["file"])
        if not os.path.isfile(path):
            raise CheckpointError(f"corrupt checkpoint in {run_dir}: its bank file {e['file']} is missing")
        try:
            piece = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"corrupt checkpoint bank file {path} ({type(err).__name__})") from None
        stored = piece.pop("sha256", None) if isinstance(piece, dict) else None
        if stored is None or stored != e["sha256"] or digest(piece) != stored:
            raise CheckpointError(f"corrupt checkpoint bank file {path} (its contents do not match their digest)")
        out.append(piece)
    return out


def remove_stale_bank_files(run_dir: str, entry: dict | None) -> list[str]:
    """Deletes bank files that the current checkpoint does not list (earlier checkpoints', or
    those of a checkpoint that was never completed); returns their paths."""
    keep = {e["file"] for e in (entry or {}).get("files", [])}
    removed = []
    for name in os.listdir(run_dir):
        if _BANK_FILE.match(name) and name not in keep:
            try:
                os.remove(os.path.join(run_dir, name))
            except FileNotFoundError:
                continue
            except OSError as e:  # (it read "RUN/bank-3-r0.pt: Permission denied", no word of what was done)
                raise WriteError(run_dir, e, f"removing {name}, a bank file no checkpoint lists") from e
            removed.append(os.path.join(run_dir, name))
    return removed


def remove_bank_files(run_dir: str, entry: dict | None) -> None:
    """Deletes the bank files ``entry`` lists (a checkpoint that failed to write)."""
    for e in (entry or {}).get("files", []):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, e["file"]))


def sweep(run_dir: str, ckpt: dict | None) -> list[str]:
    """Before a run starts (``ckpt`` None) or resumes from ``ckpt`` in ``run_dir``: removes the
    temporary files of writers that no longer run (a process killed while it wrote a checkpoint
    leaves one, the size of the model and the bank) and the bank files ``ckpt`` does not list.
    Call it before any process of the run writes. Returns the removed paths."""
    if not os.path.isdir(run_dir):
        return []
    removed = _files.sweep(run_dir)
    return removed + remove_stale_bank_files(run_dir, None if ckpt is None else ckpt.get("bank"))
