"""Where images come from: an image folder or a manifest, turned into records.

A source never opens an image; it lists files, gives each a stable ``id`` and an
optional ``label``, and notes the file's size and modification time so that an
incremental run can tell a changed file from an unchanged one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

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


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _walk(root: Path) -> Iterator[str]:
    """Image files below ``root`` as posix relative paths.

    Symlinked directories are not followed (a link loop cannot trap the walk); symlinks
    to files are listed, and a broken or looping one is reported when decoding.
    """
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield (rel / name).as_posix()


def scan_folder(root: str | os.PathLike) -> list[ImageRecord]:
    """Every image under ``root``, walked recursively, sorted by id.

    When every image lies in a subfolder (the ImageFolder convention), ``label`` is the
    first-level folder name; when any image lies directly in ``root``, labels are null.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise SourceError(f"image folder {str(root)!r} does not exist or is not a directory")
    ids = sorted(_walk(root))
    labelled = bool(ids) and all("/" in i for i in ids)
    return [
        ImageRecord(
            i,
            str(root / i),
            PurePosixPath(i).parts[0] if labelled else None,
            *_stat(str(root / i)),
        )
        for i in ids
    ]


def scan_uri(uri: str) -> list[ImageRecord]:
    """:func:`scan_folder` for a folder on object storage or a remote file system
    (``s3://bucket/images``): the listing gives sizes and modification times, so
    incremental runs work as they do on local folders."""
    try:
        files = [f for f in list_files(uri) if PurePosixPath(f[0]).suffix.lower() in IMAGE_EXTENSIONS]
    except (OSError, ValueError) as e:  # pyarrow: unknown scheme, no such bucket, not a folder
        raise SourceError(f"cannot list {uri!r}: {e}") from None
    files.sort()
    labelled = bool(files) and all("/" in i for i, _, _ in files)
    return [
        ImageRecord(i, join(uri, i), PurePosixPath(i).parts[0] if labelled else None, size, mtime)
        for i, size, mtime in files
    ]


def read_manifest(path: str | os.PathLike) -> list[ImageRecord]:
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
    records = []
    for i, p, label in zip(ids, paths, labels):
        if is_uri(p):
            records.append(ImageRecord(i, p, label, -1, -1))
            continue
        full = str(p if os.path.isabs(p) else base / p)
        records.append(ImageRecord(i, full, label, *_stat(full)))
    return records


def open_source(path: str | os.PathLike) -> list[ImageRecord]:
    """A folder, a manifest file or a folder URI (``s3://bucket/images``) -> records.

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
        records = scan_folder(p)
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
