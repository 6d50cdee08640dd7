"""Property-based tests of the command-line tools' input readers: whatever bytes or arrays a user
hands them, the answer is the data or the reader's one-line error type naming the file, never
another exception and never a half-written output.

Readers: ``npz:`` training data (llp_fast.data.arrays), llp-fast-select's selection file
(llp_fast.data.selection), ``metrics.jsonl`` (llp_fast.train.report), checkpoints
(llp_fast.train.checkpoint), and llp-fast-propagate's embeddings and labels (``.npy`` files or
directories of shards: llp_fast.embeddings.sources), through the command itself too.
"""

import io
import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
from fuzzing import examples
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llp_fast.cli import propagate as propagate_cli
from llp_fast.data import load
from llp_fast.data.selection import read_selection, write_selection
from llp_fast.embeddings.sources import Rows, read_labels, shard_order
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


# -- llp-fast-propagate's readers: embeddings (Rows) and labels (read_labels) ------------------------
# Cheap examples (a few small files each): more of them; LLP_FAST_FUZZ_EXAMPLES hunts longer.
NPY_SETTINGS = settings(SETTINGS, max_examples=examples(200))
FLOAT_KINDS = (np.float16, np.float32, np.float64)
# What a user may save: the float dtypes Rows takes, in either byte order, and the others.
_emb_dtypes = st.sampled_from(
    ["<f4", "<f2", "<f8", ">f4", ">f2", ">f8", "<i8", "<i4", "|u1", "|b1", "<c8", "<c16", "O", "<U2", "<M8[s]"]
)
_mostly_floats = st.sampled_from(["<f4", "<f2", "<f8", ">f4", ">f8"]) | _emb_dtypes
# Magnitudes, up to rows whose squared norm overflows the compute dtype (float32; float64 for
# float64 data) although every entry is finite.
_SCALES = {2: [1.0, 1e-3, 0.0, 1e4], 4: [1.0, 1e-3, 0.0, 1e15, 1e25, 3e37], 8: [1.0, 1e-3, 0.0, 1e15, 1e150, 1e300]}


