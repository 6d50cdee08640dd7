"""Where the embeddings and labels come from: an array in memory, one ``.npy`` file, or a directory
of ``.npy`` shards taken in name order, numbers by value (``part2`` before ``part10``).

A file is read block by block through a memory map that is opened for the block and dropped after
it, so the pages of a file larger than memory never pile up in the process's resident set: what a
pass holds is one block (plus what the caller keeps). Rows come out as torch tensors in the compute
dtype (float32; float64 when the stored data are float64), optionally L2-normalised, checked for
NaN/Inf.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from .. import _validate as check
from .._labels import int64_labels
from .._npy import read_header
from ..errors import DataError

FLOAT_KINDS = (np.float16, np.float32, np.float64)
TAKE_ROWS = 1024  # rows read through one short-lived map (_File.take)


def _header(path: str):
    """(shape, fortran_order, dtype, data offset) of a .npy file, from its header alone."""
    with open(path, "rb") as f:
        shape, fortran, dtype = read_header(f, path)
        return shape, fortran, dtype, f.tell()


class _File:
    """One .npy file: its shape and dtype, and rows read through a short-lived memory map."""

    def __init__(self, path: str, what: str):
        if not os.path.exists(path):
            raise DataError(f"{what} {path}: no such file")
        if not os.path.isfile(path):
            raise DataError(f"{what} {path}: not a file")
        self.path = path
        self.shape, fortran, self.dtype, self.offset = _header(path)
        if self.dtype.hasobject:
            raise DataError(f"{what} {path}: holds Python objects; expected a numeric array")
        self.fortran = fortran
        if any(not isinstance(side, int) or side < 0 for side in self.shape):
            raise DataError(f"{what} {path}: not a .npy file (the header's shape is {self.shape})")
        need = self.offset + math.prod(self.shape) * self.dtype.itemsize  # Python ints: no wrap-around
        if os.path.getsize(path) < need:
            raise DataError(f"{what} {path}: truncated ({os.path.getsize(path)} bytes, the header says {need})")

    def read(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.empty((0, *self.shape[1:]), self.dtype)
        mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        try:
            return np.array(mm[a:b])
        finally:
            del mm

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at ``rows`` (sorted, distinct), mapped ``TAKE_ROWS`` of them at a time: each
        page the copy touches brings its neighbours into the map too (the kernel's fault-around, up
        to 64 KB a fault), so one map over rows scattered through a large file held a large part of
        it resident at once (docs/embeddings.md, "Cost of the default")."""
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        order = "F" if self.fortran else "C"
        for a in range(0, len(rows), TAKE_ROWS):
            mm = np.memmap(self.path, self.dtype, "r", offset=self.offset, shape=self.shape, order=order)
            try:
                out[a : a + TAKE_ROWS] = mm[rows[a : a + TAKE_ROWS]]
            finally:
                del mm
        return out


def shard_order(name: str) -> tuple:
    """A shard's place: its name with each run of digits read as a number, so that ``part2`` comes
    before ``part10`` (plain name order put ``part10`` and ``part11`` first, and the rows then no
    longer matched the labels: wrong labels, exit 0); zero-padded names keep their name order."""
    stem = name[: -len(".npy")] if name.endswith(".npy") else name  # ("emb.npy" before "emb1.npy", as ls -v)
    return [int(t) if t.isascii() and t.isdigit() else t for t in re.split(r"([0-9]+)", stem)], name


def _paths(path: str, what: str) -> list[str]:
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if n.endswith(".npy") and not n.startswith(".")), key=shard_order)
        if not names:
            raise DataError(f"{what} {path}: a directory without .npy shards")
        return [os.path.join(path, n) for n in names]
    return [path]


