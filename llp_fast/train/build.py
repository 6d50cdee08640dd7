"""What a resolved :class:`~llp_fast.train.config.TrainConfig` builds: its training data (split,
input side, augmentation) and its network, and the checks of settings against the data.

Tools that read checkpoints (``llp-fast-select``) build the data and network of a saved run from
here without importing the training loop.
"""

from __future__ import annotations

from ..errors import DataError
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
    if k > m:
        raise DataError(  # (the default K = 10 meets it on a small folder: say what to give)
            f"--k {k} exceeds the {m} labeled training examples: give --k {m} or less, or label more examples"
        )
    pool = source.num_train - m if cfg.density_pool == "unlabeled" else source.num_train
    if pool == 0:  # every training example labeled: nothing to propagate to, no density pool
        raise DataError(
            f"no unlabeled training example is left (all {m} are labeled; --labeled-fraction "
            f"{cfg.labeled_fraction}): LLP needs some; lower --labeled-fraction, or --supervised-only"
        )
    if cfg.t > pool:
        raise DataError(f"--t {cfg.t} exceeds the density pool of {pool} examples: give --t {pool} or less")


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
