"""A full memory bank on every rank, kept identical (see :mod:`llp_fast.distributed`)."""

from __future__ import annotations

import inspect

import torch

from .._interop import as_tensor
from ..bank import MemoryBank
from .agree import gather_agreed, targets_checksum
from .collectives import all_gather_cat


class ReplicatedMemoryBank(MemoryBank):
    """A full :class:`MemoryBank` on every rank, kept identical: :meth:`step` applies the
    all-gathered batch (in rank order) on every rank. Reads (loss, stored, density) are
    local. For when N x D fits on one device."""

    def __init__(self, targets, num_classes, *, group=None, **kwargs):
        super().__init__(targets, num_classes, **kwargs)
        self.group = group
        # The copies start alike only from the same targets and settings (one all-gather says so)
        settings = dict(num_classes=self.num_classes, dim=self.embeddings.shape[1], dtype=self.embeddings.dtype)
        settings.update(seed=kwargs.get("seed", 0), targets=targets_checksum(as_tensor(targets, "targets")))
        gather_agreed(0, "ReplicatedMemoryBank", settings, group, self.device)

    def _gathered(self, indices, embeddings, call, kwargs):
        """Every rank's batch, in rank order, after checking that every rank passed the same
        settings to ``call`` (those it left out at their defaults): the copies part otherwise."""
        indices = as_tensor(indices, "indices", device=self.device)
        _, emb = self._check_batch(indices, embeddings)
        signature = inspect.signature(getattr(MemoryBank, call))
        signature.bind(self, indices, embeddings, **kwargs)  # (an unknown setting: TypeError, before any collective)
        keyword = [p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
        settings = {p.name: kwargs.get(p.name, p.default) for p in keyword}
        agree = (f"ReplicatedMemoryBank.{call}", settings)
        return all_gather_cat(indices.long(), self.group, agree), all_gather_cat(emb.float(), self.group)

    @torch.no_grad()
    def step(self, indices, embeddings, **kwargs):
        return super().step(*self._gathered(indices, embeddings, "step", kwargs), **kwargs)

    @torch.no_grad()
    def update(self, indices, embeddings, **kwargs):
        return super().update(*self._gathered(indices, embeddings, "update", kwargs), **kwargs)

    def propagate(self, indices, embeddings, **kwargs):
        """Refused: it would relabel this rank's copy alone, and the copies would part (use
        :meth:`step`, which votes on every rank's batch and stores it on every rank)."""
        raise NotImplementedError(
            "ReplicatedMemoryBank.propagate would change this rank's copy alone: use step(), which votes on every "
            "rank's batch on every rank"
        )

    def gather(self) -> MemoryBank:
        """Every rank already holds the whole bank."""
        return self

    def load_full(self, full_state: dict) -> None:
        self.load_state_dict(full_state)
