"""``embedpipe probe`` and ``embedpipe report``."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import DUPLICATE_SIMILARITY, IdAlignment, MapMethod
from ._common import enum_choice, friendly_errors, table_columns
from .app import main


def _names(paths: tuple[Path, ...]) -> list[str]:
    """Report names: folder names, made unique with their parents where they clash."""
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


@main.command(short_help="Linear and k-NN probes of embeddings, with a report.")
@click.argument("embeddings", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              help="Held-out fraction (stratified, seeded); ignored with --test.")
@click.option("--test", "tests", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A given test split: embeddings of the test images, one per backbone (repeatable).")
@click.option("--seed", type=int, default=0, help="Seeds the split, the bootstrap and the map.")
@click.option("--map-method", type=enum_choice(MapMethod), default=MapMethod.UMAP.value,
              help="The report's map of the images: umap (needs the map extra), pca or tsne.")
@click.option("--align", type=enum_choice(IdAlignment), default=IdAlignment.STRICT.value,
              help="strict: datasets must hold the same ids; intersect: probe the ids they share.")
@click.option("--standardize/--no-standardize", default=True, help="Standardise features for the linear probe.")
@click.option("--l2-normalize", is_flag=True, help="L2-normalise features for the linear probe.")
@click.option("--jobs", type=int, default=-1, help="Datasets probed at once (-1: every core).")
@click.option("--duplicate-similarity", type=click.FloatRange(-1, 1), default=DUPLICATE_SIMILARITY,
              help="Cosine from which a test image's nearest training image counts as a near "
              "duplicate (train/test leakage).")
@table_columns
@friendly_errors
def probe(embeddings: tuple[Path, ...], out: Path, test_size: float, tests: tuple[Path, ...], seed: int,
          map_method: str, align: str, standardize: bool, l2_normalize: bool, jobs: int, duplicate_similarity: float,
          columns: dict | None) -> None:
    """Linear-probe and k-NN evaluation of each EMBEDDINGS dataset, compared in one report
    (embedpipe's datasets, or tables other tools wrote: see --id-column)."""
    from ..maps import MapParams, check_available
    from ..probe import SMALL_TEST_SET, ProbeConfig, ProbeInput, run_probe
    from ..report import small_test_set_warning, write_report
    from ..tables import Columns, read_any

    check_available(MapMethod(map_method))  # before the probe, not after it

    where = Columns(**columns) if columns else Columns()
    inputs = [ProbeInput.from_embeddings(read_any(p, where), name=n) for p, n in zip(embeddings, _names(embeddings))]
    test_inputs = [ProbeInput.from_embeddings(read_any(p, where), name=n) for p, n in zip(tests, _names(tests))]
    config = ProbeConfig(test_size=test_size, seed=seed, align=IdAlignment(align), standardize=standardize,
                         l2_normalize=l2_normalize, n_jobs=jobs, duplicate_similarity=duplicate_similarity)
    results = run_probe(inputs, config, test=test_inputs or None)
    files = write_report(results, out, map_params=MapParams(method=map_method, seed=seed))
    if results.split.n_test < SMALL_TEST_SET:
        click.echo(f"warning: {small_test_set_warning(results.split.n_test)}", err=True)
    for name, d in results.to_dict()["datasets"].items():
        m = d["metrics"]
        knn = m.get("knn.k20.top1")
        click.echo(f"{name:>30}: linear top-1 {m['linear.top1']:.3f} (C={m['linear.C']:.3g})"
                   + (f", k-NN k=20 top-1 {knn:.3f}" if knn is not None else ""))
    for d in results.datasets:
        if d.leaked is not None and d.leaked.any():
            without = "n/a (all leaked)" if d.top1_leak_free is None else f"{d.top1_leak_free:.3f}"
            click.echo(f"{d.name}: {int(d.leaked.sum())} of {d.leaked.size} test images have a near "
                       f"duplicate in training; linear top-1 without them {without}", err=True)
    for t in results.pretrained_vs_random:
        click.echo(f"{t.a} vs {t.b}: only pretrained right on {t.a_only}, only random right on "
                   f"{t.b_only} of {t.n} test images; exact McNemar p = {t.p_value:.2g}")
    click.echo(f"report: {files.html}")


@main.command(short_help="Re-render a probe report from its results.json.")
@click.argument("report_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@friendly_errors
def report(report_dir: Path) -> None:
    """Re-render REPORT_DIR's report.md, report.html and plots from its results.json."""
    from ..report import render_report

    click.echo(f"report: {render_report(report_dir).html}")
