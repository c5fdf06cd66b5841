"""The probes against scikit-learn and numpy references, and the input checks of run_probe."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from embedpipe.errors import (
    IdAlignmentError,
    MissingLabelsError,
    ProbeConfigError,
    ProbeInputError,
    SplitError,
)
from embedpipe.probe import (
    KORNBLITH_CS,
    CosineKNNClassifier,
    IdAlignment,
    LinearProbeCV,
    ProbeConfig,
    ProbeInput,
    SplitKind,
    accuracy_ci,
    classification_metrics,
    knn_vote_scores,
    mcnemar_exact,
    run_probe,
)
from embedpipe.probe.linear import split_by_id


@pytest.fixture(autouse=True)
def one_blas_thread():
    # These problems are tiny: extra BLAS threads only add synchronisation, and on a loaded
    # machine OpenBLAS's spin-waiting threads make them many times slower.
    with threadpool_limits(limits=1):
        yield


def make_input(name, X, labels, *, ids=None, backbone=None, pretrained=False):
    """A ProbeInput with the metadata the store writes."""
    if ids is None:
        ids = [f"img{i:05d}.png" for i in range(len(X))]
    backbone = backbone or name
    meta = {
        "backbone": backbone,
        "layer": "gap",
        "dim": X.shape[1],
        "weights": {"kind": "torchvision", "name": f"{backbone}-weights", "pretrained": pretrained},
        "preprocessing": {"resize_size": 32, "crop_size": 28},
        "normalize": False,
    }
    return ProbeInput(
        name, np.asarray(ids, dtype=object), np.asarray(labels, dtype=object), X, meta
    )


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def blobs():
    """Five well separated classes in 16-D, 40 rows each: linearly separable by a margin."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16)) * 10
    y = np.repeat(np.arange(5), 40)
    X = (centers[y] + rng.normal(size=(200, 16))).astype(np.float32)
    return X, np.array([f"class-{c}" for c in y], dtype=object)


# --- the linear probe ----------------------------------------------------------------


def test_linear_probe_is_sklearn_logistic_regression_at_the_selected_C(digits):
    X, y = digits
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, stratify=y, random_state=0
    )
    probe = LinearProbeCV(transformer=StandardScaler(), random_state=0).fit(X_train, y_train)

    scaler = StandardScaler().fit(X_train.astype(np.float64))
    reference = LogisticRegression(C=probe.C_, max_iter=probe.max_iter, tol=probe.tol)
    reference.fit(scaler.transform(X_train.astype(np.float64)), y_train)
    X_test_ref = scaler.transform(X_test.astype(np.float64))

    assert probe.score(X_test, y_test) > 0.9  # a real model, not two agreeing constants
    np.testing.assert_array_equal(probe.predict(X_test), reference.predict(X_test_ref))
    np.testing.assert_array_equal(probe.predict_proba(X_test), reference.predict_proba(X_test_ref))
    assert probe.score(X_test, y_test) == reference.score(X_test_ref, y_test)


def test_c_search_matches_exhaustive_cold_fits_over_the_whole_grid(digits):
    # At a tight tolerance each warm-started fit reaches the same optimum as a cold fit, so
    # the validation curve must be the grid's, point for point, and so must its arg-max.
    X, y = digits
    probe = LinearProbeCV(transformer=StandardScaler(), tol=1e-10, random_state=0).fit(X, y)
    val = probe.validation_indices_
    train = np.setdiff1d(np.arange(len(y)), val)
    scaler = StandardScaler().fit(X[train].astype(np.float64))
    X_train, X_val = (scaler.transform(X[rows].astype(np.float64)) for rows in (train, val))
    cold = np.array(
        [
            np.mean(
                LogisticRegression(C=C, tol=1e-10, max_iter=1000)
                .fit(X_train, y[train])
                .predict(X_val)
                == y[val]
            )
            for C in KORNBLITH_CS
        ]
    )
    np.testing.assert_array_equal(probe.cv_results_["C"], KORNBLITH_CS)
    np.testing.assert_array_equal(probe.cv_results_["val_accuracy"], cold)
    assert probe.C_ == KORNBLITH_CS[np.argmax(cold)]
    assert cold.max() > 0.95 > cold.min()  # the curve has an optimum worth finding


