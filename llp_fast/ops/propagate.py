"""``llp_fast.propagate``: density-weighted top-K label propagation (docs/method.md §1.2): the top-K
selection of ``topk_scores`` with ``bias = -log_rho``, finished by the vote of ``llp_fast._topk``.
Several K in one call select once, for the largest."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .. import _validate as check
from .._interop import accepts_arrays
from .._topk import vote
from ._common import out_float_dtype, via_topk_scores
from .topk_scores import topk_scores


def density_bias(log_rho: torch.Tensor | None) -> torch.Tensor | None:
    """``topk_scores``' bias (added to a score) for docs/method.md §1.2's density ``log_rho``
    (subtracted): ``-log_rho``. The one place where the sign turns."""
    return None if log_rho is None else -log_rho


def _select(queries, labeled, log_rho, k: int, tau: float):
    """The top-``k`` labeled points of each query by ``v . m_i / tau - log_rho_i``."""
    values, indices = torch.ops.llp_fast.topk_scores(
        queries, labeled, k, tau, density_bias(log_rho), None, None, None, 0
    )
    via_topk_scores("propagate", queries.device)
    return values, indices


# On a CPU, a selection of more than this many (query, neighbour) entries runs in blocks of query
# rows, each block selected and voted before the next: a block's (rows, K) values and indices (at
# most 12 MB + 24 MB, under glibc's 32 MB limit for reusing freed memory) then come back from the
# allocator, where one (Q, K) pair is fresh pages every call (Q = 20,000, K = 1000, one thread:
# about a tenth of the call, `bench/bench_propagate.py --shapes ksweep`). A block keeps at least
# 1024 rows a thread, so every thread still gets several 252-row tiles. A GPU's caching allocator
# reuses memory anyway: one selection there. (From about 8 threads at K = 1000 the 1024-row floor
# takes a block past 32 MB: fresh pages again, as one selection would have.)
_CPU_ENTRIES = 3 << 20


def _row_blocks(queries: torch.Tensor, k: int) -> list[slice]:
    q = queries.shape[0]
    if queries.device.type != "cpu" or q * k <= _CPU_ENTRIES:
        return [slice(0, q)]
    rows = max(-(-_CPU_ENTRIES // k), 1024 * torch.get_num_threads())
    return [slice(r, r + rows) for r in range(0, q, rows)]


def _propagate_default(
    queries: torch.Tensor,
    labeled: torch.Tensor,
    labeled_classes: torch.Tensor,
    log_rho: torch.Tensor | None,
    k: int,
    tau: float,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    (labels, conf), *_ = _several(queries, labeled, labeled_classes, log_rho, (k,), tau, num_classes)
    return labels, conf


# One body for every device: the selection dispatches to topk_scores' kernel for the device.
propagate_op = torch.library.custom_op("llp_fast::propagate", _propagate_default, mutates_args=())


@propagate_op.register_fake
def _(queries, labeled, labeled_classes, log_rho, k, tau, num_classes):
    q = queries.shape[0]
    return (
        queries.new_empty(q, dtype=torch.int64),
        queries.new_empty(q, dtype=out_float_dtype(queries, labeled)),
    )


def _several(queries, labeled, labeled_classes, log_rho, ks: tuple[int, ...], tau: float, num_classes: int):
    """One selection of the largest K; each K votes with the first K of it (the selection is sorted,
    so its first K are the top K, ties included, as a call with that K selects them)."""
    dtype = out_float_dtype(queries, labeled)
    blocks = _row_blocks(queries, max(ks))
    out = [[] for _ in ks]
    for rows in blocks:
        values, indices = _select(queries[rows], labeled, log_rho, max(ks), tau)
        for j, k in enumerate(ks):
            out[j].append(vote(values[:, :k], indices[:, :k], num_classes, table=labeled_classes))
        del values, indices  # freed before the next block's selection allocates its own
    if len(blocks) == 1:
        return [(labels, conf.to(dtype)) for ((labels, conf),) in out]
    return [(torch.cat([b[0] for b in per_k]), torch.cat([b[1] for b in per_k]).to(dtype)) for per_k in out]


def neighbours(queries, labeled, log_rho=None, *, k: int, tau: float = 0.07, init=None, index_offset: int = 0):
    """docs/method.md §1.2's N_K(v) on its own: the ``k`` labeled points with the largest
    ``v . m_i / tau - log_rho_i`` for each query, as ``topk_scores``' ``TopK(values, indices)``
    (values sorted descending, equal values by the lower index, -inf / -1 padding past M), merged
    with an earlier call's ``init`` over other labeled points numbered from ``index_offset``. For
    callers that stream or shard the labeled points and finish with ``llp_fast._topk.vote``, as
    ``propagate`` does: the distributed banks and the embeddings engine. Torch tensors; inputs are
    not checked for NaN/Inf (the callers' rows are)."""
    bias = density_bias(log_rho)
    top = topk_scores(
        queries, labeled, k=k, tau=tau, bias=bias, init=init, index_offset=index_offset, check_finite=False
    )
    via_topk_scores("propagate", queries.device)
    return top


@accepts_arrays("queries", "labeled", "labeled_classes", "log_rho")
def propagate(
    queries,
    labeled,
    labeled_classes,
    log_rho=None,
    *,
    k: int | Sequence[int] = 10,
    tau: float = 0.07,
    num_classes: int,
    check_finite: bool = True,
):
    """Pseudo-labels for ``queries`` by a density-weighted vote of their K nearest labeled
    points (docs/method.md §1.2).

    Args:
        queries: (Q, D) embeddings to label (float32, bfloat16, float16 or float64).
        labeled: (M, D) labeled embeddings (the labeled rows of the bank), same dtype/device.
        labeled_classes: (M,) integer class ids in [0, num_classes).
        log_rho: (M,) log local densities from :func:`local_density`, or None for no
            density weighting (the paper's NoDW ablation: plain weighted kNN).
        k: neighbours, 1 <= k <= M; or several, ``k=(10, 20, 100, 200)``: one selection of the
            largest, and one vote per K (a weighted-kNN sweep in one pass).
        tau: temperature > 0.
        num_classes: number of classes S.
        check_finite: reject NaN/Inf embeddings, and embeddings so large that the scores
            would overflow (one extra read of the inputs).

    Returns:
        labels (Q,) int64 (ties to the lowest class id) and confidence (Q,) float32
        (float64 for float64 inputs). NumPy in, NumPy out; CuPy in, CuPy out. With several
        ``k``: a list of such (labels, confidence) pairs, one per K in the order given, each
        equal to the call with that K alone.

    Neighbours are ranked by ``v . m_i / tau - log_rho_i`` (``topk_scores`` with
    ``bias=-log_rho``), not raw similarity. Memory is O(Q * K) beyond a bounded score tile:
    the Q x M score matrix is never stored.
    """
    check.embeddings(queries, "queries")
    check.embeddings(labeled, "labeled", allow_empty=False)
    check.same_space(labeled, "labeled", queries, "queries")
    m = labeled.shape[0]
    num_classes = check.positive_int(num_classes, "num_classes")
    several = isinstance(k, Sequence) and not isinstance(k, (str, bytes, bytearray))
    if several:
        if len(k) == 0:
            raise ValueError("k must hold at least one number of neighbours")
        ks = tuple(check.positive_int(x, "k", high=m, high_what="the number of labeled points M") for x in k)
    elif isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int or a sequence of ints (a tuple or a list), got {type(k).__name__}")
    else:
        k = check.positive_int(k, "k", high=m, high_what="the number of labeled points M")
    tau = check.temperature(tau)
    check.vector(labeled_classes, "labeled_classes", m, device=labeled.device, kind="int")
    check.in_range(labeled_classes, "labeled_classes", 0, num_classes, "class ids must lie in [0, num_classes)")
    if log_rho is not None:
        check.vector(log_rho, "log_rho", m, device=labeled.device, kind="float")
    big_rho = check.finite(log_rho, "log_rho") if log_rho is not None else 0.0
    sizes = (check.finite(queries, "queries"), check.finite(labeled, "labeled")) if check_finite else (1.0, 1.0)
    check.scores_fit(tau, queries, "queries", labeled, "labeled", *sizes, log_rho=big_rho)
    if log_rho is not None:
        log_rho = log_rho.detach()  # no autograd formula: outputs never require grad
    if several:
        return _several(queries.detach(), labeled.detach(), labeled_classes, log_rho, ks, tau, num_classes)
    return propagate_op(queries.detach(), labeled.detach(), labeled_classes, log_rho, k, tau, num_classes)
