"""Checkpoints are verified on every load; a resume reads one once and restores the run's record
(metrics.jsonl, TensorBoard) from it."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import one_error_line, tiny_config

from llp_fast.cli.analyze import main as analyze_main
from llp_fast.cli.probe import main as probe_main
from llp_fast.cli.select import main as select_main
from llp_fast.cli.train import main as train_main
from llp_fast.errors import CheckpointError, Interrupted
from llp_fast.train import checkpoint
from llp_fast.train.api import train
from llp_fast.train.checkpoint import CHECKPOINT, METRICS
from llp_fast.train.loop import Trainer
from llp_fast.train.report import read_metrics

# native code at odd settings (tiny networks, one thread, gloo): a crash fails these tests, not the run (_isolate.py)
pytestmark = pytest.mark.isolated

torch.set_num_threads(1)
TIMING = {"images_per_s", "epoch_seconds"}


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("ckpt"), epochs=1)
    train(cfg)
    return cfg.run_dir


def _flip_middle(path, n=64):
    """Flips ``n`` bytes in the middle of the file: inside the largest tensors' storage, so that
    the zip and the pickle still load and only the digest can tell."""
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)


def test_flipped_bytes_are_refused_by_every_tool(finished_run, tmp_path, capsys):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    path = os.path.join(run, CHECKPOINT)
    _flip_middle(path)
    torch.load(path, weights_only=True)  # still loads: without the digest it would resume silently
    with pytest.raises(CheckpointError, match="do not match their digest"):
        checkpoint.load(path)
    one_error_line(capsys, train_main(["--resume", run, "--epochs", "2"]), "corrupt checkpoint", "llp-fast-train")
    np.savez(tmp_path / "pool.npz", x=np.zeros((4, 8, 8), np.uint8))
    out = str(tmp_path / "sel.npz")
    one_error_line(
        capsys, select_main([run, "--source", f"npz:{tmp_path}/pool.npz", "--out", out]), "corrupt", "llp-fast-select"
    )
    line = one_error_line(capsys, probe_main([run, "--data", "digits"]), "corrupt checkpoint", "llp-fast-linear-probe")
    assert "resumed" not in line  # (the way on is the trainer's)
    # a data or metrics file given in the checkpoint's place is not "corrupt": it is not one
    metrics = os.path.join(run, "metrics.jsonl")
    line = one_error_line(
        capsys, probe_main([metrics, "--data", "digits"]), "is not a checkpoint", "llp-fast-linear-probe"
    )
    assert line.endswith(f"{metrics} is not a checkpoint (a .jsonl file): give a run directory or its checkpoint.pt")
    one_error_line(
        capsys,
        select_main([f"{tmp_path}/pool.npz", "--source", f"npz:{tmp_path}/pool.npz", "--out", out]),
        "pool.npz is not a checkpoint (a .npz file)",
        "llp-fast-select",
    )
    one_error_line(capsys, analyze_main([run]), "corrupt checkpoint", "llp-fast-analyze")


def test_a_checkpoint_missing_an_entry_is_corrupt_not_a_key_error(finished_run, tmp_path, capsys):
    state = torch.load(os.path.join(finished_run, CHECKPOINT), weights_only=True)
    # "bank" and "ema" may hold None: missing, they passed as None (llp-fast-analyze: a KeyError)
    for key in ("global_step", "order_state", "epoch_stats", "history", "bank", "ema"):
        run = tmp_path / key
        run.mkdir()
        broken = {k: v for k, v in state.items() if k not in (key, "sha256")}
        checkpoint.save(broken, str(run / CHECKPOINT))  # a valid digest over incomplete contents
        with pytest.raises(CheckpointError, match=f"entry '{key}' missing"):
            checkpoint.load(str(run / CHECKPOINT))
        one_error_line(capsys, train_main(["--resume", str(run)]), f"'{key}'", "llp-fast-train")


def test_resume_loads_the_checkpoint_once(finished_run, tmp_path, monkeypatch, capsys):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    calls = []
    real = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert train_main(["--resume", run, "--quiet"]) == 0
    assert len(calls) == 1


def test_resume_names_the_flags_it_will_not_take(finished_run, tmp_path, capsys):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    rc = train_main(["--resume", run, "--epochs", "14", "--lr", "5", "--data", "mnist5k"])
    out, err = capsys.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--lr (saved: " in err and "--data (saved: " in err and "cannot change" in err
    assert "--epochs" in err.split("only")[1] and "--loader" in err.split("only")[1]
    saved = json.load(open(os.path.join(run, "config.json")))  # the saved values themselves pass
    rc = train_main(["--resume", run, "--lr", str(saved["lr"]), "--data", saved["data"], "--quiet"])
    assert rc == 0, capsys.readouterr().err
    with pytest.raises(SystemExit):  # checked where parsed, resume or not
        train_main(["--resume", run, "--epochs", "0"])
    assert "--epochs" in capsys.readouterr().err


def test_resume_with_more_epochs_trains_them_and_says_so(finished_run, tmp_path, capsys):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    assert train_main(["--resume", run, "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "--epochs 2 replaces the saved 1" in err
    assert [r["epoch"] for r in read_metrics(os.path.join(run, METRICS))] == [1, 2]
    one_error_line(capsys, train_main(["--resume", run, "--epochs", "1"]), "completed 2 epochs", "llp-fast-train")


def _interrupted_after_one_epoch(tmp_path, name):
    probe = Trainer(tiny_config(tmp_path, "probe" + name, epochs=2))
    cut = tiny_config(tmp_path, name, epochs=2, stop_after_steps=probe.steps_per_epoch() + 2)
    with pytest.raises(Interrupted):
        train(cut)
    return cut


def test_a_torn_last_metrics_line_or_a_deleted_file_is_restored_on_resume(tmp_path):
    full = tiny_config(tmp_path, "full", epochs=2)
    train(full)
    want = untimed(read_metrics(os.path.join(full.run_dir, METRICS)))
    for damage in ("torn", "deleted"):
        cut = _interrupted_after_one_epoch(tmp_path, damage)
        path = os.path.join(cut.run_dir, METRICS)
        assert len(read_metrics(path)) == 1
        if damage == "torn":
            with open(path, "a") as f:
                f.write('{"epoch": 2, "test_to')  # a crash in the middle of a write
        else:
            os.remove(path)
        train(dataclasses.replace(cut, stop_after_steps=None), resume=True)
        assert untimed(read_metrics(path)) == want, damage


def test_a_bad_metrics_line_names_the_file_and_line(tmp_path):
    path = tmp_path / METRICS
    path.write_text('{"epoch": 1}\n{"epoch": 2, "te\n')
    with pytest.raises(ValueError, match=f"{METRICS}:2"):
        read_metrics(str(path))


def _event_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics_scalars_one_writer_per_run(tmp_path):
    pytest.importorskip("tensorboard", reason="the tb extra (pip install -e .[tb]) is not installed")
    cut = _interrupted_after_one_epoch(tmp_path, "tb")
    tb = os.path.join(cut.run_dir, "tb")
    assert len([f for f in os.listdir(tb) if "tfevents" in f]) == 1  # one writer, not one per epoch
    train(dataclasses.replace(cut, stop_after_steps=None), resume=True)
    assert len([f for f in os.listdir(tb) if "tfevents" in f]) == 2  # reopened on resume
    rows = read_metrics(os.path.join(cut.run_dir, METRICS))
    got = _event_scalars(tb)
    want = {}
    for row in rows:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                want.setdefault(key, {})[row["epoch"]] = value
    assert set(got) == set(want)
    for key, series in want.items():
        assert set(got[key]) == set(series), key
        for step, value in series.items():
            assert got[key][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)


def test_a_start_over_an_attempt_without_a_checkpoint_purges_its_tensorboard_epochs(tmp_path):
    """A run whose first attempt failed before its first checkpoint (a full disk) starts again in
    the same directory, and TensorBoard showed both attempts' epoch 1 (found by review, 2026-12-08)."""
    pytest.importorskip("tensorboard", reason="the tb extra (pip install -e .[tb]) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llp_fast.train.report import TensorBoard

    run = str(tmp_path)
    for attempt, epochs in ((1, 2), (2, 1)):  # the second attempt dies after epoch 1 ...
        tb = TensorBoard(run, 0)
        for epoch in range(1, epochs + 1):
            tb.add({"epoch": epoch, "test_top1": attempt + epoch / 10})
    TensorBoard(run, 1).add({"epoch": 2, "test_top1": 9.0})  # ... and is resumed from its checkpoint
    acc = EventAccumulator(os.path.join(run, "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("test_top1")] == [(1, pytest.approx(2.1)), (2, 9.0)]


def test_history_travels_in_the_checkpoint(finished_run):
    ckpt = checkpoint.load(os.path.join(finished_run, CHECKPOINT))
    rows = read_metrics(os.path.join(finished_run, METRICS))
    assert json.loads(json.dumps(ckpt["history"])) == rows


def test_a_stale_bank_file_that_cannot_go_names_the_run_directory(tmp_path, monkeypatch, capsys):
    """A run directory that became read-only: removing an earlier checkpoint's bank file read
    "RUN/bank-3-r0.pt: Permission denied", with no word of what was being done."""
    import errno

    (tmp_path / "bank-3-r0.pt").write_bytes(b"x")
    real = os.remove

    def refuse(path, *a, **k):
        if os.path.basename(path).startswith("bank-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "remove", refuse)
    with pytest.raises(OSError) as info:
        checkpoint.sweep(str(tmp_path), None)
    assert str(info.value) == (
        f"cannot write {tmp_path}: Permission denied; removing bank-3-r0.pt, a bank file no checkpoint lists"
    )
    monkeypatch.setattr(os, "remove", real)
    assert checkpoint.sweep(str(tmp_path), None) == [str(tmp_path / "bank-3-r0.pt")]


def test_the_epochs_a_resume_may_give():
    """One rule for the command line and fit(): a shorter run than done, a stop partway into an
    epoch, and a run that keeps its --rate-jump or whole-run --warmup-epochs (resumed with --epochs
    at or below it, the error named a flag a resume refuses); the fewest epochs named once (each
    bound was refused alone, and one's advice met the next)."""
    from llp_fast.errors import ConfigError
    from llp_fast.train import TrainConfig
    from llp_fast.train.resume import check_resume_epochs

    cfg = TrainConfig(run_dir="r", epochs=40, rate_jump=30, jump_milestones=[35])
    check_resume_epochs(31, {"epoch": 1, "step_in_epoch": 5}, cfg)  # fine
    warm = TrainConfig(run_dir="r", epochs=4, warmup_epochs=2)
    for epochs, ckpt, c, words in (
        (1, {"epoch": 1, "step_in_epoch": 5}, cfg, r"\(it keeps its --rate-jump 30\); give --epochs 31 or more"),
        (0, {"epoch": 1, "step_in_epoch": 0}, warm, r"\(it keeps its --warmup-epochs 2\); give --epochs 3 or more"),
        (
            0,
            {"epoch": 1, "step_in_epoch": 0},
            TrainConfig(run_dir="r"),
            r"\(it has completed 1 epochs\); give --epochs 1",
        ),
        (
            1,
            {"epoch": 1, "step_in_epoch": 5},
            TrainConfig(run_dir="r"),
            r"partway into epoch 2\); give --epochs 2 or more",
        ),
    ):
        with pytest.raises(ConfigError, match=words):
            check_resume_epochs(epochs, ckpt, c)
    check_resume_epochs(1, {"epoch": 1}, TrainConfig(run_dir="r"))  # (no jump; done, not partway)
    check_resume_epochs(2, {"epoch": 1}, TrainConfig(run_dir="r", warmup_epochs=2, supervised_only=True))


def test_a_resume_cannot_end_before_its_baseline(tmp_path, capsys):
    """The baseline beside a run may be further along (its step is cheaper): a resume with --epochs
    below the baseline's trained LLP, then failed on the baseline, and every later resume the same."""
    from conftest import TINY_ARGS

    run = str(tmp_path / "r")
    flags = [*TINY_ARGS, "--baseline", "on", "--baseline-mode", "sequential", "--quiet", "--run-dir", run]
    assert train_main([*flags[:1], "2", *flags[2:]]) == 0  # (TINY_ARGS starts with --epochs 1)
    assert train_main(["--resume", os.path.join(run, "baseline"), "--epochs", "4", "--quiet"]) == 0
    capsys.readouterr()
    rc = train_main(["--resume", run, "--epochs", "3", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "baseline cannot end there (it has completed 4 epochs); give --epochs 4 or more" in err, err
    assert len(read_metrics(os.path.join(run, METRICS))) == 2  # refused before LLP trained
    assert train_main(["--resume", run, "--epochs", "4", "--quiet"]) == 0


def test_train_resumed_takes_this_calls_quiet_threads_and_workers(tmp_path):
    """train(cfg, resume=True) kept only the resumable settings set away from their defaults (for the
    loader: "auto" replaced a saved "pil"), which lost quiet=False, threads=0 and workers=2 given to
    undo a run's quiet=True, threads=1, workers=4."""
    cfg = tiny_config(tmp_path, "q", epochs=1, quiet=True, threads=1, workers=4)
    train(cfg)
    train(dataclasses.replace(cfg, epochs=2, quiet=False, threads=0, workers=2), resume=True)
    saved = json.load(open(os.path.join(cfg.run_dir, "config.json")))
    assert (saved["quiet"], saved["threads"], saved["workers"], saved["epochs"]) == (False, 0, 2, 2)


def test_prepare_and_fit_resumed_keep_a_saved_loader_and_take_this_calls_quiet(tmp_path):
    """prepare(cfg, resume=True) replaced a saved --loader pil with the default "auto" (DALI where it
    is installed: the loader the run had been told to avoid); fit(resume=True) kept a saved
    quiet=True (a run begun quiet resumed silent)."""
    from test_data import make_folder

    from llp_fast.train import TrainConfig
    from llp_fast.train.api import fit, prepare

    root = make_folder(tmp_path / "imgs", per_class=6)
    small = dict(width=4, image_size=8, threads=1, labeled_fraction=0.5, k=2, t=5, method="paper", batch_size=16)
    run = str(tmp_path / "r")
    fit(None, f"folder:{root}", run_dir=run, epochs=1, quiet=True, loader="pil", workers=0, **small)
    again = prepare(TrainConfig(data=f"folder:{root}", run_dir=run, epochs=2), resume=True)
    assert again.cfg.loader == "pil"
    again.claim.release()  # (prepare claims the run directory; nothing trained)
    fit(None, f"folder:{root}", run_dir=run, resume=True, epochs=2)
    assert json.load(open(os.path.join(run, "config.json")))["quiet"] is False
