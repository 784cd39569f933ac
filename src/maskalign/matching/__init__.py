"""Finding the permutation that aligns model A to model B.

Activation matching (``activation``: correlate hidden units on data) and
weight matching (``weight``: Git Re-Basin's data-free objective), both solved
as a linear assignment problem (LAP) per group (``lap``) by coordinate ascent
over the groups of a :class:`~maskalign.spec.PermutationSpec`.
"""

from .activation import DEFAULT_POINTS, DEFAULT_STREAM_POINTS, POINTS, STREAM_POINTS, match_activations
from .weight import match_weights

__all__ = ["DEFAULT_POINTS", "DEFAULT_STREAM_POINTS", "POINTS", "STREAM_POINTS", "match_activations", "match_weights"]
