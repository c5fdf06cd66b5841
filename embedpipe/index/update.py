"""Updating an index to the embeddings as they are now, without training it again.

``update_index`` compares the index's rows with the embeddings by id and by fingerprint (a
64-bit digest of each prepared vector, kept in ``ids.parquet``): rows only in the
embeddings are *added*, rows only in the index *removed*, rows whose vector changed
(a re-embedded image) *replaced* (removed, then added). The trained parts (IVF coarse
quantiser, PQ codebooks, SQ ranges, OPQ rotation) stay as they are.

How rows leave the FAISS index depends on its structure, and never leaves tombstones, so
search, ``search_ids`` and ``eval`` see an ordinary index afterwards:

* Flat: ``remove_ids``, which compacts the rows in place;
* IVF (any codes, under OPQ/PCA too): each inverted list is rewritten without the removed
  entries and the remaining labels are renumbered in place, codes untouched;
* HNSW (and any other structure): FAISS cannot remove from a graph, so the graph is
  rebuilt over the remaining rows, their vectors read back from the index's own storage
  (exact for HNSW,Flat; SQ/PQ storage keeps its trained quantiser). Adding is in place;
  only removals and replacements pay for the rebuild.

Added rows go last, so the index's row order is the kept rows in their old order, then
the added rows in the embeddings' order (``position`` maps each to the embeddings, as
after a build).

Recall is measured as a build measures it, on queries held out of the index: up to
``TUNE_QUERIES`` (``GRAPH_TUNE_QUERIES`` for a graph) of the added rows are added last, after their exact neighbours among the
other rows have been found and the index searched at its tuned setting (at most half the
added rows, so that the others are among what the queries should find). With fewer than
``2 * MIN_HELD_OUT`` added rows it falls back to :meth:`Index.eval`'s indexed queries
(optimistic for HNSW, and said so in the report).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import faiss
import numpy as np
import pandas as pd

from ..errors import IndexInputError, IndexSpecError, MetadataMismatchError
from ..provenance import differences
from .blocks import IndexData, as_block_source, fingerprints, prepare, prepared_blocks
from .core import Index
from .exact import ExactTopK, query_recalls
from .faiss_ops import search_parameters, search_rows, serialized_bytes
from .ondisk import lists_file
from .plan import TUNE_QUERIES, format_bytes, tune_queries

log = logging.getLogger(__name__)

MIN_HELD_OUT = 50
"""Fewest held-out recall queries; at most half the added rows are held out (the others are
in the index when it is searched), so an update adding fewer than twice as many measures
recall on indexed rows instead."""

DRIFT_TOLERANCE = 0.02
"""Default ``retrain_if_below``: the build's target recall, or where the build itself fell
short of it, this much below the recall the build measured (so only drift warns)."""

_RECONSTRUCT_ROWS = 65_536  # rows read back from an HNSW's storage per chunk


@dataclasses.dataclass(frozen=True)
class UpdateReport:
    """What an update did and the recall it measured afterwards.

    recall: mean recall@k at the tuned setting (None for exact search, always 1).
    held_out: whether the recall queries were rows held out of the index (as at build
    time) rather than indexed rows excluded from their own results.
    threshold: the recall below which a rebuild is advised (``retrain_if_below``, default:
    see :data:`DRIFT_TOLERANCE`).
    """

    added: int
    removed: int
    replaced: int
    unchanged: int
    count: int
    removal: str  # "none", "in place" or "rebuilt" (see the module docstring)
    recall: float | None
    k: int | None
    n_queries: int
    held_out: bool
    threshold: float | None
    seconds: float
    changes_detected: bool  # False: an index without fingerprints, changed vectors unseen

    @property
    def rebuild_advised(self) -> bool:
        return self.recall is not None and self.threshold is not None and self.recall < self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rebuild_advised": self.rebuild_advised}


@dataclasses.dataclass
class _Diff:
    """The embeddings against the index: ids, labels and fingerprints of every dataset row
    (dataset order), the dataset rows to add, and the index rows to drop."""

    ids: np.ndarray
    labels: np.ndarray
    prints: np.ndarray
    meta: Mapping[str, Any] | None
    add_positions: np.ndarray  # (a,) int64 dataset rows, in order
    add_vectors: np.ndarray  # (a, dim) float32, prepared
    drop: np.ndarray  # (n_index,) bool
    replaced: int


def _diff(index: Index, source, *, stored: np.ndarray | None) -> _Diff:
    """One pass over the embeddings: validate, fingerprint, and find what to add and drop."""
    info = index.info
    _, index_ids, _, _, _ = index.parts()
    lookup = pd.Index(index_ids)
    seen = np.zeros(len(index_ids), dtype=bool)
    changed = np.zeros(len(index_ids), dtype=bool)
    ids, labels, prints, add_positions, add_vectors = [], [], [], [], []
    meta = None
    start = 0
    for block in source():
        x = prepare(block.vectors, dim=info.dim, metric=info.metric, what="vectors",
                    first_row=start, dim_hint="an index holds vectors of one size; rebuild it")
        if start == 0:
            meta = getattr(block, "meta", None)
        block_ids = np.asarray(block.ids, dtype=object)
        block_labels = (np.full(len(x), None, dtype=object) if block.labels is None
                        else np.asarray(block.labels, dtype=object))
        if block_ids.shape != (len(x),) or block_labels.shape != (len(x),):
            raise IndexInputError(f"a block has {len(x)} vectors but {len(block_ids)} ids and "
                                  f"{len(block_labels)} labels; every row needs one of each")
        fp = fingerprints(x)
        rows = lookup.get_indexer(block_ids)
        known = rows >= 0
        seen[rows[known]] = True
        is_new = ~known
        if stored is not None:
            moved = known.copy()
            moved[known] = stored[rows[known]] != fp[known]
            changed[rows[moved]] = True
            is_new |= moved
        if is_new.any():
            add_positions.append(np.flatnonzero(is_new) + start)
            add_vectors.append(x[is_new])
        ids.append(block_ids)
        labels.append(block_labels)
        prints.append(fp)
        start += len(x)
    if start == 0:
        raise IndexInputError("the embeddings are empty: an index cannot be updated to no rows; "
                              "extract some images first")
    all_ids = np.concatenate(ids)
    duplicated = pd.Index(all_ids).duplicated()
    if duplicated.any():
        examples = ", ".join(repr(i) for i in all_ids[duplicated][:3])
        raise IndexInputError(f"ids must be unique; repeated: {examples}")
    dim = info.dim
    return _Diff(
        ids=all_ids,
        labels=np.concatenate(labels),
        prints=np.concatenate(prints),
        meta=meta,
        add_positions=np.concatenate(add_positions) if add_positions else np.empty(0, np.int64),
        add_vectors=np.concatenate(add_vectors) if add_vectors else np.empty((0, dim), np.float32),
        drop=~seen | changed,
        replaced=int(changed.sum()),
    )


def _check_provenance(index: Index, meta: Mapping[str, Any] | None) -> None:
    found = differences(index.meta, dict(meta or {}), names=("index", "embeddings"))
    if found:
        raise MetadataMismatchError(
            "the embeddings were made differently from those the index was built from: "
            + "; ".join(found)
            + ". Update an index only with embeddings of the same backbone, weights, layer and "
            "preprocessing, or build a new one (`embedpipe index build EMB --out IDX --overwrite`)"
        )


def _wrappers(index: faiss.Index) -> tuple[list[faiss.Index], faiss.Index]:
    """The pre-transform wrappers above the core structure, and that structure (an IndexRefine
    stops the descent: its refinement index holds rows of its own)."""
    chain = []
    while isinstance(index, faiss.IndexPreTransform):
        chain.append(index)
        index = faiss.downcast_index(index.index)
    return chain, index


def _compact_ivf(ivf: faiss.IndexIVF, drop: np.ndarray) -> None:
    """Remove the rows ``drop`` (n,) bool from every inverted list and renumber the rest to
    0..kept-1 in their order, codes untouched; then rebuild the row -> list direct map."""
    new_label = np.cumsum(~drop) - 1
    invlists = ivf.invlists
    code_size = invlists.code_size
    for list_no in range(invlists.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        labels = faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy()
        codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * code_size).copy()
        keep = ~drop[labels]
        if keep.all():
            labels = new_label[labels]
        else:
            labels = new_label[labels[keep]]
            codes = codes.reshape(size, code_size)[keep].ravel()
            invlists.resize(list_no, len(labels))
        if len(labels):
            labels = np.ascontiguousarray(labels, dtype=np.int64)
            codes = np.ascontiguousarray(codes)
            invlists.update_entries(list_no, 0, len(labels), faiss.swig_ptr(labels),
                                    faiss.swig_ptr(codes))
    ivf.ntotal = int((~drop).sum())
    if ivf.direct_map.type != faiss.DirectMap.NoMap:
        ivf.make_direct_map(False)
        ivf.make_direct_map(True)


def _remove(faiss_index: faiss.Index, drop: np.ndarray) -> tuple[faiss.Index, str]:
    """``faiss_index`` without the rows ``drop`` (n,) bool, the others renumbered in order."""
    if not drop.any():
        return faiss_index, "none"
    kept = int((~drop).sum())
    chain, core = _wrappers(faiss_index)
    if isinstance(core, faiss.IndexFlat) and not chain:
        faiss_index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(drop).astype(np.int64)))
        return faiss_index, "in place"
    if isinstance(core, faiss.IndexIVF) and isinstance(
        faiss.downcast_InvertedLists(core.invlists), faiss.ArrayInvertedLists
    ):  # plain lists of (label, code); fast-scan's packed blocks are not
        _compact_ivf(core, drop)
        for wrapper in chain:
            wrapper.ntotal = kept
        return faiss_index, "in place"
    # a graph (HNSW) cannot lose nodes: rebuild it over the kept rows, trained parts kept
    try:
        fresh = faiss.clone_index(faiss_index)
        fresh.reset()
        rows = np.flatnonzero(~drop).astype(np.int64)
        for start in range(0, len(rows), _RECONSTRUCT_ROWS):
            fresh.add(faiss_index.reconstruct_batch(rows[start : start + _RECONSTRUCT_ROWS]))
    except RuntimeError as exc:  # a structure FAISS can neither copy nor read back
        raise IndexSpecError(
            f"rows cannot be removed from this {type(core).__name__} index in place "
            f"({str(exc).strip().splitlines()[-1]}); rebuild it with `embedpipe index build "
            "EMB --out IDX --overwrite`"
        ) from None
    return fresh, "rebuilt"


def _held_out_recall(
    faiss_index: faiss.Index, index: Index, source, diff: _Diff, queries: np.ndarray,
    query_positions: np.ndarray, row_of_position: np.ndarray,
) -> float:
    """Recall@k at the tuned setting of ``queries`` (q, dim), rows not yet in ``faiss_index``
    (their dataset rows ``query_positions``), against exact search over the other rows."""
    tuning = index.info.tuning
    held = np.zeros(len(diff.ids), dtype=bool)
    held[query_positions] = True
    others = np.flatnonzero(~held)  # the truth's row numbers -> dataset rows
    truth = ExactTopK(queries, None, k=tuning.k, metric=index.info.metric)
    seen = 0
    for start, x in prepared_blocks(source, dim=index.info.dim, metric=index.info.metric,
                                    ids=diff.ids):
        x = x[~held[start : start + len(x)]]
        truth.add(seen, x)
        seen += len(x)
    found_positions = truth.rows()
    truth_rows = np.where(found_positions >= 0,
                          row_of_position[others[np.maximum(found_positions, 0)]], -1)
    params = search_parameters(faiss_index, tuning.knob, tuning.value)
    found = search_rows(faiss_index, queries, tuning.k, None, params)[1]
    return float(query_recalls(found, truth_rows).mean())


def update_index(
    index: Index,
    data: IndexData,
    *,
    meta: Mapping[str, Any] | None = None,
    embeddings_path: str | None = None,
    retrain_if_below: float | None = None,
    seed: int = 0,
) -> tuple[Index, UpdateReport]:
    """``index`` updated to the rows of ``data`` as they are now (see the module docstring).

    data: what :meth:`Index.build` takes; read twice when recall is measured on held-out
        rows. Its provenance (``meta``, default the first block's) must equal the index's
        (all but run keys), else :class:`MetadataMismatchError` lists the differences.
    retrain_if_below: recall@k below which the report advises a rebuild (and a warning is
        logged); default the target recall the index was tuned to, or ``DRIFT_TOLERANCE``
        below the recall its build measured where that fell short of the target.

    ``index`` is consumed: its FAISS index is changed in place; use the returned one. No
    file is written: save the result (:meth:`Index.save` swaps directories atomically).
    """
    if retrain_if_below is not None and not 0 < retrain_if_below <= 1:
        raise IndexInputError(f"retrain_if_below must be in (0, 1], got {retrain_if_below!r}")
    started = time.perf_counter()
    source = as_block_source(data)
    faiss_index, _, _, _, stored = index.parts()
    if lists_file(faiss_index) is not None:
        raise IndexSpecError(
            "this index keeps its inverted lists on disk (lists.ivfdata), which FAISS cannot "
            "grow once they are merged; rebuild it (embedpipe index build --on-disk)")
    diff = _diff(index, source, stored=stored)
    _check_provenance(index, meta if meta is not None else diff.meta)
    if stored is None:
        log.warning("this index predates row fingerprints, so rows whose vector changed are not "
                    "detected this time (added and removed ids are); the update records them")
    removed = int(diff.drop.sum()) - diff.replaced
    faiss_index, removal = _remove(faiss_index, diff.drop)
    kept_positions = pd.Index(diff.ids).get_indexer(index.parts()[1][~diff.drop])
    adds, vectors = diff.add_positions, diff.add_vectors

    info, tuning = index.info, index.info.tuning
    n_queries = min(TUNE_QUERIES if tuning is None else tune_queries(tuning.knob), len(adds) // 2)
    held_out = tuning is not None and n_queries >= MIN_HELD_OUT
    if held_out:
        rng = np.random.default_rng(seed)
        chosen = np.zeros(len(adds), dtype=bool)
        chosen[rng.choice(len(adds), size=n_queries, replace=False)] = True
        order = np.concatenate([np.flatnonzero(~chosen), np.flatnonzero(chosen)])
        adds, vectors = adds[order], vectors[order]
    new_positions = np.concatenate([kept_positions, adds]).astype(np.int64)
    row_of_position = np.empty(len(diff.ids), dtype=np.int64)
    row_of_position[new_positions] = np.arange(len(new_positions))

    recall = None
    if held_out:
        faiss_index.add(vectors[: len(vectors) - n_queries])
        recall = _held_out_recall(faiss_index, index, source, diff, vectors[-n_queries:],
                                  adds[-n_queries:], row_of_position)
        faiss_index.add(vectors[-n_queries:])
    elif len(vectors):
        faiss_index.add(vectors)

    new_info = dataclasses.replace(
        info,
        count=int(faiss_index.ntotal),
        index_bytes=serialized_bytes(faiss_index),
        embeddings_path=embeddings_path or info.embeddings_path,
    )
    updated = Index(faiss_index, diff.ids[new_positions], diff.labels[new_positions],
                    new_positions, new_info, diff.prints[new_positions])
    if tuning is not None and not held_out:
        n_queries = min(tune_queries(tuning.knob), len(updated))
        recall = updated.eval(source, n_queries=n_queries, k=tuning.k, seed=seed, repeats=1).recall
    report = UpdateReport(
        added=len(adds) - diff.replaced,
        removed=removed,
        replaced=diff.replaced,
        unchanged=len(new_positions) - len(adds),
        count=len(updated),
        removal=removal,
        recall=recall,
        k=None if tuning is None else tuning.k,
        n_queries=0 if tuning is None else n_queries,
        held_out=held_out,
        threshold=retrain_if_below if retrain_if_below is not None else (
            None if tuning is None
            else round(min(tuning.target_recall, tuning.recall - DRIFT_TOLERANCE), 4)),
        seconds=round(time.perf_counter() - started, 3),
        changes_detected=stored is not None,
    )
    if report.rebuild_advised:
        log.warning(
            "after the update recall@%d is %.3f, below %.3f: the index's training no longer "
            "fits the data; rebuild it (`embedpipe index build EMB --out IDX --overwrite`)",
            report.k, report.recall, report.threshold,
        )  # fmt: skip
    if info.memory_budget is not None and new_info.index_bytes > info.memory_budget:
        log.warning("the updated index takes %s, over its memory budget of %s; rebuild it",
                    format_bytes(new_info.index_bytes), format_bytes(info.memory_budget))
    when = datetime.now(UTC).isoformat(timespec="seconds")
    # the record of this update travels in index.json (read by `index info`)
    updated.info = dataclasses.replace(new_info, update={"updated_at": when, **report.to_dict()})
    return updated, report

