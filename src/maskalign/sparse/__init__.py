"""Masks and sparse training.

``masks``: masks as dicts of bool tensors (magnitude pruning, random masks,
sparsity reports); ``enforce``: sparse training in which masked weights stay
exactly zero (``enforce_masks``); ``imp``: iterative magnitude pruning;
``prune_interop``: to and from ``torch.nn.utils.prune``.
"""

from .enforce import MaskHandle, assert_masked, enforce_masks
from .imp import IMPResult, IMPRound, imp_schedule, iterative_magnitude_pruning
from .masks import apply_masks, global_magnitude_prune, random_masks_like, sparsity, validate_masks
from .prune_interop import masks_from_prune, state_dict_from_prune, to_prune

__all__ = [
    "IMPResult",
    "IMPRound",
    "MaskHandle",
    "apply_masks",
    "assert_masked",
    "enforce_masks",
    "global_magnitude_prune",
    "imp_schedule",
    "iterative_magnitude_pruning",
    "masks_from_prune",
    "random_masks_like",
    "sparsity",
    "state_dict_from_prune",
    "to_prune",
    "validate_masks",
]
