"""llp_fast: fast, exact Local Label Propagation (Zhuang et al.) for PyTorch.

Public ops (docs/method.md §2): :func:`local_density`, :func:`propagate`, :func:`aggregation_loss`,
:func:`bank_update_`, :func:`topk_scores` (the selection behind the first two, mergeable across key
chunks), and the :class:`MemoryBank` that ties them into the training loop; :func:`backends`
says which implementation serves each op on each device.
"""

__version__ = "0.1.0"

from .bank import MemoryBank  # noqa: E402
from .ops import aggregation_loss, backends, bank_update_, local_density, propagate, topk_scores  # noqa: E402

__all__ = [
    "MemoryBank",
    "aggregation_loss",
    "backends",
    "bank_update_",
    "local_density",
    "propagate",
    "topk_scores",
    "__version__",
]
