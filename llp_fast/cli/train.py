"""``llp-fast-train``: train LLP and, beside it, the supervised-only baseline; print both.

The parser is built from :class:`llp_fast.train.config.TrainConfig`'s field metadata (flag, help,
range check, choices), so every setting has exactly one flag, one default and one check. A flag the
user does not give keeps the field's default, so the command line and ``TrainConfig(...)`` in Python
build the same config; the fields left ``None`` are chosen from the data when the run starts
(:mod:`llp_fast.train.defaults`), and the run's first lines say what was chosen and why.

Errors the user can fix print one line and exit 2; an interrupted run saves its checkpoint and
exits 130 (``--resume RUN_DIR`` continues it exactly).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from .. import _checks, distributed
from ..data.loading import WorkerLost, worker_lost
from ..errors import CheckpointError, ConfigError, InterruptedTwice
from ..ops import describe_backends
from ..train import config as C
from ..train.defaults import SMALL_DATA, baseline_by_default, resolve_run, show
from ..train.newrun import check_new_run
from ..train.resume import RESUMABLE, check_resume_epochs, resume_changes
from . import _common, launch

PROG = "llp-fast-train"

_TYPES = {
    "positive_int": _common.POSITIVE_INT,
    "image_side": _common.checked(int, _checks.image_side, "a whole number"),
    "net_width": _common.checked(int, _checks.net_width, "a whole number"),
    "batch": _common.checked(int, _checks.batch, "a whole number"),
    "extra_batch": _common.checked(int, _checks.extra_batch, "a whole number"),
    "rounds": _common.checked(int, _checks.rounds, "a whole number"),
    "rounds_or_none": _common.checked(int, _checks.rounds_or_none, "a whole number"),
    "count": _common.COUNT,
    "threads": _common.THREADS,
    "seed": _common.SEED,
    "positive_float": _common.POSITIVE_FLOAT,
    "temperature": _common.TEMPERATURE,
    "nonneg_float": _common.NONNEG_FLOAT,
    "fraction": _common.FRACTION,
    "unit_interval": _common.UNIT,
    "below_one": _common.MOMENTUM,
    "epoch_list": _common.epochs,
    "device_name": _common.DEVICE,
    "data_spec": _common.DATA,
    "arch_spec": _common.checked(str, C.arch_spec, "a network"),
    "run_dir_path": _common.checked(str, C.run_dir_path, "a directory path"),
    "file_path": _common.path,
}
_GROUPS = {"data": "data", "run": "run", "model": "model and optimiser", "llp": "LLP"}


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.type in ("bool", "bool | None") or "(default" in text or f.default in (None, dataclasses.MISSING):
        return text
    return f"{text} (default {f.default})"


def _add_field(group, f: dataclasses.Field) -> None:
    flag, meta = C.flag_of(f), f.metadata
    kw = dict(dest=f.name, default=None, help=_help(f))
    if f.type == "bool | None":  # --flip / --no-flip
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif f.type == "bool":
        action = "store_false" if flag.startswith("--no-") else "store_true"
        group.add_argument(flag, action=action, **kw)
    else:
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("check") is not None:
            kw["type"] = _TYPES[meta["check"].__name__]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        group.add_argument(flag, **kw)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Train a pre-activation ResNet with Local Label Propagation (Zhuang et al.) and compare it "
        "with the same network trained on the labeled examples alone.",
    )
    _common.add_version(ap)
    groups = {key: ap.add_argument_group(title) for key, title in _GROUPS.items()}
    for f in C.fields():
        if f.metadata.get("cli"):
            _add_field(groups[f.metadata["group"]], f)
    run = groups["run"]
    run.add_argument(  # (an empty one, an unset shell variable, started a new run)
        "--resume",
        metavar="RUN_DIR",
        type=_common.path,
        default=None,
        help="continue the run in RUN_DIR exactly (bit for bit, unless another --loader is given)",
    )
    run.add_argument(
        "--baseline",
        choices=("auto", "on", "off"),
        default="auto",
        help="also train the supervised-only baseline on the same split and print both (auto: on for data of "
        f"fewer than {SMALL_DATA:,} training examples)",
    )
    run.add_argument(
        "--baseline-mode",
        choices=("auto", "sequential"),
        default="auto",
        help="auto: on a CPU where 2+ cores are usable (the process's CPU affinity) the baseline trains beside "
        "LLP, half of them each (at most OMP_NUM_THREADS; or --threads each; without --threads LLP takes them all "
        "once the baseline ends)",
    )
    run.add_argument(
        "--nproc",
        type=_common.PROCESSES,
        default=1,
        help="processes on this machine (GPUs, or CPU workers with gloo): relaunches itself as P local processes; "
        "for several nodes call torchrun yourself: torchrun --nnodes ... -m llp_fast.cli ...",
    )
    run.add_argument(
        "--max-restarts",
        type=_common.COUNT,
        default=0,
        metavar="N",
        help="with --nproc: after a lost rank, start the processes again up to N times, resuming from the last "
        "checkpoint (torchrun's --max-restarts; default 0)",
    )
    run.add_argument(
        "--dist-timeout", type=_common.DIST_TIMEOUT, default=None, metavar="SECONDS", help=_common.DIST_TIMEOUT_HELP
    )
    run.add_argument("--stop-after-steps", type=_common.COUNT, default=None, help=argparse.SUPPRESS)
    return ap


def given(args) -> dict:
    """The config fields the user set on the command line (name -> value)."""
    names = {f.name for f in C.fields() if f.metadata.get("cli")} | {"stop_after_steps"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def config_from_args(args, run_dir: str | None = None) -> C.TrainConfig:
    """The :class:`TrainConfig` of a new run from parsed arguments (the fields not given keep their
    defaults, as ``TrainConfig(...)`` in Python would), with its run directory chosen."""
    values = given(args)
    if run_dir is not None:
        values["run_dir"] = run_dir
    cfg = C.validate(C.TrainConfig(**values))
    check_new_run(cfg)
    run = resolve_run(cfg)
    return dataclasses.replace(cfg, run_dir=run.run_dir, extra_unlabeled=run.extra_unlabeled)


def resumed_config(args, saved: C.TrainConfig, ckpt: dict) -> tuple[C.TrainConfig, list[str]]:
    """The saved config with the flags a resume may change (``resume.RESUMABLE``) applied;
    :class:`ConfigError` naming every other flag given with another value than the saved one (the
    saved value itself passes: it was refused as a change). Also returns notes to print."""
    values = given(args)
    values.pop("stop_after_steps", None)
    refused = [f"{C.flag_of(f)} (saved: {show(getattr(saved, f.name))})" for f, _ in resume_changes(saved, values)]
    values = {name: value for name, value in values.items() if name in RESUMABLE}  # (the saved value passes)
    if refused:
        allowed = ", ".join("--" + n for n in RESUMABLE)
        raise ConfigError(
            f"--resume continues the run with its saved settings; {', '.join(refused)} cannot change "
            f"(only {allowed} can)"
        )
    notes = []
    if "epochs" in values and values["epochs"] != saved.epochs:
        notes.append(
            f"--epochs {values['epochs']} replaces the saved {saved.epochs}; the lr milestones stay at "
            f"{saved.milestones}"
            + (f" and the jump's at {saved.jump_milestones}" if saved.rate_jump is not None else "")
        )
    values["quiet"] = bool(args.quiet)  # this invocation's output, not the saved run's
    cfg = dataclasses.replace(saved, **values, stop_after_steps=args.stop_after_steps)
    check_resume_epochs(cfg.epochs, ckpt, cfg)  # before anything is printed (prepare() checks too)
    return C.validate(cfg), notes


def _baseline_can_end(run_dir: str, cfg: C.TrainConfig, resumes: bool) -> None:
    """A resume's ``--epochs`` checked against the baseline beside the run too, before anything
    trains (a baseline further along than the new end failed once LLP had trained, and every later
    resume the same way). A baseline checkpoint that does not read is left to its own resume."""
    from ..train import checkpoint

    where = os.path.join(run_dir, launch.BASELINE_DIR)
    if not resumes or not os.path.exists(os.path.join(where, checkpoint.CHECKPOINT)):
        return
    try:
        saved, ckpt = checkpoint.open_run(where)
    except CheckpointError:
        return
    check_resume_epochs(cfg.epochs, ckpt, saved)


def _no_way_on(e: CheckpointError) -> CheckpointError:
    """A resume's corrupt checkpoint, with the way on (a new run in that directory is refused as
    "already holds a run", and the resume as corrupt: the messages led nowhere)."""
    if "corrupt checkpoint" not in str(e):
        return e
    return CheckpointError(f"{e}: this run cannot be resumed; restore the file, or start over with another --run-dir")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _train(args) -> int:
    from ..train import checkpoint
    from ..train.api import prepare

    t0 = time.perf_counter()
    rank = launch.distributed_setup(args)
    if args.resume:
        run_dir = args.resume
        if os.path.isfile(run_dir):
            raise ConfigError(f"--resume {run_dir}: a file; give the run directory that holds it")
        if not os.path.isdir(run_dir):
            raise ConfigError(f"--resume {run_dir}: no such run directory")
        try:
            saved, ckpt = checkpoint.open_run(run_dir)
        except CheckpointError as e:
            raise _no_way_on(e) from None
        cfg, notes = resumed_config(args, saved, ckpt)
        had = os.path.exists(os.path.join(run_dir, launch.BASELINE_MARK))
        asked = getattr(args, "baseline_given", args.baseline)  # (under torch.distributed: "off" is forced)
        if asked in ("on", "off") and (asked == "on") != had:
            raise ConfigError(
                f"--baseline {asked}: the run in {run_dir} began {'with' if had else 'without'} the "
                "supervised-only baseline, and a resume keeps it so (leave --baseline out, or give it as at the start)"
            )
        _baseline_can_end(run_dir, cfg, had and args.baseline != "off")
    else:
        cfg, ckpt, notes = config_from_args(args, args.run_dir), None, []
        run_dir = cfg.run_dir
        held = checkpoint.held_by(run_dir, f"--resume {run_dir}")
        if held:
            from ..train.claim import not_claimed

            not_claimed(run_dir)  # (a run training there now: "continue it with --resume" was refused too)
            raise ConfigError(f"{held}, or pick another --run-dir")
    try:
        # checks config and data, makes the run dir
        trainer = prepare(cfg, resume=bool(args.resume), ckpt=ckpt, given=set(given(args)))
    except CheckpointError as e:
        raise _no_way_on(e) if args.resume else e from None
    cfg = trainer.cfg
    if args.resume:
        want_baseline = had and args.baseline != "off"  # (off: forced under torch.distributed)
        if had and not want_baseline:
            notes = [
                *notes,
                f"no supervised-only baseline under torch.distributed: {launch.BASELINE_DIR}/ stays as it is",
            ]
    else:
        want_baseline = not cfg.supervised_only and (
            args.baseline == "on" or (args.baseline == "auto" and baseline_by_default(trainer.facts))
        )
    if not cfg.quiet:
        _say_what_runs(cfg, notes + trainer.notes, trainer.source)
    baseline = launch.Baseline(cfg, args, want_baseline, resumed=bool(args.resume), rank=rank, prog=PROG)
    try:
        llp, base = baseline.run_beside(trainer.fit)
    except InterruptedTwice:  # (which checkpoint is kept, and the command that continues from it)
        raise InterruptedTwice(
            checkpoint.last_checkpoint(run_dir, trainer.world if trainer.world > 1 else None)
        ) from None
    except (RuntimeError, WorkerLost) as e:  # a DataLoader worker died (torch raises wherever the run was)
        lost = worker_lost(e)
        if lost is None:
            raise
        raise WorkerLost(
            f"{lost}; {checkpoint.last_checkpoint(run_dir, trainer.world if trainer.world > 1 else None)}"
        ) from None
    if rank != 0:
        return 0
    label = "supervised-only" if cfg.supervised_only else "LLP" if cfg.method != "fixmatch" else "FixMatch-style"
    line = f"{cfg.data}: held-out top-1 {label} {_pct(llp.get('test_top1'))}"
    if base is not None:
        line += f" | supervised-only {_pct(base.get('test_top1'))} (same split, network and schedule)"
    if not cfg.supervised_only:
        line += f" | kNN {_pct(llp.get('knn_top1'))}"
        if llp.get("pseudo_acc") is not None:
            from ..train.report import known_base

            line += f" | pseudo-labels {_pct(llp.get('pseudo_acc'))}{known_base(llp)}"
    print(line + f" | {time.perf_counter() - t0:.0f} s | {run_dir}")
    return 0


METHOD_NAMES = {"plus": "LLP+", "paper": "LLP (the paper's method)", "fixmatch": "FixMatch-style (no LLP)"}


def _say_what_runs(cfg, notes, source) -> None:
    what = "supervised-only" if cfg.supervised_only else METHOD_NAMES[cfg.method]
    loader = ""
    if cfg.data.startswith("folder:"):
        from ..data.folder import loader_label

        # the loader the source took (--loader auto: PIL for strong views, or GIFs among the files;
        # the line said DALI where the data's note said PIL)
        loader = f", loader {loader_label(source.loader, cfg.device)}"
    arch = f"{cfg.arch} width {cfg.width}" if cfg.arch in C.ARCHS else cfg.arch
    epochs = "epoch" if cfg.epochs == 1 else "epochs"
    print(
        f"{PROG}: {what} on {cfg.data}, {arch}, {cfg.epochs} {epochs}, batch {cfg.batch_size}, lr {cfg.lr}, "
        f"device {cfg.device}{loader}, run dir {cfg.run_dir}",
        file=sys.stderr,
    )
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    print(f"{PROG}: {describe_backends()}", file=sys.stderr)


def main(argv=None) -> int:
    """``llp-fast-train``: train LLP (and the supervised-only baseline) and print both."""
    raw = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    args = _common.parse(ap.parse_args, raw)
    _common.set_dist_timeout(args.dist_timeout)
    if args.max_restarts and args.nproc == 1 and not launch.launched():
        ap.error("--max-restarts restarts the processes of --nproc P (P > 1)")
    if args.nproc > 1 and not launch.launched():
        return _common.run(PROG, launch.relaunch, args, raw, PROG)
    # Inside training a Ctrl-C checkpoints (Interrupted) and a second one gives up (InterruptedTwice);
    # this is one before training starts (loading, building) or after it ends.
    rc = _common.run(
        PROG,
        _train,
        args,
        interrupted="interrupted outside training (loading, or after the last checkpoint); nothing is half-written",
    )
    return distributed.finish(rc)


if __name__ == "__main__":
    sys.exit(main())
