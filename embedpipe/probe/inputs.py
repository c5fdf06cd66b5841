"""What a probe takes: the protocol's constants, the run's config and the datasets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import DUPLICATE_SIMILARITY, Choice, IdAlignment
from ..errors import (
    ProbeConfigError,
)
from ..provenance import SPACE_KEYS

logger = logging.getLogger(__name__)


KORNBLITH_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 5, 45))
"""The 45 inverse regularisation strengths of Kornblith et al. (2019), log-spaced."""

DINO_KS: tuple[int, ...] = (10, 20, 100, 200)
"""Neighbour counts of the DINO / DINOv2 k-NN evaluation."""

DINO_TEMPERATURE = 0.07
"""Temperature of the DINO k-NN vote: a neighbour at cosine s votes exp(s / 0.07)."""

RESULTS_SCHEMA = "embedpipe.probe/1"
"""Identifies the layout of :meth:`ProbeResults.to_dict` (and so of ``results.json``)."""

PROVENANCE_KEYS = SPACE_KEYS
"""Metadata that says what made a set of embeddings; test sets pair with train sets on it."""

EXAMPLES = 5  # ids quoted in an error message


class SplitKind(Choice):
    """Where the test rows came from."""

    STRATIFIED = "stratified"  # a seeded stratified split of the given datasets
    GIVEN = "given"  # separate test datasets


# --- configuration and inputs --------------------------------------------------------


@dataclass(frozen=True)
class ProbeConfig:
    """Everything one probe run needs, decided before it starts.

    ``test_size`` is the fraction of rows held out for testing (ignored when test datasets
    are given); ``validation_size`` the fraction of the remaining rows held out to choose
    ``C``. ``standardize`` and ``l2_normalize`` preprocess features for the linear probe
    (L2 first when both); the k-NN probe always uses cosine similarity. ``n_jobs``
    datasets are probed at once (joblib semantics: -1 is every core; with one dataset, its
    ``n_chains`` warm-started C paths run at once instead, see :class:`LinearProbeCV`).
    ``confidence`` is the level of the Wilson interval of test accuracy;
    ``projection_samples`` rows (seeded) are kept for the report's map and CKA matrix. Results do not depend on
    ``n_jobs``.
    """

    test_size: float = 0.2
    validation_size: float = 0.2
    seed: int = 0
    Cs: tuple[float, ...] = KORNBLITH_CS
    standardize: bool = True
    l2_normalize: bool = False
    max_iter: int = 1000
    tol: float = 1e-4
    n_chains: int = 1
    knn_ks: tuple[int, ...] = DINO_KS
    knn_temperature: float = DINO_TEMPERATURE
    align: IdAlignment = IdAlignment.STRICT
    confidence: float = 0.95
    #: cosine from which a test row's nearest training row counts as its near duplicate
    duplicate_similarity: float = DUPLICATE_SIMILARITY
    projection_samples: int = 2000
    n_jobs: int | None = -1

    def __post_init__(self) -> None:
        if self.align not in IdAlignment.values():
            raise ProbeConfigError(
                f"align must be one of {IdAlignment.values()}, got {str(self.align)!r}"
            )
        object.__setattr__(self, "align", IdAlignment(self.align))
        object.__setattr__(self, "Cs", tuple(sorted(float(c) for c in self.Cs)))
        object.__setattr__(self, "knn_ks", tuple(sorted({int(k) for k in self.knn_ks})))
        for name in ("test_size", "validation_size", "confidence"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ProbeConfigError(f"{name} must be strictly between 0 and 1, got {value}")
        check_cs(self.Cs)
        for name in ("max_iter", "n_chains", "projection_samples"):
            if getattr(self, name) < 1:
                raise ProbeConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tol <= 0:
            raise ProbeConfigError(f"tol must be > 0, got {self.tol}")
        if not self.knn_ks or self.knn_ks[0] < 1:
            raise ProbeConfigError(f"knn_ks must be positive neighbour counts, got {self.knn_ks}")
        if self.knn_temperature <= 0:
            raise ProbeConfigError(f"knn_temperature must be > 0, got {self.knn_temperature}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["align"] = self.align.value
        d["Cs"], d["knn_ks"] = list(self.Cs), list(self.knn_ks)
        return d


@dataclass(frozen=True, eq=False)
class ProbeInput:
    """One embeddings dataset to probe.

    ``ids``: (N,) str, unique; ``labels``: (N,) object, ``None`` where missing;
    ``vectors``: (N, D) float (float32 as stored); ``meta``: provenance as written by
    :mod:`embedpipe.store` (backbone, layer, dim, weights, preprocessing, ...). ``name``
    labels the dataset in results and reports and must be unique within a run.
    """

    name: str
    ids: np.ndarray
    labels: np.ndarray
    vectors: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", np.asarray(self.ids, dtype=object))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=object))
        object.__setattr__(self, "vectors", np.asarray(self.vectors))

    @classmethod
    def from_embeddings(cls, embeddings: Any, *, name: str) -> ProbeInput:
        """Wrap what :func:`embedpipe.store.read_embeddings` returned."""
        return cls(
            name=name,
            ids=embeddings.ids,
            labels=embeddings.labels,
            vectors=embeddings.vectors,
            meta=dict(embeddings.meta),
        )

    @property
    def provenance(self) -> dict[str, Any]:
        """The metadata that identifies what made these embeddings."""
        out = {key: self.meta.get(key) for key in PROVENANCE_KEYS}
        if "depth" in self.meta:  # a stage of `extract --layer stages`: where it sits
            out["depth"] = self.meta["depth"]
        return out


def check_cs(Cs: Sequence[float]) -> None:
    if len(Cs) == 0 or min(Cs) <= 0 or not all(math.isfinite(c) for c in Cs):
        raise ProbeConfigError(f"Cs must be finite positive values, got {list(Cs)!r}")
