"""llp-fast-select (paper Appendix B) and llp-fast-train --extra-unlabeled."""

import errno
import functools
import os
import re

import numpy as np
import pytest
import torch
from conftest import one_error_line, tiny_config
from sklearn.datasets import load_digits

from llp_fast.cli.select import main
from llp_fast.cli.train import config_from_args
from llp_fast.cli.train import parser as train_parser
from llp_fast.data.extra import native_format, open_pool, to_input
from llp_fast.data.selection import read_selection
from llp_fast.errors import DataError, Interrupted
from llp_fast.select import PerClassTopK, select
from llp_fast.train import TrainConfig, Trainer, prepare
from llp_fast.train.report import read_metrics
from llp_fast.train.trained import load_network

# native code at odd settings (tiny networks, one thread, gloo): a crash fails these tests, not the run (_isolate.py)
pytestmark = pytest.mark.isolated

torch.set_num_threads(1)


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    """The shared tiny run (conftest), one epoch and no lr drop unless a test says otherwise."""
    return tiny_config(tmp_path, name, **{"epochs": 1, "milestones": [], **kw})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A freshly initialised tiny digits network, saved as a run (no training needed: the
    rule is checked against the same network's probabilities)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    tr = Trainer(tiny(tmp))
    tr.save()
    return tr.cfg.run_dir


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """70 digit images at 12x12 RGB (not the network's 8x8 grey: the pool is converted), with y."""
    d = load_digits()
    x = np.clip(np.rint(d.images[:70] * 255 / 16), 0, 255).astype(np.uint8)
    x = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None].float(), size=(12, 12), mode="bilinear")
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    path = tmp_path_factory.mktemp("pool") / "pool.npz"
    np.savez_compressed(path, x=np.ascontiguousarray(x), y=d.target[:70].astype(np.int64))
    return str(path)


def brute_force(probs: np.ndarray, p: int, k: int):
    """Appendix B by enumeration: each image's P best classes (ties: lower class), then per
    class the K best images (ties: lower index)."""
    n, s = probs.shape
    top = np.argsort(-probs, axis=1, kind="stable")[:, :p]
    rows = []
    for c in range(s):
        cand = [i for i in range(n) if c in top[i]]
        cand.sort(key=lambda i: (-probs[i, c], i))
        rows += [(i, c, probs[i, c]) for i in cand[:k]]
    return rows


def all_probs(ckpt, pool_path):
    model, _, source = load_network(ckpt)
    x, idx = next(open_pool(f"npz:{pool_path}").batches(10_000, native_format(source)))
    assert idx.tolist() == list(range(len(idx)))
    with torch.no_grad():
        return torch.softmax(model(to_input(source, x))[0], 1).numpy(), model, source


@pytest.mark.parametrize("p,k", [(3, 4), (1, 2), (10, 70)])
def test_rule_matches_brute_force_and_streaming(ckpt, pool, p, k):
    probs, model, source = all_probs(ckpt, pool)
    want = brute_force(probs, p, k)
    for bs in (7, 1000):  # streamed in 10 batches, and in one
        index, cls, score = select(model, source, open_pool(f"npz:{pool}"), top_classes=p, per_class=k, batch_size=bs)
        assert list(zip(index.tolist(), cls.tolist())) == [(i, c) for i, c, _ in want]
        np.testing.assert_allclose(score, [s for _, _, s in want], rtol=1e-5, atol=1e-7)


def test_per_class_topk_ties_and_short_classes():
    best = PerClassTopK(num_classes=3, k=2, top_classes=1)
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    best.add(probs[:2], torch.tensor([0, 1]))
    best.add(probs[2:], torch.tensor([2, 3]))
    index, cls, score = best.result()
    # class 0: three images tie at 0.5 -> the two lowest indices; class 1 never in a top-1; class 2: one image
    assert index.tolist() == [0, 1, 2] and cls.tolist() == [0, 0, 2]
    np.testing.assert_allclose(score, [0.5, 0.5, 0.6])


