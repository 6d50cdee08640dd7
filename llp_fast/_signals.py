"""Signal handlers for the length of a block: the commands' (``cli/_common.py``) and the training
run's (``train/stopping.py``); and a command's Ctrl-C while it starts (:func:`quiet_start`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

_PREVIOUS_HOOK = "_llp_fast_previous"


def _sigterm_while_starting(signum, frame):
    raise KeyboardInterrupt


def quiet_start() -> bool:
    """In one of the package's commands (``llp-fast-*``, by the program's name): a Ctrl-C or SIGTERM
    before the command's own handling begins (``import llp_fast`` imports torch, a second or two) ends
    it with one line instead of the interpreter's traceback or a silent exit 143 (by SIGINT, exit 130:
    the interpreter's own exit for an uncaught Ctrl-C). :func:`started` takes the hook and handler
    back. Elsewhere (a user's script, a rank started with ``python -c``, the baseline's spawned
    process, which the run stops by SIGTERM) nothing changes. Returns whether this is such a command
    (:func:`held`)."""
    argv = getattr(sys, "argv", None) or [""]
    prog = os.path.basename(str(argv[0])).removesuffix(".exe")
    if argv[0] == "-m" and _module_run() in ("llp_fast.cli", "llp_fast.cli.__main__"):
        prog = "llp-fast-train"  # (python -m llp_fast.cli: argv[0] is "-m" while its packages import)
    if not prog.startswith("llp-fast-") or hasattr(sys.excepthook, _PREVIOUS_HOOK):
        return False
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(f"{prog}: interrupted while starting; nothing was written", file=sys.stderr)
        else:
            previous(kind, value, tb)

    setattr(hook, _PREVIOUS_HOOK, previous)
    sys.excepthook = hook
    from multiprocessing import parent_process

    if parent_process() is None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        with contextlib.suppress(ValueError):  # (not the main thread)
            signal.signal(signal.SIGTERM, _sigterm_while_starting)
    return True


def _module_run() -> str | None:
    """The module of ``python -m MODULE`` (from ``sys.orig_argv``), else None."""
    orig, i = list(getattr(sys, "orig_argv", ())), 1
    while i < len(orig) - 1:
        arg = orig[i]
        if arg == "-m":
            return orig[i + 1]
        if arg.startswith("-m"):  # (python -mllp_fast.cli)
            return arg[2:]
        if arg == "-c" or not arg.startswith("-"):  # (a script or -c came first)
            return None
        i += 2 if arg in ("-X", "-W") else 1  # (the options that take a value)
    return None


@contextlib.contextmanager
def held(command: bool):
    """In a command (``command``: :func:`quiet_start` said so), SIGINT and SIGTERM wait while the
    block imports torch and NumPy, then arrive. One that arrived inside those imports could be
    swallowed by their C code: NumPy stayed half imported (``numpy has no attribute 'matrix'`` much
    later) or the command ran to its end. Elsewhere nothing changes."""
    if not command or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # (a signal that waited arrives here)


def started() -> None:
    """The command's own handling has begun (``cli/_common.run``): uncaught exceptions print as
    before :func:`quiet_start`."""
    previous = getattr(sys.excepthook, _PREVIOUS_HOOK, None)
    if previous is not None:
        sys.excepthook = previous
    if signal.getsignal(signal.SIGTERM) is _sigterm_while_starting:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def ignored(sig) -> bool:
    """Whether ``sig`` is ignored here: as whoever started this process asked (``nohup``'s SIGHUP;
    the SIGINT of a job a script starts with ``&``, which a Ctrl-C meant for the script must not
    stop), or this process's own code. Our handlers leave such a signal ignored."""
    return signal.getsignal(sig) == signal.SIG_IGN


@contextlib.contextmanager
def handled(signals, handler):
    """``handler`` for each of ``signals`` while the block runs, then what was there before. A
    signal that is ignored stays ignored (:func:`ignored`). Off the main thread, where Python sets
    no handler, nothing changes."""
    previous = {}
    for sig in signals:
        if ignored(sig):
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            break
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


# -- output that goes away (cli/_output.py) ------------------------------------------------------
# What a lost stdout or stderr asks for: a stop where something can stop cleanly (a training run
# registers one while its handlers are in place: train/stopping.py), else nothing (the command
# goes on, its output dropped). ``_lost`` remembers a loss before any stop was registered.
_stoppers: list = []
_lost: list[bool] = []


def output_lost() -> None:
    """The process's stdout or stderr is gone: the innermost registered stop is asked for once."""
    first = not _lost
    _lost.append(True)
    if first and _stoppers:
        _stoppers[-1]()


@contextlib.contextmanager
def stop_on_lost_output(stop):
    """``stop()`` is called if the output goes away while the block runs (at once if it went
    before)."""
    _stoppers.append(stop)
    try:
        if _lost:
            stop()
        yield
    finally:
        _stoppers.remove(stop)


def reset_lost_output() -> None:
    """(A command starting again in this process: tests.)"""
    _lost.clear()
