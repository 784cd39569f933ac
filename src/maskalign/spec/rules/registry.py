"""The op table: for every op, the rule that propagates axes through it and the
role it plays, and :class:`RuleContext`, the interface every rule is written
against. Built-in rules register through :func:`register_rule` like a user's.

A *rule* is a function ``rule(ctx, node, out) -> None`` called once per graph
node of its op. ``node`` is the ``torch.fx`` node (its ``args``/``kwargs`` are
other nodes or constants; ``node.meta["val"]`` is its fake-tensor output);
``out`` is the output value: one *atom list* per output dim (a tensor), or a
tuple of such values (an op with several outputs). The rule declares which
dims of the inputs and the output index the same units (:meth:`RuleContext.unify`)
and which may never be permuted (:meth:`RuleContext.freeze`). Anything it
does not unify stays independent, so a rule that forgets a constraint is
caught by :func:`maskalign.check_equivalence` on a random permutation.

The built-in rules read ``node.args`` through typed accessors (:func:`arg_node`,
:func:`arg_int`, :func:`arg_ints`, :func:`arg_list`, :func:`output_dims`,
:meth:`RuleContext.arg_dims` ...): each returns what the op's schema promises
or raises :class:`~maskalign.errors.SpecError` naming the node and the argument.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, Union

import torch
import torch.fx
from torch.fx.node import Argument

from ...errors import SpecError, _describe
from ..atoms import AtomTable

__all__ = [
    "Dims",
    "OpInfo",
    "Role",
    "Rule",
    "RuleContext",
    "Value",
    "arg",
    "arg_int",
    "arg_ints",
    "arg_list",
    "arg_name",
    "arg_node",
    "as_int",
    "as_node",
    "lookup",
    "op_key",
    "output_dims",
    "output_list",
    "register_rule",
    "used_outputs",
]

Dims = list[list[int]]
"""One atom list (an ordered product of atoms) per tensor dimension."""
Value = Union[Dims, tuple["Value", ...], None]  # noqa: UP007 (recursive alias)
"""The atoms of a graph value: ``Dims`` for a tensor, a tuple for several outputs, None otherwise."""
Role = Literal["op", "nonlinearity", "view", "metadata"]
"""What an op is to the rest of maskalign:

* ``"op"``: an ordinary op; its output is an activation-matching candidate.
* ``"nonlinearity"``: an elementwise activation (ReLU, GELU...); activation
  matching correlates the values that flow into it (pre-activations), its
  outputs (post-activations) or both, as ``match_activations(points=...)``
  chooses.
* ``"view"``: reshapes, transposes, copies: same values in another layout,
  never an activation-matching point of its own.
