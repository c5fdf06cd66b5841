"""``embedpipe index build|update|info|eval`` and ``embedpipe search``.

:mod:`embedpipe.index` (FAISS, pandas) and, for image queries, torch are imported inside
the commands, so that ``embedpipe --help`` and the other commands stay quick.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import click

from ..config import Choice
from ._common import echo_json, enum_choice, friendly_errors, output_format, table_columns
from .app import main

# The values of embedpipe.index.Metric, spelt out so that building the command line does
# not import FAISS; tests/test_cli_index.py checks that the two agree.
METRICS = ("cosine", "l2", "ip")
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfsq", "ivfpq")


class ResultFormat(Choice):
    """How ``embedpipe search`` writes its rows (the same columns in each)."""

    TABLE = "table"  # aligned text
    JSON = "json"  # a list of records
    PARQUET = "parquet"  # needs --out


_SUFFIX_FORMATS = {
    ".parquet": ResultFormat.PARQUET,
    ".pq": ResultFormat.PARQUET,
    ".json": ResultFormat.JSON,
}


@main.group(short_help="Build, update, describe and evaluate FAISS indexes.")
def index() -> None:
    """Build, update, describe and evaluate nearest-neighbour indexes (FAISS)."""


@index.command("build", short_help="Build an index over an embeddings dataset.")
@click.argument("embeddings", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Index directory to write."
)
@click.option(
    "--metric",
    type=click.Choice(METRICS, case_sensitive=False),
    default=METRICS[0],
    help="cosine: similarity of L2-normalised vectors (normalised for you); "
    "l2: Euclidean distance; ip: inner product of the raw vectors.",
)
@click.option(
    "--index",
    "index_spec",
    default="auto",
    metavar="KIND|FACTORY",
    help=f"One of {', '.join(INDEX_KINDS)} (auto picks by size and budget), or a "
    "FAISS factory string such as 'IVF256,PQ16'.",
)
@click.option(
    "--memory-budget",
    metavar="SIZE",
    help="Most memory the index may take, e.g. 4GB, 512MiB, 1.5G. Default: no bound.",
)
@click.option(
    "--target-recall",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.95,
    help="recall@10 that the stored nprobe / efSearch reaches on held-out queries.",
)
@click.option("--seed", type=int, default=0, help="Seed of the training sample and k-means.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index at --out.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              help="ray: add the Parquet parts in Ray tasks and merge them (flat and IVF "
              "indexes; pip install \"embedpipe[ray]\"). Scan and training stay here.")
@click.option("--ray-address", help="With --engine ray: the cluster to join ('auto', "
              "ray://host:10001). Default: start Ray on this machine.")
@click.option("--on-disk", is_flag=True,
              help="Keep an IVF index's inverted lists in a file beside index.faiss "
              "(lists.ivfdata), never in memory: for indexes larger than RAM. With --engine "
              "ray on a cluster, the folder of --out must be shared by the workers.")
@table_columns
@friendly_errors
def build(embeddings: Path, out: Path, index_spec: str, overwrite: bool, columns: dict | None,
          on_disk: bool, **options) -> None:
    """Build an index over the embeddings dataset EMBEDDINGS and write it to --out. Tables
    other tools wrote work too: a Parquet with an id and a vector column, or an .npy
    matrix with --ids."""
    from ..index import build_embeddings, check_destination
    from ..index.ondisk import lists_beside
    from ..tables import Columns

    check_destination(out, overwrite=overwrite)  # before the build, not after it
    with lists_beside(out, on_disk) as lists_dir:
        built = build_embeddings(embeddings, columns=Columns(**columns) if columns else None,
                                 index=index_spec, lists_dir=lists_dir, **options)
        built.save(out, overwrite=overwrite)
    info = built.info
    click.echo(f"built {info.factory} over {info.count:,} x {info.dim} ({info.metric}) -> {out}")
    for key, value in _build_lines(info).items():
        click.echo(f"{key:>8}: {value}")


@index.command("update", short_help="Add, remove and replace rows without a rebuild.")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("embeddings", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--retrain-if-below",
    type=click.FloatRange(0, 1, min_open=True),
    help="Advise a rebuild when recall@k after the update falls below this. Default: the "
    "target recall the index was tuned to (or 0.02 below the build's recall, if that fell short).",
)
@click.option("--seed", type=int, default=0, help="Seed of the held-out recall queries.")
@output_format
@table_columns
@friendly_errors
def update(index_dir: Path, embeddings: Path, fmt: str, columns: dict | None, **options) -> None:
    """Update the index at INDEX_DIR to the embeddings dataset EMBEDDINGS as it is now: add
    rows new since the build, remove rows no longer there, replace rows whose vector changed,
    keeping the trained quantisers. The embeddings must be made like the index's (backbone,
    weights, layer, preprocessing). Recall is measured again afterwards; a warning says when
    it has drifted below --retrain-if-below and the index should be rebuilt."""
    from ..index import update_embeddings
    from ..tables import Columns

    _, report = update_embeddings(
        index_dir, embeddings, columns=Columns(**columns) if columns else None, **options
    )
    if fmt == "json":
        echo_json({"path": str(index_dir), **report.to_dict()})
    else:
        click.echo(
            f"updated {index_dir}: {report.added:,} added, {report.removed:,} removed, "
            f"{report.replaced:,} replaced, {report.unchanged:,} unchanged -> {report.count:,} rows "
            f"({report.seconds:.2f} s)"
        )
        if report.recall is None:
            click.echo("  recall: exact search, 1.0")
        else:
            queries = "held-out added rows" if report.held_out else "indexed rows"
            click.echo(
                f"  recall@{report.k}: {report.recall:.4f} over {report.n_queries:,} {queries}"
            )
        if not report.changes_detected:
            click.echo("  note: the index had no row fingerprints, so changed vectors were not "
                       "detected this time; they are recorded now", err=True)
    if report.rebuild_advised:
        click.echo(
            f"warning: recall@{report.k} {report.recall:.4f} is below {report.threshold}: the "
            f"training no longer fits the data; rebuild with `embedpipe index build {embeddings} "
            f"--out {index_dir} --overwrite`",
            err=True,
        )


@index.command("info", short_help="Describe an index and the embeddings it holds.")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@output_format
@friendly_errors
def info(index_dir: Path, fmt: str) -> None:
    """Describe an index: type and why, metric, size, tuning, and the embeddings it holds."""
    from ..index import read_info

    meta = read_info(index_dir)  # index.json only: the FAISS file may be large
    if fmt == "json":
        echo_json({"path": str(index_dir), **meta.to_dict()})
        return
    lines = {
        "path": str(index_dir),
        "index": meta.factory + (f" ({meta.kind})" if meta.kind else ""),
    }
    lines.update(_build_lines(meta))
    lines["metric"] = str(meta.metric) + (
        " (vectors and queries L2-normalised)" if meta.normalized else ""
    )
    lines["vectors"] = f"{meta.count:,} x {meta.dim}"
    lines["training"] = f"{meta.train_rows:,} sampled vectors" if meta.train_rows else "none"
    lines["built"] = f"{meta.built_at}, faiss {meta.faiss_version}"
    if meta.update:
        u = meta.update
        recall = "exact" if u["recall"] is None else f"recall@{u['k']} {u['recall']:.3f}"
        lines["last update"] = (f"{u['updated_at']}: +{u['added']:,} -{u['removed']:,} "
                                f"~{u['replaced']:,}, {recall}")
    lines.update(_embeddings_lines(meta.embeddings, meta.embeddings_path))
    for key, value in lines.items():
        click.echo(f"{key:>13}: {value}")


@index.command("eval", short_help="Recall, queries per second and size of an index.")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--queries",
    "n_queries",
    type=click.IntRange(min=1),
    default=1000,
    help="Rows of the index drawn as queries (each excluded from its own results).",
)
@click.option("-k", "k", type=click.IntRange(min=1), default=10, help="Neighbours per query.")
@click.option(
    "--embeddings",
    type=click.Path(exists=True, path_type=Path),
    help="The embeddings the index was built from. Default: the path it recorded.",
)
@click.option(
    "--nprobe",
    type=click.IntRange(min=1),
    help="Evaluate this nprobe (IVF) instead of the tuned one.",
)
@click.option(
    "--ef-search",
    type=click.IntRange(min=1),
    help="Evaluate this efSearch (HNSW) instead of the tuned one.",
)
@click.option("--seed", type=int, default=0, help="Seed of the query draw.")
@output_format
@friendly_errors
def evaluate(index_dir: Path, embeddings: Path | None, fmt: str, **options) -> None:
    """Recall@k against exact search, batch queries per second, and memory of an index."""
    from ..index import Index, eval_embeddings, format_bytes

    report = eval_embeddings(Index.open(index_dir), embeddings, **options)
    if fmt == "json":
        echo_json({"path": str(index_dir), **dataclasses.asdict(report)})
        return
    setting = f"{report.knob}={report.value}" if report.knob else "exact search"
    click.echo(
        f"recall@{report.k}: {report.recall:.4f} over {report.n_queries:,} queries ({setting})"
    )
    click.echo(f"     QPS: {report.qps:,.0f} (one batch of {report.n_queries:,} queries)")
    click.echo(f"  memory: {format_bytes(report.index_bytes)}")


@main.command(short_help="Nearest neighbours of images, ids or embeddings.")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("more", nargs=-1, metavar="[FILE|ID]...")
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="FILE",
    help="Query image(s), embedded as the index's embeddings were; more files may "
    "follow: --image a.jpg b.jpg.",
)
@click.option(
    "--id",
    "ids",
    multiple=True,
    metavar="ID",
    help="Query by an id the index holds (as in the embeddings' id column); repeatable, "
    "or more ids may follow.",
)
@click.option(
    "--embeddings",
    type=click.Path(exists=True, path_type=Path),
    help="Batch search: every row of this embeddings dataset is a query.",
)
@click.option("-k", "k", type=click.IntRange(min=1), default=10, help="Neighbours per query.")
@click.option(
    "--exclude-self",
    is_flag=True,
    help="Drop the result whose id is the query's own (--id, --embeddings).",
)
@click.option(
    "--format",
    "fmt",
    type=enum_choice(ResultFormat),
    help="table, json or parquet (needs --out). Default: from --out's suffix "
    "(.parquet, .json), else table.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results to this file instead of standard output.",
)
@click.option(
    "--nprobe", type=click.IntRange(min=1), help="Override the tuned nprobe (IVF) for this search."
)
@click.option(
    "--ef-search",
    type=click.IntRange(min=1),
    help="Override the tuned efSearch (HNSW) for this search.",
)
@click.option(
    "--gallery",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw each query beside its neighbours into this PNG (QUERY_N suffixes for "
    "several queries).",
)
@click.option(
    "--images-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder the index's ids are relative to, for --gallery. Default: the folder the "
    "embeddings were extracted from.",
)
@table_columns
@friendly_errors
def search(
    index_dir: Path,
    more: tuple[str, ...],
    images: tuple[str, ...],
    ids: tuple[str, ...],
    embeddings: Path | None,
    k: int,
    exclude_self: bool,
    fmt: str | None,
    out: Path | None,
    gallery: Path | None,
    images_root: Path | None,
    columns: dict | None,
    **knobs,
) -> None:
    """The k nearest neighbours in the index at INDEX_DIR of query images (--image), of
    rows it holds (--id), or of a whole embeddings dataset (--embeddings). Queries given
    without an option are image files when they exist, ids of the index otherwise.

    One row per (query, rank): query_id, rank (from 1), id, label, score (similarity for
    cosine and ip, distance for l2). Images that cannot be read are reported on standard
    error and skipped.
    """
    if more and not (images or ids or embeddings):
        images, ids, more = _positional_queries(more)
    given = [
        name
        for name, value in (("--image", images), ("--id", ids), ("--embeddings", embeddings))
        if value
    ]
    if len(given) != 1:
        found = f"got {' and '.join(given)}" if given else "got none"
        raise click.UsageError(f"give exactly one of --image, --id or --embeddings ({found})")
    if more and not (images or ids):
        raise click.UsageError(
            f"unexpected arguments {' '.join(more)}: only --image and --id take several values"
        )
    if exclude_self and images:
        raise click.UsageError(
            "--exclude-self needs --id or --embeddings: an image query has no id in the index"
        )
    fmt = (
        ResultFormat(fmt)
        if fmt
        else _SUFFIX_FORMATS.get(out.suffix.lower() if out else "", ResultFormat.TABLE)
    )
    if fmt is ResultFormat.PARQUET and out is None:
        raise click.UsageError("--format parquet needs --out FILE")

    from ..index import Index, search_embeddings, search_images
    from ..provenance import Provenance

    opened = Index.open(index_dir)
    if images:
        results, failures = search_images(opened, [*images, *more], k, **knobs)
        for failure in failures:
            click.echo(
                f"skipped {failure.query}: {failure.error_type}: {failure.message}", err=True
            )
    elif ids:
        results = opened.search_ids([*ids, *more], k, exclude_self=exclude_self, **knobs)
    else:
        from ..tables import Columns

        results = search_embeddings(opened, embeddings, k, exclude_self=exclude_self,
                                    columns=Columns(**columns) if columns else None, **knobs)
    _write_results(results.to_arrow(), fmt, out)
    if gallery is not None:
        root = images_root or Path(Provenance.from_json(opened.meta).images or "")
        if not root.is_dir():
            raise click.UsageError("--gallery needs --images-root: the index does not record an image folder")
        queries = {q: (Path(q) if images else root / q) for q in [*images, *ids, *more]}
        _write_galleries(results.to_frame(), queries, root, gallery, k=k, opened=opened)


def _positional_queries(values: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[()]]:
    """Queries given without --image/--id: files that exist are images, the rest ids;
    one kind per search."""
    files = tuple(v for v in values if Path(v).is_file())
    if files and len(files) != len(values):
        others = [v for v in values if v not in files]
        raise click.UsageError(
            f"{', '.join(files)} are image files but {', '.join(others)} are not: search images "
            "and ids separately (--image FILE..., --id ID...)"
        )
    return (files, (), ()) if files else ((), values, ())


# --- output ----------------------------------------------------------------------


def _write_galleries(frame, queries: dict[str, Path], root: Path, target: Path, *, k: int, opened) -> None:
    """One PNG per query: the query beside its neighbours, ranks, ids and scores."""
    from ..files import atomic_write_bytes
    from ..gallery import query_galleries
    from ..provenance import Provenance

    galleries = query_galleries(
        frame, queries, root, provenance=Provenance.from_json(opened.meta), k=k,
        score_name=str(opened.info.metric),
        query_labels={q: opened.label_of(q) for q in queries if q in opened},
    )
    for n, g in enumerate(galleries):
        out = target if len(galleries) == 1 else target.with_name(f"{target.stem}_{n}{target.suffix}")
        atomic_write_bytes(g.png, out)
        click.echo(f"gallery: {out}", err=True)


def _build_lines(info) -> dict[str, str]:
    """Why this index, how it was tuned, its size and build time (an ``IndexInfo``)."""
    from ..index import format_bytes

    t = info.tuning
    if t is None:
        tuned = (
            "exact search, nothing to tune"
            if info.kind == "flat"
            else "no search-time parameter to tune"
        )
    else:
        met = "" if t.target_met else f", BELOW the target {t.target_recall}"
        tuned = (
            f"{t.knob}={t.value}: recall@{t.k} {t.recall:.3f} (>= {t.recall_low:.3f} with 95% "
            f"confidence) on {t.n_queries:,} held-out queries, target {t.target_recall}{met}"
        )
    budget = (
        "no budget" if info.memory_budget is None else f"budget {format_bytes(info.memory_budget)}"
    )
    return {
        "why": info.reason,
        "search": tuned,
        "memory": f"{format_bytes(info.index_bytes)} ({budget})",
        "time": f"{info.build_seconds:.2f} s",
    }


def _embeddings_lines(meta: dict, path: str | None) -> dict[str, str]:
    from ..provenance import Provenance

    return {"embeddings": path or "not recorded", **Provenance.from_json(meta).lines()}


def _write_results(table, fmt: ResultFormat, out: Path | None) -> None:
    """Rows of ``table`` (a pyarrow Table of the result columns) as ``fmt``, to ``out`` or
    standard output; one source of values, so the three formats agree."""
    if fmt is ResultFormat.PARQUET:
        import pyarrow.parquet as pq

        _replace(out, lambda tmp: pq.write_table(table, tmp))
    else:
        rows = table.to_pylist()
        text = (
            json.dumps(rows, indent=2) + "\n"
            if fmt is ResultFormat.JSON
            else _table_text(table.column_names, rows)
        )
        if out is None:
            click.echo(text, nl=False)
            return
        _replace(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    queries = len(set(table.column("query_id").to_pylist()))
    click.echo(f"{table.num_rows:,} neighbours of {queries:,} queries -> {out}", err=True)


def _table_text(columns: list[str], rows: list[dict]) -> str:
    def cell(column: str, value) -> str:
        if value is None:
            return "-"
        return f"{value:.6f}" if column == "score" else str(value)

    cells = [[cell(c, row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    right = {"rank", "score"}

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if c in right else v.ljust(w) for c, v, w in zip(columns, values, widths)
        ).rstrip()

    return "\n".join([line(columns), *(line(r) for r in cells)]) + "\n"


def _replace(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through a hidden temporary sibling and a rename: a reader never sees
    half a file, and a failed write leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
