"""The errors a user can fix, and the one line the command-line tools print for them.

Every tool turns a :class:`UserError` (and an ``OSError`` that names a file) into
``PROG: error: <one line>`` and exit status 2. Anything else is a programming error and keeps its
traceback (docs/method.md §6). The classes also derive from the built-in type a library caller
would expect (``ValueError`` for bad data, configuration and checkpoints), so code that catches
those keeps working.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """An error the user can fix: a bad path, flag value, data set, file or checkpoint."""


class DataError(UserError, ValueError):
    """A data set that cannot be used: missing, unreadable, malformed, or a split that cannot work."""


class ConfigError(UserError, ValueError):
    """A configuration value out of its range; the message names the command-line flag."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, or from another run."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite (lower the learning rate)."""


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it
    (``pip install 'llp_fast[EXTRA]'``)."""


class BaselineFailed(UserError):
    """The supervised-only baseline beside a run ended with an error (its one line is the message)."""


class AnalyzeError(DataError):
    """``llp-fast-analyze`` cannot use a run directory (missing, or not a training run's)."""


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once the checkpoint is safely written; not an error."""

    def __init__(self, signum: int, run_dir: str):
        super().__init__(f"interrupted by signal {signum}; checkpoint saved in {run_dir}")
        self.signum = signum
        self.run_dir = run_dir


class InterruptedTwice(KeyboardInterrupt):
    """A second SIGINT/SIGTERM while training: the run gives up at once, without the checkpoint the
    first one asked for (the last complete one is kept)."""

    def __init__(self, kept: str = "the last complete checkpoint is kept"):
        super().__init__(f"interrupted twice; {kept}")


class Terminated(BaseException):
    """Raised by a tool's SIGINT and SIGTERM handler; the tool ends with 130, nothing half-written.
    Not a KeyboardInterrupt: one of those now and then ended the process by SIGINT (exit -2) after
    the tool had returned 130."""


# A DataLoader worker re-raises its exception in the main process with the worker's traceback in
# the message; the user-facing text is marked so that one_line can find it there.
MARKER = "llp_fast data error: "


def one_line(e: BaseException) -> str:
    """The user-facing line of an exception (the marked line of a worker's re-raised error)."""
    text = str(e)
    for line in text.splitlines():
        if MARKER in line:
            return line.split(MARKER, 1)[1].strip()
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return text.splitlines()[0] if text else type(e).__name__


# OSErrors a user fixes on the machine, not in the code: a missing, unwritable or full place, or
# failing hardware.
_USER_ERRNOS = {
    errno.EIO,
    errno.EFBIG,
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


def is_user_error(e: BaseException) -> bool:
    """Whether a tool prints ``e`` as one line: a :class:`UserError`, or an ``OSError`` about the
    machine's files (missing, unwritable, a full disk)."""
    return isinstance(e, UserError) or (isinstance(e, OSError) and e.errno in _USER_ERRNOS)
