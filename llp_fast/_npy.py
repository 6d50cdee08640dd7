"""The one ``.npy`` header reader: the shape, order and dtype of a ``.npy`` array from its header
alone, for the readers that stream a file block by block (``embeddings/sources.py``) or read one
out of an ``.npz`` archive (``data/extra.py``). A garbled header is one ``DataError``."""

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
