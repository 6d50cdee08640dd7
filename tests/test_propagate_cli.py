"""``llp-fast-propagate``: results equal the ops, one-line errors, every flag checked where it is parsed,
and nothing half-written after an error or an interrupt."""

import os
import re
import subprocess
import sys

import conftest
import numpy as np
import pytest
import torch
from rounds_ref import rounds_reference

from llp_fast import local_density, propagate
from llp_fast.cli.propagate import main as propagate_main

# native code on odd shapes and a signal sent to a child: a crash fails these tests, not the run
pytestmark = pytest.mark.isolated

torch.set_num_threads(1)


def one_error_line(capsys, rc, match):
    return conftest.one_error_line(capsys, rc, match, "llp-fast-propagate")


def flag_error(capsys, argv, flag, match=""):
    """argparse's usage error for ``flag``: exit 2, the flag named, no traceback."""
    with pytest.raises(SystemExit) as e:
        propagate_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err or flag in err.splitlines()[-1], err
    assert match in err and "Traceback" not in err, err


def leftovers(path):
    """Files other than the test's inputs: outputs or temporary files."""
    return sorted(n for n in os.listdir(path) if n not in ("emb.npy", "lab.npy", "short.npy", "none.npy"))


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
            "--rounds",
            "1",
            *extra,
        ]
    )
    assert rc == 0 and "labeled" in capsys.readouterr()[0]
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
    # and in fact bit for bit: the streamed density is finished by the op's own log-sum-exp
    assert np.array_equal(pseudo[labels < 0], want.numpy()) and np.array_equal(conf[labels < 0], wconf.numpy())
    assert leftovers(tmp_path) == ["conf.npy", "pseudo.npy"]


