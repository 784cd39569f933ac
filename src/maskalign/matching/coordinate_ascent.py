"""Coordinate ascent over the groups of a spec (Git Re-Basin, Alg. 1), shared
by weight matching and activation matching.

Each step holds every group but one fixed and solves one linear assignment
(:func:`~maskalign.matching.lap.solve_lap`) for that group's ``(n, n)``
similarity; a sweep visits the groups in a random order; sweeps repeat until
one changes nothing (or the caller's stopping rule says so). What the
similarity of a group is, given the others, is the matcher's business: it is
passed in as a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import SpecError
from ..spec.axes import AxisTree, unit_positions
from .lap import solve_lap

__all__ = ["IMPROVEMENT", "coordinate_ascent", "lap_step", "positions_of"]

IMPROVEMENT = 1e-12
"""A step adopts a new assignment only if it raises the group's LAP value by
more than this times a scale (see :func:`lap_step`): a tie, or a gain within
rounding, keeps the current assignment, so that ascent terminates."""


def lap_step(similarity: Tensor, current: Tensor, scale: float | None = None) -> Tensor | None:
    """The best assignment of ``similarity``, if it strictly beats ``current``.

    Args:
        similarity: ``(n, n)`` similarity of A's units (rows) and B's units
            (columns), on the CPU.
        current: ``(n,)`` int64 assignment (``current[j]``: A's unit matched
            to B's unit ``j``), on the CPU.
        scale: the gain must exceed ``IMPROVEMENT * scale``; ``None``:
            ``max(|current's value|, 1)``.

    Returns:
        The LAP solution ``idx`` (as :func:`~maskalign.matching.lap.solve_lap`
        returns it) when ``sum_j similarity[idx[j], j]`` exceeds
        ``current``'s value by more than the margin, else ``None``.
    """
    ar = torch.arange(similarity.shape[0])
    old = float(similarity[current, ar].sum())
    idx = solve_lap(similarity)
    new = float(similarity[idx, ar].sum())
    margin = IMPROVEMENT * (max(abs(old), 1.0) if scale is None else scale)
    return idx if new > old + margin else None


def coordinate_ascent(
    groups: Sequence[str],
    step: Callable[[str], bool],
    generator: torch.Generator,
    max_sweeps: int,
    stop: Callable[[bool], bool] | None = None,
) -> tuple[int, bool]:
    """Sweep over ``groups`` in a random order until a sweep changes nothing.

    Each sweep draws its order with ``torch.randperm(len(groups),
    generator=generator)`` and calls ``step(group)`` for every group, in that
    order; ``step`` solves the group's LAP with the others fixed, adopts the
    result if it is better (e.g. by :func:`lap_step`) and returns whether the
    group changed.

    Args:
        groups: the groups to sweep over (a sweep over none changes nothing).
        step: ``step(group) -> changed``; called for every group of every
            sweep (never skipped once a sweep has changed something).
        generator: source of the sweep orders (advanced by one ``randperm``
            per sweep).
        max_sweeps: at most this many sweeps (``0``: none).
        stop: ``stop(changed) -> bool``, called after every sweep with whether
            it changed a group; ascent stops (converged) when it returns
            true. Default: stop once a sweep changed nothing.

    Returns:
        ``(sweeps, converged)``: the number of sweeps run, and whether the
        last one met the stopping rule (``False`` when ``max_sweeps`` ran
        out first, or no sweep ran).
    """
    done = not_changed if stop is None else stop
    sweeps = 0
    while sweeps < max_sweeps:
        changed = False
        for i in torch.randperm(len(groups), generator=generator).tolist():
            changed |= step(groups[i])
        sweeps += 1
        if done(changed):
            return sweeps, True
    return sweeps, False


def not_changed(changed: bool) -> bool:
    """The default stopping rule of :func:`coordinate_ascent`: a sweep changed nothing."""
    return not changed


def positions_of(tree: AxisTree, group: str, where: str) -> Tensor:
    """``unit_positions(tree, group)``, an ``(n, R)`` int64 tensor, for a group
    that the spec says occurs on ``tree``.

    Raises:
        SpecError: ``group`` does not occur on ``tree`` (a spec whose
            ``axes`` and ``groups`` disagree: edited by hand, or from another
            version); ``where`` names the tensor or point.
    """
    positions = unit_positions(tree, group)
    if positions is None:
        raise SpecError(
            f"Group {group!r} does not occur on the axis of {where} where the spec places it; rebuild the spec "
            "with ma.build_spec(model, example_inputs)."
        )
    return positions
