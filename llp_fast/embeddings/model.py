"""A saved labeller: the last round's voters and the settings, to label new rows later without the
rows it was fitted on (``llp-fast-propagate --save-model DIR`` / ``--model DIR``; the estimator's
``predict`` votes the same way).

``DIR/model.npz`` holds plain arrays (``np.load(path)`` reads it; nothing needs pickle):

- ``voters`` (V, D) the voters' unit rows (float32; float64 for float64 embeddings), in the order
  they joined; ``voter_classes`` (V,) int64, indices into ``classes``; ``voter_bias`` (V,) their
  ``b_i = log_rho_i - log w_i`` (docs/method.md §7.1; zeros without density weighting and weight);
- ``classes`` (C,) int64, the label values;
- ``settings``: a JSON string (``str(np.load(path)["settings"])``): ``k``, ``tau``, ``normalize``,
  ``min_confidence`` (None: never abstain) and ``format``.

A new row is labeled as a row still voted on in the last round is: the vote of its K best voters by
``x . m_i / tau - b_i`` (docs/method.md §1.2). The file is written to a temporary name and moved into
place when complete (a reader sees the previous model or the new one). Memory when labelling: the
voters, one block of new rows, and the (N,) outputs.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from .._files import atomic_path
from .._topk import vote
from ..errors import DataError
from ..ops import neighbours
from .sources import Rows

FORMAT = 1
FILE = "model.npz"
_ARRAYS = ("voters", "voter_classes", "voter_bias", "classes", "settings")


@dataclass
class Model:
    """Voters (V, D) tensor, their classes (V,) int64 (indices into ``classes``), ``bias`` (V,)
    ``b_i`` or None, the label values ``classes`` (C,), and how to vote: ``k``, ``tau``,
    ``normalize`` (of new rows), ``min_confidence`` (None: never abstain)."""

    voters: torch.Tensor
    voter_classes: np.ndarray
    bias: np.ndarray | None
    classes: np.ndarray
    k: int
    tau: float
    normalize: bool = True
    min_confidence: float | None = None

    def votes(self, rows: Rows, *, chunk: int = 65536, device=None, progress=None):
        """For each block [a, b) of ``rows``: ``(a, b, values, classes)``, the scores of each row's K
        best voters (sorted descending) and their class indices."""
        device = torch.device(device or self.voters.device)
        dtype = torch.float64 if torch.float64 in (self.voters.dtype, rows.dtype) else torch.float32
        voters = self.voters.to(device, dtype)
        bias = None if self.bias is None else torch.from_numpy(self.bias).to(device, dtype)
        classes = torch.from_numpy(self.voter_classes).to(device)
        k = min(self.k, voters.shape[0])
        bar = progress.bar(rows.n, "label", unit="rows") if progress is not None else None
        for a, b in rows.blocks(chunk):
            top = neighbours(rows.read(a, b).to(device, dtype), voters, bias, k=k, tau=self.tau)
            yield a, b, top.values, classes[top.indices]
            if bar is not None:
                bar.update(b - a)
        if bar is not None:
            bar.close()

    def label(self, rows: Rows, *, chunk: int = 65536, device=None, progress=None, min_confidence="model"):
        """(labels (N,) int64 indices into ``classes``, -1 where the confidence is below
        ``min_confidence``; confidence (N,) float32) for every row of ``rows``. ``min_confidence``
        defaults to the model's."""
        threshold = self.min_confidence if min_confidence == "model" else min_confidence
        labels = np.empty(rows.n, np.int64)
        conf = np.empty(rows.n, np.float32)
        for a, b, values, cls in self.votes(rows, chunk=chunk, device=device, progress=progress):
            lab, c = vote(values, cls, len(self.classes))
            labels[a:b], conf[a:b] = lab.cpu().numpy(), c.float().cpu().numpy()
        if threshold is not None:
            labels[conf < threshold] = -1
        return labels, conf


def settings_json(model: Model) -> str:
    return json.dumps(
        {
            "format": FORMAT,
            "k": int(model.k),
            "tau": float(model.tau),
            "normalize": bool(model.normalize),
            "min_confidence": None if model.min_confidence is None else float(model.min_confidence),
        }
    )


