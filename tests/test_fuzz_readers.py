"""Property-based tests of the command-line tools' input readers: whatever bytes or arrays a user
hands them, the answer is the data or the reader's one-line error type naming the file, never
another exception and never a half-written output.

Readers: ``npz:`` training data (llp_fast.data.arrays), llp-fast-select's selection file
(llp_fast.data.selection), ``metrics.jsonl`` (llp_fast.train.report) and checkpoints
(llp_fast.train.checkpoint).
"""

import io
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llp_fast.data import load
from llp_fast.data.selection import read_selection, write_selection
from llp_fast.errors import CheckpointError, DataError, UserError
from llp_fast.train import checkpoint
from llp_fast.train.report import read_metrics

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tmpdir():
    return tempfile.TemporaryDirectory()


# -- npz: training data ---------------------------------------------------------------------
_dtypes = st.sampled_from([np.uint8, np.int8, np.float32, np.int64, np.uint16, np.bool_])
_images = hnp.arrays(
    dtype=_dtypes, shape=hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=6), elements=None
)
_labels = st.one_of(
    hnp.arrays(dtype=st.sampled_from([np.int64, np.int32, np.float64, np.uint8]), shape=st.integers(0, 12)),
    st.lists(st.sampled_from([-2, -1, 0, 1, 2, 3, 7, 2**40]), min_size=0, max_size=12).map(np.array),
)


@SETTINGS
@given(x=_images, y=_labels, with_test=st.booleans(), fraction=st.sampled_from([None, 0.5, 1.0]))
@example(x=np.zeros((10, 4, 4), np.uint8), y=np.arange(10) % 2, with_test=False, fraction=0.5)  # accepted
@example(x=np.zeros((6, 3, 3, 3), np.uint8), y=np.array([0, 1, -1, -1, 0, 1]), with_test=True, fraction=None)
def test_npz_reader_returns_a_source_or_a_data_error(x, y, with_test, fraction):
    with _tmpdir() as d:
        path = os.path.join(d, "data.npz")
        arrays = {"x": x, "y": y}
        if with_test:
            arrays.update(x_test=x[:3], y_test=np.abs(y[:3]).astype(np.int64) if y.size else y[:3])
        np.savez(path, **arrays)
        try:
            src = load(f"npz:{path}", device="cpu", labeled_fraction=fraction, seed=0)
        except DataError as e:
            assert str(e) and "\n" not in str(e)
            return
        # accepted: the source is usable as the trainer uses it
        assert src.num_classes >= 1 and src.num_train >= 1 and src.num_test >= 1
        assert int(src.targets.max()) < src.num_classes and src.x.dtype == torch.uint8
        xb, yb = next(src.test_batches(4))
        assert torch.isfinite(xb).all() and yb.shape[0] == xb.shape[0]


@SETTINGS
@given(data=st.binary(max_size=300))
def test_npz_reader_on_arbitrary_bytes(data):
    with _tmpdir() as d:
        path = os.path.join(d, "junk.npz")
        with open(path, "wb") as f:
            f.write(data)
        with pytest.raises(DataError):
            load(f"npz:{path}", device="cpu")


# -- the selection file ------------------------------------------------------------------------
@SETTINGS
@given(data=st.binary(max_size=400), ext=st.sampled_from([".npz", ".json"]))
def test_selection_reader_on_arbitrary_bytes(data, ext):
    with _tmpdir() as d:
        path = os.path.join(d, "sel" + ext)
        with open(path, "wb") as f:
            f.write(data)
        try:
            sel = read_selection(path)
        except DataError:
            return
        assert set(sel) >= {"index", "class", "score", "meta"}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**41) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@SETTINGS
@given(
    rows=st.lists(
        st.fixed_dictionaries({"index": _json_values, "class": _json_values, "score": _json_values}), max_size=4
    ),
    meta=_json_values,
)
def test_selection_reader_on_arbitrary_json(rows, meta):
    with _tmpdir() as d:
        path = os.path.join(d, "sel.json")
        with open(path, "w") as f:
            f.write(json.dumps({"meta": meta, "selected": rows}))
        try:
            sel = read_selection(path)
        except DataError:
            return
        assert (sel["index"] >= 0).all() and sel["index"].dtype == np.int64
        assert len(sel["index"]) == len(sel["class"]) == len(sel["score"])


@SETTINGS
@given(n=st.integers(0, 6), fail=st.booleans())
def test_selection_writer_is_atomic(n, fail):
    with _tmpdir() as d:
        path = os.path.join(d, "sel.npz")
        with open(path, "wb") as f:
            f.write(b"previous")
        index, cls, score = np.arange(n), np.zeros(n, np.int64), np.ones(n, np.float32)
        if fail:
            real = np.savez

            def broken(f, **arrays):
                f.write(b"half")
                raise OSError(28, "No space left on device")

            np.savez = broken
            try:
                with pytest.raises(OSError):
                    write_selection(path, index, cls, score, {"source": "npz:x"})
            finally:
                np.savez = real
            assert open(path, "rb").read() == b"previous"
        else:
            write_selection(path, index, cls, score, {"source": "npz:x"})
            assert read_selection(path)["index"].tolist() == list(range(n))
        assert sorted(os.listdir(d)) == ["sel.npz"]


# -- metrics.jsonl -----------------------------------------------------------------------------
@SETTINGS
@given(text=st.text(max_size=200))
def test_metrics_reader_gives_rows_or_names_the_line(text):
    with _tmpdir() as d:
        path = os.path.join(d, "metrics.jsonl")
        with open(path, "w") as f:
            f.write(text)
        try:
            rows = read_metrics(path)
        except DataError as e:
            assert "metrics.jsonl:" in str(e)
            return
        assert isinstance(rows, list)


# -- checkpoints -------------------------------------------------------------------------------
@SETTINGS
@given(data=st.binary(max_size=300))
def test_checkpoint_loader_on_arbitrary_bytes(data):
    with _tmpdir() as d:
        path = os.path.join(d, "checkpoint.pt")
        with open(path, "wb") as f:
            f.write(data)
        with pytest.raises(CheckpointError):
            checkpoint.load(path)


@SETTINGS
@given(
    payload=st.dictionaries(
        st.sampled_from(["version", "config", "epoch", "history", "bank", "model", "sha256", "targets"]),
        st.none() | st.integers(-3, 3) | st.text(max_size=4) | st.lists(st.integers(), max_size=3),
        max_size=8,
    )
)
def test_checkpoint_loader_on_arbitrary_pickled_dicts(payload):
    with _tmpdir() as d:
        path = os.path.join(d, "checkpoint.pt")
        buf = io.BytesIO()
        torch.save(payload, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        with pytest.raises(CheckpointError):
            checkpoint.load(path)


def test_user_errors_are_the_one_line_kind():
    assert issubclass(DataError, UserError) and issubclass(CheckpointError, UserError)
