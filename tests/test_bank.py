"""MemoryBank: layout, the docs/method.md §1.6 step, the density refresh, checkpoints, failed calls."""

import pytest
import torch
from brute import bank_update as brute_update
from brute import local_density as brute_density
from brute import propagate as brute_propagate

import llp_fast
from llp_fast import MemoryBank

TARGETS = torch.tensor([-1, 2, -1, 0, -1, -1, 1, -1, 2, -1, -1, 0])  # 5 labeled of 12


def _bank(**kw):
    return MemoryBank(TARGETS, num_classes=3, dim=8, **kw)


def test_layout_labeled_prefix_is_a_view():
    bank = _bank()
    assert bank.num_labeled == 5 and len(bank) == 12
    assert bank.labeled_embeddings.data_ptr() == bank.embeddings.data_ptr()
    assert bank.labeled_embeddings._base is bank.embeddings
    # Labeled rows first, in dataset order; labels hold classes and instance ids.
    assert bank.index_of[:5].tolist() == [1, 3, 6, 8, 11]
    assert bank.labeled_classes.tolist() == [2, 0, 1, 2, 0]
    labels, conf = bank.stored(torch.tensor([0, 1, 4]))
    assert labels.tolist() == [-1, 2, -5] and conf.tolist() == [1.0, 1.0, 1.0]
    assert bank.is_labeled(torch.arange(12)).tolist() == (TARGETS >= 0).tolist()
    torch.testing.assert_close(bank.embeddings.norm(dim=1), torch.ones(12))


def test_refresh_density_pools():
    bank = _bank()
    emb = bank.embeddings
    unl = TARGETS[bank.index_of] < 0
    got = bank.refresh_density(t=3, tau=0.1)
    want = brute_density(emb[:5], emb, 3, 0.1, unl.tolist())
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    got_all = bank.refresh_density(t=4, tau=0.1, pool="all")
    torch.testing.assert_close(got_all, torch.tensor(brute_density(emb[:5], emb, 4, 0.1), dtype=torch.float32))
    with pytest.raises(ValueError, match="pool must be"):
        bank.refresh_density(pool="labeled")


def test_step_propagates_then_updates():
    bank = _bank()
    bank.refresh_density(t=3, tau=0.1)
    before = bank.embeddings.clone()
    idx = torch.tensor([0, 1, 4, 0])  # unlabeled, labeled, unlabeled, repeat of 0
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    bank.step(idx, emb, k=3, tau=0.1, momentum=0.5)
    # Propagation used this step's embeddings against the bank *before* the update; for the
    # repeated index 0 the last occurrence is stored.
    lab, conf = brute_propagate(emb[[3, 2]], before[:5], bank.labeled_classes, bank.log_rho, 3, 0.1, 3)
    got_labels, got_conf = bank.stored(torch.tensor([0, 4]))
    assert got_labels.tolist() == lab.tolist()
    torch.testing.assert_close(got_conf.double(), torch.tensor(conf), rtol=1e-5, atol=1e-6)
    # The labeled example keeps its class and confidence 1.
    assert bank.stored(torch.tensor([1]))[0].item() == 2 and bank.stored(torch.tensor([1]))[1].item() == 1.0
    # Then the rows were blended, repeats in order.
    rows = bank.rows(idx)
    want = brute_update(before, rows, emb, 0.5)
    torch.testing.assert_close(bank.embeddings.double(), torch.tensor(want), rtol=0, atol=1e-6)


def test_nodw_step_ignores_density():
    a, b = _bank(), _bank()
    a.log_rho = torch.rand(5) * 5
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    a.propagate(torch.tensor([0, 2, 4]), emb, k=2, density_weighting=False)
    b.propagate(torch.tensor([0, 2, 4]), emb, k=2, density_weighting=True)  # b.log_rho is zero
    assert torch.equal(a.labels, b.labels)


def test_loss_uses_stored_labels():
    bank = _bank()
    v = torch.nn.functional.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    idx = torch.tensor([1, 0, 11])
    loss = bank.loss(v, idx, tau=0.1)
    labels = bank.stored(idx)[0]
    torch.testing.assert_close(loss, llp_fast.aggregation_loss(v, bank.embeddings, bank.labels, labels, tau=0.1))
    loss.sum().backward()
    assert v.grad is not None


