"""Exact neighbours and recall: the ground truth that tuning and evaluation compare with.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import faiss
import numpy as np

from .plan import Metric

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


# --- exact neighbours, recall ------------------------------------------------------


def compact(
    distances: np.ndarray, rows: np.ndarray, exclude: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop -1 rows and each query's ``exclude`` row, keep order, cut to k columns.

    Returns (distances (nq, <=k) float32, rows (nq, <=k) int64) with valid entries first and
    -1 / NaN after them.
    """
    valid = rows >= 0
    if exclude is not None:
        valid &= rows != exclude[:, None]
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    rows = np.take_along_axis(rows, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    rows[~valid] = -1
    distances[~valid] = np.nan
    return distances, rows


class ExactTopK:
    """Exact k nearest rows of fixed queries over a stream of database blocks."""

    def __init__(
        self, queries: np.ndarray, exclude: np.ndarray | None, *, k: int, metric: Metric
    ) -> None:
        self._queries, self._exclude, self._k, self._metric = queries, exclude, k, metric
        width = k if exclude is None else k + 1
        keep_max = metric.faiss_metric == faiss.METRIC_INNER_PRODUCT
        self._heap = faiss.ResultHeap(len(queries), width, keep_max=keep_max)

    def add(self, start: int, x: np.ndarray) -> None:
        """Offer database rows ``start``.. ``start + len(x)``: ``x`` (m, dim) float32."""
        if len(x) == 0:  # an empty block, or one whose rows are all held out
            return
        distances, rows = faiss.knn(
            self._queries, x, min(self._heap.k, len(x)), metric=self._metric.faiss_metric
        )
        self._heap.add_result(distances, rows + start)

    def partial(self) -> tuple[np.ndarray, np.ndarray]:
        """The top-k so far, (distances, rows), for another ``ExactTopK`` over the same
        queries to take in with :meth:`add_partial` (Ray tasks each see some rows)."""
        self._heap.finalize()
        return self._heap.D.copy(), self._heap.I.copy()

    def add_partial(self, distances: np.ndarray, rows: np.ndarray) -> None:
        """Offer another top-k over other rows (:meth:`partial`'s result)."""
        self._heap.add_result(distances, rows)

    def rows(self) -> np.ndarray:
        """(nq, k) int64 true neighbour rows, -1 where the database holds fewer."""
        self._heap.finalize()
        return compact(self._heap.D, self._heap.I, self._exclude, self._k)[1]


def query_recalls(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(nq,) float64: the fraction of each query's true neighbours (``truth`` (nq, k), -1
    padded) among ``found`` (nq, <=k); 1 for a query without any to find."""
    valid = truth >= 0
    hits = ((found[:, :, None] == truth[:, None, :]).any(axis=1) & valid).sum(axis=1)
    wanted = valid.sum(axis=1)
    return np.where(wanted > 0, hits / np.maximum(wanted, 1), 1.0)
