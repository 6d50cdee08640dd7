"""A saved model (``llp-fast-propagate --save-model DIR`` / ``--model DIR NEW``): what ``np.load``
reads without pickle, labels for new rows equal to ``LocalLabelPropagation.predict`` for the same
fit (streamed in blocks), abstention, one-line errors, and an atomic write."""

import json
import os

import numpy as np
import pytest
import torch

from llp_fast import LocalLabelPropagation
from llp_fast.cli.propagate import main
from llp_fast.embeddings import model

# compiled selections on odd block sizes: a native crash fails these tests, not the run
pytestmark = pytest.mark.isolated

torch.set_num_threads(1)


def _data(tmp_path, dtype=np.float32):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)).astype(dtype)
    labels = np.where(np.random.default_rng(0).random(len(y)) < 0.1, y, -1)
    new = (x[:400] + np.random.default_rng(1).normal(0, 2, (400, x.shape[1]))).astype(dtype)
    for name, arr in (("emb", x), ("lab", labels), ("new", new)):
        np.save(tmp_path / f"{name}.npy", arr)
    return x, labels, new


def _one_line(capsys, rc, match):
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("llp-fast-propagate: error: ") and match in err, err


@pytest.mark.parametrize("rounds, dtype", [(1, np.float32), (3, np.float32), (2, np.float64)])
def test_the_model_labels_new_rows_as_predict_does(tmp_path, capsys, rounds, dtype):
    x, labels, new = _data(tmp_path, dtype)
    clf = LocalLabelPropagation(rounds=rounds).fit(x, labels)
    d = str(tmp_path / "model")
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "p.npy")]
    assert main([*argv, "--rounds", str(rounds), "--save-model", d, "--quiet"]) == 0
    assert os.listdir(d) == ["model.npz"] and "model.npz" in capsys.readouterr().out
    with np.load(os.path.join(d, "model.npz"), allow_pickle=False) as z:
        assert sorted(z.files) == ["classes", "settings", "voter_bias", "voter_classes", "voters"]
        np.testing.assert_array_equal(z["voters"], clf.voters_)
        np.testing.assert_array_equal(z["voter_classes"], clf.voter_classes_)
        np.testing.assert_array_equal(z["voter_bias"], clf.voter_bias_)
        np.testing.assert_array_equal(z["classes"], clf.classes_)
        settings = json.loads(str(z["settings"]))
    assert settings == {"format": 1, "k": 10, "tau": 0.07, "normalize": True, "min_confidence": None}
    out, conf = str(tmp_path / "pn.npy"), str(tmp_path / "cn.npy")
    rc = main(["--model", d, str(tmp_path / "new.npy"), "--out", out, "--confidence-out", conf, "--chunk", "37"])
    said = capsys.readouterr().out
    assert rc == 0 and "labeled 400 rows" in said and said.rstrip().endswith(f"-> {out}, {conf}"), said
    np.testing.assert_array_equal(np.load(out), clf.predict(new))
    np.testing.assert_allclose(np.load(conf), clf.predict_proba(new).max(axis=1), rtol=1e-5)
    # abstention: the model's own threshold, or the flag's
    strict = LocalLabelPropagation(rounds=rounds, min_confidence=0.9).fit(x, labels)
    assert main([*argv, "--rounds", str(rounds), "--save-model", d, "--min-confidence", "0.9", "--quiet"]) == 0
    assert main(["--model", d, str(tmp_path / "new.npy"), "--out", out]) == 0
    got = np.load(out)
    np.testing.assert_array_equal(got, strict.predict(new))
    assert (got == -1).any() and (got[np.load(conf) >= 0.9] >= 0).all()
    assert main(["--model", d, str(tmp_path / "new.npy"), "--out", out, "--min-confidence", "0"]) == 0
    np.testing.assert_array_equal(np.load(out), clf.predict(new))


