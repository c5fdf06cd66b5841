"""Choosing an index: metrics, kinds, memory budgets, and the plan that fits a collection.

The constants here are the measured thresholds ``auto`` decides by (see docs/index.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterator
from enum import StrEnum
from typing import TYPE_CHECKING

import faiss
import numpy as np

from ..errors import (
    IndexInputError,
    IndexSpecError,
    MemoryBudgetError,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


SAMPLE_BYTES = 384 * 2**20
"""Most bytes of vectors a build keeps as its training and tuning sample: enough for
4·√n lists of at least 39 training rows each up to 1M x 512. Fewer lists than the
collection has natural clusters make k-means pool several clusters into a few huge lists
(1M x 512 clustered around ~3,300 centres: 2048 lists trained on 130k rows were 4x
imbalanced and needed nprobe 9 at 4x Flat QPS for recall@10 0.95; 4096 lists on 164k
rows reached 0.98 at nprobe 2, 79x Flat)."""

FLAT_MAX_BYTES = 64 * 2**20
"""``auto`` searches exactly while the vectors take at most this much: a batched exact
search over 64 MiB runs thousands of queries a second and needs no tuning."""

HNSW_MAX_ROWS = 2_000_000
"""``auto`` builds a graph only up to this many vectors (and only where IVF cannot be
trained with its lists, see :func:`plan_candidates`): insertion costs grow with the graph,
and beyond a few million an IVF build on a few cores is hours faster."""

HNSW_M = 32
BUDGET_HEADROOM = 0.9
"""Fraction of the memory budget an index's size estimate may fill; the rest absorbs
estimation error, allocator slack and search buffers. The built index itself must fit the
whole budget: :meth:`Index.build` measures it and falls back to the next plan if not."""

TUNE_QUERIES = 1000
"""Tuning queries (at most a tenth of the rows) held out of the training sample, and out
of the index until tuning is done (see :mod:`embedpipe.index.core`)."""

GRAPH_TUNE_QUERIES = 4000
"""Tuning queries for a graph (HNSW). On 1,000 a graph's tuned recall ran ahead of what
fresh queries then got: 200k x 512 clustered, HNSW32 tuned to efSearch 52 at recall@10
0.961, and 3,000 fresh queries got 0.942 there (a second build: 0.961 against 0.944).
On 4,000 the two agree: three builds tuned 0.955, fresh 0.953, 0.956 and 0.951. An IVF
index keeps 1,000: its tuned and measured figures agree there (``benchmarks/index.py``),
and its exact neighbours cost a pass over the rows per query."""


def tune_queries(knob: SearchKnob | None) -> int:
    """How many held-out queries tune ``knob`` (none for exact search)."""
    if knob is None:
        return 0
    return GRAPH_TUNE_QUERIES if knob is SearchKnob.EF_SEARCH else TUNE_QUERIES

EF_SEARCH_MAX = 4096

_MIN_TRAIN_PER_CENTROID = 39  # FAISS k-means warns below this many points per centroid
_MAX_TRAIN_PER_CENTROID = 256  # and subsamples above it
MAX_SAMPLE_ROWS = 2**18
_PQ_M = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
_PQ_MIN_NBITS = 4
RECALL_PLATEAU = 0.0005  # tuning stops doubling work that gains less recall than this
Z_95 = 1.645  # one-sided 95% normal quantile


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


def parse_metric(value: Metric | str) -> Metric:
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


def _ideal_nlist(n: int) -> int:
    """The power of two nearest 4*sqrt(n) (FAISS's guideline)."""
    return 2 ** round(math.log2(4 * math.sqrt(n)))


def _nlist(n: int, train_rows: int) -> int:
    """Inverted lists: :func:`_ideal_nlist`, capped so that every centroid has at least 39
    training points."""
    return max(1, min(_ideal_nlist(n), _floor_pow2(train_rows / _MIN_TRAIN_PER_CENTROID)))


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
    """Choose the index for ``n`` vectors of ``dim`` floats: the first of
    :func:`plan_candidates`."""
    plans = plan_candidates(n, dim, index=index, memory_budget=memory_budget, train_rows=train_rows)
    return plans[0]


def plan_candidates(
    n: int,
    dim: int,
    *,
    index: IndexKind | str = IndexKind.AUTO,
    memory_budget: int | None = None,
    train_rows: int,
) -> list[IndexPlan]:
    """The indexes for ``n`` vectors of ``dim`` floats whose estimated size fits
    ``BUDGET_HEADROOM`` of the budget, most preferred first.

    ``index`` is an :class:`IndexKind` (or its value) or a FAISS factory string (one plan,
    without an estimate). ``memory_budget`` (bytes) bounds the index; ``None`` means no
    bound. ``train_rows`` is how many sample rows are available for training.

    :func:`plan_index` takes the first; :meth:`Index.build` falls back to the next when a
    built index turns out larger than the budget, as estimates are not exact.

    ``auto`` prefers Flat while the vectors take at most ``FLAT_MAX_BYTES``; then IVF-Flat;
    IVF-SQ8 (a byte per dimension); IVF-PQ with the most code bytes first, rotated and
    reduced by OPQ when each code byte must stand for more than 4 dimensions. An HNSW graph
    comes before IVF-Flat only where the sample cannot train the ~4·√n lists the collection
    needs (and up to ``HNSW_MAX_ROWS`` vectors): with its lists, IVF-Flat searched 1M x 512
    at 167x Flat for recall@10 0.98 where HNSW32 reached 26x, and it builds in a fraction
    of the time; with too few lists k-means pools clusters into huge lists (see
    :data:`SAMPLE_BYTES`) and the graph is the faster search. Raises
    :class:`MemoryBudgetError` when no estimate fits.
    """
    if n < 1 or dim < 1:
        raise IndexInputError(f"cannot plan an index for {n} vectors of dimension {dim}")
    kind = index if isinstance(index, IndexKind) else _index_kind_or_none(index)
    if kind is None:
        why = "FAISS factory string given by the caller"
        return [IndexPlan(None, index, why, train_rows, None)]
    candidates = _candidates(n, dim, kind, train_rows, memory_budget)
    if memory_budget is None:
        return candidates
    fitting = [p for p in candidates if p.estimated_bytes <= memory_budget * BUDGET_HEADROOM]
    if fitting:
        return fitting
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
    full_lists = trainable and nlist >= _ideal_nlist(n)
    if kind is IndexKind.HNSW or (auto and n <= HNSW_MAX_ROWS and not full_lists):
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
