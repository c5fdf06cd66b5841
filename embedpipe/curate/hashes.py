"""Perceptual hashes of the images behind a dataset's rows, and the pairs they link.

A classifier's pooled features say *what* is in an image, not whether two files are the
same picture: crops of one photo look alike to them, while a half-size copy of a small
crop can fall to cosine 0.39. A perceptual hash keeps the picture's layout. Each image
gets imagehash's 64-bit DCT hash (``imagehash.phash``: grey, 32 x 32, the 8 x 8 lowest
frequencies against their median), the maintained, standard pHash that imagededup and
most dedup tools compute, so its distances mean what they mean elsewhere.

**Decoding** is the extraction's (:func:`embedpipe.images.decode.load_image`): format by
content, the pixel limit checked before any pixel is decoded, EXIF orientation applied,
transparency over white. JPEGs are scaled by libjpeg while decoding (Pillow's ``draft``,
:data:`DRAFT_SIZE`): a 12-megapixel photo hashes in 11 ms instead of 136 ms; on the
look-alike corpus of benchmarks/curation.py 94.6% of the hashes equal a full decode's and
dedup's precision and recall are the same.
Images are hashed in the extraction's decode pool (chunks of :data:`CHUNK` paths, a
worker per core); an image that cannot be read, or that hangs or kills its worker,
gets no hash and an error, never a crash.

**Resuming.** The hashes go to ``hashes.parquet`` (``id``, ``phash`` uint64, ``path``,
``size``, ``mtime_ns``, ``error``), rewritten atomically every :data:`SAVE_EVERY` images:
a run that is killed keeps what it finished, and a re-run reuses every row whose path,
size and mtime still match (an unreadable file too: it is tried again once it changes).
Rewriting the whole file was chosen over a journal of parts: one file, always
complete, and the rewrites cost seconds against the hours a million images take.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ..cluster import local_cores
from ..config import DEFAULT_MAX_PIXELS, DecodeMode
from ..errors import CurationInputError, ImageDecodeError
from ..files import atomic_write
from ..images.decode import DecodeFailure, ErrorType, load_image, read_file
from ..images.loader import DecodePool
from ..images.sources import ImageRecord
from ..uris import is_uri

log = logging.getLogger(__name__)

HASH_BITS = 64
#: the most bits two copies' hashes may differ in. On the look-alike corpus of
#: benchmarks/curation.py (real photos, their quadrant crops as distinct images) half-size,
#: JPEG-30 and brightened copies differ from their original in at most 4 bits, 90% crops in
#: up to 26, distinct pictures in 18 or more; dedup's groups have the same precision and
#: recall (1.000 / 0.970) at every distance from 2 to 12. Chance matches grow about 30
#: times with each 2 bits: two random pHashes are within 8 bits with odds 7e-10 (387 pairs
#: among a million random hashes, measured), within 10 bits 2e-8 (about 11,000 pairs).
DEFAULT_HASH_DISTANCE = 8
#: a pair whose hashes differ in more bits is not a near duplicate, whatever its cosine:
#: the pictures' layouts differ (unrelated pictures differ in 32 bits on average, and only
#: 0.3% of random pairs come within 20). On the look-alike corpus dedup's precision is
#: 1.000 with any veto from 16 to 26 bits (recall 0.94 to 0.98), 0.987 at 28, 0.563
#: without one; 20 sits in the middle of that plateau.
DEFAULT_HASH_VETO = 20
#: JPEGs are decoded at the smallest libjpeg scale that keeps both sides >= this
DRAFT_SIZE = 128
#: paths per task of the process pool; images hashed between two saves of hashes.parquet
CHUNK = 64
SAVE_EVERY = 50_000
#: queries per FAISS range search: memory is this many queries' matches
QUERY_BLOCK = 16_384
HASH_FILE = "hashes.parquet"
#: the hashes of ``dedup --across``'s other dataset
ACROSS_HASH_FILE = "hashes-across.parquet"
#: how the hashes were made, kept in hashes.parquet: rows made otherwise are not reused
_METHOD_KEY = b"embedpipe.hashes"

_POPCOUNT8 = np.array([v.bit_count() for v in range(256)], np.int64)


@dataclasses.dataclass(frozen=True)
class PerceptualHashes:
    """Each row's 64-bit pHash, in the dataset's row order.

    ``values``: (N,) uint64, the hash as an unsigned integer (``format(v, "016x")`` is
    imagehash's ``str``), 0 where unknown; ``known``: (N,) bool. ``unavailable``: why no
    row has one (images not reachable, hashing switched off), else None. ``reused``: rows
    taken from an earlier run's hashes.parquet.
    """

    values: np.ndarray
    known: np.ndarray
    unavailable: str | None = None
    reused: int = 0

    def __post_init__(self) -> None:
        values = np.asarray(self.values)
        known = np.asarray(self.known)
        if values.ndim != 1 or known.shape != values.shape or known.dtype != bool:
            raise CurationInputError(
                f"perceptual hashes need (N,) values and an (N,) bool mask, got shapes "
                f"{values.shape} and {known.shape} ({known.dtype})")
        if values.dtype != np.uint64:
            raise CurationInputError(f"perceptual hash values must be uint64, got {values.dtype}")
        object.__setattr__(self, "values", np.where(known, values, np.uint64(0)))
        object.__setattr__(self, "known", known)

    @classmethod
    def none(cls, n: int, reason: str) -> PerceptualHashes:
        """``n`` rows without hashes, and why."""
        return cls(np.zeros(n, np.uint64), np.zeros(n, bool), unavailable=reason)


def imagehash_missing() -> str | None:
    """Why hashes cannot be computed here (imagehash not installed), else None."""
    if importlib.util.find_spec("imagehash") is None:
        return 'imagehash is not installed: pip install "embedpipe[curate]"'
    return None


# --- hashing ---------------------------------------------------------------------------


def phash_file(source: str | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True) -> int:
    """The pHash of one image file (a path, a URI or its bytes) as an unsigned 64-bit
    int; :class:`~embedpipe.errors.ImageDecodeError` says why there is none."""
    import imagehash

    data = read_file(source) if isinstance(source, str) else source
    img, _ = load_image(data, mode="L", max_pixels=max_pixels, draft_size=DRAFT_SIZE if draft else None)
    return int(str(imagehash.phash(img, hash_size=8)), 16)


def phash_chunk(payloads: list[str], preprocessing: None, max_pixels: int,
                mode: DecodeMode) -> list[int | DecodeFailure]:
    """Runs in a worker of :class:`~embedpipe.images.loader.DecodePool` (its ``decode_fn``;
    ``preprocessing`` is unused, the hash scales on its own): a pHash or a failure per path."""
    out: list[int | DecodeFailure] = []
    for path in payloads:
        try:
            out.append(phash_file(path, max_pixels=max_pixels, draft=mode == DecodeMode.DRAFT))
        except ImageDecodeError as e:
            out.append(DecodeFailure(ErrorType(e.error_type), e.message))
        except Exception as e:  # a decoder bug must cost one image, not the job
            out.append(DecodeFailure(ErrorType.DECODE_ERROR, f"{type(e).__name__}: {e}"))
    return out


@dataclasses.dataclass
class _Rows:
    """hashes.parquet's columns as arrays, one entry per id; ``done`` marks rows settled."""

    ids: np.ndarray
    paths: np.ndarray
    values: np.ndarray
    known: np.ndarray
    size: np.ndarray
    mtime: np.ndarray
    error: np.ndarray
    done: np.ndarray

    def table(self, method: str):
        import pyarrow as pa

        d = self.done
        stat = self.size[d] >= 0
        schema = pa.schema([("id", pa.string()), ("phash", pa.uint64()), ("path", pa.string()),
                            ("size", pa.int64()), ("mtime_ns", pa.int64()), ("error", pa.string())],
                           metadata={_METHOD_KEY: method.encode()})
        return pa.table([
            pa.array(self.ids[d].tolist(), pa.string()),
            pa.array(self.values[d], pa.uint64(), mask=~self.known[d]),
            pa.array(self.paths[d].tolist(), pa.string()),
            pa.array(self.size[d], pa.int64(), mask=~stat),
            pa.array(self.mtime[d], pa.int64(), mask=~stat),
            pa.array(self.error[d].tolist(), pa.string()),
        ], schema=schema)


def _stat(path: str | None) -> tuple[int, int, str | None]:
    """(size, mtime_ns, error): -1 sizes for a URI (hashed, never reused) or a failure."""
    if path is None:
        return -1, -1, f"{ErrorType.NOT_FOUND}: no path recorded for this id"
    if is_uri(path):
        return -1, -1, None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return -1, -1, f"{ErrorType.NOT_FOUND}: no such file (or a broken symlink)"
    except OSError as e:
        return -1, -1, f"{ErrorType.UNREADABLE}: {e.strerror or e}"
    return st.st_size, st.st_mtime_ns, None


def _reuse(rows: _Rows, file: Path, method: str) -> int:
    """Take the rows of an earlier ``file`` whose path, size and mtime match; returns how many."""
    import pyarrow.parquet as pq

    if not file.exists():
        return 0
    try:
        old = pq.read_table(file)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        log.warning("%s is not readable (%s): hashing every image again", file, e)
        return 0
    if (old.schema.metadata or {}).get(_METHOD_KEY, b"").decode() != method:
        log.info("%s was made another way: hashing every image again", file)
        return 0
    import pandas as pd

    at = pd.Index(old.column("id").to_numpy(zero_copy_only=False)).get_indexer(rows.ids)
    hit = at >= 0
    pos = at[hit]
    col = {name: old.column(name) for name in ("phash", "path", "size", "mtime_ns", "error")}
    same = (
        (rows.size[hit] >= 0)
        & (col["path"].to_numpy(zero_copy_only=False)[pos] == rows.paths[hit])
        & (col["size"].fill_null(-2).to_numpy()[pos] == rows.size[hit])
        & (col["mtime_ns"].fill_null(-2).to_numpy()[pos] == rows.mtime[hit])
    )
    take = np.flatnonzero(hit)[same]
    pos = pos[same]
    rows.values[take] = col["phash"].fill_null(0).to_numpy()[pos]
    rows.known[take] = ~col["phash"].is_null().to_numpy(zero_copy_only=False)[pos]
    rows.error[take] = col["error"].to_numpy(zero_copy_only=False)[pos]
    rows.done[take] = True
    return len(take)


def hash_images(
    ids: np.ndarray,
    paths: Mapping[str, str],
    file: str | os.PathLike,
    *,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    save_every: int = SAVE_EVERY,
) -> PerceptualHashes:
    """The pHash of the image behind each of ``ids`` (``paths``: id -> file, see
    :func:`embedpipe.curate.dedup.image_paths`), kept in ``file`` (hashes.parquet) and
    reused from it on a re-run. ``draft``: let libjpeg scale JPEGs while decoding.
    ``workers``: processes (default: this machine's cores). Ids without a path or whose
    image cannot be read get no hash; the file's ``error`` column says why. Without
    imagehash installed no row has one, and ``unavailable`` says so."""
    if (missing := imagehash_missing()) is not None:
        return PerceptualHashes.none(len(ids), missing)
    file = Path(file)
    ids = np.asarray(ids, dtype=object).astype(str).astype(object)
    n = len(ids)
    if len(set(ids)) != n:
        raise CurationInputError("ids repeat: hash_images keeps one row per id, deduplicate them first")
    path_of = np.array([paths.get(i) for i in ids], dtype=object)
    stats = [_stat(p) for p in path_of]
    rows = _Rows(ids, path_of, np.zeros(n, np.uint64), np.zeros(n, bool),
                 np.array([s[0] for s in stats], np.int64), np.array([s[1] for s in stats], np.int64),
                 np.array([s[2] for s in stats], dtype=object), np.array([s[2] is not None for s in stats], bool))
    import imagehash

    method = json.dumps({"hash": "imagehash.phash", "bits": HASH_BITS, "imagehash": imagehash.__version__,
                         "draft_size": DRAFT_SIZE if draft else None, "max_pixels": max_pixels})
    reused = _reuse(rows, file, method)
    todo = np.flatnonzero(~rows.done)
    if len(todo):
        log.info("hashing %d images (%d reused from %s)", len(todo), reused, file)
        _hash(rows, todo, file, method, draft=draft, max_pixels=max_pixels,
              workers=workers or local_cores(), save_every=save_every)
    rows.done[:] = True
    _save(rows, file, method)
    return PerceptualHashes(rows.values, rows.known, reused=reused)


def _save(rows: _Rows, file: Path, method: str) -> None:
    import pyarrow.parquet as pq

    table = rows.table(method)
    atomic_write(file, lambda tmp: pq.write_table(table, tmp))


def _hash(rows: _Rows, todo: np.ndarray, file: Path, method: str, *, draft: bool,
          max_pixels: int, workers: int, save_every: int) -> None:
    """Hash the rows ``todo`` in the decode pool, saving ``file`` every ``save_every``."""
    def records() -> Iterator[ImageRecord]:
        for i in todo:
            yield ImageRecord(rows.ids[i], rows.paths[i], None, int(rows.size[i]), int(rows.mtime[i]))

    workers = max(1, min(workers, -(-len(todo) // CHUNK)))
    pool = DecodePool(None, workers=workers, mode=DecodeMode.DRAFT if draft else DecodeMode.FULL,
                      max_pixels=max_pixels, chunk_size=CHUNK, decode_fn=phash_chunk)
    with pool:
        for count, (i, (_, result)) in enumerate(zip(todo, pool.imap(records())), 1):
            if isinstance(result, DecodeFailure):
                rows.error[i] = f"{result.error_type}: {result.message}"
            else:
                rows.values[i], rows.known[i] = result, True
            rows.done[i] = True
            if count % save_every == 0:
                _save(rows, file, method)
                log.info("hashed %d of %d images", count, len(todo))


# --- pairs -----------------------------------------------------------------------------


def _codes(values: np.ndarray) -> np.ndarray:
    """(N,) uint64 hashes as the (N, 8) uint8 codes FAISS's binary indexes take."""
    return np.ascontiguousarray(values, dtype=np.uint64).view(np.uint8).reshape(-1, 8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between ``a`` and ``b`` ((N,) uint64 each, or broadcastable):
    (N,) int64."""
    x = np.ascontiguousarray(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))
    return _POPCOUNT8[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1)


def hash_pairs(values: np.ndarray, max_distance: int, k: int, *,
               block_rows: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of rows whose hashes differ in at most ``max_distance`` bits, each row
    with at most its ``k`` nearest others (ties by row number), the bound the embedding
    graph has.

    ``values``: (N,) uint64 hashes. Returns ``(a, b, distance)``: (P,) int64 each, a < b,
    each pair once. FAISS's exact binary index answers a range search for a block of rows
    at a time (its k-NN search keeps a heap per query and is five to ten times slower), so
    memory is the matches of one block; repeated values each count as a row.
    """
    import faiss

    if not 0 <= max_distance <= HASH_BITS:
        raise CurationInputError(f"hash distance must be 0..{HASH_BITS} bits, got {max_distance}")
    codes = _codes(values)
    n = len(codes)
    empty = np.empty(0, np.int64)
    if n < 2 or k < 1:
        return empty, empty, empty
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(codes)
    found = []
    for start in range(0, n, block_rows):
        # FAISS's binary range search returns distances strictly below the radius
        lims, dist, nbr = index.range_search(codes[start:start + block_rows], max_distance + 1)
        query = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
        other, dist = nbr.astype(np.int64), dist.astype(np.int64)
        mine = other != query
        query, other, dist = query[mine], other[mine], dist[mine]
        order = np.lexsort((other, dist, query))
        query, other, dist = query[order], other[order], dist[order]
        rank = np.arange(len(query)) - np.searchsorted(query, query)
        near = rank < k
        found.append((query[near], other[near], dist[near]))
    query, other, dist = (np.concatenate(c) for c in zip(*found))
    a, b = np.minimum(query, other), np.maximum(query, other)
    _, first = np.unique(a * n + b, return_index=True)
    return a[first], b[first], dist[first]


def nearest_hashes(queries: PerceptualHashes, base: PerceptualHashes) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the base row whose hash is nearest (ties: the lowest row) and
    the bits between them: ``(rows (Nq,) int64, bits (Nq,) int64)``, -1 for both where
    the query or every base row has no hash."""
    import faiss

    rows = np.full(len(queries.values), -1, np.int64)
    bits = np.full(len(queries.values), -1, np.int64)
    known_base = np.flatnonzero(base.known)
    asked = np.flatnonzero(queries.known)
    if len(known_base) == 0 or len(asked) == 0:
        return rows, bits
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(_codes(base.values[known_base]))
    for start in range(0, len(asked), QUERY_BLOCK):
        block = asked[start:start + QUERY_BLOCK]
        dist, found = index.search(_codes(queries.values[block]), 1)
        rows[block], bits[block] = known_base[found[:, 0]], dist[:, 0]
    return rows, bits
