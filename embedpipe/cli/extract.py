"""``embedpipe backbones``, ``embedpipe extract`` and ``embedpipe info``."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import (
    DEFAULT_MAX_PIXELS,
    DecodeMode,
    Device,
    EmbeddingDtype,
    Engine,
    ExtractConfig,
    Layer,
    Precision,
)
from ..uris import is_uri
from ._common import echo_json, enum_choice, friendly_errors, output_format
from .app import main


@main.command(short_help="List backbones: dims, input size, weights, what is offline.")
@click.option("--source", type=click.Choice(["registry", "timm"]), default="registry",
              help="registry: the built-in and plugin backbones; timm: timm's models (needs timm).")
@click.option("--filter", "pattern", help="Only names matching this glob, e.g. '*efficientnet*'.")
@output_format
@friendly_errors
def backbones(source: str, pattern: str | None, fmt: str) -> None:
    """List backbones: family, embedding dims, input size, known weights, and which of
    those are on this machine already (offline)."""
    import fnmatch

    from ..backbones import available_weights, get_spec, list_backbones

    if source == "timm":
        from ..backbones.timm import list_timm

        specs = [get_spec(n) for n in list_timm(pattern.removeprefix("timm/") if pattern else "*")]
    else:
        specs = [s for s in list_backbones() if not pattern or fnmatch.fnmatch(s.name, pattern)]
    if not specs:
        raise click.ClickException(f"no {source} backbone matches {pattern!r}")
    rows = [
        {
            "name": s.name,
            "family": s.family,
            "gap": s.dims[Layer.GAP],
            "penultimate": s.dims.get(Layer.PENULTIMATE, "-"),
            "input": s.input_size,
            "weights": ",".join(w for w in s.weight_names() if w != "DEFAULT" or s.weights_enum is None) or "-",
            "offline": ",".join(available_weights(s)) or "-",
        }
        for s in specs
    ]
    if fmt == "json":
        echo_json(rows)
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


class SourceParam(click.ParamType):
    """An existing local folder, manifest, tar shard or image table; a URI (s3://, gs://,
    hdfs://, file://); or a pattern of shards or tables ('shards/{00000..00099}.tar',
    'data/train-*.parquet'), expanded by the source itself."""

    name = "source"

    def convert(self, value, param, ctx):
        if is_uri(value) or any(c in str(value) for c in "*?[{"):
            return value
        return click.Path(exists=True, path_type=Path).convert(value, param, ctx)


@main.command(short_help="Embed the images of a folder, manifest or URI into Parquet.")
@click.argument("source", type=SourceParam())
@click.option("--backbone", required=True, help="A registered name (see `embedpipe backbones`).")
@click.option(
    "--weights",
    default="DEFAULT",
    help="DEFAULT, a torchvision weights name (IMAGENET1K_V2), 'none' (random init, seeded), "
    "or a checkpoint file.",
)
@click.option("--weights-key-map",
              help="Rename checkpoint keys: a built-in map (lukemelas-efficientnet-lite0, "
              "strip-module), 'old=new' prefixes, or package.module:function.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--image-column", help="SOURCE is Parquet image tables: the column of encoded images "
              "(bytes, or the Hugging Face {bytes, path} struct).")
@click.option("--id-column", help="With --image-column: the column of ids (default: file and row number).")
@click.option("--label-column", help="With --image-column: the column of labels.")
@click.option("--layer", default=Layer.GAP.value, metavar="gap|penultimate|stages|LAYER,...",
              help="gap: global average pool of the last feature map; penultimate: the input of the "
              "final classifier layer (fc7 for AlexNet/VGG); stages: every stage's pooled output "
              "from one forward pass, a dataset each under --out (or stage modules, e.g. "
              "layer2,layer3).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Default: 8 on CPU, 128 on GPU.")
@click.option("--device", type=enum_choice(Device), default=Device.AUTO.value,
              help="auto: the GPU when torch sees one, else the CPU.")
@click.option("--precision", type=enum_choice(Precision), default=Precision.FP32.value,
              help="fp32 reproduces torchvision exactly; bf16 is ~3x faster on AMX CPUs.")
@click.option("--workers", type=click.IntRange(min=1), help="Decode processes. Default: from the cores.")
@click.option("--decode", type=enum_choice(DecodeMode), default=DecodeMode.FULL.value,
              help="full: decode every pixel (exact); draft: JPEG DCT-domain downscale (faster, "
              "not exact); device: JPEGs decoded on the GPU.")
@click.option("--embedding-dtype", type=enum_choice(EmbeddingDtype), default=EmbeddingDtype.FLOAT32.value,
              help="How vectors are stored; float16 halves the files.")
@click.option("--normalize/--no-normalize", default=False, help="L2-normalise embeddings.")
@click.option("--resize-size", type=click.IntRange(min=1), help="Override the weights' resize size.")
@click.option("--crop-size", type=click.IntRange(min=1), help="Override the weights' crop size.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS,
              help="Refuse larger images before decoding (decompression bombs).")
@click.option("--decode-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              help="Seconds one image may take to decode.")
@click.option("--max-errors", type=click.FloatRange(min=0),
              help="Fail once more images than this are unreadable; below 1, a fraction of the images.")
@click.option("--overwrite", is_flag=True, help="Replace embeddings in --out made differently.")
@click.option("--seed", type=int, default=0, help="Seed of the random init for --weights none.")
@click.option("--part-rows", type=click.IntRange(min=1),
              help="Rows per Parquet part. Default: about 128 MiB of vectors, at most 65,536.")
@click.option("--engine", type=enum_choice(Engine), default=Engine.LOCAL.value,
              help="local: this machine; ray: Ray Data, on a cluster or in-process (pip install "
              "'embedpipe[ray]').")
@click.option("--ray-address", help="With --engine ray: the cluster to join ('auto', ray://host:10001). "
              "Default: $RAY_ADDRESS, else a Ray instance in this process.")
@click.option("--concurrency", type=click.IntRange(min=1),
              help="With --engine ray: model actors. Default: one per GPU, or one on CPUs.")
@click.option("--num-gpus-per-worker", type=click.FloatRange(min=0), default=0.0,
              help="With --engine ray: GPUs per model actor (0: CPU actors).")
@click.pass_context
@friendly_errors
def extract(ctx: click.Context, source: Path | str, **options) -> None:
    """Embed every image under SOURCE into --out: a folder, a CSV/Parquet manifest, a
    folder URI such as s3://bucket/images, WebDataset tar shards ('shards/{00000..00099}.tar'
    or a folder of .tar files), or Parquet image tables (with --image-column).

    Re-running the same command resumes an interrupted run and embeds only new or
    changed images. With --engine ray the same dataset is written by Ray Data actors.
    """
    layer = options.pop("layer")
    if layer.lower() in Layer.values():
        options["layer"] = layer.lower()
    else:
        options["stages"] = tuple(part.strip() for part in layer.split(",") if part.strip())
    try:
        config = ExtractConfig(source=source, **options)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    from ..extraction import extract as run_extract

    summary = run_extract(config, progress=ctx.obj["progress"])
    click.echo(summary.line())


@main.command(short_help="Describe an embeddings dataset (or list its errors).")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--errors", "list_errors", is_flag=True,
              help="List the images that could not be embedded (id, error type, message).")
@output_format
@friendly_errors
def info(path: Path, fmt: str, list_errors: bool) -> None:
    """Describe an embeddings dataset: rows, dim, backbone, weights, labels, files."""
    from ..store import dataset_info, read_errors

    if list_errors:
        errors = read_errors(path)[["id", "error_type", "message"]]
        if fmt == "json":
            echo_json(errors.to_dict(orient="records"))
        else:
            for row in errors.itertuples():
                click.echo(f"{row.id}\t{row.error_type}\t{row.message}")
        return
    d = dataset_info(path)
    if fmt == "json":
        echo_json(d)
        return
    from ..provenance import Provenance

    lines = {
        "path": d["path"],
        "rows": d["rows"],
        "dim": d.get("dim", "?"),
        **Provenance.from_json(d).lines(),
        "labels": ", ".join(f"{k}: {v}" for k, v in sorted(d["labels"].items())) or "none",
        "errors": f"{d['errors']} " + str(d["errors_by_type"] or ""),
        "files": f"{len(d['files'])} parts",
    }
    for k, v in lines.items():
        click.echo(f"{k:>13}: {v}")
