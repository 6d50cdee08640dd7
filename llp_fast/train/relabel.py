"""Propagation that sees the whole bank (docs/method.md §8.1): at a density refresh, the multi-round
vote of docs/method.md §7 over every bank row relabels every unlabeled example.

The per-step propagation of §1.6 votes one batch against the labeled rows alone, so an example far
from every labeled point is voted on by neighbours that are not near it. The multi-round vote lets
the confidently labeled unlabeled rows vote for the rows beyond them, as label spreading over a
graph would, while staying local: each row still takes its K best voters, density-weighted. It runs
through the same engine and ops as ``llp-fast-propagate`` (:mod:`llp_fast.embeddings`), streamed in
blocks, with the pseudo-labeled voters capped at ``max_voters`` so that one refresh costs
O(N (M + cap)) and never O(N^2).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .._progress import fmt_time
from ..embeddings.engine import Engine
from ..embeddings.settings import Settings
from ..embeddings.sources import Rows


class _ShardRows:
    """The engine's view of a sharded bank's rows (:class:`~llp_fast.distributed.ShardedMemoryBank`):
    rows numbered by dataset index, this rank owning [start, end) as the bank does. ``read`` serves
    the owned rows; ``take`` (the new voters, anywhere) is collective: each rank fills the rows it
    owns and an all-reduce sums them, exact since every row has one owner."""

    def __init__(self, bank):
        loc = bank.local
        self.bank, self.n, self.dim = bank, len(bank), loc.embeddings.shape[1]
        self.dtype = torch.float32
        self.own = loc.embeddings[torch.argsort(loc.index_of)].float()  # owned rows, dataset order

    def expect_tau(self, tau: float) -> None:
        """(The bank's rows are unit vectors, kept so by every update: no check to make.)"""

    def blocks(self, chunk: int, lo: int = 0, hi: int | None = None):
        hi = self.n if hi is None else hi
        for a in range(lo, hi, chunk):
            yield a, min(hi, a + chunk)

    def read(self, a: int, b: int) -> torch.Tensor:
        return self.own[a - self.bank.start : b - self.bank.start].clone()

    def take(self, rows) -> torch.Tensor:
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.own.device)
        out = torch.zeros(rows.shape[0], self.dim, device=self.own.device)
        mine = (rows >= self.bank.start) & (rows < self.bank.end)
        out[mine] = self.own[rows[mine] - self.bank.start]
        torch.distributed.all_reduce(out, group=self.bank.group)
        return out


def _settings(cfg, k: int, device) -> Settings:
    """The engine's settings for the whole-bank vote: ``--max-voters`` as given (0 is a cap of 0, as
    for ``llp-fast-propagate``; it was read as no cap), and with one round the run's
    ``--density-pool``, as the one-round start vote and the density refreshes take it (more rounds:
    every row, docs/method.md §7.2)."""
    return Settings(
        k=k,
        t=cfg.t,
        tau=cfg.tau,
        density=cfg.density_weighting,
        density_pool=cfg.density_pool if cfg.refresh_rounds == 1 else "auto",
        rounds=cfg.refresh_rounds,
        max_voters=cfg.max_voters,
        device=str(device),
        ties="row",  # (docs/method.md §8: the trainer's results were measured with it)
    )


@torch.no_grad()
def relabel(bank, cfg, *, k: int, progress=None) -> dict:
    """Stores the whole-bank vote's label and confidence for every unlabeled row of ``bank``;
    returns ``{"relabel_changed": fraction of unlabeled rows whose label changed, "relabel_seconds"}``.

    A :class:`~llp_fast.MemoryBank` (or a replicated bank, whose ranks all hold every row and compute
    the same) votes over its rows in bank order; a sharded bank's ranks each stream the rows they own
    and exchange the voters and the votes (the engine's ranks), never gathering the bank."""
    t0 = time.perf_counter()
    if hasattr(bank, "local"):  # sharded
        return _relabel_sharded(bank, cfg, k=k, progress=progress, t0=t0)
    m, n = bank.num_labeled, len(bank)
    if m == n:
        return {}
    labels = np.full(n, -1, dtype=np.int64)
    labels[:m] = bank.labeled_classes.cpu().numpy()
    settings = _settings(cfg, k, bank.device).replace(t=min(cfg.t, n))
    res = Engine(Rows(bank.embeddings.float(), normalize=False), labels, settings, progress=progress).run()
    before = bank.labels[m:].clone()
    new = torch.from_numpy(np.ascontiguousarray(res.labels[m:])).to(bank.device)
    conf = torch.from_numpy(np.ascontiguousarray(res.confidence[m:])).to(bank.device)
    bank.set_labels(bank.index_of[m:], new, conf)
    changed = float((before != new).float().mean())
    return {"relabel_changed": changed, "relabel_seconds": time.perf_counter() - t0}


def _relabel_sharded(bank, cfg, *, k, progress, t0) -> dict:
    from ..embeddings.ranks import Ranks

    loc = bank.local
    labels = bank._targets.numpy().copy()  # global, dataset order: -1 unlabeled
    settings = _settings(cfg, k, bank.device).replace(t=min(cfg.t, len(bank)))
    res = Engine(_ShardRows(bank), labels, settings, comm=Ranks(bank.device), progress=progress).run()
    own = loc.index_of[loc.num_labeled :]  # this rank's unlabeled rows, local dataset indices
    glob = (own + bank.start).cpu().numpy()
    before = loc.labels[loc.num_labeled :].clone()
    new = torch.from_numpy(np.ascontiguousarray(res.labels[glob])).to(bank.device)
    conf = torch.from_numpy(np.ascontiguousarray(res.confidence[glob])).to(bank.device)
    loc.set_labels(own, new, conf)
    counts = torch.tensor([float((before != new).sum()), float(len(glob))], device=bank.device)
    torch.distributed.all_reduce(counts, group=bank.group)
    changed = float(counts[0] / counts[1].clamp_min(1))
    return {"relabel_changed": changed, "relabel_seconds": time.perf_counter() - t0}


def describe(stats: dict) -> str:
    return f"whole-bank vote: {stats['relabel_changed']:.1%} of labels changed ({fmt_time(stats['relabel_seconds'])})"
