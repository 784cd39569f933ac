"""Evaluating models and permutations.

``lmc``: linear mode connectivity (loss barrier, interpolation, REPAIR,
BatchNorm re-estimation); ``metrics``: ensemble diversity; ``equivalence``:
check that a permutation keeps a model's function.
"""

from .equivalence import EquivalenceReport, check_equivalence
from .lmc import LMCResult, interpolate, lmc_barrier, repair, reset_bn_stats

__all__ = [
    "EquivalenceReport",
    "LMCResult",
    "check_equivalence",
    "interpolate",
    "lmc_barrier",
    "repair",
    "reset_bn_stats",
]