def test_failed_step_writes_nothing():
    bank = _bank()
    snapshot = {k: v.clone() for k, v in bank.state_dict().items() if isinstance(v, torch.Tensor)}
    good = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    bad = good.clone()
    bad[1, 3] = float("nan")
    for args, kwargs, exc in [
        ((torch.tensor([0, 2]), bad), {}, ValueError),
        ((torch.tensor([0, 12]), good), {}, ValueError),
        ((torch.tensor([0, 2]), good[:, :5]), {}, ValueError),
        ((torch.tensor([0, 2]), good), {"k": 6}, ValueError),
        ((torch.tensor([0, 2]), good), {"momentum": 2.0}, ValueError),
        ((torch.tensor([0, 2, 4]), good), {}, ValueError),
    ]:
        with pytest.raises(exc):
            bank.step(*args, **kwargs)
        for k, v in bank.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, snapshot[k]), k


def test_set_labels_stores_unlabeled_rows_only():
    bank = _bank()
    unl = torch.tensor([0, 2, 4, 0])  # a repeated index: the last entry is stored
    bank.set_labels(unl, torch.tensor([1, 2, 0, 2]), torch.tensor([0.5, 0.25, 1.0, 0.75]))
    labels, conf = bank.stored(torch.tensor([0, 2, 4, 5, 1]))
    assert labels.tolist() == [2, 2, 0, -1 - 5, 2]  # 5 untouched keeps its instance id; 1 is labeled
    assert conf.tolist() == [0.75, 0.25, 1.0, 1.0, 1.0]
    snapshot = {k: v.clone() for k, v in bank.state_dict().items() if isinstance(v, torch.Tensor)}
    idx = torch.tensor([5, 7])
    for labels, conf, match in [
        (torch.tensor([0, 3]), torch.tensor([0.5, 0.5]), "labels"),  # class 3 of 3
        (torch.tensor([0, -1]), torch.tensor([0.5, 0.5]), "labels"),
        (torch.tensor([0, 1]), torch.tensor([0.5, 1.5]), "confidence"),
        (torch.tensor([0, 1]), torch.tensor([0.5, float("nan")]), "confidence"),
        (torch.tensor([0]), torch.tensor([0.5, 0.5]), "labels"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), "labels"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            bank.set_labels(idx, labels, conf)
    with pytest.raises(ValueError, match="labeled example"):  # index 3 is labeled
        bank.set_labels(torch.tensor([5, 3]), torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="indices"):
        bank.set_labels(torch.tensor([5, 12]), torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
    for k, v in bank.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, snapshot[k]), k


def test_state_dict_round_trip_and_corrupt_state():
    a = _bank(seed=1)
    a.refresh_density(t=2)
    a.step(torch.tensor([0, 2]), torch.randn(2, 8), k=2)
    b = _bank(seed=2)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) if isinstance(v, torch.Tensor) else v == b.state_dict()[k]
    assert torch.equal(a.index_of, b.index_of)
    c = _bank(seed=3)
    before = c.embeddings.clone()
    broken = dict(a.state_dict(), embeddings=torch.randn(11, 8))
    with pytest.raises(ValueError, match="'embeddings' has shape"):
        c.load_state_dict(broken)
    with pytest.raises(ValueError, match="missing"):
        c.load_state_dict({"embeddings": before})
    nan = a.embeddings.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        c.load_state_dict(dict(a.state_dict(), embeddings=nan))
    assert torch.equal(c.embeddings, before)


def test_the_losses_refuse_nan_or_inf_embeddings_unless_told_not_to_check():
    """MemoryBank.loss and instance_loss gave NaN losses for a NaN or Inf row of v without a word,
    where vote, step and update refuse it."""
    bank = _bank()
    idx = torch.arange(4)
    for bad in (float("nan"), float("inf")):
        v = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        v[2, 0] = bad
        for fn in (bank.loss, bank.instance_loss):
            with pytest.raises(ValueError, match="^v contains NaN or Inf"):
                fn(v, idx)
            assert not torch.isfinite(fn(v, idx, check_finite=False)).all()  # the trainer checks the loss


def test_bfloat16_bank():
    bank = _bank(dtype=torch.bfloat16)
    bank.refresh_density(t=3)
    labels, conf = bank.step(torch.tensor([0, 2, 5]), torch.randn(3, 8), k=2)
    assert labels.shape == (3,) and bank.embeddings.dtype == torch.bfloat16
    v = torch.randn(2, 8, requires_grad=True)
    bank.loss(v, torch.tensor([0, 1])).sum().backward()
    assert v.grad.dtype == torch.float32


def test_constructor_rejects_bad_targets():
    with pytest.raises(ValueError, match="labeled set is empty"):
        MemoryBank(torch.tensor([-1, -1]), num_classes=2)
    with pytest.raises(ValueError, match="targets holds 5"):
        MemoryBank(torch.tensor([0, 5, -1]), num_classes=3)
    with pytest.raises(TypeError, match="dtype must be"):
        MemoryBank(torch.tensor([0, 1]), num_classes=2, dtype=torch.int32)


def _snapshot(bank):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in bank.state_dict().items()}


