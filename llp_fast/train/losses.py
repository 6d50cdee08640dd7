"""The losses of one training step, as functions of what they read (docs/method.md §1.5, §8.2).

- :func:`llp_loss`: ``mean_b c_b (CE(logits_b, l_b) + L_A(v_b))`` with the stored labels and
  confidences (§1.5; CE is 0 for an instance id), or instance discrimination during a warm-up;
- :func:`supervised_loss`: cross-entropy on labeled examples only (the baseline, and the
  supervised part of ``--method fixmatch``);
- :func:`consistency_loss`: the strong view of each example learns a target where the target is
  confident (§8.2), averaged over the batch (an example without a confident target adds 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def llp_loss(logits, emb, idx, bank, *, tau: float, confidence: bool, warmup: bool = False):
    """docs/method.md §1.5 for a batch; returns ``(loss, stored labels, stored confidences)``."""
    if warmup:
        return bank.instance_loss(emb, idx, tau=tau, check_finite=False).mean(), None, None
    labels, conf = bank.stored(idx)
    la = bank.loss(emb, idx, tau=tau, targets=labels, check_finite=False)
    ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none") * (labels >= 0)
    c = conf if confidence else torch.ones_like(conf)
    return (c * (ce + la)).mean(), labels, conf


def supervised_loss(logits, targets, *, only_labeled: bool = False):
    """Cross-entropy against ``targets`` (B,); ``only_labeled``: averaged over the entries >= 0 alone
    (none: 0), the others ignored."""
    if not only_labeled:
        return F.cross_entropy(logits.float(), targets)
    lab = targets >= 0
    ce = F.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none") * lab
    return ce.sum() / lab.sum().clamp_min(1)


def strong_targets(kind: str, logits_weak, labels, conf, truth_known, threshold: float):
    """The strong views' targets and mask (docs/method.md §8.2). ``labels``/``conf``: the stored
    LLP labels and confidences of the batch (``truth_known`` (B,): the class of a labeled example,
    -1 otherwise; labeled examples always take their class). ``kind``: ``llp`` (stored label with
    confidence >= threshold), ``weak`` (the weak view's prediction with probability >= threshold),
    ``agree`` (the stored label where it is confident and the weak view predicts it)."""
    p = torch.softmax(logits_weak.detach().float(), dim=1)
    p_max, pred = p.max(dim=1)
    if kind == "weak":
        target, ok = pred, p_max >= threshold
    else:
        target, ok = labels.clamp(min=0), (labels >= 0) & (conf >= threshold)
        if kind == "agree":
            ok = ok & (pred == target)
    lab = truth_known >= 0
    return torch.where(lab, truth_known, target), (ok | lab).float()


def consistency_loss(logits_strong, target, mask):
    """``mean_b mask_b CE(strong_b, target_b)`` and the share of the batch with a target."""
    ce = F.cross_entropy(logits_strong.float(), target, reduction="none")
    return (ce * mask).mean(), float(mask.mean())
