"""The entry point: :func:`run_probe` over aligned datasets, one split for every backbone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from joblib import delayed, effective_n_jobs

from ..errors import (
    ProbeInputError,
)
from .align import align_datasets, check_class_counts, check_inputs, label_key, pair_tests
from .inputs import EXAMPLES, ProbeConfig, ProbeInput, SplitKind
from .knn import CosineKNNClassifier, knn_vote_scores
from .linear import LinearProbeCV, linear_preprocessing, run_threads, split_by_id
from .results import DatasetResult, LinearResult, ProbeResults, Sample, SplitSummary
from .stats import (
    ClassificationMetrics,
    accuracy_ci,
    classification_metrics,
    mcnemar_exact,
)

logger = logging.getLogger(__name__)


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
    holds out test rows, identical for every dataset and drawn over sorted ids (as
    fine-tuning draws its test split); with ``test``, each dataset is scored on the test
    dataset of the same provenance and trained on all its rows. Rows are taken in id
    order, so the results do not depend on the order the datasets store them in.
    Raises :class:`MissingLabelsError`, :class:`IdAlignmentError`, :class:`SplitError` or
    :class:`ProbeInputError` before any fitting when the inputs cannot give a fair
    comparison.
    """
    check_inputs(datasets, "training")
    aligned = align_datasets(datasets, config.align, "training")
    classes_raw = sorted(set(aligned.labels), key=label_key)
    class_index = {c: i for i, c in enumerate(classes_raw)}
    classes = tuple(str(c) for c in classes_raw)
    y = np.array([class_index[v] for v in aligned.labels], dtype=np.int64)
    if len(classes) < 2:
        raise ProbeInputError(
            f"a probe needs at least two classes, the labels hold only {list(classes)}"
        )

    if test is None:
        kind = SplitKind.STRATIFIED
        check_class_counts(y, classes, 3, "one each for training, validation and test")
        fit_rows, test_rows = split_by_id(
            aligned.ids, y, fraction=config.test_size, seed=config.seed
        )
        check_class_counts(
            y[fit_rows], classes, 2, f"after holding out {config.test_size:g} for testing"
        )
        X_fit = [v[fit_rows] for v in aligned.vectors]
        X_test = [v[test_rows] for v in aligned.vectors]
        y_fit, y_test, test_ids = y[fit_rows], y[test_rows], aligned.ids[test_rows]
    else:
        kind = SplitKind.GIVEN
        tests = pair_tests(datasets, test)
        check_inputs(tests, "test")
        aligned_test = align_datasets(tests, config.align, "test")
        overlap = pd.Index(aligned.ids).intersection(pd.Index(aligned_test.ids))
        if len(overlap):
            raise ProbeInputError(
                f"{len(overlap)} ids are in both the training and the test embeddings "
                f"(e.g. {overlap[:EXAMPLES].tolist()}); test images must be unseen in training"
            )
        unseen = sorted({v for v in aligned_test.labels if v not in class_index}, key=label_key)
        if unseen:
            raise ProbeInputError(
                f"test labels {unseen[:EXAMPLES]} never occur in training; "
                "a probe cannot predict them"
            )
        check_class_counts(y, classes, 2, "one each for training and validation")
        X_fit, X_test = list(aligned.vectors), list(aligned_test.vectors)
        y_fit = y
        y_test = np.array([class_index[v] for v in aligned_test.labels], dtype=np.int64)
        test_ids = aligned_test.ids

    if test is None:
        sample = _sample(aligned.ids, y, [(v,) for v in aligned.vectors], config)
    else:
        sample = _sample(
            np.concatenate([aligned.ids, aligned_test.ids]),
            np.concatenate([y, y_test]),
            list(zip(aligned.vectors, aligned_test.vectors)),
            config,
        )
    # Datasets are independent: probe several at once, each on its share of the cores.
    # With one dataset, the estimator's own C paths get the parallelism instead.
    n_workers = min(effective_n_jobs(config.n_jobs), len(datasets))
    probe_one = delayed(_probe_dataset)
    results = run_threads(
        (
            probe_one(
                d,
                aligned.dropped[i],
                (X_fit[i], y_fit),
                (X_test[i], y_test),
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
    correct = {r.name: r.linear.predictions == y_test for r in results}
    paired = None
    if len(ranked) >= 2:
        a, b = ranked[0], ranked[1]
        paired = mcnemar_exact(correct[a.name], correct[b.name], a=a.name, b=b.name)
    twins = tuple(
        mcnemar_exact(correct[a], correct[b], a=a, b=b) for a, b in pretrained_pairs(results)
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
        pretrained_vs_random=twins,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        sample=sample,
    )


def _sample(
    ids: np.ndarray, y: np.ndarray, parts: Sequence[tuple[np.ndarray, ...]], config: ProbeConfig
) -> Sample:
    """A seeded uniform sample of at most ``config.projection_samples`` of the rows ``ids``
    (n,) names, for the views compared across datasets (the report's map and CKA). Each
    ``parts[i]`` holds dataset i's vectors of those rows, split in consecutive blocks
    (training rows, then given test rows): gathered block by block, never concatenated."""
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.permutation(len(ids))[: config.projection_samples])

    def gather(blocks: tuple[np.ndarray, ...]) -> np.ndarray:
        out, start = [], 0
        for block in blocks:
            mine = rows[(rows >= start) & (rows < start + len(block))]
            out.append(block[mine - start])
            start += len(block)
        return np.concatenate(out)

    return Sample(ids[rows], y[rows], tuple(gather(p) for p in parts), len(ids))


def _probe_dataset(
    d: ProbeInput,
    rows_dropped: int,
    fit: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    config: ProbeConfig,
    *,
    n_jobs: int | None,
) -> DatasetResult:
    """Both probes of one dataset; ``fit`` and ``test`` are (X (n, D) float, y (n,) int
    class indices) pairs."""
    logger.info(
        "probing %r: %d training and %d test rows, %d dims",
        d.name,
        fit[1].size,
        test[1].size,
        fit[0].shape[1],
    )
    linear = _linear(*fit, *test, config, n_jobs=n_jobs)
    knn, knn_seconds = _knn(*fit, *test, n_classes, config)
    leaked = leaked_test_rows(fit[0], test[0], config.duplicate_similarity)
    clean = ~leaked
    top1_leak_free = float((linear.predictions[clean] == test[1][clean]).mean()) if clean.any() else None
    logger.info(
        "%r: linear top-1 %.4f (C=%.3g, %.1fs), k-NN top-1 %s",
        d.name,
        linear.metrics.top1,
        linear.C,
        linear.fit_seconds,
        ", ".join(f"k={k} {m.top1:.4f}" for k, m in knn.items() if m is not None),
    )
    return DatasetResult(d.name, d.provenance, rows_dropped, linear, knn, knn_seconds, leaked,
                         top1_leak_free)


def leaked_test_rows(X_fit: np.ndarray, X_test: np.ndarray, threshold: float) -> np.ndarray:
    """(n_test,) bool: test rows whose nearest training row is a near duplicate (cosine >=
    ``threshold``, by default :data:`~embedpipe.config.DUPLICATE_SIMILARITY`): the same
    picture resized or recompressed on both sides of the split, which inflates accuracy."""
    knn = CosineKNNClassifier().fit(X_fit, np.zeros(len(X_fit), dtype=np.int64))
    similarities, _ = knn.kneighbors(X_test, 1)
    return similarities[:, 0] >= threshold


def pretrained_pairs(results: Sequence[DatasetResult]) -> list[tuple[str, str]]:
    """(pretrained, random-init) name pairs of the same backbone and layer: the comparisons
    that say whether pretraining transfers, each worth its own paired test."""
    def key(r: DatasetResult) -> tuple:
        return (r.provenance.get("backbone"), r.provenance.get("layer"))

    def pretrained(r: DatasetResult) -> bool | None:
        weights = r.provenance.get("weights")
        return weights.get("pretrained") if isinstance(weights, Mapping) else None

    return [
        (a.name, b.name)
        for a in results if pretrained(a) is True
        for b in results if pretrained(b) is False and key(a) == key(b) and key(a)[0] is not None
    ]


def _linear(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    config: ProbeConfig,
    *,
    n_jobs: int | None,
) -> LinearResult:
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
    ci = accuracy_ci(predictions == y_test, confidence=config.confidence)
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
    return result


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