def test_cli_npz_and_json_agree(ckpt, pool, tmp_path, capsys):
    a, b = str(tmp_path / "sel.npz"), str(tmp_path / "sel.json")
    args = [ckpt, "--source", f"npz:{pool}", "--top-classes", "2", "--per-class", "5", "--batch-size", "16"]
    assert main([*args, "--out", a, "--quiet"]) == 0
    assert main([*args, "--out", b, "--quiet"]) == 0
    out = capsys.readouterr()[0]
    assert "distinct images" in out and "agree with the class" in out
    sa, sb = read_selection(a), read_selection(b)
    for key in ("index", "class"):
        np.testing.assert_array_equal(sa[key], sb[key])
    np.testing.assert_allclose(sa["score"], sb["score"], rtol=1e-6)
    assert sa["meta"]["source"] == f"npz:{os.path.abspath(pool)}" and sa["meta"]["pool_size"] == 70
    assert sa["path"] is None and len(sa["index"]) <= 10 * 5
    assert sorted(os.listdir(tmp_path)) == ["sel.json", "sel.npz"]  # no temporary left behind
    c = str(tmp_path / "all.npz")  # more classes asked for than there are: what ran is recorded (99 was)
    assert main([*args[:3], "--top-classes", "99", *args[5:], "--out", c]) == 0
    n = sa["meta"]["num_classes"]
    assert read_selection(c)["meta"]["top_classes"] == n and f"(P={n}, K=5)" in capsys.readouterr()[0]
    # a pool 'y' that does not fit (one label short) was dropped without a word
    with np.load(pool) as f:
        short = str(tmp_path / "short.npz")
        np.savez(short, x=f["x"], y=f["y"][:-1])
    assert main([ckpt, "--source", f"npz:{short}", "--per-class", "5", "--out", c]) == 0
    assert "pool labels not compared ('y' of int64 (69,) is not one integer label per image)" in capsys.readouterr()[0]
    assert "is not one integer label" in read_selection(c)["meta"]["pool_labels_ignored"]
    more = [*args[:5], "--per-class", "100000", *args[7:], "--out", c]  # K beyond the pool's 70: 70 ran
    assert main(more) == 0
    assert read_selection(c)["meta"]["per_class"] == 70 and "(P=2, K=70)" in capsys.readouterr()[0]


def test_output_is_atomic(ckpt, pool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sel.npz"
    out.write_bytes(b"previous selection")

    def broken(f, **arrays):
        f.write(b"half a file")
        raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr(np, "savez", broken)
    rc = main([ckpt, "--source", f"npz:{pool}", "--out", str(out), "--quiet"])
    assert rc == 2 and "disk full" in capsys.readouterr()[1]
    assert out.read_bytes() == b"previous selection"
    assert os.listdir(tmp_path) == ["sel.npz"]


def _png_tree(root, n=9):
    from PIL import Image

    d = load_digits()
    for i in range(n):
        sub = root / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(np.clip(d.images[i] * 16, 0, 255).astype(np.uint8)).resize((20, 16))
        im.convert("RGB").save(sub / f"img{i}.png")
    return root


def test_folder_pool_records_paths(ckpt, tmp_path, capsys):
    root = _png_tree(tmp_path / "pool")
    out = str(tmp_path / "sel.npz")
    args = [ckpt, "--source", f"folder:{root}", "--out", out, "--per-class", "2", "--workers", "0"]
    assert main([*args, "--batch-size", "4", "--quiet"]) == 0
    sel = read_selection(out)
    assert sel["path"] is not None and all(os.path.isfile(p) for p in sel["path"])
    files = open_pool(f"folder:{root}").paths
    assert [files[i] for i in sel["index"]] == sel["path"].tolist()
    assert main([*args[:-2], "--workers", "0", "--batch-size", "100", "--quiet", "--out", out + ".2.npz"]) == 0
    np.testing.assert_array_equal(read_selection(out + ".2.npz")["index"], sel["index"])
    # files passed over are said, as the trainer says them (they were not: found by review, 2026-12-08)
    assert "not read as images" not in capsys.readouterr().out
    (root / "notes.txt").write_text("x")
    (root / "part0" / "photo.heic").write_bytes(b"x")
    assert main([*args, "--quiet", "--out", out + ".3.npz"]) == 0
    said = capsys.readouterr().out
    assert f"llp-fast-select: folder:{root}: 2 files are not read as images (1 .heic, 1 .txt); the images read " in said
    np.testing.assert_array_equal(read_selection(out + ".3.npz")["index"], sel["index"])
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"folder:.*text: no images found \(1 file is not read as images \(1 .txt\)"):
        open_pool(f"folder:{tmp_path / 'text'}")


one_error_line = functools.partial(one_error_line, prog="llp-fast-select")


