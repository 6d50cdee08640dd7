"""The fused CPU top-K (csrc/cpu/topk_cpu.cpp) behind llp_fast::propagate and llp_fast::local_density,
against the reference (llp_fast.reference).

The kernel's scores come from at::mm on other tiles than the reference's, so a score can differ in
its last bits; where the k-th and (k+1)-th best scores of a row are that close, either neighbour is a
correct answer (so tests compare scores and votes, not indices). Such near-tied rows are found
from a float64 score matrix and left out of exact label comparisons (they are rare: the tests assert
that almost every row is compared). Small tiles (LLP_FAST_CPU_TILE) exercise tile edges at small
shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llp_fast
from llp_fast import _ext
from llp_fast.reference import local_density_ref, propagate_ref

PROPAGATE = torch.ops.llp_fast.propagate.default
DENSITY = torch.ops.llp_fast.local_density.default
TAU = 0.07


def require_ext(op: str):
    """Skip (with the reason) when the extension cannot be built or loaded here."""
    if _ext.disabled():
        pytest.skip("LLP_FAST_DISABLE_EXT=1")
    if _ext.load() is None:
        pytest.skip("the C++ extension could not be built or loaded (see the RuntimeWarning)")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"llp_fast::{op}", "CPU"):
        pytest.skip(f"the extension registers no CPU kernel for llp_fast::{op}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=[None, "8,16", "5,7"], ids=["default-tile", "tile-8x16", "tile-5x7"])
def tile(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setenv("LLP_FAST_CPU_TILE", request.param)
    return request.param


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


@pytest.mark.parametrize(
    "dtype,atol",
    [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5), (torch.float64, 1e-12)],
)
@pytest.mark.parametrize("density", [True, False], ids=["DW", "NoDW"])
def test_propagate_matches_reference(dtype, atol, density, tile):
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
def test_propagate_odd_shapes(q_rows, m_rows, d, k, tile):
    require_ext("propagate")
    q, m = _unit(q_rows, d, torch.float32), _unit(m_rows, d, torch.float32)
    cls = torch.randint(0, 5, (m_rows,))
    log_rho = torch.randn(m_rows) * 0.3
    _check_propagate(q, m, cls, log_rho, k, 5, atol=1e-5)


def test_propagate_non_contiguous_inputs():
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
def test_propagate_label_ties_go_to_lowest_class(classes):
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


def test_propagate_public_api_uses_kernel():
    require_ext("propagate")
    q, m = _unit(64, 16, torch.float32), _unit(40, 16, torch.float32)
    cls = torch.randint(0, 3, (40,))
    rho = llp_fast.local_density(m, torch.cat([m, q]), t=5)
    labels, conf = llp_fast.propagate(q, m, cls, rho, k=4, num_classes=3)
    ref = propagate_ref(q, m, cls, rho, 4, TAU, 3)
    clear = _clear_rows(q, m, 4, rho)
    assert torch.equal(labels[clear], ref[0][clear])


def _check_density(m, bank, t, mask, *, atol):
    out = DENSITY(m, bank, t, TAU, mask)
    ref = local_density_ref(m, bank, t, TAU, mask)
    expect_dtype = torch.float64 if m.dtype == torch.float64 else torch.float32
    assert out.dtype == expect_dtype and out.shape == (m.shape[0],)
    # A log-sum-exp of the t best barely moves when a near-tied neighbour is swapped: no filtering.
    torch.testing.assert_close(out, ref.to(expect_dtype), rtol=0, atol=atol)


@pytest.mark.parametrize(
    "dtype,atol",
    [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5), (torch.float64, 1e-12)],
)
@pytest.mark.parametrize("masked", [False, True], ids=["all", "pool_mask"])
def test_local_density_matches_reference(dtype, atol, masked, tile):
    require_ext("local_density")
    m, bank = _unit(120, 17, dtype), _unit(333, 17, dtype)
    mask = torch.rand(333) < 0.6 if masked else None
    _check_density(m, bank, 25, mask, atol=atol)


@pytest.mark.parametrize(
    "m_rows,n_rows,d,t",
    [(1, 40, 17, 25), (9, 25, 17, 25), (1, 1, 3, 1), (30, 1030, 128, 25), (10, 500, 8, 300)],
    ids=["M=1", "T=N", "M=N=T=1", "N-not-tile-multiple", "large-T"],
)
def test_local_density_odd_shapes(m_rows, n_rows, d, t, tile):
    require_ext("local_density")
    _check_density(_unit(m_rows, d, torch.float32), _unit(n_rows, d, torch.float32), t, None, atol=2e-5)


def test_local_density_pool_exactly_t():
    require_ext("local_density")
    m, bank = _unit(10, 17, torch.float32), _unit(60, 17, torch.float32)
    mask = torch.zeros(60, dtype=torch.bool)
    mask[torch.randperm(60)[:25]] = True  # the pool has exactly t rows: every one is a neighbour
    _check_density(m, bank, 25, mask, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_propagate(dtype):
    require_ext("propagate")
    q, m = _unit(20, 16, dtype), _unit(30, 16, dtype)
    cls = torch.randint(0, 3, (30,))
    for log_rho in (None, torch.randn(30, dtype=dtype)):
        torch.library.opcheck(PROPAGATE, (q, m, cls, log_rho, 4, TAU, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_local_density(dtype):
    require_ext("local_density")
    m, bank = _unit(20, 16, dtype), _unit(50, 16, dtype)
    for mask in (None, torch.rand(50) < 0.7):
        torch.library.opcheck(DENSITY, (m, bank, 5, TAU, mask))


def test_compiled_fullgraph():
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
