"""Where images come from: an image folder or a manifest, turned into records.

A source never opens an image; it lists files, gives each a stable ``id`` and an
optional ``label``, and notes the file's size and modification time so that an
incremental run can tell a changed file from an unchanged one.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SourceError

if TYPE_CHECKING:
    from .decode import DecodeFailure
from ..uris import is_uri, join, list_files

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MANIFEST_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image to embed.

    ``id`` is the posix path relative to the folder root (or the manifest's ``id``);
    ``size`` and ``mtime_ns`` are ``-1`` when the file cannot be stat'ed (a broken link),
    which decoding then reports. An image read from a container (a tar shard, a Parquet
    table) carries its bytes in ``data`` (or, in ``failure``, why there are none) and
    ``path`` says where in the container it was.
    """

    id: str
    path: str
    label: str | None
    size: int
    mtime_ns: int
    data: bytes | None = None
    failure: DecodeFailure | None = None

    @property
    def payload(self) -> str | bytes | DecodeFailure:
        """What a decode worker needs: the file to read, the bytes, or the failure."""
        return self.failure or (self.data if self.data is not None else self.path)


class Listing(Sequence[ImageRecord]):
    """The images of a source as columns: what planning a (re-)run reads.

    A listing of ten million images holds their ids (Arrow strings), sizes and mtimes
    (numpy int64) and labels (dictionary-encoded): about 25 bytes per image beyond the id
    itself, where a list of :class:`ImageRecord` objects costs several hundred. Records
    are made on access (``listing[i]``, iteration, :meth:`take`), a block at a time.
    Paths are ``base/id`` (a folder, or a folder URI) or a column of their own (a manifest,
    whose rows keep the manifest's order).
    """

    def __init__(
        self,
        ids: pa.Array | pa.ChunkedArray,
        labels: pa.Array | pa.ChunkedArray,
        size: np.ndarray,
        mtime_ns: np.ndarray,
        *,
        base: str | None = None,
        paths: pa.Array | pa.ChunkedArray | None = None,
        sorted_ids: bool = True,
    ) -> None:
        self.ids, self.labels, self.size, self.mtime_ns = ids, labels, size, mtime_ns
        self.base, self.paths = base, paths
        # the ids in sorted order, and where each sits in the listing (None: in place)
        self._sorted = ids if sorted_ids else None
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        return next(iter(self.take(np.array([range(len(self))[i]]))))  # range: negatives, IndexError

    def __iter__(self) -> Iterator[ImageRecord]:
        rows = 4096
        for start in range(0, len(self), rows):
            sl = slice(start, start + rows)
            ids = self.ids[sl].to_pylist()
            if self.paths is not None:
                paths = self.paths[sl].to_pylist()
            elif is_uri(self.base):
                paths = [join(self.base, i) for i in ids]
            else:
                paths = [f"{self.base}/{i}" for i in ids]
            labels, size, mtime = self.labels[sl].to_pylist(), self.size[sl].tolist(), self.mtime_ns[sl].tolist()
            yield from map(ImageRecord, ids, paths, labels, size, mtime)

    def take(self, indices: np.ndarray) -> Listing:
        """The rows at ``indices``, as a listing."""
        idx = pa.array(indices, pa.int64())
        return Listing(
            self.ids.take(idx), self.labels.take(idx), self.size[indices], self.mtime_ns[indices],
            base=self.base, paths=None if self.paths is None else self.paths.take(idx),
            sorted_ids=self._order is None and self._sorted is not None and bool(np.all(np.diff(indices) > 0)),
        )

    def find(self, ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """Where each of ``ids`` is in this listing: ``(positions, found)``. A binary search
        of the ids in sorted order: no hash table over all of them."""
        if not len(self):
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        if self._sorted is None:  # a manifest keeps its own order: search a sorted copy
            order = pc.sort_indices(self.ids)
            self._sorted, self._order = self.ids.take(order), order.to_numpy()
        ids = ids.cast(self._sorted.type)  # the dataset's string ids vs the listing's large_string
        pos = np.minimum(pc.search_sorted(self._sorted, ids).to_numpy(), len(self) - 1).astype(np.int64)
        found = pc.equal(self._sorted.take(pa.array(pos)), ids).to_numpy(zero_copy_only=False)
        return (pos if self._order is None else self._order[pos]), found


class _Columns:
    """Builds a :class:`Listing` from rows in id order straight into its buffers: the ids'
    UTF-8 bytes and offsets, sizes, mtimes and label codes grow in place, so no Python
    object per image outlives its row (fragmented leftovers of such objects, and Arrow's
    conversion of Python lists, cost more memory than the columns themselves)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.offsets = array("q", [0])
        self.size, self.mtime = array("q"), array("q")
        self.codes = array("i")
        self.labels: dict[str | None, int] = {}

    def add(self, id: str, size: int, mtime_ns: int, label: str | None) -> None:
        self.data += id.encode()
        self.offsets.append(len(self.data))
        self.size.append(size)
        self.mtime.append(mtime_ns)
        self.codes.append(self.labels.setdefault(label, len(self.labels)))

    def listing(self, *, labelled: bool = True, **where) -> Listing:
        n = len(self.size)
        ids = pa.LargeStringArray.from_buffers(n, pa.py_buffer(self.offsets), pa.py_buffer(self.data))
        names = pa.array(list(self.labels), pa.string())
        codes = np.frombuffer(self.codes, np.int32) if n else np.empty(0, np.int32)
        labels = pa.DictionaryArray.from_arrays(codes, names) if labelled and n else pa.nulls(
            n, pa.dictionary(pa.int32(), pa.string()))
        as_numpy = lambda a: np.frombuffer(a, np.int64) if len(a) else np.empty(0, np.int64)  # noqa: E731
        return Listing(ids, labels, as_numpy(self.size), as_numpy(self.mtime), **where)


def _links_to_folder(e: os.DirEntry) -> bool:
    """A symlink to a folder (not followed, not listed); a looping link is listed, and its
    error recorded when decoding."""
    try:
        return e.is_dir()
    except OSError:
        return False


def _walk(folder: str, prefix: str, label: str | None, out: _Columns, progress) -> bool:
    """Add every image below ``folder`` to ``out`` in id order; True if one lies directly
    in it. Sorting each folder's entries, a subfolder as ``name/``, yields the ids sorted
    as whole strings without sorting them all at once. Symlinked folders are not followed
    (a link loop cannot trap the walk); symlinks to files are listed, and a broken one is
    reported when decoding (size and mtime -1)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(
                ((e.name + "/", e) if e.is_dir(follow_symlinks=False) else (e.name, e) for e in it),
                key=lambda x: x[0],
            )
    except OSError:  # unreadable folder: skipped, as os.walk does
        return False
    here = False
    for name, e in entries:
        if name.endswith("/"):
            _walk(e.path, prefix + name, label if prefix else e.name, out, progress)
        elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not _links_to_folder(e):
            try:
                st = e.stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size = mtime = -1
            out.add(prefix + name, size, mtime, label)
            here = True
            if progress is not None:
                progress(1)
    return here


def scan_folder(root: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> Listing:
    """Every image under ``root``, walked recursively, sorted by id.

    When every image lies in a subfolder (the ImageFolder convention), ``label`` is the
    first-level folder name; when any image lies directly in ``root``, labels are null.
    ``progress`` is called with 1 per image listed (a counter, for huge folders).
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise SourceError(f"image folder {str(root)!r} does not exist or is not a directory")
    out = _Columns()
    at_root = _walk(str(root), "", None, out, progress)
    return out.listing(labelled=not at_root, base=str(root))


def scan_uri(uri: str) -> Listing:
    """:func:`scan_folder` for a folder on object storage or a remote file system
    (``s3://bucket/images``): the listing gives sizes and modification times, so
    incremental runs work as they do on local folders."""
    try:
        files = [f for f in list_files(uri) if PurePosixPath(f[0]).suffix.lower() in IMAGE_EXTENSIONS]
    except (OSError, ValueError) as e:  # pyarrow: unknown scheme, no such bucket, not a folder
        raise SourceError(f"cannot list {uri!r}: {e}") from None
    files.sort()
    labelled = bool(files) and all("/" in i for i, _, _ in files)
    out = _Columns()
    for i, size, mtime in files:
        out.add(i, size, mtime, PurePosixPath(i).parts[0] if labelled else None)
    return out.listing(labelled=labelled, base=uri)


def read_manifest(path: str | os.PathLike) -> Listing:
    """A CSV or Parquet manifest with a ``path`` column and optional ``label`` and ``id``.

    Relative paths are taken relative to the manifest's folder; ``id`` defaults to the
    path as written. Paths may be URIs (``s3://...``); those are not stat'ed (size and
    mtime -1), so a re-run does not notice that such a file changed.
    """
    import pandas as pd

    path = Path(path)
    if path.suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    elif path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        raise SourceError(f"manifest {str(path)!r} must end in one of {MANIFEST_SUFFIXES}")
    if "path" not in df.columns:
        raise SourceError(
            f"manifest {str(path)!r} has no 'path' column (columns: {list(df.columns)})"
        )
    paths = df["path"].astype(str).tolist()
    ids = df["id"].astype(str).tolist() if "id" in df.columns else paths
    labels = (
        [None if pd.isna(v) else str(v) for v in df["label"]]
        if "label" in df.columns
        else [None] * len(df)
    )
    duplicated = pd.Series(ids)[pd.Series(ids).duplicated()].unique().tolist()
    if duplicated:
        raise SourceError(f"manifest {str(path)!r} repeats ids: {duplicated[:5]}")
    base = path.parent.absolute()
    full, sizes, mtimes = [], [], []
    for p in paths:
        if is_uri(p):  # not stat'ed: a re-run does not notice that such a file changed
            full.append(p)
            sizes.append(-1)
            mtimes.append(-1)
            continue
        f = str(p if os.path.isabs(p) else base / p)
        try:
            st = os.stat(f)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
        except OSError:
            sizes.append(-1)
            mtimes.append(-1)
        full.append(f)
    return Listing(
        pa.array(ids, pa.string()),
        pa.array(labels, pa.string()).dictionary_encode(),
        np.array(sizes, np.int64),
        np.array(mtimes, np.int64),
        paths=pa.array(full, pa.string()),
        sorted_ids=False,  # in the manifest's order
    )


def open_source(path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> Listing:
    """A folder, a manifest file or a folder URI (``s3://bucket/images``) -> its listing.

    A source with no images is an error (that names what was looked for), not an empty
    job that succeeds.
    """
    p = Path(path)
    if is_uri(path):
        records = scan_uri(path)
    elif p.is_file() and p.suffix in MANIFEST_SUFFIXES:
        records = read_manifest(p)
        if not records:
            raise SourceError(f"the manifest {str(p)!r} lists no images")
    elif p.is_dir():
        records = scan_folder(p, progress=progress)
    else:
        raise SourceError(
            f"{str(p)!r} is neither an image folder nor a manifest ({', '.join(MANIFEST_SUFFIXES)})"
        )
    if not records:
        raise SourceError(
            f"no images in {str(path)!r}: looked for files ending in "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} (any case), in subfolders too"
        )
    return records
