"""What every top-K / top-T selection in the package shares after ``topk_scores`` has selected:
the one merge of candidate lists and the two finishers (docs/method.md §1.1, §1.2).

``topk_scores`` is the only selection step (its kernels: ``csrc/cpu/topk.h``, ``kernels/topk_scores.py``;
its reference: ``reference.topk_scores_ref``). What the ops and their callers do with its output is
written once, here, in plain PyTorch:

- :func:`merge_topk`, the best k of several candidate lists (per-rank or per-split lists, an earlier
  call's ``init``), in ``topk_scores``' order: value descending, equal values by the lower index,
  ``-inf`` / ``-1`` padding last;
- :func:`log_sum_exp`, ``local_density``'s finish: ``log_rho_i = logsumexp`` of the top-T values;
- :func:`vote`, ``propagate``'s finish: the density-weighted vote of the top-K;
- :func:`class_shares`, the vote's class shares, for callers that want more than the winner.

The ops (``llp_fast.ops``), the reference, the embeddings engine and the distributed banks all call
these, so a streamed or sharded selection finished here gives exactly what the op gives on the same
values.
"""

from __future__ import annotations

import math

import torch

__all__ = ["merge_topk", "log_sum_exp", "vote", "class_shares"]

# Per-row tables of the vote stay within this many entries per chunk of rows. On a CPU the chunk's
# tables (weights, classes, votes: a few MB) then stay in cache and the allocator reuses them, where
# tables of 4M entries are fresh pages every chunk (at K = 200 on one core the vote ran 4x slower,
# `bench/bench_propagate.py --shapes ksweep`); a GPU wants few, large launches.
_TABLE = {"cpu": 1 << 18}
_TABLE_OTHER = 1 << 22


def _rows_per_chunk(values: torch.Tensor, width: int) -> int:
    return max(1, _TABLE.get(values.device.type, _TABLE_OTHER) // max(width, 1))


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int, *, index_ordered: bool = False):
    """The ``k`` best of each row of candidates ``values`` / ``indices`` (r, c), ordered as
    ``topk_scores`` orders them: by value descending, equal values by the lower index. ``-inf``
    values are padding: they come last, with index -1 (rows with fewer than ``k`` finite
    candidates, or ``c < k``). Returns (values (r, k), indices (r, k) int64).

    Two stable sorts of the (r, c) candidates: for the few candidates of a merge, never for a
    score tile. ``index_ordered``: the caller knows that each row's equal values already stand in
    ascending index order (lists in this order side by side, each list's keys numbered above the
    lists before it: the distributed banks' shards), so one sort by value gives the same result."""
    r, c = values.shape
    indices = indices.long()
    if c < k:
        values = torch.cat([values, values.new_full((r, k - c), -math.inf)], dim=1)
        indices = torch.cat([indices, indices.new_full((r, k - c), -1)], dim=1)
    if not index_ordered:
        order = indices.argsort(dim=1, stable=True)
        values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    values, indices = values.gather(1, order), indices.gather(1, order)
    return values, indices.masked_fill_(values == -math.inf, -1)


def log_sum_exp(values: torch.Tensor) -> torch.Tensor:
    """docs/method.md §1.1's finish: ``log_rho_i = log sum_j exp(values_ij)`` over each row's top-T
    values (M, T) (``-inf`` padding adds nothing). (M,), in the values' dtype."""
    return torch.logsumexp(values, dim=1)


def _dense(k: int, num_classes: int) -> bool:
    """Whether the vote sums the weights in a (rows, num_classes) table (few classes: O(k + S) a
    row) or in a (rows, k) table after sorting each row by class (many classes: O(k log k), whatever
    S is). Decided by (k, S) alone, so that every caller of the same vote rounds alike."""
    return num_classes <= 4 * k + 64


def vote(values: torch.Tensor, classes: torch.Tensor, num_classes: int, *, table: torch.Tensor | None = None):
    """docs/method.md §1.2's finish, :func:`vote_torch`'s result: on a CPU with few classes (the
    (rows, classes) table of :func:`_dense`) through the op ``llp_fast::vote``, whose kernel in the
    compiled extension (``csrc/cpu/vote_cpu.cpp``) gives the same bits without building a (rows, k)
    table of classes (its default body, without the extension, is :func:`vote_torch`); elsewhere
    :func:`vote_torch` itself (also where ``values`` needs a gradient: the op has no backward)."""
    wants_grad = values.requires_grad and torch.is_grad_enabled()
    if values.device.type == "cpu" and not wants_grad and _dense(values.shape[1], num_classes):
        return torch.ops.llp_fast.vote(values, classes, table, num_classes)
    return vote_torch(values, classes, num_classes, table=table)


