"""K and tau from the data (``llp_fast.embeddings.tune``): the leave-one-out accuracies against a
float64 brute force, the rule that keeps the default unless a candidate is clearly better, and the
estimator's and the command line's ``auto``."""

import math

import numpy as np
import pytest
import torch

from llp_fast.embeddings import Rows, Settings, tune

# streamed top-K selections in compiled code at odd shapes: a native crash fails these tests, not the run
pytestmark = pytest.mark.isolated

torch.set_num_threads(1)


def brute_loo(x, labels, k, tau, t, pool):
    """Per labeled row (in row order): does the density-weighted vote of its k nearest other
    labeled rows (docs/method.md §1.1-1.2, float64, plain loops) give its label?"""
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    lab = np.flatnonzero(labels >= 0)
    keys = np.arange(len(x)) if pool == "all" else np.flatnonzero(labels < 0)
    log_rho = {}
    for j in lab:
        sims = sorted((float(x[j] @ x[p]) / tau for p in keys), reverse=True)[:t]
        log_rho[j] = math.log(sum(math.exp(s) for s in sims))
    out = []
    for i in lab:
        scored = sorted(
            ((float(x[i] @ x[j]) / tau - log_rho[j], j) for j in lab if j != i), key=lambda s: (-s[0], s[1])
        )
        top = scored[:k]
        votes = {}
        for s, j in top:
            votes[labels[j]] = votes.get(labels[j], 0.0) + math.exp(s - top[0][0])
        best = max(votes.values())
        out.append(min(c for c, v in votes.items() if v == best) == labels[i])
    return np.array(out)


@pytest.mark.parametrize("n, d, m, rounds, chunk", [(70, 6, 30, 1, 16), (45, 4, 21, 10, 64), (30, 3, 12, 2, 7)])
def test_leave_one_out_accuracies_equal_the_brute_force(n, d, m, rounds, chunk):
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((3, d))
    y = rng.integers(0, 3, n)
    x = (centres[y] + 0.8 * rng.standard_normal((n, d))).astype(np.float32)
    labels = np.full(n, -1)
    lab = rng.choice(n, m, replace=False)
    labels[lab] = y[lab] * 2 + 1  # sparse class values
    settings = Settings(rounds=rounds, chunk=chunk, t=5)
    choice = tune.choose(Rows(x), labels, settings, auto_k=True, auto_tau=True)
    assert choice.rows == m and len(choice.accuracy) == len(tune.K_GRID) * len(tune.TAU_GRID)
    for (k, tau), acc in choice.accuracy.items():  # a K above M - 1 is scored as M - 1
        want = brute_loo(x, labels, min(k, m - 1), tau, 5, settings.pool).mean()
        assert acc == pytest.approx(want, abs=1e-12), (k, tau)
    assert (choice.k, choice.tau) in choice.accuracy


def test_the_rule_keeps_the_default_unless_a_candidate_is_clearly_better():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.8
    better = base.copy()
    better[np.flatnonzero(~base)[:30]] = True  # 30 wins, no loss: far beyond 3 standard errors
    slightly = base.copy()
    slightly[np.flatnonzero(~base)[:4]] = True  # 4 wins: within the noise
    anchor = (10, 0.07)
    assert tune.pick({anchor: base, (5, 0.07): slightly}, anchor) == anchor
    assert tune.pick({anchor: base, (5, 0.07): slightly, (50, 0.2): better}, anchor) == (50, 0.2)
    # equal accuracy among the clearly better: the smaller K, then the tau nearer the default
    assert tune.pick({anchor: base, (50, 0.1): better, (20, 0.1): better}, anchor) == (20, 0.1)
    assert tune.pick({anchor: base, (20, 0.2): better, (20, 0.05): better}, anchor) == (20, 0.05)
    assert tune.pick({anchor: base, (20, 0.2): better}, anchor, z=100.0) == anchor


def test_at_most_max_queries_rows_are_voted_on(monkeypatch):
    monkeypatch.setattr(tune, "MAX_QUERIES", 10)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    labels = np.where(rng.random(50) < 0.6, rng.integers(0, 2, 50), -1)
    choice = tune.choose(Rows(x), labels, Settings(rounds=1), auto_k=True, auto_tau=False)
    assert choice.rows == 10 and choice.tau == Settings().tau
    assert "K from the data" in choice.line(True, False)


def test_estimator_auto_stores_the_choice_and_runs_with_it():
    from sklearn.datasets import load_digits

    from llp_fast import LocalLabelPropagation

    x, y = load_digits(return_X_y=True)
    x = x - x.mean(0)
    partial = np.where(np.random.default_rng(0).random(len(y)) < 0.1, y, -1)
    auto = LocalLabelPropagation(n_neighbors="auto", tau="auto", rounds=2).fit(x, partial)
    choice = tune.choose(Rows(x), partial, Settings(rounds=2), auto_k=True, auto_tau=True)
    assert (auto.n_neighbors_, auto.tau_) == (choice.k, choice.tau) and auto.loo_accuracy_ == choice.accuracy
    fixed = LocalLabelPropagation(n_neighbors=choice.k, tau=choice.tau, rounds=2).fit(x, partial)
    assert np.array_equal(auto.transduction_, fixed.transduction_) and fixed.loo_accuracy_ == {}
    assert auto.n_neighbors == "auto" and auto.tau == "auto"  # parameters stay as given
    with pytest.raises(ValueError, match="n_neighbors must be 'auto' or a number"):
        LocalLabelPropagation(n_neighbors="many").fit(x, partial)


def test_a_k_not_chosen_is_kept_and_a_chosen_k_is_the_candidates():
    """Few labeled rows (M - 1 below K): leave-one-out scores K as M - 1, but the run keeps the K
    given (tau chosen) or the candidate's own K (K chosen), never M - 1."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    labels = np.full(300, -1)
    labels[:10] = np.arange(10) % 3
    rows = Rows(x)
    only_tau = tune.choose(rows, labels, Settings(k=20, rounds=1), auto_k=False, auto_tau=True)
    assert only_tau.k == 20 and {k for k, _ in only_tau.accuracy} == {20}
    both = tune.choose(rows, labels, Settings(rounds=1), auto_k=True, auto_tau=False)
    assert both.k in tune.K_GRID and {k for k, _ in both.accuracy} == set(tune.K_GRID)
    # K = 10 and 20 and 50 are all scored as M - 1 = 9 here: the same votes, and the default stays
    assert both.accuracy[(10, 0.07)] == both.accuracy[(20, 0.07)] == both.accuracy[(50, 0.07)]
    assert both.k == 10


def test_the_choice_line_says_whether_the_start_was_kept():
    """It said the start "stays unless clearly beaten" beside a choice that had beaten it."""
    from llp_fast.embeddings.tune import Choice

    acc = {(10, 0.07): 0.90, (10, 0.2): 0.95, (20, 0.07): 0.91}
    moved = Choice(k=10, tau=0.2, accuracy=acc, rows=100, start=(10, 0.07)).line(False, True)
    assert moved.startswith("tau from the data: K = 10, tau = 0.2, leave-one-out accuracy 95.0% on 100 labeled")
    assert moved.endswith(
        "(the grid's best: 95.0% at K = 10, tau = 0.2; chosen over K = 10, tau = 0.07, which it beat clearly)"
    )
    kept = Choice(k=10, tau=0.07, accuracy=acc, rows=100, start=(10, 0.07)).line(True, True)
    assert kept.endswith("K = 10, tau = 0.07 kept: no candidate beat it clearly)"), kept
