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
DEFAULT_HASH_DISTANCE = 8
DEFAULT_HASH_VETO = 20
AUDIT_K = 10
AUDIT_FOLDS = 5


@main.command(short_help="Find exact and near-duplicate images (and train/test leakage).")
@click.argument("embeddings", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for duplicates.parquet, keep.csv, index.html, summary.json "
              "(and hashes.parquet, the images' perceptual hashes).")
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
              "that have a near copy there (by cosine, or by perceptual hash when both sets' "
              "images are reachable), in leakage.parquet.")
@click.option("--hash-distance", type=click.IntRange(0, 64), default=DEFAULT_HASH_DISTANCE,
              help="Images whose perceptual hashes (64-bit pHash) differ in at most this many "
              "bits are near duplicates, whatever their cosine.")
@click.option("--hash-veto", type=click.IntRange(0, 64), default=DEFAULT_HASH_VETO,
              help="Images whose hashes differ in more than this many bits are not near "
              "duplicates, whatever their cosine (crops of one scene, bursts); 64 switches "
              "the veto off.")
@click.option("--no-hash", "no_hash", is_flag=True,
              help="Compare embeddings only: do not read the images to hash them.")
@friendly_errors
def dedup(embeddings: Path, out: Path, threshold: float, group_threshold: float | None, k: int,
          across: Path | None, hash_distance: int, hash_veto: int, no_hash: bool) -> None:
    """Group the exact (same content hash) and near (cosine >= --threshold, or perceptual
    hashes within --hash-distance) duplicates of EMBEDDINGS and write a keep-list manifest
    with one image per group. The images' hashes are kept in OUT/hashes.parquet and reused
    by the next run."""
    from ..curate.run import dedup_dataset

    s, files = dedup_dataset(embeddings, out, threshold=threshold,
                             group_threshold=group_threshold, k=k, across=across,
                             hashes=not no_hash, hash_distance=hash_distance, hash_veto=hash_veto)
    click.echo(f"{s['rows']:,} images: {s['duplicate_groups']:,} duplicate groups "
               f"(largest {s['largest_group']}), {s['exact_duplicates']:,} exact duplicates; "
               f"keep {s['keep']:,}, drop {s['drop']:,}")
    if s["perceptual_hash"].startswith("unavailable"):
        click.echo(f"perceptual hashes {s['perceptual_hash']}: near duplicates by cosine alone")
    else:
        click.echo(f"perceptual hashes: {s['hashed']:,} images ({s['hashes_reused']:,} reused, "
                   f"{s['unreadable']:,} unreadable) -> {files['hashes']}; {s['hash_links']:,} "
                   f"links within {hash_distance} bits, {s['vetoed_links']:,} cosine pairs "
                   f"refused (> {hash_veto} bits)")
    if across is not None:
        rule = f"cosine >= {threshold}" + (f" or pHash within {hash_distance} bits"
                                           if s["across_hashes"] == "pHash" else "")
        click.echo(f"leakage: {s['leaked']:,} images of {embeddings} have a near copy in {across} "
                   f"({rule}) -> {files['leakage']}")
        if s["across_hashes"] != "pHash":
            click.echo(f"hashes of {across}: {s['across_hashes']}")
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