def _emb_array(data, label: str, shape=None, dtype=None) -> np.ndarray:
    """An array in a drawn dtype and shape (mostly (N, D), N = 0 and D = 0 included; ndim 0-3
    too), random values at a drawn scale, sometimes NaN/Inf at a drawn place."""
    dtype = np.dtype(dtype or data.draw(_mostly_floats, label=f"{label} dtype"))
    if shape is None:
        two_d = st.tuples(st.integers(0, 6), st.integers(0, 4))
        shape = data.draw(
            two_d | hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), label=f"{label} shape"
        )
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label=f"{label} seed"))
    x = rng.standard_normal(shape)
    if dtype.kind == "f":
        x = x * data.draw(st.sampled_from(_SCALES[dtype.itemsize]), label=f"{label} scale")
        if x.size and data.draw(st.booleans(), label=f"{label} nonfinite"):
            x.flat[data.draw(st.integers(0, x.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if dtype.kind == "O":
        return np.array(x.tolist() if x.ndim else float(x), dtype=object).reshape(shape)
    if dtype.kind == "U":
        return x.astype(str).astype(dtype)
    if dtype.kind == "M":
        return (x * 100).astype(np.int64).astype(dtype)
    with np.errstate(invalid="ignore"):
        return (x * 10).astype(dtype) if dtype.kind in "iub" else x.astype(dtype)


def _save(path: str, x: np.ndarray) -> None:
    np.save(path, x, allow_pickle=x.dtype.hasobject)


def _emb_model(arrays):
    """What Rows must make of ``arrays`` (the files, in name order): ('ok', the values), or the
    error it must raise: 'file' (one file's dtype or shape; the message names it), 'widths'
    (shards of different D; it names the directory), 'no columns' (D = 0)."""
    for x in arrays:
        if x.ndim != 2 or x.dtype.type not in FLOAT_KINDS:
            return "file", None
    if len({x.shape[1] for x in arrays}) != 1:
        return "widths", None
    if arrays[0].shape[1] == 0:
        return "no columns", None
    wide = any(x.dtype.type is np.float64 for x in arrays)
    return "ok", np.concatenate([x.astype(np.float64 if wide else np.float32) for x in arrays])


def _check_rows(rows: Rows, want: np.ndarray, normalize: bool, chunk: int, pick) -> None:
    """Rows must give ``want`` (normalised as F.normalize does when ``normalize``), block by
    block, or, for rows with NaN/Inf, the DataError of the first block holding one."""
    assert (rows.n, rows.dim) == want.shape
    assert rows.dtype == (torch.float64 if want.dtype == np.float64 else torch.float32)
    x = want.astype(np.float64)
    if normalize:  # the norm of the row scaled by its largest entry: no overflow, even at 1e300
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            big = np.abs(x).max(axis=1, keepdims=True) if x.size else np.ones((len(x), 1))
            norm = big * np.linalg.norm(x / np.where(big > 0, big, 1), axis=1, keepdims=True)
            x = x / np.maximum(norm, 1e-12)
    rtol = 1e-12 if want.dtype == np.float64 else 2e-6
    bad_rows = ~np.isfinite(want).all(axis=1)
    for a, b in rows.blocks(chunk):
        if bad_rows[a:b].any():
            first = a + int(np.argmax(bad_rows[a:b]))
            with pytest.raises(DataError, match=f"^embeddings.*: row {first} contains NaN or Inf$"):
                rows.read(a, b)
            return
        got = rows.read(a, b)
        assert got.dtype == rows.dtype and got.shape == (b - a, rows.dim)
        np.testing.assert_allclose(got.double().numpy(), x[a:b], rtol=rtol, atol=1e-30)
    if not bad_rows[pick].any():
        np.testing.assert_allclose(rows.take(pick).double().numpy(), x[pick], rtol=rtol, atol=1e-30)


@NPY_SETTINGS
@given(data=st.data())
def test_rows_reader_on_random_arrays_and_shards(data):
    """Rows over a .npy file, a directory of shards (name order, digit runs as numbers; with other files beside them) or
    an array in memory: the values, or a DataError naming the file (the directory, for shards
    that do not fit together)."""
    source = data.draw(st.sampled_from(["file", "shards", "array"]), label="source")
    normalize = data.draw(st.booleans(), label="normalize")
    with _tmpdir() as d:
        if source == "shards":
            count = data.draw(st.integers(1, 3), label="shards")
            width = data.draw(st.integers(1, 3), label="D")
            names = st.sampled_from(["a", "a0", "a_1", "b", "B", "0", "10", "9"])  # "a" < "a0", "9" < "10"
            names = data.draw(st.lists(names, min_size=count, max_size=count, unique=True), label="shard names")
            arrays = {}
            for name in names:  # mostly fitting shards; now and then one of another width or kind
                shape = (data.draw(st.integers(0, 4)), width if data.draw(st.integers(0, 4)) else width + 1)
                dtype = data.draw(_mostly_floats, label=f"{name} dtype")
                arrays[name + ".npy"] = _emb_array(data, name, shape, dtype)
            path = os.path.join(d, "emb")
            os.mkdir(path)
            for name in data.draw(st.permutations(sorted(arrays)), label="written in order"):
                _save(os.path.join(path, name), arrays[name])
            for junk in data.draw(st.lists(st.sampled_from(["notes.txt", ".hidden.npy", "emb.npy.bak"]), unique=True)):
                with open(os.path.join(path, junk), "wb") as f:
                    f.write(b"not an array")
            files = [arrays[n] for n in sorted(arrays, key=shard_order)]  # (digit runs as numbers: "9" < "10")
        else:
            files = [_emb_array(data, "embeddings")]
            path = os.path.join(d, "emb.npy")
            _save(path, files[0])
            if source == "array":
                path = files[0]
        verdict, want = _emb_model(files)
        event(f"{source}: {verdict}")
        try:
            rows = Rows(path, normalize=normalize)
        except DataError as e:
            assert verdict != "ok", f"valid embeddings refused: {e}"
            message = str(e)
            assert "\n" not in message
            if source != "array" and verdict in ("file", "widths"):
                assert path in message, message
            else:
                assert "embeddings" in message, message
            return
        assert verdict == "ok", f"accepted, but expected {verdict}"
        chunk = data.draw(st.integers(1, 5), label="chunk")
        pick = np.array(sorted(data.draw(st.sets(st.integers(0, max(rows.n - 1, 0)), max_size=3))), np.int64)
        _check_rows(rows, want, normalize, chunk, pick[pick < rows.n])


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _header(descr, fortran, shape) -> bytes:
    text = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


_valid_npy = st.builds(
    lambda shape, dtype: _npy_bytes(np.ones(shape, dtype)),
    st.tuples(st.integers(0, 4), st.integers(1, 3)),
    st.sampled_from(["<f4", "<f8", "<f2", "<i8"]),
)
# Shapes a header may claim (the size check must catch the file being shorter), negative sides and
# sizes past 2**64 included.
_claimed_shapes = st.lists(st.sampled_from([0, 1, 2, 3, 2**20, 2**31, 2**62, -1]), max_size=3).map(tuple)
_npy_like = st.one_of(
    st.binary(max_size=300),
    st.tuples(_valid_npy, st.integers(0, 300)).map(lambda b: b[0][: b[1]]),  # truncated
    st.tuples(_valid_npy, st.integers(0, 200), st.binary(min_size=1, max_size=4)).map(
        lambda b: b[0][: b[1]] + b[2] + b[0][b[1] + len(b[2]) :]  # bytes overwritten
    ),
    st.builds(
        lambda descr, fortran, shape, payload: _header(descr, fortran, shape) + payload,
        st.sampled_from(["<f4", ">f8", "<f2", "|b1", "<i8", "O", "<U3", "|V4", [("a", "<f4")], "xyz", 7]),
        st.sampled_from([False, True, 1, "no"]),
        _claimed_shapes | st.sampled_from([[3, 2], (2.0, 2), "(2, 2)", None]),
        st.binary(max_size=64),
    ),
    # Headers that NumPy's Python 2 fallback parser fails on with tokenize.TokenError.
    st.sampled_from([b"\x93NUMPY\x01\x00\x06\x00\x00\x00\x00'''", b"\x93NUMPY\x01\x00\x0b\x00" + b"\x00" * 9 + b"{"]),
)


@NPY_SETTINGS
@given(content=_npy_like, normalize=st.booleans(), as_labels=st.booleans())
def test_npy_readers_on_arbitrary_bytes(content, normalize, as_labels):
    """Bytes that may or may not be a .npy file (junk, a valid file cut short or overwritten, a
    hand-made header over any payload): Rows and read_labels give data or a DataError naming the
    file, at opening or at the block that holds a bad row, never another exception."""
    with _tmpdir() as d:
        path = os.path.join(d, "labels.npy" if as_labels else "emb.npy")
        with open(path, "wb") as f:
            f.write(content)
        try:
            if as_labels:
                labels = read_labels(path)
                event("labels accepted")
                assert labels.dtype == np.int64 and labels.ndim == 1 and (labels >= -1).all()
                return
            rows = Rows(path, normalize=normalize)
        except DataError as e:
            event("refused")
            assert "\n" not in str(e)
            assert path in str(e), str(e)
            return
        event("embeddings accepted")
        for a, b in rows.blocks(3):
            try:
                got = rows.read(a, b)
            except DataError as e:
                assert "NaN or Inf" in str(e)
                return
            assert got.shape == (b - a, rows.dim) and bool(torch.isfinite(got).all())


_label_dtypes = st.sampled_from(
    ["<i8", "<i4", "|i1", "<i2", "|u1", "<u2", "<u4", "<u8", ">i8", "<f8", "<f4", "|b1", "<c16", "O"]
)


def _label_array(data, label: str, n: int, *, small: bool = False) -> np.ndarray:
    """Labels in a drawn dtype: mostly (n,) in [-1, 3]; sometimes another length or ndim, values
    below -1 or at the ends of the dtype, NaN for floats (``small``: values in [-1, 3] only)."""
    dtype = np.dtype(data.draw(_label_dtypes, label=f"{label} dtype"))
    shape = data.draw(
        st.just((n,)) | hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5), label=f"{label} shape"
    )
    pool = [-1, 0, 1, 2, 3] + ([] if small else [-2, -(2**40), 2**40])
    values = np.array(data.draw(st.lists(st.sampled_from(pool), min_size=math.prod(shape), max_size=math.prod(shape))))
    x = values.reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        x = np.clip(x, max(info.min, -(2**62)), min(info.max, 2**62)).astype(dtype)
        if x.size and not small and data.draw(st.booleans(), label=f"{label} at an end"):
            x.flat[0] = data.draw(st.sampled_from([info.min, info.max]))
        return x
    if dtype.kind == "f" and x.size and data.draw(st.booleans(), label=f"{label} NaN"):
        x = x.astype(dtype)
        x.flat[0] = np.nan
        return x
    return np.array(x.tolist(), dtype=object) if dtype.kind == "O" else x.astype(dtype)


@NPY_SETTINGS
@given(data=st.data())
def test_labels_reader_on_random_arrays(data):
    """read_labels over a .npy file or a directory of shards: (N,) int64 equal to the file's
    values, or a DataError (naming the file, where the file's dtype or shape is wrong)."""
    n = data.draw(st.integers(0, 6), label="N")
    expect_n = data.draw(st.sampled_from([n, None, n + 1]), label="n")
    with _tmpdir() as d:
        if data.draw(st.booleans(), label="shards"):
            path = os.path.join(d, "labels")
            os.mkdir(path)
            # Values at the ends of each dtype too: int64 and uint64 shards must not meet as float64.
            cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=2), label="cuts"))
            parts = [_label_array(data, f"shard {i}", b - a) for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, n]))]
            for i, x in enumerate(parts):
                _save(os.path.join(path, f"part{i}.npy"), x)
        else:
            path = os.path.join(d, "labels.npy")
            parts = [_label_array(data, "labels", n)]
            _save(path, parts[0])
        shaped = all(x.ndim == 1 and x.dtype.kind in "iu" for x in parts)
        values = [int(v) for x in parts for v in x.tolist()] if shaped else []
        ok = shaped and (expect_n is None or len(values) == expect_n)
        ok = ok and all(-1 <= v < 2**63 for v in values)
        # an unsigned array holding its dtype's largest value: a -1 that wrapped round (uint8's 255)
        ok = ok and not any(x.dtype.kind == "u" and x.size and x.max() == np.iinfo(x.dtype).max for x in parts)
        event("labels: " + ("valid" if ok else "invalid"))
        try:
            got = read_labels(path, expect_n)
        except DataError as e:
            assert not ok, f"valid labels refused: {e}"
            assert "\n" not in str(e)
            assert path in str(e), str(e)
            return
        assert ok, "invalid labels accepted"
        assert got.dtype == np.int64 and got.tolist() == values


