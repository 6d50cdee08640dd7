"""What a resolved :class:`~llp_fast.train.config.TrainConfig` builds: its training data (split,
input side, augmentation) and its network, and the checks of settings against the data.

Tools that read checkpoints (``llp-fast-select``) build the data and network of a saved run from
here without importing the training loop.
"""

from __future__ import annotations

import os

from .._device import cuda_checked
from ..errors import ConfigError, DataError
from .config import ARCHS, TrainConfig


def check_against_data(cfg: TrainConfig, source, k: int) -> None:
    """The LLP settings that depend on the data: K within the labeled set, T within the density
    pool, and ``--label-init inputs`` only on array data. :class:`DataError` naming the flag."""
    m = int((source.targets >= 0).sum())
    if cfg.label_init == "inputs" and not hasattr(source, "input_features"):
        raise DataError(
            f"--label-init inputs needs array data (digits, mnist5k, npz:PATH); {cfg.data} has no input "
            "vectors to propagate in (use --label-init instance)"
        )
    # (the default K = 10 and T = 25 meet these on a small data set: say what to give, both at once,
    # where a user fixing --k met --t next)
    problems = []
    if k > m:
        problems.append(
            f"--k {k} exceeds the {m} labeled training examples: give --k {m} or less (--k 0: from the labels), "
            "or label more"
        )
    pool = source.num_train - m if cfg.density_pool == "unlabeled" else source.num_train
    if pool and cfg.t > pool:
        problems.append(f"--t {cfg.t} exceeds the density pool of {pool} examples: give --t {pool} or less")
    if problems:
        raise DataError("; ".join(problems))
    if pool == 0:  # every training example labeled: nothing to propagate to, no density pool
        fix = (  # (each class keeps one labeled example whatever the fraction: lowering it cannot help)
            "every class keeps at least one labeled example: add unlabeled images"
            if m <= source.num_classes
            else "lower --labeled-fraction"
        )
        raise DataError(
            f"no unlabeled training example is left (all {m} are labeled; --labeled-fraction "
            f"{cfg.labeled_fraction}): LLP needs some; {fix}, or --supervised-only"
        )


def needs_strong_views(cfg: TrainConfig) -> bool:
    """Whether training batches carry a strong view (the consistency term is on)."""
    return bool(cfg.consistency) and not cfg.supervised_only


def configure_source(cfg: TrainConfig, source) -> None:
    """Sets ``source``'s input side and augmentation to the (resolved) ``cfg``."""
    source.configure(
        image_size=cfg.image_size,
        scale_min=cfg.scale_min,
        translate=cfg.translate,
        flip=cfg.flip,
        strong=needs_strong_views(cfg),
    )


def load_source(cfg: TrainConfig, device, *, workers: int | None = None):
    """The training data of ``cfg``, split, before its input side and augmentation are set."""
    from ..data import load as load_data

    return load_data(
        cfg.data,
        device=device,
        labeled_fraction=cfg.labeled_fraction,
        unlabeled_fraction=cfg.unlabeled_fraction,
        seed=cfg.seed,
        workers=cfg.workers if workers is None else workers,
        loader=cfg.loader,
    )


def source_for(cfg: TrainConfig, device, *, workers: int | None = None):
    """The training data of a resolved ``cfg`` (split, input side and augmentation as configured)."""
    source = load_source(cfg, device, workers=workers)
    configure_source(cfg, source)
    return source


def model_for(cfg: TrainConfig, source, *, backbone=None):
    """The network of a resolved ``cfg`` shaped for ``source`` (classes, channels, image size), on the
    CPU, with ``--init-weights`` loaded into it; ``backbone``: a module given in Python for the trunk."""
    from ..nn import build

    width = {"width": cfg.width} if cfg.arch in ARCHS else {}  # (None: another network has its own)
    return build(
        cfg.arch,
        num_classes=source.num_classes,
        in_channels=source.in_channels,
        image_size=source.image_size,
        init_weights=cfg.init_weights,
        backbone=backbone,
        **width,
    )


def run_device(cfg: TrainConfig, world: int):
    """The torch device a (resolved) ``cfg`` trains on: under torchrun, CUDA ranks take their
    ``LOCAL_RANK``'s GPU; ``cuda`` is named by its index and made current."""
    import torch

    device = cuda_checked(cfg.device)
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current device, named by its index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def add_extras(cfg: TrainConfig, source, world: int) -> str:
    """``--extra-unlabeled``: the selection's images joined to ``source`` as unlabeled training
    examples (:func:`llp_fast.data.extra.add_extra_unlabeled`); returns the line that says so (the
    run's first lines counted the original images only)."""
    from ..data.extra import add_extra_unlabeled

    if world > 1:
        raise ConfigError("--extra-unlabeled runs in a single process for now (drop --nproc)")
    n0 = source.num_train
    extra = add_extra_unlabeled(source, cfg.extra_unlabeled)
    twice = getattr(source, "extra_twice", 0)
    return (
        f"--extra-unlabeled: {extra:,} selected images join the {n0:,} training images as unlabeled ones "
        f"({source.num_train:,} in all) "
        + ("until the rate jump" if cfg.rate_jump is not None else "for the whole run")
        + (f"; {twice:,} of them are training images already (seen twice an epoch)" if twice else "")
        + (f"; {source.extra_note}" if getattr(source, "extra_note", "") else "")
    )
