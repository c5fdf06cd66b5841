"""``embedpipe dedup`` and ``embedpipe audit``: curation from embeddings.

:mod:`embedpipe.curate` (FAISS, scikit-learn, cleanlab) is imported inside the commands.
The defaults are spelt out here so that ``--help`` imports none of it;
tests/test_curate.py checks that they agree with the library's.
"""

from __future__ import annotations

from pathlib import Path

import click

from ._common import friendly_errors
from .app import main

DEFAULT_THRESHOLD = 0.85
DEFAULT_K = 10
AUDIT_K = 10
AUDIT_FOLDS = 5


@main.command(short_help="Find exact and near-duplicate images (and train/test leakage).")
@click.argument("embeddings", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for duplicates.parquet, keep.csv, index.html, summary.json.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=DEFAULT_THRESHOLD,
              help="Cosine similarity from which two images are near duplicates; read the "
              "histogram on index.html to place it.")
@click.option("--group-threshold", type=click.FloatRange(-1, 1), default=None,
              help="Least similarity of a group member to the group's representative "
              "(guards against chains)  [default: threshold - 0.05]")
@click.option("--k", "k", type=click.IntRange(1), default=DEFAULT_K,
              help="Neighbours searched per image: the most near copies one image can link.")
@click.option("--across", type=click.Path(exists=True, path_type=Path),
              help="Another embeddings dataset (e.g. train): also list images of EMBEDDINGS "
              "that have a near copy there, in leakage.parquet.")
@friendly_errors
def dedup(embeddings: Path, out: Path, threshold: float, group_threshold: float | None, k: int,
          across: Path | None) -> None:
    """Group the exact (same content hash) and near (cosine >= --threshold) duplicates of
    EMBEDDINGS and write a keep-list manifest with one image per group."""
    from ..curate.run import dedup_dataset

    s, files = dedup_dataset(embeddings, out, threshold=threshold,
                             group_threshold=group_threshold, k=k, across=across)
    click.echo(f"{s['rows']:,} images: {s['duplicate_groups']:,} duplicate groups "
               f"(largest {s['largest_group']}), {s['exact_duplicates']:,} exact duplicates; "
               f"keep {s['keep']:,}, drop {s['drop']:,}")
    if across is not None:
        click.echo(f"leakage: {s['leaked']:,} images of {embeddings} have a near copy in {across} "
                   f"(cosine >= {threshold}) -> {files['leakage']}")
    click.echo(f"keep-list: {files['keep']}; page: {files['html']}")


@main.command(short_help="Rank likely label errors and outliers.")
@click.argument("embeddings", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for label_issues.parquet, outliers.parquet, index.html, summary.json.")
@click.option("--k", "k", type=click.IntRange(1), default=AUDIT_K,
              help="Neighbours for the k-NN label disagreement and the outlier distance.")
@click.option("--folds", type=click.IntRange(2), default=AUDIT_FOLDS,
              help="Cross-validation folds of the out-of-fold probabilities.")
@click.option("--seed", type=int, default=0, help="Seeds the fold assignment.")
@friendly_errors
def audit(embeddings: Path, out: Path, k: int, folds: int, seed: int) -> None:
    """Likely label errors of EMBEDDINGS (confident learning with cleanlab on out-of-fold
    logistic-regression probabilities, plus k-NN label disagreement) and outliers (far
    from their k-th neighbour). Needs pip install "embedpipe[curate]"."""
    from ..curate.run import audit_dataset

    s, files = audit_dataset(embeddings, out, k=k, folds=folds, seed=seed)
    click.echo(f"{s['rows']:,} images: {s['label_issues']:,} likely label errors"
               + (f" ({s['note']})" if s["note"] else ""))
    click.echo(f"tables: {files['label_issues']}, {files['outliers']}; page: {files['html']}")
