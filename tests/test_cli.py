"""``llp-fast-train`` and ``llp-fast-propagate``: runs, summaries and one-line errors."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, one_error_line

from llp_fast import local_density, propagate
from llp_fast.cli.propagate import main as propagate_main
from llp_fast.cli.train import config_from_args
from llp_fast.cli.train import main as train_main
from llp_fast.cli.train import parser as train_parser

# native code at odd settings (tiny networks, one thread, gloo): a crash fails these tests, not the run (_isolate.py)
pytestmark = pytest.mark.isolated

torch.set_num_threads(1)

TINY = [*TINY_ARGS, "--quiet"]


def test_default_style_run_prints_llp_beside_baseline(tmp_path, capsys):
    rd = tmp_path / "run"
    assert train_main(["--run-dir", str(rd), *TINY]) == 0
    out, _ = capsys.readouterr()
    assert "held-out top-1 LLP" in out and "supervised-only" in out
    rows = [json.loads(line) for line in open(rd / "metrics.jsonl")]
    base = [json.loads(line) for line in open(rd / "baseline" / "metrics.jsonl")]
    assert len(rows) == len(base) == 1
    for key in ("epoch", "test_top1", "test_top5", "knn_top1", "pseudo_acc"):
        assert key in rows[0]
    # finished runs resume as no-ops and print the same summary
    assert train_main(["--resume", str(rd), "--quiet"]) == 0
    assert "held-out top-1 LLP" in capsys.readouterr()[0]


def test_existing_run_dir_needs_resume(tmp_path, capsys):
    rd = tmp_path / "run"
    assert train_main(["--run-dir", str(rd), "--baseline", "off", *TINY]) == 0
    capsys.readouterr()
    one_error_line(capsys, train_main(["--run-dir", str(rd), *TINY]), "--resume")


def test_interrupt_then_resume(tmp_path, capsys):
    rd = tmp_path / "run"
    rc = train_main(["--run-dir", str(rd), "--baseline", "off", "--stop-after-steps", "3", *TINY])
    assert rc == 130
    assert "--resume" in capsys.readouterr()[1]
    assert train_main(["--resume", str(rd), "--quiet"]) == 0
    assert len(open(rd / "metrics.jsonl").read().splitlines()) == 1


def test_bad_data_path(tmp_path, capsys):
    rc = train_main(["--data", f"npz:{tmp_path}/missing.npz", "--run-dir", str(tmp_path / "r"), *TINY])
    one_error_line(capsys, rc, "no such file")
    rc = train_main(["--data", f"folder:{tmp_path}/missing", "--run-dir", str(tmp_path / "r"), *TINY])
    one_error_line(capsys, rc, "no such directory")


def _folder(root, per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((10, 10, 3)) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image(tmp_path, capsys, workers):
    root = _folder(tmp_path / "imgs")
    (root / "c1" / "2.png").write_bytes(b"\x89PNG but truncated")
    rc = train_main(
        [
            "--data",
            f"folder:{root}",
            "--run-dir",
            str(tmp_path / "r"),
            "--labeled-fraction",
            "0.5",
            "--workers",
            str(workers),
            "--epochs",
            "1",
            "--width",
            "4",
            "--image-size",
            "8",
            "--k",
            "1",
            "--t",
            "1",
            "--batch-size",
            "4",
            "--quiet",
            "--device",
            "cpu",
            "--baseline",
            "off",
        ]
    )
    one_error_line(capsys, rc, "cannot read image")


def test_class_without_labeled_example(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    (root / "labeled.txt").write_text("c0/0.png\n")
    rc = train_main(["--data", f"folder:{root}", "--run-dir", str(tmp_path / "r"), *TINY])
    one_error_line(capsys, rc, "'c1' has no labeled")


def test_bad_label_file(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    (root / "labeled.txt").write_text("c0/0.png\nc9/1.png\n")
    rc = train_main(["--data", f"folder:{root}", "--run-dir", str(tmp_path / "r"), *TINY])
    one_error_line(capsys, rc, "bad label file")
    p = tmp_path / "bad.npz"
    np.savez(p, x=np.zeros((10, 4, 4), np.uint8), y=np.zeros(9, int))
    rc = train_main(["--data", f"npz:{p}", "--run-dir", str(tmp_path / "r2"), *TINY])
    one_error_line(capsys, rc, "one label per image")


def test_corrupt_checkpoint(tmp_path, capsys):
    rd = tmp_path / "run"
    assert train_main(["--run-dir", str(rd), "--baseline", "off", *TINY]) == 0
    capsys.readouterr()
    (rd / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    one_error_line(capsys, train_main(["--resume", str(rd)]), "corrupt checkpoint")
    one_error_line(capsys, train_main(["--resume", str(tmp_path / "nope")]), "no such run directory")
    os.makedirs(tmp_path / "empty")
    one_error_line(capsys, train_main(["--resume", str(tmp_path / "empty")]), "no checkpoint")


def test_k_defaults_to_the_papers_ten(tmp_path):
    for data in ("digits", "mnist5k", "npz:x.npz"):
        cfg = config_from_args(train_parser().parse_args(["--data", data]), str(tmp_path / "r"))
        assert cfg.k == 10, data


def test_label_init_defaults_to_inputs_on_the_digit_sets(tmp_path):
    expect = {"digits": "inputs", "mnist5k": "inputs", "npz:x.npz": "instance", "folder:d": "instance"}
    for data, want in expect.items():
        cfg = config_from_args(train_parser().parse_args(["--data", data]), str(tmp_path / "r"))
        assert cfg.label_init == want, data
    args = train_parser().parse_args(["--label-init", "instance"])
    assert config_from_args(args, str(tmp_path / "r")).label_init == "instance"


def test_label_init_inputs_needs_array_data(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    rc = train_main(["--data", f"folder:{root}", "--run-dir", str(tmp_path / "r"), "--label-init", "inputs", *TINY])
    one_error_line(capsys, rc, "--label-init inputs needs array data")


def test_bad_flag_values(tmp_path, capsys):
    rc = train_main(["--run-dir", str(tmp_path / "r"), *TINY, "--k", "100000"])
    one_error_line(capsys, rc, "--k")
    assert not (tmp_path / "r").exists()  # a rejected config leaves no run directory behind
    with pytest.raises(SystemExit):  # argparse's own usage error for out-of-range fractions
        train_main(["--labeled-fraction", "1.5"])
    for flag in ("--propagation-start", "--warmup-epochs", "--k"):
        with pytest.raises(SystemExit):
            train_main([flag, "-1"])
        assert flag in capsys.readouterr().err


def _digits_embeddings(tmp_path):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)).astype(np.float32)
    labels = y.copy()
    labels[np.random.default_rng(0).random(len(y)) > 0.1] = -1
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "lab.npy", labels)
    return x, y, labels


@pytest.mark.parametrize("extra", [[], ["--no-density-weighting"], ["--density-pool", "all"]])
def test_propagate_cli_matches_the_ops(tmp_path, capsys, extra):
    x, y, labels = _digits_embeddings(tmp_path)
    out = tmp_path / "pseudo.npy"
    conf_out = tmp_path / "conf.npy"
    rc = propagate_main(
        [
            str(tmp_path / "emb.npy"),
            str(tmp_path / "lab.npy"),
            "--out",
            str(out),
            "--confidence-out",
            str(conf_out),
            "--chunk",
            "333",
            *extra,
        ]
    )
    assert rc == 0 and "labelled" in capsys.readouterr()[0]
    pseudo, conf = np.load(out), np.load(conf_out)
    emb = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    lab = torch.from_numpy(labels >= 0)
    rho = None
    if "--no-density-weighting" not in extra:
        mask = None if "all" in extra else ~lab
        rho = local_density(emb[lab], emb, t=25, pool_mask=mask)
    want, wconf = propagate(emb[~lab], emb[lab], torch.from_numpy(labels)[lab], rho, k=10, num_classes=10)
    assert np.array_equal(pseudo[labels >= 0], labels[labels >= 0])
    agree = (pseudo[labels < 0] == want.numpy()).mean()
    assert agree > 0.99  # chunked top-T merging may break exact ties differently
    np.testing.assert_allclose(
        conf[labels < 0][pseudo[labels < 0] == want.numpy()],
        wconf.numpy()[pseudo[labels < 0] == want.numpy()],
        atol=1e-4,
    )
    assert (pseudo[labels < 0] == y[labels < 0]).mean() > 0.85


def test_propagate_cli_errors(tmp_path, capsys):
    _digits_embeddings(tmp_path)
    rc = propagate_main([str(tmp_path / "missing.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "o.npy")])
    one_error_line(capsys, rc, "no such file", "llp-fast-propagate")
    np.save(tmp_path / "short.npy", np.zeros(5, int))
    rc = propagate_main([str(tmp_path / "emb.npy"), str(tmp_path / "short.npy"), "--out", str(tmp_path / "o.npy")])
    one_error_line(capsys, rc, "labels must be", "llp-fast-propagate")
    np.save(tmp_path / "none.npy", np.full(1797, -1))
    rc = propagate_main([str(tmp_path / "emb.npy"), str(tmp_path / "none.npy"), "--out", str(tmp_path / "o.npy")])
    one_error_line(capsys, rc, "no labeled row", "llp-fast-propagate")
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--batch-size", "-5"),
        ("--batch-size", "0"),
        ("--image-size", "0"),
        ("--width", "0"),
        ("--threads", "-1"),
        ("--epochs", "0"),
        ("--scale-min", "5"),
        ("--weight-decay", "-1"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "0"),
        ("--tau", "0"),
        ("--t", "0"),
        ("--bank-momentum", "1.5"),
        ("--unlabeled-fraction", "0"),
        ("--translate", "-2"),
        ("--workers", "-1"),
        ("--milestones", "3,-1"),
        ("--device", "gpu"),
        ("--data", "cifar"),
        ("--seed", "-3"),
    ],
)
def test_every_flag_is_checked_where_it_is_parsed(tmp_path, capsys, flag, value):
    """Each of these trained silently with a fallback, or failed late with another flag's message."""
    with pytest.raises(SystemExit) as e:
        train_main(["--run-dir", str(tmp_path / "r"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_every_config_field_has_exactly_one_flag():
    from llp_fast.train import config

    flags = {a.dest: a.option_strings for a in train_parser()._actions}
    for f in config.fields():
        if f.metadata.get("cli"):
            assert config.flag_of(f) in flags[f.name], f.name
    cli_only = {"help", "resume", "baseline", "baseline_mode", "nproc", "stop_after_steps"}
    assert set(flags) - {f.name for f in config.fields()} <= cli_only


def test_a_programming_error_keeps_its_traceback(tmp_path, monkeypatch):
    """Only errors the user can fix become one line; a bug (here a TypeError inside the loop) is
    raised with its traceback instead of being reported as a bad input."""
    from llp_fast.train.loop import Trainer

    def bug(self):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(Trainer, "fit", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        train_main(["--run-dir", str(tmp_path / "r"), "--baseline", "off", *TINY])


def test_a_stray_huge_label_is_one_line_and_fast(tmp_path, capsys):
    y = np.arange(40) % 2
    y[3] = 2**40
    p = tmp_path / "huge.npz"
    np.savez(p, x=np.zeros((40, 6, 6), np.uint8), y=y)
    rc = train_main(["--data", f"npz:{p}", "--run-dir", str(tmp_path / "r"), *TINY])
    one_error_line(capsys, rc, "class ids must be 0..S-1")


def test_an_empty_held_out_split_is_refused_before_training(tmp_path, capsys):
    y = np.full(40, -1)
    y[:4] = [0, 1, 0, 1]
    p = tmp_path / "own.npz"
    np.savez(p, x=np.zeros((40, 6, 6), np.uint8), y=y)
    rc = train_main(["--data", f"npz:{p}", "--run-dir", str(tmp_path / "r"), *TINY])
    one_error_line(capsys, rc, "held-out split is empty")
    assert not (tmp_path / "r").exists()