* ``"metadata"``: reads shapes, asserts: no constraint, its rule is not run.
"""


Rule = Callable[["RuleContext", torch.fx.Node, Value], None]
"""``rule(ctx, node, out)``: see the module docstring."""

_ROLES = ("op", "nonlinearity", "view", "metadata")


@dataclass(frozen=True)
class OpInfo:
    """One entry of the op table."""

    rule: Rule
    role: Role = "op"


_TABLE: dict[Any, OpInfo] = {}


def op_key(op: Any) -> Any:
    """The table key of an op: ``"namespace::name"`` for ATen, ``torch.library``
    and higher-order ops (every overload shares its packet's rule); a plain
    Python callable (``operator.getitem``) is its own key.

    Raises:
        SpecError: ``op`` is neither an op, a ``"namespace::name"`` string, nor a callable.
    """
    if isinstance(op, torch._ops.OpOverload):
        return op._schema.name
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name
    if isinstance(op, torch._ops.HigherOrderOperator):
        return f"higher_order::{op.name()}"
    if isinstance(op, str):
        if "::" in op:
            return op
        namespace, dot, name = op.partition(".")
        if dot and namespace and name:
            return f"{namespace}::{name.split('.')[0]}"
        raise SpecError(
            f"Argument 'op' of register_rule is {op!r}, not a qualified op name; write 'namespace::name' "
            "(e.g. 'aten::roll' or 'mylib::fused_gelu') or pass the op itself (torch.ops.mylib.fused_gelu)."
        )
    if callable(op):
        return op
    raise SpecError(
        f"Argument 'op' of register_rule is {op!r}, not an op; pass torch.ops.<namespace>.<name> or 'namespace::name'."
    )


def register_rule(op: Any, rule: Rule, *, role: Role = "op", replace: bool = False) -> None:
    """Teach :func:`maskalign.build_spec` how permutations pass through ``op``.

    Args:
        op: the op: an ATen or ``torch.library`` op (``torch.ops.aten.roll``,
            ``torch.ops.mylib.squash``, any overload of it), its qualified
            name (``"mylib::squash"``), a higher-order op, or a Python callable
            that appears as a graph target.
        rule: ``rule(ctx, node, out)``, written against :class:`RuleContext`
            (see :mod:`maskalign.spec.rules.registry`). It is called for every node
            of ``op`` in the captured graph. Every in-place variant
            (``squash_``) shares the rule unless it has its own.
        role: what the op is to activation matching: ``"op"``,
            ``"nonlinearity"``, ``"view"`` or ``"metadata"`` (see :data:`Role`).
        replace: allow replacing an existing entry (a built-in rule included).

    Raises:
        SpecError: ``op`` already has a rule and ``replace`` is False, the
            role is unknown, or ``rule`` is not callable.

    Example:
        >>> import torch, maskalign as ma
        >>> def roll_rule(ctx, node, out):                  # torch.roll along non-permuted axes
        ...     x = ctx.dims(node.args[0])
        ...     rolled = ctx.arg(node, "dims", [])
        ...     for k, (dim, res) in enumerate(zip(x, out)):
        ...         if k in [d % len(x) for d in rolled] or not rolled:
        ...             ctx.freeze_dim(dim, f"rolled axis of {ctx.describe(node)}")
        ...             ctx.freeze_dim(res, f"rolled axis of {ctx.describe(node)}")
        ...         else:
        ...             ctx.unify(dim, res, ctx.describe(node))
        >>> ma.register_rule(torch.ops.aten.roll, roll_rule, replace=True)
    """
    if role not in _ROLES:
        raise SpecError(
            f"Argument 'role' of register_rule is {role!r}, which is unknown; pass one of "
            f"{', '.join(map(repr, _ROLES))}."
        )
    if not callable(rule):
        raise SpecError(
            f"Argument 'rule' of register_rule is {rule!r}, which is not callable; pass a function "
            "rule(ctx, node, out)."
        )
    key = op_key(op)
    if key in _TABLE and not replace:
        raise SpecError(
            f"Op {key} already has a rule ({getattr(_TABLE[key].rule, '__qualname__', _TABLE[key].rule)}); "
            "pass replace=True to override it."
        )
    _TABLE[key] = OpInfo(rule, role)


def lookup(target: Any) -> OpInfo | None:
    """The table entry of a graph node's target (in-place variants share the
    entry of the out-of-place op), or None."""
    try:
        key = op_key(target)
    except SpecError:
        return None
    info = _TABLE.get(key)
    if info is None and isinstance(key, str) and key.endswith("_") and not key.endswith("__"):
        info = _TABLE.get(key[:-1])
    return info


def op_name(node: torch.fx.Node) -> str:
    """``"aten::linear"`` for an ATen node, the callable's name otherwise."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order::{target.name()}"
    return getattr(target, "__name__", str(target))


def describe(node: torch.fx.Node) -> str:
    """``"aten::linear at node 'linear_1' in module 'fc1' (Linear)"``."""
    stack = node.meta.get("nn_module_stack")
    where = ""
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
        where = f" in module '{path}' ({cls_name})" if path else f" in the root module ({cls_name})"
    return f"{op_name(node)} at node '{node.name}'{where}"


def is_dims(value: Value) -> TypeGuard[Dims]:
    """Whether ``value`` is the atoms of one tensor."""
    return isinstance(value, list)


