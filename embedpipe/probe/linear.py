"""The linear probe: L2-regularised logistic regression with C chosen on a held-out split
(Kornblith, Shlens & Le 2019), warm-started along the regularisation path.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from joblib import Parallel, cpu_count, delayed, effective_n_jobs
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import LabelEncoder, Normalizer, StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y
from threadpoolctl import threadpool_limits

from ..errors import (
    ProbeConfigError,
    ProbeInputError,
    SplitError,
)
from .inputs import EXAMPLES, KORNBLITH_CS, check_cs

logger = logging.getLogger(__name__)


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
        lonely = values[counts < 2][:EXAMPLES].tolist()
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


def split_by_id(
    ids: np.ndarray, y: np.ndarray, *, fraction: float, seed: int | None, held_out: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`stratified_split` drawn over the rows sorted by id, as row positions.

    ``ids``: (n,) unique str; ``y``: (n,) int class indices, classes numbered in sorted
    label order. Returns two sorted int64 arrays of positions in the given order. Rows as
    stored move (an incremental extraction rewrites Parquet parts at the end; a manifest
    lists images in its own order): drawing over ids makes the same (id, label) pairs and
    seed hold out the same ids in any order, and the probe and fine-tuning, which both
    split here, hold out the same images.
    """
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    kept, held = stratified_split(
        np.asarray(y)[order], fraction=fraction, seed=seed, held_out=held_out
    )
    return np.sort(order[kept]), np.sort(order[held])


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
        check_cs(Cs.tolist())
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
        paths = run_threads(jobs, n_workers)
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


def run_threads(jobs: Iterable[Any], n_workers: int) -> list[Any]:
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
