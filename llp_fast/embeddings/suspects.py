"""Suspect labels: the labeled rows whose given label the data contradict (docs/embeddings.md,
"Suspect labels").

After a run, every labeled row i gets a score from two measurements, both in log units and both
with the row's own label left out; rows are ranked by the score, lowest (most suspect) first, ties
to the lower row, and ``quality = exp(score)`` in [0, 1].

**The label gap.** Row i against the final voters (the labeled rows and, after more than one round,
the pseudo-labeled rows that joined them), itself left out, with the vote's own scores
``z_ij = x_i . m_j / tau - b_j`` (docs/method.md §1.2, §7.1: ``b_j = log_rho_j - log w_j``). Two
selections per row: its n best voters of any class, and its n best voters of the class it is
labeled with (n = K, or fewer when that class has fewer other voters):

    gap_i = mean_{n best voters of class y_i} z_ij  -  mean_{n best voters} z_ij   (<= 0)

0 when the row's nearest voters carry its label; more negative the further away its label's
nearest support lies; -inf when no other voter has its class. Unlike the share of a leave-one-out
vote it does not saturate: a flipped label (a random other class) usually lies much further from
its row than the label of a row that merely resembles another class.

**The spreading margin.** The gap reads the final voters' pseudo-labels, and a flipped label that
spread in the rounds to the row's unlabeled neighbours is voted for by them. The margin instead
spreads the *given* labels only, over a graph of the final voters (each voter's 10 nearest voters
by cosine similarity, edge weight ``exp(s_ij / 0.1)``, symmetric, normalised
``S = D^-1/2 W D^-1/2``), as label spreading does: ``(I - alpha S)^-1 Y`` with alpha = 0.8, row i's
own seed left out (``F_i[c]`` = the mean of ``G_ij``, ``G = (I - alpha S)^-1``, over the labeled
rows j != i of class c; column i solved by conjugate gradients; a mean per class, not label
spreading's sum, so that a class with more labeled rows does not win by number). The margin is
``log F_i[y_i] - log max_{c != y_i} F_i[c]``: how much more of the spread labels reaching row i
carry its label, seed for seed, than any other class; masses below what the solve resolves are
floored (the margin stays within +-log(1 / tolerance)), and a row whose class has no other labeled
row gets 0 (no evidence).

**The score** is ``gap + min(margin, 0)``: a row is the more suspect the further its voters are from
its label and the more the labels spread from the other labeled rows favour another class; a row
the spreading supports (margin > 0) keeps its gap. Measured on digits and MNIST-5k with 10% of the labels flipped (40
balanced splits of digits), the sum finds more flipped labels on digits than either part, and on
MNIST-5k slightly fewer than the gap alone (docs/embeddings.md has the tables and the other scores
tried).

Cost: the gap is one pass over the rows with the labeled rows as queries, against the voters among
each block (``topk_scores`` with ``key_mask``), once for all classes and once per class with that
class's labeled rows: about 2 M N D multiply-adds. The margin: the voters' graph (V^2 D
multiply-adds, ``topk_scores`` V queries against V keys) and about 15 conjugate-gradient steps, each
a sparse product of the graph (about 1.5 V k nonzeros) with a (V, b) block of columns, over M
columns in all. Memory: the labeled rows and the V voters (D floats each), O(M K) state, one block,
three (N,) arrays, the graph and five (V, b) float32 blocks (``SOLVE_ENTRIES`` entries each).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..ops import topk_scores
from .ranks import Local
from .sources import Rows


@dataclass
class Suspects:
    """``rows`` (M,) int64: the labeled rows, most suspect first (every labeled row ranked);
    ``labeled`` (M,) the labeled rows in row order, with their ``gap`` (M,) float64 (<= 0, -inf:
    no other voter of that class), ``spread`` (M,) float64 (the spreading margin: log of the own
    class's share against the best other class's, the row's own label left out), ``score`` =
    ``gap + min(spread, 0)`` (the ranking, ascending) and ``quality`` = exp(score), in [0, 1]."""

    rows: np.ndarray
    labeled: np.ndarray
    gap: np.ndarray
    spread: np.ndarray
    score: np.ndarray
    quality: np.ndarray

    def per_row(self, n: int) -> np.ndarray:
        """``quality`` as an (n,) array over all rows: NaN on the unlabeled ones."""
        out = np.full(n, np.nan)
        out[self.labeled] = self.quality
        return out


SPREAD_K = 10  # the spreading graph's neighbours per row
SPREAD_TAU = 0.1  # its temperature: edge weight exp(x_i . x_j / 0.1)
SPREAD_ALPHA = 0.8  # label spreading's alpha: how far labels travel (chosen on digits/MNIST-5k, docs)
SOLVE_ENTRIES = 1 << 22  # entries of one (V, b) block of the solve (five such arrays live)
SOLVE_DTYPE = torch.float32


def _empty(q: int, k: int, dtype, device):
    return (
        torch.full((q, k), -math.inf, dtype=dtype, device=device),
        torch.full((q, k), -1, dtype=torch.int64, device=device),
    )


def _mean_best(values: torch.Tensor, indices: torch.Tensor, own: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of the first ``n`` values (sorted descending) whose index is a voter
    other than the row itself (``own``); float64, -inf where ``n`` is 0."""
    keep = (indices >= 0) & (indices != own[:, None])
    keep &= keep.cumsum(dim=1) <= n[:, None]
    total = torch.where(keep, values.double(), torch.zeros((), dtype=torch.float64, device=values.device)).sum(dim=1)
    return torch.where(n > 0, total / n.clamp_min(1).double(), torch.full_like(total, -math.inf))


def label_gaps(
    rows: Rows,
    labels: np.ndarray,
    voter_rows: np.ndarray,
    voter_classes: np.ndarray,
    voter_bias: np.ndarray | None,
    classes: np.ndarray,
    *,
    k: int,
    tau: float,
    chunk: int = 65536,
    device=None,
    comm=None,
    progress=None,
) -> Suspects:
    """The suspect score of every labeled row (``labels`` (N,) values, -1 unlabeled): its label gap
    against the final voters of a run (``Result.voter_rows``, ``voter_classes`` as indices into
    ``classes``, ``voter_bias``), with the run's K and temperature, plus its spreading margin over
    the voters' graph (:func:`voter_margins`). The gap streams the rows as the engine does; under
    ``comm`` each rank scores its own rows' voters and the selections are merged exactly; the margin
    is computed whole on every rank (the same on each)."""
    comm = comm or Local()
    device = torch.device(device or rows.device)
    n = rows.n
    labeled = np.flatnonzero(labels >= 0)
    y = np.searchsorted(classes, labels[labeled])
    is_voter = np.zeros(n, bool)
    is_voter[voter_rows] = True
    v_class = np.full(n, -1, np.int64)
    v_class[voter_rows] = voter_classes
    v_bias = np.zeros(n, np.float64)
    if voter_bias is not None:
        v_bias[voter_rows] = voter_bias
    count = np.bincount(voter_classes, minlength=len(classes))  # voters per class, the row itself among them
    k_all = min(k, len(voter_rows) - 1) + 1  # room for the row itself
    x = rows.take(labeled).to(device)
    groups = [np.flatnonzero(y == c) for c in range(len(classes))]
    state_all, state = None, [None] * len(classes)
    lo, hi = comm.span(n)
    bar = progress.bar(hi - lo, "suspect labels", unit="rows") if progress is not None else None
    for a, b in rows.blocks(chunk, lo, hi):
        voters = is_voter[a:b]
        if voters.any():
            keys = rows.read(a, b).to(device)
            bias = torch.from_numpy(-v_bias[a:b]).to(device, keys.dtype)
            mask = torch.from_numpy(voters).to(device)
            state_all = topk_scores(
                x, keys, k=k_all, tau=tau, bias=bias, key_mask=mask, init=state_all, index_offset=a, check_finite=False
            )
            block_class = v_class[a:b]
            for c, group in enumerate(groups):
                mask_c = voters & (block_class == c)
                if len(group) and mask_c.any():
                    state[c] = topk_scores(
                        x[torch.from_numpy(group).to(device)],
                        keys,
                        k=k_all,
                        tau=tau,
                        bias=bias,
                        key_mask=torch.from_numpy(mask_c).to(device),
                        init=state[c],
                        index_offset=a,
                        check_finite=False,
                    )
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    dtype = x.dtype
    values, indices = comm.merge_topk(*(state_all or _empty(len(labeled), k_all, dtype, device)), k_all)
    own = torch.from_numpy(labeled).to(device)
    gap = torch.empty(len(labeled), dtype=torch.float64, device=device)
    for c, group in enumerate(groups):
        if not len(group):
            continue
        g = torch.from_numpy(group).to(device)
        vc, ic = comm.merge_topk(*(state[c] or _empty(len(group), k_all, dtype, device)), k_all)
        # n: the class's other voters, at most K (the row is a voter of its own class)
        n_c = torch.full((len(group),), min(k, int(count[c]) - 1), dtype=torch.int64, device=device)
        best_c = _mean_best(vc, ic, own[g], n_c)
        best = _mean_best(values[g], indices[g], own[g], n_c)
        gap[g] = torch.where(n_c > 0, (best_c - best).clamp_max(0.0), best_c)
    gap = gap.cpu().numpy()
    spread = voter_margins(
        rows, labeled, y, voter_rows, voter_classes, len(classes), chunk=chunk, device=device, progress=progress
    )
    score = gap + np.minimum(spread, 0.0)
    order = np.lexsort((labeled, score))
    return Suspects(rows=labeled[order], labeled=labeled, gap=gap, spread=spread, score=score, quality=np.exp(score))


def voter_margins(
    rows: Rows,
    labeled: np.ndarray,
    y: np.ndarray,
    voter_rows: np.ndarray,
    voter_classes: np.ndarray,
    num_classes: int,
    *,
    chunk: int = 65536,
    device=None,
    progress=None,
) -> np.ndarray:
    """:func:`spread_margins` of the labeled rows ``labeled`` (sorted, class indices ``y``) over the
    graph of a run's final voters (``voter_rows``, ``voter_classes``; the labeled rows among them).
    The nodes are ordered by class, so that most of a node's neighbours lie near it in memory (the
    solve's products gather rows of a (V, b) block); they are read in row order (``Rows.take``
    wants sorted rows, e.g. across the files of a directory) and permuted on the device."""
    device = torch.device(device or rows.device)
    nodes = np.union1d(voter_rows, labeled)  # sorted; the labeled rows are voters, the union guards
    node_class = np.full(len(nodes), -1, np.int64)
    node_class[np.searchsorted(nodes, voter_rows)] = voter_classes
    node_class[np.searchsorted(nodes, labeled)] = y
    order = np.lexsort((nodes, node_class))
    x = rows.take(nodes).to(device)[torch.from_numpy(order).to(device)]
    place = np.empty(len(nodes), np.int64)
    place[order] = np.arange(len(nodes))  # a node's place in the graph
    return spread_margins(x, place[np.searchsorted(nodes, labeled)], y, num_classes, chunk=chunk, progress=progress)


def voter_graph(x: torch.Tensor, k: int = SPREAD_K, tau: float = SPREAD_TAU, *, chunk: int = 65536, progress=None):
    """The symmetric normalised k-nearest-neighbour graph of the rows ``x`` (V, D) (docs/embeddings.md,
    "Suspect labels"): each row's k best other rows by cosine similarity ``s_ij`` (``topk_scores`` on
    the rows scaled to unit length, streamed ``chunk`` queries at a time), edge weight
    ``exp(s_ij / tau)`` (at least exp(-2 / tau): never 0 for tau >= 0.01), an edge kept when either
    end chose it (the larger weight), then ``S = D^-1/2 W D^-1/2`` with D the weights' row sums. Returns
    S as a float64 sparse CSR tensor on ``x``'s device. Cost: V^2 D multiply-adds, O(V k) memory."""
    v = x.shape[0]
    k = min(k, v - 1)
    if k <= 0:
        return _sparse(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), v, x.device)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
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
    return _sparse(r, c, w / root[r] / root[c], v, x.device)


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
) -> np.ndarray:
    """The spreading margin of each labeled row (docs/embeddings.md, "Suspect labels"): labels spread
    over :func:`voter_graph` of the rows ``x`` (V, D) from the labeled ones (``labeled_at`` (M,) their
    positions in ``x``, ``y`` (M,) their class indices) as in label spreading, ``(I - alpha S)^-1 Y``,
    each labeled row i's own seed left out: ``F_i[c]`` is the mean of ``G_ji`` over the labeled rows
    j != i of class c, ``G = (I - alpha S)^-1`` (symmetric; a mean per class rather than label
    spreading's sum, so that a class with more labeled rows does not win by number). Column i of G
    is solved by conjugate gradients, batched over columns, in ``SOLVE_DTYPE``: float32 to a residual
    of 1e-5 (on digits and MNIST-5k the same precision as float64 to 1e-8, at under half the time);
    the tests use float64.

    The margin is ``log F_i[y_i] - log max_{c != y_i} F_i[c]`` (float64), with both masses floored
    at the solve's tolerance times the column's largest class mass: below that the solve does not
    resolve a mass (CG's answer after n steps is 0 beyond n hops), so the margin stays within
    +-log(1 / tolerance) (11.5 in float32). It is 0 where it has no evidence: a single class, or a
    row whose class has no other labeled row. The class sums run on the CPU in float64 (the same on
    every rank). Cost: the graph (V^2 D) and about 15 sparse products of the graph (about 1.5 V k
    nonzeros) with a (V, M) block in all."""
    m = len(labeled_at)
    if m < 2 or num_classes < 2:  # no other seed, or no other class: no evidence
        return np.zeros(m)
    graph = voter_graph(x, k, tau, chunk=chunk, progress=progress).to(SOLVE_DTYPE)
    tol = 1e-8 if SOLVE_DTYPE == torch.float64 else 1e-5
    v, device = x.shape[0], x.device
    at = torch.from_numpy(np.asarray(labeled_at, np.int64)).to(device)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    count = torch.bincount(yt, minlength=num_classes).double()
    width = max(1, min(m, SOLVE_ENTRIES // max(v, 1)))  # columns per solve
    out = np.empty(m)
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
        floor = (tol * mass.max(0).values).clamp_min(1e-300)
        own = torch.maximum(mass[yt[a:b], cols], floor)
        mass[yt[a:b], cols] = -math.inf
        other = torch.maximum(mass.max(0).values, floor)
        margin = own.log() - other.log()
        out[a:b] = torch.where(seeds[yt[a:b], cols] > 0, margin, torch.zeros_like(margin)).numpy()
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    return out


def suspects_of(rows: Rows, labels: np.ndarray, result, settings, *, comm=None, progress=None) -> Suspects:
    """:func:`label_gaps` for an engine ``Result`` and the ``Settings`` it ran with."""
    return label_gaps(
        rows,
        labels,
        result.voter_rows,
        result.voter_classes,
        result.voter_bias,
        result.classes,
        k=result.k,
        tau=settings.tau,
        chunk=settings.chunk,
        device=settings.device,
        comm=comm,
        progress=progress,
    )


def drop_worst(labels: np.ndarray, suspects: Suspects, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` with the most suspect ``round(fraction * M)`` labeled rows made unlabeled (-1), and
    those rows."""
    n_drop = int(round(fraction * len(suspects.rows)))
    dropped = np.sort(suspects.rows[:n_drop])
    out = labels.copy()
    out[dropped] = -1
    return out, dropped