def test_propagate_cli_errors(tmp_path, capsys):
    _digits_embeddings(tmp_path)
    rc = propagate_main([str(tmp_path / "missing.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "o.npy")])
    one_error_line(capsys, rc, "no such file")
    np.save(tmp_path / "short.npy", np.zeros(5, int))
    rc = propagate_main([str(tmp_path / "emb.npy"), str(tmp_path / "short.npy"), "--out", str(tmp_path / "o.npy")])
    one_error_line(capsys, rc, "short.npy: expected 1797 entries (one per embedding), got 5")
    np.save(tmp_path / "none.npy", np.full(1797, -1))
    rc = propagate_main([str(tmp_path / "emb.npy"), str(tmp_path / "none.npy"), "--out", str(tmp_path / "o.npy")])
    one_error_line(capsys, rc, "no labeled row")
    np.savez(tmp_path / "emb.npz", emb=np.load(tmp_path / "emb.npy"))  # (it was numpy's magic-string error)
    rc = propagate_main([str(tmp_path / "emb.npz"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "o.npy")])
    one_error_line(capsys, rc, "emb.npz: an .npz archive, not a .npy array (save the array with np.save)")
    np.save(tmp_path / "flab.npy", np.load(tmp_path / "lab.npy").astype(np.float64))
    rc = propagate_main([str(tmp_path / "emb.npy"), str(tmp_path / "flab.npy"), "--out", str(tmp_path / "o.npy")])
    one_error_line(capsys, rc, "got float64 (1797,) (save whole-number labels as integers")
    assert not (tmp_path / "o.npy").exists()


def test_default_rounds_and_every_output(tmp_path, capsys):
    x, y, labels = _digits_embeddings(tmp_path)
    files = {f: str(tmp_path / f) for f in ("p.npy", "c.npy", "probs.npz", "v.npy")}
    rc = propagate_main(
        [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", files["p.npy"], "--chunk", "500"]
        + ["--confidence-out", files["c.npy"], "--probs-out", files["probs.npz"], "--top", "2"]
        + ["--voters-out", files["v.npy"], "--quiet"]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and "20 rounds" in out and err == ""  # (auto: every unlabeled row may join the voters)
    emb = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    want_l, want_c = rounds_reference(emb, labels.copy(), rounds=20)
    assert np.array_equal(np.load(files["p.npy"]), want_l) and np.array_equal(np.load(files["c.npy"]), want_c)
    probs = np.load(files["probs.npz"])
    assert probs["classes"].shape == probs["probs"].shape == (1797, 2)
    assert np.array_equal(probs["classes"][:, 0], want_l)
    voters = np.load(files["v.npy"])
    assert voters.shape == (1797, 10) and (voters[labels >= 0] == -1).all() and (voters[labels < 0] >= 0).all()
    unl = labels < 0
    assert (want_l[unl] == y[unl]).mean() > 0.95  # rounds beat the one-shot vote's ~0.93 here


def test_shard_directory_equals_the_file(tmp_path, capsys):
    x, _, labels = _digits_embeddings(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (a, b) in enumerate([(0, 500), (500, 501), (501, 1797)]):
        np.save(shards / f"{i:03d}.npy", x[a:b].astype(np.float16))
    np.save(tmp_path / "half.npy", x.astype(np.float16))
    outs = []
    for src in (shards, tmp_path / "half.npy"):
        o = str(tmp_path / f"out-{len(outs)}.npy")
        assert propagate_main([str(src), str(tmp_path / "lab.npy"), "--out", o, "--rounds", "2", "--quiet"]) == 0
        outs.append(np.load(o))
    assert np.array_equal(outs[0], outs[1])
    capsys.readouterr()
    # An output among the shards would be read as one by the next run: refused, for any output
    # and either input folder; a subfolder, or a file that is not .npy, is not a shard.
    lab_dir = tmp_path / "lab_shards"
    lab_dir.mkdir()
    np.save(lab_dir / "a.npy", labels)
    for argv in (
        [str(shards), str(tmp_path / "lab.npy"), "--out", str(shards / "p.npy")],
        [
            str(shards),
            str(tmp_path / "lab.npy"),
            "--out",
            str(tmp_path / "p.npy"),
            "--confidence-out",
            str(shards / "c.npy"),
        ],
        [str(tmp_path / "half.npy"), str(lab_dir), "--out", str(lab_dir / "p.npy")],
    ):
        with pytest.raises(SystemExit) as e:
            propagate_main([*argv, "--rounds", "1", "--quiet"])
        assert e.value.code == 2
        assert "folder of shards, whose .npy files are all read as" in capsys.readouterr().err
    (shards / "sub").mkdir()
    ok = [str(shards), str(tmp_path / "lab.npy"), "--out", str(shards / "sub" / "p.npy"), "--rounds", "1", "--quiet"]
    assert propagate_main([*ok, "--probs-out", str(shards / "probs.npz")]) == 0
    assert sorted(os.listdir(shards)) == ["000.npy", "001.npy", "002.npy", "probs.npz", "sub"]


def test_nan_in_a_late_block_leaves_nothing(tmp_path, capsys):
    x, _, labels = _digits_embeddings(tmp_path)
    x[1700, 3] = np.nan
    np.save(tmp_path / "emb.npy", x)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "o.npy"), "--chunk", "200"]
    rc = propagate_main([*argv, "--confidence-out", str(tmp_path / "c.npy"), "--rounds", "1"])
    one_error_line(capsys, rc, "NaN or Inf")
    assert leftovers(tmp_path) == []


def test_interrupt_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first output is on disk under its temporary name: both are removed."""
    _digits_embeddings(tmp_path)
    from llp_fast.embeddings import outputs

    real_save, calls = np.save, []

    def save_then_interrupt(path, arr, **kw):
        real_save(path, arr, **kw)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs.np, "save", save_then_interrupt)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "o.npy"), "--rounds", "1"]
    rc = propagate_main([*argv, "--confidence-out", str(tmp_path / "c.npy")])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert len(calls) == 2 and leftovers(tmp_path) == []


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (its SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):  # gone already: the caller's poll() sees it
        return False
    return bool(caught & (1 << (15 - 1)))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads a child's signal handlers from /proc")
def test_sigint_and_sigterm_in_a_child_leave_nothing(tmp_path):
    """A real signal in the middle of a run: exit 130, no temporary or partial file. The signal is sent
    1 s after the child's run installed its SIGTERM handler, well before its ~8 s of work end."""
    import signal
    import time

    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.standard_normal((100_000, 32)).astype(np.float32))
    np.save(tmp_path / "lab.npy", np.where(rng.random(100_000) < 0.05, rng.integers(0, 10, 100_000), -1))
    for sig in (signal.SIGINT, signal.SIGTERM):
        cmd = [sys.executable, "-m", "llp_fast.cli.propagate", str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy")]
        cmd += ["--out", str(tmp_path / "o.npy"), "--confidence-out", str(tmp_path / "c.npy"), "--threads", "1"]
        # a shell's background job inherits SIGINT ignored, and Python then keeps ignoring it: undo that
        default_int = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_int)
        deadline = time.monotonic() + 120
        # the run's SIGTERM handler is installed (the tool's own, so the work has begun): then 1 s more
        while proc.poll() is None and not _catches_sigterm(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert leftovers(tmp_path) == []


def test_an_output_may_not_be_given_twice_or_be_an_input(tmp_path, capsys):
    _digits_embeddings(tmp_path)
    base = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy")]
    same = str(tmp_path / "x.npy")
    flag_error(capsys, [*base, "--out", same, "--confidence-out", same], "--confidence-out", "own file")
    flag_error(capsys, [*base, "--out", str(tmp_path / "emb.npy")], "--out", "the input")
    flag_error(
        capsys, [*base, "--out", same, "--voters-out", os.path.join(str(tmp_path), ".", "x.npy")], "--voters-out"
    )
    # the model's directory and file are outputs too
    (tmp_path / "mm").mkdir()
    model_file = str(tmp_path / "mm" / "model.npz")
    flag_error(capsys, [*base, "--out", model_file, "--save-model", str(tmp_path / "mm")], "--save-model", "own file")
    flag_error(capsys, [*base, "--out", same, "--save-model", same], "--save-model", "own file")
    assert leftovers(tmp_path) == ["mm"] and os.listdir(tmp_path / "mm") == []


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--out", "."),
        ("--out", "/no/such/dir/o.npy"),
        ("--confidence-out", "/no/such/dir/c.npy"),
        ("--device", "foo"),
        ("--device", "cuda"),
        ("--k", "0"),
        ("--k", "10,x"),
        ("--k", "10,10"),
        ("--t", "-1"),
        ("--tau", "0"),
        ("--tau", "nan"),
        ("--rounds", "0"),
        ("--max-voters", "-1"),
        ("--max-voters", "some"),
        ("--labeled-weight", "0"),
        ("--chunk", "0"),
        ("--top", "0"),
        ("--top", "5"),  # without --probs-out: it was ignored
        ("--probs-out", "probs.npy"),  # an .npz archive under an .npy name
        ("--threads", "-1"),
        ("--threads", "100000"),
        ("--nproc", "0"),
        ("--density-pool", "some"),
        ("--k", "auto,10"),
        ("--tau", "often"),
        ("--min-confidence", "1.5"),
        ("--drop-suspects", "0"),
        ("--drop-suspects", "1"),
        ("--drop-suspects", "nan"),
        ("--save-model", "/no/such/dir/m"),
        ("--suspects-out", "/no/such/dir/s.npy"),
    ],
)
def test_every_flag_is_checked_where_it_is_parsed(tmp_path, capsys, flag, value):
    if flag == "--device" and value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _digits_embeddings(tmp_path)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy")]
    argv += [] if flag == "--out" else ["--out", str(tmp_path / "o.npy")]
    flag_error(capsys, [*argv, flag, value], flag)
    assert leftovers(tmp_path) == []


def test_progress_only_on_a_terminal(tmp_path, capsys):
    """Not a terminal: summary line on stdout, nothing on stderr (no bar redraws in a log)."""
    _digits_embeddings(tmp_path)
    rc = propagate_main([str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "o.npy")])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "" and out.count("\n") == 1


def test_many_rounds_at_scale_say_what_they_cost():
    """Without a cap (--max-voters none) more than one round grows the voters toward N (quadratic
    work): at 100,000+ rows the CLI says how much more than --rounds 1 it will do, and how to bound
    it. The default cap keeps the work within a few times --rounds 1: no note."""
    import io

    from llp_fast._progress import Progress
    from llp_fast.cli.propagate import _cost_note
    from llp_fast.embeddings import Settings

    def note(n, m, **kw):
        buf = io.StringIO()
        _cost_note(Progress(stream=buf), n, m, Settings(**kw))
        return buf.getvalue()

    assert note(1_000_000, 10_000, rounds=10) == ""  # the default cap: 10,000 + 0.9 * 20,000
    line = note(1_000_000, 10_000, rounds=10, max_voters=None)
    assert "10 rounds on 1,000,000 rows" in line and "--rounds 1" in line and "--max-voters" in line
    assert "about 90x" in line  # voters grow to 10,000 + 0.9 * 990,000
    assert note(1_000_000, 10_000, rounds=1) == ""
    assert note(50_000, 500, rounds=10, max_voters=None) == ""  # small: no note
    assert note(1_000_000, 10_000, rounds=10, max_voters=50_000) == ""  # bounded: 6x


def test_several_k_write_one_output_per_k(tmp_path, capsys):
    """``--k 10,20,100``: one output per K (PSEUDO.k10.npy, ...), each what ``--k K`` alone writes;
    with --rounds 1 from one selection of the largest K."""
    _digits_embeddings(tmp_path)
    emb, lab = str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy")
    base = [emb, lab, "--rounds", "1", "--quiet"]
    out = tmp_path / "p.npy"
    rc = propagate_main([*base, "--k", "10,20,100", "--out", str(out), "--confidence-out", str(tmp_path / "c.npy")])
    said = capsys.readouterr()[0]
    assert rc == 0 and "K = 10, 20, 100" in said and "p.k20.npy" in said
    for k in (10, 20, 100):
        assert propagate_main([*base, "--k", str(k), "--out", str(tmp_path / "one.npy")]) == 0
        assert np.array_equal(np.load(tmp_path / f"p.k{k}.npy"), np.load(tmp_path / "one.npy"))
        assert os.path.exists(tmp_path / f"c.k{k}.npy")
    assert not out.exists()
    capsys.readouterr()
    rc = propagate_main([*base, "--k", "10,20", "--out", str(tmp_path / "a.npy"), "--min-confidence", "0.9"])
    said = capsys.readouterr()[0]
    left = [int((np.load(tmp_path / f"a.k{k}.npy") == -1).sum()) for k in (10, 20)]
    assert rc == 0 and left[0] != left[1], left
    assert f"left -1, confidence below 0.9 ({left[0]} at K = 10, {left[1]} at K = 20)" in said, said


def test_nproc_relaunch_drops_only_the_nproc_flag():
    """``--nproc P`` relaunches the same command under torchrun without ``--nproc`` (either spelling),
    keeping every other argument in order, so the children do not relaunch again."""
    from llp_fast.cli._common import without_nproc

    argv = ["a.npy", "--nproc", "2", "--k", "5", "--nproc=3", "--nprocs-note", "x"]
    assert without_nproc(argv) == ["a.npy", "--k", "5", "--nprocs-note", "x"]


# -- suspects, K and tau from the data, abstention (docs/embeddings.md) --------------------------------
def test_defaults_come_from_settings():
    from llp_fast.cli.propagate import parse, settings_of
    from llp_fast.embeddings import Settings

    assert settings_of(parse(["e.npy", "l.npy", "--out", "o.npy"])) == Settings(device="cpu")
    given = parse(["e.npy", "l.npy", "--out", "o.npy", "--k", "7", "--no-density-weighting", "--max-voters", "none"])
    assert settings_of(given) == Settings(k=7, density=False, max_voters=None, device="cpu")


def test_suspects_auto_and_abstention(tmp_path, capsys):
    from llp_fast import LocalLabelPropagation
    from llp_fast.embeddings import Engine, Rows, Settings, tune

    x, y, labels = _digits_embeddings(tmp_path)
    f = {n: str(tmp_path / n) for n in ("p.npy", "c.npy", "s.npy", "q.npy")}
    base = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--rounds", "2", "--quiet"]
    capsys.readouterr()
    rc = propagate_main([*base, "--out", f["p.npy"], "--confidence-out", f["c.npy"]] + ["--min-confidence", "0.8"])
    assert rc == 0
    clf = LocalLabelPropagation(rounds=2, min_confidence=0.8).fit(x, labels)
    p, conf = np.load(f["p.npy"]), np.load(f["c.npy"])
    assert np.array_equal(p, clf.transduction_) and np.array_equal(p == -1, (labels < 0) & (conf < 0.8))
    # the summary counts the rows left -1 apart (it said all the unlabeled rows were labelled)
    a, m = int((p == -1).sum()), int((labels >= 0).sum())
    said = capsys.readouterr()[0]
    assert f"labeled {len(p) - m - a} of {len(p)} rows ({a} left -1, confidence below 0.8)" in said, said
    assert (p == -1).any() and np.array_equal(p[labels >= 0], labels[labels >= 0])
    rc = propagate_main([*base, "--out", f["p.npy"], "--suspects-out", f["s.npy"], "--quality-out", f["q.npy"]])
    assert rc == 0
    s = np.load(f["s.npy"])
    assert s.dtype == np.int64 and np.array_equal(s, clf.label_suspects_)
    np.testing.assert_array_equal(np.load(f["q.npy"]), clf.label_quality_)
    capsys.readouterr()
    # --k auto --tau auto: the choice is printed and used
    assert propagate_main([*base, "--out", f["p.npy"], "--k", "auto", "--tau", "auto"]) == 0
    said = capsys.readouterr()[0]
    choice = tune.choose(Rows(x), labels, Settings(rounds=2), auto_k=True, auto_tau=True)
    assert f"K = {choice.k}, tau = {choice.tau:g}" in said and "leave-one-out accuracy" in said
    want = Engine(Rows(x), labels, Settings(rounds=2, k=choice.k, tau=choice.tau)).run()
    assert np.array_equal(np.load(f["p.npy"]), want.labels)
    # --drop-suspects F: the worst F of the labeled rows are labeled again by the vote
    assert propagate_main([*base, "--out", f["p.npy"], "--drop-suspects", "0.1"]) == 0
    assert "18 suspect labels dropped" in capsys.readouterr()[0]
    dropped = np.sort(clf.label_suspects_[:18])
    again = labels.copy()
    again[dropped] = -1
    want = Engine(Rows(x), again, Settings(rounds=2)).run()
    assert np.array_equal(np.load(f["p.npy"]), want.labels)
    with pytest.raises(SystemExit):
        propagate_main([*base, "--out", f["p.npy"], "--k", "10,20", "--drop-suspects", "0.1"])
    assert "argument --drop-suspects: needs one K, not --k 10,20" in capsys.readouterr().err


def test_tau_auto_takes_one_k_and_keeps_the_k_given(tmp_path, capsys):
    """--tau auto chooses tau for one K: with several it is refused (it used to run the first K only,
    under the plain --out name); with one it keeps that K even where the labeled rows are fewer."""
    _digits_embeddings(tmp_path)
    base = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--rounds", "1", "--quiet"]
    flag_error(capsys, [*base, "--out", str(tmp_path / "o.npy"), "--k", "5,10", "--tau", "auto"], "--tau", "one K")
    assert leftovers(tmp_path) == []
    few = np.full(np.load(tmp_path / "lab.npy").shape, -1)
    few[:12] = np.arange(12) % 3  # 12 labeled rows: fewer than K + 1
    np.save(tmp_path / "few.npy", few)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "few.npy"), "--rounds", "1", "--k", "20"]
    assert propagate_main([*argv, "--out", str(tmp_path / "a.npy")]) == 0
    assert propagate_main([*argv, "--out", str(tmp_path / "b.npy"), "--tau", "auto"]) == 0
    assert "K = 20" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_drop_suspects_says_what_it_dropped(tmp_path, capsys):
    """The summary counts the labels left; a fraction that rounds to no row drops nothing and runs
    once (it ran the labelling again for nothing); a class whose every label was dropped is named."""
    x, y, labels = _digits_embeddings(tmp_path)
    out = str(tmp_path / "o.npy")
    base = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--rounds", "2", "--quiet"]
    m = int((labels >= 0).sum())
    conf = str(tmp_path / "c.npy")
    assert propagate_main([*base, "--out", out, "--confidence-out", conf, "--drop-suspects", "0.1"]) == 0
    n_drop = round(0.1 * m)
    said = capsys.readouterr().out
    assert f"from {m - n_drop} labeled rows, 2 rounds ({n_drop} suspect labels dropped and labeled again)" in said, said
    assert said.rstrip().endswith(f"-> {out}, {conf}"), said  # every file written, not --out alone
    # --tau auto with a K given: the line names what the candidates had to beat (K given, tau default)
    assert propagate_main([*base, "--out", out, "--k", "20", "--tau", "auto"]) == 0
    said = capsys.readouterr().out
    assert "K = 20, tau = 0.07 kept: no candidate beat it clearly)" in said or (
        "chosen over K = 20, tau = 0.07, which it beat clearly)" in said
    ), said
    assert propagate_main([*base, "--out", str(tmp_path / "plain.npy")]) == 0
    assert propagate_main([*base, "--out", out, "--drop-suspects", f"{0.4 / m}"]) == 0
    said = capsys.readouterr().out
    assert f"of {m} labeled rows rounds to none: nothing dropped)" in said and f"from {m} labeled" in said, said
    np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "plain.npy"))
    # class 0 with a single labeled row far from the others: the worst suspect, dropped, and named
    few = labels.copy()
    few[few == 0] = -1
    few[np.flatnonzero(y == 3)[-1]] = 0
    np.save(tmp_path / "few.npy", few)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "few.npy"), "--rounds", "2", "--quiet", "--out", out]
    assert propagate_main([*argv, "--drop-suspects", "0.05"]) == 0
    said = capsys.readouterr().out
    assert "no labeled row left of class 0)" in said, said
    assert (np.load(out) != 0).all()


