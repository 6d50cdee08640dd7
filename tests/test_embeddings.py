"""The streaming engine of llp_fast.embeddings against the in-memory ops (local_density + propagate),
the multi-round reference (tests/rounds_ref.py) and the float64 brute force (tests/brute.py), on fresh
random inputs of odd shapes, streamed in blocks that do not divide the rows."""

import math

import brute
import numpy as np
import pytest
import torch
from rounds_ref import rounds_reference

import llp_fast
from llp_fast._topk import log_sum_exp, vote
from llp_fast.embeddings import Rows, Settings, label_embeddings, select_voters
from llp_fast.embeddings.settings import AUTO_VOTERS
from llp_fast.embeddings.sources import shard_order
from llp_fast.errors import ConfigError, DataError

# drives the C++ extension at odd shapes and block sizes: a native crash fails these tests, not the run
pytestmark = pytest.mark.isolated


def _problem(n, d, classes, frac, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    labels = np.where(rng.random(n) < frac, y, -1)
    labels[rng.choice(n, classes, replace=False)] = np.arange(classes)  # every class labeled
    return x, labels


def _paper(x, labels, *, k=10, t=25, tau=0.07, density=True, pool="unlabeled"):
    lab = torch.from_numpy(labels >= 0)
    rho = None
    if density:
        rho = llp_fast.local_density(x[lab], x, t=t, tau=tau, pool_mask=~lab if pool == "unlabeled" else None)
    num_classes = int(labels.max()) + 1
    lq, cq = llp_fast.propagate(
        x[~lab], x[lab], torch.from_numpy(labels[labels >= 0]), rho, k=k, tau=tau, num_classes=num_classes
    )
    out_l, out_c = labels.copy(), np.ones(len(labels), np.float32)
    out_l[~lab.numpy()], out_c[~lab.numpy()] = lq.numpy(), cq.float().numpy()
    return out_l, out_c


@pytest.mark.parametrize(
    "n, d, chunk, density, pool",
    [
        (1003, 7, 97, True, "unlabeled"),
        (517, 33, 1000, True, "all"),
        (1003, 7, 97, False, "unlabeled"),
        (2048, 128, 512, True, "unlabeled"),
    ],
)
def test_one_round_is_the_paper_vote_exactly(n, d, chunk, density, pool):
    x, labels = _problem(n, d, 6, 0.07, seed=n + d)
    res = label_embeddings(
        x.numpy(), labels, rounds=1, chunk=chunk, density=density, density_pool=pool, normalize=False
    )
    want_l, want_c = _paper(x, labels, density=density, pool=pool)
    assert np.array_equal(res.labels, want_l)
    assert np.array_equal(res.confidence, want_c)  # bit for bit: the ops' own finishers (llp_fast/_topk.py)


def test_one_round_defaults_are_the_paper():
    s = Settings(rounds=1)
    assert (s.pool, s.weight) == ("unlabeled", 1.0)
    s = Settings(rounds=4)
    assert (s.pool, s.weight) == ("all", 3.0)
    s = Settings()
    assert s.rounds == "auto" and (s.pool, s.weight) == ("all", 3.0)


def test_auto_rounds_are_20_below_the_voter_cap_and_10_where_it_binds():
    """docs/embeddings.md: rounds="auto" takes 20 rounds while every unlabeled row may join the
    voters (the cap does not bind) and 10 where it does; a number given is kept."""
    s = Settings()
    assert s.rounds_for(10, 20_000) == 20 and s.rounds_for(10, 20_001) == 10
    assert s.rounds_for(15_000, 30_000) == 20  # the cap is 2M = 30,000 here
    assert Settings(max_voters=None).rounds_for(10, 10**6) == 20
    assert Settings(max_voters=5).rounds_for(10, 6) == 10 and Settings(max_voters=6).rounds_for(10, 6) == 20
    assert Settings(rounds=3).rounds_for(10, 100) == 3
    x, labels = _problem(600, 8, 4, 0.05, seed=5)
    auto = label_embeddings(x.numpy(), labels, normalize=False)
    assert auto.rounds_run == 20
    assert np.array_equal(auto.labels, label_embeddings(x.numpy(), labels, rounds=20, normalize=False).labels)
    capped = label_embeddings(x.numpy(), labels, max_voters=100, normalize=False)
    assert capped.rounds_run == 10
    assert np.array_equal(
        capped.labels, label_embeddings(x.numpy(), labels, rounds=10, max_voters=100, normalize=False).labels
    )
    for bad in ("many", "", 0, 2.5):
        with pytest.raises(ConfigError, match="rounds"):
            Settings(rounds=bad).checked()


@pytest.mark.parametrize(
    "rounds, n, d, chunk, frac", [(2, 901, 9, 128, 0.05), (7, 901, 9, 128, 0.05), (3, 1500, 40, 333, 0.02)]
)
def test_rounds_equal_the_in_memory_reference(rounds, n, d, chunk, frac):
    x, labels = _problem(n, d, 5, frac, seed=rounds * n)
    res = label_embeddings(x.numpy(), labels, rounds=rounds, chunk=chunk, normalize=False)
    want_l, want_c = rounds_reference(x, labels.copy(), rounds=rounds)
    assert np.array_equal(res.labels, want_l)
    assert np.array_equal(res.confidence, want_c)
    assert res.rounds_run == rounds


@pytest.mark.parametrize(
    "options",
    [
        dict(density=False),
        dict(labeled_weight=1.0),
        dict(density_pool="unlabeled"),
        dict(max_voters=100),
        dict(k=3, t=4, tau=0.2),
        dict(ties="row"),
    ],
)
def test_round_options_equal_the_reference(options):
    x, labels = _problem(700, 12, 4, 0.04, seed=11)
    res = label_embeddings(x.numpy(), labels, rounds=4, chunk=250, normalize=False, **options)
    ref = dict(
        k=options.get("k", 10),
        t=options.get("t", 25),
        tau=options.get("tau", 0.07),
        density=options.get("density", True),
        pool=options.get("density_pool", "all"),
        weight=options.get("labeled_weight", 3.0),
        cap=options.get("max_voters"),
        ties=options.get("ties", "score"),
    )
    want_l, want_c = rounds_reference(x, labels.copy(), rounds=4, **ref)
    assert np.array_equal(res.labels, want_l) and np.array_equal(res.confidence, want_c)
    if "max_voters" in options:
        assert len(res.voter_rows) - (labels >= 0).sum() <= 100


def test_a_class_whose_quota_is_met_takes_no_voter():
    """A class whose quota did not grow this round adds no voter (it took all but its least
    confident candidates), and a round that no row joins is passed over while the quotas go on
    growing (the rounds stopped there). Many classes against a small cap, and a rare class."""
    from llp_fast.embeddings.engine import _most_confident

    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
    key = np.zeros(5)
    assert _most_confident(np.arange(5), conf, key, 0).size == 0
    assert _most_confident(np.arange(5), conf, key, -2).size == 0
    assert np.array_equal(_most_confident(np.arange(5), conf, key, 2), [0, 1])
    cases = [
        (_problem(500, 8, 40, 0.3, seed=21), dict(max_voters=60)),  # quotas grow by 0-1 a round
        (_problem(600, 8, 5, 0.05, seed=22), dict(max_voters=5)),  # round 1 adds none: the first join later
    ]
    x, labels = _problem(900, 8, 4, 0.2, seed=23)
    labels[labels == 0] = -1
    labels[np.flatnonzero(labels == -1)[0]] = 0  # one labeled row of class 0 among about 180
    cases.append(((x, labels), dict()))
    for i, ((x, labels), options) in enumerate(cases):
        res = label_embeddings(x.numpy(), labels, rounds=10, chunk=256, normalize=False, **options)
        want_l, want_c = rounds_reference(x, labels.copy(), rounds=10, cap=options.get("max_voters"))
        assert np.array_equal(res.labels, want_l) and np.array_equal(res.confidence, want_c), options
        # every class within its final quota round(9/10 * cap * prior_c)
        lab = labels >= 0
        cap = options.get("max_voters", int((~lab).sum()))
        prior = np.bincount(labels[lab]) / lab.sum()
        joined = res.voter_classes[lab.sum() :]
        quota = np.array([round(0.9 * cap * p) for p in prior])
        assert (np.bincount(joined, minlength=len(prior)) <= quota).all(), options
        if i == 1:  # quotas of about round(r / 10) per class: round 1 adds none, later rounds do
            assert res.rounds_run > 1 and np.array_equal(np.bincount(joined, minlength=5), quota)


def test_float64_matches_the_brute_force():
    x, labels = _problem(83, 5, 3, 0.15, seed=3, dtype=torch.float64)
    res = label_embeddings(x.numpy(), labels, rounds=1, k=4, t=6, chunk=17, normalize=False)
    lab = labels >= 0
    rho = brute.local_density(x[lab], x, 6, 0.07, pool=~lab)
    want_l, want_c = brute.propagate(x[~lab], x[lab], labels[lab], rho, 4, 0.07, 3)
    assert np.array_equal(res.labels[~lab], want_l)
    np.testing.assert_allclose(res.confidence[~lab], want_c, rtol=1e-6)


def test_float16_file_and_shards_equal_the_array(tmp_path):
    x, labels = _problem(777, 16, 4, 0.05, seed=8)
    x16 = x.numpy().astype(np.float16)
    np.save(tmp_path / "emb.npy", x16)
    (tmp_path / "shards").mkdir()
    for i, (a, b) in enumerate([(0, 100), (100, 101), (101, 600), (600, 777)]):
        np.save(tmp_path / "shards" / f"part-{i:02d}.npy", x16[a:b])
    from_array = label_embeddings(x16.astype(np.float32), labels, rounds=3, chunk=64)
    for source in (tmp_path / "emb.npy", tmp_path / "shards"):
        res = label_embeddings(str(source), labels, rounds=3, chunk=64)
        assert np.array_equal(res.labels, from_array.labels)
        assert np.array_equal(res.confidence, from_array.confidence)


def test_rows_reads_blocks_across_shards(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    for i, (a, b) in enumerate([(0, 7), (7, 8), (8, 50)]):
        np.save(tmp_path / f"{i}.npy", x[a:b])
    rows = Rows(str(tmp_path), normalize=False)
    assert (rows.n, rows.dim) == (50, 3)
    assert torch.equal(rows.read(5, 31), torch.from_numpy(x[5:31]))
    pick = np.array([0, 6, 7, 8, 49])
    assert torch.equal(rows.take(pick), torch.from_numpy(x[pick]))
    unit = Rows(x).read(0, 50)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(50))


def test_rows_taken_from_a_file_a_few_maps_at_a_time(tmp_path, monkeypatch):
    """_File.take maps TAKE_ROWS rows at a time (one map over rows scattered through a large file
    kept much of it resident): the rows are those of one take, across the maps' edges, from a C- or
    a Fortran-order file and across shards."""
    from llp_fast.embeddings import sources

    monkeypatch.setattr(sources, "TAKE_ROWS", 7)
    x = np.random.default_rng(1).standard_normal((300, 5)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    (tmp_path / "parts").mkdir()
    np.save(tmp_path / "parts" / "0.npy", x[:123])
    np.save(tmp_path / "parts" / "1.npy", x[123:])
    pick = np.sort(np.random.default_rng(2).choice(300, 61, replace=False))
    for source in ("c.npy", "f.npy", "parts"):
        rows = Rows(str(tmp_path / source), normalize=False)
        for p in (pick, pick[:7], pick[:8], pick[:0], np.arange(300)):
            assert torch.equal(rows.take(p), torch.from_numpy(x[p])), (source, len(p))


def test_shards_numbered_without_padding_are_read_in_number_order(tmp_path):
    """part10 and part11 came before part2 (plain name order): rows no longer matched their labels,
    and the labelling was wrong without a word."""
    x = np.random.default_rng(1).standard_normal((24, 3)).astype(np.float32)
    for i in range(12):
        np.save(tmp_path / f"part{i}.npy", x[2 * i : 2 * i + 2])
    assert torch.equal(Rows(str(tmp_path), normalize=False).read(0, 24), torch.from_numpy(x))
    names = ["b.npy", "a10.npy", "a2.npy", "a02.npy", "a1x3.npy", "a1x20.npy"]
    assert sorted(names, key=shard_order) == ["a1x3.npy", "a1x20.npy", "a02.npy", "a2.npy", "a10.npy", "b.npy"]
    assert sorted(["emb1.npy", "emb.npy", "emb².npy"], key=shard_order) == ["emb.npy", "emb1.npy", "emb².npy"]


def test_extras_are_the_vote():
    x, labels = _problem(400, 8, 5, 0.05, seed=21)
    res = label_embeddings(x.numpy(), labels, rounds=2, chunk=150, normalize=False, top_classes=3, voter_ids=True)
    lab = labels >= 0
    assert np.array_equal(res.top_classes[:, 0], res.labels)  # no near-ties in this draw
    np.testing.assert_allclose(res.top_probs[~lab, 0], res.confidence[~lab], rtol=1e-5)
    assert (np.diff(res.top_probs, axis=1) <= 0).all() and (res.top_probs.sum(1) <= 1 + 1e-6).all()
    assert (res.voters[lab] == -1).all() and (res.voters[~lab] >= 0).all()
    # the voters of a row are voters, and their classes carry the vote's winner
    voter_set = set(res.voter_rows.tolist())
    assert all(v in voter_set for v in res.voters[~lab].ravel())
    final = np.flatnonzero(~np.isin(np.arange(400), res.voter_rows))
    for i in final[:20]:
        assert res.labels[i] in res.labels[res.voters[i]]


def test_labels_keep_their_values_and_classes_may_be_sparse():
    x, labels = _problem(300, 6, 3, 0.1, seed=2)
    big = np.where(labels >= 0, labels * 1000 + 7, -1)
    a = label_embeddings(x.numpy(), labels, rounds=2)
    b = label_embeddings(x.numpy(), big, rounds=2)
    assert np.array_equal(np.where(a.labels >= 0, a.labels * 1000 + 7, -1), b.labels)
    huge = np.where(labels == 2, 2**40, labels)  # no (2**40)-sized buffer anywhere
    c = label_embeddings(x.numpy(), huge, rounds=2)
    assert set(np.unique(c.labels)) <= {0, 1, 2**40}


def test_few_labels_clip_k_and_t():
    x, _ = _problem(40, 4, 2, 0.0, seed=5)
    labels = np.full(40, -1)
    labels[[3, 9]] = [0, 1]
    res = label_embeddings(x.numpy(), labels, rounds=1, k=10, t=100)
    want_l, want_c = _paper(x / x.norm(dim=1, keepdim=True), labels, k=2, t=38)
    assert np.array_equal(res.labels, want_l)
    all_labeled = label_embeddings(x.numpy(), np.arange(40) % 3)
    assert np.array_equal(all_labeled.labels, np.arange(40) % 3) and (all_labeled.confidence == 1).all()


def test_select_voters_quotas():
    label = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 1])
    conf = np.array([1, 0.5, 0.9, 0.9, 0.2, 0.7, 0.9, 0.1, 0.3, 0.8], np.float32)
    lab = np.zeros(10, bool)
    lab[[0, 2]] = True
    is_voter = lab.copy()
    prior = np.array([0.5, 0.5])
    # round 1 of 2 over 8 unlabeled rows: 2 per class; class 1 ties at 0.9 go to the lower rows
    new = select_voters(label, conf, is_voter, lab, 1, 2, 8, prior)
    assert new.tolist() == [1, 3, 5, 6]  # class 0: 5 (0.7), 1 (0.5); class 1: 3 and 6 (0.9, lower rows)
    is_voter[new] = True
    # round 2 of 2 would want 4 per class: class 0 has one candidate left (7), class 1 two more (9, 8)
    new = select_voters(label, conf, is_voter, lab, 2, 2, 8, prior)
    assert new.tolist() == [7, 8, 9]
    # with each row's best voter score as the key: class 1's tie at 0.9 goes to the higher key
    # (6, then 3 and 2 tied again at 5.0: the lower row); class 0 has no tie at its cut
    key = np.array([0, 0, 5.0, 5.0, 0, 0, 7.5, 0, 0, 0])
    is_voter = lab.copy()
    assert select_voters(label, conf, is_voter, lab, 1, 2, 8, prior, key=key).tolist() == [1, 3, 5, 6]
    key[6] = 4.0
    assert select_voters(label, conf, is_voter, lab, 1, 2, 8, prior, key=key).tolist() == [1, 3, 5, 6]
    is_voter[2] = False  # row 2 a candidate too (its label 1, conf 0.9, key 5.0): 2 and 3 beat 6
    assert select_voters(label, conf, is_voter, lab, 1, 2, 9, prior, key=key).tolist() == [1, 2, 3, 5]


