"""The one error type of the curation wing.

It lives here rather than in :mod:`embedpipe.errors` only because that file had another
owner when curation landed; it subclasses :class:`~embedpipe.errors.EmbedpipeError`, so
the CLI reports it as ``Error: ...`` like every other typed error.
"""

from __future__ import annotations

from ..errors import EmbedpipeError


class CurationInputError(EmbedpipeError, ValueError):
    """Vectors, labels, thresholds or datasets that curation cannot work on as given."""
