"""The PIL loader's torch DataLoader, with its worker processes kept out of the way of the
signals that are the main process's to act on, and a lost worker said in one line.

- **Signals.** A signal sent to the whole process group or cgroup (Ctrl-C at a terminal, a job
  scheduler's or systemd's SIGTERM) also reaches the loader's workers. A worker killed by it made
  torch raise in the main process at whatever point it was (inside the checkpoint the signal had
  asked for, too), with a traceback and no checkpoint. So a worker ignores SIGINT and SIGHUP, and
  obeys SIGTERM only from its own parent (torch's shutdown of a loader, multiprocessing's at exit)
  or once the parent is gone; the main process stops the loader where its run stops.
- **A lost worker** (killed, most often by the out-of-memory killer) is a :class:`WorkerLost`
  naming what to lower, not torch's RuntimeError with the traceback of the main loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import torch

from ..errors import DataError
from .transforms import quiet_pil


class WorkerLost(DataError):
    """A DataLoader worker process died (a signal, most often the out-of-memory killer's SIGKILL)."""


def _obey_parent_only(parent: int) -> None:
    """Waits for SIGTERM (blocked in every thread of this worker) and ends the process on one sent
    by ``parent`` or after ``parent`` is gone; others are dropped."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(0)


HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
# Workers forked, as torch's DataLoader does by default on Linux before Python 3.14: they start
# with this thread's blocked signals and have this process as their parent, which the protection
# above reads. (A forkserver's or spawn's worker starts with neither: a SIGTERM from outside in its
# first seconds, while it imports, killed it.) Elsewhere the platform's default.
FORK = "fork" if sys.platform.startswith("linux") else None


def _worker_signals(_worker_id: int) -> None:
    """``worker_init_fn`` of every loader here: runs first in each worker process, which starts
    with :data:`HELD` blocked (:func:`load_batches`), so that none lands before this runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (one that waited meanwhile is dropped)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGHUP})
    with contextlib.suppress(ImportError):  # (a dataset of arrays needs no PIL)
        quiet_pil()
    if not hasattr(signal, "sigwaitinfo"):  # (not Linux: SIGTERM keeps its default)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return
    # SIGTERM stays blocked, in the threads started later too, and is taken by this thread
    threading.Thread(target=_obey_parent_only, args=(os.getppid(),), daemon=True).start()


def load_batches(dataset, batches: list, workers: int, *, generator: torch.Generator, pin_memory: bool = False):
    """The batches ``dataset[batch]`` for each list of keys in ``batches``, decoded on ``workers``
    processes (0: in this one), in order. Raises :class:`WorkerLost` when a worker dies."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=generator,
        worker_init_fn=_worker_signals if workers else None,
        multiprocessing_context=FORK if workers else None,
    )
    # the workers start (fork) with HELD blocked; here those signals wait the few milliseconds
    blocked = workers > 0 and threading.current_thread() is threading.main_thread()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD) if blocked else None
    try:
        batches_of = iter(loader)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        yield from batches_of
    except RuntimeError as e:
        lost = worker_lost(e)
        if lost is None:
            raise
        raise lost from None
    finally:  # stopped early (a signal, an error): each worker ends now, not after the batch it
        # is decoding (torch's shutdown waits up to 5 s for each); one ended by its parent exits 0,
        # which torch does not take for a lost worker
        if hasattr(signal, "sigwaitinfo"):
            for w in getattr(batches_of, "_workers", ()):
                if w.is_alive():
                    w.terminate()
        # and the loader is torn down now: left to the interpreter's exit (the iterator held by the
        # error's traceback), multiprocessing's queue threads printed tracebacks after the error line
        shutdown = getattr(batches_of, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def worker_lost(e: BaseException) -> WorkerLost | None:
    """``e`` as a :class:`WorkerLost` where it is torch's error for a dead worker, else None. Torch
    raises it from its SIGCHLD handler, so it can surface anywhere in the main process (mid-step,
    mid-checkpoint), not only where a batch is drawn: the commands look for it where they end."""
    if isinstance(e, WorkerLost):
        return e
    text = str(e)
    if not isinstance(e, RuntimeError) or not text.startswith("DataLoader worker"):
        return None
    return WorkerLost(
        f"a data-loader worker was lost ({text.splitlines()[0].rstrip('. ')}): if memory ran out, "
        "lower --workers or --batch-size"
    )
