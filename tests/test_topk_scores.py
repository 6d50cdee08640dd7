"""llp_fast.topk_scores: the public op and its reference against the float64 brute force,
chunked calls merged with ``init`` against one call, the identities with local_density and
propagate, the C++ extension's kernel (``TestExtension``) and the Triton kernel
(``TestTriton``, under TRITON_INTERPRET=1 on CPU) against the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _ext_setup import cpu_tile  # noqa: F401 (a fixture)
from _triton_setup import DEVICE, kernels, triton_tests, unit_rows
from brute import topk_biased
from conftest import unit
from samples import sample, sample_ids

import llp_fast
from llp_fast._topk import log_sum_exp, vote
from llp_fast.reference import local_density_ref, topk_scores_ref

# Native kernels run on odd shapes here: a crash fails this module's tests, not the whole run.
pytestmark = pytest.mark.isolated

TAU = 0.07
OP = torch.ops.llp_fast.topk_scores.default


def _inputs(q, n, d, *, seed=0):
    """Queries, keys, a bias and a mask for the tests of chunking and identities (the odd shapes and
    dtypes are tests/samples.py's)."""
    g = torch.Generator().manual_seed(seed)
    return unit(q, d), unit(n, d), torch.rand(n, generator=g) * 2 - 1, torch.rand(n, generator=g) < 0.6


def _ext_loaded() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("llp_fast::topk_scores", "CPU")


def _topk(impl, queries, keys, k, bias, mask, **kw):
    if impl == "op":
        return llp_fast.topk_scores(queries, keys, k=k, tau=TAU, bias=bias, key_mask=mask, **kw)
    init = kw.get("init") or (None, None)
    return topk_scores_ref(queries, keys, k, TAU, bias, mask, *init, kw.get("index_offset", 0))


def _check_against_brute(values, indices, queries, keys, k, bias, mask, *, atol):
    """Values against the brute force; each index holds the score reported for it (the set
    may differ from the brute force's only where float32 rounding reorders near-ties)."""
    want_v, want_i = topk_biased(queries, keys, k, TAU, bias, None if mask is None else mask.tolist())
    assert values.shape == indices.shape == (queries.shape[0], k) and indices.dtype == torch.int64
    np.testing.assert_allclose(values.double().numpy(), want_v, rtol=1e-5, atol=atol)
    pad = want_i < 0
    np.testing.assert_array_equal(indices.numpy()[pad], -1)
    real = torch.from_numpy(~pad)
    q64, k64 = queries.double(), keys.double()
    idx = indices.clamp_min(0)
    rescored = (q64[:, None, :] * k64[idx]).sum(-1) / TAU + (bias.double()[idx] if bias is not None else 0)
    np.testing.assert_allclose(values.double()[real].numpy(), rescored[real].numpy(), rtol=1e-5, atol=atol)
    distinct = (indices[:, :, None] != indices[:, None, :]) | torch.eye(k, dtype=torch.bool) | ~real[:, :, None]
    assert bool(distinct.all())  # no key twice
    assert bool((values[:, :-1] >= values[:, 1:]).all())  # sorted descending


@pytest.mark.parametrize("name", sample_ids("topk_scores", device="cpu"))
def test_reference_matches_brute_force(name):
    """The reference, on every sample (tests/samples.py), against the float64 brute force over the
    keys and the earlier call's candidates."""
    queries, keys, k, tau, bias, mask, init_v, init_i, offset = sample("topk_scores", name, device="cpu").args
    values, indices = topk_scores_ref(queries, keys, k, tau, bias, mask, init_v, init_i, offset)
    assert values.dtype == (torch.float64 if queries.dtype == torch.float64 else torch.float32)
    want_v, _ = topk_biased(queries, keys, k, tau, bias, None if mask is None else mask.tolist())
    if init_v is not None:  # the earlier call's candidates join the brute force's
        both = np.concatenate([init_v.double().numpy(), want_v], axis=1)
        want_v = -np.sort(-both, axis=1)[:, :k]
    atol = 1e-9 if queries.dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(values.double().numpy(), want_v, rtol=1e-5, atol=atol)
    assert torch.equal(indices < 0, values == -float("inf"))


@pytest.mark.usefixtures("cpu_tile")
@pytest.mark.parametrize("name", sample_ids("topk_scores"))
def test_op_matches_reference(name):
    """The op as dispatched (the extension's kernel on the CPU when it is built, Triton on CUDA) on
    every sample: the reference's values, the same indices wherever no near-tie can reorder them,
    each index holding the score reported for it, no key twice."""
    s = sample("topk_scores", name)
    queries, keys, k, tau, bias, mask = s.args[:6]
    values, indices = OP(*s.args)
    ref_v, ref_i = topk_scores_ref(*s.args)
    assert values.dtype == ref_v.dtype and indices.dtype == torch.int64 and values.shape == (queries.shape[0], k)
    atol = 1e-12 if queries.dtype == torch.float64 else 1e-4 if s.device.type == "cuda" else 1e-5
    torch.testing.assert_close(values, ref_v, rtol=0, atol=atol)
    assert torch.equal(indices < 0, ref_i < 0)
    gaps = (ref_v[:, 1:] - ref_v[:, :-1]).abs()
    clear = torch.ones_like(ref_i, dtype=torch.bool)
    clear[:, 1:] &= gaps > 1e-4
    clear[:, :-1] &= gaps > 1e-4
    assert torch.equal(indices[clear], ref_i[clear])
    real = indices >= 0
    eye = torch.eye(k, dtype=torch.bool, device=indices.device)
    distinct = (indices[:, :, None] != indices[:, None, :]) | eye | ~real[:, :, None]
    assert bool(distinct.all())


def test_float64_in_float64_out():
    queries, keys, b, m = _inputs(6, 20, 5)
    queries, keys = queries.double(), keys.double()
    values, indices = llp_fast.topk_scores(queries, keys, k=4, bias=b.double(), key_mask=m)
    assert values.dtype == torch.float64
    want_v, want_i = topk_biased(queries, keys, 4, TAU, b, m.tolist())
    np.testing.assert_allclose(values.numpy(), want_v, rtol=1e-12)
    np.testing.assert_array_equal(indices.numpy(), want_i)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize(
    "q,n,d,k", [(1, 300, 16, 10), (37, 1030, 128, 25), (200, 257, 17, 64), (9, 40, 8, 50), (5, 1100, 8, 1000)]
)
def test_chunked_calls_with_init_equal_one_call(impl, q, n, d, k):
    """Calls over chunks of the keys, each merging the previous result (init) and numbering
    its keys globally (index_offset), give the one call over all keys: on the CPU exactly
    (values, and so the votes; indices too where the extension serves, whose scores do not
    depend on the chunking)."""
    queries, keys, bias, mask = _inputs(q, n, d, seed=n)
    whole_v, whole_i = _topk(impl, queries, keys, k, bias, mask)
    cuts = sorted(set(torch.randint(1, n, (5,)).tolist())) + [n]
    init, start = None, 0
    for stop in [0, *cuts]:  # a leading empty chunk too
        init = _topk(impl, queries, keys[start:stop], k, bias[start:stop], mask[start:stop], init=init,
                     index_offset=start)  # fmt: skip
        start = stop
    values, indices = init
    if impl == "op" and _ext_loaded():
        assert torch.equal(values, whole_v) and torch.equal(indices, whole_i)
    else:
        torch.testing.assert_close(values, whole_v, rtol=1e-6, atol=1e-5)
    classes = torch.randint(0, 4, (n,))
    real = whole_i >= 0
    if bool(real.all()):
        assert torch.equal(vote(values, classes[indices], 4)[0], vote(whole_v, classes[whole_i], 4)[0])


def test_ties_go_to_the_lower_index():
    # Keys 1, 3 and 4 are one vector (equal scores); k = 2 keeps 1 and 3, in that order.
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0]])
    values, indices = llp_fast.topk_scores(q, keys, k=2)
    assert indices.tolist() == [[1, 3]] and values[0, 0] == values[0, 1]
    ref_v, ref_i = topk_scores_ref(q, keys, 2, TAU)
    assert ref_i.tolist() == [[1, 3]]
    # Across calls: the earlier call's key 7 and this call's key 1 tie: 1 first.
    values, indices = llp_fast.topk_scores(
        q, keys[:2], k=2, init=(torch.tensor([[1 / TAU, -5.0]]), torch.tensor([[7, 8]]))
    )
    assert indices.tolist() == [[1, 7]]
    # A tie at the k-th place of the earlier call: this call's key 0 (index 0) beats its key 9.
    init = (torch.tensor([[30.0, 1 / TAU]]), torch.tensor([[5, 9]]))
    for impl in ("op", "reference"):
        assert _topk(impl, q, keys[1:2], 2, None, None, init=init)[1].tolist() == [[5, 0]]


