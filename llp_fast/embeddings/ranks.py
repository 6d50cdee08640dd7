"""How the engine's ranks share work: each owns a contiguous range of rows (as pool and as queries),
and two exact collectives combine their parts (:mod:`llp_fast.distributed.collectives`): the
top-k merge of a selection over sharded keys, and the gather of per-row results."""

from __future__ import annotations

import numpy as np
import torch


class Local:
    """One process: it owns every row, and the collectives return their input."""

    rank, world = 0, 1

    def span(self, n: int) -> tuple[int, int]:
        return 0, n

    def merge_topk(self, values: torch.Tensor, indices: torch.Tensor, k: int):
        return values, indices

    def gather(self, x: np.ndarray) -> np.ndarray:
        return x


class Ranks(Local):
    """The processes of the default ``torch.distributed`` group (gloo on CPUs, NCCL on GPUs)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # gloo moves CPU tensors, NCCL CUDA ones
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def span(self, n: int) -> tuple[int, int]:
        from ..distributed import shard_range

        return shard_range(n, self.rank, self.world)

    def merge_topk(self, values: torch.Tensor, indices: torch.Tensor, k: int):
        """The top-k over every rank's keys: each rank's top-k (global indices) gathered and merged,
        equal values by the lower index, as one process streaming all keys selects them."""
        from ..distributed.collectives import merged_topk

        v, i = merged_topk(values.to(self.device), indices.to(self.device), k)
        return v.to(values.device), i.to(values.device)

    def gather(self, x: np.ndarray) -> np.ndarray:
        """Every rank's rows, concatenated in rank order (= row order)."""
        from ..distributed.collectives import all_gather_cat

        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return all_gather_cat(t).cpu().numpy()
