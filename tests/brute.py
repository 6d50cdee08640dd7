"""Independent float64 brute forces of docs/method.md §1, written with dense matrices and plain loops.

Nothing here imports llp_fast: these are the yardstick the reference itself is held to.
"""

from __future__ import annotations

import math

import numpy as np


def f64(x) -> np.ndarray:
    """A tensor's values as float64 NumPy (bfloat16 goes through float32 exactly)."""
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def local_density(labeled, bank, t, tau, pool=None):
    """log_rho_i = log sum of exp over the t largest m_i . m_j / tau, j in the pool."""
    labeled, bank = f64(labeled), f64(bank)
    pool = range(len(bank)) if pool is None else [j for j in range(len(bank)) if pool[j]]
    out = []
    for m_i in labeled:
        sims = sorted((float(m_i @ bank[j]) / tau for j in pool), reverse=True)[:t]
        out.append(math.log(sum(math.exp(s) for s in sims)))
    return np.array(out)


def topk_scores(queries, labeled, log_rho, k, tau):
    """Per query, the k largest scores v . m_i / tau - log_rho_i and their indices."""
    queries, labeled = f64(queries), f64(labeled)
    bias = np.zeros(len(labeled)) if log_rho is None else f64(log_rho)
    rows = []
    for v in queries:
        scored = sorted(((float(v @ labeled[i]) / tau - bias[i], i) for i in range(len(labeled))), reverse=True)
        rows.append(scored[:k])
    return rows


def topk_biased(queries, keys, k, tau, bias=None, mask=None):
    """(values (Q, k), indices (Q, k)): per query the k largest q . key_j / tau + bias_j over the
    keys with mask set, equal scores by the lower index, -inf / -1 padding past the candidates."""
    queries, keys = f64(queries), f64(keys)
    bias = np.zeros(len(keys)) if bias is None else f64(bias)
    keep = range(len(keys)) if mask is None else [j for j in range(len(keys)) if mask[j]]
    values = np.full((len(queries), k), -np.inf)
    indices = np.full((len(queries), k), -1, dtype=np.int64)
    for r, q in enumerate(queries):
        scored = sorted(((float(q @ keys[j]) / tau + bias[j], j) for j in keep), key=lambda sj: (-sj[0], sj[1]))
        for c, (score, j) in enumerate(scored[:k]):
            values[r, c], indices[r, c] = score, j
    return values, indices


def propagate(queries, labeled, classes, log_rho, k, tau, num_classes):
    """(labels, confidences): the density-weighted vote of docs/method.md §1.2, ties to the lowest class."""
    classes = [int(c) for c in classes]
    labels, confs = [], []
    for top in topk_scores(queries, labeled, log_rho, k, tau):
        w = [0.0] * num_classes
        for score, i in top:
            w[classes[i]] += math.exp(score)
        best = max(w)
        labels.append(min(c for c in range(num_classes) if w[c] == best))
        confs.append(best / sum(w))
    return np.array(labels), np.array(confs)


def aggregation_loss(v, bank, bank_labels, targets, tau):
    """Dense logits: -logsumexp over same-label rows + logsumexp over all rows."""
    v, bank = f64(v), f64(bank)
    logits = v @ bank.T / tau
    out = []
    for b in range(len(v)):
        same = [j for j in range(len(bank)) if int(bank_labels[j]) == int(targets[b])]
        lse_all = np.logaddexp.reduce(logits[b])
        lse_pos = np.logaddexp.reduce(logits[b, same]) if same else -np.inf
        out.append(lse_all - lse_pos)
    return np.array(out)


def aggregation_grad(v, bank, bank_labels, targets, tau, weights=None):
    """d(sum_b w_b L_b)/dv = (1/tau) sum_j (p_bj - q_bj) m_j, from dense softmaxes."""
    v, bank = f64(v), f64(bank)
    weights = np.ones(len(v)) if weights is None else f64(weights)
    logits = v @ bank.T / tau
    grad = np.zeros_like(v)
    for b in range(len(v)):
        p = np.exp(logits[b] - np.logaddexp.reduce(logits[b]))
        same = np.array([int(lab) == int(targets[b]) for lab in bank_labels])
        q = np.where(same, np.exp(logits[b] - np.logaddexp.reduce(logits[b, same])), 0.0)
        grad[b] = weights[b] * (p - q) @ bank / tau
    return grad


def bank_update(bank, indices, values, momentum):
    """The sequential loop: each (i, v) in order, bank[i] = normalize(mu bank[i] + (1-mu) v)."""
    bank = f64(bank).copy()
    values = f64(values)
    for i, v in zip([int(i) for i in indices], values):
        m = momentum * bank[i] + (1 - momentum) * v
        bank[i] = m / max(np.linalg.norm(m), 1e-12)
    return bank
