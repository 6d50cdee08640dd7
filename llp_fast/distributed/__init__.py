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
``init_process_group``; :func:`init` uses 10 minutes, ``LLP_FAST_DIST_TIMEOUT`` seconds or the
tools' ``--dist-timeout`` to change it), so a rank that dies or stops answering makes the others
fail instead of hanging. :func:`peer_lost` tells that failure (another rank is gone) from a bug of
this rank's; the tools then exit quietly with :data:`PEER_LOST` and the launcher of ``--nproc P``
names the lost rank (``llp_fast/cli/workers.py``).
"""

import torch

from ..bank import MemoryBank
from .collectives import PEER_LOST, all_gather_cat, finish, init, launched, peer_lost, shard_range, timeout_seconds
from .replicated import ReplicatedMemoryBank
from .sharded import ShardedMemoryBank


def make_bank(targets, num_classes: int, *, layout: str = "sharded", **kwargs):
    """The bank for this process: a :class:`~llp_fast.MemoryBank` alone, else a sharded or
    replicated one over the process group (``kwargs``: MemoryBank's dim, dtype, device, seed)."""
    if not launched() or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return MemoryBank(targets, num_classes, **kwargs)
    if layout == "replicated":
        return ReplicatedMemoryBank(targets, num_classes, **kwargs)
    if layout != "sharded":
        raise ValueError(f"layout must be 'sharded' or 'replicated', got {layout!r}")
    return ShardedMemoryBank(targets, num_classes, **kwargs)


__all__ = [
    "init",
    "finish",
    "launched",
    "peer_lost",
    "PEER_LOST",
    "timeout_seconds",
    "shard_range",
    "all_gather_cat",
    "ShardedMemoryBank",
    "ReplicatedMemoryBank",
    "make_bank",
]
