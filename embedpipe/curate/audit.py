"""Likely label errors and outliers, from embeddings.

**Label errors** are found by confident learning on out-of-fold predicted
probabilities: a logistic regression on standardised embeddings predicts each row from
a model that never saw it (5-fold ``cross_val_predict``), and
``cleanlab.filter.find_label_issues`` flags the rows whose given label disagrees with
what the per-class confident thresholds expect, ranked by self-confidence (the
probability the model gives the given label; lowest first). cleanlab is used rather
than re-derived here because it is the well-kept reference implementation of confident
learning (Northcutt et al., 2021): its thresholds, pruning and ranking are tested and
maintained upstream, and a re-derivation would be one more place for them to go wrong.
It is an optional extra: ``pip install "embedpipe[curate]"``.

A second, model-free signal sits beside it: the **k-NN label disagreement**, the fraction
of a row's k nearest neighbours (cosine) that carry another label.

**Outliers** are ranked by ``1 - cosine similarity`` to the k-th nearest neighbour: a row
far from even its k-th neighbour sits in no cluster at all.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ..errors import CurationInputError, MissingDependencyError
from ..neighbours import knn_graph, l2_normalize

DEFAULT_K = 10
DEFAULT_FOLDS = 5

LABEL_ISSUE_COLUMNS = ("id", "given_label", "suggested_label", "score", "rank", "knn_disagreement")
OUTLIER_COLUMNS = ("id", "label", "distance", "rank")


def require_cleanlab():
    """The cleanlab module, or :class:`MissingDependencyError` saying how to install it."""
    try:
        import cleanlab.filter
    except ImportError as e:
        raise MissingDependencyError(
            f"finding label errors needs cleanlab ({e}): pip install \"embedpipe[curate]\""
        ) from None
    return cleanlab


def out_of_fold_probabilities(vectors: np.ndarray, labels: np.ndarray, *, folds: int = DEFAULT_FOLDS,
                              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(pred_probs (N, C) float64, classes (C,))``: each row's class probabilities from a
    standardised logistic regression fitted on the other folds (stratified, shuffled with
    ``seed``); ``labels``: (N,) hashable, every class with at least ``folds`` rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes, y = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    if len(classes) < 2:
        raise CurationInputError(
            f"label audit needs at least 2 classes, got {list(classes)}: label the images "
            "(ImageFolder layout or a manifest's label column)")
    counts = np.bincount(y)
    small = [f"{c!r} ({n})" for c, n in zip(classes, counts) if n < folds]
    if small:
        raise CurationInputError(
            f"{folds}-fold out-of-fold probabilities need {folds} rows per class; too few: "
            f"{', '.join(small)}. Drop those classes or pass fewer folds.")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(model, np.asarray(vectors, np.float64), y, cv=cv, method="predict_proba")
    return probs, classes


def label_issues(ids: np.ndarray, labels: np.ndarray, pred_probs: np.ndarray, classes: np.ndarray,
                 knn_disagreement: np.ndarray | None = None) -> pd.DataFrame:
    """The rows cleanlab flags, most likely error first: columns
    :data:`LABEL_ISSUE_COLUMNS` (``score`` = 1 - self-confidence, float64 in [0, 1];
    ``rank`` 1-based; ``knn_disagreement`` float64, NaN when not given).
    ``pred_probs``: (N, C) out-of-fold probabilities over ``classes`` (C,)."""
    cleanlab = require_cleanlab()
    ids = np.asarray(ids, dtype=object)
    index = {c: i for i, c in enumerate(classes)}
    try:
        y = np.array([index[str(v)] for v in labels], np.int64)
    except KeyError as e:
        raise CurationInputError(f"label {e.args[0]!r} is not one of the classes {list(classes)}") from None
    found = cleanlab.filter.find_label_issues(
        y, pred_probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    found = np.asarray(found, np.int64)
    knn = np.full(len(ids), np.nan) if knn_disagreement is None else np.asarray(knn_disagreement, float)
    return pd.DataFrame({
        "id": ids[found].astype(str),
        "given_label": classes[y[found]].astype(str),
        "suggested_label": classes[pred_probs[found].argmax(axis=1)].astype(str),
        "score": 1.0 - pred_probs[found, y[found]],
        "rank": np.arange(1, len(found) + 1, dtype=np.int64),
        "knn_disagreement": knn[found],
    })


def neighbour_disagreement(neighbours: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) float64: the fraction of each row's neighbours (``neighbours``: (N, k) int64
    row numbers) whose label differs from the row's."""
    labels = np.asarray(labels).astype(str)
    return (labels[neighbours] != labels[:, None]).mean(axis=1)


