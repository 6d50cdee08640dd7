"""End-of-epoch evaluation (docs/method.md §1.9): the reported accuracy and the diagnostics.

- ``test_top1``, ``test_top5``: the classifier on the held-out split (the reported number), with
  the weight average's weights when the run keeps one (docs/method.md §8.3; the trained weights'
  top-1 is then ``test_top1_trained``);
- ``knn_top1``: the held-out embeddings' weighted vote of their K nearest labeled bank rows (no
  density term); without a bank (the baseline, ``--method fixmatch``) the vote is over fresh
  embeddings of the labeled examples;
- ``pseudo_acc``, ``pseudo_counts``, ``pseudo_conf``: the stored labels of the unlabeled training
  examples (accuracy where their truth is known, per-class counts Q_i, mean confidence);
  ``pseudo_known`` of the ``unlabeled`` examples hold a label whose truth is known (the base of
  ``pseudo_acc``: with ``--extra-unlabeled`` the selected images' truth is mostly unknown);
- ``aggregation``, ``aggregation_per_class``: the norm of each true class's mean bank embedding
  (the paper's Fig. 2b);
- ``corr_density_count``: Pearson correlation of D_i (mean labeled log-density of class i) with
  Q_i (the paper's Fig. 3).

The bank computes its share of every sum itself (:meth:`llp_fast.bank.MemoryBank.class_statistics`
and ``vote``), so a sharded bank answers with all-reduced per-class sums and a merged top-K, never
by gathering its rows onto one rank.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops import propagate

_NO_BANK = (
    "pseudo_acc",
    "pseudo_known",
    "unlabeled",
    "pseudo_counts",
    "pseudo_conf",
    "aggregation",
    "aggregation_per_class",
    "corr_density_count",
)


def _top(logits, y, s):
    top5 = logits.topk(min(5, s), dim=1).indices
    return float((top5[:, 0] == y).float().mean()), float((top5 == y[:, None]).any(1).float().mean())


@torch.no_grad()
def evaluate(
    embed,
    source,
    bank,
    *,
    k: int,
    tau: float,
    num_classes: int,
    batch_size: int,
    labeled_idx,
    targets,
    truth,
    averaged: bool = False,
) -> dict:
    """The metrics of docs/method.md §1.9. ``embed(batches, averaged=False)`` returns (logits,
    embeddings, keys) of ``(images, key)`` batches in eval mode, with the weight average's weights
    when ``averaged`` (``averaged``: the run keeps one)."""
    s = num_classes
    logits, emb, y = embed(source.test_batches(batch_size))
    y = y.to(logits.device)
    out = {}
    if averaged:
        avg_logits, _, _ = embed(source.test_batches(batch_size), averaged=True)
        out["test_top1"], out["test_top5"] = _top(avg_logits, y, s)
        out["test_top1_trained"] = _top(logits, y, s)[0]
    else:
        out["test_top1"], out["test_top5"] = _top(logits, y, s)
    if bank is not None:
        knn, _ = bank.vote(emb, k=k, tau=tau, density_weighting=False)
    else:
        _, lab_emb, idx = embed(source.index_batches(labeled_idx, batch_size))
        knn, _ = propagate(
            emb, lab_emb, targets[idx], None, k=min(k, lab_emb.shape[0]), tau=tau, num_classes=s, check_finite=False
        )
    out["knn_top1"] = float((knn == y).float().mean())
    if bank is None:
        out.update(dict.fromkeys(_NO_BANK))
        return out
    st = bank.class_statistics(truth)
    out["pseudo_acc"] = st["pseudo_hits"] / st["pseudo_known"] if st["pseudo_known"] else None
    out["pseudo_known"], out["unlabeled"] = st["pseudo_known"], st["unlabeled"]
    counts = st["pseudo_counts"]
    out["pseudo_counts"] = counts.tolist()
    out["pseudo_conf"] = st["pseudo_conf_sum"] / st["unlabeled"] if st["unlabeled"] else None
    agg = (st["class_sums"] / st["class_sizes"].clamp_min(1)[:, None]).norm(dim=1)
    out["aggregation"] = float(agg.mean())
    out["aggregation_per_class"] = [round(v, 4) for v in agg.tolist()]
    d = st["density_sums"] / st["labeled_sizes"].clamp_min(1)
    dq = np.stack([d.double().cpu().numpy(), counts.double().cpu().numpy()])
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(dq)[0, 1] if dq.std(axis=1).min() > 0 else float("nan")
    out["corr_density_count"] = None if not np.isfinite(r) else float(r)
    return out
