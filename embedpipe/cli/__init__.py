"""The ``embedpipe`` command line: a thin click shell over the Python API.

Each command module parses options, builds a config, calls the API and prints; none
holds logic of its own. Command modules register themselves on :data:`main`.
"""

from __future__ import annotations

import logging

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="embedpipe")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; warnings and errors only.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Embeddings from pretrained CNNs: extract them, search them, measure transfer."""
    level = logging.WARNING if quiet or not verbose else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["progress"] = not quiet


from . import extract as _extract  # noqa: E402,F401  (registers its commands)
from . import index as _index  # noqa: E402,F401
from . import finetune as _finetune  # noqa: E402,F401
from . import probe as _probe  # noqa: E402,F401
from . import explain as _explain  # noqa: E402,F401
from . import pipeline as _pipeline  # noqa: E402,F401
from . import serve as _serve  # noqa: E402,F401
