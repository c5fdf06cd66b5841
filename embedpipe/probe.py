"""Linear and k-NN probes of frozen embeddings, compared across backbones.

The protocol (``docs/probe.md`` gives it with its sources):

* **Linear probe** (Kornblith, Shlens & Le, CVPR 2019; SimCLR appendix B; DINOv2's
  ``log_regression.py``): L2-regularised multinomial logistic regression fitted with
  L-BFGS by scikit-learn. The inverse regularisation ``C`` is chosen among 45 values
  log-spaced over [1e-6, 1e5] by accuracy on a stratified validation split held out of
  the training data; the model is then refit on train + validation at that ``C`` and
  scored once on the test split.
* **k-NN probe** (DINO, DINOv2 ``knn.py``): cosine similarity of L2-normalised features,
  each of the k nearest training rows voting for its label with weight
  ``exp(similarity / 0.07)``, for k in {10, 20, 100, 200}. FAISS finds the neighbours.

Everything here takes arrays: the caller opens embeddings datasets and wraps each in a
:class:`ProbeInput`. :func:`run_probe` is the entry point; :mod:`embedpipe.report` turns
its :class:`ProbeResults` into ``results.json``, Markdown and HTML.

Backbones are compared on the *same* images: datasets are aligned by id (refused, or
reduced to the common ids when asked), so one stratified, seeded split serves every
backbone, and per-image correctness can be compared with a paired test.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from numbers import Real
from typing import Any

import faiss
import numpy as np
import pandas as pd
import sklearn
from joblib import Parallel, cpu_count, delayed, effective_n_jobs
from scipy.stats import binomtest
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, f1_score, top_k_accuracy_score
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import LabelEncoder, Normalizer, StandardScaler, normalize
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y
from threadpoolctl import threadpool_limits

from embedpipe.config import Choice
from embedpipe.errors import (
    IdAlignmentError,
    MissingLabelsError,
    ProbeConfigError,
    ProbeInputError,
    SplitError,
)

logger = logging.getLogger(__name__)

KORNBLITH_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 5, 45))
"""The 45 inverse regularisation strengths of Kornblith et al. (2019), log-spaced."""

DINO_KS: tuple[int, ...] = (10, 20, 100, 200)
"""Neighbour counts of the DINO / DINOv2 k-NN evaluation."""

DINO_TEMPERATURE = 0.07
"""Temperature of the DINO k-NN vote: a neighbour at cosine s votes exp(s / 0.07)."""

RESULTS_SCHEMA = "embedpipe.probe/1"
"""Identifies the layout of :meth:`ProbeResults.to_dict` (and so of ``results.json``)."""

PROVENANCE_KEYS = ("backbone", "weights", "layer", "dim", "preprocessing", "normalize")
"""Metadata that says what made a set of embeddings; test sets pair with train sets on it."""

_EXAMPLES = 5  # ids quoted in an error message


class IdAlignment(Choice):
    """What to do when backbones' embeddings do not cover the same ids."""

    STRICT = "strict"  # refuse: a comparison on different images is not paired
    INTERSECT = "intersect"  # probe the ids every dataset has; count what is dropped


class SplitKind(Choice):
    """Where the test rows came from."""

    STRATIFIED = "stratified"  # a seeded stratified split of the given datasets
    GIVEN = "given"  # separate test datasets


# --- configuration and inputs --------------------------------------------------------