def test_path_starts_at_the_log_class_frequencies():
    # Imbalanced classes, standardised features: from zero, L-BFGS needs hundreds of
    # iterations to find the intercepts of the strongly penalised first fit; from the log
    # class frequencies (its C -> 0 optimum), a couple.
    rng = np.random.default_rng(0)
    y = rng.choice(6, size=600, p=[0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    X = rng.normal(size=(600, 32)) + y[:, None] * 0.3
    probe = LinearProbeCV(
        Cs=[1e-6, 1e-3, 1.0], tol=1e-6, transformer=StandardScaler(), random_state=0
    ).fit(X, y)
    train = np.setdiff1d(np.arange(600), probe.validation_indices_)
    cold = LogisticRegression(C=1e-6, tol=1e-6, max_iter=1000)
    cold.fit(StandardScaler().fit_transform(X[train]), y[train])
    assert probe.cv_results_["n_iter"][0] <= 3
    assert cold.n_iter_[0] > 50


def test_search_results_do_not_depend_on_n_jobs(digits):
    X, y = digits
    runs = [
        LinearProbeCV(n_chains=2, n_jobs=n_jobs, random_state=1).fit(X[:600], y[:600])
        for n_jobs in (1, 2)
    ]
    np.testing.assert_array_equal(
        runs[0].cv_results_["val_accuracy"], runs[1].cv_results_["val_accuracy"]
    )
    assert runs[0].C_ == runs[1].C_
    np.testing.assert_array_equal(runs[0].cv_results_["chain"], np.arange(45) % 2)


def test_ties_select_the_smallest_C():
    # Two identical, perfectly separable classes: every C from some point on scores 1.0.
    X = np.array([[-2.0, 0.0], [-1.5, 0.3], [-1.0, -0.2], [1.0, 0.1], [1.5, -0.3], [2.0, 0.2]] * 5)
    y = np.array([0, 0, 0, 1, 1, 1] * 5)
    probe = LinearProbeCV(Cs=[1e-6, 1e-3, 1.0, 1e3], validation_fraction=0.4, random_state=0).fit(
        X, y
    )
    scores = probe.cv_results_["val_accuracy"]
    assert scores.max() == 1.0 and (scores == 1.0).sum() >= 2
    assert probe.C_ == probe.cv_results_["C"][np.flatnonzero(scores == 1.0)[0]]


def test_estimators_follow_the_sklearn_contract(blobs):
    X, y = blobs
    for estimator in (
        LinearProbeCV(Cs=[0.1, 1.0], random_state=0),
        CosineKNNClassifier(n_neighbors=5),
    ):
        copy = clone(estimator)
        assert copy.get_params() == estimator.get_params()
        with pytest.raises(NotFittedError):
            copy.predict(X)
        assert copy.fit(X, y) is copy
        assert set(copy.predict(X)) <= set(y)
        assert copy.score(X, y) == 1.0


# --- the k-NN probe ------------------------------------------------------------------


def brute_force_votes(train, train_labels, queries, k, temperature, n_classes):
    """DINO's vote written out the slow way, in float64."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    votes = np.zeros((len(queries), n_classes))
    for i, q in enumerate(queries):
        similarities = train @ q
        for j in np.argsort(-similarities)[:k]:
            votes[i, train_labels[j]] += np.exp(similarities[j] / temperature)
    return votes


@pytest.mark.parametrize("k", [1, 5, 20, 100])
def test_knn_matches_a_brute_force_numpy_vote(k):
    rng = np.random.default_rng(k)
    centers = rng.normal(size=(7, 24))
    train_labels = rng.integers(0, 7, 300)
    train = (centers[train_labels] + rng.normal(size=(300, 24))).astype(np.float32)
    queries = (centers[rng.integers(0, 7, 60)] + rng.normal(size=(60, 24))).astype(np.float32)

    expected = brute_force_votes(
        train.astype(np.float64), train_labels, queries.astype(np.float64), k, 0.07, 7
    )
    knn = CosineKNNClassifier(n_neighbors=k).fit(train, train_labels)
    np.testing.assert_allclose(knn.vote_scores(queries), expected, rtol=1e-4)
    np.testing.assert_array_equal(knn.predict(queries), np.argmax(expected, axis=1))
    # cosine: rescaling rows changes nothing
    scaled = CosineKNNClassifier(n_neighbors=k).fit(
        train * rng.uniform(0.1, 10, (300, 1)).astype(np.float32), train_labels
    )
    np.testing.assert_array_equal(scaled.predict(queries), knn.predict(queries))


def test_vote_scores_sum_weights_per_class():
    similarities = np.array([[0.9, 0.5, 0.1]])
    labels = np.array([[2, 0, 2]])
    votes = knn_vote_scores(similarities, labels, n_classes=3, temperature=0.5)
    np.testing.assert_allclose(votes, [[np.exp(1.0), 0.0, np.exp(1.8) + np.exp(0.2)]])


# --- metrics and statistics ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_on_a_hand_checked_case():
    y_true = np.array([0, 0, 0, 1, 1, 3])  # class 2 never occurs in the test rows
    scores = np.eye(4)[[0, 0, 1, 1, 2, 3]]  # predictions 0 0 1 1 2 3
    m = classification_metrics(y_true, scores)
    assert m.top1 == pytest.approx(4 / 6)
    assert m.top5 is None  # 4 classes: top-5 would be 1 by construction
    assert m.per_class_accuracy == (pytest.approx(2 / 3), 0.5, None, 1.0)
    assert m.mean_per_class == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m.mean_per_class == pytest.approx(
        balanced_accuracy_score(y_true, np.argmax(scores, axis=1))
    )
    np.testing.assert_array_equal(m.confusion_matrix[0], [2, 1, 0, 0])
    assert m.confusion_matrix.sum() == 6


def test_top5_counts_a_hit_in_the_five_best_classes():
    y_true = np.array([6, 0])
    scores = np.tile(np.linspace(1.0, 0.0, 7), (2, 1))  # class 0 best ... class 6 worst
    m = classification_metrics(y_true, scores)
    assert (m.top1, m.top5) == (0.5, 0.5)


def test_accuracy_interval_is_wilsons_and_honest_for_small_sets():
    """The Wilson score interval, by its formula; 8 of 8 right is not a zero-width [1, 1]."""
    from scipy.stats import norm

    def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
        z, p = norm.ppf(0.5 + confidence / 2), k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return centre - half, centre + half

    for k, n in ((150, 200), (8, 8), (0, 12), (47, 50)):
        correct = np.arange(n) < k
        assert accuracy_ci(correct, confidence=0.95) == pytest.approx(wilson(k, n), abs=1e-9)
    low, high = accuracy_ci(np.ones(8, bool), confidence=0.95)
    assert high == pytest.approx(1.0) and low < 0.7


def test_each_pretrained_embedding_is_tested_against_its_random_twin():
    from embedpipe.probe import pretrained_pairs

    X, y = load_digits(return_X_y=True)
    X, y = X[:300].astype(np.float32), y[:300].astype(object)
    ids = np.array([f"d{i}" for i in range(300)], dtype=object)
    noise = np.random.default_rng(0).normal(size=X.shape).astype(np.float32)

    def meta(backbone, pretrained):
        return {"backbone": backbone, "layer": "gap", "weights": {"name": "w", "pretrained": pretrained}}

    inputs = [ProbeInput("a-pre", ids, y, X, meta("a", True)), ProbeInput("a-rnd", ids, y, noise, meta("a", False)),
              ProbeInput("b-pre", ids, y, X[:, ::-1].copy(), meta("b", True)),
              ProbeInput("b-rnd", ids, y, noise * 2, meta("b", False))]
    results = run_probe(inputs, ProbeConfig(knn_ks=(10,), Cs=(0.1, 1.0)))
    assert [(t.a, t.b) for t in results.pretrained_vs_random] == [("a-pre", "a-rnd"), ("b-pre", "b-rnd")]
    assert pretrained_pairs(results.datasets) == [("a-pre", "a-rnd"), ("b-pre", "b-rnd")]
    test = results.split.test_labels
    for t in results.pretrained_vs_random:  # the McNemar counts, recomputed from the predictions
        by = {d.name: d.linear.predictions == test for d in results.datasets}
        assert (t.a_only, t.b_only) == (int((by[t.a] & ~by[t.b]).sum()), int((~by[t.a] & by[t.b]).sum()))
    assert results.to_dict()["pretrained_vs_random"][0]["a"] == "a-pre"


def test_mcnemar_exact_p_value():
    a = np.array([True] * 7 + [False] * 1 + [True] * 10 + [False] * 2)
    b = np.array([False] * 7 + [True] * 1 + [True] * 10 + [False] * 2)
    test = mcnemar_exact(a, b, a="a", b="b")
    assert (test.a_only, test.b_only, test.n) == (7, 1, 20)
    assert test.p_value == pytest.approx(2 * (1 + 8) / 2**8)  # two-sided binomial, 8 discordant
    assert mcnemar_exact(a, a, a="a", b="a").p_value == 1.0


# --- run_probe: the comparison and its refusals ---------------------------------------


def test_separable_problem_reaches_100_percent(blobs):
    X, labels = blobs
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(16, 16)))[0]
    inputs = [
        make_input("a", X, labels, pretrained=True),
        make_input("b", (X @ rotation).astype(np.float32), labels),
    ]
    results = run_probe(inputs, ProbeConfig())
    for d in results.datasets:
        assert d.linear.metrics.top1 == 1.0
        assert d.knn[10].top1 == d.knn[20].top1 == d.knn[100].top1 == 1.0
        assert d.knn[200] is None  # 160 training rows: k=200 cannot be measured
        assert d.linear.metrics.top5 is None  # 5 classes
    assert results.paired_test.a_only == results.paired_test.b_only == 0
    assert results.paired_test.p_value == 1.0
    assert results.split.n_test == 40 and results.split.n_train == 160


def test_results_document_names_and_json(digits):
    X, y = digits
    inputs = [make_input("pix", X[:500], y[:500]), make_input("half", X[:500, ::2], y[:500])]
    results = run_probe(inputs, ProbeConfig(knn_ks=(10, 20)))
    doc = json.loads(json.dumps(results.to_dict(), allow_nan=False))
    assert doc["ranking"][0] in ("pix", "half") and set(doc["ranking"]) == {"pix", "half"}
    for name in ("pix", "half"):
        metrics = doc["datasets"][name]["metrics"]
        for key in (
            "linear.top1",
            "linear.top5",
            "linear.mean_per_class",
            "linear.C",
            "knn.k20.top1",
            "knn.k10.top5",
        ):
            assert isinstance(metrics[key], float), key
        assert metrics["linear.C"] in KORNBLITH_CS
        assert doc["datasets"][name]["provenance"]["weights"]["name"] == f"{name}-weights"
        assert (
            len(doc["datasets"][name]["linear"]["test_predictions"])
            == doc["split"]["n_test"]
            == 100
        )
    assert doc["split"]["classes"] == [str(c) for c in range(10)]  # numeric labels sort numerically


def test_datasets_probed_in_parallel_give_the_same_results(digits):
    X, y = digits
    inputs = [make_input("pix", X[:400], y[:400]), make_input("half", X[:400, ::2], y[:400])]
    runs = [run_probe(inputs, ProbeConfig(knn_ks=(10,), n_jobs=n_jobs)) for n_jobs in (1, 2)]
    for one, two in zip(runs[0].datasets, runs[1].datasets):
        assert one.flat_metrics() | {"linear.fit_seconds": 0, "knn.seconds": 0} == (
            two.flat_metrics() | {"linear.fit_seconds": 0, "knn.seconds": 0}
        )
        np.testing.assert_array_equal(one.linear.predictions, two.linear.predictions)


def test_rows_without_a_label_are_refused(blobs):
    X, labels = blobs
    labels = labels.copy()
    labels[[3, 17]] = None, float("nan")
    with pytest.raises(MissingLabelsError, match=r"2 of 200 rows have no label.*img00003\.png"):
        run_probe([make_input("a", X, labels)], ProbeConfig())


def test_different_id_sets_are_refused_or_aligned_explicitly(blobs):
    X, labels = blobs
    a = make_input("a", X, labels)
    b = make_input("b", X[10:], labels[10:], ids=a.ids[10:])
    with pytest.raises(IdAlignmentError, match=r"10 ids only in 'a'.*--align intersect"):
        run_probe([a, b], ProbeConfig())
    results = run_probe([a, b], ProbeConfig(align=IdAlignment.INTERSECT))
    assert [d.rows_dropped for d in results.datasets] == [10, 0]
    assert results.split.n_train + results.split.n_test == 190


def test_rows_are_matched_by_id_not_by_position(digits):
    X, y = digits
    X, y = X[:400], y[:400]
    a = make_input("a", X, y)
    order = np.random.default_rng(0).permutation(400)
    shuffled = make_input("b", X[order], y[order], ids=a.ids[order])
    same = make_input("b", X, y)
    r_shuffled = run_probe([a, shuffled], ProbeConfig(knn_ks=(10,)))
    r_same = run_probe([a, same], ProbeConfig(knn_ks=(10,)))
    np.testing.assert_array_equal(
        r_shuffled.datasets[1].linear.predictions, r_same.datasets[1].linear.predictions
    )
    np.testing.assert_array_equal(r_shuffled.split.test_ids, r_same.split.test_ids)


def reordered(d, order):
    """``d`` with its rows stored in ``order``: the same (id, label, vector) triples."""
    return ProbeInput(d.name, d.ids[order], d.labels[order], d.vectors[order], d.meta)


def parts_rewritten(n):
    """Row order after an incremental extraction rerun: of four Parquet parts, the
    rewritten first and third now come last."""
    parts = np.array_split(np.arange(n), 4)
    return np.concatenate([parts[1], parts[3], parts[0], parts[2]])


def without_timings(doc):
    """``ProbeResults.to_dict()`` less what two identical runs differ in: wall times."""
    if isinstance(doc, dict):
        return {
            k: without_timings(v)
            for k, v in doc.items()
            if "seconds" not in k and k != "created_at"
        }
    return [without_timings(v) for v in doc] if isinstance(doc, list) else doc


def correctness(results, name):
    """{test id: whether the linear probe of dataset ``name`` got it right}."""
    d = next(d for d in results.datasets if d.name == name)
    right = d.linear.predictions == results.split.test_labels
    return dict(zip(results.split.test_ids.tolist(), right.tolist()))


def test_split_by_id_holds_out_the_same_ids_in_any_row_order():
    ids = np.array([f"{c}/{i:03d}.png" for c in "abc" for i in range(30)], dtype=object)
    y = np.repeat(np.arange(3), 30)
    kept, held = split_by_id(ids, y, fraction=0.2, seed=0)
    assert len(held) == 18 and np.array_equal(np.sort(np.r_[kept, held]), np.arange(90))
    rng = np.random.default_rng(0)
    for order in (rng.permutation(90), rng.permutation(90), parts_rewritten(90)):
        _, moved = split_by_id(ids[order], y[order], fraction=0.2, seed=0)
        assert sorted(ids[order][moved]) == sorted(ids[held])


@pytest.fixture(scope="module")
def stored_probe(digits):
    """Two datasets stored in id order (a fresh extraction), and what the probe finds."""
    X, y = digits
    inputs = [make_input("pix", X[:400], y[:400]), make_input("half", X[:400, ::2], y[:400])]
    config = ProbeConfig(knn_ks=(10,), n_jobs=1)
    return inputs, config, run_probe(inputs, config)


@pytest.mark.parametrize("reordering", ["shuffled", "parts rewritten"])
def test_probe_results_do_not_depend_on_row_order(stored_probe, reordering):
    inputs, config, stored = stored_probe
    rng = np.random.default_rng(1)  # each dataset shuffled its own way
    moved = [
        reordered(d, rng.permutation(400) if reordering == "shuffled" else parts_rewritten(400))
        for d in inputs
    ]
    results = run_probe(moved, config)
    np.testing.assert_array_equal(results.split.test_ids, stored.split.test_ids)
    for name in ("pix", "half"):
        assert correctness(results, name) == correctness(stored, name)
    # everything else too: C, validation curves, k-NN, intervals, the sample, paired test
    assert without_timings(results.to_dict()) == without_timings(stored.to_dict())


def test_conflicting_labels_for_one_id_are_refused(blobs):
    X, labels = blobs
    other = labels.copy()
    other[5] = "class-4"
    with pytest.raises(IdAlignmentError, match="label 1 images differently"):
        run_probe([make_input("a", X, labels), make_input("b", X, other)], ProbeConfig())


def test_given_test_datasets_pair_by_provenance(digits):
    X, y = digits
    ids = np.array([f"img{i:05d}.png" for i in range(len(y))], dtype=object)
    train, test = np.arange(0, 1200), np.arange(1200, 1500)
    halves = {"pix": X, "half": X[:, ::2]}

    def inputs(rows, suffix):
        return [
            make_input(f"{n}{suffix}", v[rows], y[rows], ids=ids[rows], backbone=n)
            for n, v in halves.items()
        ]

    config = ProbeConfig(knn_ks=(10,))
    results = run_probe(inputs(train, ""), config, test=inputs(test, "-test")[::-1])
    assert results.split.kind is SplitKind.GIVEN
    assert (results.split.n_train, results.split.n_test) == (1200, 300)
    direct = LinearProbeCV(transformer=StandardScaler(), random_state=0).fit(X[train], y[train])
    np.testing.assert_array_equal(results.datasets[0].linear.predictions, direct.predict(X[test]))

    with pytest.raises(ProbeInputError, match="in both the training and the test"):
        run_probe(inputs(train, ""), config, test=inputs(np.arange(1100, 1300), "-test"))
    with pytest.raises(ProbeInputError, match="no test embeddings were made like 'pix'"):
        run_probe(inputs(train, "")[:1], config, test=inputs(test, "-test")[1:])


@pytest.mark.parametrize("given_test", [False, True])
def test_the_sample_holds_every_datasets_vectors_of_the_same_rows(digits, given_test):
    """The rows the report maps and compares by CKA: a seeded uniform sample of every image
    probed (given test images too), each dataset's vectors of those very images."""
    X, y = digits
    ids = np.array([f"img{i:05d}.png" for i in range(400)], dtype=object)
    halves = {"pix": X[:400], "half": X[:400, ::2]}
    rows = np.random.default_rng(5).permutation(400)  # stored out of id order

    def inputs(part, suffix=""):
        return [make_input(f"{n}{suffix}", v[part], y[part], ids=ids[part], backbone=n) for n, v in halves.items()]

    config = ProbeConfig(knn_ks=(10,), Cs=(1.0,), projection_samples=120, seed=2)
    if given_test:
        train, test = rows[:300], rows[300:]
        results = run_probe(inputs(train), config, test=inputs(test, "-test")[::-1])
    else:
        results = run_probe(inputs(rows), config)
    sample = results.sample
    assert sample.of == 400 and len(sample.ids) == 120 and len(set(sample.ids)) == 120
    at = pd.Index(ids).get_indexer(sample.ids)
    np.testing.assert_array_equal(sample.labels, y[at])  # class index == digit
    for vectors, v in zip(sample.vectors, halves.values()):
        np.testing.assert_array_equal(vectors, v[at])
    in_test = np.isin(sample.ids, results.split.test_ids)
    assert 0 < in_test.sum() < 120  # training and test images alike
    if given_test:  # training rows first, then test rows, each in id order
        assert not in_test[: (~in_test).sum()].any()
        assert list(sample.ids[~in_test]) == sorted(sample.ids[~in_test])
        assert list(sample.ids[in_test]) == sorted(sample.ids[in_test])
    else:
        assert list(sample.ids) == sorted(sample.ids)
    doc = results.to_dict()["sample"]
    assert doc == {"seed": 2, "of": 400, "ids": list(sample.ids), "labels": sample.labels.tolist()}


def test_too_few_rows_per_class_are_refused(blobs):
    X, labels = blobs
    labels = labels.copy()
    labels[:2] = "rare"
    with pytest.raises(SplitError, match=r"\('rare', 2\)"):
        run_probe([make_input("a", X, labels)], ProbeConfig())


@pytest.mark.parametrize(
    "bad",
    [
        {"test_size": 0.0},
        {"validation_size": 1.0},
        {"Cs": ()},
        {"Cs": (1.0, -1.0)},
        {"knn_ks": (0, 10)},
        {"tol": 0.0},
        {"n_chains": 0},
        {"align": "nearest"},
    ],
)
def test_invalid_config_is_refused(bad):
    with pytest.raises(ProbeConfigError, match=next(iter(bad))):
        ProbeConfig(**bad)


def test_leaked_test_rows_equal_a_brute_force_cross_split_check():
    """Planted near copies of training rows in the test set are found; accuracy without
    them is reported beside the headline."""
    from embedpipe.config import DUPLICATE_SIMILARITY

    X, y = load_digits(return_X_y=True)
    X, y = X[:400].astype(np.float32), y[:400]
    ids = np.array([f"d{i:03d}" for i in range(400)], dtype=object)
    first = run_probe([ProbeInput("pix", ids, y.astype(object), X, {})], ProbeConfig(knn_ks=(10,), Cs=(1.0,)))
    test_ids = set(first.split.test_ids)
    train = [i for i in range(400) if ids[i] not in test_ids]
    X2 = X.copy()
    planted = [i for i in range(400) if ids[i] in test_ids][:7]
    for j, i in enumerate(planted):  # a test digit becomes a near copy of a training one
        X2[i] = X[train[j]] * 1.01
    result = run_probe([ProbeInput("pix", ids, y.astype(object), X2, {})], ProbeConfig(knn_ks=(10,), Cs=(1.0,)))
    d = result.datasets[0]
    unit = X2 / np.linalg.norm(X2, axis=1, keepdims=True)
    test_rows = [list(ids).index(i) for i in result.split.test_ids]
    train_rows = [i for i in range(400) if ids[i] not in set(result.split.test_ids)]
    nearest = (unit[test_rows] @ unit[train_rows].T).max(axis=1)
    np.testing.assert_array_equal(d.leaked, nearest >= DUPLICATE_SIMILARITY)
    assert {ids[i] for i in planted} <= set(result.split.test_ids[d.leaked])
    doc = result.to_dict()["datasets"]["pix"]
    assert doc["leakage"]["test_rows"] == int(d.leaked.sum())
    assert doc["metrics"]["linear.top1_leak_free"] == d.top1_leak_free