def test_model_label_streams_blocks_alike():
    rng = np.random.default_rng(3)
    voters = torch.nn.functional.normalize(torch.randn(50, 6), dim=1)
    m = model.Model(voters, rng.integers(0, 4, 50), rng.normal(0, 1, 50).astype(np.float32), np.arange(4), 7, 0.1)
    from llp_fast.embeddings import Rows

    rows = Rows(rng.standard_normal((101, 6)).astype(np.float32))
    whole = m.label(rows, chunk=1000)
    for chunk in (1, 10, 64):
        parts = m.label(rows, chunk=chunk)
        assert np.array_equal(parts[0], whole[0]) and np.array_equal(parts[1], whole[1])


def test_bad_models_and_flags_are_one_line(tmp_path, capsys):
    _data(tmp_path)
    new, out = str(tmp_path / "new.npy"), str(tmp_path / "o.npy")
    _one_line(capsys, main(["--model", str(tmp_path / "none"), new, "--out", out]), "no model.npz there")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.npz").write_bytes(b"not a zip file")
    _one_line(capsys, main(["--model", str(tmp_path / "bad"), new, "--out", out]), "not a .npz file")
    _one_line(capsys, main(["--model", str(tmp_path / "none.npz"), new, "--out", out]), "none.npz: no such file")
    np.savez(tmp_path / "bad" / "model.npz", voters=np.zeros((2, 3)))
    _one_line(capsys, main(["--model", str(tmp_path / "bad"), new, "--out", out]), "not a saved model")
    d = str(tmp_path / "m")
    assert main([str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", out, "--save-model", d]) == 0
    np.save(tmp_path / "wide.npy", np.zeros((3, 65), np.float32) + 1)
    capsys.readouterr()
    _one_line(capsys, main(["--model", d, str(tmp_path / "wide.npy"), "--out", out]), "D = 65")
    for extra, flag in (
        ([str(tmp_path / "lab.npy")], "LABELS"),
        (["--rounds", "2"], "--rounds: not with --model (the model's settings are used)"),
        (["--k", "5"], "--k"),
        (["--suspects-out", out + "s"], "--suspects-out: not with --model (a labelling run's option"),
        (["--nproc", "2"], "--nproc: not with --model (it labels new rows in one process"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["--model", d, new, "--out", out, *extra])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([new, "--out", out])  # no labels and no model
    assert "required: labels" in capsys.readouterr().err


def test_save_model_to_an_npz_path_writes_that_file(tmp_path, capsys):
    """--model reads M.npz itself; --save-model M.npz made a folder M.npz/ holding model.npz, and
    refused M.npz once it existed as a file."""
    _data(tmp_path)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "o.npy"), "--quiet"]
    file, folder = tmp_path / "m.npz", tmp_path / "d"
    for _ in range(2):  # the second time over the file the first one wrote
        assert main([*argv, "--save-model", str(file)]) == 0
        assert file.is_file() and not (tmp_path / "m.npz" / "model.npz").exists()
    assert main([*argv, "--save-model", str(folder)]) == 0
    with np.load(file) as a, np.load(folder / "model.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in b.files)
    new = str(tmp_path / "new.npy")
    for saved in (file, folder):
        assert main(["--model", str(saved), new, "--out", str(tmp_path / f"p-{saved.name}.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "p-m.npz.npy"), np.load(tmp_path / "p-d.npy"))
    with pytest.raises(SystemExit):
        main([*argv, "--save-model", str(tmp_path / "no" / "m.npz")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an output over the model it reads
        main(["--model", str(file), new, "--out", str(file)])
    assert "is the input --model" in capsys.readouterr().err


def test_a_damaged_model_file_is_one_line_not_other_voters(tmp_path, capsys):
    """np.load reads a member only as far as its header says: a damaged header length shifted the
    voters silently (other labels, exit 0), and a damaged header or compression field was a
    TokenError / NotImplementedError traceback. Every member's checksum is checked first."""
    _data(tmp_path)
    d, new, out = tmp_path / "m", str(tmp_path / "new.npy"), str(tmp_path / "o.npy")
    assert main([str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", out, "--save-model", str(d)]) == 0
    good = (d / "model.npz").read_bytes()
    at = good.index(b"\x93NUMPY")  # the voters' .npy header: its length (offset 8) and its text (12)
    for offset, bit in ((8, 0x20), (12, 0x04), (300, 0x01)):  # and a byte of the voters themselves
        b = bytearray(good)
        b[at + offset] ^= bit
        (d / "model.npz").write_bytes(bytes(b))
        capsys.readouterr()
        _one_line(capsys, main(["--model", str(d), new, "--out", out]), "damaged")
    b = bytearray(good)
    b[b.index(b"PK\x01\x02") + 10] ^= 0x80  # the central directory's compression method
    (d / "model.npz").write_bytes(bytes(b))
    _one_line(capsys, main(["--model", str(d), new, "--out", out]), "unreadable (NotImplementedError")
    assert not os.path.exists(out) or os.path.getsize(out) > 0


def test_a_model_folder_that_cannot_be_made_is_named(tmp_path, capsys, monkeypatch):
    """The folder used to be made inside --out's write, which then took the blame for it."""
    import errno

    _data(tmp_path)
    out = str(tmp_path / "o.npy")

    def refuse(path, exist_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(model.os, "makedirs", refuse)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", out, "--rounds", "1"]
    rc = main([*argv, "--save-model", str(tmp_path / "m")])
    _one_line(capsys, rc, f"cannot write model folder {tmp_path / 'm'}:")
    assert sorted(os.listdir(tmp_path)) == ["emb.npy", "lab.npy", "new.npy"]


def test_saving_is_atomic(tmp_path, monkeypatch, capsys):
    _data(tmp_path)
    d = tmp_path / "m"
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "p.npy"), "--quiet"]
    assert main([*argv, "--rounds", "1", "--save-model", str(d)]) == 0
    before, labels_before = (d / "model.npz").read_bytes(), (tmp_path / "p.npy").read_bytes()

    def broken(zf, name, blocks, shape, dtype):
        next(iter(blocks))
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "_write_array", broken)
    assert main([*argv, "--rounds", "2", "--save-model", str(d)]) == 130
    assert os.listdir(d) == ["model.npz"] and (d / "model.npz").read_bytes() == before
    # the model and the other outputs move into place together: a failed model keeps the old labels
    assert (tmp_path / "p.npy").read_bytes() == labels_before
    assert sorted(os.listdir(tmp_path)) == ["emb.npy", "lab.npy", "m", "new.npy", "p.npy"]
    # a folder the failed save made is removed with its file (one that was there stays, above)
    assert main([*argv, "--rounds", "1", "--save-model", str(tmp_path / "fresh")]) == 130
    assert sorted(os.listdir(tmp_path)) == ["emb.npy", "lab.npy", "m", "new.npy", "p.npy"]
    # DIR/model.npz that is a folder: refused where the flag is read, before the run
    (tmp_path / "odd" / "model.npz").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--save-model", str(tmp_path / "odd")])
    assert e.value.code == 2 and "model.npz exists and is not a file" in capsys.readouterr().err


def test_a_model_saved_under_an_npz_name_loads_by_it(tmp_path, capsys):
    """A folder named like a .npz file (made by --save-model before it wrote M.npz as a file) keeps
    holding model.npz."""
    _data(tmp_path)
    d, out = str(tmp_path / "out.npz"), str(tmp_path / "p.npy")
    os.mkdir(d)
    assert main([str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", out, "--save-model", d]) == 0
    assert os.listdir(d) == ["model.npz"]
    assert main(["--model", d, str(tmp_path / "new.npy"), "--out", str(tmp_path / "q.npy")]) == 0
    with pytest.raises(SystemExit):  # an output over the model it reads
        main(["--model", d, str(tmp_path / "new.npy"), "--out", os.path.join(d, "model.npz")])
    assert "is the input --model" in capsys.readouterr().err


def _mutated(z: dict, **change) -> dict:
    out = dict(z)
    settings = json.loads(str(z["settings"]))
    for key, value in change.items():
        if key.startswith("s_"):
            settings[key[2:]] = value
        else:
            out[key] = value
    if not any(k == "settings" for k in change):
        out["settings"] = np.array(json.dumps(settings))
    return out


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(s_k=0), "k must be"),
        (dict(s_k="ten"), "k must be"),
        (dict(s_k=2.7), "k must be"),
        (dict(s_tau=0), "settings' tau: expected a finite number >= 1e-30"),
        (dict(s_tau=float("nan")), "settings' tau: expected a finite number"),
        (dict(s_tau=1e-40), "settings' tau: expected a finite number"),  # (it passed, then a traceback)
        (dict(s_tau=1e-310), "settings' tau: expected a finite number"),
        (dict(s_normalize=None), "normalize"),
        (dict(s_min_confidence=2), "min_confidence"),
        (dict(s_min_confidence="high"), "min_confidence"),
        (dict(settings=np.array("[1, 2]")), "JSON object"),
        (dict(settings=np.array("null")), "JSON object"),
        (dict(settings=np.array(3)), "one JSON string"),
        (dict(voter_bias="nan"), "not finite"),
        (dict(voter_bias="huge"), "voter_bias holds 1e+38, beyond float32 scores"),  # (a traceback)
        (dict(voters="nan"), "not finite"),
        (dict(voters="int"), "float32 or float64"),
        (dict(voter_classes="str"), "must be integers"),
        (dict(classes="str"), "must be integers"),
        (dict(classes="neg"), ">= 0"),
        (dict(classes="dup"), "repeat"),
        (dict(classes="u64"), "fit int64"),
        (dict(voter_bias="2d"), "inconsistent"),
    ],
)
def test_each_malformed_model_field_is_one_line(tmp_path, capsys, change, match):
    _data(tmp_path)
    d = tmp_path / "m"
    out = str(tmp_path / "o.npy")
    assert main([str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", out, "--save-model", str(d)]) == 0
    with np.load(d / "model.npz") as f:
        z = {k: f[k] for k in f.files}
    forms = {
        "nan": lambda a: np.where(np.arange(a.size).reshape(a.shape) == 1, np.nan, a).astype(a.dtype),
        "int": lambda a: a.astype(np.int32),
        "str": lambda a: a.astype(str),
        "neg": lambda a: a - 1,
        "dup": lambda a: np.zeros_like(a),
        "u64": lambda a: a.astype(np.uint64) + np.uint64(2**63),
        "2d": lambda a: a[:, None],
        "huge": lambda a: (a + 1e38).astype(a.dtype),
    }
    change = {k: forms[v](z[k]) if isinstance(v, str) and v in forms else v for k, v in change.items()}
    np.savez(d / "model.npz", **_mutated(z, **change))
    capsys.readouterr()
    _one_line(capsys, main(["--model", str(d), str(tmp_path / "new.npy"), "--out", out]), match)


def test_the_models_summary_counts_the_rows_it_left_unlabelled(tmp_path, capsys):
    """A model saved with --min-confidence: its summary said "labeled 400 rows" where 109 were -1."""
    _data(tmp_path)
    d, out = tmp_path / "m", str(tmp_path / "o.npy")
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", out, "--save-model", str(d)]
    assert main([*argv, "--min-confidence", "0.99"]) == 0
    capsys.readouterr()
    assert main(["--model", str(d), str(tmp_path / "new.npy"), "--out", out]) == 0
    labels, line = np.load(out), capsys.readouterr().out
    left = int((labels == -1).sum())
    assert 0 < left < len(labels), left
    assert f"labeled {len(labels) - left} of {len(labels)} rows ({left} left -1, confidence below 0.99) by " in line
