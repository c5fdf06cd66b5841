"""Parquet image tables (the Hugging Face ``datasets`` layout) -> :class:`Sample` rows.

An image table holds the images themselves: a column of encoded bytes, or the Hugging
Face ``Image`` struct ``{"bytes": binary, "path": string}``, beside optional id and label
columns. (A Parquet *manifest*, read by :mod:`.sources`, holds paths instead.) A table
is read row group by row group, in record batches of the columns asked for, so that a
table of any size costs the memory of one row group's images, never the whole file.

Bad content never raises: a row without bytes, a repeated id, a file that cannot be
opened or stops being readable half-way each become a failure :class:`Sample`. Only a
table that does not fit the columns asked for is a :class:`SourceError`, because every
row of it would fail the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Container, Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import ImageDecodeError, SourceError, did_you_mean
from ..uris import is_uri, join, resolve
from .decode import DecodeFailure, ErrorType, read_file
from .streams import Sample

_SUFFIX = ".parquet"
_MAGIC = "*?["  # glob characters


def _absolute(path: str | os.PathLike) -> str:
    """A URI as it is; a local path absolute and posix, so that both split on '/'."""
    path = os.fspath(path)
    return path if is_uri(path) else Path(path).absolute().as_posix()


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A URI or an absolute posix local path -> (its file system, the path within it)."""
    return resolve(path) if is_uri(path) else (pafs.LocalFileSystem(), path)


