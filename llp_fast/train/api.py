"""Training from Python: :func:`fit` trains any network through the same loop as ``llp-fast-train``.

    import torch.nn as nn, llp_fast

    backbone = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    out = llp_fast.train.fit(backbone, "npz:my.npz", epochs=30, run_dir="runs/mine")
    out.metrics["test_top1"], out.model                    # the backbone with LLP's two heads

The backbone maps images (B, C, H, W) to features (B, F) (or a feature map, average-pooled); LLP
adds the classifier and the 128-d embedding heads (:class:`llp_fast.nn.WithHeads`). Everything else
is the command line's: the settings (keyword arguments are :class:`~llp_fast.train.config.TrainConfig`
fields, the same defaults, the same choices from the data), AMP and channels-last on CUDA,
checkpoints and exact resume (``fit(backbone, ..., run_dir=..., resume=True)`` with the same
backbone class), torch.distributed under torchrun, the bank and metrics.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from .. import _files
from ..errors import ConfigError
from ..nn import GIVEN
from . import checkpoint, claim, report
from .config import TrainConfig, fields
from .loop import Trainer
from .newrun import check_new_run
from .resume import RESUMABLE, check_resume_epochs, resume_changes


@dataclass
class Fitted:
    """What :func:`fit` returns: the trained network (the backbone with its heads: ``model(x)`` gives
    ``(logits, embeddings)``), the weight average when the run keeps one, the last epoch's metrics
    row, the resolved settings (``config.run_dir`` holds the checkpoint and ``metrics.jsonl``), and
    the run's notes: what it chose from the data and why, and what it was given but does not use
    (the lines ``llp-fast-train`` prints first; ``fit`` prints them too unless ``quiet``)."""

    model: torch.nn.Module
    average: torch.nn.Module | None
    metrics: dict
    config: TrainConfig
    notes: list[str] = dataclasses.field(default_factory=list)


def fit(model: torch.nn.Module | None = None, data: str | None = None, *, resume: bool = False, **settings) -> Fitted:
    """Trains ``model`` (a backbone; ``None``: ``settings["arch"]``, a ResNet-18 by default) with LLP
    on ``data`` (``digits``, the default, ``mnist5k``, ``npz:PATH``, ``folder:PATH``); ``settings``
    are :class:`TrainConfig` fields (with a backbone given, ``width`` and ``arch`` are its own and
    refused). A ``run_dir`` that holds a run is refused unless ``resume=True``,
    which continues that run exactly (pass the same kind of backbone again; settings given must be
    the saved ones, but for ``resume.RESUMABLE``: ``epochs``, ``quiet``, ``threads``, ``workers``, ``loader``). Without
    ``run_dir`` a new ``runs/<time>`` is made. Bad settings raise
    :class:`~llp_fast.errors.ConfigError` naming the flag."""
    _check_call(model, resume)
    if isinstance(settings.get("init_weights"), os.PathLike):
        settings["init_weights"] = os.fspath(settings["init_weights"])
    if isinstance(settings.get("device"), torch.device):  # (as the command line names it: saved, compared)
        settings["device"] = str(settings["device"])
    run_dir = settings.get("run_dir")
    if run_dir is not None:
        if not isinstance(run_dir, (str, os.PathLike)):
            raise TypeError(f"run_dir must be a path (str or os.PathLike), got {type(run_dir).__name__}")
        settings["run_dir"] = run_dir = os.fspath(run_dir)
    cfg = TrainConfig(data="digits" if data is None else data, **settings)
    arch = settings.get("arch")
    if model is not None and arch is not None and not str(arch).startswith(GIVEN):
        # (arch="resnet18", the default's value, passed on purpose was taken without a word; on a resume too)
        raise ConfigError(f"--arch {arch}: the network is the module given in Python; leave arch out")
    ckpt = None
    if resume:
        # (this call's quiet, as on the command line: a run begun quiet resumed silent)
        keep = {n: getattr(cfg, n) for n in (*RESUMABLE, "stop_after_steps") if n in settings or n == "quiet"}
        cfg, ckpt = _resumed(run_dir, {"data": data, **settings}, keep, model)
    else:
        check_new_run(cfg, model_given=model is not None)
    trainer = prepare(cfg, resume=resume, ckpt=ckpt, model=model, given={"data", *settings})
    if not trainer.cfg.quiet and trainer.rank == 0:  # (a Python run said none of them)
        for note in trainer.notes:
            print(f"llp_fast.train.fit: {note}", file=sys.stderr)
    metrics = trainer.fit()
    avg = trainer.average.model if trainer.average is not None else None
    return Fitted(model=trainer.model, average=avg, metrics=metrics, config=trainer.cfg, notes=list(trainer.notes))


def _check_call(model, resume) -> None:
    if not isinstance(model, (torch.nn.Module, type(None))):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if not isinstance(resume, bool):  # ("no" was true, and resumed the run)
        raise TypeError(f"resume must be True or False, got {resume!r}")


def _resumed(run_dir, given: dict, keep: dict, model) -> tuple[TrainConfig, dict]:
    """The saved config of the run in ``run_dir`` with ``keep`` (fields of ``resume.RESUMABLE``)
    applied, and its checkpoint; :class:`ConfigError` where a setting in ``given`` differs from the
    saved one, or ``model`` is another kind of network than the run trained."""
    if run_dir is None:
        raise ConfigError("resume=True continues the run in run_dir: give run_dir")
    saved, ckpt = checkpoint.open_run(run_dir)
    changed = _changed(saved, given, model_given=model is not None)
    if changed:
        raise ConfigError(
            f"resume=True continues the run in {run_dir} with its saved settings; {', '.join(changed)} "
            f"differ from them (only {', '.join(RESUMABLE)} can change)"
        )
    _same_network(run_dir, saved, model)
    return dataclasses.replace(saved, **{k: v for k, v in keep.items() if v is not None}), ckpt


def _same_network(run_dir, saved: TrainConfig, model) -> None:
    """:class:`ConfigError` where ``model`` (given) is another kind of network than the run trained."""
    if model is not None and GIVEN + type(model).__qualname__ != saved.arch:
        raise ConfigError(
            f"resume=True: the run in {run_dir} trained {saved.arch.removeprefix(GIVEN)}, not "
            f"{type(model).__qualname__}: pass the same kind of network"
        )


def _changed(saved: TrainConfig, given: dict, *, model_given: bool) -> list[str]:
    """The settings in ``given`` (TrainConfig fields) a resume would ignore (:func:`resume_changes`),
    named as fields. With a backbone given in Python its class stands for ``arch`` (checked apart)."""
    skip = ("run_dir", "stop_after_steps", *(("arch",) if model_given else ()))
    return [
        f"{f.name}={value!r} (saved: {getattr(saved, f.name)!r})"
        for f, value in resume_changes(saved, given, skip=skip)
    ]


def _say_split_batches(trainer: Trainer) -> None:
    """Under torchrun each of the P processes trains on ``batch // P`` examples a step (at least
    one): where P does not divide the batch, a step takes another number in all, which the run's
    first lines now say (it said "batch 32" and trained on 30 a step, or on 13 for a batch of 4
    over 13 processes)."""
    world, cfg = trainer.world, trainer.cfg
    for flag, size in (("--batch-size", cfg.batch_size), ("--labeled-batch", cfg.labeled_batch)):
        if world > 1 and size and size % world:
            each = max(1, size // world)
            examples = "example" if each == 1 else "examples"
            trainer.notes.append(
                f"{flag} {size} does not split evenly over {world} processes: {each} {examples} each, "
                f"{each * world} a step in all (a multiple of {world} keeps the step at {flag})"
            )


def prepare(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    ckpt: dict | None = None,
    model: torch.nn.Module | None = None,
    given=None,
) -> Trainer:
    """The :class:`Trainer` for ``cfg``: data loaded and checked, model built; nothing trained yet.
    Writes ``RUN_DIR/config.json`` (the resolved settings).

    ``resume``: continue the run in ``cfg.run_dir`` from its checkpoint (``ckpt``, when the caller
    has loaded it already, with ``cfg`` its config). Without ``ckpt`` the checkpoint is loaded here
    and its saved config is used, except for the fields of ``resume.RESUMABLE`` (epochs, quiet,
    threads, workers, loader), which are taken from ``cfg``. ``given``: the names of the settings the
    caller set, for the run's notes (else those away from their defaults)."""
    if cfg.run_dir is not None and not isinstance(cfg.run_dir, (str, os.PathLike)):  # (os.path's TypeError)
        raise TypeError(f"run_dir must be a path (str or os.PathLike), got {type(cfg.run_dir).__name__}")
    held = None if resume or cfg.run_dir is None else checkpoint.held_by(cfg.run_dir, "resume=True")
    if held:  # (prepare() started over in it: config.json, then metrics and checkpoint replaced)
        claim.not_claimed(cfg.run_dir)  # (a run training there now: "continue it with resume=True" was refused too)
        raise ConfigError(f"run_dir {held}, or give another run_dir")
    if resume and ckpt is None:
        saved_cfg, ckpt = checkpoint.open_run(cfg.run_dir)
        _same_network(cfg.run_dir, saved_cfg, model)  # (prepare took another class and saved it)
        keep = {name: getattr(cfg, name) for name in (*RESUMABLE, "stop_after_steps")}
        keep = {k: v for k, v in keep.items() if v is not None and (k != "loader" or v != "auto")}  # (as train())
        cfg = dataclasses.replace(saved_cfg, **keep)
    if ckpt is not None:
        check_resume_epochs(cfg.epochs, ckpt, cfg)
    # the checkpoint holds the weights: --init-weights is read when a run starts, not when it resumes
    trainer = Trainer(
        cfg if ckpt is None else dataclasses.replace(cfg, init_weights=None),
        model=model,
        resuming=ckpt is not None,
        given=given,
    )
    _say_split_batches(trainer)
    if ckpt is not None:
        trainer.restore(ckpt)
        trainer.cfg.init_weights = cfg.init_weights
    if trainer.rank == 0:
        _files.make_dirs(trainer.cfg.run_dir, what="run directory")
        trainer.claim = claim.RunClaim(trainer.cfg.run_dir)  # before anything is written there
        checkpoint.sweep(trainer.cfg.run_dir, ckpt)  # what killed writers left (checkpoint.py)
        report.write_config(trainer.cfg.run_dir, dataclasses.asdict(trainer.cfg))
    return trainer


