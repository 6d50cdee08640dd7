"""A trained network as the tools read it (``llp-fast-select``, ``llp-fast-linear-probe``): the
checkpoint's weights in the network its config builds, and its training data source rebuilt from
that config, which holds the preprocessing (channels, sizes, normalisation statistics) the tools
must show their images with. Never the training loop (the tools do not import it)."""

from __future__ import annotations

import dataclasses
import os

import torch

from .. import _checks
from .._device import cuda_checked
from ..errors import CheckpointError, DataError
from ..nn import misfit
from . import checkpoint
from .build import model_for, source_for


def load_network(path: str, device="cpu", *, random_init: bool = False):
    """``(model, cfg, source)`` for a checkpoint file or run directory: the network in eval mode
    with its weights, the run's :class:`TrainConfig`, and its training data source rebuilt from
    the config (it holds the preprocessing: channels, sizes, normalisation statistics).
    ``random_init`` keeps the freshly initialised weights (a control for the linear probe)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"path must be a checkpoint file or run directory (str or os.PathLike), got {type(path).__name__}"
        )
    if not isinstance(random_init, bool):  # ("yes" was true: random weights, unsaid)
        raise TypeError(f"random_init must be True or False, got {random_init!r}")
    try:
        device = _checks.device_name(device)  # (a torch.device too: its name)
    except ValueError as e:  # (torch's own RuntimeError listing every device type)
        raise ValueError(f"device: {e}") from None
    cuda_checked(device, "device")  # (torch's AssertionError, later)
    path = checkpoint.checkpoint_path(os.fspath(path))
    ckpt = checkpoint.load(path, map_location="cpu")
    cfg = checkpoint.config_of(ckpt, path)
    try:
        source = source_for(cfg, device, workers=0)
    except DataError as e:
        raise DataError(f"the checkpoint's training data ({cfg.data}) fixes its preprocessing: {e}") from None
    _same_data(ckpt, source, cfg, path)
    # the checkpoint's weights replace --init-weights (read when the run started: that file may be
    # gone, or relative to another directory), and --random-init means the network's own init
    model = model_for(dataclasses.replace(cfg, init_weights=None), source)
    if not random_init:
        weights = checkpoint.evaluated_weights(ckpt)
        differs = misfit(weights, model.state_dict()) if isinstance(weights, dict) else None
        if differs:  # a sound checkpoint, but its data now builds another network (channels, classes)
            raise CheckpointError(
                f"checkpoint {path} does not fit the network its run's data ({cfg.data}) builds now: {differs}"
            )
        try:
            model.load_state_dict(weights)
        except Exception as e:
            raise checkpoint.corrupt(path, e) from None
    model = model.to(device).eval()
    return model, cfg, source


def _same_data(ckpt: dict, source, cfg, path: str) -> None:
    """:class:`CheckpointError` where the run's data no longer is what it trained on (its split's
    labels, and its training images: folder data's file names, array data's pixels, as a resume
    checks): the preprocessing
    (normalisation statistics, sizes) is read from it, and changed data scored with other ones
    without a word."""
    targets, n = ckpt.get("targets"), int(source.targets.shape[0])
    labels_differ = isinstance(targets, torch.Tensor) and (
        targets.shape[0] < n or not torch.equal(targets[:n].cpu(), source.targets.cpu())
    )
    if labels_differ or checkpoint.files_differ(ckpt, getattr(source, "fingerprint", None)):
        raise CheckpointError(
            f"checkpoint {path}: its run's training data ({cfg.data}) is not what it trained on (another split, "
            "or other training images): the network's preprocessing comes from it; restore the data"
        )
