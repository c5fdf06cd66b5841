"""A Ray session for the engines that run on a cluster (extraction, index builds)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from .errors import MissingDependencyError


def local_cores() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Connect to ``address`` (or start Ray in this process); shut down what we started.

    A Ray instance the caller already initialised is used as it is and left running.
    """
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError(
            f"--engine ray needs Ray ({e}); install it with: pip install \"embedpipe[ray]\""
        ) from None
    if ray.is_initialized():
        yield ray
        return
    ray.init(
        address=address,
        num_cpus=local_cores() if address is None else None,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
