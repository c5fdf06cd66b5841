"""Exact k-nearest-neighbour graphs over cosine similarity, computed in blocks.

Curation needs every row's nearest neighbours, exactly: a near-duplicate missed by an
approximate index is a duplicate kept. The whole matrix is searched with FAISS's flat
inner-product index (BLAS matrix products plus a heap per query), one block of queries
at a time, so memory is one normalised copy of the vectors plus ``block_rows x (k + 1)``
results, whatever N is. Time is O(N^2 D): about right up to a few million rows.
"""

from __future__ import annotations

import numpy as np

from ..errors import CurationInputError

#: queries per FAISS call: 8192 x 512 float32 queries are 16 MiB, results are small
BLOCK_ROWS = 8192


def as_vectors(vectors: np.ndarray, name: str = "vectors") -> np.ndarray:
    """``vectors`` as a C-contiguous (N, D) float32 array; anything else is refused with
    the shape or values found."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise CurationInputError(f"{name} must be a 2-d (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise CurationInputError(f"{name} hold {bad} rows with NaN or inf: drop or re-extract them")
    return x


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float32 rows scaled to unit length (a new array), so that inner products are
    cosine similarities. All-zero rows stay zero: their similarity to anything is 0."""
    x = as_vectors(vectors).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _check_k(k: int, rows: int, what: str) -> int:
    """``k`` if it is a positive integer no larger than ``rows``, the neighbours there are."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise CurationInputError(f"k must be a positive integer, got {k!r}")
    if k > rows:
        raise CurationInputError(f"k={k} but {what} only {rows} neighbours: pass k <= {rows}")
    return int(k)


def knn_search(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    *,
    normalized: bool = False,
    block_rows: int = BLOCK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar database rows of every query, exactly.

    ``queries``: (Q, D), ``database``: (N, D), any float dtype; with ``normalized`` both
    are taken as already L2-normalised float32. Returns ``neighbours`` (Q, k) int64 row
    numbers of ``database`` and ``similarities`` (Q, k) float32, most similar first.
    """
    import faiss

    xq = as_vectors(queries, "queries") if normalized else l2_normalize(queries)
    xb = as_vectors(database, "database") if normalized else l2_normalize(database)
    if xq.shape[1] != xb.shape[1]:
        raise CurationInputError(
            f"queries have {xq.shape[1]} dimensions, the database {xb.shape[1]}: "
            "both must come from the same backbone and layer"
        )
    k = _check_k(k, len(xb), "the database offers")
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    neighbours = np.empty((len(xq), k), np.int64)
    similarities = np.empty((len(xq), k), np.float32)
    for start in range(0, len(xq), block_rows):
        stop = min(start + block_rows, len(xq))
        similarities[start:stop], neighbours[start:stop] = index.search(xq[start:stop], k)
    return neighbours, similarities


def knn_graph(
    vectors: np.ndarray,
    k: int,
    *,
    normalized: bool = False,
    block_rows: int = BLOCK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's ``k`` nearest other rows by cosine similarity (self excluded).

    ``vectors``: (N, D) float. Returns ``neighbours`` (N, k) int64 row numbers and
    ``similarities`` (N, k) float32, most similar first. Each row searches for ``k + 1``
    neighbours and drops itself; when identical rows tie with it and FAISS ranks a twin
    first, the row is found further down (or not at all) and the last entry is dropped
    instead, so a row is never its own neighbour.
    """
    x = as_vectors(vectors) if normalized else l2_normalize(vectors)
    k = _check_k(k, len(x) - 1, f"{len(x)} rows have")
    found, sims = knn_search(x, x, k + 1, normalized=True, block_rows=block_rows)
    rows = np.arange(len(x))[:, None]
    is_self = found == rows
    # keep the first k entries that are not the row itself
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(len(x)), drop] = False
    return found[keep].reshape(len(x), k), sims[keep].reshape(len(x), k)
