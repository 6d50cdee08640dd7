"""llp-fast-analyze writes valid, non-blank PNGs and an index from a run directory."""

import json
import os
import time

import numpy as np
import pytest
import torch

from llp_fast import MemoryBank
from llp_fast.analyze import class_density_and_counts
from llp_fast.cli.analyze import main
from llp_fast.train import checkpoint

# native code at odd settings (tiny networks, one thread, gloo): a crash fails these tests, not the run (_isolate.py)
pytestmark = pytest.mark.isolated

PNG = b"\x89PNG\r\n\x1a\n"


def _make_run(path, *, density_weighting=True, epochs=3):
    """A small real run: clustered embeddings pushed through MemoryBank steps."""
    g = torch.Generator().manual_seed(1)
    n, s, d = 240, 5, 16
    y = torch.randint(0, s, (n,), generator=g)
    centers = torch.nn.functional.normalize(torch.randn(s, d, generator=g), dim=1)
    x = torch.nn.functional.normalize(centers[y] + 0.4 * torch.randn(n, d, generator=g), dim=1)
    targets = torch.where(torch.rand(n, generator=g) < 0.15, y, torch.full_like(y, -1))
    targets[:s] = torch.arange(s)
    bank = MemoryBank(targets, s, dim=d, seed=0)
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for epoch in range(1, epochs + 1):
            bank.refresh_density(t=5, tau=0.1)
            for batch in torch.randperm(n, generator=g).split(32):
                bank.step(batch, x[batch], k=3, tau=0.1, density_weighting=density_weighting)
            labels, _ = bank.stored(torch.arange(n))
            unl = targets < 0
            emb = bank.embeddings[bank.row_of]
            agg = [float(emb[y == c].mean(0).norm()) for c in range(s)]
            row = {
                "epoch": epoch,
                "test_top1": 0.5 + 0.1 * epoch,
                "test_top5": 0.9,
                "knn_top1": 0.45 + 0.1 * epoch,
                "pseudo_acc": float((labels[unl] == y[unl]).float().mean()),
                "aggregation": float(np.mean(agg)),
                "aggregation_per_class": agg,
                "corr_density_count": 0.3 - 0.1 * epoch,
            }
            f.write(json.dumps(row) + "\n")
    state = {"bank": {"pieces": [bank.rows_state()]}, "targets": targets, "config": {"t": 5, "tau": 0.1}}
    checkpoint.save(state, str(path / "checkpoint.pt"))
    return bank


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG, path
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.02, f"{path.name} looks blank"


def test_analyze_writes_every_picture(tmp_path, capsys):
    _make_run(tmp_path / "llp")
    _make_run(tmp_path / "nodw", density_weighting=False)
    assert main([str(tmp_path / "llp"), "--compare", str(tmp_path / "nodw"), "--out", str(tmp_path / "out")]) == 0
    names = {"curves.png", "corr.png", "density.png", "q_hist.png", "embedding_map.png", "aggregation_hist.png"}
    for name in names:
        _assert_png(tmp_path / "out" / name)
    index = (tmp_path / "out" / "index.html").read_text()
    assert all(name in index for name in names)
    assert str(tmp_path / "out" / "index.html") in capsys.readouterr().out


def test_mds_map_and_default_out(tmp_path):
    _make_run(tmp_path / "run", epochs=1)
    assert main([str(tmp_path / "run"), "--map", "mds", "--classes", "3"]) == 0
    _assert_png(tmp_path / "run" / "analysis" / "embedding_map.png")
    page = (tmp_path / "run" / "analysis" / "index.html").read_text()
    assert "embedding map of the 3 most populous classes, run&#x27;s bank" in page, page
    # more than the run has: the page says what was drawn (it said "of 20 classes" on 5)
    assert main([str(tmp_path / "run"), "--classes", "20", "--out", str(tmp_path / "all")]) == 0
    assert "embedding map of the 5 most populous classes" in (tmp_path / "all" / "index.html").read_text()


