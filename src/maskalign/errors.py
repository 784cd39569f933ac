"""Typed errors raised by maskalign.

Every error names its culprit (a parameter, a graph node, a tensor shape) so
that a user can act on it without reading our source.
"""

from __future__ import annotations

__all__ = [
    "MaskAlignError",
    "TraceError",
    "SpecError",
    "SpecMismatchError",
    "MaskError",
    "DataError",
]


class MaskAlignError(Exception):
    """Base class of every error raised by maskalign."""


class TraceError(MaskAlignError):
    """A model could not be captured as a ``torch.fx`` graph, or the captured
    graph does not reproduce the eager model on the example inputs."""


class SpecError(MaskAlignError):
    """A permutation spec, or a permutation, is inconsistent with a model."""


class SpecMismatchError(SpecError):
    """Two models (or a model and a permutation) do not share one
    architecture: different parameter names or shapes."""


class MaskError(MaskAlignError, ValueError):
    """A pruning mask is malformed: unknown parameter, wrong shape, non-boolean
    values, or a mask that removes a whole layer."""


class DataError(MaskAlignError, ValueError):
    """Data passed to a matcher or an evaluation is empty, malformed, or
    produced non-finite values."""
