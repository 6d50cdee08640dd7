"""The rules a new run's settings must satisfy beyond each flag's own range (:func:`check_new_run`),
one set for the command line, ``fit`` and ``train``: how the learning-rate drops sit around a rate
jump, what a network given in Python leaves to itself, settings a data kind would ignore without a
word, and a run directory outside the data. A resume is not held to them: it keeps what it saved
(:mod:`llp_fast.train.resume` says what a resume may change).
"""

from __future__ import annotations

import dataclasses
import os

from .._checks import increasing_epochs
from ..errors import ConfigError
from ..nn import GIVEN
from .config import ARCHS, TrainConfig, flag, validate
from .defaults import show, warmup_within


def check_new_run(cfg: TrainConfig, *, model_given: bool = False) -> None:
    """What a new run's settings must satisfy beyond each flag's own range (a resume keeps what it
    saved: runs saved before these checks took default milestones past their jump, and a
    ``--translate`` on folder data): ``--milestones`` all before ``--rate-jump`` (``lr_at`` uses none
    after it: they were dropped without a word), ``--jump-milestones`` after it (with no jump they
    were ignored), and no ``--translate`` on ``folder:`` data (its loader does not shift images: the
    value was ignored). The supervised-only baseline beside a run is that run's twin: not checked
    again. ``model_given``: the network is a module passed in Python (``fit(model, ...)``), so
    ``width`` and any ``arch`` but the default and ``given:...`` are refused (they were ignored
    without a word); without one, ``arch`` cannot be ``given:...`` (a module only Python can pass)."""
    if str(cfg.arch).startswith(GIVEN) and not model_given:
        raise ConfigError(
            f"--arch {cfg.arch}: the mark of a network passed in Python (llp_fast.train.fit(model, ...)); "
            f"expected {', '.join(ARCHS)} or package.module:factory"
        )
    # Each field's own check first (a copy): milestones="5,1" or 5 met the comparisons below as a bare
    # TypeError naming no setting ("'<' not supported between instances of 'str' and 'int'").
    cfg = validate(dataclasses.replace(cfg, arch=ARCHS[0] if str(cfg.arch).startswith(GIVEN) else cfg.arch))
    if model_given and cfg.width is not None:
        raise ConfigError(f"--width {cfg.width}: the network is the module given in Python, which has its own width")
    if model_given and cfg.arch != ARCHS[0] and not str(cfg.arch).startswith(GIVEN):
        raise ConfigError(f"--arch {cfg.arch}: the network is the module given in Python; leave arch out")
    for name in ("milestones", "jump_milestones"):
        try:
            increasing_epochs(getattr(cfg, name))
        except ValueError as e:
            raise ConfigError(f"{flag(name)}: {e}") from None
    jump = cfg.rate_jump
    if jump is not None and any(m >= jump for m in cfg.milestones or ()):
        raise ConfigError(
            f"--milestones {show(cfg.milestones)}: at or after --rate-jump {jump} (the drops after the jump "
            "are --jump-milestones)"
        )
    if cfg.jump_milestones and jump is None:
        raise ConfigError("--jump-milestones: the drops after a rate jump need --rate-jump")
    if jump is not None and any(m <= jump for m in cfg.jump_milestones or ()):
        raise ConfigError(f"--jump-milestones {show(cfg.jump_milestones)}: each must come after --rate-jump {jump}")
    if cfg.width is not None and cfg.arch not in ARCHS:  # (it was ignored without a word)
        raise ConfigError(
            f"--width {cfg.width}: the width of {' and '.join(ARCHS)} only; --arch {cfg.arch} builds its own network"
        )
    if cfg.method == "fixmatch" and cfg.consistency == 0 and not cfg.supervised_only:  # (reported as FixMatch)
        raise ConfigError(
            "--consistency 0: --method fixmatch without its consistency term trains on the labeled examples "
            "alone; that is --supervised-only"
        )
    if cfg.translate and str(cfg.data).startswith("folder:"):
        raise ConfigError(
            f"--translate {cfg.translate:g}: folder: images are not shifted (random crops place them: --scale-min); "
            "leave --translate out"
        )
    _run_dir_outside_data(cfg)
    if cfg.epochs is not None:  # (given: refused before anything is written; else once chosen, in resolve)
        warmup_within(cfg)


def _run_dir_outside_data(cfg: TrainConfig) -> None:
    """A run directory inside a ``folder:`` data set (the default ``runs/<time>`` when the current
    folder is the data's) read as a class of no images: that run failed, and a run that had written
    its ``tb/`` there broke every later run on the data, its own resume included."""
    path = str(cfg.data)[len("folder:") :]
    if not str(cfg.data).startswith("folder:") or not os.path.isdir(path):
        return
    from ..data.files import split_layout

    read = [os.path.realpath(p) for p in split_layout(path) if p is not None]  # (train/ and test/ alone, if split)
    where = os.path.realpath(cfg.run_dir if cfg.run_dir is not None else "runs")
    if any(where == root or where.startswith(os.path.join(root, "")) for root in read):
        what = f"--run-dir {cfg.run_dir}" if cfg.run_dir is not None else "the default run directory (./runs/<time>)"
        raise ConfigError(
            f"{what} lies inside --data {cfg.data}, where its files would read as a class of images: give the run a "
            "directory outside the data (--run-dir)"
        )