def test_errors_are_one_line(ckpt, pool, tmp_path, capsys):
    out = str(tmp_path / "sel.npz")
    one_error_line(capsys, main([str(tmp_path / "nope"), "--source", f"npz:{pool}", "--out", out]), "no checkpoint")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"\x00garbage" * 10)
    one_error_line(capsys, main([str(bad), "--source", f"npz:{pool}", "--out", out]), "corrupt checkpoint")
    one_error_line(capsys, main([ckpt, "--source", f"npz:{tmp_path}/none.npz", "--out", out]), "no such file")
    one_error_line(capsys, main([ckpt, "--source", f"folder:{tmp_path}/none", "--out", out]), "no such directory")
    np.savez(tmp_path / "noimg.npz", y=np.zeros(3))
    one_error_line(capsys, main([ckpt, "--source", f"npz:{tmp_path}/noimg.npz", "--out", out]), "no array 'x'")
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04 not really")
    one_error_line(capsys, main([ckpt, "--source", f"npz:{tmp_path}/trunc.npz", "--out", out]), "cannot read")
    one_error_line(capsys, main([ckpt, "--source", f"npz:{pool}", "--out", f"{tmp_path}/no/dir.npz"]), "not exist")
    (tmp_path / "d.npz").mkdir()  # refused before the scoring, not at the write after it
    one_error_line(capsys, main([ckpt, "--source", f"npz:{pool}", "--out", str(tmp_path / "d.npz")]), "is a directory")
    with pytest.raises(SystemExit):  # argparse's usage error, where the flag is parsed
        main([ckpt, "--source", f"npz:{pool}", "--out", out, "--per-class", "0"])
    assert "--per-class" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # torch starting 100,000 threads was a segmentation fault
        main([ckpt, "--source", f"npz:{pool}", "--out", out, "--threads", "100000"])
    assert "argument --threads: expected a whole number from 0 to 1024" in capsys.readouterr().err
    assert not os.path.exists(out)
    # an output over an input: the pool's file, the checkpoint, the run's config (they used to be replaced)
    for target, what in ((pool, "--source"), (os.path.join(ckpt, "checkpoint.pt"), "the checkpoint")):
        before = open(target, "rb").read()
        one_error_line(capsys, main([ckpt, "--source", f"npz:{pool}", "--out", target]), what)
        assert open(target, "rb").read() == before
    config = os.path.join(ckpt, "config.json")
    one_error_line(capsys, main([ckpt, "--source", f"npz:{pool}", "--out", config]), "the run's config.json")
    # labels that are not integers are left out (a diagnostic), and K above the pool is the pool
    x = np.load(pool)["x"]
    np.savez(tmp_path / "strs.npz", x=x[:10], y=np.array(["a"] * 10))
    assert main([ckpt, "--source", f"npz:{tmp_path}/strs.npz", "--out", out, "--per-class", "10000000000"]) == 0
    got = read_selection(out)
    assert "label_agreement" not in got["meta"] and len(np.unique(got["index"])) <= 10
    np.savez(tmp_path / "empty.npz", x=x[:0])  # it wrote an empty selection
    one_error_line(
        capsys, main([ckpt, "--source", f"npz:{tmp_path}/empty.npz", "--out", str(tmp_path / "e.npz")]), "no image"
    )
    assert not os.path.exists(tmp_path / "e.npz")


def test_an_output_over_a_file_the_run_depends_on_is_refused(tmp_path):
    """select's and the probe's --out replaced the run's training npz, its --extra-unlabeled
    selection, a bank file, the baseline's checkpoint, an image of a folder given as data: the next
    resume or tool failed."""
    import json

    from llp_fast.cli._common import not_an_input
    from llp_fast.errors import ConfigError

    run, data = tmp_path / "run", tmp_path / "data"
    (run / "baseline").mkdir(parents=True)
    (data / "c0").mkdir(parents=True)
    for f in (run / "checkpoint.pt", run / "bank-46-r0.pt", run / "baseline" / "checkpoint.pt", data / "c0" / "0.png"):
        f.write_bytes(b"x")
    saved = {"data": f"npz:{tmp_path / 'train.npz'}", "extra_unlabeled": str(tmp_path / "sel.npz")}
    (run / "config.json").write_text(json.dumps(saved))
    for out, what in (
        (tmp_path / "train.npz", "the run's training data"),
        (tmp_path / "sel.npz", "the run's --extra-unlabeled"),
        (run / "bank-46-r0.pt", "one of the run's bank files"),
        (run / "baseline" / "checkpoint.pt", "inside the run's baseline/"),
        (run / "baseline.json", "the run's baseline.json"),
        (data / "c0" / "0.png", "inside --data"),
    ):
        with pytest.raises(ConfigError, match=f"^--out {out} is .*{re.escape(what)}"):
            not_an_input(str(out), str(run), f"folder:{data}", data_flag="--data")
    not_an_input(str(data / "c0" / "new.json"), str(run), f"folder:{data}", data_flag="--data")  # a new file: fine
    not_an_input(str(run / "probe.json"), str(run), None, data_flag="--data")


