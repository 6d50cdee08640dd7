"""LLP across processes with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Two layouts of the memory bank:

* :class:`ShardedMemoryBank` — rank r owns a contiguous range of dataset indices
  (:func:`shard_range`: N/P rows, the first N mod P ranks one more; its own labeled and
  unlabeled ones). Per step the ranks
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

Their collective methods (all but ``set_labels``, ``rows_state``, ``load_rows`` and the state
dicts) take the same settings on every rank; each call's first collective carries them
(:mod:`llp_fast.distributed.agree`), so ranks that differ all raise one ``ValueError`` naming the
setting instead of aborting in gloo, waiting out the timeout or mixing their results.

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
    """The bank for this process: a sharded or replicated one over the default process group where
    it has more than one rank, else a :class:`~llp_fast.MemoryBank` alone (``kwargs``: MemoryBank's
    dim, dtype, device, seed). Launched as one of several processes (``WORLD_SIZE`` > 1) before the
    group exists: :class:`ConfigError` (each rank built a bank of its own, unshared, unsaid; and a
    group made by ``mp.spawn`` without ``WORLD_SIZE`` was not seen)."""
    if layout not in ("sharded", "replicated"):  # (one process took any name)
        raise ValueError(f"layout must be 'sharded' or 'replicated', got {layout!r}")
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not grouped and launched():
        from ..errors import ConfigError

        raise ConfigError(
            "make_bank: this process is one of several (WORLD_SIZE > 1) but no process group exists: call "
            "llp_fast.distributed.init() first"
        )
    if not grouped or torch.distributed.get_world_size() == 1:
        return MemoryBank(targets, num_classes, **kwargs)
    cls = ReplicatedMemoryBank if layout == "replicated" else ShardedMemoryBank
    return cls(targets, num_classes, **kwargs)


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
