"""Images from outside the training set: pools to score, probe sets, extra unlabeled data.

Three users share this module: ``llp-fast-select`` streams a large unlabeled *pool* through a
trained network, ``llp-fast-linear-probe`` feeds another labeled data set to a frozen one, and
``llp-fast-train --extra-unlabeled`` appends selected pool images to the training set
(paper §4 and Appendix B). All three must show the network its images exactly as training
did, so everything here converts images to the training source's *native* format -- the
uint8 tensors its own ``plain`` / ``_normalise`` turn into network input:

- an :class:`~llp_fast.data.arrays.ArraySource` keeps ``(C, src, src)`` uint8 images (C = 1
  or 3, ``src`` the stored side) and resamples them to the network's input size itself;
- a :class:`~llp_fast.data.folder.FolderSource` decodes each file to ``(3, S, S)`` with its
  evaluation crop (resize the short side, centre crop) at the network's input size S.

Pools (:func:`open_pool`) are read a batch at a time, never whole: ``npz:PATH`` streams the
``x`` member of the archive (compressed or not) row block by row block (one saved in Fortran
order is read whole: no row lies in one piece of it), a ``.npy`` file is
memory-mapped, and ``folder:PATH`` decodes the files (every image under PATH, recursively,
sorted) in a torch DataLoader.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
import zlib
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from .. import _optional
from .._checks import expand_spec, spec_hint
from .._npy import read_header, refuse_other
from . import DataError
from .files import image_files, skipped_note
from .folder import _Images
from .loading import load_batches
from .selection import read_selection
from .transforms import open_image

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


# -- the training source's native format ----------------------------------------------------
def native_format(source) -> tuple[str, int, int]:
    """``(kind, channels, side)`` of the uint8 images ``source`` turns into network input:
    ``("array", C, src_side)`` or ``("folder", 3, input_side)``."""
    if hasattr(source, "files"):
        return "folder", 3, int(source.image_size)
    h, w = getattr(source, "src_hw", (source.src_size, source.src_size))
    if h != w:  # the pools' images are centre-cropped to a square; training squashes its own
        raise DataError(
            f"the training data's images are {h} x {w} pixels; selecting, probing and --extra-unlabeled "
            "show pool images as training did only for square ones (crop or pad the data set square)"
        )
    return "array", int(source.in_channels), int(source.src_size)


def to_input(source, x_u8: torch.Tensor) -> torch.Tensor:
    """Network input for native-format uint8 images ``x_u8`` (B, C, H, W): the same resize and
    normalisation the training source applies to its own held-out images."""
    x_u8 = x_u8.to(source.device)
    if hasattr(source, "files"):
        return source._normalise(x_u8)
    return source.plain(x_u8)


def _center_square(x: torch.Tensor, keep: float = 1.0) -> torch.Tensor:
    """The centred square of side ``keep * min(H, W)`` of (B, C, H, W) images."""
    h, w = x.shape[-2:]
    s = max(1, round(min(h, w) * keep))
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top : top + s, left : left + s]


def adapt(x_u8: torch.Tensor, fmt: tuple[str, int, int]) -> torch.Tensor:
    """uint8 (B, C, H, W) images of any side and 1 or 3 channels -> native format ``fmt``.

    Channels: grey is repeated to RGB, RGB is reduced to luma. Size: the centred square (for a
    folder network above 64 px, the 1/1.14 centre crop its evaluation uses) resized with an
    antialiased bilinear filter, so a large image shrinks without aliasing."""
    kind, c, side = fmt
    if x_u8.dim() != 4 or x_u8.shape[1] not in (1, 3):
        raise DataError(f"images must be (B, 1 or 3, H, W), got {tuple(x_u8.shape)}")
    if x_u8.shape[1] != c:
        if c == 3:
            x_u8 = x_u8.expand(-1, 3, -1, -1)
        else:
            luma = torch.tensor(_LUMA).view(1, 3, 1, 1)
            x_u8 = (x_u8.float() * luma).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    keep = 1 / 1.14 if kind == "folder" and side > 64 else 1.0
    x_u8 = _center_square(x_u8, keep)
    if x_u8.shape[-1] == side:
        return x_u8.contiguous()
    x = F.interpolate(x_u8.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


# -- pools ------------------------------------------------------------------------------------
class NpzPool:
    """The ``x`` array (uint8 NxHxW or NxHxWxC) of an .npz archive, or a .npy file, read a block
    of rows at a time (an archive's ``x`` saved in Fortran order is read whole: its rows are not
    stored in one piece). ``y`` (optional, -1 = unknown) is the truth, for diagnostics only."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            raise DataError(f"{path}: a directory, not an .npz archive or .npy file")
        if not os.path.isfile(path):
            raise DataError(f"no such file: {path}")
        self.path = os.path.abspath(path)
        self.spec = f"npz:{self.path}"
        self.truth = None
        self.truth_ignored = None  # why the pool's own 'y' is not compared, where it has one that does not fit
        refuse_other(path, "an .npz archive or .npy array")
        try:
            if path.endswith(".npy"):
                self._rows = np.load(path, mmap_mode="r", allow_pickle=False)  # (rows sliced: mapped or in memory)
                shape, dtype, fortran = self._rows.shape, self._rows.dtype, False
            else:
                self._rows = None  # (an archive's x: streamed by _blocks)
                with zipfile.ZipFile(path) as zf:
                    names = zf.namelist()
                    if "x.npy" not in names:
                        raise DataError(f"{path} has no array 'x' (found {sorted(n[:-4] for n in names)})")
                    with zf.open("x.npy") as f:
                        shape, fortran, dtype = read_header(f, f"{path}: 'x'")
                if "y.npy" in names:
                    with np.load(path, allow_pickle=False) as f:
                        self.truth = np.asarray(f["y"])
        except DataError:
            raise
        except Exception as e:  # not a zip, a truncated archive, a pickled array
            raise DataError(f"cannot read {path} as an .npz archive or .npy array ({type(e).__name__})") from None
        if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
            raise DataError(f"{path}: 'x' must be uint8 NxHxW or NxHxWxC (C = 1 or 3), got {dtype} {shape}")
        if shape[0] == 0:
            raise DataError(f"{path}: 'x' holds no image")
        if fortran:  # (column-major: no row lies in one piece of the archive, so it cannot be streamed)
            try:
                with np.load(path, allow_pickle=False) as f:
                    self._rows = np.ascontiguousarray(f["x"])  # read whole, as the trainer's npz: reads it
            except Exception as e:  # a damaged member
                raise DataError(f"cannot read {path}: 'x' ({type(e).__name__}: {e})") from None
        fits = self.truth is not None and self.truth.ndim == 1 and self.truth.shape[0] == shape[0]
        if self.truth is not None and (not fits or self.truth.dtype.kind not in "iu"):
            # a label array that does not fit is ignored (it is only a diagnostic), and said so
            self.truth_ignored = f"'y' of {self.truth.dtype} {self.truth.shape} is not one integer label per image"
            self.truth = None
        self.shape = tuple(int(s) for s in shape)
        self.paths = None

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int, fmt, indices=None):
        """``(uint8 images in format fmt, pool indices)``: every row in order, or only the sorted
        ``indices``; at most ``batch_size`` decoded rows in memory."""
        want = None if indices is None else np.asarray(indices, dtype=np.int64)
        for start, block in self._blocks(batch_size):
            ids = np.arange(start, start + block.shape[0])
            if want is not None:
                lo, hi = np.searchsorted(want, [start, start + block.shape[0]])
                if lo == hi:
                    continue
                ids = want[lo:hi]
                block = block[ids - start]
            yield adapt(_to_nchw(block), fmt), torch.from_numpy(ids)

    def _blocks(self, batch_size: int):
        n = self.shape[0]
        if self._rows is not None:
            for s in range(0, n, batch_size):
                yield s, np.array(self._rows[s : s + batch_size])
            return
        row = math.prod(self.shape[1:])
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open("x.npy") as f:
                read_header(f, f"{self.path}: 'x'")
                for s in range(0, n, batch_size):
                    b = min(batch_size, n - s)
                    buf = f.read(b * row)
                    if len(buf) != b * row:
                        raise DataError(f"{self.path}: 'x' is truncated at row {s}")
                    yield s, np.frombuffer(buf, dtype=np.uint8).reshape((b,) + self.shape[1:]).copy()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:  # zlib: damaged
            raise DataError(f"cannot read {self.path} ({type(e).__name__}: {e})") from None


