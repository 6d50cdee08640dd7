"""Pure-PyTorch reference implementations of the LLP computations (docs/method.md §1).

These functions *are* the specification in code; every fast path is tested against them.
They are chunked: scores are computed one (row-chunk x column-chunk) tile at a time, so the
extra memory is bounded by a tile (``LLP_FAST_CHUNK_MB``, default 32 MB, plus a few
same-sized temporaries) whatever Q, M or N are. A full Q x M or B x N matrix is never held.

Arithmetic is float32 (float64 when an input is float64); bfloat16/float16 inputs are
upcast one tile at a time, so the result is exact for the rounded inputs.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ._topk import log_sum_exp, merge_topk, vote_torch

__all__ = [
    "compute_dtype",
    "tile_shape",
    "topk_scores_ref",
    "local_density_ref",
    "propagate_ref",
    "aggregation_loss_ref",
    "aggregation_loss_backward_ref",
    "aggregation_loss_fused_ref",
    "aggregation_loss_grad_from_means",
    "bank_update_ref_",
    "occurrence_rank",
]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (the accumulation type)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _tile_elements() -> int:
    mb = float(os.environ.get("LLP_FAST_CHUNK_MB", "32"))
    return max(1, int(mb * (1 << 20)) // 8)  # counted in float64 elements: safe for both dtypes


def tile_shape(n_rows: int, n_cols: int, *, row_width: int = 0) -> tuple[int, int]:
    """(row_chunk, col_chunk) such that a score tile and a per-row buffer of ``row_width``
    entries (e.g. the class votes) each stay within the tile budget."""
    budget = _tile_elements()
    col = max(1, min(n_cols, budget))
    row = max(1, min(n_rows, budget // max(col, row_width, 1)))
    return row, col


def _key_scores(q, keys, c0: int, c1: int, inv_tau: float, bias, key_mask):
    """One score tile: ``q @ keys[c0:c1].T * inv_tau + bias[c0:c1]`` (``q`` already in the
    compute dtype), -inf where ``key_mask`` is False and where the score is NaN: a NaN score is
    never a candidate (the kernels' compares are false for it; reachable only without the
    finiteness checks, ``check_finite=False``)."""
    s = q @ keys[c0:c1].to(q.dtype).T
    s.mul_(inv_tau)
    if bias is not None:
        s.add_(bias[c0:c1].to(q.dtype))
    if key_mask is not None:
        s.masked_fill_(~key_mask[c0:c1], -math.inf)
    return s.masked_fill_(s.isnan(), -math.inf)


def _tile_topk(s: torch.Tensor, k: int, offset: int):
    """``merge_topk`` of a score tile (r, c) whose column j is key ``offset + j``, without
    sorting the tile: ``topk`` finds each row's k-th best value, and a second ``topk`` keeps
    every finite score at or above it (more than k where ties straddle the k-th place), so
    that the exact tie rule can choose among them."""
    kk = min(k, s.shape[1])
    kth = s.topk(kk, dim=1).values[:, -1:]
    keep = int(((s >= kth) & (s > -math.inf)).sum(dim=1).max()) if s.numel() else 0
    vals, idx = s.topk(max(kk, min(keep, s.shape[1])), dim=1)
    return merge_topk(vals, idx.add_(offset), k)


def topk_scores_ref(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    tau: float,
    bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    init_values: torch.Tensor | None = None,
    init_indices: torch.Tensor | None = None,
    index_offset: int = 0,
):
    """docs/method.md §1.1/§1.2's selection, the one the package has: for each query the ``k``
    largest ``q . key_j / tau + bias_j`` over the keys j with ``key_mask`` set, as (values (Q, k)
    sorted descending, indices (Q, k) int64 = j + ``index_offset``), equal values ordered by the
    lower index, rows with fewer than ``k`` candidates padded with -inf and index -1.
    ``init_values``/``init_indices`` (Q, k), the result of an earlier call over other keys, are
    merged in, so that chunk by chunk calls give the one call over all keys.

    Tiles as everywhere in this module: extra memory O(tile + Q * k), never Q x N."""
    cdt = compute_dtype(queries, keys)
    n_q, n_k = queries.shape[0], keys.shape[0]
    out_v = torch.empty(n_q, k, dtype=cdt, device=queries.device)
    out_i = torch.empty(n_q, k, dtype=torch.int64, device=queries.device)
    rc, cc = tile_shape(n_q, n_k, row_width=k)
    inv_tau = 1.0 / tau
    for r0 in range(0, n_q, rc):
        r1 = min(r0 + rc, n_q)
        q = queries[r0:r1].to(cdt)
        if init_values is not None:
            best_v, best_i = merge_topk(init_values[r0:r1].to(cdt), init_indices[r0:r1].long(), k)
        else:
            best_v = torch.full((r1 - r0, k), -math.inf, dtype=cdt, device=queries.device)
            best_i = torch.full((r1 - r0, k), -1, dtype=torch.int64, device=queries.device)
        for c0 in range(0, n_k, cc):
            s = _key_scores(q, keys, c0, c0 + cc, inv_tau, bias, key_mask)
            v, i = _tile_topk(s, k, c0 + index_offset)
            best_v, best_i = merge_topk(torch.cat([best_v, v], dim=1), torch.cat([best_i, i], dim=1), k)
        out_v[r0:r1], out_i[r0:r1] = best_v, best_i
    return out_v, out_i


def local_density_ref(
    labeled: torch.Tensor,
    bank: torch.Tensor,
    t: int,
    tau: float,
    pool_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """docs/method.md §1.1: ``log_rho_i = logsumexp`` of the ``t`` largest ``m_i . m_j / tau`` over
    pool rows j (``pool_mask``; every bank row when None): :func:`topk_scores_ref`, finished by
    ``log_sum_exp``. Returns (M,) float32/64."""
    values, _ = topk_scores_ref(labeled, bank, t, tau, None, pool_mask)
    return log_sum_exp(values)


def propagate_ref(
    queries: torch.Tensor,
    labeled: torch.Tensor,
    labeled_classes: torch.Tensor,
    log_rho: torch.Tensor | None,
    k: int,
    tau: float,
    num_classes: int,
):
    """docs/method.md §1.2: the K labeled points with the largest ``v . m_i / tau - log_rho_i`` vote
    with weight ``exp(score)``: :func:`topk_scores_ref` with ``bias = -log_rho``, finished by
    ``vote`` in PyTorch (``vote_torch``: the reference does not run the extension's vote kernel, which
    the op may). Returns labels (Q,) int64 and confidence (Q,) float32/64."""
    values, indices = topk_scores_ref(queries, labeled, k, tau, None if log_rho is None else -log_rho)
    return vote_torch(values, labeled_classes.long()[indices.clamp_min(0)], num_classes)


def _aggregation_tiles(v, bank, bank_labels, targets, tau):
    """Yields ``(r0, c0, bank_rows, scores, same_label_mask)`` for every (row, column) tile:
    the tile's first batch row and bank row, its bank rows (compute dtype), the scaled scores
    and where the bank label equals the row's target."""
    cdt = compute_dtype(v, bank)
    rc, cc = tile_shape(v.shape[0], bank.shape[0])
    inv_tau = 1.0 / tau
    for r0 in range(0, v.shape[0], rc):
        q = v[r0 : r0 + rc].to(cdt)
        tgt = targets[r0 : r0 + rc, None]
        for c0 in range(0, bank.shape[0], cc):
            m = bank[c0 : c0 + cc].to(cdt)
            s = (q @ m.T).mul_(inv_tau)
            yield r0, c0, m, s, bank_labels[None, c0 : c0 + cc] == tgt


