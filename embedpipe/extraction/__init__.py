"""Extraction: records -> decoded pixels -> a frozen backbone -> a Parquet dataset.

``plan`` (device, batch, workers), ``forward`` (pixels -> embeddings, and queries), ``job``
(what both engines share: resume planning, provenance, typed rows, the writing stage),
``local`` (this machine's engine), ``ray`` (Ray Data's), ``device_decode`` (JPEGs decoded
on the extraction device).

:func:`extract` is the one place that picks the engine; the CLI, pipelines and
``embedpipe.extract`` call it, so a config that says ``engine="ray"`` runs on Ray
whichever way it arrives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Engine, ExtractConfig

if TYPE_CHECKING:
    from .job import ExtractSummary


def extract(config: ExtractConfig, *, progress: bool = False) -> ExtractSummary:
    """Embed every image of ``config.source`` into ``config.out`` (see
    :func:`embedpipe.extraction.local.extract` and :func:`embedpipe.extraction.ray.extract`)."""
    if config.engine == Engine.RAY:
        from .ray import extract as run  # Ray is an optional extra
    else:
        from .local import extract as run
    return run(config, progress=progress)
