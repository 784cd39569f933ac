"""Weight matching: align two models by their weights alone (Ainsworth et al.,
"Git Re-Basin", ICLR 2023, Sec. 3.2, Algorithm 1).

Maximises ``sum_t <pi(W_A[t]), W_B[t]>`` over every parameter and buffer ``t``
that carries a permuted axis (biases and norm parameters included) by
coordinate descent: each group in turn solves a linear assignment with the
other groups' permutations held fixed, until a full sweep changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import SpecError
from .lap import solve_lap
from .permutation import Permutation, check_same_architecture
from .spec import PermutationSpec, build_spec

__all__ = ["match_weights"]


class _Factored:
    """Every spec'd tensor of a state_dict reshaped so that each axis factor is
    its own dim (float64), with the group of each factored dim."""

    def __init__(self, state: Mapping[str, Tensor], spec: PermutationSpec) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.groups: dict[str, list[str | None]] = {}
        for name, axes in spec.axes.items():
            groups = [g for dim in axes for g, _ in dim]
            if not any(g is not None for g in groups):
                continue
            self.tensors[name] = state[name].detach().double().reshape([s for dim in axes for _, s in dim])
            self.groups[name] = groups


def _objective(a: _Factored, b: _Factored, perm: Mapping[str, Tensor]) -> float:
    total = 0.0
    for name, tensor in a.tensors.items():
        for k, g in enumerate(a.groups[name]):
            if g is not None:
                tensor = tensor.index_select(k, perm[g])
        total += float((tensor * b.tensors[name]).sum())
    return total


def match_weights(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec | None = None,
    *,
    example_inputs: Any = None,
    max_iter: int = 100,
    init: Permutation | None = None,
    seed: int | None = None,
) -> Permutation:
    """Find the permutation aligning ``model_a`` to ``model_b`` by weight matching.

    Args:
        model_a, model_b: two models of one architecture (not modified).
        spec: the permutation spec; built from ``model_a`` and
            ``example_inputs`` when omitted.
        example_inputs: forward's inputs, needed only without ``spec``.
        max_iter: maximum number of sweeps over all groups.
        init: warm start (e.g. an activation-matching result); identity if None.
        seed: seed of the random group order of each sweep.

    Returns:
        A :class:`Permutation` ``pi`` with ``apply_permutation(model_a, pi)``
        aligned to ``model_b``; ``pi.report["objective"]`` lists
        ``sum_t <pi(W_A[t]), W_B[t]>`` after every sweep.

    Raises:
        SpecError: neither ``spec`` nor ``example_inputs`` was given.
        SpecMismatchError: the models do not match the spec.
    """
    if spec is None:
        if example_inputs is None:
            raise SpecError(
                "match_weights needs a spec: pass spec=build_spec(model_a, example_inputs) "
                "or example_inputs=..."
            )
        spec = build_spec(model_a, example_inputs)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_same_architecture(state_a, spec, "model_a")
    check_same_architecture(state_b, spec, "model_b")
    fa, fb = _Factored(state_a, spec), _Factored(state_b, spec)
    device = next(iter(fa.tensors.values())).device if fa.tensors else torch.device("cpu")
    occurrences: dict[str, list[tuple[str, int]]] = {g: [] for g in spec.groups}
    for name, groups in fa.groups.items():
        for k, g in enumerate(groups):
            if g is not None:
                occurrences[g].append((name, k))
    perm = {g: (init[g] if init is not None else torch.arange(grp.size)).to(device) for g, grp in spec.groups.items()}
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    names: Sequence[str] = list(spec.groups)
    objective = [_objective(fa, fb, perm)]
    for _ in range(max_iter):
        changed = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            g = names[i]
            similarity = _similarity(fa, fb, perm, g, occurrences[g], spec.groups[g].size, device)
            ar = torch.arange(spec.groups[g].size, device=device)
            old = float(similarity[perm[g], ar].sum())
            idx = solve_lap(similarity).to(device)
            new = float(similarity[idx, ar].sum())
            if new > old + 1e-12 * max(abs(old), 1.0):
                perm[g] = idx
                changed = True
        objective.append(_objective(fa, fb, perm))
        if not changed:
            break
    return Permutation(spec, perm, report={"method": "weight", "objective": objective, "sweeps": len(objective) - 1})


def _similarity(
    fa: _Factored,
    fb: _Factored,
    perm: Mapping[str, Tensor],
    group: str,
    occurrences: list[tuple[str, int]],
    n: int,
    device: torch.device,
) -> Tensor:
    """``(n, n)`` matrix ``sum_t A_t B_t^T`` over the tensors carrying ``group``,
    with every other factored dim of A already permuted by the current ``perm``."""
    similarity = torch.zeros(n, n, dtype=torch.float64, device=device)
    for name, k in occurrences:
        a = fa.tensors[name]
        for k2, g2 in enumerate(fa.groups[name]):
            if g2 is not None and k2 != k:
                a = a.index_select(k2, perm[g2])
        a = a.movedim(k, 0).reshape(n, -1)
        b = fb.tensors[name].movedim(k, 0).reshape(n, -1)
        similarity += a @ b.T
    return similarity