def test_padding_and_empty_keys():
    queries, keys, _, _ = _inputs(3, 4, 6)
    mask = torch.tensor([False, True, False, False])
    values, indices = llp_fast.topk_scores(queries, keys, k=3, key_mask=mask)
    assert indices[:, 0].tolist() == [1, 1, 1] and bool((indices[:, 1:] == -1).all())
    assert bool(torch.isinf(values[:, 1:]).all()) and bool(torch.isfinite(values[:, 0]).all())
    # No keys at all: padding, or the init unchanged.
    empty = keys[:0]
    values, indices = llp_fast.topk_scores(queries, empty, k=2)
    assert bool((indices == -1).all()) and bool((values == -float("inf")).all())
    init = llp_fast.topk_scores(queries, keys, k=2)
    again = llp_fast.topk_scores(queries, empty, k=2, init=init, index_offset=4)
    assert torch.equal(again[0], init[0]) and torch.equal(again[1], init[1])
    # No queries.
    values, indices = llp_fast.topk_scores(queries[:0], keys, k=2)
    assert values.shape == indices.shape == (0, 2)


def test_numpy_in_numpy_out():
    queries, keys, bias, mask = _inputs(5, 12, 4)
    values, indices = llp_fast.topk_scores(queries.numpy(), keys.numpy(), k=3, bias=bias.numpy(), key_mask=mask.numpy())
    assert isinstance(values, np.ndarray) and isinstance(indices, np.ndarray)
    want_v, want_i = llp_fast.topk_scores(queries, keys, k=3, bias=bias, key_mask=mask)
    np.testing.assert_array_equal(values, want_v.numpy())
    np.testing.assert_array_equal(indices, want_i.numpy())
    # init as NumPy arrays too.
    more = llp_fast.topk_scores(queries.numpy(), keys.numpy(), k=3, init=(values, indices), index_offset=12)
    assert isinstance(more[0], np.ndarray) and more[0].shape == (5, 3)