def test_a_run_whose_data_changed_is_refused_by_the_tools(tmp_path, capsys, pool):
    """select and the probe rebuild the run's preprocessing from its data: changed data (here other
    labels in the run's npz) was used without a word, where a resume refuses it."""
    from llp_fast.errors import CheckpointError
    from llp_fast.train.trained import load_network

    d = load_digits()
    x = np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=d.target)
    tr = Trainer(tiny(tmp_path, data=f"npz:{tmp_path / 'd.npz'}", label_init="instance"))
    tr.save()
    load_network(tr.cfg.run_dir)  # as trained: fine
    y = d.target.copy()
    y[:40] = (y[:40] + 1) % 10
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(CheckpointError, match="is not what it trained on"):
        load_network(tr.cfg.run_dir)
    # pool labels beyond the network's classes are unknown, not disagreements (it said "agree on 0.0%")
    out = str(tmp_path / "s.npz")
    np.savez(tmp_path / "p99.npz", x=np.load(pool)["x"][:20], y=np.full(20, 99))
    np.savez(tmp_path / "d.npz", x=x, y=d.target)
    assert main([tr.cfg.run_dir, "--source", f"npz:{tmp_path / 'p99.npz'}", "--out", out, "--quiet"]) == 0
    assert "label_agreement" not in read_selection(out)["meta"]
    y20 = np.where(np.arange(20) < 8, np.load(pool)["y"][:20], 99)
    np.savez(tmp_path / "p99.npz", x=np.load(pool)["x"][:20], y=y20)  # some labels the network knows
    capsys.readouterr()
    assert main([tr.cfg.run_dir, "--source", f"npz:{tmp_path / 'p99.npz'}", "--out", out, "--quiet"]) == 0
    meta, said = read_selection(out)["meta"], capsys.readouterr().out
    known = int(np.isin(read_selection(out)["index"], np.arange(8)).sum())
    assert meta["label_agreement_rows"] == known < meta["selected_rows"], meta
    assert f"of the {known} rows whose pool label is one of the network's 10 classes" in said, said


# -- llp-fast-train --extra-unlabeled -------------------------------------------------------------
@pytest.fixture(scope="module")
def selection(ckpt, pool, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sel") / "sel.npz")
    assert (
        main([ckpt, "--source", f"npz:{pool}", "--out", out, "--top-classes", "2", "--per-class", "4", "--quiet"]) == 0
    )
    return out


def test_extra_unlabeled_from_a_pool_that_moved_names_the_selection(tmp_path, selection):
    """It said "no such file: POOL", a file the user had not named (it is in the selection)."""
    import json

    with np.load(selection) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    meta["source"] = f"npz:{tmp_path / 'moved.npz'}"
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "sel.npz", **arrays)
    with pytest.raises(DataError, match=r"sel.npz: the pool it was selected from: no such file: .*moved.npz"):
        Trainer(tiny(tmp_path, extra_unlabeled=str(tmp_path / "sel.npz")))


def test_extra_unlabeled_grows_the_bank_then_fine_tunes_on_original_only(tmp_path, selection, pool):
    n0 = Trainer(tiny(tmp_path, "plain")).n
    cfg = tiny(tmp_path, epochs=3, milestones=[1], rate_jump=2, extra_unlabeled=selection)
    tr = Trainer(cfg)
    sel = read_selection(selection)
    e = len(np.unique(sel["index"]))
    assert tr.n_original == n0 and tr.n == n0 + e and len(tr.bank) == n0 + e
    said = f"--extra-unlabeled: {e:,} selected images join the {n0:,} training images as unlabeled ones"
    assert any(note.startswith(said) and note.endswith("until the rate jump") for note in tr.notes), tr.notes
    assert bool((tr.targets[n0:] == -1).all())
    # the extras' truth comes from the pool's y (pseudo-label diagnostics)
    y = np.load(pool)["y"]
    np.testing.assert_array_equal(tr.truth[n0:].numpy(), y[np.unique(sel["index"])])
    seen = {}
    step = tr.train_step

    def spy(batch, lr, warmup):
        seen.setdefault(tr.epoch, []).append(batch[-1].clone())
        return step(batch, lr, warmup)

    tr.train_step = spy
    tr.fit()
    drawn = {ep: torch.cat(v) for ep, v in seen.items()}
    for ep in (0, 1):  # LLP on original + extra: every example once per epoch
        assert sorted(drawn[ep].tolist()) == list(range(n0 + e))
    assert sorted(drawn[2].tolist()) == list(range(n0))  # the rate-jump phase: original only
    assert tr.n == n0 and len(tr.bank) == n0 and tr.bank.embeddings.shape[0] == n0
    # the pseudo-label accuracy's base: every unlabeled example holds a label and this pool's y is
    # known for all (a smaller base: the next test)
    rows = read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"))
    assert [(r["pseudo_known"], r["unlabeled"]) for r in rows[:2]] == [
        (rows[0]["unlabeled"], n0 + e - tr.bank.num_labeled)
    ] * 2


