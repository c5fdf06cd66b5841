"""Metrics and statistics: accuracy, top-k, macro F1, Wilson intervals, McNemar's test.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, f1_score, top_k_accuracy_score

logger = logging.getLogger(__name__)


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


def accuracy_ci(correct: np.ndarray, *, confidence: float) -> tuple[float, float]:
    """Wilson score interval of accuracy over test rows (scipy's ``binomtest``).

    ``correct``: (n,) bool. Unlike a bootstrap or the normal approximation, it is honest
    at small n and at accuracies near 0 or 1: 8 of 8 right gives [0.68, 1.00] at 95%, not
    the zero-width [1, 1] a resampling interval reports.
    """
    n = int(correct.size)
    ci = binomtest(int(np.sum(correct)), n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


#: fewer test images than this get a warning: a 95% interval is then wider than ~10 points
SMALL_TEST_SET = 100


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
