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
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from .._utils.modes import mode_difference, plain_tensors, preserved_attributes
from ..errors import ArgumentTypeError, SpecError, _describe
from .atoms import AtomTable, Freeze
from .axes import AxisTree, Concat, Leaf, Product, groups_of, tree_size
from .capture import CapturedGraph, capture, split_inputs
from .rules import Analysis, analyze

__all__ = ["ActivationPoint", "FrozenAxis", "Group", "PermutationSpec", "build_spec", "module_types", "storage_sharing"]


@dataclass(frozen=True)
class Group:
    """A set of tensor axes that share one permutation of ``size`` units.

    ``members`` are ``(state_dict key, dim)`` pairs. When a dim is a product of
    factors (a conv's channels flattened with its spatial positions into a
    linear layer's input, or heads x head_dim) or a concatenation (``torch.cat``
    slices), the group is one part of it: see ``PermutationSpec.axes``.
    """

    name: str
    size: int
    members: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class FrozenAxis:
    """A parameter/buffer axis left unpermuted, and why.

    ``op``: the op (``"aten::roll"``) or category (``"model input"``,
    ``"constant"``) that froze it; ``structural``: the axis is not a hidden
    axis at all (model input or output, spatial, vocabulary), so it does not
    count against :attr:`PermutationSpec.coverage`.
    """

    tensor: str
    dim: int
    reason: str
    op: str | None = None
    structural: bool = False


ACTIVATION_KINDS = ("pre", "post", "value")
"""The kinds of :class:`ActivationPoint`, see :attr:`ActivationPoint.kind`."""


@dataclass(frozen=True)
class ActivationPoint:
    """A graph value that carries groups: its dims ``dims`` (those with a
    permuted factor) decompose as ``trees``. Activation matching moves these
    dims last and flattens them into one *joint axis* whose tree is ``tree``;
    every other dim (batch, spatial, sequence) indexes samples.

    ``kind`` says what the value is to the nonlinearities of the graph (nodes
    whose op has the ``"nonlinearity"`` role: ReLU, GELU, SiLU, tanh...):

    * ``"pre"``: the input of a nonlinearity (a pre-activation);
    * ``"post"``: the output of a nonlinearity (a post-activation);
    * ``"value"``: any other non-view value carrying the group; listed only
      for groups that meet no nonlinearity input (a pre-norm transformer's
      residual stream, attention heads, a group whose nonlinearity reads it
      through a reshape).

    A value that is both (``relu(relu(x))``'s middle value) is listed once
    per kind.
    """

    node: str
    dims: tuple[int, ...]
    trees: tuple[AxisTree, ...]
    kind: str = "pre"

    @property
    def tree(self) -> AxisTree:
        return self.trees[0] if len(self.trees) == 1 else Product(self.trees)


