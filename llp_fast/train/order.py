"""Which examples an epoch visits, in which order, in batches of which size.

LLP draws mini-batches uniformly from all training examples, labeled and unlabeled mixed
(docs/method.md §1.7): one permutation of the N examples per epoch. The supervised-only baseline
visits its labeled examples only, repeated to the same number of steps, so that both runs take the
same schedule. Under torch.distributed each rank takes its share of the epoch from a
``DistributedSampler`` (shuffled with the run's seed and the epoch), and the global batch
(``--batch-size``) is split over the ranks.
"""

from __future__ import annotations

import math

import torch


def rank_batch_size(trainer) -> int:
    """Per-process batch: the global batch split over the ranks."""
    return max(1, trainer.cfg.batch_size // trainer.world)


def _epoch_length(trainer) -> int:
    if not trainer.cfg.supervised_only:
        return trainer.n
    return math.ceil(trainer.n / trainer.cfg.batch_size) * trainer.cfg.batch_size


def steps_per_epoch(trainer) -> int:
    if trainer.world == 1:
        return math.ceil(trainer.n / trainer.cfg.batch_size)
    per_rank = math.ceil(_epoch_length(trainer) / trainer.world)
    return math.ceil(per_rank / rank_batch_size(trainer))


def epoch_order(trainer) -> torch.Tensor:
    """Dataset indices of this epoch's batches (CPU int64), drawn from ``trainer.gen_order``."""
    if trainer.world > 1:
        return _rank_order(trainer)
    if not trainer.cfg.supervised_only:
        return torch.randperm(trainer.n, generator=trainer.gen_order)
    need = steps_per_epoch(trainer) * trainer.cfg.batch_size
    lab = trainer.labeled_idx
    m = len(lab)
    perms = [lab[torch.randperm(m, generator=trainer.gen_order)] for _ in range(math.ceil(need / m))]
    return torch.cat(perms)[:need]


def _rank_order(trainer) -> torch.Tensor:
    """This rank's share of the epoch: a DistributedSampler over the epoch's examples (all of
    them; for the baseline, the labeled ones repeated to a full epoch), padded to a multiple of
    the world size."""
    length = _epoch_length(trainer)
    if trainer.cfg.supervised_only:
        lab = trainer.labeled_idx
        base = lab.repeat(math.ceil(length / len(lab)))[:length]
    else:
        base = torch.arange(trainer.n)
    sampler = torch.utils.data.DistributedSampler(
        range(length), num_replicas=trainer.world, rank=trainer.rank, shuffle=True, seed=trainer.cfg.seed
    )
    sampler.set_epoch(trainer.epoch)
    return base[torch.tensor(list(sampler), dtype=torch.long)]
