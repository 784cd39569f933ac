"""Pruning masks: validation, global magnitude pruning, random baselines,
sparsity reports and applying masks to a model.

A *mask set* is a plain ``dict[str, torch.Tensor]`` mapping a parameter name,
exactly as it appears in ``model.named_parameters()`` (which is also its
``state_dict`` key), to a ``torch.bool`` tensor of that parameter's shape.
``True`` marks a kept entry, ``False`` a pruned one.

Sources:

* Han, Pool, Tran & Dally, "Learning both Weights and Connections for
  Efficient Neural Networks", NeurIPS 2015 -- magnitude pruning: remove the
  weights of smallest absolute value.
* Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable
  Neural Networks", ICLR 2019 -- iterative magnitude pruning (IMP): train,
  prune a fraction of the *remaining* weights, rewind, repeat; for deeper
  networks the pruning is global (one threshold across layers).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import (
    DOCS_URL,
    ArgumentTypeError,
    ArgumentValueError,
    DataError,
    MaskError,
    _check_fraction,
    _check_module,
    _describe,
)

__all__ = [
    "SparsityReport",
    "apply_masks",
    "default_prunable",
    "global_magnitude_prune",
    "random_masks_like",
    "sparsity",
    "validate_masks",
]

_PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)


def _unknown_name_message(name: str, known: Sequence[str], what: str) -> str:
    """Message for a name that is not a parameter of the model, listing up to
    three close parameter names (``difflib``) to help with typos."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{what} {name!r} is not a parameter of the model.{hint}"


def _check_mask_set(masks: object, argument: str = "masks") -> Mapping[str, Tensor]:
    """``masks`` if it is a mapping; else an :class:`ArgumentTypeError` that
    says what a mask set is (and, for a list of pairs, how to convert it)."""
    if isinstance(masks, Mapping):
        return masks
    if isinstance(masks, nn.Module):
        hint = "; a model was passed where the masks go (swapped arguments?)"
    elif isinstance(masks, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in masks):
        hint = "; convert a list of (name, mask) pairs with dict(pairs)"
    else:
        hint = ""
    raise ArgumentTypeError(
        f"Argument {argument!r} is {_describe(masks)}, not a mask set; pass a dict mapping parameter names "
        f"(as in model.named_parameters()) to torch.bool tensors{hint}."
    )


def _reduced(value: Tensor) -> Tensor:
    """A reduction of a DTensor mask gathered over its shards (``bool()`` of
    a DTensor reads only this rank's part: a rank with an empty or
    all-pruned shard would warn for the whole mask), or ``value``."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value


def validate_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Check that ``masks`` is a well-formed mask set for ``model``.

    Args:
        model: the network the masks belong to; only its
            ``named_parameters()`` are read.
        masks: parameter name -> mask. Each mask must be a dense (strided)
            ``torch.bool`` tensor of the parameter's shape (any device), or
            a ``torch.bool`` DTensor of that (global) shape, such as
            ``MaskHandle.masks`` of an FSDP2 model (checking it is then a
            collective: call it on every rank). Parameters without a mask
            are allowed (they count as dense).

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module`` (e.g. a
            ``state_dict``), or ``masks`` is not a mapping (``None``, a list of
            pairs).
        MaskError: naming the offending key, if a key is not a parameter name
            of ``model`` (close names are suggested), a value is not a
            tensor, is a sparse-layout tensor, has another shape than its
            parameter (both shapes are given), or is not ``torch.bool``.

    Warns:
        UserWarning: if a mask prunes every entry of a (non-empty) parameter,
            which disconnects the layer.
    """
    _check_module(model, "model", "validate_masks(model, masks)")
    masks = _check_mask_set(masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise MaskError(
                f"Mask key {name!r} is a {type(name).__name__}, not a parameter name; key masks by the "
                "names (str) of model.named_parameters()."
            )
        if name not in params:
            raise MaskError(_unknown_name_message(name, list(params), "Mask key"))
        if not isinstance(mask, Tensor):
            raise MaskError(
                f"Mask for {name!r} is a {type(mask).__name__}, expected a torch.bool tensor; "
                "convert it with torch.as_tensor(mask, dtype=torch.bool)."
            )
        param = params[name]
        if mask.layout != torch.strided:
            raise MaskError(
                f"Mask for {name!r} is a {mask.layout} tensor; pass a dense torch.bool tensor (mask.to_dense())."
            )
        if mask.shape != param.shape:
            raise MaskError(
                f"Mask for {name!r} has shape {tuple(mask.shape)} but the parameter has shape "
                f"{tuple(param.shape)}; pass a mask of the parameter's shape."
            )
        if mask.dtype != torch.bool:
            raise MaskError(
                f"Mask for {name!r} has dtype {mask.dtype}, expected torch.bool; "
                "convert it with `mask.bool()` or `mask != 0`."
            )
        if mask.numel() > 0 and not bool(_reduced(mask.any())):
            warnings.warn(
                f"Mask for {name!r} prunes every entry of the parameter (shape {tuple(param.shape)}). "
                f"See {DOCS_URL}/troubleshooting/#warning-empty-mask",
                UserWarning,
                stacklevel=2,
            )


def default_prunable(model: nn.Module) -> list[str]:
    """Names of the ``weight`` parameters of every ``nn.Linear`` and
    ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` submodule, in
    ``named_parameters()`` order.

    Biases, normalisation layers, embeddings and transposed convolutions are
    not included. A weight shared by several modules is listed once, under
    its ``named_parameters()`` name; a weight that is not a registered
    parameter (e.g. computed by a parametrisation) is skipped.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
    """
    _check_module(model, "model", "default_prunable(model)")
    prunable_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, _PRUNABLE_TYPES) and isinstance(module.weight, nn.Parameter)
    }
    return [name for name, p in model.named_parameters() if id(p) in prunable_ids]


