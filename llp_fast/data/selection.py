"""The selection file of ``llp-fast-select``, read back by ``llp-fast-train --extra-unlabeled``.

By extension:

- ``.npz``: ``index`` (E,) int64 pool indices, ``class`` (E,) int64, ``score`` (E,) float32,
  ``path`` (E,) str for folder pools, ``meta`` a JSON string;
- ``.json``: ``{"meta": {...}, "selected": [{"index", "class", "score"[, "path"]}, ...]}``.

Rows are ordered by class, then by decreasing score. ``meta`` records the pool (``source``,
absolute), the checkpoint, P, K, the class count and the pool size.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .. import _files
from .._files import atomic_open
from ..errors import DataError


def check_selection_path(path: str) -> None:
    """A selection can be written at ``path``: a ``.npz`` or ``.json`` name in a directory that
    exists (checked before the pool is scored, which takes hours on a large pool, and at the write)."""
    if why := _files.parent_problem(path):
        raise DataError(f"--out {path}: {why}")
    if not path.endswith((".npz", ".json")):
        raise DataError(f"--out {path}: expected a .npz or .json file name")


def write_selection(path: str, index, cls, score, meta: dict, paths=None) -> None:
    """Writes a selection atomically (``.npz`` or ``.json`` by extension)."""
    check_selection_path(path)
    sel_paths = None if paths is None else [paths[i] for i in index.tolist()]
    with atomic_open(path) as f:
        if path.endswith(".json"):
            rows = []
            for n, (i, c, s) in enumerate(zip(index.tolist(), cls.tolist(), score.tolist())):
                row = {"index": i, "class": c, "score": s}
                if sel_paths is not None:
                    row["path"] = sel_paths[n]
                rows.append(row)
            f.write(json.dumps({"meta": meta, "selected": rows}, indent=0).encode())
        else:
            arrays = dict(
                index=np.asarray(index, np.int64),
                score=np.asarray(score, np.float32),
                meta=np.array(json.dumps(meta)),
                **{"class": np.asarray(cls, np.int64)},
            )
            if sel_paths is not None:
                arrays["path"] = np.array(sel_paths, dtype=str)
            np.savez(f, **arrays)


def read_selection(path: str) -> dict:
    """``{"index", "class", "score", "path" (or None), "meta"}`` of a selection file;
    :class:`DataError` on anything wrong."""
    if not os.path.isfile(path):
        raise DataError(f"no selection file at {path}")
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            rows, meta = d["selected"], d["meta"]
            out = {
                "index": np.array([r["index"] for r in rows], dtype=np.int64),
                "class": np.array([r["class"] for r in rows], dtype=np.int64),
                "score": np.array([r["score"] for r in rows], dtype=np.float32),
                "path": np.array([r["path"] for r in rows], dtype=str) if rows and "path" in rows[0] else None,
            }
        else:
            f = np.load(path, mmap_mode="r", allow_pickle=False)  # (an .npy is mapped, not read, to refuse it)
            if not isinstance(f, np.lib.npyio.NpzFile) or not {"index", "class", "score", "meta"} <= set(f.files):
                if isinstance(f, np.lib.npyio.NpzFile):
                    f.close()  # (a KeyError named the first missing array, not what the file is)
                raise DataError(f"{path} is not a selection (the .npz or .json of llp-fast-select --out)")
            with f:
                out = {k: f[k] for k in ("index", "class", "score")}
                out["path"] = f["path"] if "path" in f.files else None
                meta = json.loads(str(f["meta"]))
        out["meta"] = meta
        if not isinstance(meta, dict) or "source" not in meta:
            raise KeyError("meta.source")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read selection {path} ({type(e).__name__}: {e})") from None
    n = out["index"].shape[0]
    if out["class"].shape[0] != n or out["score"].shape[0] != n or (out["index"] < 0).any():
        raise DataError(f"bad selection {path}: index, class and score must be equal-length, indices >= 0")
    return out
