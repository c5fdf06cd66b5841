"""Curation from embeddings: duplicates, train/test leakage, likely label errors, outliers.

Compute takes arrays (and :class:`~embedpipe.store.Embeddings`); the caller opens files,
except `dedup.read_content_hashes`, which reads the one column ``read_embeddings`` skips,
and `hashes.hash_images`, which reads the images to hash them (and keeps their hashes).
"""

from __future__ import annotations

from ..errors import CurationInputError
from ..neighbours import knn_graph, knn_search, l2_normalize

__all__ = ["CurationInputError", "knn_graph", "knn_search", "l2_normalize"]
