"""K and tau chosen by the data: leave-one-out accuracy of the labeled rows (docs/embeddings.md,
"K and tau from the data").

Each labeled row is voted on by its nearest *other* labeled rows, as round 1 votes (docs/method.md
§1.2: scores ``x . m / tau - log_rho``, the density over the run's pool), for every (K, tau) of a
small grid, and the votes are compared with the labels it holds. One selection per tau serves every
K (the largest K's top list, sorted, holds each smaller K's), and one density pass serves every tau:
the pool's top-T similarities do not depend on tau (``log_rho(tau)`` is their log-sum-exp at that
tau).

The rule: keep the default (K = 10, tau = 0.07) unless a candidate is clearly better on these rows:
among the candidates whose wins over the default outnumber their losses by more than ``Z`` standard
errors (``wins - losses > Z sqrt(wins + losses)``, a sign test on the rows they disagree on), the
most accurate (ties: the smaller K, then the tau nearest the default). With a few dozen labels the
leave-one-out accuracies of neighbouring K differ by a row or two, and the default is kept; with
thousands a real difference shows. At most ``MAX_QUERIES`` labeled rows are voted on (a fixed random
subset; every labeled row still votes): the estimate's standard error is then under half a point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .._topk import log_sum_exp, vote
from ..ops import neighbours, topk_scores
from .ranks import Local
from .settings import Settings
from .sources import Rows

K_GRID = (5, 10, 20, 50)
TAU_GRID = (0.03, 0.05, 0.07, 0.1, 0.2)
MAX_QUERIES = 10_000
Z = 3.0


@dataclass
class Choice:
    """The chosen ``k`` and ``tau``, the leave-one-out ``accuracy`` of every candidate
    ``{(k, tau): accuracy}``, how many labeled rows were voted on (``rows``), and the setting the
    candidates had to beat clearly (``start``: the default's K and tau, or the one given)."""

    k: int
    tau: float
    accuracy: dict
    rows: int
    start: tuple

    def line(self, auto_k: bool, auto_tau: bool) -> str:
        """One line for the user: the choice, its accuracy, and the grid's best."""
        what = " and ".join(w for w, on in (("K", auto_k), ("tau", auto_tau)) if on)
        if not self.accuracy:
            return f"{what}: K = {self.k}, tau = {self.tau:g} (too few labeled rows to leave one out)"
        (bk, bt), best = max(self.accuracy.items(), key=lambda kv: kv[1])
        start = f"K = {self.start[0]}, tau = {self.start[1]:g}"
        # (it said the start "stays unless clearly beaten" beside a choice that had beaten it)
        kept = (self.k, self.tau) == tuple(self.start)
        why = f"{start} kept: no candidate beat it clearly" if kept else f"chosen over {start}, which it beat clearly"
        return (
            f"{what} from the data: K = {self.k}, tau = {self.tau:g}, leave-one-out accuracy "
            f"{100 * self.accuracy[(self.k, self.tau)]:.1f}% on {self.rows:,} labeled rows (the grid's best: "
            f"{100 * best:.1f}% at K = {bk}, tau = {bt:g}; {why})"
        )


def _densities(rows: Rows, x: torch.Tensor, lab: np.ndarray, settings: Settings, comm, device) -> torch.Tensor:
    """The top-T raw similarities (tau = 1) of each labeled row over the run's density pool."""
    n, m = rows.n, int(lab.sum())
    pool = settings.pool if m < n else "all"
    t = min(settings.t, n if pool == "all" else n - m)
    lo, hi = comm.span(n)
    state = None
    for a, b in rows.blocks(settings.chunk, lo, hi):
        keys = rows.read(a, b).to(device)
        mask = None if pool == "all" else torch.from_numpy(~lab[a:b]).to(device)
        state = topk_scores(x, keys, k=t, tau=1.0, key_mask=mask, init=state, index_offset=a, check_finite=False)
    if state is None:
        state = (
            torch.full((x.shape[0], t), -math.inf, dtype=x.dtype, device=device),
            torch.full((x.shape[0], t), -1, dtype=torch.int64, device=device),
        )
    values, _ = comm.merge_topk(state[0], state[1], t)
    return values


def _correct(values, indices, own, y, y_rows, ks, num_classes) -> dict:
    """For each K: whether the vote of each query's K best *other* labeled rows is its label."""
    keep = (indices >= 0) & (indices != own[:, None])
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # the row itself moves last
    values, indices = values.gather(1, order), indices.gather(1, order)
    out = {}
    for k in ks:
        label, _ = vote(values[:, :k], indices[:, :k], num_classes, table=y)
        out[k] = (label == y_rows).cpu().numpy()
    return out


def choose(
    rows: Rows,
    labels: np.ndarray,
    settings: Settings,
    *,
    auto_k: bool,
    auto_tau: bool,
    comm=None,
    progress=None,
) -> Choice:
    """K (``auto_k``) and/or tau (``auto_tau``) for labelling ``rows`` with ``labels`` (N,) values
    (-1 unlabeled) under ``settings`` (its K and tau are kept where not chosen). See the module."""
    comm = comm or Local()
    device = torch.device(settings.device or rows.device)
    default = Settings()
    k0 = default.k if auto_k else int(settings.ks[0])
    tau0 = default.tau if auto_tau else float(settings.tau)
    rows.expect_tau(min(TAU_GRID) if auto_tau else tau0)
    lab = labels >= 0
    labeled = np.flatnonzero(lab)
    m = len(labeled)
    if m < 2:  # nothing to leave one out of
        return Choice(k0, tau0, {}, 0, (k0, tau0))
    classes, y = np.unique(labels[labeled], return_inverse=True)
    queries = np.arange(m)
    if m > MAX_QUERIES:
        queries = np.sort(np.random.default_rng(0).choice(m, MAX_QUERIES, replace=False))
    if progress is not None:
        progress.line(
            f"choosing {'K' if auto_k else ''}{' and ' if auto_k and auto_tau else ''}{'tau' if auto_tau else ''}"
        )
    x = rows.take(labeled).to(device)
    xq = x[torch.from_numpy(queries).to(device)]
    sims = _densities(rows, x, lab, settings, comm, device) if settings.density else None
    # The candidates keep their K; a row has only m - 1 others to leave one out among, so a K above
    # that is scored as m - 1 (the run itself is given the candidate's K).
    cands = sorted(set(K_GRID if auto_k else ()) | {k0})
    ks = sorted({min(k, m - 1) for k in cands})
    taus = TAU_GRID if auto_tau else (tau0,)
    y_t = torch.from_numpy(y).to(device)
    own = torch.from_numpy(queries).to(device)
    correct = {}
    for tau in taus:
        log_rho = None if sims is None else log_sum_exp(sims.double() / tau).to(x.dtype)
        top = neighbours(xq, x, log_rho, k=max(ks) + 1, tau=tau)
        scored = _correct(top.values, top.indices, own, y_t, y_t[own], ks, len(classes))
        for k in cands:
            correct[(k, tau)] = scored[min(k, m - 1)]
    chosen = pick(correct, (k0, tau0))
    accuracy = {key: float(c.mean()) for key, c in correct.items()}
    return Choice(int(chosen[0]), float(chosen[1]), accuracy, len(queries), (k0, tau0))


def pick(correct: dict, anchor: tuple, z: float | None = None) -> tuple:
    """The rule of the module: ``correct`` maps each candidate (k, tau) to a boolean vector (each
    query row voted right or not); the anchor (the default) is kept unless a candidate's wins over
    it exceed its losses by more than ``z`` (default :data:`Z`) standard errors; among those, the
    most accurate (ties: the smaller K, then the tau nearest the anchor's)."""
    z = Z if z is None else z
    base = correct[anchor]
    best, best_key = None, anchor
    for key, c in correct.items():
        wins, losses = int((c & ~base).sum()), int((~c & base).sum())
        if wins - losses <= z * math.sqrt(wins + losses):
            continue
        rank = (-int(c.sum()), key[0], abs(math.log(key[1] / anchor[1])))
        if best is None or rank < best:
            best, best_key = rank, key
    return best_key
