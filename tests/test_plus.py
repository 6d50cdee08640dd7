"""The parts of --method plus (docs/method.md §8) and the trainer as a library: the whole-bank vote,
the consistency term, the weight average, the labeled stream, --method fixmatch, your own network
(Python and --arch module:factory) and --init-weights; each resumes exactly."""

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, one_error_line, own_network_settings, tiny_config

from llp_fast.cli.train import main as train_main
from llp_fast.embeddings import label_embeddings
from llp_fast.errors import ConfigError, Interrupted
from llp_fast.train import order
from llp_fast.train.api import fit, train
from llp_fast.train.checkpoint import CHECKPOINT, METRICS
from llp_fast.train.config import TrainConfig
from llp_fast.train.ema import WeightAverage
from llp_fast.train.loop import Trainer
from llp_fast.train.relabel import relabel
from llp_fast.train.report import read_metrics

OWN_NET_ARGS = [
    a for i, a in enumerate(TINY_ARGS) if "--width" not in TINY_ARGS[max(0, i - 1) : i + 1]
]  # its own width

# tiny networks on one thread, DataLoader and gloo-free but native: isolated (_isolate.py)
pytestmark = pytest.mark.isolated
torch.set_num_threads(1)
TIMING = {"images_per_s", "epoch_seconds", "relabel_seconds"}
PLUS = dict(method="plus", label_init=None, propagation_start=1, start_rounds=3, refresh_rounds=3, ema=0.9)


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_plus_resumes_mid_epoch_exactly(tmp_path):
    full = tiny_config(tmp_path, "full", **PLUS)
    train(full)
    cut = tiny_config(tmp_path, "cut", stop_after_steps=13, **PLUS)  # inside epoch 2, after the whole-bank vote
    with pytest.raises(Interrupted):
        train(cut)
    train(dataclasses.replace(cut, stop_after_steps=None), resume=True)
    a = read_metrics(os.path.join(full.run_dir, METRICS))
    b = read_metrics(os.path.join(cut.run_dir, METRICS))
    assert untimed(a) == untimed(b)
    assert a[1]["relabel_changed"] is not None and 0 < a[0]["consistency_share"] <= 1
    assert a[1]["test_top1_trained"] is not None  # the average is what test_top1 reports
    ma = torch.load(os.path.join(full.run_dir, CHECKPOINT), weights_only=True)
    mb = torch.load(os.path.join(cut.run_dir, CHECKPOINT), weights_only=True)
    for part in ("model", "ema"):
        for k, v in ma[part].items():
            same = torch.equal(v, mb[part][k]) if torch.is_tensor(v) else v == mb[part][k]
            assert same, (part, k)
    assert torch.equal(ma["bank"]["pieces"][0]["labels"], mb["bank"]["pieces"][0]["labels"])


def _random_bank(tmp_path, seed):
    """A plus trainer whose bank holds random unit rows; the bank's labels as the engine reads them."""
    tr = Trainer(tiny_config(tmp_path, **PLUS))
    gen = torch.Generator().manual_seed(seed)
    tr.bank.embeddings.copy_(torch.nn.functional.normalize(torch.randn(tr.bank.embeddings.shape, generator=gen), dim=1))
    labels = np.full(len(tr.bank), -1)
    labels[: tr.bank.num_labeled] = tr.bank.labeled_classes.numpy()
    return tr, tr.bank, tr.bank.num_labeled, labels


def test_whole_bank_vote_stores_the_engines_labels(tmp_path):
    tr, bank, m, labels = _random_bank(tmp_path, 0)
    # (ties of equal confidence by row: the trainer's results were measured with them, docs/method.md §8)
    want = label_embeddings(
        bank.embeddings, labels, rounds=3, k=tr.k, t=tr.cfg.t, tau=tr.cfg.tau, normalize=False, ties="row"
    )
    stats = relabel(bank, tr.cfg, k=tr.k)
    assert np.array_equal(bank.labels[m:].numpy(), want.labels[m:])
    np.testing.assert_array_equal(bank.confidence[m:].numpy(), want.confidence[m:])
    assert stats["relabel_changed"] == 1.0  # instance ids before
    assert torch.equal(bank.labels[:m], bank.labeled_classes) and bool((bank.confidence[:m] == 1).all())


def test_whole_bank_vote_takes_the_cap_and_pool_given(tmp_path):
    """--max-voters 0 is a cap of 0 pseudo-labeled voters (it meant no cap: O(N^2)), and one round
    takes --density-pool (it took the unlabeled rows whatever was given), as llp-fast-propagate does."""
    tr, bank, m, labels = _random_bank(tmp_path, 1)
    common = dict(k=tr.k, t=tr.cfg.t, tau=tr.cfg.tau, normalize=False, ties="row")
    for change, want_kw in (
        (dict(max_voters=0), dict(rounds=3, max_voters=0)),
        (dict(refresh_rounds=1, density_pool="all"), dict(rounds=1, density_pool="all")),
    ):
        cfg = dataclasses.replace(tr.cfg, **change)
        want = label_embeddings(bank.embeddings, labels, **common, **want_kw)
        relabel(bank, cfg, k=tr.k)
        assert np.array_equal(bank.labels[m:].numpy(), want.labels[m:]), change
        np.testing.assert_array_equal(bank.confidence[m:].numpy(), want.confidence[m:])
    cap0 = label_embeddings(bank.embeddings, labels, **common, rounds=3, max_voters=0)
    assert len(cap0.voter_rows) == m  # the labeled rows alone vote
    uncapped = label_embeddings(bank.embeddings, labels, **common, rounds=3, max_voters=None)
    assert not np.array_equal(cap0.labels, uncapped.labels)


