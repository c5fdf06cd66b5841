"""The only places the index wing opens files: embeddings datasets, through
:mod:`embedpipe.store`, and query images, embedded through
:class:`embedpipe.extraction.forward.QueryEmbedder`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    IndexInputError,
    QueryImagesError,
)
from .adding import Shard
from .blocks import BlockSource
from .core import EvalReport, Index, SearchResults
from .update import UpdateReport, update_index

if TYPE_CHECKING:
    from ..extraction.forward import QueryEmbedder
    from ..tables import Columns

log = logging.getLogger(__name__)


# --- embeddings datasets and images on disk ------------------------------------------


def embedding_blocks(path: str | os.PathLike[str], columns: Columns | None = None) -> BlockSource:
    """A :data:`BlockSource` over the embeddings at ``path``: each call re-opens them and
    yields :class:`embedpipe.store.Embeddings` blocks (one per Parquet part of an embedpipe
    dataset; tables other tools wrote, named by ``columns``, see :mod:`embedpipe.tables`)."""
    # imported here so the compute above does not depend on the Parquet layer
    from ..tables import Columns
    from ..tables import embedding_blocks as blocks

    return blocks(path, columns or Columns())


def embedding_shards(path: str | os.PathLike[str], columns: Columns | None = None) -> list[Shard]:
    """The embeddings at ``path`` as :class:`~embedpipe.index.adding.Shard` s, one per
    Parquet part, for a build on Ray (``Index.build(..., shards=...)``)."""
    from ..tables import Columns
    from ..tables import embedding_shards as files

    shards, start = [], 0
    for source, rows in files(path, columns or Columns()):
        shards.append(Shard(source, start, rows))
        start += rows
    return shards


def build_embeddings(
    path: str | os.PathLike[str],
    *,
    columns: Columns | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    **options: Any,
) -> Index:
    """:meth:`Index.build` over the embeddings at ``path``. With ``engine="ray"`` the add
    pass runs in Ray tasks, one per Parquet part, on the cluster at ``ray_address`` (a
    local one when None); scan and training stay in this process."""
    if engine == "local":
        return Index.build(embedding_blocks(path, columns), embeddings_path=path, **options)
    from ..cluster import ray_session

    shards = embedding_shards(path, columns)

    def source():  # the parts in shard order, for the scan
        for shard in shards:
            yield from shard.source()

    with ray_session(ray_address):
        return Index.build(source, embeddings_path=path, shards=shards, **options)


def search_embeddings(
    index: Index,
    path: str | os.PathLike[str],
    k: int = 10,
    *,
    exclude_self: bool = False,
    nprobe: int | None = None,
    ef_search: int | None = None,
    columns: Columns | None = None,
) -> SearchResults:
    """Batch search: every row of the embeddings at ``path`` as a query, after checking
    they were embedded like the index (:meth:`Index.check_compatible`; embeddings without
    provenance are not compared)."""
    from ..tables import Columns, read_any

    queries = read_any(path, columns or Columns())
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


def update_embeddings(
    index_dir: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    columns: Columns | None = None,
    retrain_if_below: float | None = None,
    seed: int = 0,
) -> tuple[Index, UpdateReport]:
    """Update the index directory ``index_dir`` to the embeddings at ``path`` as they are now
    (:func:`~embedpipe.index.update.update_index`) and write it back through
    :meth:`Index.save`: the new directory is written beside the old one and swapped in, so
    an update killed at any point leaves the previous index whole."""
    updated, report = update_index(
        Index.open(index_dir),
        embedding_blocks(path, columns),
        embeddings_path=str(Path(path).resolve()),
        retrain_if_below=retrain_if_below,
        seed=seed,
    )
    updated.save(index_dir, overwrite=True)
    return updated, report


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
        from ..extraction.forward import (
            QueryEmbedder,  # torch: loaded only when images are searched
        )

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
