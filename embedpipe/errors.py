"""Typed errors raised by embedpipe.

Every error subclasses :class:`EmbedpipeError` and one of the builtin types a caller
would naturally catch (``ValueError`` for bad input, ``KeyError`` for unknown names,
``RuntimeError`` for an environment that cannot do what was asked). Messages name the
offending value, list the valid choices where there are any, and hint at the fix.

This module imports nothing from the package, so every layer may raise these.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` Did you mean a, b?`` for the choices closest to ``name``, or ``""``: the hint
    every unknown-name error ends with."""
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


class EmbedpipeError(Exception):
    """Base class of every error embedpipe raises on purpose."""


class UnknownBackboneError(EmbedpipeError, KeyError):
    """A backbone name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateBackboneError(EmbedpipeError, ValueError):
    """Two registrations under the same name."""


class WeightsError(EmbedpipeError, ValueError):
    """A ``--weights`` value that cannot be used with the chosen backbone."""


class WeightsNotFoundError(EmbedpipeError, RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable."""


class SourceError(EmbedpipeError, ValueError):
    """An image folder or manifest that cannot be read as a source of images."""


class ImageDecodeError(EmbedpipeError, ValueError):
    """An image that cannot be embedded; ``error_type`` names the reason (see
    ``decode.ErrorType``)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(error_type, message)
        self.error_type = str(error_type)
        self.message = message

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


class StoreError(EmbedpipeError, ValueError):
    """An embeddings dataset whose files are missing, corrupt or inconsistent."""


class MetadataMismatchError(StoreError):
    """Embeddings made by something other than what the caller expects."""


class ProvenanceError(EmbedpipeError, ValueError):
    """An operation that needs to know what made the embeddings, on embeddings that do
    not say (another tool wrote them)."""


class OutputLockedError(EmbedpipeError, RuntimeError):
    """Another job is writing the same output directory."""


class TooManyErrorsError(EmbedpipeError, RuntimeError):
    """An extraction recorded more unreadable images than ``max_errors`` allows."""


class DeviceError(EmbedpipeError, RuntimeError):
    """A device or precision that this machine cannot provide."""


# --- index (FAISS) -------------------------------------------------------------------


class IndexSpecError(EmbedpipeError, ValueError):
    """A metric, index kind or FAISS factory string that cannot be used."""


class MemoryBudgetError(EmbedpipeError, ValueError):
    """A memory budget that cannot be parsed, or that no index of the requested kind fits."""


class IndexInputError(EmbedpipeError, ValueError):
    """Vectors, ids or search arguments that cannot be indexed or searched as given."""


class DimensionMismatchError(IndexInputError):
    """Query vectors whose dimension differs from the index's."""


class QueryImagesError(IndexInputError):
    """None of the query images could be embedded; ``failures`` says why for each
    (``QueryFailure(query, error_type, message)``)."""

    def __init__(self, message: str, failures: list) -> None:
        super().__init__(message)
        self.failures = failures


class UnknownIdError(EmbedpipeError, KeyError):
    """An id asked for by ``search --id`` that the index does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class IndexFileError(EmbedpipeError, ValueError):
    """An index directory that is missing, incomplete, or from an unsupported format."""


# --- probe / report ------------------------------------------------------------------


class ProbeInputError(EmbedpipeError, ValueError):
    """Embeddings that cannot be probed as given: shapes, names, non-finite values."""


class MissingLabelsError(ProbeInputError):
    """Rows whose label is missing; a probe needs every row labelled."""


class IdAlignmentError(ProbeInputError):
    """Embeddings of different backbones that do not cover the same ids with the same labels."""


class SplitError(ProbeInputError):
    """Too few rows per class for the requested train / validation / test split."""


class ProbeConfigError(EmbedpipeError, ValueError):
    """A probe option outside its valid range."""


class ReportError(EmbedpipeError, ValueError):
    """A report directory without a readable ``results.json`` of a supported schema."""


# --- explain -------------------------------------------------------------------------


class ExplainError(EmbedpipeError, ValueError):
    """A visualisation that cannot be made as asked: a layer that is not a feature map, a
    class index out of range, a class target on a network without a classifier head."""


class UnknownLayerError(EmbedpipeError, KeyError):
    """A layer name that is not a module path of the network."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# --- finetune / pipelines ----------------------------------------------------------


class FinetuneError(EmbedpipeError, ValueError):
    """A fine-tuning job that cannot run as configured."""


class PipelineError(EmbedpipeError, ValueError):
    """A pipeline file that is not valid, or a step that failed."""


class MissingDependencyError(EmbedpipeError, ImportError):
    """An optional extra (``embedpipe[ray]``, ``embedpipe[serve]``) that is not installed."""


class CurationInputError(EmbedpipeError, ValueError):
    """Vectors, labels, thresholds or datasets that curation cannot work on as given."""
