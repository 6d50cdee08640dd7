"""The LLP loop: bookkeeping, schedule, metrics, checkpoints and exact resume."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from brute import f64
from brute import local_density as brute_density
from brute import propagate as brute_propagate
from conftest import own_network_settings, tiny_config

from llp_fast.errors import CheckpointError, Interrupted
from llp_fast.train import losses, order, warmstart
from llp_fast.train.api import train
from llp_fast.train.checkpoint import CHECKPOINT, METRICS
from llp_fast.train.checkpoint import load as load_checkpoint
from llp_fast.train.config import TrainConfig, lr_at
from llp_fast.train.loop import Trainer
from llp_fast.train.report import read_metrics

# native code at odd settings (tiny networks, one thread, gloo): a crash fails these tests, not the run (_isolate.py)
pytestmark = pytest.mark.isolated

torch.set_num_threads(1)  # tiny nets: one thread is fastest, and immune to a busy machine
TIMING = {"images_per_s", "epoch_seconds"}


tiny = tiny_config  # the shared tiny run (conftest)


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_one_epoch_stores_pseudo_labels(tmp_path):
    tr = Trainer(tiny(tmp_path, epochs=1))
    bank = tr.bank
    m = bank.num_labeled
    before = bank.embeddings.clone()
    assert bool((bank.labels[m:] < 0).all())  # instance ids before the first visit
    tr.fit()
    assert bool((bank.labels[m:] >= 0).all()) and bool((bank.labels[m:] < 10).all())
    conf = bank.confidence[m:]
    assert bool((conf > 0).all()) and bool((conf <= 1 + 1e-6).all())
    idx = torch.arange(tr.n)
    labels, conf_all = bank.stored(idx)
    lab = tr.targets >= 0
    assert torch.equal(labels[lab], tr.targets[lab]) and bool((conf_all[lab] == 1).all())
    assert not torch.allclose(bank.embeddings, before)  # every row was blended once
    torch.testing.assert_close(bank.embeddings.norm(dim=1), torch.ones(tr.n))
    assert bool((bank.log_rho != 0).all())  # density refreshed at the epoch start


def test_forward_bank_init_holds_the_untrained_networks_embeddings(tmp_path):
    tr = Trainer(tiny(tmp_path, epochs=1))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    labels0 = tr.bank.labels.clone()
    tr.start()  # bank_init="forward", label_init="instance"
    idx = torch.arange(tr.n)
    tr.model.eval()
    with torch.no_grad():
        _, expect = tr.model(tr.source.plain(tr.source.x[idx]))
    torch.testing.assert_close(tr.bank.embeddings[tr.bank.rows(idx)], expect)
    assert torch.equal(tr.bank.labels, labels0)  # labels untouched: unlabeled rows stay instance ids
    for k, v in tr.model.state_dict().items():  # the pass changes nothing in the network
        assert torch.equal(v, before[k]), k


def test_k_zero_resolves_to_the_smallest_labeled_class(tmp_path):
    # 2% of digits: two or three labeled images per class
    tr = Trainer(tiny(tmp_path, labeled_fraction=0.02, k=0))
    counts = torch.bincount(tr.targets[tr.targets >= 0], minlength=10)
    assert tr.k == min(10, int(counts.min())) < 10
    assert Trainer(tiny(tmp_path, "b", labeled_fraction=0.02, k=10)).k == 10  # K above a class's count is fine
    with pytest.raises(ValueError, match="--k"):  # but not above the labeled set
        Trainer(tiny(tmp_path, "c", labeled_fraction=0.02, k=int(counts.sum()) + 1))


def test_fit_fills_the_bank_once_unless_random_init(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(warmstart, "fill_bank", lambda bank, *a, **kw: calls.append(bank))
    train(tiny(tmp_path, name="a", epochs=1))
    assert len(calls) == 1
    cfg = tiny(tmp_path, name="a", epochs=2)
    train(cfg, resume=True)  # a resumed run keeps its bank
    assert len(calls) == 1
    train(tiny(tmp_path, name="b", epochs=1, bank_init="random"))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="--bank-init"):
        Trainer(tiny(tmp_path, name="c", bank_init="zeros"))


def test_label_init_inputs_is_llps_vote_on_the_pixels(tmp_path):
    tr = Trainer(tiny(tmp_path, labeled_fraction=0.05, label_init="inputs", bank_init="random"))
    m, labels0 = tr.bank.num_labeled, tr.bank.labels.clone()
    tr.start()
    # Independent float64 brute force of docs/method.md §1.1-1.2 on centred, L2-normalised pixels.
    x = f64(tr.source.x.flatten(1))
    x -= x.mean(axis=0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lab = (tr.targets >= 0).numpy()
    rho = brute_density(x[lab], x, tr.cfg.t, tr.cfg.tau, pool=~lab)
    want_l, want_c = brute_propagate(x[~lab], x[lab], tr.targets[lab], rho, tr.k, tr.cfg.tau, 10)
    unl = torch.nonzero(~torch.from_numpy(lab)).flatten()
    got_l, got_c = tr.bank.stored(unl)
    agree = got_l.numpy() == want_l
    assert agree.mean() > 0.99  # float32 against float64: a near-tie may go the other way
    np.testing.assert_allclose(got_c.numpy()[agree], want_c[agree], rtol=1e-3, atol=1e-4)
    assert torch.equal(tr.bank.labels[:m], labels0[:m]) and bool((tr.bank.confidence[:m] == 1).all())
    assert float((got_l == tr.truth[unl]).float().mean()) > 0.5  # pixels carry the classes (10 here)


def test_fit_labels_from_inputs_once_and_keeps_them_until_propagation(tmp_path, monkeypatch):
    ref = Trainer(tiny(tmp_path, "ref", label_init="inputs"))
    ref.start()
    tr = Trainer(tiny(tmp_path, "a", epochs=1, label_init="inputs", propagation_start=1))
    tr.fit()
    assert torch.equal(tr.bank.labels, ref.bank.labels)  # no propagation in epoch 1
    assert torch.equal(tr.bank.confidence, ref.bank.confidence)
    calls = []
    monkeypatch.setattr(warmstart, "init_labels", lambda bank, *a, **kw: calls.append(bank))
    train(tiny(tmp_path, "b", epochs=1, label_init="inputs"))
    assert len(calls) == 1
    train(tiny(tmp_path, "b", epochs=2, label_init="inputs"), resume=True)  # a resumed run keeps its labels
    assert len(calls) == 1
    train(tiny(tmp_path, "c", epochs=1))  # label_init="instance"
    assert len(calls) == 1
    with pytest.raises(ValueError, match="--label-init"):
        Trainer(tiny(tmp_path, name="d", label_init="pixels"))


def test_metrics_jsonl_fields(tmp_path):
    cfg = tiny(tmp_path)
    train(cfg)
    rows = read_metrics(os.path.join(cfg.run_dir, METRICS))
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("test_top1", "test_top5", "knn_top1", "pseudo_acc", "aggregation", "pseudo_conf"):
            assert 0.0 <= r[key] <= 1.0, key
        assert r["test_top5"] >= r["test_top1"]
        assert len(r["pseudo_counts"]) == 10 and len(r["aggregation_per_class"]) == 10
        assert r["corr_density_count"] is None or -1 <= r["corr_density_count"] <= 1
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[1]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize("bank_dtype", ["float32", "bfloat16"])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, bank_dtype):
    full = tiny(tmp_path, "full", bank_dtype=bank_dtype)
    train(full)
    cut = tiny(tmp_path, "cut", bank_dtype=bank_dtype, stop_after_steps=4)  # inside epoch 1 (about 10 steps an epoch)
    with pytest.raises(Interrupted):
        train(cut)
    ck = load_checkpoint(os.path.join(cut.run_dir, CHECKPOINT))
    assert ck["epoch"] == 0 and ck["step_in_epoch"] == 4
    train(dataclasses.replace(cut, stop_after_steps=None), resume=True)
    a = read_metrics(os.path.join(full.run_dir, METRICS))
    b = read_metrics(os.path.join(cut.run_dir, METRICS))
    assert untimed(a) == untimed(b)
    ma = torch.load(os.path.join(full.run_dir, CHECKPOINT), weights_only=True)
    mb = torch.load(os.path.join(cut.run_dir, CHECKPOINT), weights_only=True)
    for k, v in ma["model"].items():
        assert torch.equal(v, mb["model"][k]), k
    assert torch.equal(ma["bank"]["pieces"][0]["embeddings"], mb["bank"]["pieces"][0]["embeddings"])
    assert torch.equal(ma["bank"]["pieces"][0]["labels"], mb["bank"]["pieces"][0]["labels"])
    assert ma["bank"]["pieces"][0]["embeddings"].dtype == getattr(torch, bank_dtype)  # stored as it is kept


def test_resume_at_epoch_boundary_equals_uninterrupted(tmp_path):
    full = tiny(tmp_path, "full", supervised_only=True)
    train(full)
    steps = Trainer(tiny(tmp_path, "probe", supervised_only=True)).steps_per_epoch()
    cut = tiny(tmp_path, "cut", supervised_only=True, stop_after_steps=steps)
    with pytest.raises(Interrupted):
        train(cut)
    # stopped after the epoch's last step, before its evaluation: resuming evaluates it
    assert not os.path.exists(os.path.join(cut.run_dir, METRICS))
    train(dataclasses.replace(cut, stop_after_steps=None), resume=True)
    a = read_metrics(os.path.join(full.run_dir, METRICS))
    b = read_metrics(os.path.join(cut.run_dir, METRICS))
    assert untimed(a) == untimed(b)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, epochs=1)
    tr = Trainer(cfg)
    tr.fit()
    path = os.path.join(cfg.run_dir, CHECKPOINT)
    good = open(path, "rb").read()

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        tr.save()
    assert open(path, "rb").read() == good  # the previous complete checkpoint survives
    assert not any(".tmp" in f for f in os.listdir(cfg.run_dir))  # no temporary file left behind
    load_checkpoint(path)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    train(cfg)
    path = os.path.join(cfg.run_dir, CHECKPOINT)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        train(cfg, resume=True)
    open(path, "wb").write(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_checkpoint(path)


def test_checkpoint_from_another_split_is_rejected(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    train(cfg)
    ck = torch.load(os.path.join(cfg.run_dir, CHECKPOINT), weights_only=True)
    other = Trainer(tiny(tmp_path, "other", epochs=1, seed=1))
    with pytest.raises(CheckpointError, match="different data split"):
        other.restore(ck)


def test_supervised_only_same_steps_labeled_only(tmp_path):
    llp = Trainer(tiny(tmp_path, "a"))
    sup = Trainer(tiny(tmp_path, "b", supervised_only=True))
    assert sup.bank is None and llp.steps_per_epoch() == sup.steps_per_epoch()
    visits = order.epoch_order(sup.schedule(), sup.gen_order)
    assert len(visits) == sup.steps_per_epoch() * sup.cfg.batch_size
    assert bool((sup.targets[visits] >= 0).all())
    rows = sup.fit()
    assert rows["pseudo_acc"] is None and 0 <= rows["test_top1"] <= 1 and 0 <= rows["knn_top1"] <= 1


def test_warmup_keeps_instance_ids(tmp_path):
    tr = Trainer(tiny(tmp_path, epochs=2, warmup_epochs=1))  # (a run all warm-up is refused)
    tr.cfg.epochs = 1  # the warm-up epoch alone
    tr.fit()
    m = tr.bank.num_labeled
    assert bool((tr.bank.labels[m:] < 0).all())  # no propagation during the warm-up


def test_propagation_start_keeps_instance_ids_then_propagates(tmp_path):
    tr = Trainer(tiny(tmp_path, epochs=1, propagation_start=1))
    m = tr.bank.num_labeled
    before = tr.bank.embeddings.clone()
    tr.fit()
    assert bool((tr.bank.labels[m:] < 0).all())  # no propagation in epoch 1
    assert not torch.allclose(tr.bank.embeddings, before)  # but every row was blended
    tr.cfg.epochs = 2
    tr.fit()
    assert bool((tr.bank.labels[m:] >= 0).all())  # epoch 2 propagates
    with pytest.raises(ValueError, match="--propagation-start"):
        Trainer(tiny(tmp_path, name="bad", propagation_start=-1))


def test_no_density_weighting_votes_without_log_rho(tmp_path, monkeypatch):
    import llp_fast.bank.memory as memory

    seen = []
    real = memory.MemoryBank._propagate_rows

    def spy(self, rows, emb, **kw):  # the step's propagation (docs/method.md §1.6)
        seen.append(kw["density_weighting"])
        return real(self, rows, emb, **kw)

    monkeypatch.setattr(memory.MemoryBank, "_propagate_rows", spy)
    train(tiny(tmp_path, "dw", epochs=1))
    assert seen and all(seen)  # every step's vote is density-weighted
    seen.clear()
    train(tiny(tmp_path, "nodw", epochs=1, density_weighting=False))
    assert seen and not any(seen)  # NoDW: a plain weighted kNN vote, no log_rho


def test_density_pool_all_takes_every_row(tmp_path):
    from llp_fast import local_density

    tr = Trainer(tiny(tmp_path, epochs=1, density_pool="all"))
    tr.fit()
    bank = tr.bank
    want = local_density(bank.labeled_embeddings, bank.embeddings, t=tr.cfg.t, tau=tr.cfg.tau)
    unl = local_density(bank.labeled_embeddings, bank.embeddings[bank.num_labeled :], t=tr.cfg.t, tau=tr.cfg.tau)
    bank.refresh_density(t=tr.cfg.t, tau=tr.cfg.tau, pool="all")
    torch.testing.assert_close(bank.log_rho, want)
    assert not torch.allclose(want, unl)  # the pool changes the densities


def test_confidence_weights_the_loss(tmp_path):
    tr = Trainer(tiny(tmp_path, epochs=1))
    idx = torch.arange(16)
    logits, emb = tr.model(tr.source.plain(tr.source.x[idx]))
    tr.bank.confidence[tr.bank.rows(idx)] = 0.0
    kw = dict(tau=tr.cfg.tau)
    assert float(losses.llp_loss(logits, emb, idx, tr.bank, confidence=True, **kw)[0].detach()) == 0.0
    assert float(losses.llp_loss(logits, emb, idx, tr.bank, confidence=False, **kw)[0].detach()) > 0.0


def test_lr_schedule_milestones_and_rate_jump():
    cfg = TrainConfig(lr=0.1, milestones=[10, 20], rate_jump=30, jump_milestones=[40, 50])
    assert [lr_at(cfg, e) for e in (0, 9.9, 10, 20, 29)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])
    assert [lr_at(cfg, e) for e in (30, 40, 50)] == pytest.approx([0.01, 0.001, 0.0001])


def test_the_default_schedule_around_a_rate_jump(tmp_path):
    """With --rate-jump the default milestones fall before it (2/3 and 8/9 of the epochs before the
    jump) and two drops follow it (2/3 and 8/9 of the rest, milestones given or not): the jump raises
    the rate. They were at 2/3 and 8/9 of the whole run, the jump changed nothing and the drop after
    it was ignored; without --jump-milestones none followed. A new run's schedule is checked (the
    command line and fit), a resumed run's and the baseline twin's are not."""
    from test_defaults import facts

    from llp_fast.errors import ConfigError
    from llp_fast.train.api import fit
    from llp_fast.train.config import validate
    from llp_fast.train.defaults import resolve
    from llp_fast.train.newrun import check_new_run

    def sched(**kw):
        cfg = resolve(TrainConfig(device="cpu", run_dir="r", **kw), facts())[0]
        check_new_run(cfg)  # the defaults never break the rules a new run is held to
        return cfg.milestones, cfg.jump_milestones

    cfg = resolve(TrainConfig(device="cpu", run_dir="r", epochs=40, rate_jump=30), facts())[0]
    assert (cfg.milestones, cfg.jump_milestones) == ([20, 27], [37, 39])
    rates = [lr_at(cfg, e) for e in (0, 20, 27, 29, 30, 37, 39)]
    assert rates == pytest.approx([0.1, 0.01, 0.001, 0.001, 0.01, 0.001, 0.0001])
    assert sched(epochs=40, rate_jump=30, jump_milestones=[35, 38]) == ([20, 27], [35, 38])  # README's command
    assert sched(epochs=40, rate_jump=30, milestones=[10, 15]) == ([10, 15], [37, 39])
    assert sched(epochs=40) == ([27, 36], [])
    for jump in range(1, 40):  # short phases: fewer drops, never one at or past the jump, none past the run
        ms, jms = sched(epochs=40, rate_jump=jump)
        assert all(m < jump for m in ms) and all(jump < m < 40 for m in jms), (jump, ms, jms)
    assert sched(epochs=40, rate_jump=39)[1] == [] and sched(epochs=40, rate_jump=2)[0] == [1, 2][:1]
    for epochs in range(1, 40):  # no two default drops on one epoch (that cut the lr 100x at once)
        for jump in (None, *range(1, epochs)):
            ms, jms = sched(epochs=epochs, rate_jump=jump)
            assert len(set(ms)) == len(ms) and len(set(jms)) == len(jms), (epochs, jump, ms, jms)
    assert sched(epochs=10, rate_jump=7)[1] == [9]  # was [9, 9]
    with pytest.raises(ValueError, match="--rate-jump: expected a whole number >= 1, got 0"):  # never the start lr
        validate(TrainConfig(epochs=10, rate_jump=0))
    with pytest.raises(ConfigError, match="--jump-milestones 5,6: each must come after --rate-jump 30"):
        check_new_run(TrainConfig(epochs=40, rate_jump=30, jump_milestones=[5, 6]))
    with pytest.raises(ConfigError, match="--jump-milestones: the drops after a rate jump need --rate-jump"):
        check_new_run(TrainConfig(epochs=40, jump_milestones=[35]))
    validate(TrainConfig(epochs=40, milestones=[27, 36], rate_jump=30))  # a saved run's, resumed: kept
    with pytest.raises(ConfigError, match="--milestones 27,36: at or after --rate-jump 30"):
        check_new_run(TrainConfig(epochs=40, milestones=[27, 36], rate_jump=30))
    with pytest.raises(ConfigError, match="--milestones 27,36: at or after --rate-jump 30"):
        fit(None, "digits", run_dir=str(tmp_path / "f"), epochs=40, milestones=[27, 36], rate_jump=30)
    check_new_run(TrainConfig(epochs=40, milestones=[20, 27], rate_jump=30))


def test_config_roundtrip_in_checkpoint(tmp_path):
    cfg = tiny(tmp_path, epochs=1, k=3)
    train(cfg)
    saved = json.load(open(os.path.join(cfg.run_dir, "config.json")))
    assert saved["k"] == 3 and saved["data"] == "digits"


@pytest.mark.parametrize(
    "n, batch, labeled_batch, supervised_only, begun, world",
    [
        (101, 16, 0, False, 2, 1),  # --nproc 2 interrupted, resumed in one process
        (101, 16, 0, False, 1, 2),
        (100, 12, 0, False, 3, 2),
        (77, 10, 4, False, 2, 1),  # a labeled stream beside the drawn batches
        (77, 10, 4, False, 1, 2),
        (53, 8, 0, True, 2, 1),  # the supervised-only baseline's epochs
        (9, 8, 0, False, 1, 4),  # a last step of one example over 4 ranks (it went to none)
        (1027, 64, 0, False, 1, 8),
        (10, 16, 0, False, 2, 4),  # one short step: one batch a rank, not two
        (37, 12, 4, False, 2, 8),
    ],
)
def test_an_epoch_begun_by_other_processes_is_finished_in_its_own_order(
    n, batch, labeled_batch, supervised_only, begun, world
):
    """Resumed inside an epoch that another number of processes began, each of its global steps
    takes the examples that step had (shared out among the new ranks): the epoch still visits its
    one permutation (it was redrawn at the new world size, 363 of 1,438 examples seen twice)."""
    labeled = torch.arange(0, n, 3)
    base = order.Schedule(n=n, labeled=labeled, batch_size=batch, labeled_batch=labeled_batch, seed=5)
    began = dataclasses.replace(base, world=begun, supervised_only=supervised_only)
    now = dataclasses.replace(began, world=world)
    start = torch.Generator().manual_seed(9).get_state()
    steps = began.steps_per_epoch()

    def batches(o, size):
        return [o[i * size : (i + 1) * size] for i in range(steps)]

    old = []
    for r in range(begun):
        gen = torch.Generator()
        gen.set_state(start)
        old.append(batches(order.epoch_order(began, gen, rank=r, epoch=3), began.loader_batch_size()))
    assert order.check_regroup(now, begun, world) is None
    new = []
    for r in range(world):
        gen = torch.Generator()
        gen.set_state(start)
        o, size, k = order.for_rank(now, gen, begun, r, 3)
        assert k == steps and len(o) == sum(len(b) for b in batches(o, size))  # one batch a step
        new.append(batches(o, size))
    for i in range(steps):
        had = torch.cat([old[r][i] for r in range(begun)])
        got = torch.cat([new[r][i] for r in range(world)])
        assert len({len(new[r][i]) for r in range(world)}) == 1 and len(new[0][i]) > 0  # the same share, each
        assert set(got.tolist()) == set(had.tolist()) and len(got) - len(had) < world, i  # padding by repeats


def test_an_epoch_that_cannot_be_shared_out_is_refused_in_one_line(tmp_path):
    s = order.Schedule(n=50, labeled=torch.arange(5), batch_size=7)
    assert order.check_regroup(dataclasses.replace(s, world=2), 1, 2) == (
        "its steps of 7 examples cannot be shared by 2 processes"
    )


# -- found by review (2026-12-06) ----------------------------------------------------------------
def test_train_makes_the_new_run_checks_that_fit_and_the_cli_make(tmp_path):
    from llp_fast.errors import ConfigError

    cfg = tiny_config(tmp_path, jump_milestones=[2])
    with pytest.raises(ConfigError, match="--jump-milestones"):
        train(cfg)
    assert not os.path.exists(cfg.run_dir)


def test_a_backbone_with_float64_features_trains(tmp_path):
    """A backbone kept in float64 met the heads' float32 weights at the first step (a traceback)."""

    from llp_fast.train.api import fit

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).double()
    data, settings = own_network_settings(tmp_path, epochs=1)

    class Double(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.double())

    out = fit(Double(), data, **settings)
    assert 0 <= out.metrics["test_top1"] <= 1


