"""Files that readers see whole or not at all: the one atomic writer.

Every file embedpipe writes (dataset parts and manifests, index directories, reports,
galleries, checkpoints, pipeline records, sample images, the service's thumbnails) goes
through :func:`atomic_write`: a hidden temporary sibling, fsync, rename over the target,
fsync of the folder. A crash leaves the old file or the new one, never half of either.
Directories are swapped with :func:`replace_dir`, which on Linux exchanges the two names
in one ``renameat2`` call, so the path never stops existing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden name next to ``path`` that no other writer picks (``.name.1a2b3c4d.tmp``)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then move it into place.

    ``write`` creates the file at the path it is given (``img.save``, ``pq.write_table``,
    ``faiss.write_index``...). The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` to ``path`` so that readers see all of it or nothing."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


# --- directories ----------------------------------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically (Linux ``renameat2``); False where the
    system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc < 2.28
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``, replacing what is there.

    Where the old directory exists, the two are exchanged in one step and the old one
    (now at ``tmp``) removed: a reader opening ``path`` finds the old directory or the new
    one, never none. Elsewhere the old one moves aside first (a moment without ``path``).
    """
    if path.exists():
        if not _exchange(tmp, path):
            old = temporary_sibling(path, ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            tmp = old
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
