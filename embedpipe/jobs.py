"""Run an extraction on the engine its config names: this machine, or Ray Data.

The one place that chooses; the CLI, pipelines and ``embedpipe.extract`` call it, so a
config that says ``engine="ray"`` runs on Ray whichever way it arrives.
"""

from __future__ import annotations

from .config import Engine, ExtractConfig
from .engine import ExtractSummary


def extract(config: ExtractConfig, *, progress: bool = False) -> ExtractSummary:
    """Embed every image of ``config.source`` into ``config.out`` (see
    :func:`embedpipe.engine.extract` and :func:`embedpipe.ray_engine.extract`)."""
    if config.engine == Engine.RAY:
        from .ray_engine import extract as run  # Ray is an optional extra
    else:
        from .engine import extract as run
    return run(config, progress=progress)
