"""llp_fast.propagate and its reference against the float64 brute force (docs/method.md §1.2)."""

import numpy as np
import pytest
import torch
from brute import f64, topk_scores
from brute import propagate as brute_propagate
from conftest import unit

import llp_fast
from llp_fast.reference import propagate_ref, streaming_topk

SHAPES = [  # (Q, M, D, k, S)
    (1, 1, 1, 1, 1),
    (1, 7, 5, 7, 3),  # K = M
    (13, 29, 17, 5, 4),  # D not a multiple of 16
    (40, 64, 32, 10, 10),
    (37, 101, 19, 1, 2),
    (64, 33, 128, 33, 7),
]


def _inputs(q, m, d, s, dtype, density=True):
    queries, labeled = unit(q, d, dtype), unit(m, d, dtype)
    classes = torch.randint(0, s, (m,))
    log_rho = (torch.rand(m) * 3 + 1) if density else None
    return queries, labeled, classes, log_rho


def _stable_rows(queries, labeled, classes, log_rho, k, tau, s, rel=1e-4):
    """Rows whose top-k set and winning class are not decided by a near-tie: only there must
    the labels agree exactly across implementations."""
    ok = []
    full = topk_scores(queries, labeled, log_rho, labeled.shape[0], tau)
    for row in full:
        scores = [sc for sc, _ in row]
        boundary = k < len(scores) and abs(scores[k - 1] - scores[k]) < rel * 10
        w = np.zeros(s)
        for sc, i in row[:k]:
            w[int(classes[i])] += np.exp(sc)
        top2 = np.sort(w)[-2:] if s > 1 else np.array([0.0, w.max()])
        ok.append(not boundary and (top2[1] - top2[0]) > rel * top2[1])
    return np.array(ok)


def _propagate(impl, queries, labeled, classes, log_rho, k, tau, s):
    """``op``: the public function (whatever kernel serves the device); ``reference``: the
    chunked reference itself."""
    if impl == "op":
        return llp_fast.propagate(queries, labeled, classes, log_rho, k=k, tau=tau, num_classes=s)
    labels, conf = propagate_ref(queries, labeled, classes, log_rho, k, tau, s)
    return labels, conf.float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [True, False])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_propagate_matches_brute_force(shape, dtype, density, impl, tiles):
    q, m, d, k, s = shape
    queries, labeled, classes, log_rho = _inputs(q, m, d, s, dtype, density)
    labels, conf = _propagate(impl, queries, labeled, classes, log_rho, k, 0.07, s)
    assert labels.dtype == torch.int64 and conf.dtype == torch.float32 and labels.shape == conf.shape == (q,)
    want_labels, want_conf = brute_propagate(queries, labeled, classes, log_rho, k, 0.07, s)
    stable = _stable_rows(queries, labeled, classes, log_rho, k, 0.07, s)
    assert stable.mean() > 0.8
    np.testing.assert_array_equal(labels.numpy()[stable], want_labels[stable])
    # The reference is exact on the (rounded) inputs: float32 accumulation error only.
    np.testing.assert_allclose(conf.numpy()[stable], want_conf[stable], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_selected_scores_match_brute_force(shape, tiles):
    q, m, d, k, s = shape
    queries, labeled, _, log_rho = _inputs(q, m, d, s, torch.float32)
    got = torch.cat([v for _, v, _ in streaming_topk(queries, labeled, k, 0.07, bias=log_rho)])
    want = np.array([[sc for sc, _ in row] for row in topk_scores(queries, labeled, log_rho, k, 0.07)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-4)


def test_float64_inputs_give_float64_confidence():
    queries, labeled, classes, log_rho = _inputs(9, 12, 6, 3, torch.float64)
    labels, conf = llp_fast.propagate(queries, labeled, classes, log_rho.double(), k=4, num_classes=3)
    assert conf.dtype == torch.float64
    want_labels, want_conf = brute_propagate(queries, labeled, classes, log_rho, 4, 0.07, 3)
    np.testing.assert_array_equal(labels.numpy(), want_labels)
    np.testing.assert_allclose(conf.numpy(), want_conf, rtol=1e-12)


def test_label_ties_go_to_the_lowest_class():
    # Two labeled points at the same spot, classes 2 and 1: equal weights, label 1 wins.
    labeled = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    classes = torch.tensor([2, 1, 0])
    labels, conf = llp_fast.propagate(torch.tensor([[1.0, 0.0]]), labeled, classes, k=2, num_classes=3)
    assert labels.tolist() == [1]
    assert conf.item() == pytest.approx(0.5)
    # Three-way tie over classes 4, 0, 3 (the last one far away but still in the top 3).
    labeled = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    labels, conf = llp_fast.propagate(torch.tensor([[0.6, 0.8]]), labeled, torch.tensor([4, 0, 3]), k=3, num_classes=5)
    assert labels.tolist() == [0] and conf.item() == pytest.approx(1 / 3)


def test_nodw_is_plain_weighted_knn():
    """log_rho=None ranks and weights by raw similarity; a constant log_rho changes nothing."""
    queries, labeled, classes, _ = _inputs(50, 40, 8, 5, torch.float32)
    plain = llp_fast.propagate(queries, labeled, classes, None, k=6, num_classes=5)
    shifted = llp_fast.propagate(queries, labeled, classes, torch.full((40,), 3.5), k=6, num_classes=5)
    torch.testing.assert_close(plain, shifted)
    # Weighted kNN written out: the 6 most similar labeled points vote with exp(sim / tau).
    sims = f64(queries) @ f64(labeled).T / 0.07
    for row in range(50):
        top = np.argsort(-sims[row], kind="stable")[:6]
        w = np.zeros(5)
        np.add.at(w, classes.numpy()[top], np.exp(sims[row, top]))
        assert plain[0][row].item() == int(np.argmax(w))
        assert plain[1][row].item() == pytest.approx(w.max() / w.sum(), rel=1e-5)


def test_density_weighting_changes_the_neighbours():
    """A labeled point with a huge density is demoted out of the neighbour set (docs/method.md §1.2:
    neighbours are chosen by the density-weighted score, not raw similarity)."""
    labeled = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    q = torch.tensor([[1.0, 0.0]])
    classes = torch.tensor([0, 1])
    assert llp_fast.propagate(q, labeled, classes, None, k=1, num_classes=2)[0].item() == 0
    log_rho = torch.tensor([10.0, 0.0])
    assert llp_fast.propagate(q, labeled, classes, log_rho, k=1, num_classes=2)[0].item() == 1


def test_empty_query_batch():
    labels, conf = llp_fast.propagate(
        torch.empty(0, 4), unit(5, 4), torch.zeros(5, dtype=torch.long), k=2, num_classes=1
    )
    assert labels.shape == conf.shape == (0,)


def test_reference_agrees_with_the_dispatched_op():
    queries, labeled, classes, log_rho = _inputs(21, 30, 9, 4, torch.float32)
    a = propagate_ref(queries, labeled, classes, log_rho, 5, 0.1, 4)
    b = torch.ops.llp_fast.propagate(queries, labeled, classes, log_rho, 5, 0.1, 4)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1].float(), b[1], rtol=1e-5, atol=1e-6)
