"""The interface the trainer and the tools use, whatever the bank's layout.

:class:`llp_fast.MemoryBank` (one process), :class:`llp_fast.distributed.ShardedMemoryBank` (rows
split over the ranks) and :class:`llp_fast.distributed.ReplicatedMemoryBank` (all rows on every
rank) implement it; ``isinstance(bank, Bank)`` checks the method names at run time. Every method
takes *dataset indices*; a distributed bank's methods are collective (every rank calls them) unless
said otherwise.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Bank(Protocol):
    num_classes: int

    def __len__(self) -> int:
        """N, the examples the bank holds."""

    def stored(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, confidence) stored for ``indices``: the loss targets (docs/method.md §1.5)."""

    def refresh_density(self, *, t: int, tau: float, pool: str) -> torch.Tensor:
        """docs/method.md §1.1 for the labeled rows; returns this process's ``log_rho``."""

    def loss(self, v: torch.Tensor, indices, *, tau: float, targets=None, check_finite=True) -> torch.Tensor:
        """The aggregation loss (docs/method.md §1.3) of batch embeddings ``v``; (B,). ``check_finite``:
        refuse NaN or Inf in ``v`` (a caller that checks the loss itself turns it off)."""

    def instance_loss(self, v: torch.Tensor, indices, *, tau: float, check_finite=True) -> torch.Tensor:
        """Instance discrimination against the bank (the warm-up); (B,)."""

    def update(self, indices, embeddings, *, momentum: float) -> None:
        """docs/method.md §1.6's blend of the batch's rows, without propagating."""

    def step(self, indices, embeddings, *, k: int, tau: float, momentum: float, density_weighting: bool):
        """docs/method.md §1.6: propagate the batch's unlabeled examples, then blend its rows."""

    def set_labels(self, indices, labels, confidence) -> None:
        """Stores class ids and confidences for unlabeled examples (a warm start); not collective."""

    def vote(self, queries: torch.Tensor, *, k: int, tau: float, density_weighting: bool):
        """docs/method.md §1.2 for ``queries``, storing nothing: (labels, confidence)."""

    def class_statistics(self, truth: torch.Tensor) -> dict:
        """Per-class sums behind the diagnostics of docs/method.md §1.9, over the whole bank."""

    def truncate(self, n: int) -> None:
        """Forgets dataset indices >= n (unlabeled extra examples)."""

    @property
    def index_range(self) -> tuple[int, int]:
        """The dataset indices [start, end) whose rows this process holds."""

    def rows_state(self) -> dict:
        """This process's rows in dataset order: one checkpoint piece (no gather)."""

    def load_rows(self, pieces: list[dict]) -> None:
        """This process's rows from checkpoint pieces written at any world size; not collective."""