def _write_array(zf: zipfile.ZipFile, name: str, blocks, shape: tuple, dtype) -> None:
    """One ``.npy`` member written block by block (the voters need not be in memory at once)."""
    dtype = np.dtype(dtype)
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(f, header)
        for block in blocks:
            f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())


def save(directory: str, rows: Rows, result, *, k: int, tau: float, normalize: bool, min_confidence=None) -> str:
    """Writes ``directory/model.npz`` from an engine ``Result`` (its voters read back from ``rows``,
    block by block) and the vote's settings. Creates ``directory`` if its parent exists. Returns
    the file's path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FILE)
    v_rows = np.asarray(result.voter_rows, dtype=np.int64)
    step = 65536

    def blocks():
        for s in range(0, len(v_rows), step):
            part = v_rows[s : s + step]
            order = np.argsort(part, kind="stable")
            x = rows.take(part[order]).numpy()  # take() wants rows ascending
            out = np.empty_like(x)
            out[order] = x
            yield out

    dtype = np.float64 if rows.dtype == torch.float64 else np.float32
    bias = np.zeros(len(v_rows), dtype) if result.voter_bias is None else np.asarray(result.voter_bias, dtype)
    meta = Model(torch.empty(0), result.voter_classes, None, result.classes, k, tau, normalize, min_confidence)
    with atomic_path(path, suffix=".npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_array(zf, "voters", blocks(), (len(v_rows), rows.dim), dtype)
        for name, arr in (
            ("voter_classes", np.asarray(result.voter_classes, np.int64)),
            ("voter_bias", bias),
            ("classes", np.asarray(result.classes, np.int64)),
            ("settings", np.array(settings_json(meta))),
        ):
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    return path


def load(directory: str, *, device=None) -> Model:
    """The model in ``directory`` (or a ``model.npz`` path); :class:`DataError` naming what is wrong."""
    path = directory if directory.endswith(".npz") else os.path.join(directory, FILE)
    if not os.path.isfile(path):
        raise DataError(f"model {directory}: no {FILE} there (write one with --save-model)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in _ARRAYS if a not in z.files]
            if missing:
                raise DataError(f"model {path}: not a saved model (no {', '.join(missing)})")
            arrays = {a: z[a] for a in _ARRAYS}
        settings = json.loads(str(arrays["settings"]))
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"model {path}: unreadable ({type(e).__name__}: {e})") from None
    if settings.get("format") != FORMAT:
        raise DataError(f"model {path}: format {settings.get('format')!r}, this version reads {FORMAT}")
    voters, cls, bias, classes = (arrays[a] for a in _ARRAYS[:4])
    v = voters.shape[0] if voters.ndim == 2 else -1
    if v < 1 or voters.dtype.kind != "f" or cls.shape != (v,) or bias.shape != (v,) or classes.ndim != 1:
        raise DataError(f"model {path}: inconsistent arrays (voters {voters.shape}, classes {cls.shape})")
    if cls.min() < 0 or cls.max() >= len(classes):
        raise DataError(f"model {path}: voter classes outside [0, {len(classes)})")
    return Model(
        voters=torch.from_numpy(voters).to(device or "cpu"),
        voter_classes=cls.astype(np.int64),
        bias=bias,
        classes=classes,
        k=int(settings["k"]),
        tau=float(settings["tau"]),
        normalize=bool(settings["normalize"]),
        min_confidence=settings.get("min_confidence"),
    )


def label_file(directory: str, embeddings, *, chunk: int = 65536, device=None, progress=None, min_confidence="model"):
    """The saved model in ``directory`` applied to ``embeddings`` (a ``.npy`` path, shards or an
    array), block by block: (labels (N,) int64 label values, -1 where it abstains; confidence (N,)
    float32; the model)."""
    saved = load(directory, device=device)
    rows = Rows(embeddings, normalize=saved.normalize)
    if rows.dim != saved.voters.shape[1]:
        raise DataError(
            f"embeddings {embeddings}: rows of width D = {rows.dim}, the model's voters have {saved.voters.shape[1]}"
        )
    codes, conf = saved.label(rows, chunk=chunk, device=device, progress=progress, min_confidence=min_confidence)
    return np.where(codes >= 0, saved.classes[np.maximum(codes, 0)], -1).astype(np.int64), conf, saved
