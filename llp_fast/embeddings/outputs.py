"""Atomic ``.npy``/``.npz`` outputs: every file is written to a temporary name beside its target and
moved into place only when all of them are complete, fsynced and closed
(:func:`llp_fast._files.atomic_group`); on any error or interrupt the temporary files
are removed, so a reader sees the previous files or the new ones, never a torn one. A failed write
(a full disk, ...) is one :class:`~llp_fast._files.WriteError` naming the file: NumPy writes
through the writer's file object, which keeps the system's error (:mod:`llp_fast._files`)."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from .. import _files
from .._files import atomic_group, atomic_open
from ..errors import ConfigError


def check_path(path: str, what: str) -> str:
    """``path`` can take a new file: not a directory, in a directory that exists."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path}: is a directory; expected a file name")
    if why := _files.parent_problem(path):
        raise ConfigError(f"{what} {path}: {why}")
    return path


def check_distinct(outputs: dict[str, str | None], inputs: dict[str, str]) -> None:
    """No two outputs name the same file, no output is an input, and no output is a shard of an
    input folder (a ``.npy`` file in it, which the next run would read as one of its shards)."""
    seen: dict[str, str] = {os.path.realpath(p): name for name, p in inputs.items()}
    folders = {os.path.realpath(p): name for name, p in inputs.items() if os.path.isdir(p)}
    for name, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            other = seen[real]
            kind = "the input" if other in inputs else "also"
            raise ConfigError(f"{name} {path} is {kind} {other}: give each output its own file")
        base = os.path.basename(real)
        if os.path.dirname(real) in folders and base.endswith(".npy") and not base.startswith("."):
            other = folders[os.path.dirname(real)]
            raise ConfigError(
                f"{name} {path} is in {other}'s folder of shards, whose .npy files are all read as "
                f"{other}: write it elsewhere"
            )
        seen[real] = name


def write(files: dict[str, tuple[str, object]], also=None) -> None:
    """``files``: target path -> (kind, data): kind 'npy' with an array, or 'npz' with a dict of
    arrays. All are written to temporary files first, then moved into place. ``also(stack)``, if
    given, writes more files the same way (entering its own atomic writers on ``stack``) after
    these: if it fails, none of them is moved into place."""
    with atomic_group(), contextlib.ExitStack() as stack:  # (renamed together, once all are complete)
        for path, (kind, data) in files.items():
            f = stack.enter_context(atomic_open(path, suffix="." + kind))
            if kind == "npy":
                np.save(f, data, allow_pickle=False)
            else:
                np.savez(f, **data)
        if also is not None:
            also(stack)
