"""Signal handlers for the length of a block: the commands' (``cli/_common.py``) and the training
run's (``train/stopping.py``)."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def handled(signals, handler):
    """``handler`` for each of ``signals`` while the block runs, then what was there before. Off
    the main thread, where Python sets no handler, nothing changes."""
    previous = {}
    for sig in signals:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            break
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