def test_a_pseudo_label_accuracy_over_few_known_says_its_base():
    """With --extra-unlabeled the selected images' truth is mostly unknown: the accuracy was printed
    as if over every unlabeled example ("pseudo 33.3%", 1 of 3 known among 509)."""
    from llp_fast.train.report import epoch_line, known_base

    m = dict(epoch=1, train_loss=1.0, test_top1=0.5, test_top5=0.9, knn_top1=0.5, images_per_s=10.0, epoch_seconds=1.0)
    line = epoch_line(dict(m, pseudo_acc=1 / 3, pseudo_known=3, unlabeled=509), 3, False)
    assert "pseudo  33.3% (of 3 known) (" in line, line
    assert "known" not in epoch_line(dict(m, pseudo_acc=0.9, pseudo_known=509, unlabeled=509), 3, False)
    assert known_base(dict(pseudo_acc=None, pseudo_known=0, unlabeled=509)) == ""  # n/a: nothing to qualify
    assert known_base(dict(m, pseudo_acc=0.5)) == ""  # metrics rows written before the keys existed


def test_extra_unlabeled_resume_inside_fine_tuning_is_exact(tmp_path, selection):
    kw = dict(epochs=3, milestones=[1], rate_jump=2, extra_unlabeled=selection)
    full = Trainer(tiny(tmp_path, "full", **kw))
    full.fit()
    steps0 = full.steps_per_epoch()  # n0 steps in the fine-tuning epoch
    part = Trainer(tiny(tmp_path, "part", **kw))
    stop = 2 * part.steps_per_epoch() + max(1, steps0 // 2)
    part.cfg.stop_after_steps = stop
    with pytest.raises(Interrupted):
        part.fit()
    resumed = prepare(tiny(tmp_path, "part", **kw), resume=True)
    assert resumed.n == resumed.n_original
    resumed.fit()
    assert torch.equal(resumed.bank.embeddings, full.bank.embeddings)
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)


def test_extra_unlabeled_from_a_folder_pool_and_cli_flag(ckpt, tmp_path):
    root = _png_tree(tmp_path / "pool")
    out = str(tmp_path / "sel.json")
    assert (
        main([ckpt, "--source", f"folder:{root}", "--out", out, "--per-class", "3", "--workers", "0", "--quiet"]) == 0
    )
    tr = Trainer(tiny(tmp_path, extra_unlabeled=out))
    assert tr.n == tr.n_original + len(np.unique(read_selection(out)["index"]))
    assert tr.source.x.shape[1:] == (1, 8, 8)
    args = train_parser().parse_args(["--extra-unlabeled", "rel/sel.npz", "--rate-jump", "5"])
    assert config_from_args(args, "r").extra_unlabeled == os.path.abspath("rel/sel.npz")


