"""Defaults that follow the data, not its name (llp_fast.train.defaults), one set of defaults for the
CLI and Python, and the strong views of the consistency term (llp_fast.data.strong)."""

import dataclasses

import numpy as np
import pytest
import torch

from llp_fast.cli.train import config_from_args
from llp_fast.cli.train import parser as train_parser
from llp_fast.data import DataFacts, strong
from llp_fast.data import load as load_data
from llp_fast.errors import ConfigError
from llp_fast.train import defaults
from llp_fast.train.config import METHODS, TrainConfig, validate
from llp_fast.train.newrun import check_new_run


def facts(**kw):
    base = dict(
        kind="arrays", num_train=1400, num_labeled=30, num_classes=10, min_labeled_per_class=3, side=8, channels=1
    )
    return DataFacts(**{**base, **kw})


def resolved(cfg=None, **kw):
    return defaults.resolve(cfg or TrainConfig(device="cpu", run_dir="r"), facts(**kw))[0]


def test_small_grayscale_arrays_get_the_small_data_rules():
    cfg = resolved()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.propagation_start) == (40, 64, 0.1, 3)
    assert (cfg.image_size, cfg.flip, cfg.scale_min, cfg.translate) == (16, False, 0.85, 1.0)
    assert cfg.label_init == "inputs" and cfg.milestones == [27, 36]
    cfg = resolved(side=28, num_train=4000)
    assert (cfg.image_size, cfg.translate) == (28, 2.0)


def test_the_size_said_is_the_images_own():
    """A non-square array image is named by both sides, and squashing it to a square is said (it
    read "images of 40 px" for 28 x 40 images); square ones keep one number."""
    cfg, said = defaults.resolve(TrainConfig(device="cpu", run_dir="r"), facts(side=40, hw=(28, 40)))
    text = " ".join(said)
    assert cfg.image_size == 40
    assert "training images of 28 x 40 px" in text and "(images of 28 x 40 px are squashed to a square)" in text
    _, said = defaults.resolve(TrainConfig(device="cpu", run_dir="r"), facts(side=8, hw=(6, 8)))
    assert "images of 6 x 8 px are squashed to a square and raised to 16 px" in " ".join(said)
    _, said = defaults.resolve(TrainConfig(device="cpu", run_dir="r"), facts(side=28, hw=(28, 28)))
    assert "training images of 28 px" in " ".join(said) and "(images of 28 px)" in " ".join(said)


def test_large_colour_data_in_files_gets_the_papers_settings():
    cfg = resolved(kind="folder", num_train=1_281_167, side=400, channels=3)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.propagation_start) == (100, 128, 0.03, 0)
    assert (cfg.image_size, cfg.flip, cfg.scale_min, cfg.translate) == (224, True, 0.35, 0.0)
    assert cfg.label_init == "instance"  # no pixel vote over files
    assert resolved(kind="arrays", side=96, channels=3).label_init == "instance"  # nor over large images
    # small colour images too: flips, wide crops, no shift (it was 1 px at 8 px or less, said "none")
    cfg, said = defaults.resolve(TrainConfig(device="cpu", run_dir="r"), facts(side=8, channels=3))
    assert (cfg.flip, cfg.scale_min, cfg.translate) == (True, 0.35, 0.0)
    assert "--translate 0.0 (colour images: crops, no shift)" in " ".join(said), said


