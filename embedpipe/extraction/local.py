"""Extraction on this machine: records -> decode workers -> forward -> store.

The stages are

    source (list files)  ->  decode workers (uint8 pixels)  ->  forward (main process)
                                                             ->  store (journal, parts)

and each is timed, so the summary says which one limited the run. Re-running the same
job resumes it: images already embedded (same size and mtime) are skipped, changed ones
re-embedded, deleted ones dropped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from ..config import ExtractConfig
from ..images.decode import Decoded, DecodeFailure, EncodedJPEG
from ..images.containers import open_containers
from ..images.loader import DecodePool
from ..images.sources import ImageRecord, open_source
from .forward import BatchEmbedder
from .job import (
    Embedded,
    ExtractSummary,
    Failed,
    JobWriter,
    begin,
    begin_containers,
    build_provenance,
    load_embedder,
    counter,
    progress_bar,
)
from .layers import open_group
from .plan import plan

log = logging.getLogger(__name__)

Decodable = Decoded | EncodedJPEG


def _batches(
    results: Iterator[tuple[ImageRecord, Decodable | DecodeFailure]], batch_size: int
) -> Iterator[tuple[list[tuple[ImageRecord, Decodable]], list[tuple[ImageRecord, DecodeFailure]]]]:
    """Group decode results into full batches of successes, with the failures met on the way."""
    ok: list[tuple[ImageRecord, Decodable]] = []
    failed: list[tuple[ImageRecord, DecodeFailure]] = []
    for record, result in results:
        if isinstance(result, (Decoded, EncodedJPEG)):
            ok.append((record, result))
        else:
            failed.append((record, result))
        if len(ok) == batch_size:
            yield ok, failed
            ok, failed = [], []
    if ok or failed:
        yield ok, failed


def _forward(
    forward: BatchEmbedder,
    ok: list[tuple[ImageRecord, Decodable]],
    failed: list[tuple[ImageRecord, DecodeFailure]],
) -> tuple[Embedded, Failed]:
    """One batch through the model; images the device decoder rejects join the failures."""
    vectors, rejected = forward.embed_items([d for _, d in ok]) if ok else (np.empty((0, 0)), {})
    failed = failed + [(ok[i][0], f) for i, f in rejected.items()]
    ok = [x for i, x in enumerate(ok) if i not in rejected]
    embedded = Embedded(
        records=[r for r, _ in ok],
        vectors=vectors,
        width=[d.width for _, d in ok],
        height=[d.height for _, d in ok],
        content_hash=[d.content_hash for _, d in ok],
    )
    return embedded, Failed.of(failed)


def extract(config: ExtractConfig, *, progress: bool = False) -> ExtractSummary:
    """Embed every image of ``config.source`` into the dataset at ``config.out``.

    Safe to interrupt and re-run: the second run finishes the first. Raises
    :class:`TooManyErrorsError` (after committing the work done) when more images fail
    than ``config.max_errors`` allows.
    """
    t0 = time.perf_counter()
    runtime = plan(config)
    embedder = load_embedder(config)
    containers = open_containers(
        config.source, image_column=config.image_column, id_column=config.id_column,
        label_column=config.label_column,
    )
    if containers is None:
        with counter("listing", progress) as listed:
            records = open_source(config.source, progress=listed.update)
    provenance = build_provenance(embedder, config, {"engine": "local", **runtime.to_dict()})
    torch.set_num_threads(runtime.threads)
    forward = BatchEmbedder(embedder, runtime, l2_normalize=config.normalize)
    seconds = Counter({"load": time.perf_counter() - t0})

    with open_group(
        config.out, provenance, embedder, overwrite=config.overwrite, part_rows=config.part_rows
    ) as writer:
        if containers is None:
            todo, summary = begin(writer, records, str(config.out), dict(provenance.runtime))
            job, total = JobWriter(writer, config, summary, len(todo)), len(todo)
        else:  # tar shards, image tables: read as they stream, counted as they go
            reads, summary = begin_containers(writer, containers, str(config.out), dict(provenance.runtime))
            todo, total = reads.records(), None
            job = JobWriter(writer, config, summary, None, on_written=reads.written)
        log.info(
            "%s: %s images to embed (%d already done) with %s on %s",
            config.out, total if total is not None else "all unread", summary.skipped, config.backbone, runtime.device,
        )
        pool = DecodePool(
            embedder.preprocessing,
            workers=runtime.workers,
            mode=config.decode,
            max_pixels=config.max_pixels,
            timeout=config.decode_timeout,
            prefetch=2 * runtime.batch_size + 4 * runtime.workers,
            nice=runtime.worker_nice,
        )
        with pool, progress_bar(total, progress) as bar:
            batches = _batches(pool.imap(todo), runtime.batch_size)
            while not job.stopped:
                t = time.perf_counter()
                item = next(batches, None)
                seconds["decode_wait"] += time.perf_counter() - t
                if item is None:
                    break
                t = time.perf_counter()
                embedded, failed = _forward(forward, *item)
                seconds["forward"] += time.perf_counter() - t
                bar.update(job.write(embedded, failed))
    if containers is not None:
        summary.images = summary.skipped + summary.embedded + summary.errors
    return job.finish(seconds, t0)
