"""Probe results -> ``results.json``, ``report.md`` and a self-contained ``report.html``.

Everything shown is read back from ``results.json``, so :func:`render_report` re-renders a
report without the embeddings, exactly as a script or dashboard reading that file would
see the numbers. The probe measured nearly all of it; :func:`write_report` adds the two
views of every dataset that :mod:`embedpipe.probe` may not compute, because ``probe``,
``maps`` and ``compare`` are siblings in the layers of ``.importlinter``: the 2-D map
(:func:`embedpipe.maps.project`) and the linear CKA matrix
(:class:`embedpipe.compare.MinibatchCKA`), both of the probe's seeded row sample.

The Markdown and the HTML are rendered from one list of blocks, so they cannot drift
apart; the HTML embeds its figures as base64 PNG and needs nothing beside itself. How the
document is read (names, weights, percentages) is :mod:`.document`; the figures are
:mod:`.plots`.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..compare import CKAError, MinibatchCKA
from ..errors import ReportError
from ..figures import PAGE_CSS
from ..files import atomic_write_bytes
from ..maps import MapParams, project
from ..probe import RESULTS_SCHEMA, SMALL_TEST_SET, ProbeResults
from .document import (
    ci,
    headline_k,
    p_value,
    pct,
    pretrained,
    top5_measured,
    weights_text,
)
from .plots import (
    MAX_TICK_CLASSES,
    depth_series,
    draw_figures,
    map_method_text,
    sample_text,
)

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
FIGURES_DIR = "figures"



@dataclass(frozen=True)
class ReportFiles:
    """Paths of one rendered report."""

    results: Path
    markdown: Path
    html: Path
    figures: tuple[Path, ...]


def write_report(
    results: ProbeResults, out_dir: str | os.PathLike, *, map_params: MapParams | None = None
) -> ReportFiles:
    """Save ``results`` as ``out_dir/results.json``, with its map and CKA matrix
    (:func:`views`), and render the report next to it. ``map_params``: the map's reducer,
    by default ``embedpipe map``'s (UMAP, which needs the ``map`` extra) seeded with the
    probe's seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**results.to_dict(), **views(results, map_params or MapParams(seed=results.config.seed))}
    text = json.dumps(doc, indent=1, allow_nan=False, default=_json_default)
    atomic_write_bytes(text.encode("utf-8"), out / RESULTS_FILE)
    return render_report(out)


def views(results: ProbeResults, params: MapParams) -> dict[str, Any]:
    """``map`` and ``cka`` of ``results.json``, computed on every dataset's vectors of the
    probe's sample (``results.sample``: at most ``projection_samples`` rows, seeded).

    ``map``: ``params`` and, per dataset, the (m, 2) coordinates
    :func:`embedpipe.maps.project` gives its sample rows (rounded to 1e-4). ``cka``: with
    two datasets or more, ``names`` and the (k, k) unbiased linear CKA ``matrix`` of the
    sample rows (one block of :class:`~embedpipe.compare.MinibatchCKA`, so exactly
    :func:`~embedpipe.compare.linear_cka` of each pair), or an ``error`` when a dataset
    is constant on them.
    """
    sample = results.sample
    if sample is None:
        return {"map": None, "cka": None}
    names = [d.name for d in results.datasets]
    xy = {n: np.round(project(v, params)[0].astype(np.float64), 4) for n, v in zip(names, sample.vectors)}
    cka: dict[str, Any] | None = None
    if len(names) >= 2:
        cka = {"names": names, "estimator": "unbiased", "n": len(sample.ids)}
        try:
            cka["matrix"] = MinibatchCKA(len(names), unbiased=True).update(sample.vectors).result()
        except CKAError as e:
            cka["error"] = str(e)
    return {"map": {"params": {**asdict(params), "method": str(params.method)}, "datasets": xy}, "cka": cka}