def test_sure_rows_join_nearest_first():
    """docs/method.md §7.1: with the best voter's score as the key, every confidence of at least
    SURE counts as equal (the nearest sure rows join first); below it, confidence decides; without a
    key (the trainer's ``ties="row"``), exact confidences and the row."""
    from llp_fast.embeddings.settings import SURE

    label = np.zeros(6, np.int64)
    conf = np.array([1.0, SURE, 0.99, np.nextafter(np.float32(SURE), 0), 1.0, 0.5], np.float32)
    key = np.array([1.0, 3.0, 2.0, 9.0, 0.5, 8.0])
    lab = np.zeros(6, bool)
    for n, want in ((1, [1]), (2, [1, 2]), (3, [0, 1, 2]), (4, [0, 1, 2, 4]), (5, [0, 1, 2, 3, 4])):
        got = select_voters(label, conf, lab.copy(), lab, 1, 1, n, np.ones(1), key=key)
        assert got.tolist() == want, (n, got)
    # without the key: 1.0, 1.0 (rows 0, 4), then 0.99, then SURE
    got = select_voters(label, conf, lab.copy(), lab, 1, 1, 3, np.ones(1))
    assert got.tolist() == [0, 2, 4]


def test_the_labels_do_not_depend_on_the_rows_order():
    """docs/method.md §7.1: rows of equal confidence join by their best voter's score, not by their
    place in the file, so the labels of a permutation of the rows are the permutation of the labels
    (clusters where most rows' K voters agree: confidence 1 ties by the hundred)."""
    g = torch.Generator().manual_seed(31)
    y = torch.randint(0, 6, (1200,), generator=g)
    x = torch.nn.functional.normalize(
        torch.randn(6, 10, generator=g)[y] + 0.5 * torch.randn(1200, 10, generator=g), dim=1
    )
    labels = np.where(np.random.default_rng(31).random(1200) < 0.05, y.numpy(), -1)
    base = label_embeddings(x.numpy(), labels, rounds=5, chunk=300, normalize=False)
    assert (base.confidence[labels < 0] == 1).sum() > 200
    for seed in range(3):
        p = np.random.default_rng(seed).permutation(len(labels))
        res = label_embeddings(x.numpy()[p], labels[p], rounds=5, chunk=300, normalize=False)
        assert np.array_equal(res.labels, base.labels[p]) and np.array_equal(res.confidence, base.confidence[p])
    # the trainer's votes keep the row order's ties (docs/method.md §8), which a permutation moves
    row = label_embeddings(x.numpy(), labels, rounds=5, chunk=300, normalize=False, ties="row")
    p = np.random.default_rng(0).permutation(len(labels))
    moved = label_embeddings(x.numpy()[p], labels[p], rounds=5, chunk=300, normalize=False, ties="row")
    assert not np.array_equal(moved.labels, row.labels[p])
    with pytest.raises(ConfigError, match="ties must be one of score, row, got 'index'"):
        label_embeddings(x.numpy(), labels, rounds=5, ties="index")


