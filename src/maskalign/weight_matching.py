"""Weight matching: align two models by their weights alone (Ainsworth et al.,
"Git Re-Basin", ICLR 2023, Sec. 3.2, Algorithm 1).

Maximises ``sum_t <pi(W_A[t]), W_B[t]>`` over every parameter and buffer ``t``
that carries a permuted axis (biases and norm parameters included) by
coordinate descent: each group in turn solves a linear assignment with the
other groups' permutations held fixed, until a full sweep changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .axes import AxisTree, Leaf, co_groups, groups_of, index_vector, unit_positions
from .errors import (
    ArgumentTypeError,
    DataError,
    SpecError,
    SpecMismatchError,
    _check_int,
    _check_module,
    _describe,
)
from .lap import block_lap_values, solve_lap
from .permutation import Permutation, check_same_architecture
from .spec import PermutationSpec, build_spec

__all__ = ["match_weights"]


def _working(tensor: Tensor) -> Tensor:
    """A detached copy in float32 or float64 (the tensor's own precision)."""
    tensor = tensor.detach()
    return tensor.clone() if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _permuted(
    tensor: Tensor, axes: tuple[AxisTree, ...], perm: Mapping[str, Tensor], skip: tuple[int, str] | None = None
) -> Tensor:
    """``tensor`` with every axis permuted by ``perm``; on axis ``skip[0]`` the
    group ``skip[1]`` is left unpermuted."""
    for d, tree in enumerate(axes):
        if next(groups_of(tree), None) is None:
            continue
        exclude = skip[1] if skip is not None and skip[0] == d else None
        tensor = tensor.index_select(d, index_vector(tree, perm, exclude).to(tensor.device))
    return tensor


class _Aligned:
    """A's tensors permuted by the current permutation on every axis, kept up
    to date one ``index_select`` per changed axis (never re-permuted whole)."""

    def __init__(self, spec: PermutationSpec, tensors_a: Mapping[str, Tensor], perm: Mapping[str, Tensor]) -> None:
        self.spec = spec
        self.perm = dict(perm)
        self.tensors = {t: _permuted(a, spec.axes[t], perm) for t, a in tensors_a.items()}

    def set(self, group: str, idx: Tensor, occurrences: list[_Occurrence]) -> None:
        inverse = torch.empty_like(self.perm[group])
        inverse[self.perm[group]] = torch.arange(inverse.numel(), device=inverse.device)
        relative = {group: inverse[idx]}  # old^-1 o new, on this group's factor only
        for occ in occurrences:
            step = index_vector(self.spec.axes[occ.tensor][occ.dim], relative).to(idx.device)
            self.tensors[occ.tensor] = self.tensors[occ.tensor].index_select(occ.dim, step)
        self.perm[group] = idx

    def objective(self, tensors_b: Mapping[str, Tensor]) -> float:
        """``sum_t <pi(A_t), B_t>`` over the tensors that carry a group."""
        return sum(float((a * tensors_b[t]).sum(dtype=torch.float64)) for t, a in self.tensors.items())

    def similarity(self, group: str, occurrences: list[_Occurrence], n: int) -> Tensor:
        """``(n, n)`` float64 matrix ``sum_t A_t B_t^T`` over the axes carrying
        ``group``, every other group of A permuted by the current permutation:
        computed on the fully permuted tensors, then rows restored to A's units."""
        total: Tensor | None = None
        for occ in occurrences:
            moved = self.tensors[occ.tensor].movedim(occ.dim, 0)
            rows = moved.reshape(n, -1) if occ.identity else moved[occ.positions.reshape(-1)].reshape(n, -1)
            part = rows @ occ.rows_b.T
            total = part if total is None else total + part
        assert total is not None
        inverse = torch.empty_like(self.perm[group])
        inverse[self.perm[group]] = torch.arange(n, device=inverse.device)
        return total.double().cpu()[inverse.cpu()]


def match_weights(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec | None = None,
    *,
    example_inputs: Any = None,
    max_iter: int = 100,
    restarts: int = 1,
    init: Permutation | None = None,
    seed: int | None = None,
) -> Permutation:
    """Find the permutation aligning ``model_a`` to ``model_b`` by weight matching.

    Args:
        model_a: the model to align (the permutation applies to it); not
            modified.
        model_b: the reference model, same architecture; not modified.
        spec: the permutation spec; built from ``model_a`` and
            ``example_inputs`` when omitted.
        example_inputs: forward's inputs, needed only without ``spec``.
        max_iter: maximum number of sweeps over all groups.
        restarts: number of runs; the first starts at ``init`` (identity if
            None), later ones at random permutations; the run with the best
            final objective is returned.
        init: warm start (e.g. an activation-matching result).
        seed: seed of the random group orders and random restarts.

    Returns:
        A :class:`Permutation` ``pi`` with ``apply_permutation(model_a, pi)``
        aligned to ``model_b``; ``pi.report["objective"]`` lists
        ``sum_t <pi(W_A[t]), W_B[t]>`` after every sweep of the best run and
        ``pi.report["restarts"]`` the final objective of every run.

    Raises:
        ArgumentTypeError: (a ``TypeError``) ``model_a`` or ``model_b`` is
            not a module (e.g. a spec or a ``state_dict`` in its place),
            ``spec`` is not a :class:`~maskalign.spec.PermutationSpec`,
            ``init`` is not a permutation, or ``max_iter`` / ``restarts`` /
            ``seed`` is not an int.
        ArgumentValueError: (a ``ValueError``) ``restarts < 1`` or
            ``max_iter < 0``.
        SpecError: neither ``spec`` nor ``example_inputs`` was given.
        SpecMismatchError: the models do not match the spec, hold a tensor in
            different dtypes, or ``init`` was made for another spec.
        DataError: (a ``ValueError``) a weight the matching reads is NaN or
            infinite (the message names the model and the tensor).
    """
    call = "match_weights(model_a, model_b, spec)"
    _check_module(model_a, "model_a", call)
    _check_module(model_b, "model_b", call)
    if spec is not None and not isinstance(spec, PermutationSpec):
        raise ArgumentTypeError(
            f"Argument 'spec' is {_describe(spec)}, not a PermutationSpec; pass spec=ma.build_spec(model_a, "
            "example_inputs), or example_inputs=... instead."
        )
    _check_int(max_iter, "max_iter", 0)
    _check_int(restarts, "restarts", 1)
    _check_int(seed, "seed", 0, allow_none=True)
    if init is not None and not isinstance(init, Permutation):
        raise ArgumentTypeError(
            f"Argument 'init' is {_describe(init)}, not a Permutation; pass the result of a matcher, e.g. "
            "init=ma.match_activations(model_a, model_b, data, spec)."
        )
    if spec is None:
        if example_inputs is None:
            raise SpecError(
                "Argument 'spec' is missing and so is 'example_inputs'; pass spec=build_spec(model_a, "
                "example_inputs) or example_inputs=..."
            )
        if isinstance(example_inputs, Mapping):  # keyword inputs, as for a transformers model
            spec = build_spec(model_a, (), dict(example_inputs))
        else:
            spec = build_spec(model_a, example_inputs)
    if init is not None:
        _check_init(init, spec)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_same_architecture(model_a, spec, "model_a")
    check_same_architecture(model_b, spec, "model_b")
    carrying = [t for t, axes in spec.axes.items() if any(next(groups_of(tree), None) for tree in axes)]
    _check_weights(state_a, state_b, carrying)
    tensors_a = {t: _working(state_a[t]) for t in carrying}
    tensors_b = {t: _working(state_b[t]) for t in carrying}
    device = next(iter(tensors_a.values())).device if tensors_a else torch.device("cpu")
    occurrences: dict[str, list[_Occurrence]] = {g: [] for g in spec.groups}
    for t in carrying:
        for d, tree in enumerate(spec.axes[t]):
            for g in dict.fromkeys(groups_of(tree)):
                positions = unit_positions(tree, g)
                assert positions is not None
                rows = tensors_b[t].movedim(d, 0)[positions.reshape(-1).to(device)]
                identity = isinstance(tree, Leaf)
                rows_b = rows.reshape(positions.shape[0], -1)
                occurrences[g].append(_Occurrence(t, d, positions.to(device), rows_b, identity))
    nested = [g for g in spec.groups if any(co_groups(spec.axes[o.tensor][o.dim], g) for o in occurrences[g])]
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    best: tuple[dict[str, Tensor], list[float]] | None = None
    finals: list[float] = []
    for restart in range(restarts):
        if restart == 0 and init is not None:
            start = {g: init[g].to(device) for g in spec.groups}
        elif restart == 0:
            start = {g: torch.arange(grp.size, device=device) for g, grp in spec.groups.items()}
        else:  # later restarts begin at a random permutation
            start = {g: torch.randperm(grp.size, generator=generator).to(device) for g, grp in spec.groups.items()}
        if restart == 0 and init is None and nested:
            # flat groups first, then nested ones (heads) as blocks, then everything
            flat = [g for g in spec.groups if g not in nested]
            start, _ = _coordinate_descent(spec, tensors_a, tensors_b, occurrences, start, max_iter, generator, flat)
            for g in nested:
                start[g] = solve_lap(_block_start(spec, tensors_a, start, g, occurrences[g])).to(device)
        perm, objective = _coordinate_descent(spec, tensors_a, tensors_b, occurrences, start, max_iter, generator)
        finals.append(objective[-1])
        if best is None or objective[-1] > best[1][-1]:
            best = (perm, objective)
    assert best is not None
    perm, objective = best
    report = {"method": "weight", "objective": objective, "sweeps": len(objective) - 1, "restarts": finals}
    return Permutation(spec, perm, report=report)


def _check_init(init: Permutation, spec: PermutationSpec) -> None:
    """Raise :class:`SpecMismatchError` unless ``init`` has every group of
    ``spec`` with the group's size."""
    for name, group in spec.groups.items():
        if name not in init or init[name].numel() != group.size:
            got = "no such group" if name not in init else f"{init[name].numel()} units"
            raise SpecMismatchError(
                f"Argument 'init' does not fit the spec: group {name!r} has {group.size} units in the spec but "
                f"{got} in init; pass a permutation made with this spec."
            )


def _check_weights(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], names: Sequence[str]) -> None:
    """The tensors ``names`` of both models are finite and of one dtype.

    Raises:
        SpecMismatchError: a tensor's dtype differs between the models.
        DataError: a tensor holds NaN or infinite entries.
    """
    for name in names:
        a, b = state_a[name], state_b[name]
        if a.is_floating_point() and b.is_floating_point() and a.dtype != b.dtype:
            raise SpecMismatchError(
                f"Tensor {name!r} is {a.dtype} in model_a but {b.dtype} in model_b; convert both models to "
                f"one dtype, e.g. model_b.to({a.dtype})."
            )
        for which, tensor in (("model_a", a), ("model_b", b)):
            if tensor.is_floating_point() or tensor.is_complex():
                bad = int((~torch.isfinite(tensor.detach())).sum())
                if bad:
                    raise DataError(
                        f"Tensor {name!r} of {which} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} "
                        "(NaN or inf), which weight matching cannot rank; fix or reload the weights "
                        "(a diverged training run?)."
                    )


