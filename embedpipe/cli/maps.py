"""``embedpipe map``."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import MapMethod
from ._common import enum_choice, friendly_errors
from .app import main


@main.command("map", short_help="A 2-D map of embeddings with neighbours and thumbnails.")
@click.argument("embeddings", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for map.parquet, map.png, map.json and the fitted reducer.")
@click.option("--method", type=enum_choice(MapMethod), default=MapMethod.UMAP.value,
              help="umap (default; pip install \"embedpipe[map]\"), pca, or tsne (no --update).")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, help="Nearest neighbours stored per row.")
@click.option("--seed", type=int, default=0, help="Seeds the reducer and the fitting sample.")
@click.option("--fit-sample", type=click.IntRange(min=2), default=50_000,
              help="Rows UMAP/PCA are fitted on; the rest are placed with transform.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image folder for the thumbnails in map.png. Default: the one the embeddings recorded.")
@click.option("--update", is_flag=True,
              help="Place rows new since the last map with its reducer, without refitting.")
@friendly_errors
def map_(embeddings: Path, out: Path, method: str, k: int, seed: int, fit_sample: int,
         images: Path | None, update: bool) -> None:
    """Compute 2-D coordinates (UMAP by default) and the k nearest neighbours of every row of
    EMBEDDINGS: a Parquet that embedding-atlas and notebooks read, and a PNG with thumbnails."""
    from ..maps import MapParams, build_map, read_map, update_map, write_map
    from ..provenance import Provenance
    from ..store import read_embeddings

    e = read_embeddings(embeddings)
    provenance = Provenance.from_json(e.meta)
    if update:
        m = update_map(read_map(out), e.ids, e.labels, e.vectors)
    else:
        params = MapParams(method=MapMethod(method), seed=seed, k=k, fit_sample=fit_sample)
        m = build_map(e.ids, e.labels, e.vectors, params)
    root = images or (Path(provenance.images) if provenance.images else None)
    write_map(m, out, provenance=provenance, images=root)
    added = f", {m.notes['updated_rows']} placed" if update else ""
    click.echo(f"{len(m.ids):,} rows mapped ({m.params.method}{added}; neighbours {m.notes['neighbors']}) -> {out}")