def test_finishers_are_the_ops_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    labeled, pool = (torch.nn.functional.normalize(torch.randn(n, 24, generator=g), dim=1) for n in (150, 900))
    vals = llp_fast.topk_scores(labeled, pool, k=13).values
    assert torch.equal(log_sum_exp(vals), llp_fast.local_density(labeled, pool, t=13))
    classes = torch.randint(0, 4, (150,), generator=g)
    rho = llp_fast.local_density(labeled, pool, t=13)
    top = llp_fast.topk_scores(pool, labeled, k=7, bias=-rho)
    lab, conf = vote(top.values, classes[top.indices], 4)
    want_l, want_c = llp_fast.propagate(pool, labeled, classes, rho, k=7, num_classes=4)
    assert torch.equal(lab, want_l) and torch.equal(conf, want_c)


def test_several_k_in_one_pass_equal_each_k():
    """``k=(3, 10, 40)``: one round selects once (the largest K) and votes per K; more rounds run one
    labelling per K (the voters that join depend on K); each result equals the run with that K."""
    x, labels = _problem(900, 9, 5, 0.05, seed=4)
    for rounds in (1, 3):
        many = label_embeddings(x.numpy(), labels, rounds=rounds, k=(3, 10, 40), chunk=256, normalize=False)
        assert list(many) == [3, 10, 40]
        for k, res in many.items():
            one = label_embeddings(x.numpy(), labels, rounds=rounds, k=k, chunk=256, normalize=False)
            assert res.k == k and np.array_equal(res.labels, one.labels)
            assert np.array_equal(res.confidence, one.confidence)


