"""Decode worker processes: records in, decoded pixels or failures out, in order.

Decoding runs in a pool of worker processes (pebble's ``ProcessPool``) so that it
overlaps the forward pass and so that a decoder that hangs or kills its process costs
one image: pebble replaces a dead or timed-out worker and fails only that task, which
becomes a ``decoder_crash`` or ``timeout`` record. At most ``prefetch`` images are in
flight, so memory stays flat however long the job.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout

from pebble import ProcessExpired, ProcessPool

from ..config import DecodeMode
from .decode import Decoded, DecodeFailure, ErrorType, decode_file
from .preprocess import Preprocessing
from .sources import ImageRecord

#: fork where it is safe and usual (Linux: PyTorch's DataLoader does the same), spawn
#: elsewhere. Workers never touch torch or OpenMP, the parts of the parent that fork
#: breaks; spawn would re-import the caller's __main__ in every worker (seconds, when a
#: script imports torch at the top).
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def _init_worker(nice: int) -> None:
    if nice:
        os.nice(nice)


class DecodePool:
    """``with DecodePool(...) as pool: for record, result in pool.imap(records): ...``

    ``decode_fn`` (a picklable module-level function with :func:`decode_chunk`'s
    signature) replaces the decoder, for tests. ``prefetch`` bounds the images in flight. ``nice`` lowers the workers' CPU priority: on a machine where the forward pass
    already uses every core, decoding then fills the gaps instead of preempting it.
    """

    def __init__(
        self,
        preprocessing: Preprocessing,
        *,
        workers: int,
        mode: DecodeMode = DecodeMode.DRAFT,
        max_pixels: int,
        timeout: float = 60.0,
        prefetch: int | None = None,
        chunk_size: int = 8,
        nice: int = 0,
        decode_fn: Callable[..., list[Decoded | DecodeFailure]] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.preprocessing = preprocessing
        self.workers = workers
        self.mode = mode
        self.max_pixels = max_pixels
        self.timeout = timeout
        self.prefetch = prefetch or 4 * workers * chunk_size
        self.chunk_size = chunk_size
        self.decode_fn = decode_fn or decode_chunk
        self.nice = nice
        self._pool: ProcessPool | None = None

    def __enter__(self) -> DecodePool:
        self._pool = ProcessPool(
            max_workers=self.workers,
            context=multiprocessing.get_context(_START_METHOD),
            initializer=_init_worker,
            initargs=(self.nice,),
        )
        return self

    def __exit__(self, *exc) -> None:
        assert self._pool is not None
        self._pool.stop()
        self._pool.join()
        self._pool = None

    def _submit(self, chunk: list[ImageRecord]):
        return self._pool.schedule(
            self.decode_fn,
            args=([r.path for r in chunk], self.preprocessing, self.max_pixels, self.mode),
            timeout=self.timeout * len(chunk),
        )

    def imap(
        self, records: Iterable[ImageRecord]
    ) -> Iterator[tuple[ImageRecord, Decoded | DecodeFailure]]:
        """Decode ``records``, yielding results in input order.

        Records travel in chunks of ``chunk_size`` to amortise the inter-process round
        trip; a chunk whose worker died or timed out is decoded again one image per task,
        so that only the culprit is recorded as ``decoder_crash`` or ``timeout``.
        """
        if self._pool is None:
            raise RuntimeError("use DecodePool as a context manager")
        chunks = _chunked(records, self.chunk_size)
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, self._submit(chunk)))
            if len(pending) * self.chunk_size >= self.prefetch:
                break
        while pending:
            chunk, future = pending.popleft()
            try:
                results = future.result()
            except (FutureTimeout, ProcessExpired) as e:
                results = self._isolate(chunk) if len(chunk) > 1 else [self._failure(e)]
            yield from zip(chunk, results)
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append((nxt, self._submit(nxt)))

    def _isolate(self, chunk: list[ImageRecord]) -> list[Decoded | DecodeFailure]:
        futures = [self._submit([r]) for r in chunk]
        results = []
        for f in futures:
            try:
                results.extend(f.result())
            except (FutureTimeout, ProcessExpired) as e:
                results.append(self._failure(e))
        return results

    def _failure(self, e: Exception) -> DecodeFailure:
        if isinstance(e, ProcessExpired):
            return DecodeFailure(
                ErrorType.DECODER_CRASH, f"the decoder process died (exit code {e.exitcode})"
            )
        return DecodeFailure(
            ErrorType.TIMEOUT, f"decoding took longer than {self.timeout:g} s; worker replaced"
        )


def decode_chunk(
    paths: list[str], preprocessing: Preprocessing, max_pixels: int, mode: DecodeMode
) -> list[Decoded | DecodeFailure]:
    """Runs in a worker: :func:`decode_file` over a few paths."""
    return [decode_file(p, preprocessing, max_pixels=max_pixels, mode=mode) for p in paths]


def _chunked(records: Iterable[ImageRecord], size: int) -> Iterator[list[ImageRecord]]:
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
