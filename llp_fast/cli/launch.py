"""How ``llp-fast-train`` runs its processes: the baseline beside LLP, and torch.distributed.

- The supervised-only baseline (same split, network and schedule) trains in ``RUN_DIR/baseline``.
  Where this process may use 2+ cores (:func:`usable_cores`) it runs in a spawned process beside
  LLP, each with half of them (or ``--threads`` each), which halves the wall time of two
  tiny-network runs; its outcome comes back through its ``metrics.jsonl``, or its
  one-line error through a pipe. Elsewhere it trains after LLP.
- ``--nproc P`` relaunches the same command as P local processes (:mod:`.workers`, torchrun's
  environment) with one run directory for all of them; under torch.distributed there is no
  baseline. A lost rank is one line naming the last checkpoint and the command that resumes;
  with ``--max-restarts N`` the processes start again by themselves (up to N times), and a
  restarted process continues the run from its last checkpoint as ``--resume`` would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import sys

from .. import _files, distributed
from ..errors import BaselineFailed, Interrupted, Terminated, is_user_error, one_line
from ..train import checkpoint
from ..train import config as C
from ..train.checkpoint import BASELINE_DIR, BASELINE_MARK
from ..train.resume import RESUMABLE
from . import _common

launched = distributed.launched


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's or ``taskset``'s share,
    not the machine's count: on 2 of 64 cores the two runs took 32 threads each)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (macOS, Windows)
        return os.cpu_count() or 1


def threads_for(share: int) -> int:
    """Threads for a process given ``share`` cores, at most ``OMP_NUM_THREADS`` where that is set
    (a process's own thread count, which torch takes by itself; it was overridden)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    cap = int(omp) if omp.isdigit() and int(omp) > 0 else share
    return max(1, min(share, cap))


def _new_run_dir() -> str:
    from ..train.defaults import new_run_dir

    return new_run_dir()


def relaunch(args, argv: list[str], prog: str) -> int:
    """``llp-fast-train --nproc P``: the same command as P processes, one run directory for all."""
    argv = list(argv)
    run_dir = args.resume or args.run_dir
    if not run_dir:
        run_dir = _new_run_dir()
        argv += ["--run-dir", run_dir]

    def resuming() -> str:
        info = checkpoint.peek(run_dir)
        if info is None:
            return "starting over (no checkpoint yet)"
        return f"resuming from the checkpoint of {checkpoint.describe(info)}"

    return _common.torchrun(
        args.nproc,
        "llp_fast.cli",
        argv,
        prog=prog,
        max_restarts=args.max_restarts,
        kept=lambda: checkpoint.last_checkpoint(run_dir, args.nproc),
        resuming=resuming,
    )


def _continue_after_restart(args) -> None:
    """In a restarted process group (``--max-restarts``, TORCHELASTIC_RESTART_COUNT > 0): the
    same command continues the run from its checkpoint, as ``--resume RUN_DIR`` (its other flags
    are those the checkpoint saved). Lost before the first checkpoint: it starts over."""
    if args.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 or not args.run_dir:
        return
    if not os.path.exists(os.path.join(args.run_dir, checkpoint.CHECKPOINT)):
        return
    args.resume = args.run_dir
    for f in C.fields():
        if f.metadata.get("cli") and f.name not in RESUMABLE:
            setattr(args, f.name, None)


def distributed_setup(args) -> int:
    """Under torchrun: joins the process group, gives every rank rank 0's run directory, turns
    the baseline off and the non-zero ranks quiet. Returns this process's rank (0 alone)."""
    if not launched():
        return 0
    import torch

    _continue_after_restart(args)
    rank, _ = distributed.init()
    if not args.resume and not args.run_dir:
        box = [_new_run_dir() if rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        args.run_dir = box[0]
    if args.baseline == "on" and rank == 0 and not args.quiet:  # (asked for: said; auto: it was said to all)
        print("llp-fast-train: no supervised-only baseline under torch.distributed", file=sys.stderr)
    args.baseline_given, args.baseline = args.baseline, "off"
    if rank != 0:
        args.quiet = True
    return rank


def _baseline_child(cfg, report) -> None:
    """The baseline in a spawned process; a one-line error goes back through ``report`` (a pipe:
    a file could not be written on the full disk that may have caused the error).

    Only the LLP process stops it, by one SIGTERM (:meth:`Baseline._stop`), after which it
    checkpoints. It leaves the terminal's process group (it started with SIGINT blocked, until
    here, and drops one that waited), so a Ctrl-C does not reach it too: one reaching it while it
    started printed multiprocessing's traceback, and one that it was handling made the SIGTERM a
    second signal, which gives up without the checkpoint. Should the LLP process die without a
    word, the kernel sends it SIGTERM (``PR_SET_PDEATHSIG``)."""
    from ..train.api import train_checked

    with contextlib.suppress(OSError):
        os.setsid()
    _common.die_with_parent(multiprocessing.parent_process().pid)
    _common.discard_blocked_sigint()
    # SIGTERM is how the LLP process stops it (its own session: nothing else sends it one), so not
    # ignored here even where the command was started with SIGTERM ignored (llp_fast/_signals.py)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    resume = os.path.exists(os.path.join(cfg.run_dir, checkpoint.CHECKPOINT))
    try:
        train_checked(cfg, resume=resume)
    except (Interrupted, KeyboardInterrupt):
        sys.exit(130)
    except Exception as e:
        if not is_user_error(e):
            raise
        report.send(one_line(e))
        sys.exit(2)


class Baseline:
    """The supervised-only baseline of an LLP run, if the run has one."""

    def __init__(self, cfg, args, wanted: bool, *, resumed: bool, rank: int, prog: str):
        self.cfg, self.prog, self.proc, self.report = cfg, prog, None, None
        self.reclaimed = False
        self.dir = os.path.join(cfg.run_dir, BASELINE_DIR)
        self.bcfg = None
        if wanted:
            self.bcfg = dataclasses.replace(cfg, run_dir=self.dir, supervised_only=True, stop_after_steps=None)
            if not resumed and rank == 0:
                _files.write_text(os.path.join(cfg.run_dir, BASELINE_MARK), f'{{"run_dir": "{BASELINE_DIR}"}}\n')
        self.parallel = wanted and args.baseline_mode != "sequential" and cfg.device == "cpu"
        self.parallel = self.parallel and usable_cores() >= 2

    def run_beside(self, fit):
        """Runs ``fit()`` (LLP) with the baseline beside it or after it; returns both final metrics
        rows (the baseline's is None without one)."""
        if self.parallel:
            import torch

            threads = self.cfg.threads or threads_for(usable_cores() // 2)
            torch.set_num_threads(threads)
            bcfg = dataclasses.replace(self.bcfg, threads=threads, quiet=True)
            ctx = multiprocessing.get_context("spawn")
            self.report, child_end = ctx.Pipe(duplex=False)
            self.proc = ctx.Process(target=_baseline_child, args=(bcfg, child_end))
            try:
                with _common.sigint_blocked():  # inherited: the child starts deaf to the terminal's Ctrl-C
                    self.proc.start()  # (one meanwhile reaches this process when the block ends)
            except BaseException:
                self._stop()
                raise
            child_end.close()
            self._say(f"supervised-only baseline (same split, network and schedule) runs beside it, in {self.dir}")
        try:
            llp = fit(after_epoch=self._reclaim) if self.proc is not None else fit()
        except _files.WriteError as e:  # metrics, TensorBoard: say what is kept and how to go on
            self._stop()
            if e.note:
                raise
            raise e.noted(checkpoint.last_checkpoint(self.cfg.run_dir)) from e.__cause__
        except BaseException:
            self._stop()
            raise
        if self.proc is not None:
            return llp, self._join()
        if self.bcfg is None:
            return llp, None
        from ..train.api import train_checked

        self._say("supervised-only baseline (same split, network and schedule)")
        return llp, train_checked(self.bcfg, resume=os.path.exists(os.path.join(self.dir, checkpoint.CHECKPOINT)))

    def _reclaim(self) -> None:
        """Once the baseline beside has finished (it trains the cheaper step), LLP takes its threads
        too, unless ``--threads`` was given."""
        if self.cfg.threads or self.reclaimed or self.proc.is_alive():
            return
        import torch

        self.reclaimed = True
        before = torch.get_num_threads()
        torch.set_num_threads(threads_for(usable_cores()))
        if torch.get_num_threads() > before:  # (it said "goes on with 1 threads" where nothing changed)
            self._say(f"the baseline has finished: LLP goes on with {torch.get_num_threads()} threads")

    def _say(self, text: str) -> None:
        if not self.cfg.quiet:
            print(f"{self.prog}: {text}", file=sys.stderr)

    def _stop(self) -> None:
        """Asks the baseline to checkpoint and stop (SIGTERM), and waits for it."""
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.terminate()
            self.proc.join()

    def _join(self) -> dict:
        from ..train.report import read_metrics

        try:
            with _common.sigterm_as_interrupt():  # (SIGTERM here ended the command by it: 143, no line)
                self.proc.join()
        except (KeyboardInterrupt, Terminated) as e:  # Ctrl-C reached the baseline too: let it checkpoint
            self._stop()
            raise Interrupted(15 if isinstance(e, Terminated) else 2, self.cfg.run_dir) from None
        if self.proc.exitcode in (130, -15):
            raise Interrupted(15, self.cfg.run_dir)
        if self.proc.exitcode != 0:
            why = self.report.recv() if self.report.poll() else f"exit code {self.proc.exitcode}"
            raise BaselineFailed(f"the supervised-only baseline failed: {why}")
        return read_metrics(os.path.join(self.dir, checkpoint.METRICS))[-1]
