"""The extraction job's pieces that both engines share, on purpose in one place.

Planning what is left to do (:func:`begin`), the provenance a run records, the typed
rows passed between stages (:class:`Embedded`, :class:`Failed`), the last stage that
writes them (:class:`JobWriter`: error rows, the embeddings table, the summary and the
``--max-errors`` limit), and the progress bar.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import __version__
from ..backbones import Embedder, load_backbone
from ..backbones.stages import stage_embedder
from ..config import ExtractConfig
from ..errors import SourceError, TooManyErrorsError
from ..images.containers import Container
from ..images.decode import DecodeFailure
from ..images.sources import ImageRecord, Listing
from ..provenance import Provenance
from ..store import ERRORS_SCHEMA
from .layers import ConcatStages, DatasetGroup

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    """What a run did. ``seconds`` splits the wall time by stage."""

    out: str
    images: int  # in the source
    embedded: int  # by this run
    skipped: int  # already embedded and unchanged, or already recorded as errors
    errors: int  # recorded by this run
    dropped: int  # rows of deleted or changed files removed
    relabelled: int = 0  # rows whose label changed in the manifest, updated in place
    errors_by_type: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        wall = self.seconds.get("total", 0.0)
        return self.embedded / wall if wall else 0.0

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        errs = ""
        if self.errors:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_type.items()))
            errs = f" ({kinds}; listed by `embedpipe info {self.out} --errors`)"
        relabelled = f", {self.relabelled} relabelled" if self.relabelled else ""
        return (
            f"{self.embedded} embedded, {self.skipped} already done, {self.errors} errors{errs}, "
            f"{self.dropped} dropped{relabelled}; {self.images_per_second:.1f} images/s -> {self.out}"
        )


def build_provenance(embedder: Embedder | ConcatStages, config: ExtractConfig, runtime: dict) -> Provenance:
    """The provenance written into every part: what made the vectors, and how the run
    went (``runtime``: where and how it ran, which engine, devices, batch size)."""
    import PIL
    import pyarrow
    import torchvision

    return replace(
        embedder.provenance(),
        precision=config.precision.value,
        decode=config.decode.value,
        embedding_dtype=config.embedding_dtype.value,
        normalize=config.normalize,
        runtime=runtime,
        images=config.source if isinstance(config.source, str) else str(config.source.absolute()),
        versions={
            "embedpipe": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "pyarrow": pyarrow.__version__,
            "python": platform.python_version(),
        },
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def error_limit(max_errors: float | None, todo: int | None) -> int | None:
    """``--max-errors`` as a number of images: a count, or a fraction of ``todo`` below 1
    (``None`` for containers, whose images are counted only as they are read)."""
    if max_errors is None:
        return None
    if todo is None and 0 < max_errors < 1:
        raise SourceError(
            f"--max-errors {max_errors:g} is a fraction of the images, which tar shards and image "
            "tables do not tell before they are read: give a number of images (e.g. --max-errors 100)"
        )
    return int(max_errors) if max_errors >= 1 or max_errors == 0 else math.ceil(max_errors * todo)


def load_embedder(config: ExtractConfig) -> Embedder | ConcatStages:
    """The frozen backbone of a job (all its stages side by side with ``config.stages``),
    with ``--resize-size``/``--crop-size`` applied."""
    if config.stages:
        layers = "stages" if config.stages == ("stages",) else config.stages
        embedder = ConcatStages(stage_embedder(
            config.backbone, weights=config.weights, seed=config.seed, layers=layers,
            key_map=config.weights_key_map, input_size=config.crop_size,
        ))
    else:
        embedder = load_backbone(
            config.backbone, weights=config.weights, layer=config.layer, seed=config.seed,
            key_map=config.weights_key_map,
        )
    p = embedder.preprocessing
    if config.resize_size or config.crop_size:
        p = replace(p, resize_size=config.resize_size or p.resize_size, crop_size=config.crop_size or p.crop_size)
    embedder.preprocessing = p
    return embedder


def begin(
    writer: DatasetGroup, listing: Listing, out: str, runtime: dict
) -> tuple[Listing, ExtractSummary]:
    """What a (re-)run still has to do, and its summary so far: ``(images to embed, summary)``.

    A row is current while its file has the same size and mtime: rows of changed or
    deleted files are dropped from the dataset (embeddings and error records alike), and
    changed files embedded again. A row whose label alone changed (a manifest fixed) is
    relabelled in place, without embedding the image again.

    The dataset is read a part at a time (ids, sizes, mtimes, labels) and each row is
    looked up in the listing by binary search: memory is the listing's columns, a part,
    and one flag per image, however large the collection.
    """
    done = np.zeros(len(listing), bool)
    stale: list[str] = []
    relabel: dict[str, str | None] = {}
    for errors in (False, True):
        columns = ["id", "size", "mtime_ns"] + ([] if errors else ["label"])
        for t in writer.blocks(columns, errors=errors):
            ids = t.column("id")
            pos, found = listing.find(ids)
            current = found & (listing.size[pos] == t.column("size").to_numpy()) \
                & (listing.mtime_ns[pos] == t.column("mtime_ns").to_numpy())
            stale += ids.filter(pa.array(~current)).to_pylist()
            done[pos[current]] = True
            if not errors and current.any():
                kept = pa.array(current)
                old, new = t.column("label").filter(kept), listing.labels.take(pa.array(pos[current])).cast(pa.string())
                differ = pc.invert(pc.fill_null(pc.equal(old, new), False)) if len(old) else pa.array([], pa.bool_())
                differ = pc.and_(differ, pc.invert(pc.and_(pc.is_null(old), pc.is_null(new))))
                for i, label in zip(ids.filter(kept).filter(differ).to_pylist(), new.filter(differ).to_pylist()):
                    relabel[i] = label
    dropped = sum(writer.drop(set(stale)))
    relabelled = writer.relabel(relabel)
    todo = listing.take(np.flatnonzero(~done))
    summary = ExtractSummary(
        out=out, images=len(listing), embedded=0, skipped=len(listing) - len(todo), errors=0,
        dropped=dropped, relabelled=relabelled, runtime=runtime,
    )
    return todo, summary


def _under(ids: pa.Array, names: list[str]) -> pa.Array:
    """A mask of the ``ids`` that belong to one of the containers ``names``
    (``name/key``, or ``name`` itself): one vectorised pass per distinct name length."""
    mask = pa.array(np.zeros(len(ids), bool))
    if not names or not len(ids):
        return mask
    raw = ids.cast(pa.binary())
    by_length: dict[int, list[bytes]] = {}
    for n in names:
        by_length.setdefault(len(n.encode()), []).append(n.encode())
    for length, group in by_length.items():
        head = pc.binary_slice(raw, 0, length + 1)
        hit = pc.or_(
            pc.is_in(head, value_set=pa.array([g + b"/" for g in group], pa.binary())),
            pc.is_in(raw, value_set=pa.array(group, pa.binary())),
        )
        mask = pc.or_(mask, hit)
    return mask


class ContainerPlan:
    """The containers a (re-)run still has to read, and the bookkeeping that lets the
    next run skip each one once all its rows are written.

    A container is recorded as started before its first image is read and as complete
    once the writer has written its last row (rows are written in order), so a killed
    job leaves every container either complete or resumable by key.
    """

    def __init__(self, writer: DatasetGroup, todo: list[tuple[Container, frozenset[str]]]) -> None:
        self.writer = writer
        self.todo = todo
        self._last: dict[str, Container] = {}  # id of a container's last record -> it

    def records(self) -> Iterator[ImageRecord]:
        """Every record still to embed, container after container (the local engine)."""
        for container, done in self.todo:
            self.started(container)
            last = None
            for record in container.records(done):
                if last is not None:
                    yield last
                last = record
            if last is None:  # nothing (left) to read in it
                self.completed(container)
            else:
                self._last[last.id] = container
                yield last

    def written(self, records: Iterable[ImageRecord]) -> None:
        """Rows just written, in order: a container whose last row is among them is complete."""
        for r in records:
            if (container := self._last.pop(r.id, None)) is not None:
                self.completed(container)

    def started(self, c: Container) -> None:
        """Before any of its rows is written: a re-run reads it again past its done keys."""
        self.writer.record_container(c.name, c.size, c.mtime_ns, complete=False)

    def completed(self, c: Container) -> None:
        """Once all its rows are written: a re-run skips it without opening it."""
        self.writer.record_container(c.name, c.size, c.mtime_ns, complete=True)


def begin_containers(
    writer: DatasetGroup, containers: list[Container], out: str, runtime: dict
) -> tuple[ContainerPlan, ExtractSummary]:
    """:func:`begin` for tar shards and image tables: what a (re-)run still has to read.

    A finished container with the same size and mtime is skipped without being opened;
    a half-done one is read past the keys already done; the rows of a changed or deleted
    container are dropped and a changed one is read again.
    """
    logged = writer.containers()
    current = {c.name: c for c in containers}
    changed = [
        name for name, r in logged.items()
        if name not in current or (r["size"], r["mtime_ns"]) != (current[name].size, current[name].mtime_ns)
    ]
    gone = set(changed)
    todo = [c for c in containers if not (logged.get(c.name, {}).get("complete") and c.name not in gone)]
    summary = ExtractSummary(out=out, images=0, embedded=0, skipped=0, errors=0, dropped=0, runtime=runtime)
    if not changed and not any(c.name in logged for c in todo):
        # nothing changed, nothing half-done: the rows need not be read, only counted
        summary.skipped = summary.images = writer.rows()
        log.info("%d of %d containers to read (%d finished)", len(todo), len(containers), len(containers) - len(todo))
        return ContainerPlan(writer, [(c, frozenset()) for c in todo]), summary
    ids = writer.ids()
    stale = _under(ids, changed)
    if pc.any(stale).as_py():
        summary.dropped = sum(writer.drop(set(ids.filter(stale).to_pylist())))
        ids = ids.filter(pc.invert(stale))
    # keys already done: only rows of containers still to read are looked at one by one
    done: dict[str, set[str]] = {c.name: set() for c in todo}
    lengths = sorted({len(n) for n in done}, reverse=True)
    for i in ids.filter(_under(ids, list(done))).to_pylist():
        for n in lengths:
            if i[:n] in done and (len(i) == n or i[n] == "/"):
                done[i[:n]].add(i[n + 1:])
                break
    summary.images = summary.skipped = len(ids)
    log.info("%d of %d containers to read (%d finished)", len(todo), len(containers), len(containers) - len(todo))
    return ContainerPlan(writer, [(c, frozenset(done[c.name])) for c in todo]), summary


@dataclass
class Embedded:
    """Rows that became vectors: ``vectors`` (n, D) float32, one per record."""

    records: list[ImageRecord]
    vectors: np.ndarray
    width: Sequence[int]
    height: Sequence[int]
    content_hash: Sequence[str]


@dataclass
class Failed:
    """Rows that could not be embedded, and why (an :class:`ErrorType` value each)."""

    records: list[ImageRecord]
    error_type: Sequence[str]
    message: Sequence[str]

    @classmethod
    def of(cls, failed: list[tuple[ImageRecord, DecodeFailure]]) -> Failed:
        return cls(
            [r for r, _ in failed],
            [f.error_type.value for _, f in failed],
            [f.message for _, f in failed],
        )


class JobWriter:
    """Both engines' last stage: batches of :class:`Embedded` and :class:`Failed` rows
    into the dataset, counted in the summary, timed, stopped at ``--max-errors``."""

    def __init__(
        self,
        writer: DatasetGroup,
        config: ExtractConfig,
        summary: ExtractSummary,
        todo: int | None,
        on_written: Callable[[list[ImageRecord]], None] | None = None,
    ) -> None:
        self.writer, self.config, self.summary = writer, config, summary
        self.on_written = on_written
        self.limit = error_limit(config.max_errors, todo)
        self.errors_by_type: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def write(self, embedded: Embedded | None, failed: Failed | None) -> int:
        """Append one batch; returns the rows it accounted for (for the progress bar)."""
        t = time.perf_counter()
        rows = 0
        if embedded is not None and embedded.records:
            records = embedded.records
            self.writer.append_rows(
                dict(
                    ids=[r.id for r in records],
                    labels=[r.label for r in records],
                    width=embedded.width,
                    height=embedded.height,
                    size=[r.size for r in records],
                    mtime_ns=[r.mtime_ns for r in records],
                    content_hash=embedded.content_hash,
                ),
                embedded.vectors.astype(self.config.embedding_dtype.value, copy=False),
            )
            self.summary.embedded += len(records)
            rows += len(records)
        if failed is not None and failed.records:
            self.writer.append_errors(errors_table(failed))
            self.errors_by_type.update(failed.error_type)
            self.summary.errors += len(failed.records)
            rows += len(failed.records)
            for r, kind, message in zip(failed.records, failed.error_type, failed.message):
                log.debug("%s: %s: %s", r.id, kind, message)
        if self.on_written is not None:
            self.on_written([*(embedded.records if embedded else ()), *(failed.records if failed else ())])
        self.seconds["write"] += time.perf_counter() - t
        return rows

    @property
    def stopped(self) -> bool:
        """More images failed than ``--max-errors`` allows."""
        return self.limit is not None and self.summary.errors > self.limit

    def finish(self, seconds: Counter[str], t0: float) -> ExtractSummary:
        """The completed summary; raises :class:`TooManyErrorsError` (the work done is
        committed by then) if the run stopped at the ``--max-errors`` limit."""
        summary, config = self.summary, self.config
        summary.errors_by_type = dict(self.errors_by_type)
        seconds = seconds + self.seconds
        seconds["total"] = time.perf_counter() - t0
        summary.seconds = dict(seconds)
        if self.stopped:
            raise TooManyErrorsError(
                f"stopped after {summary.errors} unreadable images (more than --max-errors "
                f"{config.max_errors:g} allows): {summary.errors_by_type}. The {summary.embedded} "
                f"images embedded so far are saved in {config.out}; see `embedpipe info {config.out} --errors` "
                "for the failures, then re-run to continue."
            )
        return summary


def errors_table(failed: Failed) -> pa.Table:
    """Error rows in :data:`~embedpipe.store.ERRORS_SCHEMA`."""
    records = failed.records
    return pa.table(
        {
            "id": [r.id for r in records],
            "path": [r.path for r in records],
            "error_type": list(failed.error_type),
            "message": list(failed.message),
            "size": [r.size for r in records],
            "mtime_ns": [r.mtime_ns for r in records],
        },
        schema=ERRORS_SCHEMA,
    )


def counter(what: str, enabled: bool):
    """A counting spinner (``listing: 1,234,567 files``), so that listing ten million
    files is not minutes of a silent terminal."""
    from tqdm.auto import tqdm

    return tqdm(desc=what, unit=" files", disable=not enabled, dynamic_ncols=True, mininterval=0.5)


def progress_bar(total: int | None, enabled: bool):
    """A bar to ``total``, or a counter with a rate when the total is not known."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.05)