def test_weight_average_follows_the_formula():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(net, 0.9)
    avg.steps = 100  # past the warm-up: the decay is 0.9
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(5.0)
    avg.update(net)
    for a, s, p in zip(avg.model.parameters(), start, net.parameters()):
        torch.testing.assert_close(a, 0.9 * s + 0.1 * p)
        assert not a.requires_grad
    assert torch.equal(avg.model[1].running_mean, net[1].running_mean)  # buffers copied
    first = WeightAverage(net, 0.999)  # step 0: decay 1/10, the average follows the weights
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    before = [a.clone() for a in first.model.parameters()]
    first.update(net)
    for a, b, p in zip(first.model.parameters(), before, net.parameters()):
        torch.testing.assert_close(a, 0.1 * b + 0.9 * p)
    again = WeightAverage(net, 0.999)
    again.load_state_dict(first.state_dict())
    assert again.steps == 1


def test_labeled_stream_adds_labeled_examples_to_every_batch():
    labeled = torch.tensor([3, 7, 11])
    s = order.Schedule(n=50, labeled=labeled, batch_size=16, labeled_batch=4)
    visits = order.epoch_order(s, torch.Generator().manual_seed(0))
    steps = s.steps_per_epoch()
    assert s.loader_batch_size() == 20 and visits.shape == (steps * 20,)
    per_batch = visits.view(steps, 20)
    assert bool(torch.isin(per_batch[:, 16:], labeled).all())  # the stream's share: labeled only
    assert set(per_batch[:, :16].flatten().tolist()) == set(range(50))  # every example visited


def test_fixmatch_method_trains_without_a_bank(tmp_path):
    tr = Trainer(tiny_config(tmp_path, method="fixmatch", label_init=None, epochs=1, threshold=0.0))
    assert tr.bank is None and tr.cfg.labeled_batch == 16 and tr.cfg.consistency_target == "weak"
    row = tr.fit()
    assert row["consistency_share"] == 1.0 and row["pseudo_acc"] is None  # threshold 0: every example


FACTORY = """
import torch.nn as nn

def small_cnn(in_channels, width=6):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

def drop_cnn(in_channels):  # draws from torch's global generator at every training step
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.Dropout(0.3),
                         nn.Conv2d(6, 6, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

def not_a_module():
    return 3

def broken():
    raise RuntimeError("no weights here")

class Wrapped(nn.Module):  # a network whose own keys start with "backbone."
    def __init__(self, in_channels):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())

    def forward(self, x):
        return self.backbone(x)

def wrapped(in_channels):
    return Wrapped(in_channels)

def bn_features(in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.BatchNorm1d(6))
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.chdir(tmp_path)  # the current directory is searched first, as python -m does
    yield "mynets"
    sys.modules.pop("mynets", None)


def test_own_network_through_python_and_the_cli_resumes_exactly(tmp_path, factory_module, capsys):
    from llp_fast.nn import import_factory

    small_cnn = import_factory("mynets:small_cnn")  # found in the current directory
    data, settings = own_network_settings(tmp_path, "py", epochs=1)
    out = fit(small_cnn(1), data, **settings)
    assert out.model.feature_dim == 6 and out.config.arch == "given:Sequential"
    assert 0 <= out.metrics["test_top1"] <= 1
    again = fit(small_cnn(1), "digits", resume=True, run_dir=str(tmp_path / "py"), epochs=2, quiet=True)
    assert again.metrics["epoch"] == 2 and again.config.epochs == 2
    rc = train_main(["--resume", str(tmp_path / "py")])
    one_error_line(capsys, rc, "was given in Python")

    flags = [*OWN_NET_ARGS, "--quiet", "--baseline", "off", "--method", "paper", "--arch", "mynets:small_cnn"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert train_main([*flags, "--run-dir", full, "--epochs", "2"]) == 0
    assert train_main([*flags, "--run-dir", cut, "--epochs", "2", "--stop-after-steps", "5"]) == 130
    assert train_main(["--resume", cut, "--quiet"]) == 0
    a, b = (read_metrics(os.path.join(d, METRICS)) for d in (full, cut))
    assert untimed(a) == untimed(b) and len(a) == 2
    assert json.load(open(os.path.join(cut, "config.json")))["arch"] == "mynets:small_cnn"


def test_an_own_network_on_the_command_line_trains_its_baseline_and_loads_its_own_checkpoint(
    tmp_path, factory_module, capsys
):
    """The baseline twin of a --arch module:factory run carried the ResNets' resolved width, which
    the new-run checks refused ("the supervised-only baseline failed: --width 16"), on every small
    data set and again at each resume; and such a run's checkpoint (a WithHeads: backbone.*, fc.*,
    embed.*) or weights without BatchNorm's num_batches_tracked were refused by --init-weights."""
    flags = [*OWN_NET_ARGS, "--quiet", "--method", "paper", "--arch", "mynets:small_cnn", "--epochs", "1"]
    run = str(tmp_path / "r")
    assert train_main([*flags, "--run-dir", run, "--baseline", "on", "--baseline-mode", "sequential"]) == 0
    assert len(read_metrics(os.path.join(run, "baseline", METRICS))) == 1
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["arch"] == "mynets:small_cnn" and saved["width"] is None
    capsys.readouterr()

    ckpt = os.path.join(run, CHECKPOINT)
    assert train_main([*flags, "--run-dir", str(tmp_path / "w"), "--baseline", "off", "--init-weights", ckpt]) == 0
    from llp_fast.nn import import_factory

    net = import_factory("mynets:small_cnn")(1)
    torch.save({k: v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}, tmp_path / "old.pt")
    old = str(tmp_path / "old.pt")
    assert train_main([*flags, "--run-dir", str(tmp_path / "o"), "--baseline", "off", "--init-weights", old]) == 0
    torch.save({"0.weight": net.state_dict()["0.weight"]}, tmp_path / "part.pt")  # the rest still counts
    part = str(tmp_path / "part.pt")
    rc = train_main([*flags, "--run-dir", str(tmp_path / "p"), "--baseline", "off", "--init-weights", part])
    one_error_line(capsys, rc, "does not fit the network: missing '0.bias'")
    # a network whose own keys start with "backbone.": its state dict as it is, and its run's checkpoint
    wflags = [*OWN_NET_ARGS, "--quiet", "--method", "paper", "--arch", "mynets:wrapped", "--epochs", "1"]
    torch.save(import_factory("mynets:wrapped")(1).state_dict(), tmp_path / "w.pt")
    assert (
        train_main(
            [*wflags, "--run-dir", str(tmp_path / "w1"), "--baseline", "off", "--init-weights", str(tmp_path / "w.pt")]
        )
        == 0
    )
    wck = str(tmp_path / "w1" / CHECKPOINT)
    assert train_main([*wflags, "--run-dir", str(tmp_path / "w2"), "--baseline", "off", "--init-weights", wck]) == 0
    rc = train_main([*flags, "--run-dir", str(tmp_path / "g"), "--arch", "given:Sequential"])  # Python's mark
    one_error_line(capsys, rc, "--arch given:Sequential: the mark of a network passed in Python")
    assert not os.path.exists(tmp_path / "g")