def test_an_in_memory_tensor_is_read_where_it_is():
    """The trainer's case: the bank as a torch tensor (here on the CPU), labels as a tensor, a voter
    cap; the same labels as the same rows given as a NumPy array."""
    x, labels = _problem(700, 12, 4, 0.04, seed=12)
    got = label_embeddings(x, torch.from_numpy(labels), rounds=3, max_voters=50, normalize=False)
    want = label_embeddings(x.numpy(), labels, rounds=3, max_voters=50, normalize=False)
    assert np.array_equal(got.labels, want.labels) and np.array_equal(got.confidence, want.confidence)
    assert len(got.voter_rows) - (labels >= 0).sum() <= 50


def test_the_default_cap_keeps_the_cost_linear_in_n():
    """max_voters="auto" caps the pseudo-labeled voters at max(20,000, 2M): no cap at all below
    about 22,000 rows (the accuracy table's data sets), a bound independent of N above."""
    s = Settings()
    assert s.max_voters == "auto"
    assert s.voter_cap(90, 1700) == 1700  # digits-sized: every unlabeled row may join
    assert s.voter_cap(10_000, 990_000) == max(AUTO_VOTERS, 20_000)
    assert s.voter_cap(10_000, 10**9) == s.voter_cap(10_000, 990_000)  # bounded whatever N is
    assert s.voter_cap(100_000, 900_000) == 200_000
    assert Settings(max_voters=None).voter_cap(10, 10**6) == 10**6


