"""llp_fast.propagate (docs/method.md §1.2): the public op and its reference against the float64
brute force, the C++ extension's kernel (``TestExtension``) and the Triton kernel
(``TestTriton``, under TRITON_INTERPRET=1 on CPU) against the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _ext_setup import cpu_tile, require_ext  # noqa: F401 (cpu_tile is a fixture)
from _triton_setup import DEVICE, clear_rows, cuda_only, kernels, triton_tests, unit_rows
from brute import f64, topk_scores
from brute import propagate as brute_propagate
from conftest import unit

import llp_fast
from llp_fast.reference import local_density_ref, propagate_ref, streaming_topk

# Native kernels run on odd shapes here: a crash fails this module's tests, not the whole run.
pytestmark = pytest.mark.isolated

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


# ---------------------------------------------------------------------------------------------
# The fused CPU top-K and vote (csrc/cpu/propagate_cpu.cpp, csrc/cpu/topk.h) against the reference.
#
# The kernel's scores come from at::mm on other tiles than the reference's, so a score can differ in
# its last bits; where the k-th and (k+1)-th best scores of a row are that close, either neighbour is a
# correct answer (so the tests compare scores and votes, not indices). Such near-tied rows are found
# from a float64 score matrix and left out of exact label comparisons (they are rare: the tests assert
# that almost every row is compared). Small tiles (LLP_FAST_CPU_TILE) exercise tile edges at small
# shapes.

PROPAGATE = torch.ops.llp_fast.propagate.default
DENSITY = torch.ops.llp_fast.local_density.default
TAU = 0.07


def _unit(n, d, dtype):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def _clear_rows(queries, keys, k, bias=None, mask=None, margin=1e-4):
    """Rows whose k-th and (k+1)-th best float64 scores are more than ``margin`` apart: the top-k
    set is unambiguous there whatever the matmul's rounding."""
    s = queries.double() @ keys.double().T / TAU
    if bias is not None:
        s = s - bias.double()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if k >= s.shape[1]:
        return torch.ones(s.shape[0], dtype=torch.bool)
    top = s.topk(k + 1, dim=1).values
    return (top[:, k - 1] - top[:, k]) > margin


def _check_propagate(q, m, cls, log_rho, k, num_classes, *, atol):
    labels, conf = PROPAGATE(q, m, cls, log_rho, k, TAU, num_classes)
    ref_labels, ref_conf = propagate_ref(q, m, cls, log_rho, k, TAU, num_classes)
    expect_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert labels.dtype == torch.int64 and conf.dtype == expect_dtype
    assert labels.shape == conf.shape == (q.shape[0],)
    clear = _clear_rows(q, m, k, log_rho)
    assert q.shape[0] == 0 or clear.float().mean() >= 0.9
    assert torch.equal(labels[clear], ref_labels[clear])
    torch.testing.assert_close(conf[clear], ref_conf.to(expect_dtype)[clear], rtol=0, atol=atol)
    return labels, conf


