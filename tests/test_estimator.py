"""``llp_fast.LocalLabelPropagation``: scikit-learn's estimator checks, the behaviours its label-propagation
tests check for LabelSpreading, and agreement with the engine and the paper's one-shot vote."""

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

import llp_fast
from llp_fast import LocalLabelPropagation
from llp_fast.embeddings import label_embeddings
from llp_fast.embeddings.estimator import expected_failed_checks

# scikit-learn's checks feed the ops one-row, constant and odd-shaped data: a native crash fails these
# tests, not the run
pytestmark = pytest.mark.isolated


@parametrize_with_checks(
    [
        LocalLabelPropagation(),
        LocalLabelPropagation(n_neighbors="auto", tau="auto"),
        LocalLabelPropagation(drop_suspects="auto", rounds=2),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_import_llp_fast_does_not_import_sklearn():
    import subprocess
    import sys

    code = "import sys, llp_fast; assert 'sklearn' not in sys.modules; llp_fast.LocalLabelPropagation; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


# -- scikit-learn's semi_supervised/tests/test_label_propagation.py, for this estimator ----------------
# One round with the paper's pool (the one unlabeled row) is degenerate on these three points: each
# labeled point's density is its similarity to that row, so the row's scores all tie (class 0 wins).
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("params", [dict(), dict(rounds=1, density_pool="all")])
def test_fit_transduction_predict_and_distribution(dtype, params):
    samples = np.asarray([[1.0, 0.0], [0.0, 2.0], [1.0, 3.0]], dtype=dtype)
    clf = LocalLabelPropagation(**params).fit(samples, [0, 1, -1])
    assert clf.transduction_[2] == 1
    np.testing.assert_array_equal(clf.predict([[0.5, 2.5]]), [1])
    samples = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=dtype)
    clf = LocalLabelPropagation(**params).fit(samples, [0, 1, -1])
    np.testing.assert_allclose(clf.label_distributions_[2], [0.5, 0.5], atol=1e-2)
    # a point halfway between two mirror-image halves of the problem (with one more unlabeled point
    # than scikit-learn's test, which would join the voters on one side only)
    samples = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.2, 1.0]], dtype=dtype)
    clf = LocalLabelPropagation(**params).fit(samples, [0, 1, -1, -1])
    np.testing.assert_allclose(clf.predict_proba([[1.0, 1.0]]), [[0.5, 0.5]], atol=1e-6)


def test_sparse_input_is_refused_with_a_clear_error():
    from scipy import sparse

    X = sparse.csr_matrix(np.eye(4))
    with pytest.raises(TypeError, match="sparse"):
        LocalLabelPropagation().fit(X, [0, 1, -1, -1])
    clf = LocalLabelPropagation().fit(np.eye(4), [0, 1, -1, -1])
    for method in (clf.predict, clf.predict_proba):
        with pytest.raises(TypeError, match="dense"):
            method(sparse.csc_matrix(np.eye(4)))


def test_scores_new_points_like_label_spreading():
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    X, y = make_classification(
        n_classes=4, n_samples=500, n_features=20, n_informative=20, n_redundant=0, n_repeated=0, random_state=0
    )
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=10, random_state=0)
    model = LocalLabelPropagation().fit(X_train - X_train.mean(0), y_train)  # centred: cosine is meaningful
    assert model.score(X_test - X_train.mean(0), y_test) >= 0.9


