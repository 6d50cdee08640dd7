"""Atomic file output: a reader sees the previous complete file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_path(path: str, *, suffix: str = ""):
    """Yields a temporary path beside ``path``; when the block ends without an exception the file
    there is fsynced and moved onto ``path`` (``os.replace``), otherwise removed. ``suffix`` keeps
    an extension that a writer insists on (NumPy's ``.npy``)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs):
    """``open`` for writing through :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