def test_a_fit_that_fails_to_start_leaves_no_run_directory(tmp_path, monkeypatch):
    """Each failed fit() without run_dir left an empty runs/<time> until the interpreter exited."""
    from llp_fast.errors import DataError

    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        with pytest.raises(DataError, match="no such file"):
            fit(None, f"npz:{tmp_path / 'missing.npz'}", epochs=1, quiet=True)
    assert os.listdir(tmp_path / "runs") == []


def test_library_calls_refuse_what_they_would_ignore(tmp_path, factory_module):
    """fit(model, width=8) and fit(model, arch=...) were ignored without a word, as were a resume's
    arch in fit and every changed setting (and another network class) in train(cfg, resume=True);
    train() with a path object wrote half a run and a JSON TypeError; prepare() started over in a
    run directory holding a run; resume="no" resumed."""
    import pathlib

    from llp_fast.errors import ConfigError
    from llp_fast.nn import import_factory
    from llp_fast.train.api import prepare

    small_cnn = import_factory("mynets:small_cnn")
    data, settings = own_network_settings(tmp_path, "own", epochs=1)
    for bad, match in (
        ({"width": 8}, "--width 8: the network is the module given"),
        ({"arch": "resnet50"}, "--arch resnet50"),
        ({"arch": "resnet18"}, "--arch resnet18: the network is the module given in Python"),  # the default's value
    ):
        with pytest.raises(ConfigError, match=match):
            fit(small_cnn(1), data, **{**settings, **bad})
    assert not os.path.exists(settings["run_dir"])
    with pytest.raises(ConfigError, match="--arch given:Foo: the mark of a network passed in Python"):
        fit(None, data, **{**settings, "arch": "given:Foo"})
    with pytest.raises(TypeError, match="resume must be True or False, got 'no'"):
        fit(small_cnn(1), data, resume="no", **settings)

    cfg = tiny_config(tmp_path, "resnet", epochs=1)
    train(dataclasses.replace(cfg, run_dir=pathlib.Path(cfg.run_dir)))  # a path object
    assert json.load(open(os.path.join(cfg.run_dir, "config.json")))["run_dir"] == cfg.run_dir
    with pytest.raises(ConfigError, match=r"arch='resnet50' \(saved: 'resnet18'\)"):
        fit(None, resume=True, run_dir=cfg.run_dir, arch="resnet50", epochs=2)
    with pytest.raises(ConfigError, match=r"lr=0.5 \(saved: "):
        train(dataclasses.replace(cfg, lr=0.5, epochs=2), resume=True)
    with pytest.raises(ConfigError, match="give run_dir"):
        train(dataclasses.replace(cfg, run_dir=None), resume=True)
    with pytest.raises(TypeError, match="cfg must be a TrainConfig, got dict"):
        train(dataclasses.asdict(cfg))
    before = open(os.path.join(cfg.run_dir, "config.json")).read()
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare(dataclasses.replace(cfg, seed=42))
    assert open(os.path.join(cfg.run_dir, "config.json")).read() == before
    assert train(dataclasses.replace(cfg, epochs=2), resume=True)["epoch"] == 2  # the same settings: fine

    out = fit(small_cnn(1), data, **settings)

    class Other(torch.nn.Sequential):
        pass

    with pytest.raises(ConfigError, match="same kind of network"):
        train(dataclasses.replace(out.config, epochs=2), resume=True, model=Other(*small_cnn(1)))
    assert train(dataclasses.replace(out.config, epochs=2), resume=True, model=small_cnn(1))["epoch"] == 2


