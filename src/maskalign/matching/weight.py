"""Weight matching: align two models by their weights alone (Ainsworth et al.,
"Git Re-Basin", ICLR 2023, Sec. 3.2, Algorithm 1).

Maximises ``sum_t c_t <pi(W_A[t]), W_B[t]>`` over every floating-point
parameter and buffer ``t`` that carries a permuted axis (biases and norm
parameters included) by coordinate descent: each group in turn solves a linear
assignment with the other groups' permutations held fixed, until a full sweep
changes nothing (or improves the objective by less than a tolerance). The
weight ``c_t`` is 1 for parameters and ``include_buffers`` for buffers (0 by
default: parameters only, as Git Re-Basin's own weight matching).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import (
    ArgumentTypeError,
    ArgumentValueError,
    DataError,
    SpecError,
    SpecMismatchError,
    _check_int,
    _check_module,
    _describe,
)
from ..permutation import Permutation, check_same_architecture
from ..spec.axes import AxisTree, Leaf, co_groups, groups_of, index_vector
from ..spec.permutation_spec import PermutationSpec, build_spec
from .coordinate_ascent import coordinate_ascent, lap_step, positions_of
from .lap import block_lap_values, solve_lap
from .mask_aware import check_mask, check_mask_type

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

    def inner(self, tensors_b: Mapping[str, Tensor], names: Sequence[str]) -> float:
        """``sum_t <pi(A_t), B_t>`` over the tensors ``names``, in float64."""
        return sum(float((self.tensors[t] * tensors_b[t]).sum(dtype=torch.float64)) for t in names)

    def similarity(self, group: str, occurrences: list[_Occurrence], n: int) -> Tensor:
        """``(n, n)`` float64 matrix ``sum_t c_t A_t B_t^T`` over the axes
        carrying ``group`` (``c_t`` the occurrence's weight), every other group
        of A permuted by the current permutation: computed on the fully
        permuted tensors, then rows restored to A's units."""
        total: Tensor | None = None
        for occ in occurrences:
            if occ.weight == 0:
                continue
            moved = self.tensors[occ.tensor].movedim(occ.dim, 0)
            rows = moved.reshape(n, -1) if occ.identity else moved[occ.positions.reshape(-1)].reshape(n, -1)
            part = (rows @ occ.rows_b.T).double()
            if occ.weight != 1.0:
                part = part * occ.weight
            total = part if total is None else total + part
        if total is None:  # no tensor of non-zero weight scored: every assignment ties
            return torch.zeros(n, n, dtype=torch.float64)
        inverse = torch.empty_like(self.perm[group])
        inverse[self.perm[group]] = torch.arange(n, device=inverse.device)
        return total.cpu()[inverse.cpu()]


@dataclass
class _Objective:
    """The objective ``sum_t c_t <pi(A_t), B_t>`` split into parameters and
    buffers: ``value = parameters + buffer_weight * buffers``."""

    parameters: list[str]
    buffers: list[str]
    buffer_weight: float

    def parts(self, aligned: _Aligned, tensors_b: Mapping[str, Tensor]) -> tuple[float, float]:
        """``(parameter inner product, buffer inner product)`` at ``aligned``."""
        return aligned.inner(tensors_b, self.parameters), aligned.inner(tensors_b, self.buffers)

    def value(self, parts: tuple[float, float]) -> float:
        return parts[0] + self.buffer_weight * parts[1] if self.buffer_weight else parts[0]


@dataclass
class _Run:
    """One coordinate-descent run: the permutation, the objective and its two
    parts after every sweep (index 0: the start), and whether it converged."""

    perm: dict[str, Tensor]
    objective: list[float]
    parameters: list[float]
    buffers: list[float]
    converged: bool


def match_weights(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec | None = None,
    *,
    example_inputs: Any = None,
    include_buffers: bool | float = False,
    max_iter: int = 100,
    tol: float = 0.0,
    restarts: int = 1,
    init: Permutation | None = None,
    seed: int | None = None,
    progress: bool = True,
    mask: Mapping[str, Tensor] | None = None,
) -> Permutation:
    """Find the permutation aligning ``model_a`` to ``model_b`` by weight matching.

    Git Re-Basin's weight matching (Ainsworth et al., ICLR 2023, Alg. 1):
    maximise ``J(pi) = sum_t c_t <pi(W_A[t]), W_B[t]>`` over the tensors ``t``
    that carry a permuted axis, by coordinate descent over the groups in a
    random order each sweep, each step one linear assignment with the other
    groups held fixed. ``c_t`` is 1 for a parameter and the weight given by
    ``include_buffers`` for a floating-point buffer (BatchNorm
    ``running_mean`` / ``running_var``, opted-in non-persistent buffers);
    integer buffers such as ``num_batches_tracked`` never enter.

    Buffers are left out by default, as in Git Re-Basin's own code (its
    specs list parameters only): running statistics are not weights, and
    where they are large they dominate the objective and pull the match away
    from the parameters' optimum. On three ResNet20 w=1 pairs trained briefly
    on digits (buffer term 5-7 times the parameter term at the identity),
    the parameter-only objective ended 3.1-3.7% below the mean of Git
    Re-Basin's code over 5 seeds with ``include_buffers=True``, and 0.4-0.7%
    above it, above their best seed on every pair, with the default. A group
    that no tensor of non-zero weight carries (only buffers, with buffers
    excluded) is still matched, by its buffers, so that a permuted copy is
    recovered exactly.

    The first run starts at the identity with a greedy sweep: the groups in
    model order, each scored only by the tensors whose other groups are
    already matched (the identity pairing of a neighbour not matched yet is
    arbitrary and only adds noise to its similarity); coordinate descent
    follows. Like Git Re-Basin's, the result is a local optimum that depends
    on the group order. Against their code over 5 seeds, the greedy start
    beat every seed on MLPs (by 1.5-7%) and on trained or freshly initialised
    ResNet20 pairs (by 0.4-0.7% of their mean); on ResNet20 pairs with random
    BatchNorm weights it was above their mean on average, by less than their
    seed-to-seed spread (about 0.1%). ``restarts=2`` adds a run with the
    greedy sweep in reverse model order.

    Source: weight matching of Git Re-Basin (Ainsworth et al., ICLR 2023,
    Sec. 3.2, Alg. 1).

    Args:
        model_a: the model to align (the permutation applies to it); not
            modified.
        model_b: the reference model, same architecture; not modified.
        spec: the permutation spec; built from ``model_a`` and
            ``example_inputs`` when omitted.
        example_inputs: forward's inputs, needed only without ``spec``.
        include_buffers: whether permuted floating-point buffers enter the
            objective, and with what weight: ``False`` (default; same as
            ``0.0``) parameters only, ``True`` (same as ``1.0``) buffers
            count like parameters (what earlier versions always did), a
            float ``c >= 0`` buffers count ``c`` times.
        max_iter: maximum number of sweeps over all groups per run.
        tol: stop once a sweep improves the objective by at most ``tol``
            times its previous value (relative improvement); ``0.0``
            (default) stops only when a sweep changes no group, as Git
            Re-Basin does.
        restarts: number of runs; the first starts at ``init`` (without
            it, at the identity with a greedy sweep in model order), the
            second without ``init`` at the identity with a greedy sweep in
            reverse order, later ones at random permutations; the run with
            the best final objective is returned.
        init: warm start (e.g. an activation-matching result).
        seed: seed of the random group orders and random restarts.
        progress: show a tqdm progress bar of the sweeps (when tqdm is
            installed; it appears only if matching takes more than half a
            second); ``False`` is silent.
        mask: mask-aware matching (opt-in; issue 17): model A's pruning
            mask, parameter name -> ``torch.bool`` tensor or tensor of 0s
            and 1s of the parameter's shape (the format of
            :func:`~maskalign.permute_mask`, e.g. IMP's mask of A); not
            modified. A's masked weights ``W_A[t] * m_A[t]`` are matched
            against B's dense weights, ``J(pi) = sum_t c_t <pi(W_A[t] *
            m_A[t]), W_B[t]>`` (parameters without a mask stay dense): only
            the weights that survive in A's sparse network decide where its
            units go, which is what the permuted mask carries over to B.
            ``None`` (default): dense A, the result of earlier versions
            bitwise. Measured (``benchmarks/bench_mask_aware.py``, see
            :func:`~maskalign.match_activations`' ``mask``) at sparsity 0.98 and k = 0
            the permuted B_0 gained +1.86 +- 1.70 points of test accuracy
            (paired t = 3.1 over 8 seeds, 1.4 times the seed noise of plain
            weight matching), at k = 10 +0.14 +- 0.81 and at 0.9 +0.19 /
            -0.06, within the noise; the dense barrier rose from 0.014 to
            0.019 (0.9) / 0.052 (0.98); opt-in.

    Returns:
        A :class:`Permutation` ``pi`` with ``apply_permutation(model_a, pi)``
        aligned to ``model_b``. ``pi.report`` holds, for the best run:
        ``"objective"``, ``J`` at the start and after every sweep (a list of
        ``sweeps + 1`` floats, non-decreasing); ``"objective_parameters"``
        and ``"objective_buffers"``, its two inner-product sums (unweighted)
        after every sweep, so ``objective == objective_parameters +
        include_buffers * objective_buffers``; ``"sweeps"``, the sweeps run;
        ``"converged"``, whether it stopped before ``max_iter`` (no group
        changed, or the improvement fell to ``tol``); ``"include_buffers"``,
        the buffer weight as a float; ``"tol"``; and ``"restarts"``, the
        final objective of every run; ``"mask_aware"``, whether ``mask`` was
        given (the objective is then that of A's masked weights).

    Raises:
        ArgumentTypeError: (a ``TypeError``) ``model_a`` or ``model_b`` is
            not a module (e.g. a spec or a ``state_dict`` in its place),
            ``spec`` is not a :class:`~maskalign.spec.PermutationSpec`,
            ``init`` is not a permutation, ``max_iter`` / ``restarts`` /
            ``seed`` is not an int, ``include_buffers`` is not a bool or a
            real number, ``tol`` is not a real number (or is a bool), or
            ``mask`` is not a mapping (or is a permutation).
        ArgumentValueError: (a ``ValueError``) ``restarts < 1``,
            ``max_iter < 0``, or ``include_buffers`` / ``tol`` is negative,
            NaN or infinite.
        SpecError: neither ``spec`` nor ``example_inputs`` was given.
        SpecMismatchError: the models do not match the spec, hold a tensor in
            different dtypes, or ``init`` was made for another spec.
        DataError: (a ``ValueError``) a weight the matching reads is NaN or
            infinite (the message names the model and the tensor).
        MaskError: (a ``ValueError``) ``mask`` names a key that is not a
            parameter of the spec, or holds a value that is not a dense
            tensor of the parameter's shape and of 0s and 1s (the key named).

    Example:
        >>> import torch, maskalign as ma
        >>> from maskalign.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model_b = MLP(in_features=64, hidden=(32, 32), num_classes=10)
        >>> spec = ma.build_spec(model_b, torch.randn(2, 64))
        >>> sigma = ma.random_permutation(spec, torch.Generator().manual_seed(1))
        >>> model_a = ma.apply_permutation(model_b, sigma)      # B with its hidden units relabelled
        >>> pi = ma.match_weights(model_a, model_b, spec)       # the relabelling that undoes it
        >>> pi == sigma.inverse()
        True
        >>> aligned = ma.apply_permutation(model_a, pi)
        >>> torch.equal(aligned.layers[0].weight, model_b.layers[0].weight)
        True
    """
    call = "match_weights(model_a, model_b, spec)"
    _check_module(model_a, "model_a", call)
    _check_module(model_b, "model_b", call)
    if spec is not None and not isinstance(spec, PermutationSpec):
        raise ArgumentTypeError(
            f"Argument 'spec' is {_describe(spec)}, not a PermutationSpec; pass spec=ma.build_spec(model_a, "
            "example_inputs), or example_inputs=... instead."
        )
    buffer_weight = _check_weight(include_buffers, "include_buffers", "False, True or a float weight >= 0")
    tolerance = _check_weight(tol, "tol", "a float >= 0 (relative improvement per sweep)", allow_bool=False)
    _check_int(max_iter, "max_iter", 0)
    _check_int(restarts, "restarts", 1)
    _check_int(seed, "seed", 0, allow_none=True)
    if not isinstance(progress, bool):
        raise ArgumentTypeError(f"Argument 'progress' is {_describe(progress)}; pass True or False.")
    if init is not None and not isinstance(init, Permutation):
        raise ArgumentTypeError(
            f"Argument 'init' is {_describe(init)}, not a Permutation; pass the result of a matcher, e.g. "
            "init=ma.match_activations(model_a, model_b, data, spec)."
        )
    if mask is not None:
        check_mask_type(mask)
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
    check_same_architecture(model_a, spec, "model_a")
    check_same_architecture(model_b, spec, "model_b")
    state_a, state_b = _state(model_a, spec), _state(model_b, spec)
    carrying = [
        t
        for t, axes in spec.axes.items()
        if any(next(groups_of(tree), None) for tree in axes) and _enters(state_a[t], state_b[t])
    ]
    _check_weights(state_a, state_b, carrying)
    tensors_a = {t: _working(state_a[t]) for t in carrying}
    if mask is not None:  # A's masked weights w * m against B's dense ones
        for t, keep in check_mask(mask, spec).items():
            if t in tensors_a:
                tensors_a[t] = tensors_a[t] * keep.to(tensors_a[t].device, tensors_a[t].dtype)
    tensors_b = {t: _working(state_b[t]) for t in carrying}
    weights = {t: 1.0 if t in spec.parameters else buffer_weight for t in carrying}
    target = _Objective(
        [t for t in carrying if t in spec.parameters], [t for t in carrying if t not in spec.parameters], buffer_weight
    )
    device = next(iter(tensors_a.values())).device if tensors_a else torch.device("cpu")
    occurrences: dict[str, list[_Occurrence]] = {g: [] for g in spec.groups}
    for t in carrying:
        for d, tree in enumerate(spec.axes[t]):
            for g in dict.fromkeys(groups_of(tree)):
                positions = positions_of(tree, g, f"tensor {t!r} (dim {d})")
                rows = tensors_b[t].movedim(d, 0)[positions.reshape(-1).to(device)]
                identity = isinstance(tree, Leaf)
                rows_b = rows.reshape(positions.shape[0], -1)
                occurrences[g].append(_Occurrence(t, d, positions.to(device), rows_b, identity, weights[t]))
    for g, found in occurrences.items():
        if found and all(occ.weight == 0 for occ in found):
            # only zero-weight tensors carry this group: they match it in its own LAP (J does not depend on it)
            occurrences[g] = [dataclasses.replace(occ, weight=1.0) for occ in found]
    nested = [g for g in spec.groups if any(co_groups(spec.axes[o.tensor][o.dim], g) for o in occurrences[g])]
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    runs: list[_Run] = []
    bar = _sweep_bar(progress)
    for restart in range(restarts):
        if bar is not None and restarts > 1:
            bar.set_description_str(f"weight matching, run {restart + 1} of {restarts}")
        greedy: list[str] | None = None
        if restart == 0 and init is not None:
            start = {g: init[g].to(device) for g in spec.groups}
        elif restart < 2 and init is None:  # greedy first sweeps, in model order, then in reverse
            start = {g: torch.arange(grp.size, device=device) for g, grp in spec.groups.items()}
            greedy = list(spec.groups) if restart == 0 else list(reversed(spec.groups))
        else:  # later restarts begin at a random permutation
            start = {g: torch.randperm(grp.size, generator=generator).to(device) for g, grp in spec.groups.items()}
        if greedy is not None and nested:
            # flat groups first, then nested ones (heads) as blocks, then everything
            flat = [g for g in greedy if g not in nested]
            first = _run_from(
                spec, tensors_a, tensors_b, occurrences, target, start, max_iter, tolerance, generator, flat, flat, bar
            )
            start = first.perm
            for g in nested:
                start[g] = solve_lap(_block_start(spec, tensors_a, start, g, occurrences[g])).to(device)
            greedy = None
        run = _run_from(
            spec, tensors_a, tensors_b, occurrences, target, start, max_iter, tolerance, generator, None, greedy, bar
        )
        runs.append(run)
    if bar is not None:
        bar.close()
    finals = [run.objective[-1] for run in runs]
    best = runs[finals.index(max(finals))]  # the first of the best (restarts >= 1: never empty)
    report = {
        "method": "weight",
        "objective": best.objective,
        "objective_parameters": best.parameters,
        "objective_buffers": best.buffers,
        "sweeps": len(best.objective) - 1,
        "converged": best.converged,
        "include_buffers": buffer_weight,
        "tol": tolerance,
        "restarts": finals,
        "mask_aware": mask is not None,
    }
    return Permutation(spec, best.perm, report=report)


def _check_weight(value: Any, argument: str, expected: str, *, allow_bool: bool = True) -> float:
    """``value`` as a finite float ``>= 0`` (``True`` -> 1.0, ``False`` -> 0.0
    with ``allow_bool``).

    Raises:
        ArgumentTypeError: ``value`` is not a real number (or a bool where
            ``allow_bool`` is false).
        ArgumentValueError: it is negative, NaN or infinite.
    """
    if isinstance(value, bool):
        if allow_bool:
            return float(value)
        raise ArgumentTypeError(f"Argument {argument!r} is {value!r}; pass {expected}.")
    if not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"Argument {argument!r} is {_describe(value)}; pass {expected}.")
    number = float(value)
    if not math.isfinite(number) or number < 0.0:
        raise ArgumentValueError(f"Argument {argument!r} is {value!r}; pass {expected}.")
    return number


