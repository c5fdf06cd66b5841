"""``embedpipe explain filters | featuremaps | saliency``: PNGs of what a backbone sees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from ._common import friendly_errors
from .app import main

_IMAGE = click.Path(exists=True, dir_okay=False, path_type=Path)


#: --backbone, --weights, --seed and --out, shared by every explain command
_MODEL_OPTIONS = (
    click.option(
        "--backbone", required=True, help="A registered name (see `embedpipe backbones`)."
    ),
    click.option(
        "--weights",
        default="DEFAULT",
        help="DEFAULT, a torchvision weights name, 'none' (random init, seeded), or a "
        "checkpoint file.",
    ),
    click.option(
        "--seed",
        type=int,
        default=0,
        help="Seed of the random init for --weights none, and of SmoothGrad's noise.",
    ),
    click.option(
        "--out",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory to write the PNG into (created if missing).",
    ),
)


def _model_options(fn: Callable) -> Callable:
    for option in reversed(_MODEL_OPTIONS):
        fn = option(fn)
    return fn


@main.group(short_help="See what a backbone sees: filters, feature maps, saliency.")
def explain() -> None:
    """See what a backbone sees: first-layer filters, feature maps, saliency maps."""


@explain.command(short_help="The first convolution's filters as an image grid.")
@_model_options
@friendly_errors
def filters(backbone: str, weights: str, seed: int, out: Path) -> None:
    """The first convolution's filters, each min-max scaled, tiled in a grid."""
    from ..explain import write_filters

    click.echo(write_filters(out, backbone=backbone, weights=weights, seed=seed))


@explain.command(short_help="The strongest channels of one layer's activations.")
@click.argument("image", type=_IMAGE)
@click.option(
    "--layer",
    required=True,
    help="Module path in the network, e.g. layer1 (ResNet), features.3 (AlexNet), "
    "blocks.2 (EfficientNet). An unknown name lists the valid ones.",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=16,
    help="How many channels to show, by highest mean activation.",
)
@_model_options
@friendly_errors
def featuremaps(
    image: Path, layer: str, top: int, backbone: str, weights: str, seed: int, out: Path
) -> None:
    """Activations of one layer for IMAGE: the top channels, colour-mapped."""
    from ..explain import write_feature_maps

    click.echo(
        write_feature_maps(
            image, out, backbone=backbone, layer=layer, weights=weights, top=top, seed=seed
        )
    )


@explain.command(short_help="Which pixels move a class logit or a neighbour's similarity.")
@click.argument("image", type=_IMAGE)
@click.option(
    "--target",
    help="class:IDX (the logit of class IDX; needs the classifier head) or "
    "neighbour:OTHER_IMAGE (cosine of the two images' embeddings; any backbone). "
    "Default: the predicted class.",
)
@click.option(
    "--smoothgrad",
    "smoothgrad_samples",
    type=click.IntRange(min=0),
    default=0,
    help="Average the gradient over N noisy copies (SmoothGrad); 0: plain gradient.",
)
@_model_options
@friendly_errors
def saliency(
    image: Path,
    target: str | None,
    smoothgrad_samples: int,
    backbone: str,
    weights: str,
    seed: int,
    out: Path,
) -> None:
    """Gradient saliency of IMAGE: which pixels move the target most."""
    from ..explain import write_saliency

    click.echo(
        write_saliency(
            image,
            out,
            backbone=backbone,
            target=target,
            weights=weights,
            smoothgrad_samples=smoothgrad_samples,
            seed=seed,
        )
    )