def load_results(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``results.json`` document of a report directory, checked for its schema."""
    path = Path(out_dir) / RESULTS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(
            f"{path} does not exist; write it with `embedpipe probe EMBEDDINGS... --out "
            f"{Path(out_dir)}` (or embedpipe.report.write_report) first"
        ) from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON ({e}); re-run the probe to rewrite it") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != RESULTS_SCHEMA:
        raise ReportError(
            f"{path} has schema {schema!r}, this embedpipe renders {RESULTS_SCHEMA!r}; "
            "re-run the probe with this version to rewrite it"
        )
    return doc


def render_report(out_dir: str | os.PathLike) -> ReportFiles:
    """(Re-)render ``report.md``, ``report.html`` and ``figures/`` from ``results.json``."""
    out = Path(out_dir)
    doc = load_results(out)
    figures = draw_figures(doc)
    (out / FIGURES_DIR).mkdir(exist_ok=True)
    figure_paths = []
    for name, png in figures.items():
        path = out / FIGURES_DIR / f"{name}.png"
        atomic_write_bytes(png, path)
        figure_paths.append(path)
    blocks = _blocks(doc)
    markdown = _to_markdown(blocks, {name: f"{FIGURES_DIR}/{name}.png" for name in figures})
    page = _to_html(blocks, figures)
    atomic_write_bytes(markdown.encode("utf-8"), out / MARKDOWN_FILE)
    atomic_write_bytes(page.encode("utf-8"), out / HTML_FILE)
    logger.info("report written to %s", out / HTML_FILE)
    return ReportFiles(
        out / RESULTS_FILE, out / MARKDOWN_FILE, out / HTML_FILE, tuple(figure_paths)
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --- the document as blocks ----------------------------------------------------------


@dataclass(frozen=True)
class _Heading:
    level: int
    text: str


@dataclass(frozen=True)
class _Paragraph:
    text: str


@dataclass(frozen=True)
class _Warning:
    text: str


@dataclass(frozen=True)
class _Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class _FigureRef:
    name: str
    caption: str


_Block = _Heading | _Paragraph | _Warning | _Table | _FigureRef


def _blocks(doc: Mapping[str, Any]) -> list[_Block]:
    config, split, datasets, env = doc["config"], doc["split"], doc["datasets"], doc["environment"]
    names = doc["ranking"]
    level = 100 * config["confidence"]
    k = headline_k(doc)
    if split["kind"] == "stratified":
        where = f"a stratified split (test {config['test_size']:g}, seed {config['seed']})"
    else:
        where = "the given test embeddings"
    blocks: list[_Block] = [
        _Heading(1, "embedpipe probe report"),
        _Paragraph(
            f"{len(names)} embeddings datasets of the same {split['n_train'] + split['n_test']} "
            f"images, {len(split['classes'])} classes. Test rows from {where}: "
            f"{split['n_train']} training rows (of which {split['n_validation']} held out to "
            f"choose C) and {split['n_test']} test rows, identical for every dataset. "
            f"Created {doc['created_at']} with embedpipe {env['embedpipe']}, "
            f"scikit-learn {env['scikit-learn']}, faiss {env['faiss']}."
        ),
    ]
    untrained = [n for n in names if pretrained(datasets[n]["provenance"]) is not True]
    if untrained:
        blocks.append(_Warning(
            f"Not pretrained (or not recorded as pretrained): {', '.join(untrained)}. Their "
            "weights are random init or none, so their scores are baselines, not transfer from pretraining."
        ))
    if split["n_test"] < SMALL_TEST_SET:
        blocks.append(_Warning(small_test_set_warning(split["n_test"])))
    dropped = {n: datasets[n]["rows_dropped"] for n in names if datasets[n]["rows_dropped"]}
    if dropped:
        blocks.append(_Warning("Aligned on the ids every dataset shares; rows dropped: "
                               + ", ".join(f"{n}: {c}" for n, c in dropped.items())))

    blocks.append(_Heading(2, "Comparison"))
    top5 = top5_measured(doc)
    headers = (
        "#", "Embeddings", "Backbone", "Layer", "Dim", "Weights", f"Linear top-1 [{level:.0f}% CI]",
        *(("Top-5",) if top5 else ()), "Mean per-class", "Macro-F1", "C",
        f"k-NN top-1 (k={k})" if k is not None else "k-NN top-1", "Fit time",
    )
    rows = []
    for rank, name in enumerate(names, start=1):
        entry = datasets[name]
        m, p = entry["metrics"], entry["provenance"]
        rows.append((
            str(rank), name, str(p.get("backbone")), str(p.get("layer")), str(p.get("dim")), weights_text(p),
            f"{pct(m['linear.top1'])} [{ci(m)}]", *((pct(m["linear.top5"]),) if top5 else ()),
            pct(m["linear.mean_per_class"]), pct(m["linear.macro_f1"]), f"{m['linear.C']:.3g}",
            pct(m[f"knn.k{k}.top1"]) if k is not None else "—", f"{m['linear.fit_seconds']:.1f} s",
        ))
    blocks.append(_Table(headers, tuple(rows)))
    leakage = {n: datasets[n].get("leakage") for n in names}
    if any(leakage.values()):
        n_test = split["n_test"]
        threshold = next(v for v in leakage.values() if v)["threshold"]
        leaked_any = any(v and v["test_rows"] for v in leakage.values())
        blocks += [
            _Paragraph(
                f"Train/test leakage: test images whose nearest training image is a near duplicate "
                f"(cosine >= {threshold:g} in that embedding: the same picture resized or recompressed "
                "on both sides of the split). Accuracy without them is what a careful reader wants."
            ),
            _Table(
                ("Embeddings", "Leaked test images", "Linear top-1", "Linear top-1 without them"),
                tuple(
                    (n, f"{v['test_rows']} of {n_test}", pct(datasets[n]["metrics"]["linear.top1"]),
                     pct(v["linear.top1_leak_free"]))
                    for n, v in leakage.items() if v
                ),
            ),
        ]
        flagged = max((v["test_rows"] for v in leakage.values() if v), default=0)
        if flagged > LEAKAGE_SUSPICIOUS * n_test:
            blocks.append(_Warning(
                f"Up to {flagged} of {n_test} test images count as near duplicates at cosine "
                f"{threshold:g}: in these embeddings distinct images of one kind are that close (the "
                "threshold was measured on resized and recompressed photos). Read these counts as an "
                "upper bound, or set a threshold that suits your images (ProbeConfig.duplicate_similarity; "
                "`embedpipe dedup` shows the similarity histogram)."
            ))
        elif leaked_any:
            blocks.append(_Warning(
                "Some test images have near duplicates among the training images; their ids are in "
                "results.json (datasets.NAME.leakage.test_ids). `embedpipe dedup EMB --out DUPS` lists "
                "every group."
            ))
    paired = doc["paired_test"]
    if paired is None:
        blocks.append(_Paragraph("One embeddings dataset only: there is no paired comparison."))
    else:
        alpha = 1.0 - config["confidence"]
        verdict = (f"{'a' if paired['p_value'] < alpha else 'no'} significant difference at the "
                   f"{100 * alpha:g}% level")
        blocks.append(_Paragraph(
            f"Paired test of the two best, {paired['a']} vs {paired['b']} (exact McNemar on "
            f"the same {paired['n']} test images): only {paired['a']} right on "
            f"{paired['a_only']}, only {paired['b']} right on {paired['b_only']}; "
            f"{p_value(paired['p_value'])}, {verdict}. Intervals are Wilson score intervals over the "
            "test images."
        ))

    twins = doc.get("pretrained_vs_random") or []
    if twins:
        alpha = 1.0 - config["confidence"]
        blocks += [
            _Heading(2, "Does pretraining transfer? Each pretrained embedding vs its random-init twin"),
            _Table(
                ("Pretrained", "Random init", "Linear top-1", "Only pretrained right",
                 "Only random right", "p (exact McNemar)", f"At {100 * alpha:g}%"),
                tuple(
                    (
                        t["a"], t["b"],
                        f"{pct(datasets[t['a']]['metrics']['linear.top1'])} vs "
                        f"{pct(datasets[t['b']]['metrics']['linear.top1'])}",
                        str(t["a_only"]), str(t["b_only"]), p_value(t["p_value"]).removeprefix("p = "),
                        "significant" if t["p_value"] < alpha else "not significant",
                    )
                    for t in twins
                ),
            ),
        ]
    series = depth_series(doc)
    if series:
        rows = []
        for backbone, points in series.items():
            best = max(points, key=lambda p: datasets[p[1]]["metrics"]["linear.top1"])
            rows.append((
                backbone,
                " · ".join(f"{datasets[n]['provenance'].get('layer')} "
                           f"{pct(datasets[n]['metrics']['linear.top1'])}" for _, n in points),
                f"{datasets[best[1]]['provenance'].get('layer')} (depth {best[0]:g})",
            ))
        blocks += [
            _Heading(2, "Transfer by depth"),
            _Table(("Backbone", "Linear top-1 per layer, shallow to deep", "Best layer"), tuple(rows)),
            _FigureRef("depth", "Linear-probe (with its interval) and k-NN accuracy against the "
                       "relative depth of each layer."),
        ]
    blocks += _cka_blocks(doc)
    ks = [int(key[1:]) for key in next(iter(datasets.values()))["knn"]]
    blocks += [
        _Heading(2, f"k-NN probe (cosine, votes weighted exp(similarity / {config['knn_temperature']:g}))"),
        _Table(
            ("Embeddings", *(f"k={k} top-1" + (" / top-5" if top5 else "") for k in ks)),
            tuple(
                (name, *(pct(datasets[name]["metrics"][f"knn.k{k}.top1"])
                         + (f" / {pct(datasets[name]['metrics'][f'knn.k{k}.top5'])}" if top5 else "")
                         for k in ks))
                for name in names
            ),
        ),
        _Heading(2, "Figures"),
        _FigureRef("accuracy", "Test accuracy per embeddings dataset, with its Wilson interval."),
        _FigureRef(
            "validation_curve",
            f"Validation accuracy over the {len(config['Cs'])} values of C; the star marks the C "
            "each probe was refit with.",
        ),
        _FigureRef("confusion_matrix", f"Confusion matrix of the best embeddings, {names[0]}."),
    ]
    if doc.get("map"):
        blocks.append(_FigureRef("map", f"The map of each embeddings dataset (`embedpipe map`'s reducer: "
                                 f"{map_method_text(doc)}), coloured by label; x marks the test images "
                                 "its linear probe got wrong."))
    if len(split["classes"]) <= MAX_TICK_CLASSES:
        blocks += [_Heading(2, "Per-class accuracy (linear probe, test split)"), _Table(
            ("Class", *names),
            tuple((c, *(pct(datasets[n]["linear"]["per_class_accuracy"][i]) for n in names))
                  for i, c in enumerate(split["classes"])),
        )]
    blocks += [_Heading(2, "Protocol")] + [_Paragraph(line) for line in _protocol(doc)]
    blocks.append(_provenance_table(doc))
    return blocks


def _cka_blocks(doc: Mapping[str, Any]) -> list[_Block]:
    """The CKA matrix as a table and a heatmap, and each depth series' consecutive layers."""
    cka = doc.get("cka")
    if not cka:
        return []
    blocks: list[_Block] = [_Heading(2, "Representation similarity (linear CKA)"), _Paragraph(
        "Linear CKA (Kornblith et al. 2019; unbiased HSIC of Song et al. 2012, as `embedpipe compare`) "
        f"between every pair of embeddings, on the same images: {sample_text(doc)}. 1: the same "
        "representation up to rotation and scale; near 0: unrelated.")]
    if "error" in cka:
        return [*blocks, _Warning(f"CKA not computed: {cka['error']}")]
    at = {n: i for i, n in enumerate(cka["names"])}
    blocks.append(_Table(("", *cka["names"]), tuple((n, *(f"{v:.3f}" for v in row))
                                                    for n, row in zip(cka["names"], cka["matrix"]))))
    for backbone, points in depth_series(doc).items():
        steps = [f"{a} → {b} {cka['matrix'][at[a]][at[b]]:.3f}" for (_, a), (_, b) in pairwise(points)]
        blocks.append(_Paragraph(f"Consecutive layers of {backbone}: " + " · ".join(steps)))
    return [*blocks, _FigureRef("cka", "Linear CKA between every pair of embeddings datasets.")]


def _preprocessing_text(p: Any) -> str:
    if not isinstance(p, Mapping):
        return "not recorded"
    size = f"resize {p.get('resize_size', '?')}, crop {p.get('crop_size', '?')}"
    interpolation = f" {p['interpolation']}" if "interpolation" in p else ""
    stats = (
        f", mean {tuple(round(v, 3) for v in p['mean'])}, std {tuple(round(v, 3) for v in p['std'])}"
        if "mean" in p and "std" in p else ""
    )
    return size + interpolation + stats


#: a larger share of test rows flagged as near duplicates is a threshold that does not fit
#: the embeddings, not leakage
LEAKAGE_SUSPICIOUS = 0.2


def small_test_set_warning(n_test: int) -> str:
    """Why a small test set's numbers need care (the report and the CLI say it alike)."""
    return (
        f"Only {n_test} test images: accuracies move in steps of {100 / max(n_test, 1):.1f} points "
        "and the intervals are wide; differences smaller than the intervals are not shown by "
        f"these data. Use {SMALL_TEST_SET} or more test images to compare backbones."
    )


def _provenance_table(doc: Mapping[str, Any]) -> _Table:
    """What made each embeddings dataset, one row each (results.json keeps every field)."""
    rows = []
    for name in doc["ranking"]:
        p = doc["datasets"][name]["provenance"]
        rows.append((
            name, str(p.get("backbone")), str(p.get("layer")), str(p.get("dim")), weights_text(p),
            _preprocessing_text(p.get("preprocessing")), "yes" if p.get("normalize") else "no",
        ))
    return _Table(
        ("Embeddings", "Backbone", "Layer", "Dim", "Weights", "Preprocessing", "L2-normalised"),
        tuple(rows),
    )


def _protocol(doc: Mapping[str, Any]) -> list[str]:
    config = doc["config"]
    datasets = doc["datasets"]
    preprocessing = [step for step, on in (("L2-normalised", config["l2_normalize"]),
                                           ("standardised", config["standardize"])) if on]
    unconverged = [n for n in doc["ranking"] if not datasets[n]["linear"]["converged"]]
    linear = (
        "Linear probe (Kornblith, Shlens & Le 2019): L2-regularised multinomial logistic "
        "regression, L-BFGS (scikit-learn), features "
        f"{' then '.join(preprocessing) if preprocessing else 'as extracted'}. C chosen by "
        f"validation accuracy among {len(config['Cs'])} values from {config['Cs'][0]:.0e} to "
        f"{config['Cs'][-1]:.0e} on {100 * config['validation_size']:g}% of the training rows "
        f"(stratified, seed {config['seed']}), then refit on all training rows and scored once "
        f"on the test rows; tol {config['tol']:g}, max_iter {config['max_iter']}."
    )
    knn = (
        "k-NN probe (Caron et al. 2021, DINO): cosine similarity of L2-normalised features, "
        f"exact search with FAISS, k in {config['knn_ks']}, each neighbour voting "
        f"exp(similarity / {config['knn_temperature']:g}); training rows are the database."
    )
    lines = [linear, knn]
    if unconverged:
        lines.append(
            f"Warning: the final fit of {', '.join(unconverged)} stopped at max_iter before "
            "reaching tol; raise max_iter for converged numbers."
        )
    return lines


# --- rendering -----------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _to_markdown(blocks: Sequence[_Block], figure_paths: Mapping[str, str]) -> str:
    out = []
    for block in blocks:
        if isinstance(block, _Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, _Paragraph):
            out.append(block.text)
        elif isinstance(block, _Warning):
            out.append(f"> **Warning:** {block.text}")
        elif isinstance(block, _Table):
            out.append("| " + " | ".join(map(_md_cell, block.headers)) + " |")
            out[-1] += "\n|" + "---|" * len(block.headers)
            out[-1] += "".join("\n| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows)
        else:
            out.append(f"![{block.caption}]({figure_paths[block.name]})\n\n*{block.caption}*")
    return "\n\n".join(out) + "\n"


def _to_html(blocks: Sequence[_Block], figures: Mapping[str, bytes]) -> str:
    esc = html.escape
    body = []
    for block in blocks:
        if isinstance(block, _Heading):
            body.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, _Paragraph):
            body.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, _Warning):
            body.append(f'<p class="warning"><strong>Warning:</strong> {esc(block.text)}</p>')
        elif isinstance(block, _Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in block.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
                for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(figures[block.name]).decode("ascii")
            body.append(
                f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>embedpipe probe report</title>"
        f"<style>{PAGE_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
