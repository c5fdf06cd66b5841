"""FAISS plumbing: creating indexes from a plan, per-call search parameters, sizes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import faiss
import numpy as np

from ..errors import (
    IndexSpecError,
)
from .exact import compact
from .plan import EF_SEARCH_MAX, IndexKind, IndexPlan, Metric, SearchKnob

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


# --- FAISS plumbing ----------------------------------------------------------------


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The index under pre-transforms (OPQ, PCA) and refinement."""
    while True:
        if isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return index


def search_knob(index: faiss.Index) -> tuple[SearchKnob, int] | None:
    """The index's search-time parameter and its largest useful value, if it has one."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        return SearchKnob.NPROBE, inner.nlist
    if isinstance(inner, faiss.IndexHNSW):
        return SearchKnob.EF_SEARCH, EF_SEARCH_MAX
    return None


def search_parameters(index: faiss.Index, knob: SearchKnob, value: int) -> faiss.SearchParameters:
    """Per-call parameters mirroring the wrapper chain of ``index``."""
    if isinstance(index, faiss.IndexPreTransform):
        inner = search_parameters(faiss.downcast_index(index.index), knob, value)
        return faiss.SearchParametersPreTransform(index_params=inner)
    if isinstance(index, faiss.IndexRefine):
        inner = search_parameters(faiss.downcast_index(index.base_index), knob, value)
        return faiss.IndexRefineSearchParameters(base_index_params=inner, k_factor=index.k_factor)
    if knob is SearchKnob.NPROBE:
        return faiss.SearchParametersIVF(nprobe=value)
    return faiss.SearchParametersHNSW(efSearch=value)


def search_rows(
    index: faiss.Index,
    x: np.ndarray,
    k: int,
    exclude: np.ndarray | None,
    params: faiss.SearchParameters | None,
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search of prepared queries, compacted (see :func:`compact`)."""
    searched = min(k if exclude is None else k + 1, index.ntotal)
    distances, rows = index.search(x, searched, params=params)
    return compact(distances, rows, exclude, k)


def create(plan: IndexPlan, dim: int, metric: Metric, seed: int) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, plan.factory, metric.faiss_metric)
    except RuntimeError as exc:
        kinds = ", ".join(kind.value for kind in IndexKind)
        raise IndexSpecError(
            f"index {plan.factory!r} is neither one of {kinds} nor a FAISS factory string FAISS "
            f"accepts for dimension {dim}: {str(exc).strip().splitlines()[-1]}"
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        # row -> list position, so that search_ids can reconstruct stored vectors
        ivf.make_direct_map()
    return index


def serialized_bytes(index: faiss.Index) -> int:
    """Size of the index as written, without holding a copy of it."""
    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total