@dataclass
class PermutationSpec:
    """Groups of tensor axes sharing one permutation, for one architecture.

    Attributes:
        groups: group name -> :class:`Group`.
        axes: ``state_dict`` key -> one :mod:`axis tree <maskalign.spec.axes>` per
            dim (``Leaf(group or None, size)``, ``Product``, ``Concat``). Every
            parameter and persistent buffer of the model appears here.
        shapes: ``state_dict`` key -> shape.
        frozen: parameter/buffer axes left unpermuted, with the reason.
        parameters: the keys of ``axes`` that are parameters (not buffers).
        nonpersistent: the keys of ``axes`` that are module buffers outside
            the ``state_dict`` (opted in with ``permutable_buffers``).
        logical: logical parameter names of modules in ``torch.nn.utils.prune``
            form (``"conv.weight"`` -> ``"conv.weight_orig"``), so that masks
            keyed by the usual names can be permuted.
        coverage: the fraction of hidden-axis units of the model's parameters
            that lie in permutation groups. Every dim of every parameter (each
            factor of a product dim, each slice of a concatenated one) of size
            > 1 counts with its size, except *structural* axes, which are not
            hidden units at all: axes tied to a model input or output (a first
            layer's inputs, a classifier's classes), spatial axes of kernels,
            vocabularies, the index of stacked or unbound tensors, parameters
            forward never reads. 1.0 means every hidden unit can be permuted.
        frozen_share: op (or category) -> the fraction of the same hidden-axis
            units that it froze; ``coverage + sum(frozen_share.values()) == 1``.
        train_mode: how train mode was covered: ``"same graph as eval mode"``
            (the model runs the same calls on the same tensors in both modes,
            see :mod:`maskalign._utils.modes`), or ``"own graph analysed (...)"`` with
            where the modes part: then the train-mode graph's constraints were
            added, so that every permutation keeps both functions.
        plain_tensors: where the model kept tensors outside its parameters
            and buffers when the spec was built (see
            :func:`maskalign._utils.modes.plain_tensors`); the graph reads those as
            constants, so they freeze their axes. Tensors that appear there
            later (a cache that forward filled) would not be permuted, and
            :func:`~maskalign.apply_permutation` refuses such a model.
        activations: group name -> the graph values that carry it, in graph
            order, each an :class:`ActivationPoint` whose ``kind`` is
            ``"pre"`` (input of a nonlinearity), ``"post"`` (its output) or
            ``"value"`` (any other non-view value, listed only for groups that
            meet no nonlinearity input). Activation matching picks among them
            (``match_activations(..., points=..., stream_points=...)``).
        module_types: module path (``""`` for the model itself) -> class
            name, for every module that holds a parameter or buffer or
            contains one that does (see :func:`module_types`). It is what
            :func:`~maskalign.apply_permutation` compares cheaply against the
            model it permutes; empty for a spec of an ``ExportedProgram``
            (then that comparison is skipped).
        shared_storage: names of parameters and buffers that share one
            storage as distinct tensors, per storage (``dec.weight =
            nn.Parameter(enc.weight.t())``, a view of another parameter), as
            found when the spec was built (see :func:`storage_sharing`).
            :func:`~maskalign.apply_permutation` permutes them only when the
            permutation keeps the shared storage consistent, and keeps them
            sharing it. One tensor object under several names (tied weights)
            is not listed: its names are in the same groups already.
        captured: the model's captured graph (eval mode) that the spec was
            derived from; :func:`~maskalign.match_activations` runs both
            models through it. None for a spec not made by
            :func:`build_spec`, which activation matching refuses.
        cache: graphs captured later for inputs of other shapes (by
            activation matching), kept for later calls; not part of the
            spec's identity (not compared, not shown).

    Source: the permutation spec of Git Re-Basin (Ainsworth et al., ICLR
    2023), derived by :func:`build_spec` from the graph.
    """

    groups: dict[str, Group]
    axes: dict[str, tuple[AxisTree, ...]]
    shapes: dict[str, tuple[int, ...]]
    frozen: list[FrozenAxis] = field(default_factory=list)
    parameters: frozenset[str] = frozenset()
    nonpersistent: frozenset[str] = frozenset()
    logical: dict[str, str] = field(default_factory=dict)
    coverage: float = 1.0
    frozen_share: dict[str, float] = field(default_factory=dict)
    train_mode: str = "same graph as eval mode"
    plain_tensors: frozenset[str] = frozenset()
    activations: dict[str, list[ActivationPoint]] = field(default_factory=dict)
    module_types: dict[str, str] = field(default_factory=dict)
    shared_storage: tuple[tuple[str, ...], ...] = ()
    captured: CapturedGraph | None = field(default=None, repr=False, compare=False)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """A short hash of the graph structure the spec depends on: every
        tensor's name and shape and, per dim, its axis tree (which groups it
        carries, as products and concatenations), i.e. which parameter axes
        share a permutation. Two models wired differently (a residual
        connection, a shared weight) have different fingerprints even when
        their tensors have the same names and shapes. Module class names are
        not hashed (a spec of an ``ExportedProgram`` has the fingerprint of
        the module's); they are kept in :attr:`module_types`."""
        h = hashlib.sha256()
        for name in sorted(self.axes):
            h.update(f"{name}{self.shapes[name]}{self.axes[name]};".encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        """A readable table of groups, members and frozen axes.

        Returns:
            Several lines of text (also what ``str(spec)`` gives): the
            number of groups and the coverage; where they apply, the train
            mode and the share of hidden axes frozen per op; one line per
            group with its size and first members; the tensors that share
            storage; and up to 20 frozen axes with their reasons.
        """
        count = len(self.groups)
        lines = [f"PermutationSpec: {count} group{'' if count == 1 else 's'}, coverage {self.coverage:.3f}"]
        if self.train_mode != "same graph as eval mode":
            lines.append(f"  train mode: {self.train_mode}")
        if self.frozen_share:
            shares = sorted(self.frozen_share.items(), key=lambda item: -item[1])
            listed = ", ".join(f"{op.replace('::', '.')} {share:.0%}" for op, share in shares[:6])
            more = f", ... (+{len(shares) - 6} more)" if len(shares) > 6 else ""
            lines.append(f"  {sum(self.frozen_share.values()):.0%} of hidden axes frozen: {listed}{more}")
        width = max((len(n) for n in self.groups), default=5)
        lines.append(f"  {'group':<{width}}  size  members")
        for group in self.groups.values():
            members = ", ".join(f"{t}[{d}]" for t, d in group.members[:4])
            more = f", ... (+{len(group.members) - 4})" if len(group.members) > 4 else ""
            lines.append(f"  {group.name:<{width}}  {group.size:>4}  {members}{more}")
        for names in self.shared_storage:
            lines.append(f"  shared storage: {', '.join(names)}")
        if self.frozen:
            lines.append(f"  frozen axes ({len(self.frozen)}):")
            for axis in self.frozen[:20]:
                lines.append(f"    {axis.tensor}[{axis.dim}]: {axis.reason}")
            if len(self.frozen) > 20:
                lines.append(f"    ... (+{len(self.frozen) - 20})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def build_spec(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    permutable_buffers: Sequence[str] = (),
) -> PermutationSpec:
    """Derive the permutation spec of ``model`` from its graph.

    The model is captured with ``torch.export`` (see :func:`maskalign.spec.capture.capture`),
    checked against eager execution, and analysed by one pass of axis
    propagation (:mod:`maskalign.spec.rules`). Axes that meet an op without a rule are
    frozen, never guessed, so ``apply_permutation(model, random_permutation(spec))``
    computes the same function as ``model``.

    Args:
        model: any ``nn.Module`` (not mutated), or an ``ExportedProgram``.
        example_inputs: positional inputs of ``forward`` (a tensor or a tuple);
            the batch size does not matter. Optional for an ``ExportedProgram``.
        kwargs: keyword inputs of ``forward``.
        permutable_buffers: non-persistent buffers (not in the ``state_dict``)
            that should be permuted along the axes they meet, e.g. a fixed
            per-channel scale; by default such tensors freeze their axes.
            :func:`~maskalign.apply_permutation` writes them into the module.

    Returns:
        The :class:`PermutationSpec`.

    Train mode: the model runs once per mode on the example inputs (no
    gradients; buffers, flags and the random generator restored). When the two
    modes run different calls (an auxiliary head, a ``self.training`` branch),
    the train-mode graph is exported too and its constraints are added, so the
    spec keeps both functions; ``spec.train_mode`` says which happened.

    Raises:
        TraceError: the model cannot be captured, or the capture does not
            reproduce the eager outputs.
        ArgumentTypeError: an argument has the wrong type (a state_dict for
            ``model``, a string for ``permutable_buffers``).
        SpecError: ``permutable_buffers`` names no non-persistent buffer.

    Source: the permutation spec of Git Re-Basin (Ainsworth et al., ICLR
    2023, Sec. 3 and App. A), derived here from the graph instead of written
    by hand: axes joined by union-find wherever an op makes them share units.

    Example:
        >>> import torch, maskalign as ma
        >>> from maskalign.models import MLP
        >>> model = MLP(in_features=64, hidden=(32, 16), num_classes=10)
        >>> spec = ma.build_spec(model, torch.randn(2, 64))
        >>> {name: group.size for name, group in spec.groups.items()}
        {'layers.0.weight:0': 32, 'layers.1.weight:0': 16}
        >>> spec.groups["layers.0.weight:0"].members
        (('layers.0.weight', 0), ('layers.0.bias', 0), ('layers.1.weight', 1))
    """
    _check_build_arguments(model, kwargs, permutable_buffers)
    if isinstance(model, nn.Module):
        with preserved_attributes(model):  # forward may fill caches (LeViT's attention biases): leave them as they were
            return _build(model, example_inputs, kwargs, permutable_buffers)
    return _build(model, example_inputs, kwargs, permutable_buffers)


def _build(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any,
    kwargs: Mapping[str, Any] | None,
    permutable_buffers: Sequence[str],
) -> PermutationSpec:
    plain = plain_tensors(model) if isinstance(model, nn.Module) else frozenset()
    captured = capture(model, example_inputs, kwargs)
    unknown = sorted(set(permutable_buffers) - set(captured.constants))
    if unknown:
        raise SpecError(
            f"Argument 'permutable_buffers' names {unknown}, which are not non-persistent buffers or constants "
            f"of the model; pass some of {sorted(captured.constants)[:10]}."
        )
    train = None
    if isinstance(model, nn.Module):
        args, kwargs = split_inputs(model, example_inputs, kwargs)
        difference = mode_difference(model, args, kwargs)
        if difference is not None:
            train = capture(model, args, kwargs, train=True, check=False)
        train_mode = "same graph as eval mode" if difference is None else f"own graph analysed ({difference})"
    else:
        train_mode = "not analysed (an ExportedProgram holds one graph)"
    spec = spec_from_analysis(analyze(captured, permutable_buffers, train=train), captured)
    spec.train_mode = train_mode
    spec.plain_tensors = plain
    if isinstance(model, nn.Module):
        spec.module_types = module_types(model)
        spec.shared_storage = tuple(tuple(names) for names in storage_sharing(_named_state(model)))
    return spec


def _check_build_arguments(model: Any, kwargs: Any, permutable_buffers: Any) -> None:
    """Raise :class:`ArgumentTypeError` naming the argument of
    :func:`build_spec` that has the wrong type."""
    if not isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        what = _describe(model)
        hint = " (a state_dict?)" if isinstance(model, Mapping) else ""
        raise ArgumentTypeError(
            f"Argument 'model' is {what}{hint}; pass the nn.Module itself (or an ExportedProgram): "
            "ma.build_spec(model, example_inputs)."
        )
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ArgumentTypeError(
            f"Argument 'kwargs' is {_describe(kwargs)}; pass a dict of forward's keyword inputs, "
            "and positional inputs as example_inputs."
        )
    listed = isinstance(permutable_buffers, (Sequence, AbstractSet))
    if (
        not listed
        or isinstance(permutable_buffers, (str, bytes))
        or not all(isinstance(n, str) for n in permutable_buffers)
    ):
        raise ArgumentTypeError(
            f"Argument 'permutable_buffers' is {permutable_buffers!r}; pass a list of buffer names, "
            "e.g. permutable_buffers=['scale']."
        )


def module_types(model: nn.Module) -> dict[str, str]:
    """Module path (``""`` for ``model``) -> class name, for every module that
    holds a parameter or buffer or contains a module that does, in
    ``named_modules`` order.

    Parameter-free leaves (activations, pooling, ``nn.Identity``) are left out:
    swapping ReLU for GELU keeps every permutation valid. A container's class
    is kept: a residual block and a plain one of the same layers differ only
    there.
    """
    owners: set[str] = set()
    entries: list[tuple[str, nn.Module]] = list(model.named_modules(remove_duplicate=False))
    for path, module in entries:
        if any(t is not None for t in module._parameters.values()) or any(
            t is not None for t in module._buffers.values()
        ):
            owners.add(path)
    holding: set[str] = set()
    for path in owners:
        parts = path.split(".") if path else []
        holding.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    return {path: type(module).__name__ for path, module in entries if path in holding}


def _named_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under every name (tied ones
    included), as the objects themselves."""
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def storage_sharing(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names of ``tensors`` that share one storage, per storage, where either
    the views differ (a parameter that is a transposed view of another) or
    they are distinct tensor objects: the cases where writing one tensor
    changes another. One object under several names (tied weights, one
    ``nn.Parameter`` in two modules) is left out. Empty, meta and non-strided
    tensors are skipped."""
    by_storage: dict[tuple[str, int], list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0 or tensor.is_meta or tensor.layout != torch.strided:
            continue
        try:
            key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            continue
        by_storage.setdefault(key, []).append(name)
    shared: list[list[str]] = []
    for names in by_storage.values():
        objects = {id(tensors[n]) for n in names}
        views = {(tensors[n].storage_offset(), tuple(tensors[n].shape), tensors[n].stride()) for n in names}
        if len(objects) > 1 or len(views) > 1:
            shared.append(names)
    return shared


def spec_from_analysis(analysis: Analysis, captured: CapturedGraph) -> PermutationSpec:
    """Turn the atom classes of an :class:`Analysis` into a :class:`PermutationSpec`."""
    trees = _TreeBuilder(analysis.atoms)
    axes: dict[str, tuple[AxisTree, ...]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    members: dict[str, list[tuple[str, int]]] = {}
    frozen: list[FrozenAxis] = []
    for tensor, dims in analysis.tensor_dims.items():
        tensor_axes = tuple(trees.dim(dim, f"{tensor}:{d}") for d, dim in enumerate(dims))
        for d, (dim, tree) in enumerate(zip(dims, tensor_axes)):
            names = list(groups_of(tree))
            for name in names:
                members.setdefault(name, []).append((tensor, d))
            if not names and tree_size(tree) > 1:
                record = trees.freeze(dim)
                frozen.append(
                    FrozenAxis(
                        tensor,
                        d,
                        record.reason if record else "part of a concatenated axis",
                        record.op if record else None,
                        record.structural if record else False,
                    )
                )
        axes[tensor] = tensor_axes
        shapes[tensor] = tuple(tree_size(t) for t in tensor_axes)
    groups = {name: Group(name, size, tuple(dict.fromkeys(members[name]))) for name, size in trees.sizes.items()}
    parameters = _parameter_names(captured)
    coverage, frozen_share = _coverage(analysis, parameters)
    return PermutationSpec(
        groups=groups,
        axes=axes,
        shapes=shapes,
        frozen=frozen,
        parameters=parameters,
        nonpersistent=frozenset(n for n in axes if n in captured.constants),
        logical={
            name[: -len("_orig")]: name
            for name in axes
            if name.endswith("_orig") and name[: -len("_orig")] + "_mask" in axes
        },
        coverage=coverage,
        frozen_share=frozen_share,
        activations=_activation_points(analysis, trees, captured),
        captured=captured,
    )


def _parameter_names(captured: CapturedGraph) -> frozenset[str]:
    """Parameter names, including every name of a tied parameter."""
    names = {role.target for role in captured.roles.values() if role.kind == "parameter"}
    for tied in captured.aliases:
        if names.intersection(tied):
            names.update(tied)
    return frozenset(names)


class _TreeBuilder:
    """Axis trees of atom lists; names each free leaf class (a group) after
    the first tensor axis that carries it."""

    def __init__(self, atoms: AtomTable) -> None:
        self.atoms = atoms
        self.names: dict[int, str] = {}
        self.sizes: dict[str, int] = {}

    def dim(self, dim: list[int], owner: str | None = None) -> AxisTree:
        parts = [self.atom(a, owner) for a in dim]
        if not parts:
            return Leaf(None, 1)
        return parts[0] if len(parts) == 1 else Product(tuple(parts))

    def atom(self, atom: int, owner: str | None) -> AxisTree:
        kind, children = self.atoms.structure(atom)
        if kind == "product":
            return Product(tuple(self.atom(c, owner) for c in children))
        if kind == "concat":
            return Concat(tuple(self.atom(c, owner) for c in children))
        root = self.atoms.find(atom)
        size = self.atoms.size(root)
        if size == 1 or self.atoms.frozen(root) is not None:
            return Leaf(None, size)
        if root not in self.names:
            if owner is None:
                return Leaf(None, size)  # not carried by any parameter: nothing to permute
            name = owner
            suffix = 1
            while name in self.sizes:
                name = f"{owner}.{suffix}"
                suffix += 1
            self.names[root] = name
            self.sizes[name] = size
        return Leaf(self.names[root], size)

    def freeze(self, dim: list[int]) -> Freeze | None:
        """The freeze of a frozen dim: its first non-structural one, if any."""
        records = [r for r in (self.atoms.frozen(leaf) for leaf in self.atoms.leaves(dim)) if r is not None]
        return next((r for r in records if not r.structural), records[0] if records else None)


def _activation_points(
    analysis: Analysis, trees: _TreeBuilder, captured: CapturedGraph
) -> dict[str, list[ActivationPoint]]:
    """Per group, in graph order, the graph values activation matching may use:
    the inputs of nonlinearities (kind ``"pre"``) and their outputs (kind
    ``"post"``); for a group that meets no nonlinearity input, every other
    non-view value carrying it (kind ``"value"``, e.g. a pre-norm
    transformer's residual stream).

    Which of them a match uses is chosen there (``points=``,
    ``stream_points=``, see :func:`~maskalign.match_activations`); the spec
    lists them all so that one spec serves every choice."""
    pre_nodes: set[str] = set()
    post_nodes: set[str] = set()
    for node in captured.flat_graph.nodes:
        if analysis.node_roles.get(node.name) == "nonlinearity":
            post_nodes.add(node.name)
            if node.args and isinstance(node.args[0], torch.fx.Node):
                pre_nodes.add(node.args[0].name)
    listed: dict[str, list[ActivationPoint]] = {}
    has_pre: set[str] = set()
    for node, dims in analysis.node_dims.items():  # graph order
        role = analysis.node_roles.get(node)
        if role is None or role == "view":
            continue
        carrying = [(d, trees.dim(dim)) for d, dim in enumerate(dims)]
        carrying = [(d, tree) for d, tree in carrying if next(groups_of(tree), None) is not None]
        if not carrying:
            continue
        kinds = [k for k, nodes in (("pre", pre_nodes), ("post", post_nodes)) if node in nodes] or ["value"]
        for kind in kinds:
            point = ActivationPoint(node, tuple(d for d, _ in carrying), tuple(t for _, t in carrying), kind)
            for name in dict.fromkeys(groups_of(point.tree)):
                listed.setdefault(name, []).append(point)
                if kind == "pre":
                    has_pre.add(name)
    return {name: [p for p in listed.get(name, []) if p.kind != "value" or name not in has_pre] for name in trees.sizes}


def _coverage(analysis: Analysis, parameters: frozenset[str]) -> tuple[float, dict[str, float]]:
    """``(coverage, frozen_share)`` as defined on :class:`PermutationSpec`."""
    atoms = analysis.atoms
    covered = total = 0
    lost: dict[str, int] = {}

    def visit(atom: int) -> None:
        nonlocal covered, total
        kind, children = atoms.structure(atom)
        if kind != "leaf":
            for child in children:
                visit(child)
            return
        size = atoms.size(atoms.find(atom))
        record = atoms.frozen(atom)
        if size <= 1 or (record is not None and record.structural):
            return
        total += size
        if record is None:
            covered += size
        else:
            op = record.op or "other"
            lost[op] = lost.get(op, 0) + size

    for name, dims in analysis.tensor_dims.items():
        if name in parameters:
            for dim in dims:
                for atom in dim:
                    visit(atom)
    if not total:
        return 1.0, {}
    return covered / total, {op: units / total for op, units in lost.items()}