def test_given_settings_win_and_methods_set_their_parts():
    cfg = resolved(TrainConfig(device="cpu", run_dir="r", epochs=7, flip=True, lr=0.5))
    assert (cfg.epochs, cfg.flip, cfg.lr, cfg.milestones) == (7, True, 0.5, [5, 6])
    paper = resolved(TrainConfig(device="cpu", run_dir="r", method="paper"))
    assert (paper.consistency, paper.refresh_rounds, paper.ema, paper.start_rounds) == (0.0, 0, 0.0, 1)
    assert paper.epochs == 80  # the previous default's schedule, which it reproduces
    plus = resolved(TrainConfig(device="cpu", run_dir="r", method="plus", ema=0.0))
    assert plus.consistency > 0 and plus.refresh_rounds > 1 and plus.ema == 0.0
    assert set(defaults.METHOD_PARTS) == set(METHODS)
    optional = {"rate_jump", "init_weights", "extra_unlabeled", "stop_after_steps"}  # None: absent
    for cfg in (paper, plus):  # nothing left to choose
        left = {k for k, v in dataclasses.asdict(cfg).items() if v is None}
        assert left <= optional, left


def test_the_run_says_what_it_chose_and_why():
    _, lines = defaults.resolve(TrainConfig(device="cpu", run_dir="r"), facts())
    text = "\n".join(lines)
    assert "1,400 training images of 8 px" in text and "--image-size 16" in text and "--no-flip (grayscale" in text
    assert "grayscale" in text and "--method plus" in text
    _, again = defaults.resolve(resolved(), facts())
    assert again == []  # a resolved config (a resume) has nothing left to choose
    # a run without LLP's votes chooses those settings (the config holds every field) but says none
    # of them: a supervised-only run listed its propagation start, pixel vote and method's parts
    for cfg in (TrainConfig(device="cpu", run_dir="r", supervised_only=True), TrainConfig(method="fixmatch")):
        chosen, lines = defaults.resolve(dataclasses.replace(cfg, device="cpu", run_dir="r"), facts())
        text = "\n".join(lines)
        assert chosen.propagation_start == 3 and chosen.label_init == "inputs"
        assert "--propagation-start" not in text and "--label-init" not in text and "--image-size 16" in text
        assert ("--method" in text) == (not cfg.supervised_only), text
        assert "ends before label propagation" not in text
    # --start-rounds is the vote on the inputs': said with it, not with instance ids (folder data's)
    for init, said in (("inputs", True), ("instance", False)):
        cfg, lines = defaults.resolve(TrainConfig(device="cpu", run_dir="r", label_init=init), facts())
        assert cfg.start_rounds == 10 and ("--start-rounds 10" in "\n".join(lines)) == said, lines
    _, lines = defaults.resolve(TrainConfig(device="cpu", run_dir="r"), facts(kind="folder", side=224, channels=3))
    assert "--label-init instance" in "\n".join(lines) and "--start-rounds" not in "\n".join(lines), lines
    _, lines = defaults.resolve(TrainConfig(device="cpu", run_dir="r", epochs=2), facts())
    assert lines[-1] == (
        "--epochs 2 ends before label propagation starts (after --propagation-start 3 epochs): this run trains on "
        "its start labels alone"
    )


def test_workers_given_to_array_data_are_said_unused():
    _, lines = defaults.resolve(TrainConfig(device="cpu", run_dir="r", workers=8), facts())
    assert "--workers 8 is not used: array data is held in memory, read without workers" in lines
    _, lines = defaults.resolve(TrainConfig(device="cpu", run_dir="r", workers=8), facts(kind="folder"))
    assert not any("--workers" in line for line in lines)
    # given by name (the command line, fit): the default's value given counts, a value not given not
    _, lines = defaults.resolve(TrainConfig(device="cpu", run_dir="r"), facts(), given={"workers"})
    assert "--workers 2 is not used: array data is held in memory, read without workers" in lines
    _, lines = defaults.resolve(TrainConfig(device="cpu", run_dir="r", workers=8), facts(), given=set())
    assert not any("--workers" in line for line in lines)


def test_a_supervised_only_run_names_the_llp_settings_given_at_their_defaults_too():
    """--supervised-only --method plus (plus is the default) was unsaid, --method paper said."""
    cfg = TrainConfig(device="cpu", run_dir="r", supervised_only=True, method="plus")
    _, lines = defaults.resolve(cfg, facts(), given={"supervised_only", "method"})
    assert "--supervised-only trains on the labeled examples alone: --method not used" in lines