def _check_sparsity_value(sparsity: float) -> float:
    """Return ``sparsity`` as a float, checked to be a fraction in ``[0, 1)``.

    Raises:
        ArgumentTypeError: not a real number.
        ArgumentValueError: outside ``[0, 1)`` (a likely percentage such as
            ``90`` gets the fraction suggested).
    """
    return _check_fraction(sparsity, "sparsity", include_zero=True)


def _check_names(params: object, argument: str = "params") -> list[str]:
    """``params`` as a list of names; a single string or a non-iterable is an
    :class:`ArgumentTypeError`."""
    if isinstance(params, str):
        raise ArgumentTypeError(
            f"Argument {argument!r} is the str {params!r}; pass a list of parameter names: [{params!r}]."
        )
    if isinstance(params, Mapping) or not isinstance(params, (Sequence, set, frozenset)):
        raise ArgumentTypeError(
            f"Argument {argument!r} is {_describe(params)}; pass a list of parameter names "
            "(as in model.named_parameters())."
        )
    return list(params)


def global_magnitude_prune(
    model: nn.Module,
    sparsity: float,
    masks: Mapping[str, Tensor] | None = None,
    params: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Global unstructured magnitude pruning (Han et al. 2015), one IMP
    pruning step (Frankle & Carbin 2019).

    Across all chosen parameters together, exactly
    ``round(sparsity * total)`` entries are pruned, where ``total`` is their
    summed number of entries. Entries already pruned in ``masks`` stay pruned
    and count towards that number; the remaining ones are the kept entries of
    smallest ``|w|`` under the model's current weights. Ties are broken
    deterministically: entries are ordered by a stable sort on magnitude, so
    equal magnitudes are pruned in order of their flat index in the
    concatenation of ``params`` (in the given order, each flattened
    row-major).

    For IMP pruning 20 % of the remaining weights per round, call with
    ``sparsity = 1 - 0.8 ** round`` and the previous round's masks.

    Source: magnitude pruning (Han et al., NeurIPS 2015), one global pruning
    step of iterative magnitude pruning (Frankle & Carbin, ICLR 2019).

    Args:
        model: network whose current weights give the magnitudes; not
            modified.
        sparsity: target overall fraction of pruned entries, in ``[0, 1)``.
        masks: optional current mask set (bool, parameter shapes); not
            modified. Every key must be one of ``params``; chosen parameters
            without a mask are dense.
        params: names of the parameters to prune; defaults to
            ``default_prunable(model)``.

    Returns:
        A new mask set with one ``torch.bool`` mask per chosen parameter (in
        ``params`` order), each of its parameter's shape and on its device.

    Raises:
        ArgumentTypeError: ``model`` is not a module, ``sparsity`` is not a
            number, ``params`` is not a list of names, or ``masks`` is not a
            mapping.
        ArgumentValueError: (a ``ValueError``) ``sparsity`` is not in
            ``[0, 1)`` (a likely percentage such as ``90`` is named as one),
            or there is no parameter to prune.
        DataError: (a ``ValueError``) a kept weight is NaN (its magnitude
            cannot be ranked).
        MaskError: if ``masks`` is malformed (see :func:`validate_masks`), a
            name in ``params`` is unknown or repeated, a mask key is not one
            of ``params``, or ``masks`` already prunes more than
            ``round(sparsity * total)`` entries.
    """
    _check_module(model, "model", "global_magnitude_prune(model, sparsity)")
    target = _check_sparsity_value(sparsity)
    named = dict(model.named_parameters())
    names = default_prunable(model) if params is None else _check_names(params)
    for name in names:
        if not isinstance(name, str):
            raise ArgumentTypeError(
                f"Argument 'params' holds {name!r}, a {type(name).__name__}; list parameter names (str) "
                "as in model.named_parameters()."
            )
        if name not in named:
            raise MaskError(_unknown_name_message(name, list(named), "Parameter"))
    if len(set(names)) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise MaskError(f"Argument 'params' lists {repeated} more than once; list each parameter once.")
    if not names:
        if params is None:
            raise ArgumentValueError(
                f"Model {type(model).__name__} has no linear or convolution weight to prune "
                "(default_prunable(model) is empty); pass params=[...] naming the parameters to prune."
            )
        raise ArgumentValueError("Argument 'params' is empty; pass the names of the parameters to prune.")
    current: Mapping[str, Tensor] = {} if masks is None else _check_mask_set(masks)
    validate_masks(model, current)
    chosen = set(names)
    outside = [k for k in current if k not in chosen]
    if outside:
        raise MaskError(
            f"Masks given for parameters that are not being pruned: {outside}; "
            "add them to `params` or drop them from `masks`."
        )

    weights = [named[n].detach() for n in names]
    device = weights[0].device
    score_dtype = weights[0].dtype
    for w in weights[1:]:
        score_dtype = torch.promote_types(score_dtype, w.dtype)
    scores = []
    for name, w in zip(names, weights):
        magnitude = w.to(device=device, dtype=score_dtype).abs().reshape(-1)
        if name in current:
            keep = current[name].to(device).reshape(-1)
            magnitude = torch.where(keep, magnitude, magnitude.new_full((), float("-inf")))
        nan_kept = torch.isnan(magnitude)
        if bool(nan_kept.any()):
            raise DataError(
                f"Parameter {name!r} has {int(nan_kept.sum())} NaN weight(s) "
                "among its kept entries, so magnitudes cannot be ranked; fix or reload the weights "
                "(or prune that parameter's NaN entries in `masks`)."
            )
        scores.append(magnitude)
    flat = torch.cat(scores)
    total = flat.numel()
    n_prune = round(target * total)
    already = int(torch.isneginf(flat).sum())
    if n_prune < already:
        raise MaskError(
            f"Requested sparsity {target!r} prunes {n_prune} of {total} entries, "
            f"but the given masks already prune {already} "
            f"(sparsity {already / total:.6g}); pruned entries cannot be revived."
        )
    order = torch.sort(flat, stable=True).indices
    keep_flat = torch.ones(total, dtype=torch.bool, device=device)
    keep_flat[order[:n_prune]] = False
    out: dict[str, Tensor] = {}
    for name, chunk in zip(names, torch.split(keep_flat, [w.numel() for w in weights])):
        param = named[name]
        out[name] = chunk.reshape(param.shape).to(param.device, copy=True)
    return out


def random_masks_like(masks: Mapping[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Random masks with the same per-tensor number of kept entries as
    ``masks`` (so the same per-layer density): the random-reinitialisation /
    random-pruning baseline of Frankle & Carbin 2019.

    Args:
        masks: name -> ``torch.bool`` mask, any shapes; not modified.
        generator: optional RNG for reproducibility; the permutations are
            drawn on ``generator.device`` (CPU if no generator is given).

    Returns:
        name -> new ``torch.bool`` mask of the same shape and device as the
        input mask, with exactly as many ``True`` entries, placed uniformly
        at random.

    Raises:
        ArgumentTypeError: ``masks`` is not a mapping (e.g. a model), or
            ``generator`` is not a ``torch.Generator`` (e.g. a seed).
        MaskError: naming the key, if a value is not a dense ``torch.bool``
            tensor.
    """
    masks = _check_mask_set(masks)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(
            f"Argument 'generator' is {_describe(generator)}, not a torch.Generator; "
            "pass torch.Generator().manual_seed(seed)."
        )
    rng_device = torch.device("cpu") if generator is None else generator.device
    _check_dense_bool(masks)
    out: dict[str, Tensor] = {}
    for name, mask in masks.items():
        n_keep = int(mask.sum())
        perm = torch.randperm(mask.numel(), generator=generator, device=rng_device)
        keep = torch.zeros(mask.numel(), dtype=torch.bool, device=rng_device)
        keep[perm[:n_keep]] = True
        out[name] = keep.reshape(mask.shape).to(mask.device)
    return out


def _check_dense_bool(masks: Mapping[str, Tensor]) -> None:
    """Every value of ``masks`` is a dense ``torch.bool`` tensor, else a
    :class:`MaskError` naming the first key that is not."""
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise MaskError(
                f"Mask for {name!r} must be a torch.bool tensor; convert it with `mask.bool()` or `mask != 0`."
            )
        if mask.layout != torch.strided:
            raise MaskError(
                f"Mask for {name!r} is a {mask.layout} tensor; pass a dense torch.bool tensor (mask.to_dense())."
            )


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor and overall sparsity.

    ``float(report)`` is the global sparsity, :attr:`global_` (a fraction in
    ``[0, 1]``: ``float(ma.sparsity(masks)) == 0.8`` when 80% of the entries
    are pruned), so a report can stand where a number is expected
    (``f"{float(report):.1%}"``, comparisons after ``float``).

    Attributes:
        pruned: name -> number of pruned (mask ``False``) or exactly-zero
            entries.
        numel: name -> number of entries.
        per_layer: name -> ``pruned / numel`` (``0.0`` for an empty tensor).
        global_: ``sum(pruned) / sum(numel)`` (``0.0`` when there are no
            entries at all).
    """

    pruned: dict[str, int]
    numel: dict[str, int]
    per_layer: dict[str, float]
    global_: float

    def __float__(self) -> float:
        """The global sparsity, :attr:`global_`: pruned entries over all
        entries, in ``[0, 1]``."""
        return float(self.global_)

    def __str__(self) -> str:
        """A compact fixed-width table: one row per tensor and a total row."""
        total_pruned = sum(self.pruned.values())
        total_numel = sum(self.numel.values())
        rows = [
            (name, str(self.numel[name]), str(self.pruned[name]), f"{self.per_layer[name]:.2%}")
            for name in self.per_layer
        ]
        rows.append(("total", str(total_numel), str(total_pruned), f"{self.global_:.2%}"))
        header = ("name", "numel", "pruned", "sparsity")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

        def fmt(row: tuple[str, str, str, str]) -> str:
            return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])])


def _report(pruned: dict[str, int], numel: dict[str, int]) -> SparsityReport:
    """Build a :class:`SparsityReport` from per-tensor counts."""
    total = sum(numel.values())
    return SparsityReport(
        pruned=pruned,
        numel=numel,
        per_layer={k: (pruned[k] / numel[k] if numel[k] else 0.0) for k in numel},
        global_=sum(pruned.values()) / total if total else 0.0,
    )


def sparsity(
    obj: nn.Module | Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
) -> SparsityReport:
    """Measure sparsity of a mask set or of a model's weights.

    * ``sparsity(masks)``: fraction of ``False`` entries per mask and overall.
    * ``sparsity(model, masks)``: fraction of exactly-zero weights in each
      masked parameter (all its entries, not only the masked ones).
    * ``sparsity(model)``: the same over ``default_prunable(model)``.

    Args:
        obj: a model or a mask set (name -> ``torch.bool`` tensor).
        masks: only with a model: the mask set selecting the parameters.

    Returns:
        A :class:`SparsityReport`; printing it renders a table, and
        ``float(report)`` is the global sparsity (a fraction in ``[0, 1]``).

    Raises:
        ArgumentTypeError: (a ``TypeError``) ``obj`` is neither a model nor a
            mapping, or ``masks`` is given together with a mask set.
        MaskError: if a mask is not a ``torch.bool`` tensor, or ``masks`` is
            malformed for the model (see :func:`validate_masks`).
    """
    if isinstance(obj, nn.Module):
        named = dict(obj.named_parameters())
        if masks is None:
            names = default_prunable(obj)
        else:
            validate_masks(obj, masks)
            names = list(masks)
        return _report(
            {n: int((named[n].detach() == 0).sum()) for n in names},
            {n: named[n].numel() for n in names},
        )
    if not isinstance(obj, Mapping):
        raise ArgumentTypeError(
            f"Argument 'obj' is {_describe(obj)}; pass a model or a mask set (a dict of torch.bool tensors)."
        )
    if masks is not None:
        raise ArgumentTypeError(
            "Argument 'masks' is only accepted together with a model; call sparsity(masks) or sparsity(model, masks)."
        )
    _check_dense_bool(obj)
    return _report(
        {n: int((~m).sum()) for n, m in obj.items()},
        {n: m.numel() for n, m in obj.items()},
    )


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned entries of ``model``'s parameters, **in place**.

    The masks are validated first, so nothing is modified if any is
    malformed. Pruned entries are set with ``masked_fill_`` rather than
    multiplied by the mask, so that a NaN or infinite pruned weight also
    becomes exactly ``0.0``. Runs under ``torch.no_grad()``. This is a one-off
    write; to keep the weights masked during training use
    :func:`maskalign.sparse.enforce_masks`.

    Args:
        model: network to modify in place.
        masks: name -> ``torch.bool`` mask of the parameter's shape (any
            device); not modified.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module`` or ``masks`` is
            not a mapping (see :func:`validate_masks`).
        MaskError: a mask is malformed for ``model`` (see :func:`validate_masks`).
    """
    validate_masks(model, masks)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            param = named[name]
            param.masked_fill_(~mask.to(param.device), 0)
