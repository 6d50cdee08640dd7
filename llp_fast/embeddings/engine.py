"""The streaming engine: LLP labels for N fixed embeddings read block by block (docs/method.md §1.1,
§1.2 and, for more than one round, §7).

A run is a few named steps (:meth:`Engine.run`); each round makes two passes over the rows this
process owns (all of them, or a rank's share):

1. :meth:`Engine.add_voters`, the density pass: the round's new voters (round 1: the labeled rows)
   are the queries of ``topk_scores`` over each block of the pool, whose running top-T per voter
   (``init=``) is all the state, O(M*T); the per-rank top-T are merged exactly (:mod:`.ranks`) and
   finished into ``log_rho`` by ``local_density``'s own finisher (``llp_fast._topk.log_sum_exp``);
2. :meth:`Engine.vote_pass`: each block's rows that are not voters select their K best new voters
   (``llp_fast.ops.neighbours``: scores ``v . m / tau - b``, ``b = log_rho - log w``), merged into
   their running top-K over all earlier voters, and vote with ``propagate``'s own finisher
   (``llp_fast._topk.vote``). Several K (``Settings(k=(10, 20, 100))``) share one selection of the
   largest and vote once per K.

Between rounds the most confident of the voted rows join the voters, class by class
(:func:`select_voters`), up to the voter cap (``Settings.max_voters``; by default it keeps the cost
linear in N). A voter's density and label never change after it joins, so a remaining row's running
top-K stays exact and a round scores only the new voters: R rounds cost about what one vote against
the final voter set costs. Memory: the new voters and their O(M*T) density state, one block, the
(N, K) running top-K (more than one round only), and the outputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .._topk import class_shares, log_sum_exp, vote
from ..errors import DataError
from ..ops import neighbours, topk_scores
from .ranks import Local
from .settings import SURE, Settings
from .sources import Rows, read_labels


@dataclass
class Result:
    """Labels for every row. ``labels`` hold the caller's label values (labeled rows keep theirs),
    ``confidence`` the vote's share of the winning class (1 on labeled rows). Optional:
    ``top_classes``/``top_probs`` (N, P) the P most likely classes of each row's vote (label values;
    padding -1 with probability 0), ``voters`` (N, K) the rows that voted (-1: none; labeled rows).
    ``voter_rows``, ``voter_classes`` (indices into ``classes``) and ``voter_bias`` (``b_i`` of
    docs/method.md §7.1, subtracted from a voter's scores; None without density weighting and
    weight) describe the final voter set (in the order the voters joined) for voting on new points;
    ``k`` the K of this result; ``rounds_run`` the last round whose vote ran (fewer than asked when
    no row was left to vote on, or no row joined the voters in the last rounds: such a round would
    give the same votes, so it is not run)."""

    labels: np.ndarray
    confidence: np.ndarray
    classes: np.ndarray
    voter_rows: np.ndarray
    voter_classes: np.ndarray
    voter_bias: np.ndarray | None
    rounds_run: int
    k: int = 10
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


def _most_confident(rows: np.ndarray, conf: np.ndarray, key: np.ndarray | None, n: int) -> np.ndarray:
    """The ``n`` rows of highest ``conf`` (``rows`` ascending); among rows of equal confidence at the
    cut, the highest ``key`` first (without one: none), then the lower row: O(len(rows)) plus a sort
    of the rows tied at the cut. With a ``key``, every confidence of at least :data:`SURE` counts as
    equal (docs/method.md §7.1: the sure rows join nearest their voters first). None of them (an
    empty array) for ``n <= 0``: a class whose quota is already met."""
    if n <= 0:
        return rows[:0]
    if n >= len(rows):
        return rows
    c = -conf[rows]
    if key is not None:
        c = np.maximum(c, -np.float32(SURE))
    cut = np.partition(c, n - 1)[n - 1]  # minus the n-th highest confidence
    above = rows[c < cut]
    tied = rows[c == cut]  # ascending
    if key is not None:
        tied = tied[np.argsort(-key[tied], kind="stable")]
    return np.concatenate([above, tied[: n - len(above)]])


def select_voters(
    label, conf, is_voter, lab, r: int, rounds: int, cap: int, prior: np.ndarray, key: np.ndarray | None = None
) -> np.ndarray:
    """docs/method.md §7's quotas after round ``r``: for each class c, the rows still voted on whose
    label is c join, most confident first (ties: the higher ``key``, each row's best voter's score,
    among which every confidence of at least :data:`SURE` is equal, then the lower row; without
    ``key``, exact confidences and the lower row), until the pseudo-labeled voters of class c
    number ``round(r / rounds * cap * prior_c)``; a class short of candidates takes what it has.
    Returns the joining rows, sorted. O(N log N) in all (one sort by class)."""
    num_classes = prior.shape[0]
    have = np.bincount(label[is_voter & ~lab], minlength=num_classes)
    want = np.array([round(r / rounds * cap * float(p)) for p in prior], dtype=np.int64)
    q = np.flatnonzero(~is_voter)
    q = q[np.argsort(label[q], kind="stable")]  # by class, rows ascending within a class
    starts = np.searchsorted(label[q], np.arange(num_classes + 1))
    take = [
        _most_confident(q[starts[c] : starts[c + 1]], conf, key, max(0, want[c] - have[c])) for c in range(num_classes)
    ]
    return np.sort(np.concatenate(take)) if take else np.zeros(0, np.int64)


@dataclass
class _Voters:
    """The voters that joined in one round: their rows (``x``) on the device, class ids, ``b_i``
    (subtracted from their scores; None when every b_i is 0) and their first number in the order of
    all voters (the index the running top-K gives them)."""

    x: torch.Tensor
    classes: torch.Tensor
    bias: torch.Tensor | None
    offset: int


@dataclass
class _Run:
    """What a run carries from step to step. ``label``/``conf`` (len(ks), N): per K, each row's
    compact class (-1: not voted yet) and confidence; the book of every voter so far; the running
    top-K of the owned rows (more than one round); the optional outputs of the owned rows."""

    ks: tuple[int, ...]
    label: np.ndarray
    conf: np.ndarray
    is_voter: np.ndarray
    key: np.ndarray | None  # each row's best voter score, where ties go by it (Settings.ties "score")
    book_rows: list = field(default_factory=list)
    book_class: list = field(default_factory=list)
    book_bias: list = field(default_factory=list)
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    extras: dict = field(default_factory=dict)
    rounds_run: int = 0
    _rows: np.ndarray | None = None

    @property
    def n_voters(self) -> int:
        return sum(len(b) for b in self.book_rows)

    @property
    def voter_rows(self) -> np.ndarray:
        if self._rows is None or len(self._rows) != self.n_voters:
            self._rows = np.concatenate(self.book_rows)
        return self._rows


class Engine:
    """One labelling run over ``rows`` (a :class:`Rows`) with ``labels`` (N,) (-1 = unlabeled):
    ``Engine(rows, labels, Settings(...), comm=...).run()``. ``comm`` splits the rows over
    ``torch.distributed`` ranks (:class:`~llp_fast.embeddings.ranks.Ranks`); the default runs alone."""

    def __init__(self, rows: Rows, labels, settings: Settings, *, comm=None, progress=None):
        self.rows, self.s = rows, settings.checked()
        rows.expect_tau(self.s.tau)
        self.comm = comm or Local()
        self.progress = progress
        self.device = torch.device(self.s.device or rows.device)
        self.n = rows.n
        labels = read_labels(labels)
        if labels.shape[0] != self.n:
            raise DataError(f"labels must be a 1-D integer array of {self.n} entries, got {labels.shape[0]}")
        self.lab, self.classes, self.y = _compact(labels)
        self.m = int(self.lab.sum())
        self.s = self.s.replace(rounds=self.s.rounds_for(self.m, self.n - self.m))  # "auto" resolved
        self.num_classes = len(self.classes)
        self.pool = self.s.pool if self.m < self.n else "all"
        self.lo, self.hi = self.comm.span(self.n)
        self.cap = self.s.voter_cap(self.m, self.n - self.m)
        self.prior = np.bincount(self.y[self.lab], minlength=self.num_classes) / self.m

    # -- the run ---------------------------------------------------------------------------------
    def run(self, *, top_classes: int = 0, voter_ids: bool = False):
        """Labels every row. Returns a :class:`Result`; with several K (``Settings(k=(10, 20))``) a
        ``{k: Result}`` dict, each equal to the run with that K alone (one round: one selection of
        the largest K for all; more rounds: one run per K, as the voters that join depend on K)."""
        ks = self.s.ks
        if len(ks) > 1 and self.s.rounds > 1:
            return {k: self._with(k).run(top_classes=top_classes, voter_ids=voter_ids) for k in ks}
        run = self.start(ks, top_classes, voter_ids)
        new = np.flatnonzero(self.lab)
        for r in range(1, self.s.rounds + 1):
            # A round that no row joins leaves the voters, and so every vote, as they were: it is
            # passed over, but the quotas go on growing (a small class may gain its next voter only
            # rounds later).
            if len(new):
                run.rounds_run = r
                voters = self.add_voters(run, new, r)
                self.vote_pass(run, voters, r)
            if r == self.s.rounds or run.is_voter.all():  # the last round, or no row left to vote on
                break
            new = self.next_voters(run, r)
        results = self.results(run, top_classes, voter_ids)
        return dict(zip(ks, results)) if isinstance(self.s.k, (tuple, list)) else results[0]

    def _with(self, k: int) -> Engine:
        other = Engine.__new__(Engine)
        other.__dict__.update(self.__dict__)
        other.s = self.s.replace(k=k)
        return other

    # -- the steps -------------------------------------------------------------------------------
    def start(self, ks: tuple[int, ...], top_classes: int, voter_ids: bool) -> _Run:
        """The state before round 1: labeled rows hold their class with confidence 1."""
        run = _Run(
            ks=ks,
            label=np.tile(self.y, (len(ks), 1)),
            conf=np.tile(np.where(self.lab, 1.0, 0.0).astype(np.float32), (len(ks), 1)),
            is_voter=self.lab.copy(),
            key=np.zeros(self.n, np.float64) if self.s.rounds > 1 and self.s.ties == "score" else None,
        )
        own = self.hi - self.lo
        if self.s.rounds > 1:  # every earlier voter's part of each owned row's top-K (no row has more than N)
            width = min(max(ks), self.n)
            run.state = (
                torch.full((own, width), -math.inf, dtype=self.rows.dtype, device=self.device),
                torch.full((own, width), -1, dtype=torch.int32, device=self.device),
            )
        if top_classes:
            own_lab = np.flatnonzero(self.lab[self.lo : self.hi])
            for k in ks:
                tc, tp = np.full((own, top_classes), -1, np.int64), np.zeros((own, top_classes), np.float32)
                tc[own_lab, 0], tp[own_lab, 0] = self.y[self.lo : self.hi][own_lab], 1.0
                run.extras[("top_classes", k)], run.extras[("top_probs", k)] = tc, tp
        if voter_ids:
            for k in ks:
                run.extras[("voters", k)] = np.full((own, k), -1, np.int64)
        return run

    def add_voters(self, run: _Run, new: np.ndarray, r: int) -> _Voters:
        """The rows ``new`` join the voters: their density (docs/method.md §1.1, streamed over the
        pool) and weight make their ``b_i`` (§7.1); they enter the book in joining order."""
        x_new = self.rows.take(new).to(self.device)
        bias = self.density(x_new, r) if self.s.density else None
        if self.s.weight != 1.0:
            log_w = torch.from_numpy(np.where(self.lab[new], math.log(self.s.weight), 0.0)).to(self.device)
            bias = (log_w.neg() if bias is None else bias.double() - log_w).to(x_new.dtype)
        voters = _Voters(x_new, torch.from_numpy(run.label[0, new]).to(self.device), bias, run.n_voters)
        run.book_rows.append(new)
        run.book_class.append(run.label[0, new])
        run.book_bias.append(None if bias is None else bias.cpu().numpy())
        return voters

    def density(self, x_new: torch.Tensor, r: int) -> torch.Tensor:
        """log_rho of the new voters over the pool (docs/method.md §1.1), streamed block by block."""
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
        return log_sum_exp(values)

    def vote_pass(self, run: _Run, voters: _Voters, r: int) -> None:
        """Every owned row that is not a voter selects its best new voters (merged into its running
        top-K) and votes, block by block (docs/method.md §1.2 with the voters' ``b_i``)."""
        bar = _Bar(self.progress, self.hi - self.lo, self._desc(r, "vote"))
        classes = torch.from_numpy(np.concatenate(run.book_class)).to(self.device)
        for a, b in self.rows.blocks(self.s.chunk, self.lo, self.hi):
            q = np.flatnonzero(~run.is_voter[a:b])
            if len(q):
                self._vote_block(run, voters, classes, a, b, q)
            bar.update(b - a)
        bar.close()

    def _vote_block(self, run: _Run, voters: _Voters, classes: torch.Tensor, a: int, b: int, q: np.ndarray) -> None:
        """Rows ``a + q`` of the block [a, b) select and vote."""
        sel = a + q
        xq = self.rows.read(a, b)[torch.from_numpy(q)].to(self.device)
        n_voters = run.n_voters
        init = None
        if run.state is not None:
            at = torch.from_numpy(sel - self.lo).to(self.device)
            init = (run.state[0][at], run.state[1][at])
        width = run.state[0].shape[1] if run.state is not None else min(max(run.ks), n_voters)
        top = neighbours(xq, voters.x, voters.bias, k=width, tau=self.s.tau, init=init, index_offset=voters.offset)
        if run.state is not None:
            run.state[0][at], run.state[1][at] = top.values, top.indices.to(torch.int32)
        for j, k in enumerate(run.ks):
            k = min(k, n_voters)
            vals, ids = top.values[:, :k], top.indices[:, :k]
            lq, cq = vote(vals, ids, self.num_classes, table=classes)
            run.label[j, sel], run.conf[j, sel] = lq.cpu().numpy(), cq.float().cpu().numpy()
            if j == 0 and run.key is not None:  # equal confidences join by the best voter's score
                run.key[sel] = vals[:, 0].double().cpu().numpy()
            own = sel - self.lo
            if ("top_classes", run.ks[j]) in run.extras:
                width = run.extras[("top_classes", run.ks[j])].shape[1]
                tc, tp = class_shares(vals, ids, self.num_classes, width, table=classes)
                run.extras[("top_classes", run.ks[j])][own, : tc.shape[1]] = tc.cpu().numpy()
                run.extras[("top_probs", run.ks[j])][own, : tp.shape[1]] = tp.cpu().numpy()
            if ("voters", run.ks[j]) in run.extras:
                run.extras[("voters", run.ks[j])][own, :k] = run.voter_rows[ids.cpu().numpy()]

    def next_voters(self, run: _Run, r: int) -> np.ndarray:
        """After round ``r``: every rank's votes gathered, the quotas of docs/method.md §7.1 pick the
        rows that join (they keep this round's label and confidence for good)."""
        run.label[0] = self.comm.gather(run.label[0, self.lo : self.hi])
        run.conf[0] = self.comm.gather(run.conf[0, self.lo : self.hi])
        if run.key is not None:
            run.key = self.comm.gather(run.key[self.lo : self.hi])
        new = select_voters(
            run.label[0], run.conf[0], run.is_voter, self.lab, r, self.s.rounds, self.cap, self.prior, key=run.key
        )
        run.is_voter[new] = True
        return new

    def results(self, run: _Run, top_classes: int, voter_ids: bool) -> list[Result]:
        """One :class:`Result` per K, every rank's rows gathered, in the caller's label values."""
        out = []
        for j, k in enumerate(run.ks):
            label = self.comm.gather(run.label[j, self.lo : self.hi])
            res = Result(
                labels=np.where(label >= 0, self.classes[np.maximum(label, 0)], -1).astype(self.classes.dtype),
                confidence=self.comm.gather(run.conf[j, self.lo : self.hi]),
                classes=self.classes,
                voter_rows=np.concatenate(run.book_rows),
                voter_classes=np.concatenate(run.book_class),
                voter_bias=None if run.book_bias[0] is None else np.concatenate(run.book_bias),
                rounds_run=run.rounds_run,
                k=k,
            )
            if top_classes:
                tc = self.comm.gather(run.extras[("top_classes", k)])
                res.top_classes = np.where(tc >= 0, self.classes[np.maximum(tc, 0)], -1)
                res.top_probs = self.comm.gather(run.extras[("top_probs", k)])
            if voter_ids:
                res.voters = self.comm.gather(run.extras[("voters", k)])
            out.append(res)
        return out

    def _desc(self, r: int, what: str) -> str:
        return f"round {r}/{self.s.rounds} {what}" if self.s.rounds > 1 else what


def label_embeddings(embeddings, labels, settings: Settings | None = None, *, normalize=True, progress=None, **options):
    """LLP labels for fixed embeddings: ``embeddings`` an (N, D) array or tensor (CPU or CUDA: the
    run stays on the tensor's device unless ``device`` says otherwise), a ``.npy`` path or a
    directory of ``.npy`` shards; ``labels`` (N,) ints (-1 = unlabeled), an array, a tensor or a
    ``.npy`` path. ``settings`` (or keyword options ``k``, ``t``, ``tau``, ``density``,
    ``density_pool``, ``labeled_weight``, ``rounds``, ``max_voters``, ``chunk``, ``device``) as
    :class:`Settings`; ``top_classes=P`` and ``voter_ids=True`` ask for the optional outputs of
    :class:`Result`. Returns a :class:`Result`, or ``{k: Result}`` for several ``k``."""
    extra = {key: options.pop(key) for key in ("top_classes", "voter_ids") if key in options}
    settings = (settings or Settings()).replace(**options)
    rows = Rows(embeddings, normalize=normalize)
    t0 = time.perf_counter()
    result = Engine(rows, read_labels(labels, rows.n), settings, progress=progress).run(**extra)
    for res in result.values() if isinstance(result, dict) else (result,):
        res.seconds = time.perf_counter() - t0
    return result
