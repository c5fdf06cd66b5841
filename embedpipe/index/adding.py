"""The add pass of a build, on this machine or in Ray tasks: every row into the trained
index, the tuning rows held out until the search knob is tuned (why: :mod:`~embedpipe.index.core`).

On Ray (``shards`` given) each task opens one :class:`Shard` of the embeddings (a Parquet
part) itself, adds its rows to its own copy of the trained, empty index, and offers them
to the tuning queries' exact top-k; the driver merges the copies in shard order (an IVF
index's inverted lists are appended, a flat index's codes concatenated) and the top-k
lists. Rows get the index numbers they get from a local add, in the same order inside
every inverted list, so the merged index answers exactly as a local build does. Only
index families whose storage merges can be built so: Flat and the IVF family (Flat, SQ,
PQ, with or without OPQ); an HNSW graph is one structure and is refused.

With ``lists_dir`` the inverted lists are written to disk instead (:mod:`~embedpipe.index.ondisk`):
each block (here) or shard (a Ray task) goes to a shard file, and the files are merged
into ``lists.ivfdata``; the same rows get the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np

from ..errors import IndexSpecError
from .blocks import BlockSource, prepared_blocks
from .exact import ExactTopK
from .faiss_ops import search_knob
from .ondisk import LISTS_FILE, ShardWriter, write_shard
from .plan import Metric, SearchKnob
from .tuning import Tuning, tune_knob

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rows ``start``..``start + rows`` of a build's source that a Ray task can read on its
    own: ``source`` is a picklable :data:`BlockSource` over just those rows."""

    source: BlockSource
    start: int
    rows: int


def add_and_tune(
    faiss_index: faiss.Index,
    source: BlockSource,
    ids: np.ndarray,
    queries: np.ndarray,
    query_rows: np.ndarray,
    *,
    metric: Metric,
    tune_k: int,
    target_recall: float,
    shards: Sequence[Shard] | None = None,
    lists_dir: str | os.PathLike[str] | None = None,
) -> tuple[faiss.Index, np.ndarray, Tuning | None]:
    """Add every row of ``source`` to the trained ``faiss_index`` and tune its search knob.

    ids: (n,) object, the ids ``source`` must yield, in order. queries: (nq, dim) float32,
    the prepared vectors of the dataset rows ``query_rows`` (nq,) int64. ``shards``: the
    same rows split for Ray tasks (None: add here, block by block). ``lists_dir``: write an
    IVF index's inverted lists there (``lists.ivfdata``) instead of holding them in memory.

    An index with a search knob gets the other rows first, in dataset order, while the
    exact neighbours of the queries among them are computed; it is tuned on the queries,
    which are then added last. An exact index gets every row in dataset order. Returns the
    index (``faiss_index`` itself, or for ``lists_dir`` a copy whose lists are on disk),
    the dataset position of each index row, (n,) int64, and the tuning (None for an exact
    index).
    """
    held_out = np.zeros(len(ids), dtype=bool)
    truth = None
    if search_knob(faiss_index) is not None:
        held_out[query_rows] = True
        truth = ExactTopK(queries, None, k=tune_k, metric=metric)
    positions = np.flatnonzero(~held_out)
    if lists_dir is not None:
        writer = ShardWriter(faiss_index, lists_dir)
        try:
            index, tuning = _tune_on_disk(writer, source, ids, held_out, truth, queries, metric=metric,
                                          shards=shards, k=tune_k, target=target_recall)
        finally:
            writer.close()
        return index, np.concatenate([positions, query_rows]), tuning
    if shards is None:
        _add_rows(faiss_index, source, ids, held_out, truth, metric=metric)
    else:
        _add_on_ray(faiss_index, shards, ids, held_out, truth, metric=metric,
                    queries=queries if truth is not None else None, k=tune_k)
    if truth is None:
        return faiss_index, positions, None
    tuning = tune_knob(faiss_index, queries, truth.rows(), k=tune_k, target=target_recall)
    faiss_index.add(queries)
    _set_default(faiss_index, tuning)
    return faiss_index, np.concatenate([positions, query_rows]), tuning