def test_local_density_is_the_logsumexp_of_topk_scores(tiles):
    labeled, bank, _, pool = _inputs(30, 200, 16)
    top = llp_fast.topk_scores(labeled, bank, k=25, key_mask=pool).values
    want = llp_fast.local_density(labeled, bank, t=25, pool_mask=pool)
    assert torch.equal(log_sum_exp(top), want)  # the op is this selection and this finisher
    torch.testing.assert_close(want, local_density_ref(labeled, bank, 25, TAU, pool).float(), rtol=1e-6, atol=1e-5)


def test_propagate_is_the_vote_over_topk_scores(tiles):
    queries, labeled, _, _ = _inputs(60, 80, 16)
    classes = torch.randint(0, 5, (80,))
    log_rho = torch.rand(80) * 2 + 5
    values, indices = llp_fast.topk_scores(queries, labeled, k=10, bias=-log_rho)
    labels, conf = vote(values, classes[indices], 5)
    want_labels, want_conf = llp_fast.propagate(queries, labeled, classes, log_rho, k=10, num_classes=5)
    assert torch.equal(labels, want_labels) and torch.equal(conf, want_conf)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(k=0), ValueError, "k must be >= 1"),
        (dict(k=2.5), TypeError, "k must be an int"),
        (dict(k=2, tau=0.0), ValueError, "tau"),
        (dict(k=2, bias=torch.zeros(3)), ValueError, "bias must have shape"),
        (dict(k=2, bias=torch.zeros(9, dtype=torch.long)), TypeError, "bias must have a floating dtype"),
        (dict(k=2, bias=torch.full((9,), float("nan"))), ValueError, "bias contains NaN"),
        (dict(k=2, key_mask=torch.ones(9)), TypeError, "key_mask must have torch.bool"),
        (dict(k=2, index_offset=-1), ValueError, "index_offset must be >= 0"),
        (dict(k=2, init=torch.zeros(4, 2)), TypeError, "init must be a"),
        (
            dict(k=2, init=(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long))),
            ValueError,
            r"init values must have shape \(4, 2\)",
        ),
        (dict(k=2, init=(torch.zeros(4, 2), torch.zeros(4, 2))), TypeError, "init indices has dtype"),
        (dict(k=2, init=(torch.zeros(4, 2), torch.full((4, 2), -1))), ValueError, "init indices must be >= 0, or -1"),
        (dict(k=2, init=(torch.full((4, 2), float("nan")), torch.zeros(4, 2, dtype=torch.long))), ValueError, "NaN"),
        # garbage that gave one key twice in the answer: a repeated index, an index of this call's
        # keys (an answer fed back over the same keys)
        (dict(k=2, init=(torch.tensor([[2.0, 1.0]] * 4), torch.tensor([[20, 20]] * 4))), ValueError, "repeat"),
        (dict(k=2, init=(torch.tensor([[2.0, 1.0]] * 4), torch.tensor([[3, 20]] * 4))), ValueError, "0 to 8"),
        (
            dict(k=2, index_offset=30, init=(torch.tensor([[2.0, 1.0]] * 4), torch.tensor([[38, 20]] * 4))),
            ValueError,
            "init holds indices of this call's keys",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    queries, keys, _, _ = _inputs(4, 9, 6)
    with pytest.raises(error, match=match):
        llp_fast.topk_scores(queries, keys, **kwargs)


def test_bad_embeddings_name_the_argument():
    queries, keys, _, _ = _inputs(4, 9, 6)
    with pytest.raises(ValueError, match="keys has D=5"):
        llp_fast.topk_scores(queries, keys[:, :5], k=2)
    with pytest.raises(TypeError, match="keys is torch.float64"):
        llp_fast.topk_scores(queries, keys.double(), k=2)
    bad = queries.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="queries contains NaN or Inf"):
        llp_fast.topk_scores(bad, keys, k=2)


