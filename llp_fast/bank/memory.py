"""The LLP memory bank: embeddings, stored labels and confidences, labeled densities.

Rows are kept in *bank order*: the M labeled examples first, then the unlabeled ones. The
labeled rows are therefore a contiguous prefix, ``embeddings[:M]`` is a view (no copy), and
the unlabeled density pool is the view ``embeddings[M:]``. Every method takes *dataset
indices*; ``row_of`` maps them to bank rows.
"""

from __future__ import annotations

import numbers

import torch

from .. import _validate as check
from .._interop import as_tensor
from ..ops import aggregation_loss, bank_update_, local_density, propagate
from ..reference import is_last_occurrence
from .state import BankState

_INIT_BLOCK = 1 << 16
DENSITY_BLOCK = 1 << 14  # labeled rows per density call: the unit of the refresh's progress


def initial_rows(start: int, end: int, dim: int, seed: int) -> torch.Tensor:
    """Random unit vectors for dataset indices [start, end), float32.

    Drawn in fixed blocks of 65,536 rows, each from its own seeded generator, so that row j
    is the same vector whichever range it is drawn with: a shard of a sharded bank starts
    exactly where the same rows of a single bank do, without drawing all N rows.
    """
    out = torch.empty(max(0, end - start), dim)
    for block in range(start // _INIT_BLOCK, (end + _INIT_BLOCK - 1) // _INIT_BLOCK):
        b0 = block * _INIT_BLOCK
        # (modulo 2**63: a seed from about 9.2e12 on overflowed manual_seed, a traceback)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % 2**63)
        rows = torch.randn(_INIT_BLOCK, dim, generator=gen)
        lo, hi = max(start, b0), min(end, b0 + _INIT_BLOCK)
        out[lo - start : hi - start] = rows[lo - b0 : hi - b0]
    return torch.nn.functional.normalize(out, dim=1)


def check_indices(indices, n: int, device) -> torch.Tensor:
    """A batch's dataset ``indices`` (array-like or tensor) as an int64 tensor on ``device``: one
    integer per row, each in [0, n) (a float 1.7 would be truncated to 1, a bool mask read as 1
    and 0)."""
    indices = as_tensor(indices, "indices", device=device)
    check.vector(indices, "indices", indices.shape[0] if indices.dim() == 1 else -1, device=device, kind="int")
    check.in_range(indices, "indices", 0, n, "dataset indices")
    return indices.long()


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


class MemoryBank(BankState):
    """The state LLP keeps per example (docs/method.md §1).

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
        targets = as_tensor(targets, "targets")
        check.vector(
            targets, "targets", targets.shape[0] if targets.dim() == 1 else -1, device=targets.device, kind="int"
        )
        num_classes = check.positive_int(num_classes, "num_classes")
        dim = check.positive_int(dim, "dim")
        seed = check.positive_int(seed, "seed", low=0)  # (0.5 was torch's error)
        index_offset = check.positive_int(index_offset, "index_offset", low=0)  # (< 0: ids met class ids)
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
    def index_range(self) -> tuple[int, int]:
        """The dataset indices [start, end) this bank holds."""
        return self.index_offset, self.index_offset + len(self)

    @property
    def labeled_embeddings(self) -> torch.Tensor:
        return self.embeddings[: self.num_labeled]

    @property
    def labeled_classes(self) -> torch.Tensor:
        return self.labels[: self.num_labeled]

    def rows(self, indices) -> torch.Tensor:
        """Bank rows of dataset ``indices`` (validated)."""
        return self.row_of[check_indices(indices, len(self), self.device)]

    def is_labeled(self, indices) -> torch.Tensor:
        return self.rows(indices) < self.num_labeled

    def stored(self, indices):
        """(labels, confidence) stored for dataset ``indices``: the loss targets (docs/method.md §1.5)."""
        rows = self.rows(indices)
        return self.labels[rows], self.confidence[rows]

    # -- docs/method.md §1 steps -------------------------------------------------------------------
    def refresh_density(
        self, *, t: int = 25, tau: float = 0.07, pool: str = "unlabeled", progress=None
    ) -> torch.Tensor:
        """Once per epoch (docs/method.md §1.1): ``log_rho`` of the labeled rows against the pool,
        the unlabeled rows (paper) or every row, the point itself included (``"all"``).
        ``progress(done, total)`` is called after each block of labeled rows (rows are independent,
        so blocks change nothing in the result)."""
        if pool not in ("unlabeled", "all"):
            raise ValueError(f"pool must be 'unlabeled' or 'all', got {pool!r}")
        keys = self.embeddings[self.num_labeled :] if pool == "unlabeled" else self.embeddings
        if keys.shape[0] == 0:
            raise ValueError("pool='unlabeled' but the bank holds no unlabeled example")
        labeled, m = self.labeled_embeddings, self.num_labeled
        log_rho = torch.empty(m, device=self.device)
        for s in range(0, m, DENSITY_BLOCK):
            block = labeled[s : s + DENSITY_BLOCK]
            log_rho[s : s + block.shape[0]] = local_density(block, keys, t=t, tau=tau, check_finite=False)
            if progress is not None:
                progress(s + block.shape[0], m)
        self.log_rho = log_rho
        return self.log_rho

    def loss(self, v: torch.Tensor, indices, *, tau: float = 0.07, targets=None, check_finite=True) -> torch.Tensor:
        """Aggregation loss (docs/method.md §1.3) of the batch embeddings ``v`` against the bank, with
        each example's stored label as the target (``targets``: those labels when the caller
        already fetched them with :meth:`stored`). (B,) float32. ``check_finite``: refuse NaN or Inf
        in ``v`` (one read of it; it gave NaN losses without a word); the trainer, which stops on a
        loss that is not finite, turns it off."""
        check.tensor(v, "v")
        self._check_cast(v, "v", check.finite(v, "v") if check_finite else None, check.temperature(tau))
        if targets is None:
            targets = self.labels[self.rows(indices)]
        return aggregation_loss(
            v.to(self.embeddings.dtype), self.embeddings, self.labels, targets, tau=tau, check_finite=False
        )

    def _check_cast(self, v: torch.Tensor, name: str, size: float | None = None, tau: float | None = None) -> None:
        """On a float16 bank, ``v`` cast to it must stay finite (65,504 at most: the loss was NaN).
        ``size``: ``v``'s largest magnitude where the caller has read it (None: read for a float16
        bank alone); with it and ``tau``, ``v``'s scores against the bank's unit rows must fit the
        bank's compute dtype, the cast included (the loss and the vote were -inf or NaN where the
        ops refuse such inputs: docs/method.md §6)."""
        if self.embeddings.dtype == torch.float16 and v.dtype != torch.float16:
            size = check.finite(v, name) if size is None else size
            check.blend_fits(self.embeddings, size, name)
        if size is not None and tau is not None:  # (the bank's dtype: v is cast to it)
            check.scores_fit(tau, self.embeddings[:0], name, self.embeddings, "bank", size, 1.0)

    def instance_loss(self, v: torch.Tensor, indices, *, tau: float = 0.07, check_finite=True) -> torch.Tensor:
        """Instance discrimination (the warm-up): the aggregation loss with every row its own
        group, i.e. softmax cross-entropy of ``v`` against its own bank row. (B,) float32.
        ``check_finite`` as for :meth:`loss`."""
        check.tensor(v, "v")
        self._check_cast(v, "v", check.finite(v, "v") if check_finite else None, check.temperature(tau))
        rows = self.rows(indices)
        ids = -1 - self.index_of
        return aggregation_loss(
            v.to(self.embeddings.dtype), self.embeddings, ids, ids[rows], tau=tau, check_finite=False
        )

    def _check_batch(self, indices, embeddings, tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's bank rows and embeddings, checked: finite, within the bank's dtype (the
        blend must not overflow it) and, when ``tau`` is given, with scores that fit (a vote)."""
        rows = self.rows(indices)
        check.embeddings(embeddings, "embeddings")
        check.same_space(self.embeddings, "bank", embeddings, "embeddings", dtype=False)
        if embeddings.shape[0] != rows.shape[0]:
            raise ValueError(f"embeddings has {embeddings.shape[0]} rows but indices has {rows.shape[0]}")
        size = check.finite(embeddings, "embeddings")
        check.blend_fits(self.embeddings, size, "embeddings")
        if tau is not None:
            check.scores_fit(tau, embeddings, "embeddings", self.embeddings, "bank", size, 1.0)
        return rows, embeddings.detach()

    @torch.no_grad()
    def propagate(self, indices, embeddings, *, k: int = 10, tau: float = 0.07, density_weighting: bool = True):
        """docs/method.md §1.2 for the unlabeled examples among dataset ``indices``, with their fresh
        ``embeddings``; stores and returns (labels, confidence) of those examples. Labeled
        examples keep their class with confidence 1. For a repeated index the last
        occurrence is stored, as a sequential loop over the batch would."""
        rows, emb = self._check_batch(indices, embeddings)
        return self._propagate_rows(rows, emb, k=k, tau=tau, density_weighting=density_weighting)

    def _propagate_rows(self, rows, emb, *, k, tau, density_weighting):
        unl = rows >= self.num_labeled
        last = is_last_occurrence(rows)
        sel = unl & last
        labels, conf = self._vote(emb[sel], k=k, tau=tau, density_weighting=density_weighting)  # checked
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
        """docs/method.md §1.6's blend of the batch's bank rows (repeats applied in order)."""
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
        """After an optimizer step (docs/method.md §1.6), in order: propagate the batch's unlabeled
        examples with this step's embeddings and store label and confidence, then blend
        their bank rows. Everything is checked before anything is written."""
        tau = check.temperature(tau)
        rows, emb = self._check_batch(indices, embeddings, tau)
        check.positive_int(k, "k", high=self.num_labeled, high_what="the number of labeled points M")
        check.unit_interval(momentum, "momentum")
        out = self._propagate_rows(rows, emb, k=k, tau=tau, density_weighting=density_weighting)
        bank_update_(self.embeddings, rows, emb, momentum=momentum, check_finite=False)
        return out

    # -- reads over the whole bank ------------------------------------------------------
    @torch.no_grad()
    def vote(self, queries: torch.Tensor, *, k: int = 10, tau: float = 0.07, density_weighting: bool = True):
        """docs/method.md §1.2 for ``queries`` (Q, D) against the labeled rows, storing nothing:
        (labels, confidence). With ``density_weighting=False`` a plain weighted kNN vote."""
        check.tensor(queries, "queries")
        size = check.finite(queries, "queries")  # (the bank's own rows are kept finite by every update)
        self._check_cast(queries, "queries", size, check.temperature(tau))
        return self._vote(queries, k=k, tau=tau, density_weighting=density_weighting)

    def _vote(self, queries: torch.Tensor, *, k: int, tau: float, density_weighting: bool):
        return propagate(
            queries.to(self.embeddings.dtype),
            self.labeled_embeddings,
            self.labeled_classes,
            self.log_rho if density_weighting else None,
            k=k,
            tau=tau,
            num_classes=self.num_classes,
            check_finite=False,
        )

    @torch.no_grad()
    def class_statistics(self, truth: torch.Tensor) -> dict:
        """Per-class sums behind the diagnostics of docs/method.md §1.9, for ``truth`` (N,), the
        true class of each dataset index or -1 where unknown:

        ``pseudo_hits`` / ``pseudo_known`` (unlabeled rows with a stored label: those whose label
        equals their known truth / that have one; rows not yet labeled, -1 before propagation
        starts, read 0% before), ``pseudo_counts`` (S,) unlabeled rows per stored class,
        ``pseudo_conf_sum`` and ``unlabeled``, ``class_sums`` (S, D) and ``class_sizes`` (S,) of
        the bank rows per true class, ``density_sums`` (S,) of log_rho and ``labeled_sizes`` (S,)
        per labeled class. Sums, so that shards of a bank add theirs up."""
        s, m = self.num_classes, self.num_labeled
        truth = as_tensor(truth, "truth", device=self.device)
        check.vector(truth, "truth", len(self), device=self.device, kind="int")
        check.in_range(truth, "truth", -1, s, "class ids; -1: unknown")
        truth = truth.long()[self.index_of]  # bank order
        unl = torch.arange(len(self), device=self.device) >= m
        has = unl & (truth >= 0) & (self.labels >= 0)
        stored = self.labels[unl]
        known = truth >= 0
        return {
            "pseudo_hits": int((self.labels[has] == truth[has]).sum()),
            "pseudo_known": int(has.sum()),
            "pseudo_counts": torch.bincount(stored[stored >= 0], minlength=s),
            "pseudo_conf_sum": float(self.confidence[unl].double().sum()),
            "unlabeled": int(unl.sum()),
            "class_sums": torch.zeros(s, self.embeddings.shape[1], device=self.device).index_add_(
                0, truth[known], self.embeddings[known].float()
            ),
            "class_sizes": torch.bincount(truth[known], minlength=s),
            "density_sums": torch.zeros(s, device=self.device).index_add_(
                0, self.labeled_classes, self.log_rho.float()
            ),
            "labeled_sizes": torch.bincount(self.labeled_classes, minlength=s),
        }

    @torch.no_grad()
    def truncate(self, n: int) -> None:
        """Forgets dataset indices >= ``n``, which must be unlabeled and so the bank's last rows
        (the extra examples of ``--extra-unlabeled``, dropped for fine-tuning). Copies, so that
        the dropped rows' memory is freed."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"n must be a whole number >= 0, got {n!r}")
        n = int(n)
        if n >= len(self):
            return
        # (row_of[:n] < n alone let labeled examples go: their log_rho rows stayed, the bank broke)
        if not bool((self.row_of[n:] >= self.num_labeled).all()) or not bool((self.row_of[:n] < n).all()):
            raise ValueError(
                f"truncate({n}): the examples to drop (dataset indices >= {n}) must be unlabeled, the bank's last rows"
            )
        self.embeddings = self.embeddings[:n].clone()
        self.labels = self.labels[:n].clone()
        self.confidence = self.confidence[:n].clone()
        self.row_of = self.row_of[:n].clone()
        self.index_of = self.index_of[:n].clone()