def outliers(ids: np.ndarray, similarities: np.ndarray, labels: np.ndarray | None = None) -> pd.DataFrame:
    """Every row ranked by ``distance`` = 1 - cosine similarity to its k-th nearest
    neighbour (``similarities``: (N, k) float32 from :func:`~embedpipe.neighbours.knn_graph`), farthest first:
    columns :data:`OUTLIER_COLUMNS`."""
    ids = np.asarray(ids, dtype=object)
    distance = 1.0 - np.asarray(similarities, np.float64)[:, -1]
    order = np.lexsort((ids.astype(str), -distance))
    return pd.DataFrame({
        "id": ids[order].astype(str),
        "label": (np.asarray(labels, dtype=object)[order] if labels is not None
                  else np.full(len(ids), None, dtype=object)),
        "distance": distance[order],
        "rank": np.arange(1, len(ids) + 1, dtype=np.int64),
    })


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """``label_issues`` and ``outliers`` tables (see :func:`label_issues`,
    :func:`outliers`); ``pred_probs``: (M, C) float64 out-of-fold probabilities of the M
    labelled rows over ``classes``, or None when there were no labels to audit."""

    label_issues: pd.DataFrame
    outliers: pd.DataFrame
    pred_probs: np.ndarray | None
    classes: np.ndarray | None
    k: int
    folds: int
    note: str = ""
    neighbours: str = "exact"

    def summary(self) -> dict:
        return {"rows": len(self.outliers), "label_issues": len(self.label_issues),
                "k": self.k, "folds": self.folds, "neighbours": self.neighbours,
                "note": self.note}


def audit(ids: np.ndarray, vectors: np.ndarray, labels: np.ndarray | None, *, k: int = DEFAULT_K,
          folds: int = DEFAULT_FOLDS, seed: int = 0) -> AuditResult:
    """Likely label errors (labelled rows only; None labels are skipped) and outliers.

    ``ids``: (N,) str; ``vectors``: (N, D) float; ``labels``: (N,) str or None per row.
    """
    ids = np.asarray(ids, dtype=object)
    x = l2_normalize(vectors)
    if len(ids) != len(x):
        raise CurationInputError(f"{len(ids)} ids for {len(x)} vectors: pass one id per row")
    if len(x) < 2:
        raise CurationInputError(f"audit needs at least 2 rows, got {len(x)}")
    k = min(int(k), len(x) - 1)
    graph = knn_graph(x, k, normalized=True)
    neighbours, sims, found_by = graph.neighbours, graph.similarities, graph.describe()
    labels_arr = None if labels is None else np.asarray(labels, dtype=object)
    out = outliers(ids, sims, labels_arr)
    empty = pd.DataFrame({c: [] for c in LABEL_ISSUE_COLUMNS})
    labelled = (np.zeros(len(ids), bool) if labels_arr is None
                else pd.notna(labels_arr).astype(bool))
    if labelled.sum() == 0:
        return AuditResult(empty, out, None, None, k, folds, "no labels: label audit skipped",
                           found_by)
    require_cleanlab()  # before minutes of cross-validation, not after
    rows = np.flatnonzero(labelled)
    probs, classes = out_of_fold_probabilities(np.asarray(vectors, np.float32)[rows],
                                               labels_arr[rows], folds=folds, seed=seed)
    # neighbours among all rows: an unlabelled neighbour counts as another label
    knn = neighbour_disagreement(neighbours, np.where(labelled, labels_arr, "\0unlabelled"))
    issues = label_issues(ids[rows], labels_arr[rows], probs, classes, knn[rows])
    note = "" if labelled.all() else f"{int((~labelled).sum())} unlabelled rows skipped by the label audit"
    return AuditResult(issues, out, probs, classes, k, folds, note, found_by)
