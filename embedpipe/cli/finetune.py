"""``embedpipe finetune``."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import Augment, Device, FinetuneConfig, Mode, Optimizer, Schedule
from ._common import enum_choice, friendly_errors
from .app import main


@main.command(short_help="Fine-tune a backbone on labelled images; re-run to resume.")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--backbone", required=True, help="A registered backbone (`embedpipe backbones`).")
@click.option("--weights", default="DEFAULT", help="As for extract; 'none' trains from scratch (use --mode full).")
@click.option("--mode", type=enum_choice(Mode), default=Mode.PARTIAL.value,
              help="head: linear head on frozen features; partial: + the last stage(s); full: everything.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for checkpoint.pt, history.csv/png and finetune.json; re-run to resume.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, help="Passes over the training images.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01,
              help="Peak learning rate of the new head.")
@click.option("--backbone-lr-mult", type=click.FloatRange(min=0), default=0.1,
              help="Learning rate of unfrozen backbone parts, relative to the head's.")
@click.option("--unfreeze", multiple=True, help="Module to train in partial mode (repeatable). Default: the last stage.")
@click.option("--augment", type=enum_choice(Augment), default=Augment.STANDARD.value,
              help="standard: random-resized crop + flip; strong: + colour jitter, TrivialAugment.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per step.")
@click.option("--seed", type=int, default=0, help="Seeds the split, the new heads and the data order.")
@click.option("--optimizer", type=enum_choice(Optimizer), default=Optimizer.SGD.value,
              help="sgd (momentum 0.9) or adamw.")
@click.option("--schedule", type=enum_choice(Schedule), default=Schedule.COSINE.value,
              help="Learning-rate decay after the warm-up.")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0,
              help="Linear warm-up of the learning rate, in epochs.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, help="L2 penalty on the weights.")
@click.option("--label-smoothing", type=click.FloatRange(min=0, max=1), default=0.0,
              help="Cross-entropy label smoothing.")
@click.option("--test-size", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.2,
              help="Held-out fraction, split as `embedpipe probe` splits (same seed -> same rows).")
@click.option("--val-size", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.1,
              help="Fraction of the rest held out to pick the best epoch.")
@click.option("--early-stopping", type=click.IntRange(min=1), help="Stop after N epochs without a better validation accuracy.")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="DataLoader worker processes.")
@click.option("--device", type=enum_choice(Device), default=Device.AUTO.value,
              help="auto: the GPU when torch sees one, else the CPU.")
@click.option("--resize-size", type=click.IntRange(min=1), help="Override the weights' resize (shorter side).")
@click.option("--crop-size", type=click.IntRange(min=1), help="Override the weights' centre crop.")
@click.pass_context
@friendly_errors
def finetune(ctx: click.Context, source: Path, **options) -> None:
    """Fine-tune a backbone on the labelled images under SOURCE; re-run to resume."""
    from ..finetune import finetune as run

    options["unfreeze"] = tuple(options["unfreeze"])
    result = run(FinetuneConfig(source=source, **options), progress=ctx.obj["progress"])
    click.echo(
        f"best epoch {result.best_epoch}: validation accuracy {result.best_val_accuracy:.3f}, "
        f"test accuracy {result.test_accuracy:.3f} ({len(result.classes)} classes, "
        f"{result.skipped_images} unreadable images skipped) -> {result.out}/checkpoint.pt"
    )
