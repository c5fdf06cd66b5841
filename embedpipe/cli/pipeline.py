"""``embedpipe run PIPELINE.toml``."""

from __future__ import annotations

from pathlib import Path

import click

from .app import main
from ._common import friendly_errors


@main.command()
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Show what would run and what is up to date.")
@click.pass_context
@friendly_errors
def run(ctx: click.Context, pipeline: Path, dry_run: bool) -> None:
    """Run a pipeline file: every step that is not up to date, in dependency order."""
    from ..pipeline import StepStatus, run_pipeline

    def show(s: StepStatus) -> None:
        verb = {"up to date": "skip", "done": "done", "failed": "FAIL"}.get(s.state, "would run" if dry_run else "run")
        reason = "" if s.state in ("up to date", "done", "failed") else f" ({s.state})"
        click.echo(f"{verb:>9}  {s.step.kind:<8} {s.step.name}{reason}{': ' + s.detail if s.detail else ''}")

    run_pipeline(pipeline, dry_run=dry_run, progress=ctx.obj["progress"], on_status=show)
