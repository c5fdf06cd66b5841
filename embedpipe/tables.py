"""Embeddings that other tools wrote: any Parquet table with an id and a vector column, or
an ``.npy`` matrix with a Parquet of ids beside it.

``index build``, ``search --embeddings`` and ``probe`` read embedpipe's own datasets through
:mod:`embedpipe.store`, and anything else through here: files written by pandas, polars,
DuckDB, pyarrow, a Hugging Face dataset, or clip-retrieval / embedding-reader's layout of
``.npy`` matrices plus Parquet metadata. Vectors may be ``list<float>`` or
``fixed_size_list<float>`` of float16, float32 or float64; part files may be named
anything (names starting with ``_`` or ``.`` are skipped, as pyarrow does).

Such embeddings carry no provenance: their metadata is ``{}``, an index over them says
"provenance unknown", and image queries are refused (there is no backbone to embed them
with).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import StoreError
from .store import Embeddings, iter_embedding_blocks, list_parts, manifest_path, read_embeddings

#: rows per block read from a foreign table or matrix
BLOCK_ROWS = 65_536


@dataclass(frozen=True)
class Columns:
    """Where the ids, vectors and (optional) labels are. ``embedding`` of ``None`` picks the
    table's one list-of-floats column; ``ids`` is the Parquet of ids for an ``.npy``
    matrix (same row order)."""

    id: str = "id"
    embedding: str | None = None
    label: str = "label"
    ids: str | os.PathLike | None = None


def is_embedpipe_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder (or part) that embedpipe's store wrote, or a folder
    with no Parquet at all (the store then says what to run)."""
    p = Path(path)
    if p.is_dir():
        return manifest_path(p) is not None or bool(list_parts(p)) or not any(p.rglob("*.parquet"))
    return p.suffix == ".parquet" and p.name.startswith("part-") and manifest_path(p.parent) is not None


def embedding_blocks(path: str | os.PathLike, columns: Columns = Columns()) -> Callable[[], Iterator[Embeddings]]:
    """A re-iterable source of :class:`Embeddings` blocks over ``path``, whoever wrote it."""
    if is_embedpipe_dataset(path) and columns == Columns():
        return lambda: iter_embedding_blocks(path)
    if Path(path).suffix == ".npy":
        return lambda: _npy_blocks(Path(path), columns)
    return lambda: _parquet_blocks(path, columns)


def embedding_shards(
    path: str | os.PathLike, columns: Columns = Columns()
) -> list[tuple[Callable[[], Iterator[Embeddings]], int]]:
    """``path`` split into files that can be read on their own, in the order
    :func:`embedding_blocks` reads them: (a picklable re-iterable source of that file's
    blocks, its row count from the Parquet footer) per part. An ``.npy`` matrix is one."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    if is_embedpipe_dataset(path) and columns == Columns():
        return [(partial(iter_embedding_blocks, part), pq.read_metadata(part).num_rows)
                for part in list_parts(path)]
    if Path(path).suffix == ".npy":
        return [(partial(_npy_blocks, Path(path), columns), len(np.load(path, mmap_mode="r")))]
    if not Path(path).exists():
        raise StoreError(f"embeddings {str(path)!r} do not exist")
    return [(partial(_parquet_blocks, file, columns), pq.read_metadata(file).num_rows)
            for file in ds.dataset(str(path), format="parquet").files]


def read_any(path: str | os.PathLike, columns: Columns = Columns()) -> Embeddings:
    """All of ``path`` as one :class:`Embeddings`; ids must be unique."""
    if is_embedpipe_dataset(path) and columns == Columns():
        return read_embeddings(path)
    blocks = list(embedding_blocks(path, columns)())
    if not blocks:
        raise StoreError(f"{str(path)!r} holds no rows")
    ids = np.concatenate([b.ids for b in blocks])
    if len(set(ids.tolist())) != len(ids):
        raise StoreError(f"the ids in column {columns.id!r} of {str(path)!r} are not unique")
    return Embeddings(
        ids, np.concatenate([b.labels for b in blocks]), np.concatenate([b.vectors for b in blocks]), {}
    )


# --- Parquet tables --------------------------------------------------------------------------


def _vector_column(schema: pa.Schema, name: str | None, where: str) -> str:
    def is_vectors(t: pa.DataType) -> bool:
        return (pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_floating(t.value_type)
        )

    if name is not None:
        if name not in schema.names:
            raise StoreError(f"{where} has no column {name!r}; its columns: {', '.join(schema.names)}")
        if not is_vectors(schema.field(name).type):
            raise StoreError(f"column {name!r} of {where} is {schema.field(name).type}, not a list of floats")
        return name
    found = [f.name for f in schema if is_vectors(f.type)]
    if len(found) != 1:
        what = f"several ({', '.join(found)})" if found else "none"
        raise StoreError(
            f"{where} has {what} list-of-floats columns: name the vectors with --embedding-column"
        )
    return found[0]


def to_matrix(column: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """A list / fixed-size-list column of floats -> (n, D) float32, every row D long."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    if n == 0:
        return np.empty((0, 0), np.float32)
    if array.null_count:
        raise StoreError(f"{where}: {array.null_count} rows have no vector")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise StoreError(f"{where}: vectors of different lengths ({lengths.min()} to {lengths.max()})")
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(n, int(lengths[0])), dtype=np.float32)


