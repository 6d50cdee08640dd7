"""``llp-fast-train``: runs, summaries and one-line errors (``llp-fast-propagate``: tests/test_propagate_cli.py)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, one_error_line, tiny_config

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


def test_unreadable_image_with_worker_processes_is_one_line_to_the_end(tmp_path):
    """With --workers 2 the error line was followed, at the process's exit, by tracebacks of
    multiprocessing's queue threads (the loader was torn down after the interpreter began to)."""
    import subprocess
    import sys

    root = _folder(tmp_path / "imgs", per_class=12)
    (root / "c1" / "2.png").write_bytes(b"\x89PNG but truncated")
    args = ["--data", f"folder:{root}", "--run-dir", str(tmp_path / "r"), "--labeled-fraction", "0.5"]
    args += ["--workers", "2", "--epochs", "1", "--width", "4", "--image-size", "8", "--k", "1", "--t", "1"]
    args += ["--batch-size", "4", "--quiet", "--device", "cpu", "--baseline", "off"]
    code = "import sys; from llp_fast.cli.train import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"llp-fast-train: error: cannot read image {root / 'c1' / '2.png'} (UnidentifiedImageError)"
    ], p.stderr


def test_files_not_read_as_images_are_said_in_the_first_lines(tmp_path, capsys):
    root = _folder(tmp_path / "imgs", per_class=6)
    (root / "c0" / "x.heic").write_bytes(b"not read")
    args = ["--data", f"folder:{root}", "--run-dir", str(tmp_path / "r"), "--labeled-fraction", "0.5"]
    args += ["--workers", "0", "--epochs", "1", "--width", "4", "--image-size", "8", "--k", "1", "--t", "1"]
    assert train_main([*args, "--batch-size", "4", "--device", "cpu", "--baseline", "off"]) == 0
    err = capsys.readouterr().err
    assert f"llp-fast-train: folder:{root}: 1 file is not read as images (1 .heic)" in err, err


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
    line = one_error_line(capsys, train_main(["--resume", str(rd)]), "corrupt checkpoint")
    # the way on: a new run there is refused as "already holds a run", the resume as corrupt
    assert line.endswith("this run cannot be resumed; restore the file, or start over with another --run-dir"), line
    one_error_line(capsys, train_main(["--resume", str(tmp_path / "nope")]), "no such run directory")
    line = one_error_line(capsys, train_main(["--resume", str(rd / "checkpoint.pt")]), "--resume")
    assert line.endswith("checkpoint.pt: a file; give the run directory that holds it"), (
        line
    )  # (was "no such run directory")
    os.makedirs(tmp_path / "empty")
    one_error_line(capsys, train_main(["--resume", str(tmp_path / "empty")]), "no checkpoint")


def test_k_defaults_to_the_papers_ten(tmp_path):
    for data in ("digits", "mnist5k", "npz:x.npz"):
        cfg = config_from_args(train_parser().parse_args(["--data", data]), str(tmp_path / "r"))
        assert cfg.k == 10, data


