"""Generate docs/cli.md from the click commands themselves.

    python -m embedpipe.cli.reference > docs/cli.md

A test regenerates it and compares, so the reference cannot drift from the code.
"""

from __future__ import annotations

import click

from .app import main


def _commands(group: click.Group, ctx: click.Context, prefix: str):
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        path = f"{prefix} {name}"
        sub = cmd.make_context(name, [], parent=ctx, resilient_parsing=True)
        if isinstance(cmd, click.Group):
            yield path, cmd, sub
            yield from _commands(cmd, sub, path)
        else:
            yield path, cmd, sub


def reference() -> str:
    """The whole CLI as Markdown: one section per command with its usage and options."""
    # contexts made as click makes them for `embedpipe ... --help`, so that the group's
    # context_settings (-h, show_default) apply exactly as on the command line
    root = main.make_context("embedpipe", [], resilient_parsing=True,
                             terminal_width=100, max_content_width=100)
    out = ["# Command-line reference", "",
           "Generated from the commands by `python -m embedpipe.cli.reference`; do not edit.", ""]
    out += ["## embedpipe", "", "```", main.get_help(root).rstrip(), "```", ""]
    for path, cmd, ctx in _commands(main, root, "embedpipe"):
        out += [f"## {path}", "", "```", cmd.get_help(ctx).replace("Usage: " + ctx.command_path, "Usage: " + path).rstrip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    click.echo(reference(), nl=False)