def _parquet_blocks(path: str | os.PathLike, columns: Columns) -> Iterator[Embeddings]:
    import pyarrow.dataset as ds

    if not Path(path).exists():
        raise StoreError(f"embeddings {str(path)!r} do not exist")
    dataset = ds.dataset(str(path), format="parquet")
    where = str(path)
    if columns.id not in dataset.schema.names:
        raise StoreError(
            f"{where} has no id column {columns.id!r}; name it with --id-column "
            f"(its columns: {', '.join(dataset.schema.names)})"
        )
    vectors = _vector_column(dataset.schema, columns.embedding, where)
    wanted = [columns.id, vectors] + ([columns.label] if columns.label in dataset.schema.names else [])
    for batch in dataset.to_batches(columns=wanted, batch_size=BLOCK_ROWS):
        if not batch.num_rows:
            continue
        ids = batch.column(columns.id).cast(pa.string()).to_numpy(zero_copy_only=False)
        labels = (
            batch.column(columns.label).cast(pa.string()).to_numpy(zero_copy_only=False)
            if columns.label in batch.schema.names else np.full(batch.num_rows, None, object)
        )
        yield Embeddings(ids.astype(object), labels.astype(object), to_matrix(batch.column(vectors), where), {})


# --- .npy matrices ---------------------------------------------------------------------------


def _npy_blocks(path: Path, columns: Columns) -> Iterator[Embeddings]:
    import pyarrow.parquet as pq

    if columns.ids is None:
        raise StoreError(f"{path} is a bare matrix: give the Parquet of its ids, in row order (--ids FILE)")
    matrix = np.load(path, mmap_mode="r")
    if matrix.ndim != 2:
        raise StoreError(f"{path} holds a {matrix.ndim}-d array, not an (n, d) matrix")
    table = pq.read_table(columns.ids)
    if columns.id not in table.column_names:
        raise StoreError(
            f"{columns.ids} has no id column {columns.id!r} (its columns: {', '.join(table.column_names)})"
        )
    if table.num_rows != len(matrix):
        raise StoreError(f"{columns.ids} lists {table.num_rows} ids for the {len(matrix)} rows of {path}")
    ids = table.column(columns.id).cast(pa.string()).to_numpy(zero_copy_only=False).astype(object)
    labels = (
        table.column(columns.label).cast(pa.string()).to_numpy(zero_copy_only=False).astype(object)
        if columns.label in table.column_names else np.full(len(ids), None, object)
    )
    for start in range(0, len(matrix), BLOCK_ROWS):
        stop = start + BLOCK_ROWS
        yield Embeddings(ids[start:stop], labels[start:stop], np.asarray(matrix[start:stop], np.float32), {})