def test_label_init_inputs_needs_array_data(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    rc = train_main(["--data", f"folder:{root}", "--run-dir", str(tmp_path / "r"), "--label-init", "inputs", *TINY])
    one_error_line(capsys, rc, "--label-init inputs needs array data")


def test_users_own_small_npz_is_told_what_to_change_in_one_go(tmp_path, capsys):
    """A user's own small npz: --k and --t too large for it came one refusal after the other; y
    saved as uint8 (-1 wrapped to 255) read as a fifth class; the errors named "npz", not the file."""
    p = tmp_path / "s20.npz"
    np.savez(p, x=np.zeros((20, 10, 10), np.uint8), y=np.array([0, 1] * 5 + [-1] * 10))
    rc = train_main(["--data", f"npz:{p}", "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--quiet"])
    one_error_line(
        capsys,
        rc,
        "--k 10 exceeds the 8 labeled training examples: give --k 8 or less (--k 0: from the labels), or label "
        "more; --t 25 exceeds",
    )
    y = np.arange(200) % 4
    y[40:] = -1
    np.savez(p, x=np.zeros((200, 10, 10), np.uint8), y=y.astype(np.uint8))
    rc = train_main(["--data", f"npz:{p}", "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--quiet"])
    one_error_line(capsys, rc, f"{p}: 'y' is uint8, which cannot hold -1 (unlabeled)")
    np.savez(p, x=np.zeros((8, 10, 10), np.uint8), y=np.array([0, 1, 2, 5, 0, 1, 2, 5]))
    rc = train_main(["--data", f"npz:{p}", "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--quiet"])
    one_error_line(capsys, rc, f"npz:{p}: class ids must be 0..S-1")
    np.savez(p, x=np.zeros((0, 10, 10), np.uint8), y=np.zeros(0, int))
    rc = train_main(["--data", f"npz:{p}", "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--quiet"])
    one_error_line(capsys, rc, f"{p}: 'x' holds no image")


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


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--batch-size", "-5"),
        ("--batch-size", "0"),
        ("--image-size", "0"),
        ("--width", "0"),
        ("--threads", "-1"),
        ("--threads", "100000"),  # a segmentation fault in OpenMP when torch started them
        ("--tau", "1e-37"),  # (a traceback from inside an op: D / tau overflowed float32)
        ("--resume", ""),  # (an unset shell variable: a new run started, with every default)
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
        ("--milestones", "3,3"),  # a double drop (the lr cut 100x at once)
        ("--milestones", "0"),  # a drop before any training
        ("--jump-milestones", "9,7"),
        ("--device", "gpu"),
        ("--data", "cifar"),
        ("--data", "npz:"),  # read the current directory as the file
        ("--rate-jump", "0"),  # the run never trained at its starting lr
        ("--seed", "-3"),
        ("--seed", str(2**63)),  # torch's and NumPy's overflow traceback
        # a mistyped size: a traceback after the run directory was written, the out-of-memory killer, a
        # hang, or thousands of processes started
        ("--image-size", "100000"),
        ("--width", str(10**22)),
        ("--labeled-batch", str(10**22)),
        ("--start-rounds", str(10**22)),
        ("--refresh-rounds", "5000"),
        ("--batch-size", str(10**9)),
        ("--nproc", str(10**22)),
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
    cli_only = {
        "help",
        "version",
        "resume",
        "baseline",
        "baseline_mode",
        "nproc",
        "max_restarts",
        "dist_timeout",
        "stop_after_steps",
    }
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


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_bad_held_out_image_keeps_the_epoch_it_ends(tmp_path, capsys, workers):
    """Held-out files are first read by the epoch's evaluation: a corrupt one ended the run after
    the whole epoch had trained, with no checkpoint (hours on a large data set). Read by DataLoader
    workers, the line lost what was kept and how to go on (the worker's error holds its traceback)."""
    from test_data import make_folder

    from llp_fast.train.checkpoint import peek

    root = tmp_path / "d"
    make_folder(root / "train", per_class=10)
    make_folder(root / "test", per_class=2)
    (root / "test" / "class0" / "9.png").write_bytes(b"not a png")
    args = ["--data", f"folder:{root}", "--loader", "pil", "--workers", workers, "--epochs", "1", "--width", "4"]
    args += ["--image-size", "8", "--k", "3", "--t", "5", "--labeled-fraction", "0.3", "--baseline", "off", "--quiet"]
    run = str(tmp_path / "r")
    rc = train_main([*args, "--run-dir", run])
    line = one_error_line(capsys, rc, "cannot read image")
    assert "9.png" in line and "(epoch 0 and " in line and f"continue with: llp-fast-train --resume {run}" in line
    assert peek(run)["step_in_epoch"] > 0
    (root / "test" / "class0" / "9.png").unlink()
    assert train_main(["--resume", run, "--quiet"]) == 0
    assert peek(run)["epoch"] == 1
    # a resume over other files (one renamed in place) trained other images at the saved rows
    (root / "train" / "class1" / "3.png").rename(root / "train" / "class1" / "3b.png")
    rc = train_main(["--resume", run, "--epochs", "2", "--quiet"])
    one_error_line(capsys, rc, "are not those the run began with (a training image renamed, added or removed")
    (root / "train" / "class1" / "3b.png").rename(root / "train" / "class1" / "3.png")
    assert train_main(["--resume", run, "--epochs", "2", "--quiet"]) == 0


def test_a_resume_over_other_pixels_in_the_same_npz_is_refused(tmp_path, capsys):
    """Array data kept only its split's labels: a resume over an npz rewritten with other images
    (the same labels) trained them under the saved rows without a word. Its pixels' digest is now
    checked, as a folder's file names are; the same file restored resumes."""
    from llp_fast.errors import CheckpointError
    from llp_fast.train.trained import load_network

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 8, 8), dtype=np.uint8)
    y = np.arange(300) % 3
    p = tmp_path / "own.npz"
    np.savez(p, x=x, y=y)
    run = str(tmp_path / "r")
    assert train_main(["--data", f"npz:{p}", "--run-dir", run, *TINY, "--labeled-fraction", "0.2"]) == 0
    other = x.copy()
    other[:, 3, 3] ^= 1  # one grey level of one pixel of each image
    np.savez(p, x=other, y=y)
    rc = train_main(["--resume", run, "--epochs", "2", "--quiet"])
    one_error_line(
        capsys,
        rc,
        "are not those the run began with (a training image renamed, added or removed, or an array's pixels changed)",
    )
    with pytest.raises(CheckpointError, match="is not what it trained on"):
        load_network(run)
    np.savez(p, x=x, y=y)
    assert train_main(["--resume", run, "--epochs", "2", "--quiet"]) == 0