# ---------------------------------------------------------------------------------------------
# kernels/topk_scores.py against the reference (under TRITON_INTERPRET=1 on CPU).


class TestTriton:
    pytestmark = triton_tests

    @pytest.mark.parametrize(
        "q,n,d,k,splits,dtype",
        [
            (1, 20, 7, 20, None, torch.float32),
            (37, 61, 33, 5, None, torch.bfloat16),
            (40, 70, 40, 10, 3, torch.float32),
            (17, 50, 16, 64, 2, torch.bfloat16),
            (5, 30, 8, 9, None, torch.float16),
            # K above the 64-slot buffer: the two-level selection (S >= 2K / 64 splits)
            (6, 330, 8, 100, None, torch.float32),
            (3, 420, 8, 200, None, torch.bfloat16),
            (1, 1030, 8, 1000, None, torch.float32),
        ],
    )
    def test_matches_reference(self, dtype, q, n, d, k, splits):
        g = torch.Generator().manual_seed(q * 100 + n)
        queries, keys = unit_rows(q, d, dtype, gen=g), unit_rows(n, d, dtype, gen=g)
        bias = (torch.rand(n, generator=g) * 2 - 1).to(DEVICE)
        mask = (torch.rand(n, generator=g) < 0.7).to(DEVICE)
        cut = n // 2
        init = topk_scores_ref(queries, keys[:cut], k, TAU, bias[:cut], mask[:cut])
        args = (queries, keys[cut:], k, TAU, bias[cut:], mask[cut:], *init, cut)
        values, indices = kernels.topk_scores_triton(*args, splits=splits)
        ref_v, _ = topk_scores_ref(*args)
        assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (q, k)
        torch.testing.assert_close(values, ref_v.float(), rtol=0, atol=1e-4)
        real = indices >= 0
        assert torch.equal(real, ref_v > -float("inf"))
        idx = indices.clamp_min(0)
        rescored = (queries.double()[:, None, :] * keys.double()[idx]).sum(-1) / TAU + bias.double()[idx]
        torch.testing.assert_close(values.double()[real], rescored[real], rtol=0, atol=1e-4)

    @pytest.mark.parametrize("splits", [1, 2])
    def test_ties_go_to_the_lower_index(self, splits):
        """Equal scores in different tiles and splits: the kernel's eviction and the merge of
        the splits keep the lower indices."""
        d = 16
        base = unit_rows(1, d)
        keys = unit_rows(60, d) * 0.1  # far below the query's own direction
        keys[[5, 17, 33, 44, 58]] = base  # five equal best scores
        _, indices = kernels.topk_scores_triton(base, keys, 3, TAU, None, None, None, None, 0, splits=splits)
        assert indices.tolist() == [[5, 17, 33]]
        # Two equal scores fill a K = 2 buffer; a better key evicts the higher index (17).
        keys[[33, 44, 58]] = 0.1 * base
        keys[[5, 17]], keys[40] = 0.9 * base, base
        _, indices = kernels.topk_scores_triton(base, keys, 2, TAU, None, None, None, None, 0, splits=splits)
        assert indices.tolist() == [[40, 5]]
        assert topk_scores_ref(base, keys, 2, TAU)[1].tolist() == [[40, 5]]

    def test_large_k_clustered_keys_fall_back_exactly(self):
        """More than 64 of a row's top K in one split (its near neighbours stored together, and
        forced into few splits): the row is detected and selected again, exactly."""
        q = unit_rows(2, 8)
        keys = unit_rows(200, 8)
        keys[32:160] = torch.nn.functional.normalize(q[0] + 0.05 * unit_rows(128, 8), dim=1)
        args = (q, keys, 100, TAU, None, None, None, None, 0)
        for splits in (2,):
            values, indices = kernels.topk_scores_triton(*args, splits=splits)
            ref_v, ref_i = topk_scores_ref(*args)
            torch.testing.assert_close(values, ref_v, rtol=0, atol=1e-4)
            assert torch.equal(indices[0].sort().values, ref_i[0].sort().values)

    def test_declines_what_it_does_not_cover(self):
        q, keys = unit_rows(4, 8), unit_rows(80, 8)
        args = (None, None, None, None, 0)
        assert kernels.topk_scores_triton(q, keys, 1025, TAU, *args) is NotImplemented
        assert kernels.topk_scores_triton_declines(q, keys, 1025, TAU, *args) == "k=1025 > 1024"
        assert kernels.topk_scores_triton(q.double(), keys.double(), 3, TAU, *args) is NotImplemented
        assert "float64" in kernels.topk_scores_triton_declines(q.double(), keys.double(), 3, TAU, *args)
        assert kernels.topk_scores_triton(q, keys[:0], 3, TAU, *args) is NotImplemented
        assert kernels.topk_scores_triton_declines(q, keys, 3, TAU, *args) is None


