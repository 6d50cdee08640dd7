"""LLP across processes with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Two layouts of the memory bank:

* :class:`ShardedMemoryBank` — rank r owns the contiguous dataset indices
  ``[r*N/P, (r+1)*N/P)`` (N/P rows, its own labeled and unlabeled ones). Per step the ranks
  all-gather the batch embeddings, indices and targets; each computes partial results over
  its shard and the partials are combined exactly:

  - aggregation loss: per-shard log-sum-exps, combined with all-reduces (max, then sum of
    exponentials); the backward all-gathers the output gradients, each shard adds its rows'
    share of ``sum_j (p_j - q_j) m_j / tau`` for the whole global batch, and an all-reduce
    sums the shares — the gradient is exact;
  - propagation: each shard's top-K candidates (score, global labeled index, class) are
    all-gathered and the P*K candidates merged, ties broken by the lower global index;
  - density refresh: the labeled rows are all-gathered, each shard finds its top-T pool
    scores for every labeled row, and the P*T candidates are merged the same way;
  - bank update: every rank writes the rows it owns, in the order of the gathered batch.

* :class:`ReplicatedMemoryBank` — every rank holds the full bank and applies the gathered
  batch to it, so all copies stay identical; simpler, for when N fits on one device.

Every collective runs under the process group's timeout (set it in
``init_process_group``; :func:`init` uses 10 minutes, ``LLP_FAST_DIST_TIMEOUT`` seconds to
change it), so a rank that dies makes the others fail instead of hanging.
"""

from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist

from . import _validate as check
from .bank import MemoryBank, check_new_labels
from .ops import bank_update_
from .reference import is_last_occurrence, streaming_topk, vote

__all__ = [
    "init",
    "launched",
    "shard_range",
    "all_gather_cat",
    "ShardedMemoryBank",
    "ReplicatedMemoryBank",
]


def launched() -> bool:
    """True inside a multi-process launch (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialises the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) if it is not yet; returns (rank, world_size)."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        timeout = datetime.timedelta(seconds=float(os.environ.get("LLP_FAST_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The dataset indices [start, end) that ``rank`` owns: contiguous, sizes differ by <= 1."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_cat(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenation over ranks (rank order) of tensors whose first dimension may differ."""
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _merge_topk(vals: torch.Tensor, keys: torch.Tensor, k: int):
    """Top-k of candidate rows ``vals`` (R, C), ties broken by the lower ``keys`` (global
    index). Returns (values, positions) sorted by descending value."""
    by_key = torch.argsort(keys, dim=1, stable=True)
    v = vals.gather(1, by_key)
    order = torch.argsort(-v, dim=1, stable=True)[:, :k]
    return v.gather(1, order), by_key.gather(1, order)


def _candidates(queries, keys, k, tau, *, bias=None, key_mask=None):
    """Per-shard top-k (values, local positions), padded to k with -inf (a shard may hold
    fewer than k candidates, or none)."""
    n_q = queries.shape[0]
    kk = min(k, keys.shape[0] if key_mask is None else int(key_mask.sum()))
    vals = torch.full((n_q, k), -math.inf, device=queries.device)
    pos = torch.zeros((n_q, k), dtype=torch.int64, device=queries.device)
    if kk > 0 and n_q > 0:
        for r0, v, i in streaming_topk(queries, keys, kk, tau, bias=bias, key_mask=key_mask):
            vals[r0 : r0 + v.shape[0], :kk] = v.float()
            pos[r0 : r0 + v.shape[0], :kk] = i
    return vals, pos


