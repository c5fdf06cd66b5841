"""Decode worker processes: records in, decoded pixels or failures out, in order.

Decoding runs in a pool of worker processes (pebble's ``ProcessPool``) so that it
overlaps the forward pass and so that a decoder that hangs or kills its process costs
one image, and one timeout: records travel in chunks, and each worker writes the position
of the image it is decoding into a slot of shared memory. The parent watches the slot of
the chunk it waits for; when one image has run for ``timeout`` seconds (or the worker
died), it knows the culprit, cancels the task (pebble replaces the worker), records a
``timeout`` or ``decoder_crash`` for that image alone and sends the rest of the chunk
again. At most ``prefetch`` images are in flight, so memory stays flat however long the
job.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import time
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


#: the progress slots shared with the workers (set in each worker by its initializer)
_PROGRESS = None


def _init_worker(nice: int, progress) -> None:
    global _PROGRESS
    _PROGRESS = progress
    if nice:
        os.nice(nice)


def _run_chunk(decode_fn, payloads: list, slot: int, *args) -> list[Decoded | DecodeFailure]:
    """Runs in a worker: ``decode_fn`` one image at a time, writing into ``slot`` which one
    it is on (1-based), so that the parent can tell a hung image from a slow chunk."""
    out = []
    for i, payload in enumerate(payloads):
        _PROGRESS[slot] = i + 1
        out.extend(decode_fn([payload], *args))
    return out


class DecodePool:
    """``with DecodePool(...) as pool: for record, result in pool.imap(records): ...``

    ``decode_fn`` (a picklable module-level function with :func:`decode_chunk`'s
    signature) replaces the decoder: tests use it, and so does perceptual hashing
    (:func:`embedpipe.curate.hashes.phash_chunk`, which needs no ``preprocessing``: None). ``prefetch`` bounds the images in flight. ``nice`` lowers the workers' CPU priority: on a machine where the forward pass
    already uses every core, decoding then fills the gaps instead of preempting it.
    """

    def __init__(
        self,
        preprocessing: Preprocessing | None,
        *,
        workers: int,
        mode: DecodeMode = DecodeMode.FULL,
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
        context = multiprocessing.get_context(_START_METHOD)
        # a slot per chunk that can be in flight at once (with room for re-sent remainders)
        self._slots = 2 * (self.prefetch // self.chunk_size + 2)
        self._progress = context.RawArray("l", self._slots)
        self._next_slot = itertools.count()
        self._pool = ProcessPool(
            max_workers=self.workers,
            context=context,
            initializer=_init_worker,
            initargs=(self.nice, self._progress),
        )
        return self

    def __exit__(self, *exc) -> None:
        assert self._pool is not None
        self._pool.stop()
        self._pool.join()
        self._pool = None

    def _submit(self, chunk: list[ImageRecord]) -> tuple[list[ImageRecord], object, int]:
        slot = next(self._next_slot) % self._slots
        self._progress[slot] = 0  # not started
        future = self._pool.schedule(
            _run_chunk,
            args=(self.decode_fn, [r.payload for r in chunk], slot, self.preprocessing, self.max_pixels, self.mode),
        )
        return chunk, future, slot

    def imap(
        self, records: Iterable[ImageRecord]
    ) -> Iterator[tuple[ImageRecord, Decoded | DecodeFailure]]:
        """Decode ``records``, yielding results in input order.

        Records travel in chunks of ``chunk_size`` to amortise the inter-process round
        trip; when an image of a chunk hangs or kills its worker, only that image is
        recorded as ``timeout`` or ``decoder_crash``, after one ``timeout``, and the rest
        of the chunk is decoded again.
        """
        if self._pool is None:
            raise RuntimeError("use DecodePool as a context manager")
        chunks = _chunked(records, self.chunk_size)
        pending: deque = deque()
        for chunk in chunks:
            pending.append(self._submit(chunk))
            if len(pending) * self.chunk_size >= self.prefetch:
                break
        while pending:
            yield from zip(pending[0][0], self._results(*pending.popleft()))
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(self._submit(nxt))

    def _results(self, chunk: list[ImageRecord], future, slot: int) -> list[Decoded | DecodeFailure]:
        """The chunk's results, waiting at most ``timeout`` for any one image of it."""
        poll = min(1.0, self.timeout / 20)
        position, since = 0, time.monotonic()
        while True:
            try:
                return future.result(timeout=poll)
            except FutureTimeout:
                now = self._progress[slot]
                if now != position:  # a new image started: its own clock starts
                    position, since = now, time.monotonic()
                elif position and time.monotonic() - since > self.timeout:
                    future.cancel()  # pebble stops the worker and starts another
                    return self._without(chunk, position - 1, self._failure(FutureTimeout()))
            except ProcessExpired as e:
                return self._without(chunk, max(self._progress[slot], 1) - 1, self._failure(e))

    def _without(
        self, chunk: list[ImageRecord], culprit: int, failure: DecodeFailure
    ) -> list[Decoded | DecodeFailure]:
        """``failure`` for ``chunk[culprit]``; the other images decoded again."""
        rest = chunk[:culprit] + chunk[culprit + 1 :]
        results = self._results(*self._submit(rest)) if rest else []
        return [*results[:culprit], failure, *results[culprit:]]

    def _failure(self, e: Exception) -> DecodeFailure:
        if isinstance(e, ProcessExpired):
            return DecodeFailure(
                ErrorType.DECODER_CRASH, f"the decoder process died (exit code {e.exitcode})"
            )
        return DecodeFailure(
            ErrorType.TIMEOUT, f"decoding took longer than {self.timeout:g} s; worker replaced"
        )


def decode_chunk(
    payloads: list[str | bytes | DecodeFailure], preprocessing: Preprocessing, max_pixels: int, mode: DecodeMode
) -> list[Decoded | DecodeFailure]:
    """Runs in a worker: :func:`decode_file` over a few paths or images' bytes; a failure
    met while reading a container passes through, keeping its place in the order."""
    return [
        p if isinstance(p, DecodeFailure) else decode_file(p, preprocessing, max_pixels=max_pixels, mode=mode)
        for p in payloads
    ]


def _chunked(records: Iterable[ImageRecord], size: int) -> Iterator[list[ImageRecord]]:
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
