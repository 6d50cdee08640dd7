"""A ``folder:`` tree's files, before any is decoded for training: which files are images, the
``train/`` + ``test/`` layout, the classes and their files, ``labeled.txt``, the training files'
fingerprint, and whether an image is grey (:mod:`llp_fast.data.folder` reads them; ``extra.py``
lists ``--extra-unlabeled`` folders with :func:`image_files`)."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections import Counter

import numpy as np

from . import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_files(root: str, skipped: Counter | None = None) -> list[str]:
    """Every image file under ``root``, recursively, sorted (a folder's files, then its subfolders
    in turn); hidden folders and files (``.thumbnails/``, macOS's ``._name.jpg``) skipped, and so
    is anything named like an image that is not a file (a FIFO, a socket: opening one waited
    forever). A link that leads nowhere is kept, so that reading it names it. A linked folder is not
    followed (it could read the same images twice, or another class's into this one), but counted.
    ``skipped`` counts the other files passed over, by lower-case extension (``.heic`` photos were
    dropped without a word), and the linked folders under :data:`LINKED` (:func:`skipped_note`)."""
    out = []
    with os.scandir(root) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            continue
        if e.is_symlink() and e.is_dir():  # (dropped without a word)
            if skipped is not None:
                skipped[LINKED] += 1
            continue
        if not e.name.lower().endswith(IMAGE_EXTENSIONS):
            if skipped is not None and e.is_file():
                skipped[os.path.splitext(e.name)[1].lower() or "(no extension)"] += 1
            continue
        if e.is_file() or not os.path.exists(e.path):  # (is_file: the entry's type, no stat for plain files)
            out.append(e.path)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            out += image_files(e.path, skipped)
    return out


LINKED = "(linked folder)"  # skipped's key for the linked folders not followed
LOOSE = "(beside the class folders)"  # and for images in no class folder


def skipped_note(skipped: Counter) -> str | None:
    """What to say of the files that are not read as images (None when there are none): how many,
    by extension, most first, and which extensions are read; and how many linked folders were not
    followed."""
    links, loose = skipped.get(LINKED, 0), skipped.get(LOOSE, 0)
    files = {ext: n for ext, n in skipped.items() if ext not in (LINKED, LOOSE) and n}
    parts = []
    if loose:
        parts.append(
            f"{loose:,} image{' lies' if loose == 1 else 's lie'} beside the class folders, in none of them: not read "
            "(each class is a subfolder)"
        )
    if files:
        kinds = ", ".join(f"{n:,} {ext}" for ext, n in sorted(files.items(), key=lambda t: (-t[1], t[0]))[:5])
        more, n = ", ..." if len(files) > 5 else "", sum(files.values())
        parts.append(
            f"{n:,} {'file is' if n == 1 else 'files are'} not read as images ({kinds}{more}); "
            f"the images read end in {', '.join(IMAGE_EXTENSIONS)} (convert the others to one of them)"
        )
    if links:
        parts.append(
            f"{links:,} linked folder{' is' if links == 1 else 's are'} not followed (a link could read images "
            "twice, or another class's): move or copy the images into the class folder"
        )
    return "; ".join(parts) or None


TRAIN_NAMES = ("train", "training")
HELD_OUT_NAMES = ("test", "testing", "val", "valid", "validation")  # in this order of preference


def split_layout(root: str) -> tuple[str, str | None]:
    """(training root, held-out root or None) of a folder tree. ``PATH/train/`` (any case, or
    ``training``) holding class folders is the split layout, with the first held-out folder
    beside it (``test``, ``val``, ... any case, in that order of preference) as the held-out split;
    other folders beside them are not read, as before. Otherwise the top-level folders are the
    classes: a ``train/`` of images (a vehicles set's ``bus``, ``car`` and ``train``) is one class
    among them. (``Train/`` beside ``Test/`` had trained "Test" against "Train" as two classes,
    and the vehicles set had lost ``bus`` and ``car``.)"""
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    train = [f for f in folders if f.lower() in TRAIN_NAMES]
    held = sorted((f for f in folders if f.lower() in HELD_OUT_NAMES), key=lambda f: HELD_OUT_NAMES.index(f.lower()))
    if len(train) == 1:
        path = os.path.join(root, train[0])
        with os.scandir(path) as it:
            has_classes = any(e.is_dir() and not e.name.startswith(".") for e in it)
        if has_classes:
            return path, os.path.join(root, held[0]) if held else None
    return root, None


def files_fingerprint(root: str, train: list[str]) -> str:
    """A digest of the training files' paths under ``root`` (a checkpoint keeps it: a resume over
    renamed, added or removed training images trained other images under the saved rows, without a
    word). Names only: no file is read or stat'ed. The held-out files of a ``test/`` folder are not
    in it: a corrupt one taken out leaves the training state as it was."""
    h, prefix = hashlib.sha256(), os.path.join(root, "")
    for path in train:  # (the files are joined under root: relpath on each took ~9 s per 1.28M)
        name = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, root)
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def scan(root: str, skipped: Counter | None = None):
    """(class names, their image files, each file's class) of a tree of class folders; images lying
    beside the class folders belong to none and are counted in ``skipped`` (:data:`LOOSE`)."""
    with os.scandir(root) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    classes = sorted(e.name for e in entries if e.is_dir())
    loose = sum(1 for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
    if skipped is not None and loose:  # (they were passed over without a word)
        skipped[LOOSE] += loose
    files, labels = [], []
    for c, name in enumerate(classes):
        found = image_files(os.path.join(root, name), skipped)
        files += found
        labels += [c] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def read_labeled(path: str, root: str, files: list[str]) -> np.ndarray:
    """The labeled mask from ``labeled.txt``; :class:`DataError` on any bad line."""
    # Names compared in Unicode's composed form (NFC): macOS stores "café" decomposed, an editor
    # types it composed, and the two, alike on screen, were "not an image".
    where = {_nfc(os.path.normpath(os.path.relpath(f, root))): i for i, f in enumerate(files)}
    mask = np.zeros(len(files), dtype=bool)
    try:
        with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark made line 1 "not an image")
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise DataError(f"cannot read label file {path}: not UTF-8 text (save it as UTF-8)") from None
    except OSError as e:
        raise DataError(f"cannot read label file {path} ({type(e).__name__})") from None
    for n, line in enumerate(lines, 1):
        # "#" starts a comment, unless the whole line names an image ("photo #1.png" was cut at "#")
        whole = line.strip()
        line = whole if _nfc(os.path.normpath(whole or ".")) in where else line.split("#", 1)[0].strip()
        if not line:
            continue
        key = _nfc(os.path.normpath(line))
        if key not in where:
            raise DataError(f"bad label file {path}, line {n}: {line!r} is not an image under {root}")
        mask[where[key]] = True
    if not mask.any():
        raise DataError(f"bad label file {path}: it lists no image")
    return mask


GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"}  # PIL's modes of one grey channel


def equal_channels(im) -> bool:
    """Whether an RGB(A) or palette image's colour channels are equal, to JPEG's rounding (a grey
    picture saved in colour), on a copy of at most 64 px a side (a JPEG decodes at that scale)."""
    if im.mode not in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"):
        return False
    im.draft("RGB", (64, 64))
    small = im.convert("RGB")
    small.thumbnail((64, 64))
    a = np.asarray(small, dtype=np.int16)
    return int(np.abs(a[..., 1:] - a[..., :1]).max()) <= 2


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)
