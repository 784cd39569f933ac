"""maskalign: permutation-aligned lottery-ticket masks.

Align a winning-ticket mask found on model A to a new initialisation B through
the permutation symmetry of hidden units (Adnan, Jain, Sharma, Krishnan,
Ioannou, ICML 2025; Ainsworth et al., "Git Re-Basin", ICLR 2023)::

    import maskalign as ma
    spec = ma.build_spec(model_a, example_inputs)
    perm = ma.match_activations(model_a, model_b, loader, spec=spec)
    mask_b = ma.permute_mask(mask_a, perm)
"""

from . import metrics
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    ArgumentValueError,
    ConfigError,
    DataError,
    MaskAlignError,
    MaskError,
    MissingFileError,
    SpecError,
    SpecMismatchError,
    TraceError,
)
from .evaluation.equivalence import EquivalenceReport, check_equivalence
from .evaluation.lmc import LMCResult, interpolate, lmc_barrier, repair, reset_bn_stats
from .matching.activation import match_activations
from .matching.transfer import transfer_mask
from .matching.weight import match_weights
from .permutation import (
    Permutation,
    apply_permutation,
    check_same_architecture,
    permute_mask,
    permute_state_dict,
    random_permutation,
)
from .sparse.enforce import MaskHandle, assert_masked, enforce_masks
from .sparse.imp import IMPResult, IMPRound, imp_schedule, iterative_magnitude_pruning
from .sparse.masks import apply_masks, global_magnitude_prune, random_masks_like, sparsity, validate_masks
from .sparse.prune_interop import masks_from_prune, state_dict_from_prune, to_prune
from .spec.permutation_spec import PermutationSpec, build_spec
from .spec.rules import RuleContext, register_rule

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ArgumentValueError",
    "ConfigError",
    "DataError",
    "EquivalenceReport",
    "IMPResult",
    "IMPRound",
    "LMCResult",
    "MaskAlignError",
    "MaskError",
    "MaskHandle",
    "MissingFileError",
    "Permutation",
    "PermutationSpec",
    "RuleContext",
    "SpecError",
    "SpecMismatchError",
    "TraceError",
    "apply_masks",
    "apply_permutation",
    "assert_masked",
    "build_spec",
    "check_same_architecture",
    "check_equivalence",
    "enforce_masks",
    "global_magnitude_prune",
    "imp_schedule",
    "interpolate",
    "iterative_magnitude_pruning",
    "lmc_barrier",
    "match_activations",
    "masks_from_prune",
    "match_weights",
    "metrics",
    "permute_mask",
    "permute_state_dict",
    "random_masks_like",
    "random_permutation",
    "register_rule",
    "repair",
    "reset_bn_stats",
    "sparsity",
    "state_dict_from_prune",
    "to_prune",
    "transfer_mask",
    "validate_masks",
]
