"""Activation matching: align the hidden units of two models by the correlation
of their activations on the same data (Li et al. 2015; Ainsworth et al.,
"Git Re-Basin", ICLR 2023, Sec. 3.1; the method used by Adnan et al., ICML 2025).

Both models run once per batch on the same inputs, through one captured graph
that returns every activation the chosen recipe needs (``points``: pre- or
post-activations or both, ``stream_points``: every point of a residual stream
or only its last). Per group, centred statistics
are accumulated in float64 (means, variances, cross-covariance: memory O(d^2)
per group, never the activations themselves); one linear assignment per group
then maximises the total matched similarity.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .._utils.inputs import normalize_inputs
from .._utils.modes import eval_mode
from ..errors import (
    DOCS_URL,
    ArgumentTypeError,
    ArgumentValueError,
    DataError,
    SpecError,
    SpecMismatchError,
    TraceError,
    _check_callable,
    _check_choice,
    _check_int,
    _check_module,
    _describe,
    _did_you_mean,
)
from ..permutation import Permutation, check_same_architecture
from ..spec.axes import AxisTree, Leaf, co_groups, groups_of, index_vector, tree_size
from ..spec.capture import CapturedGraph, capture
from ..spec.permutation_spec import ActivationPoint, PermutationSpec, build_spec
from .coordinate_ascent import coordinate_ascent, lap_step, positions_of
from .lap import block_lap_values, solve_lap
from .mask_aware import check_mask, check_mask_type, position_weights, unit_masses, unit_weights
from .stats import COSTS, ActivationStats, TieBreakSimilarity, TieBreakStats, _check_stats_dtype, _Workspace

__all__ = ["DEFAULT_POINTS", "DEFAULT_STREAM_POINTS", "ActivationStats", "match_activations", "select_points"]

POINTS = ("pre", "post", "both")
"""Choices of ``match_activations(..., points=...)``."""
STREAM_POINTS = ("all", "last")
"""Choices of ``match_activations(..., stream_points=...)``."""
DEFAULT_POINTS = "post"
"""Default ``points`` of :func:`match_activations`, and of every group a
``points`` mapping leaves out: post-activations, the paper's choice; chosen by
``benchmarks/bench_matching_quality.py`` (the lowest mean loss barrier of the
activation recipes on ResNet20, plain VGG11 and an MLP, 3 pairs each)."""
DEFAULT_STREAM_POINTS = "last"
"""Default ``stream_points`` of :func:`match_activations`: the last point of each
residual stage, the paper's choice (chosen with :data:`DEFAULT_POINTS`)."""

PointsChoice = str | Mapping[str, str] | Callable[[str], str]
"""``points``: one of :data:`POINTS`, a mapping group name -> choice, or a
callable group name -> choice."""


_CALL = "match_activations(model_a, model_b, data, spec)"
_CACHE_KEYS = ("past_key_values", "cache", "cache_params")

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
"""Forward's positional and keyword inputs."""


def _default_input_fn(batch: Any) -> Any:
    """Forward's inputs from a batch as data loaders yield them: a mapping
    (``{"input_ids": ..., "attention_mask": ...}``, a transformers
    ``BatchEncoding``) is keyword inputs; of a tuple or list (``(inputs,
    labels)``) the first element is the input; anything else is the input."""
    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0] if batch else batch
    return batch


def _bad_leaf(value: Any) -> str | None:
    """Why ``value`` (one input, possibly nested) cannot be fed to a captured
    graph, or ``None``: Python lists of numbers and numpy arrays are not tensors."""
    if isinstance(value, Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return None
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return f"a numpy array of shape {tuple(value.shape)}; convert it with torch.from_numpy(...)"
    if _is_numbers(value):
        return (
            f"a {type(value).__name__} of numbers, not a tensor; tokenize with return_tensors='pt' "
            "or convert it with torch.tensor(...)"
        )
    if isinstance(value, (list, tuple)):
        return next((why for why in map(_bad_leaf, value) if why is not None), None)
    if isinstance(value, Mapping):
        return next((why for why in map(_bad_leaf, value.values()) if why is not None), None)
    return None


def _is_numbers(value: Any) -> bool:
    """A non-empty (nested) Python list of numbers, as a tokenizer returns
    without ``return_tensors``."""
    if not isinstance(value, list) or not value:
        return False
    return all(isinstance(v, (bool, int, float)) or _is_numbers(v) for v in value)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, Tensor) for leaf in pytree.tree_leaves(value))


def _split_inputs(inputs: Any, index: int) -> Inputs:
    """``(args, kwargs)`` for ``forward`` from what ``input_fn`` returned: a
    mapping is keyword inputs, a tuple or list positional inputs, anything
    else the one positional input.

    Raises:
        DataError: naming the batch and the input, when a key is not a
            string, an input is a list of numbers or a numpy array, or the
            batch holds no tensor at all.
    """
    if isinstance(inputs, Mapping):
        kwargs: dict[str, Any] = {}
        for key, value in inputs.items():
            if not isinstance(key, str):
                raise DataError(
                    f"Batch {index} has the key {key!r}, which is not a keyword of forward; key batches by "
                    "forward's argument names (str)."
                )
            kwargs[key] = value
        args: tuple[Any, ...] = ()
        named = [(repr(k), v) for k, v in kwargs.items()]
    else:
        args, kwargs = normalize_inputs(inputs), {}
        named = [(f"input {i}", v) for i, v in enumerate(args)]
    for where, value in named:
        why = _bad_leaf(value)
        if why is not None:
            raise DataError(f"Batch {index}: {where} is {why}.")
    if not _has_tensor((args, kwargs)):
        raise DataError(
            f"Batch {index} is {_describe(inputs)} and holds no tensor; pass batches of tensors, (inputs, labels) "
            "pairs or dicts of tensors (model(**batch)), or input_fn=... that maps a batch to forward's inputs."
        )
    return args, kwargs


def _structure(tree: pytree.TreeSpec) -> str:
    """``"2 positional input(s) and keyword inputs ['a', 'b']"`` of an ``(args, kwargs)`` tree."""
    args, kwargs = pytree.tree_unflatten([None] * tree.num_leaves, tree)
    return f"{len(args)} positional input(s) and keyword inputs {list(kwargs)}"


def _arrange(inputs: Inputs, reference: pytree.TreeSpec, index: int) -> list[Any]:
    """The flat inputs of a batch in the order of the spec's graph; keyword
    inputs are reordered to the spec's order when they are the same names.

    Raises:
        DataError: the batch's inputs are not those the spec was built from.
    """
    args, kwargs = inputs
    flat, tree = pytree.tree_flatten((args, kwargs))
    if tree == reference:
        return flat
    _, reference_kwargs = pytree.tree_unflatten([None] * reference.num_leaves, reference)
    if set(reference_kwargs) == set(kwargs):
        flat, tree = pytree.tree_flatten((args, {k: kwargs[k] for k in reference_kwargs}))
        if tree == reference:
            return flat
    raise DataError(
        f"Batch {index} gives forward {_structure(tree)}, but the spec was built from {_structure(reference)}; "
        "build the spec from one batch of this data (or leave spec out), or pass input_fn=... that maps "
        "each batch to the inputs the spec was built from."
    )