def test_bad_inputs_name_what_is_wrong(tmp_path):
    x, labels = _problem(50, 4, 2, 0.2, seed=0)
    with pytest.raises(DataError, match="no labeled row"):
        label_embeddings(x.numpy(), np.full(50, -1))
    with pytest.raises(DataError, match="below -1"):
        label_embeddings(x.numpy(), np.where(labels < 0, -2, labels))
    with pytest.raises(DataError, match="50 entries"):
        label_embeddings(x.numpy(), labels[:10])
    bad = x.numpy().copy()
    bad[41, 2] = math.nan
    with pytest.raises(DataError, match="NaN or Inf"):
        label_embeddings(bad, labels, chunk=16)
    for field, value in [("k", 0), ("t", -1), ("tau", 0.0), ("rounds", 0), ("chunk", 0), ("density_pool", "some")]:
        with pytest.raises(ConfigError, match=field):
            label_embeddings(x.numpy(), labels, **{field: value})
    with pytest.raises(DataError, match="2-D float"):
        label_embeddings(np.zeros((5, 2), np.int64), labels[:5])
    np.save(tmp_path / "ints.npy", np.zeros((5, 2), np.int32))
    with pytest.raises(DataError, match="2-D float"):
        label_embeddings(str(tmp_path / "ints.npy"), labels[:5])
    with pytest.raises(DataError, match="no such file"):
        label_embeddings(str(tmp_path / "missing.npy"), labels)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without .npy shards"):
        label_embeddings(str(tmp_path / "empty"), labels)
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "ints.npy").read_bytes()[:-8])
    with pytest.raises(DataError, match="truncated"):
        label_embeddings(str(tmp_path / "trunc.npy"), labels[:5])


