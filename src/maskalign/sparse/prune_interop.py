"""Conversion from and to the form of ``torch.nn.utils.prune``.

``torch.nn.utils.prune`` reparametrises a pruned tensor ``name`` of a module
into a parameter ``name_orig`` and a buffer ``name_mask`` (float, ``1.0`` kept,
``0.0`` pruned), and recomputes ``name = name_orig * name_mask`` in a forward
pre-hook. Its state_dicts therefore hold ``layer.weight_orig`` and
``layer.weight_mask`` instead of ``layer.weight``; checkpoints of the paper's
code (Adnan et al., ICML 2025, which prunes with that module) are in this
form.

maskalign keeps parameters under their own names and masks as a plain
``dict[str, torch.bool tensor]`` (see :mod:`maskalign.sparse.masks`). The functions
here convert between the two: :func:`masks_from_prune` reads masks from a
pruned module or a prune-form state_dict, :func:`state_dict_from_prune` turns a
prune-form state_dict into a plain one that loads into an unpruned model, and
:func:`to_prune` applies masks with ``torch.nn.utils.prune`` for code that
expects that form.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from ..errors import MaskError
from .masks import validate_masks

__all__ = ["masks_from_prune", "state_dict_from_prune", "to_prune"]

_ORIG, _MASK = "_orig", "_mask"


def _as_bool(name: str, mask: Tensor) -> Tensor:
    """``mask`` (any dtype) as ``torch.bool``, checking every value is 0 or 1.

    Raises:
        MaskError: naming ``name`` if a value is neither 0 nor 1.
    """
    if mask.dtype == torch.bool:
        return mask.detach().clone()
    binary = (mask == 0) | (mask == 1)
    if not bool(binary.all()):
        bad = mask[~binary].flatten()[:3].tolist()
        raise MaskError(f"Pruning mask {name!r} holds values other than 0 and 1 (e.g. {bad}); it is not a binary mask.")
    return mask.detach() != 0


def _prune_pairs(state: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """Plain name -> (``*_orig`` key, ``*_mask`` key) for every pruned tensor
    of a prune-form state_dict.

    Raises:
        MaskError: if a ``*_orig`` key has no ``*_mask`` partner or the other
            way round, or their shapes differ.
    """
    pairs: dict[str, tuple[str, str]] = {}
    for key in state:
        if key.endswith(_ORIG) and key[: -len(_ORIG)] + _MASK in state:
            base = key[: -len(_ORIG)]
            pairs[base] = (key, base + _MASK)
    for key in state:
        if key.endswith(_MASK) and key[: -len(_MASK)] not in pairs:
            raise MaskError(f"State dict key {key!r} has no {key[: -len(_MASK)] + _ORIG!r} partner.")
    for orig, mask in pairs.values():
        if state[orig].shape != state[mask].shape:
            raise MaskError(
                f"{orig!r} has shape {tuple(state[orig].shape)} but {mask!r} has shape {tuple(state[mask].shape)}."
            )
    return pairs


def _pruned_in_module(model: nn.Module) -> dict[str, Tensor]:
    """Plain tensor name -> raw mask buffer for every tensor pruned by a
    ``torch.nn.utils.prune`` forward pre-hook in ``model``."""
    found: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                tensor = hook._tensor_name
                found[f"{prefix}.{tensor}" if prefix else tensor] = getattr(module, tensor + _MASK)
    return found


def masks_from_prune(source: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks of every tensor pruned with ``torch.nn.utils.prune``.

    Args:
        source: a module pruned with ``torch.nn.utils.prune`` (its pruning
            hooks are read), or a prune-form state_dict (pairs of
            ``<name>_orig`` / ``<name>_mask`` keys). Not modified.

    Returns:
        Plain tensor name (``"layer.weight"``, the name the tensor has in the
        unpruned model) -> ``torch.bool`` mask of the tensor's shape on the
        mask's device, ``True`` where kept. Empty if nothing is pruned.

    Raises:
        MaskError: if a mask holds values other than 0 and 1, or a state_dict
            has an ``*_orig`` / ``*_mask`` key without its partner or with a
            different shape.
    """
    if isinstance(source, nn.Module):
        raw = _pruned_in_module(source)
        return {name: _as_bool(name + _MASK, mask) for name, mask in raw.items()}
    pairs = _prune_pairs(source)
    return {base: _as_bool(mask_key, source[mask_key]) for base, (_, mask_key) in pairs.items()}


