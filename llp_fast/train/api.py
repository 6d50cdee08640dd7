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
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import checkpoint, report
from .config import RESUMABLE, TrainConfig
from .loop import Trainer


@dataclass
class Fitted:
    """What :func:`fit` returns: the trained network (the backbone with its heads: ``model(x)`` gives
    ``(logits, embeddings)``), the weight average when the run keeps one, the last epoch's metrics
    row, and the resolved settings (``config.run_dir`` holds the checkpoint and ``metrics.jsonl``)."""

    model: torch.nn.Module
    average: torch.nn.Module | None
    metrics: dict
    config: TrainConfig


def fit(model: torch.nn.Module | None = None, data: str = "digits", *, resume: bool = False, **settings) -> Fitted:
    """Trains ``model`` (a backbone; ``None``: ``settings["arch"]``, a ResNet-18 by default) with LLP
    on ``data`` (``digits``, ``mnist5k``, ``npz:PATH``, ``folder:PATH``); ``settings`` are
    :class:`TrainConfig` fields. ``resume=True`` continues the run in ``settings["run_dir"]``
    exactly (pass the same kind of backbone again). Bad settings raise
    :class:`~llp_fast.errors.ConfigError` naming the flag."""
    if not isinstance(model, (torch.nn.Module, type(None))):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    cfg = TrainConfig(data=data, **settings)
    trainer = prepare(cfg, resume=resume, model=model)
    metrics = trainer.fit()
    avg = trainer.average.model if trainer.average is not None else None
    return Fitted(model=trainer.model, average=avg, metrics=metrics, config=trainer.cfg)


def prepare(
    cfg: TrainConfig, *, resume: bool = False, ckpt: dict | None = None, model: torch.nn.Module | None = None
) -> Trainer:
    """The :class:`Trainer` for ``cfg``: data loaded and checked, model built; nothing trained yet.
    Writes ``RUN_DIR/config.json`` (the resolved settings).

    ``resume``: continue the run in ``cfg.run_dir`` from its checkpoint (``ckpt``, when the caller
    has loaded it already, with ``cfg`` its config). Without ``ckpt`` the checkpoint is loaded here
    and its saved config is used, except for the fields of ``config.RESUMABLE`` (epochs, quiet,
    threads, workers), which are taken from ``cfg``."""
    if resume and ckpt is None:
        saved_cfg, ckpt = checkpoint.open_run(cfg.run_dir)
        keep = {name: getattr(cfg, name) for name in (*RESUMABLE, "stop_after_steps")}
        keep = {k: v for k, v in keep.items() if v is not None}
        cfg = dataclasses.replace(saved_cfg, **keep)
    if ckpt is not None and cfg.epochs < ckpt["epoch"]:
        raise ConfigError(f"--epochs {cfg.epochs}: the run in {cfg.run_dir} has completed {ckpt['epoch']} epochs")
    trainer = Trainer(cfg, model=model)
    if ckpt is not None:
        trainer.restore(ckpt)
    if trainer.rank == 0:
        os.makedirs(trainer.cfg.run_dir, exist_ok=True)
        checkpoint.sweep(trainer.cfg.run_dir, ckpt)  # what killed writers left (checkpoint.py)
        report.write_config(trainer.cfg.run_dir, dataclasses.asdict(trainer.cfg))
    return trainer


def train(cfg: TrainConfig, *, resume: bool = False, model: torch.nn.Module | None = None) -> dict:
    """Trains (or resumes) the run in ``cfg.run_dir``; returns the last epoch's metrics."""
    return prepare(cfg, resume=resume, model=model).fit()
