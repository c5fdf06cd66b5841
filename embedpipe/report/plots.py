"""The report's figures, drawn from its document with matplotlib's object-oriented API on
the Agg canvas: no display, no pyplot global state."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ..compare import CKAResult, cka_heatmap
from ..figures import png as figure_png
from ..figures import robust_limits, wrap
from .document import display_name, headline_k, pretrained, weights_name

DPI = 110
MAX_TICK_CLASSES = 30  # more classes than this: no class names on confusion axes
MAX_ANNOTATED_CLASSES = 12  # confusion cells carry counts, maps a legend


def _png(fig: Figure) -> bytes:
    return figure_png(fig, dpi=DPI)


def _label_colors(n_classes: int) -> ListedColormap:
    from matplotlib import colormaps

    if n_classes <= 10:
        return ListedColormap(colormaps["tab10"].colors[:n_classes])
    if n_classes <= 20:
        return ListedColormap(colormaps["tab20"].colors[:n_classes])
    return ListedColormap(colormaps["turbo"](np.linspace(0.05, 0.95, n_classes)))


def draw_figures(doc: Mapping[str, Any]) -> dict[str, bytes]:
    figures = {
        "accuracy": _accuracy_figure(doc),
        "validation_curve": _validation_figure(doc),
        "confusion_matrix": _confusion_figure(doc),
    }
    if doc.get("map"):
        figures["map"] = _map_figure(doc)
    if (doc.get("cka") or {}).get("matrix") is not None:
        figures["cka"] = _cka_figure(doc)
    if depth_series(doc):
        figures["depth"] = _depth_figure(doc)
    return figures


def depth_series(doc: Mapping[str, Any]) -> dict[str, list[tuple[float, str]]]:
    """Datasets of one backbone and weights at two or more layers, each series as
    (relative depth, dataset name) shallowest first: a stage records its depth
    (``extract --layer stages``), gap and penultimate are the end of the network (1.0)."""
    series: dict[str, list[tuple[float, str]]] = {}
    for name, entry in doc["datasets"].items():
        p = entry["provenance"]
        depth = p.get("depth", 1.0 if p.get("layer") in ("gap", "penultimate") else None)
        if depth is None or p.get("backbone") is None:
            continue
        key = f"{p['backbone']} ({weights_name(p)})"
        series.setdefault(key, []).append((float(depth), name))
    return {k: sorted(v) for k, v in series.items() if len({d for d, _ in v}) >= 2}


def _depth_figure(doc: Mapping[str, Any]) -> bytes:
    """Linear-probe top-1 (with its interval) and k-NN top-1 against relative depth."""
    datasets, k = doc["datasets"], headline_k(doc)
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    series = depth_series(doc)
    colours = _label_colors(max(len(series), 1))
    for i, (backbone, points) in enumerate(series.items()):
        x = np.array([d for d, _ in points])
        m = [datasets[n]["metrics"] for _, n in points]
        top1 = np.array([v["linear.top1"] for v in m])
        err = np.vstack([top1 - [v["linear.top1_ci_low"] for v in m], [v["linear.top1_ci_high"] for v in m] - top1])
        ax.errorbar(x, 100 * top1, yerr=100 * err, marker="o", capsize=3, color=colours(i),
                    label=f"{backbone}: linear")
        if k is not None:
            ax.plot(x, [100 * v[f"knn.k{k}.top1"] for v in m], marker="s", linestyle="--", color=colours(i),
                    alpha=0.7, label=f"{backbone}: k-NN, k={k}")
    ax.set_xlabel("relative depth (0 = input, 1 = last stage)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Transfer by depth: a probe per layer", fontsize=10)
    return _png(fig)


def _accuracy_figure(doc: Mapping[str, Any]) -> bytes:
    names = doc["ranking"]
    datasets = doc["datasets"]
    k = headline_k(doc)
    fig = Figure(figsize=(max(5.0, 1.5 * len(names) + 2.0), 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    width = 0.38 if k is not None else 0.6
    linear = np.array([datasets[n]["metrics"]["linear.top1"] for n in names])
    low = np.array([datasets[n]["metrics"]["linear.top1_ci_low"] for n in names])
    high = np.array([datasets[n]["metrics"]["linear.top1_ci_high"] for n in names])
    hatches = ["" if pretrained(datasets[n]["provenance"]) else "//" for n in names]
    offset = -width / 2 if k is not None else 0.0
    bars = ax.bar(x + offset, 100 * linear, width, yerr=100 * np.vstack([linear - low, high - linear]),
                  capsize=4, color="#4C72B0",
                  label=f"linear probe (top-1, {100 * doc['config']['confidence']:.0f}% CI)")
    groups = [bars]
    if k is not None:
        knn = np.array([datasets[n]["metrics"][f"knn.k{k}.top1"] for n in names])
        groups.append(ax.bar(x + width / 2, 100 * knn, width, color="#DD8452", label=f"k-NN, k={k} (top-1)"))
    for group in groups:
        for bar, hatch in zip(group, hatches):
            bar.set_hatch(hatch)
            bar.set_edgecolor("#333333" if hatch else bar.get_facecolor())
        ax.bar_label(group, fmt="%.1f", padding=3, fontsize=8)
    ax.set_xticks(x, [display_name(n, datasets[n]["provenance"]) for n in names])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 108)
    ax.set_title("Accuracy per embeddings dataset (hatched: not pretrained)", fontsize=10)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _validation_figure(doc: Mapping[str, Any]) -> bytes:
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for name in doc["ranking"]:
        entry = doc["datasets"][name]
        curve = entry["linear"]["validation_curve"]
        (line,) = ax.plot(curve["C"], 100 * np.asarray(curve["accuracy"]), marker=".", label=name)
        best = curve["C"].index(entry["linear"]["C"])
        ax.plot(curve["C"][best], 100 * curve["accuracy"][best], marker="*", markersize=14,
                color=line.get_color(), markeredgecolor="black")
    ax.set_xscale("log")
    ax.set_xlabel("C (inverse L2 regularisation strength)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Linear probe: validation accuracy over C (star: selected C)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def _confusion_figure(doc: Mapping[str, Any]) -> bytes:
    best = doc["ranking"][0]
    classes = doc["split"]["classes"]
    counts = np.asarray(doc["datasets"][best]["linear"]["confusion_matrix"], dtype=np.int64)
    support = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    size = min(11.0, 3.5 + 0.35 * len(classes))
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(100 * rates, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of the true class", shrink=0.8)
    if len(classes) <= MAX_TICK_CLASSES:
        ticks = np.arange(len(classes))
        ax.set_xticks(ticks, classes, rotation=90 if len(classes) > 10 else 0, fontsize=8)
        ax.set_yticks(ticks, classes, fontsize=8)
    if len(classes) <= MAX_ANNOTATED_CLASSES:
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix of the best embeddings, {best} (linear probe, test split)", fontsize=10)
    return _png(fig)


def map_points(doc: Mapping[str, Any], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dataset ``name``'s map: coordinates (m, 2) float64 and class indices (m,) of the
    sample rows, and (m,) bool marking the test rows its linear probe got wrong."""
    sample = doc["sample"]
    wrong_ids = set(misclassified(doc, name))
    return (
        np.asarray(doc["map"]["datasets"][name], dtype=np.float64).reshape(-1, 2),
        np.asarray(sample["labels"], dtype=np.int64),
        np.array([i in wrong_ids for i in sample["ids"]], dtype=bool),
    )


