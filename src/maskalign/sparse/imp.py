"""Iterative magnitude pruning (IMP) with the three rewinding conventions in
use.

Each round prunes ``rate`` of the *remaining* weights, globally across the
chosen parameters, by magnitude of the weights the previous round trained
(Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019, Alg. 1, with
global pruning as in their Sec. 4). What happens to the unpruned weights
before the next round of training is where published code differs, so it is a
choice here (``rewind``):

* ``"none"`` -- no rewinding: each round fine-tunes the weights the previous
  round left, with the new mask applied. This is how Adnan et al. (ICML 2025;
  workshop version App. A.1, "IMP without weight rewinding", 50 epochs per
  round at lr 0.01) found their masks.
* ``"continue"`` -- rewind to the checkpoint of epoch ``k`` and continue the
  original training schedule from epoch ``k`` (Frankle, Dziugaite, Roy &
  Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML
  2020; the ``open_lth`` code base). ``IMPRound.start_epoch`` is ``k``.
* ``"restart"`` -- rewind to the checkpoint of epoch ``k`` and train with a
  fresh schedule of ``T - k`` epochs. ``IMPRound.start_epoch`` is ``0``.

The training loop stays the caller's (``train_fn``); this module owns the
schedule, the pruning, the rewinding, and the guarantee that the returned
masks are what the model was trained with.
"""

from __future__ import annotations

import copy
import numbers
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import (
    DOCS_URL,
    ArgumentTypeError,
    ArgumentValueError,
    MaskError,
    _check_callable,
    _check_choice,
    _check_fraction,
    _check_int,
    _check_module,
    _describe,
)
from .enforce import enforce_masks
from .masks import (
    _check_mask_set,
    _check_names,
    _unknown_name_message,
    apply_masks,
    default_prunable,
    global_magnitude_prune,
    validate_masks,
)

__all__ = ["IMPResult", "IMPRound", "RewindMode", "imp_schedule", "iterative_magnitude_pruning"]

RewindMode = Literal["none", "continue", "restart"]
_REWIND_MODES: tuple[str, ...] = ("none", "continue", "restart")

#: Two sparsities closer than this are the same IMP level (schedule arithmetic
#: in float64 is exact to ~1e-16; mask counts are rounded to whole entries).
SAME_LEVEL_TOL = 1e-9


def imp_schedule(targets: float | Sequence[float], rate: float = 0.2) -> list[float]:
    """Sparsity after each IMP round.

    Each round prunes ``rate`` of the remaining weights,
    ``s_{r+1} = 1 - (1 - s_r) (1 - rate)`` from ``s_0 = 0``; a round that
    would reach or pass the next target lands exactly on it, so every target
    is one of the levels.

    Source: the pruning schedule of iterative magnitude pruning, a fixed
    fraction of the remaining weights per round (Frankle & Carbin, ICLR
    2019); Adnan et al. (ICML 2025) prune 20 % per round.

    Args:
        targets: one target sparsity or several, each in ``(0, 1)``.
        rate: fraction of the remaining weights pruned per round, in
            ``(0, 1)``.

    Returns:
        The increasing list of sparsities, one per round.

    Raises:
        ArgumentTypeError: (a ``TypeError``) a target or ``rate`` is not a
            number.
        ArgumentValueError: (a ``ValueError``) a target or ``rate`` is outside
            ``(0, 1)`` (a likely percentage such as ``90`` is named as one),
            or there is no target.

    Examples:
        >>> [round(s, 4) for s in imp_schedule([0.5], 0.2)]
        [0.2, 0.36, 0.488, 0.5]
    """
    levels = _check_targets(targets)
    rate = _check_fraction(rate, "rate", include_zero=False)
    schedule: list[float] = []
    current = 0.0
    for target in levels:
        while current < target - SAME_LEVEL_TOL:
            current = 1.0 - (1.0 - current) * (1.0 - rate)
            if current > target - SAME_LEVEL_TOL:
                current = target
            schedule.append(current)
    return schedule