def _state(model: nn.Module, spec: PermutationSpec) -> dict[str, Tensor]:
    """``model``'s ``state_dict`` plus the spec's opted-in non-persistent
    buffers (which the ``state_dict`` leaves out)."""
    state = dict(model.state_dict())
    for name in spec.nonpersistent:
        state[name] = model.get_buffer(name)
    return state


def _enters(a: Tensor, b: Tensor) -> bool:
    """Whether a tensor can enter the objective: floating point in both
    models; integer buffers (``num_batches_tracked``, index tables) never do."""
    return a.is_floating_point() and b.is_floating_point()


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


def _run_from(
    spec: PermutationSpec,
    tensors_a: Mapping[str, Tensor],
    tensors_b: Mapping[str, Tensor],
    occurrences: Mapping[str, list[_Occurrence]],
    target: _Objective,
    perm: dict[str, Tensor],
    max_iter: int,
    tol: float,
    generator: torch.Generator,
    groups: Sequence[str] | None = None,
    greedy: Sequence[str] | None = None,
    bar: Any = None,
) -> _Run:
    """Git Re-Basin Alg. 1 from ``perm``
    (:func:`~maskalign.matching.coordinate_ascent.coordinate_ascent`): sweeps
    over the groups (all, or ``groups``) in random order, each solving one LAP
    with the others fixed (a group changes only if that strictly raises its
    LAP value, :func:`~maskalign.matching.coordinate_ascent.lap_step`), until a
    sweep changes nothing, the sweep's relative improvement of the objective
    is at most ``tol``, or ``max_iter`` sweeps ran.

    With ``greedy`` (an order of the groups), the first sweep visits the
    groups in that order and scores each only by the tensors whose other
    groups it already visited (all of the group's tensors if there are
    none): the start's pairing of a not yet matched neighbour is arbitrary,
    and counting it adds noise. That sweep is kept only if it does not lower
    the objective. ``bar`` (a tqdm bar or ``None``) counts the sweeps."""
    aligned = _Aligned(spec, tensors_a, perm)
    names: Sequence[str] = list(spec.groups) if groups is None else list(groups)
    parts = [target.parts(aligned, tensors_b)]
    objective = [target.value(parts[0])]
    converged = False
    if greedy is not None and max_iter > 0:
        carried: dict[str, set[str]] = {o.tensor: set() for occs in occurrences.values() for o in occs}
        for g, occs in occurrences.items():
            for o in occs:
                carried[o.tensor].add(g)
        visited: set[str] = set()
        changed = False
        for g in greedy:
            visited.add(g)
            known = [o for o in occurrences[g] if carried[o.tensor] <= visited]
            changed |= _step(aligned, g, known or occurrences[g], occurrences[g], spec.groups[g].size)
        greedy_parts = target.parts(aligned, tensors_b)
        if changed and target.value(greedy_parts) >= objective[0]:
            parts.append(greedy_parts)
            objective.append(target.value(greedy_parts))
            converged = _small_gain(objective, tol)
        else:  # the greedy sweep did not help: start over from perm
            aligned = _Aligned(spec, tensors_a, perm)
    if not converged:

        def step(g: str) -> bool:
            return _step(aligned, g, occurrences[g], occurrences[g], spec.groups[g].size)

        def stop(changed: bool) -> bool:  # record the sweep's objective; stop on no change or a small gain
            parts.append(target.parts(aligned, tensors_b))
            objective.append(target.value(parts[-1]))
            if bar is not None:
                bar.set_postfix_str(f"objective {objective[-1]:.6g}", refresh=False)
                bar.update()
            return not changed or _small_gain(objective, tol)

        _, converged = coordinate_ascent(names, step, generator, max_iter + 1 - len(objective), stop)
    return _Run(aligned.perm, objective, [p[0] for p in parts], [p[1] for p in parts], converged)


