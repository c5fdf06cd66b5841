"""Checking and aligning the datasets of a run: same ids, labels, paired test sets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import pandas as pd

from ..config import IdAlignment
from ..errors import (
    IdAlignmentError,
    MissingLabelsError,
    ProbeInputError,
    SplitError,
)
from .inputs import EXAMPLES, ProbeInput

logger = logging.getLogger(__name__)


# --- input checks and alignment ------------------------------------------------------


def check_inputs(datasets: Sequence[ProbeInput], role: str) -> None:
    if not datasets:
        raise ProbeInputError(f"no {role} embeddings given")
    names = [d.name for d in datasets]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ProbeInputError(f"{role} embeddings need distinct names; repeated: {duplicated}")
    for d in datasets:
        shape = d.vectors.shape
        if len(shape) != 2 or shape[1] < 2 or not np.issubdtype(d.vectors.dtype, np.floating):
            raise ProbeInputError(
                f"{d.name!r}: vectors must be a float array of shape (rows, dims >= 2), "
                f"got {d.vectors.dtype} {d.vectors.shape}"
            )
        n = d.vectors.shape[0]
        if n == 0 or len(d.ids) != n or len(d.labels) != n:
            raise ProbeInputError(
                f"{d.name!r}: {n} vectors, {len(d.ids)} ids and {len(d.labels)} labels; "
                "a probe needs one id and one label per vector"
            )
        missing = pd.isna(d.labels) | (d.labels == "")
        if missing.any():
            examples = [str(i) for i in d.ids[missing][:EXAMPLES]]
            raise MissingLabelsError(
                f"{d.name!r}: {int(missing.sum())} of {n} rows have no label (e.g. {examples}); "
                "a probe needs every row labelled. Labels come from the embeddings' label "
                "column: extract from a labelled folder or a manifest with a label column, "
                "or leave those images out"
            )
        index = pd.Index(d.ids)
        if not index.is_unique:
            repeated = index[index.duplicated()].unique()[:EXAMPLES].tolist()
            raise ProbeInputError(f"{d.name!r}: ids are not unique, e.g. {repeated}")
        if not np.isfinite(d.vectors).all():
            raise ProbeInputError(f"{d.name!r}: vectors contain NaN or infinite values")


@dataclass(frozen=True)
class Aligned:
    ids: np.ndarray  # (n,) object, sorted
    labels: np.ndarray  # (n,) object
    vectors: tuple[np.ndarray, ...]  # one (n, D_i) per dataset, rows in ids order
    dropped: tuple[int, ...]  # rows each dataset lost to the alignment


def align_datasets(datasets: Sequence[ProbeInput], how: IdAlignment, role: str) -> Aligned:
    """Rows of every dataset reordered to one order: their common ids, sorted.

    Sorted, not as stored: the order rows are stored in changes (an incremental
    extraction moves rewritten Parquet parts to the end) while the images do not, and
    every fit and draw downstream (splits, L-BFGS sums, neighbour ties, the projection
    sample) then sees the same rows in the same order, so results depend on the images
    and the seed alone.
    """
    indexes = [pd.Index(d.ids) for d in datasets]
    common = indexes[0]
    for index in indexes[1:]:
        common = common.intersection(index, sort=False)
    if how is IdAlignment.STRICT:
        first = datasets[0]
        for d, index in zip(datasets[1:], indexes[1:]):
            only_first, only_d = indexes[0].difference(index), index.difference(indexes[0])
            if len(only_first) or len(only_d):
                raise IdAlignmentError(
                    f"{role} embeddings {first.name!r} and {d.name!r} cover different images: "
                    f"{len(only_first)} ids only in {first.name!r} "
                    f"(e.g. {only_first[:EXAMPLES].tolist()}), {len(only_d)} only in "
                    f"{d.name!r} (e.g. {only_d[:EXAMPLES].tolist()}). "
                    "Backbones are compared on the same images; extract the missing ones, or "
                    f"align explicitly (align='intersect', CLI --align intersect) to probe the "
                    f"{len(common)} ids all {role} embeddings share"
                )
    if len(common) == 0:
        raise IdAlignmentError(f"the {role} embeddings {[d.name for d in datasets]} share no ids")
    common = common.sort_values()
    rows = [index.get_indexer(common) for index in indexes]
    labels = datasets[0].labels[rows[0]]
    for d, r in zip(datasets[1:], rows[1:]):
        other = d.labels[r]
        differ = np.flatnonzero(labels != other)
        if differ.size:
            examples = [(str(common[i]), labels[i], other[i]) for i in differ[:EXAMPLES]]
            raise IdAlignmentError(
                f"{datasets[0].name!r} and {d.name!r} label {differ.size} images differently "
                f"(id, label, label): {examples}; were they extracted from the same source?"
            )
    dropped = tuple(len(index) - len(common) for index in indexes)
    if any(dropped):
        logger.warning(
            "aligned %s embeddings on the %d ids all share; dropped %s",
            role,
            len(common),
            ", ".join(f"{n} from {d.name!r}" for d, n in zip(datasets, dropped)),
        )
    # stored in id order (the usual case) -> no copy of the vectors
    vectors = tuple(
        d.vectors if np.array_equal(r, np.arange(len(d.ids))) else d.vectors[r]
        for d, r in zip(datasets, rows)
    )
    return Aligned(np.asarray(common, dtype=object), labels, vectors, dropped)


def label_key(label: Any) -> tuple[int, Any]:
    # numbers in numeric order, then everything else by its text
    return (0, label) if isinstance(label, Real) else (1, str(label))


def pair_tests(datasets: Sequence[ProbeInput], tests: Sequence[ProbeInput]) -> list[ProbeInput]:
    """The test dataset made like each training dataset (same provenance), in that order."""
    if len(tests) != len(datasets):
        raise ProbeInputError(
            f"{len(datasets)} training but {len(tests)} test embeddings; give one test dataset "
            "per backbone, extracted the same way"
        )
    by_key: dict[str, ProbeInput] = {}
    for t in tests:
        key = _provenance_key(t.provenance)
        if key in by_key:
            raise ProbeInputError(
                f"test embeddings {by_key[key].name!r} and {t.name!r} have the same provenance"
            )
        by_key[key] = t
    paired = []
    for d in datasets:
        match = by_key.get(_provenance_key(d.provenance))
        if match is None:
            raise ProbeInputError(
                f"no test embeddings were made like {d.name!r} ({_describe(d.provenance)}); "
                f"test embeddings: {[(t.name, _describe(t.provenance)) for t in tests]}. Extract "
                "the test images with the same backbone, weights, layer and preprocessing"
            )
        paired.append(match)
    return paired


def _provenance_key(provenance: Mapping[str, Any]) -> str:
    return json.dumps(provenance, sort_keys=True, default=str)


def _describe(provenance: Mapping[str, Any]) -> str:
    weights = provenance.get("weights") or {}
    return f"{provenance.get('backbone')}/{provenance.get('layer')}, weights {weights.get('name')}"


def check_class_counts(y: np.ndarray, classes: Sequence[str], minimum: int, why: str) -> None:
    counts = np.bincount(y, minlength=len(classes))
    few = np.flatnonzero(counts < minimum)
    if few.size:
        examples = [(classes[i], int(counts[i])) for i in few[:EXAMPLES]]
        raise SplitError(
            f"every class needs at least {minimum} labelled rows ({why}); {few.size} have fewer "
            f"(class, rows): {examples}. Label more images of those classes or leave them out"
        )