def _set_default(faiss_index: faiss.Index, tuning: Tuning) -> None:
    log.info("tuned %s=%d: recall@%d %.3f", tuning.knob, tuning.value, tuning.k, tuning.recall)
    # also the default of the bare FAISS file, for tools that read it without us
    name = "nprobe" if tuning.knob is SearchKnob.NPROBE else "efSearch"
    faiss.ParameterSpace().set_index_parameter(faiss_index, name, tuning.value)


def _tune_on_disk(writer: ShardWriter, source: BlockSource, ids: np.ndarray, held_out: np.ndarray,
                  truth: ExactTopK, queries: np.ndarray, *, metric: Metric,
                  shards: Sequence[Shard] | None, k: int, target: float) -> tuple[faiss.Index, Tuning]:
    """The add pass into shard files, the tuning on their merged lists, and the index that
    is kept: the lists merged again with the tuning rows as the last shard (on-disk lists
    cannot grow once merged, see :mod:`~embedpipe.index.ondisk`)."""
    if shards is None:
        for first_row, x in _kept_blocks(source, ids, held_out, truth, dim=queries.shape[1], metric=metric):
            writer.add(x, first_row)
    else:
        _shards_on_ray(writer, shards, ids, held_out, truth, queries, metric=metric, k=k)
    tuning_lists = writer.merge("tuning.ivfdata")
    tuning = tune_knob(tuning_lists, queries, truth.rows(), k=k, target=target)
    del tuning_lists
    (writer.lists_dir / "tuning.ivfdata").unlink()
    last = writer.scratch / "queries.index"
    write_shard(writer.trained, [(int((~held_out).sum()), queries)], last)
    index = writer.merge(LISTS_FILE, [last])
    _set_default(index, tuning)
    return index, tuning