def _matches(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Glob matching by path segment (``*`` stays inside a folder, ``**`` spans any
    number of them), the same for local paths and URIs."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def expand_tables(spec: str | os.PathLike) -> list[str]:
    """A table, a folder of tables or a glob (``hf/data/train-*.parquet``) -> the tables.

    A folder yields its ``.parquet`` files, subfolders too; a glob yields the files it
    matches. Local paths come back absolute (posix), URIs (``s3://...``) as URIs; both
    sorted, so that shards ``train-00000-of-00009`` are read in order.
    """
    spec = _absolute(spec)
    cut = next((i for i, c in enumerate(spec) if c in _MAGIC), None)
    base = spec if cut is None else spec[: spec.rfind("/", 0, cut)]
    pattern = None if cut is None else [
        unquote(p) if is_uri(spec) else p for p in spec[len(base) + 1:].split("/")
    ]
    try:
        fs, root = _filesystem(base)
        if pattern is None and fs.get_file_info(root).type == pafs.FileType.File:
            return [spec]
        root = root.rstrip("/")
        infos = fs.get_file_info(pafs.FileSelector(
            root,
            recursive=pattern is None or len(pattern) > 1 or "**" in pattern,
            allow_not_found=pattern is not None,  # a glob may match nothing; a folder must exist
        ))
    except (OSError, ValueError) as e:  # no such folder, unknown scheme, no such bucket
        raise SourceError(f"cannot list {spec!r}: {e}") from None
    found = sorted(
        rel
        for rel in (f.path[len(root) + 1:] for f in infos if f.type == pafs.FileType.File)
        if (rel.endswith(_SUFFIX) if pattern is None else _matches(rel.split("/"), pattern))
    )
    if not found:
        what = "no files match" if pattern else f"no {_SUFFIX} files (subfolders too) in"
        raise SourceError(f"{what} {spec!r}")
    return [join(base, rel) if is_uri(base) else f"{base}/{rel}" for rel in found]


def table_name(path: str, root: str) -> str:
    """The id prefix of a table: its posix path relative to ``root`` (see
    :func:`~.streams.common_root`) without ``.parquet``, so that ``data/train-0.parquet`` row 12
    can become ``data/train-0/12`` and shards never share an id."""
    rel = path[len(root.rstrip("/")) + 1:]
    rel = unquote(rel) if is_uri(path) else rel
    return rel.removesuffix(_SUFFIX)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image(t: pa.DataType) -> bool:
    """Encoded bytes, or the Hugging Face ``Image`` struct (a struct with binary ``bytes``)."""
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and _is_bytes(t.field(i).type)
    return _is_bytes(t)


def _check(schema: pa.Schema, path: str, image_column: str, id_column: str | None,
           label_column: str | None) -> None:
    names = schema.names
    images = [f.name for f in schema if _is_image(f.type)]
    hint = (f" The images are probably in {', '.join(map(repr, images))}." if images
            else " No column holds image bytes (binary, or a struct with a binary 'bytes' field).")
    if image_column not in names:
        raise SourceError(
            f"table {path!r} has no image column {image_column!r} (columns: {', '.join(names)}).{hint}"
        )
    t = schema.field(image_column).type
    if not _is_image(t):
        raise SourceError(
            f"column {image_column!r} of table {path!r} holds {t}, not images: an image column "
            f"is binary, or the Hugging Face Image struct {{bytes: binary, path: string}}.{hint}"
        )
    for role, column in (("id", id_column), ("label", label_column)):
        if column is not None and column not in names:
            raise SourceError(
                f"table {path!r} has no {role} column {column!r} (columns: {', '.join(names)})."
                + did_you_mean(column, names)
            )


def _open(path: str) -> pq.ParquetFile:
    fs, inner = _filesystem(_absolute(path))
    return pq.ParquetFile(inner, filesystem=fs)  # a path, not a stream: closing pf closes it


def check_table(path: str, *, image_column: str, id_column: str | None = None,
                label_column: str | None = None) -> None:
    """Raise :class:`SourceError` when ``path`` lacks a column asked for, or its image
    column holds no bytes; the message lists the columns and suggests an image column.

    Reads only the footer. A file that cannot be opened passes: :func:`read_table`
    reports it as a failure, so that one broken shard costs its rows, not the job.
    """
    try:
        with _open(path) as pf:
            schema = pf.schema_arrow
    except (OSError, pa.ArrowException):
        return
    _check(schema, path, image_column, id_column, label_column)


def _class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """The names of a Hugging Face ``ClassLabel`` column, from the ``huggingface`` schema
    metadata that ``datasets`` writes; ``None`` when the table does not say."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
        feature = features[label_column]
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
        return None  # a Value, or a Sequence (written as a list)
    names = feature.get("names")
    return [str(n) for n in names] if isinstance(names, list) else None


def _label(value: object, names: list[str] | None) -> str | None:
    """A ClassLabel's name; -1 is how ``datasets`` writes a missing one (test splits)."""
    if value is None:
        return None
    if names is not None and isinstance(value, int) and not isinstance(value, bool):
        if value == -1:
            return None
        if 0 <= value < len(names):
            return names[value]
    return str(value)


def _failure(key: str, member: str, error_type: ErrorType, message: str) -> Sample:
    return Sample(key, member, None, failure=DecodeFailure(error_type, message))


def _batches(pf: pq.ParquetFile, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    # One reader per row group: a batch never spans two groups, so every row of the
    # groups before a damaged one comes out before the damage is met.
    for group in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)


def read_table(
    path: str,
    *,
    image_column: str,
    id_column: str | None = None,
    label_column: str | None = None,
    done: Container[str] = frozenset(),
    batch_rows: int = 256,
) -> Iterator[Sample]:
    """The images of one table, in row order, as :class:`Sample` rows.

    ``key`` is the id column's value (as ``str``), else the row number in the file
    (``"0"``, ``"1"``...). A row whose id is null or repeats an earlier one is a failure
    keyed ``"#row=N"`` / ``"<id>#row=N"``, so that keys stay unique. Labels are the label
    column's value as ``str``, or a ClassLabel's name when the table's Hugging Face
    metadata has one. A struct row without bytes but with a ``path`` reads that file
    (relative to the table's folder). ``done``: keys of this table finished by an earlier
    run, skipped. A file that cannot be opened, or becomes unreadable part-way, ends with
    one failure keyed ``""``.

    Raises :class:`SourceError` when the columns do not fit (see :func:`check_table`).
    """
    path = _absolute(path)
    folder, name = path.rsplit("/", 1)
    name = unquote(name) if is_uri(path) else name
    try:
        pf = _open(path)
    except FileNotFoundError:
        yield _failure("", "", ErrorType.NOT_FOUND, f"no such table {path!r}")
        return
    except PermissionError:
        yield _failure("", "", ErrorType.PERMISSION_DENIED, f"permission denied: {path!r}")
        return
    except (OSError, pa.ArrowException) as e:  # garbage, an empty file, a torn footer
        yield _failure("", "", ErrorType.UNREADABLE, f"not a readable Parquet file: {e}")
        return
    with pf:
        schema = pf.schema_arrow
        _check(schema, path, image_column, id_column, label_column)
        names = _class_names(schema, label_column) if label_column else None
        columns = list(dict.fromkeys(c for c in (image_column, id_column, label_column) if c))
        batches = _batches(pf, columns, batch_rows)
        seen: set[str] = set()
        row = 0
        while True:
            try:
                batch = next(batches, None)
            except (OSError, pa.ArrowException) as e:
                yield _failure("", f"row={row}", ErrorType.TRUNCATED,
                               f"the table is unreadable from row {row} on: {e}")
                return
            if batch is None:
                return
            images = batch.column(image_column)
            struct = pa.types.is_struct(images.type)
            data = (images.field("bytes") if struct else images).to_pylist()
            files = (images.field("path").to_pylist() if struct and images.type.get_field_index("path") >= 0
                     else [None] * len(data))
            ids = batch.column(id_column).to_pylist() if id_column else None
            labels = batch.column(label_column).to_pylist() if label_column else [None] * len(data)
            for i, (key, problem) in enumerate(_keys(ids, row, len(data), seen, id_column)):
                if key in done:
                    continue
                got = (DecodeFailure(ErrorType.UNREADABLE, problem) if problem is not None
                       else _image(data[i], files[i], folder, row + i))
                failed = isinstance(got, DecodeFailure)
                yield Sample(key, f"row={row + i}", _label(labels[i], names),
                             data=None if failed else got, failure=got if failed else None)
            row += batch.num_rows


def _keys(ids: list | None, first: int, count: int, seen: set[str],
          id_column: str | None) -> Iterator[tuple[str, str | None]]:
    """(key, why the row's id is unusable or ``None``) for each row of a batch; ``seen``
    holds the ids of the rows before, and gains this batch's."""
    for n in range(first, first + count):
        if ids is None:
            yield str(n), None
            continue
        value = ids[n - first]
        if value is None:
            yield f"#row={n}", f"row {n} has no id (column {id_column!r} is null)"
        elif str(value) in seen:
            yield f"{value}#row={n}", f"id {str(value)!r} repeated (row {n})"
        else:
            seen.add(str(value))
            yield str(value), None


def _image(data: bytes | None, file: str | None, folder: str, row: int) -> bytes | DecodeFailure:
    """A row's bytes; or, for a Hugging Face Image row that holds none, those of the file
    its ``path`` names (relative to the table's folder)."""
    if data:
        return data
    if data is None and file:
        full = file if is_uri(file) or os.path.isabs(file) else (
            join(folder, file) if is_uri(folder) else f"{folder}/{file}")
        return _read_file(full, file)
    what = "empty image bytes" if data == b"" else "no image bytes"
    return DecodeFailure(ErrorType.EMPTY_FILE, f"{what} in row {row}")


def _read_file(full: str, file: str) -> bytes | DecodeFailure:
    try:
        return read_file(full)
    except ImageDecodeError as e:
        return DecodeFailure(ErrorType(e.error_type), f"{file}: {e.message}")