def flatten_value(value: Value) -> list[Dims]:
    """Every tensor's ``Dims`` inside a (nested) value."""
    if value is None:
        return []
    if isinstance(value, list):
        return [value]
    out: list[Dims] = []
    for item in value:
        out.extend(flatten_value(item))
    return out


# ------------------------------------------------------------- typed arguments
# ``node.args`` holds torch.fx ``Argument``s: nodes, constants, lists of them.
# A rule reads them through these accessors, which return the type the op's
# schema promises and raise SpecError, naming the node and the argument, when
# the graph holds something else (instead of an AttributeError or a TypeError
# deep inside the rule).


def _holds(value: object) -> str:
    if isinstance(value, torch.fx.Node):
        return f"graph node '{value.name}'"
    return _describe(value)


def argument_error(node: torch.fx.Node, name: str, value: object, expected: str) -> SpecError:
    """The :class:`SpecError` for argument ``name`` of ``node`` holding ``value`` instead of ``expected``."""
    return SpecError(
        f"Argument {name!r} of {describe(node)} is {_holds(value)}, not {expected}; the built-in rule of "
        f"{op_name(node)} cannot read it: register a rule for this op with "
        "maskalign.register_rule(op, rule, replace=True)."
    )


def arg_name(node: torch.fx.Node, index: int) -> str:
    """The schema's name of positional argument ``index`` of ``node`` (``"input"``),
    or ``"args[index]"`` for a target without a schema (``operator.getitem``)."""
    if isinstance(node.target, torch._ops.OpOverload):
        arguments = node.target._schema.arguments
        if index < len(arguments):
            return arguments[index].name
    return f"args[{index}]"


def arg(node: torch.fx.Node, index: int, name: str | None = None) -> Argument:
    """Positional argument ``index`` of ``node``; ``name`` in messages (by
    default the schema's name of the argument).

    Raises:
        SpecError: ``node`` has fewer positional arguments.
    """
    name = arg_name(node, index) if name is None else name
    if index >= len(node.args):
        raise SpecError(
            f"Argument {name!r} of {describe(node)} is missing (positional argument {index} of a node with "
            f"{len(node.args)}); register a rule for this op with maskalign.register_rule(op, rule, replace=True)."
        )
    return node.args[index]


def as_node(node: torch.fx.Node, value: Argument, name: str) -> torch.fx.Node:
    """``value``, an argument (or list item) of ``node``, as a graph node.

    Raises:
        SpecError: ``value`` is a constant, a list or None.
    """
    if not isinstance(value, torch.fx.Node):
        raise argument_error(node, name, value, "a graph node")
    return value


def as_int(node: torch.fx.Node, value: Argument, name: str) -> int:
    """``value``, an argument (or list item) of ``node``, as an ``int`` (a
    ``bool`` counts as one, as in Python).

    Raises:
        SpecError: ``value`` is a node (a symbolic size), a float, a list or None.
    """
    if not isinstance(value, int):
        raise argument_error(node, name, value, "an int")
    return int(value)


def arg_node(node: torch.fx.Node, index: int, name: str | None = None) -> torch.fx.Node:
    """Positional argument ``index`` of ``node``, a graph node (a tensor operand)."""
    name = arg_name(node, index) if name is None else name
    return as_node(node, arg(node, index, name), name)


def arg_int(node: torch.fx.Node, index: int, name: str | None = None) -> int:
    """Positional argument ``index`` of ``node``, an ``int``."""
    name = arg_name(node, index) if name is None else name
    return as_int(node, arg(node, index, name), name)


def arg_list(node: torch.fx.Node, index: int, name: str | None = None) -> list[Argument]:
    """Positional argument ``index`` of ``node``, a list or tuple (``Tensor[]``,
    ``Tensor?[]``, ``int[]``), as a list of its items.

    Raises:
        SpecError: the argument is not a list or tuple.
    """
    name = arg_name(node, index) if name is None else name
    value = arg(node, index, name)
    if not isinstance(value, (list, tuple)):
        raise argument_error(node, name, value, "a list")
    return list(value)


