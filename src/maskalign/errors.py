"""Typed errors raised by maskalign.

Every error names its culprit (a parameter, a graph node, a tensor shape) so
that a user can act on it without reading our source.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "DOCS_URL",
    "MaskAlignError",
    "TraceError",
    "SpecError",
    "SpecMismatchError",
    "MaskError",
    "DataError",
]


DOCS_URL = "https://maskalign.readthedocs.io/en/latest"
"""Root of the documentation site; messages link to pages under it."""


class MaskAlignError(Exception):
    """Base class of every error raised by maskalign.

    The message ends with a link to the troubleshooting entry of the error's
    class (``docs_page``, a page path under :data:`DOCS_URL`).
    """

    docs_page: ClassVar[str] = "troubleshooting/"

    def __str__(self) -> str:
        return f"{super().__str__()}\nSee {DOCS_URL}/{self.docs_page}"


class TraceError(MaskAlignError):
    """A model could not be captured as a ``torch.fx`` graph, or the captured
    graph does not reproduce the eager model on the example inputs."""

    docs_page = "troubleshooting/#traceerror"


class SpecError(MaskAlignError):
    """A permutation spec, or a permutation, is inconsistent with a model."""

    docs_page = "troubleshooting/#specerror"


class SpecMismatchError(SpecError):
    """Two models (or a model and a permutation) do not share one
    architecture: different parameter names or shapes."""

    docs_page = "troubleshooting/#specmismatcherror"


class MaskError(MaskAlignError, ValueError):
    """A pruning mask is malformed: unknown parameter, wrong shape, non-boolean
    values, or a mask that removes a whole layer."""

    docs_page = "troubleshooting/#maskerror"


class DataError(MaskAlignError, ValueError):
    """Data passed to a matcher or an evaluation is empty, malformed, or
    produced non-finite values."""

    docs_page = "troubleshooting/#dataerror"