@pytest.mark.parametrize("strong", [False, True])
def test_extra_unlabeled_on_folder_training_data(tmp_path, strong):
    """Folder training data: every dataset over the training files sees the extras (the plain one,
    which fills the bank, kept the old list: an IndexError; the rebuilt training set lost its
    strong views)."""
    from llp_fast.data import load
    from llp_fast.data.extra import add_extra_unlabeled
    from llp_fast.data.selection import write_selection

    for c in range(2):
        _png_tree(tmp_path / "train" / f"c{c}", n=6)
    pool = _png_tree(tmp_path / "pool", n=4)
    paths = sorted(str(p) for p in pool.rglob("*.png"))
    sel = str(tmp_path / "sel.npz")
    write_selection(
        sel, np.arange(4), np.zeros(4, np.int64), np.ones(4, np.float32), {"source": f"folder:{pool}"}, paths=paths
    )
    src = load(f"folder:{tmp_path / 'train'}", device="cpu", labeled_fraction=0.5, workers=0, loader="pil")
    src.configure(image_size=8, strong=strong)
    n0 = src.num_train
    assert add_extra_unlabeled(src, sel) == 4 and src.num_train == n0 + 4
    everything = torch.arange(src.num_train)
    batch = next(src.train_batches(everything, src.num_train))
    assert len(batch) == (3 if strong else 2) and sorted(batch[-1].tolist()) == everything.tolist()
    seen = torch.cat([idx for _, idx in src.index_batches(everything, 5)])
    assert seen.tolist() == everything.tolist()

    # a selection from a pool holding the data's own images: training ones are counted (they train twice;
    # kept, so that runs saved before resume), a held-out one is refused (it leaked the test)
    src = load(f"folder:{tmp_path / 'train'}", device="cpu", labeled_fraction=0.5, workers=0, loader="pil")
    own = sorted(src.files)[:2] + paths[:1]
    write_selection(sel, np.arange(3), np.zeros(3, np.int64), np.ones(3, np.float32), {"source": "folder:x"}, paths=own)
    n0 = src.num_train
    assert add_extra_unlabeled(src, sel) == 3 and src.extra_twice == 2 and src.num_train == n0 + 3
    src = load(f"folder:{tmp_path / 'train'}", device="cpu", labeled_fraction=0.5, workers=0, loader="pil")
    held = [src.test_files[0], paths[1]]
    write_selection(
        sel, np.arange(2), np.zeros(2, np.int64), np.ones(2, np.float32), {"source": "folder:x"}, paths=held
    )
    with pytest.raises(DataError, match="is a held-out image of the run's data"):
        add_extra_unlabeled(src, sel)
    # the same images through file links (a split made of links, a pool of them): found by review,
    # 2026-12-08, the held-out one trained and the training ones were not counted
    links = tmp_path / "links"
    links.mkdir()
    linked = []
    for n, p in enumerate([*sorted(src.files)[:2], src.test_files[0]]):
        os.symlink(p, links / f"l{n}{os.path.splitext(p)[1]}")
        linked.append(str(links / f"l{n}{os.path.splitext(p)[1]}"))
    write_selection(sel, np.arange(2), np.zeros(2, np.int64), np.ones(2, np.float32), {"source": "x"}, paths=linked[:2])
    src = load(f"folder:{tmp_path / 'train'}", device="cpu", labeled_fraction=0.5, workers=0, loader="pil")
    assert add_extra_unlabeled(src, sel) == 2 and src.extra_twice == 2
    write_selection(sel, np.arange(3), np.zeros(3, np.int64), np.ones(3, np.float32), {"source": "x"}, paths=linked)
    src = load(f"folder:{tmp_path / 'train'}", device="cpu", labeled_fraction=0.5, workers=0, loader="pil")
    with pytest.raises(DataError, match="l2.png is a held-out image of the run's data"):
        add_extra_unlabeled(src, sel)


def test_extra_unlabeled_from_the_datas_own_npz_rows(tmp_path):
    """Array data: a pool whose rows are the data's held-out images leaked the test, and its
    training images trained twice, without a word (the folder check compares files; this one the
    images' bytes)."""
    from llp_fast.data import load
    from llp_fast.data.extra import add_extra_unlabeled
    from llp_fast.data.selection import write_selection

    rng = np.random.default_rng(3)
    x, xt = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=np.arange(20) % 2, x_test=xt, y_test=np.arange(6) % 2)
    np.savez(tmp_path / "pool.npz", x=np.concatenate([x[:2], xt[4:5], rng.integers(0, 256, (1, 8, 8), np.uint8)]))
    sel = str(tmp_path / "sel.npz")

    def pick(rows):
        n = len(rows)
        meta = {"source": f"npz:{tmp_path / 'pool.npz'}"}
        write_selection(sel, np.asarray(rows), np.zeros(n, np.int64), np.ones(n, np.float32), meta)
        return load(f"npz:{data}", device="cpu", labeled_fraction=0.5)

    src = pick([0, 1, 3])
    n0 = src.num_train
    assert add_extra_unlabeled(src, sel) == 3 and src.extra_twice == 2 and src.num_train == n0 + 3
    src = pick([3, 2])
    with pytest.raises(DataError, match="selected row 2 of npz:.*pool.npz is a held-out image of the run's data"):
        add_extra_unlabeled(src, sel)
    assert src.num_train == n0 and src.x.shape[0] == n0  # nothing joined


