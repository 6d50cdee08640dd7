"""The LLP memory bank (docs/method.md §1): embeddings, stored labels and confidences, densities.

- :mod:`.memory` — :class:`MemoryBank`, the single-process bank and its steps;
- :mod:`.state` — saving and loading it, whole or as checkpoint pieces;
- :mod:`.protocol` — :class:`Bank`, the interface every layout implements (the distributed ones
  are in :mod:`llp_fast.distributed`).
"""

from .memory import MemoryBank, check_indices, check_new_labels, initial_rows
from .protocol import Bank

__all__ = ["Bank", "MemoryBank", "check_indices", "check_new_labels", "initial_rows"]
