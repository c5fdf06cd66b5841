"""What made a set of embeddings: one frozen, typed record, read and written everywhere.

Every dataset part, index and probe result carries it as JSON (the ``embedpipe`` key of
each Parquet part, the sidecar's ``dataset.json``, ``index.json``'s ``embeddings``). Code reads the
record, never the JSON by key: :meth:`Provenance.from_json` is the one parser,
:meth:`~Provenance.to_json` the one writer, :meth:`~Provenance.differences` the one
comparison and :meth:`~Provenance.describe` the one human-readable line.

Two comparisons matter, and they differ on purpose:

* **identity** (:data:`RUN_KEYS` aside, everything): two runs wrote the same dataset, so
  parts may be mixed and a re-run may resume.
* **space** (:data:`SPACE_KEYS`): two sets of vectors live in the same space, so one may
  query the other (an index and its queries, a probe's train and test sets). Precision,
  decode and storage dtype move vectors by rounding only.

A record may be partial: embeddings that another tool wrote carry none, and the fields
it lacks stay ``None`` (compared only where both sides have them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import Choice
from .images.preprocess import Preprocessing

#: keys that describe how a run went, not what the vectors are; parts of one dataset
#: may differ in them
RUN_KEYS = frozenset({"versions", "created_at", "runtime", "part", "images"})

#: keys that decide whether two sets of vectors are comparable
SPACE_KEYS = ("backbone", "weights", "layer", "dim", "preprocessing", "normalize")


def identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a metadata mapping that decides the vectors (all but :data:`RUN_KEYS`)."""
    return {k: v for k, v in meta.items() if k not in RUN_KEYS}


def differences(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    keys: str = "identity",
    names: tuple[str, str] = ("existing", "requested"),
) -> list[str]:
    """``key: a (names[0]) != b (names[1])`` for each key where two metadata mappings
    differ: over the whole identity, or (``keys="space"``) over :data:`SPACE_KEYS` where
    both sides recorded the key (a side without provenance is not compared)."""
    if keys == "space":
        compared = [k for k in SPACE_KEYS if a.get(k) is not None and b.get(k) is not None]
    else:
        a, b = identity(a), identity(b)
        compared = sorted(set(a) | set(b))
    return [
        f"{k}: {json.dumps(a.get(k), default=str)} ({names[0]}) != "
        f"{json.dumps(b.get(k), default=str)} ({names[1]})"
        for k in compared
        if _jsonable(a.get(k)) != _jsonable(b.get(k))
    ]


def _jsonable(value: Any) -> Any:
    """Tuples and lists compare equal, as they do once written to JSON."""
    return json.loads(json.dumps(value, default=str))


