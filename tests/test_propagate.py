"""llp_fast.propagate (docs/method.md §1.2): the reference against the float64 brute force and the op
(``topk_scores``' kernel for the device, then the vote) against the reference, on every sample of
tests/samples.py; several K in one call; ties; the CUDA path (``topk_scores``' Triton kernel and the
vote) under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _ext_setup import cpu_tile  # noqa: F401 (a fixture)
from _triton_setup import DEVICE, clear_rows, cuda_only, kernels, triton_tests, unit_rows
from brute import f64, topk_scores
from brute import propagate as brute_propagate
from conftest import unit
from samples import out_dtype, sample, sample_ids

import llp_fast
from llp_fast._topk import vote
from llp_fast.reference import propagate_ref

# Native kernels run on odd shapes here: a crash fails this module's tests, not the whole run.
pytestmark = pytest.mark.isolated

PROPAGATE = torch.ops.llp_fast.propagate.default
TAU = 0.07


def _inputs(q, m, d, s, density=True):
    """Inputs of the tests of identities and ties (the odd shapes and dtypes are tests/samples.py's)."""
    queries, labeled = unit(q, d), unit(m, d)
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
            w[int(classes[i])] += np.exp(sc - scores[0])
        top2 = np.sort(w)[-2:] if s > 1 else np.array([0.0, w.max()])
        ok.append(not boundary and (top2[1] - top2[0]) > rel * top2[1])
    return np.array(ok, dtype=bool)


@pytest.mark.parametrize("name", sample_ids("propagate", device="cpu"))
def test_reference_matches_brute_force(name):
    queries, labeled, classes, log_rho, k, tau, s = sample("propagate", name, device="cpu").args
    labels, conf = propagate_ref(queries, labeled, classes, log_rho, k, tau, s)
    assert labels.dtype == torch.int64 and labels.shape == conf.shape == (queries.shape[0],)
    if queries.shape[0] == 0:
        return
    want_labels, want_conf = brute_propagate(queries, labeled, classes, log_rho, k, tau, s)
    stable = _stable_rows(queries, labeled, classes, log_rho, k, tau, s)
    assert stable.mean() > 0.8
    np.testing.assert_array_equal(labels.numpy()[stable], want_labels[stable])
    # The reference is exact on the (rounded) inputs: float32 accumulation error only.
    rtol = 1e-10 if queries.dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(conf.double().numpy()[stable], want_conf[stable], rtol=rtol, atol=rtol / 10)


@pytest.mark.usefixtures("cpu_tile")
@pytest.mark.parametrize("name", sample_ids("propagate"))
def test_op_matches_reference(name):
    """The op as dispatched on every sample: the reference's labels wherever no near-tie decides
    them, and its confidences; bit for bit the vote over ``topk_scores``' selection."""
    smp = sample("propagate", name)
    queries, labeled, classes, log_rho, k, tau, s = smp.args
    labels, conf = PROPAGATE(*smp.args)
    assert labels.dtype == torch.int64 and conf.dtype == out_dtype(smp) and labels.shape == (queries.shape[0],)
    ref_labels, ref_conf = propagate_ref(*smp.args)
    if queries.shape[0]:
        stable = _stable_rows(queries.cpu(), labeled.cpu(), classes.cpu(), log_rho, k, tau, s)
        stable = torch.from_numpy(stable).to(labels.device)
        assert torch.equal(labels[stable], ref_labels[stable])
        atol = 1e-12 if queries.dtype == torch.float64 else 5e-5
        torch.testing.assert_close(conf[stable], ref_conf.to(conf.dtype)[stable], rtol=0, atol=atol)
    top = llp_fast.topk_scores(queries, labeled, k=k, tau=tau, bias=None if log_rho is None else -log_rho)
    want = vote(top.values, classes[top.indices], s)
    assert torch.equal(labels, want[0])
    if smp.device.type == "cpu":  # (CUDA's scatter_add_ sums in no fixed order)
        assert torch.equal(conf, want[1].to(conf.dtype))


@pytest.mark.parametrize("ks", [(10, 20, 100, 200), (3, 1, 7), (5,)])
def test_several_k_in_one_call_equal_each_call(ks):
    """``k=(10, 20, 100, 200)``: one selection of the largest K, one vote per K, each exactly the
    call with that K alone (the selection is sorted with the op's tie rule, so its first K are the
    top K)."""
    queries, labeled, classes, log_rho = _inputs(40, 250, 16, 6)
    got = llp_fast.propagate(queries, labeled, classes, log_rho, k=ks, num_classes=6)
    assert isinstance(got, list) and len(got) == len(ks)
    for k, (labels, conf) in zip(ks, got):
        want = llp_fast.propagate(queries, labeled, classes, log_rho, k=k, num_classes=6)
        assert torch.equal(labels, want[0]) and torch.equal(conf, want[1])
    # NumPy in, NumPy out, pair by pair.
    as_np = llp_fast.propagate(queries.numpy(), labeled.numpy(), classes.numpy(), log_rho.numpy(), k=ks, num_classes=6)
    assert isinstance(as_np[0][0], np.ndarray) and np.array_equal(as_np[0][0], got[0][0].numpy())
    with pytest.raises(ValueError, match="exceeds"):
        llp_fast.propagate(queries, labeled, classes, log_rho, k=(10, 251), num_classes=6)
    with pytest.raises(ValueError, match="at least one"):
        llp_fast.propagate(queries, labeled, classes, log_rho, k=(), num_classes=6)


def test_float64_inputs_give_float64_confidence():
    queries, labeled, classes, log_rho = _inputs(9, 12, 6, 3)
    queries, labeled = queries.double(), labeled.double()
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
    queries, labeled, classes, _ = _inputs(50, 40, 8, 5)
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
    queries, labeled, classes, log_rho = _inputs(21, 30, 9, 4)
    a = propagate_ref(queries, labeled, classes, log_rho, 5, 0.1, 4)
    b = torch.ops.llp_fast.propagate(queries, labeled, classes, log_rho, 5, 0.1, 4)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1].float(), b[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# kernels/propagate.py against the reference (under TRITON_INTERPRET=1 on CPU).


def make_inputs(q, m, d, num_classes, dtype, *, seed=0, density=True, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    queries = unit_rows(q, d, dtype, device, gen=g)
    labeled = unit_rows(m, d, dtype, device, gen=g)
    classes = torch.randint(0, num_classes, (m,), generator=g).to(device)
    log_rho = (torch.rand(m, generator=g, dtype=torch.float64) * 2 + 5).float().to(device) if density else None
    return queries, labeled, classes, log_rho


def triton_propagate(queries, labeled, classes, log_rho, k, num_classes, **launch):
    """What the op runs on CUDA: ``topk_scores``' Triton kernel with ``bias = -log_rho``, then the
    vote (here on the interpreter's CPU tensors)."""
    bias = None if log_rho is None else -log_rho
    values, indices = kernels.topk_scores_triton(queries, labeled, k, TAU, bias, None, None, None, 0, **launch)
    return vote(values, classes[indices], num_classes)


def check_against_reference(queries, labeled, classes, log_rho, k, num_classes, **launch):
    labels, conf = triton_propagate(queries, labeled, classes, log_rho, k, num_classes, **launch)
    ref_labels, ref_conf = propagate_ref(queries, labeled, classes, log_rho, k, TAU, num_classes)
    assert labels.dtype == torch.int64 and conf.dtype == torch.float32
    assert labels.shape == conf.shape == (queries.shape[0],)
    clear = clear_rows(queries, labeled, classes, log_rho, k, TAU, num_classes)
    assert clear.float().mean() > 0.5, "test inputs are mostly near-ties: pick another seed"
    assert torch.equal(labels[clear], ref_labels[clear])
    torch.testing.assert_close(conf[clear], ref_conf[clear].float(), rtol=0, atol=5e-5)
    assert bool(((conf > 0) & (conf <= 1 + 1e-6)).all())


class TestTriton:
    pytestmark = triton_tests

    @pytest.mark.parametrize(
        "q,m,d,k,splits,dtype",
        [
            (1, 20, 7, 20, None, torch.float32),  # one query, K = M
            (37, 61, 33, 5, None, torch.bfloat16),  # nothing a multiple of the block
            (40, 70, 40, 10, 3, torch.float32),  # the split-and-merge path (few queries, many keys)
            (17, 50, 16, 1, None, torch.bfloat16),  # K = 1
            (2, 260, 8, 200, None, torch.float32),  # K = 200: the two-level selection
        ],
    )
    def test_propagate_matches_reference(self, dtype, q, m, d, k, splits):
        inputs = make_inputs(q, m, d, 4, dtype, seed=q * 1000 + m)
        check_against_reference(*inputs, k, 4, splits=splits)

    def test_propagate_gpu_tile_shape_without_density_float16(self):
        """The GPU heuristic's 128 x 64 tiles (the other tests use 16 x 16 under the interpreter)."""
        inputs = make_inputs(37, 150, 40, 5, torch.float16, seed=21, density=False)
        check_against_reference(*inputs, 10, 5, block_m=128, block_n=64)

    def test_propagate_k64_many_classes(self):
        """The largest one-level buffer (K = 64), and 1000 classes."""
        inputs = make_inputs(20, 70, 20, 1000, torch.float32, seed=3)
        check_against_reference(*inputs, 64, 1000)

    def test_propagate_exact_score_ties_pick_lowest_class(self):
        """Two labeled copies of the query in different classes: equal votes, class 0 wins."""
        d = 16
        queries = unit_rows(3, d)
        labeled = torch.cat([queries[:1], queries[:1], -queries[:1]]).contiguous()
        classes = torch.tensor([2, 0, 1], device=DEVICE)
        labels, conf = triton_propagate(queries[:1], labeled, classes, None, 2, 3)
        assert labels.tolist() == [0]
        torch.testing.assert_close(conf, torch.full_like(conf, 0.5))

    @cuda_only
    @pytest.mark.parametrize("q,m,k", [(4096, 60_000, 10), (256, 200_000, 10), (1024, 60_000, 200)])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_propagate_cuda_realistic(self, dtype, q, m, k):
        num_classes = 100
        queries, labeled, classes, log_rho = make_inputs(q, m, 128, num_classes, dtype, seed=11, device="cuda")
        labels, conf = llp_fast.propagate(queries, labeled, classes, log_rho, k=k, tau=TAU, num_classes=num_classes)
        ref_labels, ref_conf = propagate_ref(queries, labeled, classes, log_rho, k, TAU, num_classes)
        clear = clear_rows(queries, labeled, classes, log_rho, k, TAU, num_classes)
        # K = 200 neighbours from 100 classes: many rows' two best classes are near-ties
        assert clear.float().mean() > (0.8 if k <= 10 else 0.4)
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
    # (few classes sum in a class table, this many in a sorted (rows, k) one: rounding may differ)
    torch.testing.assert_close(got_c, want_c, rtol=1e-6, atol=0)


@pytest.mark.parametrize("num_classes,k", [(3, 7), (50, 4), (1000, 12)])  # the class table and the sorted one
def test_vote_reads_classes_from_a_table_as_it_votes(num_classes, k):
    """``vote(values, positions, C, table=t)`` is ``vote(values, t[positions], C)`` bit for bit,
    padding (-inf scores at position -1) included; the same for ``class_shares``."""
    g = torch.Generator().manual_seed(num_classes)
    r, m = 301, 40
    values = torch.randn(r, k, generator=g).sort(dim=1, descending=True).values
    positions = torch.randint(0, m, (r, k), generator=g)
    values[::5, -2:], positions[::5, -2:] = float("-inf"), -1  # rows with fewer than K keys
    table = torch.randint(0, num_classes, (m,), generator=g)
    got = vote(values, positions, num_classes, table=table)
    want = vote(values, table[positions.clamp_min(0)], num_classes)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    from llp_fast._topk import class_shares

    got = class_shares(values, positions, num_classes, 3, table=table)
    want = class_shares(values, table[positions.clamp_min(0)], num_classes, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("num_classes,k", [(3, 7), (50, 4), (1000, 12)])
def test_vote_chunks_with_and_without_padding(num_classes, k, monkeypatch):
    """The PyTorch body's chunks of a few rows (the CPU's chunk size patched small), padding in only
    some of them: a chunk without -inf skips the clamp of its positions, one with it clamps; both
    equal the vote over classes looked up beforehand, bit for bit."""
    from llp_fast import _topk

    width = max(num_classes if _topk._dense(k, num_classes) else k, k)  # a chunk's table width
    monkeypatch.setitem(_topk._TABLE, "cpu", 8 * width)  # 8 rows a chunk
    g = torch.Generator().manual_seed(k)
    r, m = 97, 30
    values = torch.randn(r, k, generator=g).sort(dim=1, descending=True).values
    positions = torch.randint(0, m, (r, k), generator=g)
    values[40:44, -1:], positions[40:44, -1:] = float("-inf"), -1  # padding in one chunk only
    values[96, 1:], positions[96, 1:] = float("-inf"), -1
    table = torch.randint(0, num_classes, (m,), generator=g)
    got = _topk.vote_torch(values, positions, num_classes, table=table)
    want = _topk.vote_torch(values, table[positions.clamp_min(0)], num_classes)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_vote_of_no_neighbours_reads_no_table():
    """K = 0 with a table (no column to look for padding in): label 0 and a NaN confidence (no
    vote at all), as without a table, and no error."""
    values, positions = torch.empty(3, 0), torch.empty(3, 0, dtype=torch.long)
    got = vote(values, positions, 4, table=torch.tensor([2, 1, 3]))
    want = vote(values, positions, 4)
    assert torch.equal(got[0], torch.zeros(3, dtype=torch.long)) and torch.equal(got[0], want[0])
    assert bool(torch.isnan(got[1]).all()) and bool(torch.isnan(want[1]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("table_dtype", [None, torch.int64, torch.int32, torch.int16, torch.float32])
@pytest.mark.parametrize("num_classes,k", [(10, 40), (3, 1), (200, 35), (7, 0)])
def test_vote_kernel_equals_the_pytorch_body(num_classes, k, table_dtype, dtype):
    """On CPU with few classes ``vote`` runs the op ``llp_fast::vote`` (the extension's kernel where
    it is built): bit for bit ``vote_torch``, over several of the kernel's chunks of rows, with
    padding, a row without any neighbour, the selection's columns sliced (strided), class ids given
    directly or read from a table of any integer dtype (or floats, read as int64)."""
    from llp_fast import _topk

    assert _topk._dense(k, num_classes)
    g = torch.Generator().manual_seed(k + num_classes)
    r, m = 7001 if k == 40 else 301, 60
    values = torch.randn(r, k + 5, generator=g, dtype=dtype).sort(dim=1, descending=True).values[:, :k]
    values[::7, max(k - 3, 0) :] = float("-inf")
    if k:
        values[5] = float("-inf")
    if table_dtype is None:
        table, classes = None, torch.randint(0, num_classes, (r, k + 5), generator=g)[:, :k]
    else:
        table = torch.randint(0, num_classes, (m,), generator=g).to(table_dtype)
        classes = torch.randint(0, m, (r, k + 5), generator=g)[:, :k].masked_fill(values == float("-inf"), -1)
    _topk.vote_torch(values, classes, num_classes, table=table)  # ATen's first exp in a process may
    vote(values, classes, num_classes, table=table)  # split its threads otherwise: both warmed up
    got = vote(values, classes, num_classes, table=table)
    want = _topk.vote_torch(values, classes, num_classes, table=table)
    assert torch.equal(got[0], want[0]) and got[1].dtype == want[1].dtype == dtype
    assert torch.equal(got[1].nan_to_num(-1.0), want[1].nan_to_num(-1.0))


@pytest.mark.parametrize("name", sample_ids("vote"))
def test_vote_op_equals_the_pytorch_body_on_every_sample(name):
    """The op ``llp_fast::vote`` (the extension's kernel on CPU where it is built) on every sample of
    tests/samples.py, every dtype: bit for bit ``vote_torch``."""
    from llp_fast import _topk

    values, classes, table, c = sample("vote", name).args
    _topk.vote_torch(values, classes, c, table=table)  # both warmed up (ATen's first exp, above)
    torch.ops.llp_fast.vote.default(values, classes, table, c)
    got = torch.ops.llp_fast.vote.default(values, classes, table, c)
    want = _topk.vote_torch(values, classes, c, table=table)
    assert torch.equal(got[0], want[0]) and got[1].dtype == want[1].dtype
    assert torch.equal(got[1].nan_to_num(-1.0), want[1].nan_to_num(-1.0))


def test_vote_keeps_its_gradient():
    """Values that need a gradient are voted on by the PyTorch body (the op has no backward): the
    confidence is differentiable, as before the op existed."""
    values = torch.randn(5, 4, dtype=torch.float64).sort(dim=1, descending=True).values.requires_grad_()
    classes = torch.randint(0, 3, (5, 4))
    _, conf = vote(values, classes, 3)
    conf.sum().backward()
    assert values.grad is not None and bool(torch.isfinite(values.grad).all())
    with torch.no_grad():
        assert torch.equal(vote(values, classes, 3)[1], conf.detach())


def test_vote_kernel_rejects_positions_past_the_table_and_bad_class_ids():
    values = torch.tensor([[0.5, 0.25]])
    with pytest.raises(IndexError, match="outside the class table|out of range"):
        vote(values, torch.tensor([[0, 9]]), 3, table=torch.tensor([0, 1, 2]))
    with pytest.raises(IndexError, match="outside the class table|out of range"):  # -1 is padding only
        vote(values, torch.tensor([[0, -1]]), 3, table=torch.tensor([0, 1, 2]))  # beside an -inf score
    with pytest.raises((RuntimeError, IndexError), match="not in \\[0, 3\\)|out of bounds|index"):
        vote(values, torch.tensor([[0, 1]]), 3, table=torch.tensor([0, 5]))
    with pytest.raises((RuntimeError, IndexError), match="not in \\[0, 3\\)|out of bounds|index"):
        vote(values, torch.tensor([[0, -2]]), 3)


@pytest.mark.parametrize("num_classes,k", [(3, 7), (1000, 12)])  # the class table and the sorted one
def test_vote_in_chunks_of_rows_is_the_vote_at_once(num_classes, k, monkeypatch):
    """The vote and the class shares taken a few rows at a time (the CPU's chunk of rows shrunk to
    a handful) give exactly what one chunk of every row gives."""
    from llp_fast import _topk

    g = torch.Generator().manual_seed(k)
    r = 97
    values = torch.randn(r, k, generator=g).sort(dim=1, descending=True).values
    classes = torch.randint(0, num_classes, (r, k), generator=g)
    whole = _topk.vote_torch(values, classes, num_classes), _topk.class_shares(values, classes, num_classes, 3)
    monkeypatch.setattr(_topk, "_TABLE", {"cpu": 5 * max(num_classes, k)})
    chunked = _topk.vote_torch(values, classes, num_classes), _topk.class_shares(values, classes, num_classes, 3)
    for a, b in zip(whole, chunked):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("ks", [7, (3, 40, 9)])
def test_blocks_of_query_rows_equal_one_selection(ks, monkeypatch):
    """On a CPU a large Q x K selection runs in blocks of query rows (each block's outputs memory the
    allocator reuses): shrunk to a few thousand entries, so that 5,000 queries run in 2,048-row
    blocks and a short last one, the labels and confidences equal those of one selection, for one K
    and for several."""
    import importlib

    module = importlib.import_module("llp_fast.ops.propagate")

    queries, labeled, classes, log_rho = _inputs(5000, 300, 12, 5)
    whole = llp_fast.propagate(queries, labeled, classes, log_rho, k=ks, num_classes=5)
    monkeypatch.setattr(module, "_CPU_ENTRIES", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert [(b.start, b.stop) for b in module._row_blocks(queries, 40)] == [(0, 2048), (2048, 4096), (4096, 6144)]
    blocks = llp_fast.propagate(queries, labeled, classes, log_rho, k=ks, num_classes=5)
    pairs = [(whole, blocks)] if isinstance(ks, int) else list(zip(whole, blocks))
    for (a_labels, a_conf), (b_labels, b_conf) in pairs:
        assert torch.equal(a_labels, b_labels) and torch.equal(a_conf, b_conf)
