"""Integer label arrays read from users' files as int64, -1 marking an unlabeled row: one check for
the training data's ``.npz`` (``data/arrays.py``) and the labeller's label files
(``embeddings/sources.py``), so both refuse the same arrays with the same words."""

from __future__ import annotations

import numpy as np

from .errors import DataError


def refuse_wrapped_unlabeled(arr: np.ndarray, name: str) -> None:
    """``DataError`` (a ``ValueError``) where ``arr`` is unsigned and holds its dtype's largest value:
    -1 saved as uint8 is 255, which would read as one more class and leave no row unlabeled (the
    estimator's ``y`` is checked with the same words)."""
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) == np.iinfo(arr.dtype).max:
        top = int(arr.max())
        raise DataError(
            f"{name} is {arr.dtype}, which cannot hold -1 (unlabeled): its {top} entries are most likely -1s "
            f"that wrapped round; save the labels as a signed integer (.astype(np.int64) before any cast to "
            f"{arr.dtype}; if {top} is a class, as a wider type)"
        )


def int64_labels(arr: np.ndarray, name: str, *, unlabeled: bool = True) -> np.ndarray:
    """``arr`` (a 1-D integer array) as int64, refusing values no int64 holds, values below -1, and,
    where the labels may mark rows unlabeled (``unlabeled``), an unsigned array that holds its
    dtype's largest value: -1 saved as uint8 is 255, which would read as one more class and leave no
    row unlabeled. ``name`` (the file and array) heads the one-line ``DataError``."""
    if unlabeled:
        refuse_wrapped_unlabeled(arr, name)
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{name} holds values beyond int64")
    labels = arr.astype(np.int64)
    if labels.size and int(labels.min()) < -1:
        raise DataError(f"{name} holds values below -1 (-1 marks unlabeled)")
    return labels