class WeightsKind(Choice):
    NONE = "none"
    TORCHVISION = "torchvision"
    CHECKPOINT = "checkpoint"
    TIMM = "timm"  # timm's pretrained weights, through its hub cache
    PACKAGE = "package"  # a file shipped inside an installed Python package


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's parameters came from.

    ``name`` is ``"none"``, the torchvision enum (``"ResNet50_Weights.IMAGENET1K_V2"``)
    or the checkpoint's absolute path. ``pretrained`` is false only for random init.
    """

    kind: WeightsKind
    name: str
    pretrained: bool
    sha256: str | None = None
    url: str | None = None
    seed: int | None = None
    key_map: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        if d["key_map"] is None:  # written only when used, so older metadata still matches
            del d["key_map"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WeightsInfo:
        return cls(**{**d, "kind": WeightsKind(d["kind"])})

    def argument(self) -> str:
        """The ``--weights`` value that loads these weights again."""
        if self.kind == WeightsKind.TORCHVISION:
            return self.name.rpartition(".")[2]  # ResNet50_Weights.IMAGENET1K_V2 -> IMAGENET1K_V2
        if self.kind in (WeightsKind.TIMM, WeightsKind.PACKAGE):
            return "DEFAULT"
        return self.name  # "none", or the checkpoint's path

    def short_name(self) -> str:
        """A name that fits a table cell: a checkpoint's file name and sha256 prefix, a
        torchvision enum without its class, or the name as it is."""
        if self.kind == WeightsKind.CHECKPOINT:
            digest = f" ({self.sha256[:8]})" if self.sha256 else ""
            return f"{Path(self.name).name}{digest}"
        if self.kind == WeightsKind.TORCHVISION:
            return self.argument()
        return self.name

    def describe(self) -> str:
        """``IMAGENET1K_V2 (pretrained)``, ``random init, seed 0``."""
        if self.kind == WeightsKind.NONE:
            return f"random init, seed {self.seed}" if self.seed is not None else "random init"
        return f"{self.short_name()} ({'pretrained' if self.pretrained else 'NOT PRETRAINED'})"


@dataclass(frozen=True)
class Provenance:
    """What made a set of embeddings, and (for a dataset) how the run that made it went.

    The fields up to ``normalize`` decide the vectors; ``images``, ``runtime``,
    ``versions`` and ``created_at`` describe the run. ``extra`` keeps keys this version
    does not know, so that reading and writing a record loses nothing.
    """

    backbone: str | None = None
    family: str | None = None
    source: str | None = None
    layer: str | None = None
    dim: int | None = None
    weights: WeightsInfo | None = None
    preprocessing: Preprocessing | None = None
    precision: str | None = None
    decode: str | None = None
    embedding_dtype: str | None = None
    normalize: bool | None = None
    # how the run went
    images: str | None = None  # where ids resolve to files: a folder or a URI
    runtime: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    # --- JSON -------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Provenance:
        """The record of a metadata mapping (``None`` or ``{}``: provenance unknown)."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: data.pop(k) for k in list(data) if k in known}
        if isinstance(values.get("weights"), Mapping):
            values["weights"] = WeightsInfo.from_dict(values["weights"])
        if isinstance(values.get("preprocessing"), Mapping):
            values["preprocessing"] = Preprocessing.from_dict(values["preprocessing"])
        if values.get("dim") is not None:
            values["dim"] = int(values["dim"])
        return cls(**values, extra=data)

    def to_json(self) -> dict[str, Any]:
        """The metadata mapping (JSON-ready); fields that are ``None`` are left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if isinstance(value, (WeightsInfo, Preprocessing)):
                value = value.to_dict()
            elif isinstance(value, Mapping):
                if not value and f.name in ("runtime", "versions"):
                    continue
                value = dict(value)
            if value is not None:
                out[f.name] = value
        return {**out, **self.extra}

    # --- comparing --------------------------------------------------------------------

    @property
    def known(self) -> bool:
        """False for embeddings without embedpipe provenance (another tool wrote them)."""
        return self.backbone is not None

    def identity(self) -> dict[str, Any]:
        """What decides the vectors: everything but how the run went."""
        return identity(self.to_json())

    def space(self) -> dict[str, Any]:
        """What decides whether two sets of vectors are comparable (:data:`SPACE_KEYS`)."""
        data = self.to_json()
        return {k: data.get(k) for k in SPACE_KEYS}

    def differences(
        self, other: Provenance, *, keys: str = "identity", names: tuple[str, str] = ("existing", "requested")
    ) -> list[str]:
        """:func:`differences` of the two records (``self`` is ``names[0]``)."""
        return differences(self.to_json(), other.to_json(), keys=keys, names=names)

    # --- words ------------------------------------------------------------------------

    def describe(self) -> str:
        """One line for people: ``resnet50 (resnet), layer gap, 2048-d, weights
        IMAGENET1K_V2 (pretrained), 224 px crop, L2-normalised``."""
        if not self.known:
            return "provenance unknown (not written by embedpipe)"
        parts = [f"{self.backbone}" + (f" ({self.family})" if self.family else "")]
        if self.layer:
            parts.append(f"layer {self.layer}")
        if self.dim:
            parts.append(f"{self.dim}-d")
        parts.append(f"weights {self.weights.describe() if self.weights else 'unknown'}")
        if self.preprocessing:
            p = self.preprocessing
            parts.append(f"resize {p.resize_size}, crop {p.crop_size} ({p.interpolation})")
        if self.precision:
            parts.append(self.precision)
        if self.normalize:
            parts.append("L2-normalised")
        return ", ".join(parts)

    def lines(self) -> dict[str, str]:
        """The record as labelled lines, for ``info`` and ``index info``."""
        if not self.known:
            return {"provenance": self.describe()}
        out = {"backbone": f"{self.backbone} ({self.family or '?'}), layer {self.layer or '?'}"}
        if self.weights is not None:
            w = self.weights
            out["weights"] = w.name + ("" if w.pretrained else f" (random init, seed {w.seed})")
        if self.preprocessing is not None:
            q = self.preprocessing
            out["preprocessing"] = (
                f"resize {q.resize_size}, crop {q.crop_size}, {q.interpolation}, "
                f"mean {list(q.mean)}, std {list(q.std)}"
            )
        if self.precision:
            stored = f", stored as {self.embedding_dtype}" if self.embedding_dtype else ""
            out["precision"] = self.precision + stored + (", L2-normalised" if self.normalize else "")
        return out

    def title(self) -> str:
        """A short heading: ``resnet50 (IMAGENET1K_V2)``, ``lenet5 (random init)``."""
        if not self.known:
            return "embeddings of unknown provenance"
        w = self.weights
        if w is None:
            return str(self.backbone)
        return f"{self.backbone} ({w.short_name() if w.pretrained else 'random init'})"
