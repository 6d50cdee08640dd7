"""The last step of each op, applied to a top-k that was streamed in pieces: the log-sum-exp of
``local_density`` (docs/method.md §1.1) and the vote of ``propagate`` (§1.2), bit for bit.

A streamed pass keeps each row's running top-k (``topk_scores`` with ``init``), whose values are
exactly those the one-call op selects. To turn them into exactly the op's ``log_rho`` or
``(label, confidence)`` the finisher must also round as the op does (``torch.logsumexp`` does not:
it sums in another order and with another ``exp``). So on the CPU the values are handed to the op
itself, as a problem whose scores are the values: for a block of B rows, query i is the unit vector
e_i (B columns), and row i's j-th value v_ij becomes a key equal to v_ij in column i and to -1e30
elsewhere. With tau = 1 the op's score of query i and that key is ``1 * v_ij`` plus zeros: exactly
v_ij; every other row's keys score -1e30 and are never among the k best. The op then finishes the
row as it finishes its own. Cost per row: O(B^2 k), small against the pass.

On CUDA (Triton may round a float32 dot product through TF32) the finish is plain torch math, equal
to the op up to float rounding.
"""

from __future__ import annotations

import torch

from ..ops import local_density, propagate
from ..reference import vote as _torch_vote

_BLOCK = 64
_FAR = -1e30


class _Keys:
    """Builds the (B*k, B) keys whose scores against the identity queries are a block of values
    (B, k), row by row, in one buffer reused from block to block."""

    def __init__(self, k: int, dtype: torch.dtype):
        self.buf = torch.empty(_BLOCK * k, _BLOCK, dtype=dtype)
        self.k = k

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        b, k = values.shape
        keys = self.buf[: b * k, :b]
        keys.fill_(_FAR)
        keys[torch.arange(b * k), torch.arange(b).repeat_interleave(k)] = values.reshape(-1)
        return keys


def _exact(values: torch.Tensor) -> bool:
    return values.device.type == "cpu" and values.shape[1] > 0


def log_sum_exp(values: torch.Tensor) -> torch.Tensor:
    """``local_density``'s log-sum-exp of each row of ``values`` (M, t), finite, sorted descending."""
    if not _exact(values) or values.shape[0] == 0:
        return torch.logsumexp(values, dim=1)
    out = torch.empty(values.shape[0], dtype=values.dtype)
    t = values.shape[1]
    keys, eye = _Keys(t, values.dtype), torch.eye(_BLOCK, dtype=values.dtype)
    for r0 in range(0, values.shape[0], _BLOCK):
        v = values[r0 : r0 + _BLOCK]
        b = v.shape[0]
        out[r0 : r0 + b] = local_density(eye[:b, :b], keys(v), t=t, tau=1.0, check_finite=False)
    return out


def vote(values: torch.Tensor, classes: torch.Tensor, num_classes: int):
    """``propagate``'s vote of each row: ``values`` (Q, k) finite scores sorted descending (ties by
    the lower voter), ``classes`` (Q, k) their class ids. Returns (label int64, confidence)."""
    if not _exact(values) or values.shape[0] == 0:
        label, conf = _torch_vote(values, classes.long(), num_classes)
        return label, conf.to(values.dtype)
    n, k = values.shape
    label = torch.empty(n, dtype=torch.int64)
    conf = torch.empty(n, dtype=values.dtype)
    keys, eye = _Keys(k, values.dtype), torch.eye(_BLOCK, dtype=values.dtype)
    for r0 in range(0, n, _BLOCK):
        v = values[r0 : r0 + _BLOCK]
        b = v.shape[0]
        lab, c = propagate(
            eye[:b, :b],
            keys(v),
            classes[r0 : r0 + _BLOCK].reshape(-1),
            None,
            k=k,
            tau=1.0,
            num_classes=num_classes,
            check_finite=False,
        )
        label[r0 : r0 + b], conf[r0 : r0 + b] = lab, c
    return label, conf


def class_probabilities(values: torch.Tensor, classes: torch.Tensor, num_classes: int, top: int):
    """The vote's class shares ``p_c = w_c / sum w`` (float64), each row's ``top`` largest:
    (classes (Q, top) int64, probabilities (Q, top) float32), by probability descending, ties to
    the lower class; classes beyond the voters' get probability 0 and class -1."""
    w = torch.exp(values.double() - values[:, :1].double())
    votes = torch.zeros(values.shape[0], num_classes, dtype=torch.float64, device=values.device)
    votes.scatter_add_(1, classes.long(), w)
    votes /= votes.sum(dim=1, keepdim=True)
    top = min(top, num_classes)
    # stable sort of -p keeps the lower class first among equal shares
    order = torch.sort(-votes, dim=1, stable=True).indices[:, :top]
    probs = votes.gather(1, order)
    order = torch.where(probs > 0, order, torch.full_like(order, -1))
    return order, probs.float()
