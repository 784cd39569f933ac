"""The permutation spec: which tensor axes of a model share a permutation of
hidden units.

``build_spec`` captures the model as a ``torch.export`` graph (``capture``),
propagates axes through every node with one rule per op (``rules``, over the
atoms of ``atoms`` and the axis trees of ``axes``), and joins axes that must
be permuted together by union-find into :class:`PermutationSpec` groups;
axes no rule can prove safe are frozen.
"""

from .permutation_spec import (
    ActivationPoint,
    FrozenAxis,
    Group,
    PermutationSpec,
    build_spec,
    module_types,
    storage_sharing,
)

__all__ = ["ActivationPoint", "FrozenAxis", "Group", "PermutationSpec", "build_spec", "module_types", "storage_sharing"]