def _coordinate_descent(
    spec: PermutationSpec,
    tensors_a: Mapping[str, Tensor],
    tensors_b: Mapping[str, Tensor],
    occurrences: Mapping[str, list[_Occurrence]],
    perm: dict[str, Tensor],
    max_iter: int,
    generator: torch.Generator,
    groups: Sequence[str] | None = None,
) -> tuple[dict[str, Tensor], list[float]]:
    """Git Re-Basin Alg. 1 from ``perm``: sweeps over the groups (all, or
    ``groups``) in random order, each solving one LAP with the others fixed,
    until a sweep changes nothing. Returns the permutation and the objective
    after every sweep."""
    aligned = _Aligned(spec, tensors_a, perm)
    names: Sequence[str] = list(spec.groups) if groups is None else list(groups)
    objective = [aligned.objective(tensors_b)]
    for _ in range(max_iter):
        changed = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            g = names[i]
            n = spec.groups[g].size
            similarity = aligned.similarity(g, occurrences[g], n)
            ar = torch.arange(n)
            old = float(similarity[aligned.perm[g].cpu(), ar].sum())
            idx = solve_lap(similarity)
            new = float(similarity[idx, ar].sum())
            if new > old + 1e-12 * max(abs(old), 1.0):
                aligned.set(g, idx.to(aligned.perm[g].device), occurrences[g])
                changed = True
        objective.append(aligned.objective(tensors_b))
        if not changed:
            break
    return aligned.perm, objective


