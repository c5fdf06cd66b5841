"""The Index: build, save, open, search and evaluate; index directories.

Tuning on held-out queries. A build tunes nprobe / efSearch on up to ``TUNE_QUERIES``
sample rows (``GRAPH_TUNE_QUERIES`` for an HNSW graph, whose recall on 1,000 ran ahead of
fresh queries' by up to 0.02: see :mod:`embedpipe.index.plan`), and these must look to the index like the new queries it will serve, yet
every row of the embeddings must end up in it. So the tuning rows are kept out of the
training sample (they do not shape the k-means centroids or codebooks), and out of the
index until it is tuned: the add pass adds every other row, in the embeddings' order,
while computing the tuning rows' exact neighbours among them; the search knob is tuned
on the tuning rows against those neighbours; then the tuning rows are added, last.
Excluding a query's own row from the results of an index that holds it is not enough:
an HNSW graph links every inserted row to its nearest neighbours, so an indexed query
reaches them through itself, and tuning would stop at a setting that new queries miss
the target at (recall@10 0.94 measured, 0.88 on fresh queries, in the tests). The index
is at most ``n / 10`` rows smaller while tuned than when complete, which changes recall
at a given setting by less than the tuning's sampling error.

So the index's rows are in the embeddings' order except that the tuning rows come last:
``ids.parquet`` maps each index row to its id, label and ``position`` in the embeddings,
which :meth:`Index.eval` uses to stream the embeddings back in their own order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import (
    IndexFileError,
    IndexInputError,
    IndexSpecError,
    MemoryBudgetError,
    MetadataMismatchError,
    UnknownIdError,
)
from ..files import atomic_write, atomic_write_text, replace_dir, temporary_sibling
from ..provenance import differences
from ..store import manifest_path
from .adding import Shard, add_and_tune, check_mergeable
from .blocks import (
    QUERY_DIM_HINT,
    IndexData,
    as_block_source,
    prepare,
    prepared_blocks,
    scan_blocks,
)
from .exact import ExactTopK, query_recalls
from .faiss_ops import create, search_knob, search_parameters, search_rows, serialized_bytes
from .ondisk import LISTS_FILE, check_on_disk, lists_file, place_lists, read_index
from .plan import (
    GRAPH_TUNE_QUERIES,
    TUNE_QUERIES,
    IndexKind,
    Metric,
    SearchKnob,
    format_bytes,
    parse_memory_budget,
    parse_metric,
    plan_candidates,
    tune_queries,
)
from .tuning import Tuning

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


FORMAT_VERSION = 2
"""Version of the index directory layout. 2 stores the index rows in their own order,
with each row's ``position`` in the embeddings; :meth:`Index.open` also reads 1 (rows in
the embeddings' order) and refuses others."""

_READABLE_FORMATS = (1, FORMAT_VERSION)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"

