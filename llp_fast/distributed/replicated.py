"""A full memory bank on every rank, kept identical (see :mod:`llp_fast.distributed`)."""

from __future__ import annotations

import inspect

import torch

from .._interop import as_tensor
from ..bank import MemoryBank
from .agree import checked, gather_agreed, raw_digest, where
from .collectives import all_gather_cat


class ReplicatedMemoryBank(MemoryBank):
    """A full :class:`MemoryBank` on every rank, kept identical: :meth:`step` applies the
    all-gathered batch (in rank order) on every rank. Reads (loss, stored, density) are
    local. For when N x D fits on one device."""

    def __init__(self, targets, num_classes, *, group=None, **kwargs):
        # The copies start alike only from the same targets and settings (one all-gather says so)
        settings = _settings(_SIGNATURES["__init__"], kwargs, ("dim", "dtype", "seed"))
        agree = ("ReplicatedMemoryBank", dict(settings, num_classes=num_classes, targets=raw_digest(targets)))
        build = lambda: MemoryBank.__init__(self, targets, num_classes, **kwargs)  # noqa: E731
        checked(build, *agree, group, where(kwargs.get("device", "cpu")))
        self.group = group
        gather_agreed(0, *agree, group, self.device)

    def _gathered(self, indices, embeddings, call, kwargs):
        """Every rank's batch, in rank order, after checking that every rank passed the same
        settings to ``call`` (those it left out at their defaults): the copies part otherwise."""
        indices = as_tensor(indices, "indices", device=self.device)
        _, emb = self._check_batch(indices, embeddings)
        signature = _SIGNATURES[call]
        settings = _settings(signature, kwargs)
        settings.update({name: kwargs[name] for name in kwargs if name not in settings})  # (a misspelt one too)
        agree = (f"ReplicatedMemoryBank.{call}", settings)
        # (an unknown setting: the method's TypeError, on every rank where the ranks differ)
        checked(lambda: signature.bind(self, indices, embeddings, **kwargs), *agree, self.group, self.device)
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


# MemoryBank's signatures, read once (not at every step)
_SIGNATURES = {name: inspect.signature(getattr(MemoryBank, name)) for name in ("__init__", "step", "update")}


def _settings(signature: inspect.Signature, kwargs: dict, names=None) -> dict:
    """The keyword-only settings of ``signature`` (``names`` of them) as a call with ``kwargs`` takes
    them: given, or left at their defaults (a default left out and the same value given agree)."""
    keyword = [p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    return {p.name: kwargs.get(p.name, p.default) for p in keyword if names is None or p.name in names}
