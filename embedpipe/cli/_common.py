"""Helpers shared by the command modules: Enum-backed choices and error reporting."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import click

from ..config import Choice
from ..errors import EmbedpipeError


def enum_choice(enum: type[Choice]) -> click.Choice:
    """A click.Choice over an Enum's values; the command converts back with ``enum(v)``."""
    return click.Choice(enum.values(), case_sensitive=False)


def friendly_errors(fn: Callable) -> Callable:
    """Turn embedpipe's typed errors into ``Error: ...`` and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EmbedpipeError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def output_format(fn: Callable) -> Callable:
    """``--format table|json`` (``--json`` kept as a hidden alias): one way to choose the
    output of every describing command; the command receives ``fmt``."""

    @functools.wraps(fn)
    def wrapper(*args, fmt: str, as_json: bool, **kwargs):
        return fn(*args, fmt="json" if as_json else fmt, **kwargs)

    wrapper = click.option("--json", "as_json", is_flag=True, hidden=True, help="Same as --format json.")(wrapper)
    return click.option(
        "--format", "fmt", type=click.Choice(["table", "json"]), default="table",
        help="table for people, json for programs.",
    )(wrapper)


def table_columns(fn: Callable) -> Callable:
    """``--id-column``, ``--embedding-column`` and ``--ids``: where the ids and vectors are
    in embeddings another tool wrote (see embedpipe.tables). The command receives
    ``columns``: the options as a dict, or None for embedpipe's own datasets."""

    @functools.wraps(fn)
    def wrapper(*args, id_column: str | None, embedding_column: str | None, ids_file, **kwargs):
        given = {"id": id_column, "embedding": embedding_column, "ids": ids_file}
        columns = {k: v for k, v in given.items() if v is not None} or None
        return fn(*args, columns=columns, **kwargs)

    for option in (
        click.option("--ids", "ids_file", type=click.Path(exists=True, dir_okay=False),
                     help="For an .npy matrix: the Parquet of its ids, in row order."),
        click.option("--embedding-column", help="The vector column of a table another tool wrote "
                     "(default: its one list-of-floats column)."),
        click.option("--id-column", help="The id column of a table another tool wrote (default: id)."),
    ):
        wrapper = option(wrapper)
    return wrapper


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))