def _blobs(tmp_path) -> np.ndarray:
    """Three tight, well separated blobs of 60 rows (emb.npy), the first 10 of each labeled with
    its blob (clean.npy, returned)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.eye(8)[c] + 0.05 * rng.standard_normal((60, 8)) for c in range(3)]).astype(np.float32)
    y = np.full(180, -1)
    for c in range(3):
        y[c * 60 : c * 60 + 10] = c
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "clean.npy", y)
    return y


def test_drop_suspects_keeps_the_labels_that_show_no_sign_of_being_wrong(tmp_path, capsys):
    """Rows of quality 1 (score 0) tie: a fraction beyond the flagged rows dropped clean labels by
    row index (a whole class of them once)."""
    y = _blobs(tmp_path)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "clean.npy"), "--rounds", "2", "--quiet"]
    assert propagate_main([*argv, "--out", str(tmp_path / "a.npy"), "--drop-suspects", "0.2"]) == 0
    said = capsys.readouterr().out
    assert "(--drop-suspects 0.2: no labeled row shows a sign of a wrong label, none dropped)" in said, said
    y[5] = 1  # one flipped label: it and the rows it casts doubt on are flagged, the rest tie at 0
    np.save(tmp_path / "flip.npy", y)
    argv[1] = str(tmp_path / "flip.npy")
    q = str(tmp_path / "q.npy")
    assert propagate_main([*argv, "--out", str(tmp_path / "b.npy"), "--quality-out", q, "--drop-suspects", "0.5"]) == 0
    flagged = int((np.load(q)[y >= 0] < 1).sum())
    assert 1 <= flagged < 15
    said = capsys.readouterr().out
    assert f"({flagged} suspect labels dropped and labeled again; the other {15 - flagged} of the 15 asked" in said


def test_drop_suspects_auto_drops_the_labels_of_low_quality(tmp_path, capsys):
    """``--drop-suspects auto`` drops the labels of quality below DROP_QUALITY (as the estimator's
    ``drop_suspects="auto"``) and says how many; clean, well separated labels: none, and one run."""
    from llp_fast import LocalLabelPropagation
    from llp_fast.embeddings.settings import DROP_QUALITY

    x, y, labels = _digits_embeddings(tmp_path)
    flip = np.flatnonzero(labels >= 0)[::8]
    labels[flip] = (labels[flip] + 3) % 10
    np.save(tmp_path / "noisy.npy", labels)
    out, q = str(tmp_path / "o.npy"), str(tmp_path / "q.npy")
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "noisy.npy"), "--quiet", "--out", out, "--quality-out", q]
    assert propagate_main([*argv, "--drop-suspects", "auto"]) == 0
    said = capsys.readouterr().out
    low = int((np.load(q)[labels >= 0] < DROP_QUALITY).sum())
    assert low >= 5, low
    assert f"({low} suspect labels, quality below {DROP_QUALITY:g}, dropped and labeled again)" in said, said
    clf = LocalLabelPropagation(drop_suspects="auto").fit(x, labels)
    np.testing.assert_array_equal(np.load(out), clf.transduction_)
    assert len(clf.labels_dropped_) == low
    # the suspects asked for alone: the line says how many auto would drop
    assert propagate_main(argv) == 0
    said = capsys.readouterr().out
    assert f"({low} labels of quality below {DROP_QUALITY:g}: --drop-suspects auto drops them)" in said, said
    clean = _blobs(tmp_path)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "clean.npy"), "--quiet", "--out", out]
    assert propagate_main([*argv, "--drop-suspects", "Auto"]) == 0  # the word in any case, as --k auto
    said = capsys.readouterr().out
    assert f"(--drop-suspects auto: no label's quality is below {DROP_QUALITY:g}, none dropped)" in said, said
    # a wrong label in a class of three: flagged, but a class keeps three of its labeled rows
    few = clean.copy()
    few[122:130] = -1  # class 2 keeps rows 120 and 121
    few[[120, 121, 10]] = 2  # row 10 lies in class 0's blob
    np.save(tmp_path / "few.npy", few)
    argv[1] = str(tmp_path / "few.npy")
    assert propagate_main([*argv, "--drop-suspects", "auto", "--quality-out", q]) == 0
    said = capsys.readouterr().out
    assert np.load(q)[10] < DROP_QUALITY and (np.load(q)[few >= 0] < DROP_QUALITY).sum() == 1
    assert "(--drop-suspects auto: 1 label of quality below 0.05, none dropped: a class keeps at least 3" in said, said
    assert propagate_main([*argv, "--quality-out", q]) == 0  # asked for alone: it said auto drops it
    said = capsys.readouterr().out
    assert "(1 label of quality below 0.05: --drop-suspects auto drops none, as a class keeps at least 3 of" in said
    few[122] = 2  # a fourth labeled row of class 2: auto drops the wrong one, and says it in the singular
    np.save(tmp_path / "few.npy", few)
    assert propagate_main([*argv, "--drop-suspects", "auto"]) == 0
    assert "(1 suspect label, quality below 0.05, dropped and labeled again)" in capsys.readouterr().out
    for bad in ("0", "1", "x", "autos"):
        said = f"expected a fraction in (0, 1) of the labeled rows, got {bad!r}; or auto"
        flag_error(capsys, [*argv, "--drop-suspects", bad], "--drop-suspects", said)


def test_drop_suspects_that_would_drop_every_label_is_one_line(tmp_path, capsys):
    _digits_embeddings(tmp_path)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "o.npy")]
    one_error_line(capsys, propagate_main([*argv, "--drop-suspects", "0.999"]), "--drop-suspects 0.999")
    assert leftovers(tmp_path) == []


# -- found by review (2026-12-06): values that passed the checks and failed deep inside a run ----------
def _clusters(tmp_path, n=600, d=16, scale=1.0):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(3, d))[y] * 4 + rng.normal(size=(n, d))).astype(np.float32) * np.float32(scale)
    labels = np.where(rng.random(n) < 0.1, y, -1)
    labels[:3] = [0, 1, 2]
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "lab.npy", labels)
    return x, labels


@pytest.mark.parametrize("extra", [["--rounds", "1"], ["--rounds", "1", "--no-density-weighting"], [], ["--k", "auto"]])
def test_rows_too_large_for_the_scores_are_one_line(tmp_path, capsys, extra):
    """--no-normalize with rows of norm 1e19: NaN confidences written with exit 0, or a traceback
    ('bias contains NaN or Inf'). Now the first such row read is named, exit 2, nothing written."""
    _clusters(tmp_path, scale=1e18)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "p.npy")]
    rc = propagate_main([*argv, "--no-normalize", "--threads", "1", *extra])
    err = one_error_line(capsys, rc, "emb.npy: row ")
    assert re.search(r"emb\.npy: row \d+ has norm .* beyond float32: scale the rows down, raise tau", err), err
    assert leftovers(tmp_path) == []


def test_the_estimator_names_rows_too_large_for_the_scores():
    from llp_fast import LocalLabelPropagation

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = np.where(rng.random(200) < 0.2, rng.integers(0, 2, 200), -1)
    y[:2] = [0, 1]
    with pytest.raises(ValueError, match=r"^X: row \d+ has norm .*scale the rows down, raise tau, or let them be"):
        LocalLabelPropagation(normalize=False).fit(x * np.float32(1e19), y)
    clf = LocalLabelPropagation(normalize=False).fit(x, y)
    with pytest.raises(ValueError, match=r"^X: row 5 has norm"):
        clf.predict(np.where(np.arange(200)[:, None] == 5, x * np.float32(1e19), x))
    assert LocalLabelPropagation().fit(x * np.float32(1e19), y).predict(x).shape == (200,)  # normalised: fine


@pytest.mark.parametrize("tau", ["1e-40", "3e-39", "1e-310", "2e-38"])
def test_a_tau_whose_scores_overflow_is_a_usage_error(tmp_path, capsys, tau):
    _clusters(tmp_path)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "p.npy")]
    flag_error(capsys, [*argv, "--tau", tau], "--tau", "the scores x . m / tau must fit float32")
    from llp_fast import LocalLabelPropagation
    from llp_fast.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^tau: expected a finite number >= 1e-30"):
        LocalLabelPropagation(tau=float(tau)).fit(np.load(tmp_path / "emb.npy"), np.load(tmp_path / "lab.npy"))


def test_k_above_the_rows_is_clamped_in_every_round(tmp_path):
    """More than one round kept an (N, K) running top-K: K = 10**9 asked for terabytes (a traceback
    from the allocator), where no row can have more than N voters. Now K >= N gives K = N's labels."""
    from llp_fast.embeddings import label_embeddings

    x, labels = _clusters(tmp_path, n=300)
    want = label_embeddings(x, labels, k=300, rounds=3)
    got = label_embeddings(x, labels, k=10**9, rounds=3)
    assert np.array_equal(got.labels, want.labels) and np.array_equal(got.confidence, want.confidence)


