"""Images on object storage and remote file systems, through pyarrow's file systems.

A source or an image path written as a URI (``s3://bucket/images``, ``gs://...``,
``hdfs://...``, ``file:///...``) is listed and read with ``pyarrow.fs``; everything else
is a local path and goes through ``os``. Credentials and regions come from the usual
places (AWS_* / GOOGLE_APPLICATION_CREDENTIALS environment variables, instance roles),
as pyarrow resolves them. One file system object is made per scheme and bucket and
process, so reading many images costs no repeated resolution.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    import pyarrow.fs as pafs

#: schemes whose URI path is the file system path (the others put the bucket first)
_PATH_ONLY = ("file", "hdfs", "viewfs")


def is_uri(path: object) -> bool:
    """``s3://...`` and the like; never true for a local path (Windows ones included)."""
    return isinstance(path, str) and "://" in path


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str) -> pafs.FileSystem:
    import pyarrow.fs as pafs  # only when a URI is read: decode workers stay light

    root = f"{scheme}://{netloc}/" if scheme in _PATH_ONLY else f"{scheme}://{netloc}"
    return pafs.FileSystem.from_uri(root)[0]


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A URI -> (its file system, the path within it)."""
    parts = urlsplit(uri)
    path = unquote(parts.path)
    inner = path if parts.scheme in _PATH_ONLY else f"{parts.netloc}{path}"
    return _filesystem(parts.scheme, parts.netloc), inner


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def list_files(uri: str) -> list[tuple[str, int, int]]:
    """Every file below ``uri``: (posix path relative to it, size, mtime in ns or -1)."""
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(uri)
    root = root.rstrip("/")
    return [
        (f.path[len(root) + 1:], f.size, f.mtime_ns if f.mtime_ns is not None else -1)
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if f.type == pafs.FileType.File
    ]


def join(uri: str, relative: str) -> str:
    """``uri`` / a relative posix path, percent-encoded (names may hold '#', '?', '%')."""
    return f"{uri.rstrip('/')}/{quote(relative)}"