def check_aggregation_rows(v, bank, bank_labels, targets, *per_row) -> None:
    """The raw aggregation ops' row counts (the public ``aggregation_loss`` checks its own
    arguments): ``bank_labels`` one per bank row, ``targets`` and each of ``per_row`` (the backward's
    normalisers and coefficients) one per row of ``v``. The kernels read that many (a (1,)
    ``coef_pos`` was read past its end); here it would have been broadcast."""
    if bank_labels.shape != bank.shape[:1]:
        raise ValueError(
            f"bank_labels must hold one class per bank row ({bank.shape[0]},), got {tuple(bank_labels.shape)}"
        )
    for name, t in zip(("targets", "lse_all", "lse_pos", "coef_all", "coef_pos"), (targets, *per_row)):
        if t.shape != v.shape[:1]:
            raise ValueError(f"{name} must hold one value per row of v ({v.shape[0]},), got {tuple(t.shape)}")


def aggregation_loss_ref(v, bank, bank_labels, targets, tau):
    """docs/method.md §1.3: ``loss_b = lse_all_b - lse_pos_b`` with ``lse_all = logsumexp_j(v.m_j/tau)``
    and ``lse_pos`` the same over rows with ``bank_labels == targets_b``. Two online
    log-sum-exps over bank tiles. Returns (loss, lse_all, lse_pos), each (B,)."""
    check_aggregation_rows(v, bank, bank_labels, targets)
    cdt = compute_dtype(v, bank)
    n = v.shape[0]
    lse_all = torch.full((n,), -math.inf, dtype=cdt, device=v.device)
    lse_pos = torch.full((n,), -math.inf, dtype=cdt, device=v.device)
    for r0, _, _, s, same in _aggregation_tiles(v, bank, bank_labels, targets, tau):
        r1 = r0 + s.shape[0]
        lse_all[r0:r1] = torch.logaddexp(lse_all[r0:r1], torch.logsumexp(s, dim=1))
        s.masked_fill_(~same, -math.inf)
        lse_pos[r0:r1] = torch.logaddexp(lse_pos[r0:r1], torch.logsumexp(s, dim=1))
    return lse_all - lse_pos, lse_all, lse_pos


