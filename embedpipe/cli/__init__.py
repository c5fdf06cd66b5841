"""The ``embedpipe`` command line: a thin click shell over the Python API.

Each command module parses options, builds a config, calls the API and prints; none
holds logic of its own. Command modules register themselves on :data:`main`.
"""

from __future__ import annotations

# each command module registers its commands on main
from . import compare, explain, extract, finetune, index, maps, pipeline, probe, serve  # noqa: E402,F401
from . import curate  # noqa: E402,F401
from .app import main

__all__ = ["main"]