def test_a_bare_data_path_names_the_prefix_that_reads_it(tmp_path, capsys):
    for value, hint in ((str(tmp_path / "my.npz"), "npz:"), (str(tmp_path), "folder:")):
        with pytest.raises(SystemExit):
            train_main(["--data", value])
        assert f"(this {'file' if hint == 'npz:' else 'folder'}: {hint}{value})" in capsys.readouterr().err


def test_a_labeled_fraction_the_data_overrides_is_said(tmp_path, capsys):
    """An npz with its own -1 entries trains with its own labels; --labeled-fraction was dropped
    without a word."""
    rng = np.random.default_rng(0)
    y = np.where(rng.random(120) < 0.3, np.arange(120) % 3, -1)
    y[:3] = [0, 1, 2]
    p = tmp_path / "own.npz"
    np.savez(p, x=rng.integers(0, 255, (120, 6, 6), dtype=np.uint8), y=y)
    args = ["--data", f"npz:{p}", *TINY_ARGS, "--baseline", "off", "--labeled-fraction", "0.5"]
    assert train_main([*args, "--run-dir", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "--labeled-fraction 0.5 is not used: the data marks its own labeled set (" in err
    assert train_main([*args[:-2], "--run-dir", str(tmp_path / "s")]) == 0  # not given: not said
    assert "--labeled-fraction" not in capsys.readouterr().err
    assert train_main([*args[:-1], "0.1", "--run-dir", str(tmp_path / "t")]) == 0  # the default's value, given
    assert "--labeled-fraction 0.1 is not used" in capsys.readouterr().err
    # fit() in Python: the same notes, printed and returned (it printed none of them)
    from llp_fast.train.api import fit

    settings = dataclasses.asdict(tiny_config(tmp_path, "py", data=f"npz:{p}", quiet=False, labeled_fraction=0.5))
    out = fit(None, settings.pop("data"), **settings)
    note = next(n for n in out.notes if n.startswith("--labeled-fraction 0.5 is not used"))
    assert f"llp_fast.train.fit: {note}" in capsys.readouterr().err


def test_every_example_labeled_is_refused_naming_the_fraction(tmp_path, capsys):
    """It blamed --t (the density pool of 0 examples), a flag the user had not given."""
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((40, 6, 6), np.uint8), y=np.arange(40) % 2)
    rc = train_main(["--data", f"npz:{p}", "--run-dir", str(tmp_path / "r"), *TINY, "--labeled-fraction", "1"])
    one_error_line(capsys, rc, "no unlabeled training example is left (all 32 are labeled; --labeled-fraction 1.0)")
    # one training example a class: each stays labeled whatever the fraction (it said to lower it)
    p = tmp_path / "one.npz"
    x = np.zeros((2, 6, 6), np.uint8)
    np.savez(p, x=x, y=np.array([0, 1]), x_test=x, y_test=np.array([0, 1]))
    rc = train_main(
        ["--data", f"npz:{p}", "--run-dir", str(tmp_path / "r1"), *TINY, "--labeled-fraction", "0.01", "--k", "2"]
    )
    one_error_line(capsys, rc, "every class keeps at least one labeled example: add unlabeled images")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "tool,body,argv",
    [
        ("propagate", "_run", lambda t: [str(t / "e.npy"), str(t / "l.npy"), "--out", str(t / "o.npy")]),
        ("select", "_main", lambda t: [str(t / "run"), "--source", f"npz:{t / 'p.npz'}", "--out", str(t / "s.npz")]),
        ("probe", "_main", lambda t: [str(t / "run"), "--data", "digits"]),
        ("analyze", "_main", lambda t: [str(t / "run")]),
    ],
)
def test_every_tool_keeps_a_bugs_traceback_and_makes_user_errors_one_line(
    tool, body, argv, tmp_path, monkeypatch, capsys
):
    """The other four commands share llp-fast-train's contract (cli/_common.run): an error the user
    can fix is one line and exit 2; a TypeError or RuntimeError from a bug propagates with its
    traceback."""
    import importlib

    from llp_fast.errors import DataError

    module = importlib.import_module(f"llp_fast.cli.{tool}")
    for bug in (TypeError("unsupported operand type(s)"), RuntimeError("shape '[2, 3]' is invalid")):

        def broken(args, bug=bug):
            raise bug

        monkeypatch.setattr(module, body, broken)
        with pytest.raises(type(bug)) as raised:
            module.main(argv(tmp_path))
        assert raised.value is bug

    def bad_input(args):
        raise DataError(f"{tmp_path / 'e.npy'}: not a .npy file")

    monkeypatch.setattr(module, body, bad_input)
    one_error_line(capsys, module.main(argv(tmp_path)), "not a .npy file", prog=module.PROG)


