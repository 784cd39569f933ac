"""One pass of axis propagation over a captured graph.

:func:`analyze` walks the graph once, like ``torch.fx.passes.shape_prop`` but
over axis atoms instead of shapes. Each node's value gets one atom list per
dimension; the rule of the node's op (:mod:`maskalign.spec.rules.registry`) unifies
the atoms that must carry one permutation so that the op commutes with it, and
freezes the atoms that no permutation may touch. An op without a rule freezes
every atom it touches, so an unknown op can only make the spec smaller, never
wrong.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ...errors import TraceError
from ..atoms import AtomTable
from ..capture import CapturedGraph, _first_line
from .registry import Dims, Role, RuleContext, Value, describe, flatten_value, is_dims, lookup

__all__ = ["Analysis", "analyze"]


@dataclass
class Analysis:
    """Result of :func:`analyze`: the atom table, the atoms and role of every
    graph value (by node name), and the atoms of every parameter/buffer (by
    ``state_dict`` key)."""

    atoms: AtomTable
    node_dims: dict[str, Dims] = field(default_factory=dict)
    tensor_dims: dict[str, Dims] = field(default_factory=dict)
    node_roles: dict[str, Role] = field(default_factory=dict)


def _fresh_from_meta(ctx: RuleContext, meta: Any) -> Value:
    if isinstance(meta, torch.Tensor):
        return ctx.fresh(meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(_fresh_from_meta(ctx, m) for m in meta)
    return None


def _is_mutating(node: torch.fx.Node) -> bool:
    target = node.target
    return not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable


def _only_metadata_uses(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value only feeds shape reads and asserts (or
    nothing): then its op constrains no axis (BART reads ``x[:, :, -1]``
    only for its dtype)."""
    for user in node.users:
        if user.op != "call_function":
            return False
        info = lookup(user.target)
        if info is None or info.role != "metadata":
            return False
    return True


def analyze(
    captured: CapturedGraph,
    permutable_buffers: Collection[str] = (),
    *,
    train: CapturedGraph | None = None,
) -> Analysis:
    """Propagate axis atoms through ``captured.flat_graph`` (one pass, linear in its size).

    Args:
        captured: the model's graph (eval mode); its values become activation points.
        permutable_buffers: non-persistent buffers (or lifted constants) that
            may be permuted along with the axes they meet instead of freezing them.
        train: the train-mode graph of the same model, when it differs from the
            eval-mode one (an auxiliary head, a ``self.training`` branch). Its
            constraints are added to the same atoms (a union: a permutation of
            the result keeps both functions); its values are not activation points.
    """
    atoms = AtomTable()
    values: dict[torch.fx.Node, Value] = {}
    ctx = RuleContext(atoms, values)
    result = Analysis(atoms)

    def propagate(graph: torch.fx.Graph, module: torch.nn.Module, inputs: list[Value]) -> list[Value]:
        scratch = Analysis(atoms, tensor_dims=result.tensor_dims)  # subgraph values are no activation points
        ctx.owner = module
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, inputs):
            values[node] = value if value is not None else _fresh_from_meta(ctx, node.meta.get("val"))
        outputs: list[Value] = []
        for node in graph.nodes:
            ctx.node = None
            if node.op == "call_function":
                _call(ctx, node, scratch)
            elif node.op == "output":
                returned = node.args[0]
                returned = returned if isinstance(returned, (tuple, list)) else (returned,)
                outputs = [values.get(arg) if isinstance(arg, torch.fx.Node) else None for arg in returned]
            elif node.op != "placeholder":
                values[node] = None
        return outputs

    ctx._propagate = propagate
    graphs = [captured] if train is None else [captured, train]
    for index, graph in enumerate(graphs):
        record = result if index == 0 else Analysis(atoms, tensor_dims=result.tensor_dims)
        ctx.owner = graph.owner
        for node in graph.flat_graph.nodes:  # higher-order wrappers (autocast, no_grad, checkpoint) inlined
            ctx.node = None
            if node.op == "placeholder":
                _placeholder(ctx, node, graph, permutable_buffers, record)
            elif node.op == "call_function":
                _call(ctx, node, record)
            elif node.op == "output":
                _output(ctx, node, graph, record)
            else:  # get_attr (subgraphs of higher-order ops): consumed by the op that uses it
                values[node] = None
    _tie_aliases(ctx, graphs, result)
    atoms.finalize()
    return result