class TestExtension:
    @pytest.mark.parametrize(
        "dtype,atol",
        [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5), (torch.float64, 1e-12)],
    )
    @pytest.mark.parametrize("density", [True, False], ids=["DW", "NoDW"])
    @pytest.mark.usefixtures("cpu_tile")
    def test_propagate_matches_reference(self, dtype, atol, density):
        require_ext("propagate")
        q, m = _unit(300, 17, dtype), _unit(257, 17, dtype)
        cls = torch.randint(0, 7, (257,))
        log_rho = (torch.randn(257, dtype=torch.float64) * 0.5).to(dtype) if density else None
        _check_propagate(q, m, cls, log_rho, 10, 7, atol=atol)

    @pytest.mark.parametrize(
        "q_rows,m_rows,d,k",
        [(1, 50, 17, 10), (33, 33, 17, 33), (1, 1, 5, 1), (40, 1030, 128, 10), (20, 300, 8, 200), (0, 20, 4, 3)],
        ids=["Q=1", "K=M", "Q=M=K=1", "M-not-tile-multiple", "large-K", "Q=0"],
    )
    @pytest.mark.usefixtures("cpu_tile")
    def test_propagate_odd_shapes(self, q_rows, m_rows, d, k):
        require_ext("propagate")
        q, m = _unit(q_rows, d, torch.float32), _unit(m_rows, d, torch.float32)
        cls = torch.randint(0, 5, (m_rows,))
        log_rho = torch.randn(m_rows) * 0.3
        _check_propagate(q, m, cls, log_rho, k, 5, atol=1e-5)

    def test_propagate_non_contiguous_inputs(self):
        require_ext("propagate")
        big_q, big_m = _unit(100, 34, torch.float32), _unit(80, 34, torch.float32)
        q, m = big_q[:, ::2], big_m[::1, 1::2]  # strided views
        cls = torch.randint(0, 4, (80,)).int()  # int32 class ids are accepted too
        log_rho = torch.randn(160)[::2]
        labels, conf = PROPAGATE(q, m, cls, log_rho, 7, TAU, 4)
        ref = propagate_ref(q.contiguous(), m.contiguous(), cls, log_rho.contiguous(), 7, TAU, 4)
        clear = _clear_rows(q, m, 7, log_rho)
        assert torch.equal(labels[clear], ref[0][clear])
        torch.testing.assert_close(conf[clear], ref[1][clear], rtol=0, atol=1e-5)

    @pytest.mark.parametrize("classes", [[4, 2], [2, 4], [3, 1, 1, 3]])
    def test_propagate_label_ties_go_to_lowest_class(self, classes):
        require_ext("propagate")
        d = 6
        # Every labeled point is the same vector: equal scores, equal weights, a tied vote.
        m = F.normalize(torch.ones(len(classes), d), dim=1)
        q = m[:1].clone()
        cls = torch.tensor(classes)
        labels, conf = PROPAGATE(q, m, cls, None, len(classes), TAU, 5)
        ref_labels, ref_conf = propagate_ref(q, m, cls, None, len(classes), TAU, 5)
        assert labels.item() == min(classes) == ref_labels.item()
        assert conf.item() == pytest.approx(0.5) and conf.item() == pytest.approx(ref_conf.item())

    def test_propagate_public_api_uses_kernel(self):
        require_ext("propagate")
        q, m = _unit(64, 16, torch.float32), _unit(40, 16, torch.float32)
        cls = torch.randint(0, 3, (40,))
        rho = llp_fast.local_density(m, torch.cat([m, q]), t=5)
        labels, conf = llp_fast.propagate(q, m, cls, rho, k=4, num_classes=3)
        ref = propagate_ref(q, m, cls, rho, 4, TAU, 3)
        clear = _clear_rows(q, m, 4, rho)
        assert torch.equal(labels[clear], ref[0][clear])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_opcheck_propagate(self, dtype):
        require_ext("propagate")
        q, m = _unit(20, 16, dtype), _unit(30, 16, dtype)
        cls = torch.randint(0, 3, (30,))
        for log_rho in (None, torch.randn(30, dtype=dtype)):
            torch.library.opcheck(PROPAGATE, (q, m, cls, log_rho, 4, TAU, 3))

    def test_compiled_fullgraph(self):
        require_ext("propagate")
        q, m = _unit(32, 16, torch.float32), _unit(40, 16, torch.float32)
        cls = torch.randint(0, 3, (40,))

        @torch.compile(fullgraph=True, backend="aot_eager")
        def f(q, m, cls):
            rho = DENSITY(m, m, 5, TAU, None)
            return PROPAGATE(q, m, cls, rho, 4, TAU, 3)

        labels, conf = f(q, m, cls)
        ref = propagate_ref(q, m, cls, local_density_ref(m, m, 5, TAU), 4, TAU, 3)
        clear = _clear_rows(q, m, 4, local_density_ref(m, m, 5, TAU))
        assert torch.equal(labels[clear], ref[0][clear])


