"""The LLP memory bank: embeddings, stored labels and confidences, labeled densities.

Rows are kept in *bank order*: the M labeled examples first, then the unlabeled ones. The
labeled rows are therefore a contiguous prefix, ``embeddings[:M]`` is a view (no copy), and
the unlabeled density pool is the view ``embeddings[M:]``. Every method takes *dataset
indices*; ``row_of`` maps them to bank rows.
"""

from __future__ import annotations

import torch

from . import _validate as check
from .ops import aggregation_loss, bank_update_, local_density, propagate
from .reference import is_last_occurrence

_STATE_KEYS = ("embeddings", "labels", "confidence", "log_rho", "row_of", "num_labeled", "num_classes")
_INIT_BLOCK = 1 << 16


def initial_rows(start: int, end: int, dim: int, seed: int) -> torch.Tensor:
    """Random unit vectors for dataset indices [start, end), float32.

    Drawn in fixed blocks of 65,536 rows, each from its own seeded generator, so that row j
    is the same vector whichever range it is drawn with: a shard of a sharded bank starts
    exactly where the same rows of a single bank do, without drawing all N rows.
    """
    out = torch.empty(max(0, end - start), dim)
    for block in range(start // _INIT_BLOCK, (end + _INIT_BLOCK - 1) // _INIT_BLOCK):
        b0 = block * _INIT_BLOCK
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.randn(_INIT_BLOCK, dim, generator=gen)
        lo, hi = max(start, b0), min(end, b0 + _INIT_BLOCK)
        out[lo - start : hi - start] = rows[lo - b0 : hi - b0]
    return torch.nn.functional.normalize(out, dim=1)


def check_new_labels(labels, confidence, n: int, num_classes: int, device, labeled: torch.Tensor) -> None:
    """The checks of :meth:`MemoryBank.set_labels`: ``n`` class ids and confidences in [0, 1]
    on ``device``, for examples none of which is labeled (``labeled``: bool per entry)."""
    check.vector(labels, "labels", n, device=device, kind="int")
    check.vector(confidence, "confidence", n, device=device, kind="float")
    check.in_range(labels, "labels", 0, num_classes, "class ids must lie in [0, num_classes)")
    check.finite(confidence, "confidence")
    if n and not bool(((confidence >= 0) & (confidence <= 1)).all()):
        raise ValueError("confidence must lie in [0, 1]")
    if bool(labeled.any()):
        raise ValueError("indices holds a labeled example: only unlabeled examples take new labels")


class MemoryBank:
    """The state LLP keeps per example (SPEC §1).

    Args:
        targets: (N,) int, per dataset index: the true class (>= 0) of a labeled example,
            or a negative value for an unlabeled one.
        num_classes: number of classes S; every labeled class id must lie in [0, S).
        dim: embedding dimension D (128 in the paper).
        dtype: storage dtype of the embeddings (float32, or bfloat16 to halve the memory).
        device: where the bank lives.
        seed: seeds the random unit vectors the bank starts from.
        index_offset: dataset index of this bank's first example (a shard of a larger
            dataset, see ``llp_fast.distributed``); instance ids stay global, ``-1 - j``.
        require_labeled: raise when no example is labeled (a shard may legitimately hold none).

    Attributes (bank order unless said otherwise):
        embeddings (N, D) unit rows; labels (N,) int64 stored labels (true class for
        labeled rows, instance id ``-1 - j`` for an unlabeled example j never visited, its
        pseudo-label after); confidence (N,) float32; log_rho (M,) float32 (zeros until
        the first :meth:`refresh_density`); row_of (N,) bank row of each dataset index;
        index_of (N,) dataset index of each row.
    """

    def __init__(
        self,
        targets,
        num_classes: int,
        *,
        dim: int = 128,
        dtype=torch.float32,
        device="cpu",
        seed: int = 0,
        index_offset: int = 0,
        require_labeled: bool = True,
    ):
        targets = torch.as_tensor(targets)
        check.vector(
            targets, "targets", targets.shape[0] if targets.dim() == 1 else -1, device=targets.device, kind="int"
        )
        num_classes = check.positive_int(num_classes, "num_classes")
        dim = check.positive_int(dim, "dim")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        targets = targets.long().cpu()
        labeled = targets >= 0
        if require_labeled and not bool(labeled.any()):
            raise ValueError("targets holds no labeled example (no entry >= 0): the labeled set is empty")
        check.in_range(targets[labeled], "targets", 0, num_classes, "labeled class ids must lie in [0, num_classes)")
        n = targets.shape[0]
        # Labeled first, each group in dataset order: a stable sort on "is unlabeled".
        index_of = torch.argsort((~labeled).to(torch.int8), stable=True)
        row_of = torch.empty_like(index_of)
        row_of[index_of] = torch.arange(n)
        emb = initial_rows(index_offset, index_offset + n, dim, seed)[index_of]
        labels = torch.where(labeled, targets, -1 - index_offset - torch.arange(n))[index_of]
        self.num_classes = num_classes
        self.index_offset = int(index_offset)
        self.num_labeled = int(labeled.sum())
        self.embeddings = emb.to(device=device, dtype=dtype)
        self.labels = labels.to(device)
        self.confidence = torch.ones(n, device=device)
        self.log_rho = torch.zeros(self.num_labeled, device=device)
        self.row_of = row_of.to(device)
        self.index_of = index_of.to(device)

    # -- views -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    @property
    def labeled_embeddings(self) -> torch.Tensor:
        return self.embeddings[: self.num_labeled]

    @property
    def labeled_classes(self) -> torch.Tensor:
        return self.labels[: self.num_labeled]

    def rows(self, indices) -> torch.Tensor:
        """Bank rows of dataset ``indices`` (validated)."""
        indices = torch.as_tensor(indices, device=self.device)
        check.vector(indices, "indices", indices.shape[0] if indices.dim() == 1 else -1, device=self.device, kind="int")
        check.in_range(indices, "indices", 0, len(self), "dataset indices")
        return self.row_of[indices.long()]

    def is_labeled(self, indices) -> torch.Tensor:
        return self.rows(indices) < self.num_labeled

    def stored(self, indices):
        """(labels, confidence) stored for dataset ``indices``: the loss targets (SPEC §1.5)."""
        rows = self.rows(indices)
        return self.labels[rows], self.confidence[rows]

    # -- SPEC §1 steps -------------------------------------------------------------------
    def refresh_density(self, *, t: int = 25, tau: float = 0.07, pool: str = "unlabeled") -> torch.Tensor:
        """Once per epoch (SPEC §1.1): ``log_rho`` of the labeled rows against the pool,
        the unlabeled rows (paper) or every row, the point itself included (``"all"``)."""
        if pool not in ("unlabeled", "all"):
            raise ValueError(f"pool must be 'unlabeled' or 'all', got {pool!r}")
        keys = self.embeddings[self.num_labeled :] if pool == "unlabeled" else self.embeddings
        if keys.shape[0] == 0:
            raise ValueError("pool='unlabeled' but the bank holds no unlabeled example")
        self.log_rho = local_density(self.labeled_embeddings, keys, t=t, tau=tau, check_finite=False).float()
        return self.log_rho

    def loss(self, v: torch.Tensor, indices, *, tau: float = 0.07, targets=None) -> torch.Tensor:
        """Aggregation loss (SPEC §1.3) of the batch embeddings ``v`` against the bank, with
        each example's stored label as the target (``targets``: those labels when the caller
        already fetched them with :meth:`stored`). (B,) float32."""
        if targets is None:
            targets = self.labels[self.rows(indices)]
        return aggregation_loss(
            v.to(self.embeddings.dtype), self.embeddings, self.labels, targets, tau=tau, check_finite=False
        )

    def instance_loss(self, v: torch.Tensor, indices, *, tau: float = 0.07) -> torch.Tensor:
        """Instance discrimination (the warm-up): the aggregation loss with every row its own
        group, i.e. softmax cross-entropy of ``v`` against its own bank row. (B,) float32."""
        rows = self.rows(indices)
        ids = -1 - self.index_of
        return aggregation_loss(
            v.to(self.embeddings.dtype), self.embeddings, ids, ids[rows], tau=tau, check_finite=False
        )

    def _check_batch(self, indices, embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows(indices)
        check.embeddings(embeddings, "embeddings")
        check.same_space(self.embeddings, "bank", embeddings, "embeddings", dtype=False)
        if embeddings.shape[0] != rows.shape[0]:
            raise ValueError(f"embeddings has {embeddings.shape[0]} rows but indices has {rows.shape[0]}")
        check.finite(embeddings, "embeddings")
        return rows, embeddings.detach()

    @torch.no_grad()
    def propagate(self, indices, embeddings, *, k: int = 10, tau: float = 0.07, density_weighting: bool = True):
        """SPEC §1.2 for the unlabeled examples among dataset ``indices``, with their fresh
        ``embeddings``; stores and returns (labels, confidence) of those examples. Labeled
        examples keep their class with confidence 1. For a repeated index the last
        occurrence is stored, as a sequential loop over the batch would."""
        rows, emb = self._check_batch(indices, embeddings)
        return self._propagate_rows(rows, emb, k=k, tau=tau, density_weighting=density_weighting)

    def _propagate_rows(self, rows, emb, *, k, tau, density_weighting):
        unl = rows >= self.num_labeled
        last = is_last_occurrence(rows)
        sel = unl & last
        labels, conf = propagate(
            emb[sel].to(self.embeddings.dtype),
            self.labeled_embeddings,
            self.labeled_classes,
            self.log_rho if density_weighting else None,
            k=k,
            tau=tau,
            num_classes=self.num_classes,
            check_finite=False,
        )
        self.labels[rows[sel]] = labels
        self.confidence[rows[sel]] = conf.float()
        return labels, conf

    @torch.no_grad()
    def set_labels(self, indices, labels, confidence) -> None:
        """Stores ``labels`` (class ids) and ``confidence`` (in [0, 1]) for the unlabeled
        dataset ``indices``, in place of what they hold (at the start: their instance ids).
        A labeled index is an error: labeled examples always keep their class. Everything is
        checked before anything is written; for a repeated index the last entry is stored."""
        rows = self._check_label_batch(indices, labels, confidence)
        last = is_last_occurrence(rows)
        self.labels[rows[last]] = labels.long()[last]
        self.confidence[rows[last]] = confidence.float()[last]

    def _check_label_batch(self, indices, labels, confidence) -> torch.Tensor:
        rows = self.rows(indices)
        check_new_labels(labels, confidence, rows.shape[0], self.num_classes, self.device, rows < self.num_labeled)
        return rows

    @torch.no_grad()
    def update(self, indices, embeddings, *, momentum: float = 0.5) -> None:
        """SPEC §1.6's blend of the batch's bank rows (repeats applied in order)."""
        rows, emb = self._check_batch(indices, embeddings)
        bank_update_(self.embeddings, rows, emb, momentum=momentum, check_finite=False)

    @torch.no_grad()
    def step(
        self,
        indices,
        embeddings,
        *,
        k: int = 10,
        tau: float = 0.07,
        momentum: float = 0.5,
        density_weighting: bool = True,
    ):
        """After an optimizer step (SPEC §1.6), in order: propagate the batch's unlabeled
        examples with this step's embeddings and store label and confidence, then blend
        their bank rows. Everything is checked before anything is written."""
        rows, emb = self._check_batch(indices, embeddings)
        check.positive_int(k, "k", high=self.num_labeled, high_what="the number of labeled points M")
        check.temperature(tau)
        check.fraction(momentum, "momentum")
        out = self._propagate_rows(rows, emb, k=k, tau=tau, density_weighting=density_weighting)
        bank_update_(self.embeddings, rows, emb, momentum=momentum, check_finite=False)
        return out

    # -- checkpointing -------------------------------------------------------------------
    def gather(self) -> MemoryBank:
        """The whole bank as one :class:`MemoryBank`: this one (a sharded bank gathers)."""
        return self

    def load_full(self, state: dict) -> None:
        """Loads a single-process state (what :meth:`gather` gives); same as load_state_dict."""
        self.load_state_dict(state)

    def state_dict(self) -> dict:
        return {
            "embeddings": self.embeddings,
            "labels": self.labels,
            "confidence": self.confidence,
            "log_rho": self.log_rho,
            "row_of": self.row_of,
            "num_labeled": self.num_labeled,
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict`; checks every entry first, so a corrupt or
        mismatched state raises ``ValueError`` and leaves this bank unchanged."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"bank state is missing {missing}")
        n, d = self.embeddings.shape
        m = int(state["num_labeled"])
        expect = {
            "embeddings": (n, d),
            "labels": (n,),
            "confidence": (n,),
            "log_rho": (m,),
            "row_of": (n,),
        }
        for key, shape in expect.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"bank state {key!r} has shape {got}, expected {shape}")
        if m != self.num_labeled or int(state["num_classes"]) != self.num_classes:
            raise ValueError("bank state was saved for a different labeled split or class count")
        if not bool(torch.isfinite(state["embeddings"].float()).all()):
            raise ValueError("bank state 'embeddings' contains NaN or Inf")
        row_of = state["row_of"].long().to(self.device)
        self.embeddings.copy_(state["embeddings"])
        self.labels.copy_(state["labels"])
        self.confidence.copy_(state["confidence"])
        self.log_rho = state["log_rho"].to(device=self.device, dtype=torch.float32).clone()
        self.row_of.copy_(row_of)
        self.index_of[row_of] = torch.arange(n, device=self.device)