def _check_targets(targets: float | Sequence[float]) -> list[float]:
    """Sorted distinct targets, each checked to lie in ``(0, 1)``."""
    if isinstance(targets, (str, bytes, Mapping)) or not isinstance(targets, (numbers.Real, Tensor, Sequence)):
        raise ArgumentTypeError(
            f"Argument 'target_sparsity' is {_describe(targets)}; pass a fraction in (0, 1) or a list of them."
        )
    if isinstance(targets, (numbers.Real, Tensor)):
        values = [_check_fraction(targets, "target_sparsity", include_zero=False)]
    else:
        values = [_check_fraction(t, f"target_sparsity[{i}]", include_zero=False) for i, t in enumerate(targets)]
    if not values:
        raise ArgumentValueError("Argument 'target_sparsity' is empty; give at least one sparsity in (0, 1).")
    return sorted(set(values))


@dataclass(frozen=True)
class IMPRound:
    """What one IMP round hands to ``train_fn``.

    Attributes:
        index: 1-based position of the round in the full schedule
            (:func:`imp_schedule` of all targets), also when resuming.
        sparsity: overall sparsity of ``masks`` over the pruned parameters
            (the schedule level; the achieved fraction is within one entry).
        masks: name -> ``torch.bool`` mask the model is trained with
            (parameter shape and device).
        rewind: the rewinding convention of the run.
        start_epoch: the epoch of the training schedule this round starts
            from: the rewind epoch ``k`` for ``rewind="continue"``, ``0``
            otherwise.
    """

    index: int
    sparsity: float
    masks: Mapping[str, Tensor]
    rewind: RewindMode
    start_epoch: int


@dataclass
class IMPResult:
    """Outcome of :func:`iterative_magnitude_pruning`.

    Attributes:
        masks: the last round's masks (the highest target sparsity).
        masks_at: each requested target sparsity reached by this call -> its
            masks (a target equal to the sparsity of the initial masks maps to
            those; lower targets are absent).
        history: one dict per round run: ``round`` (index), ``sparsity``
            (schedule level), ``achieved`` (fraction of pruned entries),
            ``metric`` (``evaluate(model)`` after training, or ``None``),
            ``seconds`` (wall time of the round).
        model: the model after the last round's training (the input model
            itself with ``inplace=True``, else a copy).
    """

    masks: dict[str, Tensor]
    masks_at: dict[float, dict[str, Tensor]]
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None


def _pruned_fraction(masks: Mapping[str, Tensor], numel: int) -> float:
    """Fraction of pruned entries among ``numel`` entries (masked or not)."""
    pruned = sum(int((~m).sum()) for m in masks.values())
    return pruned / numel