class _Decoded(torch.utils.data.Dataset):
    """(uint8 image in native format, position) for an array network: decoded as RGB, then
    :func:`adapt`, as an ``npz:`` pool's arrays are (PIL's own resize works in 8-bit fixed point:
    the same images as files and as arrays selected differently)."""

    def __init__(self, files, fmt):
        self.files, self.fmt = files, fmt

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        arr = np.asarray(open_image(self.files[i], "RGB"), dtype=np.uint8)
        return adapt(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None], self.fmt)[0], i


class FilesPool:
    """Image files decoded in a DataLoader; ``paths`` in pool-index order."""

    def __init__(self, paths, spec: str, truth=None, workers: int = 2):
        _optional.need("PIL.Image", "data", "decoding image files")
        self.paths = list(paths)
        self.spec = spec
        self.truth = truth
        self.workers = int(workers)

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int, fmt, indices=None):
        ids = list(range(len(self.paths))) if indices is None else [int(i) for i in indices]
        if fmt[0] == "folder":  # exactly the training source's evaluation decode
            dataset, keys = _Images(self.paths, fmt[2], 1.0, False), [(i, -1) for i in ids]
        else:
            dataset, keys = _Decoded(self.paths, fmt), ids
        batches = [keys[s : s + batch_size] for s in range(0, len(keys), batch_size)]
        # its own generator: torch's global one stays untouched
        for x, i in load_batches(dataset, batches, self.workers, generator=torch.Generator()):
            yield x, i.long()