def train(cfg: TrainConfig, *, resume: bool = False, model: torch.nn.Module | None = None) -> dict:
    """Trains (or resumes) the run in ``cfg.run_dir``; returns the last epoch's metrics. A
    ``run_dir`` that holds a run is refused unless ``resume=True``, which continues it with its saved
    settings: ``cfg``'s ``epochs``, ``quiet``, ``threads`` and ``workers`` apply, and its ``loader``
    where set away from the default; any other field set away from its default must equal the
    saved one (as :func:`fit` does)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    _check_call(model, resume)
    if not resume:  # (the refusals the CLI and fit() make: a jump_milestones without rate_jump, ...)
        check_new_run(cfg, model_given=model is not None)
        return prepare(cfg, model=model).fit()
    given = {f.name: getattr(cfg, f.name) for f in fields() if getattr(cfg, f.name) != _default(f)}
    # (the loader given only: the default, "auto", replaced a run's saved "pil"; quiet, threads and
    # workers are this call's, as on the command line)
    keep = {n: getattr(cfg, n) for n in (*RESUMABLE, "stop_after_steps") if n != "loader" or n in given}
    cfg, ckpt = _resumed(cfg.run_dir, given, keep, model)
    return prepare(cfg, resume=True, ckpt=ckpt, model=model).fit()


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def train_checked(cfg: TrainConfig, *, resume: bool) -> dict:
    """:func:`train` for a config the command line has checked already: a new run's, or a resumed
    one's (its saved settings with the flags a resume may change), and the supervised-only baseline
    beside it, that run's twin (a run saved before a check was added still resumes, and its
    baseline still starts)."""
    return prepare(cfg, resume=resume).fit()
