"""Suspect labels (``llp_fast.embeddings.suspects``): the label gap and the spreading margin against
float64 brute forces, streamed in blocks, at odd shapes; the ranking finds flipped labels better than the plain
leave-one-out vote; what the estimator and ``--drop-suspects`` do with it."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from llp_fast.embeddings import Rows, Settings, label_embeddings
from llp_fast.embeddings import spread as spread_mod
from llp_fast.embeddings.spread import graph_nodes, spread_margins, voter_margins
from llp_fast.embeddings.suspects import drop_worst, label_gaps, neighbourhood_scale, suspects_of

# streamed top-K selections in compiled code at odd shapes: a native crash fails these tests, not the run
pytestmark = pytest.mark.isolated

torch.set_num_threads(1)


def brute_gaps(x, labels, voter_rows, voter_classes, voter_bias, classes, k, tau, won=None):
    """docs/embeddings.md's label gap, row by row in float64 with plain sorting."""
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    bias = np.zeros(len(voter_rows)) if voter_bias is None else voter_bias.astype(np.float64)
    out = {}
    for i in np.flatnonzero(labels >= 0):
        c = int(np.searchsorted(classes, labels[i]))
        z = [(float(x[i] @ x[j]) / tau - b, cj) for j, cj, b in zip(voter_rows, voter_classes, bias) if j != i]
        own = sorted((s for s, cj in z if cj == c), reverse=True)
        n = min(k, len(own))
        if n == 0:  # no other voter of its class: its label spread nowhere (won no row), or no evidence
            out[i] = -math.inf if won is not None and not won[c] else 0.0
            continue
        every = sorted((s for s, _ in z), reverse=True)
        out[i] = min(0.0, np.mean(own[:n]) - np.mean(every[:n]))
    return out


def brute_spread(
    x, labeled_at, nodes, y, num_classes, k=10, tau=0.1, alpha=0.8, floor=1e-8, masses=False, reach_cut=30.0
):
    """docs/embeddings.md's spreading margin with dense float64 matrices: the k-NN graph by cosine
    similarity and a full sort of each row's, W = max(W, W^T), S = D^-1/2 W D^-1/2, G = (I - alpha
    S)^-1 by an explicit inverse, each labeled row's mean mass per class over the other labeled
    rows, both masses floored at ``floor`` times the largest, 0 for a class with no other seed and
    for a row whose largest mass is below the median row's over ``reach_cut`` (None: no cut).
    With ``masses``: also the smaller of the two masses the margin compares (own, best other)."""
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    xn = x[nodes]
    v = len(nodes)
    k = min(k, v - 1)
    w = np.zeros((v, v))
    if k > 0:
        # einsum: the same summation order for every pair, so equal rows tie exactly (a BLAS matmul may
        # sum the last columns in another order: 2e-15 apart on an AVX-512 MKL, and ties broken wrongly)
        s = np.einsum("id,jd->ij", xn, xn) / tau
        for i in range(v):
            others = [j for j in np.argsort(-s[i], kind="stable") if j != i][:k]
            w[i, others] = np.exp(s[i, others] - 1.0 / tau)
    w = np.maximum(w, w.T)
    d = w.sum(1)
    d[d == 0] = 1.0
    g = np.linalg.inv(np.eye(v) - alpha * w / np.sqrt(np.outer(d, d)))
    out, least, reach = np.zeros(len(labeled_at)), np.zeros(len(labeled_at)), np.zeros(len(labeled_at))
    if num_classes < 2:
        return (out, least) if masses else out
    for a, i in enumerate(labeled_at):
        mass, seeds = np.zeros(num_classes), np.zeros(num_classes)
        for b, j in enumerate(labeled_at):
            if b != a:
                mass[y[b]] += g[j, i]
                seeds[y[b]] += 1
        mass /= np.maximum(seeds, 1)  # a mean per class
        reach[a] = mass.max()
        low = max(floor * mass.max(), 1e-300)
        own = mass[y[a]]
        mass[y[a]] = -np.inf
        least[a] = min(own, mass.max())
        if seeds[y[a]] > 0:
            out[a] = np.log(max(own, low)) - np.log(max(mass.max(), low))
    if reach_cut is not None:
        out[reach < np.median(reach) / reach_cut] = 0.0
    return (out, least) if masses else out


