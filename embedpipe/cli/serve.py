"""``embedpipe serve INDEX``."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import friendly_errors
from .app import main


@main.command(short_help="Serve an index: a search page and a JSON API.")
@click.argument("index", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The image folder the index's ids are relative to. Default: the one it records.")
@click.option("--map", "map_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A map of the index's embeddings (what `embedpipe map EMB --out MAP_DIR` writes): "
                   "the page gains a Map view.")
@click.option("--host", default="127.0.0.1", help="Address to bind; 0.0.0.0 exposes it to the network.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A name clients reach the server by (repeatable); requests with any other Host "
                   "are refused (DNS rebinding). localhost, 127.0.0.1, [::1] and --host always are.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, help="TCP port to listen on.")
@click.option("--workers", type=click.IntRange(min=1), default=1,
              help="Server processes; each loads the index and the model.")
@click.option("--max-k", type=click.IntRange(min=1), default=100, help="Largest k a request may ask for.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=20.0,
              help="Largest upload accepted.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=40_000_000,
              help="Larger images (uploads and thumbnails) are refused before decoding.")
@click.option("--max-effort", type=click.IntRange(min=1),
              help="Largest nprobe / ef_search a request may ask for. Default: what the index can use "
                   "(IVF: nlist; HNSW: 4096).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where thumbnails are cached. Default: INDEX/.thumbnails.")
@friendly_errors
def serve(index: Path, images: Path | None, host: str, allowed_hosts: tuple[str, ...], port: int,
          workers: int, max_k: int, max_upload_mb: float, max_pixels: int, max_effort: int | None,
          cache_dir: Path | None, map_dir: Path | None) -> None:
    """Serve an index over HTTP: a search page at / and a JSON API (pip install
    "embedpipe[serve]"). Images are served by id only, from inside --images."""
    from ..serve import ServeConfig, run

    config = ServeConfig(index=index, images=images, max_k=max_k,
                         max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels,
                         cache_dir=cache_dir, allowed_hosts=allowed_hosts, max_effort=max_effort,
                         map=map_dir)
    run(config, host=host, port=port, workers=workers, announce=lambda line: click.echo(line, err=True))