def test_a_sigterm_while_the_baseline_finishes_is_an_interrupt():
    """SIGTERM while the LLP run waited for its baseline ended the command by the signal (143, no
    line): it is an interrupt now, the baseline asked to checkpoint."""
    import signal
    import time
    import types

    from llp_fast.cli.launch import Baseline

    class Proc:
        exitcode, calls = None, []

        def join(self):
            self.calls.append("join")
            if len(self.calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)

        def is_alive(self):
            return True

        def terminate(self):
            self.calls.append("terminate")

    b = Baseline.__new__(Baseline)
    b.proc, b.cfg = Proc(), types.SimpleNamespace(run_dir="RUN")
    with pytest.raises(Interrupted) as e:
        b._join()
    assert e.value.signum == 15 and Proc.calls == ["join", "terminate", "join"]


def test_a_backbone_with_extra_state_resumes_and_one_that_cannot_be_saved_is_refused_first(tmp_path):
    """A module's ``get_extra_state()`` (any object): a run with a dict of it was called corrupt on
    resume (the fit check read every entry's shape), and one with a NumPy array failed at its first
    checkpoint, after an epoch of training (found by review, 2026-12-08)."""
    from llp_fast.errors import ConfigError
    from llp_fast.train.api import fit

    class Extra(torch.nn.Module):
        def __init__(self, extra):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.extra = extra

        def forward(self, x):
            return self.net(x)

        def get_extra_state(self):
            return self.extra

        def set_extra_state(self, state):
            self.extra = state

    data, settings = own_network_settings(tmp_path, epochs=2)
    with pytest.raises(Interrupted):
        fit(Extra({"a": 1, "b": [2.0, "c"]}), data, **dict(settings, stop_after_steps=3))
    net = Extra(None)
    out = fit(net, data, **settings, resume=True)
    assert net.extra == {"a": 1, "b": [2.0, "c"]} and out.metrics["epoch"] == 2  # the saved state came back
    torch.save(out.model.state_dict(), tmp_path / "w.pt")  # --init-weights refused it: "not a state dict"
    data, settings = own_network_settings(tmp_path, "init", epochs=1, init_weights=str(tmp_path / "w.pt"))
    fit(again := Extra(None), data, **settings)
    assert again.extra == {"a": 1, "b": [2.0, "c"]}
    data, settings = own_network_settings(tmp_path, "np", epochs=1)
    with pytest.raises(ConfigError, match=r"the network's state dict\['backbone._extra_state'\] is a ndarray"):
        fit(Extra(np.zeros(3)), data, **settings)
    assert not os.path.exists(os.path.join(settings["run_dir"], CHECKPOINT))
