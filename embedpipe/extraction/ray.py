"""Extraction on Ray Data: the local engine's pieces, scheduled across a cluster.

::

    driver: list the source, open the dataset (lock, metadata check, what is missing)
      -> ray.data.from_arrow(blocks of records)
      -> map_batches(DecodeActor)   CPU actors; each decodes through a DecodePool of one
                                    process, so a decoder that crashes or hangs costs one
                                    image, recorded as an error (as in the local engine)
      -> map_batches(EmbedActor)    one frozen model per actor, ``num_gpus`` each on GPUs
      -> driver: iter_batches -> DatasetWriter (journal per batch, atomic parts)

Ray does the scheduling, backpressure and fault tolerance: an actor that dies is
restarted and its batch retried (Ray Data's actor defaults, ``max_restarts=-1`` and
``max_task_retries=-1``), and no block is ever skipped (``max_errored_blocks`` stays 0:
an unreadable image is a row of the errors table, not a lost block). Results are written by
the driver through the same :class:`~embedpipe.store.DatasetWriter` as the local engine,
so the dataset, its metadata, its lock and resuming after a killed driver are the same.
The embeddings cross the object store once (a few KB per image), the pixels stay between
the decode and model actors.

Ray is an optional extra; nothing else in the package imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..cluster import ray_session
from ..config import DecodeMode, Device, ExtractConfig
from ..errors import MissingDependencyError
from ..images.containers import Container, open_containers
from ..images.decode import Decoded, DecodeFailure, ErrorType
from ..images.loader import DecodePool
from ..images.preprocess import Preprocessing
from ..images.sources import ImageRecord, open_source
from .forward import BatchEmbedder
from .job import (
    ContainerPlan,
    Embedded,
    ExtractSummary,
    Failed,
    JobWriter,
    begin,
    begin_containers,
    build_provenance,
    load_embedder,
    progress_bar,
)
from .layers import open_group
from .plan import cpu_count, plan

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

#: images per decode call: ~10 MB of 224 x 224 pixels, well under Ray's block target
DECODE_BATCH = 64



def import_ray():
    """``ray`` with Ray Data, or an error that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise MissingDependencyError(
            f"--engine ray needs Ray Data ({e}); install it with: pip install \"embedpipe[ray]\""
        ) from e
    return ray


# --- rows between the actors ---------------------------------------------------------


@dataclass
class DecodedRows:
    """What a decode actor hands the model actors: ``pixels`` (B, crop, crop, C) uint8
    and, per row, the decode result (``error_type`` ``""`` for success; failed rows keep
    zero pixels and travel on so that the driver records them). After the model actor,
    ``pixels`` is gone and ``vectors`` (B, D) float32 is there.

    Ray Data moves batches as dicts of arrays: :meth:`to_batch` and :meth:`of` convert at
    the actors' edges, so no code probes a batch by key.
    """

    id: np.ndarray
    width: np.ndarray
    height: np.ndarray
    content_hash: np.ndarray
    error_type: np.ndarray
    message: np.ndarray
    pixels: np.ndarray | None = None
    vectors: np.ndarray | None = None
    #: columns that ride along untouched: a container row's label, size, mtime, path,
    #: container and ``end`` (the row that closes a container, with its image count)
    along: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, ids: np.ndarray, shape: tuple[int, ...], along: dict[str, np.ndarray]) -> DecodedRows:
        n = len(ids)
        return cls(
            id=ids,
            width=np.full(n, -1, np.int32),
            height=np.full(n, -1, np.int32),
            content_hash=np.full(n, "", object),
            error_type=np.full(n, "", object),
            message=np.full(n, "", object),
            pixels=np.zeros((n, *shape), np.uint8),
            along=along,
        )

    @classmethod
    def of(cls, batch: dict[str, np.ndarray]) -> DecodedRows:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in batch.items() if k in names},
                   along={k: v for k, v in batch.items() if k not in names})

    def to_batch(self) -> dict[str, np.ndarray]:
        # not dataclasses.asdict, which would deep-copy every array
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "along"}
        return {**self.along, **{k: v for k, v in values.items() if v is not None}}

    @property
    def end(self) -> np.ndarray:
        """(B,) bool: rows that close a container (no image; ``along["end"]`` its count)."""
        return self.along["end"] >= 0 if "end" in self.along else np.zeros(len(self.id), bool)

    @property
    def ok(self) -> np.ndarray:
        """(B,) bool: rows that decoded."""
        return (self.error_type == "") & ~self.end


