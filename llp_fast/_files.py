"""File output that fails in one line and leaves nothing torn behind.

* :func:`atomic_open` writes a new file to a temporary name beside its target,
  ``.NAME.tmp.PID[SUFFIX]``, fsyncs it, renames it over the target and then fsyncs the directory,
  so that after a crash or a power loss a reader finds the previous complete file or the new one,
  never a torn one, and the rename itself is durable (the order SQLite and etcd use). On any error
  or interrupt the temporary file is removed.
* :func:`append` adds bytes to the end of a file (``metrics.jsonl``, TensorBoard's event file);
  on failure the file is cut back to its previous length, so no torn line or record stays.
* Every ``OSError`` raised while writing (a full disk or quota, a read-only file system, no
  permission, an I/O error) becomes one :class:`WriteError` that names the target and the
  system's text, also when the library doing the writing wraps it in its own words (torch.save
  says ``unexpected pos 704 vs 598``, NumPy ``400000 requested and 131056 written``): the
  writers are handed a file object of ours that remembers the first error it saw. Any other
  exception is a programming error and passes through unchanged.
* :func:`sweep` removes the temporary files (and :func:`temp_folder`'s folders) of writers that no
  longer run (a process killed while writing leaves its temporary file behind), never one whose
  writer is alive: each writer holds an exclusive ``flock`` on its temporary file for as long as it
  writes, and its process id is in the name.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import shutil

from .errors import UserError

try:
    import fcntl
except ImportError:  # not on Windows: liveness is then the process id alone
    fcntl = None

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?$")


class WriteError(UserError, OSError):
    """A file could not be written (``errno``, ``strerror`` and ``filename`` as the ``OSError``
    that caused it, ``filename`` the target rather than its temporary file); the message is the
    one line a tool prints."""

    def __init__(self, path: str, err: OSError, note: str = "", *, what: str = ""):
        # (strerror first: a WriteError noted again is its own err, and str() of it is the whole line)
        text = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
        super().__init__(err.errno, text, path)
        self.what, self.note = what, note
        self.message = f"cannot write {what + ' ' if what else ''}{path}: {text}{'; ' + note if note else ''}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # a spawned process can send it back
        return (_rebuild, (self.filename, self.errno, self.strerror, self.note, self.what))

    def noted(self, note: str) -> WriteError:
        """The same failure with ``note`` (what is kept, what to type next) after its text."""
        return WriteError(self.filename, self, note, what=self.what)


def _rebuild(path, code, text, note, what):
    return WriteError(path, OSError(code, text), note, what=what)


class _Watched:
    """A file object that remembers the first ``OSError`` of its writes (the caller may wrap it
    in another exception) and delegates everything else to the real file."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def _watch(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            if self.error is None:
                self.error = e
            raise

    def write(self, data):
        return self._watch(self._f.write, data)

    def writelines(self, lines):
        return self._watch(self._f.writelines, lines)

    def flush(self):
        return self._watch(self._f.flush)

    def fsync(self):
        self.flush()
        return self._watch(os.fsync, self._f.fileno())

    def close(self):
        return self._watch(self._f.close)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _cause(e: BaseException, f: _Watched | None) -> OSError | None:
    """The ``OSError`` behind a failed write: ``e`` itself, or the one the file object saw."""
    if isinstance(e, WriteError):
        return None
    if isinstance(e, OSError) and e.errno is not None:
        return e
    return f.error if f is not None else None


def _lock(f) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: the process id remains
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable. File systems that cannot fsync a directory are
    skipped; an I/O error is not."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno == errno.EIO:
            raise
    finally:
        os.close(fd)


def make_dirs(path: str, *, what: str = "") -> None:
    """``os.makedirs(path, exist_ok=True)``; a failure is one :class:`WriteError` naming ``path``
    ("/proc/rr: No such file or directory" said neither what nor that it was being made)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e, what=what) from e


def parent_problem(path) -> str | None:
    """Why no file can be made at ``path`` for want of its directory, as an error's tail (the
    directory missing, or a file in its place: "/etc/hostname/x" read "directory /etc/hostname does
    not exist"), or None."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        return None
    up = parent
    while up and not os.path.lexists(up) and os.path.dirname(up) != up:
        up = os.path.dirname(up)
    if os.path.islink(up) and not os.path.exists(up):  # (a link to an unmounted volume, say)
        return f"{up} is a broken symbolic link (to {os.readlink(up)})"
    if os.path.lexists(up) and not os.path.isdir(up):
        return f"{up} is a file, not a directory"
    return f"directory {parent} does not exist"


