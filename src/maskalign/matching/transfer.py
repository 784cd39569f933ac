"""One call from A's winning ticket to B's: build the spec, match, permute the mask."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from ..errors import ArgumentTypeError, ArgumentValueError, DataError, _describe, _did_you_mean
from ..permutation import permute_mask
from ..spec.permutation_spec import PermutationSpec, build_spec
from .activation import _default_input_fn, _split_inputs, match_activations
from .weight import match_weights

__all__ = ["METHODS", "transfer_mask"]

#: The matchers :func:`transfer_mask` can use.
METHODS: tuple[str, ...] = ("activation", "weight")


def transfer_mask(
    model_a: nn.Module,
    mask_a: Mapping[str, Tensor],
    model_b: nn.Module,
    data: Iterable[Any] | None = None,
    *,
    method: str = "activation",
    spec: PermutationSpec | None = None,
    mask_aware: bool = False,
    **options: Any,
) -> dict[str, Tensor]:
    """A's pruning mask moved into B's hidden units: the permuted mask of
    Adnan et al. (ICML 2025), in one call.

    Builds the permutation spec (from ``model_a`` and the first batch of
    ``data``, unless ``spec`` is given), finds the permutation ``pi`` that
    aligns A to B with ``method``, and returns ``permute_mask(mask_a, pi)``:
    the mask to sparse-train B with (``ma.enforce_masks(model_b, mask_b)``).
    Each layer keeps its number of kept weights. To keep ``pi`` as well (to
    permute A's weights, or save it), call the steps yourself:
    :func:`~maskalign.build_spec`, :func:`~maskalign.match_activations` or
    :func:`~maskalign.match_weights`, :func:`~maskalign.permute_mask`.

    Source: Adnan, Jain, Sharma, Krishnan, Ioannou, "Sparse Training from
    Random Initialization: Aligning Lottery Ticket Masks using Weight
    Symmetry", ICML 2025, Sec. 3 (activation matching of the dense A and B,
    then the permuted mask); weight matching: Ainsworth et al., Git
    Re-Basin, ICLR 2023, Alg. 1.

    Args:
        model_a: the model the mask was found on (dense, trained); not modified.
        mask_a: parameter name -> ``torch.bool`` mask of ``model_a``'s
            parameter's shape (e.g. from IMP); not modified.
        model_b: the model to transfer the mask to, same architecture (its
            weights decide the permutation: dense and trained for
            activation or weight matching; the paper matches the trained
            B_T); not modified.
        data: batches to match activations on (an iterable of input tensors,
            ``(inputs, targets)`` pairs, tuples or keyword dicts, as for
            :func:`~maskalign.match_activations`); for ``method="weight"``
            only its first batch is used, to trace the spec when ``spec``
            (or ``example_inputs=``) is not given.
        method: ``"activation"`` (default; the paper's) or ``"weight"``.
        spec: the permutation spec of ``model_a``; built when omitted.
        mask_aware: match with ``mask=mask_a`` (opt-in; default ``False``,
            the paper's dense matching): activation matching then weights
            each of A's units by the surviving mass of ``mask_a`` it
            carries, weight matching matches A's masked weights against
            B's dense ones (see the ``mask`` argument of
            :func:`~maskalign.match_activations` and
            :func:`~maskalign.match_weights`, and what it was measured to
            do there).
        **options: passed to the matcher: e.g. ``points``,
            ``stream_points``, ``num_batches``, ``cost``, ``progress`` for
            activation matching; ``max_iter``, ``restarts``, ``seed``,
            ``include_buffers`` for weight matching.

    Returns:
        A new dict, parameter name -> permuted ``torch.bool`` mask for
        ``model_b`` (the keys and shapes of ``mask_a``).

    Raises:
        ArgumentValueError: ``method`` is not one of :data:`METHODS`.
        DataError: ``data`` is missing (or empty) where it is needed, or as
            :func:`~maskalign.match_activations`.
        MaskError: as :func:`~maskalign.permute_mask` (a key that is not a
            parameter, a shape mismatch, a non-bool mask).
        TraceError: as :func:`~maskalign.build_spec` (a model it cannot trace).
        SpecError: as :func:`~maskalign.build_spec`.
        ArgumentTypeError: an option the matcher does not have (close names
            are suggested), ``mask=`` among the options (``mask_aware=True``
            passes ``mask_a``), ``mask_aware`` is not a bool, or as the
            matcher (an option of the wrong type).
        SpecMismatchError: as the matcher (e.g. models of different architectures).

    Example:
        >>> import torch, maskalign as ma
        >>> from maskalign.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model_b = MLP(in_features=64, hidden=(32, 32), num_classes=10)
        >>> spec = ma.build_spec(model_b, torch.randn(2, 64))
        >>> sigma = ma.random_permutation(spec, torch.Generator().manual_seed(1))
        >>> model_a = ma.apply_permutation(model_b, sigma)        # B with its hidden units relabelled
        >>> mask_a = ma.global_magnitude_prune(model_a, sparsity=0.9)
        >>> data = [torch.randn(64, 64) for _ in range(4)]
        >>> mask_b = ma.transfer_mask(model_a, mask_a, model_b, data, progress=False)
        >>> undone = ma.permute_mask(mask_a, sigma.inverse())      # the relabelling undone
        >>> all(torch.equal(mask_b[n], undone[n]) for n in mask_a)
        True
    """
    if method not in METHODS:
        raise ArgumentValueError(
            f"Argument 'method' is {method!r}; pass one of {', '.join(map(repr, METHODS))}."
            f"{_did_you_mean(method, METHODS) if isinstance(method, str) else ''}"
        )
    if not isinstance(mask_aware, bool):
        raise ArgumentTypeError(f"Argument 'mask_aware' is {_describe(mask_aware)}; pass True or False.")
    if "mask" in options:
        raise ArgumentTypeError(
            "Option 'mask' is not taken by transfer_mask, which matches with mask_a itself when asked; pass "
            "mask_aware=True instead."
        )
    if mask_aware:
        options = {**options, "mask": mask_a}
    matcher = match_activations if method == "activation" else match_weights
    accepted = [n for n, p in inspect.signature(matcher).parameters.items() if p.kind is p.KEYWORD_ONLY]
    for name in options:
        if name not in accepted:
            raise ArgumentTypeError(
                f"Option {name!r} is not an option of {matcher.__name__}; pass one of {', '.join(accepted)}."
                f"{_did_you_mean(name, accepted)}"
            )
    if method == "activation":  # builds the spec from the first batch itself when it is missing
        if data is None:
            raise DataError(
                "Argument 'data' is missing, and activation matching needs batches; pass data=[batch, ...]."
            )
        perm = match_activations(model_a, model_b, data, spec, **options)
    else:
        if spec is None and data is not None and "example_inputs" not in options:
            first = next(iter(data), None)
            if first is None:
                raise DataError("Argument 'data' holds no batch; pass at least one batch, or spec=... .")
            args, kwargs = _split_inputs(_default_input_fn(first), 0)
            spec = build_spec(model_a, args, kwargs)
        perm = match_weights(model_a, model_b, spec, **options)
    return permute_mask(mask_a, perm)
