"""A command whose output goes away: the reader of its pipe gone (``llp-fast-train ... | tee log``
with ``tee`` killed, a pager quit), a terminal hung up, the disk of a redirected log full.

Python reports such a write as an ``OSError`` (``BrokenPipeError``: it ignores SIGPIPE) from
whatever line printed, and a training run died there with a traceback nobody saw and without the
checkpoint of its last steps; a buffered stdout failed again at exit ("Exception ignored ...",
status 120). While a command runs (:func:`guarded`), ``sys.stdout`` and ``sys.stderr`` hand their
writes on, and the first that fails makes that file descriptor ``/dev/null`` (everything written
after it, native libraries' writes included, goes nowhere instead of failing again). A training run
then stops as on SIGTERM, at its next step, with a checkpoint (exit 130), where its handlers are in
place (``llp_fast._signals.stop_on_lost_output``); everything else goes on and ends as it would
have (a labelling writes its outputs, exit 0), its lines unread.
"""

from __future__ import annotations

import contextlib
import os
import sys

from .._signals import output_lost, reset_lost_output


class _Guarded:
    """``stream``'s interface; a write or flush that fails is dropped, with everything after it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._or_lost(self._stream.write, text, lost=len(text))

    def flush(self):
        self._or_lost(self._stream.flush)

    def _or_lost(self, call, *args, lost=None):
        """``call(*args)``; where the stream is gone, ``lost`` (the failure dropped)."""
        try:
            return call(*args)
        except (BlockingIOError, InterruptedError):  # (not a lost stream: a full non-blocking one)
            raise
        except OSError:
            self._lost()
            return lost

    def _lost(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()  # what its buffer held goes to /dev/null with the rest
        output_lost()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def guarded():
    """``sys.stdout`` and ``sys.stderr`` as :class:`_Guarded` while the block runs, then flushed
    through them (a block-buffered stdout's last line fails only then) and as before."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stderr, _Guarded):
        reset_lost_output()  # (a command run again in this process: tests)
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, _Guarded) else _Guarded(s) for s in saved)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Guarded):
                stream.flush()
        sys.stdout, sys.stderr = saved
