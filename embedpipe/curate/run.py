"""Datasets in, files out: the ``dedup`` and ``audit`` commands as Python calls.

These open the embeddings (the compute modules take arrays), run the computation and
write the output folder through :mod:`embedpipe.curate.pages`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

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
from .hashes import (
    ACROSS_HASH_FILE,
    DEFAULT_HASH_DISTANCE,
    DEFAULT_HASH_VETO,
    HASH_FILE,
    PerceptualHashes,
    hash_images,
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


def dataset_hashes(meta: dict, ids: np.ndarray, paths: dict[str, str] | None, out: Path, *,
                   use: bool = True, name: str = HASH_FILE) -> PerceptualHashes:
    """The pHashes of a dataset's images, computed or reused in ``out/name``; none, with
    the reason, when switched off or the images are not reachable."""
    if not use:
        return PerceptualHashes.none(len(ids), "switched off (--no-hash)")
    if paths is None:
        images = meta.get("images")
        where = (f"the image folder or manifest the embeddings record ({images}) is not a "
                 "local path that exists" if images else "the embeddings record no image folder")
        return PerceptualHashes.none(len(ids), f"images not reachable: {where}")
    return hash_images(ids, paths, out / name)  # none, and why, without imagehash


def dedup_dataset(
    embeddings: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    group_threshold: float | None = None,
    k: int = DEFAULT_K,
    across: str | os.PathLike | None = None,
    hashes: bool = True,
    hash_distance: int = DEFAULT_HASH_DISTANCE,
    hash_veto: int = DEFAULT_HASH_VETO,
) -> tuple[dict, dict[str, Path]]:
    """Duplicates within ``embeddings`` (and, with ``across``, rows of ``embeddings`` that
    leak from the ``across`` dataset, e.g. test rows also in train), written under ``out``.
    ``hashes``: also compare the images' perceptual hashes (kept in ``out/hashes.parquet``
    and reused from it). Returns the summary and the files written."""
    emb = read_embeddings(embeddings)
    content = read_content_hashes(embeddings, emb.ids)
    paths = image_paths(emb.meta, emb.ids)
    phash = dataset_hashes(emb.meta, emb.ids, paths, Path(out), use=hashes)
    result = dedup(emb.ids, emb.vectors, content, threshold=threshold,
                   group_threshold=group_threshold, k=k, perceptual_hashes=phash,
                   hash_distance=hash_distance, hash_veto=hash_veto)
    keep = keep_manifest(result, dict(zip(emb.ids, emb.labels)), paths)
    leakage = None
    extra = {"embeddings": str(embeddings)}
    if phash.unavailable is None:
        extra["hashes_reused"] = phash.reused
    if across is not None:
        other = read_embeddings(across)
        check_same_space(other.meta, emb.meta, (str(across), str(embeddings)))
        other_hashes = dataset_hashes(other.meta, other.ids, image_paths(other.meta, other.ids),
                                      Path(out), use=hashes, name=ACROSS_HASH_FILE)
        leakage = dedup_across(other.ids, other.vectors, emb.ids, emb.vectors, threshold=threshold,
                               hashes_a=other_hashes, hashes_b=phash,
                               hash_distance=hash_distance, hash_veto=hash_veto)
        extra["across"] = str(across)
        extra["across_hashes"] = ("pHash" if other_hashes.unavailable is None
                                  else f"unavailable: {other_hashes.unavailable}")
    files = write_dedup(Path(out), result, keep, paths, leakage, extra)
    if phash.unavailable is None:
        files["hashes"] = Path(out) / HASH_FILE
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
