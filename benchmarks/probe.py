"""Time the linear probe end to end (C search + refit) next to a plain LogisticRegressionCV.

    python benchmarks/probe.py                # the issue's scale: 50,000 x 2048, 100 classes
    python benchmarks/probe.py --scale 0.05   # 2,500 rows, same width and classes: a smoke run

The features are synthetic but shaped like a CNN's global-average-pooled activations:
non-negative (ReLU), correlated (a 128-d latent class structure mixed into 2048 dims),
with classes that overlap enough for the choice of C to matter. Both contenders get the
same training rows, search the same 45 values of C (Kornblith et al.) with the same
``tol`` and ``max_iter``, and are scored on the same test rows:

* ``LinearProbeCV``: embedpipe's probe, C chosen on a stratified validation split, cold
  refit on train + validation; once along one warm-started C path (``x1``, the default,
  BLAS threads as configured) and once along two paths run side by side in threads with
  one BLAS thread each (``x2``);
* ``LogisticRegressionCV``: scikit-learn's, standardised in a Pipeline, on the probe's own
  validation split (``PredefinedSplit``) and with plain 5-fold stratified cross-validation
  (``--lrcv-folds 0 5``, the default).

Prints one line per run: wall seconds, L-BFGS iterations, the selected C, validation and
test top-1. Timings on a machine other work is loading say little: compare runs made
together, and note the load average printed first.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import time
import warnings

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import PredefinedSplit, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info, threadpool_limits

from embedpipe.probe import KORNBLITH_CS, LinearProbeCV, stratified_split

ROWS = 50_000


def synthetic_features(
    n: int, dim: int, n_classes: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 non-negative features and (n,) int labels, balanced classes."""
    rng = np.random.default_rng(seed)
    latent = 128
    centers = rng.normal(size=(n_classes, latent))
    mixing = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    y = rng.permutation(np.arange(n) % n_classes)
    X = np.empty((n, dim), np.float32)
    for start in range(0, n, 8192):  # in blocks: the float64 temporaries stay small
        rows = slice(start, min(n, start + 8192))
        z = centers[y[rows]] + 3.0 * rng.normal(size=(rows.stop - start, latent))
        X[rows] = np.maximum(z @ mixing + 0.5 * rng.normal(size=(rows.stop - start, dim)), 0.0)
    return X, y


def lrcv_kwargs(**kwargs: object) -> dict[str, object]:
    """Pin the options newer scikit-learn warns about, where this version has them."""
    params = inspect.signature(LogisticRegressionCV).parameters
    pinned = {"l1_ratios": (0.0,), "use_legacy_attributes": False}
    return {**kwargs, **{k: v for k, v in pinned.items() if k in params}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help=f"rows = scale x {ROWS:,}")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--test-size", type=float, default=0.2)
    parser.add_argument("--validation-size", type=float, default=0.2)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument(
        "--n-chains",
        type=int,
        nargs="+",
        default=[1, 2],
        help="LinearProbeCV runs, one per number of warm-started C paths (x1, x2 in the output)",
    )
    parser.add_argument("--n-jobs", type=int, default=-1, help="paths (and folds) run at once")
    parser.add_argument(
        "--lrcv-folds",
        type=int,
        nargs="*",
        default=[0, 5],
        help="LogisticRegressionCV runs: 0 is the probe's validation split, k >= 2 is k "
        "stratified folds (5: a plain LogisticRegressionCV); none: skip",
    )
    parser.add_argument(
        "--blas-threads", type=int, default=None, help="cap BLAS/OpenMP threads (default: as is)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    n = round(ROWS * args.scale)
    X, y = synthetic_features(n, args.dim, args.classes, seed=args.seed)
    fit_rows, test_rows = stratified_split(y, fraction=args.test_size, seed=args.seed)
    X_fit, y_fit, X_test, y_test = X[fit_rows], y[fit_rows], X[test_rows], y[test_rows]
    del X
    blas = {i["internal_api"]: i["num_threads"] for i in threadpool_info()}
    print(
        f"{n:,} x {args.dim} features, {args.classes} classes: {len(y_fit):,} train+validation, "
        f"{len(y_test):,} test; {len(KORNBLITH_CS)} values of C, tol {args.tol:g}, "
        f"max_iter {args.max_iter}"
    )
    print(
        f"python {platform.python_version()}, scikit-learn {sklearn.__version__}, "
        f"{os.cpu_count()} cores, threads {blas}, blas cap {args.blas_threads}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )

    with threadpool_limits(limits=args.blas_threads):
        for n_chains in args.n_chains:
            run_probe(X_fit, y_fit, X_test, y_test, n_chains, args)
        for folds in args.lrcv_folds:
            run_lrcv(X_fit, y_fit, X_test, y_test, folds, args)


def run_probe(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    n_chains: int,
    args: argparse.Namespace,
) -> None:
    """Fit and score LinearProbeCV with ``n_chains`` warm-started paths; print one line."""
    start = time.perf_counter()
    probe = LinearProbeCV(
        transformer=StandardScaler(),
        validation_fraction=args.validation_size,
        max_iter=args.max_iter,
        tol=args.tol,
        random_state=args.seed,
        n_chains=n_chains,
        n_jobs=args.n_jobs,
    ).fit(X_fit, y_fit)
    seconds = time.perf_counter() - start
    print(
        f"LinearProbeCV x{n_chains}      {seconds:8.1f} s  (search {probe.search_seconds_:.1f} s, "
        f"refit {probe.refit_seconds_:.1f} s; {int(probe.cv_results_['n_iter'].sum())} + "
        f"{probe.n_iter_} L-BFGS iterations)  C={probe.C_:.3g}  validation top-1 "
        f"{probe.cv_results_['val_accuracy'][probe.best_index_]:.4f}  test top-1 "
        f"{probe.score(X_test, y_test):.4f}"
    )


def run_lrcv(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    folds: int,
    args: argparse.Namespace,
) -> None:
    """Fit and score LogisticRegressionCV on the same rows and C grid; print one line."""
    if folds >= 2:
        cv, how = StratifiedKFold(folds, shuffle=True, random_state=args.seed), f"{folds} folds"
    else:
        # the probe's own validation split: same rows, same question
        _, val = stratified_split(y_fit, fraction=args.validation_size, seed=args.seed)
        fold = np.full(len(y_fit), -1)
        fold[val] = 0
        cv, how = PredefinedSplit(fold), "probe's split"
    lrcv = LogisticRegressionCV(
        **lrcv_kwargs(
            Cs=list(KORNBLITH_CS),
            cv=cv,
            scoring="accuracy",
            tol=args.tol,
            max_iter=args.max_iter,
            n_jobs=args.n_jobs,
        )
    )
    model = make_pipeline(StandardScaler(), lrcv)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(X_fit, y_fit)
    seconds = time.perf_counter() - start
    # legacy attributes keep one copy per class in a dict
    scores, n_iter = lrcv.scores_, lrcv.n_iter_
    if isinstance(scores, dict):
        scores = next(iter(scores.values()))
    curve = np.reshape(scores, (-1, len(KORNBLITH_CS))).mean(axis=0)
    print(
        f"LogisticRegressionCV  {seconds:8.1f} s  ({how}; {int(np.sum(n_iter))} L-BFGS iterations "
        f"in the search)  C={float(np.ravel(lrcv.C_)[0]):.3g}  validation top-1 "
        f"{curve.max():.4f}  test top-1 {model.score(X_test, y_test):.4f}"
    )


if __name__ == "__main__":
    main()
