"""The LLP ops: one ``torch.library`` custom op per computation, in the ``llp_fast::``
namespace, whose default body is the chunked pure-PyTorch reference (docs/method.md §3).

Faster paths register per device: Triton launchers (``kernels/``) for CUDA from each op's
module here; C++/CUDA kernels from ``csrc/`` with ``TORCH_LIBRARY_IMPL``. The public
functions (validation, NumPy/CuPy interop, defaults) sit beside each op.
"""

from ._backends import backends, describe_backends
from .aggregation_loss import aggregation_loss
from .bank_update import bank_update_
from .local_density import local_density
from .propagate import neighbours, propagate
from .topk_scores import topk_scores
from .vote import vote_op as _vote_op  # noqa: F401  (declares llp_fast::vote)

__all__ = [
    "aggregation_loss",
    "backends",
    "bank_update_",
    "describe_backends",
    "local_density",
    "neighbours",
    "propagate",
    "topk_scores",
]
