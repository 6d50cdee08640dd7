"""How a run stops on SIGINT or SIGTERM (README "When things fail").

During the steps a signal is noted and the run stops at the next step boundary, after writing a
checkpoint there (:class:`Interrupted`); a second signal gives up at once (:class:`InterruptedTwice`,
the last complete checkpoint kept). Under torchrun every rank stops at the same step: the ranks
agree on it by a collective (:meth:`Stopping.requested`).

Some passes come between steps and can be long: the bank's warm start before the first step (a
forward pass over every training image), an epoch's density refresh and whole-bank relabelling.
Nothing they compute is kept until a step, so the last checkpoint (or none, before the first step)
is exactly where the run stands: in one process a signal stops them at once
(:meth:`Stopping.at_once`) instead of after the pass, which on a large data set took minutes. The
epoch's evaluation comes after its last step, which no checkpoint holds yet: a signal there stops
it and writes the checkpoint of that step (resumed, the run evaluates the epoch again).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch

from .._signals import handled, ignored, stop_on_lost_output
from ..distributed.collectives import LAUNCHER_ENV
from ..errors import Interrupted, InterruptedTwice, Terminated


def _launcher_gone() -> bool:
    """Whether this rank was started by ``--nproc``'s launcher and its parent is no longer it."""
    launcher = os.environ.get(LAUNCHER_ENV)
    return launcher is not None and str(os.getppid()) != launcher


class Stopping:
    """The signal a run was asked to stop by (``signal``: None until one comes), for ``world``
    processes."""

    def __init__(self, world: int):
        self.signal: int | None = None
        self.world = world
        self._now = None  # during an at_once pass: what a signal raises

    @contextlib.contextmanager
    def handlers(self):
        """SIGINT and SIGTERM handled while the block runs (main thread only), then as before; and
        the output going away (``cli/_output.py``) asks for a stop as SIGTERM does, unless SIGTERM
        is ignored (the run was started so: it trains on, llp_fast/_signals.py)."""
        with contextlib.ExitStack() as stack:
            if not ignored(signal.SIGTERM):
                stack.enter_context(stop_on_lost_output(self._output_lost))
            stack.enter_context(handled((signal.SIGINT, signal.SIGTERM), self._on_signal))
            yield

    def _output_lost(self) -> None:
        """As a SIGTERM, but never a second signal: one that came before is already stopping the run
        (a Ctrl-C that also ended ``| tee``), and a second would give up its checkpoint."""
        if self.signal is not None:
            return
        if threading.current_thread() is threading.main_thread():
            self._on_signal(signal.SIGTERM, None)  # (in a pass that stops at once, it raises here)
        else:
            self.signal = signal.SIGTERM

    def _on_signal(self, signum, frame):
        if self.signal == signal.SIGTERM and signum == signal.SIGTERM and _launcher_gone():
            # The kernel's parent-death SIGTERM comes once per parent *thread* that exits (the
            # launcher's TCPStore thread, then its main one): a launcher killed with SIGKILL sent each
            # rank two or three, read as "interrupted twice", and the step's checkpoint was lost.
            return
        if self.signal is not None:  # second signal: give up at once
            raise InterruptedTwice
        self.signal = signum
        if self._now is not None:
            raise self._now(signum)

    def requested(self, device) -> bool:
        """Whether to stop at this step: a signal seen by any rank stops every rank at the same step
        (no rank is left waiting in a collective for one that already left)."""
        if self.world == 1:
            return self.signal is not None
        t = torch.tensor([self.signal or 0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        if int(t) and self.signal is None:
            self.signal = int(t)
        return bool(int(t))

    @contextlib.contextmanager
    def at_once(self, run_dir: str, *, checkpointed: bool, save=None):
        """A pass that a signal stops at once (one process; under torchrun the ranks stop together
        at the next step). ``checkpointed``: the run's last checkpoint is where it stands, and the
        signal raises :class:`Interrupted` naming it; else nothing has been written yet, and it
        raises KeyboardInterrupt (SIGINT) or :class:`Terminated` (SIGTERM). ``save``: the run stands
        at a step the last checkpoint is behind; once the pass has stopped, ``save()`` writes it
        there, then :class:`Interrupted`."""
        if self.world > 1:
            yield
            return

        def stop(signum: int) -> BaseException:
            if save is not None:
                return _Stop(signum)
            if checkpointed:
                return Interrupted(signum, run_dir)
            return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

        self._now = stop
        try:
            if self.signal is not None:  # (one came before the pass began)
                raise stop(self.signal)
            yield
        except _Stop as e:
            self._now = None
            save()  # (outside the pass: what it was doing is unwound; a second signal gives up here)
            raise Interrupted(e.signum, run_dir) from None
        finally:
            self._now = None


class _Stop(BaseException):
    """A signal during an :meth:`Stopping.at_once` pass with a checkpoint still to write (not an
    Exception: the pass's own handlers let it through)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