# -- what the estimator adds ---------------------------------------------------------------------------
def _digits(frac=0.1, seed=0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x - x.mean(0)
    rng = np.random.default_rng(seed)
    return x, y, np.where(rng.random(len(y)) < frac, y, -1)


@pytest.mark.parametrize("rounds", [1, 3])
def test_transduction_is_the_engine_and_distributions_sum_to_one(rounds):
    x, y, partial = _digits()
    clf = LocalLabelPropagation(rounds=rounds).fit(x.astype(np.float32), partial)
    res = label_embeddings(x.astype(np.float32), partial, rounds=rounds)
    assert np.array_equal(clf.transduction_, res.labels)
    np.testing.assert_allclose(clf.label_distributions_.sum(axis=1), 1.0)
    assert np.array_equal(clf.classes_[clf.label_distributions_.argmax(axis=1)], clf.transduction_)
    lab = partial >= 0
    assert (clf.label_distributions_[lab].max(axis=1) == 1).all()
    assert clf.score(x[~lab], y[~lab]) > 0.9
    # rows still voted on in the last round: predict gives their transduced label
    last = np.setdiff1d(np.arange(len(y)), res.voter_rows)
    assert np.array_equal(clf.predict(x[last]), clf.transduction_[last])
    np.testing.assert_allclose(clf.predict_proba(x[last]), clf.label_distributions_[last], atol=1e-6)


def test_one_round_is_the_paper_vote():
    x, _, partial = _digits(0.05, seed=3)
    xt = torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float32)), dim=1)
    lab = torch.from_numpy(partial >= 0)
    rho = llp_fast.local_density(xt[lab], xt, pool_mask=~lab)
    want, _ = llp_fast.propagate(xt[~lab], xt[lab], torch.from_numpy(partial[partial >= 0]), rho, num_classes=10)
    clf = LocalLabelPropagation(rounds=1).fit(x.astype(np.float32), partial)
    assert np.array_equal(clf.transduction_[~lab.numpy()], want.numpy())
    new, _ = llp_fast.propagate(xt[:50], xt[lab], torch.from_numpy(partial[partial >= 0]), rho, num_classes=10)
    assert np.array_equal(clf.predict(x[:50].astype(np.float32)), new.numpy())


def test_string_classes_and_float64():
    x, y, partial = _digits()
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"], dtype=object)
    y_str = np.where(partial >= 0, names[np.maximum(partial, 0)], -1).astype(object)
    clf = LocalLabelPropagation(rounds=2).fit(x, y_str)
    assert sorted(clf.classes_) == sorted(names)
    num = LocalLabelPropagation(rounds=2).fit(x, partial)
    assert np.array_equal(clf.transduction_, names[num.transduction_])
    assert clf.predict(x[:3]).dtype == object and clf.predict_proba(x[:3]).dtype == np.float64
    # a plain list (or tuple) of names and the number -1 is the same labels (NumPy alone would turn
    # -1 into the text '-1'); the text '-1' in a list is still refused
    for as_given in (list, tuple):
        listed = LocalLabelPropagation(rounds=2).fit(x, as_given(y_str.tolist()))
        assert np.array_equal(listed.transduction_, clf.transduction_)
    with pytest.raises(ValueError, match="y holds the text '-1'"):
        LocalLabelPropagation(rounds=2).fit(x, [str(v) for v in y_str])
    # text alone keeps NumPy's string dtype, as an array of the same labels does (not object)
    words = names[y % 10].astype(str)
    as_list = LocalLabelPropagation(rounds=2).fit(x, words.tolist())
    as_array = LocalLabelPropagation(rounds=2).fit(x, words)
    assert as_list.classes_.dtype == as_array.classes_.dtype == words.dtype
    assert as_list.transduction_.dtype == words.dtype and as_list.predict(x[:3]).dtype == words.dtype


def test_the_text_minus_one_is_refused_and_float16_runs_as_the_command_line():
    """'-1' as a string label would be a class (every row labeled): refused, naming y; float16 X is
    computed in float32 (as llp-fast-propagate computes a float16 file), not float64."""
    x, _, partial = _digits()
    names = np.array([f"d{i}" for i in range(10)])
    for y in (
        np.where(partial >= 0, names[np.maximum(partial, 0)], "-1"),
        np.where(partial >= 0, names[np.maximum(partial, 0)], " -1").astype(object),
    ):
        with pytest.raises(ValueError, match="y holds the text '-1': the unlabeled mark is the number -1"):
            LocalLabelPropagation(rounds=2).fit(x, y)
    half = LocalLabelPropagation(rounds=2).fit(x.astype(np.float16), partial)
    single = LocalLabelPropagation(rounds=2).fit(x.astype(np.float16).astype(np.float32), partial)
    assert half.voters_.dtype == np.float32
    assert np.array_equal(half.transduction_, single.transduction_)
    assert np.array_equal(half.label_distributions_, single.label_distributions_)
    q = x[:50].astype(np.float16)
    assert np.array_equal(half.predict_proba(q), single.predict_proba(q.astype(np.float32)))
    pd = pytest.importorskip("pandas")  # a DataFrame of float16 columns too
    frame = LocalLabelPropagation(rounds=2).fit(pd.DataFrame(x.astype(np.float16)), partial)
    assert frame.voters_.dtype == np.float32 and np.array_equal(frame.transduction_, half.transduction_)