def aggregation_loss_backward_ref(v, bank, bank_labels, targets, lse_all, lse_pos, coef_all, coef_pos, tau):
    """Gradient of ``sum_b coef_all_b * lse_all_b + coef_pos_b * lse_pos_b`` w.r.t. ``v``:
    ``(1/tau) * sum_j (coef_all_b p_bj + coef_pos_b q_bj) m_j``, with p the softmax over all
    rows and q over the same-label rows. Scores are recomputed tile by tile (no B x N)."""
    check_aggregation_rows(v, bank, bank_labels, targets, lse_all, lse_pos, coef_all, coef_pos)
    cdt = compute_dtype(v, bank)
    grad = torch.zeros(v.shape, dtype=cdt, device=v.device)
    a = coef_all.to(cdt)[:, None]
    b = coef_pos.to(cdt)[:, None]
    la = lse_all.to(cdt)[:, None]
    lp = lse_pos.to(cdt)[:, None]
    for r0, _, m, s, same in _aggregation_tiles(v, bank, bank_labels, targets, tau):
        r1 = r0 + s.shape[0]
        p = torch.exp(s - la[r0:r1])
        # where() rather than a product: lse_pos may be -inf for a row with no positive.
        q = torch.where(same, torch.exp(s - lp[r0:r1]), torch.zeros((), dtype=cdt, device=s.device))
        w = a[r0:r1] * p + b[r0:r1] * q
        grad[r0:r1] += w @ m
    return grad.div_(tau).to(v.dtype)


def aggregation_loss_fused_ref(v, bank, bank_labels, targets, tau):
    """The forward with what the backward needs: ``(loss, lse_all, lse_pos, mean_all,
    mean_pos)``, where ``mean_all = softmax_j(v . m_j / tau) @ bank`` and ``mean_pos`` the
    same over the rows with ``bank_labels == targets_b`` (zero for a row with no such bank row),
    each (B, D). The gradient is then elementwise (:func:`aggregation_loss_grad_from_means`),
    with no second pass over the bank. Here the means take a second tiled pass; a fused kernel
    accumulates them with the log-sum-exps in one."""
    cdt = compute_dtype(v, bank)
    loss, lse_all, lse_pos = aggregation_loss_ref(v, bank, bank_labels, targets, tau)
    mean_all = torch.zeros(v.shape, dtype=cdt, device=v.device)
    mean_pos = torch.zeros(v.shape, dtype=cdt, device=v.device)
    la, lp = lse_all[:, None], lse_pos[:, None]
    for r0, _, m, s, same in _aggregation_tiles(v, bank, bank_labels, targets, tau):
        r1 = r0 + s.shape[0]
        mean_all[r0:r1] += torch.exp(s - la[r0:r1]) @ m
        # where() rather than a product: lse_pos is -inf for a row with no positive.
        mean_pos[r0:r1] += torch.where(same, torch.exp(s - lp[r0:r1]), torch.zeros((), dtype=cdt, device=s.device)) @ m
    return loss, lse_all, lse_pos, mean_all, mean_pos


def aggregation_loss_grad_from_means(mean_all, mean_pos, coef_all, coef_pos, tau, dtype=None):
    """``(coef_all * mean_all + coef_pos * mean_pos) / tau``: the gradient of
    ``sum_b coef_all_b * lse_all_b + coef_pos_b * lse_pos_b`` with respect to ``v`` given the
    softmax-weighted bank means of :func:`aggregation_loss_fused_ref` (B, D), in ``dtype``
    (default the means')."""
    grad = coef_all.to(mean_all.dtype)[:, None] * mean_all + coef_pos.to(mean_all.dtype)[:, None] * mean_pos
    return grad.div_(tau).to(dtype or mean_all.dtype)


def occurrence_rank(indices: torch.Tensor) -> torch.Tensor:
    """For each entry, how many earlier entries hold the same index (0 for a first occurrence)."""
    n = indices.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=indices.device)
    order = torch.argsort(indices, stable=True)
    s = indices[order]
    pos = torch.arange(n, device=indices.device)
    starts = torch.ones(n, dtype=torch.bool, device=indices.device)
    starts[1:] = s[1:] != s[:-1]
    group_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - group_start
    return rank


def is_last_occurrence(indices: torch.Tensor) -> torch.Tensor:
    """True for each entry that no later entry repeats: the one a sequential loop stores last."""
    return occurrence_rank(indices.flip(0)).flip(0) == 0


def bank_update_ref_(bank, indices, values, momentum):
    """docs/method.md §1.6: ``bank[i] <- normalize(momentum * bank[i] + (1 - momentum) * v)``.

    Repeated indices are applied in order of appearance, exactly as the sequential loop
    ``for i, v in zip(indices, values): bank[i] = normalize(mu * bank[i] + (1 - mu) * v)``.
    Each round of the loop below updates a set of distinct rows at once; there are as many
    rounds as the largest multiplicity of an index (one for a batch without repeats)."""
    cdt = compute_dtype(bank, values)
    idx = indices.long()
    rank = occurrence_rank(idx)
    rounds = int(rank.max().item()) + 1 if idx.numel() else 0
    for r in range(rounds):
        sel = rank == r if rounds > 1 else slice(None)
        rows = idx[sel]
        mixed = bank[rows].to(cdt).mul_(momentum).add_(values[sel].to(cdt), alpha=1.0 - momentum)
        bank[rows] = F.normalize(mixed, dim=1).to(bank.dtype)
    return bank
