"""Extraction: records -> decoded batches -> embeddings -> a Parquet dataset.

Owns devices, precision, threads and workers. The stages are

    source (list files)  ->  decode workers (uint8 pixels)  ->  forward (main process)
                                                             ->  store (journal, parts)

and each is timed, so the summary says which one limited the run. Re-running the same
job resumes it: images already embedded (same size and mtime) are skipped, changed ones
re-embedded, deleted ones dropped.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import torch

from . import __version__
from .backbones import Embedder, load_backbone
from .config import DEFAULT_MAX_PIXELS, Device, ExtractConfig, Precision
from .decode import Decoded, DecodeFailure, EncodedJPEG, decode_file
from .errors import DeviceError, TooManyErrorsError
from .loader import DecodePool
from .preprocess import Preprocessing
from .sources import ImageRecord, open_source
from .store import ERRORS_SCHEMA, DatasetWriter, embeddings_table

log = logging.getLogger(__name__)


# --- planning: what this machine should run -----------------------------------------


@dataclass(frozen=True)
class Runtime:
    """How a job runs on this machine, decided once by :func:`plan`."""

    device: str
    precision: Precision
    batch_size: int
    workers: int
    threads: int
    channels_last: bool
    worker_nice: int

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision.value}


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def bf16_supported_on_cpu() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def plan(config: ExtractConfig) -> Runtime:
    """Choose device, batch size, workers and threads from the config and the machine."""
    cuda = torch.cuda.is_available()
    if config.device == Device.CUDA and not cuda:
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device")
    device = "cuda" if config.device == Device.CUDA or (config.device == Device.AUTO and cuda) else "cpu"
    cores = cpu_count()
    if device == "cpu":
        if config.precision == Precision.FP16:
            raise DeviceError("fp16 autocast is for GPUs; on the CPU use --precision bf16")
        if config.precision == Precision.BF16 and not bf16_supported_on_cpu():
            raise DeviceError("this CPU has no bf16 support (AVX512-BF16/AMX); use fp32")
        return Runtime(
            device=device,
            precision=config.precision,
            # oneDNN on this class of CPU runs ResNets fastest at batch 8 (15.7 vs 10.7
            # images/s for resnet50 fp32 at 32; benchmarks/extract.py and docs/guide.md)
            batch_size=config.batch_size or 8,
            # The forward pass takes every core; low-priority decoders fill the gaps it
            # leaves instead of preempting it, and sleep when the prefetch window is full.
            workers=config.workers or min(cores, 8),
            threads=cores,
            channels_last=config.precision != Precision.FP32,
            worker_nice=10,
        )
    return Runtime(
        device=device,
        precision=config.precision,
        batch_size=config.batch_size or 128,
        workers=config.workers or max(1, min(cores - 1, 16)),
        threads=max(1, min(cores, 4)),
        channels_last=True,
        worker_nice=0,
    )


# --- the forward pass ----------------------------------------------------------------


def normalize(
    x: torch.Tensor,
    preprocessing: Preprocessing,
    *,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32 on the same device, normalised.

    The arithmetic of torchvision's ``ImageClassification`` (``x / 255``, then
    ``(x - mean) / std``), done once per batch on the device rather than per image.
    """
    mean = torch.tensor(preprocessing.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, device=x.device).view(1, -1, 1, 1)
    x = x.float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=memory_format)


_CPU = torch.device("cpu")


