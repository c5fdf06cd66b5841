"""Results of a probe run, and their JSON layout (``results.json``).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import sklearn

from .inputs import RESULTS_SCHEMA, ProbeConfig, SplitKind
from .stats import ClassificationMetrics, PairedTest

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True, eq=False)
class Sample:
    """A seeded uniform sample of the images a run saw (training and test rows alike), with
    every dataset's vectors of them: what the report's map and CKA matrix are computed on.

    ``ids`` (m,) object and ``labels`` (m,) int64 class indices, training rows first, each
    part in id order; ``vectors``: one (m, D_i) float array per dataset, in
    ``ProbeResults.datasets`` order; ``of``: the rows it was drawn from. results.json keeps
    the ids and labels, not the vectors.
    """

    ids: np.ndarray
    labels: np.ndarray
    vectors: tuple[np.ndarray, ...]
    of: int


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
    #: (n_test,) bool: test rows whose nearest training row is a near duplicate
    #: (cosine >= embedpipe.config.DUPLICATE_SIMILARITY), and linear top-1 without them
    leaked: np.ndarray | None = None
    top1_leak_free: float | None = None

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
        if self.leaked is not None:
            out["leakage.test_rows"] = int(self.leaked.sum())
            out["linear.top1_leak_free"] = self.top1_leak_free
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
    #: each pretrained embedding against its random-init twin (same backbone and layer)
    pretrained_vs_random: tuple[PairedTest, ...] = ()
    sample: Sample | None = None

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
            "datasets": {d.name: {**_dataset_dict(d), "leakage": _leakage(d, split, self.config.duplicate_similarity)} for d in self.datasets},
            "ranking": list(self.ranking),
            "paired_test": None if self.paired_test is None else asdict(self.paired_test),
            "pretrained_vs_random": [asdict(t) for t in self.pretrained_vs_random],
            "sample": None if self.sample is None else {
                "seed": self.config.seed,
                "of": self.sample.of,
                "ids": [str(i) for i in self.sample.ids],
                "labels": self.sample.labels.tolist(),
            },
        }


def _leakage(d: DatasetResult, split: SplitSummary, threshold: float) -> dict[str, Any] | None:
    if d.leaked is None:
        return None
    return {
        "threshold": threshold,
        "test_rows": int(d.leaked.sum()),
        "test_ids": [str(i) for i in split.test_ids[d.leaked]],
        "linear.top1_leak_free": d.top1_leak_free,
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
    }
