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

__all__ = [
    "compute_dtype",
    "tile_shape",
    "streaming_topk",
    "merge_topk",
    "topk_scores_ref",
    "local_density_ref",
    "propagate_ref",
    "vote",
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


def _key_scores(q, keys, c0: int, c1: int, inv_tau: float, bias, key_mask, *, sign: float):
    """One score tile: ``q @ keys[c0:c1].T * inv_tau + sign * bias[c0:c1]`` (``q`` already in
    the compute dtype), -inf where ``key_mask`` is False. ``sign`` -1 subtracts the bias, as
    propagate's ``log_rho``; +1 adds it, as topk_scores' ``bias``."""
    s = q @ keys[c0:c1].to(q.dtype).T
    s.mul_(inv_tau)
    if bias is not None:
        s.add_(bias[c0:c1].to(q.dtype), alpha=sign)
    if key_mask is not None:
        s.masked_fill_(~key_mask[c0:c1], -math.inf)
    return s


def streaming_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    tau: float,
    *,
    bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    row_chunk: int | None = None,
):
    """Top-``k`` of ``queries @ keys.T / tau - bias`` per row, over keys where ``key_mask``.

    Yields ``(row_start, values (r, k) sorted descending, indices (r, k) int64)`` per row
    chunk. Column chunks are merged with a running top-k, so memory is O(tile + r*k).
    """
    cdt = compute_dtype(queries, keys)
    n_q, n_k = queries.shape[0], keys.shape[0]
    rc, cc = tile_shape(n_q, n_k)
    if row_chunk is not None:
        rc = max(1, min(rc, row_chunk))
    inv_tau = 1.0 / tau
    for r0 in range(0, n_q, rc):
        q = queries[r0 : r0 + rc].to(cdt)
        best_v = best_i = None
        for c0 in range(0, n_k, cc):
            s = _key_scores(q, keys, c0, c0 + cc, inv_tau, bias, key_mask, sign=-1.0)
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            i += c0
            if best_v is not None:
                v = torch.cat([best_v, v], dim=1)
                i = torch.cat([best_i, i], dim=1)
                v, j = v.topk(min(k, v.shape[1]), dim=1)
                i = i.gather(1, j)
            best_v, best_i = v, i
        yield r0, best_v, best_i


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int):
    """The ``k`` best of each row of candidates ``values``/``indices`` (r, c), as the
    ``topk_scores`` op orders them: by value descending, equal values by the lower index.
    ``-inf`` values are padding: they come last, with index -1 (rows with fewer than ``k``
    finite candidates, or ``c < k``). Two stable sorts of (r, c) entries: for the few
    candidates of a merge, not for a score tile."""
    r, c = values.shape
    if c < k:
        values = torch.cat([values, values.new_full((r, k - c), -math.inf)], dim=1)
        indices = torch.cat([indices, indices.new_full((r, k - c), -1)], dim=1)
    order = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    values, indices = values.gather(1, order), indices.gather(1, order)
    return values, indices.masked_fill_(values == -math.inf, -1)


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
    """docs/method.md §1.1/§1.2's selection, on its own: for each query the ``k`` largest
    ``q . key_j / tau + bias_j`` over the keys j with ``key_mask`` set, as (values (Q, k)
    sorted descending, indices (Q, k) int64 = j + ``index_offset``), equal values ordered by
    the lower index, rows with fewer than ``k`` candidates padded with -inf and index -1.
    ``init_values``/``init_indices`` (Q, k), the result of an earlier call over other keys,
    are merged in, so that chunk by chunk calls give the one call over all keys.

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
            s = _key_scores(q, keys, c0, c0 + cc, inv_tau, bias, key_mask, sign=1.0)
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
    pool rows j (``pool_mask``; every bank row when None). Returns (M,) float32/64."""
    cdt = compute_dtype(labeled, bank)
    out = torch.empty(labeled.shape[0], dtype=cdt, device=labeled.device)
    for r0, vals, _ in streaming_topk(labeled, bank, t, tau, key_mask=pool_mask):
        out[r0 : r0 + vals.shape[0]] = torch.logsumexp(vals, dim=1)
    return out


def vote(vals: torch.Tensor, classes: torch.Tensor, num_classes: int):
    """docs/method.md §1.2's vote for one chunk: ``vals`` (r, k) scores sorted descending, ``classes``
    (r, k) their class ids. Returns (label int64, confidence) with ties to the lowest class."""
    # Subtract the row maximum (the first, as vals is sorted) before exp.
    w = torch.exp(vals - vals[:, :1])
    # Sum the weights per class among the row's k neighbours, in a (r, k) table rather than an
    # (r, num_classes) one (memory O(r k) whatever S is): sort each row by class (stable, so a
    # class's weights are added in their original order), and add each weight into the slot of
    # its class's first position.
    cls, order = torch.sort(classes, dim=1, stable=True)
    first = torch.ones_like(cls, dtype=torch.bool)
    first[:, 1:] = cls[:, 1:] != cls[:, :-1]
    pos = torch.arange(cls.shape[1], device=cls.device).expand_as(cls)
    slot = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
    votes = torch.zeros_like(w).scatter_add_(1, slot, w.gather(1, order))
    best = votes.argmax(dim=1, keepdim=True)  # first maximum: classes ascend, so the lowest id wins ties
    label = cls.gather(1, best).squeeze(1)
    conf = votes.gather(1, best).squeeze(1) / votes.sum(dim=1)
    return label, conf


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
    with weight ``exp(score)``. Returns labels (Q,) int64 and confidence (Q,) float32/64."""
    cdt = compute_dtype(queries, labeled)
    n_q = queries.shape[0]
    labels = torch.empty(n_q, dtype=torch.int64, device=queries.device)
    conf = torch.empty(n_q, dtype=cdt, device=queries.device)
    rc, _ = tile_shape(n_q, labeled.shape[0], row_width=k)  # the vote's table is (rows, k)
    classes = labeled_classes.long()
    for r0, vals, idx in streaming_topk(queries, labeled, k, tau, bias=log_rho, row_chunk=rc):
        lab, c = vote(vals, classes[idx], num_classes)
        labels[r0 : r0 + lab.shape[0]] = lab
        conf[r0 : r0 + c.shape[0]] = c
    return labels, conf


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


def aggregation_loss_ref(v, bank, bank_labels, targets, tau):
    """docs/method.md §1.3: ``loss_b = lse_all_b - lse_pos_b`` with ``lse_all = logsumexp_j(v.m_j/tau)``
    and ``lse_pos`` the same over rows with ``bank_labels == targets_b``. Two online
    log-sum-exps over bank tiles. Returns (loss, lse_all, lse_pos), each (B,)."""
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