def open_pool(spec: str, workers: int = 2):
    """An unlabeled pool: ``npz:PATH`` (or a .npy) or ``folder:PATH`` (any tree of images)."""
    spec = expand_spec(spec)  # (a shell leaves npz:~/x and folder:~/x as they are)
    if spec.startswith("npz:"):
        return NpzPool(spec[4:])
    if spec.startswith("folder:"):
        root = spec[len("folder:") :]
        if not os.path.isdir(root):
            raise DataError(f"folder:{root}: no such directory")
        skipped: Counter = Counter()
        paths = image_files(root, skipped)  # any tree of images, hidden entries skipped
        note = skipped_note(skipped)  # (files passed over were not said: a .heic pool scored its .jpg alone)
        if not paths:
            raise DataError(f"folder:{root}: no images found" + (f" ({note})" if note else ""))
        pool = FilesPool([os.path.abspath(p) for p in paths], f"folder:{os.path.abspath(root)}", workers=workers)
        pool.skipped = note
        return pool
    raise DataError(f"unknown pool {spec!r}: expected npz:PATH or folder:PATH{spec_hint(spec, ('.npz', '.npy'))}")


# -- llp-fast-train --extra-unlabeled ------------------------------------------------------------
def _real_paths():
    """``realpath`` of files by resolving each folder once (a realpath of each of 1.28M files took
    about 38 s at every start; the folders are a few thousand), and a file that is itself a link
    (one ``lstat`` a file: a split made of links into one folder let held-out images train)."""
    folders: dict[str, str] = {}

    def real(path: str) -> str:
        head, tail = os.path.split(path)
        if head not in folders:
            folders[head] = os.path.realpath(head)
        full = os.path.join(folders[head], tail)
        return os.path.realpath(full) if os.path.islink(full) else full

    return real


def _row_digests(x: torch.Tensor, chunk: int = 4096) -> list[bytes]:
    """A digest of each image's bytes (rows of uint8 ``x``, on any device, copied to the host a
    chunk at a time): equal images, equal digests."""
    out = []
    for s in range(0, x.shape[0], chunk):
        block = x[s : s + chunk].cpu().contiguous().numpy().reshape(min(chunk, x.shape[0] - s), -1)
        out += [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in block]
    return out


