"""Integer label arrays read from users' files as int64, -1 marking an unlabeled row: one check for
the training data's ``.npz`` (``data/arrays.py``) and the labeller's label files
(``embeddings/sources.py``), so both refuse the same arrays with the same words."""

from __future__ import annotations

import numpy as np

from .errors import DataError


def int64_labels(arr: np.ndarray, name: str, *, unlabeled: bool = True) -> np.ndarray:
    """``arr`` (a 1-D integer array) as int64, refusing values no int64 holds, values below -1, and,
    where the labels may mark rows unlabeled (``unlabeled``), an unsigned array that holds its
    dtype's largest value: -1 saved as uint8 is 255, which would read as one more class and leave no
    row unlabeled. ``name`` (the file and array) heads the one-line ``DataError``."""
    if arr.dtype.kind == "u" and arr.size:
        top = int(arr.max())
        if unlabeled and top == np.iinfo(arr.dtype).max:
            raise DataError(
                f"{name} is {arr.dtype}, which cannot hold -1 (unlabeled): its {top} entries are most likely -1s "
                f"that wrapped round; save the labels as a signed integer (.astype(np.int64) before any cast to "
                f"{arr.dtype}; if {top} is a class, as a wider type)"
            )
        if top > np.iinfo(np.int64).max:
            raise DataError(f"{name} holds values beyond int64")
    labels = arr.astype(np.int64)
    if labels.size and int(labels.min()) < -1:
        raise DataError(f"{name} holds values below -1 (-1 marks unlabeled)")
    return labels
