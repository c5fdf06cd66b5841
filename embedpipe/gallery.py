"""Neighbour galleries: a query beside its nearest neighbours, as PNGs and one HTML page.

The one place galleries are drawn; ``embedpipe search --gallery`` and a pipeline's
``gallery`` step both call :func:`query_galleries`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ImageDecodeError
from .figures import DPI, PAGE_CSS, png, shorten, titled_figure
from .images.thumbnails import ImageLike
from .images.thumbnails import thumbnail as make_thumbnail
from .provenance import Provenance


def render_gallery(
    query_image: ImageLike,
    neighbours: Sequence[tuple[ImageLike, str, float]],
    *,
    title: str,
    k: int | None = None,
    query_id: str | None = None,
    score_name: str = "score",
    per_row: int = 6,
    thumbnail: int = 144,
    query_label: str | None = None,
    labels: Sequence[str | None] | None = None,
) -> bytes:
    """A query beside its neighbours, each with its rank, id and score above it.

    ``neighbours``: (image or path, id, score), best first. With ``query_label`` and the
    neighbours' ``labels``, a neighbour whose label differs from the query's is framed in
    red and says so. There may be fewer than
    ``k`` (a small index, filtered results) or none: the figure then says how many of
    ``k`` were found. A neighbour whose file cannot be read gets a tile saying why
    instead of failing the gallery; an unreadable query raises. Thumbnails are drawn at
    their own pixel size (``thumbnail`` px on the long side), in rows of at most
    ``per_row``, balanced.
    """
    query = np.asarray(make_thumbnail(query_image, thumbnail))
    n = len(neighbours)
    rows = max(1, math.ceil(n / per_row))
    cols = max(1, math.ceil(n / rows))
    side, gap, label, sep = thumbnail / DPI, 0.12, 0.42, 0.3  # inches
    found = f"{n} neighbour{'s' if n != 1 else ''}"
    if k is not None and n < k:
        found = f"{n} of k={k} neighbours found" if n else f"no neighbours found (k={k})"
    width = side + sep + cols * (side + gap) + 0.1
    fig = titled_figure(width, rows * (side + label), f"{title}\n{found}", fontsize=9)
    fig_w, fig_h = fig.get_figwidth(), fig.get_figheight()

    def cell(x: float, row: int):
        y = 0.05 + (rows - 1 - row) * (side + label)
        ax = fig.add_axes((x / fig_w, y / fig_h, side / fig_w, side / fig_h))
        ax.set_axis_off()
        ax.set_anchor("N")  # images of any aspect start at the top: labels line up
        return ax

    ax = cell(0.05, 0)
    ax.imshow(query)
    ax.set_title(
        "query" + (f"\n{shorten(query_id)}" if query_id else "")
        + (f"\nlabel {shorten(str(query_label), 18)}" if query_label is not None else ""),
        fontsize=8,
        fontweight="bold",
        pad=3,
    )
    for i, (src, ident, score) in enumerate(neighbours):
        r, c = divmod(i, cols)
        ax = cell(0.05 + side + sep + c * (side + gap), r)
        try:
            ax.imshow(np.asarray(make_thumbnail(src, thumbnail)))
        except ImageDecodeError as e:
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.add_patch(_placeholder())
            ax.text(0.5, 0.5, f"cannot show\n{e.error_type}", ha="center", va="center", fontsize=7)
        caption = f"#{i + 1} {shorten(str(ident), 22)}\n{score_name} {score:.3f}"
        other = labels[i] if labels is not None else None
        if query_label is not None and other is not None and other != query_label:
            caption += f" · label {shorten(str(other), 12)}"
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(edgecolor=MISMATCH_COLOUR, linewidth=3)
            ax.set_title(caption, fontsize=8, pad=3, color=MISMATCH_COLOUR)
        else:
            ax.set_title(caption, fontsize=8, pad=3)
    return png(fig)


#: the frame of a neighbour whose label differs from the query's
MISMATCH_COLOUR = "#c92a2a"


def _placeholder():
    from matplotlib.patches import Rectangle

    return Rectangle((0, 0), 1, 1, facecolor="0.9", edgecolor="0.6")


@dataclass(frozen=True)
class Gallery:
    """One query's gallery: its id and the PNG."""

    query_id: str
    png: bytes


def query_galleries(
    results: pd.DataFrame,
    queries: Mapping[str, ImageLike],
    images: Path,
    *,
    provenance: Provenance,
    k: int,
    score_name: str,
    query_labels: Mapping[str, str | None] | None = None,
) -> list[Gallery]:
    """A gallery per query from search results (``SearchResults.to_frame()``: query_id,
    rank, id, label, score); neighbour ids resolve under ``images``. ``query_labels`` (the
    label of each query, when it is a row of the index) marks neighbours of another label."""
    title = f"{provenance.title()}: nearest neighbours"
    galleries = []
    for query_id, image in queries.items():
        rows = results[results["query_id"] == query_id]
        neighbours = [(images / r.id, r.id, float(r.score)) for r in rows.itertuples()]
        png_bytes = render_gallery(
            image, neighbours, title=title, k=k, query_id=query_id, score_name=score_name,
            query_label=(query_labels or {}).get(query_id),
            labels=rows["label"].tolist() if "label" in rows else None,
        )
        galleries.append(Gallery(query_id, png_bytes))
    return galleries


def gallery_page(galleries: Sequence[Gallery], *, provenance: Provenance) -> str:
    """One HTML page holding every gallery (PNGs inline), styled like the reports and
    scaled to the window."""
    esc = html.escape
    body = "".join(
        f"<figure><img alt='nearest neighbours of {esc(g.query_id)}' "
        f"src='data:image/png;base64,{base64.b64encode(g.png).decode()}'>"
        f"<figcaption>{esc(g.query_id)}</figcaption></figure>"
        for g in galleries
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Nearest neighbours: {esc(provenance.title())}</title>"
        f"<style>{PAGE_CSS}</style></head><body>\n"
        f"<h1>Nearest neighbours: {esc(provenance.title())}</h1>\n"
        f"<p>{esc(provenance.describe())}. Neighbours framed in red carry another label than "
        "their query.</p>\n" + body + "\n</body></html>\n"
    )
