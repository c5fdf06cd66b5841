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


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))