# -- what fuzzing the readers found (tests/test_fuzz_readers.py draws these too) -------------------


def _npy_header(shape, descr="<f4") -> bytes:
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


@pytest.mark.parametrize(
    "content",
    [
        b"\x93NUMPY\x01\x00\x06\x00\x00\x00\x00'''",  # NumPy's fallback parser: tokenize.TokenError
        b"\x93NUMPY\x01\x00\x0b\x00" + b"\x00" * 9 + b"{",
        _npy_header((4, 2**62)) + b"\x00" * 64,  # the size wrapped round in int64 and passed
        _npy_header((4, -1)) + b"\x00" * 64,
        _npy_header((-1, 4)) + b"\x00" * 64,  # was read as N = -1
    ],
)
def test_a_garbled_npy_header_is_a_data_error_naming_the_file(tmp_path, content):
    from llp_fast.embeddings import read_labels

    path = tmp_path / "x.npy"
    path.write_bytes(content)
    for read in (Rows, read_labels):
        with pytest.raises(DataError, match=str(path)):
            read(str(path))


def test_big_endian_float64_is_read_as_float64(tmp_path):
    x = np.array([[1 + 1e-12, 2.0], [1e200, 3.0]], dtype=">f8")
    np.save(tmp_path / "be.npy", x)
    rows = Rows(str(tmp_path / "be.npy"), normalize=False)
    assert rows.dtype == torch.float64
    assert rows.read(0, 2).numpy().tolist() == x.astype("<f8").tolist()