def add_extra_unlabeled(source, selection_path: str, batch_size: int = 256) -> int:
    """Appends the images of a selection (``llp-fast-select``'s output) to ``source`` as unlabeled
    training examples, after the original ones: dataset indices ``[num_train, num_train + E)``.
    An image selected for several classes is added once. Their truth is the pool's ``y`` where
    the pool has one (pseudo-label diagnostics), else unknown. Returns E. A selected held-out
    image of the data is refused, and ``source.extra_twice`` counts the selected training images
    (folder data: by file; array data: by the images' bytes)."""
    sel = read_selection(selection_path)
    fmt = native_format(source)
    keep = np.unique(sel["index"])
    if keep.size == 0:
        return 0
    pool_spec = sel["meta"]["source"]
    if fmt[0] == "folder":
        if sel.get("path") is None:
            raise DataError(
                f"--extra-unlabeled {selection_path}: selected from {pool_spec}, but folder training data "
                "takes extra images from a folder: pool only"
            )
        first = {}
        for i, p in zip(sel["index"].tolist(), sel["path"].tolist()):
            first.setdefault(i, p)
        paths = [first[int(i)] for i in keep]
        missing = next((p for p in paths if not os.path.isfile(p)), None)
        if missing is not None:
            raise DataError(f"--extra-unlabeled {selection_path}: selected image {missing} no longer exists")
        # A pool at or above the data's folder holds its images: a held-out one trained on leaks the
        # test (refused); a training one trains twice an epoch (counted: kept, so that a run saved
        # before this check resumes with its rows). Both were taken without a word.
        real = _real_paths()
        held_out = {real(p) for p in getattr(source, "test_files", ())}
        leak = next((p for p in paths if real(p) in held_out), None)
        if leak is not None:
            raise DataError(
                f"--extra-unlabeled {selection_path}: selected image {leak} is a held-out image of the run's data "
                "(training on it would leak the test): select from a pool without the data's test images"
            )
        training = {real(p) for p in getattr(source, "files", ())}
        source.extra_twice = sum(real(p) in training for p in paths)
        source.extra_note = source.add_files(paths)
        truth = np.full(len(paths), -1, dtype=np.int64)
    else:
        if sel.get("path") is not None:
            for p in sel["path"].tolist():
                if not os.path.isfile(p):
                    raise DataError(f"--extra-unlabeled {selection_path}: selected image {p} no longer exists")
            where = dict(zip(sel["index"].tolist(), sel["path"].tolist()))
            pool = FilesPool([where[int(i)] for i in keep], pool_spec, workers=0)
            chunks = [x for x, _ in pool.batches(batch_size, fmt)]
        else:
            try:
                pool = open_pool(pool_spec)
            except DataError as e:  # (it said "no such file: POOL", a file the user had not named)
                raise DataError(f"--extra-unlabeled {selection_path}: the pool it was selected from: {e}") from None
            if int(keep[-1]) >= len(pool):
                raise DataError(f"--extra-unlabeled {selection_path}: index {int(keep[-1])} is outside {pool_spec}")
            chunks = [x for x, _ in pool.batches(batch_size, fmt, indices=keep)]
        x = torch.cat(chunks).to(source.device)
        # As for folders: a pool whose rows are the data's held-out images leaks the test (refused);
        # its training images train twice an epoch (counted). Both were taken without a word.
        held_out, extra = set(_row_digests(source.x_test)), _row_digests(x)
        leak = next((int(i) for i, d in zip(keep, extra) if d in held_out), None)
        if leak is not None:
            raise DataError(
                f"--extra-unlabeled {selection_path}: selected row {leak} of {pool_spec} is a held-out image of the "
                "run's data (training on it would leak the test): select from a pool without the data's test images"
            )
        training = set(_row_digests(source.x))
        source.extra_twice = sum(d in training for d in extra)
        source.x = torch.cat([source.x, x])
        truth = np.full(len(keep), -1, dtype=np.int64)
        pool_truth = getattr(pool, "truth", None)
        if pool_truth is not None:
            t = np.asarray(pool_truth, dtype=np.int64)[keep]
            truth = np.where((t >= 0) & (t < source.num_classes), t, -1)
    e = len(truth)
    source.targets = torch.cat([source.targets, torch.full((e,), -1, dtype=source.targets.dtype)])
    source.truth = torch.cat([source.truth, torch.from_numpy(truth).to(source.truth.dtype)])
    source.num_train += e
    source.num_extra = e
    return e
