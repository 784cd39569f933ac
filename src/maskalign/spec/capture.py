"""Capture a model as one canonical ``torch.fx`` graph.

We use the pre-dispatch ATen graph of ``torch.export.export(..., strict=False)``
without decompositions: ``aten.linear``, ``aten.conv2d``, ``aten.batch_norm``
and friends stay whole, so the role of every weight axis is explicit in the op
signature, and every parameter or buffer is a placeholder whose name maps back
to its ``state_dict`` key through the graph signature.

Regions of forward that only change how ops run (``torch.autocast``,
``torch.no_grad`` / ``torch.enable_grad``, activation checkpointing) reach the
graph as higher-order ops around subgraphs; :attr:`CapturedGraph.flat_graph`
has them inlined, so that every op is a node of one graph. ``torch.cond``
stays a call of its branch subgraphs.

The captured graph is always re-run against the eager model on the example
inputs before anyone analyses it: a capture that does not reproduce the model
(its outputs, and the parameters, buffers and inputs that forward mutates)
raises :class:`~maskalign.errors.TraceError` instead of producing a spec for a
different function. Neither the model nor the inputs change in the process.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import importlib
import inspect
import io
import logging
import operator
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.export import graph_signature as gs
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils import _pytree as pytree

from .._utils.inputs import normalize_inputs
from .._utils.modes import eval_mode, preserved_state
from ..errors import TraceError

__all__ = ["CapturedGraph", "TensorRole", "capture"]

# higher-order ops that run a subgraph under a context that changes no value's
# axes -> position of the subgraph among their arguments (the arguments before it
# configure the context; those after it are the subgraph's inputs)
_INLINED_WRAPPERS: dict[Any, int] = {
    torch.ops.higher_order.wrap_with_set_grad_enabled: 1,
    torch.ops.higher_order.wrap_with_autocast: 4,
    torch.ops.higher_order.tag_activation_checkpoint: 0,
}
REGIONS_META = "maskalign_regions"
"""``node.meta`` key of an inlined node of :attr:`CapturedGraph.flat_graph`:
the ``(wrapper op, context arguments)`` of the regions around it, outermost
first."""

_PACKAGE_DIR = str(Path(__file__).resolve().parent)


@dataclass(frozen=True)
class TensorRole:
    """What a placeholder of the captured graph stands for.

    kind: ``"parameter"``, ``"buffer"`` (persistent, in the ``state_dict``),
    ``"constant"`` (lifted tensor constant or non-persistent buffer: not in the
    ``state_dict``, never permuted), or ``"input"`` (a user input).
    target: the ``state_dict`` key (parameters, buffers), the constant's name,
    or the position of the input among the flattened user inputs.
    """

    kind: str
    target: str

    def describe(self) -> str:
        """``"parameter 'fc.weight'"``, ``"buffer 'calls'"``, ``"input 0"``."""
        if self.kind == "input":
            return f"input {self.target}"
        return f"{'parameter' if self.kind == 'parameter' else 'buffer'} '{self.target}'"


@dataclass
class CapturedGraph:
    """A model captured as a pure function of its parameters, buffers and inputs.

    ``graph`` is the lifted ATen graph: its placeholders are, in order, every
    parameter, buffer, constant and flattened user input (see ``roles``).
    ``owner`` is the module its ``get_attr`` nodes read: the subgraphs of its
    higher-order ops (``torch.cond`` branches, ``submod_1`` of an autocast
    region, ...). ``flat_graph`` is ``graph`` with the calls of the
    context-only wrappers (``wrap_with_set_grad_enabled``,
    ``wrap_with_autocast``, ``tag_activation_checkpoint``) inlined: their
    subgraph's nodes copied into it (each with the regions around it in
    ``node.meta[REGIONS_META]``), the ``getitem`` nodes of their results
    replaced by the subgraph's outputs; every other node keeps its name. It is
    ``graph`` itself when there is nothing to inline. :meth:`run` and
    :meth:`run_pair` execute ``flat_graph``.
    ``user_outputs`` names the output values that are the model's own outputs
    (as opposed to mutations). ``mutated_buffers`` / ``mutated_inputs`` map an
    output of a functionalized graph to the buffer / input placeholder it is
    the new value of (``BUFFER_MUTATION`` / ``USER_INPUT_MUTATION``);
    ``written`` names the placeholders that ``flat_graph`` writes into in
    place (the pre-dispatch graph keeps ``x.add_(1)`` as it is).
    """

    graph: torch.fx.Graph
    roles: dict[str, TensorRole]
    constants: dict[str, Tensor]
    user_outputs: list[str]
    mutated_buffers: dict[str, str]
    input_spec: pytree.TreeSpec
    aliases: list[list[str]]
    owner: nn.Module
    flat_graph: torch.fx.Graph
    mutated_inputs: dict[str, str]
    written: frozenset[str]

    def placeholder_values(self, state: Mapping[str, Tensor], flat_inputs: Sequence[Any]) -> list[Any]:
        """Values for the graph's placeholders, in order, from a ``state_dict``-like
        mapping (parameters and persistent buffers) and flattened user inputs.

        A placeholder that the graph writes into (``written``) gets a clone, so
        that running the graph leaves ``state`` and ``flat_inputs`` unchanged.
        """
        values: list[Any] = []
        for node in self.flat_graph.nodes:
            if node.op != "placeholder":
                continue
            role = self.roles[node.name]
            if role.kind in ("parameter", "buffer"):
                value = state[role.target]
            elif role.kind == "constant":
                value = self.constants[role.target]
            else:
                value = flat_inputs[int(role.target)]
            values.append(value.clone() if node.name in self.written and isinstance(value, Tensor) else value)
        return values

    def run_pair(
        self,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        flat_inputs: Sequence[Any],
        points: Collection[str],
        visit: Callable[[str, Tensor, Tensor], None],
    ) -> None:
        """Run two models of this architecture side by side on the same inputs,
        node by node, calling ``visit(name, value_a, value_b)`` as soon as a
        node of ``points`` (names of ``flat_graph`` nodes) is computed (before
        any in-place op can change it).

        Only the nodes that ``points`` depend on run, and every value is
        dropped after its last use, so memory stays that of one forward pass
        per model rather than of all recorded activations.

        Raises:
            TraceError: a node fails; the message names it.
        """
        nodes = list(self.flat_graph.nodes)
        needed: set[torch.fx.Node] = set()
        stack = [n for n in nodes if n.name in points]
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        order = [n for n in nodes if n in needed]
        last_use = {n: i for i, node in enumerate(order) for n in node.all_input_nodes}
        values_a = self.placeholder_values(state_a, flat_inputs)
        values_b = self.placeholder_values(state_b, flat_inputs)
        placeholders = {n: k for k, n in enumerate(n for n in nodes if n.op == "placeholder")}
        runner = _GraphRunner(self.owner, self.flat_graph, garbage_collect_values=False)
        env_a: dict[torch.fx.Node, Any] = {}
        env_b: dict[torch.fx.Node, Any] = {}
        for i, node in enumerate(order):
            if node.op == "placeholder":
                env_a[node] = values_a[placeholders[node]]
                env_b[node] = values_b[placeholders[node]]
            else:
                for env in (env_a, env_b):
                    runner.env = env
                    env[node] = runner.run_node(node)
            if node.name in points:
                visit(node.name, env_a[node], env_b[node])
            for used in node.all_input_nodes:
                if last_use.get(used) == i:
                    del env_a[used], env_b[used]

    def run(
        self,
        state: Mapping[str, Tensor],
        flat_inputs: Sequence[Any],
        mutations: dict[TensorRole, Tensor] | None = None,
    ) -> list[Any]:
        """Run the captured graph; returns the flattened user outputs.

        ``state`` and ``flat_inputs`` are left unchanged. When ``mutations``
        is given, it receives the value that the graph leaves in every
        parameter, buffer or input it mutates (in place, or as a
        ``BUFFER_MUTATION`` / ``USER_INPUT_MUTATION`` output).

        Raises:
            TraceError: a node fails; the message names it.
        """
        values = self.placeholder_values(state, flat_inputs)
        outputs = _GraphRunner(self.owner, self.flat_graph).run(*values, enable_io_processing=False)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        by_name = dict(zip(_output_names(self.graph), outputs))  # flat_graph's outputs are graph's, in order
        if mutations is not None:
            placeholders = [n.name for n in self.flat_graph.nodes if n.op == "placeholder"]
            for name, value in zip(placeholders, values):
                if name in self.written:
                    mutations[self.roles[name]] = value
            for name, target in self.mutated_buffers.items():
                mutations[self._role_of_target(target)] = by_name[name]
            for name, placeholder in self.mutated_inputs.items():
                mutations[self.roles[placeholder]] = by_name[name]
        return [by_name[name] for name in _output_names(self.graph) if name in self.user_outputs]

    def _role_of_target(self, target: str) -> TensorRole:
        return next(role for role in self.roles.values() if role.target == target and role.kind != "input")


class _GraphRunner(torch.fx.Interpreter):
    """Executes a captured graph node by node (``torch.fx.Interpreter``).

    A node inlined from a context-only region runs inside that region's
    context again (``torch.autocast``, ``torch.set_grad_enabled``); a node
    that fails raises :class:`TraceError` naming the node and its module.
    """

    def __init__(self, owner: nn.Module, graph: torch.fx.Graph, garbage_collect_values: bool = True) -> None:
        super().__init__(owner, garbage_collect_values=garbage_collect_values, graph=graph)
        self.extra_traceback = False  # our TraceError names the node instead

    def run_node(self, n: torch.fx.Node) -> Any:
        regions = n.meta.get(REGIONS_META)
        try:
            if not regions:
                return super().run_node(n)
            with contextlib.ExitStack() as stack:
                for op, args in regions:
                    stack.enter_context(_region_context(op, args))
                return super().run_node(n)
        except TraceError:
            raise
        except Exception as exc:  # any op can fail: name the node
            raise TraceError(
                f"Graph node {describe_node(n)} failed while re-running the captured graph: "
                f"{type(exc).__name__}: {_first_line(exc)}\nWhat to do: check that the inputs and the "
                "state_dict fit the model the graph was captured from (shapes, dtypes, devices)."
            ) from exc


def _region_context(op: Any, args: tuple[Any, ...]) -> contextlib.AbstractContextManager[Any]:
    """The context that a context-only wrapper op (see ``_INLINED_WRAPPERS``) runs its subgraph in."""
    if op is torch.ops.higher_order.wrap_with_set_grad_enabled:
        return torch.set_grad_enabled(args[0])
    if op is torch.ops.higher_order.wrap_with_autocast:
        device, dtype, enabled, cache = args
        return torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache)
    return contextlib.nullcontext()  # activation checkpointing: forward values are plain ones


def describe_node(node: torch.fx.Node) -> str:
    """``"'linear_1' (aten.linear.default in module 'b', Linear)"``: the node, its op
    and the innermost module of ``node.meta['nn_module_stack']``."""
    op = node.target if node.op == "call_function" else node.op
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return f"'{node.name}' ({op})"
    path, kind = list(stack.values())[-1]
    kind = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
    where = f"module '{path}'" if path else "the root module"
    return f"'{node.name}' ({op} in {where}, {kind})"


def flatten_wrappers(graph: torch.fx.Graph, owner: nn.Module) -> torch.fx.Graph:
    """``graph`` with every call of a context-only wrapper op inlined (see
    :attr:`CapturedGraph.flat_graph`); ``graph`` itself when it has none.

    ``owner`` is the module whose attributes ``graph``'s ``get_attr`` nodes
    name. Wrappers nested in inlined subgraphs are inlined too; the
    ``get_attr`` nodes left (``torch.cond`` branches) are renamed to paths
    from ``owner``.
    """
    if not any(n.op == "call_function" and n.target in _INLINED_WRAPPERS for n in graph.nodes):
        return graph
    flat = torch.fx.Graph()
    _Inliner(flat, owner, {n.name for n in graph.nodes}).copy(graph, {}, "", ())
    flat.lint()
    return flat


class _Inliner:
    """Copies graphs into ``flat``, inlining wrapper calls recursively; keeps
    the names of top-level nodes and gives every inlined node a fresh one."""

    def __init__(self, flat: torch.fx.Graph, owner: nn.Module, names: set[str]) -> None:
        self.flat, self.owner, self.used = flat, owner, names

    def fresh(self, name: str) -> str:
        base, k = name, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def copy(
        self,
        source: torch.fx.Graph,
        env: dict[torch.fx.Node, Any],
        prefix: str,
        regions: tuple[tuple[Any, tuple[Any, ...]], ...],
        names: Mapping[torch.fx.Node, str] | None = None,
    ) -> tuple[Any, ...]:
        """Copy ``source`` (a subgraph at attribute path ``prefix`` of the
        owner when ``regions``, else the top-level graph) into ``flat``;
        ``env`` maps its placeholders (subgraphs) to ``flat`` values, and
        ``names`` names some of its nodes. Returns its output values."""
        top = not regions
        for node in source.nodes:
            if node.op == "placeholder" and not top:
                continue
            if node.op == "output":
                values = torch.fx.node.map_arg(node.args[0], env.__getitem__)
                if top:
                    self.flat.output(values, node.type)
                return tuple(values) if isinstance(values, (tuple, list)) else (values,)
            if node.op == "get_attr" and all(u.target in _INLINED_WRAPPERS for u in node.users):
                continue  # a subgraph that is inlined where it is called
            if node.op == "call_function" and node.target in _INLINED_WRAPPERS:
                env[node] = self.inline(node, env, prefix, regions)
                continue
            if node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
                env[node] = env[node.args[0]][node.args[1]]
                continue
            target = f"{prefix}{node.target}" if node.op == "get_attr" else node.target
            name = node.name if top else (names or {}).get(node) or self.fresh(node.name)
            new = self.flat.create_node(
                node.op,
                target,
                torch.fx.node.map_arg(node.args, env.__getitem__),
                torch.fx.node.map_arg(node.kwargs, env.__getitem__),
                name=name,
                type_expr=node.type,
            )
            new.meta = dict(node.meta)
            if regions:
                new.meta[REGIONS_META] = regions
            env[node] = new
        raise TraceError(
            f"Subgraph '{prefix}' of the captured graph has no output node; please report this model to maskalign."
        )

    def inline(
        self,
        call: torch.fx.Node,
        env: dict[torch.fx.Node, Any],
        prefix: str,
        regions: tuple[tuple[Any, tuple[Any, ...]], ...],
    ) -> tuple[Any, ...]:
        """The outputs of wrapper ``call`` with its subgraph copied into ``flat``."""
        position = _INLINED_WRAPPERS[call.target]
        subgraph = call.args[position]
        path = f"{prefix}{subgraph.target}" if isinstance(subgraph, torch.fx.Node) else ""
        body = self.owner.get_submodule(path) if path else None
        if not isinstance(body, torch.fx.GraphModule):
            raise TraceError(
                f"Argument {position} of graph node {describe_node(call)} is not a subgraph; please report this "
                "model to maskalign."
            )
        inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
        sub_env: dict[torch.fx.Node, Any] = dict(
            zip(inputs, torch.fx.node.map_arg(call.args[position + 1 :], env.__getitem__))
        )
        output = next(n for n in body.graph.nodes if n.op == "output")
        results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
        names: dict[torch.fx.Node, str] = {}
        for user in call.users:  # an output keeps the name of the getitem that read it
            index = user.args[1] if user.target is operator.getitem else None
            result = results[index] if isinstance(index, int) else None
            if isinstance(result, torch.fx.Node) and result.op != "placeholder" and result not in names:
                names[result] = user.name
        inner = (*regions, (call.target, tuple(call.args[:position])))
        return self.copy(body.graph, sub_env, f"{path}.", inner, names)


def _written_placeholders(graph: torch.fx.Graph) -> frozenset[str]:
    """Placeholders that ``graph`` writes into in place, directly or through a
    view (per the ops' schemas: ``Tensor(a!)`` arguments); a call that is not
    an ATen op (other than ``getitem`` and ``torch.cond``, whose branches may
    not mutate their operands) is assumed to write into every tensor it gets."""
    base: dict[torch.fx.Node, torch.fx.Node] = {}  # value -> the placeholder it is a view of
    written: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            base[node] = node
        elif node.op != "call_function":
            continue
        elif node.target is operator.getitem:
            if node.args[0] in base:
                base[node] = base[node.args[0]]
        elif isinstance(node.target, torch._ops.OpOverload):
            schema = node.target._schema
            returned = {a for r in schema.returns if r.alias_info is not None for a in r.alias_info.before_set}
            for i, argument in enumerate(schema.arguments):
                value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
                if argument.alias_info is None or value is None:
                    continue
                values = value if isinstance(value, (tuple, list)) else (value,)
                bases = [base[v] for v in values if isinstance(v, torch.fx.Node) and v in base]
                if argument.alias_info.is_write:
                    written.update(bases)
                if bases and returned & set(argument.alias_info.before_set):
                    base[node] = bases[0]
        elif node.target is not torch.ops.higher_order.cond:
            written.update(base[v] for v in node.all_input_nodes if v in base)
    return frozenset(n.name for n in written)


def _in_mode(model: nn.Module, train: bool) -> contextlib.AbstractContextManager[None]:
    """Eval mode, or train mode with the model's buffers, flags and the random generator restored on exit."""
    if not train:
        return eval_mode(model)
    return _train_mode(model)


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    with preserved_state(model):
        model.train()
        yield


def capture(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    dynamic_batch: bool = False,
    train: bool = False,
) -> CapturedGraph:
    """Capture ``model`` (in eval mode) with ``torch.export.export(strict=False)``.

    Neither ``model`` (its parameters, buffers and train/eval flags) nor the
    inputs are changed, even when forward mutates them: the check runs on
    clones of what the graph writes into, and restores the model's buffers.

    Args:
        model: the module, or an ``ExportedProgram`` you made yourself (then
            ``example_inputs`` default to the program's own example inputs). A
            ``torch.fx`` ``GraphModule`` is a module and is exported like any other.
        example_inputs: positional inputs of ``forward`` (a tensor or a tuple).
        kwargs: keyword inputs of ``forward``.
        check: re-run the captured graph and compare with eager outputs and
            with the eager model's mutations of its buffers and inputs.
        dynamic_batch: mark dim 0 of every positional tensor input dynamic
            (``Dim.AUTO``), so that the graph runs for any batch size.
        train: capture the train-mode graph (BatchNorm with batch statistics,
            train-only branches) instead of the eval-mode one.

    Raises:
        TraceError: export failed (the message names the failing construct and
            what to do), or the captured graph does not reproduce the model.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return _capture_program(model, example_inputs, kwargs, check=check, rtol=rtol, atol=atol)
    args, kwargs = split_inputs(model, example_inputs, kwargs)
    with _in_mode(model, train), torch.no_grad():
        _check_signature(model, args, kwargs)
        try:
            with warnings.catch_warnings(), _quiet_export(), _kept_dim_marks((args, kwargs)):
                # torch.nn.utils.prune recomputes `weight` in a forward pre-hook; export warns
                # about the attribute write, which is exactly the form we support
                assigned = r"The tensor attributes? .* (?:was|were) assigned during export"
                warnings.filterwarnings("ignore", message=assigned)
                dynamic = _batch_dims(model, args, kwargs) if dynamic_batch else None
                program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
        except Exception as exc:  # torch raises many unrelated types here
            raise _export_error(model, exc, args, kwargs) from exc
        captured = _from_exported(program, dict(model.state_dict(keep_vars=True)), _buffers(model), args, kwargs)
        if check:
            _check_reproduces(captured, model.state_dict(), model, args, kwargs, rtol=rtol, atol=atol)
    return captured


class _TorchLogCapture(logging.Filter):
    """Takes the records of ``torch.*`` loggers emitted by one thread off their
    handlers, keeping them in ``records``."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread or not (record.name == "torch" or record.name.startswith("torch.")):
            return True
        self.records.append(record)
        return False


class _TorchPrints:
    """Stands in for ``print`` in the namespace of torch's export module
    (``torch.export._trace``) while some thread exports quietly.

    On a data-dependent trace error, ``torch.export`` prints the partial graph
    with ``print(e.partial_fx_graph, file=sys.stderr)`` (in
    ``_log_export_wrapper``, once per wrapped stage: twice); no logger or
    config controls it. While a thread is inside :meth:`routed`, that
    thread's prints of that module to ``sys.stderr`` go to its buffer; every
    other print (other threads, other files) is the module's own ``print``.
    ``sys.stderr`` itself is never replaced, and the module's namespace is
    put back as it was when the last quiet export ends.
    """

    MODULE = "torch.export._trace"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.saved: Any = None  # the module's own `print` (None: the builtin)
        self.local = threading.local()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        buffer: io.StringIO | None = getattr(self.local, "buffer", None)
        if buffer is not None and kwargs.get("file") is sys.stderr:
            kwargs["file"] = buffer
        (self.saved or builtins.print)(*args, **kwargs)

    @contextlib.contextmanager
    def routed(self, buffer: io.StringIO) -> Iterator[None]:
        """Route this thread's prints of the export module to ``sys.stderr`` into ``buffer``."""
        try:
            module: ModuleType | None = importlib.import_module(self.MODULE)  # torch.export imports it lazily
        except ImportError:  # another torch: nothing to route
            module = None
        namespace: dict[str, Any] = vars(module) if module is not None else {}
        with self.lock:
            if self.users == 0 and module is not None:
                self.saved = namespace.get("print")
                namespace["print"] = self
            self.users += 1
        previous = getattr(self.local, "buffer", None)
        self.local.buffer = buffer
        try:
            yield
        finally:
            self.local.buffer = previous
            with self.lock:
                self.users -= 1
                if self.users == 0 and namespace.get("print") is self:
                    if self.saved is None:
                        del namespace["print"]
                    else:
                        namespace["print"] = self.saved
                    self.saved = None


_TORCH_PRINTS = _TorchPrints()


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Keep torch.export's diagnostics of a failed trace off the console,
    without touching anything another thread sees.

    On a data-dependent branch, export logs a warning (``Unable to find user
    code corresponding to {u0}``) and, on inputs that do not fit, fake-tensor
    errors (``failed while attempting to run meta for aten.mm``) through
    ``torch.*`` loggers, and prints the partial graph to ``sys.stderr`` (see
    :class:`_TorchPrints`), before it raises; the :class:`TraceError` we raise
    then says what failed and what to do. For the call, the records of this
    thread's ``torch.*`` loggers are taken off every handler they reach (by a
    ``logging.Filter`` that passes other threads' records), and this thread's
    partial-graph prints are buffered; when export succeeds, error records
    are handed back to their loggers and the buffered prints are written to
    ``sys.stderr``, when it fails both are dropped. ``sys.stderr`` and
    ``sys.stdout`` are never replaced (``print`` in forward, and any other
    thread's output, shows as it happens).
    """
    capture = _TorchLogCapture()
    loggers = [logging.getLogger()] + [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and (name == "torch" or name.startswith("torch."))
    ]
    handlers = list({id(h): h for logger in loggers for h in logger.handlers}.values())
    if logging.lastResort is not None:  # records of a logger that reaches no handler
        handlers.append(logging.lastResort)
    for handler in handlers:
        handler.addFilter(capture)
    err = io.StringIO()
    try:
        with _TORCH_PRINTS.routed(err):
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(capture)
    sys.stderr.write(err.getvalue())
    for record in capture.records:
        if record.levelno >= logging.ERROR:
            logging.getLogger(record.name).handle(record)


_DIM_MARKS = (
    "_dynamo_weak_dynamic_indices",
    "_dynamo_dynamic_indices",
    "_dynamo_dynamic_range",
    "_dynamo_static_indices",
    "_dynamo_unbacked_indices",
    "_dynamo_propagated_dynamic_indices",
    "_has_dynamo_dim_marking",
)
"""Attributes by which ``torch._dynamo.mark_dynamic`` and friends mark the
dims of a tensor (what ``torch._export.non_strict_utils._clean_dynamic_markers``
removes)."""


@contextlib.contextmanager
def _kept_dim_marks(inputs: Any) -> Iterator[None]:
    """Put the dim marks of every input tensor back as they were on exit.

    ``torch.export`` with ``dynamic_shapes`` marks dims on the input tensors
    themselves (``Dim.AUTO``: ``torch._dynamo.maybe_mark_dynamic``, after
    clearing the user's own marks), and removes its marks only when export
    succeeds: after a failed dynamic export, the next static export of the
    same tensors would still trace those dims as symbols.
    """
    tensors = [x for x in pytree.tree_leaves(inputs) if isinstance(x, Tensor)]
    saved = [{name: copy.copy(getattr(t, name)) for name in _DIM_MARKS if hasattr(t, name)} for t in tensors]
    try:
        yield
    finally:
        for tensor, marks in zip(tensors, saved):
            for name in _DIM_MARKS:
                if name in marks:
                    setattr(tensor, name, marks[name])
                elif hasattr(tensor, name):
                    delattr(tensor, name)


def _export_error(model: nn.Module, exc: BaseException, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> TraceError:
    """The :class:`TraceError` for a failed export: inputs that do not fit an
    op of the model, or (the usual other cause) data-dependent control flow."""
    name = type(model).__name__
    failed = None if isinstance(exc, GuardOnDataDependentSymNode) else _failed_op(exc)
    if failed is None:
        return TraceError(
            f"torch.export could not trace {name}: {type(exc).__name__}: "
            f"{_first_line(exc)}{_user_frame(exc)}\nWhat to do: pass `example_inputs` that match "
            "forward's signature (a tensor or a tuple of positional arguments); replace Python "
            "control flow on tensor values (`if x.sum() > 0`) with torch.where or torch.cond; "
            "or export the model yourself and pass the ExportedProgram to build_spec."
        )
    op, shapes = failed
    modules = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
    where = next(
        (
            f" in module '{modules[id(module)]}' ({type(module).__name__})"
            if modules[id(module)]
            else f" in {name}.forward"
            for module in _frame_selves(exc)
            if id(module) in modules
        ),
        "",
    )
    inputs = [tuple(x.shape) for x in pytree.tree_leaves((args, dict(kwargs))) if isinstance(x, Tensor)]
    return TraceError(
        f"example_inputs of shapes {inputs} do not fit {name}: {op}{where} fails on operands of shapes "
        f"{shapes}: {_first_line(exc)}{_user_frame(exc)}\nWhat to do: pass example_inputs of the shapes, "
        "dtypes and devices that forward expects (e.g. one batch of your data)."
    )


def _failed_op(exc: BaseException) -> tuple[str, list[tuple[int, ...]]] | None:
    """The ATen op (and its tensor operands' shapes) that raised ``exc`` while
    export ran it on fake tensors; None when ``exc`` did not come from an op."""
    failed = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        func = frame.f_locals.get("func")
        if frame.f_code.co_filename.endswith("fake_tensor.py") and isinstance(func, torch._ops.OpOverload):
            operands = pytree.tree_leaves((frame.f_locals.get("args"), frame.f_locals.get("kwargs")))
            failed = (str(func), [tuple(t.shape) for t in operands if isinstance(t, Tensor)])
        tb = tb.tb_next
    return failed


def _frame_selves(exc: BaseException) -> list[nn.Module]:
    """The modules whose methods ``exc`` passed through, innermost first."""
    selves = []
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_locals.get("self")
        if isinstance(module, nn.Module):
            selves.append(module)
        tb = tb.tb_next
    return selves[::-1]


def _batch_dims(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``dynamic_shapes`` marking dim 0 of every tensor input ``Dim.AUTO``:
    a tuple for positional inputs alone, else a dict keyed by forward's
    parameter names (what ``torch.export`` takes when there are keywords)."""

    def batch(value: Any) -> Any:
        return {0: torch.export.Dim.AUTO} if isinstance(value, Tensor) and value.dim() > 0 else None

    if not kwargs:
        return tuple(batch(a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: batch(v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(batch(v) for v in value)
        else:
            out[name] = batch(value)
    return out


def split_inputs(
    model: nn.Module, example_inputs: Any, kwargs: Mapping[str, Any] | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``: a tensor or a list
    becomes a tuple; a mapping whose keys fit forward's parameters (a
    tokenizer's ``BatchEncoding``, a dict batch) becomes the keywords, as for
    ``model(**batch)``; ``None`` with keywords given means no positional input.

    Raises:
        TraceError: neither positional nor keyword inputs are given.
    """
    if example_inputs is None and not kwargs:
        raise TraceError(
            "Argument 'example_inputs' is missing; pass a tensor or a tuple of forward's positional inputs "
            "(or keyword inputs as kwargs=...)."
        )
    if isinstance(example_inputs, Mapping) and kwargs is None and _binds_as_keywords(model, example_inputs):
        return (), dict(example_inputs)
    return (() if example_inputs is None else normalize_inputs(example_inputs)), dict(kwargs or {})


def _binds_as_keywords(model: nn.Module, inputs: Mapping[Any, Any]) -> bool:
    """Whether ``model(**inputs)`` fits forward's signature (and ``inputs`` is
    not forward's one positional argument)."""
    if not all(isinstance(k, str) for k in inputs):
        return False
    try:
        inspect.signature(model.forward).bind(**inputs)
    except (TypeError, ValueError):
        return False
    return True


def _capture_program(
    program: torch.export.ExportedProgram,
    example_inputs: Any,
    kwargs: Mapping[str, Any] | None,
    **options: Any,
) -> CapturedGraph:
    if example_inputs is None:
        if program.example_inputs is None:
            raise TraceError("Argument 'model' is an ExportedProgram without example inputs; pass example_inputs.")
        args, kwargs = program.example_inputs
    else:
        args = normalize_inputs(example_inputs)
    kwargs = dict(kwargs or {})
    state = dict(program.state_dict)
    buffers = {**state, **{k: v for k, v in program.constants.items() if isinstance(v, Tensor)}}
    captured = _from_exported(program, state, buffers, args, kwargs)
    if options.pop("check"):
        try:
            _check_reproduces(captured, state, program.module(), args, kwargs, **options)
        except TraceError:
            raise
        except Exception as exc:  # guards of the program, shape errors of its ops
            shapes = [tuple(x.shape) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
            raise TraceError(
                f"Argument 'example_inputs' (shapes {shapes}) is not accepted by the ExportedProgram: "
                f"{type(exc).__name__}: {_first_line(exc)}\nWhat to do: pass inputs of the shapes it was "
                "exported with, or leave example_inputs out to use the program's own."
            ) from exc
    return captured


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_buffers(remove_duplicate=False))


def _check_signature(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """A clear error when the example inputs do not fit ``forward``."""
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise TraceError(
            f"Argument 'example_inputs' does not match {type(model).__name__}.forward"
            f"{inspect.signature(model.forward)}: {exc}; pass a tuple of positional inputs (and kwargs=...)."
        ) from exc
    except ValueError:  # no signature (builtins): let export decide
        pass


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame of the user's code (outside torch and
    maskalign, in a source file), i.e. the user's construct."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/torch/" not in f.filename and not f.filename.startswith((_PACKAGE_DIR, "<"))
    ]
    if not frames:
        return ""
    frame = frames[-1]
    return f"\n  at {frame.filename}:{frame.lineno}: {frame.line}"


def _from_exported(
    program: torch.export.ExportedProgram,
    state: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> CapturedGraph:
    roles: dict[str, TensorRole] = {}
    constants: dict[str, Tensor] = {}
    user_index = 0
    for spec in program.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == gs.InputKind.PARAMETER:
            roles[name] = TensorRole("parameter", str(spec.target))
        elif spec.kind == gs.InputKind.BUFFER:
            target = str(spec.target)
            if spec.persistent and target in state:
                roles[name] = TensorRole("buffer", target)
            else:
                roles[name] = TensorRole("constant", target)
                constants[target] = buffers[target] if target in buffers else program.constants[target]
        elif spec.kind == gs.InputKind.CONSTANT_TENSOR:
            roles[name] = TensorRole("constant", str(spec.target))
            constants[str(spec.target)] = program.constants[str(spec.target)]
        elif spec.kind == gs.InputKind.USER_INPUT:
            roles[name] = TensorRole("input", str(user_index))
            user_index += 1
        else:
            raise TraceError(
                f"Graph input {name!r} is of kind {spec.kind.name}, which maskalign does not support; please report "
                "this model to maskalign."
            )
    user_outputs: list[str] = []
    mutated: dict[str, str] = {}
    mutated_inputs: dict[str, str] = {}
    for spec in program.graph_signature.output_specs:
        if spec.kind == gs.OutputKind.USER_OUTPUT:
            user_outputs.append(spec.arg.name)
        elif spec.kind == gs.OutputKind.BUFFER_MUTATION:
            mutated[spec.arg.name] = str(spec.target)
        elif spec.kind == gs.OutputKind.USER_INPUT_MUTATION:
            mutated_inputs[spec.arg.name] = str(spec.target)
        else:
            raise TraceError(
                f"Graph output {spec.arg.name!r} is of kind {spec.kind.name}, which maskalign does not support; "
                "please report this model to maskalign."
            )
    _, input_spec = pytree.tree_flatten((args, dict(kwargs)))
    owner = program.graph_module
    flat = flatten_wrappers(program.graph, owner)
    return CapturedGraph(
        program.graph,
        roles,
        constants,
        user_outputs,
        mutated,
        input_spec,
        _aliases(state),
        owner,
        flat,
        mutated_inputs,
        _written_placeholders(flat),
    )


def _aliases(state: Mapping[str, Tensor]) -> list[list[str]]:
    """``state_dict`` keys that share one storage view (tied weights, e.g.
    GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``)."""
    views: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        views.setdefault(key, []).append(name)
    return [names for names in views.values() if len(names) > 1]


@contextlib.contextmanager
def _restoring(module: nn.Module, captured: CapturedGraph) -> Iterator[dict[TensorRole, Tensor]]:
    """Run ``module`` in the block; on exit, put back every parameter and buffer
    that it mutated (in place or by reassignment), recording each new value in
    the yielded dict.

    Every buffer, and every parameter that the graph writes into, is copied
    beforehand; a parameter written in place without the graph recording it
    cannot be put back and raises :class:`TraceError`.
    """
    writes = {r.target for n, r in captured.roles.items() if n in captured.written and r.kind != "input"}
    writes.update(captured.mutated_buffers.values())
    entries: list[tuple[str, str, dict[str, Any], str, Tensor, int]] = []
    for path, sub in module.named_modules(remove_duplicate=False):
        tables: tuple[tuple[str, dict[str, Any]], ...] = (("parameter", sub._parameters), ("buffer", sub._buffers))
        for kind, table in tables:
            for attr, value in table.items():
                if value is not None:
                    entries.append((f"{path}.{attr}" if path else attr, kind, table, attr, value, value._version))
    saved = {name: tensor.clone() for name, kind, _, _, tensor, _ in entries if kind == "buffer" or name in writes}
    mutations: dict[TensorRole, Tensor] = {}
    lost: list[str] = []
    unset: list[str] = []
    try:
        yield mutations
    finally:
        with torch.no_grad():
            for name, kind, table, attr, tensor, version in entries:
                now: Tensor | None = table.get(attr)
                if now is tensor and tensor._version == version:
                    continue
                if now is None:  # set to None or deleted: nothing a graph output could stand for
                    unset.append(TensorRole(kind, name).describe())
                else:
                    mutations[TensorRole(kind, name)] = now.clone() if now is tensor else now
                table[attr] = tensor
                if tensor._version == version:
                    continue
                if name in saved:
                    tensor.copy_(saved[name])
                else:
                    lost.append(TensorRole(kind, name).describe())
    if unset:
        raise TraceError(
            f"{unset[0][0].upper()}{unset[0][1:]} of {type(module).__name__} is set to None or deleted by "
            "forward; make forward compute its result without changing which tensors the module holds."
        )
    if lost:
        raise TraceError(
            f"{lost[0][0].upper()}{lost[0][1:]} of {type(module).__name__} is written in place by forward, "
            "and the captured graph does not record the write, so it could not be restored; make forward "
            "compute its result without writing into module state."
        )


def _check_reproduces(
    captured: CapturedGraph,
    state: Mapping[str, Tensor],
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    rtol: float,
    atol: float,
) -> None:
    """Run ``module`` (eagerly) and the graph on the inputs, from the same state,
    and compare outputs and mutations; ``module``, ``state`` and the inputs are
    left as they were."""
    flat_inputs, _ = pytree.tree_flatten((args, dict(kwargs)))
    eager_inputs = [x.clone() if isinstance(x, Tensor) else x for x in flat_inputs]
    eager_args, eager_kwargs = pytree.tree_unflatten(eager_inputs, captured.input_spec)
    graph_mutations: dict[TensorRole, Tensor] = {}
    with _restoring(module, captured) as eager_mutations:
        try:
            eager_out = module(*eager_args, **eager_kwargs)
        except Exception as exc:  # the eager model itself fails where the fake-tensor trace did not
            raise TraceError(
                f"{type(module).__name__} raises {type(exc).__name__} when run eagerly on example_inputs, "
                f"although torch.export traced it: {_first_line(exc)}{_user_frame(exc)}\nWhat to do: check "
                "that the model runs on these inputs as they are (dtype and device: some kernels have no "
                "float64 or CPU version), e.g. with model(*example_inputs)."
            ) from exc
        expected = [leaf for leaf in pytree.tree_leaves(eager_out) if isinstance(leaf, Tensor)]
    got = captured.run(state, flat_inputs, graph_mutations)
    for i, x in enumerate(eager_inputs):
        if isinstance(x, Tensor) and x._version:
            eager_mutations[TensorRole("input", str(i))] = x
    name = type(module).__name__
    mutated = _compare_mutations(captured, state, flat_inputs, graph_mutations, eager_mutations, name, rtol, atol)
    got = [leaf for leaf in got if isinstance(leaf, Tensor)]
    if len(got) != len(expected):
        raise TraceError(
            f"The captured graph returns {len(got)} tensors but the eager model returns {len(expected)}; "
            "return the same tensors in both modes, or report the model to maskalign."
        )
    for index, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape or not torch.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True):
            diff = (g - e).abs().max().item() if g.shape == e.shape else float("nan")
            cause = (
                f"forward mutates {', '.join(mutated)}, which the capture may not reproduce; make forward "
                "free of in-place writes to its inputs and module state"
                if mutated
                else "the model probably has data-dependent Python control flow"
            )
            raise TraceError(
                f"Output {index} of the captured graph of {name} differs from the eager model's "
                f"(shapes {tuple(g.shape)} vs {tuple(e.shape)}, max abs diff {diff:.3g}); {cause}."
            )


def _compare_mutations(
    captured: CapturedGraph,
    state: Mapping[str, Tensor],
    flat_inputs: Sequence[Any],
    graph: Mapping[TensorRole, Tensor],
    eager: Mapping[TensorRole, Tensor],
    name: str,
    rtol: float,
    atol: float,
) -> list[str]:
    """Check that the graph leaves every parameter, buffer and input that forward
    mutates as the eager model does; returns their descriptions."""
    graph_by = {role.describe(): value for role, value in graph.items()}
    original = {}
    for role in graph:
        if role.kind == "input":
            original[role.describe()] = flat_inputs[int(role.target)]
        else:
            original[role.describe()] = state[role.target] if role.target in state else captured.constants[role.target]
    eager_by = {role.describe(): value for role, value in eager.items()}
    for what in sorted(set(graph_by) | set(eager_by)):
        culprit = f"{what[0].upper()}{what[1:]} of {name}"
        if what not in graph_by:
            raise TraceError(
                f"{culprit} is mutated by forward, and the captured graph does not record the mutation; "
                "make forward compute its result without writing into its inputs or module state."
            )
        g, e = graph_by[what], eager_by.get(what, original[what])
        if g.shape != e.shape or not torch.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True):
            diff = (g - e).abs().max().item() if g.shape == e.shape else float("nan")
            raise TraceError(
                f"{culprit} is mutated by forward, and the captured graph does not reproduce its new value "
                f"(max abs diff {diff:.3g}); make forward compute its result without writing into its inputs "
                "or module state."
            )
    return sorted(graph_by)


def _output_names(graph: torch.fx.Graph) -> list[str]:
    output = next(node for node in graph.nodes if node.op == "output")
    values = output.args[0]
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [value.name if isinstance(value, torch.fx.Node) else "" for value in values]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