def test_bad_parameters_and_no_labels():
    x, _, partial = _digits()
    for params in (dict(n_neighbors=0), dict(tau=-1.0), dict(rounds=0), dict(density_pool="x"), dict(device="tpu")):
        with pytest.raises(ValueError):
            LocalLabelPropagation(**params).fit(x, partial)
    with pytest.raises(ValueError, match="no labeled"):
        LocalLabelPropagation().fit(x, np.full(len(x), -1))
    # messages name the estimator's parameters, not the engine's settings
    for params, name in (
        (dict(n_neighbors=0), "n_neighbors"),
        (dict(n_density_neighbors=0), "n_density_neighbors"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(density_weighting=3), "density_weighting"),
        (dict(n_neighbors=(10, 20)), "n_neighbors"),
        (dict(n_neighbors=[10]), "n_neighbors"),
        (dict(max_voters="none"), "max_voters must be 'auto', None"),  # (the command line's word)
        (dict(drop_suspects=0), "drop_suspects must be None, 'auto' or a fraction"),
        (dict(drop_suspects=1.0), "drop_suspects must be None, 'auto' or a fraction"),
        (dict(drop_suspects=True), "drop_suspects must be None, 'auto' or a fraction"),
        (dict(drop_suspects="Auto"), "drop_suspects must be None, 'auto' or a fraction"),
        (dict(drop_suspects=0.9999), "drop_suspects=0.9999 would drop all"),
    ):
        with pytest.raises(ValueError, match=f"^{name}"):
            LocalLabelPropagation(**params).fit(x, partial)
    # a NumPy integer K (a grid search over np.arange) is a K
    a = LocalLabelPropagation(n_neighbors=np.int64(7), rounds=2).fit(x, partial)
    b = LocalLabelPropagation(n_neighbors=7, rounds=2).fit(x, partial)
    assert a.n_neighbors_ == 7 and np.array_equal(a.transduction_, b.transduction_)
    assert label_embeddings(x, partial, k=np.int64(7), rounds=1).labels.shape == (len(x),)
    # and a NumPy bool a bool (density_weighting over np.array([True, False]) was refused; normalize took it)
    a = LocalLabelPropagation(density_weighting=np.bool_(False), rounds=1).fit(x, partial)
    b = LocalLabelPropagation(density_weighting=False, rounds=1).fit(x, partial)
    assert np.array_equal(a.transduction_, b.transduction_)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            LocalLabelPropagation(device="cuda").fit(x, partial)


# -- issue "what no kNN labeller offers": pickling, cloning, abstention -------------------------------
@pytest.mark.parametrize(
    "params", [dict(), dict(n_neighbors="auto", tau="auto", min_confidence=0.8, rounds=2, drop_suspects="auto")]
)
def test_pickles_and_clones_cleanly(params):
    import pickle

    from sklearn.base import clone

    x, _, partial = _digits()
    clf = LocalLabelPropagation(**params)
    assert clone(clf).get_params() == clf.get_params()
    clf.fit(x, partial)
    again = pickle.loads(pickle.dumps(clf))
    for name in ("transduction_", "label_suspects_", "label_quality_", "voters_", "label_distributions_"):
        np.testing.assert_array_equal(getattr(again, name), getattr(clf, name))
    np.testing.assert_array_equal(again.labels_dropped_, clf.labels_dropped_)
    np.testing.assert_array_equal(again.predict(x[:100]), clf.predict(x[:100]))
    fresh = clone(clf)
    assert fresh.get_params() == clf.get_params() and not hasattr(fresh, "transduction_")
    np.testing.assert_array_equal(fresh.fit(x, partial).transduction_, clf.transduction_)


