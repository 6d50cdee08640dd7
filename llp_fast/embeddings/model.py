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

import contextlib
import json
import os
import tokenize
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .. import _checks
from .._files import WriteError, atomic_path
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
        rows.expect_tau(self.tau)
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


def save(
    directory: str, rows: Rows, result, *, k: int, tau: float, normalize: bool, min_confidence=None, stack=None
) -> str:
    """Writes ``directory/model.npz`` (or ``directory`` itself where it names a ``.npz`` file:
    :func:`model_file`, as ``--model`` reads it) from an engine ``Result`` (its voters read back
    from ``rows``, block by block) and the vote's settings. Creates the folder if its parent
    exists. Returns the file's path. With ``stack`` (a :class:`contextlib.ExitStack`:
    :func:`.outputs.write`'s ``also``) the file moves into place only as that stack closes without
    an error, with the other outputs."""
    path = model_file(directory)
    directory = os.path.dirname(path) or "."
    made = not os.path.isdir(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:  # named itself: inside another output's write, that one would take the blame
        raise WriteError(directory, e, what="model folder") from e
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
    own = contextlib.ExitStack() if stack is None else contextlib.nullcontext(stack)

    def unmake(exc_type, exc, tb):  # a failed write leaves no folder it made (it runs last: pushed first)
        if exc_type is not None and made:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        return False

    with (
        own as st,
        contextlib.nullcontext(st.push(unmake)),
        zipfile.ZipFile(
            st.enter_context(atomic_path(path, suffix=".npz")), "w", zipfile.ZIP_STORED, allowZip64=True
        ) as zf,
    ):
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


def model_file(path: str) -> str:
    """The model file ``--save-model path`` writes and ``--model path`` reads: ``path/model.npz``,
    or ``path`` itself where it names a ``.npz`` file rather than a directory (``--save-model
    M.npz`` made a folder ``M.npz/``)."""
    if path.endswith(".npz") and not os.path.isdir(path):
        return path
    return os.path.join(path, FILE)


def _settings_of(path: str, text: str) -> dict:
    """The settings JSON of a model, each value checked: :class:`DataError` naming the one that is not."""
    try:
        settings = json.loads(text)
    except ValueError as e:
        raise DataError(f"model {path}: unreadable settings ({e})") from None
    if not isinstance(settings, dict):
        raise DataError(f"model {path}: settings must be a JSON object, got {type(settings).__name__}")
    if settings.get("format") != FORMAT:
        raise DataError(f"model {path}: format {settings.get('format')!r}, this version reads {FORMAT}")
    k, tau, normalize = settings.get("k"), settings.get("tau"), settings.get("normalize")
    c = settings.get("min_confidence")
    real = (int, float)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"model {path}: settings' k must be a whole number >= 1, got {k!r}")
    try:
        _checks.temperature(tau)
    except ValueError as e:
        raise DataError(f"model {path}: settings' tau: {e}") from None
    if not isinstance(normalize, bool):
        raise DataError(f"model {path}: settings' normalize must be true or false, got {normalize!r}")
    if c is not None and (isinstance(c, bool) or not isinstance(c, real) or not 0 <= c <= 1):
        raise DataError(f"model {path}: settings' min_confidence must be null or in [0, 1], got {c!r}")
    return settings


def load(directory: str, *, device=None) -> Model:
    """The model in ``directory`` (or a ``.npz`` file: :func:`model_file`); :class:`DataError`
    naming what is wrong."""
    path = model_file(directory)
    if not os.path.isfile(path):
        if path == directory:  # a .npz file named, not a folder
            raise DataError(f"model {directory}: no such file (write one with --save-model)")
        raise DataError(f"model {directory}: no {FILE} there (write one with --save-model)")
    if not zipfile.is_zipfile(path):
        raise DataError(f"model {path}: not a .npz file (a zip archive); write one with --save-model")
    try:
        # Every member's checksum first: np.load reads a member only as far as its header says, so
        # a damaged header could otherwise shift the voters silently.
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise DataError(f"model {path}: damaged (member {bad} fails its checksum)")
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in _ARRAYS if a not in z.files]
            if missing:
                raise DataError(f"model {path}: not a saved model (no {', '.join(missing)})")
            arrays = {a: z[a] for a in _ARRAYS}
    except DataError:
        raise
    except (
        zipfile.BadZipFile,
        ValueError,
        EOFError,
        OSError,
        KeyError,
        AttributeError,
        TypeError,
        SyntaxError,  # np.load parses the .npy header as a Python literal: a damaged one
        tokenize.TokenError,
        NotImplementedError,  # zipfile: a damaged compression method
        zlib.error,
        RuntimeError,  # zipfile: an encrypted member
    ) as e:
        raise DataError(f"model {path}: unreadable ({type(e).__name__}: {e})") from None
    if arrays["settings"].dtype.kind not in "US" or arrays["settings"].ndim != 0:
        raise DataError(f"model {path}: settings must be one JSON string")
    settings = _settings_of(path, str(arrays["settings"]))
    voters, cls, bias, classes = (arrays[a] for a in _ARRAYS[:4])
    v = voters.shape[0] if voters.ndim == 2 else -1
    if v < 1 or voters.shape[1] < 1 or cls.shape != (v,) or bias.shape != (v,) or classes.ndim != 1:
        raise DataError(
            f"model {path}: inconsistent arrays (voters {voters.shape}, voter_classes {cls.shape}, voter_bias "
            f"{bias.shape}, classes {classes.shape})"
        )
    if cls.dtype.kind not in "iu" or classes.dtype.kind not in "iu" or bias.dtype.kind != "f":
        raise DataError(
            f"model {path}: voter_classes and classes must be integers and voter_bias floating point, got "
            f"{cls.dtype}, {classes.dtype}, {bias.dtype}"
        )
    if len(classes) and (classes.dtype.kind == "u" and classes.max() > np.iinfo(np.int64).max):
        raise DataError(f"model {path}: classes do not fit int64")
    if len(classes) and classes.min() < 0:
        raise DataError(f"model {path}: classes must be label values >= 0 (-1 marks an unlabeled row)")
    if len(np.unique(classes)) != len(classes):
        raise DataError(f"model {path}: classes repeat a label")
    if cls.min() < 0 or cls.max() >= len(classes):
        raise DataError(f"model {path}: voter classes outside [0, {len(classes)})")
    if voters.dtype not in (np.float32, np.float64) or bias.dtype not in (np.float32, np.float64):
        raise DataError(
            f"model {path}: voters and voter_bias must be float32 or float64, got {voters.dtype}, {bias.dtype}"
        )
    if not np.isfinite(bias).all():
        raise DataError(f"model {path}: voter_bias holds a value that is not finite")
    limit = float(np.finfo(voters.dtype).max) / 4  # (the scores' range: labelling computes in at least this dtype)
    if bias.size and float(np.abs(bias).max()) > limit:  # (it was a traceback from the op's own check)
        raise DataError(f"model {path}: voter_bias holds {float(np.abs(bias).max()):.3g}, beyond {voters.dtype} scores")
    if not all(np.isfinite(voters[a : a + 65536]).all() for a in range(0, v, 65536)):
        raise DataError(f"model {path}: voters hold a value that is not finite")
    return Model(
        voters=torch.from_numpy(voters).to(device or "cpu"),
        voter_classes=cls.astype(np.int64),
        bias=bias,
        classes=classes.astype(np.int64),
        k=settings["k"],
        tau=float(settings["tau"]),
        normalize=settings["normalize"],
        min_confidence=None if settings.get("min_confidence") is None else float(settings["min_confidence"]),
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
