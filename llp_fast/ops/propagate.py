"""``llp_fast.propagate``: density-weighted top-K label propagation (docs/method.md §1.2)."""

from __future__ import annotations

import torch

from .. import _validate as check
from .._interop import accepts_arrays
from ..reference import propagate_ref
from ._common import compiled_first, out_float_dtype, with_fallback


@compiled_first("propagate")
def _propagate_default(
    queries: torch.Tensor,
    labeled: torch.Tensor,
    labeled_classes: torch.Tensor,
    log_rho: torch.Tensor | None,
    k: int,
    tau: float,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    labels, conf = propagate_ref(queries, labeled, labeled_classes, log_rho, k, tau, num_classes)
    return labels, conf.to(out_float_dtype(queries, labeled))


propagate_op = torch.library.custom_op("llp_fast::propagate", _propagate_default, mutates_args=())


@propagate_op.register_fake
def _(queries, labeled, labeled_classes, log_rho, k, tau, num_classes):
    q = queries.shape[0]
    return (
        queries.new_empty(q, dtype=torch.int64),
        queries.new_empty(q, dtype=out_float_dtype(queries, labeled)),
    )


propagate_op.register_kernel("cuda")(with_fallback("propagate_triton", _propagate_default))


@accepts_arrays("queries", "labeled", "labeled_classes", "log_rho")
def propagate(
    queries,
    labeled,
    labeled_classes,
    log_rho=None,
    *,
    k: int = 10,
    tau: float = 0.07,
    num_classes: int,
    check_finite: bool = True,
):
    """Pseudo-labels for ``queries`` by a density-weighted vote of their K nearest labeled
    points (docs/method.md §1.2).

    Args:
        queries: (Q, D) embeddings to label (float32, bfloat16, float16 or float64).
        labeled: (M, D) labeled embeddings (the labeled rows of the bank), same dtype/device.
        labeled_classes: (M,) integer class ids in [0, num_classes).
        log_rho: (M,) log local densities from :func:`local_density`, or None for no
            density weighting (the paper's NoDW ablation: plain weighted kNN).
        k: neighbours, 1 <= k <= M.
        tau: temperature > 0.
        num_classes: number of classes S.
        check_finite: reject NaN/Inf embeddings, and embeddings so large that the scores
            would overflow (one extra read of the inputs).

    Returns:
        labels (Q,) int64 (ties to the lowest class id) and confidence (Q,) float32
        (float64 for float64 inputs). NumPy in, NumPy out; CuPy in, CuPy out.

    Neighbours are ranked by ``v . m_i / tau - log_rho_i``, not raw similarity. Memory is
    O(Q * K) beyond a bounded score tile: the Q x M score matrix is never stored.
    """
    check.embeddings(queries, "queries")
    check.embeddings(labeled, "labeled", allow_empty=False)
    check.same_space(labeled, "labeled", queries, "queries")
    m = labeled.shape[0]
    num_classes = check.positive_int(num_classes, "num_classes")
    k = check.positive_int(k, "k", high=m, high_what="the number of labeled points M")
    tau = check.temperature(tau)
    check.vector(labeled_classes, "labeled_classes", m, device=labeled.device, kind="int")
    check.in_range(labeled_classes, "labeled_classes", 0, num_classes, "class ids must lie in [0, num_classes)")
    if log_rho is not None:
        check.vector(log_rho, "log_rho", m, device=labeled.device, kind="float")
    big_rho = check.finite(log_rho, "log_rho") if log_rho is not None else 0.0
    sizes = (check.finite(queries, "queries"), check.finite(labeled, "labeled")) if check_finite else (1.0, 1.0)
    check.scores_fit(tau, queries, "queries", labeled, "labeled", *sizes, log_rho=big_rho)
    if log_rho is not None:
        log_rho = log_rho.detach()  # no autograd formula: outputs never require grad
    return propagate_op(queries.detach(), labeled.detach(), labeled_classes, log_rho, k, tau, num_classes)
