"""``llp-fast-select``: pick extra unlabeled images from a large pool (paper §4, Appendix B).

The rule (Appendix B, after Yalniz et al. 2019): score every pool image with a trained
checkpoint's classifier, ``p = softmax(logits)``; keep each image's P most confident classes
(ties: lower class id); then for each class c keep the K images with the highest ``p_c``
among those that kept c (ties: lower pool index). An image may be selected for several
classes. Defaults P = 10, K = 500 as in the paper.

The pool is streamed (:func:`llp_fast.data.extra.open_pool`): one batch of images, the
(S, K) best scores and indices so far, and the batch's candidates live in memory, so memory is
O(S * K + B * S) whatever the pool size. Images are shown to the network exactly as its
training source shows its held-out images (same channels, size and normalisation,
reconstructed from the checkpoint's config).

Output (:mod:`llp_fast.data.selection`, written atomically), by extension:

- ``.npz``: ``index`` (E,) int64 pool indices, ``class`` (E,) int64, ``score`` (E,) float32,
  ``path`` (E,) str for folder pools, ``meta`` a JSON string;
- ``.json``: ``{"meta": {...}, "selected": [{"index", "class", "score"[, "path"]}, ...]}``.

Rows are ordered by class, then by decreasing score. ``meta`` records the pool
(``source``, absolute), the checkpoint, P, K, the class count and the pool size; when the pool
carries labels (``y``), also the fraction of selected rows whose label is their class.
"""

from __future__ import annotations

import numpy as np
import torch

from .data.extra import native_format, to_input
from .errors import ConfigError


# -- the selection rule ---------------------------------------------------------------------
class PerClassTopK:
    """Streaming per-class top-K of candidate scores (Appendix B).

    ``scores`` (S, K) float32 and ``index`` (S, K) int64 hold, for each class, the best K
    candidates seen so far in decreasing score (ties: lower index first; empty slots -inf and
    -1). Candidates must arrive in increasing index order, as a stream over the pool does: a
    stable sort of [kept, new] then breaks ties by index."""

    def __init__(self, num_classes: int, k: int, top_classes: int):
        self.k, self.p = int(k), min(int(top_classes), int(num_classes))
        self.scores = torch.full((num_classes, self.k), float("-inf"))
        self.index = torch.full((num_classes, self.k), -1, dtype=torch.int64)

    def add(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        """``probs`` (B, S) float32 class probabilities of pool images ``index`` (B,)."""
        probs, index = probs.float().cpu(), index.long().cpu()
        s, b = self.scores.shape[0], probs.shape[0]
        # each image's P most confident classes, ties to the lower class id (stable sort)
        top = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, : self.p]
        cand = torch.full_like(probs, float("-inf")).scatter_(1, top, probs.gather(1, top))
        scores = torch.cat([self.scores, cand.T], 1)  # (S, K + B)
        ids = torch.cat([self.index, index.expand(s, b)], 1)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.scores, self.index = scores.gather(1, order), ids.gather(1, order)

    def result(self):
        """``(index, class, score)`` numpy arrays, by class then decreasing score."""
        keep = self.index >= 0
        cls = torch.arange(self.scores.shape[0]).unsqueeze(1).expand_as(self.index)
        return self.index[keep].numpy(), cls[keep].numpy(), self.scores[keep].numpy().astype(np.float32)


@torch.no_grad()
def select(model, source, pool, *, top_classes: int = 10, per_class: int = 500, batch_size: int = 256, progress=None):
    """Runs the rule over ``pool`` with ``model`` (preprocessed as ``source``); returns the
    ``(index, class, score)`` arrays of :meth:`PerClassTopK.result`."""
    if top_classes < 1 or per_class < 1 or batch_size < 1:
        raise ConfigError("--top-classes, --per-class and --batch-size must be positive")
    fmt = native_format(source)
    per_class = min(per_class, max(1, len(pool)))  # a class cannot keep more images than the pool holds
    best = PerClassTopK(source.num_classes, per_class, top_classes)
    model.eval()
    done = 0
    for x, idx in pool.batches(batch_size, fmt):
        logits, _ = model(to_input(source, x))
        best.add(torch.softmax(logits.float(), dim=1), idx)
        done += int(idx.shape[0])
        if progress is not None:
            progress(done, len(pool))
    return best.result()