@settings(SETTINGS, max_examples=examples(30))
@given(data=st.data())
def test_propagate_cli_writes_all_outputs_or_none(data):
    """llp-fast-propagate on drawn embeddings and labels, one of them (or neither) drawn as the
    readers' fuzz draws it: rc 0 with every output written (valid inputs with a labeled row must
    get there), or rc 2 (the one-line error) with the output directory as it was: the previous
    file at --out untouched, nothing else (no temporary file) left."""
    spoil = data.draw(st.sampled_from([None, "embeddings", "labels"]), label="spoiled input")
    n = data.draw(st.integers(1 if spoil is None else 0, 8), label="N")
    with _tmpdir() as d:
        inputs, outs = os.path.join(d, "in"), os.path.join(d, "out")
        os.mkdir(inputs)
        os.mkdir(outs)
        emb, lab = os.path.join(inputs, "emb.npy"), os.path.join(inputs, "labels.npy")
        if spoil == "embeddings":
            x = _emb_array(data, "embeddings", shape=(n, data.draw(st.integers(0, 3), label="D")))
        else:
            rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="embeddings seed"))
            x = rng.standard_normal((n, 3)).astype(data.draw(st.sampled_from(["<f4", "<f2", "<f8", ">f4"])))
        if spoil == "labels":
            y = _label_array(data, "labels", n)
        else:
            y = np.array(data.draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n), label="labels"))
        _save(emb, x)
        _save(lab, y)
        out = os.path.join(outs, "pseudo.npy")
        with open(out, "wb") as f:
            f.write(b"previous")
        argv = [emb, lab, "--out", out, "--confidence-out", os.path.join(outs, "conf.npy"), "--quiet"]
        argv += ["--k", "2", "--t", "2", "--rounds", str(data.draw(st.integers(1, 2), label="rounds"))]
        rc = propagate_cli.main(argv)
        event(f"rc {rc}")
        assert rc in (0, 2)
        if rc == 2:
            assert spoil is not None or not (y >= 0).any(), "valid inputs refused"
            assert sorted(os.listdir(outs)) == ["pseudo.npy"]
            assert open(out, "rb").read() == b"previous"
            return
        assert sorted(os.listdir(outs)) == ["conf.npy", "pseudo.npy"]
        pseudo, conf = np.load(out), np.load(os.path.join(outs, "conf.npy"))
        assert pseudo.shape == conf.shape == (n,) and (pseudo >= 0).all()
        labeled = y >= 0
        assert (pseudo[labeled] == y[labeled]).all() and (conf[labeled] == 1).all()


@pytest.mark.parametrize("reader", ["embeddings", "labels"])
@pytest.mark.parametrize("inside", [[], ["notes.txt", ".hidden.npy"], ["sub.npy/"]])
def test_readers_on_a_directory_without_shards(reader, inside):
    """An empty directory, one with no .npy shard, and one whose .npy is a directory: a
    DataError naming the directory (the shard)."""
    with _tmpdir() as d:
        path = os.path.join(d, reader)
        os.mkdir(path)
        for name in inside:
            if name.endswith("/"):
                os.mkdir(os.path.join(path, name))
            else:
                with open(os.path.join(path, name), "wb") as f:
                    f.write(_npy_bytes(np.zeros((2, 2), np.float32)))
        with pytest.raises(DataError) as e:
            Rows(path) if reader == "embeddings" else read_labels(path)
        assert path in str(e.value) and reader in str(e.value)