def test_init_indices_of_an_unsigned_dtype_are_read_as_their_values():
    """uint8 indices (no -1 padding fits them) are indices, not -1 wrapped to 255: before, every
    uint8 ``init`` was refused as "below -1"."""
    q, keys = unit(3, 5), unit(4, 5)
    init_v = torch.tensor([[50.0, 40.0, -100.0]] * 3)  # above every score but the last: two kept in front
    init_i = torch.tensor([[7, 9, 200]] * 3, dtype=torch.uint8)
    got = llp_fast.topk_scores(q, keys, k=3, init=(init_v, init_i), index_offset=10)
    assert got.indices[:, :2].tolist() == [[7, 9]] * 3 and bool((got.indices[:, 2] >= 10).all())


def test_index_offset_must_keep_every_global_index_in_int64():
    """The last key's global index is index_offset + N - 1: past int64 it used to wrap round to a
    negative index (and 2**63 itself was torch's RuntimeError)."""
    q, keys = unit(2, 4), unit(3, 4)
    got = llp_fast.topk_scores(q, keys, k=3, index_offset=2**63 - 3)
    assert sorted(got.indices[0].tolist()) == [2**63 - 3, 2**63 - 2, 2**63 - 1]
    for offset in (2**63 - 2, 2**63, 2**70):
        with pytest.raises(ValueError, match=r"index_offset=\d+ exceeds 2\*\*63 - max\(N, 1\)"):
            llp_fast.topk_scores(q, keys, k=3, index_offset=offset)


