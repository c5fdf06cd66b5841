"""``python -m embedpipe`` is the ``embedpipe`` command."""

from .cli import main

main()