def misclassified(doc: Mapping[str, Any], name: str) -> list[str]:
    """The test ids dataset ``name``'s linear probe got wrong."""
    split = doc["split"]
    wrong = np.asarray(doc["datasets"][name]["linear"]["test_predictions"]) != split["test_labels"]
    return [i for i, w in zip(split["test_ids"], wrong) if w]


def map_method_text(doc: Mapping[str, Any]) -> str:
    """The map's method with the parameters in effect (as :mod:`embedpipe.maps` caps them)."""
    p, m = doc["map"]["params"], len(doc["sample"]["ids"])
    detail = {
        "umap": f"UMAP · n_neighbors {min(p['n_neighbors'], m - 1)} · min_dist {p['min_dist']:g} · cosine",
        "tsne": f"t-SNE · perplexity {min(p['perplexity'], (m - 1) / 3):g}",
    }.get(p["method"], str(p["method"]).upper())
    return f"{detail} · seed {p['seed']} · {sample_text(doc)}, L2-normalised"


def sample_text(doc: Mapping[str, Any]) -> str:
    s = doc["sample"]
    m, of = len(s["ids"]), s["of"]
    return f"all {m:,} images" if m == of else f"a sample of {m:,} of the {of:,} images (sample seed {s['seed']})"


def _map_figure(doc: Mapping[str, Any]) -> bytes:
    """One panel per dataset: its map coloured by label, test images its linear probe got
    wrong marked with a black x."""
    names, classes = doc["ranking"], doc["split"]["classes"]
    cmap = _label_colors(len(classes))
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.2 * ncols + 1.0, 4.0 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        points, labels, wrong = map_points(doc, name)
        (lo, hi), outside = robust_limits(points)
        shown = np.clip(points, lo, hi)  # outliers sit on the frame's edge instead of squashing the rest
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xticks=[], yticks=[])
        ax.scatter(shown[:, 0], shown[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5,
                   s=6, alpha=0.7, linewidths=0)
        n, errors = int(wrong.sum()), len(misclassified(doc, name))
        ax.scatter(shown[wrong, 0], shown[wrong, 1], marker="x", s=16, c="black", linewidths=0.8,
                   label=f"misclassified ({n}" + (f" of {errors})" if n < errors else ")"))
        ax.legend(loc="lower right", fontsize=7, frameon=False)
        ax.set_title(display_name(name, doc["datasets"][name]["provenance"]).replace("\n", " ")
                     + (f" · {int(outside.sum())} at the edge" if outside.any() else ""), fontsize=10)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    if len(classes) <= MAX_ANNOTATED_CLASSES:
        handles = [axes[0].scatter([], [], color=cmap(i), s=20, label=c) for i, c in enumerate(classes)]
        fig.legend(handles=handles, title="label", loc="outside right center", fontsize=8)
    fig.suptitle(wrap(f"Map: {map_method_text(doc)}", fig.get_figwidth() - 0.2, 10)
                 + "\ncoloured by label; x: test images the linear probe got wrong", fontsize=10)
    return _png(fig)


def _cka_figure(doc: Mapping[str, Any]) -> bytes:
    cka = doc["cka"]
    unbiased = cka["estimator"] == "unbiased"
    return cka_heatmap(CKAResult(cka["names"], np.asarray(cka["matrix"]), cka["n"], unbiased))