@pytest.mark.parametrize(
    "key, change, match",
    [
        ("row_of", lambda v: v.index_fill(0, torch.tensor([3]), 99), "different labeled split"),  # half-written
        ("row_of", lambda v: torch.cat([v[:1], v[:-1]]), "different labeled split"),  # a duplicate
        ("labels", lambda v: v.float(), "must be integer"),
        ("labels", lambda v: v.index_fill(0, torch.tensor([0]), 0), "labeled rows' classes differ"),
        ("labels", lambda v: v.index_fill(0, torch.tensor([7]), 17), "neither a class"),
        ("labels", lambda v: v.to("meta"), "meta device"),
        ("confidence", lambda v: v.index_fill(0, torch.tensor([6]), float("nan")), "'confidence' contains NaN"),
        ("confidence", lambda v: v.index_fill(0, torch.tensor([6]), 5.0), "must lie in"),
        ("log_rho", lambda v: v.index_fill(0, torch.tensor([1]), float("nan")), "'log_rho' contains NaN"),
        ("num_labeled", lambda v: "5", "whole number"),
        ("num_labeled", lambda v: 5.7, "whole number"),
    ],
)
def test_load_state_dict_checks_every_entry_before_writing(key, change, match):
    """It checked shapes only: a bad row_of raised after most entries were copied (the bank broken),
    and float labels, a foreign label, NaN confidences or another labeled split loaded silently."""
    a = _bank(seed=1)
    a.refresh_density(t=2)
    a.step(torch.tensor([0, 2]), torch.randn(2, 8), k=2)
    c = _bank(seed=3)
    before = _snapshot(c)
    state = _snapshot(a)
    state[key] = change(state[key])
    with pytest.raises(ValueError, match=match):
        c.load_state_dict(state)
    after = c.state_dict()
    assert all(torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in before.items())
    other = MemoryBank(torch.tensor([2, -1, -1, 0, -1, -1, 1, -1, 2, -1, -1, 0]), num_classes=3, dim=8)
    with pytest.raises(ValueError, match="different labeled split"):  # same N, M and S, other examples
        c.load_state_dict(other.state_dict())


def test_load_rows_checks_values_and_pieces():
    a = _bank(seed=1)
    a.refresh_density(t=2)
    piece = a.rows_state()
    c = _bank(seed=3)
    before = c.embeddings.clone()
    for key, at, value, match in (
        ("confidence", 4, float("nan"), "'confidence' contain NaN"),
        ("confidence", 4, 7.0, "must lie in"),
        ("log_rho", 1, float("nan"), "'log_rho' contain NaN"),
        ("labels", 0, 5, "neither a class"),  # an unlabeled row's label beyond num_classes
    ):
        bad = dict(piece, **{key: piece[key].clone().index_fill(0, torch.tensor([at]), value)})
        with pytest.raises(ValueError, match=match):
            c.load_rows([bad])
    with pytest.raises(ValueError, match="must be integer"):
        c.load_rows([dict(piece, labels=piece["labels"].float())])
    with pytest.raises(ValueError, match="missing"):
        c.load_rows([{k: v for k, v in piece.items() if k != "log_rho"}])
    with pytest.raises(ValueError, match="must be a dict"):
        c.load_rows([3])
    assert torch.equal(c.embeddings, before)
    c.load_rows([piece])
    assert torch.equal(c.embeddings, a.embeddings)


def test_truncate_keeps_every_labeled_example():
    b = MemoryBank(torch.tensor([0, 1, 2, -1, -1, -1, -1, -1]), 3, dim=4)
    b.refresh_density(t=2)
    for n in (0, 2):  # they dropped labeled examples and left log_rho's rows: the bank broke
        with pytest.raises(ValueError, match="must be unlabeled"):
            b.truncate(n)
    with pytest.raises(ValueError, match="n must be a whole number >= 0"):
        b.truncate(-1)
    assert len(b) == 8
    b.truncate(5)
    assert len(b) == 5 and b.num_labeled == 3
    b.refresh_density(t=2)
    assert b.vote(torch.nn.functional.normalize(torch.randn(2, 4), dim=1), k=2)[0].shape == (2,)


def test_vote_and_losses_take_tensors_and_vote_refuses_nan():
    import numpy as np

    b = _bank()
    b.refresh_density(t=2)
    with pytest.raises(TypeError, match="queries must be a torch.Tensor here"):
        b.vote(np.zeros((1, 8), np.float32), k=1)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        b.loss([[1.0] * 8], torch.tensor([1]))
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        b.instance_loss([[1.0] * 8], torch.tensor([1]))
    with pytest.raises(ValueError, match="queries contains NaN or Inf"):  # it returned NaN confidences
        b.vote(torch.full((2, 8), float("nan")), k=2)


