"""Datasets in, files out: the ``dedup`` and ``audit`` commands as Python calls.

These open the embeddings (the compute modules take arrays), run the computation and
write the output folder through :mod:`embedpipe.curate.pages`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MetadataMismatchError
from ..provenance import differences
from ..store import read_embeddings
from .audit import DEFAULT_FOLDS, audit
from .audit import DEFAULT_K as AUDIT_K
from .dedup import (
    DEFAULT_K,
    DEFAULT_THRESHOLD,
    dedup,
    dedup_across,
    image_paths,
    keep_manifest,
    read_content_hashes,
)
from .pages import write_audit, write_dedup


def check_same_space(meta_a: dict, meta_b: dict, names: tuple[str, str]) -> None:
    """Refuse to compare vectors from different spaces (backbone, weights, layer, ...)."""
    diffs = differences(meta_a, meta_b, keys="space", names=names)
    if diffs:
        raise MetadataMismatchError(
            f"{names[0]} and {names[1]} hold vectors from different spaces, so their "
            f"similarities mean nothing: {'; '.join(diffs)}. Extract both with the same "
            "backbone, weights and layer.")


def dedup_dataset(
    embeddings: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    group_threshold: float | None = None,
    k: int = DEFAULT_K,
    across: str | os.PathLike | None = None,
) -> tuple[dict, dict[str, Path]]:
    """Duplicates within ``embeddings`` (and, with ``across``, rows of ``embeddings`` that
    leak from the ``across`` dataset, e.g. test rows also in train), written under ``out``.
    Returns the summary and the files written."""
    emb = read_embeddings(embeddings)
    hashes = read_content_hashes(embeddings, emb.ids)
    result = dedup(emb.ids, emb.vectors, hashes, threshold=threshold,
                   group_threshold=group_threshold, k=k)
    paths = image_paths(emb.meta, emb.ids)
    keep = keep_manifest(result, dict(zip(emb.ids, emb.labels)), paths)
    leakage = None
    extra = {"embeddings": str(embeddings)}
    if across is not None:
        other = read_embeddings(across)
        check_same_space(other.meta, emb.meta, (str(across), str(embeddings)))
        leakage = dedup_across(other.ids, other.vectors, emb.ids, emb.vectors, threshold=threshold)
        extra["across"] = str(across)
    files = write_dedup(Path(out), result, keep, paths, leakage, extra)
    summary = {**result.summary(), **extra}
    if leakage is not None:
        summary["leaked"] = len(leakage)
    return summary, files


def audit_dataset(
    embeddings: str | os.PathLike,
    out: str | os.PathLike,
    *,
    k: int = AUDIT_K,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> tuple[dict, dict[str, Path]]:
    """Likely label errors and outliers of ``embeddings``, written under ``out``
    (label_issues.parquet, outliers.parquet, index.html, summary.json)."""
    emb = read_embeddings(embeddings)
    result = audit(emb.ids, emb.vectors, emb.labels, k=k, folds=folds, seed=seed)
    paths = image_paths(emb.meta, emb.ids)
    summary = {**result.summary(), "embeddings": str(embeddings), "seed": seed}
    files = write_audit(Path(out), result.label_issues, result.outliers,
                        paths, summary)
    return summary, files
