"""Which examples an epoch visits, in which order, in batches of which size.

LLP draws mini-batches uniformly from all training examples, labeled and unlabeled mixed
(docs/method.md §1.7): one permutation of the N examples per epoch. With ``labeled_batch`` L > 0
(docs/method.md §8.6) every batch also takes L labeled examples from a stream of their own (one
permutation of the labeled examples after another), so the labeled share of a batch does not shrink
with the label rate. The supervised-only baseline visits its labeled examples only, repeated to the
same number of steps, so that both runs take the same schedule. Under torch.distributed each rank
takes its share of the epoch from a ``DistributedSampler`` (shuffled with the run's seed and the
epoch), and the global batch (``--batch-size``) is split over the ranks.

Every function takes what it uses; ``gen`` is the run's order generator, whose state at the epoch's
start is saved, so a resumed epoch draws the same order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """The shape of an epoch: ``n`` examples (dataset indices 0..n-1), ``labeled`` their labeled
    dataset indices (CPU int64), the global ``batch_size`` and ``labeled_batch``, ``world`` ranks,
    ``supervised_only`` (the baseline: labeled examples only) and the ``seed`` of the samplers."""

    n: int
    labeled: torch.Tensor
    batch_size: int
    labeled_batch: int = 0
    world: int = 1
    supervised_only: bool = False
    seed: int = 0

    @property
    def rank_batch_size(self) -> int:
        """Per-process batch drawn from the epoch's order: the global batch split over the ranks."""
        return max(1, self.batch_size // self.world)

    @property
    def rank_labeled_batch(self) -> int:
        return 0 if self.supervised_only or not self.labeled_batch else max(1, self.labeled_batch // self.world)

    def epoch_length(self) -> int:
        if not self.supervised_only:
            return self.n
        return math.ceil(self.n / self.batch_size) * self.batch_size

    def steps_per_epoch(self) -> int:
        if self.world == 1:
            return math.ceil(self.n / self.batch_size)
        per_rank = math.ceil(self.epoch_length() / self.world)
        return math.ceil(per_rank / self.rank_batch_size)

    def loader_batch_size(self) -> int:
        """The batch the data source is asked for: the drawn batch plus the labeled stream's share."""
        return self.rank_batch_size + self.rank_labeled_batch


def _permutations(ids: torch.Tensor, need: int, gen: torch.Generator) -> torch.Tensor:
    """``need`` entries of ``ids``, one random permutation after another."""
    m = len(ids)
    return torch.cat([ids[torch.randperm(m, generator=gen)] for _ in range(math.ceil(need / m))])[:need]


def epoch_order(s: Schedule, gen: torch.Generator, *, rank: int = 0, epoch: int = 0) -> torch.Tensor:
    """Dataset indices of this rank's batches for the epoch (CPU int64), ``s.loader_batch_size()``
    per batch (the last may be shorter without a labeled stream)."""
    if s.world > 1:
        order = _rank_order(s, rank, epoch)
    elif not s.supervised_only:
        order = torch.randperm(s.n, generator=gen)
    else:
        order = _permutations(s.labeled, s.steps_per_epoch() * s.batch_size, gen)
    lb = s.rank_labeled_batch
    if not lb:
        return order
    steps, b = s.steps_per_epoch(), s.rank_batch_size
    drawn = order.repeat(math.ceil(steps * b / len(order)))[: steps * b].view(steps, b)  # wraps the last batch
    stream = _permutations(s.labeled, steps * lb * s.world, gen).view(steps, s.world, lb)[:, rank]
    return torch.cat([drawn, stream], dim=1).flatten()


def _rank_order(s: Schedule, rank: int, epoch: int) -> torch.Tensor:
    """This rank's share of the epoch: a DistributedSampler over the epoch's examples (all of
    them; for the baseline, the labeled ones repeated to a full epoch), padded to a multiple of
    the world size."""
    length = s.epoch_length()
    if s.supervised_only:
        base = s.labeled.repeat(math.ceil(length / len(s.labeled)))[:length]
    else:
        base = torch.arange(s.n)
    sampler = torch.utils.data.DistributedSampler(
        range(length), num_replicas=s.world, rank=rank, shuffle=True, seed=s.seed
    )
    sampler.set_epoch(epoch)
    return base[torch.tensor(list(sampler), dtype=torch.long)]


def for_rank(s: Schedule, gen: torch.Generator, begun: int, rank: int, epoch: int) -> tuple[torch.Tensor, int, int]:
    """This rank's dataset indices for the epoch, its batch size and the epoch's steps: the epoch's
    own order (:func:`epoch_order`) where ``begun`` (the processes that began the epoch) is
    ``s.world``, else that epoch's order shared out among ``s.world`` (:func:`regrouped`)."""
    if begun == s.world:
        return epoch_order(s, gen, rank=rank, epoch=epoch), s.loader_batch_size(), s.steps_per_epoch()
    began = dataclasses.replace(s, world=begun)
    order, size = regrouped(began, gen, world=s.world, rank=rank, epoch=epoch)
    return order, size, began.steps_per_epoch()


def check_regroup(s: Schedule, begun: int, world: int, done: int = 0) -> str | None:
    """Why an epoch of ``s`` begun by ``begun`` processes, ``done`` of its steps taken, cannot be
    finished by ``world`` (None: it can, :func:`regrouped`, or nothing is left of it): its global
    steps' examples must share out evenly."""
    began = dataclasses.replace(s, world=begun)
    full = begun * began.loader_batch_size()
    if begun == world or full % world == 0 or done >= began.steps_per_epoch():
        return None
    return f"its steps of {full} examples cannot be shared by {world} processes"


def regrouped(s: Schedule, gen: torch.Generator, *, world: int, rank: int, epoch: int) -> tuple[torch.Tensor, int]:
    """The epoch of ``s`` (begun by ``s.world`` processes) finished by ``world`` processes: each of its
    global steps (the ``s.world`` ranks' batches of that step, together) is shared out among the new
    ranks, so that the epoch still visits the examples of its one permutation once each, however
    many processes resume it. Returns this ``rank``'s dataset indices and its batch size (the
    last step's share may be shorter). ``gen``: at the epoch's start (every rank of ``s`` drew from
    that state). Raises ValueError when a global step cannot be shared out evenly."""
    steps, start = s.steps_per_epoch(), gen.get_state()
    per_rank = []
    for r in range(s.world):
        gen.set_state(start)
        o = epoch_order(s, gen, rank=r, epoch=epoch)
        b = s.loader_batch_size()
        per_rank.append([o[i * b : (i + 1) * b] for i in range(steps)])
    why = check_regroup(s, s.world, world)
    if why:
        raise ValueError(why)
    share = s.world * s.loader_batch_size() // world  # a full step's share (a short step: less)
    mine = []
    for i in range(steps):
        step = torch.cat([per_rank[r][i] for r in range(s.world)])
        # a shorter last step: repeated to a multiple of the ranks, as DistributedSampler pads (one or
        # two examples over eight ranks too: every rank gets at least one)
        step = step.repeat(-(-world // len(step)) + 1)[: -(-len(step) // world) * world]
        part = len(step) // world  # every rank the same share of every step (share, or less in the last)
        mine.append(step[rank * part : (rank + 1) * part])
    return torch.cat(mine), share