def test_density_and_counts_from_bank(tmp_path):
    bank = _make_run(tmp_path / "run", epochs=1)
    d, q = class_density_and_counts(bank.state_dict(), t=5, tau=0.1)
    m = bank.num_labeled
    assert q.sum() == int((bank.labels[m:] >= 0).sum())
    rho = torch.exp(bank.refresh_density(t=5, tau=0.1).double())
    for c in range(5):
        want = rho[bank.labeled_classes == c].mean() / rho.max()
        assert d[c] == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize(
    "setup,msg",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "metrics.jsonl not found"),
        # a run that has not finished an epoch: it was asked whether it is a run directory at all
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "the run has not finished an epoch yet"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("{bad")), "is not valid JSON"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("[1, 2]\n")), "is not a JSON object"),
        # a row without its epoch was a KeyError traceback; a file named as the run, "does not exist"
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text('{"test_top1": 0.5}\n')), "row 1 has no whole-number"),
        (lambda p: p.write_text("x"), "is a file: give the run directory"),
        (
            lambda p: (
                p.mkdir(),
                (p / "metrics.jsonl").write_text('{"epoch": 1}\n'),
                (p / "checkpoint.pt").write_bytes(b"garbage"),
            ),
            "corrupt checkpoint",
        ),
    ],
)
def test_bad_run_dir_is_one_line(tmp_path, capsys, setup, msg):
    setup(tmp_path / "run")
    assert main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_a_bad_compare_run_is_named_as_such(tmp_path, capsys):
    _make_run(tmp_path / "run", epochs=1)
    (tmp_path / "empty").mkdir()
    for other, msg in (("missing", "does not exist"), ("empty", "metrics.jsonl not found")):
        assert main([str(tmp_path / "run"), "--compare", str(tmp_path / other)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("llp-fast-analyze: error: --compare: ") and msg in err, err
        assert len(err.splitlines()) == 1


def test_bad_flags_and_unwritable_out_are_one_line(tmp_path, capsys):
    _make_run(tmp_path / "run", epochs=1)
    with pytest.raises(SystemExit):  # --classes 0 is refused where it is parsed
        main([str(tmp_path / "run"), "--classes", "0"])
    assert "argument --classes" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main([str(tmp_path / "run"), "--out", str(blocker / "analysis")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llp-fast-analyze: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_interrupted_or_failed_analysis_leaves_its_folder_as_it_was(tmp_path, capsys, monkeypatch):
    import llp_fast.analyze as A

    _make_run(tmp_path / "run", epochs=1)
    out = tmp_path / "out"
    one = tmp_path / "missing" / "out"
    assert main([str(tmp_path / "run"), "--out", str(one)]) == 2  # a missing parent: refused, not made
    assert "does not exist" in capsys.readouterr().err and not one.parent.exists()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "plot_embedding_map", interrupted)  # after the first pictures are drawn
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 130
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 0 and (out / "index.html").exists()


def test_metrics_values_are_escaped_in_the_index(tmp_path):
    from llp_fast.analysis_page import write_index

    runs = [{"name": "<b>run</b>", "metrics": [{"epoch": "<script>alert(1)</script>", "test_top1": "<i>x</i>"}]}]
    page = write_index(tmp_path, [("curves.png", 'caption "<q>"')], runs).read_text()
    assert "<script>" not in page and "<i>" not in page and "<b>run" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_failed_write_names_the_output_not_the_temporary_folder(tmp_path, capsys, monkeypatch):
    import errno

    import llp_fast.analyze as A
    from llp_fast._files import WriteError

    _make_run(tmp_path / "run", epochs=1)
    out = tmp_path / "out"

    def full(path, *a, **k):
        raise WriteError(str(path), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(A, "plot_curves", lambda runs, path: full(path))
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llp-fast-analyze: error: cannot write {out / 'curves.png'}: No space left on device", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()

    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(A._files.os, "mkdir", refuse)
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"llp-fast-analyze: error: cannot write {out}: Read-only file system"


def test_sigterm_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """SIGTERM ended -select, -linear-probe and -analyze silently (exit 143), leaving -analyze's
    temporary folder."""
    import signal

    import llp_fast.analyze as A

    _make_run(tmp_path / "run", epochs=1)

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(A, "plot_embedding_map", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == "llp-fast-analyze: interrupted; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and signal.getsignal(signal.SIGTERM) == before


def test_a_killed_analysis_folder_is_swept_by_the_next_analysis_and_by_the_run(tmp_path):
    """A SIGKILLed -analyze left its hidden temporary folder (a random name) that nothing removed,
    where the README's fault table says a killed writer leaves only ``.NAME.tmp.PID``, which the next
    writer or a run starting there removes (found by review, 2026-12-08)."""
    import subprocess
    import sys

    from llp_fast.train import checkpoint

    _make_run(tmp_path / "run", epochs=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    for _ in range(2):
        left = run / f".analysis.tmp.{dead.pid}"
        left.mkdir()
        (left / "curves.png").write_bytes(b"half")
        live = run / f".analysis.tmp.{os.getpid()}x"  # (not a temporary name: kept)
        live.mkdir(exist_ok=True)
        if not (run / "analysis").exists():
            assert main([str(run)]) == 0  # into RUN/analysis, beside the dead writer's folder
            assert (run / "analysis" / "index.html").exists()
        else:
            assert checkpoint.sweep(str(run), None) == [str(left)]  # a run starting or resuming there
        assert not left.exists() and live.exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".analysis.tmp.") and p.name != live.name]


def test_an_analysis_into_another_runs_folder_leaves_only_its_own_pictures(tmp_path, capsys):
    """A run without a bank into a folder holding a full analysis: the earlier run's density and map
    stayed beside the new curves, unlinked from the new index."""
    _make_run(tmp_path / "llp")
    out = tmp_path / "out"
    assert main([str(tmp_path / "llp"), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")  # not the analysis's: kept
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": 0.5}) + "\n")
    assert main([str(bare), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["curves.png", "index.html", "notes.txt"]
    assert "(no bank in a checkpoint: its curves only, no densities or map)" in (out / "index.html").read_text()


def test_a_users_folder_is_not_overwritten_nor_swept(tmp_path, capsys):
    """--out on a folder of the user's: its density.png and corr.png were removed (not drawn for a
    run without a bank) and a curves.png of the same name overwritten, exit 0."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": 0.5}) + "\n")
    mine = tmp_path / "mypics"
    mine.mkdir()
    (mine / "density.png").write_bytes(b"my picture")
    (mine / "notes.txt").write_text("mine")
    assert main([str(bare), "--out", str(mine)]) == 2
    line = capsys.readouterr().err.strip()
    assert line == (
        f"llp-fast-analyze: error: --out {mine}: it holds density.png, which is not from an earlier "
        "llp-fast-analyze page; give another folder (nothing was written)"
    ), line
    assert (
        sorted(os.listdir(mine)) == ["density.png", "notes.txt"]
        and (mine / "density.png").read_bytes() == b"my picture"
    )
    (mine / "density.png").unlink()
    assert main([str(bare), "--out", str(mine)]) == 0  # other files of the user's are left alone
    assert sorted(os.listdir(mine)) == ["curves.png", "index.html", "notes.txt"]


@pytest.mark.parametrize("name", ["a$\\alpha_$", "cost$5$", "_scratch", "."])
def test_any_run_folder_name_is_drawn_as_it_is(tmp_path, capsys, name, monkeypatch):
    """A run named a$\\alpha_$ was a matplotlib traceback, cost$5$ drew "cost5", and _scratch or "."
    lost its legend (with matplotlib's warnings on stderr)."""
    import warnings

    run = tmp_path / "runs" / "my run" if name == "." else tmp_path / name
    run.parent.mkdir(parents=True, exist_ok=True)
    _make_run(run)
    if name == ".":
        monkeypatch.chdir(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ("No artists with labels found to put in legend")
        assert main([name if name == "." else str(run), "--out", str(tmp_path / "out")]) == 0
    index = (tmp_path / "out" / "index.html").read_text()
    shown = "my run" if name == "." else name
    assert f"<li>{shown}: epoch 3" in index, index
    assert capsys.readouterr().err == ""


def test_the_class_map_takes_at_most_twenty_classes(tmp_path, capsys):
    _make_run(tmp_path / "llp")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "llp"), "--classes", "21"])
    assert "--classes: at most 20 (one colour a class), got 21" in capsys.readouterr().err
    from llp_fast.analyze import analyze

    with pytest.raises(ValueError, match=r"--classes must lie in 1..20"):
        analyze(str(tmp_path / "llp"), n_classes=200)


def test_a_comparison_of_runs_on_different_data_says_so(tmp_path):
    from llp_fast.analysis_page import write_index

    def run(name, data):
        return {"name": name, "metrics": [{"epoch": 1, "test_top1": 0.5}], "bank": None, "config": {"data": data}}

    page = write_index(tmp_path, [], [run("a", "digits"), run("b", "folder:/x<y>")]).read_text()
    assert "note: the two runs trained on different data (digits and folder:/x&lt;y&gt;)" in page, page
    page = write_index(tmp_path, [], [run("a", "digits"), run("b", "digits")]).read_text()
    assert "different data" not in page


def test_a_bank_older_than_the_metrics_is_said(tmp_path):
    """Stopped between an epoch's metrics row and its checkpoint (a SIGKILL), the page drew three
    epochs of curves beside the epoch-2 bank without a word."""
    bank = _make_run(tmp_path / "run")  # metrics for 3 epochs
    targets = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"), need=("targets",))["targets"]
    state = {"bank": {"pieces": [bank.rows_state()]}, "targets": targets, "config": {"t": 5, "tau": 0.1}, "epoch": 2}
    checkpoint.save(state, str(tmp_path / "run" / "checkpoint.pt"))
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert "(its bank is the checkpoint's, after epoch 2: the run stopped before epoch 3's checkpoint" in page
    state["epoch"] = 3
    checkpoint.save(state, str(tmp_path / "run" / "checkpoint.pt"))
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert "the run stopped" not in (tmp_path / "out" / "index.html").read_text()
    # a Ctrl-C's checkpoint, 4 steps into epoch 4: its bank is past the last metrics row (found by
    # review, 2026-12-08: the page said nothing)
    state["step_in_epoch"] = 4
    checkpoint.save(state, str(tmp_path / "run" / "checkpoint.pt"))
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out2")]) == 0
    said = "(its bank is the checkpoint's, after 4 steps of epoch 4: the run stopped inside that epoch, after the "
    assert said + "last metrics row (epoch 3))" in (tmp_path / "out2" / "index.html").read_text()
