"""A memory bank split over the ranks by contiguous dataset indices (see :mod:`llp_fast.distributed`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _validate as check
from .._interop import as_tensor
from .._topk import log_sum_exp, vote
from ..bank import MemoryBank, check_indices, check_new_labels
from ..ops import bank_update_, neighbours, topk_scores
from ..reference import is_last_occurrence
from .aggregation import ShardedAggregationLoss
from .agree import checked, gather_agreed, raw_digest, where
from .collectives import all_gather_cat, dist_chunk, merged_topk, offset_of_rank, shard_range


class ShardedMemoryBank:
    """A memory bank split over the ranks of ``group`` by contiguous dataset indices.

    Args are those of :class:`llp_fast.MemoryBank`; ``targets`` is the full (N,) label
    vector (-1 for unlabeled), identical on every rank. Every method is collective: all
    ranks call it, each with its own local batch. Rows start as the same vectors a single
    ``MemoryBank`` with the same seed starts from.

    Memory per rank: N/P x D x (2 bytes for bf16, 4 for fp32) for the embeddings, plus
    N/P x 12 bytes of labels and confidences, plus the gathered labeled rows during the
    density refresh (M x D) and the gathered batch per step.
    """

    def __init__(self, targets, num_classes, *, dim=128, dtype=torch.float32, device="cpu", seed=0, group=None):
        # Every rank builds its shard from the same targets and settings (one all-gather says so)
        settings = dict(num_classes=num_classes, dim=dim, dtype=dtype, seed=seed, targets=raw_digest(targets))
        agree = ("ShardedMemoryBank", settings)
        build = lambda: self._build(targets, num_classes, dim, dtype, device, seed, group)  # noqa: E731
        checked(build, *agree, group, where(device))
        gather_agreed(0, *agree, group, self.device)

    def _build(self, targets, num_classes, dim, dtype, device, seed, group) -> None:
        targets = as_tensor(targets, "targets")
        check.vector(  # before .long(): a float -0.7 (unlabeled) became 0, a labeled class 0
            targets, "targets", targets.shape[0] if targets.dim() == 1 else -1, device=targets.device, kind="int"
        )
        targets = targets.long().cpu()
        if not bool((targets >= 0).any()):
            raise ValueError("targets holds no labeled example (no entry >= 0): the labeled set is empty")
        # The whole vector, on every rank alike (each shard's own check raised on its rank alone,
        # and the others then waited in the first collective)
        num_classes = check.positive_int(num_classes, "num_classes")
        check.in_range(
            targets[targets >= 0], "targets", 0, num_classes, "labeled class ids must lie in [0, num_classes)"
        )
        self.group = group
        self._targets = targets
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.n = targets.shape[0]
        self.start, self.end = shard_range(self.n, self.rank, self.world)
        self.local = MemoryBank(
            targets[self.start : self.end],
            num_classes,
            dim=dim,
            dtype=dtype,
            device=device,
            seed=seed,
            index_offset=self.start,
            require_labeled=False,
        )
        self.num_classes = num_classes
        self.device = self.local.device
        self._labeled_mask = (targets >= 0).to(self.device)  # (N,) bool: every rank holds the targets
        # The labeled rows of every shard in dataset order are the single bank's labeled rows: this
        # shard's are positions [labeled_before, labeled_before + M_local) of that order, the
        # numbering (and tie-break) of a merged vote; their classes are known on every rank.
        self.labeled_before = int((targets[: self.start] >= 0).sum())
        self.labeled_classes_all = targets[targets >= 0].to(self.device)
        self.num_labeled_total = int((targets >= 0).sum())
        self.num_unlabeled_total = self.n - self.num_labeled_total

    def __len__(self) -> int:
        return self.n

    # -- helpers -------------------------------------------------------------------------
    def _owned(self, indices: torch.Tensor) -> torch.Tensor:
        return (indices >= self.start) & (indices < self.end)

    def _gather_batch(self, indices, agree, embeddings=None, tau: float | None = None):
        """The batch of every rank, checked as :meth:`MemoryBank._check_batch` checks one: finite,
        within the bank's dtype, and with ``tau`` scores that fit; ``agree``: the call and the
        settings every rank must pass alike (:mod:`llp_fast.distributed.agree`)."""
        indices = check_indices(indices, self.n, self.device)
        if embeddings is None:
            return all_gather_cat(indices, self.group, agree), None
        check.embeddings(embeddings, "embeddings")
        if embeddings.shape != (indices.shape[0], self.local.embeddings.shape[1]):
            raise ValueError(f"embeddings must have shape ({indices.shape[0]}, {self.local.embeddings.shape[1]})")
        size = check.finite(embeddings, "embeddings")
        check.blend_fits(self.local.embeddings, size, "embeddings")
        if tau is not None:
            check.scores_fit(tau, embeddings, "embeddings", self.local.embeddings, "bank", size, 1.0)
        # One gather for both: each row's index rides along as the bits of two float32 columns.
        d = embeddings.shape[1]
        bits = indices.contiguous().view(torch.float32).view(-1, 2)
        both = all_gather_cat(torch.cat([embeddings.detach().float(), bits], dim=1), self.group, agree)
        return both[:, d:].contiguous().view(torch.int64).view(-1), both[:, :d].contiguous()

    def _check_v(self, v, indices, finite: bool, tau: float) -> torch.Tensor:
        """A loss's batch: ``v`` in the bank's space (finite, with ``finite``) with one row per index
        in range (a width or length that differed on one rank went into the gather: misaligned
        losses, or gloo's abort of another rank)."""
        check.embeddings(v, "v")
        size = check.finite(v, "v") if finite else None
        check.same_space(self.local.embeddings, "bank", v, "v", dtype=False)
        self.local._check_cast(v, "v", size, tau)  # (a float16 bank, overflowing scores: as MemoryBank's)
        indices = check_indices(indices, self.n, self.device)
        if v.shape[0] != indices.shape[0]:
            raise ValueError(f"v has {v.shape[0]} rows but indices has {indices.shape[0]}")
        return indices

    def _k(self, k) -> int:
        return check.positive_int(k, "k", high=self.num_labeled_total, high_what="the number of labeled points M")

    def _density_settings(self, t, tau, pool) -> tuple[int, float]:
        if pool not in ("unlabeled", "all"):
            raise ValueError(f"pool must be 'unlabeled' or 'all', got {pool!r}")
        pool_size = self.num_unlabeled_total if pool == "unlabeled" else self.n
        return check.positive_int(t, "t", high=pool_size, high_what="the density pool size"), check.temperature(tau)

    def _vote_settings(self, queries, k, tau) -> tuple[int, float]:
        k, tau = self._k(k), check.temperature(tau)
        check.tensor(queries, "queries")
        self.local._check_cast(queries, "queries", check.finite(queries, "queries"), tau)  # (as MemoryBank.vote)
        return k, tau

    def _truth(self, truth) -> torch.Tensor:
        truth = as_tensor(truth, "truth", device=self.device)
        check.vector(truth, "truth", self.n, device=self.device, kind="int")
        return truth

    # -- docs/method.md §1 steps, collective ---------------------------------------------------------
    def stored(self, indices):
        """(labels, confidence) of dataset ``indices`` (this rank's batch), from their owners."""
        return self._stored(indices, ("ShardedMemoryBank.stored", {}))

    def _stored(self, indices, agree):
        """:meth:`stored`, its gather carrying ``agree`` (:meth:`loss`'s call and settings there)."""
        indices = check_indices(indices, self.n, self.device)
        idx_all, _ = self._gather_batch(indices, agree)
        own = self._owned(idx_all)
        labels = torch.zeros(idx_all.shape[0], dtype=torch.int64, device=self.device)
        conf = torch.zeros(idx_all.shape[0], device=self.device)
        rows = self.local.row_of[idx_all[own] - self.start]
        labels[own] = self.local.labels[rows]
        conf[own] = self.local.confidence[rows]
        dist.all_reduce(labels, group=self.group)
        dist.all_reduce(conf, group=self.group)
        lo = offset_of_rank(indices.shape[0], self.group, self.device)
        return labels[lo : lo + indices.shape[0]], conf[lo : lo + indices.shape[0]]

    def refresh_density(
        self, *, t: int = 25, tau: float = 0.07, pool: str = "unlabeled", progress=None
    ) -> torch.Tensor:
        """docs/method.md §1.1 over the whole sharded pool; returns this shard's labeled ``log_rho``.
        ``progress(done, total)``: after each round, in this rank's labeled rows."""
        agree = ("ShardedMemoryBank.refresh_density", dict(t=t, tau=tau, pool=pool))
        t, tau = checked(lambda: self._density_settings(t, tau, pool), *agree, self.group, self.device)
        m_local = self.local.num_labeled
        keys = self.local.embeddings[m_local:] if pool == "unlabeled" else self.local.embeddings
        # Rounds of at most `chunk` labeled rows per rank keep the gathered rows (P*chunk*D)
        # and candidates (P*P*chunk*T) bounded whatever M is; all ranks run the same rounds.
        chunk = dist_chunk()
        rounds = max(gather_agreed(-(-m_local // chunk), *agree, self.group, self.device))
        log_rho = torch.empty(m_local, device=self.device)
        for r in range(rounds):
            mine = self.local.labeled_embeddings[r * chunk : (r + 1) * chunk]
            gathered = all_gather_cat(mine, self.group)
            # This shard's top-T of every gathered labeled row (keys numbered by bank row + start:
            # distinct across ranks), merged over the ranks into the top-T over the whole pool.
            top = topk_scores(gathered, keys, k=t, tau=tau, index_offset=self.start, check_finite=False)
            values, _ = merged_topk(top.values.float(), top.indices, t, self.group)
            lo = offset_of_rank(mine.shape[0], self.group, self.device)
            log_rho[r * chunk : r * chunk + mine.shape[0]] = log_sum_exp(values[lo : lo + mine.shape[0]])
            if progress is not None:
                progress(min(m_local, (r + 1) * chunk), m_local)
        self.local.log_rho = log_rho
        return self.local.log_rho

    def loss(self, v: torch.Tensor, indices, *, tau: float = 0.07, targets=None, check_finite=True) -> torch.Tensor:
        """Aggregation loss of this rank's batch against the whole sharded bank; (B,).
        ``targets``: the batch's stored labels if already fetched with :meth:`stored` (which
        costs a gather and two all-reduces); ``check_finite`` as :meth:`MemoryBank.loss`'s."""
        agree = ("ShardedMemoryBank.loss", {"tau": tau, "targets given": targets is not None})
        tau = checked(lambda: check.temperature(tau), *agree, self.group, self.device)
        self._check_v(v, indices, check_finite, tau)
        if targets is None:
            targets, _ = self._stored(indices, agree)
        targets = as_tensor(targets, "targets", device=self.device)
        check.vector(targets, "targets", v.shape[0], device=self.device, kind="int")
        return ShardedAggregationLoss.apply(
            v.to(self.local.embeddings.dtype),
            self.local.embeddings,
            self.local.labels,
            targets,
            tau,
            self.group,
            agree,
        )

    def instance_loss(self, v: torch.Tensor, indices, *, tau: float = 0.07, check_finite=True) -> torch.Tensor:
        """Instance discrimination against the whole sharded bank (the warm-up); (B,)."""
        agree = ("ShardedMemoryBank.instance_loss", {"tau": tau})
        tau = checked(lambda: check.temperature(tau), *agree, self.group, self.device)
        indices = self._check_v(v, indices, check_finite, tau).long()
        ids = -1 - (self.local.index_of + self.start)
        return ShardedAggregationLoss.apply(
            v.to(self.local.embeddings.dtype),
            self.local.embeddings,
            ids,
            -1 - indices,
            tau,
            self.group,
            agree,
        )

    @torch.no_grad()
    def set_labels(self, indices, labels, confidence) -> None:
        """:meth:`MemoryBank.set_labels` with the same global vectors on every rank (not
        collective): the whole batch is checked on every rank, then each rank stores the
        rows it owns."""
        indices = check_indices(indices, self.n, self.device)
        labeled = self._labeled_mask[indices]
        check_new_labels(labels, confidence, indices.shape[0], self.num_classes, self.device, labeled)
        own = self._owned(indices)
        self.local.set_labels(indices[own] - self.start, labels[own], confidence[own])

    @torch.no_grad()
    def update(self, indices, embeddings, *, momentum: float = 0.5) -> None:
        """docs/method.md §1.6's blend for the global batch; every rank writes the rows it owns."""
        agree = ("ShardedMemoryBank.update", {"momentum": momentum})
        momentum = checked(lambda: check.unit_interval(momentum, "momentum"), *agree, self.group, self.device)
        idx_all, emb_all = self._gather_batch(indices, agree, embeddings)
        own = self._owned(idx_all)
        if bool(own.any()):
            rows = self.local.row_of[idx_all[own] - self.start]
            bank_update_(self.local.embeddings, rows, emb_all[own], momentum=momentum, check_finite=False)

    @torch.no_grad()
    def gather(self) -> MemoryBank:
        """The whole bank as one single-process :class:`MemoryBank` on every rank (collective;
        N x D memory on each): to export or inspect all rows where they fit. The trainer never
        calls it: its checkpoints store each rank's rows (one file a rank) and its diagnostics
        merge per-shard results."""
        loc = self.local
        order = torch.argsort(loc.index_of)  # local rows in dataset order
        emb = all_gather_cat(loc.embeddings[order].contiguous(), self.group, ("ShardedMemoryBank.gather", {}))
        labels = all_gather_cat(loc.labels[order].contiguous(), self.group)
        conf = all_gather_cat(loc.confidence[order].contiguous(), self.group)
        log_rho_by_index = torch.zeros(self.n, device=self.device)
        log_rho_by_index[loc.index_of[: loc.num_labeled] + self.start] = loc.log_rho.float()
        dist.all_reduce(log_rho_by_index, group=self.group)
        full = self._empty_full()
        full.embeddings.copy_(emb[full.index_of])
        full.labels.copy_(labels[full.index_of])
        full.confidence.copy_(conf[full.index_of])
        full.log_rho = log_rho_by_index[full.index_of[: full.num_labeled]].contiguous()
        return full

    @property
    def index_range(self) -> tuple[int, int]:
        """The dataset indices [start, end) this rank owns."""
        return self.start, self.end

    def rows_state(self) -> dict:
        """This rank's rows (:meth:`MemoryBank.rows_state`, global dataset indices): a checkpoint
        writes one piece per rank, so no rank ever holds the whole bank."""
        return self.local.rows_state()

    def load_rows(self, pieces: list[dict]) -> None:
        """This rank's rows from checkpoint pieces written at any world size (not collective)."""
        self.local.load_rows(pieces)

    @torch.no_grad()
    def load_full(self, full_state: dict) -> None:
        """Takes this rank's shard from a single-process bank state (see :meth:`gather`),
        whatever world size wrote it. Checked first; nothing is written on failure."""
        full = self._empty_full()
        full.load_state_dict(full_state)
        loc = self.local
        rows_full = full.row_of[loc.index_of + self.start]
        loc.embeddings.copy_(full.embeddings[rows_full])
        loc.labels.copy_(full.labels[rows_full])
        loc.confidence.copy_(full.confidence[rows_full])
        loc.log_rho = full.log_rho[full.row_of[loc.index_of[: loc.num_labeled] + self.start]].contiguous()

    def _empty_full(self) -> MemoryBank:
        loc = self.local
        return MemoryBank(
            self._targets, self.num_classes, dim=loc.embeddings.shape[1], dtype=loc.embeddings.dtype, device=self.device
        )

    @torch.no_grad()
    def step(
        self,
        indices,
        embeddings,
        *,
        k: int = 10,
        tau: float = 0.07,
        momentum: float = 0.5,
        density_weighting: bool = True,
    ):
        """docs/method.md §1.6 for the global batch: propagate its unlabeled examples (merging every
        shard's top-K), store label and confidence at the owners, then blend the owned rows
        in gathered order. Returns (labels, confidence) of the gathered unlabeled examples."""
        agree = ("ShardedMemoryBank.step", dict(k=k, tau=tau, momentum=momentum, density_weighting=density_weighting))
        valid = lambda: (self._k(k), check.temperature(tau), check.unit_interval(momentum, "momentum"))  # noqa: E731
        k, tau, momentum = checked(valid, *agree, self.group, self.device)
        idx_all, emb_all = self._gather_batch(indices, agree, embeddings, tau)
        labels, conf, sel = self._propagate(idx_all, emb_all, k, tau, density_weighting)
        own = self._owned(idx_all)
        store = sel & own
        rows = self.local.row_of[idx_all[store] - self.start]
        self.local.labels[rows] = labels[store[sel]]
        self.local.confidence[rows] = conf[store[sel]].float()
        if bool(own.any()):
            bank_update_(
                self.local.embeddings,
                self.local.row_of[idx_all[own] - self.start],
                emb_all[own],
                momentum=momentum,
                check_finite=False,
            )
        return labels, conf

    def _propagate(self, idx_all, emb_all, k, tau, density_weighting):
        """Labels of the gathered batch's unlabeled examples (last occurrence of a repeated
        index), identical on every rank; ``sel`` marks them in the gathered batch."""
        # Labeled or not is the full target vector's, which every rank holds (no collective).
        is_labeled = self._labeled_mask[idx_all]
        sel = ~is_labeled & is_last_occurrence(idx_all)
        labels, conf = self._merged_vote(emb_all[sel], k, tau, density_weighting)
        return labels, conf, sel

    def _merged_vote(self, queries, k, tau, density_weighting):
        """docs/method.md §1.2 for ``queries`` (the same on every rank) against the labeled rows of
        every shard: each shard's top-K (numbered by labeled position in dataset order), merged over
        the ranks (ties to the lower position, as in one bank), then the vote."""
        log_rho = self.local.log_rho if density_weighting else None
        queries = queries.to(self.local.embeddings.dtype)
        top = neighbours(
            queries, self.local.labeled_embeddings, log_rho, k=k, tau=tau, index_offset=self.labeled_before
        )
        values, indices = merged_topk(top.values.float(), top.indices, k, self.group)
        return vote(values, indices, self.num_classes, table=self.labeled_classes_all)

    @torch.no_grad()
    def vote(self, queries: torch.Tensor, *, k: int = 10, tau: float = 0.07, density_weighting: bool = True):
        """:meth:`MemoryBank.vote` over every shard (collective; every rank passes the same
        ``queries`` and gets the same labels)."""
        rows = queries.shape[0] if isinstance(queries, torch.Tensor) and queries.dim() else -1
        settings = {"queries' rows": rows, "k": k, "tau": tau, "density_weighting": density_weighting}
        agree = ("ShardedMemoryBank.vote", settings)
        k, tau = checked(lambda: self._vote_settings(queries, k, tau), *agree, self.group, self.device)
        gather_agreed(0, *agree, self.group, self.device)
        return self._merged_vote(queries, k, tau, density_weighting)

    @torch.no_grad()
    def class_statistics(self, truth: torch.Tensor) -> dict:
        """:meth:`MemoryBank.class_statistics` of the whole bank: each shard's sums, all-reduced
        (collective; no rank holds more than its own rows)."""
        # the whole vector on every rank (a slice's check let a longer one through, and a shorter one
        # failed on one rank alone while the others waited out the timeout)
        agree = ("ShardedMemoryBank.class_statistics", {"truth": raw_digest(truth)})
        truth = checked(lambda: self._truth(truth), *agree, self.group, self.device)
        local = self.local.class_statistics(truth[self.start : self.end])
        gather_agreed(0, *agree, self.group, self.device)
        out = {}
        for key, value in local.items():
            scalar = not isinstance(value, torch.Tensor)
            t = torch.tensor(value, dtype=torch.float64, device=self.device) if scalar else value
            dist.all_reduce(t, group=self.group)
            out[key] = type(value)(t.item()) if scalar else t
        return out

    def truncate(self, n: int) -> None:
        if n < self.n:
            raise NotImplementedError("a sharded bank keeps its rows (--extra-unlabeled runs in one process)")

    def state_dict(self) -> dict:
        return dict(self.local.state_dict(), shard=(self.start, self.end, self.n))

    def load_state_dict(self, state: dict) -> None:
        if tuple(state.get("shard", ())) != (self.start, self.end, self.n):
            raise ValueError(
                f"bank state is for shard {state.get('shard')}, this rank owns {(self.start, self.end, self.n)}"
            )
        self.local.load_state_dict({k: v for k, v in state.items() if k != "shard"})
