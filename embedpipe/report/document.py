"""Reading a probe report's document (``results.json`` as a dict): names, weights,
percentages and intervals as the report writes them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..provenance import WeightsInfo

HEADLINE_K = 20  # the k-NN column of the comparison table, as DINO reports


def pretrained(provenance: Mapping[str, Any]) -> bool | None:
    """True / False as recorded in the weights metadata; None when it was not recorded."""
    weights = provenance.get("weights")
    value = weights.get("pretrained") if isinstance(weights, Mapping) else None
    return value if isinstance(value, bool) else None


def weights_name(provenance: Mapping[str, Any]) -> str:
    """A name that fits a cell: a checkpoint's file name and sha256 prefix (the full path
    stays in results.json), a torchvision enum without its class."""
    weights = provenance.get("weights")
    if not isinstance(weights, Mapping):
        return "unknown"
    if "kind" in weights:
        return WeightsInfo.from_dict(weights).short_name()
    return str(weights.get("name") or "unknown")


def weights_text(provenance: Mapping[str, Any]) -> str:
    status = {True: "pretrained", False: "NOT PRETRAINED", None: "pretraining not recorded"}
    return f"{weights_name(provenance)} ({status[pretrained(provenance)]})"


def top5_measured(doc: Mapping[str, Any]) -> bool:
    """Top-5 accuracy says something only with more than five classes."""
    return len(doc["split"]["classes"]) > 5


def display_name(name: str, provenance: Mapping[str, Any]) -> str:
    """Axis label: not-pretrained embeddings are marked wherever they are plotted."""
    return (
        name if pretrained(provenance) else f"{name}\n({_STATUS_SHORT[pretrained(provenance)]})"
    )


_STATUS_SHORT = {False: "not pretrained", None: "pretraining unknown"}


def headline_k(doc: Mapping[str, Any]) -> int | None:
    """The k shown in the comparison: 20 when measured, else the smallest measured k."""
    ks = [int(key[1:]) for key, m in next(iter(doc["datasets"].values()))["knn"].items() if m]
    return HEADLINE_K if HEADLINE_K in ks else (min(ks) if ks else None)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def ci(metrics: Mapping[str, Any]) -> str:
    return f"{100 * metrics['linear.top1_ci_low']:.2f}, {100 * metrics['linear.top1_ci_high']:.2f}"


def p_value(p: float) -> str:
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}"


