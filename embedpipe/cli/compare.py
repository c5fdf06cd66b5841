"""``embedpipe compare``: linear CKA between embedding datasets of the same images."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import friendly_errors
from .app import main


def _names(paths: tuple[Path, ...]) -> list[str]:
    """Folder names, made unique with their parents where they clash."""
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


@main.command(short_help="Linear CKA between embeddings of the same images.")
@click.argument("embeddings", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for cka.json, cka.md, cka.png and cka.html.")
@click.option("--unbiased/--biased", default=True,
              help="HSIC estimator: unbiased (Song et al. 2012; near 0 for unrelated features) or biased.")
@click.option("--block-size", type=click.IntRange(min=4), default=1024,
              help="Rows per minibatch: memory stays bounded by one block of each dataset.")
@friendly_errors
def compare(embeddings: tuple[Path, ...], out: Path, unbiased: bool, block_size: int) -> None:
    """Linear CKA (Kornblith et al. 2019) between every pair of EMBEDDINGS datasets, on the
    ids they share: 1 means the same representation up to rotation and scale."""
    from ..compare import CKAResult, cka_matrix, shared_ids, write_cka
    from ..provenance import Provenance
    from ..store import read_embeddings

    read = [read_embeddings(p) for p in embeddings]
    datasets = {name: (e.ids, e.vectors) for name, e in zip(_names(embeddings), read)}
    names, matrix = cka_matrix(datasets, unbiased=unbiased, block_size=block_size)
    result = CKAResult(names, matrix, n=len(shared_ids(datasets)), unbiased=unbiased,
                       provenance=[Provenance.from_json(e.meta) for e in read])
    files = write_cka(result, out)
    for i, name in enumerate(names):
        click.echo(f"{name:>30}: " + " ".join(f"{v:6.3f}" for v in matrix[i]))
    click.echo(f"{result.n} shared images; report: {files.html}")