def test_a_drop_after_the_run_is_said():
    # (--milestones 30 with --epochs 20 kept the lr at its start for the whole run without a word)
    _, lines = defaults.resolve(TrainConfig(device="cpu", run_dir="r", epochs=20, milestones=[5, 20, 30]), facts())
    assert (
        "--milestones 20,30: the run ends first (a drop at M applies after M epochs; with --epochs 20 only drops "
        "below 20 apply)" in lines
    )
    cfg = TrainConfig(device="cpu", run_dir="r", epochs=20, rate_jump=10, jump_milestones=[12, 25])
    assert any(
        line.startswith("--jump-milestones 25: the run ends first") for line in defaults.resolve(cfg, facts())[1]
    )
    # every part of --method given (a whole command copied out of a run's config.json): still said;
    # a resume (new=False) says nothing of what its saved config holds
    parts = {**defaults.METHOD_PARTS["plus"], "device": "cpu", "run_dir": "r", "epochs": 20}
    late = TrainConfig(**parts, milestones=[30])
    assert any("--milestones 30: the run ends first" in line for line in defaults.resolve(late, facts())[1])
    assert not any("ends first" in line for line in defaults.resolve(late, facts(), new=False)[1])
    for quiet in (TrainConfig(device="cpu", run_dir="r", epochs=20, milestones=[5, 19]), TrainConfig(epochs=1)):
        text = "\n".join(defaults.resolve(dataclasses.replace(quiet, device="cpu", run_dir="r"), facts())[1])
        assert "ends first" not in text  # (drops within the run, and the default ones, say nothing)


def test_cli_python_and_fit_build_the_same_config(monkeypatch):
    import llp_fast.train.api as api

    seen = []

    class Stop(Exception):
        pass

    def capture(cfg, **kw):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(api, "prepare", capture)
    cases = [
        ([], {}),
        (["--data", "mnist5k", "--labeled-fraction", "0.02", "--epochs", "5"], dict(labeled_fraction=0.02, epochs=5)),
    ]
    for argv, kw in cases:
        cli = config_from_args(train_parser().parse_args([*argv, "--run-dir", "r"]))
        py = validate(TrainConfig(data=cli.data, run_dir="r", **kw))
        with pytest.raises(Stop):
            api.fit(None, cli.data, run_dir="r", **kw)
        assert cli == py == validate(seen[-1])  # field by field
        assert defaults.resolve(cli, facts())[0] == defaults.resolve(py, facts())[0]
    assert TrainConfig().milestones is None  # chosen from the epochs, never "no lr drop"


def test_digits_and_the_same_images_as_an_npz_are_the_same_data(tmp_path):
    src = load_data("digits", labeled_fraction=0.02, seed=1)
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x=src.x[:, 0].numpy(),
        y=src.targets.numpy(),
        x_test=src.x_test[:, 0].numpy(),
        y_test=src.y_test.numpy(),
    )
    other = load_data(f"npz:{path}", labeled_fraction=0.1, seed=5)  # the file's own split wins
    assert other.facts().own_labels and not src.facts().own_labels  # the file marked them; the rest is equal
    assert other.facts() == dataclasses.replace(src.facts(), own_labels=True)
    assert torch.equal(other.targets, src.targets) and torch.equal(other.x, src.x)
    cfg = TrainConfig(device="cpu", run_dir="r")
    assert defaults.resolve(cfg, other.facts())[0] == defaults.resolve(cfg, src.facts())[0]