def _kept_blocks(source: BlockSource, ids: np.ndarray, held_out: np.ndarray, truth: ExactTopK | None,
                 *, dim: int, metric: Metric, first_row: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(index row of the block's first row, prepared rows) for the rows of ``source``
    (which must yield ``ids``) that are not ``held_out``, numbered from ``first_row``;
    each block is offered to ``truth`` under those numbers first."""
    for start, x in prepared_blocks(source, dim=dim, metric=metric, ids=ids):
        kept = ~held_out[start : start + len(x)]
        if not kept.all():
            x = x[kept]
        if truth is not None:
            truth.add(first_row, x)
        yield first_row, x
        log.debug("rows %d..%d", start, start + len(kept))
        first_row += len(x)


def _add_rows(index: faiss.Index, source: BlockSource, ids: np.ndarray, held_out: np.ndarray,
              truth: ExactTopK | None, *, metric: Metric, offset: int = 0) -> None:
    """Add the rows of ``source`` that are not ``held_out`` to ``index`` (whose rows count
    from ``offset``), offering them to ``truth``."""
    for _, x in _kept_blocks(source, ids, held_out, truth, dim=index.d, metric=metric,
                             first_row=offset + index.ntotal):
        index.add(x)


# --- Ray -----------------------------------------------------------------------------


def check_mergeable(faiss_index: faiss.Index, factory: str) -> None:
    """Refuse an index whose storage cannot be built in parts and merged."""
    ivf = faiss.try_extract_index_ivf(faiss_index)
    if ivf is None and not isinstance(faiss_index, faiss.IndexFlatCodes):
        raise IndexSpecError(
            f"{factory} cannot be built on Ray: only flat and IVF indexes merge from parts "
            "(an HNSW graph is one structure); use --engine local, or --index auto/ivf/ivfsq/ivfpq"
        )


def _add_shard(trained: np.ndarray, shard: Shard, ids: np.ndarray, held_out: np.ndarray,
               offset: int, queries: np.ndarray | None, k: int, metric: Metric):
    """One Ray task: the shard's kept rows added to a copy of the trained index (index
    numbers from ``offset``), and their exact top-k for the queries. Returns the copy,
    serialised, and the top-k (distances, rows), or None without queries."""
    index = faiss.deserialize_index(trained)  # empty: its rows count from ``offset``
    truth = None if queries is None else ExactTopK(queries, None, k=k, metric=metric)
    _add_rows(index, shard.source, ids, held_out, truth, metric=metric, offset=offset)
    return faiss.serialize_index(index), None if truth is None else truth.partial()


def _merge(into: faiss.Index, part: faiss.Index) -> None:
    """Append ``part``'s rows to ``into`` (both copies of one trained index)."""
    ivf = faiss.try_extract_index_ivf(into)
    if ivf is None:  # flat codes: merge_from would refuse a deserialised twin's C++ type
        into.add_sa_codes(faiss.vector_to_array(part.codes).reshape(part.ntotal, -1))
        return
    ivf.merge_from(faiss.extract_index_ivf(part), into.ntotal)
    into.ntotal = ivf.ntotal  # a wrapper (OPQ's pre-transform) counts its own rows


def _add_on_ray(faiss_index: faiss.Index, shards: Sequence[Shard], ids: np.ndarray,
                held_out: np.ndarray, truth: ExactTopK | None, *, metric: Metric,
                queries: np.ndarray | None, k: int) -> None:
    import ray

    ivf = faiss.try_extract_index_ivf(faiss_index)
    direct_map = ivf is not None and ivf.direct_map.type != faiss.DirectMap.NoMap
    if direct_map:  # FAISS merges inverted lists only without a direct map: made again below
        ivf.make_direct_map(False)
    trained = ray.put(faiss.serialize_index(faiss_index))
    queries_ref = ray.put(queries)
    task = ray.remote(num_cpus=1)(_add_shard)
    before = np.concatenate([[0], np.cumsum(held_out)])  # held-out rows before each row
    pending = [
        task.remote(trained, s, ids[s.start : s.start + s.rows], held_out[s.start : s.start + s.rows],
                    s.start - int(before[s.start]), queries_ref, k, metric)
        for s in shards
    ]
    for s, ref in zip(shards, pending):  # merged in order: rows keep their local numbers
        part, top = ray.get(ref)
        _merge(faiss_index, faiss.deserialize_index(part))
        if truth is not None:
            truth.add_partial(*top)
        log.debug("merged rows %d..%d", s.start, s.start + s.rows)
    if direct_map:
        ivf.make_direct_map(True)


def _shard_to_file(trained: np.ndarray, shard: Shard, ids: np.ndarray, held_out: np.ndarray,
                   first_row: int, queries: np.ndarray, k: int, metric: Metric, path: str):
    """One Ray task of an on-disk build: the shard's kept rows written as a shard file at
    ``path`` (index numbers from ``first_row``), and their exact top-k for the queries."""
    truth = ExactTopK(queries, None, k=k, metric=metric)
    write_shard(trained, _kept_blocks(shard.source, ids, held_out, truth, dim=queries.shape[1],
                                      metric=metric, first_row=first_row), Path(path))
    return truth.partial()


def _shards_on_ray(writer: ShardWriter, shards: Sequence[Shard], ids: np.ndarray,
                   held_out: np.ndarray, truth: ExactTopK, queries: np.ndarray, *,
                   metric: Metric, k: int) -> None:
    """Ray tasks write one shard file each into the writer's scratch folder (a path every
    worker must reach: a shared file system on a cluster)."""
    import ray

    trained, queries_ref = ray.put(writer.trained), ray.put(queries)
    task = ray.remote(num_cpus=1)(_shard_to_file)
    before = np.concatenate([[0], np.cumsum(held_out)])
    paths = [writer.shard_path(i) for i in range(len(shards))]
    pending = [
        task.remote(trained, s, ids[s.start : s.start + s.rows], held_out[s.start : s.start + s.rows],
                    s.start - int(before[s.start]), queries_ref, k, metric, str(path))
        for s, path in zip(shards, paths)
    ]
    for path, ref in zip(paths, pending):  # shard order: rows keep their numbers
        truth.add_partial(*ray.get(ref))
        writer.take(path)