def _placeholder(
    ctx: RuleContext,
    node: torch.fx.Node,
    captured: CapturedGraph,
    permutable_buffers: Collection[str],
    result: Analysis,
) -> None:
    meta = node.meta.get("val")
    role = captured.roles[node.name]
    shared = role.kind in ("parameter", "buffer") or (role.kind == "constant" and role.target in permutable_buffers)
    if shared and role.target in result.tensor_dims:  # read by an earlier graph (train mode)
        value: Dims | None = result.tensor_dims[role.target]
    else:
        value = ctx.fresh(meta.shape) if isinstance(meta, torch.Tensor) else None
    ctx.values[node] = value
    if value is None:
        return
    result.node_dims[node.name] = value
    if shared:
        result.tensor_dims[role.target] = value
    elif role.kind == "constant":
        reason = (
            f"constant tensor '{role.target}' (not in the state_dict; pass "
            f"permutable_buffers=['{role.target}'] if it should be permuted)"
        )
        for dim in value:
            ctx.atoms.freeze(dim, reason, op="constant")
    else:
        for dim in value:
            ctx.atoms.freeze(dim, f"model input '{node.name}'", op="model input", structural=True)


def _call(ctx: RuleContext, node: torch.fx.Node, result: Analysis) -> None:
    try:
        _apply_rule(ctx, node, result)
    except GuardOnDataDependentSymNode as exc:
        raise TraceError(
            f"Node '{node.name}' ({describe(node)}) has a tensor size that depends on the data "
            f"({_first_line(exc)}), which maskalign cannot analyse; compute the selection outside forward, or "
            "keep shapes fixed (multiply by a mask instead of indexing with nonzero / masked_select)."
        ) from exc


def _apply_rule(ctx: RuleContext, node: torch.fx.Node, result: Analysis) -> None:
    out = _fresh_from_meta(ctx, node.meta.get("val"))
    ctx.values[node] = out
    info = lookup(node.target)
    if info is not None and info.role == "metadata":
        return
    if info is not None and not _is_mutating(node) and _only_metadata_uses(node):
        return
    ctx.node = node
    if info is None:
        reason = f"unsupported op {describe(node)}"
        for arg in node.all_input_nodes:
            ctx.freeze(ctx.values.get(arg), reason)
        ctx.freeze(out, reason)
        return
    info.rule(ctx, node, out)
    if is_dims(out):
        result.node_dims[node.name] = out
        result.node_roles[node.name] = info.role


def _output(ctx: RuleContext, node: torch.fx.Node, captured: CapturedGraph, result: Analysis) -> None:
    outputs = node.args[0]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for arg in outputs:
        if not isinstance(arg, torch.fx.Node):
            continue
        if arg.name in captured.mutated_buffers:
            target = captured.mutated_buffers[arg.name]
            for a, b in zip(flatten_value(ctx.values.get(arg)), [result.tensor_dims.get(target, [])]):
                for da, db in zip(a, b):
                    ctx.unify(da, db, f"buffer mutation of '{target}'")
        else:
            for dims in flatten_value(ctx.values.get(arg)):
                for dim in dims:
                    ctx.atoms.freeze(dim, f"model output '{arg.name}'", op="model output", structural=True)


def _tie_aliases(ctx: RuleContext, graphs: list[CapturedGraph], result: Analysis) -> None:
    """Tied tensors (one storage under several names) share every axis; a
    parameter or buffer that forward never reads (in any mode), and that is
    tied to none that it does, is frozen rather than left free."""
    used = {
        graph.roles[node.name].target
        for graph in graphs
        for node in graph.flat_graph.nodes
        if node.op == "placeholder" and node.users and node.name in graph.roles
    }
    tied: set[str] = set()
    for names in graphs[0].aliases:
        present = [n for n in names if n in result.tensor_dims]
        if not present:
            continue
        anchor = next((n for n in present if n in used), present[0])
        for name in names:
            if name not in result.tensor_dims:  # deduplicated by the exporter
                result.tensor_dims[name] = result.tensor_dims[anchor]
                continue
            for a, b in zip(result.tensor_dims[anchor], result.tensor_dims[name]):
                ctx.unify(a, b, f"tied tensors '{anchor}' and '{name}'")
        if anchor in used:
            tied.update(names)
    for name, dims in result.tensor_dims.items():
        if name not in used and name not in tied:
            for dim in dims:
                ctx.atoms.freeze(dim, f"'{name}' is not used by forward", op="unused", structural=True)