def test_a_finished_baseline_hands_its_threads_back(capsys, monkeypatch):
    """LLP trains on with every core once the baseline beside it has ended, unless --threads was given."""
    import types

    import torch

    from llp_fast.cli import launch
    from llp_fast.cli.launch import Baseline, threads_for

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # (=1, as in a one-thread session: nothing to hand back)
    monkeypatch.setattr(launch, "usable_cores", lambda: 2)

    before = torch.get_num_threads()
    try:
        for threads, alive, want in [(0, True, 1), (0, False, threads_for(2)), (1, False, 1)]:
            torch.set_num_threads(1)
            cfg = types.SimpleNamespace(threads=threads, quiet=False, run_dir="r")
            args = types.SimpleNamespace(baseline_mode="parallel")
            b = Baseline(cfg, args, False, resumed=False, rank=0, prog="llp-fast-train")
            b.proc = types.SimpleNamespace(is_alive=lambda alive=alive: alive)
            b._reclaim()
            assert torch.get_num_threads() == want, (threads, alive)
            assert ("the baseline has finished" in capsys.readouterr().err) == (threads == 0 and not alive)
    finally:
        torch.set_num_threads(before)


def test_usable_cores_are_the_affinity_and_threads_at_most_omp_num_threads(monkeypatch):
    """The baseline beside LLP split os.cpu_count(): in a container given 2 of 64 cores, 32 threads
    each; and OMP_NUM_THREADS (a process's thread count) was overridden."""
    from llp_fast.cli import launch

    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 64)
    assert launch.usable_cores() == 4
    for value, want in (("1", 1), ("8", 2), ("", 2), ("x", 2), ("0", 2)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert launch.usable_cores() == 4 and launch.threads_for(2) == want, value


def test_a_run_directory_inside_the_folder_data_is_refused(tmp_path, capsys, monkeypatch):
    """Its files read as a class of no images: the default ./runs/<time> made in the data's folder
    failed every run there, and a run that wrote its tb/ into the data broke every later run on it,
    its own resume included. A split layout reads train/ and test/ alone: a run beside them is fine."""
    from test_data import make_folder

    root = make_folder(tmp_path / "imgs")
    monkeypatch.chdir(root)
    one_error_line(capsys, train_main(["--data", "folder:."]), "the default run directory (./runs/<time>) lies inside")
    assert sorted(os.listdir(root)) == ["class0", "class1", "class2"]  # no runs/ left there
    for run in (root, root / "class0" / "r"):
        one_error_line(capsys, train_main(["--data", f"folder:{root}", "--run-dir", str(run)]), f"--run-dir {run} lies")
    split = tmp_path / "split"
    make_folder(split / "train", per_class=8)
    make_folder(split / "test", per_class=2)
    one_error_line(
        capsys, train_main(["--data", f"folder:{split}", "--run-dir", str(split / "test" / "r")]), "lies inside"
    )
    argv = ["--data", f"folder:{split}", "--run-dir", str(split / "runs" / "r"), *TINY_ARGS, "--k", "2", "--t", "3"]
    assert train_main([*argv, "--baseline", "off", "--quiet", "--workers", "0"]) == 0


def test_llp_settings_given_to_a_supervised_only_run_are_named(tmp_path, capsys):
    """--supervised-only --method fixmatch --k 3 --consistency 2 dropped all three without a word."""
    argv = ["--run-dir", str(tmp_path / "r"), *TINY_ARGS, "--supervised-only", "--method", "fixmatch"]
    assert train_main([*argv, "--consistency", "2", "--epochs", "1", "--no-confidence"]) == 0
    out = "".join(capsys.readouterr())
    line = next(x for x in out.splitlines() if "--supervised-only trains on the labeled examples alone" in x)
    # (TINY_ARGS gives --k and --t; an on/off setting is named by the flag given: it said "--confidence")
    assert line.endswith(": --method, --consistency, --k, --t, --no-confidence not used"), line
    # a resume: its saved config holds what the run chose, not what was given (it listed ten flags)
    assert train_main(["--resume", str(tmp_path / "r"), "--epochs", "2"]) == 0
    assert "not used" not in "".join(capsys.readouterr())


def test_warm_up_that_takes_the_whole_run_is_refused(tmp_path, capsys):
    """--epochs 1 --warmup-epochs 5 trained instance discrimination alone and reported 7.2%."""
    rc = train_main(["--run-dir", str(tmp_path / "r"), *TINY_ARGS, "--warmup-epochs", "5"])
    one_error_line(capsys, rc, "--warmup-epochs 5: the whole run of --epochs 1 would be warm-up")
    assert not (tmp_path / "r").exists()
    rc = train_main(["--run-dir", str(tmp_path / "d"), "--warmup-epochs", "1000", "--quiet"])  # the default epochs
    one_error_line(capsys, rc, "--warmup-epochs 1000: the whole run of --epochs 40 would be warm-up")


def test_an_empty_run_dir_is_refused(capsys):
    """--run-dir "" (and fit(run_dir="")) silently trained in runs/<time>."""
    with pytest.raises(SystemExit) as e:
        train_main(["--run-dir", ""])
    assert e.value.code == 2 and "argument --run-dir: expected a directory path" in capsys.readouterr().err


def test_fixmatch_without_its_consistency_term_is_refused(tmp_path, capsys):
    rc = train_main(["--run-dir", str(tmp_path / "r"), "--method", "fixmatch", "--consistency", "0"])
    assert rc == 2 and "--method fixmatch without its consistency term" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as e:  # was "f: File exists", after the data had loaded
        train_main(["--run-dir", str(tmp_path / "f")])
    assert e.value.code == 2 and "argument --run-dir: " in capsys.readouterr().err


_START = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job starts with it ignored)
sys.argv[0] = {prog!r}
import llp_fast
{then}
os.kill(os.getpid(), signal.{sig})
import time
time.sleep(30)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("prog", ["/opt/venv/bin/llp-fast-train", "llp-fast-propagate.exe", "my_script.py"])
def test_ctrl_c_while_a_command_starts_is_one_line(prog, sig):
    """A Ctrl-C or SIGTERM before the command's own handling begins (the import of torch) is one line
    for the package's commands, by the SIGINT exit (a SIGTERM ended them silently, 143); any other
    program keeps Python's traceback, and SIGTERM's own exit."""
    import signal
    import subprocess
    import sys

    code = _START.format(prog=prog, then="", sig=sig)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if "llp-fast" in prog:
        name = os.path.basename(prog).removesuffix(".exe")
        assert p.returncode == -signal.SIGINT
        assert p.stderr == f"{name}: interrupted while starting; nothing was written\n"
    elif sig == "SIGINT":
        assert p.returncode == -signal.SIGINT
        assert "Traceback" in p.stderr and p.stderr.rstrip().endswith("KeyboardInterrupt")
    else:
        assert p.returncode == -signal.SIGTERM and p.stderr == ""