def brute_nearest(x, at, nodes):
    """Each row ``at`` (positions in ``nodes``): its largest cosine similarity to another node."""
    x = x.astype(np.float64)
    xn = x[nodes] / np.linalg.norm(x[nodes], axis=1, keepdims=True)
    s = xn[at] @ xn.T
    s[np.arange(len(at)), at] = -np.inf
    return s.max(1)


def brute_scale(nearest):
    """docs/embeddings.md's scale: the median nearest-voter distance over the row's, that floored at
    a tenth of the median."""
    r = [0.0 if 1 - s < 1e-5 else math.sqrt(2 - 2 * s) for s in nearest]  # duplicates: 0, not rounding
    med = sorted(r)[len(r) // 2] if len(r) % 2 else (sorted(r)[len(r) // 2 - 1] + sorted(r)[len(r) // 2]) / 2
    return np.array([med / max(ri, med / 10) for ri in r]) if med > 0 else np.ones(len(r))


@pytest.mark.parametrize(
    "v, d, m, num_classes, chunk, entries",
    [
        (60, 8, 20, 3, 64, 1 << 22),  # one block of queries, one block of columns
        (61, 5, 17, 4, 7, 61 * 3),  # odd query blocks, columns solved 3 at a time
        (12, 3, 12, 2, 5, 12),  # every node labeled, one column at a time
        (2, 4, 2, 2, 1, 1 << 22),  # two nodes: one edge
        (6, 3, 4, 3, 4, 1 << 22),  # fewer nodes than k + 1: every other node a neighbour
        (30, 4, 9, 1, 8, 1 << 22),  # one class: margin 0
    ],
)
def test_spread_margins_equal_the_brute_force(v, d, m, num_classes, chunk, entries, monkeypatch):
    rng = np.random.default_rng(v * 7 + m)
    x = rng.standard_normal((v, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    at = np.sort(rng.choice(v, m, replace=False))
    y = rng.integers(0, num_classes, m)
    monkeypatch.setattr(spread_mod, "SOLVE_ENTRIES", entries)
    want, least = brute_spread(x, at, np.arange(v), y, num_classes, masses=True)
    # the default solve in float32 (to a residual of 1e-5): margins whose masses are not tiny
    got, nearest = spread_margins(torch.from_numpy(x), at, y, num_classes, chunk=chunk)
    sure = least > 1e-2
    assert sure.mean() >= 0.5 or num_classes < 2 or v == 2  # two nodes: one of the masses is 0
    np.testing.assert_allclose(got[sure], want[sure], rtol=1e-3, atol=1e-3)
    if num_classes < 2:  # no graph built: nothing to scale by
        assert np.isnan(nearest).all()
    else:
        np.testing.assert_allclose(nearest, brute_nearest(x, at, np.arange(v)), rtol=1e-5, atol=1e-5)
    # in float64 (to 1e-8): every margin
    monkeypatch.setattr(spread_mod, "SOLVE_DTYPE", torch.float64)
    got = spread_margins(torch.from_numpy(x), at, y, num_classes, chunk=chunk).margin
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_spread_margins_with_duplicate_rows_and_far_classes(monkeypatch):
    """Duplicate rows (pairs of equal rows: ties in each other's lists) and two clusters: the margin is
    positive for rows labeled as their cluster and lowest for the twin of a cluster-0 row labeled
    with cluster 1's class."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((2, 6))
    x = np.concatenate([base[0] + 0.05 * rng.standard_normal((10, 6)), base[1] + 0.05 * rng.standard_normal((10, 6))])
    x = np.concatenate([x, x[:3]])  # three duplicates of cluster 0's first rows
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    at = np.array([0, 1, 2, 10, 11, 12, 20])
    y = np.array([0, 0, 0, 1, 1, 1, 1])  # row 20, a duplicate of row 0, labeled with the other class
    got, nearest = spread_margins(torch.from_numpy(x), at, y, 2, chunk=4)
    want, least = brute_spread(x, at, np.arange(len(x)), y, 2, masses=True)
    assert (np.argsort(got, kind="stable") == np.argsort(want, kind="stable")).all()
    # rows 0-2 and 20 have exact twins (distance 0, whatever their similarity rounds to): four of the
    # seven, so the median distance is 0 and nothing is scaled; without the twin of row 0, three of
    # six: the twins get the floor's 10
    np.testing.assert_allclose(nearest, brute_nearest(x, at, np.arange(len(x))), atol=1e-6)
    assert np.allclose(nearest[[0, 1, 2, 6]], 1.0, atol=1e-6) and (nearest[3:6] < 1 - 1e-4).all()
    np.testing.assert_array_equal(neighbourhood_scale(nearest), np.ones(7))
    scale = neighbourhood_scale(nearest[1:])
    np.testing.assert_allclose(scale, brute_scale(nearest[1:]), rtol=1e-6)
    assert np.allclose(scale[[0, 1, 5]], 10.0) and (scale[2:5] < 10).all()
    monkeypatch.setattr(spread_mod, "SOLVE_DTYPE", torch.float64)
    got = spread_margins(torch.from_numpy(x), at, y, 2, chunk=4).margin
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.isfinite(got).all() and got[-1] == got.min() and (got[:-1] > 0).all()


def test_spread_margins_single_seed_ties_and_far_rows(monkeypatch):
    """Fifteen identical rows (more ties than k + 1: the row itself may fall out of its own list), a
    class with a single labeled row (no evidence: margin 0), and a long chain whose far end is
    labeled with the near end's class (its own class's mass is below what the solve resolves: the
    margin is floored, within log(1 / tolerance), and the most negative)."""
    rng = np.random.default_rng(11)
    chain = np.stack([np.cos(np.linspace(0, 1.5, 60)), np.sin(np.linspace(0, 1.5, 60)), np.zeros(60)], 1)
    twins = np.tile([[0.0, 0.0, 1.0]], (15, 1))
    x = np.concatenate([chain, twins, [[0.1, 0.0, 1.0]]]).astype(np.float32)
    x += 1e-4 * rng.standard_normal(x.shape).astype(np.float32) * (np.arange(len(x)) < 60)[:, None]
    at = np.array([0, 1, 2, 57, 58, 59, 60, 61, 62, 75])
    y = np.array([0, 0, 0, 1, 1, 0, 2, 2, 2, 3])  # row 59 (the far end) labeled 0; row 75 alone in class 3
    for dtype, floor in ((torch.float32, 1e-5), (torch.float64, 1e-8)):
        monkeypatch.setattr(spread_mod, "SOLVE_DTYPE", dtype)
        got = spread_margins(torch.from_numpy(x), at, y, 4, chunk=16).margin
        want, least = brute_spread(x, at, np.arange(len(x)), y, 4, floor=floor, masses=True)
        assert got[-1] == 0.0 and want[-1] == 0.0  # a class with one labeled row
        assert got[5] == got.min() and -math.log(1 / floor) - 1e-6 <= got[5] < -5  # the far end
        sure = least > 1e-3
        assert sure.sum() >= 5
        np.testing.assert_allclose(got[sure], want[sure], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spread_margin_is_zero_where_the_other_seeds_hardly_reach(dtype, monkeypatch):
    """A labeled row at the far end of a chain, its class's other seeds at the near end beyond another
    class's: both masses at it are about 1/5,000 of the median row's, and their ratio (margin -1.6,
    the most suspect of the seven) says only which seeds lie nearer, not that its label is wrong.
    Below the median's 1/30 (spread.REACH_CUT) the margin is 0, as where nothing reaches."""
    n = 60
    t = np.linspace(0, 1.5, n)
    x = np.stack([np.cos(t), np.sin(t), np.zeros(n)], 1)
    x = (x + 1e-4 * np.random.default_rng(0).standard_normal(x.shape)).astype(np.float32)
    at, y = np.array([0, 1, 2, 12, 13, 14, n - 1]), np.array([0, 0, 0, 1, 1, 1, 0])
    monkeypatch.setattr(spread_mod, "SOLVE_DTYPE", dtype)
    got = spread_margins(torch.from_numpy(x), at, y, 2, chunk=16).margin
    uncut = brute_spread(x, at, np.arange(n), y, 2, reach_cut=None)
    assert uncut[-1] == uncut.min() < -1.5 and (uncut[:-1] > 0.5).all()
    np.testing.assert_allclose(got, brute_spread(x, at, np.arange(n), y, 2), rtol=1e-5, atol=1e-5)
    assert got[-1] == 0.0 and (got[:-1] > 0.5).all()


def test_suspects_from_shards_and_unit_free(tmp_path):
    """The score is the same whether the rows come from an array or from a directory of .npy shards
    (the graph's nodes are read in row order, then ordered by class), and the margin does not depend
    on the rows' lengths (the graph is by cosine similarity): rows scaled by 0.1 to 50, unnormalised,
    give the unit rows' margins, and every quality lies in [0, 1]."""
    x, y, noisy, flipped = _flipped_digits(seed=3)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    settings = Settings()
    res = label_embeddings(x, noisy, settings, normalize=False)
    want = suspects_of(Rows(x, normalize=False), noisy, res, settings)
    for i, (a, b) in enumerate([(0, 500), (500, 1100), (1100, len(x))]):
        np.save(tmp_path / f"part{i}.npy", x[a:b])
    got = suspects_of(Rows(str(tmp_path), normalize=False), noisy, res, settings)
    assert np.array_equal(got.rows, want.rows) and np.array_equal(got.spread, want.spread)
    assert np.array_equal(got.scale, want.scale) and np.array_equal(got.score, want.score)
    scaled = x * np.random.default_rng(0).uniform(0.1, 50, (len(x), 1)).astype(np.float32)
    lab = np.flatnonzero(noisy >= 0)
    y_lab = np.searchsorted(res.classes, noisy[lab])

    nodes, classes = graph_nodes(res.voter_rows, lab), len(res.classes)
    unit, free = (
        voter_margins(
            Rows(r, normalize=False).take(nodes), nodes, lab, y_lab, res.voter_rows, res.voter_classes, classes
        )
        for r in (x, scaled)
    )
    np.testing.assert_allclose(free.margin, unit.margin, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(free.nearest, unit.nearest, rtol=1e-5, atol=1e-5)
    found = suspects_of(Rows(scaled, normalize=False), noisy, res, settings)
    assert np.isfinite(found.spread).all() and ((found.quality >= 0) & (found.quality <= 1)).all()


def _problem(rng, n, d, m, classes, pseudo):
    x = rng.standard_normal((n, d)).astype(np.float32)
    labels = np.full(n, -1, np.int64)
    lab = rng.choice(n, m, replace=False)
    labels[lab] = rng.choice(classes, m)
    cls = np.unique(labels[lab])
    others = np.setdiff1d(np.arange(n), lab)
    extra = rng.choice(others, min(pseudo, len(others)), replace=False)
    voter_rows = np.concatenate([np.sort(lab), extra])
    voter_classes = np.concatenate(
        [np.searchsorted(cls, labels[np.sort(lab)]), rng.integers(0, len(cls), len(extra))]
    ).astype(np.int64)
    bias = rng.normal(0, 2, len(voter_rows)).astype(np.float32)
    return x, labels, voter_rows, voter_classes, bias, cls


@pytest.mark.parametrize(
    "n, d, m, classes, pseudo, k, chunk",
    [
        (60, 8, 20, [0, 1, 2], 15, 5, 7),  # blocks of 7 rows
        (33, 5, 9, [3, 7, 11, 12], 0, 10, 64),  # k beyond a class's voters; sparse class values
        (40, 3, 12, [0, 1], 25, 1, 13),  # K = 1
        (25, 4, 6, [0, 1, 2, 3, 4, 5], 4, 3, 5),  # classes with a single voter: gap -inf where it won no row
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_label_gaps_equal_the_brute_force(n, d, m, classes, pseudo, k, chunk, with_bias, monkeypatch):
    rng = np.random.default_rng(n * 31 + k)
    x, labels, v_rows, v_cls, bias, cls = _problem(rng, n, d, m, classes, pseudo)
    bias = bias if with_bias else None
    monkeypatch.setattr(spread_mod, "SOLVE_DTYPE", torch.float64)  # the margins to 1e-8 (float32: its own test)
    won = np.arange(len(cls)) % 2 == 0  # (the even classes won an unlabeled row)
    got = label_gaps(Rows(x), labels, v_rows, v_cls, bias, cls, k=k, tau=0.1, chunk=chunk, won=won)
    want = brute_gaps(x, labels, v_rows, v_cls, bias, cls, k, 0.1, won)
    labeled = np.flatnonzero(labels >= 0)
    assert np.array_equal(got.labeled, labeled)
    ref = np.array([want[i] for i in labeled])
    np.testing.assert_allclose(got.gap, ref, rtol=1e-5, atol=1e-4)
    # the spreading margin over the voters' graph (the labeled rows among its nodes)
    nodes = np.union1d(v_rows, labeled)
    y = np.searchsorted(cls, labels[labeled])
    spread = brute_spread(x, np.searchsorted(nodes, labeled), nodes, y, len(cls))
    np.testing.assert_allclose(got.spread, spread, rtol=1e-5, atol=1e-4)
    scale = brute_scale(brute_nearest(x, np.searchsorted(nodes, labeled), nodes))
    np.testing.assert_allclose(got.scale, scale, rtol=1e-4)
    score = (ref + np.minimum(spread, 0.0)) * scale
    np.testing.assert_allclose(got.score, score, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got.quality, np.exp(score), rtol=1e-4, atol=1e-6)
    # the ranking: every labeled row once, by score ascending, ties to the lower row
    assert sorted(got.rows) == list(labeled)
    g = dict(zip(got.labeled, got.score))
    keys = [(g[r], r) for r in got.rows]
    assert keys == sorted(keys)
    per_row = got.per_row(n)
    assert np.isnan(per_row[labels < 0]).all() and np.array_equal(per_row[labeled], got.quality)


def _flipped_digits(frac=0.1, rate=0.1, seed=0):
    """Digits (centred pixels), round(frac * n_c) labeled rows of each class c, a fraction ``rate``
    of them flipped to another class at random."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labeled = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        labeled[rng.choice(idx, int(round(frac * len(idx))), replace=False)] = True
    noisy = np.where(labeled, y, -1)
    idx = np.flatnonzero(labeled)
    flipped = rng.choice(idx, int(round(rate * len(idx))), replace=False)
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    return x, y, noisy, flipped


def _plain_loo_precision(x, noisy, flipped, k=10, tau=0.07):
    """The issue's yardstick: each labeled row voted on by its k nearest other labeled rows
    (weight exp(s / tau)), ranked by the share of the vote its own label gets."""
    lab = np.flatnonzero(noisy >= 0)
    xl = x[lab] / np.linalg.norm(x[lab], axis=1, keepdims=True)
    s = xl @ xl.T / tau
    np.fill_diagonal(s, -np.inf)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    w = np.exp(np.take_along_axis(s, top, 1) - s.max(1, keepdims=True))
    share = (w * (noisy[lab][top] == noisy[lab][:, None])).sum(1) / w.sum(1)
    first = lab[np.argsort(share, kind="stable")[: len(flipped)]]
    return np.isin(first, flipped).mean()


def test_the_gap_finds_flipped_labels_better_than_the_plain_vote():
    """Precision among the first n suspects (n = the labels flipped), mean of 4 splits: one split
    moves by 1/18 a row, so the means are compared (docs/embeddings.md has the full table)."""
    ours, plain = [], []
    for seed in range(4):
        x, y, noisy, flipped = _flipped_digits(seed=seed)
        settings = Settings()
        found = suspects_of(Rows(x), noisy, label_embeddings(x, noisy, settings), settings)
        ours.append(np.isin(found.rows[: len(flipped)], flipped).mean())
        plain.append(_plain_loo_precision(x, noisy, flipped))
    assert np.mean(ours) >= 0.9 and np.mean(ours) >= np.mean(plain) + 0.03, (ours, plain)


def test_estimator_attributes_and_drop_worst():
    from llp_fast import LocalLabelPropagation

    x, y, noisy, flipped = _flipped_digits(seed=2)
    clf = LocalLabelPropagation(rounds=3).fit(x, noisy)
    lab = np.flatnonzero(noisy >= 0)
    assert sorted(clf.label_suspects_) == list(lab) and clf.label_suspects_.dtype == np.int64
    q = clf.label_quality_
    assert np.isnan(q[noisy < 0]).all() and ((q[lab] >= 0) & (q[lab] <= 1)).all()
    assert (np.diff(q[clf.label_suspects_]) >= 0).all()  # most suspect (lowest quality) first
    res = label_embeddings(x, noisy, rounds=3)
    found = suspects_of(Rows(x), noisy, res, Settings(rounds=3))
    assert np.array_equal(found.rows, clf.label_suspects_)
    cleaned, dropped = drop_worst(noisy, found, 0.1)
    assert np.array_equal(dropped, np.sort(found.rows[: round(0.1 * len(lab))]))
    assert (cleaned[dropped] == -1).all() and np.array_equal(np.delete(cleaned, dropped), np.delete(noisy, dropped))
    # dropping the worst tenth relabels them by the vote: most of the flipped ones get their truth back
    fixed = label_embeddings(x, cleaned, rounds=3).labels
    back = np.intersect1d(dropped, flipped)
    assert (fixed[back] == y[back]).mean() >= 0.8


def test_drop_suspects_auto_drops_the_labels_below_the_quality_cut_and_relabels_them():
    """``drop_worst(..., "auto")`` drops the rows of quality below DROP_QUALITY (here every one: no class
    falls to DROP_KEEPS labeled rows); with a fifth
    of digits' labels flipped those are mostly the flips, the run without them labels the unlabeled
    rows better, and it gives most dropped rows their true class back (docs/embeddings.md, "Dropping
    suspects"). The estimator's ``drop_suspects="auto"`` is that second run."""
    from llp_fast import LocalLabelPropagation
    from llp_fast.embeddings.settings import DROP_KEEPS, DROP_QUALITY

    x, y, noisy, flipped = _flipped_digits(frac=0.1, rate=0.2, seed=0)
    settings = Settings()
    first = label_embeddings(x, noisy, settings)
    found = suspects_of(Rows(x), noisy, first, settings)
    cleaned, dropped = drop_worst(noisy, found, "auto")
    assert np.array_equal(dropped, np.sort(found.labeled[found.quality < DROP_QUALITY])) and len(dropped) > 10
    assert (cleaned[dropped] == -1).all() and np.array_equal(np.delete(cleaned, dropped), np.delete(noisy, dropped))
    assert np.isin(dropped, flipped).mean() >= 0.85
    second = label_embeddings(x, cleaned, settings)
    unlabeled = noisy < 0
    assert (second.labels[unlabeled] == y[unlabeled]).mean() > (first.labels[unlabeled] == y[unlabeled]).mean() + 0.02
    assert (second.labels[dropped] == y[dropped]).mean() >= 0.85
    clf = LocalLabelPropagation(drop_suspects="auto").fit(x, noisy)
    assert np.array_equal(clf.labels_dropped_, dropped) and clf.labels_dropped_.dtype == np.int64
    assert np.array_equal(clf.transduction_, second.labels) and np.array_equal(clf.label_suspects_, found.rows)
    # a fraction drops the first round(F * M) of the ranking, as --drop-suspects F
    frac = LocalLabelPropagation(drop_suspects=0.1).fit(x, noisy)
    assert np.array_equal(frac.labels_dropped_, drop_worst(noisy, found, 0.1)[1])
    # every label below the cut: each class keeps its DROP_KEEPS least suspect labeled rows
    low = dataclasses.replace(found, quality=np.zeros_like(found.quality), score=np.full_like(found.score, -9.0))
    kept, most = drop_worst(noisy, low, "auto")
    assert (np.bincount(kept[kept >= 0], minlength=10) == DROP_KEEPS).all() and len(most) == len(found.rows) - 30
    rank = {r: i for i, r in enumerate(found.rows)}
    for c in range(10):  # the ones kept are the last of their class in the ranking
        mine = [r for r in found.rows if noisy[r] == c]
        assert sorted(np.flatnonzero(kept == c), key=rank.get) == mine[-DROP_KEEPS:]


def test_drop_auto_is_the_greedy_rule_for_any_class_ids():
    """``drop_worst(..., "auto")`` equals walking the ranking most suspect first and dropping each
    label below the cut while its class keeps DROP_KEEPS, on random rankings and class ids with gaps
    and of any size (ids of 10**12 sized a count array by the largest id: 7 TiB)."""
    from llp_fast.embeddings.settings import DROP_KEEPS, DROP_QUALITY
    from llp_fast.embeddings.suspects import Suspects

    rng = np.random.default_rng(1)
    for _ in range(500):
        n = int(rng.integers(1, 60))
        ids = rng.choice([0, 1, 5, 7, 10**12, 2**62], size=int(rng.integers(1, 6)), replace=False)
        labels = np.full(n, -1, np.int64)
        lab = rng.choice(n, int(rng.integers(1, n + 1)), replace=False)
        labels[lab] = rng.choice(ids, len(lab))
        quality = rng.choice([0.0, 0.01, 0.04, 0.2, 1.0], len(lab))
        rows = lab[np.lexsort((lab, quality))]
        score = np.log(np.maximum(quality, 1e-300))
        zero = np.zeros(len(lab))
        found = Suspects(rows, np.sort(lab), zero, zero, zero + 1, score, quality)  # (only rows and quality read)
        left = {c: int((labels == c).sum()) for c in ids}
        want = []
        for r in rows[: int((quality < DROP_QUALITY).sum())]:
            if left[labels[r]] > DROP_KEEPS:
                left[labels[r]] -= 1
                want.append(r)
        out, dropped = drop_worst(labels, found, "auto")
        assert np.array_equal(dropped, np.sort(np.array(want, np.int64)))
        assert (out[dropped] == -1).all() and np.array_equal(np.delete(out, dropped), np.delete(labels, dropped))


def test_neighbourhood_scale_edge_cases():
    """The median's row gets 1, a row twice as far 1/2, a duplicate (distance 0) the floor's 10; NaN
    (no graph) 1; most rows duplicates (median distance 0): no scaling at all."""
    s = 1 - np.array([0.5, 2.0, 1.0, 0.0, 1.0]) ** 2 / 2  # distances 0.5, 2, 1, 0, 1 (median 1)
    np.testing.assert_allclose(neighbourhood_scale(s), [2.0, 0.5, 1.0, 10.0, 1.0])
    np.testing.assert_allclose(neighbourhood_scale(np.array([np.nan, s[0], s[1], s[2]])), [1.0, 2.0, 0.5, 1.0])
    np.testing.assert_array_equal(neighbourhood_scale(np.array([1.0, 1.0, 0.3])), np.ones(3))
    np.testing.assert_array_equal(neighbourhood_scale(np.full(2, np.nan)), np.ones(2))
    # a duplicate's similarity rounds a few units below 1: still distance 0 (the floor), and when most
    # rows are duplicates still no scaling, whichever way each rounded
    got = neighbourhood_scale(np.append(s, 1 - 3e-7))  # distances 0.5, 2, 1, 0, 1, 0: median 0.75
    np.testing.assert_allclose(got, [1.5, 0.375, 0.75, 10.0, 0.75, 10.0])
    dup = 1 - np.array([0.0, 1e-7, 5e-7, 2e-6, 0.02, 0.3])
    np.testing.assert_array_equal(neighbourhood_scale(dup), np.ones(6))
    assert neighbourhood_scale(np.zeros(0)).shape == (0,)


def test_a_class_with_one_labeled_row_is_not_suspect_for_it():
    """With --rounds 1 a class's single labeled row has no other voter of its class: its gap was
    -inf, it ranked first (quality 0) and --drop-suspects removed the whole class (no row was then
    labeled 3). No other voter is no evidence either way, as the margin already said."""
    from llp_fast import LocalLabelPropagation

    x, y, noisy, flipped = _flipped_digits(seed=0)
    threes = np.flatnonzero((noisy == 3) & (y == 3))
    noisy[noisy == 3] = -1
    noisy[threes[0]] = 3  # one correct labeled 3, the class's only one
    flipped = flipped[noisy[flipped] >= 0]
    clf = LocalLabelPropagation(rounds=1).fit(x, noisy)
    q = clf.label_quality_
    assert q[threes[0]] > q[flipped].min()  # not below every flip
    assert clf.label_suspects_[0] != threes[0] and np.isfinite(np.log(q[threes[0]]))
    found = suspects_of(Rows(x), noisy, label_embeddings(x, noisy, rounds=1), Settings(rounds=1))
    cleaned, dropped = drop_worst(noisy, found, 0.03)
    assert threes[0] not in dropped and (cleaned == 3).sum() == 1


def test_a_one_label_class_whose_voter_quota_rounds_to_none_is_not_suspect():
    """A class's pseudo-labeled voters are its share of the labels times the cap, rounded: one label
    beside 500 got none, though it won all 50 rows of its cluster, and its row scored -inf (ranked
    first, dropped by --drop-suspects with its class)."""
    from llp_fast import LocalLabelPropagation

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    x = np.concatenate([centres[c] + rng.normal(size=(n, 16)) for c, n in ((0, 50), (1, 300), (2, 300))])
    y = np.full(650, -1)
    y[0] = 0
    y[50:300] = 1
    y[350:600] = 2
    clf = LocalLabelPropagation().fit(x.astype(np.float32), y)
    assert (clf.transduction_[:50] == 0).all()  # it won its cluster
    assert clf.label_quality_[0] == 1.0  # (score 0: no evidence; it ties with the clean rows)
    found = suspects_of(Rows(x.astype(np.float32)), y, label_embeddings(x.astype(np.float32), y), Settings())
    cleaned, dropped = drop_worst(y, found, 0.01)
    assert 0 not in dropped and (cleaned == 0).sum() == 1