def pixels_to_tensor(
    pixels: np.ndarray,
    preprocessing: Preprocessing,
    *,
    device: torch.device = _CPU,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """(B, H, W, C) uint8 numpy -> (B, C, H, W) normalised float32 on ``device``."""
    x = torch.from_numpy(pixels)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    # (B, H, W, C) -> (B, C, H, W): the strides are channels_last already
    return normalize(x.permute(0, 3, 1, 2), preprocessing, memory_format=memory_format)


class BatchEmbedder:
    """uint8 pixels (B, H, W, C) -> embeddings (B, D) float32 numpy.

    Normalises on the device (:func:`pixels_to_tensor`), then runs the backbone under
    ``inference_mode`` and, for bf16/fp16, autocast.
    """

    def __init__(self, embedder: Embedder, runtime: Runtime, *, normalize: bool = False) -> None:
        self.device = torch.device(runtime.device)
        self.runtime = runtime
        self.normalize = normalize
        self.memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
        self.model = embedder.to(self.device, memory_format=self.memory_format)
        self.preprocessing = embedder.preprocessing
        self.autocast_dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(
            runtime.precision
        )

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, C) uint8 -> (B, D) float32."""
        x = pixels_to_tensor(
            pixels, self.preprocessing, device=self.device, memory_format=self.memory_format
        )
        return self.embed(x)

    def embed_items(
        self, items: list[Decoded | EncodedJPEG]
    ) -> tuple[np.ndarray, dict[int, DecodeFailure]]:
        """Worker results -> (embeddings of the items that decoded, failures by index).

        Encoded JPEGs (``--decode device``) are decoded here, on the device.
        """
        if all(isinstance(d, Decoded) for d in items):
            return self(np.stack([d.pixels for d in items])), {}
        from .device_decode import decode_items

        x, failures = decode_items(items, self.preprocessing, self.device)
        if not len(x):
            return np.empty((0, self.model.dim), np.float32), failures
        return self.embed(normalize(x, self.preprocessing, memory_format=self.memory_format)), failures

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) normalised float on the device -> (B, D) float32 numpy."""
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            emb = self.model(x)
        emb = emb.float()
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, dim=1)
        return emb.cpu().numpy()


# --- the job -------------------------------------------------------------------------


@dataclass
class ExtractSummary:
    """What a run did. ``seconds`` splits the wall time by stage."""

    out: str
    images: int  # in the source
    embedded: int  # by this run
    skipped: int  # already embedded and unchanged, or already recorded as errors
    errors: int  # recorded by this run
    dropped: int  # rows of deleted or changed files removed
    errors_by_type: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        wall = self.seconds.get("total", 0.0)
        return self.embedded / wall if wall else 0.0

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        errs = f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.errors_by_type.items()))})" if self.errors else ""
        return (
            f"{self.embedded} embedded, {self.skipped} already done, {self.errors} errors{errs}, "
            f"{self.dropped} dropped; {self.images_per_second:.1f} images/s -> {self.out}"
        )