def arg_ints(node: torch.fx.Node, index: int, name: str | None = None) -> list[int]:
    """Positional argument ``index`` of ``node``, an ``int[]``."""
    name = arg_name(node, index) if name is None else name
    return [as_int(node, item, name) for item in arg_list(node, index, name)]


def output_dims(node: torch.fx.Node, out: Value, index: int = 0) -> Dims:
    """The atoms of output ``index`` of ``node``: ``out`` itself when the op
    returns one tensor (``index`` 0), item ``index`` of ``out`` when it
    returns several.

    Raises:
        SpecError: that output is not a tensor.
    """
    if isinstance(out, tuple):
        value = out[index] if index < len(out) else None
    else:
        value = out if index == 0 else None
    if not is_dims(value):
        raise SpecError(
            f"Output {index} of {describe(node)} is not a tensor; register a rule for this op with "
            "maskalign.register_rule(op, rule, replace=True)."
        )
    return value


def used_outputs(node: torch.fx.Node) -> set[int]:
    """Indices of the outputs of a multi-output node that something reads
    (through an ``operator.getitem`` that has users)."""
    return {arg_int(user, 1, "index") for user in node.users if user.target is operator.getitem and user.users}


def output_list(node: torch.fx.Node, out: Value) -> list[Dims]:
    """The atoms of every output of ``node`` (one for a single tensor), each a tensor.

    Raises:
        SpecError: an output is not a tensor.
    """
    return [output_dims(node, out, k) for k in range(len(out) if isinstance(out, tuple) else 1)]