def state_dict_from_prune(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A plain state_dict from a prune-form one, loadable by the unpruned
    model.

    Every ``<name>_orig`` / ``<name>_mask`` pair becomes one ``<name>`` entry
    holding the effective tensor (``<name>_orig`` with pruned entries set to
    exactly ``0``, also where ``_orig`` was NaN or infinite); other keys are
    copied unchanged, in order. Use :func:`masks_from_prune` on the same
    state_dict for the masks.

    Args:
        state: a state_dict saved from a model pruned with
            ``torch.nn.utils.prune``; not modified.

    Returns:
        A new ``dict`` of tensors (copies for the pruned entries, the same
        tensor objects otherwise).

    Raises:
        MaskError: as :func:`masks_from_prune`, or if a plain ``<name>`` key
            also exists beside its ``_orig`` / ``_mask`` pair.
    """
    pairs = _prune_pairs(state)
    masks = masks_from_prune(state)
    clash = [base for base in pairs if base in state]
    if clash:
        raise MaskError(f"State dict has both plain and prune-form keys for {clash}; it is not one model's state.")
    by_key = {orig: base for base, (orig, _) in pairs.items()}
    mask_keys = {mask for _, mask in pairs.values()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in mask_keys:
            continue
        if key in by_key:
            base = by_key[key]
            out[base] = value.detach().masked_fill(~masks[base].to(value.device), 0)
        else:
            out[key] = value
    return out


def to_prune(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Apply ``masks`` to ``model`` **in place** with
    ``torch.nn.utils.prune.custom_from_mask``.

    Afterwards ``model.state_dict()`` holds ``<name>_orig`` and
    ``<name>_mask`` for each masked parameter, as code built on
    ``torch.nn.utils.prune`` expects; ``prune.remove(module, name)`` makes a
    tensor plain again. The model's outputs equal those of the model with
    :func:`~maskalign.apply_masks` applied.

    Args:
        model: network whose masked parameters are not already pruned by
            ``torch.nn.utils.prune``.
        masks: parameter name -> ``torch.bool`` mask of the parameter's shape
            (any device); not modified.

    Returns:
        ``model`` itself.

    Raises:
        MaskError: if ``masks`` is malformed for ``model`` (see
            :func:`~maskalign.validate_masks`), names a tensor that is already
            pruned with ``torch.nn.utils.prune``, or names a parameter that is
            shared by several modules (tied
            weights, which ``torch.nn.utils.prune`` cannot reparametrise
            consistently). Nothing is changed then.
    """
    already = sorted(set(masks) & set(_pruned_in_module(model)))
    if already:
        raise MaskError(
            f"{already} are already pruned with torch.nn.utils.prune; call prune.remove(module, name) first, "
            "or read their masks with masks_from_prune(model)."
        )
    validate_masks(model, masks)
    owners: dict[str, tuple[nn.Module, str]] = {}
    for name in masks:
        module_path, _, tensor = name.rpartition(".")
        owners[name] = (model.get_submodule(module_path), tensor)
    named = dict(model.named_parameters(remove_duplicate=False))
    for name in masks:
        aliases = [n for n, p in named.items() if p is named[name]]
        if len(aliases) > 1:
            raise MaskError(
                f"Parameter {name!r} is shared as {aliases}; torch.nn.utils.prune cannot prune tied weights."
            )
    for name, mask in masks.items():
        module, tensor = owners[name]
        param = getattr(module, tensor)
        prune.custom_from_mask(module, tensor, mask.to(param.device))
    return model