def _check_no_cache(model: nn.Module, which: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`TraceError` when ``model`` is a transformers model with
    ``config.use_cache=True`` whose forward returns a key/value cache on these
    inputs (a cache cannot be captured, and its tensors would freeze the axes
    they carry). Models whose forward returns no cache (encoders such as
    BERT) pass; a forward that fails is left to the capture to report."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False) or kwargs.get("use_cache") is False:
        return
    try:
        output = model(*args, **kwargs)
    except Exception:  # the capture names what fails
        return
    if isinstance(output, Mapping):  # a ModelOutput; only present keys are read (no deprecation warnings)
        keys = set(output.keys())
        cache = next((output[k] for k in _CACHE_KEYS if k in keys and output[k] is not None), None)
    else:
        cache = next((getattr(output, k) for k in _CACHE_KEYS if getattr(output, k, None) is not None), None)
    if cache is not None:
        raise TraceError(
            f"{which} ({type(model).__name__}) has config.use_cache=True, so its forward returns a key/value "
            f"cache ({type(cache).__name__}) that cannot be captured; pass use_cache=False: set "
            f"{which}.config.use_cache = False (and the other model's), load the models with use_cache=False, "
            "or add it to every batch with input_fn=lambda batch: {**batch, 'use_cache': False}."
        )


def _check_dtypes(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
    """Raise :class:`SpecMismatchError` naming the first floating tensor whose
    dtype differs between the two models."""
    for name, tensor_a in state_a.items():
        tensor_b = state_b.get(name)
        if (
            isinstance(tensor_b, Tensor)
            and tensor_a.is_floating_point()
            and tensor_b.is_floating_point()
            and tensor_a.dtype != tensor_b.dtype
        ):
            raise SpecMismatchError(
                f"Tensor {name!r} is {tensor_a.dtype} in model_a but {tensor_b.dtype} in model_b; convert both "
                f"models to one dtype, e.g. model_b.to({tensor_a.dtype})."
            )


def _check_data(data: Any) -> None:
    """Raise :class:`ArgumentTypeError` unless ``data`` is an iterable of
    batches (a tensor, a single dict batch or a model are named as such)."""
    if isinstance(data, nn.Module):
        raise ArgumentTypeError(
            f"Argument 'data' is {_describe(data)}, not an iterable of batches; the order is {_CALL}."
        )
    if isinstance(data, Tensor):
        raise ArgumentTypeError(
            f"Argument 'data' is {_describe(data)}, not an iterable of batches (iterating a tensor yields its "
            "rows); pass [x] for one batch, or a DataLoader."
        )
    if isinstance(data, Mapping):
        raise ArgumentTypeError(
            f"Argument 'data' is {_describe(data)} (one batch?), not an iterable of batches; pass [batch] or "
            "a DataLoader."
        )
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ArgumentTypeError(
            f"Argument 'data' is {_describe(data)}, not an iterable of batches; pass a DataLoader or a list of batches."
        )


def _models_device_dtype(model_a: nn.Module, model_b: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensors_a: list[Tensor] = [*model_a.parameters(), *model_a.buffers()]
    tensors_b: list[Tensor] = [*model_b.parameters(), *model_b.buffers()]
    if not tensors_a:
        raise SpecMismatchError("Model model_a has no parameters or buffers to match; pass a model with weights.")
    dev_a, dev_b = tensors_a[0].device, tensors_b[0].device if tensors_b else tensors_a[0].device
    if dev_a != dev_b:
        raise SpecMismatchError(
            f"Arguments 'model_a' and 'model_b' are on {dev_a} and {dev_b}; move both to one device."
        )
    return dev_a, tensors_a[0].dtype


def _to_model(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        value = value.to(device)
        return value.to(dtype) if value.is_floating_point() else value
    return value


class _Prober:
    """Runs both models side by side through one captured graph and hands
    every activation point to a visitor as it is computed. The spec's graph
    is static in shape; for inputs of other shapes the model is captured once
    more with a dynamic batch dimension (static per shape if the model does
    not allow that), checked to contain the
    spec's nodes, and kept in the spec's cache for later calls."""

    def __init__(self, spec: PermutationSpec, model: nn.Module, nodes: Sequence[str]) -> None:
        if spec.captured is None:
            raise SpecError(
                "Argument 'spec' was not made by build_spec (it holds no captured graph), which activation "
                "matching needs; pass spec=ma.build_spec(model_a, example_inputs)."
            )
        self.model = model
        self.nodes = list(nodes)
        self.cache = spec.cache
        self.reference = spec.captured

    def _graph_for(self, flat: list[Any]) -> CapturedGraph:
        shapes = tuple(tuple(x.shape) if isinstance(x, Tensor) else x for x in flat)
        key = ("graph", shapes, tuple(self.nodes))
        if key not in self.cache:
            self.cache[key] = self._captured_for(flat, shapes)
        return self.cache[key]

    def _captured_for(self, flat: list[Any], shapes: tuple[Any, ...]) -> CapturedGraph:
        reference_values = [
            n.meta["val"]
            for n in self.reference.graph.nodes
            if n.op == "placeholder" and self.reference.roles[n.name].kind == "input"
        ]  # a non-tensor input (use_cache=False) is a placeholder holding its value
        reference_shapes = tuple(tuple(v.shape) if isinstance(v, Tensor) else v for v in reference_values)
        if reference_shapes == shapes:
            return self.reference
        args, kwargs = pytree.tree_unflatten(flat, self.reference.input_spec)
        if kwargs:  # capture(dynamic_batch=True) marks positional inputs only: one graph per shape
            return self._static(args, kwargs, shapes)
        dynamic: CapturedGraph | bool | None = self.cache.get("dynamic")
        if dynamic is None:
            try:
                dynamic = capture(self.model, args, kwargs, check=False, dynamic_batch=True)
            except TraceError:
                dynamic = False
            if isinstance(dynamic, CapturedGraph) and not self._has_nodes(dynamic):
                dynamic = False
            self.cache["dynamic"] = dynamic
        if isinstance(dynamic, CapturedGraph):
            return dynamic
        return self._static(args, kwargs, shapes)

    def _static(self, args: Any, kwargs: Any, shapes: tuple[Any, ...]) -> CapturedGraph:
        captured = capture(self.model, args, kwargs, check=False)
        if not self._has_nodes(captured):
            missing = [n for n in self.nodes if n not in {m.name for m in captured.flat_graph.nodes}]
            raise TraceError(
                f"Inputs of shapes {shapes} trace to a different graph (nodes {missing[:3]} are "
                "missing); use batches of one shape (e.g. DataLoader(drop_last=True))."
            )
        return captured

    def _has_nodes(self, captured: CapturedGraph) -> bool:
        known = {n.name for n in captured.flat_graph.nodes}
        return all(n in known for n in self.nodes)

    def __call__(
        self,
        state_a: dict[str, Tensor],
        state_b: dict[str, Tensor],
        flat: list[Any],
        visit: Callable[[str, Tensor, Tensor], None],
        nodes: Collection[str] | None = None,
    ) -> None:
        """Run both models on ``flat`` as far as ``nodes`` (default: every
        node the prober was made for) need, visiting each of them."""
        visited = set(self.nodes) if nodes is None else set(nodes)
        self._graph_for(flat).run_pair(state_a, state_b, flat, visited, visit)


def _joint(value: Tensor, point: ActivationPoint) -> Tensor:
    """``value`` as ``(samples, N)``: the point's carrying dims moved last and
    flattened into its joint axis; every other dim indexes samples."""
    k = len(point.dims)
    return value.movedim(point.dims, tuple(range(-k, 0))).reshape(-1, tree_size(point.tree))


def _layout(value: Tensor, dim: int) -> Tensor:
    """``value`` viewed as ``(P, n, Q)`` around ``dim`` (no copy)."""
    shape = value.shape
    before = 1
    for size in shape[:dim]:
        before *= size
    return value.reshape(before, shape[dim], -1)


def _units(joint: Tensor, positions: Tensor | None) -> Tensor:
    """Samples of one group from a joint ``(samples, N)`` tensor: ``positions``
    is ``unit_positions(tree, group)`` of shape ``(n, R)``; the ``R`` positions
    of a unit become extra samples. Returns ``(samples * R, n)``. ``None``
    stands for the identity (the joint axis is the group itself)."""
    if positions is None:
        return joint
    return joint[:, positions].transpose(1, 2).reshape(-1, positions.shape[0])


_Key = tuple[str, str]
"""A pooled statistic: ``(group, "primary")`` or ``(group, "tiebreak")``."""


@dataclass(frozen=True, eq=False)
class _PooledUse:
    """A point feeding the pooled statistic ``key``: ``positions`` is
    ``unit_positions(point.tree, group)``, ``None`` where the point's one
    carrying dim is the group itself (a view, no copy)."""

    point: ActivationPoint
    key: _Key
    positions: Tensor | None


@dataclass(frozen=True, eq=False)
class _JointUse:
    """A point feeding the full statistic of its joint axis ``tree``."""

    point: ActivationPoint
    tree: AxisTree


_Use = _PooledUse | _JointUse
_Stats = dict[_Key, "ActivationStats"]
_JointStats = dict[AxisTree, "ActivationStats"]
PRIMARY, TIEBREAK = "primary", "tiebreak"


def _check_points(points: Any) -> None:
    """Raise unless ``points`` is a choice, a mapping or a callable (the
    groups of a mapping are checked once the spec is known)."""
    if isinstance(points, str):
        _check_choice(points, "points", POINTS)
    elif not isinstance(points, Mapping) and not callable(points):
        raise ArgumentTypeError(
            f"Argument 'points' is {_describe(points)}; pass one of {', '.join(map(repr, POINTS))}, a dict "
            "group name -> choice, or a function group name -> choice."
        )


def _resolve_points(points: PointsChoice, spec: PermutationSpec) -> dict[str, str]:
    """Group name -> ``"pre"``, ``"post"`` or ``"both"`` for every group of
    ``spec``; groups a mapping leaves out get :data:`DEFAULT_POINTS`.

    Raises:
        ArgumentValueError: ``points`` is an unknown choice, a mapping names a
            group the spec does not have, or a mapping or callable gives an
            unknown choice for a group (named, with close matches suggested).
        ArgumentTypeError: ``points`` is neither a str, a mapping nor callable.
    """
    _check_points(points)
    if isinstance(points, str):
        return dict.fromkeys(spec.groups, points)
    if isinstance(points, Mapping):
        unknown = [name for name in points if name not in spec.groups]
        if unknown:
            listed = ", ".join(repr(g) for g in list(spec.groups)[:6])
            raise ArgumentValueError(
                f"Argument 'points' names {unknown[0]!r}, which is not a group of the spec (its groups: {listed}"
                f"{', ...' if len(spec.groups) > 6 else ''}).{_did_you_mean(unknown[0], spec.groups)}"
            )
        chosen = {g: points.get(g, DEFAULT_POINTS) for g in spec.groups}
    else:
        chosen = {g: points(g) for g in spec.groups}
    for group, choice in chosen.items():
        if not (isinstance(choice, str) and choice in POINTS):
            raise ArgumentValueError(
                f"Argument 'points' gives {choice!r} for group {group!r}; pass one of "
                f"{', '.join(map(repr, POINTS))}.{_did_you_mean(choice, POINTS)}"
            )
    return chosen


def _unique_nodes(points: Iterable[ActivationPoint]) -> list[ActivationPoint]:
    """``points`` without repeated graph nodes (the first point of each kept)."""
    out: dict[str, ActivationPoint] = {}
    for point in points:
        out.setdefault(point.node, point)
    return list(out.values())


def select_points(
    points: Sequence[ActivationPoint], group: str, choice: str, stream_points: str
) -> tuple[list[ActivationPoint], list[ActivationPoint]]:
    """The points one group is matched on, and those that break its ties.

    Args:
        points: ``spec.activations[group]`` (graph order).
        group: the group's name.
        choice: ``"pre"``, ``"post"`` or ``"both"`` (see :func:`match_activations`).
        stream_points: ``"all"`` or ``"last"``.

    Returns:
        ``(primary, tiebreak)``, both in graph order: the points whose pooled
        statistic is matched, and the pre-activation points whose statistic
        breaks ties of the primary one (empty unless ``choice`` is ``"post"``
        and the group has nonlinearity outputs and is not nested in a joint axis).
    """
    nested = any(co_groups(p.tree, group) for p in points)
    pre = [p for p in points if p.kind == "pre"] or list(points)
    post = [p for p in points if p.kind == "post"]
    if stream_points == "last" and not nested:
        pre, post = pre[-1:], post[-1:]
    if choice == "pre" or not post:
        return _unique_nodes(pre), []
    if choice == "post":
        return _unique_nodes(post), ([] if nested else _unique_nodes(pre))
    picked = {id(p) for p in (*pre, *post)}
    return _unique_nodes(p for p in points if id(p) in picked), []


class _Plan:
    """Which statistics one pass accumulates.

    A group whose units never share positions with another group's (``co_groups``
    empty: channels of a conv, hidden units of an MLP, a residual stream) pools
    its samples into one ``(n, n)`` statistic (and, where ties are broken, a
    second one of its pre-activations). Points where groups are nested
    (heads x head_dim, concatenated q/k/v) keep the full statistic of their
    joint axis, so that heads can be matched as blocks and head dims inside
    aligned heads; at most ``max_joint`` units per joint axis.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        primary: Mapping[str, Sequence[ActivationPoint]],
        tiebreak: Mapping[str, Sequence[ActivationPoint]],
        max_joint: int,
    ) -> None:
        self.clean: dict[_Key, list[tuple[ActivationPoint, Tensor | None]]] = {}
        self.joint: dict[AxisTree, list[ActivationPoint]] = {}
        self.skipped: dict[str, list[str]] = {}  # graph node -> the groups skipped there
        for group, points in primary.items():
            for point in points:
                tree = point.tree
                if not co_groups(tree, group):
                    self.clean.setdefault((group, PRIMARY), []).append((point, self._positions(tree, group)))
                elif tree_size(tree) <= max_joint:
                    if point not in self.joint.setdefault(tree, []):
                        self.joint[tree].append(point)
                elif group not in self.skipped.setdefault(point.node, []):
                    self.skipped[point.node].append(group)
        for group, points in tiebreak.items():
            pooled = [p for p in points if not co_groups(p.tree, group)]
            if (group, PRIMARY) in self.clean and pooled:
                self.clean[(group, TIEBREAK)] = [(p, self._positions(p.tree, group)) for p in pooled]
        self.points = list(
            dict.fromkeys(
                [p for uses in self.clean.values() for p, _ in uses] + [p for ps in self.joint.values() for p in ps]
            )
        )

    @staticmethod
    def _positions(tree: AxisTree, group: str) -> Tensor | None:
        if isinstance(tree, Leaf):  # the joint axis is the group: no gather
            return None
        return positions_of(tree, group, f"an activation point of group {group!r}")

    def uses(self) -> dict[str, list[_Use]]:
        """Per graph node: a :class:`_PooledUse` per pooled statistic and a
        :class:`_JointUse` per joint one it feeds."""
        out: dict[str, list[_Use]] = {}
        for key, uses in self.clean.items():
            for point, positions in uses:
                out.setdefault(point.node, []).append(_PooledUse(point, key, positions))
        for tree, points in self.joint.items():
            for point in points:
                out.setdefault(point.node, []).append(_JointUse(point, tree))
        return out

    def warn_skipped(self, max_joint: int) -> None:
        """Warn (at the caller of :func:`match_activations`) about the points
        whose joint axis exceeds ``max_joint``, naming their nodes and groups."""
        if not self.skipped:
            return
        nodes = list(self.skipped)
        groups = list(dict.fromkeys(g for found in self.skipped.values() for g in found))
        warnings.warn(
            f"Activation matching skips nodes {nodes[:3]}{' ...' if len(nodes) > 3 else ''} of groups "
            f"{', '.join(map(repr, groups))}: their joint axis has more than max_joint={max_joint} units; pass "
            "a larger max_joint= if memory allows (these groups are matched from their other points, or keep "
            f"the identity). See {DOCS_URL}/troubleshooting/#warning-max-joint",
            stacklevel=3,
        )

    def units(self, spec: PermutationSpec) -> list[_Unit]:
        """The statistics in units solved together, in graph order of their
        last node: one unit per group pooled on its own (its primary and
        tie-break statistics), and one per set of groups nested in joint axes
        that share groups (e.g. one attention layer's heads and head dims, with
        its joint axes and those groups' own pooled statistics)."""
        nodes: Iterable[Any] = spec.captured.flat_graph.nodes if spec.captured else ()
        order = {node.name: i for i, node in enumerate(nodes)}
        parent: dict[str, str] = {}

        def root(group: str) -> str:
            while parent.setdefault(group, group) != group:
                group = parent[group]
            return group

        for tree in self.joint:
            first, *others = groups_of(tree)
            for other in others:
                parent[root(other)] = root(first)
        units: dict[str, _Unit] = {}

        def unit_of(group: str) -> _Unit:
            name = root(group) if group in parent else f"plain:{group}"
            return units.setdefault(name, _Unit())

        for key, uses in self.clean.items():
            unit = unit_of(key[0])
            unit.clean.append(key)
            unit.sizes.append(spec.groups[key[0]].size)
            unit.last = max([unit.last, *(order.get(p.node, -1) for p, _ in uses)])
        for tree, points in self.joint.items():
            unit = unit_of(next(groups_of(tree)))
            unit.joint.append(tree)
            unit.sizes.append(tree_size(tree))
            unit.last = max([unit.last, *(order.get(p.node, -1) for p in points)])
        for unit in units.values():
            members = {key[0] for key in unit.clean} | {g for tree in unit.joint for g in groups_of(tree)}
            unit.groups = [g for g in spec.groups if g in members]
        return sorted(units.values(), key=lambda unit: unit.last)

    def nested(self, spec: PermutationSpec) -> list[str]:
        """The groups nested in a joint axis, in the spec's order (the groups
        coordinate ascent sweeps over, in one random order per sweep)."""
        return [g for g in spec.groups if any(g in set(groups_of(t)) for t in self.joint)]


@dataclass(eq=False)
class _Unit:
    """Statistics whose groups are solved together (see :meth:`_Plan.units`):
    the pooled statistics ``clean`` and joint axes ``joint``, with the number
    of units of each in ``sizes``; ``last``: graph position of the last node
    that feeds them."""

    groups: list[str] = field(default_factory=list)
    clean: list[_Key] = field(default_factory=list)
    joint: list[AxisTree] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    last: int = -1

    def describe(self) -> str:
        """``"Group 'x' needs"`` or ``"Groups 'x', 'y' (matched together) need"``."""
        if len(self.groups) == 1:
            return f"Group {self.groups[0]!r} needs"
        listed = ", ".join(map(repr, self.groups[:4])) + (", ..." if len(self.groups) > 4 else "")
        return f"Groups {listed} (matched together) need"


def planned_bytes(units: Sequence[_Unit]) -> int:
    """Peak bytes of statistics one pass holds for ``units``: every state
    (:meth:`ActivationStats.state_bytes`) plus the scratch of the widest one
    (:meth:`ActivationStats.workspace_bytes`), which the pass shares between
    its statistics while updating them, and each unit uses in turn to compute
    its similarities and solve them."""
    sizes = [n for unit in units for n in unit.sizes]
    if not sizes:
        return 0
    return sum(ActivationStats.state_bytes(n) for n in sizes) + ActivationStats.workspace_bytes(max(sizes))


RESERVE = 8
"""Statistics are planned within ``max_memory - max_memory // RESERVE``: an
eighth of the budget is left for what the plan does not count (the forward
passes' values, scratch of the size of one activation, allocator slack)."""


def usable_bytes(max_memory: int) -> int:
    """The part of ``max_memory`` the planned statistics may fill."""
    return max_memory - max_memory // RESERVE


def needed_budget(planned: int) -> int:
    """The smallest ``max_memory`` whose :func:`usable_bytes` hold ``planned``."""
    budget = planned + planned // (RESERVE - 1)
    while usable_bytes(budget) < planned:
        budget += 1
    while budget > 1 and usable_bytes(budget - 1) >= planned:
        budget -= 1
    return budget


def plan_passes(units: Sequence[_Unit], max_memory: int) -> list[list[_Unit]]:
    """``units`` (in graph order) packed into consecutive passes whose
    :func:`planned_bytes` are at most :func:`usable_bytes` of ``max_memory``:
    one pass when all fit.

    Raises:
        ArgumentValueError: one unit alone needs more (its groups named,
            with the bytes it needs and the ``max_memory`` that holds them).
    """
    usable = usable_bytes(max_memory)
    passes: list[list[_Unit]] = [[]]
    for unit in units:
        need = planned_bytes([unit])
        if need > usable:
            raise ArgumentValueError(
                f"{unit.describe()} {need} bytes of statistics ({_mib(need)}), more than max_memory={max_memory} "
                f"({_mib(max_memory)}) leaves them (7/8 of it); pass max_memory={needed_budget(need)} or more, or "
                "leave it out (half the free memory)."
            )
        if passes[-1] and planned_bytes([*passes[-1], unit]) > usable:
            passes.append([])
        passes[-1].append(unit)
    return passes


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def default_max_memory(device: torch.device) -> int:
    """Half the memory free now where the statistics live: on CUDA
    ``torch.cuda.mem_get_info``, on the CPU the available physical pages
    (``os.sysconf``); no limit where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 2
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")) // 2
    except (AttributeError, ValueError, OSError):  # no sysconf name (e.g. macOS): no limit
        return 2**62


def _batches(
    data: Iterable[Any], num_batches: int | None, progress: bool, desc: str = "activation matching"
) -> Iterator[Any]:
    iterator: Iterable[Any] = data
    if progress:
        try:
            from tqdm.auto import tqdm

            total = num_batches if num_batches is not None else (len(data) if hasattr(data, "__len__") else None)  # type: ignore[arg-type]
            iterator = tqdm(data, total=total, desc=desc, leave=False, delay=0.5)
        except ImportError:
            pass
    for index, batch in enumerate(iterator):
        if num_batches is not None and index >= num_batches:
            break
        yield batch


class _Pass:
    """What the passes over the data need, set up from the spec: the recipe
    per group, the plan of statistics, its units packed into passes within
    ``max_memory``, the prober, and the statistics of the current pass.

    Raises:
        SpecMismatchError: a model does not match the spec.
        SpecError: the spec holds no captured graph.
        ArgumentValueError: ``points`` does not fit the spec's groups, or a
            unit of statistics needs more than ``max_memory``.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        model_a: nn.Module,
        model_b: nn.Module,
        points: PointsChoice,
        stream_points: str,
        max_joint: int,
        device: torch.device,
        max_memory: int,
        stats_dtype: torch.dtype | None,
        mask: Mapping[str, Tensor] | None = None,
        restrict_ties: bool = True,
    ) -> None:
        check_same_architecture(model_a, spec, "model_a")
        check_same_architecture(model_b, spec, "model_b")
        self.spec = spec
        self.weights: dict[str, Tensor] | None = None
        if mask is not None:  # from A's weights and mask only: the same on every rank, no collective
            masses = unit_masses(spec, model_a.state_dict(), check_mask(mask, spec))
            self.weights = unit_weights(masses)
        self.chosen = _resolve_points(points, spec)
        selected = {
            g: select_points(spec.activations[g], g, self.chosen[g], stream_points)
            for g in spec.groups
            if spec.activations.get(g)
        }
        self.plan = _Plan(
            spec,
            {g: primary for g, (primary, _) in selected.items()},
            {g: tiebreak for g, (_, tiebreak) in selected.items() if tiebreak},
            max_joint,
        )
        self.prober = _Prober(spec, model_a, sorted({p.node for p in self.plan.points}))
        self.uses = self.plan.uses()
        self.passes = plan_passes(self.plan.units(spec), max_memory)
        self.nested = self.plan.nested(spec)
        self.joint_weights: dict[AxisTree, Tensor] | None = None
        if self.weights is not None:
            found = {tree: position_weights(tree, self.weights) for tree in self.plan.joint}
            self.joint_weights = {tree: w for tree, w in found.items() if w is not None}
        self.device, self.stats_dtype = device, stats_dtype
        self.restrict_ties = restrict_ties
        self.waiting: dict[str, int] = {}
        self.workspace = _Workspace()
        self.clean: _Stats = {}
        self.joint: _JointStats = {}
        self.indices: dict[str, Tensor] = {}
        self.reports: dict[str, dict[str, float]] = {}

    def start(self, index: int) -> None:
        """Set up the (empty) statistics of pass ``index``, and which nodes feed them."""
        units = self.passes[index]
        self.clean = {key: self._stats(self.spec.groups[key[0]].size, key) for u in units for key in u.clean}
        self.joint = {tree: self._stats(tree_size(tree)) for u in units for tree in u.joint}
        for (group, _), stats in self.clean.items():
            if isinstance(stats, TieBreakStats):  # which units stay constant is read off the primary statistic
                stats.watch(self.clean[(group, PRIMARY)])
        self.pass_uses = {
            node: kept
            for node, uses in self.uses.items()
            if (
                kept := [
                    u for u in uses if (u.key in self.clean if isinstance(u, _PooledUse) else u.tree in self.joint)
                ]
            )
        }
        self.waiting = {  # per restricted tie-break: how many primary points each batch visits
            group: sum(
                u.key == (group, PRIMARY) for uses in self.pass_uses.values() for u in uses if isinstance(u, _PooledUse)
            )
            for (group, _), stats in self.clean.items()
            if isinstance(stats, TieBreakStats)
        }

    def _stats(self, n: int, key: _Key | None = None) -> ActivationStats:
        stats: ActivationStats
        if key is not None and key[1] == TIEBREAK and self.restrict_ties:
            weights = self.weights.get(key[0]) if self.weights is not None else None
            stats = TieBreakStats(n, self.device, self.stats_dtype, None if weights is None else weights == 0)
        else:
            stats = ActivationStats(n, self.device, self.stats_dtype)
        stats._workspace = self.workspace
        return stats

    def visit(self, state_a: dict[str, Tensor], state_b: dict[str, Tensor], flat: list[Any], batch: int) -> None:
        """Run both models on one batch, updating this pass's statistics."""
        visitor = _Visitor(self.pass_uses, self.clean, self.joint, batch, self.waiting)
        self.prober(state_a, state_b, flat, visitor, self.pass_uses)
        visitor.flush()

    def finish(self, index: int, cost: str, solve: bool) -> None:
        """Merge this pass's statistics across ranks, then (where ``solve``)
        compute each unit's similarities and solve its groups, freeing each
        statistic once its similarity is computed."""
        for stats in (*self.clean.values(), *self.joint.values()):
            stats.sync()
        self.workspace.clear()
        clean, joint = self.clean, self.joint
        self.clean, self.joint = {}, {}
        if not solve:
            return
        for unit in self.passes[index]:
            similarities: dict[str, Tensor] = {}
            tiebreaks: dict[str, Tensor | TieBreakSimilarity] = {}
            joint_similarities: dict[AxisTree, Tensor] = {}
            for key in unit.clean:
                stats = clean.pop(key)
                if isinstance(stats, TieBreakStats) and stats.count:
                    tiebreaks[key[0]] = stats.compute_blocks(cost)
                elif stats.count:
                    (similarities if key[1] == PRIMARY else tiebreaks)[key[0]] = stats.compute(cost).cpu()
                del stats
            for tree in unit.joint:
                stats = joint.pop(tree)
                if stats.count:
                    joint_similarities[tree] = stats.compute(cost).cpu()
                del stats
            indices, report = _solve(
                self.spec,
                similarities,
                joint_similarities,
                tiebreaks,
                sweep_over=self.nested,
                weights=self.weights,
                joint_weights=self.joint_weights,
            )
            self.indices.update(indices)
            self.reports.update(report)
            del similarities, tiebreaks, joint_similarities

    def report(self) -> dict[str, dict[str, float]]:
        """Per group, in the order of one solve over every group: the pooled
        groups in the plan's order, then the other nested groups."""
        order = [g for g, kind in self.plan.clean if kind == PRIMARY] + self.nested
        return {g: self.reports[g] for g in dict.fromkeys(order) if g in self.reports}


def _agree_on_pass(ok: bool, device: torch.device) -> bool:
    """Whether every ``torch.distributed`` rank is ``ok`` (one all-reduce)."""
    flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(flag)
    return not float(flag)


def _agree_on_budget(max_memory: int, device: torch.device) -> int:
    """The smallest ``max_memory`` of all ``torch.distributed`` ranks, so
    that every rank plans the same passes."""
    budget = torch.tensor([float(max_memory)], dtype=torch.float64, device=device)
    dist.all_reduce(budget, op=dist.ReduceOp.MIN)
    return int(budget)


def _agree_on_data(seen: int, has_spec: bool, device: torch.device) -> None:
    """Tell every ``torch.distributed`` rank how many batches each rank read
    (one all-reduce, which every rank reaches, with or without batches), so
    that all ranks go on to :meth:`ActivationStats.sync` together or all
    raise the same error.

    Raises:
        DataError: on every rank, when no rank read a batch, or when a rank
            read none and has no ``spec`` to set up its (empty) statistics
            from (the ranks are named).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    table = torch.zeros(2, world, dtype=torch.float64, device=device)
    table[0, rank] = float(seen)
    table[1, rank] = float(seen == 0 and not has_spec)
    dist.all_reduce(table)
    counts, stranded = table[0].tolist(), [r for r, flag in enumerate(table[1].tolist()) if flag]
    if not any(counts):
        raise DataError(
            f"Argument 'data' yielded no batches on any of the {world} ranks (exhausted iterators?); pass lists "
            "or DataLoaders that hold at least one batch on some rank."
        )
    if stranded:
        raise DataError(
            f"Argument 'data' yielded no batches on rank{'s' if len(stranded) > 1 else ''} "
            f"{', '.join(map(str, stranded))} and 'spec' was not given there, so the rank cannot set up the "
            "statistics it must all-reduce with its peers; pass spec=ma.build_spec(model_a, example_inputs) "
            "on every rank, or give every rank at least one batch."
        )


def match_activations(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    spec: PermutationSpec | None = None,
    *,
    num_batches: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    cost: str = "correlation",
    points: PointsChoice = DEFAULT_POINTS,
    stream_points: str = DEFAULT_STREAM_POINTS,
    progress: bool = True,
    max_joint: int = 4096,
    max_memory: int | None = None,
    stats_dtype: torch.dtype | None = None,
    mask: Mapping[str, Tensor] | None = None,
) -> Permutation:
    """Find the permutation that aligns ``model_a``'s hidden units to ``model_b``'s.

    For every group of the spec, the activations of the graph values chosen by
    ``points`` and ``stream_points`` are pooled over batch and spatial/sequence
    positions (and over the chosen values: each one adds its samples), and one
    linear assignment maximises the summed similarity of matched units (Git
    Re-Basin, Sec. 3.1). Nested groups (attention heads and the dims inside
    each head, concatenated slices) are matched as blocks first, then inside
    the aligned blocks, then refined by coordinate ascent over the groups.
    Both models run once over ``data`` whatever the choice.

    Which values (see :class:`~maskalign.spec.ActivationPoint`): a
    *nonlinearity* is a graph node whose op has the ``"nonlinearity"`` role
    (ReLU, ReLU6, GELU, SiLU, tanh, sigmoid, LeakyReLU, ELU, PReLU, ...;
    :func:`~maskalign.register_rule` adds more).

    * ``points="pre"``: the inputs of the nonlinearities that carry the group
      (pre-activations: a conv's BatchNorm output, a linear layer's output, a
      residual block's sum before its ReLU). A group that meets no
      nonlinearity input (a pre-norm transformer's residual stream, attention
      heads, the input of a final linear layer fed without a nonlinearity)
      uses every non-view value that carries it instead.
    * ``points="post"``: the outputs of those nonlinearities
      (post-activations, as in the code of Adnan et al. 2025 and REPAIR). A
      group with no nonlinearity output falls back to what ``"pre"`` uses.
      Units whose post-activation statistic cannot tell them apart (a dead
      ReLU unit is constant 0 and has correlation 0 with everything) are
      matched among themselves by the pre-activation statistic of the same
      units (see *Ties* below).
    * ``points="both"``: the values of ``"pre"`` and of ``"post"`` pooled into
      one statistic (a value that is both counts once).
    * a mapping group name -> one of those (groups left out get
      :data:`DEFAULT_POINTS`), or a callable ``points(group_name) -> choice``,
      to choose per group (``spec.groups`` lists the names).

    ``stream_points`` says what a group carried by a *residual stream* uses.
    Such a group is carried by several nonlinearities: every block of a
    stage adds into the same units (in a ResNet one group is one stage's
    stream: the stream changes width, and so group, only at the downsampling
    shortcut conv between stages). ``"all"`` pools every chosen value of
    the group (for a ResNet stage with ``"pre"``: the stem's or first block's
    BatchNorm output and every block's sum); ``"last"`` keeps only the last
    one in graph order (with ``"post"``: the output of the stage's last block,
    the paper's choice; with ``"both"``: the last pre-activation and the last
    post-activation; the tie-break of ``"post"`` then uses the last
    pre-activation). A group with one chosen value (every group of a plain
    MLP or VGG, a block's inner units) is the same under both, and groups
    nested in a joint axis (heads) always pool all of theirs.

    Ties: after the LAP on the chosen statistic, A's units whose rows of the
    similarity matrix are exactly equal (a row of zeros for dead or constant
    units under ``"correlation"`` and ``"covariance"``; equal rows of equal
    constants under ``"euclidean"``) can trade the B units they were given
    without changing the matched total; so can B's units with equal columns.
    Each such class is re-matched among itself by a second LAP on the
    pre-activation similarity (same ``cost``) of the same units. The
    primary total is exactly unchanged, so this is a lexicographic
    optimum restricted to the ties, never a trade of primary similarity for
    secondary. Matching a model against a permuted copy of itself thus
    recovers the permutation for every choice, as long as a unit that is
    constant after its nonlinearity varies before it.

    Only tied units read the tie-break statistic, and a unit that varies in
    the chosen statistic is tied (by constancy) with no other, so in one
    process its cross products are accumulated only where they can be
    read: the rows of A's units and the columns of B's units that have
    been constant in the chosen statistic on every sample so far (exactly:
    the smallest and largest value of each unit are tracked, in
    ``stats_dtype``), plus, with ``mask``, A's units of weight 0 (their
    weighted rows are 0). A unit leaves that set at the first batch where
    it varies and never comes back; a batch's pre-activations wait until
    its post-activations have been seen. Every tie class of constant units
    is thus re-matched exactly as with the full statistic: its entries are
    the same sums, up to the float32 rounding of a smaller product per
    batch (identical permutations on the test suite and on
    ``benchmarks/bench_matching_scale.py``'s ResNet50). A class with a unit
    that varied (exactly equal rows of different activations, e.g. two
    copies of one unit) has no tie-break data: it keeps its primary
    assignment (still optimal for the chosen statistic), and the report's
    ``"tied_kept"`` counts those pairs. Under ``torch.distributed`` a unit
    constant on one rank's shard may vary on another's, so the full
    tie-break statistic is collected, as before, and all-reduced.

    Memory: per pooled statistic of ``n`` units the state is an ``(n, n)``
    float64 matrix of cross deviations and four ``(n,)`` vectors
    (:meth:`ActivationStats.state_bytes`: 128 MiB at ``n = 4096``), and a
    pass shares scratch of three float64 ``(n, n)`` matrices for its widest
    statistic (:meth:`ActivationStats.workspace_bytes`). Statistics are
    grouped in units solved together (a group with its tie-break statistic;
    groups nested in joint axes that share groups, such as one attention
    layer's heads and head dims, with those axes), packed in graph order into
    passes whose planned bytes fit 7/8 of ``max_memory`` (the rest is left
    for the forward passes and scratch of the size of one activation). One
    pass when everything fits: the result is then bitwise that of a single pass. Otherwise each
    pass runs both models over the same batches, only as far as its units'
    graph nodes need, and accumulates only their statistics; a unit is
    solved, and its statistics freed, when its pass ends. The permutation
    equals the one-pass permutation exactly (the same statistics, merged in
    the same order; coordinate ascent over nested groups draws the same
    sweep orders). ``data`` must then yield the same batches on every
    iteration: a list or a DataLoader without shuffling. Activation-sized
    buffers (the forward passes, centred copies of one activation) come on
    top of the planned bytes.

    Precision: each batch's statistics are computed in ``stats_dtype`` (by
    default the activations' own: float32 for a float32 model) and merged
    across batches in float64. On a random ResNet50 with BatchNorm
    statistics from train-mode passes (64x64 inputs, 4 batches of 32;
    ``benchmarks/bench_matching_scale.py``), float32 batch statistics gave
    the permutation of ``stats_dtype=torch.float64`` for 100% of its 11,456
    units (all 37 groups identical; matched correlations within 4e-9), in
    a seventh of the time on the CPU.

    Mask-aware matching (``mask=m_A``, opt-in; issue 17): the matching above
    aligns every unit of A equally, but only the weights that A's mask keeps
    are carried over to B by the permuted mask, so a unit whose weights are
    (mostly) pruned matters little where it lands, while a unit that carries
    much of the sparse network should get its best partner. For group ``g``
    and A's unit ``i``, the surviving mass is ``M_i = sum_t sum |W_A[t] *
    m_A[t]|``, over the parameters ``t`` in ``mask`` that carry ``g`` on
    some axis (the unit's row of the layer that computes it and its column
    of the layer that reads it) and the entries of ``t`` at unit ``i``'s
    positions on that axis; the unit's weight is ``w_i = M_i / mean_j M_j``
    (mean 1, so ``pi.report``'s values keep their scale; a group that no
    masked parameter carries, or whose masked weights are all 0, gets ``w =
    1``). The assignment then maximises ``sum_i w_i S[i, pi(i)]``: row ``i``
    of the similarity is scaled by ``w_i``. Rows compete for B's columns,
    so this changes which of A's units get a contested column; a mask of
    all ones changes the result only through the magnitudes of A's weights.
    A unit whose kept weights are all 0 (``w_i = 0``) has a zero row: such
    units form a tie class and are placed by the pre-activation tie-break
    (unweighted), exactly as dead units are (*Ties*: the weighted total is
    unchanged by it). Nested groups: a position of a joint axis (head ``h``,
    dim ``d``) is weighted by the product of the weights of its units
    (``w_h * w_d``), normalised to mean 1, and block matching and
    coordinate ascent maximise the weighted total. The weights come from
    A's weights and mask alone, so under ``torch.distributed`` every rank
    computes the same ones without a collective. Measured
    (``benchmarks/bench_mask_aware.py``) on digits with the preset's MLP, 8 seeds, plain
    vs mask-aware: the sparse-trained B_k with pi(m_A) gained +0.28 +- 0.78 / +0.17
    +- 0.26 points of test accuracy at sparsity 0.9 (k = 0 / 10) and +0.22 +- 2.09 /
    +0.61 +- 0.77 at 0.98, each below the seed noise of plain matching (0.1-0.8 of
    its std; paired t <= 2.3, none significant at p < 0.05); the dense barrier of
    pi(A_T) and B_T rose from 0.022 to 0.026 / 0.030 (the weights trade dense
    alignment for the surviving units'); the permutations agreed on 47% / 39% of the
    units. No measured gain: it stays an opt-in option, not the default.

    Source: activation matching of Git Re-Basin (Ainsworth et al., ICLR 2023,
    Sec. 3.1; after Li et al. 2015), the method Adnan et al. (ICML 2025) align
    their masks with.

    Args:
        model_a: the model to align (the permutation applies to it).
            Switched to eval mode for the pass and restored afterwards; not
            modified.
        model_b: the reference model, of the same architecture and on the
            same device as ``model_a``; treated like it.
        data: a DataLoader or any iterable of batches, each one of: a
            tensor (the input); a mapping such as ``{"input_ids": ...,
            "attention_mask": ...}`` or a transformers ``BatchEncoding``
            (keyword inputs: the models run as ``model(**batch)``); a
            tuple/list whose first element is the input (``(inputs, labels)``
            pairs; the input may itself be a mapping); or anything that
            ``input_fn`` maps to forward's inputs. Batches are moved to the
            models' device (floating tensors also to their dtype).
        spec: the permutation spec; built from ``model_a`` and the first batch
            if omitted.
        num_batches: use at most this many batches.
        input_fn: maps a batch to forward's inputs: a tensor, a tuple of
            positional inputs, or a mapping of keyword inputs.
        cost: ``"correlation"`` (exact Pearson correlation, default; a unit
            with zero variance has correlation 0 with everything),
            ``"covariance"`` or ``"euclidean"`` (minus the mean squared
            distance); any of them with any ``points``.
        points: ``"pre"``, ``"post"``, ``"both"``, a mapping group name ->
            choice or a callable group name -> choice (see above). Default
            :data:`DEFAULT_POINTS`.
        stream_points: ``"all"`` or ``"last"`` (see above). Default
            :data:`DEFAULT_STREAM_POINTS`.
        progress: show a tqdm progress bar of the batches (when tqdm is
            installed; it appears only if matching takes more than half a
            second); ``False`` is silent.
        max_joint: largest joint axis (e.g. heads x head_dim) whose full
            ``(N, N)`` statistic is kept for nested groups; larger ones are
            skipped with a warning.
        max_memory: bytes the statistics may hold at once (see *Memory*);
            ``None`` (default): half the memory free where they live
            (``torch.cuda.mem_get_info`` on CUDA, the available physical
            pages on the CPU). Under ``torch.distributed`` the smallest of
            the ranks' budgets is used, so that all plan the same passes.
        stats_dtype: ``torch.float32`` or ``torch.float64``: the dtype of
            each batch's statistics before the float64 merge; ``None``
            (default): the activations' own precision (float32 for float32,
            float16 and bfloat16 models, float64 for float64 ones).
        mask: model A's pruning mask for mask-aware matching (see above):
            parameter name -> ``torch.bool`` tensor, or tensor of 0s and 1s,
            of the parameter's shape (the format of
            :func:`~maskalign.permute_mask`, e.g. IMP's mask of A;
            parameters without a mask are left out of the masses); not
            modified. ``None`` (default): every unit weighs the same, the
            result of earlier versions bitwise. Measured on digits (8
            seeds, above): no gain in sparse-training accuracy beyond the
            seed noise, a higher dense barrier; kept as an opt-in option.

    Returns:
        A :class:`Permutation` ``pi`` with ``apply_permutation(model_a, pi)``
        aligned to ``model_b``. ``pi.report`` holds ``"method"``
        (``"activation"``), ``"cost"``, ``"points"`` (the string passed, or a
        dict group name -> choice when a mapping or callable was passed),
        ``"stream_points"``, and ``"groups"``: per group name ``"before"``
        (every group the identity) and ``"after"`` (every group matched),
        the mean of the chosen statistic over the pairs of units that the
        group's matched total sums, every pair weighing the same: for a
        group pooled into one statistic, its ``n`` units paired with their
        matches; for a group nested in a joint axis (heads, the dims inside
        a head), every position of that axis the group carries, paired with
        its position under the whole permutation (a head's ``head_dim``
        positions, or a head dim's one per head), over all its joint axes
        and its pooled statistic together. Under ``"correlation"`` this is
        the mean Pearson correlation of matched units, in ``[-1, 1]``
        (1 for a model against a permuted copy of itself, when no unit is
        constant); under ``"covariance"`` the mean matched covariance;
        under ``"euclidean"`` minus the mean squared distance of matched
        units. Groups matched on post-activations with a pre-activation
        tie-break also have ``"tied"``: the number of matched pairs that
        lay in a tie class (decided by the tie-break), and, where a tie
        class held units whose tie-break was not collected (see *Ties*),
        ``"tied_kept"``: its pairs, left at the primary assignment. ``"passes"``: the
        number of passes over the data; ``"stats_bytes"``: the planned peak
        bytes of statistics of the largest pass; ``"max_memory"``: the
        budget planned for. ``"mask_aware"``: whether ``mask`` was given;
        its groups' ``"before"`` / ``"after"`` are then still the unweighted
        means, and the groups whose units were weighted also have
        ``"weighted_before"`` / ``"weighted_after"``, the means of the
        weighted statistic (``w_i S[i, j]``) that the assignment maximised.
        All of it is JSON-serialisable.

    Raises:
        ArgumentTypeError: (a ``TypeError``) ``model_a`` or ``model_b`` is
            not a module (e.g. the arguments are swapped), ``data`` is not an
            iterable of batches (a tensor, a single dict, a model), ``spec``
            is not a :class:`~maskalign.spec.PermutationSpec`, ``input_fn`` is
            not callable, ``points`` is neither a str, a mapping nor callable,
            ``num_batches`` / ``max_joint`` / ``max_memory`` is not an int,
            ``stats_dtype`` is not a dtype, ``mask`` is not a mapping (or is
            a permutation), or ``data`` is a one-shot
            iterator (a generator) while matching within ``max_memory``
            takes several passes (the message says to pass a list or a
            DataLoader).
        ArgumentValueError: (a ``ValueError``) an unknown ``cost``,
            ``points`` or ``stream_points`` (close names are suggested), a
            ``points`` mapping that names a group the spec does not have, a
            ``points`` mapping or callable that gives an unknown choice for a
            group (named), ``num_batches`` / ``max_joint`` / ``max_memory``
            below 1, ``stats_dtype`` another dtype than float32 or float64,
            or one unit of statistics alone needs more than ``max_memory``
            (the message names its groups and the bytes they need).
        SpecMismatchError: the models differ in parameter names or shapes, sit
            on different devices, or hold their weights in different dtypes.
        SpecError: ``spec`` was not made by :func:`~maskalign.build_spec`.
        DataError: ``data`` yields no batch (under ``torch.distributed``: on
            no rank, or on a rank without ``spec``), a batch holds no tensor
            (or a list of numbers, a numpy array), a batch's inputs are not
            those the spec was built from, an activation is not finite (the
            message names the graph node and the batch), or ``data`` yields
            fewer or more batches in a later pass than in the first.
        MaskError: (a ``ValueError``) ``mask`` names a key that is not a
            parameter of the spec (close names are suggested), or holds a
            value that is not a dense tensor of its parameter's shape and of
            0s and 1s (the key and the shapes named).
        TraceError: the model cannot be captured on the first batch; for a
            transformers model with ``config.use_cache=True`` whose forward
            returns a key/value cache, the message says to pass
            ``use_cache=False``.

    Distributed: under an initialised ``torch.distributed`` process group, each
    rank passes its own shard of the data; the statistics are all-reduced
    (:meth:`ActivationStats.sync`), rank 0 solves, and every rank returns the
    same permutation. A rank whose shard yields no batch takes part with zero
    counts, provided it was given ``spec`` (without one it cannot know the
    statistics' shapes); the ranks first agree on how many batches each
    read, so that they all go on together or all raise the same
    :class:`~maskalign.errors.DataError` (no batch on any rank, or a rank
    without batches and without ``spec``, named) instead of leaving peers
    waiting in a collective.

    Example:
        >>> import torch, maskalign as ma
        >>> from maskalign.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model_b = MLP(in_features=64, hidden=(32, 32), num_classes=10)
        >>> spec = ma.build_spec(model_b, torch.randn(2, 64))
        >>> sigma = ma.random_permutation(spec, torch.Generator().manual_seed(1))
        >>> model_a = ma.apply_permutation(model_b, sigma)      # B with its hidden units relabelled
        >>> data = [torch.randn(128, 64) for _ in range(4)]     # batches of inputs (or (x, y) pairs)
        >>> pi = ma.match_activations(model_a, model_b, data, spec, progress=False)
        >>> pi == sigma.inverse()
        True
        >>> pi.report["points"], pi.report["stream_points"]
        ('post', 'last')
    """
    _check_module(model_a, "model_a", _CALL)
    _check_module(model_b, "model_b", _CALL)
    _check_data(data)
    if spec is not None and not isinstance(spec, PermutationSpec):
        hint = "; pass perm.spec" if isinstance(spec, Permutation) else ""
        raise ArgumentTypeError(
            f"Argument 'spec' is {_describe(spec)}, not a PermutationSpec{hint}; build one with "
            "ma.build_spec(model_a, example_inputs), or leave it out."
        )
    if input_fn is not None:
        _check_callable(input_fn, "input_fn", "input_fn(batch) -> forward's inputs (a tensor, a tuple or a dict)")
    _check_choice(cost, "cost", COSTS)
    _check_points(points)
    _check_choice(stream_points, "stream_points", STREAM_POINTS)
    _check_int(num_batches, "num_batches", 1, allow_none=True)
    _check_int(max_joint, "max_joint", 1)
    _check_int(max_memory, "max_memory", 1, allow_none=True)
    _check_stats_dtype(stats_dtype)
    if mask is not None:  # its keys and shapes are checked against the spec (built from the first batch)
        check_mask_type(mask)
    device, dtype = _models_device_dtype(model_a, model_b)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    _check_dtypes(state_a, state_b)
    input_fn = input_fn or _default_input_fn
    distributed = dist.is_available() and dist.is_initialized()
    budget = default_max_memory(device) if max_memory is None else int(max_memory)
    if distributed:  # every rank reaches it: all plan the same passes
        budget = _agree_on_budget(budget, device)
    solve = not distributed or dist.get_rank() == 0
    one_shot = isinstance(data, Iterator)

    def new_pass(spec: PermutationSpec) -> _Pass:
        """The statistics of every group of ``spec``, their passes planned."""
        return _Pass(
            spec,
            model_a,
            model_b,
            points,
            stream_points,
            max_joint,
            device,
            budget,
            stats_dtype,
            mask,
            restrict_ties=not distributed,
        )

    run: _Pass | None = None
    first_count = 0
    index_of_pass, passes = 0, 1
    with eval_mode(model_a, model_b), torch.no_grad():
        while index_of_pass < passes:
            desc = "activation matching" if passes == 1 else f"activation matching, pass {index_of_pass + 1}/{passes}"
            seen = 0
            for index, batch in enumerate(_batches(data, num_batches, progress, desc)):
                inputs = _split_inputs(input_fn(batch), index)
                args, kwargs = pytree.tree_map(lambda x: _to_model(x, device, dtype), inputs)
                if run is None:
                    for model, which in ((model_a, "model_a"), (model_b, "model_b")):
                        _check_no_cache(model, which, args, kwargs)
                    if spec is None:
                        spec = build_spec(model_a, args, kwargs)
                    run = new_pass(spec)
                    run.plan.warn_skipped(max_joint)  # (stacklevel: the caller of match_activations)
                    passes = len(run.passes)
                    _check_passes(data, one_shot and not distributed, passes, budget)
                    run.start(0)
                flat = _arrange((args, kwargs), run.prober.reference.input_spec, index)
                run.visit(state_a, state_b, flat, index)
                seen += 1
            if index_of_pass == 0:
                first_count = seen
                if distributed:  # before any other collective: a rank without batches must not leave its peers waiting
                    _agree_on_data(seen, spec is not None, device)
                if run is None:
                    if (
                        not distributed or spec is None
                    ):  # (distributed without a spec: _agree_on_data raised on every rank)
                        raise DataError(
                            "Argument 'data' yielded no batches (an exhausted iterator?); pass a list or a DataLoader "
                            "with at least one batch."
                        )
                    run = new_pass(spec)
                    run.plan.warn_skipped(max_joint)  # zero counts
                    passes = len(run.passes)
                    run.start(0)
                if distributed and not _agree_on_pass(not (one_shot and passes > 1), device):
                    _check_passes(data, True, passes, budget)
                    raise ArgumentTypeError(
                        f"Argument 'data' is a one-shot iterator on another rank but matching within max_memory="
                        f"{budget} takes {passes} passes over the data; pass lists of batches or DataLoaders on "
                        "every rank."
                    )
            else:
                same = seen == first_count
                if distributed:
                    same = _agree_on_pass(same, device)
                if not same:
                    raise DataError(
                        f"Argument 'data' yielded {first_count} batches in the first pass but {seen} in pass "
                        f"{index_of_pass + 1} (on this or another rank); matching within max_memory={budget} reads "
                        "the data once per pass, so pass a list of batches or a DataLoader that yields the same "
                        "batches every time."
                    )
            if run is None:  # (unreachable: the first pass set it up or raised)
                raise DataError("Argument 'data' yielded no batches; pass a list or a DataLoader with batches.")
            run.finish(index_of_pass, cost, solve)
            index_of_pass += 1
            if index_of_pass < passes:
                run.start(index_of_pass)
    if run is None:  # (unreachable, as above)
        raise DataError("Argument 'data' yielded no batches; pass a list or a DataLoader with batches.")
    solved: list[Any] = [(run.indices, run.report())]
    if distributed:
        dist.broadcast_object_list(solved, src=0)
    indices, report = solved[0]
    recipe: str | dict[str, str] = points if isinstance(points, str) else dict(run.chosen)
    return Permutation(
        run.spec,
        indices,
        report={
            "method": "activation",
            "cost": cost,
            "points": recipe,
            "stream_points": stream_points,
            "groups": report,
            "passes": passes,
            "stats_bytes": max(planned_bytes(units) for units in run.passes),
            "max_memory": budget,
            "mask_aware": mask is not None,
        },
    )


def _check_passes(data: Any, one_shot: bool, passes: int, budget: int) -> None:
    """Raise :class:`ArgumentTypeError` when a one-shot iterator would be read
    ``passes > 1`` times; warn when a shuffling DataLoader would."""
    if passes <= 1:
        return
    if one_shot:
        raise ArgumentTypeError(
            f"Argument 'data' is a one-shot iterator ({type(data).__name__}) but matching within max_memory="
            f"{budget} ({_mib(budget)}) takes {passes} passes over the data; pass a list of batches or a DataLoader "
            "(or a larger max_memory)."
        )
    if isinstance(getattr(data, "sampler", None), torch.utils.data.RandomSampler):
        warnings.warn(
            f"Argument 'data' is a DataLoader that shuffles, and matching within max_memory={budget} takes "
            f"{passes} passes over it: each pass sees the samples in another order (other samples with "
            "num_batches or drop_last), so groups of different passes see other batches; pass shuffle=False for "
            "the one-pass result.",
            stacklevel=4,
        )


class _Visitor:
    """Updates the statistics of one batch from each activation as it is computed.

    A restricted tie-break statistic (:class:`TieBreakStats`) adds a batch
    only once the batch's primary points of its group have been visited,
    so that the units that varied there are no longer candidates: its
    points (pre-activations) come first in the graph, so copies of their
    values (a later in-place op may change the originals) wait in
    ``pending`` until then, or until :meth:`flush` at the end of the batch.
    Once no unit is a candidate, a batch is only counted (and checked for
    finite values). ``waiting``: per such group, the primary points of the
    batch still to be visited."""

    def __init__(
        self,
        uses: Mapping[str, list[_Use]],
        clean: _Stats,
        joint: _JointStats,
        batch: int,
        waiting: Mapping[str, int] | None = None,
    ) -> None:
        self.uses, self.clean, self.joint, self.batch = uses, clean, joint, batch
        self.waiting = dict(waiting or {})
        self.pending: dict[str, list[tuple[str, Tensor, Tensor]]] = {}

    def __call__(self, node: str, value_a: Tensor, value_b: Tensor) -> None:
        touched = []
        ready = []
        for use in self.uses[node]:
            point = use.point
            if isinstance(use, _JointUse):
                stats = self.joint[use.tree]
                stats.update(_joint(value_a, point), _joint(value_b, point))
                touched.append(stats)
                continue
            stats = self.clean[use.key]
            if use.positions is None:  # one carrying dim that is the group: a view, no copy
                x, y = _layout(value_a, point.dims[0]), _layout(value_b, point.dims[0])
            else:
                where = use.positions.to(value_a.device)
                x, y = _units(_joint(value_a, point), where), _units(_joint(value_b, point), where)
            group = use.key[0]
            if isinstance(stats, TieBreakStats):
                self._check(node, stats, x, y, value_a, value_b)
                if stats.idle:
                    stats.skip(x)
                elif self.waiting.get(group, 0) > 0:  # copies: a later in-place op may change the values
                    self.pending.setdefault(group, []).append((node, x.clone(), y.clone()))
                else:
                    self._add(group, node, x, y)
                continue
            stats.update(x, y)
            touched.append(stats)
            if use.key[1] == PRIMARY and self.waiting.get(group, 0) > 0:
                self.waiting[group] -= 1
                if not self.waiting[group]:
                    ready.append(group)
        if not all(stats._deviations_finite() for stats in touched):
            self._raise(node, value_a, value_b)
        for group in ready:
            self.flush(group)

    def _check(self, node: str, stats: TieBreakStats, x: Tensor, y: Tensor, value_a: Tensor, value_b: Tensor) -> None:
        """Raise the error a full update of ``stats`` would (its batch
        deviation sums not finite), read first from one dot product per
        side (finite: every value and every square is), exactly only if
        that is not finite."""
        for values in (x, y):
            flat = values.reshape(-1).to(stats._work_dtype(values.dtype))
            if not bool(torch.isfinite(torch.dot(flat, flat))):
                break
        else:
            return
        _, m2_a, m2_b = stats.prepare(x, y)
        if not (bool(torch.isfinite(m2_a).all()) and bool(torch.isfinite(m2_b).all())):
            self._raise(node, value_a, value_b)

    def _add(self, group: str, node: str, x: Tensor, y: Tensor) -> None:
        """Add a tie-break batch of ``group`` (its candidates as the primary
        statistic has left them), or only count it once no unit is one."""
        stats = cast(TieBreakStats, self.clean[(group, TIEBREAK)])  # _Pass keeps a TieBreakStats under TIEBREAK
        if stats.idle:
            stats.skip(x)
            return
        stats.accumulate(*stats.prepare(x, y))
        if not stats._deviations_finite():
            self._raise(node, None, None)

    def flush(self, group: str | None = None) -> None:
        """Add the waiting tie-break batches of ``group`` (``None``: of all groups)."""
        for found in [group] if group is not None else list(self.pending):
            for node, x, y in self.pending.pop(found, []):
                self._add(found, node, x, y)

    def _raise(self, node: str, value_a: Tensor | None, value_b: Tensor | None) -> None:
        for value, which in ((value_a, "model_a"), (value_b, "model_b")):
            if value is not None and not torch.isfinite(value).all():
                raise DataError(
                    f"Graph node '{node}' of {which} has a non-finite activation in batch {self.batch}; check "
                    "the inputs and the weights for NaN or inf."
                )
        raise DataError(
            f"Graph node '{node}' overflowed the activation statistics in batch {self.batch}; scale the "
            "inputs down or match in float64 (model.double())."
        )


def _marginal(tree: AxisTree, similarity: Tensor, group: str, perm: Mapping[str, Tensor]) -> Tensor:
    """``(n, n)`` similarity of ``group``'s units within a joint axis, with every
    other group of A already permuted by ``perm``: ``C[i, i'] = sum_r S'[U[i, r], U[i', r]]``."""
    rows = similarity[index_vector(tree, perm, skip=group)]
    positions = positions_of(tree, group, "a joint activation axis")
    return rows[positions[:, None, :], positions[None, :, :]].sum(-1)


def _block_relaxation(tree: AxisTree, similarity: Tensor, group: str, max_block: int = 256) -> Tensor:
    """Initial ``(n, n)`` similarity of a nested group's units (e.g. heads),
    blind to how the groups inside each unit are aligned: unit ``i`` of A and
    unit ``i'`` of B score the best assignment between their blocks of
    positions (:func:`~maskalign.matching.lap.block_lap_values`). Falls back to the
    identity-aligned marginal when blocks exceed ``max_block`` positions."""
    positions = positions_of(tree, group, "a joint activation axis")
    if positions.shape[1] > max_block:
        return _marginal(tree, similarity, group, {})
    return block_lap_values(similarity[positions[:, None, :, None], positions[None, :, None, :]])


def _tie_classes(similarity: Tensor) -> list[Tensor]:
    """Indices of the rows of ``similarity`` that are exactly equal, per class
    of more than one row, each in ascending order (``-0.0`` and ``0.0`` count
    as equal). Rows are first told apart by their (exact) maximum and
    minimum; only rows that share both are compared in full, so that no copy
    of the whole matrix is made unless most rows look alike."""
    signature = torch.stack([similarity.amax(1) + 0.0, similarity.amin(1) + 0.0], 1)
    _, family, sizes = torch.unique(signature, dim=0, return_inverse=True, return_counts=True)
    classes: list[Tensor] = []
    for f in torch.nonzero(sizes > 1).flatten().tolist():
        rows = torch.nonzero(family == f).flatten()
        _, inverse, counts = torch.unique(similarity[rows] + 0.0, dim=0, return_inverse=True, return_counts=True)
        classes += [rows[inverse == c] for c in torch.nonzero(counts > 1).flatten().tolist()]
    return classes


def _break_ties(primary: Tensor, secondary: Tensor | TieBreakSimilarity, idx: Tensor) -> tuple[Tensor, int]:
    """Re-match, by ``secondary``, units that ``primary`` cannot tell apart.

    ``idx`` is an optimal assignment of ``primary`` (``idx[j]``: A's unit
    matched to B's unit ``j``, as :func:`~maskalign.matching.lap.solve_lap` returns).
    A's units whose rows of ``primary`` are exactly equal (dead or constant
    units: a correlation row of zeros) can trade the B units they were given
    without changing the primary total at all; so can B's units whose columns
    are equal. Each such class is re-matched among itself by one LAP on
    ``secondary`` (rows first, then columns). The primary total is exactly
    that of ``idx``, so the result is still an optimal assignment of
    ``primary``; among those, the secondary total never decreases.
    ``secondary`` may be a :class:`~maskalign.matching.stats.TieBreakSimilarity`
    (collected at some rows and columns only): a class it does not cover
    keeps its assignment (counted in ``secondary.kept``).

    Returns:
        ``(idx, pairs)``: the new assignment and the number of matched pairs
        that lie in a tie class (0 when there is nothing to break; ``idx`` is
        then unchanged).
    """
    idx = idx.clone()
    decided = torch.zeros(idx.numel(), dtype=torch.bool)
    column_of = torch.empty_like(idx)
    column_of[idx] = torch.arange(idx.numel())
    for rows in _tie_classes(primary):  # A's units that look the same: trade their columns
        cols = column_of[rows]
        block = _secondary_block(secondary, rows, cols, "rows")
        if block is not None:
            idx[cols] = rows[solve_lap(block)]
            decided[cols] = True
    for cols in _tie_classes(primary.T):  # B's units that look the same: trade their rows
        rows = idx[cols]
        block = _secondary_block(secondary, rows, cols, "cols")
        if block is not None:
            idx[cols] = rows[solve_lap(block)]
            decided[cols] = True
    return idx, int(decided.sum())


def _secondary_block(secondary: Tensor | TieBreakSimilarity, rows: Tensor, cols: Tensor, tied: str) -> Tensor | None:
    """``secondary[rows][:, cols]`` for a tie class of A's units (``tied ==
    "rows"``) or of B's (``"cols"``); ``None`` where a restricted tie-break
    did not collect every unit of the class (it keeps the primary assignment
    there, counted in ``secondary.kept``)."""
    if isinstance(secondary, Tensor):
        return secondary[rows[:, None], cols[None, :]]
    block = secondary.for_rows(rows, cols) if tied == "rows" else secondary.for_cols(rows, cols)
    if block is None:
        secondary.kept += rows.numel()
    return block


_Similarities = tuple[Mapping[str, Tensor], Mapping[AxisTree, Tensor]]
"""The pooled (group -> ``(n, n)``) and joint (axis -> ``(N, N)``) similarities."""


def _solve(
    spec: PermutationSpec,
    clean: Mapping[str, Tensor],
    joint: Mapping[AxisTree, Tensor],
    tiebreak: Mapping[str, Tensor | TieBreakSimilarity] | None = None,
    max_sweeps: int = 100,
    sweep_over: Sequence[str] | None = None,
    weights: Mapping[str, Tensor] | None = None,
    joint_weights: Mapping[AxisTree, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
    """One LAP per group on its pooled statistic, ties broken by the group's
    ``tiebreak`` statistic (:func:`_break_ties`); then, where groups are nested
    in joint axes, block matching to start and coordinate ascent (Git Re-Basin
    Alg. 1 applied to activations) on the total matched similarity.

    ``weights`` (group -> ``(n,)``) and ``joint_weights`` (joint axis ->
    ``(N,)``) scale the rows (A's units or positions) of the pooled and joint
    similarities that the assignment maximises (mask-aware matching,
    :mod:`~maskalign.matching.mask_aware`); ties are classes of exactly equal
    rows of the weighted similarity, re-matched by the unweighted
    ``tiebreak``. The report's ``"before"`` / ``"after"`` stay means of the
    unweighted statistic; weighted groups add ``"weighted_before"`` /
    ``"weighted_after"``, the same means of the weighted one.

    ``sweep_over``: the groups each sweep's random order is drawn over
    (default: the nested groups given). Solving a unit of groups that share
    no joint axis with others (:meth:`_Plan.units`) with ``sweep_over`` all
    nested groups of the plan, and skipping the others' steps, gives exactly
    the assignment of one solve over every unit: a unit's steps see only its
    own groups, in the same relative order, and once a sweep leaves a unit
    unchanged, later sweeps leave it unchanged too."""
    plain: _Similarities = (clean, joint)
    weighted = {g for g in clean if weights and g in weights} | {
        g for t in joint if joint_weights and t in joint_weights for g in groups_of(t)
    }
    if weighted:  # row i of A scaled by w_i: the LAP maximises sum_i w_i S[i, pi(i)]
        clean = {g: s * weights[g][:, None] if weights and g in weights else s for g, s in clean.items()}
        joint = {
            t: s * joint_weights[t][:, None] if joint_weights and t in joint_weights else s for t, s in joint.items()
        }
    perm: dict[str, Tensor] = {g: solve_lap(sim) for g, sim in clean.items()}
    nested = [g for g in spec.groups if any(g in set(groups_of(t)) for t in joint)]
    here = set(nested)
    tied: dict[str, int] = {}
    kept: dict[str, int] = {}
    for g, secondary in (tiebreak or {}).items():
        if g in perm and g not in nested:
            perm[g], tied[g] = _break_ties(clean[g], secondary, perm[g])
            if isinstance(secondary, TieBreakSimilarity) and secondary.kept:
                kept[g] = secondary.kept
    for g in nested:
        if g not in perm:
            init = sum(
                (_block_relaxation(t, s, g) for t, s in joint.items() if g in set(groups_of(t))),
                torch.zeros(spec.groups[g].size, spec.groups[g].size, dtype=torch.float64),
            )
            perm[g] = solve_lap(init)

    def total(g: str, current: Mapping[str, Tensor], sims: _Similarities | None = None) -> Tensor:
        pooled, joints = (clean, joint) if sims is None else sims
        n = spec.groups[g].size
        if g in pooled and g not in here:  # no joint axis adds to it: read only, no copy
            return pooled[g]
        out = pooled[g].clone() if g in pooled else torch.zeros(n, n, dtype=torch.float64)
        for tree, sim in joints.items():
            if g in set(groups_of(tree)):
                out += _marginal(tree, sim, g, current)
        return out

    def step(g: str) -> bool:  # the margin scales with the similarity's largest entry
        if g not in here:  # another unit's group: its step is taken where that unit is solved
            return False
        sim = total(g, perm)
        idx = lap_step(sim, perm[g], scale=max(float(sim.abs().max()), 1.0))
        if idx is None:
            return False
        perm[g] = idx
        return True

    order = nested if sweep_over is None else list(sweep_over)
    coordinate_ascent(order, step, torch.Generator().manual_seed(0), max_sweeps if nested else 0)
    identity = {g: torch.arange(spec.groups[g].size) for g in perm}
    report: dict[str, dict[str, float]] = {}
    for g in perm:
        before, after = total(g, identity, plain), total(g, perm, plain)
        ar = torch.arange(before.shape[0])
        pairs = _matched_pairs(g, clean, joint)
        report[g] = {"before": float(before[ar, ar].sum()) / pairs, "after": float(after[perm[g], ar].sum()) / pairs}
        if g in weighted:
            before, after = total(g, identity), total(g, perm)
            report[g]["weighted_before"] = float(before[ar, ar].sum()) / pairs
            report[g]["weighted_after"] = float(after[perm[g], ar].sum()) / pairs
        if g in tied:
            report[g]["tied"] = tied[g]
        if g in kept:
            report[g]["tied_kept"] = kept[g]
    return perm, report


def _matched_pairs(group: str, clean: Mapping[str, Tensor], joint: Mapping[AxisTree, Tensor]) -> int:
    """How many entries of the similarity matrices the matched total of
    ``group`` sums: one per unit of its pooled statistic, and, per joint axis
    that carries it, one per position of ``group``'s units there (a head
    contributes its ``head_dim`` positions, a head dim one per head, as
    :func:`_marginal` sums them). The total divided by this is the mean
    similarity of a matched pair of units."""
    pairs = clean[group].shape[0] if group in clean else 0
    for tree in joint:
        if group in set(groups_of(tree)):
            pairs += positions_of(tree, group, "a joint activation axis").numel()
    return max(pairs, 1)