def _lse_combine(lse: torch.Tensor, group) -> torch.Tensor:
    """log(sum over ranks of exp(lse)), elementwise, stable."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(lse - safe)
    dist.all_reduce(total, group=group)
    return torch.log(total) + safe


class _ShardedAggregationLoss(torch.autograd.Function):
    """L_A for the local batch against a bank sharded over ranks; exact value and gradient."""

    @staticmethod
    def forward(ctx, v, shard, shard_labels, targets, tau, group):
        v_all = all_gather_cat(v.detach(), group)
        t_all = all_gather_cat(targets, group)
        _, lse_all, lse_pos = torch.ops.llp_fast.aggregation_loss(v_all, shard, shard_labels, t_all, tau)
        lse_all = _lse_combine(lse_all.float(), group)
        lse_pos = _lse_combine(lse_pos.float(), group)
        rank_start = _offset_of_rank(v.shape[0], group, v.device)
        ctx.save_for_backward(v_all, shard, shard_labels, t_all, lse_all, lse_pos)
        ctx.tau, ctx.group, ctx.rows = tau, group, (rank_start, rank_start + v.shape[0])
        ctx.v_dtype = v.dtype
        return (lse_all - lse_pos)[rank_start : rank_start + v.shape[0]]

    @staticmethod
    def backward(ctx, grad):
        v_all, shard, shard_labels, t_all, lse_all, lse_pos = ctx.saved_tensors
        g_all = all_gather_cat(grad.contiguous().float(), ctx.group)
        part = torch.ops.llp_fast.aggregation_loss_backward(
            v_all, shard, shard_labels, t_all, lse_all, lse_pos, g_all, -g_all, ctx.tau
        ).float()
        dist.all_reduce(part, group=ctx.group)
        lo, hi = ctx.rows
        return part[lo:hi].to(ctx.v_dtype), None, None, None, None, None


def _offset_of_rank(n_local: int, group, device) -> int:
    """Where this rank's rows start in an all_gather_cat of per-rank batches."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = torch.tensor([n_local], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    return int(sum(int(s) for s in sizes[:rank]))


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
        targets = torch.as_tensor(targets).long().cpu()
        if not bool((targets >= 0).any()):
            raise ValueError("targets holds no labeled example (no entry >= 0): the labeled set is empty")
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
        # Global dataset index of each local labeled row: the tie-break key for merges.
        self.labeled_global = self.local.index_of[: self.local.num_labeled] + self.start
        self.num_labeled_total = int((targets >= 0).sum())
        self.num_unlabeled_total = self.n - self.num_labeled_total

    def __len__(self) -> int:
        return self.n

    # -- helpers -------------------------------------------------------------------------
    def _owned(self, indices: torch.Tensor) -> torch.Tensor:
        return (indices >= self.start) & (indices < self.end)

    def _checked_indices(self, indices) -> torch.Tensor:
        indices = torch.as_tensor(indices, device=self.device)
        check.vector(indices, "indices", indices.shape[0] if indices.dim() == 1 else -1, device=self.device, kind="int")
        check.in_range(indices, "indices", 0, self.n, "dataset indices")
        return indices

    def _gather_batch(self, indices, embeddings=None):
        indices = self._checked_indices(indices)
        idx_all = all_gather_cat(indices.long(), self.group)
        if embeddings is None:
            return idx_all, None
        check.embeddings(embeddings, "embeddings")
        if embeddings.shape != (indices.shape[0], self.local.embeddings.shape[1]):
            raise ValueError(f"embeddings must have shape ({indices.shape[0]}, {self.local.embeddings.shape[1]})")
        check.finite(embeddings, "embeddings")
        return idx_all, all_gather_cat(embeddings.detach().float(), self.group)

    # -- SPEC §1 steps, collective ---------------------------------------------------------
    def stored(self, indices):
        """(labels, confidence) of dataset ``indices`` (this rank's batch), from their owners."""
        indices = torch.as_tensor(indices, device=self.device).long()
        idx_all, _ = self._gather_batch(indices)
        own = self._owned(idx_all)
        labels = torch.zeros(idx_all.shape[0], dtype=torch.int64, device=self.device)
        conf = torch.zeros(idx_all.shape[0], device=self.device)
        rows = self.local.row_of[idx_all[own] - self.start]
        labels[own] = self.local.labels[rows]
        conf[own] = self.local.confidence[rows]
        dist.all_reduce(labels, group=self.group)
        dist.all_reduce(conf, group=self.group)
        lo = _offset_of_rank(indices.shape[0], self.group, self.device)
        return labels[lo : lo + indices.shape[0]], conf[lo : lo + indices.shape[0]]

    def refresh_density(self, *, t: int = 25, tau: float = 0.07, pool: str = "unlabeled") -> torch.Tensor:
        """SPEC §1.1 over the whole sharded pool; returns this shard's labeled ``log_rho``."""
        if pool not in ("unlabeled", "all"):
            raise ValueError(f"pool must be 'unlabeled' or 'all', got {pool!r}")
        pool_size = self.num_unlabeled_total if pool == "unlabeled" else self.n
        t = check.positive_int(t, "t", high=pool_size, high_what="the density pool size")
        tau = check.temperature(tau)
        m_local = self.local.num_labeled
        keys = self.local.embeddings[m_local:] if pool == "unlabeled" else self.local.embeddings
        # Rounds of at most `chunk` labeled rows per rank keep the gathered rows (P*chunk*D)
        # and candidates (P*P*chunk*T) bounded whatever M is; all ranks run the same rounds.
        chunk = int(os.environ.get("LLP_FAST_DIST_CHUNK", "16384"))
        rounds = torch.tensor([(m_local + chunk - 1) // chunk], device=self.device)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX, group=self.group)
        log_rho = torch.empty(m_local, device=self.device)
        for r in range(int(rounds)):
            mine = self.local.labeled_embeddings[r * chunk : (r + 1) * chunk]
            gathered = all_gather_cat(mine, self.group)
            vals, _ = _candidates(gathered, keys, t, tau)
            merged = torch.cat(self._all_gather_same(vals), dim=1).topk(t, dim=1).values
            lo = _offset_of_rank(mine.shape[0], self.group, self.device)
            log_rho[r * chunk : r * chunk + mine.shape[0]] = torch.logsumexp(merged[lo : lo + mine.shape[0]], dim=1)
        self.local.log_rho = log_rho
        return self.local.log_rho

    def loss(self, v: torch.Tensor, indices, *, tau: float = 0.07, targets=None) -> torch.Tensor:
        """Aggregation loss of this rank's batch against the whole sharded bank; (B,).
        ``targets``: the batch's stored labels if already fetched with :meth:`stored` (which
        costs a gather and two all-reduces)."""
        tau = check.temperature(tau)
        check.embeddings(v, "v")
        if targets is None:
            targets, _ = self.stored(indices)
        return _ShardedAggregationLoss.apply(
            v.to(self.local.embeddings.dtype), self.local.embeddings, self.local.labels, targets, tau, self.group
        )

    def instance_loss(self, v: torch.Tensor, indices, *, tau: float = 0.07) -> torch.Tensor:
        """Instance discrimination against the whole sharded bank (the warm-up); (B,)."""
        tau = check.temperature(tau)
        check.embeddings(v, "v")
        indices = torch.as_tensor(indices, device=self.device).long()
        ids = -1 - (self.local.index_of + self.start)
        return _ShardedAggregationLoss.apply(
            v.to(self.local.embeddings.dtype), self.local.embeddings, ids, -1 - indices, tau, self.group
        )

    @torch.no_grad()
    def set_labels(self, indices, labels, confidence) -> None:
        """:meth:`MemoryBank.set_labels` with the same global vectors on every rank (not
        collective): the whole batch is checked on every rank, then each rank stores the
        rows it owns."""
        indices = self._checked_indices(indices)
        labeled = self._targets[indices.long().cpu()] >= 0
        check_new_labels(labels, confidence, indices.shape[0], self.num_classes, self.device, labeled)
        own = self._owned(indices)
        self.local.set_labels(indices[own] - self.start, labels[own], confidence[own])

    @torch.no_grad()
    def update(self, indices, embeddings, *, momentum: float = 0.5) -> None:
        """SPEC §1.6's blend for the global batch; every rank writes the rows it owns."""
        momentum = check.fraction(momentum, "momentum")
        idx_all, emb_all = self._gather_batch(indices, embeddings)
        own = self._owned(idx_all)
        if bool(own.any()):
            rows = self.local.row_of[idx_all[own] - self.start]
            bank_update_(self.local.embeddings, rows, emb_all[own], momentum=momentum, check_finite=False)

    @torch.no_grad()
    def gather(self) -> MemoryBank:
        """The whole bank as one single-process :class:`MemoryBank` on every rank (collective;
        N x D memory): for diagnostics over all rows, and for checkpoints that any world size
        can resume from."""
        loc = self.local
        order = torch.argsort(loc.index_of)  # local rows in dataset order
        emb = all_gather_cat(loc.embeddings[order].contiguous(), self.group)
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
        """SPEC §1.6 for the global batch: propagate its unlabeled examples (merging every
        shard's top-K), store label and confidence at the owners, then blend the owned rows
        in gathered order. Returns (labels, confidence) of the gathered unlabeled examples."""
        check.positive_int(k, "k", high=self.num_labeled_total, high_what="the number of labeled points M")
        tau = check.temperature(tau)
        momentum = check.fraction(momentum, "momentum")
        idx_all, emb_all = self._gather_batch(indices, embeddings)
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
        own = self._owned(idx_all)
        is_labeled = torch.zeros(idx_all.shape[0], dtype=torch.int32, device=self.device)
        is_labeled[own] = (self.local.row_of[idx_all[own] - self.start] < self.local.num_labeled).int()
        dist.all_reduce(is_labeled, group=self.group)
        sel = (is_labeled == 0) & is_last_occurrence(idx_all)
        m_local = self.local.num_labeled
        bias = self.local.log_rho if density_weighting else None
        vals, pos = _candidates(
            emb_all[sel].to(self.local.embeddings.dtype), self.local.labeled_embeddings, k, tau, bias=bias
        )
        if m_local:
            gidx, cls = self.labeled_global[pos], self.local.labeled_classes[pos]
        else:
            gidx, cls = torch.zeros_like(pos), torch.zeros_like(pos)
        gidx = torch.where(torch.isfinite(vals), gidx, torch.full_like(gidx, self.n))  # padding sorts last
        all_vals, all_g, all_cls = (torch.cat(self._all_gather_same(x), dim=1) for x in (vals, gidx, cls))
        top_v, where = _merge_topk(all_vals, all_g, k)
        labels, conf = vote(top_v, all_cls.gather(1, where), self.num_classes)
        return labels, conf, sel

    def _all_gather_same(self, x):
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return parts

    def state_dict(self) -> dict:
        return dict(self.local.state_dict(), shard=(self.start, self.end, self.n))

    def load_state_dict(self, state: dict) -> None:
        if tuple(state.get("shard", ())) != (self.start, self.end, self.n):
            raise ValueError(
                f"bank state is for shard {state.get('shard')}, this rank owns {(self.start, self.end, self.n)}"
            )
        self.local.load_state_dict({k: v for k, v in state.items() if k != "shard"})


class ReplicatedMemoryBank(MemoryBank):
    """A full :class:`MemoryBank` on every rank, kept identical: :meth:`step` applies the
    all-gathered batch (in rank order) on every rank. Reads (loss, stored, density) are
    local. For when N x D fits on one device."""

    def __init__(self, targets, num_classes, *, group=None, **kwargs):
        super().__init__(targets, num_classes, **kwargs)
        self.group = group

    def _gathered(self, indices, embeddings):
        indices = torch.as_tensor(indices, device=self.device)
        _, emb = self._check_batch(indices, embeddings)
        return all_gather_cat(indices.long(), self.group), all_gather_cat(emb.float(), self.group)

    @torch.no_grad()
    def step(self, indices, embeddings, **kwargs):
        return super().step(*self._gathered(indices, embeddings), **kwargs)

    @torch.no_grad()
    def update(self, indices, embeddings, **kwargs):
        return super().update(*self._gathered(indices, embeddings), **kwargs)

    def gather(self) -> MemoryBank:
        """Every rank already holds the whole bank."""
        return self

    def load_full(self, full_state: dict) -> None:
        self.load_state_dict(full_state)
