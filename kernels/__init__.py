"""Triton kernels for llp_fast (installed as ``llp_fast.kernels``).

Each launcher takes the same arguments as its op's default body and returns
``NotImplemented`` for a configuration it does not cover, so the op falls back to the
reference. Imported only where triton is importable (see ``llp_fast._optional``).
"""

from .aggregation_loss import (
    aggregation_loss_backward_triton,
    aggregation_loss_fused_triton,
    aggregation_loss_grad_from_means,
    aggregation_loss_triton,
)
from .local_density import local_density_triton
from .propagate import propagate_topk_triton, propagate_triton

__all__ = [
    "aggregation_loss_backward_triton",
    "aggregation_loss_fused_triton",
    "aggregation_loss_grad_from_means",
    "aggregation_loss_triton",
    "local_density_triton",
    "propagate_topk_triton",
    "propagate_triton",
]