def test_a_bug_in_ones_own_network_keeps_its_traceback_and_bad_settings_are_named(tmp_path, factory_module):
    """A ValueError in the user's forward read "ConfigError: --arch given:Buggy: too many values to
    unpack", its frames gone, in Python where no flag was used; a setting of the wrong type
    (milestones="5,1") was a bare TypeError from a comparison; train(cfg) with run_dir=5 os.path's."""
    import traceback

    from llp_fast.errors import ConfigError
    from llp_fast.nn import import_factory
    from llp_fast.train.api import prepare

    class Buggy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            b, c = x.shape[:3]  # the user's bug
            return self.conv(x).mean((2, 3))

    data, settings = own_network_settings(tmp_path, "own", epochs=1)
    with pytest.raises(ValueError, match="too many values to unpack") as info:
        fit(Buggy(), data, **settings)
    assert not isinstance(info.value, ConfigError)
    assert "b, c = x.shape[:3]" in "".join(traceback.format_exception(info.value))
    three = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ConfigError, match=r"^the network given \(Sequential\): the network fails on a \(1, ") as info:
        fit(three, data, **settings)  # torch's own error on these images: one line, the cause chained
    assert isinstance(info.value.__cause__, RuntimeError)

    class Aux(torch.nn.Sequential):  # Inception-style: a second output in training mode only
        def forward(self, x):
            out = super().forward(x)
            return (out, out) if self.training else out

    aux = Aux(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ConfigError, match=r"must return features \(B, F\) or a feature map \(B, F, h, w\), got tuple"):
        fit(aux, data, **settings)  # met at the first step (a traceback), not when the network is built
    small_cnn = import_factory("mynets:small_cnn")
    for bad, match in (
        ({"milestones": "5,1"}, "--milestones: expected a list of epochs, got '5,1'"),
        ({"milestones": 5}, "--milestones: expected a list of epochs, got 5"),
        ({"rate_jump": "x", "milestones": [1]}, "--rate-jump: expected a whole number >= 1, got 'x'"),
    ):
        with pytest.raises(ConfigError, match=match):
            fit(small_cnn(1), data, **{**settings, **bad})
    cfg = tiny_config(tmp_path, "cfg", epochs=1)
    with pytest.raises(ConfigError, match="--milestones: expected a list of epochs, got 'abc'"):
        train(dataclasses.replace(cfg, milestones="abc"))
    with pytest.raises(TypeError, match="run_dir must be a path"):
        prepare(dataclasses.replace(cfg, run_dir=5))


