"""The streaming engine: LLP labels for N fixed embeddings read block by block (docs/method.md §1.1,
§1.2 and, for more than one round, §7).

Each round makes two passes over the rows this process owns (all of them, or a rank's share):

1. density: the round's new voters (round 1: the labeled rows) are the queries of ``topk_scores``
   over each block of the pool, whose running top-T per voter (``init=``) is all the state, O(M*T);
   the per-rank top-T are merged exactly (:mod:`.comm`) and finished into ``log_rho`` as
   ``local_density`` finishes (:mod:`.finish`);
2. vote: each block's rows that are not voters score the new voters (``bias = -(log_rho - log w)``)
   and merge them into their running top-K over all earlier voters; the K best vote as
   ``propagate`` votes. One round and nothing extra asked for: ``propagate`` itself, no state.

Between rounds the most confident of the voted rows join the voters, class by class
(:func:`select_voters`). A voter's density and label never change after it joins, so a remaining
row's running top-K stays exact and a round scores only the new voters: R rounds cost about what one
vote against the final voter set costs. Memory: the new voters and their O(M*T) density state, one
block, the (N, K) running top-K (more than one round only), and the outputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from ..ops import propagate, topk_scores
from . import finish
from .comm import Local
from .settings import Settings
from .sources import Rows


@dataclass
class Result:
    """Labels for every row. ``labels`` hold the caller's label values (labeled rows keep theirs),
    ``confidence`` the vote's share of the winning class (1 on labeled rows). Optional:
    ``top_classes``/``top_probs`` (N, P) the P most likely classes of each row's vote (label values;
    padding -1 with probability 0), ``voters`` (N, K) the rows that voted (-1: none; labeled rows).
    ``voter_rows``, ``voter_classes`` (indices into ``classes``) and ``voter_bias`` describe the final
    voter set (in the order the voters joined) for voting on new points; ``rounds_run`` how many
    rounds ran (fewer than asked when no row was left to join)."""

    labels: np.ndarray
    confidence: np.ndarray
    classes: np.ndarray
    voter_rows: np.ndarray
    voter_classes: np.ndarray
    voter_bias: np.ndarray | None
    rounds_run: int
    top_classes: np.ndarray | None = None
    top_probs: np.ndarray | None = None
    voters: np.ndarray | None = None
    seconds: float = 0.0


class _Bar:
    """One progress bar per pass (rows/s and ETA on a terminal; nothing otherwise)."""

    def __init__(self, progress, total: int, desc: str):
        self.bar = progress.bar(total, desc, unit="rows") if progress is not None else None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _compact(labels: np.ndarray):
    lab = labels >= 0
    if not lab.any():
        raise DataError("labels holds no labeled row (no entry >= 0)")
    classes, y = np.unique(labels[lab], return_inverse=True)
    compact = np.full(labels.shape[0], -1, dtype=np.int64)
    compact[lab] = y
    return lab, classes, compact


def select_voters(label, conf, is_voter, lab, r: int, rounds: int, cap: int, prior: np.ndarray) -> np.ndarray:
    """docs/method.md §7's quotas after round ``r``: for each class c, the rows still voted on whose
    label is c join, most confident first (ties: the lower row), until the pseudo-labeled voters of
    class c number ``round(r / rounds * cap * prior_c)``; a class short of candidates takes what it
    has. Returns the joining rows, sorted."""
    num_classes = prior.shape[0]
    have = np.bincount(label[is_voter & ~lab], minlength=num_classes)
    want = np.array([round(r / rounds * cap * float(p)) for p in prior], dtype=np.int64)
    q = np.flatnonzero(~is_voter)
    q = q[np.lexsort((q, -conf[q], label[q]))]  # by class, confidence descending, then row
    starts = np.searchsorted(label[q], np.arange(num_classes + 1))
    take = [q[starts[c] : min(starts[c + 1], starts[c] + max(0, want[c] - have[c]))] for c in range(num_classes)]
    return np.sort(np.concatenate(take)) if take else np.zeros(0, np.int64)


class Engine:
    """One labelling run over ``rows`` (a :class:`Rows`) with ``labels`` (N,) (-1 = unlabeled)."""

    def __init__(self, rows: Rows, labels: np.ndarray, settings: Settings, *, comm=None, progress=None):
        self.rows, self.s = rows, settings.checked()
        self.comm = comm or Local()
        self.progress = progress
        self.device = torch.device(self.s.device)
        self.n = rows.n
        if labels.shape[0] != self.n:
            raise DataError(f"labels must be a 1-D integer array of {self.n} entries, got {labels.shape[0]}")
        self.lab, self.classes, self.y = _compact(labels)
        self.m = int(self.lab.sum())
        self.pool = self.s.pool if self.m < self.n else "all"
        self.lo, self.hi = self.comm.span(self.n)

    # -- the two passes ------------------------------------------------------------------------
    def _density(self, x_new: torch.Tensor, r: int) -> torch.Tensor:
        """log_rho of the new voters over the pool (docs/method.md §1.1), streamed."""
        pool_n = self.n if self.pool == "all" else self.n - self.m
        t = min(self.s.t, pool_n)
        state, bar = None, _Bar(self.progress, self.hi - self.lo, self._desc(r, "density"))
        for a, b in self.rows.blocks(self.s.chunk, self.lo, self.hi):
            keys = self.rows.read(a, b).to(self.device)
            mask = None if self.pool == "all" else torch.from_numpy(~self.lab[a:b]).to(self.device)
            state = topk_scores(
                x_new, keys, k=t, tau=self.s.tau, key_mask=mask, init=state, index_offset=a, check_finite=False
            )
            bar.update(b - a)
        bar.close()
        if state is None:  # this rank owns no rows
            state = (
                torch.full((x_new.shape[0], t), -math.inf, dtype=x_new.dtype, device=self.device),
                torch.full((x_new.shape[0], t), -1, dtype=torch.int64, device=self.device),
            )
        values, _ = self.comm.merge_topk(state[0], state[1], t)
        return finish.log_sum_exp(values)

    def _desc(self, r: int, what: str) -> str:
        return f"round {r}/{self.s.rounds} {what}" if self.s.rounds > 1 else what

    # -- the run -------------------------------------------------------------------------------
    def run(self, *, top_classes: int = 0, voter_ids: bool = False) -> Result:
        s, n, lo, hi = self.s, self.n, self.lo, self.hi
        num_classes = len(self.classes)
        own = hi - lo
        lab = self.lab
        n_u = n - self.m
        cap = n_u if s.max_voters is None else min(n_u, s.max_voters)
        prior = np.bincount(self.y[lab], minlength=num_classes) / self.m
        label = self.y.copy()
        conf = np.where(lab, 1.0, 0.0).astype(np.float32)
        is_voter = lab.copy()
        keep_state = s.rounds > 1
        fast = not keep_state and not top_classes and not voter_ids
        if keep_state:
            st_v = torch.full((own, s.k), -math.inf, dtype=self.rows.dtype, device=self.device)
            st_i = torch.full((own, s.k), -1, dtype=torch.int32, device=self.device)
        extras = {}
        if top_classes:
            extras["top_classes"] = np.full((own, top_classes), -1, np.int64)
            extras["top_probs"] = np.zeros((own, top_classes), np.float32)
            own_lab = np.flatnonzero(lab[lo:hi])
            extras["top_classes"][own_lab, 0] = self.y[lo:hi][own_lab]
            extras["top_probs"][own_lab, 0] = 1.0
        if voter_ids:
            extras["voters"] = np.full((own, s.k), -1, np.int64)
        book_rows, book_class, book_bias = [], [], []
        new = np.flatnonzero(lab)
        rounds_run = 0
        w = s.weight
        for r in range(1, s.rounds + 1):
            if len(new) == 0:
                break
            rounds_run = r
            x_new = self.rows.take(new).to(self.device)
            bias = None
            if s.density:
                bias = self._density(x_new, r)
            if w != 1.0:
                boost = torch.from_numpy(np.where(lab[new], math.log(w), 0.0)).to(self.device)
                bias = (-boost if bias is None else bias.double() - boost).to(x_new.dtype)
            offset = sum(len(b) for b in book_rows)
            book_rows.append(new)
            book_class.append(label[new])
            book_bias.append(None if bias is None else bias.cpu().numpy())
            n_voters = offset + len(new)
            k = min(s.k, n_voters)
            v_rows = np.concatenate(book_rows)
            v_class = torch.from_numpy(np.concatenate(book_class)).to(self.device)
            new_class = torch.from_numpy(label[new]).to(self.device)
            bar = _Bar(self.progress, own, self._desc(r, "vote"))
            for a, b in self.rows.blocks(s.chunk, lo, hi):
                q = np.flatnonzero(~is_voter[a:b])
                if len(q) == 0:
                    bar.update(b - a)
                    continue
                xq = self.rows.read(a, b)[torch.from_numpy(q)].to(self.device)
                sel = q + a
                if fast:
                    lq, cq = propagate(
                        xq, x_new, new_class, bias, k=k, tau=s.tau, num_classes=num_classes, check_finite=False
                    )
                else:
                    at = torch.from_numpy(sel - lo).to(self.device)
                    init = (st_v[at], st_i[at]) if keep_state else None
                    top = topk_scores(
                        xq,
                        x_new,
                        k=s.k,
                        tau=s.tau,
                        bias=None if bias is None else -bias,
                        init=init,
                        index_offset=offset,
                        check_finite=False,
                    )
                    if keep_state:
                        st_v[at], st_i[at] = top.values, top.indices.to(torch.int32)
                    vals, ids = top.values[:, :k], top.indices[:, :k]
                    cls = v_class[ids]
                    lq, cq = finish.vote(vals, cls, num_classes)
                    if top_classes:
                        tc, tp = finish.class_probabilities(vals, cls, num_classes, top_classes)
                        extras["top_classes"][sel - lo, : tc.shape[1]] = tc.cpu().numpy()
                        extras["top_probs"][sel - lo, : tp.shape[1]] = tp.cpu().numpy()
                    if voter_ids:
                        extras["voters"][sel - lo, :k] = v_rows[ids.cpu().numpy()]
                label[sel] = lq.cpu().numpy()
                conf[sel] = cq.float().cpu().numpy()
                bar.update(b - a)
            bar.close()
            if r == s.rounds:
                break
            label = self.comm.gather(label[lo:hi])
            conf = self.comm.gather(conf[lo:hi])
            new = select_voters(label, conf, is_voter, lab, r, s.rounds, cap, prior)
            is_voter[new] = True
        label = self.comm.gather(label[lo:hi])
        conf = self.comm.gather(conf[lo:hi])
        out = Result(
            labels=np.where(label >= 0, self.classes[np.maximum(label, 0)], -1).astype(self.classes.dtype),
            confidence=conf,
            classes=self.classes,
            voter_rows=np.concatenate(book_rows),
            voter_classes=np.concatenate(book_class),
            voter_bias=None if book_bias[0] is None else np.concatenate(book_bias),
            rounds_run=rounds_run,
        )
        if top_classes:
            tc = self.comm.gather(extras["top_classes"])
            out.top_classes = np.where(tc >= 0, self.classes[np.maximum(tc, 0)], -1)
            out.top_probs = self.comm.gather(extras["top_probs"])
        if voter_ids:
            out.voters = self.comm.gather(extras["voters"])
        return out


def label_embeddings(
    embeddings, labels, settings: Settings | None = None, *, normalize=True, progress=None, **options
) -> Result:
    """LLP labels for fixed embeddings: ``embeddings`` an (N, D) array or tensor, a ``.npy`` path or a
    directory of ``.npy`` shards; ``labels`` (N,) ints (-1 = unlabeled), an array or a ``.npy`` path.
    ``settings`` (or keyword options ``k``, ``t``, ``tau``, ``density``, ``density_pool``,
    ``labeled_weight``, ``rounds``, ``max_voters``, ``chunk``, ``device``) as :class:`Settings`;
    ``top_classes=P`` and ``voter_ids=True`` ask for the optional outputs of :class:`Result`."""
    from .sources import read_labels

    extra = {key: options.pop(key) for key in ("top_classes", "voter_ids") if key in options}
    settings = (settings or Settings()).replace(**options)
    rows = Rows(embeddings, normalize=normalize)
    t0 = time.perf_counter()
    result = Engine(rows, read_labels(labels, rows.n), settings, progress=progress).run(**extra)
    result.seconds = time.perf_counter() - t0
    return result