RESULT_COLUMNS = ("query_id", "rank", "id", "label", "score")
"""Columns of :meth:`SearchResults.to_frame`, one row per (query, rank)."""


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
    update: dict[str, Any] | None = None  # the last `index update`: counts, recall, when
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexInfo:
        version = data.get("format_version")
        if version not in _READABLE_FORMATS:
            raise IndexFileError(
                f"index format {version!r} is not one this embedpipe reads "
                f"({', '.join(map(str, _READABLE_FORMATS))}); "
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


def _over_budget(n: int, dim: int, budget: int, over: list[tuple[str, int]]) -> MemoryBudgetError:
    """The error for a build whose every plan, built, came out over ``budget`` bytes."""
    built = ", ".join(f"{factory} took {format_bytes(size)}" for factory, size in over)
    smallest = min(size for _, size in over)
    return MemoryBudgetError(
        f"no index for {n:,} x {dim} vectors fits the memory budget of {format_bytes(budget)} "
        f"once built ({built}); raise the budget to at least {format_bytes(smallest)}, or choose a "
        "smaller index (one with fewer bytes per vector, e.g. a FAISS factory string with "
        "fewer PQ code bytes)"
    )


class Index:
    """A FAISS index with its id mapping (row -> id, label, position) and metadata.

    Create one with :meth:`build` or :meth:`open`; write it with :meth:`save`. Searches
    may run from many threads at once.
    """

    def __init__(
        self,
        faiss_index: faiss.Index,
        ids: np.ndarray,
        labels: np.ndarray,
        positions: np.ndarray,
        info: IndexInfo,
        fingerprints: np.ndarray | None = None,
    ) -> None:
        """ids, labels: (n,) object per index row; positions: (n,) int64, each index row's
        row in the embeddings (a permutation: the tuning queries come last); fingerprints:
        (n,) int64 digests of the rows' vectors (None for an index written before them),
        which let :func:`~embedpipe.index.update.update_index` find changed rows."""
        self._faiss = faiss_index
        self._ids = ids
        self._labels = labels
        self._positions = positions
        self._fingerprints = fingerprints
        self._lookup = pd.Index(ids)
        knob = search_knob(faiss_index)
        self._knob = None if knob is None else knob[0]
        self._knob_limit = None if knob is None else knob[1]
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
        """The label of each row (None where unlabelled), in the index's row order (not
        the embeddings': the tuning queries come last); read-only."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    @property
    def search_limit(self) -> tuple[SearchKnob, int] | None:
        """The search-time parameter and the largest value that still changes anything
        (an IVF index's nlist; the efSearch ceiling of tuning), or None for exact search."""
        return None if self._knob is None else (self._knob, self._knob_limit)

    def label_of(self, id_: str) -> str | None:
        """The label of the row ``id_`` (None when unlabelled); unknown ids raise
        :class:`UnknownIdError`."""
        if id_ not in self:
            raise UnknownIdError(f"the index holds no id {id_!r}")
        return self._labels[self._lookup.get_loc(id_)]

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
        shards: Sequence[Shard] | None = None,
        lists_dir: str | os.PathLike[str] | None = None,
    ) -> Index:
        """Build an index over ``data`` (see :func:`as_block_source` for what it may be).

        metric: cosine (inner product of L2-normalised vectors), l2 or ip.
        index: an :class:`IndexKind` or a FAISS factory string; ``auto`` picks by size and
            budget (see :func:`plan_candidates`).
        memory_budget: bytes, or a string for :func:`parse_memory_budget`; None: unbounded.
            Bounds the index as written (``info.index_bytes``): a built index over it is
            dropped for the next plan that fits (noted in ``info.reason``; each such
            fallback reads ``data`` twice more), and :class:`MemoryBudgetError` names the
            smallest size reached when none does. The build also holds a sample of at most
            ``SAMPLE_BYTES``, and at its peak the largest index it built.
        target_recall: recall@``tune_k`` that the stored default nprobe / efSearch reaches
            on up to ``TUNE_QUERIES`` sample rows (``GRAPH_TUNE_QUERIES`` for a graph)
            held out of training and, until tuning is done, of the index (see the module
            docstring).
        seed: drives the row sample and the k-means initialisation.
        meta: the embeddings' metadata; defaults to the ``meta`` of the first block.
        embeddings_path: the dataset ``data`` was read from, recorded (absolute) so that
            :func:`eval_embeddings` can stream it again later.
        shards: ``data`` split into parts that Ray tasks read and add on their own (see
            :mod:`~embedpipe.index.adding`); the scan and training stay here. None: the
            add pass runs in this process.
        lists_dir: a folder for the inverted lists of an IVF index, which are then never
            held in memory (:mod:`~embedpipe.index.ondisk`; other families are refused);
            :meth:`save` puts them into the index directory. Best on the same file system.
        """
        metric = parse_metric(metric)
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
            seconds[stage], lap = seconds.get(stage, 0.0) + now - lap, now

        scan, sample, sample_rows = scan_blocks(source, metric=metric, seed=seed)
        n, dim = len(scan.ids), scan.dim
        embeddings = _jsonable(dict(meta if meta is not None else scan.meta or {}))
        if embeddings.get("dim", dim) != dim:
            raise IndexInputError(
                f"the embeddings metadata says dim {embeddings['dim']} but the vectors have "
                f"{dim} columns; the dataset is inconsistent, re-extract it"
            )
        # the sample is in random order: its first rows are the tuning queries, held out
        # of training and of the index until it is tuned (see the module docstring); as
        # many as a graph tunes on are kept out of training, whatever the plan
        pool = min(GRAPH_TUNE_QUERIES, max(1, n // 10), len(sample_rows))
        pool_queries, pool_rows = sample[:pool].copy(), sample_rows[:pool].copy()
        candidates = plan_candidates(
            n, dim, index=index, memory_budget=budget, train_rows=len(sample) - pool
        )
        training: np.ndarray | None = sample[pool:]
        del sample, sample_rows  # ``training`` keeps them alive until the add pass
        timed("scan")

        if lists_dir is not None:  # only inverted lists go to disk
            candidates = [p for p in candidates if "IVF" in p.factory] or candidates[:1]
        over: list[tuple[str, int]] = []  # (factory, bytes) of each build over the budget
        for attempt, plan in enumerate(candidates, 1):
            log.info("index %s: %s", plan.factory, plan.reason)
            faiss_index = create(plan, dim, metric, seed)
            train_rows = 0
            if not faiss_index.is_trained:
                if training is None:  # freed for an earlier add pass: sample again
                    training = scan_blocks(source, metric=metric, seed=seed)[1][pool:]
                train_rows = min(plan.train_rows, len(training))
                log.info("training %s on %d sampled vectors", plan.factory, train_rows)
                faiss_index.train(training[:train_rows])
            training = None  # up to SAMPLE_BYTES: free it before the add pass
            timed("train")
            if shards is not None:
                check_mergeable(faiss_index, plan.factory)
            if lists_dir is not None:
                check_on_disk(faiss_index, plan.factory)
            knob = search_knob(faiss_index)
            n_queries = min(tune_queries(None if knob is None else knob[0]), pool)
            faiss_index, positions, tuning = add_and_tune(
                faiss_index,
                source,
                scan.ids,
                pool_queries[:n_queries],
                pool_rows[:n_queries],
                metric=metric,
                tune_k=tune_k,
                target_recall=target_recall,
                shards=shards,
                lists_dir=lists_dir,
            )
            timed("add and tune")
            index_bytes = serialized_bytes(faiss_index)
            if budget is None or index_bytes <= budget:
                break
            log.warning(
                "%s takes %s, over the %s budget%s",
                plan.factory,
                format_bytes(index_bytes),
                format_bytes(budget),
                "; trying the next plan" if attempt < len(candidates) else "",
            )
            over.append((plan.factory, index_bytes))
        else:
            raise _over_budget(n, dim, budget, over)
        log.info(
            "built %s in %s", plan.factory, ", ".join(f"{k} {t:.1f} s" for k, t in seconds.items())
        )
        reason = plan.reason
        if over:
            built = ", ".join(f"{factory} took {format_bytes(size)}" for factory, size in over)
            reason += f"; fell back from larger builds: {built} > budget {format_bytes(budget)}"
        if (on_disk := lists_file(faiss_index)) is not None:
            reason += f"; inverted lists on disk ({format_bytes(on_disk.stat().st_size)}, {LISTS_FILE})"

        source_path = None if embeddings_path is None else str(Path(embeddings_path).resolve())
        info = IndexInfo(
            metric=metric,
            normalized=metric is Metric.COSINE,
            kind=plan.kind,
            factory=plan.factory,
            reason=reason,
            dim=dim,
            count=n,
            memory_budget=budget,
            index_bytes=index_bytes,
            train_rows=train_rows,
            tuning=tuning,
            build_seconds=round(time.perf_counter() - started, 3),
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            faiss_version=faiss.__version__,
            embeddings=embeddings,
            embeddings_path=source_path,
        )
        rows = (scan.ids[positions], scan.labels[positions], positions)
        return cls(faiss_index, *rows, info, scan.fingerprints[positions])

    # --- files ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the index directory ``path``: ``index.faiss``, ``ids.parquet`` (id, label
        and position in the embeddings per index row) and ``index.json`` (:class:`IndexInfo`).

        The files go to a temporary sibling directory that then takes the place of
        ``path`` (:func:`embedpipe.files.replace_dir`: exchanged in one step where one is
        there), so a reader sees the old index or the new one, never a mix and never
        nothing. An existing ``path`` is replaced only with ``overwrite`` and only if it is
        an index directory (or empty).
        """
        path = Path(path)
        check_destination(path, overwrite=overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        tmp.mkdir()
        try:
            place_lists(self._faiss, tmp)
            atomic_write(tmp / INDEX_FILE, lambda f: faiss.write_index(self._faiss, str(f)))
            ids = pa.table(
                {
                    "id": pa.array(self._ids),
                    "label": pa.array(self._labels),
                    "position": pa.array(self._positions, pa.int64()),
                }
            )
            if self._fingerprints is not None:
                ids = ids.append_column("fingerprint", pa.array(self._fingerprints, pa.int64()))
            atomic_write(tmp / IDS_FILE, lambda f: pq.write_table(ids, f))
            atomic_write_text(json.dumps(self.info.to_dict(), indent=2) + "\n", tmp / META_FILE)
            replace_dir(tmp, path)
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
            faiss_index = read_index(path / INDEX_FILE)  # on-disk lists: found beside it
            table = pq.read_table(path / IDS_FILE)
            ids = table.column("id").to_numpy(zero_copy_only=False).astype(object)
            labels = table.column("label").to_numpy(zero_copy_only=False).astype(object)
            positions = (
                np.arange(len(ids))  # format 1 kept the rows in the embeddings' order
                if info.format_version == 1
                else table.column("position").to_numpy().astype(np.int64)
            )
            prints = None
            if "fingerprint" in table.column_names:
                prints = table.column("fingerprint").to_numpy().astype(np.int64)
        except (ValueError, KeyError, TypeError, RuntimeError, pa.ArrowException) as exc:
            raise IndexFileError(f"index {path} cannot be read ({exc}); rebuild it") from None
        if not faiss_index.ntotal == len(ids) == info.count or faiss_index.d != info.dim:
            raise IndexFileError(
                f"index {path} is inconsistent: {faiss_index.ntotal} vectors of dimension "
                f"{faiss_index.d}, {len(ids)} ids, metadata says {info.count} x {info.dim}; "
                "rebuild it"
            )
        return cls(faiss_index, ids, labels, positions, info, prints)

    def parts(self) -> tuple[faiss.Index, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(FAISS index, ids, labels, positions, fingerprints) as :meth:`__init__` takes them:
        the state :mod:`~embedpipe.index.update` rewrites. Not copies."""
        return self._faiss, self._ids, self._labels, self._positions, self._fingerprints

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
        return None if value is None else search_parameters(self._faiss, self._knob, value)

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
        x = prepare(
            vectors,
            dim=self.info.dim,
            metric=self.info.metric,
            what="query vectors",
            dim_hint=QUERY_DIM_HINT,
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
        distances, rows = search_rows(self._faiss, x, k, exclude, params)
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
        found = differences(meta, self.meta, keys="space", names=("queries", "index"))
        if found:
            raise MetadataMismatchError(
                "the query embeddings were made differently from the index's: "
                + "; ".join(found)
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
        queries: (nq, dim) float query vectors that are not in the index, e.g. embeddings
            of held-out images: the recall new queries see. Default: ``n_queries`` rows of
            the index drawn at random (reconstructed from it), each excluded from its own
            results; quick, but optimistic where an indexed row leads the search to its
            neighbours (an HNSW graph links every row to them), unlike build-time tuning,
            which measures queries held out of the index.
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
        x = prepare(
            queries,
            dim=self.info.dim,
            metric=self.info.metric,
            what="query vectors",
            dim_hint=QUERY_DIM_HINT,
        )
        # the database streams in the embeddings' order: exact neighbours are found by
        # position there, then mapped to index rows
        row_at = np.empty_like(self._positions)
        row_at[self._positions] = np.arange(len(row_at))
        truth = ExactTopK(
            x, None if exclude is None else self._positions[exclude], k=k, metric=self.info.metric
        )
        for start, block in prepared_blocks(
            as_block_source(database),
            dim=self.info.dim,
            metric=self.info.metric,
            ids=self._ids[row_at],
        ):
            truth.add(start, block)
        truth_positions = truth.rows()
        truth_rows = np.where(truth_positions >= 0, row_at[truth_positions], -1)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            found = search_rows(self._faiss, x, k, exclude, params)[1]
            seconds.append(time.perf_counter() - started)
        return EvalReport(
            k=k,
            n_queries=len(x),
            recall=float(query_recalls(found, truth_rows).mean()),
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
        if any(path.glob("part-*.parquet")) or manifest_path(path) is not None:
            raise IndexFileError(
                f"{path} is an embeddings dataset, not an index: build an index from it with "
                f"`embedpipe index build {path} --out {path.with_name(path.name + '-index')}`"
            )
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
            f"{path} already exists; replace it with overwrite=True (on the command line "
            "--overwrite), or write elsewhere"
        )
    if not (path / META_FILE).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise IndexFileError(
            f"refusing to replace {path}: it is not an embedpipe index (no {META_FILE}); "
            "choose another output path"
        )