class Rows:
    """Read access to N rows of a (N, D) float matrix held in memory or in .npy files.

    Args:
        data: a NumPy array or torch tensor (N, D), a .npy path, or a directory of .npy shards
            (taken in name order, numbers by value: ``part2`` before ``part10``; concatenated along
            the rows). A tensor is read where it is (a
            CUDA tensor's blocks stay on its GPU): no copy of the whole matrix is made.
        normalize: L2-normalise every row as it is read.
    """

    def __init__(self, data, *, normalize: bool = True, what: str = "embeddings"):
        self.normalize = normalize
        self.what = what
        self.source = os.fspath(data) if isinstance(data, (str, os.PathLike)) else None
        self.files: list[_File] = []
        self.array = None
        self.tensor = None
        self.device = torch.device("cpu")
        if isinstance(data, (str, os.PathLike)):
            self.files = [_File(p, what) for p in _paths(os.fspath(data), what)]
            for f in self.files:
                if len(f.shape) != 2 or f.dtype.type not in FLOAT_KINDS:
                    raise DataError(
                        f"{what} {f.path}: expected a 2-D float16, float32 or float64 array (N, D), "
                        f"got {f.dtype} {f.shape}"
                    )
            dims = {f.shape[1] for f in self.files}
            if len(dims) != 1:
                raise DataError(f"{what} {data}: shards have different widths D {sorted(dims)}")
            self.dim = dims.pop()
            self.starts = np.cumsum([0] + [f.shape[0] for f in self.files])
            self.n = int(self.starts[-1])
            wide = any(f.dtype.type is np.float64 for f in self.files)  # either byte order
        elif isinstance(data, torch.Tensor):
            check.on_a_real_device(data, what)  # (Tensor.item()'s RuntimeError)
            if data.dim() != 2 or not data.is_floating_point():
                raise DataError(
                    f"{what}: expected a 2-D floating-point tensor (N, D), got {data.dtype} {tuple(data.shape)}"
                )
            self.tensor = data.detach()
            self.device = data.device
            self.n, self.dim = data.shape
            wide = data.dtype == torch.float64
        else:
            arr = np.asarray(data)
            if arr.ndim != 2 or arr.dtype.type not in FLOAT_KINDS:
                raise DataError(
                    f"{what}: expected a 2-D float16, float32 or float64 array (N, D), got {arr.dtype} {arr.shape}"
                )
            self.array = arr
            self.n, self.dim = arr.shape
            wide = arr.dtype.type is np.float64
        if self.dim == 0:
            raise DataError(f"{self._name()}: rows have no columns (D = 0)")
        self.dtype = torch.float64 if wide else torch.float32
        self.max_norm: float | None = None  # (expect_tau)
        self.tau: float | None = None

    def expect_tau(self, tau: float) -> None:
        """Scores ``x . m / tau`` will be computed between these rows: unnormalised, each row read
        from now on must keep them inside the compute dtype (``|x . m| <= |x| |m|``, with the ops'
        room of 4x), else a :class:`DataError` names it. (The ops' own check is skipped on the
        streamed blocks; huge rows gave NaN confidences or a traceback from deep inside a run.)"""
        limit = math.sqrt(torch.finfo(self.dtype).max / 4 * tau)
        if self.max_norm is None or limit < self.max_norm:
            self.max_norm, self.tau = limit, tau

    def _name(self) -> str:
        return self.what if self.source is None else f"{self.what} {self.source}"

    def _file_of(self, row: int) -> str:
        """The file that holds global row ``row`` (for messages)."""
        if self.source is None:
            return self.what
        i = int(np.searchsorted(self.starts, row, side="right")) - 1
        return f"{self.what} {self.files[i].path}"

    def _raw(self, a: int, b: int):
        if self.tensor is not None:
            return self.tensor[a:b]
        if self.array is not None:
            return self.array[a:b]
        parts = []
        for f, s in zip(self.files, self.starts[:-1]):
            lo, hi = max(a, s), min(b, s + f.shape[0])
            if lo < hi:
                parts.append(f.read(lo - s, hi - s))
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty((0, self.dim))

    def _tensor(self, x: np.ndarray, rows) -> torch.Tensor:
        """``x`` in the compute dtype, checked and normalised; ``rows[i]`` is the global index of
        ``x[i]`` (for messages)."""
        if isinstance(x, torch.Tensor):
            t = x.to(self.dtype, copy=True)
        else:
            x = np.ascontiguousarray(x, dtype=np.float64 if self.dtype == torch.float64 else np.float32)
            t = torch.from_numpy(x if x.flags.writeable else x.copy())
        if t.numel() == 0:
            return t
        # One reduction serves the NaN/Inf check and the normalisation (F.normalize's arithmetic): a
        # row with NaN or Inf has a non-finite norm (and sum); only then is the block checked entry by
        # entry, so that a huge but finite row is not mistaken for a bad one.
        sized = self.normalize or self.max_norm is not None
        norm = t.norm(2, dim=1, keepdim=True) if sized else t.sum(dim=1, keepdim=True)
        if not bool(torch.isfinite(norm).all()):
            bad = ~torch.isfinite(t).all(dim=1)
            if bool(bad.any()):
                row = int(rows[int(torch.nonzero(bad)[0, 0])])
                raise DataError(f"{self._file_of(row)}: row {row} contains NaN or Inf")
            # finite rows whose norm overflows: scale them by their largest entry first
            over = ~torch.isfinite(norm[:, 0])
            big = t[over].abs().amax(dim=1, keepdim=True)
            norm[over] = big * (t[over] / big).norm(2, dim=1, keepdim=True)
        if self.normalize:
            # rows whose norm is tiny or underflows: by their largest entry first too (F.normalize's
            # floor of 1e-12 left them shorter than 1, and the density term swamped their scores)
            small = (norm[:, 0] < 1e-12) & (t != 0).any(dim=1)
            if bool(small.any()):
                big = t[small].abs().amax(dim=1, keepdim=True)
                norm[small] = big * (t[small] / big).norm(2, dim=1, keepdim=True)
            return t / torch.where(norm > 0, norm, torch.ones_like(norm)).expand_as(t)  # (a zero row stays 0)
        if self.max_norm is not None and not bool((norm <= self.max_norm).all()):
            i = int(torch.nonzero(~(norm[:, 0] <= self.max_norm))[0, 0])
            row, size = int(rows[i]), float(t[i].double().norm())
            dtype = str(self.dtype).removeprefix("torch.")
            raise DataError(
                f"{self._file_of(row)}: row {row} has norm {size:.3g}, so scores x . m / tau may reach "
                f"{size * size / self.tau:.3g} (tau = {self.tau:.3g}), beyond {dtype}: scale the rows down, "
                "raise tau, or let them be normalised"
            )
        return t

    def read(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as a (b - a, D) tensor (a fresh copy)."""
        return self._tensor(self._raw(a, b), range(a, b))

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """The rows at the given (sorted, distinct) indices, as a (len(rows), D) tensor."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.tensor is not None:
            raw = self.tensor[torch.from_numpy(rows).to(self.device)]
        elif self.array is not None:
            raw = self.array[rows]
        else:
            parts = []
            for f, s in zip(self.files, self.starts[:-1]):
                lo, hi = np.searchsorted(rows, [s, s + f.shape[0]])
                if lo < hi:
                    parts.append(f.take(rows[lo:hi] - s))
            raw = np.concatenate(parts) if parts else np.empty((0, self.dim))
        return self._tensor(raw, rows)

    def blocks(self, chunk: int, lo: int = 0, hi: int | None = None):
        """Yields ``(a, b)`` row ranges of at most ``chunk`` rows covering [lo, hi)."""
        hi = self.n if hi is None else hi
        for a in range(lo, hi, chunk):
            yield a, min(hi, a + chunk)


def read_labels(data, n: int | None = None) -> np.ndarray:
    """(N,) int64 labels from an array, a .npy file or a directory of shards; -1 marks unlabeled."""
    if isinstance(data, (str, os.PathLike)):
        files = [_File(p, "labels") for p in _paths(os.fspath(data), "labels")]
        for f in files:
            if len(f.shape) != 1 or f.dtype.kind not in "iu":
                hint = " (save whole-number labels as integers: np.save(PATH, y.astype(np.int64)))"
                hint = hint if len(f.shape) == 1 and f.dtype.kind == "f" else ""
                raise DataError(f"labels {f.path}: expected a 1-D integer array (N,), got {f.dtype} {f.shape}{hint}")
        # Each shard to int64 on its own: concatenating int64 with uint64 would go through float64.
        parts = [int64_labels(f.read(0, f.shape[0]), f"labels {f.path}") for f in files]
        labels = np.concatenate(parts) if parts else np.empty(0, np.int64)
        name = f"labels {os.fspath(data)}"
    else:
        if isinstance(data, torch.Tensor):
            check.on_a_real_device(data, "labels")  # (a copy's NotImplementedError)
        arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"labels: expected a 1-D integer array (N,), got {arr.dtype} {arr.shape}")
        labels, name = int64_labels(arr, "labels"), "labels"
    if n is not None and labels.shape[0] != n:
        raise DataError(f"{name}: expected {n} entries (one per embedding), got {labels.shape[0]}")
    return labels
