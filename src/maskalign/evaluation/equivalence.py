"""Check that a permutation keeps a model's function, and find the group that
breaks it when it does not."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .._utils.inputs import normalize_inputs
from .._utils.modes import run_in_mode
from ..permutation import Permutation, apply_permutation

__all__ = ["EquivalenceReport", "check_equivalence"]


@dataclass(frozen=True)
class EquivalenceReport:
    """Outcome of :func:`check_equivalence`; true when the outputs agree.

    Attributes:
        ok: whether ``max_rel`` is within the tolerance.
        max_abs: the largest absolute difference between the outputs of the
            model and of the permuted model (in the outputs' units).
        max_rel: ``max_abs`` divided by the largest absolute reference
            output (unitless).
        culprit: on failure, the first group (in spec order) whose
            permutation, together with the groups before it, changes the
            outputs; None when ``ok`` (or the spec has no group).
    """

    ok: bool
    max_abs: float
    max_rel: float
    culprit: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def _outputs(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], train: bool) -> list[Tensor]:
    out = run_in_mode(model, args, kwargs, train=train, seed=0)  # the same random draws for both models
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, Tensor) and leaf.is_floating_point()]


def _difference(reference: list[Tensor], other: list[Tensor]) -> tuple[float, float]:
    max_abs = max((float((r - o).abs().max()) for r, o in zip(reference, other) if r.numel()), default=0.0)
    scale = max((float(r.abs().max()) for r in reference if r.numel()), default=0.0)
    return max_abs, max_abs / scale if scale > 0 else max_abs


def check_equivalence(
    model: nn.Module,
    perm: Permutation,
    example_inputs: Any,
    kwargs: Mapping[str, Any] | None = None,
    *,
    rtol: float | None = None,
    train: bool = False,
) -> EquivalenceReport:
    """Compare ``model`` and ``apply_permutation(model, perm)`` on the inputs.

    Only the floating-point tensors of the outputs are compared, and the
    forward passes run without gradients, leaving the model's flags, buffers
    and the random number generator as they were.

    Source: the permutation symmetry of hidden units (Hecht-Nielsen 1990;
    Ainsworth et al., "Git Re-Basin", ICLR 2023, Sec. 2): a permuted network
    computes the same function.

    Args:
        model: the model (not modified).
        perm: a permutation of a spec of ``model``.
        example_inputs: positional inputs of forward.
        kwargs: keyword inputs of forward.
        rtol: bound on ``max_rel``; default ``1e-10`` for float64 outputs and
            ``1e-4`` otherwise.
        train: compare in train mode (batch statistics in BatchNorm, train-only
            branches) instead of eval mode. Neither model's buffers or flags
            change. Dropout draws the same random numbers for both models but
            at unpermuted positions, so set dropout rates to 0 to compare.

    Returns:
        An :class:`EquivalenceReport`; when it fails, groups are bisected
        (``O(log groups)`` forward passes) to name the culprit.

    Raises:
        ArgumentTypeError: ``perm`` is not a :class:`~maskalign.Permutation`
            (see :func:`~maskalign.apply_permutation`).
        SpecMismatchError: the model's tensors or module classes differ from
            the permutation's.
        SpecError: a cache tensor appeared after the spec was built, or
            tensors share storage in a way the permutation cannot keep.
    """
    args = normalize_inputs(example_inputs)
    kwargs = dict(kwargs or {})
    reference = _outputs(model, args, kwargs, train)
    if rtol is None:
        rtol = 1e-10 if all(r.dtype == torch.float64 for r in reference) else 1e-4

    def breaks(p: Permutation) -> tuple[bool, float, float]:
        max_abs, max_rel = _difference(reference, _outputs(apply_permutation(model, p), args, kwargs, train))
        return max_rel > rtol, max_abs, max_rel

    failed, max_abs, max_rel = breaks(perm)
    if not failed:
        return EquivalenceReport(True, max_abs, max_rel)
    names = list(perm.spec.groups)
    lo, hi = 0, len(names)  # the prefix names[:hi] breaks, names[:lo] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        prefix = Permutation(perm.spec, {g: perm[g] for g in names[:mid]})
        if breaks(prefix)[0]:
            hi = mid
        else:
            lo = mid
    return EquivalenceReport(False, max_abs, max_rel, names[hi - 1] if names else None)
