"""The multi-round scheme of docs/method.md §7 written directly on the in-memory ops: every round
``local_density`` of the new voters and ``propagate`` of every remaining row against all voters (no
running state, no streaming). The yardstick of the streaming engine's rounds."""

from __future__ import annotations

import math

import numpy as np
import torch

import llp_fast


def rounds_reference(
    x, labels, *, rounds, k=10, t=25, tau=0.07, density=True, pool="all", weight=3.0, cap=None, ties="score"
):
    """x (N, D) unit rows (torch), labels (N,) compact class ids, -1 unlabeled. Returns (label, conf).
    ``ties="score"``: every confidence of at least 0.93 joins as equal, then the higher best-voter
    score, then the lower row; ``ties="row"``: exact confidences, then the row."""
    sure = 0.93 if ties == "score" else 1.0
    n = x.shape[0]
    lab = labels >= 0
    n_u = int((~lab).sum())
    cap = n_u if cap is None else min(n_u, cap)
    num_classes = int(labels.max()) + 1
    prior = np.bincount(labels[lab], minlength=num_classes) / lab.sum()
    out_label = labels.copy()
    out_conf = np.where(lab, 1.0, 0.0).astype(np.float32)
    out_key = np.zeros(n)  # each row's best voter score (v . m_i / tau - b_i): the joining tie-break
    voters = []  # in the order they joined: labeled rows, then each round's additions by row
    vclass, vbias = [], []
    is_voter = lab.copy()
    new = np.flatnonzero(lab)
    for r in range(1, rounds + 1):
        if len(new) == 0:  # the same voters: the same votes (the quotas still grow, below)
            if r == rounds:
                break
            new = _join(r, rounds, cap, prior, num_classes, out_label, out_conf, out_key, is_voter, lab, sure)
            continue
        mask = None if pool == "all" else torch.from_numpy(~lab)
        bias = torch.zeros(len(new), dtype=x.dtype)
        if density:
            tt = min(t, n if pool == "all" else n_u)
            bias = llp_fast.local_density(x[new], x, t=tt, tau=tau, pool_mask=mask)
        if weight != 1.0:
            bias = (bias.double() - torch.from_numpy(np.where(lab[new], math.log(weight), 0.0))).to(x.dtype)
        voters.append(new)
        vclass.append(out_label[new])
        vbias.append(bias)
        v = np.concatenate(voters)
        q = np.flatnonzero(~is_voter)
        if len(q) == 0:
            break
        use_bias = torch.cat(vbias) if (density or weight != 1.0) else None
        lq, cq = llp_fast.propagate(
            x[q],
            x[v],
            torch.from_numpy(np.concatenate(vclass)),
            use_bias,
            k=min(k, len(v)),
            tau=tau,
            num_classes=num_classes,
        )
        out_label[q], out_conf[q] = lq.numpy(), cq.float().numpy()
        best = llp_fast.topk_scores(x[q], x[v], k=1, tau=tau, bias=None if use_bias is None else -use_bias)
        out_key[q] = best.values[:, 0].double().numpy() if ties == "score" else 0.0
        if r == rounds:
            break
        new = _join(r, rounds, cap, prior, num_classes, out_label, out_conf, out_key, is_voter, lab, sure)
    return out_label, out_conf


def _join(r, rounds, cap, prior, num_classes, out_label, out_conf, out_key, is_voter, lab, sure):
    """§7.1 step 3 after round r: the rows that join (marked in is_voter), sorted."""
    q = np.flatnonzero(~is_voter)
    added = []
    for c in range(num_classes):
        n_add = int(round(r / rounds * cap * prior[c])) - int((out_label[is_voter & ~lab] == c).sum())
        if n_add <= 0:
            continue
        idx = q[out_label[q] == c]
        idx = idx[np.lexsort((idx, -out_key[idx], -np.minimum(out_conf[idx], np.float32(sure))))][:n_add]
        added.append(idx)
    new = np.sort(np.concatenate(added)) if added else np.zeros(0, np.int64)
    is_voter[new] = True
    return new
