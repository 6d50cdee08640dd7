"""The spreading margin of suspect labels (docs/embeddings.md, "Suspect labels"; :mod:`.suspects`
adds it to the label gap): the given labels spread over a k-nearest-neighbour graph of a run's final
voters as in label spreading, each labeled row's own seed left out exactly.

- :func:`voter_margins` — the margins of a run's labeled rows over its voters' graph
  (:func:`graph_nodes`: which rows it reads);
- :func:`voter_graph` — the symmetric normalised cosine k-NN graph (``topk_scores``, sparse CSR),
  and each row's similarity to its nearest other row (the score's scale, :mod:`.suspects`);
- :func:`spread_margins` — ``(I - alpha S)^-1`` column by column (conjugate gradients), the other
  labeled rows' mass per class, the margin.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from ..ops import topk_scores

SPREAD_K = 10  # the spreading graph's neighbours per row
SPREAD_TAU = 0.1  # its temperature: edge weight exp(x_i . x_j / 0.1)
SPREAD_ALPHA = 0.8  # label spreading's alpha: how far labels travel (chosen on digits/MNIST-5k, docs)
# A row the other seeds hardly reach (the largest class mass at it, its own class's included, below
# the median row's over REACH_CUT) gets margin 0: both masses are then tiny and their ratio noise
# (docs/embeddings.md, "Suspect labels": 1/10 to 1/100 did the same on digits' splits).
REACH_CUT = 30.0
SOLVE_ENTRIES = 1 << 22  # entries of one (V, b) block of the solve (five such arrays live)
SOLVE_DTYPE = torch.float32


class Spread(NamedTuple):
    """Per labeled row: ``margin`` (M,) float64, the spreading margin; ``nearest`` (M,) float64,
    the cosine similarity of the row to its nearest other node of the graph (NaN where the graph was
    not built: fewer than two labeled rows, or fewer than two classes)."""

    margin: np.ndarray
    nearest: np.ndarray


def voter_margins(
    x_nodes: torch.Tensor,
    nodes: np.ndarray,
    labeled: np.ndarray,
    y: np.ndarray,
    voter_rows: np.ndarray,
    voter_classes: np.ndarray,
    num_classes: int,
    *,
    chunk: int = 65536,
    progress=None,
) -> Spread:
    """:func:`spread_margins` of the labeled rows ``labeled`` (sorted, class indices ``y``) over the
    graph of a run's final voters (``voter_rows``, ``voter_classes``; the labeled rows among them).
    ``nodes`` is the sorted union of the voters and the labeled rows (:func:`graph_nodes`) and
    ``x_nodes`` their rows, read once by the caller (the label gap reads the same ones). The nodes
    are ordered by class, so that most of a node's neighbours lie near it in memory (the solve's
    products gather rows of a (V, b) block)."""
    node_class = np.full(len(nodes), -1, np.int64)
    node_class[np.searchsorted(nodes, voter_rows)] = voter_classes
    node_class[np.searchsorted(nodes, labeled)] = y
    order = np.lexsort((nodes, node_class))
    x = x_nodes[torch.from_numpy(order).to(x_nodes.device)]
    place = np.empty(len(nodes), np.int64)
    place[order] = np.arange(len(nodes))  # a node's place in the graph
    return spread_margins(x, place[np.searchsorted(nodes, labeled)], y, num_classes, chunk=chunk, progress=progress)


def graph_nodes(voter_rows: np.ndarray, labeled: np.ndarray) -> np.ndarray:
    """The rows of the voters' graph, sorted (``Rows.take`` wants sorted rows, e.g. across the files
    of a directory): the voters, and the labeled rows (voters too; the union guards)."""
    return np.union1d(voter_rows, labeled)


def voter_graph(x: torch.Tensor, k: int = SPREAD_K, tau: float = SPREAD_TAU, *, chunk: int = 65536, progress=None):
    """The symmetric normalised k-nearest-neighbour graph of the rows ``x`` (V, D) (docs/embeddings.md,
    "Suspect labels"): each row's k best other rows by cosine similarity ``s_ij`` (``topk_scores`` on
    the rows scaled to unit length, streamed ``chunk`` queries at a time), edge weight
    ``exp(s_ij / tau)`` (at least exp(-2 / tau): never 0 for tau >= 0.01), an edge kept when either
    end chose it (the larger weight), then ``S = D^-1/2 W D^-1/2`` with D the weights' row sums. Returns
    (S as a float64 sparse CSR tensor on ``x``'s device, (V,) float64 each row's largest ``s_ij``:
    its nearest other row, NaN for a single row). Cost: V^2 D multiply-adds, O(V k) memory."""
    v = x.shape[0]
    k = min(k, v - 1)
    if k <= 0:
        return _sparse(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), v, x.device), np.full(v, np.nan)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = torch.nn.functional.normalize(x, dim=1)
    vals, cols = [], []
    bar = progress.bar(v, "suspect labels: graph", unit="rows") if progress is not None else None
    for a in range(0, v, chunk):
        b = min(a + chunk, v)
        top_v, top_i = topk_scores(x[a:b], x, k=k + 1, tau=tau, check_finite=False)
        top_i = top_i.cpu().numpy()
        top_v = top_v.double().cpu().numpy()
        self_at = top_i == np.arange(a, b)[:, None]
        self_at[~self_at.any(1), -1] = True  # the row itself tied out of its list (duplicates): drop the last
        vals.append(top_v[~self_at].reshape(b - a, k))
        cols.append(top_i[~self_at].reshape(b - a, k))
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    nearest = np.concatenate([t[:, 0] for t in vals]) * tau  # the lists are sorted: first is nearest
    val = np.concatenate(vals).ravel()
    col = np.concatenate(cols).ravel()
    row = np.repeat(np.arange(v, dtype=np.int64), k)
    w = np.exp(val - 1.0 / tau)  # exp(s / tau) up to a common factor, which the normalisation cancels
    # both directions, one edge per pair with the larger weight
    r, c, w = np.concatenate([row, col]), np.concatenate([col, row]), np.concatenate([w, w])
    key = r * v + c
    order = np.lexsort((-w, key))
    first = np.ones(len(key), bool)
    first[1:] = key[order][1:] != key[order][:-1]
    keep = order[first]
    r, c, w = r[keep], c[keep], w[keep]  # sorted by (row, column)
    root = np.sqrt(np.bincount(r, weights=w, minlength=v))  # > 0: every row has k >= 1 edges
    return _sparse(r, c, w / root[r] / root[c], v, x.device), nearest


def _sparse(r: np.ndarray, c: np.ndarray, w: np.ndarray, v: int, device) -> torch.Tensor:
    """A (v, v) float64 sparse CSR tensor from entries sorted by (row, column), no duplicates (CSR:
    the solve's products gather the rows of its block in order, about twice as fast as COO)."""
    crow = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(r, minlength=v))]).astype(np.int64))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            crow, torch.from_numpy(c.astype(np.int64)), torch.from_numpy(w), (v, v), dtype=torch.float64,
            check_invariants=True,
        ).to(device)  # fmt: skip


