"""Several layers of a network from one run: a dataset per layer, written and resumed together.

``extract --layer stages`` (or ``--layer layer2,layer3``) embeds every image once through
:func:`embedpipe.backbones.stages.stage_embedder`, whose stages come out of one forward
pass. The engine sees one embedder whose output is the stages side by side,
(B, sum of dims), so batching, precision, devices and out-of-memory halving are the
single-layer ones; :class:`DatasetGroup` then writes each stage's columns to its own
ordinary dataset, ``OUT/<stage>/``, with that stage as its recorded layer. Every existing
reader, ``index``, ``probe`` and ``compare`` work on each unchanged; ``OUT/stages.json``
lists them in depth order.

The stage datasets are written in the same batches and committed together, but not in
one atomic step: a run killed between two commits can leave a row in one stage and not in
another. Opening the group drops such rows everywhere, so they are embedded again and no
stage ever holds a row the others lack.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from ..backbones.stages import StageEmbedder
from ..files import atomic_write_text
from ..provenance import Provenance
from ..store import DatasetWriter, embeddings_table

STAGES_FILE = "stages.json"


class ConcatStages(nn.Module):
    """A :class:`StageEmbedder` as one embedder: (B, C, H, W) -> (B, sum of stage dims),
    the stages side by side in depth order (:attr:`columns` says where each one is)."""

    def __init__(self, stages: StageEmbedder) -> None:
        super().__init__()
        self.stages = stages
        self.preprocessing = stages.preprocessing
        self.spec = stages.spec
        self.weights = stages.weights
        starts = np.cumsum([0, *(stages.dims[p] for p in stages.stages)])
        self.columns = {p: slice(int(a), int(b)) for p, a, b in zip(stages.stages, starts, starts[1:])}

    @property
    def dim(self) -> int:
        return sum(self.stages.dims.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.stages(x)
        return torch.cat([pooled[p] for p in self.stages.stages], dim=1)

    def provenance(self) -> Provenance:
        """The provenance shared by every stage (each dataset records its own layer and dim)."""
        return Provenance(
            backbone=self.spec.name, family=self.spec.family, source=self.spec.source, layer="stages",
            dim=self.dim, weights=self.weights, preprocessing=self.preprocessing,
        )


class DatasetGroup:
    """One :class:`DatasetWriter` per layer, used as the writer of one (the API
    :func:`~embedpipe.extraction.job.begin` and :class:`~embedpipe.extraction.job.JobWriter`
    use). ``targets``: (writer, the columns of the engine's vectors it stores)."""

    def __init__(self, targets: list[tuple[DatasetWriter, slice]]) -> None:
        self.targets = targets
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> DatasetGroup:
        for writer, _ in self.targets:
            self._stack.enter_context(writer)
        self._reconcile()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def _reconcile(self) -> None:
        """Drop rows that some layers hold and others do not (a run killed between two
        layers' commits), so that they are embedded again in all of them."""
        if len(self.targets) < 2:
            return
        held = [w.ids(errors=False) for w, _ in self.targets]
        # an id some layer lacks is in one layer's ids but not in another's
        partial = {
            i for a in held for b in held
            for i in a.filter(pc.invert(pc.is_in(a, value_set=b))).to_pylist()
        }
        if partial:
            for writer, _ in self.targets:
                writer.drop(partial)

    @property
    def first(self) -> DatasetWriter:
        return self.targets[0][0]

    def blocks(self, columns: list[str], *, errors: bool = False) -> Iterator[pa.Table]:
        return self.first.blocks(columns, errors=errors)

    def ids(self, *, errors: bool | None = None) -> pa.Array:
        return self.first.ids(errors=errors)

    def rows(self) -> int:
        return self.first.rows()

    def containers(self) -> dict[str, dict]:
        return self.first.containers()

    def record_container(self, name: str, size: int, mtime_ns: int, *, complete: bool) -> None:
        for writer, _ in self.targets:  # every layer alike
            writer.record_container(name, size, mtime_ns, complete=complete)

    def relabel(self, labels: dict[str, str | None]) -> int:
        counts = [w.relabel(labels) for w, _ in self.targets]  # every layer, alike
        return counts[0]

    def drop(self, ids: set[str]) -> tuple[int, int]:
        dropped = [w.drop(ids) for w, _ in self.targets]  # every layer, alike
        return dropped[0]

    def append_rows(self, columns: dict, vectors: np.ndarray) -> None:
        """One batch: ``columns`` (ids, labels, width, height, size, mtime_ns,
        content_hash) and ``vectors`` (n, D) split by layer."""
        for writer, where in self.targets:
            writer.append(embeddings_table(**columns, vectors=vectors[:, where], schema=writer.schema))

    def append_errors(self, table: pa.Table) -> None:
        for writer, _ in self.targets:
            writer.append_errors(table)


def open_group(
    out: Path, provenance: Provenance, embedder: nn.Module | None, *, overwrite: bool, part_rows: int | None
) -> DatasetGroup:
    """The writers of a run: one dataset at ``out``, or (a :class:`ConcatStages`
    embedder) one per stage under ``out``, listed in ``out/stages.json``."""
    if not isinstance(embedder, ConcatStages):
        writer = DatasetWriter(out, provenance.to_json(), overwrite=overwrite, part_rows=part_rows)
        return DatasetGroup([(writer, slice(None))])
    targets = []
    depth = {p: round((i + 1) / len(embedder.columns), 4) for i, p in enumerate(embedder.columns)}
    for path, columns in embedder.columns.items():
        # relative depth (the deepest stage is 1) orders the probe report's depth curve
        stage = replace(provenance, layer=path, dim=columns.stop - columns.start,
                        extra={**provenance.extra, "depth": depth[path]})
        meta = stage.to_json()
        targets.append((DatasetWriter(Path(out) / path, meta, overwrite=overwrite, part_rows=part_rows), columns))
    stages = [
        {"layer": p, "dim": c.stop - c.start, "depth": depth[p], "dataset": p}
        for p, c in embedder.columns.items()
    ]
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"backbone": embedder.spec.name, "stages": stages}, indent=2) + "\n",
                      Path(out) / STAGES_FILE)
    return DatasetGroup(targets)


def stage_datasets(out: str | os.PathLike) -> list[Path]:
    """The stage datasets an ``extract --layer stages`` run wrote under ``out``, shallowest
    first."""
    doc = json.loads((Path(out) / STAGES_FILE).read_text())
    return [Path(out) / s["dataset"] for s in doc["stages"]]