def test_seed_and_index_offset_are_checked():
    with pytest.raises(TypeError, match="seed"):  # torch's RuntimeError
        _bank(seed=0.5)
    with pytest.raises(ValueError, match="index_offset must be >= 0"):  # instance ids met class ids
        _bank(index_offset=-3)


# -- found by review (2026-12-06) ----------------------------------------------------------------
def test_any_accepted_seed_draws_the_rows():
    """Seeds from about 9.2e12 on overflowed manual_seed (llp-fast-train --seed 2e13: a traceback)."""
    import numpy as np

    labels = torch.tensor([0, 1, -1, -1])
    for seed in (2**45, 2**63 - 1):
        bank = MemoryBank(labels, 2, dim=4, seed=seed)
        assert torch.allclose(bank.embeddings.norm(dim=1), torch.ones(4))
    assert torch.equal(MemoryBank(labels, 2, dim=4, seed=7).embeddings, MemoryBank(labels, 2, dim=4, seed=7).embeddings)
    bank = MemoryBank(labels, 2, dim=4)
    bank.truncate(np.int64(4))  # (a NumPy integer, as num_classes takes)


def test_a_state_with_rows_that_are_not_unit_vectors_is_refused_unchanged():
    labels = torch.tensor([0, 1, -1, -1])
    state = dict(MemoryBank(labels, 2, dim=4, seed=1).state_dict())
    state["embeddings"] = state["embeddings"] * 3e38
    bank = MemoryBank(labels, 2, dim=4, seed=2)
    before = bank.embeddings.clone()
    with pytest.raises(ValueError, match=r"^bank state 'embeddings' row 0 has norm inf; bank rows are unit vectors"):
        bank.load_state_dict(state)
    assert torch.equal(bank.embeddings, before)


def test_a_float16_bank_refuses_queries_its_dtype_cannot_hold():
    """vote and loss returned NaN for finite queries above 65,504, where step refused them."""
    bank = MemoryBank(torch.tensor([0, 1, -1, -1]), 2, dim=4, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^queries holds entries up to 1e\+05 in magnitude; a torch.float16 bank"):
        bank.vote(torch.full((1, 4), 1e5), k=1)
    with pytest.raises(ValueError, match=r"^v holds entries up to 1e\+05 in magnitude; a torch.float16 bank"):
        bank.loss(torch.full((2, 4), 1e5), torch.tensor([0, 2]))
    assert bool(torch.isfinite(bank.loss(torch.full((2, 4), 0.5), torch.tensor([0, 2]))).all())


def test_loss_and_vote_refuse_queries_whose_scores_overflow_as_the_ops_do():
    """Found by review (2026-12-08): loss, instance_loss and vote returned -inf or NaN for finite
    queries whose scores overflow (and a float64 one beyond float32, cast to the bank), where the ops
    given the same inputs refuse them."""
    bank = MemoryBank(torch.tensor([0, 1, 2, 0, -1, -1]), 3, dim=4)
    idx = torch.tensor([4, 5])
    for v in (torch.full((2, 4), 3e37), torch.full((2, 4), 1e39, dtype=torch.float64)):
        for call, args, kw in (
            (bank.loss, (v, idx), {}),
            (bank.instance_loss, (v, idx), {}),
            (bank.vote, (v,), {"k": 3}),
        ):
            with pytest.raises(ValueError, match=r"^scores (v|queries) \. bank / tau may reach"):
                call(*args, **kw)
    with pytest.raises(ValueError, match=r"^scores v \. bank / tau may reach"):  # the op's own message
        llp_fast.aggregation_loss(torch.full((2, 4), 3e37), bank.embeddings, bank.labels, bank.labels[idx])
    fine = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    assert bool(torch.isfinite(bank.loss(fine, idx)).all()) and bool(torch.isfinite(bank.vote(fine, k=3)[1]).all())


def test_class_statistics_checks_truth():
    bank = MemoryBank(torch.tensor([0, 1, -1, -1]), 2, dim=4)
    with pytest.raises(ValueError, match=r"^truth must have shape \(4,\), got \(2,\)"):
        bank.class_statistics(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^truth holds 3, outside \[-1, 2\) \(class ids; -1: unknown\)$"):
        bank.class_statistics(torch.tensor([0, 1, 3, -1]))
    import numpy as np

    assert bank.class_statistics(np.array([0, 1, -1, 1]))["pseudo_known"] == 0  # no row labeled yet (it read 0%)
    bank.labels[2:] = torch.tensor([1, 0])
    st = bank.class_statistics(np.array([0, 1, -1, 1]))
    assert (st["pseudo_known"], st["pseudo_hits"]) == (1, 0)
