"""FAISS indexes over embeddings: choose, train, add, tune, save, open and search.

The compute here takes arrays and re-iterable sources of blocks, never paths; the thin
helpers at the end (:func:`embedding_blocks`, :func:`search_embeddings`,
:func:`eval_embeddings`, :func:`search_images`) are the only places that open an embeddings
dataset, through :mod:`embedpipe.store`, or embed image files, through
:func:`embedpipe.engine.embed_paths`.

A build reads its source twice, so the full float matrix never has to sit in memory:

1. *scan*: validate every block, collect ids and labels, and keep a uniform random sample
   of rows (at most :data:`SAMPLE_BYTES`) for training and for tuning queries;
2. *add*: train on the sample, then add block by block while computing the exact
   neighbours of the tuning queries (faiss ``contrib.exhaustive_search.knn_ground_truth``
   style), and finally tune the search-time parameter against them.

Cosine similarity is inner product on L2-normalised vectors: vectors are normalised when
added and queries when searched, so callers never do it themselves. Inside FAISS it runs
as L2 on those unit vectors (the same ranking), and scores are turned back into cosines.

Searching is safe from many threads at once: search-time parameters travel with each
call as FAISS ``SearchParameters`` and never change the shared index.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import (
    DimensionMismatchError,
    IndexFileError,
    IndexInputError,
    IndexSpecError,
    MemoryBudgetError,
    MetadataMismatchError,
    QueryImagesError,
    UnknownIdError,
)

if TYPE_CHECKING:
    from .engine import QueryEmbedder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the index directory layout; :meth:`Index.open` refuses others."""

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"

RESULT_COLUMNS = ("query_id", "rank", "id", "label", "score")
"""Columns of :meth:`SearchResults.to_frame`, one row per (query, rank)."""

SAMPLE_BYTES = 256 * 2**20
"""Most bytes of vectors a build keeps as its training and tuning sample."""

FLAT_MAX_BYTES = 64 * 2**20
"""``auto`` searches exactly while the vectors take at most this much: a batched exact
search over 64 MiB runs thousands of queries a second and needs no tuning."""

HNSW_MAX_ROWS = 2_000_000
"""``auto`` builds a graph only up to this many vectors: insertion costs grow with the
graph, and beyond a few million an IVF build on a few cores is hours faster."""

HNSW_M = 32
BUDGET_HEADROOM = 0.9
"""Fraction of the memory budget an index may fill; the rest absorbs allocator slack
and search buffers."""

TUNE_QUERIES = 1000
"""Tuning queries held out of the training sample (at most a tenth of the rows)."""

EF_SEARCH_MAX = 4096

_MIN_TRAIN_PER_CENTROID = 39  # FAISS k-means warns below this many points per centroid
_MAX_TRAIN_PER_CENTROID = 256  # and subsamples above it
_MAX_SAMPLE_ROWS = 2**18
_PQ_M = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
_PQ_MIN_NBITS = 4
_RECALL_PLATEAU = 0.0005  # tuning stops doubling work that gains less recall than this
_Z_95 = 1.645  # one-sided 95% normal quantile
_PROVENANCE_KEYS = ("backbone", "weights", "layer", "dim", "preprocessing", "normalize")


class Metric(StrEnum):
    """How neighbours are ranked.

    ``score`` in results is a similarity (higher is nearer) for ``cosine`` and ``ip``, and
    the Euclidean distance (lower is nearer) for ``l2``.
    """

    COSINE = "cosine"
    L2 = "l2"
    IP = "ip"

    @property
    def faiss_metric(self) -> int:
        # Cosine runs as L2 on unit vectors, which ranks the same (|a-b|^2 = 2 - 2 cos):
        # FAISS's k-means and quantisers are built for L2 and keep far more recall there
        # than under inner product (IVF-PQ recall@10 0.80 vs 0.46 on the test data).
        return faiss.METRIC_INNER_PRODUCT if self is Metric.IP else faiss.METRIC_L2

    @property
    def higher_is_better(self) -> bool:
        """Whether a higher ``score`` means nearer."""
        return self is not Metric.L2

    def scores(self, distances: np.ndarray) -> np.ndarray:
        """Result scores (float32) from FAISS distances of this metric's ``faiss_metric``."""
        if self is Metric.COSINE:
            return (1 - distances / 2).astype(np.float32)
        if self is Metric.L2:
            return np.sqrt(np.maximum(distances, 0)).astype(np.float32)  # FAISS gives squares
        return distances.astype(np.float32)


class IndexKind(StrEnum):
    """Index families :meth:`Index.build` knows how to size; anything else is read as a
    FAISS factory string."""

    AUTO = "auto"
    FLAT = "flat"
    HNSW = "hnsw"
    IVF = "ivf"
    IVFSQ = "ivfsq"
    IVFPQ = "ivfpq"


class SearchKnob(StrEnum):
    """The search-time parameter that trades speed for recall in an index."""

    NPROBE = "nprobe"
    EF_SEARCH = "ef_search"


def _parse_metric(value: Metric | str) -> Metric:
    try:
        return Metric(value)
    except ValueError:
        choices = ", ".join(metric.value for metric in Metric)
        raise IndexSpecError(f"unknown metric {value!r}; choose one of: {choices}") from None


