"""Tuning the search-time knob (nprobe, efSearch) to the recall target on queries held out
of the index.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING

import faiss
import numpy as np

from .exact import query_recalls
from .faiss_ops import search_knob, search_parameters, search_rows
from .plan import RECALL_PLATEAU, Z_95, SearchKnob

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


# --- tuning ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The search-time setting chosen at build time and the recall@k it reached: the mean
    over the tuning queries and its one-sided 95% lower confidence bound."""

    knob: SearchKnob
    value: int
    recall: float
    recall_low: float
    target_recall: float
    k: int
    n_queries: int

    @property
    def target_met(self) -> bool:
        return self.recall_low >= self.target_recall


def tune_knob(
    index: faiss.Index,
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    k: int,
    target: float,
) -> Tuning:
    """Smallest nprobe / efSearch whose recall@k reaches ``target`` with 95% confidence
    (so that new queries meet it too, not just these): double until it does, then bisect.

    queries: (nq, dim) float32 prepared vectors that are *not* in ``index`` and did not
        train it, so that they see it as a new query does. A query that is in the index
        is found through its own entry: an HNSW graph links each inserted vector to its
        neighbours, which overstates recall (0.94 against 0.88 on fresh queries at
        efSearch 10 in the tests).
    truth: (nq, k) int64 exact neighbours among the rows of ``index``, -1 padded.

    Doubling stops early when it no longer raises recall (the codes, not the search, limit
    it); the target is then unmet and the cheaper setting is kept.
    """
    knob, upper = search_knob(index)
    # HNSW explores max(efSearch, k) candidates, so efSearch below k changes nothing
    floor = 0 if knob is SearchKnob.NPROBE else k - 1
    measured: dict[int, tuple[float, float]] = {}

    def recall_at(value: int) -> tuple[float, float]:
        """(mean, lower confidence bound) of recall@k at ``value``."""
        if value not in measured:
            params = search_parameters(index, knob, value)
            per_query = query_recalls(search_rows(index, queries, k, None, params)[1], truth)
            spread = (
                per_query.std(ddof=1) / math.sqrt(len(per_query)) if len(per_query) > 1 else 0.0
            )
            measured[value] = float(per_query.mean()), float(per_query.mean() - Z_95 * spread)
            log.debug("%s=%d: recall@%d %.4f (>= %.4f)", knob, value, k, *measured[value])
        return measured[value]

    def reached(value: int) -> bool:
        return recall_at(value)[1] >= target

    low, high = floor, min(1 if knob is SearchKnob.NPROBE else max(16, k), upper)
    while not reached(high) and high < upper:
        if low > floor and recall_at(high)[0] - recall_at(low)[0] < RECALL_PLATEAU:
            high = low
            break
        low, high = high, min(2 * high, upper)
    if reached(high):
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if reached(middle) else (middle, high)
    else:
        log.warning(
            "recall@%d reaches only %.3f at %s=%d, below the target %.3f; "
            "give a larger memory budget or pick a less compressed index",
            k, recall_at(high)[0], knob, high, target,
        )  # fmt: skip
    return Tuning(knob, high, *recall_at(high), target, k, len(queries))