def _spread_solve(graph, rhs: torch.Tensor, alpha: float, tol: float, max_iter: int = 1000) -> torch.Tensor:
    """``(I - alpha S)^-1 rhs`` for the columns of ``rhs`` (V, b), by conjugate gradients per column,
    until every column's residual is below ``tol`` times its start (``I - alpha S`` is symmetric
    positive definite for ``0 <= alpha < 1``: S's eigenvalues lie in [-1, 1], so its condition
    number is at most (1 + alpha) / (1 - alpha) and each step shrinks the error by about 2x at
    alpha = 0.8). The vectors are updated in place: each step reads the (V, b) block about 8 times."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    stop = tol * tol * rs
    one = torch.ones((), dtype=rhs.dtype, device=rhs.device)
    for _ in range(max_iter):
        if bool((rs <= stop).all()):
            break
        ap = graph @ p
        ap.mul_(-alpha).add_(p)
        pap = (p * ap).sum(0)
        step = torch.where(pap > 0, rs / torch.where(pap > 0, pap, one), 0 * one)
        x.addcmul_(p, step)
        r.addcmul_(ap, step, value=-1.0)
        rs_new = (r * r).sum(0)
        p.mul_(torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, one), 0 * one)).add_(r)
        rs = rs_new
    return x


def spread_margins(
    x: torch.Tensor,
    labeled_at: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    k: int = SPREAD_K,
    tau: float = SPREAD_TAU,
    alpha: float = SPREAD_ALPHA,
    chunk: int = 65536,
    progress=None,
) -> Spread:
    """The spreading margin of each labeled row (docs/embeddings.md, "Suspect labels"): labels spread
    over :func:`voter_graph` of the rows ``x`` (V, D) from the labeled ones (``labeled_at`` (M,) their
    positions in ``x``, ``y`` (M,) their class indices) as in label spreading, ``(I - alpha S)^-1 Y``,
    each labeled row i's own seed left out: ``F_i[c]`` is the mean of ``G_ji`` over the labeled rows
    j != i of class c, ``G = (I - alpha S)^-1`` (symmetric; a mean per class rather than label
    spreading's sum, so that a class with more labeled rows does not win by number). Column i of G
    is solved by conjugate gradients, batched over columns, in ``SOLVE_DTYPE``: float32 to a residual
    of 1e-5 (on digits and MNIST-5k the same precision as float64 to 1e-8, at under half the time);
    the tests use float64.

    Returns :class:`Spread`: the margins and each labeled row's nearest similarity. The margin is
    ``log F_i[y_i] - log max_{c != y_i} F_i[c]`` (float64), with both masses floored
    at the solve's tolerance times the column's largest class mass: below that the solve does not
    resolve a mass (CG's answer after n steps is 0 beyond n hops), so the margin stays within
    +-log(1 / tolerance) (11.5 in float32). It is 0 where it has no evidence: a single class, a
    row whose class has no other labeled row, or a row the other seeds hardly reach (its largest
    class mass, its own class's included, below the median labeled row's over ``REACH_CUT``). The
    class sums run on the CPU in float64 (the same on every rank). Cost: the graph (V^2 D) and
    about 15 sparse products of the graph (about 1.5 V k nonzeros) with a (V, M) block in all."""
    m = len(labeled_at)
    if m < 2 or num_classes < 2:  # no other seed, or no other class: no evidence
        return Spread(np.zeros(m), np.full(m, np.nan))
    graph, nearest = voter_graph(x, k, tau, chunk=chunk, progress=progress)
    graph = graph.to(SOLVE_DTYPE)
    tol = 1e-8 if SOLVE_DTYPE == torch.float64 else 1e-5
    v, device = x.shape[0], x.device
    at = torch.from_numpy(np.asarray(labeled_at, np.int64)).to(device)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    count = torch.bincount(yt, minlength=num_classes).double()
    width = max(1, min(m, SOLVE_ENTRIES // max(v, 1)))  # columns per solve
    out, reach = np.empty(m), np.empty(m)
    bar = progress.bar(m, "suspect labels: spread", unit="rows") if progress is not None else None
    for a in range(0, m, width):
        b = min(a + width, m)
        cols = torch.arange(b - a)
        rhs = torch.zeros((v, b - a), dtype=SOLVE_DTYPE, device=device)
        rhs[at[a:b], cols.to(device)] = 1.0
        g = _spread_solve(graph, rhs, alpha, tol)[at].cpu().double()  # (M, b): G_ji for the labeled j
        g[a + cols, cols] = 0.0  # the row's own seed left out
        mass = torch.zeros((num_classes, b - a), dtype=torch.float64).index_add_(0, yt, g)
        seeds = count[:, None].repeat(1, b - a)
        seeds[yt[a:b], cols] -= 1  # the row itself is not among its class's seeds
        mass /= seeds.clamp_min(1)
        reach[a:b] = mass.max(0).values.numpy()
        floor = torch.from_numpy(tol * reach[a:b]).clamp_min(1e-300)
        own = torch.maximum(mass[yt[a:b], cols], floor)
        mass[yt[a:b], cols] = -math.inf
        other = torch.maximum(mass.max(0).values, floor)
        margin = own.log() - other.log()
        out[a:b] = torch.where(seeds[yt[a:b], cols] > 0, margin, torch.zeros_like(margin)).numpy()
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    out[reach < np.median(reach) / REACH_CUT] = 0.0  # (a median of 0 cuts nothing)
    return Spread(out, nearest[np.asarray(labeled_at, np.int64)])
