"""A run directory claimed by the one process training in it (a ``flock`` on the directory itself):
a second run started there, or a resume of it, while the first still trains is refused instead of
mixing their files (its checkpoint's pieces read as corrupt while it replaced them)."""

from __future__ import annotations

import contextlib
import os
import weakref

from .. import _files
from ..errors import ConfigError


class RunClaim:
    """A run directory, made if missing and claimed (:func:`claim_run_dir`) until :meth:`release`
    or until the claim is dropped: ``prepare`` takes it before it writes there, ``Trainer.fit``
    gives it back."""

    def __init__(self, run_dir: str):
        _files.make_dirs(run_dir, what="run directory")
        self._release = weakref.finalize(self, release_run_dir, claim_run_dir(run_dir))

    def release(self) -> None:
        self._release()  # once: a finalizer runs at most once


# The claims this process holds. A forked child (a DataLoader worker) closes its copies at once:
# after a kill -9 of the trainer its workers lived on for seconds holding the claim, and a resume
# at once was refused as "another process is training". (A lock goes with the last descriptor of
# its open file: the child's close leaves the parent's claim in place. Exec'd children never get
# them: Python's descriptors are not inherited across exec.)
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)

_BUSY = (
    "another process is training in this run directory; wait for it to end (or stop it), or give another run directory"
)


def _held_here(fd: int) -> bool:
    """Whether one of this process's own claims is on the directory open as ``fd``."""
    try:
        st = os.fstat(fd)
        return any((s.st_dev, s.st_ino) == (st.st_dev, st.st_ino) for s in map(os.fstat, list(_HELD)))
    except OSError:
        return False


def not_claimed(run_dir: str) -> None:
    """:class:`ConfigError` where a run holds its claim on ``run_dir``: a shared claim, given back
    at once (the ranks of one resume each check, and none conflicts with another)."""
    release_run_dir(claim_run_dir(run_dir, shared=True))


def claim_run_dir(run_dir: str, *, shared: bool = False) -> int | None:
    """An exclusive claim on ``run_dir`` for one process's run (a ``flock`` on the directory
    itself, so nothing is left in it): a second run started in it, or a resume of it, while the
    first still trains is refused instead of mixing their files. ``shared``: a claim that only
    another run's exclusive one refuses. Returns the descriptor to pass to :func:`release_run_dir`
    (None where the file system has no locks)."""
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        return None  # not made yet or unreadable: whatever writes there next reports it
    if _files.fcntl is None:
        os.close(fd)
        return None
    try:
        _files.fcntl.flock(fd, (_files.fcntl.LOCK_SH if shared else _files.fcntl.LOCK_EX) | _files.fcntl.LOCK_NB)
    except BlockingIOError:
        mine = _held_here(fd)
        os.close(fd)
        if mine:  # (a Trainer from prepare() not yet fitted: "another process" sent users looking for one)
            raise ConfigError(
                f"{run_dir}: this process already trains in it, or holds it for a Trainer not yet fitted (one from "
                "prepare() keeps it until its fit() ends: fit that one, or drop it first)"
            ) from None
        raise ConfigError(f"{run_dir}: {_BUSY}") from None
    except OSError:  # no locks on this file system
        os.close(fd)
        return None
    _HELD.add(fd)
    return fd


def release_run_dir(fd: int | None) -> None:
    if fd is not None and fd in _HELD:
        _HELD.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