def test_rows_whose_norm_overflows_are_still_normalised(tmp_path):
    """Finite rows whose squared norm overflows the compute dtype came out as zeros."""
    for x in (np.array([[3e38, 1.0], [1e20, 1e20]], np.float32), np.array([[1e300, 1e300]], np.float64)):
        got = Rows(x).read(0, len(x)).double()
        want = torch.from_numpy(x.astype(np.float64) / np.abs(x).max(axis=1, keepdims=True))
        torch.testing.assert_close(got, torch.nn.functional.normalize(want, dim=1), rtol=1e-6, atol=0)


def test_label_shards_of_int64_and_uint64_keep_their_values(tmp_path):
    from llp_fast.embeddings import read_labels

    (tmp_path / "l").mkdir()
    np.save(tmp_path / "l" / "a.npy", np.array([2**60 + 1, 0], np.int64))
    np.save(tmp_path / "l" / "b.npy", np.array([1], np.uint64))
    assert read_labels(str(tmp_path / "l")).tolist() == [2**60 + 1, 0, 1]  # not 2**60 via float64
    np.save(tmp_path / "l" / "b.npy", np.array([2**63], np.uint64))
    with pytest.raises(DataError, match=r"b\.npy holds values beyond int64"):
        read_labels(str(tmp_path / "l"))
    # -1 saved as uint8 is 255: every row read as labeled, class 255 ("labeled 0 of N rows", exit 0)
    np.save(tmp_path / "u8.npy", np.array([0, 1, 255, 255], np.uint8))
    with pytest.raises(DataError, match=r"u8\.npy is uint8, which cannot hold -1 \(unlabeled\): its 255 entries"):
        read_labels(str(tmp_path / "u8.npy"))
    np.save(tmp_path / "u8.npy", np.array([0, 1, 254], np.uint8))
    assert read_labels(str(tmp_path / "u8.npy")).tolist() == [0, 1, 254]


def test_a_bad_row_names_its_shard_and_global_row(tmp_path):
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "s" / "0.npy", np.ones((3, 2), np.float32))
    np.save(tmp_path / "s" / "1.npy", np.array([[1, 1], [np.nan, 1]], np.float32))
    rows = Rows(str(tmp_path / "s"))
    with pytest.raises(DataError, match=r"1\.npy: row 4 contains NaN or Inf"):
        rows.read(0, 5)


def test_each_k_once():
    """k=(10, 10) silently gave one result (a dict by K), where the command line refuses it."""
    from llp_fast.errors import ConfigError

    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    labels = np.r_[[0, 1], np.full(48, -1)]
    with pytest.raises(ConfigError, match=r"^k: each K once, got \(10, 10\)"):
        label_embeddings(x, labels, k=(10, 10), rounds=1)


@pytest.mark.parametrize("scale, dtype", [(1e-13, torch.float64), (1e-150, torch.float64), (1e-18, torch.float32)])
def test_rows_of_tiny_norm_are_made_unit_length(scale, dtype):
    """Rows under a norm of 1e-12 (F.normalize's floor), or whose norm underflows, kept a length
    below 1: their scores shrank and the density swamped them (84% accuracy at 1e-13, 41% at
    1e-150, where the same rows at their own scale label 99%). A zero row stays zero."""
    x, labels = _problem(600, 8, 3, 0.1, seed=4, dtype=torch.float64)
    want = label_embeddings(x.to(dtype), labels, rounds=2).labels
    tiny = (x * scale).to(dtype)
    norms = Rows(tiny).read(0, 600).double().norm(dim=1)
    assert torch.allclose(norms, torch.ones(600, dtype=torch.float64), atol=1e-6), norms.min()
    got = label_embeddings(tiny, labels, rounds=2).labels
    assert np.array_equal(got, want)
    zero = x.to(dtype).clone()
    zero[5] = 0
    assert np.isfinite(label_embeddings(zero, labels, rounds=1).confidence).all()


def test_meta_tensors_are_refused_by_name():
    """label_embeddings on a meta tensor was torch's RuntimeError (Tensor.item()) for the rows and a
    NotImplementedError for the labels."""
    x, labels = _problem(40, 4, 2, 0.3, seed=1)
    with pytest.raises(ValueError, match="embeddings is on the meta device"):
        label_embeddings(torch.empty(40, 4, device="meta"), labels)
    with pytest.raises(ValueError, match="labels is on the meta device"):
        label_embeddings(x, torch.zeros(40, dtype=torch.long, device="meta"))