def test_extra_unlabeled_bad_selection_is_one_line(tmp_path, capsys):
    from llp_fast.cli.train import main as train_main

    (tmp_path / "bad.npz").write_bytes(b"nope")
    rc = train_main(
        [
            "--data",
            "digits",
            "--epochs",
            "1",
            "--width",
            "4",
            "--image-size",
            "8",
            "--baseline",
            "off",
            "--quiet",
            "--device",
            "cpu",
            "--run-dir",
            str(tmp_path / "r"),
            "--extra-unlabeled",
            str(tmp_path / "bad.npz"),
        ]
    )
    err = capsys.readouterr()[1]
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot read selection" in err
    # an archive or an array that is not a selection: said so (it was numpy's "KeyError: 'index is
    # not a file in the archive'", or its context-manager TypeError)
    np.savez(tmp_path / "data.npz", x=np.zeros((3, 8, 8), np.uint8), y=np.zeros(3, int))
    np.save(tmp_path / "arr.npy", np.zeros(3))
    for name in ("data.npz", "arr.npy"):
        with pytest.raises(DataError, match=f"{name} is not a selection"):
            read_selection(str(tmp_path / name))


def test_a_pool_without_its_kind_says_which_to_give(tmp_path):
    """A bare path names the prefix that reads it; a .npy pool behind npz: is memory-mapped."""
    from llp_fast.errors import DataError

    np.save(tmp_path / "pool.npy", np.zeros((3, 8, 8), np.uint8))
    (tmp_path / "imgs").mkdir()
    for spec, hint in (
        (str(tmp_path / "pool.npy"), f"(this file: npz:{tmp_path / 'pool.npy'})"),
        (str(tmp_path / "imgs"), f"(this folder: folder:{tmp_path / 'imgs'})"),
        ("nothing", ""),
    ):
        with pytest.raises(DataError) as e:
            open_pool(spec)
        assert str(e.value) == f"unknown pool {spec!r}: expected npz:PATH or folder:PATH" + (" " + hint if hint else "")
    assert len(open_pool(f"npz:{tmp_path / 'pool.npy'}")) == 3


@pytest.mark.parametrize("kind", ["npz", "npz_compressed", "npy"])
def test_a_fortran_order_pool_gives_the_same_images(ckpt, pool, tmp_path, capsys, kind):
    """An archive's 'x' saved in Fortran order (a transposed array, MATLAB's layout) was refused
    ("save it C-contiguous") while a .npy in that order was read: both are read now, the archive
    whole (its rows are not stored in one piece), and select the same images as the C-order pool."""
    with np.load(pool) as f:
        x, y = f["x"], f["y"]
    path = tmp_path / f"f.{'npy' if kind == 'npy' else 'npz'}"
    if kind == "npy":
        np.save(path, np.asfortranarray(x))
    else:
        (np.savez_compressed if kind == "npz_compressed" else np.savez)(path, x=np.asfortranarray(x), y=y)
    got = [(b.clone(), i.clone()) for b, i in open_pool(f"npz:{path}").batches(16, ("arrays", 3, 12))]
    want = list(open_pool(f"npz:{pool}").batches(16, ("arrays", 3, 12)))
    assert len(got) == len(want) == 5
    for (gb, gi), (wb, wi) in zip(got, want):
        assert torch.equal(gb, wb) and torch.equal(gi, wi)
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    assert main([ckpt, "--source", f"npz:{pool}", "--out", a, "--quiet"]) == 0
    assert main([ckpt, "--source", f"npz:{path}", "--out", b, "--quiet"]) == 0
    assert np.array_equal(read_selection(a)["index"], read_selection(b)["index"])


def test_a_pool_under_home_and_a_folder_given_as_a_file(tmp_path, monkeypatch):
    """``npz:~/...`` and ``folder:~/...`` read under $HOME, as llp-fast-train reads them (a shell
    leaves the ~ after npz: as it is: it was "no such file: ~/pool.npy"), in the library and at
    --source's parse; a directory behind npz: is said to be one (it was "no such file")."""
    from PIL import Image

    from llp_fast.cli.select import _pool
    from llp_fast.errors import DataError
    from llp_fast.train.specs import data_spec

    monkeypatch.setenv("HOME", str(tmp_path))
    np.save(tmp_path / "pool.npy", np.zeros((3, 8, 8), np.uint8))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(imgs / "a.png")
    assert len(open_pool("npz:~/pool.npy")) == 3 and len(open_pool("folder:~/imgs", workers=0)) == 1
    assert _pool("npz:~/pool.npy") == f"npz:{tmp_path}/pool.npy" and _pool("folder:~/imgs") == f"folder:{imgs}"
    assert data_spec("npz:~/d.npz") == f"npz:{tmp_path}/d.npz" and data_spec("digits") == "digits"
    with pytest.raises(DataError, match=f"^{imgs}: a directory, not an .npz archive or .npy file$"):
        open_pool(f"npz:{imgs}")