# --- memory budgets ----------------------------------------------------------------

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_BUDGET_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_memory_budget(value: str | int) -> int:
    """Bytes in a memory budget such as ``"4GB"``, ``"512MiB"``, ``"1.5G"`` or ``1073741824``.

    ``KB/MB/GB/TB`` are powers of 1000; ``KiB/MiB/GiB/TiB`` and the bare ``K/M/G/T`` are
    powers of 1024. Raises :class:`MemoryBudgetError` for anything else or a size below 1 byte.
    """
    if isinstance(value, int):
        size = value
    else:
        match = _BUDGET_RE.fullmatch(value)
        unit = match.group(2).lower() if match else None
        if unit not in _UNITS:
            raise MemoryBudgetError(
                f"cannot read memory budget {value!r}; write a number with a unit, e.g. "
                "'4GB', '512MiB' or '1.5G' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise MemoryBudgetError(f"memory budget {value!r} is not positive; give e.g. '4GB'")
    return size


def format_bytes(size: int) -> str:
    """``2_300_000_000`` -> ``'2.3 GB'`` (powers of 1000, as budgets are usually written)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# --- choosing an index -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """What :meth:`Index.build` creates: a FAISS factory string, how many sample rows to
    train it on (0: no training) and, in words, why."""

    kind: IndexKind | None  # None: a factory string given by the caller
    factory: str
    reason: str
    train_rows: int
    estimated_bytes: int | None


def _floor_pow2(x: float) -> int:
    return 2 ** int(math.log2(x)) if x >= 1 else 1


def _nlist(n: int, train_rows: int) -> int:
    """Inverted lists: the power of two nearest 4*sqrt(n) (FAISS's guideline), capped so
    that every centroid has at least 39 training points."""
    ideal = 2 ** round(math.log2(4 * math.sqrt(n)))
    return max(1, min(ideal, _floor_pow2(train_rows / _MIN_TRAIN_PER_CENTROID)))


def _ivf_bytes(n: int, dim: int, nlist: int, code_bytes: int) -> int:
    # per vector: its code, an int64 id in its list and an int64 direct-map entry
    return n * (code_bytes + 16) + nlist * dim * 4


def _hnsw_bytes(n: int, dim: int) -> int:
    # per vector: the float vector, 2*M int32 links on level 0, ~1 upper-level link on
    # average, plus level and offset bookkeeping
    return n * (dim * 4 + HNSW_M * 2 * 4 + 24)


def plan_index(
    n: int,
    dim: int,
    *,
    index: IndexKind | str = IndexKind.AUTO,
    memory_budget: int | None = None,
    train_rows: int,
) -> IndexPlan:
    """Choose the index for ``n`` vectors of ``dim`` floats.

    ``index`` is an :class:`IndexKind` (or its value) or a FAISS factory string.
    ``memory_budget`` (bytes) bounds the index's estimated size; ``None`` means no bound.
    ``train_rows`` is how many sample rows are available for training.

    ``auto`` takes the first that fits ``BUDGET_HEADROOM`` of the budget: Flat while the
    vectors take at most ``FLAT_MAX_BYTES``; HNSW up to ``HNSW_MAX_ROWS`` vectors; IVF-Flat;
    IVF-SQ8 (a byte per dimension); IVF-PQ with the most code bytes that fit, rotated and
    reduced by OPQ when each code byte must stand for more than 4 dimensions.
    """
    if n < 1 or dim < 1:
        raise IndexInputError(f"cannot plan an index for {n} vectors of dimension {dim}")
    kind = index if isinstance(index, IndexKind) else _index_kind_or_none(index)
    if kind is None:
        return IndexPlan(None, index, "FAISS factory string given by the caller", train_rows, None)
    candidates = _candidates(n, dim, kind, train_rows, memory_budget)
    limit = None if memory_budget is None else memory_budget * BUDGET_HEADROOM
    for plan in candidates:
        if limit is None or plan.estimated_bytes <= limit:
            return plan
    smallest = min(plan.estimated_bytes for plan in candidates)
    hint = "raise the budget" + ("" if kind is IndexKind.AUTO else " or use index 'auto'")
    raise MemoryBudgetError(
        f"no {kind.value} index for {n:,} x {dim} vectors fits the memory budget of "
        f"{format_bytes(memory_budget)}: the smallest needs ~{format_bytes(smallest)}, and "
        f"{1 - BUDGET_HEADROOM:.0%} of the budget is kept as headroom; {hint}"
    )


def _candidates(
    n: int, dim: int, kind: IndexKind, train_rows: int, memory_budget: int | None
) -> list[IndexPlan]:
    """Plans of ``kind`` (every kind for auto) in order of preference."""

    def plan(planned: IndexKind, factory: str, why: str, train: int, size: int) -> IndexPlan:
        fit = (
            "no memory budget given"
            if memory_budget is None
            else f"budget {format_bytes(memory_budget)}"
        )
        reason = f"{n:,} x {dim}: {why}; needs ~{format_bytes(size)} ({fit})"
        return IndexPlan(planned, factory, reason, train, size)

    auto = kind is IndexKind.AUTO
    nlist = _nlist(n, train_rows)
    ivf_train = min(train_rows, nlist * _MAX_TRAIN_PER_CENTROID)
    trainable = train_rows >= _MIN_TRAIN_PER_CENTROID
    if kind in (IndexKind.IVF, IndexKind.IVFSQ) and not trainable:
        raise _too_few_to_train(kind, train_rows, _MIN_TRAIN_PER_CENTROID)
    plans = []
    flat_bytes = n * dim * 4
    if kind is IndexKind.FLAT or (auto and flat_bytes <= FLAT_MAX_BYTES):
        why = "exact search" + (", fast at this size and needing no tuning" if auto else "")
        plans.append(plan(IndexKind.FLAT, "Flat", why, 0, flat_bytes))
    if kind is IndexKind.HNSW or (auto and n <= HNSW_MAX_ROWS):
        why = "a proximity graph, the fastest search at high recall while vectors and graph fit"
        plans.append(plan(IndexKind.HNSW, f"HNSW{HNSW_M}", why, 0, _hnsw_bytes(n, dim)))
    if trainable and kind in (IndexKind.AUTO, IndexKind.IVF):
        why = f"{nlist} inverted lists of exact vectors"
        plans.append(
            plan(
                IndexKind.IVF,
                f"IVF{nlist},Flat",
                why,
                ivf_train,
                _ivf_bytes(n, dim, nlist, 4 * dim),
            )
        )
    if trainable and kind in (IndexKind.AUTO, IndexKind.IVFSQ):
        why = f"{nlist} inverted lists of 8-bit scalar-quantised vectors, 4x smaller than floats"
        size = _ivf_bytes(n, dim, nlist, dim) + 8 * dim
        plans.append(plan(IndexKind.IVFSQ, f"IVF{nlist},SQ8", why, ivf_train, size))
    if kind in (IndexKind.AUTO, IndexKind.IVFPQ):
        pq_plans = [
            plan(IndexKind.IVFPQ, *variant) for variant in _pq_variants(n, dim, nlist, train_rows)
        ]
        if not pq_plans and not auto:
            raise _too_few_to_train(kind, train_rows, _MIN_TRAIN_PER_CENTROID * 2**_PQ_MIN_NBITS)
        plans.extend(pq_plans)
    return plans


def _pq_variants(
    n: int, dim: int, nlist: int, train_rows: int
) -> Iterator[tuple[str, str, int, int]]:
    """(factory, why, training rows, bytes) of IVF-PQ indexes, most code bytes first.

    At most ``dim / 4`` code bytes: beyond that SQ8 is about as small and more accurate.
    Codes have fewer than 8 bits per sub-quantiser when the sample is too small to train
    256 centroids each.
    """
    pq_train = min(train_rows, max(nlist * _MAX_TRAIN_PER_CENTROID, 2**16))
    nbits = min(8, int(math.log2(max(pq_train / _MIN_TRAIN_PER_CENTROID, 1))))
    if nbits < _PQ_MIN_NBITS:
        return
    # OPQ trains 8-bit quantisers of its own, so it needs 256 centroids' worth of points
    opq_trainable = pq_train >= _MIN_TRAIN_PER_CENTROID * 256
    for m in _PQ_M:
        opq = opq_trainable and dim > 4 * m
        if 4 * m > dim or (not opq and dim % m):
            continue
        coded_dim = 4 * m if opq else dim
        size = _ivf_bytes(n, coded_dim, nlist, math.ceil(m * nbits / 8)) + 2**nbits * coded_dim * 4
        # "np": no polysemous training, a slow code reordering for a search mode not used here
        code = f"PQ{m}np" if nbits == 8 else f"PQ{m}x{nbits}np"
        factory = f"IVF{nlist},{code}"
        why = f"{nlist} inverted lists of product-quantised codes ({m} x {nbits} bits)"
        if opq:
            size += dim * coded_dim * 4
            factory = f"OPQ{m}_{coded_dim},{factory}"
            why += (
                f", OPQ-rotated to {coded_dim} dimensions as each code byte stands for "
                f"{dim / m:g} of {dim}"
            )
        yield factory, why, pq_train, size


def _too_few_to_train(kind: IndexKind, have: int, need: int) -> IndexInputError:
    return IndexInputError(
        f"index {kind.value!r} needs at least {need:,} training vectors but the sample holds "
        f"{have:,}; use index 'flat' (or 'auto') for a collection this small"
    )


def _index_kind_or_none(value: str) -> IndexKind | None:
    try:
        return IndexKind(value)
    except ValueError:
        return None


# --- blocks ------------------------------------------------------------------------


class BlockLike(Protocol):
    """Rows of an embeddings dataset; :class:`embedpipe.store.Embeddings` is one."""

    @property
    def ids(self) -> Sequence[Any] | np.ndarray: ...

    @property
    def labels(self) -> Sequence[Any] | np.ndarray | None: ...

    @property
    def vectors(self) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Block:
    """A block of rows: ``ids`` (n,) object, ``labels`` (n,) object or None, ``vectors``
    (n, dim) float."""

    ids: Sequence[Any] | np.ndarray
    labels: Sequence[Any] | np.ndarray | None
    vectors: np.ndarray


BlockSource = Callable[[], Iterable[BlockLike]]
"""A zero-argument callable returning a fresh iterable of blocks each time it is called:
a build reads its source twice."""

IndexData = np.ndarray | BlockLike | Sequence[BlockLike] | BlockSource


def as_block_source(data: IndexData) -> BlockSource:
    """Turn what :meth:`Index.build` accepts into a :data:`BlockSource`.

    ``data`` is one of: an (n, dim) float array (ids become ``"0"``..``"n-1"``); one block
    (anything with ``ids``, ``labels`` and ``vectors``); a list of blocks; or a callable
    returning a fresh iterable of blocks (e.g. ``embedding_blocks(path)``).
    """
    if isinstance(data, np.ndarray):
        ids = np.arange(len(data)).astype(str).astype(object)
        block: BlockLike = Block(ids, None, data)
        return lambda: (block,)
    if hasattr(data, "vectors") and hasattr(data, "ids"):
        return lambda: (data,)
    if callable(data):
        return data
    if isinstance(data, Iterator):
        raise IndexInputError(
            "a one-shot iterator of blocks cannot be read twice, and a build reads its source "
            "twice (sample, then add); pass a callable that returns a new iterator, e.g. "
            "embedding_blocks(path)"
        )
    if isinstance(data, Sequence):
        return lambda: data
    raise IndexInputError(
        f"cannot index a {type(data).__name__}; pass an (n, dim) array, a block with ids, "
        "labels and vectors, a list of blocks, or a callable returning an iterable of blocks"
    )


_QUERY_DIM_HINT = "embed the queries with the backbone and layer recorded in the index (Index.meta)"
_BLOCK_DIM_HINT = "every block of a dataset must have the same width; re-extract the dataset"


def _prepare(
    vectors: Any,
    *,
    dim: int | None,
    metric: Metric,
    what: str,
    first_row: int = 0,
    dim_hint: str = "",
) -> np.ndarray:
    """Validate ``vectors`` and return them as (n, dim) C-contiguous float32, L2-normalised
    for cosine (a copy then; the caller's array is never changed)."""
    x = np.asarray(vectors)
    if x.ndim != 2:
        hint = "; for a single vector use vector[None, :]" if x.ndim == 1 else ""
        raise IndexInputError(f"{what} must be a 2-D array (n, dim); got shape {x.shape}{hint}")
    if dim is not None and x.shape[1] != dim:
        raise DimensionMismatchError(
            f"{what} have dimension {x.shape[1]}, expected {dim}; {dim_hint}"
        )
    if x.shape[1] == 0:
        raise IndexInputError(f"{what} have no columns; got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        raise IndexInputError(f"{what}: row {row} holds NaN or infinity; re-extract it or drop it")
    if metric is Metric.COSINE:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return x


def _block_ids(block: BlockLike, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(block.ids, dtype=object)
    labels = (
        np.full(n, None, dtype=object)
        if block.labels is None
        else np.asarray(block.labels, dtype=object)
    )
    if ids.shape != (n,) or labels.shape != (n,):
        raise IndexInputError(
            f"a block has {n} vectors but {len(ids)} ids and {len(labels)} labels; "
            "every row needs one id and one label (None where missing)"
        )
    return ids, labels


def _row_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, row): a random key per row that does not depend on how the rows
    are split into blocks, so a streamed build samples exactly what an in-memory one does."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + (rows.astype(np.uint64) + np.uint64(1)) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class _Sample:
    """A uniform sample of rows without replacement: the ``capacity`` rows with the
    smallest keys (bottom-k sampling), filled block by block."""

    def __init__(self, capacity: int, dim: int, seed: int) -> None:
        self._seed = seed
        self._keys = np.empty(capacity, dtype=np.uint64)
        self._rows = np.empty(capacity, dtype=np.int64)
        self._vectors = np.empty((capacity, dim), dtype=np.float32)
        self._size = 0

    def offer(self, start: int, x: np.ndarray) -> None:
        rows = np.arange(start, start + len(x), dtype=np.int64)
        keys = _row_keys(rows, self._seed)
        capacity, size = len(self._keys), self._size
        if size == capacity:
            wanted = keys < self._keys.max()
            rows, keys, x = rows[wanted], keys[wanted], x[wanted]
        if size + len(rows) <= capacity:
            slots = np.arange(size, size + len(rows))
        else:
            keep = np.argpartition(np.concatenate([self._keys[:size], keys]), capacity - 1)[
                :capacity
            ]
            evicted = np.setdiff1d(np.arange(size), keep[keep < size], assume_unique=True)
            slots = np.concatenate([np.arange(size, capacity), evicted])
            chosen = keep[keep >= size] - size
            rows, keys, x = rows[chosen], keys[chosen], x[chosen]
        self._keys[slots], self._rows[slots], self._vectors[slots] = keys, rows, x
        self._size = max(size, int(slots.max(initial=-1)) + 1)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (s, dim) float32, rows (s,) int64) in key order, i.e. shuffled."""
        order = np.argsort(self._keys[: self._size])
        return self._vectors[order], self._rows[order]


@dataclasses.dataclass(frozen=True)
class _Scan:
    ids: np.ndarray  # (n,) object
    labels: np.ndarray  # (n,) object
    dim: int
    meta: Mapping[str, Any] | None  # of the first block, if blocks carry it


def _scan(
    source: BlockSource, *, metric: Metric, seed: int
) -> tuple[_Scan, np.ndarray, np.ndarray]:
    """First pass: validate, collect ids and labels, sample rows.

    Returns the scan and the sample: vectors (s, dim) float32 and their rows (s,) int64,
    in random order.
    """
    ids, labels = [], []
    dim: int | None = None
    meta = None
    sample: _Sample | None = None
    start = 0
    for block in source():
        x = _prepare(
            block.vectors,
            dim=dim,
            metric=metric,
            what="vectors",
            first_row=start,
            dim_hint=_BLOCK_DIM_HINT,
        )
        if dim is None:
            dim = x.shape[1]
            meta = getattr(block, "meta", None)
            sample = _Sample(min(_MAX_SAMPLE_ROWS, max(1, SAMPLE_BYTES // (4 * dim))), dim, seed)
        block_ids, block_labels = _block_ids(block, len(x))
        ids.append(block_ids)
        labels.append(block_labels)
        sample.offer(start, x)
        start += len(x)
    if dim is None or start == 0:
        raise IndexInputError("no vectors to index: the source is empty; extract some images first")
    all_ids = np.concatenate(ids)
    duplicated = pd.Index(all_ids).duplicated()
    if duplicated.any():
        examples = ", ".join(repr(i) for i in all_ids[duplicated][:3])
        raise IndexInputError(f"ids must be unique; repeated: {examples}")
    return _Scan(all_ids, np.concatenate(labels), dim, meta), *sample.take()


def _prepared_blocks(
    source: BlockSource, *, dim: int, metric: Metric, ids: np.ndarray
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, prepared vectors) per block, checking the source yields ``ids`` in order."""
    start = 0
    for block in source():
        x = _prepare(
            block.vectors,
            dim=dim,
            metric=metric,
            what="vectors",
            first_row=start,
            dim_hint=_BLOCK_DIM_HINT,
        )
        block_ids = np.asarray(block.ids, dtype=object)
        expected = ids[start : start + len(x)]
        if len(block_ids) != len(expected) or not np.array_equal(block_ids, expected):
            raise MetadataMismatchError(
                f"the embeddings differ from those the index holds at rows "
                f"{start}..{start + len(x)}: use the same, unchanged embeddings "
                "(a source must yield the same rows on every pass)"
            )
        yield start, x
        start += len(x)
    if start != len(ids):
        raise MetadataMismatchError(
            f"the embeddings hold {start:,} rows but the index {len(ids):,}; "
            "use the same, unchanged embeddings"
        )


# --- exact neighbours, recall ------------------------------------------------------


def _compact(
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


class _ExactTopK:
    """Exact k nearest rows of fixed queries over a stream of database blocks."""

    def __init__(
        self, queries: np.ndarray, exclude: np.ndarray | None, *, k: int, metric: Metric
    ) -> None:
        self._queries, self._exclude, self._k, self._metric = queries, exclude, k, metric
        width = k if exclude is None else k + 1
        keep_max = metric.faiss_metric == faiss.METRIC_INNER_PRODUCT
        self._heap = faiss.ResultHeap(len(queries), width, keep_max=keep_max)

    def add(self, start: int, x: np.ndarray) -> None:
        distances, rows = faiss.knn(
            self._queries, x, min(self._heap.k, len(x)), metric=self._metric.faiss_metric
        )
        self._heap.add_result(distances, rows + start)

    def rows(self) -> np.ndarray:
        """(nq, k) int64 true neighbour rows, -1 where the database holds fewer."""
        self._heap.finalize()
        return _compact(self._heap.D, self._heap.I, self._exclude, self._k)[1]


def _query_recalls(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(nq,) float64: the fraction of each query's true neighbours (``truth`` (nq, k), -1
    padded) among ``found`` (nq, <=k); 1 for a query without any to find."""
    valid = truth >= 0
    hits = ((found[:, :, None] == truth[:, None, :]).any(axis=1) & valid).sum(axis=1)
    wanted = valid.sum(axis=1)
    return np.where(wanted > 0, hits / np.maximum(wanted, 1), 1.0)


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


def _knob(index: faiss.Index) -> tuple[SearchKnob, int] | None:
    """The index's search-time parameter and its largest useful value, if it has one."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        return SearchKnob.NPROBE, inner.nlist
    if isinstance(inner, faiss.IndexHNSW):
        return SearchKnob.EF_SEARCH, EF_SEARCH_MAX
    return None


def _search_parameters(index: faiss.Index, knob: SearchKnob, value: int) -> faiss.SearchParameters:
    """Per-call parameters mirroring the wrapper chain of ``index``."""
    if isinstance(index, faiss.IndexPreTransform):
        inner = _search_parameters(faiss.downcast_index(index.index), knob, value)
        return faiss.SearchParametersPreTransform(index_params=inner)
    if isinstance(index, faiss.IndexRefine):
        inner = _search_parameters(faiss.downcast_index(index.base_index), knob, value)
        return faiss.IndexRefineSearchParameters(base_index_params=inner, k_factor=index.k_factor)
    if knob is SearchKnob.NPROBE:
        return faiss.SearchParametersIVF(nprobe=value)
    return faiss.SearchParametersHNSW(efSearch=value)


def _search_rows(
    index: faiss.Index,
    x: np.ndarray,
    k: int,
    exclude: np.ndarray | None,
    params: faiss.SearchParameters | None,
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search of prepared queries, compacted (see :func:`_compact`)."""
    searched = min(k if exclude is None else k + 1, index.ntotal)
    distances, rows = index.search(x, searched, params=params)
    return _compact(distances, rows, exclude, k)


def _create(plan: IndexPlan, dim: int, metric: Metric, seed: int) -> faiss.Index:
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


def _serialized_bytes(index: faiss.Index) -> int:
    """Size of the index as written, without holding a copy of it."""
    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


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


def _tune(
    index: faiss.Index,
    queries: np.ndarray,
    query_rows: np.ndarray,
    truth: np.ndarray,
    *,
    k: int,
    target: float,
) -> Tuning:
    """Smallest nprobe / efSearch whose recall@k reaches ``target`` with 95% confidence
    (so that new queries meet it too, not just these): double until it does, then bisect.
    Recall is over each query's true neighbours other than itself.

    Doubling stops early when it no longer raises recall (the codes, not the search, limit
    it); the target is then unmet and the cheaper setting is kept.
    """
    knob, upper = _knob(index)
    # HNSW explores max(efSearch, k) candidates, so efSearch below k changes nothing
    floor = 0 if knob is SearchKnob.NPROBE else k - 1
    measured: dict[int, tuple[float, float]] = {}

    def recall_at(value: int) -> tuple[float, float]:
        """(mean, lower confidence bound) of recall@k at ``value``."""
        if value not in measured:
            params = _search_parameters(index, knob, value)
            per_query = _query_recalls(
                _search_rows(index, queries, k, query_rows, params)[1], truth
            )
            spread = (
                per_query.std(ddof=1) / math.sqrt(len(per_query)) if len(per_query) > 1 else 0.0
            )
            measured[value] = float(per_query.mean()), float(per_query.mean() - _Z_95 * spread)
            log.debug("%s=%d: recall@%d %.4f (>= %.4f)", knob, value, k, *measured[value])
        return measured[value]

    def reached(value: int) -> bool:
        return recall_at(value)[1] >= target

    low, high = floor, min(1 if knob is SearchKnob.NPROBE else max(16, k), upper)
    while not reached(high) and high < upper:
        if low > floor and recall_at(high)[0] - recall_at(low)[0] < _RECALL_PLATEAU:
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


# --- the index ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """Everything the index directory's ``index.json`` records."""

    metric: Metric
    normalized: bool  # whether vectors and queries are L2-normalised before FAISS sees them
    kind: IndexKind | None  # None: built from a caller's factory string
    factory: str
    reason: str
    dim: int
    count: int
    memory_budget: int | None
    index_bytes: int
    train_rows: int
    tuning: Tuning | None
    build_seconds: float
    built_at: str
    faiss_version: str
    embeddings: dict[str, Any]  # the embeddings' metadata: backbone, weights, layer, ...
    # where the embeddings were read from (absolute), so that eval can read them again;
    # None for an index built from arrays, or by an embedpipe that did not record it
    embeddings_path: str | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexInfo:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexFileError(
                f"index format {version!r} is not the supported {FORMAT_VERSION}; "
                "rebuild the index with this embedpipe, or use the embedpipe that wrote it"
            )
        tuning = data["tuning"]
        if tuning is not None:
            tuning = Tuning(**{**tuning, "knob": SearchKnob(tuning["knob"])})
        kind = None if data["kind"] is None else IndexKind(data["kind"])
        return cls(**{**data, "metric": Metric(data["metric"]), "kind": kind, "tuning": tuning})


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Recall@k of an index against exact search, its batch search speed and its size."""

    k: int
    n_queries: int
    recall: float
    qps: float
    index_bytes: int
    knob: SearchKnob | None
    value: int | None


@dataclasses.dataclass(frozen=True)
class SearchResults:
    """Neighbours, one entry per (query, rank); all arrays have the same length.

    ``query_id`` (m,) object, ``rank`` (m,) int32 from 1, ``id`` (m,) object, ``label`` (m,)
    object (None where missing), ``score`` (m,) float32: similarity for cosine/ip (higher
    is nearer), Euclidean distance for l2 (lower is nearer).
    """

    query_id: np.ndarray
    rank: np.ndarray
    id: np.ndarray
    label: np.ndarray
    score: np.ndarray
    metric: Metric

    def __len__(self) -> int:
        return len(self.rank)

    def to_frame(self) -> pd.DataFrame:
        """The results as a DataFrame with :data:`RESULT_COLUMNS`, the same for table,
        JSON and Parquet output."""
        return pd.DataFrame({column: getattr(self, column) for column in RESULT_COLUMNS})

    def to_arrow(self) -> pa.Table:
        """The results as an Arrow table with :data:`RESULT_COLUMNS` and fixed types
        (string, int32, string, string, float32), also when every label is missing."""
        return pa.table(
            {
                "query_id": pa.array([str(q) for q in self.query_id], pa.string()),
                "rank": pa.array(self.rank, pa.int32()),
                "id": pa.array([str(i) for i in self.id], pa.string()),
                "label": pa.array(
                    [None if label is None else str(label) for label in self.label], pa.string()
                ),
                "score": pa.array(self.score, pa.float32()),
            }
        )


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), or IndexInputError."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise IndexInputError(f"embeddings metadata must be JSON-serialisable: {exc}") from None


def _check_positive(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise IndexInputError(f"{what} must be a positive integer, got {value!r}")


class Index:
    """A FAISS index with its id mapping (row -> id, label) and metadata.

    Create one with :meth:`build` or :meth:`open`; write it with :meth:`save`. Searches
    may run from many threads at once.
    """

    def __init__(
        self, faiss_index: faiss.Index, ids: np.ndarray, labels: np.ndarray, info: IndexInfo
    ) -> None:
        self._faiss = faiss_index
        self._ids = ids
        self._labels = labels
        self._lookup = pd.Index(ids)
        knob = _knob(faiss_index)
        self._knob = None if knob is None else knob[0]
        self.info = info

    def __len__(self) -> int:
        return self.info.count

    def __contains__(self, id_: object) -> bool:
        """Whether the index holds a row with this id."""
        try:
            return id_ in self._lookup
        except TypeError:  # unhashable
            return False

    @property
    def labels(self) -> np.ndarray:
        """The label of each row (None where unlabelled), in row order; read-only."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    def __repr__(self) -> str:
        info = self.info
        return f"Index({info.factory!r}, {info.count:,} x {info.dim}, metric={info.metric})"

    @property
    def meta(self) -> dict[str, Any]:
        """Metadata of the embeddings the index was built from (backbone, weights, layer,
        preprocessing, ...): hand it to the image embedder so queries match."""
        return self.info.embeddings

    # --- building ------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        data: IndexData,
        *,
        metric: Metric | str = Metric.COSINE,
        index: IndexKind | str = IndexKind.AUTO,
        memory_budget: int | str | None = None,
        target_recall: float = 0.95,
        tune_k: int = 10,
        seed: int = 0,
        meta: Mapping[str, Any] | None = None,
        embeddings_path: str | os.PathLike[str] | None = None,
    ) -> Index:
        """Build an index over ``data`` (see :func:`as_block_source` for what it may be).

        metric: cosine (inner product of L2-normalised vectors), l2 or ip.
        index: an :class:`IndexKind` or a FAISS factory string; ``auto`` picks by size and
            budget (see :func:`plan_index`).
        memory_budget: bytes, or a string for :func:`parse_memory_budget`; None: unbounded.
            Bounds the index; the build also holds a sample of at most ``SAMPLE_BYTES``.
        target_recall: recall@``tune_k`` that the stored default nprobe / efSearch reaches
            on up to ``TUNE_QUERIES`` held-out sample rows against exact search.
        seed: drives the row sample and the k-means initialisation.
        meta: the embeddings' metadata; defaults to the ``meta`` of the first block.
        embeddings_path: the dataset ``data`` was read from, recorded (absolute) so that
            :func:`eval_embeddings` can stream it again later.
        """
        metric = _parse_metric(metric)
        budget = None if memory_budget is None else parse_memory_budget(memory_budget)
        if not 0 < target_recall <= 1:
            raise IndexInputError(f"target_recall must be in (0, 1], got {target_recall!r}")
        _check_positive(tune_k, "tune_k")
        source = as_block_source(data)
        started = lap = time.perf_counter()
        seconds: dict[str, float] = {}

        def timed(stage: str) -> None:
            nonlocal lap
            now = time.perf_counter()
            seconds[stage], lap = now - lap, now

        scan, sample, sample_rows = _scan(source, metric=metric, seed=seed)
        n, dim = len(scan.ids), scan.dim
        embeddings = _jsonable(dict(meta if meta is not None else scan.meta or {}))
        if embeddings.get("dim", dim) != dim:
            raise IndexInputError(
                f"the embeddings metadata says dim {embeddings['dim']} but the vectors have "
                f"{dim} columns; the dataset is inconsistent, re-extract it"
            )
        # the sample is in random order: its first rows are the tuning queries, held out
        # of training so that tuning sees the index as a new query would
        n_queries = min(TUNE_QUERIES, max(1, n // 10), len(sample_rows))
        queries, query_rows = sample[:n_queries].copy(), sample_rows[:n_queries].copy()
        plan = plan_index(
            n, dim, index=index, memory_budget=budget, train_rows=len(sample) - n_queries
        )
        log.info("index %s: %s", plan.factory, plan.reason)
        timed("scan")

        faiss_index = _create(plan, dim, metric, seed)
        train_rows = 0
        if not faiss_index.is_trained:
            train_rows = min(plan.train_rows, len(sample) - n_queries)
            log.info("training %s on %d sampled vectors", plan.factory, train_rows)
            faiss_index.train(sample[n_queries : n_queries + train_rows])
        del sample, sample_rows  # up to SAMPLE_BYTES: free it before the add pass
        timed("train")

        knob = _knob(faiss_index)
        truth = None if knob is None else _ExactTopK(queries, query_rows, k=tune_k, metric=metric)
        for start, x in _prepared_blocks(source, dim=dim, metric=metric, ids=scan.ids):
            faiss_index.add(x)
            if truth is not None:
                truth.add(start, x)
            log.debug("added rows %d..%d", start, start + len(x))
        timed("add")

        tuning = None
        if truth is not None:
            tuning = _tune(
                faiss_index, queries, query_rows, truth.rows(), k=tune_k, target=target_recall
            )
            log.info(
                "tuned %s=%d: recall@%d %.3f", tuning.knob, tuning.value, tune_k, tuning.recall
            )
            # also the default of the bare FAISS file, for tools that read it without us
            name = "nprobe" if tuning.knob is SearchKnob.NPROBE else "efSearch"
            faiss.ParameterSpace().set_index_parameter(faiss_index, name, tuning.value)
        timed("tune")
        log.info(
            "built %s in %s", plan.factory, ", ".join(f"{k} {t:.1f} s" for k, t in seconds.items())
        )

        source_path = None if embeddings_path is None else str(Path(embeddings_path).resolve())
        info = IndexInfo(
            metric=metric,
            normalized=metric is Metric.COSINE,
            kind=plan.kind,
            factory=plan.factory,
            reason=plan.reason,
            dim=dim,
            count=n,
            memory_budget=budget,
            index_bytes=_serialized_bytes(faiss_index),
            train_rows=train_rows,
            tuning=tuning,
            build_seconds=round(time.perf_counter() - started, 3),
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            faiss_version=faiss.__version__,
            embeddings=embeddings,
            embeddings_path=source_path,
        )
        if budget is not None and info.index_bytes > budget:
            log.warning(
                "the index takes %s, over the %s budget",
                format_bytes(info.index_bytes),
                format_bytes(budget),
            )
        return cls(faiss_index, scan.ids, scan.labels, info)

    # --- files ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the index directory ``path``: ``index.faiss``, ``ids.parquet`` (id, label
        per row) and ``index.json`` (:class:`IndexInfo`).

        The files go to a temporary sibling directory that is renamed into place, so a
        reader sees the old index or the new one, never a mix. An existing ``path`` is
        replaced only with ``overwrite`` and only if it is an index directory (or empty).
        """
        path = Path(path)
        check_destination(path, overwrite=overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.mkdir()
        try:
            faiss.write_index(self._faiss, str(tmp / INDEX_FILE))
            pq.write_table(
                pa.table({"id": pa.array(self._ids), "label": pa.array(self._labels)}),
                tmp / IDS_FILE,
            )
            (tmp / META_FILE).write_text(json.dumps(self.info.to_dict(), indent=2) + "\n")
            if path.exists():
                old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.old")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved %r to %s", self, path)
        return path

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Index:
        """Load an index directory written by :meth:`save`."""
        path = Path(path)
        missing = [name for name in (INDEX_FILE, IDS_FILE) if not (path / name).is_file()]
        if missing and (path / META_FILE).is_file():  # else read_info says it is no index
            raise IndexFileError(
                f"index {path} is incomplete: {', '.join(missing)} missing; rebuild it"
            )
        info = read_info(path)
        try:
            faiss_index = faiss.read_index(str(path / INDEX_FILE))
            table = pq.read_table(path / IDS_FILE, columns=["id", "label"])
        except (ValueError, KeyError, TypeError, RuntimeError, pa.ArrowException) as exc:
            raise IndexFileError(f"index {path} cannot be read ({exc}); rebuild it") from None
        ids = table.column("id").to_numpy(zero_copy_only=False).astype(object)
        labels = table.column("label").to_numpy(zero_copy_only=False).astype(object)
        if not faiss_index.ntotal == len(ids) == info.count or faiss_index.d != info.dim:
            raise IndexFileError(
                f"index {path} is inconsistent: {faiss_index.ntotal} vectors of dimension "
                f"{faiss_index.d}, {len(ids)} ids, metadata says {info.count} x {info.dim}; "
                "rebuild it"
            )
        return cls(faiss_index, ids, labels, info)

    # --- searching -----------------------------------------------------------------

    def _setting(self, nprobe: int | None, ef_search: int | None) -> int | None:
        """The value of the index's search knob for one call: an override or the tuned one."""
        overrides = {SearchKnob.NPROBE: nprobe, SearchKnob.EF_SEARCH: ef_search}
        for name, value in overrides.items():
            if value is None:
                continue
            if name is not self._knob:
                takes = (
                    f"it takes {self._knob}" if self._knob else "it has no search-time parameter"
                )
                raise IndexSpecError(
                    f"{name} does not apply to this {self.info.factory} index; {takes}"
                )
            _check_positive(value, name)
        if self._knob is None:
            return None
        return overrides[self._knob] or self.info.tuning.value

    def _params(self, value: int | None) -> faiss.SearchParameters | None:
        return None if value is None else _search_parameters(self._faiss, self._knob, value)

    def search(
        self,
        vectors: np.ndarray,
        k: int = 10,
        *,
        query_ids: Sequence[Any] | np.ndarray | None = None,
        exclude_self: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchResults:
        """The k nearest neighbours of each query.

        vectors: (n, dim) float queries, in the space the index was built from (cosine
            normalisation is applied here).
        k: neighbours per query; fewer come back when the index holds fewer (or, for an
            approximate index, when the part it probes does); never placeholder ids.
        query_ids: (n,) values for the ``query_id`` column; default ``"0"``..``"n-1"``.
        exclude_self: drop the result whose id equals the query's id (needs query_ids).
        nprobe / ef_search: override the tuned setting for this call only.
        """
        _check_positive(k, "k")
        params = self._params(self._setting(nprobe, ef_search))
        x = _prepare(
            vectors,
            dim=self.info.dim,
            metric=self.info.metric,
            what="query vectors",
            dim_hint=_QUERY_DIM_HINT,
        )
        if query_ids is None:
            if exclude_self:
                raise IndexInputError(
                    "exclude_self needs query_ids to know which result is the query itself"
                )
            query_ids = np.arange(len(x)).astype(str).astype(object)
        query_ids = np.asarray(query_ids, dtype=object)
        if query_ids.shape != (len(x),):
            raise IndexInputError(
                f"{len(query_ids)} query_ids for {len(x)} query vectors; give one id per query"
            )
        exclude = self._lookup.get_indexer(query_ids) if exclude_self else None
        distances, rows = _search_rows(self._faiss, x, k, exclude, params)
        query, column = np.nonzero(rows >= 0)
        hits = rows[query, column]
        return SearchResults(
            query_id=query_ids[query],
            rank=(column + 1).astype(np.int32),
            id=self._ids[hits],
            label=self._labels[hits],
            score=self.info.metric.scores(distances[query, column]),
            metric=self.info.metric,
        )

    def search_ids(
        self,
        ids: Sequence[Any] | np.ndarray,
        k: int = 10,
        *,
        exclude_self: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchResults:
        """Neighbours of rows already in the index, by id; see :meth:`search`.

        The query vectors are reconstructed from the index: exact for Flat, HNSW and IVF-Flat,
        decoded (approximate) for SQ and PQ codes.
        """
        ids = np.asarray(ids, dtype=object)
        rows = self._lookup.get_indexer(ids)
        if (rows < 0).any():
            unknown = ", ".join(repr(i) for i in ids[rows < 0][:3])
            raise UnknownIdError(
                f"the index holds no id {unknown}; ids are as in the embeddings' id column "
                f"(e.g. {self._ids[0]!r})"
            )
        vectors = self._faiss.reconstruct_batch(rows.astype(np.int64))
        return self.search(
            vectors, k, query_ids=ids, exclude_self=exclude_self, nprobe=nprobe, ef_search=ef_search
        )

    def check_compatible(self, meta: Mapping[str, Any]) -> None:
        """Raise :class:`MetadataMismatchError` naming each of backbone, weights, layer, dim,
        preprocessing and normalize where the queries' embeddings ``meta`` differs from the
        index's (keys missing on either side are not compared)."""
        differences = [
            f"{key} {_jsonable(meta[key])!r} (queries) vs {self.meta[key]!r} (index)"
            for key in _PROVENANCE_KEYS
            if key in meta and key in self.meta and _jsonable(meta[key]) != self.meta[key]
        ]
        if differences:
            raise MetadataMismatchError(
                "the query embeddings were made differently from the index's: "
                + "; ".join(differences)
                + ". Embed the queries with the index's settings (see `embedpipe index info`) "
                "or search an index built from matching embeddings"
            )

    # --- evaluation ----------------------------------------------------------------

    def eval(
        self,
        database: IndexData,
        *,
        queries: np.ndarray | None = None,
        n_queries: int = TUNE_QUERIES,
        k: int = 10,
        seed: int = 0,
        repeats: int = 3,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> EvalReport:
        """Recall@k against exact search over ``database``, batch QPS and index size.

        database: the embeddings the index was built from (same rows, same order), streamed
            once to compute exact neighbours.
        queries: (nq, dim) float query vectors; default: ``n_queries`` rows of the index
            drawn at random (reconstructed from it), each excluded from its own results.
        repeats: timed searches of all queries; QPS is from their median.
        nprobe / ef_search: evaluate another setting than the tuned one.
        """
        _check_positive(k, "k")
        _check_positive(repeats, "repeats")
        value = self._setting(nprobe, ef_search)
        params = self._params(value)
        if queries is None:
            _check_positive(n_queries, "n_queries")
            rng = np.random.default_rng(seed)
            exclude = np.sort(rng.choice(len(self), size=min(n_queries, len(self)), replace=False))
            queries = self._faiss.reconstruct_batch(exclude)
        else:
            exclude = None
        x = _prepare(
            queries,
            dim=self.info.dim,
            metric=self.info.metric,
            what="query vectors",
            dim_hint=_QUERY_DIM_HINT,
        )
        truth = _ExactTopK(x, exclude, k=k, metric=self.info.metric)
        for start, block in _prepared_blocks(
            as_block_source(database), dim=self.info.dim, metric=self.info.metric, ids=self._ids
        ):
            truth.add(start, block)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            found = _search_rows(self._faiss, x, k, exclude, params)[1]
            seconds.append(time.perf_counter() - started)
        return EvalReport(
            k=k,
            n_queries=len(x),
            recall=float(_query_recalls(found, truth.rows()).mean()),
            qps=len(x) / float(np.median(seconds)),
            index_bytes=self.info.index_bytes,
            knob=self._knob,
            value=value,
        )


# --- index directories -------------------------------------------------------------


def read_info(path: str | os.PathLike[str]) -> IndexInfo:
    """The metadata (``index.json``) of the index directory ``path``, without loading the
    FAISS index or the ids."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise IndexFileError(
            f"{path} is not an embedpipe index: {META_FILE} is missing; "
            f"build one with `embedpipe index build EMBEDDINGS --out {path}`"
        )
    try:
        return IndexInfo.from_dict(json.loads(meta_path.read_text()))
    except IndexFileError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexFileError(f"index {path} cannot be read ({exc}); rebuild it") from None


def check_destination(path: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Raise :class:`IndexFileError` unless :meth:`Index.save` may write ``path``: it does
    not exist, or ``overwrite`` is set and it is an index directory (or empty). Call it
    before a long build to fail early."""
    path = Path(path)
    if not path.exists():
        return
    if not overwrite:
        raise IndexFileError(
            f"{path} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if not (path / META_FILE).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise IndexFileError(
            f"refusing to replace {path}: it is not an embedpipe index (no {META_FILE}); "
            "choose another output path"
        )


# --- embeddings datasets and images on disk ------------------------------------------


def embedding_blocks(path: str | os.PathLike[str]) -> BlockSource:
    """A :data:`BlockSource` over the embeddings dataset at ``path``: each call re-opens it
    and yields one :class:`embedpipe.store.Embeddings` block per Parquet part."""
    # imported here so the compute above does not depend on the Parquet layer
    from .store import iter_embedding_blocks

    return functools.partial(iter_embedding_blocks, path)


def search_embeddings(
    index: Index,
    path: str | os.PathLike[str],
    k: int = 10,
    *,
    exclude_self: bool = False,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> SearchResults:
    """Batch search: every row of the embeddings dataset at ``path`` as a query, after
    checking it was embedded like the index (:meth:`Index.check_compatible`)."""
    from .store import read_embeddings

    queries = read_embeddings(path)
    index.check_compatible(queries.meta)
    return index.search(
        queries.vectors,
        k,
        query_ids=queries.ids,
        exclude_self=exclude_self,
        nprobe=nprobe,
        ef_search=ef_search,
    )


def eval_embeddings(
    index: Index,
    path: str | os.PathLike[str] | None = None,
    **options: Any,
) -> EvalReport:
    """:meth:`Index.eval` against the embeddings dataset at ``path``, by default the one
    the index was built from (``info.embeddings_path``). ``options`` go to :meth:`Index.eval`."""
    if path is None:
        path = index.info.embeddings_path
        if path is None:
            raise IndexInputError(
                "the index does not record which embeddings it was built from; give their "
                "path (--embeddings)"
            )
        if not Path(path).exists():
            raise IndexInputError(
                f"the embeddings the index was built from, {path}, are gone; give their "
                "current path (--embeddings)"
            )
    return index.eval(embedding_blocks(path), **options)


@dataclasses.dataclass(frozen=True)
class QueryFailure:
    """A query image that could not be embedded: ``error_type`` as in an extraction's
    errors table (``not_found``, ``truncated``, ...)."""

    query: str
    error_type: str
    message: str


def search_images(
    index: Index,
    paths: Sequence[str | os.PathLike[str]],
    k: int = 10,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    embedder: QueryEmbedder | None = None,
) -> tuple[SearchResults, list[QueryFailure]]:
    """Search with image files as queries, embedded exactly as the index's embeddings were
    (backbone, weights, layer, preprocessing, precision: a
    :class:`embedpipe.engine.QueryEmbedder` of :attr:`Index.meta`, the code path of
    extraction). Pass ``embedder`` to reuse one loaded model across calls.

    Images that cannot be embedded are skipped and returned as failures; ``query_id`` is
    each path as given. Raises :class:`IndexInputError` when none could be embedded.
    """
    missing = [
        key for key in ("backbone", "weights", "layer", "preprocessing") if key not in index.meta
    ]
    if missing:
        raise IndexInputError(
            f"this index records no {', '.join(missing)} of its embeddings (it was built from "
            "bare vectors), so images cannot be embedded like them; search it by vectors"
        )
    if not paths:
        raise IndexInputError("no query images given")
    if embedder is None:
        from .engine import QueryEmbedder  # torch: loaded only when images are searched

        embedder = QueryEmbedder(index.meta)
    queries = [str(p) for p in paths]
    vectors, outcomes = embedder(queries)
    failures = [
        QueryFailure(query, str(outcome.error_type), outcome.message)
        for query, outcome in zip(queries, outcomes)
        if outcome is not None
    ]
    embedded = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if not embedded:
        reasons = "; ".join(f"{f.query}: {f.error_type} ({f.message})" for f in failures[:5])
        raise QueryImagesError(
            f"none of the {len(queries)} query images could be embedded: {reasons}", failures
        )
    results = index.search(
        vectors[embedded],
        k,
        query_ids=np.asarray([queries[i] for i in embedded], dtype=object),
        nprobe=nprobe,
        ef_search=ef_search,
    )
    return results, failures
