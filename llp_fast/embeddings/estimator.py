"""``llp_fast.LocalLabelPropagation``: LLP on fixed features with scikit-learn's semi-supervised API
(``LabelSpreading``'s): ``fit(X, y)`` with -1 for unlabeled rows, ``transduction_``,
``label_distributions_``, ``predict``, ``predict_proba``, ``score``.

``fit`` runs the streaming engine (:mod:`.engine`) on X in memory. New points are labeled by the
voters of the last round (for one round: the labeled rows, the paper's vote), with the same K,
temperature and density weights (:class:`.model.Model`, which ``llp-fast-propagate --model`` also
votes with); a training row that was still voted on in the last round gets the same label from
``predict`` as in ``transduction_``. What the estimator adds to scikit-learn's API: suspect labels
(``label_suspects_``, :mod:`.suspects`), ``n_neighbors="auto"`` / ``tau="auto"`` (:mod:`.tune`) and
abstention (``min_confidence``).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._labels import refuse_wrapped_unlabeled
from . import tune
from .engine import Engine
from .model import Model
from .settings import Settings
from .sources import Rows
from .suspects import drop_worst, drops_asked, suspects_of

_DEFAULT = Settings()


def _unlabeled(y: np.ndarray) -> np.ndarray:
    """Where ``y`` is -1 (the unlabeled mark), for numeric, string and object label arrays. The
    mark is the number -1 (scikit-learn's semi-supervised convention); a label that is the text
    "-1" is refused: it would be a class of its own, every row labeled; so is an unsigned ``y`` that
    holds its dtype's largest value (-1 cast to uint8 is 255: a class of its own, every row labeled;
    the command line refuses the same files)."""
    refuse_wrapped_unlabeled(y, "y")
    if y.dtype.kind in "iuf":
        return y == -1
    if y.dtype.kind in "OUS":
        text = [v.strip() for v in y if isinstance(v, (str, bytes))]
        if any(t in ("-1", b"-1") for t in text):
            raise ValueError(
                "y holds the text '-1': the unlabeled mark is the number -1 (an object array such as "
                "np.array(['cat', -1, 'dog'], dtype=object)), and '-1' as a class name would label every row"
            )
    if y.dtype.kind == "O":
        return np.array([isinstance(v, numbers.Number) and not isinstance(v, bool) and v == -1 for v in y], bool)
    return np.zeros(y.shape[0], bool)


def _mixed_labels(y):
    """A list or tuple that mixes text (or bools) with numbers (``["cat", -1, "dog"]``) as an object
    array, so the number -1 stays the unlabeled mark: NumPy would make every entry text, -1 the class
    "-1" (bools the numbers 0 and 1). Text alone stays as NumPy reads it (a string array, as from an
    array of the same labels)."""
    if isinstance(y, (list, tuple)):
        for kind in ((str, bytes), bool):
            of_kind = [isinstance(v, kind) for v in y]
            if any(of_kind) and not all(of_kind):
                return np.asarray(y, dtype=object)
    return y


def _as_numbers(y: np.ndarray) -> np.ndarray:
    """An object array of numbers (bool or int labels beside the number -1, which a bool array
    cannot hold) as the numeric array scikit-learn's target check reads: it calls any object array
    that is not text "unknown", a regression target."""
    if y.dtype == object and all(isinstance(v, numbers.Number) for v in y):
        return np.array(y.tolist())
    return y


def _float_types(X) -> list:
    """validate_data's dtypes for X: float16 is computed in float32, as the command line computes a
    float16 .npy file (the first listed type is what other types become)."""
    dtypes = getattr(X, "dtypes", None)  # a DataFrame's columns
    kinds = set(dtypes) if dtypes is not None and not isinstance(dtypes, np.dtype) else {getattr(X, "dtype", None)}
    return [np.float32, np.float64] if kinds == {np.dtype(np.float16)} else [np.float64, np.float32]


def with_abstention(classes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``classes[codes]``, with -1 where ``codes`` is -1 (an abstention). Numbers keep their dtype
    (unsigned classes become int64, or objects where one is beyond int64: they wrapped to negative
    numbers); other label types (strings) become an object array."""
    if (codes >= 0).all():
        return classes[codes]
    kind = classes.dtype.kind
    wide = kind == "u" and classes.size and int(classes.max()) > np.iinfo(np.int64).max
    dtype = object if wide else np.int64 if kind == "u" else classes.dtype if kind in "if" else object
    out = classes.astype(dtype)[np.maximum(codes, 0)]
    out[codes < 0] = -1
    return out