@dataclass(frozen=True)
class ProbeConfig:
    """Everything one probe run needs, decided before it starts.

    ``test_size`` is the fraction of rows held out for testing (ignored when test datasets
    are given); ``validation_size`` the fraction of the remaining rows held out to choose
    ``C``. ``standardize`` and ``l2_normalize`` preprocess features for the linear probe
    (L2 first when both); the k-NN probe always uses cosine similarity. ``n_jobs``
    datasets are probed at once (joblib semantics: -1 is every core; with one dataset, its
    ``n_chains`` warm-started C paths run at once instead, see :class:`LinearProbeCV`).
    ``n_bootstrap`` resamples give the ``confidence`` interval of test accuracy;
    ``projection_samples`` rows are drawn for the 2-D PCA view. Results do not depend on
    ``n_jobs``.
    """

    test_size: float = 0.2
    validation_size: float = 0.2
    seed: int = 0
    Cs: tuple[float, ...] = KORNBLITH_CS
    standardize: bool = True
    l2_normalize: bool = False
    max_iter: int = 1000
    tol: float = 1e-4
    n_chains: int = 1
    knn_ks: tuple[int, ...] = DINO_KS
    knn_temperature: float = DINO_TEMPERATURE
    align: IdAlignment = IdAlignment.STRICT
    n_bootstrap: int = 1000
    confidence: float = 0.95
    projection_samples: int = 2000
    n_jobs: int | None = -1

    def __post_init__(self) -> None:
        if self.align not in IdAlignment.values():
            raise ProbeConfigError(
                f"align must be one of {IdAlignment.values()}, got {str(self.align)!r}"
            )
        object.__setattr__(self, "align", IdAlignment(self.align))
        object.__setattr__(self, "Cs", tuple(sorted(float(c) for c in self.Cs)))
        object.__setattr__(self, "knn_ks", tuple(sorted({int(k) for k in self.knn_ks})))
        for name in ("test_size", "validation_size", "confidence"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ProbeConfigError(f"{name} must be strictly between 0 and 1, got {value}")
        _check_cs(self.Cs)
        for name in ("max_iter", "n_chains", "n_bootstrap", "projection_samples"):
            if getattr(self, name) < 1:
                raise ProbeConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tol <= 0:
            raise ProbeConfigError(f"tol must be > 0, got {self.tol}")
        if not self.knn_ks or self.knn_ks[0] < 1:
            raise ProbeConfigError(f"knn_ks must be positive neighbour counts, got {self.knn_ks}")
        if self.knn_temperature <= 0:
            raise ProbeConfigError(f"knn_temperature must be > 0, got {self.knn_temperature}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["align"] = self.align.value
        d["Cs"], d["knn_ks"] = list(self.Cs), list(self.knn_ks)
        return d


@dataclass(frozen=True, eq=False)
class ProbeInput:
    """One embeddings dataset to probe.

    ``ids``: (N,) str, unique; ``labels``: (N,) object, ``None`` where missing;
    ``vectors``: (N, D) float (float32 as stored); ``meta``: provenance as written by
    :mod:`embedpipe.store` (backbone, layer, dim, weights, preprocessing, ...). ``name``
    labels the dataset in results and reports and must be unique within a run.
    """

    name: str
    ids: np.ndarray
    labels: np.ndarray
    vectors: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", np.asarray(self.ids, dtype=object))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=object))
        object.__setattr__(self, "vectors", np.asarray(self.vectors))

    @classmethod
    def from_embeddings(cls, embeddings: Any, *, name: str) -> ProbeInput:
        """Wrap what :func:`embedpipe.store.read_embeddings` returned."""
        return cls(
            name=name,
            ids=embeddings.ids,
            labels=embeddings.labels,
            vectors=embeddings.vectors,
            meta=dict(embeddings.meta),
        )

    @property
    def provenance(self) -> dict[str, Any]:
        """The metadata that identifies what made these embeddings."""
        return {key: self.meta.get(key) for key in PROVENANCE_KEYS}


def _check_cs(Cs: Sequence[float]) -> None:
    if len(Cs) == 0 or min(Cs) <= 0 or not all(math.isfinite(c) for c in Cs):
        raise ProbeConfigError(f"Cs must be finite positive values, got {list(Cs)!r}")


# --- the linear probe ----------------------------------------------------------------


def stratified_split(
    y: np.ndarray, *, fraction: float, seed: int | None, held_out: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of rows into (kept, held-out) index arrays.

    ``y``: (n,) int class indices. Returns two sorted int64 arrays. The held-out part has
    ``ceil(fraction * n)`` rows (scikit-learn's rounding). Raises :class:`SplitError` when a
    class has fewer than two rows or either part would be smaller than the class count.
    """
    y = np.asarray(y)
    values, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        lonely = values[counts < 2][:_EXAMPLES].tolist()
        raise SplitError(
            f"classes {lonely} have a single row, so a stratified {held_out} split cannot "
            "hold any of them out; label more rows of those classes or remove them"
        )
    n_held = math.ceil(fraction * y.size)
    if min(n_held, y.size - n_held) < values.size:
        raise SplitError(
            f"a {held_out} split of {fraction:g} x {y.size} rows gives {n_held} held-out and "
            f"{y.size - n_held} kept rows, but both parts need at least one row of each of "
            f"the {values.size} classes; change the {held_out} fraction or add rows"
        )
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    kept, held = next(splitter.split(np.zeros((y.size, 1)), y))
    return np.sort(kept), np.sort(held)


@dataclass(frozen=True)
class _PathPoint:
    index: int  # position in the C grid
    accuracy: float  # validation top-1
    n_iter: int
    seconds: float
    chain: int


def _prior_start(y: np.ndarray, n_classes: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """coef_ (K, D) and intercept_ (K,) of the C -> 0 end of the path (K = 1 if binary).

    With the weights penalised to zero only the unpenalised intercepts remain, and their
    optimum is the log class frequencies. With imbalanced classes and centred features,
    starting there spares the first (smallest) C the hundreds of iterations L-BFGS needs
    to find them from zero: the intercepts' curvature is tiny next to the penalty's, so
    that problem is badly conditioned.
    """
    log_freq = np.log(np.bincount(y, minlength=n_classes) / y.size)
    if n_classes == 2:
        return np.zeros((1, n_features)), np.array([log_freq[1] - log_freq[0]])
    return np.zeros((n_classes, n_features)), log_freq - log_freq.mean()


def _warm_path(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    Cs: np.ndarray,
    indices: Sequence[int],
    *,
    chain: int,
    n_classes: int,
    max_iter: int,
    tol: float,
) -> list[_PathPoint]:
    """Fit ``Cs[indices]`` in increasing order, each fit starting from the previous solution.

    ``X_train``: (n, D) float64 C-contiguous, so that scikit-learn never copies it.
    """
    model = LogisticRegression(C=Cs[indices[0]], max_iter=max_iter, tol=tol, warm_start=True)
    # warm_start reads coef_ / intercept_ when present; setting them seeds the path.
    model.coef_, model.intercept_ = _prior_start(y_train, n_classes, X_train.shape[1])
    points = []
    for i in indices:
        model.set_params(C=Cs[i])
        start = time.perf_counter()
        model.fit(X_train, y_train)
        seconds = time.perf_counter() - start
        accuracy = float(np.mean(model.predict(X_val) == y_val))
        n_iter = int(np.max(model.n_iter_))
        points.append(_PathPoint(i, accuracy, n_iter, seconds, chain))
        logger.debug(
            "C=%.3g: validation top-1 %.4f, %d iters, %.2fs", Cs[i], accuracy, n_iter, seconds
        )
    return points


class LinearProbeCV(ClassifierMixin, BaseEstimator):
    """L2-regularised multinomial logistic regression with C chosen on a held-out split.

    The linear probe of Kornblith et al. (2019): ``fit`` holds out a stratified
    ``validation_fraction`` of the rows, fits scikit-learn's ``LogisticRegression``
    (L-BFGS) at every value of ``Cs`` on the rest, keeps the C with the best validation
    top-1 accuracy (the smallest such C on ties: the most regularised), and refits on
    all rows at that C from scratch, so that the final model is exactly what
    ``LogisticRegression(C=C_)`` fitted on the same (transformed) arrays gives.

    The grid is searched exhaustively but cheaply, along a warm-started path: every fit
    starts from the previous (smaller C) solution, the first from the C -> 0 solution.
    With ``n_chains > 1`` the grid is dealt round-robin into that many independent paths,
    run in ``n_jobs`` threads with the BLAS threads divided among them. Because L-BFGS
    stops within ``tol`` of an optimum, the path a fit starts from can move a validation
    score by an image where fits stall (large C, loose ``tol``), and interleaved paths
    then draw a saw-tooth there; ``n_chains`` is a parameter of its own so that results
    never depend on ``n_jobs``.

    Parameters
    ----------
    Cs : sequence of float, default=None
        Candidate inverse regularisation strengths; ``None`` is :data:`KORNBLITH_CS`.
    validation_fraction : float, default=0.2
        Fraction of the rows held out (stratified) to choose C.
    transformer : scikit-learn transformer, default=None
        Feature preprocessing, cloned and fitted on the training rows for the search and
        on all rows for the refit, so validation rows never inform the choice of C.
    n_chains : int, default=1
        Number of warm-started paths the grid is dealt into.
    max_iter, tol : int, float
        L-BFGS limits of every fit, passed to ``LogisticRegression``.
    random_state : int or None, default=None
        Seeds the validation split.
    n_jobs : int or None, default=None
        Paths fitted at once (joblib semantics).

    Attributes
    ----------
    classes_ : (K,) ndarray
    C_ : float
        The selected C.
    best_index_ : int
        Its position in ``cv_results_["C"]``.
    cv_results_ : dict of (n_Cs,) ndarrays
        ``C`` (increasing), ``val_accuracy``, ``n_iter``, ``fit_seconds``, ``chain``.
    best_estimator_ : Pipeline
        ``transform`` (the fitted transformer or ``"passthrough"``) then ``logreg``, fitted
        on all rows with classes encoded 0..K-1.
    validation_indices_ : (n_val,) int64 ndarray
        Rows of ``X`` that were held out during the search.
    n_iter_ : int
        L-BFGS iterations of the refit; ``converged_`` is False when it hit ``max_iter``.
    search_seconds_, refit_seconds_ : float
    """

    def __init__(
        self,
        *,
        Cs: Sequence[float] | None = None,
        validation_fraction: float = 0.2,
        transformer: Any = None,
        n_chains: int = 1,
        max_iter: int = 1000,
        tol: float = 1e-4,
        random_state: int | None = None,
        n_jobs: int | None = None,
    ) -> None:
        self.Cs = Cs
        self.validation_fraction = validation_fraction
        self.transformer = transformer
        self.n_chains = n_chains
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbeCV:
        """``X``: (n, D) float (used as float64); ``y``: (n,) class labels."""
        Cs = np.sort(np.asarray(KORNBLITH_CS if self.Cs is None else self.Cs, dtype=np.float64))
        _check_cs(Cs.tolist())
        if not 0.0 < self.validation_fraction < 1.0:
            raise ProbeConfigError(
                "validation_fraction must be strictly between 0 and 1, "
                f"got {self.validation_fraction}"
            )
        if self.n_chains < 1:
            raise ProbeConfigError(f"n_chains must be >= 1, got {self.n_chains}")
        # float64: L-BFGS on float32 gradients stalls in its line search before tight tols
        X, y = check_X_y(X, y, dtype=np.float64, order="C")
        check_classification_targets(y)
        self.n_features_in_ = X.shape[1]
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        if self.classes_.size < 2:
            raise ProbeInputError(
                f"a probe needs at least two classes, got {self.classes_.tolist()}"
            )
        y = encoder.transform(y)
        train, val = stratified_split(
            y, fraction=self.validation_fraction, seed=self.random_state, held_out="validation"
        )

        start = time.perf_counter()
        points = self._search(X, y, train, val, Cs)
        self.search_seconds_ = time.perf_counter() - start
        points.sort(key=lambda p: p.index)
        self.cv_results_ = {
            "C": Cs,
            "val_accuracy": np.array([p.accuracy for p in points]),
            "n_iter": np.array([p.n_iter for p in points]),
            "fit_seconds": np.array([p.seconds for p in points]),
            "chain": np.array([p.chain for p in points]),
        }
        # argmax returns the first maximum: the smallest C among ties
        self.best_index_ = int(np.argmax(self.cv_results_["val_accuracy"]))
        self.C_ = float(Cs[self.best_index_])
        self.validation_indices_ = val

        start = time.perf_counter()
        transformer = None if self.transformer is None else clone(self.transformer)
        X_all = X if transformer is None else _as_float64(transformer.fit_transform(X))
        logreg = LogisticRegression(C=self.C_, max_iter=self.max_iter, tol=self.tol)
        logreg.fit(X_all, y)
        self.refit_seconds_ = time.perf_counter() - start
        self.n_iter_ = int(np.max(logreg.n_iter_))
        self.converged_ = self.n_iter_ < self.max_iter
        if not self.converged_:
            logger.warning(
                "the refit at C=%.3g stopped at max_iter=%d before reaching tol=%g; "
                "raise max_iter for a converged model",
                self.C_,
                self.max_iter,
                self.tol,
            )
        steps = [("transform", "passthrough" if transformer is None else transformer)]
        self.best_estimator_ = Pipeline([*steps, ("logreg", logreg)])
        return self

    def _search(
        self, X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, Cs: np.ndarray
    ) -> list[_PathPoint]:
        X_train, X_val = X[train], X[val]
        if self.transformer is not None:
            transformer = clone(self.transformer).fit(X_train)
            X_train = _as_float64(transformer.transform(X_train))
            X_val = _as_float64(transformer.transform(X_val))
        n_chains = min(self.n_chains, Cs.size)
        chains = [list(range(j, Cs.size, n_chains)) for j in range(n_chains)]
        n_workers = min(effective_n_jobs(self.n_jobs), n_chains)
        fit_chain = delayed(_warm_path)
        jobs = (
            fit_chain(
                X_train,
                y[train],
                X_val,
                y[val],
                Cs,
                indices,
                chain=j,
                n_classes=self.classes_.size,
                max_iter=self.max_iter,
                tol=self.tol,
            )
            for j, indices in enumerate(chains)
        )
        logger.info(
            "searching %d values of C on %d x %d (validation %d): %d warm paths, %d at once",
            Cs.size,
            *X_train.shape,
            X_val.shape[0],
            n_chains,
            n_workers,
        )
        paths = _run_threads(jobs, n_workers)
        points = [p for path in paths for p in path]
        capped = sum(p.n_iter >= self.max_iter for p in points)
        if capped:
            logger.warning(
                "%d of %d fits of the C search stopped at max_iter=%d; their validation "
                "scores are of unconverged models",
                capped,
                len(points),
                self.max_iter,
            )
        return points

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, K) float64 class probabilities, columns ordered as ``classes_``."""
        X = self._check_X(X)
        return self.best_estimator_.predict_proba(X)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(n, K) float64 logits ((n,) for two classes)."""
        X = self._check_X(X)
        return self.best_estimator_.decision_function(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n,) predicted labels, drawn from ``classes_``."""
        X = self._check_X(X)
        return self.classes_[self.best_estimator_.predict(X)]

    def _check_X(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = check_array(X, dtype=np.float64, order="C")
        if X.shape[1] != self.n_features_in_:
            raise ProbeInputError(
                f"X has {X.shape[1]} features but the probe was fitted on {self.n_features_in_}"
            )
        return X


def _run_threads(jobs: Iterable[Any], n_workers: int) -> list[Any]:
    """Run joblib-delayed ``jobs`` in ``n_workers`` threads sharing the cores' BLAS threads.

    Threads share the (large) arrays without copies; each gets its share of the BLAS and
    OpenMP threads, since oversubscribed OpenBLAS threads spin and slow everything down.
    """
    if n_workers == 1:
        return Parallel(n_jobs=1)(jobs)
    with threadpool_limits(limits=max(1, cpu_count() // n_workers)):
        return Parallel(n_jobs=n_workers, prefer="threads")(jobs)


def _as_float64(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(X, dtype=np.float64)


def linear_preprocessing(*, standardize: bool, l2_normalize: bool) -> Pipeline | None:
    """The transformer for :class:`LinearProbeCV` that a :class:`ProbeConfig` asks for."""
    steps = ([Normalizer()] if l2_normalize else []) + ([StandardScaler()] if standardize else [])
    return make_pipeline(*steps) if steps else None


# --- the k-NN probe ------------------------------------------------------------------


def knn_vote_scores(
    similarities: np.ndarray, neighbor_labels: np.ndarray, *, n_classes: int, temperature: float
) -> np.ndarray:
    """DINO's weighted k-NN vote: each neighbour adds exp(similarity / T) to its class.

    ``similarities``: (n, k) float cosine similarities; ``neighbor_labels``: (n, k) int in
    [0, n_classes). Returns (n, n_classes) float64 vote totals. DINOv2 softmax-normalises
    the weights over the neighbours first; that rescales each row by a constant and ranks
    classes identically.
    """
    n = similarities.shape[0]
    weights = np.exp(similarities.astype(np.float64) / temperature)
    cells = (np.arange(n)[:, None] * n_classes + neighbor_labels).ravel()
    votes = np.bincount(cells, weights=weights.ravel(), minlength=n * n_classes)
    return votes.reshape(n, n_classes)


class CosineKNNClassifier(ClassifierMixin, BaseEstimator):
    """k-NN classifier with DINO's similarity-weighted vote, searched exactly with FAISS.

    Rows are L2-normalised, so inner product is cosine similarity; each of the
    ``n_neighbors`` nearest training rows votes exp(similarity / ``temperature``).

    Attributes
    ----------
    classes_ : (K,) ndarray
    train_vectors_ : (n, D) float32, the L2-normalised training rows
    train_labels_ : (n,) int64, their class indices into ``classes_``
    """

    def __init__(self, *, n_neighbors: int = 20, temperature: float = DINO_TEMPERATURE) -> None:
        self.n_neighbors = n_neighbors
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: np.ndarray) -> CosineKNNClassifier:
        """``X``: (n, D) float (searched as float32); ``y``: (n,) labels."""
        X, y = check_X_y(X, y, dtype=np.float32, order="C")
        check_classification_targets(y)
        self.n_features_in_ = X.shape[1]
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        self.train_labels_ = encoder.transform(y).astype(np.int64)
        self.train_vectors_ = normalize(X)
        return self

    def kneighbors(
        self, X: np.ndarray, n_neighbors: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities (n, k) float32, decreasing, and row indices (n, k) int64."""
        check_is_fitted(self)
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        n_train = self.train_vectors_.shape[0]
        if not 1 <= k <= n_train:
            raise ProbeConfigError(
                f"n_neighbors must be between 1 and the {n_train} training rows, got {k}"
            )
        X = normalize(check_array(X, dtype=np.float32, order="C"))
        if X.shape[1] != self.n_features_in_:
            raise ProbeInputError(
                f"X has {X.shape[1]} features but the classifier holds {self.n_features_in_}"
            )
        return faiss.knn(X, self.train_vectors_, k, metric=faiss.METRIC_INNER_PRODUCT)

    def vote_scores(self, X: np.ndarray, n_neighbors: int | None = None) -> np.ndarray:
        """(n, K) float64 vote totals of the nearest ``n_neighbors`` rows."""
        similarities, indices = self.kneighbors(X, n_neighbors)
        return knn_vote_scores(
            similarities,
            self.train_labels_[indices],
            n_classes=self.classes_.size,
            temperature=self.temperature,
        )

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, K) float64 votes normalised to sum to one per row."""
        scores = self.vote_scores(X)
        return scores / scores.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n,) labels with the largest vote (the first class on ties)."""
        scores = self.vote_scores(X)
        return self.classes_[np.argmax(scores, axis=1)]


# --- metrics and statistics ----------------------------------------------------------


@dataclass(frozen=True)
class ClassificationMetrics:
    """Scores of one probe on the test split.

    ``top5`` is ``None`` with 5 classes or fewer (it would be 1 by construction).
    ``per_class_accuracy`` (K,) is recall per class, ``None`` for classes absent from
    the test split; ``mean_per_class`` is their mean (balanced accuracy).
    ``confusion_matrix``: (K, K) int64, rows true class, columns predicted.
    """

    top1: float
    top5: float | None
    mean_per_class: float
    macro_f1: float
    per_class_accuracy: tuple[float | None, ...]
    confusion_matrix: np.ndarray


def classification_metrics(y_true: np.ndarray, scores: np.ndarray) -> ClassificationMetrics:
    """Metrics of class scores against the truth.

    ``y_true``: (n,) int in [0, K); ``scores``: (n, K) float, higher meaning more likely
    (probabilities, logits or votes). The prediction is the arg-max.
    """
    n_classes = scores.shape[1]
    labels = np.arange(n_classes)
    predicted = np.argmax(scores, axis=1)
    confusion = confusion_matrix(y_true, predicted, labels=labels)
    support = confusion.sum(axis=1)
    recall = np.diag(confusion) / np.maximum(support, 1)
    present = support > 0
    return ClassificationMetrics(
        top1=float(np.mean(predicted == y_true)),
        top5=(
            float(top_k_accuracy_score(y_true, scores, k=5, labels=labels))
            if n_classes > 5
            else None
        ),
        mean_per_class=float(np.mean(recall[present])),
        macro_f1=float(f1_score(y_true, predicted, average="macro", zero_division=0.0)),
        per_class_accuracy=tuple(float(r) if p else None for r, p in zip(recall, present)),
        confusion_matrix=confusion.astype(np.int64),
    )


def bootstrap_accuracy_ci(
    correct: np.ndarray, *, n_resamples: int, confidence: float, seed: int | None
) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy over test rows.

    ``correct``: (n,) bool. Resampling n rows with replacement and counting the correct
    ones is a draw from Binomial(n, mean(correct)) exactly, so resamples are drawn that
    way: the same distribution at O(n_resamples) cost instead of O(n * n_resamples).
    """
    n = correct.size
    rng = np.random.default_rng(seed)
    accuracies = rng.binomial(n, float(np.mean(correct)), size=n_resamples) / n
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(accuracies, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedTest:
    """Exact McNemar test of two probes' per-image correctness on the same test rows.

    Under the null hypothesis of equal accuracy, each image exactly one of them gets
    right is equally likely to favour either: ``a_only`` ~ Binomial(a_only + b_only, 1/2).
    """

    a: str
    b: str
    n: int
    a_only: int  # images a gets right and b wrong
    b_only: int
    p_value: float
    method: str = "mcnemar-exact"


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray, *, a: str, b: str) -> PairedTest:
    """``correct_a``, ``correct_b``: (n,) bool over the same test rows, in the same order."""
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    discordant = a_only + b_only
    p_value = 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)
    return PairedTest(
        a=a, b=b, n=int(correct_a.size), a_only=a_only, b_only=b_only, p_value=p_value
    )


# --- results -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearResult:
    """The linear probe of one dataset. ``validation_*``: (n_Cs,) over the C grid."""

    C: float
    metrics: ClassificationMetrics
    top1_ci: tuple[float, float]
    predictions: np.ndarray  # (n_test,) int class indices
    validation_C: np.ndarray
    validation_accuracy: np.ndarray
    validation_n_iter: np.ndarray
    n_validation: int  # training rows held out to choose C
    n_iter: int
    converged: bool
    search_seconds: float
    refit_seconds: float

    @property
    def fit_seconds(self) -> float:
        return self.search_seconds + self.refit_seconds


@dataclass(frozen=True)
class Projection:
    """2-D PCA view of a sample of rows: ``points`` (m, 2) float32, ``labels`` (m,) int."""

    points: np.ndarray
    labels: np.ndarray
    explained_variance_ratio: tuple[float, float]


@dataclass(frozen=True)
class DatasetResult:
    """Everything measured on one embeddings dataset.

    ``knn`` maps each k to its metrics, or to ``None`` when k exceeds the training rows.
    """

    name: str
    provenance: dict[str, Any]
    rows_dropped: int
    linear: LinearResult
    knn: dict[int, ClassificationMetrics | None]
    knn_seconds: float
    projection: Projection

    def flat_metrics(self) -> dict[str, float | None]:
        """The headline numbers under their stable dotted names (``linear.top1``, ...)."""
        m = self.linear.metrics
        out: dict[str, float | None] = {
            "linear.top1": m.top1,
            "linear.top1_ci_low": self.linear.top1_ci[0],
            "linear.top1_ci_high": self.linear.top1_ci[1],
            "linear.top5": m.top5,
            "linear.mean_per_class": m.mean_per_class,
            "linear.macro_f1": m.macro_f1,
            "linear.C": self.linear.C,
            "linear.fit_seconds": self.linear.fit_seconds,
        }
        for k, knn in self.knn.items():
            out[f"knn.k{k}.top1"] = None if knn is None else knn.top1
            out[f"knn.k{k}.top5"] = None if knn is None else knn.top5
            out[f"knn.k{k}.mean_per_class"] = None if knn is None else knn.mean_per_class
            out[f"knn.k{k}.macro_f1"] = None if knn is None else knn.macro_f1
        out["knn.seconds"] = self.knn_seconds
        return out


@dataclass(frozen=True)
class SplitSummary:
    """How rows were divided. ``test_ids`` / ``test_labels``: (n_test,), in result order."""

    kind: SplitKind
    n_train: int  # rows the final linear model was fitted on (train + validation)
    n_validation: int  # of those, rows held out to choose C
    n_test: int
    classes: tuple[str, ...]
    test_ids: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class ProbeResults:
    """What :func:`run_probe` measured; :meth:`to_dict` is the ``results.json`` document."""

    config: ProbeConfig
    split: SplitSummary
    datasets: tuple[DatasetResult, ...]
    ranking: tuple[str, ...]  # dataset names, best linear top-1 first
    paired_test: PairedTest | None  # between the two best, when there are two
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document (schema :data:`RESULTS_SCHEMA`)."""
        from embedpipe import __version__

        split = self.split
        return {
            "schema": RESULTS_SCHEMA,
            "created_at": self.created_at,
            "environment": {
                "embedpipe": __version__,
                "python": platform.python_version(),
                "numpy": np.__version__,
                "scikit-learn": sklearn.__version__,
                "faiss": faiss.__version__,
            },
            "config": self.config.to_dict(),
            "split": {
                "kind": split.kind.value,
                "n_train": split.n_train,
                "n_validation": split.n_validation,
                "n_test": split.n_test,
                "classes": list(split.classes),
                "test_ids": [str(i) for i in split.test_ids],
                "test_labels": split.test_labels.tolist(),
            },
            "datasets": {d.name: _dataset_dict(d) for d in self.datasets},
            "ranking": list(self.ranking),
            "paired_test": None if self.paired_test is None else asdict(self.paired_test),
        }


def _metrics_detail(m: ClassificationMetrics) -> dict[str, Any]:
    return {
        "per_class_accuracy": list(m.per_class_accuracy),
        "confusion_matrix": m.confusion_matrix.tolist(),
    }


def _dataset_dict(d: DatasetResult) -> dict[str, Any]:
    lin = d.linear
    return {
        "provenance": d.provenance,
        "rows_dropped": d.rows_dropped,
        "metrics": d.flat_metrics(),
        "linear": {
            "C": lin.C,
            **_metrics_detail(lin.metrics),
            "test_predictions": lin.predictions.tolist(),
            "validation_curve": {
                "C": lin.validation_C.tolist(),
                "accuracy": lin.validation_accuracy.tolist(),
                "n_iter": lin.validation_n_iter.tolist(),
            },
            "n_iter": lin.n_iter,
            "converged": lin.converged,
            "search_seconds": lin.search_seconds,
            "refit_seconds": lin.refit_seconds,
        },
        "knn": {f"k{k}": None if m is None else _metrics_detail(m) for k, m in d.knn.items()},
        "projection": {
            "explained_variance_ratio": list(d.projection.explained_variance_ratio),
            "points": np.round(d.projection.points.astype(np.float64), 4).tolist(),
            "labels": d.projection.labels.tolist(),
        },
    }


# --- input checks and alignment ------------------------------------------------------


def _check_inputs(datasets: Sequence[ProbeInput], role: str) -> None:
    if not datasets:
        raise ProbeInputError(f"no {role} embeddings given")
    names = [d.name for d in datasets]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ProbeInputError(f"{role} embeddings need distinct names; repeated: {duplicated}")
    for d in datasets:
        shape = d.vectors.shape
        if len(shape) != 2 or shape[1] < 2 or not np.issubdtype(d.vectors.dtype, np.floating):
            raise ProbeInputError(
                f"{d.name!r}: vectors must be a float array of shape (rows, dims >= 2), "
                f"got {d.vectors.dtype} {d.vectors.shape}"
            )
        n = d.vectors.shape[0]
        if n == 0 or len(d.ids) != n or len(d.labels) != n:
            raise ProbeInputError(
                f"{d.name!r}: {n} vectors, {len(d.ids)} ids and {len(d.labels)} labels; "
                "a probe needs one id and one label per vector"
            )
        missing = pd.isna(d.labels) | (d.labels == "")
        if missing.any():
            examples = [str(i) for i in d.ids[missing][:_EXAMPLES]]
            raise MissingLabelsError(
                f"{d.name!r}: {int(missing.sum())} of {n} rows have no label (e.g. {examples}); "
                "a probe needs every row labelled. Labels come from the embeddings' label "
                "column: extract from a labelled folder or a manifest with a label column, "
                "or leave those images out"
            )
        index = pd.Index(d.ids)
        if not index.is_unique:
            repeated = index[index.duplicated()].unique()[:_EXAMPLES].tolist()
            raise ProbeInputError(f"{d.name!r}: ids are not unique, e.g. {repeated}")
        if not np.isfinite(d.vectors).all():
            raise ProbeInputError(f"{d.name!r}: vectors contain NaN or infinite values")


@dataclass(frozen=True)
class _Aligned:
    ids: np.ndarray  # (n,) object
    labels: np.ndarray  # (n,) object
    vectors: tuple[np.ndarray, ...]  # one (n, D_i) per dataset, rows in ids order
    dropped: tuple[int, ...]  # rows each dataset lost to the alignment


def _align(datasets: Sequence[ProbeInput], how: IdAlignment, role: str) -> _Aligned:
    """Rows of every dataset reordered to one id order, the first dataset's."""
    indexes = [pd.Index(d.ids) for d in datasets]
    common = indexes[0]
    for index in indexes[1:]:
        common = common.intersection(index, sort=False)
    if how is IdAlignment.STRICT:
        first = datasets[0]
        for d, index in zip(datasets[1:], indexes[1:]):
            only_first, only_d = indexes[0].difference(index), index.difference(indexes[0])
            if len(only_first) or len(only_d):
                raise IdAlignmentError(
                    f"{role} embeddings {first.name!r} and {d.name!r} cover different images: "
                    f"{len(only_first)} ids only in {first.name!r} "
                    f"(e.g. {only_first[:_EXAMPLES].tolist()}), {len(only_d)} only in "
                    f"{d.name!r} (e.g. {only_d[:_EXAMPLES].tolist()}). "
                    "Backbones are compared on the same images; extract the missing ones, or "
                    f"align explicitly (align='intersect', CLI --align intersect) to probe the "
                    f"{len(common)} ids all {role} embeddings share"
                )
    if len(common) == 0:
        raise IdAlignmentError(f"the {role} embeddings {[d.name for d in datasets]} share no ids")
    rows = [index.get_indexer(common) for index in indexes]
    labels = datasets[0].labels[rows[0]]
    for d, r in zip(datasets[1:], rows[1:]):
        other = d.labels[r]
        differ = np.flatnonzero(labels != other)
        if differ.size:
            examples = [(str(common[i]), labels[i], other[i]) for i in differ[:_EXAMPLES]]
            raise IdAlignmentError(
                f"{datasets[0].name!r} and {d.name!r} label {differ.size} images differently "
                f"(id, label, label): {examples}; were they extracted from the same source?"
            )
    dropped = tuple(len(index) - len(common) for index in indexes)
    if any(dropped):
        logger.warning(
            "aligned %s embeddings on the %d ids all share; dropped %s",
            role,
            len(common),
            ", ".join(f"{n} from {d.name!r}" for d, n in zip(datasets, dropped)),
        )
    # already in order (the usual case) -> no copy of the vectors
    vectors = tuple(
        d.vectors if np.array_equal(r, np.arange(len(d.ids))) else d.vectors[r]
        for d, r in zip(datasets, rows)
    )
    return _Aligned(np.asarray(common, dtype=object), labels, vectors, dropped)


def _label_key(label: Any) -> tuple[int, Any]:
    # numbers in numeric order, then everything else by its text
    return (0, label) if isinstance(label, Real) else (1, str(label))


def _pair_tests(datasets: Sequence[ProbeInput], tests: Sequence[ProbeInput]) -> list[ProbeInput]:
    """The test dataset made like each training dataset (same provenance), in that order."""
    if len(tests) != len(datasets):
        raise ProbeInputError(
            f"{len(datasets)} training but {len(tests)} test embeddings; give one test dataset "
            "per backbone, extracted the same way"
        )
    by_key: dict[str, ProbeInput] = {}
    for t in tests:
        key = _provenance_key(t.provenance)
        if key in by_key:
            raise ProbeInputError(
                f"test embeddings {by_key[key].name!r} and {t.name!r} have the same provenance"
            )
        by_key[key] = t
    paired = []
    for d in datasets:
        match = by_key.get(_provenance_key(d.provenance))
        if match is None:
            raise ProbeInputError(
                f"no test embeddings were made like {d.name!r} ({_describe(d.provenance)}); "
                f"test embeddings: {[(t.name, _describe(t.provenance)) for t in tests]}. Extract "
                "the test images with the same backbone, weights, layer and preprocessing"
            )
        paired.append(match)
    return paired


def _provenance_key(provenance: Mapping[str, Any]) -> str:
    return json.dumps(provenance, sort_keys=True, default=str)


def _describe(provenance: Mapping[str, Any]) -> str:
    weights = provenance.get("weights") or {}
    return f"{provenance.get('backbone')}/{provenance.get('layer')}, weights {weights.get('name')}"


def _check_class_counts(y: np.ndarray, classes: Sequence[str], minimum: int, why: str) -> None:
    counts = np.bincount(y, minlength=len(classes))
    few = np.flatnonzero(counts < minimum)
    if few.size:
        examples = [(classes[i], int(counts[i])) for i in few[:_EXAMPLES]]
        raise SplitError(
            f"every class needs at least {minimum} labelled rows ({why}); {few.size} have fewer "
            f"(class, rows): {examples}. Label more images of those classes or leave them out"
        )


# --- the entry point -----------------------------------------------------------------


def run_probe(
    datasets: Sequence[ProbeInput],
    config: ProbeConfig,
    *,
    test: Sequence[ProbeInput] | None = None,
) -> ProbeResults:
    """Probe each embeddings dataset with a linear and a k-NN classifier, and compare them.

    ``datasets`` are embeddings of the same labelled images by different backbones (or
    layers, or weights). Without ``test``, one seeded stratified split (``test_size``)
    holds out test rows, identical for every dataset; with ``test``, each dataset is
    scored on the test dataset of the same provenance and trained on all its rows.
    Raises :class:`MissingLabelsError`, :class:`IdAlignmentError`, :class:`SplitError` or
    :class:`ProbeInputError` before any fitting when the inputs cannot give a fair
    comparison.
    """
    _check_inputs(datasets, "training")
    aligned = _align(datasets, config.align, "training")
    classes_raw = sorted(set(aligned.labels), key=_label_key)
    class_index = {c: i for i, c in enumerate(classes_raw)}
    classes = tuple(str(c) for c in classes_raw)
    y = np.array([class_index[v] for v in aligned.labels], dtype=np.int64)
    if len(classes) < 2:
        raise ProbeInputError(
            f"a probe needs at least two classes, the labels hold only {list(classes)}"
        )

    if test is None:
        kind = SplitKind.STRATIFIED
        _check_class_counts(y, classes, 3, "one each for training, validation and test")
        fit_rows, test_rows = stratified_split(y, fraction=config.test_size, seed=config.seed)
        _check_class_counts(
            y[fit_rows], classes, 2, f"after holding out {config.test_size:g} for testing"
        )
        X_fit = [v[fit_rows] for v in aligned.vectors]
        X_test = [v[test_rows] for v in aligned.vectors]
        y_fit, y_test, test_ids = y[fit_rows], y[test_rows], aligned.ids[test_rows]
    else:
        kind = SplitKind.GIVEN
        tests = _pair_tests(datasets, test)
        _check_inputs(tests, "test")
        aligned_test = _align(tests, config.align, "test")
        overlap = pd.Index(aligned.ids).intersection(pd.Index(aligned_test.ids))
        if len(overlap):
            raise ProbeInputError(
                f"{len(overlap)} ids are in both the training and the test embeddings "
                f"(e.g. {overlap[:_EXAMPLES].tolist()}); test images must be unseen in training"
            )
        unseen = sorted({v for v in aligned_test.labels if v not in class_index}, key=_label_key)
        if unseen:
            raise ProbeInputError(
                f"test labels {unseen[:_EXAMPLES]} never occur in training; "
                "a probe cannot predict them"
            )
        _check_class_counts(y, classes, 2, "one each for training and validation")
        X_fit, X_test = list(aligned.vectors), list(aligned_test.vectors)
        y_fit = y
        y_test = np.array([class_index[v] for v in aligned_test.labels], dtype=np.int64)
        test_ids = aligned_test.ids

    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.permutation(len(y))[: config.projection_samples])
    # Datasets are independent: probe several at once, each on its share of the cores.
    # With one dataset, the estimator's own C paths get the parallelism instead.
    n_workers = min(effective_n_jobs(config.n_jobs), len(datasets))
    probe_one = delayed(_probe_dataset)
    results = _run_threads(
        (
            probe_one(
                d,
                aligned.dropped[i],
                (X_fit[i], y_fit),
                (X_test[i], y_test),
                (aligned.vectors[i][sample], y[sample]),
                len(classes),
                config,
                n_jobs=config.n_jobs if n_workers == 1 else 1,
            )
            for i, d in enumerate(datasets)
        ),
        n_workers,
    )

    # best linear top-1 first; ties by mean per-class accuracy, then input order
    ranked = sorted(
        results, key=lambda r: (-r.linear.metrics.top1, -r.linear.metrics.mean_per_class)
    )
    paired = None
    if len(ranked) >= 2:
        a, b = ranked[0], ranked[1]
        paired = mcnemar_exact(
            a.linear.predictions == y_test, b.linear.predictions == y_test, a=a.name, b=b.name
        )
    split = SplitSummary(
        kind=kind,
        n_train=len(y_fit),
        n_validation=results[0].linear.n_validation,
        n_test=len(y_test),
        classes=classes,
        test_ids=test_ids,
        test_labels=y_test,
    )
    return ProbeResults(
        config=config,
        split=split,
        datasets=tuple(results),
        ranking=tuple(r.name for r in ranked),
        paired_test=paired,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _probe_dataset(
    d: ProbeInput,
    rows_dropped: int,
    fit: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    sample: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    config: ProbeConfig,
    *,
    n_jobs: int | None,
) -> DatasetResult:
    """Both probes and the projection of one dataset; ``fit``, ``test``, ``sample`` are
    (X (n, D) float, y (n,) int class indices) pairs."""
    logger.info(
        "probing %r: %d training and %d test rows, %d dims",
        d.name,
        fit[1].size,
        test[1].size,
        fit[0].shape[1],
    )
    linear, probe = _linear(*fit, *test, config, n_jobs=n_jobs)
    knn, knn_seconds = _knn(*fit, *test, n_classes, config)
    projection = _projection(probe, *sample, config.seed)
    logger.info(
        "%r: linear top-1 %.4f (C=%.3g, %.1fs), k-NN top-1 %s",
        d.name,
        linear.metrics.top1,
        linear.C,
        linear.fit_seconds,
        ", ".join(f"k={k} {m.top1:.4f}" for k, m in knn.items() if m is not None),
    )
    return DatasetResult(d.name, d.provenance, rows_dropped, linear, knn, knn_seconds, projection)


def _linear(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    config: ProbeConfig,
    *,
    n_jobs: int | None,
) -> tuple[LinearResult, LinearProbeCV]:
    preprocessing = linear_preprocessing(
        standardize=config.standardize, l2_normalize=config.l2_normalize
    )
    probe = LinearProbeCV(
        Cs=config.Cs,
        validation_fraction=config.validation_size,
        transformer=preprocessing,
        n_chains=config.n_chains,
        max_iter=config.max_iter,
        tol=config.tol,
        random_state=config.seed,
        n_jobs=n_jobs,
    ).fit(X_fit, y_fit)
    scores = probe.predict_proba(X_test)
    metrics = classification_metrics(y_test, scores)
    predictions = probe.classes_[np.argmax(scores, axis=1)]
    ci = bootstrap_accuracy_ci(
        predictions == y_test,
        n_resamples=config.n_bootstrap,
        confidence=config.confidence,
        seed=config.seed,
    )
    result = LinearResult(
        C=probe.C_,
        metrics=metrics,
        top1_ci=ci,
        predictions=predictions,
        validation_C=probe.cv_results_["C"],
        validation_accuracy=probe.cv_results_["val_accuracy"],
        validation_n_iter=probe.cv_results_["n_iter"],
        n_validation=int(probe.validation_indices_.size),
        n_iter=probe.n_iter_,
        converged=probe.converged_,
        search_seconds=probe.search_seconds_,
        refit_seconds=probe.refit_seconds_,
    )
    return result, probe


def _knn(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    config: ProbeConfig,
) -> tuple[dict[int, ClassificationMetrics | None], float]:
    start = time.perf_counter()
    usable = [k for k in config.knn_ks if k <= len(y_fit)]
    if len(usable) < len(config.knn_ks):
        logger.warning(
            "k-NN with k=%s skipped: only %d training rows",
            [k for k in config.knn_ks if k not in usable],
            len(y_fit),
        )
    out: dict[int, ClassificationMetrics | None] = dict.fromkeys(config.knn_ks)
    if usable:
        knn = CosineKNNClassifier(temperature=config.knn_temperature).fit(X_fit, y_fit)
        # one search for the largest k; smaller k vote with its leading neighbours
        similarities, indices = knn.kneighbors(X_test, max(usable))
        neighbor_labels = knn.classes_[knn.train_labels_[indices]]
        for k in usable:
            scores = knn_vote_scores(
                similarities[:, :k],
                neighbor_labels[:, :k],
                n_classes=n_classes,
                temperature=config.knn_temperature,
            )
            out[k] = classification_metrics(y_test, scores)
    return out, time.perf_counter() - start


def _projection(probe: LinearProbeCV, X: np.ndarray, labels: np.ndarray, seed: int) -> Projection:
    """PCA of rows as the linear probe sees them (after its preprocessing)."""
    seen = probe.best_estimator_[:-1].transform(np.asarray(X, dtype=np.float64))
    pca = PCA(n_components=2, random_state=seed)
    points = pca.fit_transform(seen).astype(np.float32)
    ratio = pca.explained_variance_ratio_
    return Projection(points, labels.astype(np.int64), (float(ratio[0]), float(ratio[1])))