def build_meta(embedder: Embedder, config: ExtractConfig, runtime: dict) -> dict:
    """The metadata written into every part: what made the vectors, and how the run went
    (``runtime``: where and how it ran, which engine, devices, batch size)."""
    import PIL
    import pyarrow
    import torchvision

    return {
        **embedder.provenance(),
        "precision": config.precision.value,
        "decode": config.decode.value,
        "embedding_dtype": config.embedding_dtype.value,
        "normalize": config.normalize,
        "runtime": runtime,
        # where ids resolve to files (galleries, the search service): a folder or a URI
        "images": config.source if isinstance(config.source, str) else str(config.source.absolute()),
        "versions": {
            "embedpipe": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "pyarrow": pyarrow.__version__,
            "python": platform.python_version(),
        },
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def error_limit(max_errors: float | None, todo: int) -> int | None:
    """``--max-errors`` as a number of images: a count, or a fraction of ``todo`` below 1."""
    if max_errors is None:
        return None
    return int(max_errors) if max_errors >= 1 or max_errors == 0 else math.ceil(max_errors * todo)


def finish(
    config: ExtractConfig,
    summary: ExtractSummary,
    errors_by_type: Counter[str],
    seconds: Counter[str],
    t0: float,
    limit: int | None,
) -> ExtractSummary:
    """Complete a run's summary; raise :class:`TooManyErrorsError` (the work done is
    committed by then) if it stopped at the ``--max-errors`` limit."""
    summary.errors_by_type = dict(errors_by_type)
    seconds["total"] = time.perf_counter() - t0
    summary.seconds = dict(seconds)
    if limit is not None and summary.errors > limit:
        raise TooManyErrorsError(
            f"stopped after {summary.errors} unreadable images (more than --max-errors "
            f"{config.max_errors:g} allows): {summary.errors_by_type}. The {summary.embedded} "
            f"images embedded so far are saved in {config.out}; see {config.out}/_errors/ "
            "for the failures, then re-run to continue."
        )
    return summary


def load_embedder(config: ExtractConfig) -> Embedder:
    """The frozen backbone of a job, with ``--resize-size``/``--crop-size`` applied."""
    embedder = load_backbone(
        config.backbone, weights=config.weights, layer=config.layer, seed=config.seed,
        key_map=config.weights_key_map,
    )
    p = embedder.preprocessing
    if config.resize_size or config.crop_size:
        p = replace(p, resize_size=config.resize_size or p.resize_size, crop_size=config.crop_size or p.crop_size)
    embedder.preprocessing = p
    return embedder


def pending(writer: DatasetWriter, records: list[ImageRecord]) -> tuple[list[ImageRecord], int]:
    """What a (re-)run still has to do: ``(records to embed, rows dropped)``.

    Images already embedded or recorded as errors with the same size and mtime are
    skipped; rows of changed or deleted files are dropped from the dataset, and changed
    files embedded again.
    """
    embedded, errored = writer.embedded(), writer.errored()
    current = {r.id: (r.size, r.mtime_ns) for r in records}
    stale = {i for i, st in embedded.items() if current.get(i) != st}
    stale |= {i for i, st in errored.items() if current.get(i) != st}
    dropped = sum(writer.drop(stale))
    todo = [r for r in records if (r.id not in embedded and r.id not in errored) or r.id in stale]
    return todo, dropped


def _batches(
    results: Iterator[tuple[ImageRecord, Decoded | EncodedJPEG | DecodeFailure]], batch_size: int
) -> Iterator[tuple[list[tuple[ImageRecord, Decoded | EncodedJPEG]], list[tuple[ImageRecord, DecodeFailure]]]]:
    """Group decode results into full batches of successes, with the failures met on the way."""
    ok: list[tuple[ImageRecord, Decoded | EncodedJPEG]] = []
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


def errors_table(failed: list[tuple[ImageRecord, DecodeFailure]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "id": r.id,
                "path": r.path,
                "error_type": f.error_type.value,
                "message": f.message,
                "size": r.size,
                "mtime_ns": r.mtime_ns,
            }
            for r, f in failed
        ],
        schema=ERRORS_SCHEMA,
    )


def extract(config: ExtractConfig, *, progress: bool = False) -> ExtractSummary:
    """Embed every image of ``config.source`` into the dataset at ``config.out``.

    Safe to interrupt and re-run: the second run finishes the first. Raises
    :class:`TooManyErrorsError` (after committing the work done) when more images fail
    than ``config.max_errors`` allows.
    """
    t0 = time.perf_counter()
    runtime = plan(config)
    embedder = load_embedder(config)
    records = open_source(config.source)
    meta = build_meta(embedder, config, {"engine": "local", **runtime.to_dict()})
    torch.set_num_threads(runtime.threads)
    forward = BatchEmbedder(embedder, runtime, normalize=config.normalize)
    seconds = Counter({"load": time.perf_counter() - t0})

    with DatasetWriter(
        config.out, meta, overwrite=config.overwrite, part_rows=config.part_rows
    ) as writer:
        todo, dropped = pending(writer, records)
        summary = ExtractSummary(
            out=str(config.out),
            images=len(records),
            embedded=0,
            skipped=len(records) - len(todo),
            errors=0,
            dropped=dropped,
            runtime=meta["runtime"],
        )
        limit = error_limit(config.max_errors, len(todo))
        errors_by_type: Counter[str] = Counter()
        log.info(
            "%s: %d images, %d to embed (%d already done) with %s on %s",
            config.out, len(records), len(todo), summary.skipped, config.backbone, runtime.device,
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
        with pool, progress_bar(len(todo), progress) as bar:
            batches = _batches(pool.imap(todo), runtime.batch_size)
            while True:
                t = time.perf_counter()
                item = next(batches, None)
                seconds["decode_wait"] += time.perf_counter() - t
                if item is None:
                    break
                ok, failed = item
                if ok:
                    t = time.perf_counter()
                    vectors, rejected = forward.embed_items([d for _, d in ok])
                    seconds["forward"] += time.perf_counter() - t
                    if rejected:
                        failed = failed + [(ok[i][0], f) for i, f in rejected.items()]
                        ok = [x for i, x in enumerate(ok) if i not in rejected]
                if ok:
                    t = time.perf_counter()
                    writer.append(
                        embeddings_table(
                            ids=[r.id for r, _ in ok],
                            labels=[r.label for r, _ in ok],
                            vectors=vectors.astype(config.embedding_dtype.value, copy=False),
                            width=[d.width for _, d in ok],
                            height=[d.height for _, d in ok],
                            size=[r.size for r, _ in ok],
                            mtime_ns=[r.mtime_ns for r, _ in ok],
                            content_hash=[d.content_hash for _, d in ok],
                            schema=writer.schema,
                        )
                    )
                    seconds["write"] += time.perf_counter() - t
                    summary.embedded += len(ok)
                if failed:
                    writer.append_errors(errors_table(failed))
                    errors_by_type.update(f.error_type.value for _, f in failed)
                    summary.errors += len(failed)
                    for r, f in failed:
                        log.debug("%s: %s: %s", r.id, f.error_type.value, f.message)
                bar.update(len(ok) + len(failed))
                if limit is not None and summary.errors > limit:
                    break
    return finish(config, summary, errors_by_type, seconds, t0, limit)


def progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.05)


