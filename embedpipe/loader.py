"""Decode worker processes: records in, decoded pixels or failures out, in order.

Decoding runs in a pool of worker processes (pebble's ``ProcessPool``) so that it
overlaps the forward pass and so that a decoder that hangs or kills its process costs
one image: pebble replaces a dead or timed-out worker and fails only that task, which
becomes a ``decoder_crash`` or ``timeout`` record. At most ``prefetch`` images are in
flight, so memory stays flat however long the job.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout

from pebble import ProcessExpired, ProcessPool

from .config import DecodeMode
from .decode import Decoded, DecodeFailure, ErrorType, decode_file
from .preprocess import Preprocessing
from .sources import ImageRecord


def _init_worker(nice: int) -> None:
    if nice:
        os.nice(nice)


class DecodePool:
    """``with DecodePool(...) as pool: for record, result in pool.imap(records): ...``

    ``nice`` lowers the workers' CPU priority: on a machine where the forward pass
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
        nice: int = 0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.preprocessing = preprocessing
        self.workers = workers
        self.mode = mode
        self.max_pixels = max_pixels
        self.timeout = timeout
        self.prefetch = prefetch or 4 * workers + 16
        self.nice = nice
        self._pool: ProcessPool | None = None

    def __enter__(self) -> DecodePool:
        # spawn, not fork: the parent holds torch's thread pools, which fork breaks
        self._pool = ProcessPool(
            max_workers=self.workers,
            context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.nice,),
        )
        return self

    def __exit__(self, *exc) -> None:
        assert self._pool is not None
        self._pool.stop()
        self._pool.join()
        self._pool = None

    def _submit(self, record: ImageRecord):
        return self._pool.schedule(
            decode_file,
            args=(record.path, self.preprocessing),
            kwargs={"max_pixels": self.max_pixels, "mode": self.mode},
            timeout=self.timeout,
        )

    def imap(
        self, records: Iterable[ImageRecord]
    ) -> Iterator[tuple[ImageRecord, Decoded | DecodeFailure]]:
        """Decode ``records``, yielding results in input order."""
        if self._pool is None:
            raise RuntimeError("use DecodePool as a context manager")
        pending: deque = deque()
        it = iter(records)
        for record in it:
            pending.append((record, self._submit(record)))
            if len(pending) >= self.prefetch:
                break
        while pending:
            record, future = pending.popleft()
            yield record, self._result(future)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, self._submit(nxt)))

    def _result(self, future) -> Decoded | DecodeFailure:
        try:
            return future.result()
        except FutureTimeout:
            return DecodeFailure(
                ErrorType.TIMEOUT, f"decoding took longer than {self.timeout:g} s; worker replaced"
            )
        except ProcessExpired as e:
            return DecodeFailure(
                ErrorType.DECODER_CRASH, f"the decoder process died (exit code {e.exitcode})"
            )