class RuleContext:
    """What a rule sees and does: the atoms of graph values, and the two
    operations of the analysis, unify and freeze.

    An *atom list* (one per tensor dim) is an ordered product of atoms whose
    sizes multiply to the dim's size; ``[]`` is a dim of size 1. Every method
    that takes a graph argument accepts anything found in ``node.args`` (a
    node, a constant, None).

    A rule never builds one: :func:`maskalign.build_spec` passes it the
    context of the running analysis.

    Args:
        atoms: the union-find table of atoms of the analysis (sizes,
            factorisations, freezes).
        values: graph node -> its value (the atom lists of a tensor, a tuple
            of values for an op with several outputs, or None), filled in as
            the analysis walks the graph.
    """

    def __init__(self, atoms: AtomTable, values: dict[torch.fx.Node, Value]) -> None:
        self.atoms = atoms
        self.values = values
        self.node: torch.fx.Node | None = None
        self.owner: torch.nn.Module | None = None
        self._propagate: Callable[[torch.fx.Graph, torch.nn.Module, list[Value]], list[Value]] | None = None

    def propagate(self, subgraph: Any, inputs: Sequence[Value]) -> list[Value] | None:
        """Run the analysis through the subgraph that a higher-order op's
        ``get_attr`` argument names (a ``torch.cond`` branch), with its
        placeholders bound to ``inputs``.

        Args:
            subgraph: an argument of the node, normally the ``get_attr`` node
                of the subgraph; anything else gives None.
            inputs: one value per placeholder of the subgraph, in order; a
                None input gets fresh atoms from the placeholder's metadata.

        Returns:
            The values of the subgraph's outputs, in order, or None when
            ``subgraph`` names no graph (or the context runs outside an
            analysis).

        Raises:
            SpecError: a rule of an op inside the subgraph cannot read its
                node's arguments.
            TraceError: an op inside the subgraph has a data-dependent size.
        """
        if self._propagate is None or self.owner is None or not isinstance(subgraph, torch.fx.Node):
            return None
        if subgraph.op != "get_attr":
            return None
        try:
            module = self.owner.get_submodule(str(subgraph.target))
        except AttributeError:
            return None
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            return None
        node, owner = self.node, self.owner
        try:
            return self._propagate(graph, module, list(inputs))
        finally:
            self.node, self.owner = node, owner

    # ------------------------------------------------------------- reading
    def value(self, arg: Any) -> Value:
        """The atoms of ``arg`` (a tensor's ``Dims``, a tuple for multi-output nodes), or None.

        Args:
            arg: anything found in ``node.args``: a graph node, a constant, None.

        Returns:
            The node's value, or None for a constant, None, or a node without
            tensor outputs.
        """
        return self.values.get(arg) if isinstance(arg, torch.fx.Node) else None

    def dims(self, arg: Any) -> Dims | None:
        """The atom lists of a tensor argument (one per dim), or None if it is not a tensor.

        Args:
            arg: anything found in ``node.args``.

        Returns:
            One atom list per dim of the tensor ``arg`` stands for, or None.
        """
        value = self.value(arg)
        return value if is_dims(value) else None

    def tensor_dims(self, node: torch.fx.Node, value: Argument, name: str) -> Dims:
        """The atom lists of ``value``, an argument (or list item) of ``node``
        that must be a tensor (``name`` in messages).

        Args:
            node: the node being analysed (named in the message).
            value: the argument, normally taken from ``node.args``.
            name: the argument's name, for the message.

        Returns:
            One atom list per dim of the tensor.

        Raises:
            SpecError: ``value`` is a constant, None, or a node whose value is no single tensor.
        """
        dims = self.dims(value)
        if dims is None:
            raise argument_error(node, name, value, "a tensor")
        return dims

    def arg_dims(self, node: torch.fx.Node, index: int, name: str | None = None) -> Dims:
        """The atom lists of positional argument ``index`` of ``node``, a tensor
        (``name`` in messages, by default the schema's).

        Args:
            node: the node being analysed.
            index: the position of the argument in ``node.args``.
            name: the argument's name in messages; None takes the op schema's
                name (``"args[index]"`` without a schema).

        Returns:
            One atom list per dim of the tensor.

        Raises:
            SpecError: ``node`` has no positional argument ``index``, or it
                is not a tensor (a constant, None, a list).
        """
        name = arg_name(node, index) if name is None else name
        return self.tensor_dims(node, arg(node, index, name), name)

    def meta(self, arg: Any) -> Any:
        """The fake-tensor metadata of ``arg`` (shape, dtype, device), or None for a constant.

        Args:
            arg: anything found in ``node.args``.

        Returns:
            ``arg.meta["val"]`` of a graph node (a fake tensor, a tuple of
            them, a symbolic int), or None.
        """
        return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None

    def shape(self, arg: Any) -> tuple[int, ...]:
        """The shape of a tensor argument (``()`` for a non-tensor).

        Args:
            arg: anything found in ``node.args``.

        Returns:
            The shape as a tuple of ints, ``()`` when ``arg`` is no tensor.
        """
        meta = self.meta(arg)
        return tuple(int(s) for s in meta.shape) if isinstance(meta, torch.Tensor) else ()

    @staticmethod
    def arg(node: torch.fx.Node, name: str, default: Any = None) -> Any:
        """The argument called ``name`` in the op's schema, positional or keyword.

        Args:
            node: the node being analysed.
            name: the argument's name in the op's schema (``"dim"``).
            default: what to return when the node does not pass it, or its
                target has no schema (a Python callable).

        Returns:
            The argument as found in ``node.args`` / ``node.kwargs`` (a
            node, a constant, a list), or ``default``.
        """
        if name in node.kwargs:
            return node.kwargs[name]
        if isinstance(node.target, torch._ops.OpOverload):
            for index, argument in enumerate(node.target._schema.arguments):
                if argument.name == name:
                    return node.args[index] if index < len(node.args) else default
        return default

    @staticmethod
    def describe(node: torch.fx.Node) -> str:
        """The op, node and module of ``node``, for reasons and messages.

        Args:
            node: a graph node.

        Returns:
            A string such as ``"aten::linear at node 'linear_1' in module
            'fc1' (Linear)"``.
        """
        return describe(node)

    # ------------------------------------------------------------- atoms
    def new(self, size: int) -> list[int]:
        """A fresh atom list for a dim of ``size`` (``[]`` for size 1).

        Args:
            size: the dim's size, a number of units (>= 1).

        Returns:
            ``[atom]`` with one new atom of ``size``, or ``[]`` for a size of
            1 (or less).
        """
        return [self.atoms.new(int(size))] if int(size) > 1 else []

    def fresh(self, shape: Sequence[int]) -> Dims:
        """Fresh atoms for every dim of ``shape``.

        Args:
            shape: the sizes of the dims.

        Returns:
            One fresh atom list per dim (see :meth:`new`).
        """
        return [self.new(s) for s in shape]

    def refine(self, dim: list[int], sizes: Sequence[int], reason: str) -> list[list[int]]:
        """Split ``dim`` into an ordered product of factors of ``sizes``
        (row-major, like a view ``(a*b) -> (a, b)``) and return one atom list
        per factor. If ``dim`` cannot be factored so (an incompatible earlier
        factorisation), it is frozen with ``reason`` and fresh, unrelated
        factors are returned.

        Args:
            dim: the atom list of the dim to split.
            sizes: the sizes of the factors, outermost first; their product
                is the dim's size.
            reason: why the dim is frozen if it cannot be split, for the
                spec's report.

        Returns:
            One atom list per factor, in the order of ``sizes``.
        """
        factors = [self.new(s) for s in sizes]
        self.unify(dim, [a for f in factors for a in f], reason)
        return factors

    def concat(self, parts: Sequence[list[int]]) -> list[int]:
        """An atom list for a dim that is the concatenation of ``parts``
        (``torch.cat`` along it): each part keeps its own permutation.

        Args:
            parts: the atom lists of the concatenated dims, in order.

        Returns:
            The atom list (one concatenation atom) of the result's dim.
        """
        segments = []
        for part in parts:
            size = 1
            for a in part:
                size *= self.atoms.size(self.atoms.find(a))
            segment = self.atoms.new(size)
            self.unify([segment], part, "concatenation")
            segments.append(segment)
        return [self.atoms.concat(segments)]

    # ------------------------------------------------------------- constraints
    def unify(self, left: list[int], right: list[int], reason: str) -> None:
        """Declare that two dims index the same units in the same order (an
        op's input and output channels, a weight axis and the activation it
        contracts with). Dims of equal size but incompatible factorisations
        are frozen with ``reason`` instead.

        Args:
            left: the atom list of one dim.
            right: the atom list of the other dim.
            reason: why both are frozen if they cannot be joined, for the
                spec's report (normally :meth:`describe` of the node).
        """
        if not self.atoms.unify(left, right):
            self.freeze_dim(left + right, reason)

    def unify_dims(self, left: Dims, right: Dims, reason: str) -> None:
        """:meth:`unify` dim by dim (two values of the same rank).

        Args:
            left: the atom lists of one tensor.
            right: the atom lists of the other tensor, one per dim of ``left``.
            reason: as for :meth:`unify`.
        """
        for a, b in zip(left, right):
            self.unify(a, b, reason)

    def freeze_dim(self, dim: list[int], reason: str, *, structural: bool = False) -> None:
        """Forbid permuting ``dim``. ``structural``: the axis is not a hidden
        axis at all (spatial, vocabulary, stacked index), so coverage leaves
        it out; otherwise it counts as a hidden axis lost to this op.

        Args:
            dim: the atom list of the dim.
            reason: why it may not be permuted, shown in the spec's report.
            structural: whether the axis is no hidden axis at all.
        """
        self.atoms.freeze(dim, reason, op=self._op(), structural=structural)

    def freeze(self, value: Value, reason: str, *, structural: bool = False) -> None:
        """:meth:`freeze_dim` for every dim of a (nested) value.

        Args:
            value: a value (the atom lists of a tensor, a tuple of values, or
                None, which freezes nothing).
            reason: as for :meth:`freeze_dim`.
            structural: as for :meth:`freeze_dim`.
        """
        for dims in flatten_value(value):
            for dim in dims:
                self.freeze_dim(dim, reason, structural=structural)

    def _op(self) -> str | None:
        return op_name(self.node) if self.node is not None else None