_HELD = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv[0] = {prog!r}
seen = []


class Watch:  # records the signal mask when torch is first looked for, and sends a Ctrl-C then
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, set())))
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, Watch())
try:
    import llp_fast
except KeyboardInterrupt:
    print(seen[0], flush=True)
    print("whole" if all(m in sys.modules for m in ("numpy.linalg", "torch.nn", "llp_fast.ops")) else "part")
    print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, set())), flush=True)
"""


_SEND_AT_TORCH = """
import os, signal, sys


class Send:  # a Ctrl-C when torch is first looked for, inside the command's imports
    done = False

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not self.done:
            self.done = True
            os.kill(os.getpid(), signal.SIGINT)
        return None


signal.signal(signal.SIGINT, signal.default_int_handler)
sys.meta_path.insert(0, Send())
"""


@pytest.mark.parametrize("how", [["-m", "llp_fast.cli"], ["-X", "utf8", "-mllp_fast.cli"], ["-m", "llp_fast"]])
def test_python_m_llp_fast_cli_is_the_command_while_it_starts(tmp_path, how):
    """python -m llp_fast.cli (README: the same as llp-fast-train) printed a traceback for a Ctrl-C
    while it started: its argv[0] is "-m" while its packages import (found by review, 2026-12-08).
    python -m llp_fast (versions and backends) is not a command: Python's own traceback."""
    import signal
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(_SEND_AT_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    p = subprocess.run([sys.executable, *how, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == -signal.SIGINT, (p.returncode, p.stderr[-2000:])
    if how[-1].endswith("llp_fast.cli"):
        assert p.stderr == "llp-fast-train: interrupted while starting; nothing was written\n", p.stderr
    else:
        assert "Traceback" in p.stderr and p.stderr.rstrip().endswith("KeyboardInterrupt"), p.stderr


@pytest.mark.parametrize("prog", ["llp-fast-train", "my_script.py"])
def test_a_signal_while_torch_imports_waits_for_the_imports(prog):
    """A Ctrl-C inside torch's import of NumPy was swallowed by their C code (6 of 40 tries at 0.15-0.6 s):
    NumPy stayed half imported (``module 'numpy' has no attribute 'matrix'`` later) or the command
    ran to its end (found by review, 2026-12-08). In a command the signals wait for the imports."""
    import json
    import signal
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _HELD.format(prog=prog)], capture_output=True, text=True)
    during, whole, after = p.stdout.splitlines()
    held = {int(signal.SIGINT), int(signal.SIGTERM)}
    if prog.startswith("llp-fast-"):  # held through the imports, the interrupt after them, then let go
        assert held <= set(json.loads(during)) and whole == "whole" and not held & set(json.loads(after)), p.stdout
    else:  # another program: nothing held (the interrupt arrives inside torch's import)
        assert not held & set(json.loads(during)) and whole == "part", p.stdout


def test_a_commands_own_handling_takes_the_start_hook_back():
    """Once ``_common.run`` begins, its contract prints a Ctrl-C; an uncaught one after it is Python's."""
    import signal
    import subprocess
    import sys

    then = (
        "from llp_fast.cli import _common\n"
        "assert sys.excepthook is not sys.__excepthook__\n"
        "assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL\n"
        "assert _common.run('llp-fast-x', lambda: 0) == 0\n"
        "assert sys.excepthook is sys.__excepthook__\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL"
    )
    p = subprocess.run(
        [sys.executable, "-c", _START.format(prog="llp-fast-x", then=then, sig="SIGINT")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == -signal.SIGINT
    assert "Traceback" in p.stderr and "interrupted while starting" not in p.stderr


def test_an_empty_input_path_is_refused_by_every_tool(capsys):
    """An unset shell variable as an input: --extra-unlabeled '' trained without the selection (and
    saved ''), --model '' read ./model.npz, -analyze '' read the current folder, --compare '' was
    dropped."""
    import importlib

    for module, argv in (
        ("llp_fast.cli.train", ["--extra-unlabeled", ""]),
        ("llp_fast.cli.propagate", ["e.npy", "--model", "", "--out", "p.npy"]),
        ("llp_fast.cli.propagate", ["", "l.npy", "--out", "p.npy"]),
        ("llp_fast.cli.analyze", [""]),
        ("llp_fast.cli.analyze", ["RUN", "--compare", ""]),
        ("llp_fast.cli.select", ["", "--source", "digits", "--out", "s.npz"]),
        ("llp_fast.cli.probe", ["", "--data", "digits"]),
        # checked where parsed, naming the flag: it said "unknown pool ''", or "no such file: " once the
        # network was loaded
        ("llp_fast.cli.select", ["RUN", "--source", "", "--out", "s.npz"]),
        ("llp_fast.cli.select", ["RUN", "--source", "npz:", "--out", "s.npz"]),
        ("llp_fast.cli.probe", ["RUN", "--data", ""]),
        ("llp_fast.cli.probe", ["RUN", "--data", "npz:"]),
    ):
        with pytest.raises(SystemExit) as e:
            importlib.import_module(module).main(argv)
        err = capsys.readouterr().err
        last = err.splitlines()[-1]
        assert e.value.code == 2 and ("the path is empty; give one" in last or "argument --" in last), (argv, err)


@pytest.mark.parametrize(
    "argv",
    [
        ["llp_fast.cli.probe", "--data", "digits", "--out", "", "RUN"],
        ["llp_fast.cli.analyze", "RUN", "--out", ""],
        ["llp_fast.cli.select", "RUN", "--out", ""],
    ],
)
def test_an_empty_out_is_refused_by_every_tool(argv):
    """An unset shell variable: -linear-probe wrote no JSON, exit 0; -analyze wrote into RUN/analysis."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(argv[0]).main(argv[1:])
    assert e.value.code == 2
