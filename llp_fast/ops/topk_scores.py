"""``llp_fast.topk_scores``: the k best biased scores of each query, mergeable across key chunks.

The selection behind ``local_density`` and ``propagate`` (docs/method.md §1.1, §1.2), on its
own, so that a pool larger than memory can stream through it chunk by chunk: each call merges
its keys' candidates into the running top-k of an earlier call (``init``), which is all the
state a streaming pass keeps, O(Q * k).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _validate as check
from .._interop import accepts_arrays, to_torch
from ..reference import topk_scores_ref
from ._common import compiled_first, out_float_dtype, register_cuda


@compiled_first("topk_scores")
def _topk_scores_default(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    tau: float,
    bias: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    init_values: torch.Tensor | None,
    init_indices: torch.Tensor | None,
    index_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = topk_scores_ref(queries, keys, k, tau, bias, key_mask, init_values, init_indices, index_offset)
    return values.to(out_float_dtype(queries, keys)), indices


topk_scores_op = torch.library.custom_op("llp_fast::topk_scores", _topk_scores_default, mutates_args=())


@topk_scores_op.register_fake
def _(queries, keys, k, tau, bias, key_mask, init_values, init_indices, index_offset):
    q = queries.shape[0]
    return queries.new_empty(q, k, dtype=out_float_dtype(queries, keys)), queries.new_empty(q, k, dtype=torch.int64)


register_cuda(topk_scores_op, "topk_scores", _topk_scores_default)


_INDEX_END = 2**63  # global key indices are int64: at most 2**63 - 1


def _check_init(init, n_q: int, k: int, device: torch.device, offset: int = 0, n_keys: int = 0):
    """``init`` = (values (Q, k) float, indices (Q, k) int) from an earlier call over other keys
    (a row's candidates in any order): padding is value -inf with index -1, every other value
    finite with an index >= 0, no index twice in a row and none in this call's range ``[offset,
    offset + n_keys)`` (either gave the same key twice in the answer)."""
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise TypeError(
            f"init must be a (values, indices) pair from an earlier topk_scores call, got {type(init).__name__}"
        )
    values, indices = to_torch(init[0], "init values"), to_torch(init[1], "init indices")
    kinds = (
        (values, "init values", check.FLOAT_DTYPES, "a floating"),
        (indices, "init indices", check.INT_DTYPES, "an integer"),
    )
    for x, name, dtypes, what in kinds:
        check.tensor(x, name)
        if tuple(x.shape) != (n_q, k):
            raise ValueError(f"{name} must have shape ({n_q}, {k}) (queries, k), got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, expected {device} (where queries are)")
        if x.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {x.dtype}; expected {what} dtype")
    if not check.tracing() and values.numel():
        if bool((values.isnan() | (values == math.inf)).any()):
            raise ValueError("init values contain NaN or +Inf")
        wide = indices.to(torch.int64)  # an unsigned dtype would read -1 as its maximum
        if bool((wide < -1).any()) or not torch.equal(wide == -1, values == -math.inf):
            raise ValueError("init indices must be >= 0, or -1 exactly where the init value is -inf (padding)")
        if n_keys and bool(((wide >= offset) & (wide < offset + n_keys)).any()):
            raise ValueError(
                f"init holds indices of this call's keys ({offset} to {offset + n_keys - 1} with index_offset "
                f"{offset}): init must come from a call over other keys"
            )
        if k > 1:
            ordered = wide.sort(dim=1).values
            if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
                raise ValueError("init indices repeat within a row: init must come from an earlier call's answer")
    return values, indices


class TopK(NamedTuple):
    """What :func:`topk_scores` returns (as ``torch.topk`` does): ``values``, ``indices``."""

    values: torch.Tensor
    indices: torch.Tensor


def topk_scores(
    queries,
    keys,
    *,
    k: int,
    tau: float = 0.07,
    bias=None,
    key_mask=None,
    init=None,
    index_offset: int = 0,
    check_finite: bool = True,
):
    """The ``k`` largest ``queries[i] . keys[j] / tau + bias[j]`` over the keys ``j`` where
    ``key_mask`` is set, for each query, without the (Q, N) score matrix.

    Args:
        queries: (Q, D) embeddings (float32, bfloat16, float16 or float64).
        keys: (N, D) same dtype and device; N = 0 is allowed (a last, empty chunk).
        k: how many to keep per query, >= 1 (more than the keys is fine: see padding).
        tau: temperature > 0.
        bias: optional (N,) float added to each key's score (``propagate`` ranks by
            ``bias = -log_rho``).
        key_mask: optional (N,) bool; keys where it is False are never selected.
        init: optional ``(values, indices)``, each (Q, k), from an earlier call over other
            keys: merged in, so that calls chunk by chunk give the one call over all keys.
            Its indices must already be in the global numbering (see ``index_offset``).
        index_offset: added to this call's key indices (the chunk's first row in a global
            numbering), so that they come out global.
        check_finite: reject NaN/Inf embeddings, and embeddings so large that the scores
            would overflow (one extra read of the inputs).

    Returns:
        ``TopK(values, indices)``: values (Q, k) float32 (float64 for float64 inputs),
        sorted descending, and indices (Q, k) int64; equal values are ordered by the lower
        index. A row with fewer than
        ``k`` candidates is padded with value -inf and index -1. NumPy in, NumPy out; CuPy
        in, CuPy out. On the CPU with the C++ extension a key's score does not depend on the
        chunking, in any dtype, so chunked calls give exactly the one call's values (the
        extension computes scores in whole tiles of 512 keys, so chunks much smaller than a
        tile pay for the whole tile); without it (``LLP_FAST_DISABLE_EXT=1``, a failed build)
        the reference's matrix product may sum a chunk in another order than the whole, so
        chunked values agree to rounding only. Backends sum the dot products in different
        orders, so across backends compare values, not indices.

    Scores are ``(q . key) * (1 / tau) + bias`` in float32 (float64 for float64 inputs), as in
    the other ops, so ``local_density(labeled, pool, t=t)`` is
    ``logsumexp(topk_scores(labeled, pool, k=t).values)`` and ``propagate`` is
    ``reference.vote`` over ``topk_scores(queries, labeled, k=k, bias=-log_rho)``.
    """
    return TopK(*_topk_scores(queries, keys, k, tau, bias, key_mask, init, index_offset, check_finite))


@accepts_arrays("queries", "keys", "bias", "key_mask")
def _topk_scores(queries, keys, k, tau, bias, key_mask, init, index_offset, check_finite):
    check.embeddings(queries, "queries")
    check.embeddings(keys, "keys")
    check.same_space(queries, "queries", keys, "keys")
    n = keys.shape[0]
    k = check.positive_int(k, "k")
    tau = check.temperature(tau)
    limit = _INDEX_END - max(n, 1)  # the last key's global index, index_offset + N - 1, is an int64
    index_offset = check.positive_int(
        index_offset, "index_offset", low=0, high=limit, high_what=f"2**63 - max(N, 1) (N = {n}), the most it may be"
    )
    if bias is not None:
        check.vector(bias, "bias", n, device=keys.device, kind="float")
    big_bias = check.finite(bias, "bias") if bias is not None else 0.0
    if key_mask is not None:
        check.vector(key_mask, "key_mask", n, device=keys.device, kind="bool")
    init_values = init_indices = None
    if init is not None:
        init_values, init_indices = _check_init(init, queries.shape[0], k, queries.device, index_offset, n)
    sizes = (check.finite(queries, "queries"), check.finite(keys, "keys")) if check_finite else (1.0, 1.0)
    check.scores_fit(tau, queries, "queries", keys, "keys", *sizes, bias=big_bias)
    # No autograd formula: the outputs never require grad.
    bias, init_values = (x.detach() if x is not None else None for x in (bias, init_values))
    # No row has more than N candidates without an init: the kernels' per-row buffers are sized by
    # the k they are asked for (k = 10**6 over 10 keys took 9.9 GB for a 3.6 GB answer), so they are
    # asked for N and the rest is padding.
    width = k if init is not None or check.tracing() else min(k, max(n, 1))
    values, indices = topk_scores_op(
        queries.detach(), keys.detach(), width, tau, bias, key_mask, init_values, init_indices, index_offset
    )
    if width < k:
        q = queries.shape[0]
        padded = values.new_full((q, k), -math.inf), indices.new_full((q, k), -1)
        padded[0][:, :width], padded[1][:, :width] = values, indices
        values, indices = padded
    return values, indices