def _sweep_bar(progress: bool) -> Any:
    """A tqdm bar counting sweeps (shown after half a second), or ``None``
    without ``progress`` or without tqdm."""
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(desc="weight matching", unit="sweep", leave=False, delay=0.5)


def _small_gain(objective: Sequence[float], tol: float) -> bool:
    """Whether the last sweep raised the objective by at most ``tol`` times
    its previous value (never with ``tol == 0``)."""
    return tol > 0 and objective[-1] - objective[-2] <= tol * max(abs(objective[-2]), 1e-300)


def _step(aligned: _Aligned, group: str, scored: list[_Occurrence], moved: list[_Occurrence], n: int) -> bool:
    """One LAP for ``group`` on the similarity of the occurrences ``scored``;
    adopt it (updating the tensors of ``moved``, all of the group's
    occurrences) if it strictly beats the current assignment. Returns whether
    the group changed."""
    idx = lap_step(aligned.similarity(group, scored, n), aligned.perm[group].cpu())
    if idx is None:
        return False
    aligned.set(group, idx.to(aligned.perm[group].device), moved)
    return True


@dataclass(frozen=True)
class _Occurrence:
    """Group units on axis ``dim`` of ``tensor``: ``positions`` (n, R) and B's
    rows gathered at them, flattened to (n, R * rest); ``weight`` is the
    tensor's weight in the objective."""

    tensor: str
    dim: int
    positions: Tensor
    rows_b: Tensor
    identity: bool  # the axis is the group itself: rows need no gather
    weight: float = 1.0


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
            total += occ.weight * block_lap_values(torch.einsum("irm,jsm->ijrs", rows_a, rows_b))
        else:
            total += occ.weight * (rows_a.reshape(n, -1) @ rows_b.reshape(n, -1).T).double().cpu()
    return total
