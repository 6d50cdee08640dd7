"""``llp_fast.LocalLabelPropagation``: LLP on fixed features with scikit-learn's semi-supervised API
(``LabelSpreading``'s): ``fit(X, y)`` with -1 for unlabeled rows, ``transduction_``,
``label_distributions_``, ``predict``, ``predict_proba``, ``score``.

``fit`` runs the streaming engine (:mod:`.engine`) on X in memory. New points are labeled by the
voters of the last round (for one round: the labeled rows, the paper's vote), with the same K,
temperature and density weights; a training row that was still voted on in the last round gets the
same label from ``predict`` as in ``transduction_``.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._topk import vote
from ..ops import neighbours
from .engine import Engine
from .settings import DEFAULT_ROUNDS, Settings
from .sources import Rows


def _unlabeled(y: np.ndarray) -> np.ndarray:
    """Where ``y`` is -1 (the unlabeled mark), for numeric, string and object label arrays."""
    if y.dtype.kind in "iuf":
        return y == -1
    if y.dtype.kind == "O":
        return np.array([isinstance(v, numbers.Number) and not isinstance(v, bool) and v == -1 for v in y], bool)
    return np.zeros(y.shape[0], bool)


def expected_failed_checks(estimator=None) -> dict[str, str]:
    """scikit-learn estimator checks this estimator cannot meet, with the reason (for
    ``parametrize_with_checks(..., expected_failed_checks=expected_failed_checks)``)."""
    return {
        "check_classifiers_classes": "-1 marks an unlabeled sample (scikit-learn's semi-supervised convention, as "
        "in LabelSpreading), so a binary problem whose classes are -1 and 1 has only class 1 labeled",
    }


class LocalLabelPropagation(ClassifierMixin, BaseEstimator):
    """Local Label Propagation on fixed features (docs/method.md §1.1-1.2; rounds > 1: §7).

    Parameters:
        n_neighbors: K, the voters of each row (at most the number of voters).
        n_density_neighbors: T, the neighbours in a voter's local density (at most the pool).
        tau: the temperature of the scores ``x . m / tau``.
        density_weighting: weigh the vote by the voters' local density (False: the NoDW ablation).
        rounds: rounds of the vote; 1 is the paper's one-shot vote from the labeled rows, more let the
            most confident rows join the voters (default 10: the most accurate setting measured).
        density_pool: 'auto' (unlabeled rows for one round, all rows for more), 'unlabeled' or 'all'.
        labeled_weight: weight of the labeled voters (None: 1 for one round, 3 for more).
        max_voters: cap on pseudo-labeled voters ("auto": keeps the cost linear in N, see
            llp_fast.embeddings.settings; None: no cap).
        normalize: L2-normalise the rows of X (the method compares unit vectors).
        device: 'cpu', 'cuda' or 'cuda:N'.
        chunk_size: rows per block of the streamed passes.

    Attributes (after ``fit``): ``classes_``, ``transduction_`` (a label for every training row),
    ``label_distributions_`` (n_samples, n_classes), each row the vote's class shares (one-hot on
    labeled rows), ``n_features_in_``, ``rounds_run_``.
    """

    def __init__(
        self,
        n_neighbors=10,
        n_density_neighbors=25,
        tau=0.07,
        density_weighting=True,
        rounds=DEFAULT_ROUNDS,
        density_pool="auto",
        labeled_weight=None,
        max_voters="auto",
        normalize=True,
        device="cpu",
        chunk_size=65536,
    ):
        self.n_neighbors = n_neighbors
        self.n_density_neighbors = n_density_neighbors
        self.tau = tau
        self.density_weighting = density_weighting
        self.rounds = rounds
        self.density_pool = density_pool
        self.labeled_weight = labeled_weight
        self.max_voters = max_voters
        self.normalize = normalize
        self.device = device
        self.chunk_size = chunk_size

    def _settings(self) -> Settings:
        return Settings(
            k=self.n_neighbors,
            t=self.n_density_neighbors,
            tau=self.tau,
            density=self.density_weighting,
            density_pool=self.density_pool,
            labeled_weight=self.labeled_weight,
            rounds=self.rounds,
            max_voters=self.max_voters,
            chunk=self.chunk_size,
            device=self.device,
        ).checked()

    @staticmethod
    def _refuse_sparse(X) -> None:
        if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
            raise TypeError(
                "LocalLabelPropagation does not take sparse input: it compares dense embeddings; "
                "pass a dense array (X.toarray()) of the features"
            )

    def fit(self, X, y):
        """Labels every row of X from the labeled ones (``y != -1``)."""
        self._refuse_sparse(X)
        settings = self._settings()
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], y_numeric=False)
        unlabeled = _unlabeled(y)
        check_classification_targets(y[~unlabeled] if unlabeled.any() and not unlabeled.all() else y)
        if unlabeled.all():
            raise ValueError("y has no labeled sample: mark unlabeled samples with -1 and give at least one label")
        self.classes_ = np.unique(y[~unlabeled])
        codes = np.full(y.shape[0], -1, np.int64)
        codes[~unlabeled] = np.searchsorted(self.classes_, y[~unlabeled])
        rows = Rows(X, normalize=self.normalize, what="X")
        result = Engine(rows, codes, settings).run(top_classes=len(self.classes_))
        self.transduction_ = self.classes_[result.labels]
        dist = np.zeros((X.shape[0], len(self.classes_)), np.float64)
        have = result.top_classes >= 0
        r, c = np.nonzero(have)
        dist[r, result.top_classes[r, c]] = result.top_probs[r, c]
        self.label_distributions_ = dist / dist.sum(axis=1, keepdims=True)
        self.rounds_run_ = result.rounds_run
        self.voters_ = rows.take(result.voter_rows).numpy()
        self.voter_classes_ = result.voter_classes
        self.voter_bias_ = result.voter_bias
        return self

    def _votes(self, X):
        """(top-K values, their classes) of each row of X against the final voters, block by block."""
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        settings = self._settings()
        device = torch.device(settings.device)
        voters = torch.from_numpy(self.voters_).to(device)
        queries = Rows(X, normalize=self.normalize, what="X")
        dtype = torch.float64 if torch.float64 in (voters.dtype, queries.dtype) else torch.float32
        voters = voters.to(dtype)
        b = None if self.voter_bias_ is None else torch.from_numpy(self.voter_bias_).to(device, dtype)
        classes = torch.from_numpy(self.voter_classes_).to(device)
        k = min(settings.k, voters.shape[0])
        for lo, hi in queries.blocks(settings.chunk):
            top = neighbours(queries.read(lo, hi).to(device, dtype), voters, b, k=k, tau=settings.tau)
            yield top.values, classes[top.indices]

    def predict(self, X):
        """The vote of the final voters for each row of X (ties to the first class of ``classes_``)."""
        check_is_fitted(self)
        self._refuse_sparse(X)
        labels = [vote(v, c, len(self.classes_))[0].cpu().numpy() for v, c in self._votes(X)]
        return self.classes_[np.concatenate(labels)] if labels else self.classes_[:0]

    def predict_proba(self, X):
        """Each row's class shares in the vote of the final voters, (n_samples, n_classes)."""
        check_is_fitted(self)
        self._refuse_sparse(X)
        n_classes = len(self.classes_)
        parts = []
        for v, c in self._votes(X):
            w = torch.exp(v.double() - v[:, :1].double())
            votes = torch.zeros(v.shape[0], n_classes, dtype=torch.float64, device=v.device)
            votes.scatter_add_(1, c.long(), w)
            parts.append((votes / votes.sum(dim=1, keepdim=True)).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, n_classes))
