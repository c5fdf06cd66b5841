"""``embedpipe run PIPELINE.toml``."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import friendly_errors
from .app import main


@main.command(short_help="Run a pipeline file: the steps not up to date, in order.")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Show what would run and what is up to date.")
@click.pass_context
@friendly_errors
def run(ctx: click.Context, pipeline: Path, dry_run: bool) -> None:
    """Run a pipeline file: every step that is not up to date, in dependency order."""
    from ..pipeline import StepState, StepStatus, run_pipeline

    final = {StepState.UP_TO_DATE: "skip", StepState.DONE: "done", StepState.FAILED: "FAIL"}

    def show(s: StepStatus) -> None:
        verb = final.get(s.state, "would run" if dry_run else "run")
        reason = "" if s.state in final else f" ({s.state})"
        click.echo(f"{verb:>9}  {s.step.kind:<8} {s.step.name}{reason}{': ' + s.detail if s.detail else ''}")

    run_pipeline(pipeline, dry_run=dry_run, progress=ctx.obj["progress"], on_status=show)