def _check_rewind_state(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A private copy of ``state``, after checking it has exactly the keys
    and shapes of ``model.state_dict()`` (so loading it cannot fail half-way).

    Raises:
        ArgumentTypeError: ``state`` is a module or not a mapping.
        ArgumentValueError: naming missing keys, unexpected keys or the first
            shape mismatch.
    """
    if isinstance(state, nn.Module) or not isinstance(state, Mapping):
        raise ArgumentTypeError(
            f"Argument 'rewind_to' is {_describe(state)}, not a state_dict; pass "
            "copy.deepcopy(model.state_dict()) saved at the rewind epoch."
        )
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ArgumentValueError(
            f"Argument 'rewind_to' does not match the model's state_dict: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}; pass `model.state_dict()` saved at the rewind epoch."
        )
    for key, value in expected.items():
        got = state[key]
        if not isinstance(got, Tensor) or got.shape != value.shape:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise ArgumentValueError(
                f"Argument rewind_to[{key!r}] has shape {shape}, the model's has {tuple(value.shape)}; "
                "pass the state_dict of this architecture saved at the rewind epoch."
            )
    return {k: v.detach().clone() for k, v in state.items()}


def iterative_magnitude_pruning(
    model: nn.Module,
    train_fn: Callable[[nn.Module, IMPRound], object],
    target_sparsity: float | Sequence[float],
    *,
    rate: float = 0.2,
    rewind: RewindMode = "none",
    rewind_to: Mapping[str, Tensor] | None = None,
    rewind_epoch: int = 0,
    params: Sequence[str] | None = None,
    exclude: Callable[[str], bool] | None = None,
    masks: Mapping[str, Tensor] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    on_round_end: Callable[[IMPRound, nn.Module], None] | None = None,
    inplace: bool = False,
) -> IMPResult:
    """Find winning-ticket masks by iterative magnitude pruning.

    ``model`` should already be trained (dense, or pruned to ``masks``). For
    each level ``s`` of :func:`imp_schedule` (``target_sparsity``, ``rate``):

    1. prune globally to sparsity ``s`` by magnitude of the current weights,
       keeping earlier rounds' pruned entries pruned
       (:func:`~maskalign.global_magnitude_prune`; ties broken by flat index);
    2. rewind: with ``rewind="continue"`` or ``"restart"`` load ``rewind_to``
       (weights and buffers); with ``"none"`` keep the current weights;
    3. zero the pruned weights and call ``train_fn(model, round)`` with
       gradient hooks that zero the gradient of pruned entries
       (:func:`~maskalign.enforce_masks` without an optimiser). ``train_fn``
       builds its own optimiser and should call
       ``ma.enforce_masks(model, round.masks, optimizer)`` so that its state
       cannot leak either;
    4. if training left a pruned weight non-zero, warn (naming the
       parameters) and zero it, so the masks returned are the masks the model
       ends with; then ``evaluate(model)`` and ``on_round_end(round, model)``.

    Sources: Frankle & Carbin, ICLR 2019 (IMP, Alg. 1; global pruning);
    Frankle et al., ICML 2020 (rewinding to epoch ``k``); Adnan et al., ICML
    2025 (no rewinding between rounds, 20 % per round). The module docstring
    describes the three ``rewind`` conventions.

    Args:
        model: network to prune; copied unless ``inplace``.
        train_fn: ``train_fn(model, round)`` trains ``model`` in place with
            ``round.masks`` (see :class:`IMPRound`); its return value is
            ignored.
        target_sparsity: one sparsity or several, each in ``(0, 1)``; the
            schedule lands exactly on each, and ``IMPResult.masks_at`` holds
            the masks of each.
        rate: fraction of the remaining weights pruned per round, in
            ``(0, 1)``; the paper uses ``0.2``.
        rewind: ``"none"``, ``"continue"`` or ``"restart"``.
        rewind_to: ``state_dict`` saved at the rewind epoch (copied at the
            start); required unless ``rewind="none"``.
        rewind_epoch: ``k``, reported as ``IMPRound.start_epoch`` with
            ``rewind="continue"``; must be ``0`` with ``rewind="none"``.
        params: names of the parameters to prune; default: the weights of
            every linear and convolution layer
            (:func:`~maskalign.sparse.masks.default_prunable`).
        exclude: ``exclude(name) -> True`` drops a parameter from ``params``,
            e.g. ``lambda n: "shortcut" in n``.
        masks: initial masks (to continue an interrupted run): rounds at or
            below their sparsity are skipped, so pass the same
            ``target_sparsity`` as the interrupted run to get the same
            schedule; round indices stay those of the full schedule. Targets
            below their sparsity were reached before and are not in
            ``IMPResult.masks_at``. Not modified.
        evaluate: ``evaluate(model) -> float`` after each round (e.g. test
            accuracy), recorded as ``history[i]["metric"]``.
        on_round_end: ``on_round_end(round, model)`` after each round, e.g. to
            checkpoint for resuming.
        inplace: train and prune ``model`` itself instead of a copy.

    Returns:
        An :class:`IMPResult`.

    Raises:
        ArgumentTypeError: (a ``TypeError``) ``model`` is not a module,
            ``train_fn`` / ``exclude`` / ``evaluate`` / ``on_round_end`` is
            not callable, ``rewind_to`` is not a ``state_dict``, ``params`` is
            not a list of names, ``rewind_epoch`` is not an int, or ``masks``
            is not a mapping.
        ArgumentValueError: (a ``ValueError``) if ``rate`` or a target is
            outside ``(0, 1)``, ``rewind`` is unknown, ``rewind_to`` is
            missing for a rewinding mode or does not match the model's
            ``state_dict``, ``rewind_epoch`` is negative or non-zero without
            rewinding, or no parameter is left to prune.
        MaskError: if ``params`` names an unknown parameter (close names are
            suggested), or ``masks`` is malformed or masks a parameter that
            is not pruned.
    """
    _check_module(model, "model", "iterative_magnitude_pruning(model, train_fn, target_sparsity)")
    _check_callable(train_fn, "train_fn", "train_fn(model, round) that trains the model in place")
    for argument, function, signature in (
        ("exclude", exclude, "exclude(name) -> bool"),
        ("evaluate", evaluate, "evaluate(model) -> float"),
        ("on_round_end", on_round_end, "on_round_end(round, model)"),
    ):
        if function is not None:
            _check_callable(function, argument, signature)
    _check_choice(rewind, "rewind", _REWIND_MODES)
    _check_int(rewind_epoch, "rewind_epoch", 0)
    if rewind == "none":
        if rewind_to is not None:
            raise ArgumentValueError(
                "Argument 'rewind_to' is given but rewind='none'; choose rewind='continue' or 'restart'."
            )
        if rewind_epoch != 0:
            raise ArgumentValueError(
                f"Argument 'rewind_epoch' is {rewind_epoch} but has no effect with rewind='none'; leave it at 0."
            )
    elif rewind_to is None:
        raise ArgumentValueError(
            f"Argument 'rewind_to' is missing: rewind={rewind!r} needs the state_dict saved at the rewind epoch."
        )
    targets = _check_targets(target_sparsity)
    schedule = imp_schedule(targets, rate)

    named = dict(model.named_parameters())
    names = default_prunable(model) if params is None else _check_names(params)
    for name in names:
        if name not in named:
            raise MaskError(_unknown_name_message(str(name), list(named), "Parameter"))
    if exclude is not None:
        names = [n for n in names if not exclude(n)]
    if not names:
        raise ArgumentValueError(
            "Arguments 'params' and 'exclude' leave no parameter to prune; check params and exclude."
        )
    current: dict[str, Tensor] = {}
    if masks is not None:
        masks = _check_mask_set(masks)
        validate_masks(model, masks)
        outside = [k for k in masks if k not in names]
        if outside:
            raise MaskError(
                f"Masks {outside} are for parameters that are not pruned; add them to 'params' or drop them."
            )
        current = {k: v.detach().clone() for k, v in masks.items()}
    numel = sum(named[n].numel() for n in names)
    start = _pruned_fraction(current, numel)
    rewind_state = None if rewind_to is None else _check_rewind_state(model, rewind_to)

    work = model if inplace else copy.deepcopy(model)
    result = IMPResult(masks=current, masks_at={}, model=work)
    for target in targets:
        if abs(target - start) <= SAME_LEVEL_TOL:
            result.masks_at[target] = current
    start_epoch = rewind_epoch if rewind == "continue" else 0
    for index, level in enumerate(schedule, start=1):
        if level <= start + SAME_LEVEL_TOL:
            continue
        began = time.perf_counter()
        current = global_magnitude_prune(work, level, masks=current or None, params=names)
        if rewind_state is not None:
            work.load_state_dict(rewind_state)
        apply_masks(work, current)
        imp_round = IMPRound(index, level, current, rewind, start_epoch)
        with enforce_masks(work, current):
            train_fn(work, imp_round)
        _rezero_leaks(work, current, index)
        metric = None if evaluate is None else float(evaluate(work))
        result.history.append(
            {
                "round": index,
                "sparsity": level,
                "achieved": _pruned_fraction(current, numel),
                "metric": metric,
                "seconds": time.perf_counter() - began,
            }
        )
        if any(abs(level - t) <= SAME_LEVEL_TOL for t in targets):
            result.masks_at[min(targets, key=lambda t: abs(t - level))] = current
        if on_round_end is not None:
            on_round_end(imp_round, work)
    result.masks = current
    return result


def _rezero_leaks(model: nn.Module, masks: Mapping[str, Tensor], index: int) -> None:
    """Warn about and zero pruned weights that training left non-zero."""
    named = dict(model.named_parameters())
    leaked = {}
    for name, mask in masks.items():
        weight = named[name].detach()
        count = int((~mask & (weight != 0)).sum())
        if count:
            leaked[name] = count
    if leaked:
        warnings.warn(
            f"IMP round {index}: train_fn left pruned weights non-zero ({leaked}); they were zeroed. "
            "Call ma.enforce_masks(model, round.masks, optimizer) in train_fn so that optimiser state "
            f"(momentum, Adam moments) carried into the round cannot move them. "
            f"See {DOCS_URL}/troubleshooting/#warning-imp-leak",
            UserWarning,
            stacklevel=3,
        )
        with torch.no_grad():
            for name in leaked:
                named[name].masked_fill_(~masks[name], 0)
