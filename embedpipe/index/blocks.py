"""Blocks of vectors: the sources an index is built from, validated, sampled and scanned.

A build reads its source twice (scan, then add), so sources are re-iterable callables of
blocks, never one big matrix.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from ..errors import (
    DimensionMismatchError,
    IndexInputError,
    MetadataMismatchError,
)
from .plan import MAX_SAMPLE_ROWS, SAMPLE_BYTES, Metric

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


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


QUERY_DIM_HINT = "embed the queries with the backbone and layer recorded in the index (Index.meta)"
_BLOCK_DIM_HINT = "every block of a dataset must have the same width; re-extract the dataset"


def prepare(
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


#: odd 64-bit multipliers of the fingerprint, one per pair of float32s (fixed: fingerprints
#: are stored and compared across runs)
_FINGERPRINT_KEYS = np.random.default_rng(0x5EED).integers(1, 2**63, size=8192, dtype=np.uint64) | np.uint64(1)


def fingerprints(x: np.ndarray) -> np.ndarray:
    """(n,) int64: a 64-bit digest of each row of the prepared vectors ``x`` (n, dim)
    float32, kept per index row so that an update finds the rows whose vector changed.

    A multilinear hash of the row's 64-bit words (sum of word x random odd key, mod 2^64),
    vectorised: two different rows collide with probability about 2^-64 (it guards
    against re-embedded images, not adversaries), at numpy speed rather than a hash call
    per row."""
    x = np.ascontiguousarray(x, np.float32)
    if x.shape[1] % 2:
        x = np.pad(x, ((0, 0), (0, 1)))
    words = x.view(np.uint64)
    if words.shape[1] > len(_FINGERPRINT_KEYS):
        raise ValueError(f"vectors wider than {2 * len(_FINGERPRINT_KEYS)} dims have no fingerprint")
    h = (words * _FINGERPRINT_KEYS[: words.shape[1]]).sum(axis=1, dtype=np.uint64)
    h ^= h >> np.uint64(31)  # mix the high bits down: the low bits of a product sum are weak
    return h.view(np.int64)


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
    fingerprints: np.ndarray  # (n,) int64, see fingerprints()


def scan_blocks(
    source: BlockSource, *, metric: Metric, seed: int
) -> tuple[_Scan, np.ndarray, np.ndarray]:
    """First pass: validate, collect ids and labels, sample rows.

    Returns the scan and the sample: vectors (s, dim) float32 and their rows (s,) int64,
    in random order.
    """
    ids, labels, prints = [], [], []
    dim: int | None = None
    meta = None
    sample: _Sample | None = None
    start = 0
    for block in source():
        x = prepare(
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
            sample = _Sample(min(MAX_SAMPLE_ROWS, max(1, SAMPLE_BYTES // (4 * dim))), dim, seed)
        block_ids, block_labels = _block_ids(block, len(x))
        ids.append(block_ids)
        labels.append(block_labels)
        prints.append(fingerprints(x))
        sample.offer(start, x)
        start += len(x)
    if dim is None or start == 0:
        raise IndexInputError("no vectors to index: the source is empty; extract some images first")
    all_ids = np.concatenate(ids)
    duplicated = pd.Index(all_ids).duplicated()
    if duplicated.any():
        examples = ", ".join(repr(i) for i in all_ids[duplicated][:3])
        raise IndexInputError(f"ids must be unique; repeated: {examples}")
    scan = _Scan(all_ids, np.concatenate(labels), dim, meta, np.concatenate(prints))
    return scan, *sample.take()


def prepared_blocks(
    source: BlockSource, *, dim: int, metric: Metric, ids: np.ndarray
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, prepared vectors) per block, checking the source yields ``ids`` in order."""
    start = 0
    for block in source():
        x = prepare(
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
