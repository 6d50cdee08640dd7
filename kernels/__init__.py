"""Triton kernels for llp_fast (installed as ``llp_fast.kernels``).

One launcher per op with a Triton kernel (the op table, ``llp_fast._op_table``): ``topk_scores``
(the selection behind ``local_density`` and ``propagate`` too) and the aggregation loss. Each
launcher ``<op>_triton`` takes the same arguments as its op's default body and returns
``NotImplemented`` for a configuration it does not cover, so the op falls back to the
reference; ``<op>_triton_declines`` (same arguments) says why, or None when it would run.
Imported only where triton is importable (see ``llp_fast._optional``).
"""

from .aggregation_loss import (
    aggregation_loss_backward_triton,
    aggregation_loss_backward_triton_declines,
    aggregation_loss_triton,
    aggregation_loss_triton_declines,
)
from .aggregation_loss_fused import aggregation_loss_fused_triton, aggregation_loss_fused_triton_declines
from .topk_scores import topk_candidates, topk_plan, topk_scores_triton, topk_scores_triton_declines

__all__ = [
    "aggregation_loss_backward_triton",
    "aggregation_loss_backward_triton_declines",
    "aggregation_loss_fused_triton",
    "aggregation_loss_fused_triton_declines",
    "aggregation_loss_triton",
    "aggregation_loss_triton_declines",
    "topk_candidates",
    "topk_plan",
    "topk_scores_triton",
    "topk_scores_triton_declines",
]