# ---------------------------------------------------------------------------------------------
# kernels/propagate.py against the reference (under TRITON_INTERPRET=1 on CPU).


def make_inputs(q, m, d, num_classes, dtype, *, seed=0, density=True, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    queries = unit_rows(q, d, dtype, device, gen=g)
    labeled = unit_rows(m, d, dtype, device, gen=g)
    classes = torch.randint(0, num_classes, (m,), generator=g).to(device)
    log_rho = (torch.rand(m, generator=g, dtype=torch.float64) * 2 + 5).float().to(device) if density else None
    return queries, labeled, classes, log_rho


def check_against_reference(queries, labeled, classes, log_rho, k, num_classes, **launch):
    labels, conf = kernels.propagate_triton(queries, labeled, classes, log_rho, k, TAU, num_classes, **launch)
    ref_labels, ref_conf = propagate_ref(queries, labeled, classes, log_rho, k, TAU, num_classes)
    assert labels.dtype == torch.int64 and conf.dtype == torch.float32
    assert labels.shape == conf.shape == (queries.shape[0],)
    clear = clear_rows(queries, labeled, classes, log_rho, k, TAU, num_classes)
    assert clear.float().mean() > 0.5, "test inputs are mostly near-ties: pick another seed"
    assert torch.equal(labels[clear], ref_labels[clear])
    torch.testing.assert_close(conf[clear], ref_conf[clear].float(), rtol=0, atol=5e-5)
    assert bool(((conf > 0) & (conf <= 1 + 1e-6)).all())

    # The selected scores (not the indices, which ties may reorder), sorted descending.
    vals, idx = kernels.topk_candidates(kernels.topk_plan(queries, labeled, k, **launch), TAU, bias=log_rho)
    _, ref_vals, _ = next(streaming_topk(queries, labeled, k, TAU, bias=log_rho, row_chunk=1 << 30))
    torch.testing.assert_close(vals, ref_vals.float(), rtol=0, atol=1e-4)
    # Each index really has the score reported for it.
    q, m = queries.double(), labeled.double()
    rescored = (q[:, None, :] * m[idx]).sum(-1) / TAU
    if log_rho is not None:
        rescored = rescored - log_rho.double()[idx]
    torch.testing.assert_close(vals.double(), rescored, rtol=0, atol=1e-4)
    distinct = (idx[:, :, None] != idx[:, None, :]) | torch.eye(k, dtype=torch.bool, device=idx.device)
    assert bool(distinct.all())  # no key selected twice


class TestTriton:
    pytestmark = triton_tests

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize(
        "q,m,d,k,splits",
        [
            (1, 20, 7, 20, None),  # one query, K = M
            (37, 61, 33, 5, None),  # nothing a multiple of the block
            (40, 70, 40, 10, 3),  # the split-and-merge path (few queries, many keys)
            (17, 50, 16, 1, None),  # K = 1
        ],
    )
    def test_propagate_matches_reference(self, dtype, q, m, d, k, splits):
        inputs = make_inputs(q, m, d, 4, dtype, seed=q * 1000 + m)
        check_against_reference(*inputs, k, 4, splits=splits)

    @pytest.mark.parametrize("dtype", [torch.bfloat16])
    def test_propagate_gpu_tile_shape(self, dtype):
        """The GPU heuristic's 128 x 64 tiles (the other tests use 16 x 16 under the interpreter)."""
        inputs = make_inputs(37, 150, 40, 5, dtype, seed=21)
        check_against_reference(*inputs, 10, 5, block_m=128, block_n=64)

    def test_propagate_without_density_float16(self):
        inputs = make_inputs(33, 45, 24, 3, torch.float16, seed=7, density=False)
        check_against_reference(*inputs, 6, 3)

    def test_propagate_k64_many_classes(self):
        """The largest buffer (K = 64), and 1000 classes: the in-kernel vote has no class axis."""
        inputs = make_inputs(20, 70, 20, 1000, torch.float32, seed=3)
        check_against_reference(*inputs, 64, 1000)

    def test_propagate_one_class_and_strided_queries(self):
        queries, labeled, classes, log_rho = make_inputs(9, 30, 12, 1, torch.float32, seed=5)
        wide = torch.zeros(9, 24, device=DEVICE)
        wide[:, ::2] = queries  # a non-unit column stride: the launcher must copy, not misread
        labels, conf = kernels.propagate_triton(wide[:, ::2], labeled, classes, log_rho, 4, TAU, 1)
        assert bool((labels == 0).all())
        torch.testing.assert_close(conf, torch.ones_like(conf))

    def test_propagate_exact_score_ties_pick_lowest_class(self):
        """Two labeled copies of the query in different classes: equal votes, class 0 wins."""
        d = 16
        queries = unit_rows(3, d)
        labeled = torch.cat([queries[:1], queries[:1], -queries[:1]]).contiguous()
        classes = torch.tensor([2, 0, 1], device=DEVICE)
        labels, conf = kernels.propagate_triton(queries[:1], labeled, classes, None, 2, TAU, 3)
        assert labels.tolist() == [0]
        torch.testing.assert_close(conf, torch.full_like(conf, 0.5))

    def test_declines_what_it_does_not_cover(self):
        q64, m64, c, r = make_inputs(4, 8, 8, 2, torch.float64)
        assert kernels.propagate_triton(q64, m64, c, r, 2, TAU, 2) is NotImplemented
        q, m, c, r = make_inputs(4, 80, 8, 2, torch.float32)
        assert kernels.propagate_triton(q, m, c, r, 65, TAU, 2) is NotImplemented
        q, m, c, r = make_inputs(4, 8, 300, 2, torch.float32)
        assert kernels.propagate_triton(q, m, c, r, 2, TAU, 2) is NotImplemented
        q, m, c, r = make_inputs(0, 8, 8, 2, torch.float32)
        labels, conf = kernels.propagate_triton(q, m, c, r, 2, TAU, 2)
        assert labels.shape == conf.shape == (0,)
        q, m, c, r = make_inputs(3, 0, 8, 2, torch.float32)
        assert kernels.propagate_triton(q, m, c, r, 1, TAU, 2) is NotImplemented

    @cuda_only
    @pytest.mark.parametrize("q,m,splits", [(4096, 60_000, None), (256, 200_000, None)])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_propagate_cuda_realistic(self, dtype, q, m, splits):
        import llp_fast

        num_classes, k = 100, 10
        queries, labeled, classes, log_rho = make_inputs(q, m, 128, num_classes, dtype, seed=11, device="cuda")
        labels, conf = llp_fast.propagate(queries, labeled, classes, log_rho, k=k, tau=TAU, num_classes=num_classes)
        ref_labels, ref_conf = propagate_ref(queries, labeled, classes, log_rho, k, TAU, num_classes)
        clear = clear_rows(queries, labeled, classes, log_rho, k, TAU, num_classes)
        assert clear.float().mean() > 0.8
        assert torch.equal(labels[clear], ref_labels[clear])
        assert (conf[clear] - ref_conf[clear]).abs().max().item() < 1e-3
        assert math.isfinite(conf.sum().item())


def test_reference_vote_memory_does_not_grow_with_the_class_count():
    """The reference (the CPU fallback without the extension) sums votes in an (r, k) table: a
    class id space of 2**40 once asked it for an (r, 2**40) one (terabytes)."""
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(9, 6, generator=g), dim=1)
    lab = torch.nn.functional.normalize(torch.randn(12, 6, generator=g), dim=1)
    small = torch.randint(0, 4, (12,), generator=g)
    huge = small * (2**38)  # the same partition into classes, ids up to 3 * 2**38
    got_l, got_c = propagate_ref(q, lab, huge, None, 5, 0.1, 2**40)
    want_l, want_c = propagate_ref(q, lab, small, None, 5, 0.1, 4)
    assert torch.equal(got_l, want_l * (2**38))
    torch.testing.assert_close(got_c, want_c, rtol=0, atol=0)
