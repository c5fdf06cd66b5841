"""What ``embedpipe dedup`` and ``embedpipe audit`` write: Parquet tables, the keep-list,
a summary and one self-contained HTML page each (thumbnails and figures inlined).

Thumbnails are drawn only when the image folder the embeddings record is readable; any
image that cannot be read shows its id instead, so a page never fails for a picture.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..figures import PAGE_CSS, png
from ..files import atomic_write, atomic_write_bytes, atomic_write_text
from .dedup import DedupResult, similarity_histogram

#: long side of the thumbnails on the pages, in pixels
THUMB = 128
#: groups (dedup) and rows (audit) shown on a page; the Parquet tables hold all of them
PAGE_GROUPS = 30
PAGE_ROWS = 40


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def histogram_png(nn_similarity: np.ndarray, threshold: float) -> bytes:
    """The nearest-neighbour similarity histogram with the threshold marked, as PNG."""
    from matplotlib.figure import Figure

    counts, edges = similarity_histogram(nn_similarity)
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_yscale("symlog")
    ax.set_xlabel("cosine similarity to the nearest other image")
    ax.set_ylabel("images")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return png(fig)


def _thumb(paths: dict[str, str] | None, image_id: str) -> str:
    """An <img> of the image ``image_id`` (at ``paths[image_id]``), or its id in a box
    when there is no readable image."""
    from ..images.thumbnails import thumbnail_jpeg

    if paths and image_id in paths:
        try:
            data = thumbnail_jpeg(paths[image_id], THUMB)
            return (f'<img alt="{html.escape(image_id)}" '
                    f'src="data:image/jpeg;base64,{base64.b64encode(data).decode()}">')
        except (OSError, ValueError):  # ImageDecodeError is a ValueError
            pass
    return f'<span class="noimg">{html.escape(image_id)}</span>'


def _page(title: str, body: list[str]) -> str:
    css = PAGE_CSS + (".tile { display: inline-block; margin: 0.3rem; text-align: center; "
                      "font-size: 0.8rem; vertical-align: top; max-width: 140px; "
                      "word-break: break-all; }\n"
                      ".noimg { display: inline-block; padding: 1rem 0.4rem; border: 1px dashed #aaa; }\n")
    return ("<!doctype html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{css}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _tile(paths: dict[str, str] | None, image_id: str, caption: str) -> str:
    return (f'<div class="tile">{_thumb(paths, image_id)}<br>{html.escape(image_id)}'
            f"<br>{html.escape(caption)}</div>")


def _figure(data: bytes, alt: str, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def hash_note(summary: dict) -> str:
    """One sentence on what the perceptual hashes did, from a dedup summary."""
    if summary["perceptual_hash"].startswith("unavailable"):
        return (f"Perceptual hashes: {summary['perceptual_hash']}; near duplicates by cosine "
                "similarity alone.")
    return (f"Perceptual hashes (pHash, 64 bits) of {summary['hashed']:,} images "
            f"({summary['unreadable']:,} unreadable): pairs within {summary['hash_distance']} bits "
            f"are near duplicates whatever their cosine ({summary['hash_links']:,} links); "
            f"{summary['vetoed_links']:,} cosine pairs more than {summary['hash_veto']} bits "
            "apart were refused. Each member shows its cosine and hash distance to the kept image.")


def dedup_page(result: DedupResult, paths: dict[str, str] | None, leakage: pd.DataFrame | None = None) -> str:
    s = result.summary()
    hashes_used = result.hashes.unavailable is None
    body = [(f"<h1>Duplicates</h1><p>{s['rows']:,} images; {s['duplicate_groups']:,} groups of "
            f"duplicates; keep {s['keep']:,}, drop {s['drop']:,} ({s['exact_duplicates']:,} "
            f"exact duplicates by content hash). Near duplicates: cosine &ge; {s['threshold']:.3f}; "
            f"each member &ge; {s['group_threshold']:.3f} to its group's representative (the "
            f"first id in sorted order, kept). Neighbours: {html.escape(s['neighbours'])}. "
            f"{html.escape(hash_note(s))}</p>"),
            _figure(histogram_png(result.nn_similarity, result.threshold), "similarity histogram",
                    "Each image's similarity to its nearest other image. Duplicates sit in the "
                    "spike near 1; put the threshold in the valley before it.")]
    dup = result.duplicates
    shown = dup["group"].drop_duplicates().head(PAGE_GROUPS)
    body.append(f"<h2>Largest groups ({len(shown)} of {dup['group'].nunique()})</h2>")
    for gid in shown:
        g = dup[dup["group"] == gid]
        body.append(f"<h3>group {gid}: {len(g)} images</h3><div>")
        for r in g.itertuples():
            bits = r.hash_distance_to_representative
            hashed = f" · hash {bits}" if bits >= 0 else " · no hash" if hashes_used else ""
            kind = "kept" if r.id == r.representative else (
                "exact" if r.exact_duplicate else f"{r.similarity_to_representative:.3f}{hashed}")
            body.append(_tile(paths, r.id, kind))
        body.append("</div>")
    if leakage is not None:
        body.append(f"<h2>Leakage: {len(leakage):,} images also in the other set</h2><table>"
                    "<tr><th>id</th><th>nearest in the other set</th><th>similarity</th>"
                    "<th>hash bits</th><th>found by</th></tr>")
        body += [f"<tr><td>{html.escape(r.id)}</td><td>{html.escape(r.nearest_id)}</td>"
                 f"<td>{r.similarity:.4f}</td><td>{r.hash_distance if r.hash_distance >= 0 else '-'}</td>"
                 f"<td>{r.found_by}</td></tr>" for r in leakage.head(PAGE_ROWS * 5).itertuples()]
        body.append("</table>")
    return _page("Duplicates", body)


def write_dedup(out: Path, result: DedupResult, keep: pd.DataFrame, paths: dict[str, str] | None,
                leakage: pd.DataFrame | None = None, extra: dict | None = None) -> dict[str, Path]:
    """duplicates.parquet, keep.csv, index.html, summary.json (and leakage.parquet) under
    ``out``; returns the paths by name."""
    out = Path(out)
    files = {
        "duplicates": write_parquet(result.duplicates, out / "duplicates.parquet"),
        "keep": atomic_write_text(keep.to_csv(index=False), out / "keep.csv"),
    }
    summary = {**result.summary(), **(extra or {})}
    if leakage is not None:
        files["leakage"] = write_parquet(leakage, out / "leakage.parquet")
        summary["leaked"] = len(leakage)
    files["html"] = atomic_write_text(dedup_page(result, paths, leakage), out / "index.html")
    files["summary"] = atomic_write_bytes(json.dumps(summary, indent=2).encode(), out / "summary.json")
    return files


def audit_page(issues: pd.DataFrame, outliers: pd.DataFrame, paths: dict[str, str] | None, note: str) -> str:
    body = ["<h1>Audit</h1>", f"<p>{html.escape(note)}</p>",
            f"<h2>Likely label errors ({len(issues):,}; the first {min(len(issues), PAGE_ROWS)})</h2><div>"]
    body += [_tile(paths, r.id, f"{r.given_label} -> {r.suggested_label} ({r.score:.2f})")
             for r in issues.head(PAGE_ROWS).itertuples()]
    body.append(f"</div><h2>Outliers (the {min(len(outliers), PAGE_ROWS)} farthest from their "
                "k-th neighbour)</h2><div>")
    body += [_tile(paths, r.id, f"distance {r.distance:.3f}") for r in outliers.head(PAGE_ROWS).itertuples()]
    body.append("</div>")
    return _page("Audit", body)


def write_audit(out: Path, issues: pd.DataFrame, outliers: pd.DataFrame, paths: dict[str, str] | None,
                summary: dict) -> dict[str, Path]:
    """label_issues.parquet, outliers.parquet, index.html, summary.json under ``out``."""
    out = Path(out)
    note = (f"{summary['rows']:,} images; label issues by confident learning (cleanlab) on "
            f"{summary['folds']}-fold out-of-fold probabilities of a logistic regression; "
            f"outliers by 1 - cosine similarity to the {summary['k']}-th nearest neighbour "
            f"({summary['neighbours']}).")
    return {
        "label_issues": write_parquet(issues, out / "label_issues.parquet"),
        "outliers": write_parquet(outliers, out / "outliers.parquet"),
        "html": atomic_write_text(audit_page(issues, outliers, paths, note), out / "index.html"),
        "summary": atomic_write_bytes(json.dumps(summary, indent=2).encode(), out / "summary.json"),
    }