def temp_path(path: str, suffix: str = "") -> str:
    """The temporary file of this process for ``path``."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.tmp.{os.getpid()}{suffix}")


@contextlib.contextmanager
def _writing(path: str, opened: str, mode: str, *, what: str, encoding=None):
    """``opened`` open for writing as a watched file, closed at the end; an I/O failure inside the
    block (or the open itself) becomes one :class:`WriteError` naming ``path``, the file the user
    asked for (``opened`` may be its temporary)."""
    f = None
    try:
        f = _Watched(open(opened, mode, encoding=encoding if "b" not in mode else None))
        yield f
    except BaseException as e:
        cause = _cause(e, f)
        if cause is not None:
            raise WriteError(path, cause, what=what) from e
        raise
    finally:
        if f is not None:
            with contextlib.suppress(OSError):
                f._f.close()


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", *, suffix: str = "", what: str = "", encoding=None):
    """A file object for writing ``path`` (mode ``"wb"`` or ``"w"``) through a temporary file:
    when the block ends without an exception the file is fsynced, renamed over ``path`` and the
    directory fsynced; otherwise the temporary file is removed. Failures are :class:`WriteError`
    (``what`` names the kind of file in its message). ``suffix``: an extension the temporary
    name keeps."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes new files, mode 'wb' or 'w', got {mode!r}")
    if os.path.exists(path) and not os.path.isfile(path):  # the rename would replace a device or a pipe
        raise WriteError(
            path, OSError("it is not a regular file (a device, a pipe or a folder): give a file"), what=what
        )
    sweep(os.path.dirname(os.path.abspath(path)), only=os.path.basename(path))
    tmp = temp_path(path, suffix)
    group, deferred = _GROUP.get(), False
    try:
        with _writing(path, tmp, mode, what=what, encoding=encoding) as f:
            _lock(f)
            yield f
            f.fsync()
            f.close()  # some file systems (NFS) report a failed write only here
            if group is not None:  # moved into place with the group's other files (atomic_group)
                group.append((tmp, path, what))
                deferred = True
                return
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if not deferred:
            with contextlib.suppress(OSError):
                os.remove(tmp)


_GROUP: contextvars.ContextVar[list | None] = contextvars.ContextVar("llp_fast_atomic_group", default=None)


@contextlib.contextmanager
def atomic_group():
    """Several outputs that move into place together: every :func:`atomic_open` inside the block
    writes, fsyncs and closes its temporary file as usual but leaves the rename to the end of the
    block, which renames them all once every one is complete (then fsyncs their folders). A failure
    at any file's write, fsync or close (NFS reports some only there), or an interrupt, before
    that: every temporary file is removed and no target changes. (A rename itself fails only where
    the folder is gone or read-only since: the files renamed before it stay.)"""
    if _GROUP.get() is not None:  # nested: the outer group moves them
        yield
        return
    pending: list = []
    token = _GROUP.set(pending)
    try:
        yield
        _GROUP.reset(token)
        token = None
        for tmp, path, what in pending:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise WriteError(path, e, what=what) from e
        for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for _, p, _ in pending):
            fsync_dir(folder)
    finally:
        if token is not None:
            _GROUP.reset(token)
        for tmp, _, _ in pending:
            with contextlib.suppress(OSError):
                os.remove(tmp)  # (a file renamed into place is no longer there)


@contextlib.contextmanager
def temp_folder(path: str, *, what: str = ""):
    """A temporary folder beside ``path`` for files that move into it at the end (``llp-fast-analyze``'s
    pictures), ``.NAME.tmp.PID`` as a temporary file's, locked while the block runs and removed after
    it: a killed writer's is removed by the next :func:`sweep` of its directory (a run's start or
    resume there, or the next such writer). Its creation's failure names ``path``."""
    sweep(os.path.dirname(os.path.abspath(path)), only=os.path.basename(path))
    tmp = temp_path(path)
    fd = None
    try:
        try:
            os.mkdir(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            if fcntl is not None:
                with contextlib.suppress(OSError):  # (no locks on this file system: the process id decides)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise WriteError(path, e, what=what) from e
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, *, suffix: str = "", what: str = ""):
    """A temporary path for a writer that insists on opening the file itself (prefer
    :func:`atomic_open`, whose failures name their cause whatever the writer makes of them)."""
    with atomic_open(path, "wb", suffix=suffix, what=what) as f:
        yield f.name  # the writer opens the same file again; the lock stays with ours


def append(path: str, data: bytes, *, what: str = "") -> None:
    """Appends ``data`` to ``path`` (created if missing) and flushes it; on failure the file is
    cut back to its previous length and :class:`WriteError` raised."""
    with _writing(path, path, "ab", what=what) as f:
        size = f.tell()
        try:
            f.write(data)
            f.flush()
        except BaseException:
            with contextlib.suppress(OSError):
                f._f.truncate(size)  # a shorter file needs no space
            raise


def write_text(path: str, text: str, *, what: str = "") -> None:
    """``path`` holds ``text`` (UTF-8), written atomically."""
    with atomic_open(path, "wb", what=what) as f:
        f.write(text.encode("utf-8"))


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this one, or another user's: it cannot be signalled)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _unlocked_remove(path: str) -> bool:
    """Removes ``path`` unless a live writer holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError:
                pass  # no locks on this file system: the process id decided
        if os.path.isdir(path) and not os.path.islink(path):  # (a temp_folder)
            shutil.rmtree(path)
        else:
            os.remove(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep(directory: str, *, only: str | None = None) -> list[str]:
    """Removes the temporary files in ``directory`` (of ``only``, a file name, when given) whose
    writer no longer runs; returns their paths. Never raises: a file it cannot remove stays."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _TEMP.match(name)
        if m is None or (only is not None and m["name"] != only) or alive(int(m["pid"])):
            continue
        path = os.path.join(directory, name)
        if _unlocked_remove(path):
            removed.append(path)
    return removed
