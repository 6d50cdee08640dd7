"""How ``llp-fast-train`` runs its processes: the baseline beside LLP, and torch.distributed.

- The supervised-only baseline (same split, network and schedule) trains in ``RUN_DIR/baseline``.
  On a CPU with 2+ cores it runs in a spawned process beside LLP, one thread each, which halves the
  wall time of two tiny-network runs; its outcome comes back through files (its ``metrics.jsonl``,
  or ``error.txt`` with the one-line reason). Elsewhere it trains after LLP.
- ``--nproc P`` relaunches the same command under ``torch.distributed.run`` with P local processes
  and one run directory for all of them; under torchrun there is no baseline.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import time

from .. import distributed
from ..errors import BaselineFailed, Interrupted, UserError, one_line
from . import _common

BASELINE_DIR = "baseline"
BASELINE_MARK = "baseline.json"  # marks that a run includes its baseline (resume trains it too)

launched = distributed.launched


def _new_run_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def relaunch(args, argv: list[str]) -> int:
    """``llp-fast-train --nproc P``: the same command under torchrun, one run directory for all."""
    argv = list(argv)
    if not args.resume and not args.run_dir:
        argv += ["--run-dir", _new_run_dir()]
    return _common.torchrun(args.nproc, "llp_fast.cli", argv)


def distributed_setup(args) -> int:
    """Under torchrun: joins the process group, gives every rank rank 0's run directory, turns
    the baseline off and the non-zero ranks quiet. Returns this process's rank (0 alone)."""
    if not launched():
        return 0
    import torch

    rank, _ = distributed.init()
    if not args.resume and not args.run_dir:
        box = [_new_run_dir()]
        torch.distributed.broadcast_object_list(box, src=0)
        args.run_dir = box[0]
    if args.baseline != "off" and rank == 0 and not args.quiet:
        print("llp-fast-train: no supervised-only baseline under torch.distributed", file=sys.stderr)
    args.baseline = "off"
    if rank != 0:
        args.quiet = True
    return rank


def _baseline_child(cfg) -> None:
    """The baseline in a spawned process; its outcome goes to files that the parent reads."""
    from ..train.api import train

    signal.signal(signal.SIGINT, signal.default_int_handler)
    resume = os.path.exists(os.path.join(cfg.run_dir, "checkpoint.pt"))
    try:
        train(cfg, resume=resume)
    except Interrupted:
        sys.exit(130)
    except UserError as e:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "error.txt"), "w") as f:
            f.write(one_line(e) + "\n")
        sys.exit(2)


class Baseline:
    """The supervised-only baseline of an LLP run, if the run has one."""

    def __init__(self, cfg, args, wanted: bool, *, resumed: bool, rank: int, prog: str):
        self.cfg, self.prog, self.proc = cfg, prog, None
        self.dir = os.path.join(cfg.run_dir, BASELINE_DIR)
        self.bcfg = None
        if wanted:
            self.bcfg = dataclasses.replace(cfg, run_dir=self.dir, supervised_only=True, stop_after_steps=None)
            if not resumed and rank == 0:
                with open(os.path.join(cfg.run_dir, BASELINE_MARK), "w") as f:
                    f.write(f'{{"run_dir": "{BASELINE_DIR}"}}\n')
        self.parallel = wanted and args.baseline_mode != "sequential" and cfg.device == "cpu"
        self.parallel = self.parallel and (os.cpu_count() or 1) >= 2

    def run_beside(self, fit):
        """Runs ``fit()`` (LLP) with the baseline beside it or after it; returns both final metrics
        rows (the baseline's is None without one)."""
        if self.parallel:
            import torch

            threads = self.cfg.threads or max(1, (os.cpu_count() or 2) // 2)
            torch.set_num_threads(threads)
            bcfg = dataclasses.replace(self.bcfg, threads=threads, quiet=True)
            self.proc = multiprocessing.get_context("spawn").Process(target=_baseline_child, args=(bcfg,))
            self.proc.start()
            self._say(f"supervised-only baseline (same split, network and schedule) runs beside it, in {self.dir}")
        try:
            llp = fit()
        except BaseException:
            self._stop()
            raise
        if self.proc is not None:
            return llp, self._join()
        if self.bcfg is None:
            return llp, None
        from ..train.api import train

        self._say("supervised-only baseline (same split, network and schedule)")
        return llp, train(self.bcfg, resume=os.path.exists(os.path.join(self.dir, "checkpoint.pt")))

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
            self.proc.join()
        except KeyboardInterrupt:  # Ctrl-C reached the baseline too: let it checkpoint
            self._stop()
            raise Interrupted(2, self.cfg.run_dir) from None
        if self.proc.exitcode in (130, -15):
            raise Interrupted(15, self.cfg.run_dir)
        if self.proc.exitcode != 0:
            err = os.path.join(self.dir, "error.txt")
            why = open(err).read().strip() if os.path.exists(err) else f"exit code {self.proc.exitcode}"
            raise BaselineFailed(f"the supervised-only baseline failed: {why}")
        return read_metrics(os.path.join(self.dir, "metrics.jsonl"))[-1]