class QueryEmbedder:
    """Embeds image files exactly as the dataset described by ``meta`` was made.

    For queries against an index: the same backbone, weights, layer, preprocessing,
    precision and normalisation, loaded once (a service embeds many queries with one).
    Calling it with paths returns ``(vectors (n, D) float32, failures)`` where
    ``failures[i]`` is ``None`` for images that were embedded; rows of failed images are
    NaN. Calls are serialised: one forward pass at a time uses every core already.
    """

    def __init__(self, meta: dict, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        from .backbones import WeightsInfo, WeightsKind

        weights = WeightsInfo.from_dict(meta["weights"])
        embedder = load_backbone(
            meta["backbone"],
            weights=weights.argument(),
            layer=meta["layer"],
            preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
            seed=weights.seed or 0,
            key_map=weights.key_map if weights.kind == WeightsKind.CHECKPOINT else None,
        )
        # the settings that shape the vectors; the device, batch and workers are this machine's
        config = ExtractConfig(
            source=".", out=".", backbone=meta["backbone"], precision=meta["precision"],
            decode=meta["decode"], normalize=bool(meta["normalize"]), max_pixels=max_pixels,
        )
        self.config = config
        self.preprocessing = embedder.preprocessing
        self.dim = embedder.dim
        self.forward = BatchEmbedder(embedder, plan(config), normalize=config.normalize)
        self._lock = threading.Lock()

    def __call__(self, paths: list[str | os.PathLike]) -> tuple[np.ndarray, list[DecodeFailure | None]]:
        results = [
            decode_file(str(p), self.preprocessing, max_pixels=self.config.max_pixels, mode=self.config.decode)
            for p in paths
        ]
        vectors = np.full((len(paths), self.dim), np.nan, np.float32)
        failures = {i: r for i, r in enumerate(results) if isinstance(r, DecodeFailure)}
        ok = [i for i in range(len(results)) if i not in failures]
        if ok:
            with self._lock:
                emb, rejected = self.forward.embed_items([results[i] for i in ok])
            vectors[[i for j, i in enumerate(ok) if j not in rejected]] = emb
            failures.update({ok[j]: f for j, f in rejected.items()})
        return vectors, [failures.get(i) for i in range(len(paths))]


def embed_paths(paths: list[str | os.PathLike], meta: dict) -> tuple[np.ndarray, list[DecodeFailure | None]]:
    """Embed image files exactly as the dataset described by ``meta`` was made (a
    one-off :class:`QueryEmbedder`)."""
    return QueryEmbedder(meta)(paths)