# --- the actors ----------------------------------------------------------------------


class DecodeActor:
    """Records -> pixels (B, crop, crop, C) uint8 plus per-row decode results.

    Rows that fail to decode keep zero pixels and name the error in ``error_type``
    (``""`` for success); they travel on so the driver records them.
    """

    def __init__(
        self,
        preprocessing: Preprocessing,
        mode: DecodeMode,
        max_pixels: int,
        timeout: float,
        nice: int,
        decode_fn: Callable | None = None,  # DecodePool's, for tests
    ) -> None:
        self.shape = (preprocessing.crop_size, preprocessing.crop_size, preprocessing.channels)
        self.pool = DecodePool(
            preprocessing, workers=1, mode=mode, max_pixels=max_pixels, timeout=timeout, nice=nice,
            decode_fn=decode_fn,
        ).__enter__()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{"id", "path"}`` (or a container's rows: ``data`` or ``read_error``) ->
        :meth:`DecodedRows.to_batch`."""
        along = {k: v for k, v in batch.items() if k not in ("id", "data", "read_error", "read_message")}
        rows = DecodedRows.empty(batch["id"], self.shape, along)
        records = [ImageRecord(str(i), str(p), None, -1, -1) for i, p in zip(batch["id"], batch["path"])]
        if "data" in batch:  # bytes read from a container, or why there are none
            records = [
                replace(r, data=d, failure=DecodeFailure(ErrorType(e), m) if e else None)
                for r, d, e, m in zip(records, batch["data"], batch["read_error"], batch["read_message"])
            ]
        todo = np.flatnonzero(~rows.end)
        for row, (_, result) in zip(todo, self.pool.imap(records[i] for i in todo)):
            if isinstance(result, Decoded):
                rows.pixels[row] = result.pixels.reshape(self.shape)
                rows.width[row], rows.height[row] = result.width, result.height
                rows.content_hash[row] = result.content_hash
            else:
                rows.error_type[row] = result.error_type.value
                rows.message[row] = result.message
        return rows.to_batch()

    def __del__(self) -> None:
        self.pool.__exit__(None, None, None)


class EmbedActor:
    """Decoded rows -> the same rows with ``vector`` (B, D) float32, pixels dropped.

    Loads the frozen backbone once, on the GPU Ray assigned to it when it has one.
    """

    def __init__(self, config: ExtractConfig, threads: int) -> None:
        import torch

        runtime = replace(plan(config), threads=threads)
        if runtime.device == "cpu":
            torch.set_num_threads(threads)
        self.forward = BatchEmbedder(load_embedder(config), runtime, l2_normalize=config.normalize)
        self.dim = self.forward.model.dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = DecodedRows.of(batch)
        ok = rows.ok
        vectors = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            vectors[ok] = self.forward(rows.pixels[ok])
        return dataclasses.replace(rows, pixels=None, vectors=vectors).to_batch()


# --- the driver ----------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Ray Data logs each execution's start, plan and end; the driver's one progress bar
    and summary line say what a user needs (Ray's own logs keep the rest)."""
    logger = logging.getLogger(logger_name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


def _records_blocks(records: list[ImageRecord], cpus: int) -> list[pa.Table]:
    """Ids and paths as Arrow blocks, a few per CPU so that every decode actor has work.

    The rest of each record (label, size, mtime) stays on the driver, keyed by id.
    """
    table = pa.table({"id": [r.id for r in records], "path": [r.path for r in records]})
    rows = min(1024, max(8, math.ceil(len(records) / (4 * cpus))))
    return [table.slice(i, rows) for i in range(0, len(records), rows)]


@dataclass(frozen=True)
class _Plan:
    """How the job uses the cluster it found."""

    cluster_cpus: int
    gpus: bool
    concurrency: int  # model actors
    threads: int  # torch threads per model actor
    batch_size: int

    @classmethod
    def of(cls, config: ExtractConfig, resources: dict[str, float]) -> _Plan:
        gpus = config.num_gpus_per_worker > 0
        concurrency = config.concurrency or (
            max(1, int(resources.get("GPU", 0) // config.num_gpus_per_worker)) if gpus else 1
        )
        return cls(
            cluster_cpus=int(resources.get("CPU", 1)),
            gpus=gpus,
            concurrency=concurrency,
            # CPU model actors share the node with the decoders, as in the local engine:
            # the forward pass takes the cores, low-priority decoders fill the gaps
            threads=4 if gpus else max(1, cpu_count() // concurrency),
            batch_size=config.batch_size or (128 if gpus else 8),
        )

    def runtime(self, config: ExtractConfig) -> dict:
        """What the metadata records of the run (not part of the dataset's identity)."""
        return {
            "engine": "ray",
            "ray_address": config.ray_address,
            "device": "cuda" if self.gpus else "cpu",
            "precision": config.precision.value,
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
            "num_gpus_per_worker": config.num_gpus_per_worker,
            "threads": self.threads,
            "cluster_cpus": self.cluster_cpus,
        }


def _container_rows(item: dict, todo: list[tuple[Container, frozenset[str]]]) -> Iterator[dict]:
    """Runs in a Ray task: the rows of one container (its bytes, or why there are none),
    then the row that closes it, which carries its image count to the driver."""
    k = int(item["container"])
    container, done = todo[k]
    count = 0
    for r in container.records(done):
        yield {
            "id": r.id, "path": r.path, "label": r.label, "size": r.size, "mtime_ns": r.mtime_ns,
            "data": r.data or b"", "read_error": r.failure.error_type.value if r.failure else "",
            "read_message": r.failure.message if r.failure else "", "container": k, "end": -1,
        }
        count += 1
    yield {"id": "", "path": "", "label": None, "size": -1, "mtime_ns": -1, "data": b"", "read_error": "",
           "read_message": "", "container": k, "end": count}


def _dataset(ray, todo, config: ExtractConfig, plan: _Plan, preprocessing: Preprocessing):
    """records (or containers, read in Ray tasks) -> decode actors -> model actors, as a
    lazy Ray dataset."""
    decoders = max(1, plan.cluster_cpus - (0 if plan.gpus else plan.concurrency))
    if todo and isinstance(todo[0], tuple):
        # Reading a container is I/O and tar/Parquet framing, light next to decoding: its
        # tasks reserve no CPU (the decode and model actors may hold them all, as on a
        # 2-CPU node), and at most as many run at once as there are decode actors.
        source = ray.data.from_items([{"container": k} for k in range(len(todo))]).flat_map(
            functools.partial(_container_rows, todo=todo), num_cpus=0, concurrency=decoders)
    else:
        source = ray.data.from_arrow(_records_blocks(todo, plan.cluster_cpus))
    return (
        source
        .map_batches(
            DecodeActor,
            fn_constructor_args=(
                preprocessing, config.decode, config.max_pixels, config.decode_timeout,
                0 if plan.gpus else 10,
            ),
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decoders),
            num_cpus=1,
        )
        .map_batches(
            EmbedActor,
            fn_constructor_args=(config, plan.threads),
            batch_size=plan.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan.concurrency),
            num_cpus=1,
            num_gpus=config.num_gpus_per_worker,
        )
    )


def _results(ray, todo, config: ExtractConfig, plan: _Plan, preprocessing: Preprocessing) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's output blocks as they finish; closing it stops the execution."""
    if todo:
        yield from _dataset(ray, todo, config, plan, preprocessing).iter_batches(
            batch_size=None, batch_format="numpy"
        )


def _carried(rows: DecodedRows) -> list[ImageRecord]:
    """The records of container rows, from the columns that rode along with them."""
    a = rows.along
    return [ImageRecord(str(i), str(p), lab, int(sz), int(mt)) for i, p, lab, sz, mt in
            zip(rows.id, a["path"], a["label"], a["size"], a["mtime_ns"])]


def _rows(rows: DecodedRows, records: list[ImageRecord]) -> tuple[Embedded, Failed]:
    """One batch of model-actor output (and each row's record) -> the typed rows the job
    writer takes; rows closing a container are neither."""
    ok = rows.ok
    bad = ~ok & ~rows.end
    embedded = Embedded(
        records=[r for r, keep in zip(records, ok) if keep],
        vectors=rows.vectors[ok],
        width=rows.width[ok],
        height=rows.height[ok],
        content_hash=rows.content_hash[ok].tolist(),
    )
    failed = Failed(
        records=[r for r, keep in zip(records, bad) if keep],
        error_type=rows.error_type[bad].tolist(),
        message=rows.message[bad].tolist(),
    )
    return embedded, failed


class _Ledger:
    """Marks each container complete once the driver has written as many of its rows as
    the row that closes it announced (Ray returns rows in any order)."""

    def __init__(self, reads: ContainerPlan) -> None:
        self.reads = reads
        self.expected: dict[int, int] = {}
        self.seen: Counter[int] = Counter()
        for container, _ in reads.todo:
            reads.started(container)

    def written(self, rows: DecodedRows) -> None:
        end, k = rows.end, rows.along["container"]
        self.expected.update(zip(k[end].tolist(), rows.along["end"][end].tolist()))
        self.seen.update(k[~end].tolist())
        for c in [c for c, n in self.expected.items() if self.seen[c] == n]:
            self.reads.completed(self.reads.todo[c][0])
            del self.expected[c]


def extract(config: ExtractConfig, *, progress: bool = False) -> ExtractSummary:
    """Embed every image of ``config.source`` into ``config.out`` with Ray Data.

    The dataset is the one :func:`embedpipe.extraction.local.extract` writes (same rows, schema
    and metadata, up to the recorded runtime), and the same guarantees hold: unreadable
    images become error records, a re-run embeds only what is missing.
    """
    if config.decode == DecodeMode.DEVICE:
        raise ValueError(
            "--decode device is for the local engine; on Ray, images are decoded by CPU "
            "actors (use draft or full) and the GPUs only run the model"
        )
    if config.stages:
        raise ValueError("--layer stages runs on the local engine for now; leave out --engine ray")
    if config.num_gpus_per_worker and config.device == Device.CPU:
        raise ValueError("--num-gpus-per-worker asks for GPUs, but --device cpu keeps the model off them")
    import_ray()
    t0 = time.perf_counter()
    embedder = load_embedder(config)  # fails fast on missing weights, before any cluster work
    containers = open_containers(
        config.source, image_column=config.image_column, id_column=config.id_column,
        label_column=config.label_column,
    )
    records = open_source(config.source) if containers is None else None
    seconds: Counter[str] = Counter()
    with ray_session(config.ray_address) as ray, _quiet("ray.data"):
        import ray.data

        plan = _Plan.of(config, ray.cluster_resources())
        provenance = build_provenance(embedder, config, plan.runtime(config))
        preprocessing = embedder.preprocessing
        del embedder  # the actors load their own
        seconds["load"] = time.perf_counter() - t0

        with open_group(
            config.out, provenance, None, overwrite=config.overwrite, part_rows=config.part_rows
        ) as writer:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # the driver shows one bar, in images
            ctx.print_on_execution_start = False
            if containers is None:
                todo, summary = begin(writer, records, str(config.out), dict(provenance.runtime))
                job, ledger = JobWriter(writer, config, summary, len(todo)), None
                by_id = {r.id: r for r in todo}
                todo = list(todo)
            else:
                reads, summary = begin_containers(writer, containers, str(config.out), dict(provenance.runtime))
                job, ledger, todo = JobWriter(writer, config, summary, None), _Ledger(reads), reads.todo
            log.info("%s: %s to embed on Ray (%d CPUs, %d model actors)", config.out,
                     f"{len(todo)} {'containers' if ledger else 'images'}", plan.cluster_cpus, plan.concurrency)
            batches = _results(ray, todo, config, plan, preprocessing)
            with progress_bar(None if ledger else len(todo), progress) as bar, contextlib.closing(batches):
                while not job.stopped:
                    t = time.perf_counter()
                    batch = next(batches, None)
                    seconds["wait"] += time.perf_counter() - t
                    if batch is None:
                        break
                    rows = DecodedRows.of(batch)
                    records = _carried(rows) if ledger else [by_id[i] for i in rows.id]
                    bar.update(job.write(*_rows(rows, records)))
                    if ledger:
                        ledger.written(rows)
    if containers is not None:
        summary.images = summary.skipped + summary.embedded + summary.errors
    return job.finish(seconds, t0)
