"""Images that arrive as bytes inside containers: tar shards and Parquet image tables.

A folder source lists files and lets decode workers open them; a container is read
front to back by one reader that hands each image's bytes on. Both container readers
(:mod:`.shards`, :mod:`.imagetables`) yield :class:`Sample` rows: an image's bytes, or
the reason there are none (a sample without an image, a member that cannot be read,
a container cut short), so that every problem becomes an error record and never stops
the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .decode import DecodeFailure


@dataclass(frozen=True, slots=True)
class Sample:
    """One image of a container.

    ``key`` is unique within its container (a WebDataset key, a table's id or row
    number); ``member`` names where the bytes came from (the tar member, the table's
    file and row), for error messages. Exactly one of ``data`` and ``failure`` is set.
    """

    key: str
    member: str
    label: str | None
    data: bytes | None = None
    failure: DecodeFailure | None = None


def common_root(paths: Sequence[str]) -> str:
    """The deepest folder holding every one of ``paths`` (absolute local paths or URIs),
    which container names are relative to (``os.path.commonpath`` would fold ``s3://``)."""
    folders = [p.split("/")[:-1] for p in paths]
    common = folders[0]
    for parts in folders[1:]:
        n = next((i for i, (a, b) in enumerate(zip(common, parts)) if a != b), min(len(common), len(parts)))
        common = common[:n]
    return "/".join(common)
