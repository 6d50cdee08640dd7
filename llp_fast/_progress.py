"""Progress display for long work, shared by the trainer and the tools.

On a terminal a tqdm bar shows the count, rate and ETA; when the stream is a file or a pipe only
the summary lines are written (no carriage-return redraws in a log); ``enabled=False`` (the tools'
``--quiet``) writes nothing at all.
"""

from __future__ import annotations

import os
import sys


class Progress:
    def __init__(self, enabled: bool = True, stream=None, prog: str | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.prog = prog
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def bar(self, total: int, desc: str, unit: str = "it", *, initial: int = 0):
        """A tqdm bar on a terminal; otherwise a :class:`_Silent` one with the same methods."""
        if not self.tty:
            return _Silent()
        from tqdm.auto import tqdm

        # A terminal that reports no size (a bare pty) would get no bar at all: assume 100 x 20.
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 0
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            file=self.stream,
            leave=False,
            dynamic_ncols=width > 0,
            ncols=None if width > 0 else 100,
            nrows=None if width > 0 else 20,
            unit_scale=unit != "it",
            mininterval=0.2,
        )

    def line(self, text: str) -> None:
        """One summary line (above a bar on a terminal)."""
        if not self.enabled:
            return
        if self.prog:
            text = f"{self.prog}: {text}"
        if self.tty:
            from tqdm.auto import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


class _Silent:
    """The bar's interface, doing nothing (not a terminal, or quiet)."""

    n = 0
    total = None

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reporter(bar):
    """A ``progress(done, total)`` callback that moves ``bar`` to ``done`` of ``total``."""

    def report(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return report


def fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
