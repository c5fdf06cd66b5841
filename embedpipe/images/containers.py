"""Sources whose images live inside containers: WebDataset tar shards, Parquet image tables.

A container is the unit of resume: a re-run skips a finished one without opening it,
reads a half-done one past the keys already done, and embeds a changed one (other size
or modification time) again from the start. Its images become :class:`ImageRecord`
rows carrying their bytes, with ids ``<container name>/<key>`` (the container's own
failures, such as a shard cut short, are recorded under the container's name alone).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from collections.abc import Container as Keys
from dataclasses import dataclass

from ..errors import SourceError
from ..uris import is_uri, resolve
from . import imagetables, shards
from .sources import ImageRecord
from .streams import Sample, common_root


@dataclass(frozen=True)
class Container:
    """One tar shard or image table: ``name`` (the id prefix of its images), where it is,
    its size and modification time, and the reader that streams its samples."""

    name: str
    path: str
    size: int
    mtime_ns: int
    read: Callable[..., Iterator[Sample]]

    def records(self, done: Keys[str] = frozenset()) -> Iterator[ImageRecord]:
        """Its images as records, in container order, except the keys in ``done``."""
        for s in self.read(self.path, done=done):
            if s.key in done:  # a failure of the container itself, already recorded
                continue
            yield ImageRecord(
                f"{self.name}/{s.key}" if s.key else self.name,
                f"{self.path}#{s.member}" if s.member else self.path,
                s.label,
                len(s.data) if s.data is not None else -1,
                self.mtime_ns,
                data=s.data,
                failure=s.failure,
            )


def _stats(paths: list[str]) -> list[tuple[int, int]]:
    if paths and is_uri(paths[0]):
        fs, _ = resolve(paths[0])
        infos = fs.get_file_info([resolve(p)[1] for p in paths])
        return [(i.size if i.size is not None else -1, i.mtime_ns or -1) for i in infos]
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append((-1, -1))  # the reader reports it, as one error row of the container
        else:
            out.append((st.st_size, st.st_mtime_ns))
    return out


def open_containers(
    spec: str | os.PathLike,
    *,
    image_column: str | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
) -> list[Container] | None:
    """The containers of ``spec``: Parquet image tables when ``image_column`` is given,
    tar shards when ``spec`` names some (a ``.tar``, a brace pattern or glob, a folder
    of shards); ``None`` for a folder of images or a manifest."""
    spec = str(spec)
    if image_column is not None:
        paths = imagetables.expand_tables(spec)
        for p in paths[:1]:  # every table's columns are checked as it is read
            imagetables.check_table(p, image_column=image_column, id_column=id_column, label_column=label_column)
        read = functools.partial(
            imagetables.read_table, image_column=image_column, id_column=id_column, label_column=label_column
        )
        root = common_root(paths)
        names = [imagetables.table_name(p, root) for p in paths]
    elif id_column is not None or label_column is not None:
        raise SourceError("--id-column and --label-column read Parquet image tables: give --image-column too")
    elif shards.is_shard_spec(spec):
        paths = shards.expand_shards(spec)
        read = shards.read_shard
        root = common_root(paths)
        names = [shards.shard_name(p, root) for p in paths]
    else:
        return None
    return [Container(n, p, size, mtime, read) for n, p, (size, mtime) in zip(names, paths, _stats(paths))]
