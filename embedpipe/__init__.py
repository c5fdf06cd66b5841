"""embedpipe: embeddings from pretrained CNNs, extracted at scale, searched and probed.

The public API is imported lazily, so that ``import embedpipe`` (which decode worker
processes do) stays light: torch loads only when a backbone is needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "extract": "embedpipe.extraction",
    "embed_paths": "embedpipe.extraction.forward",
    "ExtractSummary": "embedpipe.extraction.job",
    "ExtractConfig": "embedpipe.config",
    "load_backbone": "embedpipe.backbones",
    "list_backbones": "embedpipe.backbones",
    "get_spec": "embedpipe.backbones",
    "read_embeddings": "embedpipe.store",
    "iter_embedding_blocks": "embedpipe.store",
    "read_errors": "embedpipe.store",
    "dataset_info": "embedpipe.store",
    "Embeddings": "embedpipe.store",
    "Provenance": "embedpipe.provenance",
    "Index": "embedpipe.index",
    "LinearProbeCV": "embedpipe.probe",
    "CosineKNNClassifier": "embedpipe.probe",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'embedpipe' has no attribute {name!r}")
