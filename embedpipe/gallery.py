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
from .figures import DPI, png, shorten, titled_figure
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
    per_row: int = 8,
    thumbnail: int = 144,
) -> bytes:
    """A query beside its neighbours, each with its rank, id and score above it.

    ``neighbours``: (image or path, id, score), best first. There may be fewer than
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
    side, gap, label, sep = thumbnail / DPI, 0.1, 0.36, 0.3  # inches
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
        "query" + (f"\n{shorten(query_id)}" if query_id else ""),
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
        ax.set_title(
            f"#{i + 1} {shorten(str(ident), 24)}\n{score_name} {score:.3f}", fontsize=7, pad=3
        )
    return png(fig)


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
) -> list[Gallery]:
    """A gallery per query from search results (``SearchResults.to_frame()``: query_id,
    rank, id, score); neighbour ids resolve under ``images``."""
    title = f"{provenance.title()}: nearest neighbours"
    galleries = []
    for query_id, image in queries.items():
        rows = results[results["query_id"] == query_id]
        neighbours = [(images / r.id, r.id, float(r.score)) for r in rows.itertuples()]
        galleries.append(
            Gallery(
                query_id,
                render_gallery(image, neighbours, title=title, k=k, query_id=query_id, score_name=score_name),
            )
        )
    return galleries


def gallery_page(galleries: Sequence[Gallery], *, provenance: Provenance) -> str:
    """One HTML page holding every gallery (PNGs inline)."""
    body = "".join(
        f"<h2>{html.escape(g.query_id)}</h2><img alt='neighbours of {html.escape(g.query_id)}' "
        f"src='data:image/png;base64,{base64.b64encode(g.png).decode()}'>"
        for g in galleries
    )
    return (
        "<!doctype html><meta charset=utf-8><title>Neighbour gallery</title>"
        f"<body style='font-family:sans-serif'><h1>Neighbour gallery: "
        f"{html.escape(provenance.title())}</h1>{body}</body>"
    )
