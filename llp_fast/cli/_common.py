"""What every command shares: flag types that check where they parse, one way to fail, and the
``--nproc P`` relaunch as P local processes (:mod:`.workers`).

A flag's value is checked by its argparse ``type`` (the same range checks as the training config,
:mod:`llp_fast.train.config`), so a bad value is argparse's usage error naming the flag. Errors the
user can fix later on (:func:`llp_fast.errors.is_user_error`: a bad flag, file or data set, and
every failed write, a full disk included, :mod:`llp_fast._files`) print ``PROG: error: <one
line>`` and exit 2; an interrupt exits 130; a rank that stops because another rank is gone exits
:data:`~llp_fast.distributed.collectives.PEER_LOST` without a word under ``--nproc`` (the launcher names
the lost rank); anything else is a bug and keeps its traceback. Under torch.distributed rank 0
alone reports an interrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from .. import _checks
from .._device import cuda_checked as cuda_checked  # (the commands call it as _common's)
from .._signals import handled, started
from ..distributed.collectives import (
    ERROR_LINES_ENV,
    INTERRUPTED_UNSAVED,
    LAUNCHER_ENV,
    PEER_LOST,
    QUIET_ENV,
    lost_line,
    peer_lost,
)
from ..errors import ConfigError, Interrupted, InterruptedTwice, Terminated, is_user_error, one_line
from ..train import config as C
from ._output import guarded


def parse(read, argv):
    """``read(argv)`` (a parser's ``parse_args``) with the output guarded (:func:`guarded`):
    ``--help`` or ``--version`` into a reader that has gone (``| head -n 0``) was a
    BrokenPipeError traceback, or "Exception ignored" and status 120."""
    with guarded():
        return read(argv)


def add_version(ap: argparse.ArgumentParser) -> None:
    """``--version``: one line, the command, the package's version and torch's and Python's, for a
    bug report (``python -m llp_fast`` says the rest: the kernels, the machine, the extras)."""

    class Version(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            import platform

            import torch

            from .. import __version__

            print(
                f"{parser.prog} {__version__} (torch {torch.__version__}, Python {platform.python_version()}); "
                "python -m llp_fast says more"
            )
            parser.exit()

    ap.add_argument("--version", action=Version, nargs=0, help="print the version and exit")


def checked(parse, check, what: str | None = None):
    """An argparse ``type``: ``check(parse(text))``, the error text as argparse's message."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or parse.__name__}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


def epochs(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None
    try:
        _checks.increasing_epochs(values)  # (a flag sets a new run's: refused where it is parsed)
        return C.epoch_list(values)
    except ValueError as e:  # (argparse said only "invalid epochs value")
        raise argparse.ArgumentTypeError(str(e)) from None


def path(text: str) -> str:
    """An output path flag's value: not empty (an unset shell variable, ``--out "$DIR"``, made the
    output silently go missing, or somewhere else)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty; give one")
    return text


POSITIVE_INT = checked(int, C.positive_int, "a whole number")
PROCESSES = checked(int, _checks.processes, "a whole number")  # --nproc
DATA = checked(str, C.data_spec, "a data set")  # --data of the tools that take one (as llp-fast-train's)
COUNT = checked(int, C.count, "a whole number")
THREADS = checked(int, _checks.threads, "a whole number")
DIST_TIMEOUT = checked(float, _checks.dist_timeout, "a number of seconds")
SEED = checked(int, _checks.seed, "a whole number")
POSITIVE_FLOAT = checked(float, C.positive_float, "a number")
TEMPERATURE = checked(float, C.temperature, "a number")
NONNEG_FLOAT = checked(float, C.nonneg_float, "a number")
FRACTION = checked(float, C.fraction, "a number")
UNIT = checked(float, C.unit_interval, "a number")
MOMENTUM = checked(float, C.below_one, "a number")
DEVICE = checked(str, C.device_name, "a device")


def not_an_input(out: str, checkpoint: str, data: str | None, *, data_flag: str) -> None:
    """``--out`` of a tool that reads a run (a checkpoint or its directory) and a data spec: not the
    checkpoint, not a file the run keeps (its config, metrics, baseline mark, bank files, a file under
    its baseline/ and tb/), not the run's training data or its --extra-unlabeled selection (as its
    config.json names them), not the data given here, nor a file inside those data folders.
    ``ConfigError`` naming both (it used to write over them: the next resume or tool then failed)."""
    from ..train import checkpoint as run_files

    ckpt = run_files.checkpoint_path(checkpoint)
    run = os.path.dirname(os.path.abspath(ckpt))
    inputs = {"the checkpoint": ckpt}
    kept = (run_files.CONFIG, run_files.METRICS, run_files.BASELINE_MARK)
    inputs.update({f"the run's {n}": os.path.join(run, n) for n in kept})
    folders = {f"inside the run's {d}/": os.path.join(run, d) for d in (run_files.BASELINE_DIR, run_files.TENSORBOARD)}
    saved = run_files.read_settings(run)
    specs = [(data_flag, data)] if data is not None else []
    specs += [
        ("the run's training data", saved.get("data")),
        ("the run's --extra-unlabeled", saved.get("extra_unlabeled")),
    ]
    for what, spec in specs:
        if not isinstance(spec, str):
            continue
        if spec.startswith("npz:"):
            inputs[what] = spec[len("npz:") :]
        elif spec.startswith("folder:"):
            folders[f"inside {what}"] = spec[len("folder:") :]
        elif what.endswith("--extra-unlabeled"):
            inputs[what] = spec
    real = os.path.realpath(out)
    for what, path in inputs.items():
        if os.path.realpath(path) == real:
            raise ConfigError(f"--out {out} is {what} ({path}): give the output its own file")
    if os.path.dirname(real) == os.path.realpath(run) and run_files.is_bank_file(os.path.basename(real)):
        raise ConfigError(f"--out {out} is one of the run's bank files: give the output its own file")
    for what, folder in folders.items():  # (a new file there harms nothing; one there is an input)
        if os.path.lexists(out) and real.startswith(os.path.join(os.path.realpath(folder), "")):
            raise ConfigError(f"--out {out} is a file {what} ({folder}): give the output its own file")
    if os.path.isdir(out):  # (refused only when the work was done, at the write)
        raise ConfigError(f"--out {out} is a directory: give the output a file name")


def die_with_parent(parent: int) -> None:
    """Asks the kernel for SIGTERM when the parent process (pid ``parent``) dies (Linux's
    ``PR_SET_PDEATHSIG``; a child whose parent is killed would otherwise go on unattended); a
    parent already gone ends this process at once. Elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        sys.exit(130)


@contextlib.contextmanager
def sigint_blocked():
    """SIGINT blocked in this thread while the block runs: a process started inside it inherits
    the blocked mask, and a Ctrl-C meanwhile is delivered here when the block ends (not lost)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def discard_blocked_sigint() -> None:
    """In a process started inside :func:`sigint_blocked`: SIGINT unblocked, one that waited
    meanwhile (meant for the terminal's group it has left) discarded, then Python's handler."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a pending signal set to be ignored is dropped
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)


def error_line(line: str) -> None:
    """Prints a tool's error (or interrupt) line, or under the ``--nproc`` launcher hands it to the launcher
    (appended to its folder's file for this rank; printed here if that fails)."""
    folder = os.environ.get(ERROR_LINES_ENV)
    if folder and str(os.getppid()) == os.environ.get(LAUNCHER_ENV):  # a launcher gone reads nothing
        try:
            with open(os.path.join(folder, os.environ.get("RANK", "0")), "a", encoding="utf-8") as f:
                f.write(line + "\n")
            return
        except OSError:
            pass
    print(line, file=sys.stderr)


@contextlib.contextmanager
def sigterm_as_interrupt(*, sigint: bool = False):
    """SIGTERM (and SIGINT where ``sigint``) raises :class:`Terminated`: the command ends as Ctrl-C
    does (its one line, exit 130, temporary files removed) instead of silently, exit 143, leaving what
    it was writing (main thread only; elsewhere nothing changes). ``sigint``: a KeyboardInterrupt that
    lands inside code run by a C extension can leave CPython's "unhandled Ctrl-C" mark set, and the
    process then ends by SIGINT (-2) after printing its line instead of returning 130."""

    def _terminate(signum, frame):
        raise Terminated

    with handled((signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,), _terminate):
        yield


def run(prog: str, body, *args, interrupted: str = "interrupted; nothing was written") -> int:
    """``body(*args)`` with the tools' error contract; returns the exit status. ``interrupted``:
    the line for Ctrl-C (a run that checkpointed raises :class:`Interrupted` instead)."""
    started()  # from here this contract says what a Ctrl-C prints (not _signals.quiet_start's line)
    with guarded():  # (output that goes away stops the command as SIGTERM does)
        return _run(prog, body, args, interrupted)


def _run(prog: str, body, args, interrupted: str) -> int:
    lead = os.environ.get("RANK", "0") == "0"
    try:
        return body(*args)
    except Interrupted as e:
        from ..train.checkpoint import resume_command

        if lead:
            error_line(f"{prog}: {e}; continue with: {resume_command(e.run_dir)}")
        return 130
    except (KeyboardInterrupt, Terminated) as e:
        if lead:
            error_line(f"{prog}: {e if isinstance(e, InterruptedTwice) else interrupted}")
        # under the --nproc launcher: the others may wait for this rank where no signal reaches them
        unsaved = os.environ.get(QUIET_ENV) == "1" and not isinstance(e, InterruptedTwice)
        return INTERRUPTED_UNSAVED if unsaved else 130
    except Exception as e:
        if peer_lost(e):
            line = lost_line(prog, e)
            if line:
                print(line, file=sys.stderr)
            return PEER_LOST
        if isinstance(e, RuntimeError):  # (torch's, for a dead DataLoader worker: raised anywhere)
            from ..data.loading import worker_lost

            e = worker_lost(e) or e
        if not is_user_error(e):
            raise
        error_line(f"{prog}: error: {one_line(e)}")
        return 2


DIST_TIMEOUT_HELP = (
    "seconds a rank waits for the others in a collective before it gives up on them: a rank that "
    "stops answering ends the command after this long (default: $LLP_FAST_DIST_TIMEOUT, else 600)"
)


def set_dist_timeout(seconds: float | None) -> None:
    """``--dist-timeout``: the collective timeout of this command and the processes it starts."""
    if seconds is not None:
        from ..distributed.collectives import TIMEOUT_ENV

        os.environ[TIMEOUT_ENV] = repr(float(seconds))


def without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun(nproc: int, module: str, argv: list[str], *, prog: str | None = None, **kwargs) -> int:
    """``python -m module argv`` (``--nproc`` dropped) as P local processes with torchrun's
    environment, watched (:func:`llp_fast.cli.workers.run`: ``max_restarts``, ``kept``,
    ``resuming``); ``prog`` names the command in its lines."""
    from . import workers

    return workers.run(nproc, module, without_nproc(argv), prog=prog or module, **kwargs)
