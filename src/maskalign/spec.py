"""Permutation specs: which tensor axes of a model share one permutation.

A hidden unit of a network can be relabelled without changing the function it
computes, as long as every tensor axis that indexes that unit is relabelled the
same way (Hecht-Nielsen 1990; Ainsworth et al., "Git Re-Basin", ICLR 2023,
Sec. 2). A :class:`PermutationSpec` lists those axes as *groups*.
:func:`build_spec` derives it automatically from the model's graph, so that no
one writes specs by hand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from .capture import CapturedGraph, capture
from .rules import Analysis, analyze

__all__ = ["ActivationPoint", "FrozenAxis", "Group", "PermutationSpec", "build_spec"]

Factor = tuple["str | None", int]
"""One factor of a tensor axis: (group name, or None when not permuted; size)."""

NONLINEAR_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "relu relu_ relu6 gelu gelu_ silu silu_ sigmoid tanh hardtanh hardtanh_ leaky_relu "
        "leaky_relu_ elu elu_ selu mish hardswish hardswish_ softplus prelu"
    ).split()
)
_LAYER_OPS = {
    "aten::linear": 0,
    "aten::conv1d": 0,
    "aten::conv2d": 0,
    "aten::conv3d": 0,
    "aten::conv_transpose1d": 1,
    "aten::conv_transpose2d": 1,
    "aten::conv_transpose3d": 1,
}
_VIEW_OPS = frozenset(
    f"aten::{n}"
    for n in "view reshape _unsafe_view flatten unflatten squeeze unsqueeze permute transpose t expand "
    "clone contiguous alias detach dropout".split()
)


@dataclass(frozen=True)
class Group:
    """A set of tensor axes that share one permutation of ``size`` units.

    ``members`` are ``(state_dict key, dim)`` pairs. When a dim is a product of
    factors (a conv's channels flattened with its spatial positions into a
    linear layer's input, or heads x head_dim), the group is one factor of it.
    """

    name: str
    size: int
    members: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class FrozenAxis:
    """A parameter/buffer axis left unpermuted, and why."""

    tensor: str
    dim: int
    reason: str


@dataclass(frozen=True)
class ActivationPoint:
    """A graph value that carries a group on one of its dims.

    The dim ``dim`` of node ``node`` factors as ``factor_sizes`` (row-major),
    and the group is factor number ``position``.
    """

    node: str
    dim: int
    factor_sizes: tuple[int, ...]
    position: int


@dataclass
class PermutationSpec:
    """Groups of tensor axes sharing one permutation, for one architecture.

    Attributes:
        groups: group name -> :class:`Group`.
        axes: ``state_dict`` key -> one tuple of factors ``(group or None, size)``
            per dim; a size-1 dim has no factors. Every parameter and persistent
            buffer of the model appears here.
        shapes: ``state_dict`` key -> shape.
        frozen: parameter/buffer axes left unpermuted, with the reason.
        coverage: fraction of the output channels of linear/conv layers (those
            that feed a model output excluded) that lie in permutable groups.
        activations: group name -> graph values that carry it, used by
            activation matching.
    """

    groups: dict[str, Group]
    axes: dict[str, tuple[tuple[Factor, ...], ...]]
    shapes: dict[str, tuple[int, ...]]
    frozen: list[FrozenAxis] = field(default_factory=list)
    coverage: float = 1.0
    activations: dict[str, list[ActivationPoint]] = field(default_factory=dict)
    captured: CapturedGraph | None = field(default=None, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """A short hash of the architecture: tensor names, shapes and groups."""
        h = hashlib.sha256()
        for name in sorted(self.axes):
            h.update(f"{name}{self.shapes[name]}{self.axes[name]};".encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        """A readable table of groups, members and frozen axes."""
        lines = [f"PermutationSpec: {len(self.groups)} groups, coverage {self.coverage:.3f}"]
        width = max((len(n) for n in self.groups), default=5)
        lines.append(f"  {'group':<{width}}  size  members")
        for group in self.groups.values():
            members = ", ".join(f"{t}[{d}]" for t, d in group.members[:4])
            more = f", ... (+{len(group.members) - 4})" if len(group.members) > 4 else ""
            lines.append(f"  {group.name:<{width}}  {group.size:>4}  {members}{more}")
        if self.frozen:
            lines.append(f"  frozen axes ({len(self.frozen)}):")
            for axis in self.frozen[:20]:
                lines.append(f"    {axis.tensor}[{axis.dim}]: {axis.reason}")
            if len(self.frozen) > 20:
                lines.append(f"    ... (+{len(self.frozen) - 20})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def build_spec(model: nn.Module, example_inputs: Any, kwargs: Mapping[str, Any] | None = None) -> PermutationSpec:
    """Derive the permutation spec of ``model`` from its graph.

    The model is captured with ``torch.export`` (see :func:`maskalign.capture.capture`),
    checked against eager execution, and analysed by one pass of axis
    propagation (:mod:`maskalign.rules`). Axes that meet an op without a rule are
    frozen, never guessed, so ``apply_permutation(model, random_permutation(spec))``
    computes the same function as ``model``.

    Args:
        model: any ``nn.Module``; not mutated.
        example_inputs: positional inputs of ``forward`` (a tensor or a tuple);
            the batch size does not matter.
        kwargs: keyword inputs of ``forward``.

    Returns:
        The :class:`PermutationSpec`.

    Raises:
        TraceError: the model cannot be captured, or the capture does not
            reproduce the eager outputs.
    """
    captured = capture(model, example_inputs, kwargs)
    return spec_from_analysis(analyze(captured), captured)


def spec_from_analysis(analysis: Analysis, captured: CapturedGraph) -> PermutationSpec:
    """Turn the atom classes of an :class:`Analysis` into a :class:`PermutationSpec`."""
    atoms = analysis.atoms
    names: dict[int, str] = {}
    axes: dict[str, tuple[tuple[Factor, ...], ...]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    members: dict[str, list[tuple[str, int]]] = {}
    frozen: list[FrozenAxis] = []
    for tensor, dims in analysis.tensor_dims.items():
        tensor_axes = []
        for d, dim in enumerate(dims):
            leaves = atoms.leaves(dim)
            factors: list[Factor] = []
            for k, leaf in enumerate(leaves):
                reason = atoms.frozen_reason(leaf)
                if reason is not None:
                    factors.append((None, atoms.size(leaf)))
                    if len(leaves) == 1:
                        frozen.append(FrozenAxis(tensor, d, reason))
                    continue
                if leaf not in names:
                    names[leaf] = f"{tensor}:{d}" if len(leaves) == 1 else f"{tensor}:{d}.{k}"
                factors.append((names[leaf], atoms.size(leaf)))
                members.setdefault(names[leaf], []).append((tensor, d))
            tensor_axes.append(tuple(factors))
        axes[tensor] = tuple(tensor_axes)
        shapes[tensor] = tuple(_dim_size(factors) for factors in tensor_axes)
    # shapes of size-1 dims are not recorded by factors: read them off the graph
    for node in captured.graph.nodes:
        role = captured.roles.get(node.name)
        if role is not None and role.target in shapes:
            shapes[role.target] = tuple(int(s) for s in node.meta["val"].shape)
    groups = {
        name: Group(name, atoms.size(leaf), tuple(dict.fromkeys(members[name])))
        for leaf, name in names.items()
    }
    activations = _activation_points(analysis, names, captured)
    return PermutationSpec(
        groups=groups,
        axes=axes,
        shapes=shapes,
        frozen=frozen,
        coverage=_coverage(analysis, captured),
        activations=activations,
        captured=captured,
    )


def _dim_size(factors: tuple[Factor, ...]) -> int:
    size = 1
    for _, s in factors:
        size *= s
    return size


def _activation_points(
    analysis: Analysis, names: dict[int, str], captured: CapturedGraph
) -> dict[str, list[ActivationPoint]]:
    """Per group, the graph values used by activation matching: the outputs of
    nonlinearities and their inputs (pre-activations, informative even where a
    ReLU unit is dead); every other non-view value when a group meets no
    nonlinearity (e.g. a pre-norm transformer's residual stream)."""
    atoms = analysis.atoms
    preferred_nodes: set[str] = set()
    for node in captured.graph.nodes:
        if analysis.node_ops.get(node.name) in NONLINEAR_OPS:
            preferred_nodes.add(node.name)
            if isinstance(node.args[0], torch.fx.Node):
                preferred_nodes.add(node.args[0].name)
    preferred: dict[str, list[ActivationPoint]] = {}
    other: dict[str, list[ActivationPoint]] = {}
    for node, dims in analysis.node_dims.items():
        op = analysis.node_ops.get(node)
        if op is None or op in _VIEW_OPS:
            continue
        target = preferred if node in preferred_nodes else other
        for d, dim in enumerate(dims):
            leaves = atoms.leaves(dim)
            for k, leaf in enumerate(leaves):
                name = names.get(leaf)
                if name is not None:
                    sizes = tuple(atoms.size(a) for a in leaves)
                    target.setdefault(name, []).append(ActivationPoint(node, d, sizes, k))
    return {name: preferred.get(name) or other.get(name, []) for name in names.values()}


def _coverage(analysis: Analysis, captured: CapturedGraph) -> float:
    atoms = analysis.atoms
    covered = total = 0
    for node in captured.graph.nodes:
        if node.op != "call_function" or analysis.node_ops.get(node.name) not in _LAYER_OPS:
            continue
        weight = node.args[1]
        dims = analysis.node_dims.get(getattr(weight, "name", ""))
        if not dims:
            continue
        out_dim = dims[_LAYER_OPS[analysis.node_ops[node.name]]]
        leaves = atoms.leaves(out_dim)
        reasons = [atoms.frozen_reason(leaf) for leaf in leaves]
        if any(r is not None and r.startswith("model output") for r in reasons):
            continue
        size = 1
        for leaf in leaves:
            size *= atoms.size(leaf)
        total += size
        if all(r is None for r in reasons):
            covered += size
    return covered / total if total else 1.0
