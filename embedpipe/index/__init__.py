"""FAISS indexes over embeddings: choose, train, add, tune, save, open and search.

The compute here takes arrays and re-iterable sources of blocks, never paths; the thin
helpers of :mod:`~embedpipe.index.datasets` (:func:`embedding_blocks`, :func:`search_embeddings`,
:func:`eval_embeddings`, :func:`search_images`) are the only places that open an embeddings
dataset, through :mod:`embedpipe.store`, or embed image files, through
:class:`embedpipe.extraction.forward.QueryEmbedder`.

A build reads its source twice, so the full float matrix never has to sit in memory:

1. *scan*: validate every block, collect ids and labels, and keep a uniform random sample
   of rows (at most :data:`SAMPLE_BYTES`) for training and for tuning queries;
2. *add*: train on the sample less the tuning queries, then add block by block every row
   but the tuning queries while computing their exact neighbours (faiss
   ``contrib.exhaustive_search.knn_ground_truth`` style), tune the search-time parameter
   against them, and add the tuning queries last (why: :mod:`~embedpipe.index.core`).

The built index is measured against the memory budget; one over it is rebuilt as the next
plan of :func:`plan_candidates` that fits, both passes again.

Cosine similarity is inner product on L2-normalised vectors: vectors are normalised when
added and queries when searched, so callers never do it themselves. Inside FAISS it runs
as L2 on those unit vectors (the same ranking), and scores are turned back into cosines.

Searching is safe from many threads at once: search-time parameters travel with each
call as FAISS ``SearchParameters`` and never change the shared index.

The modules, in the order they build on each other: ``plan`` (metrics, kinds, budgets,
choosing), ``blocks`` (validated, sampled sources), ``exact`` (ground truth, recall),
``faiss_ops``, ``tuning``, ``adding`` (the add pass, here or in Ray tasks), ``core`` (the :class:`Index`), ``update`` (growing and shrinking
a built index without training it again), ``datasets`` (files).
"""

from .adding import Shard
from .blocks import Block, BlockLike, BlockSource, IndexData, as_block_source
from .core import (
    FORMAT_VERSION,
    IDS_FILE,
    INDEX_FILE,
    META_FILE,
    RESULT_COLUMNS,
    EvalReport,
    Index,
    IndexInfo,
    SearchResults,
    check_destination,
    read_info,
)
from .datasets import (
    QueryFailure,
    build_embeddings,
    embedding_blocks,
    embedding_shards,
    eval_embeddings,
    search_embeddings,
    search_images,
    update_embeddings,
)
from .plan import (
    IndexKind,
    IndexPlan,
    Metric,
    SearchKnob,
    format_bytes,
    parse_memory_budget,
    plan_candidates,
    plan_index,
)
from .tuning import Tuning
from .update import UpdateReport, update_index

__all__ = [
    "FORMAT_VERSION", "IDS_FILE", "INDEX_FILE", "META_FILE", "RESULT_COLUMNS",
    "Block", "BlockLike", "BlockSource", "EvalReport", "Index", "IndexData", "IndexInfo",
    "IndexKind", "IndexPlan", "Metric", "QueryFailure", "SearchKnob", "SearchResults", "Shard", "Tuning", "UpdateReport",
    "as_block_source", "build_embeddings", "check_destination", "embedding_blocks", "embedding_shards", "eval_embeddings", "format_bytes",
    "parse_memory_budget", "plan_candidates", "plan_index", "read_info", "search_embeddings",
    "search_images", "update_embeddings", "update_index",
]
