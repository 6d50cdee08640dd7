"""The one ``.npy`` header reader: the shape, order and dtype of a ``.npy`` array from its header
alone, for the readers that stream a file block by block (``embeddings/sources.py``) or read one
out of an ``.npz`` archive (``data/extra.py``). A garbled header is one ``DataError``. And
:func:`refuse_other`: a file that is neither (NumPy read it as a pickle, and said so)."""

from __future__ import annotations

import tokenize

import numpy as np

from .errors import DataError

# What NumPy's header parser raises on a garbled header: its own checks, a short read, and what
# Python's tokenizer and literal_eval raise on the header's dict.
_GARBLED = (ValueError, EOFError, SyntaxError, TypeError, OverflowError, RecursionError, tokenize.TokenError)


def read_header(f, name: str) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) from the ``.npy`` header at ``f``'s position (an open binary
    file), leaving ``f`` at the first data byte. ``name`` (the file, or archive member) heads the
    ``DataError`` for a file that is not a ``.npy`` array."""
    start = f.tell()
    if f.read(4) == b"PK\x03\x04":  # a zip: an .npz archive (the magic string's error said only "PK\x03\x04")
        raise DataError(f"{name}: an .npz archive, not a .npy array (save the array with np.save)")
    f.seek(start)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)
    except _GARBLED as e:
        raise DataError(f"{name}: not a .npy file ({type(e).__name__}: {e})") from None


def refuse_other(path: str, what: str) -> None:
    """A ``DataError`` where ``path`` is neither an .npz archive (a zip) nor a .npy array by its first
    bytes: ``np.load`` reads anything else as a pickle, and a text file read "This file contains
    pickled (object) data" (``what``: the kinds the caller reads, for the message)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return  # (the caller's own read says why)
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        raise DataError(f"{path} is not {what} (its first bytes are {head!r})")