def test_a_drop_that_empties_a_class_keeps_predict_on_classes_():
    """A fraction of drop_suspects may drop every label of a class: the second run then has fewer
    classes, and its voter classes (indices into its own) were kept as indices into ``classes_``:
    ``predict`` named the wrong class for a third of the rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    truth = np.repeat([0, 1, 2], 300)
    x = (centres[truth] + rng.normal(size=(900, 16))).astype(np.float32)
    y = np.full(900, -1)
    y[rng.choice(300, 20, replace=False)] = 0
    y[600 + rng.choice(300, 20, replace=False)] = 2
    y[rng.choice(np.flatnonzero(y < 0)[:300], 3, replace=False)] = 1  # class 1's only labels, among the 0s
    clf = LocalLabelPropagation(drop_suspects=0.1).fit(x, y)
    assert (y[clf.labels_dropped_] == 1).sum() == 3 and list(clf.classes_) == [0, 1, 2]
    assert set(clf.voter_classes_.tolist()) == {0, 2}
    unlabeled = y < 0
    assert (clf.predict(x)[unlabeled] == clf.transduction_[unlabeled]).mean() > 0.95
    assert (clf.classes_[clf.predict_proba(x).argmax(1)] == clf.predict(x)).all()


def test_min_confidence_abstains_on_unlabeled_rows_only():
    x, _, partial = _digits(0.05, seed=1)
    full = LocalLabelPropagation(rounds=1).fit(x, partial)
    clf = LocalLabelPropagation(rounds=1, min_confidence=0.7).fit(x, partial)
    conf = full.label_distributions_.max(axis=1)
    lab = partial >= 0
    assert np.array_equal(clf.classes_, full.classes_)
    assert np.array_equal(clf.transduction_ == -1, ~lab & (conf < 0.7)) and (clf.transduction_ == -1).any()
    assert np.array_equal(clf.transduction_[lab], partial[lab])
    keep = clf.transduction_ != -1
    assert np.array_equal(clf.transduction_[keep], full.transduction_[keep])
    new = x[:200] + 3.0
    p, proba = clf.predict(new), full.predict_proba(new)
    assert np.array_equal(p == -1, proba.max(axis=1) < 0.7)
    assert np.array_equal(p[p >= 0], full.predict(new)[p >= 0])
    assert clf.score(new[p >= 0], full.predict(new)[p >= 0]) == 1.0
    for bad in (-0.1, 1.5, "high"):
        with pytest.raises(ValueError, match="min_confidence"):
            LocalLabelPropagation(min_confidence=bad).fit(x, partial)
    # predict uses the threshold fitted with (it read the parameter at each call: a later set_params
    # changed a fitted model's predictions but not its transduction_)
    assert clf.min_confidence_ == 0.7
    clf.set_params(min_confidence=None, normalize=False)
    assert np.array_equal(clf.predict(new), p)


def test_normalize_must_be_a_bool():
    x, _, partial = _digits(0.05, seed=1)
    with pytest.raises(ValueError, match="normalize must be True or False, got 'no'"):
        LocalLabelPropagation(normalize="no").fit(x, partial)


def test_object_labels_of_numbers_and_bools_beside_minus_one():
    """Numbers in an object array (a pandas object column), and bool labels, which only an object
    array or a list can hold beside the number -1: scikit-learn's target check called them "unknown"
    (a regression target) and a list of bools and -1 became the classes 0 and 1 (found by review,
    2026-12-08)."""
    x, _, partial = _digits()
    num = LocalLabelPropagation(rounds=2).fit(x, partial)
    as_object = LocalLabelPropagation(rounds=2).fit(x, partial.astype(object))
    assert np.array_equal(as_object.transduction_, num.transduction_)
    assert list(as_object.classes_) == list(num.classes_)
    odd = np.array([bool(v % 2) if v >= 0 else -1 for v in partial], dtype=object)  # True, False or -1
    want = LocalLabelPropagation(rounds=2).fit(x, np.where(partial >= 0, partial % 2, -1)).transduction_
    for given in (odd, odd.tolist()):
        clf = LocalLabelPropagation(rounds=2).fit(x, given)
        assert list(clf.classes_) == [False, True] and all(type(c) is bool for c in clf.classes_)
        assert np.array_equal(clf.transduction_.astype(int), want)
    with pytest.raises(ValueError, match="Unknown label type: continuous"):  # (numbers, but not classes)
        LocalLabelPropagation(rounds=2).fit(x, np.where(partial >= 0, partial + 0.5, -1).astype(object))


def test_abstention_with_string_and_unsigned_classes():
    from llp_fast.embeddings.estimator import with_abstention

    codes = np.array([0, -1, 1])
    assert with_abstention(np.array(["a", "b"]), codes).tolist() == ["a", -1, "b"]
    out = with_abstention(np.array([3, 7], np.uint8), codes)
    assert out.dtype == np.int64 and out.tolist() == [3, -1, 7]
    assert with_abstention(np.array([0.5, 2.0]), codes).tolist() == [0.5, -1.0, 2.0]
    assert with_abstention(np.array(["a", "b"]), np.array([1, 0])).dtype.kind == "U"  # no abstention: as before


# -- found by review (2026-12-06) ----------------------------------------------------------------
def _small():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = np.where(rng.random(200) < 0.2, rng.integers(0, 3, 200), -1)
    y[:3] = [0, 1, 2]
    return x, y


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(chunk_size=-5), r"^chunk_size: expected a whole number >= 1"),
        (dict(chunk_size=0), r"^chunk_size: expected a whole number >= 1"),
        (dict(device="gpu"), r"^device must be cpu, cuda or cuda:N, got 'gpu'"),
        (dict(device="cudaX"), r"^device must be cpu, cuda or cuda:N, got 'cudaX'"),  # (read as "no CUDA")
        (dict(device="cuda:x"), r"^device must be cpu, cuda or cuda:N, got 'cuda:x'"),
    ],
)
def test_predict_checks_how_it_runs(params, match):
    """chunk_size and device set after fit were used unchecked: rows of zeros from predict_proba,
    all -1 (an uninitialised array) or an IndexError from predict, a raw torch error."""
    x, y = _small()
    clf = LocalLabelPropagation(min_confidence=0.5).fit(x, y).set_params(**params)
    for method in (clf.predict, clf.predict_proba):
        with pytest.raises(ValueError, match=match):
            method(x)
    want = LocalLabelPropagation(min_confidence=0.5).fit(x, y).predict(x)
    assert np.array_equal(clf.set_params(chunk_size=7, device="cpu").predict(x), want)  # another chunk: same


@pytest.mark.parametrize("param", ["n_neighbors", "tau"])
def test_none_is_not_a_k_or_a_tau(param):
    with pytest.raises(ValueError, match=rf"^{param} must be 'auto' or a number, got None"):
        LocalLabelPropagation(**{param: None}).fit(*_small())


def test_labels_of_several_types_are_named():
    x, _ = _small()
    y = np.array([-1, "a", 5, "b"] * 50, dtype=object)
    with pytest.raises(ValueError, match=r"^y mixes labels of types int, str: give every label the same type"):
        LocalLabelPropagation().fit(x, y)


def test_a_wrapped_unlabeled_mark_is_refused_as_on_the_command_line():
    """-1 cast to uint8 is 255: it was fitted as a class 255, every row labeled, where the command
    line refuses the same labels saved to a file."""
    x, y = _small()
    y = y.copy()
    y[::3] = -1
    with pytest.raises(ValueError, match=r"^y is uint8, which cannot hold -1 \(unlabeled\): its 255 entries"):
        LocalLabelPropagation().fit(x, y.astype(np.uint8))
    kept = LocalLabelPropagation().fit(x, np.where(y < 0, 254, y).astype(np.uint8))  # 254: a class
    assert 254 in kept.classes_ and kept.classes_.dtype == np.uint8


def test_no_new_row_is_an_empty_answer_as_on_the_command_line():
    x, y = _small()
    clf = LocalLabelPropagation().fit(x, y)
    assert clf.predict(x[:0]).shape == (0,) and clf.predict_proba(x[:0]).shape == (0, 3)


def test_a_failed_fit_leaves_the_estimator_as_it_was():
    """A refit that raised halfway (a DataError, a Ctrl-C) left the new classes_ beside the old
    voters: predict gave classes the fitted model never had; after a failed first fit predict
    raised AttributeError, not NotFittedError."""
    from sklearn.exceptions import NotFittedError

    import llp_fast.embeddings.estimator as est

    x, y = _small()
    clf = LocalLabelPropagation().fit(x, y)
    before = clf.predict(x[:20])

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(est, "suspects_of", interrupted)  # the last step of a fit
        with pytest.raises(KeyboardInterrupt):
            clf.fit(x[:, :5], np.where(y >= 0, y + 100, -1))
        assert list(clf.classes_) == [0, 1, 2] and clf.n_features_in_ == 8
        np.testing.assert_array_equal(clf.predict(x[:20]), before)
        fresh = LocalLabelPropagation()
        with pytest.raises(KeyboardInterrupt):
            fresh.fit(x, y)
    with pytest.raises(NotFittedError):
        fresh.predict(x[:2])


def test_score_takes_names_beside_abstentions():
    """predict's names beside the int -1 of an abstention: scikit-learn's accuracy sorted them
    (TypeError), and cross_val_score scored NaN without an error. One label a class (few-shot
    labelling) warned of a regression problem."""
    import warnings

    from sklearn.model_selection import cross_val_score

    x, y = _small()
    names = np.array(["cat", "dog", "eel"], dtype=object)
    ys = np.where(y >= 0, names[np.clip(y, 0, 2)], -1).astype(object)
    truth = names[np.argmax(x[:, :3], axis=1)]
    clf = LocalLabelPropagation(min_confidence=0.9).fit(x, ys)
    pred = clf.predict(x)
    assert (pred == -1).any()  # some abstain
    want = np.mean([p == t for p, t in zip(pred, truth)])
    assert clf.score(x, truth) == pytest.approx(want)
    w = np.linspace(0, 1, len(x))
    assert clf.score(x, truth, sample_weight=w) == pytest.approx(
        np.average([p == t for p, t in zip(pred, truth)], weights=w)
    )
    scores = cross_val_score(LocalLabelPropagation(min_confidence=0.9), x, truth, cv=3)  # (every row labeled)
    assert np.isfinite(scores).all()
    with pytest.raises(ValueError, match="one label per row"):
        clf.score(x, truth[:5])
    with pytest.raises(ValueError, match="sample_weight must be one weight per row of X"):
        clf.score(x, truth, sample_weight=np.ones(5))
    # an abstention is never right, not even against a -1 (the unlabeled mark) in y: a grid search
    # over min_confidence on semi-supervised y chose the threshold that abstained most
    semi = np.where(pred == -1, -1, truth).astype(object)
    assert clf.score(x, semi) == pytest.approx(np.mean([p == t and p != -1 for p, t in zip(pred, semi)]))
    assert clf.score(x, semi) < np.mean([p == t for p, t in zip(pred, semi)])
    few = np.full(30, -1)
    few[:10] = np.arange(10)  # one label for each of 10 classes, 30 rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LocalLabelPropagation(n_neighbors=1).fit(np.random.default_rng(1).normal(size=(30, 4)), few)


def test_unsigned_classes_beyond_int64_keep_their_values_beside_abstentions():
    """uint64 classes of 2**63 and more, next to an abstention's -1, wrapped to negative numbers."""
    from llp_fast.embeddings.estimator import with_abstention

    classes = np.array([7, 2**63 + 5, 2**64 - 10], np.uint64)
    out = with_abstention(classes, np.array([1, 2, -1, 0]))
    assert out.tolist() == [2**63 + 5, 2**64 - 10, -1, 7]
    assert with_abstention(np.array([1, 5], np.uint8), np.array([0, -1])).tolist() == [1, -1]
