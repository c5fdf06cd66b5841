"""Inverted lists on disk: IVF indexes larger than this machine's RAM.

An IVF index is a small quantiser (the centroids, and the codebooks of SQ/PQ) and its
inverted lists, which hold every row's code and id and make up nearly all of its size.
With ``lists_dir`` the build never holds the lists in memory: each block of rows (each
Parquet part on Ray) is added to its own copy of the trained, empty index and written to
a shard file; FAISS's ``OnDiskInvertedLists`` then merges the shards' lists into one file,
``lists.ivfdata``, that searches memory-map (the page cache keeps the lists that queries
visit; the rest stays on disk). Rows keep the index numbers and the order inside every
list that an in-memory build gives them, so the index answers exactly as one does.

Tuning needs the tuning rows out of the index, and FAISS's on-disk lists cannot grow
once merged (an ``add`` after the merge scrambled ids in FAISS 1.15: 528 of 3,000 ids
were garbage in a test), so the lists are merged twice: without the tuning rows to tune,
then with them as a last shard into the index that is kept. The second merge costs one
more write of the lists. For the same reason ``index update`` refuses an on-disk index:
rebuild it.

The index directory then holds ``lists.ivfdata`` beside ``index.faiss`` (which stores
the quantiser and the lists' layout); :meth:`~embedpipe.index.core.Index.open` finds the
lists in the directory it opens, wherever it was moved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np

from ..errors import IndexSpecError

log = logging.getLogger(__name__)

LISTS_FILE = "lists.ivfdata"


def check_on_disk(faiss_index: faiss.Index, factory: str) -> faiss.IndexIVF:
    """The IVF part of an index whose lists can go to disk; other families are refused."""
    ivf = faiss.try_extract_index_ivf(faiss_index)
    if ivf is None:
        raise IndexSpecError(
            f"{factory} has no inverted lists to keep on disk: only the IVF family (Flat, SQ, "
            "PQ, with or without OPQ) can; use --index ivf/ivfsq/ivfpq, or build in memory"
        )
    return ivf


def lists_file(faiss_index: faiss.Index) -> Path | None:
    """The file holding the index's inverted lists, or None when they are in memory."""
    ivf = faiss.try_extract_index_ivf(faiss_index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return Path(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None


class ShardWriter:
    """Adds blocks of prepared rows to copies of a trained, empty IVF index and writes
    each copy as a shard file; :meth:`merge` puts the shards' lists into one on-disk file.

    Shard copies carry no direct map (FAISS maps only ids it numbers itself); the merged
    index gets one, so that rows can be reconstructed by number.
    """

    def __init__(self, trained: faiss.Index, lists_dir: str | os.PathLike[str]) -> None:
        check_on_disk(trained, "this index").make_direct_map(False)
        self.trained = faiss.serialize_index(trained)
        self.lists_dir = Path(lists_dir)
        self.scratch = self.lists_dir / f".shards-{uuid.uuid4().hex[:8]}"
        self.scratch.mkdir(parents=True)
        # an earlier attempt's lists (a build over its budget): the name only, so that an
        # index directory holding a hard link to them keeps its copy
        (self.lists_dir / LISTS_FILE).unlink(missing_ok=True)
        self.files: list[Path] = []

    def shard_path(self, number: int) -> Path:
        """Where shard ``number`` goes (also for a shard another process writes)."""
        return self.scratch / f"{number:06d}.index"

    def add(self, x: np.ndarray, first_row: int) -> None:
        """Rows ``first_row``.. of the index, ``x`` (m, dim) prepared, as the next shard."""
        path = self.shard_path(len(self.files))
        if write_shard(self.trained, [(first_row, x)], path):
            self.files.append(path)

    def take(self, path: Path) -> None:
        """A shard another process wrote (nothing when it had no rows to write)."""
        if path.exists():
            self.files.append(path)

    def merge(self, name: str, extra: Sequence[Path] = ()) -> faiss.Index:
        """A copy of the trained index whose lists are the shards' (then ``extra``'s),
        merged in order into ``lists_dir / name``."""
        index = faiss.deserialize_index(self.trained)
        ivf = faiss.extract_index_ivf(index)
        shards = [faiss.read_index(str(f), faiss.IO_FLAG_MMAP) for f in [*self.files, *extra]]
        parts = faiss.InvertedListsPtrVector()
        for shard in shards:
            parts.push_back(faiss.extract_index_ivf(shard).invlists)
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(self.lists_dir / name))
        with _quiet_stdout():  # FAISS prints a line each time it grows the file
            index.ntotal = ivf.ntotal = lists.merge_from_multiple(parts.data(), parts.size(), False)
        ivf.replace_invlists(lists, True)
        lists.this.disown()
        ivf.make_direct_map(True)
        del shards
        return index

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def write_shard(trained: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], path: Path) -> bool:
    """``blocks`` ((first row, prepared rows) each) added to a copy of the serialised
    trained index under those row numbers, written to ``path`` (also run in Ray tasks).
    Returns whether there were rows to write (no file otherwise)."""
    index = faiss.deserialize_index(trained)
    for first_row, x in blocks:
        index.add_with_ids(x, np.arange(first_row, first_row + len(x), dtype=np.int64))
    if index.ntotal == 0:
        return False
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return True


def place_lists(faiss_index: faiss.Index, directory: Path) -> None:
    """Put the index's on-disk lists into ``directory`` (an index directory being
    written) as :data:`LISTS_FILE`: a hard link where the file system allows one (no
    copy of the lists), a copy otherwise."""
    source = lists_file(faiss_index)
    if source is None:
        return
    target = directory / LISTS_FILE
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@contextlib.contextmanager
def lists_beside(out: Path, on_disk: bool) -> Iterator[Path | None]:
    """A scratch folder for the lists of an index to be saved at ``out``: beside it, on its
    file system, so that saving links the lists in instead of copying them; removed when
    the block ends. None (and nothing made) without ``on_disk``."""
    if not on_disk:
        yield None
        return
    lists_dir = out.parent / f".{out.name}.lists"
    try:
        yield lists_dir
    finally:
        shutil.rmtree(lists_dir, ignore_errors=True)


def read_index(path: Path) -> faiss.Index:
    """``faiss.read_index`` that finds on-disk lists in the index file's folder (FAISS
    says so on stdout, which would corrupt a command's JSON: silenced)."""
    with _quiet_stdout():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence writes to file descriptor 1 (C++ ``printf``) for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
