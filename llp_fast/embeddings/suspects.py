"""Suspect labels: the labeled rows whose given label the data contradict (docs/embeddings.md,
"Suspect labels").

After a run, every labeled row i gets a score from two measurements, both in log units and both
with the row's own label left out, their sum scaled by the row's distance to its nearest voter; rows
are ranked by the score, lowest (most suspect) first, ties to the lower row, and
``quality = exp(score)`` in [0, 1].

**The label gap.** Row i against the final voters (the labeled rows and, after more than one round,
the pseudo-labeled rows that joined them), itself left out, with the vote's own scores
``z_ij = x_i . m_j / tau - b_j`` (docs/method.md §1.2, §7.1: ``b_j = log_rho_j - log w_j``). Two
selections per row: its n best voters of any class, and its n best voters of the class it is
labeled with (n = K, or fewer when that class has fewer other voters):

    gap_i = mean_{n best voters of class y_i} z_ij  -  mean_{n best voters} z_ij   (<= 0)

0 when the row's nearest voters carry its label; more negative the further away its label's
nearest support lies. When no other voter has its class: -inf where its class won no unlabeled
row in the run's vote (the label spread nowhere), else 0, no evidence either way (as the margin
below says for a class with no other labeled row: a class's single, correct labeled row scored
-inf under ``--rounds 1``, or where its voter quota rounded to none, ranked first, and
``--drop-suspects`` removed the class). Unlike the share of a leave-one-out
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

**The score** is ``(gap + min(margin, 0)) * r_med / r_i``: a row is the more suspect the further its
voters are from its label and the more the labels spread from the other labeled rows favour another
class (a row the spreading supports, margin > 0, keeps its gap), in units of the row's own
neighbourhood: ``r_i`` is the distance from the unit row to its nearest other voter (the graph's
first neighbour; 0 for a duplicate), floored at a tenth of ``r_med``, their median over the labeled
rows (no scaling where that median is 0). A flipped label usually sits on a row typical of its true
class, in a dense region where its neighbours all disagree with it; a row that merely resembles
another class is atypical and lies far from its nearest rows, so the same disagreement weighs less.
Measured on digits and MNIST-5k with 10% of the labels flipped, the scaled sum finds more flipped
labels than the plain sum on digits' random splits and on MNIST-5k, about as many on digits'
balanced splits (within one row over 40 splits), and more than either part alone on digits and, over
20 or 40 splits, on MNIST-5k 10% (docs/embeddings.md has the tables and the other scores tried).

Cost: the gap is one pass over the V voters alone (read by row index once, with the labeled rows,
for the gap and the margin both; ``chunk`` at a time) with the labeled rows as queries
(``topk_scores``), once for all classes and once per class with that class's labeled rows and voters
(``key_mask``): about 2 M V D multiply-adds, whatever N is. The margin: the voters' graph (V^2 D
multiply-adds, ``topk_scores`` V queries against V keys) and about 15 conjugate-gradient steps, each
a sparse product of the graph (about 1.5 V k nonzeros) with a (V, b) block of columns, over M
columns in all. Memory: the labeled rows and the V voters (D floats each), O(M K) state, one block
of voters, the graph and five (V, b) float32 blocks (:mod:`.spread`'s ``SOLVE_ENTRIES`` entries
each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..ops import topk_scores
from .ranks import Local
from .settings import DROP_KEEPS, DROP_QUALITY
from .sources import Rows
from .spread import graph_nodes, voter_margins

DUPLICATE = 1e-5  # 1 - cosine below this: the same row (float32 rounding of a duplicate's is ~1e-6)


@dataclass
class Suspects:
    """``rows`` (M,) int64: the labeled rows, most suspect first (every labeled row ranked);
    ``labeled`` (M,) the labeled rows in row order, with their ``gap`` (M,) float64 (<= 0, -inf:
    no other voter of that class), ``spread`` (M,) float64 (the spreading margin: log of the own
    class's share against the best other class's, the row's own label left out), ``scale`` (M,)
    float64 (``r_med / r_i``, in (0, 10]: the row's nearest-voter distance against the median),
    ``score`` = ``(gap + min(spread, 0)) * scale`` (the ranking, ascending) and ``quality`` =
    exp(score), in [0, 1]."""

    rows: np.ndarray
    labeled: np.ndarray
    gap: np.ndarray
    spread: np.ndarray
    scale: np.ndarray
    score: np.ndarray
    quality: np.ndarray

    def below_cut(self) -> int:
        """How many labels are below ``drop_suspects="auto"``'s cut (quality < :data:`DROP_QUALITY`):
        the first so many of ``rows``."""
        return int((self.quality < DROP_QUALITY).sum())

    def per_row(self, n: int) -> np.ndarray:
        """``quality`` as an (n,) array over all rows: NaN on the unlabeled ones."""
        out = np.full(n, np.nan)
        out[self.labeled] = self.quality
        return out


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


def neighbourhood_scale(nearest: np.ndarray) -> np.ndarray:
    """``r_med / max(r_i, r_med / 10)`` per row from ``nearest`` (M,), the cosine similarity of each
    row to its nearest other voter: ``r_i = sqrt(2 - 2 s_i)`` is the distance between the unit rows,
    0 where ``1 - s_i < DUPLICATE`` (a duplicate row's similarity comes out a few roundings below 1,
    which would otherwise read as a tiny distance), ``r_med`` its median over the rows. 1 where it
    cannot be measured (NaN similarity; a median of 0: most rows duplicates)."""
    gap = 1.0 - np.asarray(nearest, np.float64)
    r = np.where(gap < DUPLICATE, 0.0, np.sqrt(2.0 * np.maximum(gap, 0.0)))
    known = np.isfinite(r)
    med = float(np.median(r[known])) if known.any() else 0.0
    if not med > 0:
        return np.ones(len(r))
    return np.where(known, med / np.maximum(np.where(known, r, med), 0.1 * med), 1.0)


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
    won: np.ndarray | None = None,
) -> Suspects:
    """The suspect score of every labeled row (``labels`` (N,) values, -1 unlabeled): its label gap
    against the final voters of a run (``Result.voter_rows``, ``voter_classes`` as indices into
    ``classes``, ``voter_bias``), with the run's K and temperature, plus its spreading margin over
    the voters' graph (:func:`voter_margins`), the sum scaled by :func:`neighbourhood_scale`;
    ``won`` (per class of ``classes``): whether the class won an unlabeled row (a row whose class has
    no other voter: -inf where it did not, else 0; ``None``: 0). The gap
    streams the voters (in row order) ``chunk`` at a time; under ``comm`` each rank scores its share
    of them and the selections are merged exactly; the margin and the scale are computed whole on
    every rank (the same on each)."""
    comm = comm or Local()
    device = torch.device(device or rows.device)
    labeled = np.flatnonzero(labels >= 0)
    y = np.searchsorted(classes, labels[labeled])
    # the voters in row order (Rows.take wants sorted rows); selections index this list
    in_order = np.argsort(voter_rows, kind="stable")
    v_rows = np.asarray(voter_rows, np.int64)[in_order]
    v_class = np.asarray(voter_classes, np.int64)[in_order]
    v_bias = np.zeros(len(v_rows)) if voter_bias is None else np.asarray(voter_bias, np.float64)[in_order]
    count = np.bincount(voter_classes, minlength=len(classes))  # voters per class, the row itself among them
    k_all = min(k, len(voter_rows) - 1) + 1  # room for the row itself
    # the graph's nodes (the voters and the labeled rows) read once: the gap's queries and keys, and
    # the margin's graph
    nodes = graph_nodes(voter_rows, labeled)
    x_nodes = rows.take(nodes).to(device)
    x = x_nodes[torch.from_numpy(np.searchsorted(nodes, labeled)).to(device)]
    v_at = torch.from_numpy(np.searchsorted(nodes, v_rows)).to(device)  # the voters among the nodes
    groups = [np.flatnonzero(y == c) for c in range(len(classes))]
    state_all, state = None, [None] * len(classes)
    lo, hi = comm.span(len(v_rows))
    bar = progress.bar(hi - lo, "suspect labels", unit="voters") if progress is not None else None
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        keys = x_nodes[v_at[a:b]]
        bias = torch.from_numpy(-v_bias[a:b]).to(device, keys.dtype)
        state_all = topk_scores(
            x, keys, k=k_all, tau=tau, bias=bias, init=state_all, index_offset=a, check_finite=False
        )
        block_class = v_class[a:b]
        for c, group in enumerate(groups):
            mask_c = block_class == c
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
    to_row = torch.from_numpy(np.append(v_rows, -1)).to(device)  # a selection's place -> its row (-1: none)
    dtype = x.dtype
    values, indices = comm.merge_topk(*(state_all or _empty(len(labeled), k_all, dtype, device)), k_all)
    indices = to_row[indices]  # -1 stays -1 (the appended entry)
    own = torch.from_numpy(labeled).to(device)
    gap = torch.empty(len(labeled), dtype=torch.float64, device=device)
    for c, group in enumerate(groups):
        if not len(group):
            continue
        g = torch.from_numpy(group).to(device)
        vc, ic = comm.merge_topk(*(state[c] or _empty(len(group), k_all, dtype, device)), k_all)
        ic = to_row[ic]
        # n: the class's other voters, at most K (the row is a voter of its own class)
        n_c = torch.full((len(group),), min(k, int(count[c]) - 1), dtype=torch.int64, device=device)
        best_c = _mean_best(vc, ic, own[g], n_c)
        best = _mean_best(values[g], indices[g], own[g], n_c)
        lost = won is not None and not won[c]  # (its label spread nowhere; else no evidence)
        alone = best_c if lost else torch.zeros_like(best_c)
        gap[g] = torch.where(n_c > 0, (best_c - best).clamp_max(0.0), alone)
    gap = gap.cpu().numpy()
    spread, nearest = voter_margins(
        x_nodes, nodes, labeled, y, voter_rows, voter_classes, len(classes), chunk=chunk, progress=progress
    )
    scale = neighbourhood_scale(nearest)
    score = (gap + np.minimum(spread, 0.0)) * scale
    order = np.lexsort((labeled, score))
    return Suspects(
        rows=labeled[order], labeled=labeled, gap=gap, spread=spread, scale=scale, score=score, quality=np.exp(score)
    )


def suspects_of(rows: Rows, labels: np.ndarray, result, settings, *, comm=None, progress=None) -> Suspects:
    """:func:`label_gaps` for an engine ``Result`` and the ``Settings`` it ran with (every rank holds
    the result's labels: which classes won a row is the same on each)."""
    unlabeled = labels < 0
    won = np.isin(result.classes, result.labels[unlabeled]) if unlabeled.any() else None
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
        won=won,
    )


def drops_asked(fraction: float, m: int) -> int:
    """How many of ``m`` labeled rows ``--drop-suspects fraction`` asks to drop: ``round(fraction * m)``
    (Python's rounding, half to even), the count :func:`drop_worst` drops at most."""
    return int(round(fraction * m))


def drop_worst(labels: np.ndarray, suspects: Suspects, fraction) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` with the most suspect labeled rows made unlabeled (-1), and those rows (sorted).

    ``fraction`` in (0, 1): the first ``round(fraction * M)``, but only rows with some sign of a wrong
    label (score < 0, quality < 1): the rows of score 0 tie, and a fraction beyond the flagged ones
    dropped clean labels by row index (a whole class of them once). ``"auto"``: every row whose
    quality is below :data:`DROP_QUALITY`, most suspect first, while its class keeps at least
    :data:`DROP_KEEPS` labeled rows (a class's few labels are its only footholds: dropping a correct
    but atypical one cost up to 3 points on digits' and MNIST-5k's random splits with clean labels).
    Chosen on digits and MNIST-5k with 0-30% of the labels flipped (docs/embeddings.md, "Dropping
    suspects"): it gained on every noisy row there, where a fixed fraction gains only near the true
    share of wrong labels, and cost little on clean labels."""
    if fraction == "auto":
        flagged = suspects.rows[: suspects.below_cut()]
        classes = labels[flagged]
        values, counts = np.unique(labels[labels >= 0], return_counts=True)  # (any int64 ids, not 0..C-1)
        # each flagged row's place among its class's flagged rows, most suspect first
        order = np.argsort(classes, kind="stable")
        place = np.empty(len(flagged), np.int64)
        starts = np.searchsorted(classes[order], classes[order], side="left")
        place[order] = np.arange(len(flagged)) - starts
        dropped = np.sort(flagged[place < counts[np.searchsorted(values, classes)] - DROP_KEEPS])
    else:
        n_drop = min(drops_asked(fraction, len(suspects.rows)), int((suspects.score < 0).sum()))
        dropped = np.sort(suspects.rows[:n_drop])
    out = labels.copy()
    out[dropped] = -1
    return out, dropped
