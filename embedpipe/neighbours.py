"""k-nearest-neighbour graphs over cosine similarity: exact in blocks, or through an IVF
index with its recall measured.

Curation and maps need every row's nearest neighbours. Up to :data:`EXACT_MAX_ROWS` rows
they are exact: FAISS's flat inner-product index (BLAS matrix products plus a heap per
query), one block of queries at a time, so memory is one normalised copy of the vectors
plus ``block_rows x (k + 1)`` results, whatever N is; time is O(N^2 D), which is minutes
at 200k x 512 on two cores and hours at a million.

Above that the graph comes from an inverted-file index (``IVF<nlist>,Flat``, about
``sqrt(8 N)`` lists trained on a sample): each row is compared only with the rows of the
``nprobe`` lists nearest it. ``nprobe`` is not guessed: starting from 8 it doubles until
recall@k, measured against exact search for a seeded sample of rows, reaches
``target_recall``, and the figure reached is returned with the graph (:class:`KnnGraph`),
so a report can say how approximate its neighbours are. Near duplicates, which sit in the
same list as their original, are the pairs an IVF index finds first. Rows the probed lists
could not fill with ``k`` neighbours are searched exactly.

The index is not searched query by query: since every row is a query, the graph is
computed list by list, each list's members against all the rows that probe it in one
matrix product (BLAS), which gives what ``IndexIVFFlat.search`` gives at the same
``nprobe`` several times faster (the tests hold it to FAISS's own search).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import CurationInputError

#: queries per FAISS call: 8192 x 512 float32 queries are 16 MiB, results are small
BLOCK_ROWS = 8192
#: rows up to which the graph is exact (N^2 D flops: 200k x 512 is minutes on 2 cores)
EXACT_MAX_ROWS = 200_000
#: recall@k an approximate graph is tuned to, on :data:`RECALL_SAMPLE` sampled rows
TARGET_RECALL = 0.98
RECALL_SAMPLE = 1000


@dataclasses.dataclass(frozen=True)
class KnnGraph:
    """Each row's ``k`` nearest other rows: ``neighbours`` (N, k) int64 row numbers and
    ``similarities`` (N, k) float32 cosine, most similar first. ``method`` names the search
    (``"exact"`` or e.g. ``"IVF4096,Flat nprobe 16"``); ``recall`` is the measured
    recall@k of an approximate graph (None when exact)."""

    neighbours: np.ndarray
    similarities: np.ndarray
    method: str = "exact"
    recall: float | None = None

    @property
    def exact(self) -> bool:
        return self.recall is None

    def describe(self) -> str:
        """One line for reports: ``exact`` or the index and the recall it reached."""
        if self.exact:
            return "exact"
        return f"approximate ({self.method}, recall@{self.neighbours.shape[1]} {self.recall:.3f})"


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


def check_k(k: int, rows: int, what: str) -> int:
    """``k`` if it is a positive integer no larger than ``rows``, the neighbours there are."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise CurationInputError(f"k must be a positive integer, got {k!r}")
    if k > rows:
        raise CurationInputError(f"k={k} but {what} only {rows} neighbours: pass k <= {rows}")
    return int(k)