def test_folder_facts_read_the_image_side(tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(6):
            Image.new("RGB", (48, 40), (30 * i, 10, 200)).save(tmp_path / f"c{c}" / f"{i}.png")
    f = load_data(f"folder:{tmp_path}", labeled_fraction=0.5, loader="pil").facts()
    assert (f.kind, f.side, f.channels, f.num_classes) == ("folder", 40, 3, 2)


def test_grayscale_folder_images_get_the_grayscale_defaults(tmp_path):
    """Digits stored as grey PNGs in a folder were given the colour defaults (flips, 35% crops) and a
    --translate the folder loader ignored; one colour image among them keeps the colour defaults."""
    from PIL import Image

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(6):
            Image.new("L", (16, 16), 40 * i).save(tmp_path / f"c{c}" / f"{i}.png")
    src = load_data(f"folder:{tmp_path}", labeled_fraction=0.5, loader="pil", workers=0)
    assert src.facts().channels == 1 and src.in_channels == 3  # still decoded as RGB for the network
    cfg, said = defaults.resolve(TrainConfig(device="cpu", run_dir="r"), src.facts())
    assert (cfg.flip, cfg.scale_min, cfg.translate) == (False, 0.85, 0.0)
    assert "--translate 0.0 (folder: images: random crops place them, no shift)" in " ".join(said)
    with pytest.raises(ConfigError, match="--translate 2: folder: images are not shifted"):
        check_new_run(dataclasses.replace(cfg, translate=2.0, data=f"folder:{tmp_path}"))
    check_new_run(dataclasses.replace(cfg, data=f"folder:{tmp_path}"))  # the default, 0
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "c0" / "9.png")
    assert load_data(f"folder:{tmp_path}", labeled_fraction=0.5, loader="pil", workers=0).facts().channels == 3


# -- strong views -----------------------------------------------------------------------------------


