"""Mask-aware matching: the ``mask=`` argument of :func:`~maskalign.match_activations`
and :func:`~maskalign.match_weights` (issue 17, "Mask-aware matching").

A lottery-ticket mask of model A decides which of A's weights survive; a
hidden unit whose incoming and outgoing weights are mostly pruned carries
little of the sparse network, however well its dense activations correlate
with a unit of B. This module checks the mask a matcher is given and turns it
into what the matchers use: per group, the surviving mass of each of A's
units (:func:`unit_masses`), normalised to weights of mean 1
(:func:`unit_weights`), and their product over the groups of a joint axis
(:func:`position_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, MaskError
from ..permutation import Permutation
from ..sparse.masks import _check_mask_set, _unknown_name_message
from ..spec.axes import AxisTree, groups_of, tree_size, unit_positions
from ..spec.permutation_spec import PermutationSpec

__all__ = ["check_mask", "check_mask_type", "position_weights", "unit_masses", "unit_weights"]


def check_mask_type(mask: object) -> Mapping[str, Tensor]:
    """``mask`` if it is a mapping (a mask set), checked before the spec is
    known; its keys and values are checked by :func:`check_mask`.

    Args:
        mask: what was passed as ``mask=``.

    Returns:
        ``mask`` itself.

    Raises:
        ArgumentTypeError: ``mask`` is a :class:`~maskalign.Permutation` (a
            mapping of groups, not of parameters), a model, a list of pairs
            or anything else that is not a mapping.
    """
    if isinstance(mask, Permutation):
        raise ArgumentTypeError(
            "Argument 'mask' is a Permutation, not a mask set; pass model_a's pruning mask (parameter name -> "
            "torch.bool tensor, e.g. from ma.iterative_magnitude_pruning)."
        )
    return _check_mask_set(mask, "mask")


def check_mask(mask: object, spec: PermutationSpec) -> dict[str, Tensor]:
    """``mask`` checked against ``spec`` and keyed by the spec's tensor names.

    Args:
        mask: parameter name -> mask of model A, a ``torch.bool`` tensor or a
            tensor of 0s and 1s of the parameter's shape (the format of
            :func:`~maskalign.permute_mask`, which also takes the logical
            names of a model in ``torch.nn.utils.prune`` form); not modified.
        spec: the permutation spec of the models being matched.

    Returns:
        A new dict, the spec's tensor name (a logical name resolved to its
        ``*_orig`` parameter) -> ``torch.bool`` mask (``mask != 0``) on the
        device it was given on.

    Raises:
        ArgumentTypeError: ``mask`` is not a mapping (``None`` is handled by
            the caller; a list of pairs, a model) or is a
            :class:`~maskalign.Permutation`.
        MaskError: naming the key: a key that is not a str, not a parameter
            of the spec (close names suggested) or a buffer; a value that is
            not a dense tensor; a shape other than the parameter's (both
            given); or values other than 0 and 1 (or ``False``/``True``).
    """
    checked = check_mask_type(mask)
    known = [n for n in spec.axes if n in spec.parameters] + list(spec.logical)
    out: dict[str, Tensor] = {}
    for name, value in checked.items():
        if not isinstance(name, str):
            raise MaskError(
                f"Mask key {name!r} is a {type(name).__name__}, not a parameter name; key the mask by the "
                "names (str) of model_a.named_parameters()."
            )
        actual = spec.logical.get(name, name)
        if actual not in spec.parameters:
            if actual in spec.shapes:
                raise MaskError(
                    f"Mask key {name!r} is a buffer, not a parameter, of model_a; masks cover parameters only: drop it."
                )
            raise MaskError(_unknown_name_message(name, known, "Mask key"))
        if not isinstance(value, Tensor):
            raise MaskError(
                f"Mask for {name!r} is a {type(value).__name__}, expected a torch.bool tensor; convert it with "
                "torch.as_tensor(mask, dtype=torch.bool)."
            )
        if value.layout != torch.strided:
            raise MaskError(
                f"Mask for {name!r} is a {value.layout} tensor; pass a dense torch.bool tensor (mask.to_dense())."
            )
        shape = spec.shapes[actual]
        if tuple(value.shape) != tuple(shape):
            raise MaskError(
                f"Mask for {name!r} has shape {tuple(value.shape)} but the parameter has shape {tuple(shape)}; "
                "pass a mask of the parameter's shape."
            )
        if value.dtype != torch.bool:
            plain = value.detach()
            bad = ~((plain == 0) | (plain == 1))
            if bool(bad.any()):
                example = plain[bad].reshape(-1)[0].item()
                raise MaskError(
                    f"Mask for {name!r} holds {int(bad.sum())} value(s) other than 0 and 1 (e.g. {example!r}); "
                    "pass a torch.bool mask or a tensor of 0s and 1s (a score is not a mask: threshold it)."
                )
            value = plain != 0
        out[actual] = value.detach()
    return out


def unit_masses(spec: PermutationSpec, tensors: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Surviving mass of each of A's units, per group.

    For group ``g`` and unit ``i``: ``M_i = sum_t sum |W_A[t] * m_A[t]|``,
    the outer sum over the masked parameters ``t`` and the axes of ``t``
    that carry ``g`` (a hidden unit's row of the layer before and its column
    of the layer after), the inner over the entries of ``t`` that lie at
    unit ``i``'s positions on that axis (a channel's kernel slice, a head's
    ``head_dim`` rows, every slice of a concatenated axis that holds it).
    Pruned entries count 0 even where the weight is not finite.

    Args:
        spec: the permutation spec.
        tensors: A's tensors by the spec's names (``model_a.state_dict()``).
        mask: the checked mask (:func:`check_mask`): spec name -> bool.

    Returns:
        group name -> ``(n,)`` float64 masses on the CPU, only for the groups
        that some masked parameter carries.
    """
    out: dict[str, Tensor] = {}
    for name, keep in mask.items():
        weight = tensors[name].detach()
        magnitude = torch.where(keep.to(weight.device), weight.abs().double(), 0.0)
        for d, tree in enumerate(spec.axes.get(name, ())):
            groups = list(dict.fromkeys(groups_of(tree)))
            if not groups:
                continue
            others = [k for k in range(magnitude.dim()) if k != d]
            per_position = (magnitude.sum(dim=others) if others else magnitude).cpu()
            for g in groups:
                positions = unit_positions(tree, g)
                if positions is None:  # (unreachable: g was read from this tree)
                    continue
                unit = per_position[positions].sum(1)
                out[g] = out[g] + unit if g in out else unit
    return out