def _search(index, queries: np.ndarray, k: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` one block of queries at a time: (Q, k) int64 rows, float32 sims."""
    neighbours = np.empty((len(queries), k), np.int64)
    similarities = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), block_rows):
        stop = min(start + block_rows, len(queries))
        similarities[start:stop], neighbours[start:stop] = index.search(queries[start:stop], k)
    return neighbours, similarities


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
    k = check_k(k, len(xb), "the database offers")
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return _search(index, xq, k, block_rows)


def _drop_self(found: np.ndarray, sims: np.ndarray, k: int,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k + 1) results of searching the database's rows ``rows`` (default: all, in
    order) -> the first ``k`` that are not the row itself. When identical rows tie with
    it and a twin comes first, the row is found further down (or not at all) and the last
    entry is dropped instead."""
    n = len(found)
    rows = np.arange(n) if rows is None else rows
    is_self = found == rows[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(n), drop] = False
    return found[keep].reshape(n, k), sims[keep].reshape(n, k)


def ivf_lists(n: int) -> int:
    """Inverted lists for a graph over ``n`` rows: the power of two nearest ``sqrt(8 n)``,
    fewer when that would leave a list under 39 training rows (FAISS's k-means minimum).
    Every row is a query, so the lists balance the coarse search (n x nlist distances)
    against the scan (n x nprobe x n / nlist) at the nprobe of 8 that tuning starts from."""
    ideal = round(np.log2(np.sqrt(8 * n)))
    return 1 << max(0, min(ideal, int(np.log2(n / 39))))


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |found ∩ truth| / k (both (Q, k) row numbers)."""
    return float(np.mean([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth)]))


def _probes(quantizer, x: np.ndarray, rows: np.ndarray, nprobe: int, block_rows: int) -> np.ndarray:
    """(len(rows), nprobe) int64: the lists nearest each of ``rows``, nearest first."""
    out = np.empty((len(rows), nprobe), np.int64)
    for start in range(0, len(rows), block_rows):
        stop = min(start + block_rows, len(rows))
        out[start:stop] = quantizer.search(x[rows[start:stop]], nprobe)[1]
    return out


def _join(x: np.ndarray, lists: tuple[np.ndarray, np.ndarray], queries: np.ndarray,
          probes: np.ndarray, width: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """What an IVF index answers for ``queries`` (row numbers) probing ``probes`` (Q, p),
    computed list by list with matrix products: every query that probes a list is
    compared with the list's members in one BLAS call, instead of query by query.
    ``lists``: (rows sorted by list, start of each list in them). Returns the ``width``
    best (rows, similarities) per query, most similar first, -1 / -inf where fewer."""
    members_by_list, bounds = lists
    q, p = probes.shape
    cand_rows = np.full((q, p, width), -1, np.int64)
    cand_sims = np.full((q, p, width), -np.inf, np.float32)
    flat = probes.ravel()
    pairs_by_list = np.argsort(flat, kind="stable")  # (query, slot) pairs grouped by list
    starts = np.searchsorted(flat[pairs_by_list], np.arange(len(bounds)))
    for c in np.flatnonzero(np.diff(starts)):
        members = members_by_list[bounds[c] : bounds[c + 1]]
        if not len(members):
            continue
        base = x[members].T
        m = min(width, len(members))
        for s in range(starts[c], starts[c + 1], block_rows):
            qi, slot = np.divmod(pairs_by_list[s : min(s + block_rows, starts[c + 1])], p)
            sims = x[queries[qi]] @ base
            top = (np.argpartition(-sims, m - 1, axis=1)[:, :m] if m < len(members)
                   else np.broadcast_to(np.arange(m), (len(qi), m)))
            cand_rows[qi, slot, :m] = members[top]
            cand_sims[qi, slot, :m] = np.take_along_axis(sims, top, axis=1)
    cand_rows, cand_sims = cand_rows.reshape(q, -1), cand_sims.reshape(q, -1)
    top = np.argpartition(-cand_sims, width - 1, axis=1)[:, :width]
    rows, sims = np.take_along_axis(cand_rows, top, 1), np.take_along_axis(cand_sims, top, 1)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(rows, order, 1), np.take_along_axis(sims, order, 1)


def _ivf_graph(x: np.ndarray, k: int, target_recall: float, seed: int,
               block_rows: int) -> KnnGraph:
    import faiss

    n, d = x.shape
    nlist = ivf_lists(n)
    rng = np.random.default_rng(seed)
    kmeans = faiss.Kmeans(d, nlist, niter=10, seed=seed, spherical=True)
    kmeans.train(x[np.sort(rng.choice(n, min(n, 50 * nlist), replace=False))])
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(kmeans.centroids)
    everyone = np.arange(n)
    nprobe = 8
    probes = _probes(quantizer, x, everyone, min(nprobe, nlist), block_rows)
    home = probes[:, 0]  # each row lives in its nearest list, as an IVF index stores it
    by_list = np.argsort(home, kind="stable")
    lists = (by_list, np.searchsorted(home[by_list], np.arange(nlist + 1)))
    sample = np.sort(rng.choice(n, min(n, RECALL_SAMPLE), replace=False))
    truth = _drop_self(*knn_search(x[sample], x, k + 1, normalized=True), k, sample)[0]
    while True:
        nprobe = min(nprobe, nlist)
        sample_probes = _probes(quantizer, x, sample, nprobe, block_rows)
        found, sims = _join(x, lists, sample, sample_probes, k + 1, block_rows)
        recall = _recall(_drop_self(found, sims, k, sample)[0], truth)
        if recall >= target_recall or nprobe >= nlist // 4:
            break
        nprobe *= 2
    if probes.shape[1] != nprobe:
        probes = _probes(quantizer, x, everyone, nprobe, block_rows)
    found, sims = _join(x, lists, everyone, probes, k + 1, block_rows)
    neighbours, similarities = _drop_self(found, sims, k)
    # lists too short to fill k places leave -1: search those rows exactly
    short = np.flatnonzero((neighbours < 0).any(axis=1))
    if len(short):
        exact = knn_search(x[short], x, k + 1, normalized=True)
        neighbours[short], similarities[short] = _drop_self(*exact, k, short)
    return KnnGraph(neighbours, similarities, f"IVF{nlist},Flat nprobe {nprobe}", recall)


def knn_graph(
    vectors: np.ndarray,
    k: int,
    *,
    normalized: bool = False,
    exact: bool | None = None,
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
    block_rows: int = BLOCK_ROWS,
) -> KnnGraph:
    """Every row's ``k`` nearest other rows by cosine similarity (self excluded).

    ``vectors``: (N, D) float. ``exact``: True for exact search, False for the IVF index,
    None (default) for exact up to :data:`EXACT_MAX_ROWS` rows. A row is never its own
    neighbour, also when identical rows tie with it.
    """
    x = as_vectors(vectors) if normalized else l2_normalize(vectors)
    k = check_k(k, len(x) - 1, f"{len(x)} rows have")
    if exact is None:
        exact = len(x) <= EXACT_MAX_ROWS
    if not exact:
        return _ivf_graph(x, k, target_recall, seed, block_rows)
    found, sims = knn_search(x, x, k + 1, normalized=True, block_rows=block_rows)
    return KnnGraph(*_drop_self(found, sims, k))
