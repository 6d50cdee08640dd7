"""What a resumed run may change and what it may not (README, "Errors, checkpoints and resuming":
a resume replays the uninterrupted run), one rule for the command line and ``fit``/``train``.

:data:`RESUMABLE` (how long and how the run trains: ``--epochs``, ``--quiet``, ``--threads``,
``--workers``, ``--loader``; the loader too since DALI refuses a few files PIL reads, and its "use
--loader pil" could not be followed on a resume: the two loaders' images agree within a grey
level, not bit for bit) may change; every other setting must be the saved one; and ``--epochs``
must leave the run somewhere to go (:func:`check_resume_epochs`).
"""

from __future__ import annotations

import dataclasses
import numbers

from ..errors import ConfigError
from .config import TrainConfig, check_value, fields
from .defaults import as_saved

# What a resumed run may change: how long it trains and how it runs, nothing that shapes the result
# so far.
RESUMABLE = ("epochs", "quiet", "threads", "workers", "loader")


def resume_changes(saved: TrainConfig, given: dict, *, skip=()) -> list[tuple[dataclasses.Field, object]]:
    """What a resume cannot take of ``given`` (field name -> value): the fields other than
    ``RESUMABLE`` (and ``skip``) whose value, after its check, differs from the saved one as a run
    saves it (:func:`~.defaults.as_saved`), with the value given. ``None`` (chosen from the data)
    matches anything. The command line and ``fit``/``train`` each name them their way."""
    known = {f.name: f for f in fields()}
    out = []
    for name, value in given.items():
        if name in (*RESUMABLE, *skip) or value is None or name not in known:
            continue
        value = check_value(known[name], value)
        if as_saved(name, value) != as_saved(name, getattr(saved, name)):  # (earlier versions kept paths as given)
            out.append((known[name], value))
    return out


def least_epochs(ckpt: dict, cfg: TrainConfig) -> tuple[int, str]:
    """The fewest ``--epochs`` a resume of the run of ``cfg`` saved in ``ckpt`` may give, and why:
    the epochs it has done, one more where it stopped partway into an epoch (it reported epoch N's
    metrics for weights trained into N + 1), and past the ``--rate-jump`` and the whole-run
    ``--warmup-epochs`` a resume keeps (each was refused alone, naming a flag a resume refuses, and
    one bound's advice then met the next)."""
    done, partway = ckpt["epoch"], bool(ckpt.get("step_in_epoch", 0))
    bounds = [(done, f"it has completed {done} epochs")]
    if partway:
        bounds.append((done + 1, f"it stopped partway into epoch {done + 1}"))
    if cfg.rate_jump is not None:
        bounds.append((cfg.rate_jump + 1, f"it keeps its --rate-jump {cfg.rate_jump}"))
    if cfg.warmup_epochs and not cfg.supervised_only:
        bounds.append((cfg.warmup_epochs + 1, f"it keeps its --warmup-epochs {cfg.warmup_epochs}"))
    return max(bounds, key=lambda b: b[0])


def check_resume_epochs(epochs: int, ckpt: dict, cfg: TrainConfig) -> None:
    """:class:`ConfigError` where ``epochs`` is below :func:`least_epochs`, naming the fewest (or is
    not a whole number >= 1: ``"3"`` was a bare TypeError here)."""
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral):  # (below 1: the bound's line)
        check_value(next(f for f in fields() if f.name == "epochs"), epochs)
    least, why = least_epochs(ckpt, cfg)
    if epochs < least:
        raise ConfigError(
            f"--epochs {epochs}: the run in {cfg.run_dir} cannot end there ({why}); give --epochs {least} or more"
        )