@pytest.mark.parametrize("fmt", [("arrays", 1, 8), ("arrays", 3, 8), ("arrays", 3, 16)])
def test_the_same_images_as_files_and_as_arrays_are_the_same_pool(tmp_path, fmt):
    """A folder: pool and an npz: pool of the same images give an array network the same pixels
    when they must be resized and converted (PIL's 8-bit fixed-point resize of the files gave 552 of
    3,840 pixels one level apart, and another selection)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    colour = rng.integers(0, 256, (6, 21, 27, 3), dtype=np.uint8)  # not square: the centred square is taken
    grey = rng.integers(0, 256, (5, 24, 24), dtype=np.uint8)
    for name, x in (("colour", colour), ("grey", grey)):
        folder = tmp_path / name
        folder.mkdir()
        for i, im in enumerate(x):
            Image.fromarray(im).save(folder / f"{i:03d}.png")
        np.savez(tmp_path / f"{name}.npz", x=x)
        (a, ia), (b, ib) = (
            next(open_pool(spec, workers=0).batches(100, fmt))
            for spec in (f"npz:{tmp_path / name}.npz", f"folder:{folder}")
        )
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (len(x), fmt[1], fmt[2], fmt[2])
        assert torch.equal(ia.long(), ib.long()) and torch.equal(a, b), (name, int((a != b).sum()))


def test_a_damaged_compressed_pool_is_one_line(ckpt, pool, tmp_path, capsys):
    """A damaged deflate stream was a zlib.error traceback (select, and train --extra-unlabeled)."""
    x = np.load(pool)["x"]
    np.savez_compressed(tmp_path / "c.npz", x=x)
    data = bytearray((tmp_path / "c.npz").read_bytes())
    at = data.index(b"x.npy") + 200  # inside the compressed array
    data[at : at + 16] = bytes(16)
    (tmp_path / "c.npz").write_bytes(bytes(data))
    out = str(tmp_path / "sel.npz")
    rc = main([ckpt, "--source", f"npz:{tmp_path / 'c.npz'}", "--out", out, "--quiet"])
    one_error_line(capsys, rc, f"cannot read {tmp_path / 'c.npz'}")
    assert not os.path.exists(out)


def test_a_run_is_read_from_its_checkpoint_alone(tmp_path, pool, capsys, monkeypatch):
    """-select and -linear-probe built the network with --init-weights again (a file read when
    the run started, relative to its directory then); a run whose data now builds another network
    was a "corrupt checkpoint" naming no entry."""
    first = Trainer(tiny(tmp_path, "a"))
    torch.save(first.model.state_dict(), tmp_path / "init.pt")
    run = Trainer(tiny(tmp_path, "b", init_weights=str(tmp_path / "init.pt")))
    run.save()
    os.remove(tmp_path / "init.pt")
    out = str(tmp_path / "sel.npz")
    assert main([run.cfg.run_dir, "--source", f"npz:{pool}", "--out", out, "--quiet"]) == 0
    assert load_network(run.cfg.run_dir, random_init=True)[0] is not None  # the network's own init
    d = load_digits()
    x = np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8)
    y = np.where(np.arange(len(d.target)) % 10 == 0, d.target, -1)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    grey = Trainer(tiny(tmp_path, "npz", data=f"npz:{tmp_path / 'train.npz'}"))
    grey.save()
    np.savez(tmp_path / "train.npz", x=np.repeat(x[..., None], 3, -1), y=y)  # now RGB: 3 input channels
    capsys.readouterr()
    rc = main([grey.cfg.run_dir, "--source", f"npz:{pool}", "--out", out, "--quiet"])
    one_error_line(capsys, rc, "is not what it trained on (another split, or other training images)")
    # a checkpoint with no digest of its images (written before it was kept) is read, and the
    # network its data builds now is named where it does not fit
    import llp_fast.train.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "files_differ", lambda ckpt, fingerprint: False)
    rc = main([grey.cfg.run_dir, "--source", f"npz:{pool}", "--out", out, "--quiet"])
    line = one_error_line(capsys, rc, "does not fit the network its run's data")
    assert "'stem.weight' has shape (4, 1, 3, 3), the network (4, 3, 3, 3)" in line, line


@pytest.mark.parametrize("name", ["no/such/dir/sel.npz", "sel.NPZ"])
def test_an_out_that_cannot_be_written_is_refused_before_scoring(ckpt, pool, tmp_path, capsys, monkeypatch, name):
    """(Scoring a large pool takes hours: --out was checked only at the write.)"""
    import llp_fast.cli.select as cli

    monkeypatch.setattr(cli, "select", lambda *a, **k: pytest.fail("the pool was scored"))
    rc = main([ckpt, "--source", f"npz:{pool}", "--out", str(tmp_path / name), "--quiet"])
    one_error_line(capsys, rc, "--out ")