def vote_torch(values: torch.Tensor, classes: torch.Tensor, num_classes: int, *, table: torch.Tensor | None = None):
    """docs/method.md §1.2's finish in PyTorch: ``values`` (r, k) the top-K scores of each row sorted descending
    (``-inf`` padding last), ``classes`` (r, k) their class ids (any id in [0, num_classes) at
    padding). Each neighbour votes with ``exp(score - best)`` (the row maximum subtracted); the
    label is the class with the largest sum, ties to the lowest class id; the confidence is that
    sum's share of the total. Returns (label (r,) int64, confidence (r,) in the values' dtype).

    ``table`` (M,): when given, ``classes`` holds positions into it (the selection's indices; any
    position at padding, -1 included) and each block of rows reads its classes from it as it is
    voted, so no (r, k) table of classes is ever built (at large K, writing one costs more than the
    vote).

    Every class's weights are added in score order, whichever table holds them."""
    r, k = values.shape
    label = torch.empty(r, dtype=torch.int64, device=values.device)
    conf = torch.empty(r, dtype=values.dtype, device=values.device)
    dense = _dense(k, num_classes)
    step = _rows_per_chunk(values, max(num_classes if dense else k, k))
    for r0 in range(0, r, step):
        v, c = values[r0 : r0 + step], classes[r0 : r0 + step]
        # Padding (-inf, position -1) sorts last: a CPU chunk whose last column has no -inf has none
        # (on a GPU the clamp is cheap and the test would wait for the device).
        # (a compiled graph cannot branch on a value: clamp there too)
        padded = v.device.type != "cpu" or torch.compiler.is_compiling() or bool(torch.isinf(v[:, -1:]).any())
        c = _classes_of(c, table, padded=padded)
        w = (v - v[:, :1]).exp_()
        if dense:
            votes = torch.zeros(v.shape[0], num_classes, dtype=w.dtype, device=w.device).scatter_add_(1, c, w)
            # The first maximum: the lowest class id (max, not argmax: the same index, and on a CPU
            # about half argmax's time over a (rows, classes) table).
            top, best = votes.max(dim=1, keepdim=True)
            label[r0 : r0 + step] = best.squeeze(1)
        else:
            # Sort each row by class (stable: a class's weights keep their score order) and add each
            # weight into the slot of its class's first position.
            cls, order = torch.sort(c, dim=1, stable=True)
            first = torch.ones_like(cls, dtype=torch.bool)
            first[:, 1:] = cls[:, 1:] != cls[:, :-1]
            pos = torch.arange(k, device=cls.device).expand_as(cls)
            slot = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
            votes = torch.zeros_like(w).scatter_add_(1, slot, w.gather(1, order))
            top, best = votes.max(dim=1, keepdim=True)  # classes ascend: the lowest id wins ties
            label[r0 : r0 + step] = cls.gather(1, best).squeeze(1)
        conf[r0 : r0 + step] = top.squeeze(1) / votes.sum(dim=1)
    return label, conf


def _classes_of(classes: torch.Tensor, table: torch.Tensor | None, padded: bool = True) -> torch.Tensor:
    """A chunk's class ids: ``classes`` itself, or read from ``table`` at those positions (padding's
    -1 reads position 0: its weight is 0). ``padded=False``: the caller knows no position is -1 (no
    -inf value in the chunk: padding is -inf with position -1), so none is clamped (on a CPU the
    clamp of a (rows, K) int64 block cost more than reading the table)."""
    if table is None:
        return classes.long()
    positions = classes.reshape(-1)
    if padded:
        positions = positions.clamp_min(0)
    return table.index_select(0, positions).view(classes.shape).long()


def class_shares(values: torch.Tensor, classes: torch.Tensor, num_classes: int, top: int, *, table=None):
    """The vote's class shares ``p_c = w_c / sum w`` (in float64), each row's ``top`` largest:
    (classes (r, top) int64, shares (r, top) float32), by share descending, ties to the lower
    class; classes beyond the voters' get share 0 and class -1. Same inputs as :func:`vote`,
    ``table`` included."""
    top = min(top, num_classes)
    out_c = torch.empty(values.shape[0], top, dtype=torch.int64, device=values.device)
    out_p = torch.empty(values.shape[0], top, dtype=torch.float32, device=values.device)
    step = _rows_per_chunk(values, num_classes)
    for r0 in range(0, values.shape[0], step):
        v = values[r0 : r0 + step].double()
        w = torch.exp(v - v[:, :1])
        votes = torch.zeros(v.shape[0], num_classes, dtype=torch.float64, device=v.device)
        votes.scatter_add_(1, _classes_of(classes[r0 : r0 + step], table), w)
        votes /= votes.sum(dim=1, keepdim=True)
        order = torch.sort(-votes, dim=1, stable=True).indices[:, :top]  # stable: lower class first
        shares = votes.gather(1, order)
        out_c[r0 : r0 + step] = torch.where(shares > 0, order, torch.full_like(order, -1))
        out_p[r0 : r0 + step] = shares.float()
    return out_c, out_p