def _auto_or(value, name: str):
    """None for "auto" (chosen at fit), else the value (checked by Settings)."""
    if isinstance(value, str) and value == "auto":
        return None
    if value is None or isinstance(value, (str, tuple, list)):
        raise ValueError(f"{name} must be 'auto' or a number, got {value!r}")
    return value


# Settings' field -> the estimator's parameter, named in the messages of Settings.checked()
_PARAMS = {
    "k": "n_neighbors",
    "t": "n_density_neighbors",
    "density": "density_weighting",
    "chunk": "chunk_size",
}


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
        n_neighbors: K, the voters of each row (at most the number of voters); "auto": chosen from
            (5, 10, 20, 50) by leave-one-out accuracy of the labeled rows (docs/embeddings.md).
        n_density_neighbors: T, the neighbours in a voter's local density (at most the pool).
        tau: the temperature of the scores ``x . m / tau``; "auto" as for ``n_neighbors``, from
            (0.03, 0.05, 0.07, 0.1, 0.2).
        density_weighting: weigh the vote by the voters' local density (False: the NoDW ablation).
        rounds: rounds of the vote; 1 is the paper's one-shot vote from the labeled rows, more let the
            most confident rows join the voters ("auto", the default: 20 while every unlabeled row
            may become a voter, 10 where ``max_voters`` caps them; docs/embeddings.md).
        density_pool: 'auto' (unlabeled rows for one round, all rows for more), 'unlabeled' or 'all'.
        labeled_weight: weight of the labeled voters (None: 1 for one round, 3 for more).
        max_voters: cap on pseudo-labeled voters, the total the rounds grow toward (the last round
            votes with (rounds - 1) / rounds of it; "auto": keeps the cost linear in N, see
            llp_fast.embeddings.settings; None: no cap). Each class's share of it is rounded
            (docs/method.md §7), so the voters may exceed it by up to half a voter a class.
        drop_suspects: None (the default), "auto" or a fraction in (0, 1): label again with the most
            suspect labels made unlabeled ("auto": those of ``label_quality_`` below 0.05, while their
            class keeps at least 3 labeled rows; a fraction F: the most suspect ``round(F * M)`` of the
            M labeled rows that show some sign of a wrong label), as ``llp-fast-propagate
            --drop-suspects``; the fitted labels, voters and
            distributions are the second run's (a dropped row gets the vote's label), the suspects
            the first's (docs/embeddings.md, "Dropping suspects").
        min_confidence: abstain below this confidence: ``transduction_`` and ``predict`` give -1 for
            an unlabeled row whose vote's winning share is below it (labeled rows keep theirs;
            ``classes_`` and the distributions are unchanged). None: never.
        normalize: L2-normalise the rows of X (the method compares unit vectors).
        device: 'cpu', 'cuda' or 'cuda:N'.
        chunk_size: rows per block of the streamed passes.

    Attributes (after ``fit``): ``classes_``, ``transduction_`` (a label for every training row, -1
    where it abstains), ``label_distributions_`` (n_samples, n_classes), each row the vote's class
    shares (one-hot on labeled rows), ``label_suspects_`` (the labeled rows' indices into X, most
    suspect label first, every labeled row ranked), ``label_quality_`` (n_samples,): per labeled
    row exp(suspect score) in [0, 1] (label gap + spreading margin, in units of the row's distance
    to its nearest voter), 1 when its nearest voters carry its label and the labels spread from the
    other labeled rows favour it (NaN on unlabeled rows;
    docs/embeddings.md, "Suspect labels"), ``n_neighbors_`` and ``tau_`` (the K and temperature
    used), ``min_confidence_`` (the threshold ``predict`` uses: the one fitted with, whatever
    ``set_params`` says later), ``loo_accuracy_`` (``{(K, tau): accuracy}`` of the candidates when one was "auto"),
    ``labels_dropped_`` (the rows whose labels ``drop_suspects`` dropped, int64, ascending; empty
    without it), ``n_features_in_``, ``rounds_run_``.
    """

    def __init__(
        self,
        n_neighbors=_DEFAULT.k,
        n_density_neighbors=_DEFAULT.t,
        tau=_DEFAULT.tau,
        density_weighting=_DEFAULT.density,
        rounds=_DEFAULT.rounds,
        density_pool=_DEFAULT.density_pool,
        labeled_weight=_DEFAULT.labeled_weight,
        max_voters=_DEFAULT.max_voters,
        drop_suspects=None,
        min_confidence=None,
        normalize=True,
        device="cpu",
        chunk_size=_DEFAULT.chunk,
    ):
        self.n_neighbors = n_neighbors
        self.n_density_neighbors = n_density_neighbors
        self.tau = tau
        self.density_weighting = density_weighting
        self.rounds = rounds
        self.density_pool = density_pool
        self.labeled_weight = labeled_weight
        self.max_voters = max_voters
        self.drop_suspects = drop_suspects
        self.min_confidence = min_confidence
        self.normalize = normalize
        self.device = device
        self.chunk_size = chunk_size

    def _settings(self, k=None, tau=None) -> Settings:
        """The engine's settings; an "auto" K or tau stands at the default until it is chosen."""
        k = _auto_or(self.n_neighbors, "n_neighbors") if k is None else k
        tau = _auto_or(self.tau, "tau") if tau is None else tau
        return Settings(
            k=_DEFAULT.k if k is None else k,
            t=self.n_density_neighbors,
            tau=_DEFAULT.tau if tau is None else tau,
            density=self.density_weighting,
            density_pool=self.density_pool,
            labeled_weight=self.labeled_weight,
            rounds=self.rounds,
            max_voters=self.max_voters,
            chunk=self.chunk_size,
            device=self.device,
        ).checked(names=_PARAMS)

    def _min_confidence(self):
        c = self.min_confidence
        if c is None:
            return None
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 <= c <= 1:
            raise ValueError(f"min_confidence must be None or a number in [0, 1], got {c!r}")
        return float(c)

    def _drop_suspects(self):
        d = self.drop_suspects
        if d is None or (isinstance(d, str) and d == "auto"):
            return d
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 < d < 1:
            raise ValueError(f"drop_suspects must be None, 'auto' or a fraction in (0, 1), got {d!r}")
        return float(d)

    def _normalize(self) -> bool:
        n = self.normalize
        if not isinstance(n, (bool, np.bool_)):
            raise ValueError(f"normalize must be True or False, got {n!r}")
        return bool(n)

    @staticmethod
    def _refuse_sparse(X) -> None:
        if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
            raise TypeError(
                "LocalLabelPropagation does not take sparse input: it compares dense embeddings; "
                "pass a dense array (X.toarray()) of the features"
            )

    def fit(self, X, y):
        """Labels every row of X from the labeled ones (``y != -1``). A fit that fails or is
        interrupted leaves the estimator as it was (a refit that failed halfway left the new
        ``classes_`` beside the old voters: ``predict`` then gave classes the old fit never had)."""
        before = dict(self.__dict__)
        try:
            return self._fit(X, y)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _fit(self, X, y):
        self._refuse_sparse(X)
        settings = self._settings()
        threshold = self._min_confidence()
        drop = self._drop_suspects()
        normalize = self._normalize()
        X, y = validate_data(self, X, _mixed_labels(y), dtype=_float_types(X), y_numeric=False)
        unlabeled = _unlabeled(y)
        try:
            classes = np.unique(y[~unlabeled])
        except TypeError:  # labels of several types that do not compare (3 and "a")
            kinds = sorted({type(v).__name__ for v in y[~unlabeled]})
            raise ValueError(f"y mixes labels of types {', '.join(kinds)}: give every label the same type") from None
        with warnings.catch_warnings():  # (one label a class is few-shot labelling, not a regression)
            warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
            check_classification_targets(_as_numbers(y[~unlabeled] if unlabeled.any() and not unlabeled.all() else y))
        if unlabeled.all():
            raise ValueError("y has no labeled sample: mark unlabeled samples with -1 and give at least one label")
        self.classes_ = classes
        codes = np.full(y.shape[0], -1, np.int64)
        codes[~unlabeled] = np.searchsorted(self.classes_, y[~unlabeled])
        rows = Rows(X, normalize=normalize, what="X")
        auto_k, auto_tau = self.n_neighbors == "auto", self.tau == "auto"
        self.loo_accuracy_ = {}
        if auto_k or auto_tau:
            choice = tune.choose(rows, codes, settings, auto_k=auto_k, auto_tau=auto_tau)
            settings = self._settings(k=choice.k, tau=choice.tau)
            self.loo_accuracy_ = choice.accuracy
        self.n_neighbors_, self.tau_ = int(settings.ks[0]), float(settings.tau)
        # what predict uses, as fitted (a later set_params does not change a fitted model)
        self.min_confidence_, self._fit_normalize = threshold, normalize
        m = int((~unlabeled).sum())
        if drop not in (None, "auto") and drops_asked(drop, m) >= m:  # (as --drop-suspects refuses it)
            raise ValueError(f"drop_suspects={drop!r} would drop all {m} labeled rows; give a smaller fraction")
        result = Engine(rows, codes, settings).run(top_classes=len(self.classes_))
        suspects = suspects_of(rows, codes, result, settings)
        used, self.labels_dropped_ = codes, np.zeros(0, np.int64)
        if drop is not None:
            used, self.labels_dropped_ = drop_worst(codes, suspects, drop)
            if len(self.labels_dropped_):
                result = Engine(rows, used, settings).run(top_classes=len(self.classes_))
        label = result.labels.copy()
        if threshold is not None:
            label[(result.confidence < threshold) & (used < 0)] = -1
        self.transduction_ = with_abstention(self.classes_, label)
        dist = np.zeros((X.shape[0], len(self.classes_)), np.float64)
        have = result.top_classes >= 0
        r, c = np.nonzero(have)
        dist[r, result.top_classes[r, c]] = result.top_probs[r, c]
        self.label_distributions_ = dist / dist.sum(axis=1, keepdims=True)
        self.rounds_run_ = result.rounds_run
        self.voters_ = rows.take(result.voter_rows).cpu().numpy()
        # (indices into the run's classes, those with a label: after a drop that emptied a class,
        # fewer than classes_; the codes are indices into classes_)
        self.voter_classes_ = np.asarray(result.classes, np.int64)[result.voter_classes]
        self.voter_bias_ = result.voter_bias
        self.label_suspects_ = suspects.rows
        self.label_quality_ = suspects.per_row(X.shape[0])
        return self

    def model(self) -> Model:
        """The fitted voters and vote settings as a :class:`~llp_fast.embeddings.model.Model` (what
        ``llp-fast-propagate --save-model`` writes); its ``classes`` index ``classes_``."""
        check_is_fitted(self)
        return Model(
            voters=torch.from_numpy(self.voters_),
            voter_classes=self.voter_classes_,
            bias=self.voter_bias_,
            classes=np.arange(len(self.classes_)),
            k=self.n_neighbors_,
            tau=self.tau_,
            normalize=self._fit_normalize,
            min_confidence=self.min_confidence_,
        )

    def _queries(self, X) -> Rows:
        self._refuse_sparse(X)
        # (no row is an empty answer, as for llp-fast-propagate --model)
        X = validate_data(self, X, reset=False, dtype=_float_types(X), ensure_min_samples=0)
        return Rows(X, normalize=self._fit_normalize, what="X")

    def _streaming(self) -> Settings:
        """``chunk_size`` and ``device`` as they are now (how to run, not what was fitted), checked."""
        return Settings(chunk=self.chunk_size, device=self.device).checked(names=_PARAMS)

    def predict(self, X):
        """The vote of the final voters for each row of X (ties to the first class of ``classes_``;
        -1 below ``min_confidence``). On the training rows it may differ from ``transduction_``,
        the last round's vote: a row that became a voter is among its own nearest voters here."""
        check_is_fitted(self)
        queries, run = self._queries(X), self._streaming()
        codes, _ = self.model().label(queries, chunk=run.chunk, device=run.device)
        return with_abstention(self.classes_, codes)

    def score(self, X, y, sample_weight=None) -> float:
        """The share of the rows of X whose prediction is their label in ``y`` (weighted by
        ``sample_weight``); a row left at -1 below ``min_confidence`` counts as wrong. Labels of any
        kind: scikit-learn's accuracy sorted the predictions, which failed on names beside the
        int -1 of an abstention (and ``cross_val_score`` scored NaN)."""
        pred = self.predict(X)
        truth = np.asarray(y)
        if truth.ndim != 1 or truth.shape[0] != pred.shape[0]:
            raise ValueError(f"y must be one label per row of X ({pred.shape[0]}), got shape {truth.shape}")
        if sample_weight is not None and np.shape(sample_weight) != truth.shape:
            raise ValueError(f"sample_weight must be one weight per row of X ({pred.shape[0]}), got shape "
                             f"{np.shape(sample_weight)}")  # fmt: skip
        # (an abstention matched a -1 in y, an unlabeled row's mark: a grid search over min_confidence
        # then chose the one that abstained most)
        right = (pred.astype(object) == truth.astype(object)) & ~_unlabeled(pred)
        return float(np.average(right.astype(np.float64), weights=sample_weight))

    def predict_proba(self, X):
        """Each row's class shares in the vote of the final voters, (n_samples, n_classes)."""
        check_is_fitted(self)
        queries, run = self._queries(X), self._streaming()
        n_classes = len(self.classes_)
        out = np.zeros((queries.n, n_classes))
        for a, b, v, c in self.model().votes(queries, chunk=run.chunk, device=run.device):
            w = torch.exp(v.double() - v[:, :1].double())
            votes = torch.zeros(v.shape[0], n_classes, dtype=torch.float64, device=v.device)
            votes.scatter_add_(1, c.long(), w)
            out[a:b] = (votes / votes.sum(dim=1, keepdim=True)).cpu().numpy()
        return out