def test_folder_data_and_a_network_drawing_random_numbers_resume_exactly(tmp_path, factory_module):
    """folder: images go through a DataLoader, whose every iterator drew its base seed from torch's
    global generator: a run resumed mid-epoch makes one iterator more, and the network's dropout
    then drew other numbers (the weights differed by up to 3e-3)."""
    from test_data import make_folder

    from llp_fast.train.checkpoint import load

    root = make_folder(tmp_path / "imgs", classes=3, per_class=12, size=(10, 10))
    flags = ["--data", f"folder:{root}", "--arch", "mynets:drop_cnn", "--epochs", "2", "--batch-size", "8"]
    flags += ["--labeled-fraction", "0.3", "--baseline", "off", "--quiet", "--threads", "1", "--workers", "0"]
    flags += ["--image-size", "8", "--k", "3", "--t", "5", "--propagation-start", "1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert train_main([*flags, "--run-dir", full]) == 0
    assert train_main([*flags, "--run-dir", cut, "--stop-after-steps", "3"]) == 130
    assert train_main(["--resume", cut, "--quiet"]) == 0
    a, b = (read_metrics(os.path.join(d, METRICS)) for d in (full, cut))
    assert untimed(a) == untimed(b) and len(a) == 2
    wa, wb = (load(os.path.join(d, CHECKPOINT))["model"] for d in (full, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fit_refuses_what_a_new_run_or_a_resume_would_lose(tmp_path, factory_module):
    import pathlib

    from llp_fast.errors import ConfigError
    from llp_fast.nn import import_factory
    from llp_fast.train.defaults import new_run_dir

    small_cnn = import_factory("mynets:small_cnn")
    data, settings = own_network_settings(tmp_path, "py", epochs=1)
    run_dir = settings["run_dir"]
    fit(small_cnn(1), data, **settings)
    before = open(os.path.join(run_dir, CHECKPOINT), "rb").read()
    with pytest.raises(ConfigError, match="already holds a run"):  # it used to overwrite the run
        fit(small_cnn(1), data, **settings)
    with pytest.raises(ConfigError, match="give run_dir"):
        fit(small_cnn(1), data, resume=True, epochs=2)
    with pytest.raises(ConfigError, match=r"lr=5.0 \(saved: "):  # a resume used to ignore it
        fit(small_cnn(1), data, resume=True, run_dir=run_dir, lr=5.0, epochs=2)

    class Other(torch.nn.Sequential):
        pass

    with pytest.raises(ConfigError, match="same kind of network"):
        fit(Other(*small_cnn(1)), data, resume=True, run_dir=run_dir, epochs=2)
    from llp_fast.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not fit this network: '.*' has shape"):  # named no key
        fit(small_cnn(1, width=8), data, resume=True, run_dir=run_dir, epochs=2)
    assert open(os.path.join(run_dir, CHECKPOINT), "rb").read() == before
    again = fit(small_cnn(1), data, resume=True, **{**settings, "epochs": 2})  # the same settings: fine
    assert again.metrics["epoch"] == 2
    with pytest.raises(ConfigError, match="supervised_only must be True or False"):  # "False" read as on
        fit(small_cnn(1), data, **{**settings, "run_dir": str(tmp_path / "s"), "supervised_only": "False"})
    with pytest.raises(TypeError, match="run_dir"):
        fit(small_cnn(1), data, **{**settings, "run_dir": 5})
    out = fit(small_cnn(1), data, **{**settings, "run_dir": pathlib.Path(tmp_path / "as_path")})
    assert out.config.run_dir == str(tmp_path / "as_path")

    class OneRow(torch.nn.Module):  # mixes the batch: one row for all images
        def __init__(self):
            super().__init__()
            self.net = small_cnn(1)

        def forward(self, x):
            return self.net(x).mean(0, keepdim=True)

    with pytest.raises(ConfigError, match="one row of F >= 1"):
        fit(OneRow(), data, **{**settings, "run_dir": str(tmp_path / "onerow")})
    # runs started in the same second get directories of their own
    made = [new_run_dir(str(tmp_path / "runs")) for _ in range(3)]
    assert len(set(made)) == 3 and all(os.path.isdir(d) for d in made)


def test_a_last_batch_of_one_image_under_batch_norm_is_one_line(tmp_path, factory_module, capsys):
    rng = np.random.default_rng(0)
    y = np.where(np.arange(129) < 20, np.arange(129) % 4, -1)  # 129 = 2 x 64 + 1
    x = rng.integers(0, 255, (149, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x[:129], y=y, x_test=x[129:], y_test=np.arange(20) % 4)
    argv = ["--data", f"npz:{tmp_path / 'd.npz'}", "--arch", "mynets:bn_features", "--method", "paper"]
    argv += ["--batch-size", "64", "--epochs", "1", "--k", "3", "--t", "5", "--device", "cpu", "--baseline", "off"]
    rc = train_main([*argv, "--quiet", "--run-dir", str(tmp_path / "r")])
    one_error_line(capsys, rc, "--batch-size 64: a batch of one image")


def test_a_diverging_run_is_one_line(tmp_path, capsys):
    for extra in (["--tau", "1e-30"], ["--lr", "1e30"]):  # the bank's input check came first
        argv = ["--run-dir", str(tmp_path / extra[0][2:]), *TINY_ARGS, "--baseline", "off", "--quiet", *extra]
        rc = train_main(argv)
        one_error_line(capsys, rc, "lower --lr")


@pytest.mark.parametrize(
    "arch, match",
    [
        ("nosuchmodule:f", "cannot import nosuchmodule"),
        ("mynets:missing", "has no function 'missing'"),
        ("mynets:not_a_module", "returned a int"),
        ("mynets:broken", "the factory raised RuntimeError: no weights here"),
        ("not a spec", "--arch"),
    ],
)
def test_a_bad_factory_is_one_line(tmp_path, factory_module, capsys, arch, match):
    argv = ["--run-dir", str(tmp_path / "r"), *OWN_NET_ARGS, "--arch", arch]
    if arch == "not a spec":  # refused where it is parsed, naming the flag (argparse's usage error)
        with pytest.raises(SystemExit) as e:
            train_main(argv)
        assert e.value.code == 2 and "argument --arch" in capsys.readouterr()[1]
    else:
        assert one_error_line(capsys, train_main(argv), match).startswith(f"llp-fast-train: error: --arch {arch}: ")


def test_init_weights_loads_the_trunk_and_refuses_a_misfit(tmp_path, capsys):
    donor = Trainer(tiny_config(tmp_path, "donor", seed=3))
    sd = {k: v for k, v in donor.model.state_dict().items() if not k.startswith("fc.")}
    torch.save(sd, tmp_path / "w.pt")
    tr = Trainer(tiny_config(tmp_path, "got", init_weights=str(tmp_path / "w.pt")))
    for k, v in tr.model.state_dict().items():
        if not k.startswith(("fc.", "embed.")):
            assert torch.equal(v, sd[k]), k
    torch.save({"stem.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    rc = train_main(["--run-dir", str(tmp_path / "r"), *TINY_ARGS, "--init-weights", str(tmp_path / "bad.pt")])
    one_error_line(capsys, rc, "does not fit the network")
    rc = train_main(["--run-dir", str(tmp_path / "r2"), *TINY_ARGS, "--init-weights", str(tmp_path / "none.pt")])
    one_error_line(capsys, rc, "no such file")


def test_a_resume_needs_neither_the_first_directory_nor_the_init_weights_file(tmp_path, monkeypatch):
    """The data's path is saved absolute, and --init-weights is read when the run starts only (the
    checkpoint holds the weights after that)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = tmp_path / "data"
    data.mkdir()
    labels = np.where(np.arange(len(y)) % 10 == 0, y, -1)
    np.savez(data / "d.npz", x=(x * 15).astype(np.uint8).reshape(-1, 8, 8)[:600], y=labels[:600])
    donor = Trainer(tiny_config(tmp_path, "donor", seed=3))
    torch.save({k: v for k, v in donor.model.state_dict().items() if not k.startswith("fc.")}, data / "w.pt")
    run = str(tmp_path / "run")
    monkeypatch.chdir(data)
    argv = ["--data", "npz:d.npz", *TINY_ARGS, "--baseline", "off", "--quiet", "--run-dir", run]
    assert train_main([*argv, "--init-weights", "w.pt", "--epochs", "2", "--stop-after-steps", "3"]) == 130
    os.rename(data / "w.pt", data / "moved.pt")
    monkeypatch.chdir(tmp_path)
    assert train_main(["--resume", run, "--quiet"]) == 0
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["data"] == f"npz:{data / 'd.npz'}" and saved["init_weights"] == "w.pt"


def test_a_run_that_fails_to_start_leaves_no_run_directory(tmp_path):
    import subprocess

    cmd = [sys.executable, "-m", "llp_fast.cli", "--data", "npz:none.npz", "--epochs", "1", "--quiet"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no such file" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()  # the claimed runs/<time> is removed at exit when empty


def test_a_run_directory_is_claimed_while_it_trains(tmp_path, factory_module, capsys):
    """Two runs in one run directory at once mixed their files (six metrics rows for three epochs,
    one's config with the other's checkpoint): the directory is claimed while a run trains."""
    from llp_fast.errors import ConfigError
    from llp_fast.nn import import_factory
    from llp_fast.train import claim as ck

    small_cnn = import_factory("mynets:small_cnn")
    data, settings = own_network_settings(tmp_path, "py", epochs=1)
    run_dir = settings["run_dir"]
    os.makedirs(run_dir)
    held = ck.claim_run_dir(run_dir)  # as another process training there holds it
    ck._HELD.discard(held)  # (not this process's own claim: that one is said apart)
    try:
        with pytest.raises(ConfigError, match="another process is training in this run directory"):
            fit(small_cnn(1), data, **settings)
        rc = train_main(["--data", "digits", "--run-dir", run_dir, *TINY_ARGS, "--baseline", "off", "--quiet"])
        one_error_line(capsys, rc, "another process is training in this run directory")
        assert os.listdir(run_dir) == []  # refused before anything was written there
    finally:
        os.close(held)
    fit(small_cnn(1), data, **settings)  # free again: it trains, and gives its claim back at the end
    held = ck.claim_run_dir(run_dir)  # a resume while it trains read pieces it was replacing: "corrupt"
    ck._HELD.discard(held)
    try:
        rc = train_main(["--resume", run_dir, "--epochs", "2", "--quiet"])
        one_error_line(capsys, rc, "another process is training in this run directory")
        # a new run there while it trains: said so (it said "continue it with --resume", refused too)
        rc = train_main(["--data", "digits", "--run-dir", run_dir, *TINY_ARGS, "--baseline", "off", "--quiet"])
        one_error_line(capsys, rc, "another process is training in this run directory")
        with pytest.raises(ConfigError, match="another process is training in this run directory"):
            fit(small_cnn(1), data, **settings)
    finally:
        os.close(held)
    assert fit(small_cnn(1), data, resume=True, **{**settings, "epochs": 2}).metrics["epoch"] == 2


def test_a_killed_trainers_forked_workers_do_not_hold_its_claim(tmp_path):
    """After a kill -9 of a folder: run with --workers 2, its forked loader workers lived on for
    seconds holding the run directory's claim, and a resume at once was refused as "another process
    is training in this run directory"."""
    import signal
    import subprocess

    from llp_fast.train import claim as ck

    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    code = (
        "import os, sys, time\n"
        "from llp_fast.train import claim\n"
        f"fd = claim.claim_run_dir({run_dir!r})\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.close(1)\n"  # (else the pipe keeps subprocess.run waiting for it)
        "    os.close(2)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "os._exit(0)\n"  # the trainer dies at once; its worker lives on
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    worker = int(out.stdout.strip())
    try:
        os.kill(worker, 0)  # alive
        ck.release_run_dir(ck.claim_run_dir(run_dir))  # claimable at once: no ConfigError
    finally:
        os.kill(worker, signal.SIGKILL)


def test_resume_refusals_and_a_network_that_starts_at_nan(tmp_path, factory_module, capsys):
    from llp_fast.errors import ConfigError
    from llp_fast.nn import import_factory

    small_cnn = import_factory("mynets:small_cnn")
    cut = tiny_config(tmp_path, "cut", epochs=2, stop_after_steps=13)  # inside epoch 2
    with pytest.raises(Interrupted):
        train(cut)
    # --epochs 1 on a run partway into epoch 2 reported epoch 1's accuracy and trained nothing
    with pytest.raises(ConfigError, match=r"stopped partway into epoch 2\); give --epochs 2 or more"):
        train(dataclasses.replace(cut, stop_after_steps=None, epochs=1), resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):  # train() overwrote it
        train(dataclasses.replace(cut, stop_after_steps=None))
    # --baseline on a resume was accepted and ignored
    rc = train_main(["--resume", cut.run_dir, "--epochs", "2", "--baseline", "on", "--quiet"])
    one_error_line(capsys, rc, f"--baseline on: the run in {cut.run_dir} began without the supervised-only baseline")
    assert train_main(["--resume", cut.run_dir, "--epochs", "2", "--baseline", "off", "--quiet"]) == 0

    class Broken(torch.nn.Sequential):  # NaN from the start: a ValueError traceback from the bank's update
        def forward(self, x):
            return super().forward(x) * float("nan")

    data, settings = own_network_settings(tmp_path, "nan", epochs=1)
    with pytest.raises(ConfigError, match="the network gives NaN or Inf embeddings before any training step"):
        fit(Broken(*small_cnn(1)), data, **settings)


def test_an_unlabeled_fraction_that_keeps_none_is_named(tmp_path, capsys):
    argv = ["--data", "digits", "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--width", "4", "--quiet"]
    rc = train_main([*argv, "--image-size", "8", "--unlabeled-fraction", "0.0001", "--baseline", "off"])
    one_error_line(capsys, rc, "--unlabeled-fraction 0.0001 keeps none of the 1295 unlabeled training examples")


def test_width_with_a_network_of_ones_own_is_refused(tmp_path, factory_module, capsys):
    """--width sized the built-in ResNets only: with a factory --arch it was ignored without a word."""
    rc = train_main(["--run-dir", str(tmp_path / "r"), *TINY_ARGS, "--arch", "mynets:small_cnn"])
    one_error_line(capsys, rc, "--width 4: the width of resnet18 and resnet50 only; --arch mynets:small_cnn builds")
    assert not (tmp_path / "r").exists()


def test_the_start_vote_takes_the_runs_voter_cap():
    """--start-rounds above 1 votes over the whole bank as a refresh does; it took the labeller's own
    cap (max(20,000, 2 M)) whatever --max-voters said."""
    from types import SimpleNamespace

    from llp_fast.embeddings import label_embeddings
    from llp_fast.train.warmstart import vote_on_inputs

    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(300, 6, generator=g), dim=1)
    targets = torch.full((300,), -1)
    targets[:12] = torch.arange(12) % 3
    cfg = SimpleNamespace(start_rounds=3, t=5, tau=0.1, density_weighting=True, max_voters=20, density_pool="auto")
    unl, labels, conf = vote_on_inputs(feats, targets, cfg, k=3, num_classes=3)
    want = label_embeddings(
        feats, targets.numpy(), rounds=3, k=3, t=5, tau=0.1, max_voters=20, normalize=False, ties="row"
    )
    assert torch.equal(labels, torch.from_numpy(want.labels[unl.numpy()]))
    assert len(want.voter_rows) <= 12 + 20 + 3  # (each class's share rounded)
    free = label_embeddings(feats, targets.numpy(), rounds=3, k=3, t=5, tau=0.1, normalize=False)
    assert len(free.voter_rows) > len(want.voter_rows)  # (the cap mattered here)


class _FailsToTrain(torch.nn.Module):
    """Features in eval mode (the heads' probe), an error at the first training step."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if self.training:
            raise RuntimeError("my network's own bug")
        return self.conv(x).mean(dim=(2, 3))


def test_a_fit_failing_at_its_first_step_leaves_no_run_directory(tmp_path, monkeypatch):
    """A fit() without run_dir whose network failed at its first training step left runs/<time>
    (config.json, tb/) on every try; one that checkpointed keeps its directory."""
    monkeypatch.chdir(tmp_path)
    data, settings = own_network_settings(tmp_path, epochs=1)
    del settings["run_dir"]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="my network's own bug"):
            fit(_FailsToTrain(), data, **settings)
    assert os.listdir(tmp_path / "runs") == []
    out = fit(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten()), data, **settings)
    assert os.listdir(tmp_path / "runs") == [os.path.basename(out.config.run_dir)]


class _FailsOnce(_FailsToTrain):
    def forward(self, x):
        if self.training and not getattr(self, "failed", False):
            self.failed = True
            raise RuntimeError("my network's own bug")
        return self.conv(x).mean(dim=(2, 3))


def test_a_second_fit_after_a_failed_first_writes_its_settings(tmp_path, monkeypatch):
    """prepare() without run_dir, a fit() failing at its first step (its runs/<time> and settings
    removed), then fit() again: that run trained and checkpointed with no config.json, which the
    tools and the resume read."""
    from llp_fast.train.api import prepare

    monkeypatch.chdir(tmp_path)
    data, settings = own_network_settings(tmp_path, epochs=1)
    del settings["run_dir"]
    trainer = prepare(TrainConfig(data=data, **settings), model=_FailsOnce())
    written = (pathlib.Path(trainer.cfg.run_dir) / "config.json").read_text()
    with pytest.raises(RuntimeError, match="my network's own bug"):
        trainer.fit()
    assert not os.path.exists(trainer.cfg.run_dir)
    trainer.fit()
    run = pathlib.Path(trainer.cfg.run_dir)
    assert sorted(os.listdir(run)) == sorted([CHECKPOINT, METRICS, "config.json", "tb"])
    assert json.loads((run / "config.json").read_text()) == json.loads(written)
    # a prepared run whose directory went before its first fit (a relative runs/<time> after a
    # chdir, or removed): the fit makes it again (reopen's write of the settings failed there)
    trainer = prepare(TrainConfig(data=data, **settings), model=_FailsOnce())
    trainer.model.backbone.failed = True
    shutil.rmtree(trainer.cfg.run_dir)
    trainer.fit()
    assert sorted(os.listdir(trainer.cfg.run_dir)) == sorted([CHECKPOINT, METRICS, "config.json", "tb"])


def test_a_run_directory_with_metrics_and_no_checkpoint_is_not_taken_over(tmp_path, capsys):
    """A run whose checkpoint was deleted (to save space) lost its metrics.jsonl and config.json
    to the next run started there, even one that never trained a step."""
    cfg = tiny_config(tmp_path, epochs=1)
    train(cfg)
    run = tmp_path / "run"
    os.remove(run / CHECKPOINT)
    record = {name: (run / name).read_bytes() for name in (METRICS, "config.json")}
    with pytest.raises(ConfigError, match=f"holds the metrics of a run whose {CHECKPOINT} is gone"):
        train(dataclasses.replace(cfg, lr=0.05))
    rc = train_main(["--run-dir", str(run), "--quiet", "--baseline", "off", *TINY_ARGS])
    one_error_line(capsys, rc, f"remove {run / METRICS} to start over there, or pick another --run-dir")
    assert {name: (run / name).read_bytes() for name in record} == record
    # an empty metrics file (a run that failed before its first epoch) is no record
    (run / METRICS).write_text("")
    train(dataclasses.replace(cfg, lr=0.05))
    assert json.loads((run / "config.json").read_text())["lr"] == 0.05


def test_library_calls_check_what_they_are_given(tmp_path):
    """A TorchScript backbone under the weight average (deepcopy under grad mode: non-leaf
    parameters); a resume's epochs of the wrong type (a bare TypeError); prepare() resuming with
    another class of network (it trained it and saved it as the run's); load_network's arguments
    (torch's RuntimeError, a TypeError from os.path, "yes" taken as random weights)."""
    from llp_fast.train.api import prepare
    from llp_fast.train.trained import load_network

    data, settings = own_network_settings(tmp_path, method="plus", epochs=1)
    net = lambda: torch.nn.Sequential(  # noqa: E731
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    out = fit(torch.jit.script(net()), data, **settings)
    assert out.average is not None and all(p.is_leaf for p in out.average.parameters())
    run_dir = settings["run_dir"]
    with pytest.raises(ConfigError, match="--arch resnet18: the network is the module given in Python"):
        fit(torch.jit.script(net()), run_dir=run_dir, resume=True, arch="resnet18")  # (a resume took it)
    for epochs in ("3", [3], 2.5):
        with pytest.raises(ConfigError, match="--epochs: expected a whole number >= 1"):
            fit(torch.jit.script(net()), run_dir=run_dir, resume=True, epochs=epochs)
    with pytest.raises(ConfigError, match="trained RecursiveScriptModule, not Sequential"):
        prepare(tiny_config(tmp_path, epochs=2), resume=True, model=net())
    with pytest.raises(TypeError, match="path must be a checkpoint file or run directory"):
        load_network(123)
    with pytest.raises(ValueError, match="device: expected cpu, cuda or cuda:N, got 'gpu'"):
        load_network(run_dir, device="gpu")
    with pytest.raises(TypeError, match="random_init must be True or False"):
        load_network(run_dir, random_init="yes")
    if not torch.cuda.is_available():  # (torch's AssertionError "Torch not compiled with CUDA enabled")
        with pytest.raises(ValueError, match="device cuda:0: CUDA is not available on this machine"):
            load_network(run_dir, device="cuda:0")
    with pytest.raises(ConfigError, match="was given in Python"):  # (its device taken: the next check speaks)
        load_network(run_dir, device=torch.device("cpu"))
    # a torch.device where the settings take a device's name (it was refused: "expected cpu, cuda or cuda:N")
    from llp_fast.train.config import TrainConfig, validate

    assert validate(TrainConfig(device=torch.device("cpu"))).device == "cpu"


def test_a_run_directory_this_process_holds_is_not_another_processs(tmp_path):
    """prepare() then train() on one directory in one process was refused as "another process is
    training in this run directory", which sent users looking for a process that was their own."""
    import gc

    from llp_fast.train.api import prepare

    cfg = tiny_config(tmp_path, epochs=1)
    held = prepare(cfg)
    with pytest.raises(ConfigError, match="this process already trains in it, or holds it for a Trainer not yet"):
        train(cfg)
    del held
    gc.collect()  # (the claim goes with the Trainer)
    train(cfg)