@pytest.mark.parametrize("extra", [["--k", "auto"], ["--drop-suspects", "0.5"]])
def test_without_a_labeled_row_the_command_says_only_that(tmp_path, capsys, extra):
    """--k auto printed its choice ("too few labeled rows") before the error, --drop-suspects 0.5
    "would drop all 0 labeled rows; give a smaller fraction", which no fraction helps."""
    _clusters(tmp_path)
    np.save(tmp_path / "lab.npy", np.full(600, -1))
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy"), "--out", str(tmp_path / "p.npy"), *extra]
    rc = propagate_main(argv)
    out = capsys.readouterr()
    assert rc == 2 and out.out == "", out
    assert out.err == f"llp-fast-propagate: error: labels {tmp_path / 'lab.npy'} hold no labeled row (no entry >= 0)\n"


@pytest.mark.parametrize("flag", ["--out", "--confidence-out", "--suspects-out", "--quality-out", "--save-model"])
def test_an_empty_output_path_is_refused_naming_its_flag(tmp_path, capsys, flag):
    """An unset shell variable (``--save-model "$DIR"``): the model and the extra outputs were
    silently not written (exit 0), ``--out ''`` failed only after the whole run."""
    _clusters(tmp_path)
    argv = [str(tmp_path / "emb.npy"), str(tmp_path / "lab.npy")]
    argv += ["--out", ""] if flag == "--out" else ["--out", str(tmp_path / "p.npy"), flag, ""]
    flag_error(capsys, argv, flag, "empty")
    assert leftovers(tmp_path) == []


def test_a_rank_lost_after_the_outputs_are_in_place_does_not_say_nothing_was_written(tmp_path, monkeypatch):
    """A rank killed at the last meeting of --nproc 2, once rank 0 had replaced the outputs: the
    launcher said "nothing was written" beside the new files."""
    from llp_fast.cli import _common
    from llp_fast.cli import propagate as cli

    seen = {}
    monkeypatch.setattr(_common, "torchrun", lambda *a, kept, **k: seen.setdefault("kept", kept) and 1)
    out, conf = tmp_path / "p.npy", tmp_path / "c.npy"
    np.save(out, np.zeros(3))  # an earlier run's
    os.utime(out, (1, 1))
    args = cli.parse(["e.npy", "l.npy", "--out", str(out), "--confidence-out", str(conf), "--nproc", "2"])
    cli._relaunch(args, [])
    assert seen["kept"]() == "nothing was written"
    np.save(out, np.zeros(5))
    np.save(conf, np.zeros(5))
    assert seen["kept"]() == f"the outputs were written before it ({out}, {conf})"