def test_strong_views_replay_from_the_generator_and_differ_from_weak():
    src = load_data("digits", labeled_fraction=0.1, seed=0)
    src.configure(image_size=16, scale_min=0.85, translate=1.0, flip=False, strong=True)
    x = src.x[:64]
    g = torch.Generator().manual_seed(3)
    w1, s1 = src.augment_pair(x, g)
    g.manual_seed(3)
    w2, s2 = src.augment_pair(x, g)
    assert torch.equal(w1, w2) and torch.equal(s1, s2)  # a resume replays the same views
    g.manual_seed(3)
    assert torch.equal(src.augment(x, g), w1)  # the weak view is the plain augmentation's draw
    assert w1.shape == s1.shape == (64, 1, 16, 16) and torch.isfinite(s1).all()
    assert float((w1 - s1).abs().mean()) > 0.1
    batches = list(src.train_batches(torch.arange(130), 64, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 3, 3] and batches[-1][1].shape[0] == 2


def test_each_photometric_op_does_what_it_names():
    x = torch.linspace(0, 1, 64).view(1, 1, 8, 8).repeat(2, 1, 1, 1)

    def one(name, m=0.5, sign=1.0):
        ops = torch.full((2, 2), strong.OPS.index("identity"))
        ops[:, 0] = strong.OPS.index(name)
        choice = dict(
            ops=ops,
            mag=torch.full((2, 2), m),
            sign=torch.full((2, 2), sign),
            cut_centre=torch.zeros(2, 2),
            cut_side=torch.zeros(2),
        )
        return strong.photometric(x.clone(), choice)

    assert torch.equal(one("identity"), x)
    torch.testing.assert_close(one("brightness", 0.5, -1.0), x * (1 - 0.45))
    sol = one("solarize", 0.25)  # pixels >= 0.75 inverted
    torch.testing.assert_close(sol, torch.where(x >= 0.75, 1 - x, x))
    assert one("posterize", 1.0).unique().numel() <= 16  # 4 bits kept
    eq = one("equalize")
    assert float(eq.min()) == 0.0 and float(eq.max()) == 1.0
    ac = one("autocontrast")
    torch.testing.assert_close(ac, (x - x.min()) / (x.max() - x.min()))
    cut = strong.photometric(
        x.clone(),
        dict(
            ops=torch.zeros(2, 2, dtype=torch.long),
            mag=torch.zeros(2, 2),
            sign=torch.ones(2, 2),
            cut_centre=torch.full((2, 2), 0.5),
            cut_side=torch.ones(2),
        ),
    )
    assert int((cut == 0.5).sum()) >= 2 * 16  # a grey square of half the side


def test_geometry_of_identity_ops_is_the_identity():
    choice = strong.draw(5, torch.Generator().manual_seed(0), "cpu")
    choice["ops"][:] = strong.OPS.index("identity")
    torch.testing.assert_close(strong.geometry(choice), torch.eye(3).repeat(5, 1, 1))
    choice["ops"][:, 0] = strong.OPS.index("rotate")
    choice["ops"][:, 1] = strong.OPS.index("identity")
    g = strong.geometry(choice)
    torch.testing.assert_close(torch.linalg.det(g), torch.ones(5))  # a rotation keeps the area


def test_pil_strong_view_is_seeded_and_keeps_the_size():
    from PIL import Image

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    a = np.asarray(strong.strong_pil(im.copy(), np.random.default_rng(7)))
    b = np.asarray(strong.strong_pil(im.copy(), np.random.default_rng(7)))
    assert a.shape == (24, 24, 3) and np.array_equal(a, b)


def test_folder_strong_views_come_from_the_pil_loader_and_dali_refuses(tmp_path):
    from PIL import Image

    from llp_fast.errors import ConfigError

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(5):
            Image.new("RGB", (20, 20), (40 * i, 90, 10 * c)).save(tmp_path / f"c{c}" / f"{i}.png")
    src = load_data(f"folder:{tmp_path}", labeled_fraction=0.5, loader="auto", workers=0)
    src.configure(image_size=16, strong=True)
    assert src.loader == "pil"  # auto: DALI makes no strong views
    weak, strg, idx = next(iter(src.train_batches(torch.arange(src.num_train), 4)))
    assert weak.shape == strg.shape == (4, 3, 16, 16) and idx.shape == (4,)
    pytest.importorskip("nvidia.dali")
    dali = load_data(f"folder:{tmp_path}", labeled_fraction=0.5, loader="dali", workers=0)
    with pytest.raises(ConfigError, match="--loader dali does not make the strong views"):
        dali.configure(image_size=16, strong=True)


def test_a_resume_compares_paths_as_saved_and_keeps_old_milestones(tmp_path, monkeypatch):
    """--extra-unlabeled saved absolute: the same file given relative was "a change"; milestones that
    repeat (saved by default before: [1, 1] at one epoch) are refused for new runs only."""
    from llp_fast.errors import ConfigError
    from llp_fast.train.api import _changed
    from llp_fast.train.newrun import check_new_run

    monkeypatch.chdir(tmp_path)
    saved = TrainConfig(data=f"npz:{tmp_path / 'd.npz'}", extra_unlabeled=str(tmp_path / "sel.npz"))
    assert _changed(saved, {"data": "npz:d.npz", "extra_unlabeled": "sel.npz"}, model_given=False) == []
    assert _changed(saved, {"extra_unlabeled": "other.npz"}, model_given=False) != []
    old = validate(TrainConfig(milestones=[1, 1], jump_milestones=[4, 4], rate_jump=3, epochs=5))
    assert old.milestones == [1, 1]  # a saved config still validates (its resume goes on)
    with pytest.raises(ConfigError, match=r"--milestones: expected increasing epochs from 1, each once, got '1,1'"):
        check_new_run(old)


def test_a_data_path_under_the_home_directory_is_expanded(tmp_path, monkeypatch):
    """A shell leaves "folder:~/x" as it is: it was read as ./~/x ("no such directory")."""
    from llp_fast.train.defaults import absolute_data

    monkeypatch.setenv("HOME", str(tmp_path))
    assert absolute_data("folder:~/imgs") == f"folder:{tmp_path / 'imgs'}"
    assert absolute_data("npz:~/d.npz") == f"npz:{tmp_path / 'd.npz'}" and absolute_data("digits") == "digits"
