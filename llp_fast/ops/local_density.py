"""``llp_fast.local_density``: log local density of the labeled points (docs/method.md §1.1): the top-T
selection of ``topk_scores``, finished by the log-sum-exp of ``llp_fast._topk``."""

from __future__ import annotations

import torch

from .. import _validate as check
from .._interop import accepts_arrays
from .._topk import log_sum_exp
from ._common import out_float_dtype, via_topk_scores


def _local_density_default(
    labeled: torch.Tensor,
    bank: torch.Tensor,
    t: int,
    tau: float,
    pool_mask: torch.Tensor | None,
) -> torch.Tensor:
    values, _ = torch.ops.llp_fast.topk_scores(labeled, bank, t, tau, None, pool_mask, None, None, 0)
    via_topk_scores("local_density", labeled.device)
    return log_sum_exp(values).to(out_float_dtype(labeled, bank))


# One body for every device: the selection dispatches to topk_scores' kernel for the device.
local_density_op = torch.library.custom_op("llp_fast::local_density", _local_density_default, mutates_args=())


@local_density_op.register_fake
def _(labeled, bank, t, tau, pool_mask):
    return labeled.new_empty(labeled.shape[0], dtype=out_float_dtype(labeled, bank))


@accepts_arrays("labeled", "bank", "pool_mask")
def local_density(labeled, bank, *, t: int = 25, tau: float = 0.07, pool_mask=None, check_finite: bool = True):
    """``log_rho_i = log sum_{j in N_T(i)} exp(m_i . m_j / tau)``: the log-sum-exp of each
    labeled point's ``t`` largest similarities to the pool (docs/method.md §1.1).

    Args:
        labeled: (M, D) labeled embeddings.
        bank: (N, D) memory bank, same dtype and device.
        t: density neighbours, 1 <= t <= pool size.
        tau: temperature > 0.
        pool_mask: optional (N,) bool selecting the pool rows without copying the bank. None
            means every bank row, a labeled point's own row included; the paper's density
            (§1.1) is over the unlabeled rows: pass ``pool_mask=~is_labeled`` (as the bank does).
        check_finite: reject NaN/Inf embeddings.

    Returns:
        log_rho (M,) float32 (float64 for float64 inputs): ``log_sum_exp`` of
        ``topk_scores(labeled, bank, k=t, key_mask=pool_mask).values``.
    """
    check.embeddings(labeled, "labeled", allow_empty=False)
    check.embeddings(bank, "bank", allow_empty=False)
    check.same_space(labeled, "labeled", bank, "bank")
    tau = check.temperature(tau)
    pool = bank.shape[0]
    if pool_mask is not None:
        check.vector(pool_mask, "pool_mask", bank.shape[0], device=bank.device, kind="bool")
        if not check.tracing():
            pool = int(pool_mask.sum())
            if pool == 0:
                raise ValueError("pool_mask selects no rows: the density pool is empty")
    t = check.positive_int(t, "t", high=pool, high_what="the density pool size")
    sizes = (check.finite(labeled, "labeled"), check.finite(bank, "bank")) if check_finite else (1.0, 1.0)
    check.scores_fit(tau, labeled, "labeled", bank, "bank", *sizes)
    return local_density_op(labeled.detach(), bank.detach(), t, tau, pool_mask)
