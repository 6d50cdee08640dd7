"""The settings a run takes from what its data is, from its device and from ``--method``.

A :class:`~llp_fast.train.config.TrainConfig` field left ``None`` is chosen here when the run starts,
and :func:`resolve` returns, beside the resolved config, the lines a run prints to say what it
chose and why. The rules read :class:`~llp_fast.data.DataFacts` (how many training examples, the
images' side and channels, how many labels per class, in memory or in files), never the data set's
name: the same images give the same run whether they come as ``--data digits`` or as an ``npz:``.
Why each rule is what it is: docs/method.md §8.4, with the runs behind it in docs/results.md.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import time

from .. import _files
from .._checks import expand_spec
from ..errors import ConfigError
from .config import ARCHS, DEFAULT_MAX_VOTERS, TrainConfig, flag, validate

# Fewer training examples than this is "small data": many short steps at a high rate, a few epochs
# on the start labels before propagating, and the supervised-only baseline beside the run.
SMALL_DATA = 20_000
_DEFAULT = TrainConfig()  # what a setting not given holds (:func:`_was_set`)

# Input side of images this small or smaller is raised to it (the small stem keeps the side, and the
# last stage of a ResNet-18 would see a 1-pixel map below it).
MIN_SIDE = 16
MAX_SIDE = 224  # ImageNet's crop: larger images are resampled to it
# A vote on raw pixels is a useful start for images up to this side held in memory.
PIXEL_VOTE_SIDE = 32

# What each --method sets (docs/method.md §8): the parts of LLP+ and their switches.
LLP_ONLY = ("propagation_start", "label_init")  # data defaults of LLP's votes alone

METHOD_PARTS = {
    "plus": dict(
        start_rounds=10,
        refresh_rounds=10,
        local_propagation=True,
        consistency=1.0,
        consistency_target="llp",
        threshold=0.8,
        ema=0.99,
        labeled_batch=0,
    ),
    "paper": dict(
        start_rounds=1,
        refresh_rounds=0,
        local_propagation=True,
        consistency=0.0,
        consistency_target="llp",
        threshold=0.95,
        ema=0.0,
        labeled_batch=0,
    ),
    "fixmatch": dict(
        start_rounds=1,
        refresh_rounds=0,
        local_propagation=False,
        consistency=1.0,
        consistency_target="weak",
        threshold=0.95,
        ema=0.99,
        labeled_batch=16,
    ),
}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def new_run_dir(parent: str = "runs") -> str:
    """A new run directory ``parent/<time>`` (``-2``, ``-3``, ... when that second's is taken),
    created here, so that two runs started in the same second never share one. Removed when the
    process exits if nothing was written to it (a run that failed to start)."""
    if not os.path.isdir(parent):
        _files.make_dirs(parent, what="run directory")
        atexit.register(remove_if_empty, parent)  # runs after the run directory's (last in, first out)
    base = os.path.join(parent, time.strftime("%Y%m%d-%H%M%S"))
    for n in range(1, 10_000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        atexit.register(remove_if_empty, path)
        return path
    raise ConfigError(f"no free run directory under {parent}: give --run-dir")


def as_saved(name: str, value):
    """A setting as a run saves it, for comparing a resume's value with the saved one: the data's
    and ``--extra-unlabeled``'s paths absolute (a relative one was "a change" of the same file)."""
    if name == "data" and isinstance(value, str):
        return absolute_data(value)
    if name == "extra_unlabeled" and isinstance(value, (str, os.PathLike)):
        return os.path.abspath(os.path.expanduser(value))
    return value


def absolute_data(spec: str) -> str:
    """``npz:PATH`` and ``folder:PATH`` with PATH made absolute (a resume may start in another
    directory), ``~`` expanded (a shell leaves ``folder:~/x`` as it is: it was read as ./~/x);
    the named sets as they are."""
    for kind in ("npz:", "folder:"):
        if spec.startswith(kind):
            return kind + os.path.abspath(expand_spec(spec)[len(kind) :])
    return spec


def remove_if_empty(path: str) -> None:
    with contextlib.suppress(OSError):  # not empty, or gone
        os.rmdir(path)


def resolve_run(cfg: TrainConfig) -> TrainConfig:
    """The settings that do not depend on the data: the device (CUDA when there is one), the
    ResNets' width (16 on CPU, 64 on CUDA; None for any other network, which sets its own: a
    baseline twin of such a run was refused for the width it had been given), the run directory
    (``runs/<time>``), and the data's and ``--extra-unlabeled``'s paths made absolute (a resume may
    start elsewhere)."""
    device = cfg.device or default_device()
    return dataclasses.replace(
        cfg,
        data=as_saved("data", cfg.data),
        device=device,
        width=(cfg.width or (16 if device == "cpu" else 64)) if cfg.arch in ARCHS else cfg.width,
        run_dir=cfg.run_dir or new_run_dir(),
        extra_unlabeled=as_saved("extra_unlabeled", cfg.extra_unlabeled)
        if cfg.extra_unlabeled
        else cfg.extra_unlabeled,
    )


def small(facts) -> bool:
    return facts.num_train < SMALL_DATA


def baseline_by_default(facts) -> bool:
    """``--baseline auto``: the supervised-only baseline beside the run on small data."""
    return small(facts)


def data_defaults(facts, method: str = "plus") -> dict:
    """Each data-dependent setting with the reason it takes that value: name -> (value, why).
    ``method``: small data trains 40 epochs with LLP+ (it plateaus by epoch 30 on the digit sets) and
    80 with the paper's method (the previous default, whose results it reproduces)."""
    tiny = small(facts)
    gray = facts.channels == 1
    size = "fewer" if tiny else "at least"
    why_size = f"{size} than {SMALL_DATA:,} training examples"
    side = min(max(facts.side, MIN_SIDE), MAX_SIDE)
    if facts.kind == "folder":  # its loader does not shift images (check_new_run)
        shift = (0.0, "folder: images: random crops place them, no shift")
    elif gray:
        shift = (1.0 if facts.side <= 8 else 2.0, "grayscale: small shifts")
    else:
        shift = (0.0, "colour images: crops, no shift")
    out = {
        "epochs": ((80 if method == "paper" else 40) if tiny else 100, why_size),
        "batch_size": (64 if tiny else 128, why_size),
        "lr": (0.1 if tiny else 0.03, why_size),
        "propagation_start": (3 if tiny else 0, why_size),
        "image_size": (side, _size_why(facts)),
        "flip": (not gray, "grayscale images: digits and letters change meaning mirrored" if gray else "colour images"),
        "scale_min": (0.85 if gray else 0.35, "grayscale: crops keep most of the glyph" if gray else "colour images"),
        "translate": shift,
    }
    pixels = facts.kind == "arrays" and facts.side <= PIXEL_VOTE_SIDE
    out["label_init"] = (
        "inputs" if pixels else "instance",
        f"images of {PIXEL_VOTE_SIDE} px or less in memory: a vote on their pixels"
        if pixels
        else "no pixel vote for large images or files",
    )
    return out


def _px(facts) -> str:
    """The images' size as the user knows it: "28 px" (square), "28 x 40 px" (arrays of another shape)."""
    h, w = facts.hw or (facts.side, facts.side)
    return f"{facts.side} px" if h == w else f"{h} x {w} px"


def _size_why(facts) -> str:
    """Why the input side: the images' size, and what training does to it (squashes a non-square
    array image to a square, raises a small side, resamples a large one)."""
    h, w = facts.hw or (facts.side, facts.side)
    done = ["squashed to a square"] if h != w else []
    done += [f"raised to {MIN_SIDE} px"] if facts.side < MIN_SIDE else []
    done += [f"resampled to {MAX_SIDE} px"] if facts.side > MAX_SIDE else []
    return f"images of {_px(facts)}" + (" are " + " and ".join(done) if done else "")


def resolve(cfg: TrainConfig, facts, *, new: bool = True, given=None) -> tuple[TrainConfig, list[str]]:
    """``cfg`` with every field left ``None`` chosen (:func:`resolve_run`, ``--method``'s parts, the
    data's rules), validated; and the lines that say what was chosen and why (empty when nothing
    was left to choose, as on a resume), and, for a ``new`` run, which settings given a
    supervised-only run does not use and which lr drops fall after the run (both were unsaid). A
    resume (``new=False``) says neither: its saved config holds what the run chose, read as given.
    ``given``: the names of the settings the caller set (else those away from their defaults)."""
    ignored = _unused_by_supervised(cfg, given) if new else []
    asked = {n: getattr(cfg, n) for n in ("milestones", "jump_milestones")} if new else {}
    cfg = resolve_run(cfg)
    chosen: dict = {}
    reasons: dict[str, list[str]] = {}
    # settings a run without LLP's votes does not use are chosen (the config holds every field) but
    # not said: a supervised-only run listed its propagation start and its method's parts
    unused = set(LLP_ONLY) if cfg.supervised_only or cfg.method == "fixmatch" else set()
    for name, (value, why) in data_defaults(facts, cfg.method).items():
        if getattr(cfg, name) is None:
            chosen[name] = value
            if name not in unused:
                reasons.setdefault(why, []).append(_setting(name, value))
    for name, value in METHOD_PARTS[cfg.method].items():
        if getattr(cfg, name) is None:
            chosen[name] = value
    if cfg.max_voters is None:
        chosen["max_voters"] = DEFAULT_MAX_VOTERS
    cfg = dataclasses.replace(cfg, **chosen)
    warmup_within(cfg)  # (again with the epochs chosen, and on a resume's --epochs)
    jump = cfg.rate_jump
    if cfg.milestones is None:  # at 2/3 and 8/9 of the epochs before the jump (of the run, without one)
        main = jump if jump is not None else cfg.epochs
        # (one drop where both round to the same epoch: two there would cut the lr 100x at once)
        cfg.milestones = sorted({m for m in (round(main * 2 / 3), round(main * 8 / 9)) if jump is None or m < jump})
    if cfg.jump_milestones is None:  # at 2/3 and 8/9 of the epochs after the jump, within the run
        rest = cfg.epochs - jump if jump is not None else 0
        drops = (min(jump + max(1, round(rest * f)), cfg.epochs - 1) for f in (2 / 3, 8 / 9)) if rest else ()
        cfg.jump_milestones = sorted({m for m in drops if m > jump})
    lines = []
    if reasons:
        lines.append(
            # (grey stored as three equal channels read "1 channel" beside "the network takes all three")
            f"the data: {facts.num_train:,} training images of {_px(facts)}, "
            f"{'colour' if facts.channels > 1 else 'grayscale'}, {facts.num_labeled:,} labeled (at least "
            f"{facts.min_labeled_per_class} per class), {facts.num_classes} classes"
        )
        lines.append("defaults from it: " + "; ".join(f"{', '.join(v)} ({why})" for why, v in reasons.items()))
    # (--start-rounds is the vote on the inputs': with --label-init instance it was said and unused)
    parts = [n for n in METHOD_PARTS[cfg.method] if n in chosen and not cfg.supervised_only]
    parts = [n for n in parts if n != "start_rounds" or cfg.label_init == "inputs"]
    if parts:
        lines.append(f"--method {cfg.method}: " + ", ".join(_setting(n, chosen[n]) for n in parts))
    if ignored:
        lines.append(f"--supervised-only trains on the labeled examples alone: {', '.join(ignored)} not used")
    # (a fraction given was dropped without a word)
    if new and _was_set(cfg, "labeled_fraction", given) and cfg.labeled_fraction is not None and facts.own_labels:
        lines.append(
            f"--labeled-fraction {cfg.labeled_fraction:g} is not used: the data marks its own labeled set "
            f"({facts.num_labeled:,} labeled training images)"
        )
    if new and facts.kind != "folder" and _was_set(cfg, "workers", given):  # (ignored without a word)
        lines.append(f"--workers {cfg.workers} is not used: array data is held in memory, read without workers")
    for name, drops in asked.items():  # (a drop at or after the last epoch never came, unsaid)
        late = [m for m in drops or () if m >= cfg.epochs]
        if late:
            lines.append(
                f"{flag(name)} {show(late)}: the run ends first (a drop at M applies after M epochs; with --epochs "
                f"{cfg.epochs} only drops below {cfg.epochs} apply)"
            )
    if not unused and cfg.epochs <= cfg.propagation_start:  # (a short trial run never propagated, unsaid)
        lines.append(
            f"--epochs {cfg.epochs} ends before label propagation starts (after --propagation-start "
            f"{cfg.propagation_start} epochs): this run trains on its start labels alone"
        )
    return validate(cfg), lines


def _unused_by_supervised(cfg: TrainConfig, given=None) -> list[str]:
    """The LLP settings (the ``llp`` group: ``--method``, the votes, the bank, the weight average) a
    supervised-only run was given (``given``: the names set; else those away from their defaults):
    it uses none of them."""
    if not cfg.supervised_only:
        return []
    llp = [f for f in dataclasses.fields(cfg) if f.metadata.get("group") == "llp" and f.name != "supervised_only"]
    return [_given(f.name, getattr(cfg, f.name)) for f in llp if _was_set(cfg, f.name, given)]


def _was_set(cfg: TrainConfig, name: str, given) -> bool:
    """Whether the caller set the setting ``name``: among ``given`` (the names set; an explicit
    ``--labeled-fraction 0.1``, the default's value, counts), else where away from its default."""
    return name in given if given is not None else getattr(cfg, name) != getattr(_DEFAULT, name)


def _given(name: str, value) -> str:
    """The flag that gives ``value``: an on/off setting's ``--X`` or ``--no-X`` (``--no-confidence``
    is the flag; "--confidence" is refused), else the setting's flag."""
    if not isinstance(value, bool):
        return flag(name)
    return f"--{'' if value else 'no-'}{flag(name).removeprefix('--').removeprefix('no-')}"


def _setting(name: str, value) -> str:
    """A chosen setting as the command line takes it back: ``--no-flip`` / ``--local-propagation``
    for an on/off one (it printed "--flip off", which the command line refuses), else the flag and
    its value."""
    return _given(name, value) if isinstance(value, bool) else f"{flag(name)} {show(value)}"


def show(value) -> str:
    """A setting's value as its flag takes it: on/off, epochs comma-separated, none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def warmup_within(cfg: TrainConfig) -> None:
    """Warm-up shorter than the run (the whole run as warm-up, instance discrimination with no label
    used, reported "held-out top-1 LLP 7.2%", below chance, without a word)."""
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs and not cfg.supervised_only:
        raise ConfigError(
            f"--warmup-epochs {cfg.warmup_epochs}: the whole run of --epochs {cfg.epochs} would be warm-up (instance "
            "discrimination, no label used); give fewer warm-up epochs or more epochs"
        )