@dataclass(frozen=True)
class _Occurrence:
    """Group units on axis ``dim`` of ``tensor``: ``positions`` (n, R) and B's
    rows gathered at them, flattened to (n, R * rest)."""

    tensor: str
    dim: int
    positions: Tensor
    rows_b: Tensor
    identity: bool  # the axis is the group itself: rows need no gather


def _block_start(
    spec: PermutationSpec,
    tensors_a: Mapping[str, Tensor],
    perm: Mapping[str, Tensor],
    group: str,
    occurrences: list[_Occurrence],
    max_elements: int = 50_000_000,
) -> Tensor:
    """Starting ``(n, n)`` similarity of a nested group (e.g. heads): where the
    group's units are blocks of positions (a head's dims), unit pairs score
    the best assignment between their blocks (:func:`block_lap_values`), blind
    to the not-yet-known permutation inside the blocks."""
    n = spec.groups[group].size
    total = torch.zeros(n, n, dtype=torch.float64)
    for occ in occurrences:
        a = _permuted(tensors_a[occ.tensor], spec.axes[occ.tensor], perm, skip=(occ.dim, group))
        rows_a = a.movedim(occ.dim, 0)[occ.positions.reshape(-1)].reshape(n, occ.positions.shape[1], -1)
        rows_b = occ.rows_b.reshape(rows_a.shape)
        r, m = rows_a.shape[1], rows_a.shape[2]
        if r > 1 and n * n * r * (r + m) <= max_elements:
            total += block_lap_values(torch.einsum("irm,jsm->ijrs", rows_a, rows_b))
        else:
            total += (rows_a.reshape(n, -1) @ rows_b.reshape(n, -1).T).double().cpu()
    return total