def unit_weights(masses: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``w_i = M_i / mean_j M_j`` per group (mean 1); a group whose masses
    are all 0 (every weight it carries pruned) gets ``w = 1`` (no
    information to weight by).

    Args:
        masses: group name -> ``(n,)`` float64 masses (:func:`unit_masses`).

    Returns:
        group name -> ``(n,)`` float64 weights, every one ``>= 0``.
    """
    out: dict[str, Tensor] = {}
    for g, mass in masses.items():
        mean = mass.mean()
        out[g] = mass / mean if float(mean) > 0 else torch.ones_like(mass)
    return out


def position_weights(tree: AxisTree, weights: Mapping[str, Tensor]) -> Tensor | None:
    """Weights of the positions of a joint axis (heads x head_dim, a
    concatenation): the product, over the groups of ``tree`` that have
    weights, of the weight of the unit the position belongs to (1 for a
    group without weights or a slice that does not hold the group), divided
    by its mean (mean 1).

    Args:
        tree: the joint axis.
        weights: group name -> ``(n,)`` unit weights (:func:`unit_weights`).

    Returns:
        ``(tree_size(tree),)`` float64 weights, or ``None`` when no group
        of ``tree`` has weights (its statistic is left unweighted).
    """
    groups = [g for g in dict.fromkeys(groups_of(tree)) if g in weights]
    if not groups:
        return None
    out = torch.ones(tree_size(tree), dtype=torch.float64)
    for g in groups:
        positions = unit_positions(tree, g)
        if positions is None:  # (unreachable: g was read from this tree)
            continue
        factor = torch.ones_like(out)
        factor[positions] = weights[g][:, None].expand(positions.shape)
        out *= factor
    mean = out.mean()
    return out / mean if float(mean) > 0 else torch.ones_like(out)