def test_k_far_above_the_keys_asks_the_kernels_for_the_keys_only(monkeypatch):
    """k = 10**6 over 10 keys: the kernels sized their per-row buffers by k (9.9 GB for Q = 300);
    now they are asked for N and the answer padded, equal to the k = N answer."""
    import importlib

    mod = importlib.import_module("llp_fast.ops.topk_scores")
    asked = []
    real = mod.topk_scores_op
    monkeypatch.setattr(mod, "topk_scores_op", lambda *a: asked.append(a[2]) or real(*a))
    q, keys = torch.randn(7, 5), torch.randn(10, 5)
    mask = torch.arange(10) % 3 != 0
    got = llp_fast.topk_scores(q, keys, k=1000, key_mask=mask)
    want = llp_fast.topk_scores(q, keys, k=10, key_mask=mask)
    assert asked == [10, 10] and got.values.shape == (7, 1000)
    assert torch.equal(got.values[:, :10], want.values) and torch.equal(got.indices[:, :10], want.indices)
    assert bool((got.values[:, 10:] == -math.inf).all()) and bool((got.indices[:, 10:] == -1).all())
    init = llp_fast.topk_scores(q, keys, k=1000)  # with an init the state keeps its width
    assert llp_fast.topk_scores(q, keys, k=1000, init=init, index_offset=10).values.shape == (7, 1000)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_the_kernels_run_on_the_gpu_of_their_tensors_not_the_current_one():
    """Triton launches on the current device: tensors on cuda:1 while cuda:0 is current (the
    labeller's --device cuda:1, its torchrun ranks >= 1) were read from the wrong GPU."""
    torch.manual_seed(0)
    q, keys = unit(300, 64), unit(2000, 64)
    want = llp_fast.topk_scores(q.double(), keys.double(), k=20)
    with torch.cuda.device(0):
        got = llp_fast.topk_scores(q.to("cuda:1"), keys.to("cuda:1"), k=20)
        classes = torch.arange(2000, device="cuda:1") % 7
        labels, _ = llp_fast.propagate(q.to("cuda:1"), keys.to("cuda:1"), classes, k=10, num_classes=7)
    assert got.values.device == torch.device("cuda:1")
    torch.testing.assert_close(got.values.cpu().double(), want.values, atol=1e-4, rtol=0)
    ref, _ = llp_fast.propagate(q, keys, torch.arange(2000) % 7, k=10, num_classes=7)
    assert (labels.cpu() == ref).float().mean() > 0.99
