"""Capture a model as one canonical ``torch.fx`` graph.

We use the pre-dispatch ATen graph of ``torch.export.export(..., strict=False)``
without decompositions: ``aten.linear``, ``aten.conv2d``, ``aten.batch_norm``
and friends stay whole, so the role of every weight axis is explicit in the op
signature, and every parameter or buffer is a placeholder whose name maps back
to its ``state_dict`` key through the graph signature.

The captured graph is always re-run against the eager model on the example
inputs before anyone analyses it: a capture that does not reproduce the model
raises :class:`~maskalign.errors.TraceError` instead of producing a spec for a
different function.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.export import graph_signature as gs
from torch.utils import _pytree as pytree

from .errors import TraceError

__all__ = ["CapturedGraph", "TensorRole", "capture", "normalize_inputs"]


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


@dataclass
class CapturedGraph:
    """A model captured as a pure function of its parameters, buffers and inputs.

    ``graph`` is the lifted ATen graph: its placeholders are, in order, every
    parameter, buffer, constant and flattened user input (see ``roles``).
    ``user_outputs`` names the output values that are the model's own outputs
    (as opposed to buffer mutations).
    """

    graph: torch.fx.Graph
    roles: dict[str, TensorRole]
    constants: dict[str, Tensor]
    user_outputs: list[str]
    mutated_buffers: dict[str, str]
    input_spec: pytree.TreeSpec
    aliases: list[list[str]]

    def placeholder_values(self, state: Mapping[str, Tensor], flat_inputs: Sequence[Any]) -> list[Any]:
        """Values for the graph's placeholders, in order, from a ``state_dict``-like
        mapping (parameters and persistent buffers) and flattened user inputs."""
        values: list[Any] = []
        for node in self.graph.nodes:
            if node.op != "placeholder":
                continue
            role = self.roles[node.name]
            if role.kind in ("parameter", "buffer"):
                values.append(state[role.target])
            elif role.kind == "constant":
                values.append(self.constants[role.target])
            else:
                values.append(flat_inputs[int(role.target)])
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
        node of ``points`` is computed (before any in-place op can change it).

        Only the nodes that ``points`` depend on run, and every value is
        dropped after its last use, so memory stays that of one forward pass
        per model rather than of all recorded activations.
        """
        nodes = list(self.graph.nodes)
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
        env_a: dict[torch.fx.Node, Any] = {}
        env_b: dict[torch.fx.Node, Any] = {}
        for i, node in enumerate(order):
            if node.op == "placeholder":
                env_a[node] = values_a[placeholders[node]]
                env_b[node] = values_b[placeholders[node]]
            elif node.op == "call_function":
                for env in (env_a, env_b):
                    args = torch.fx.node.map_arg(node.args, env.__getitem__)
                    kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                    env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
            else:
                raise TraceError(f"cannot run graph node '{node.name}' of kind {node.op}")
            if node.name in points:
                visit(node.name, env_a[node], env_b[node])
            for used in node.all_input_nodes:
                if last_use.get(used) == i:
                    del env_a[used], env_b[used]

    def run(self, state: Mapping[str, Tensor], flat_inputs: Sequence[Any]) -> list[Any]:
        """Run the captured graph; returns the flattened user outputs."""
        module = torch.fx.GraphModule(nn.Module(), self.graph)
        outputs = module(*self.placeholder_values(state, flat_inputs))
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        names = _output_names(self.graph)
        return [value for name, value in zip(names, outputs) if name in self.user_outputs]


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Positional arguments for ``forward``: a tensor becomes a 1-tuple, a list
    becomes a tuple, a tuple is kept."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every submodule of ``models`` in eval mode; restore each flag on exit."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def capture(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    dynamic_batch: bool = False,
) -> CapturedGraph:
    """Capture ``model`` (in eval mode) with ``torch.export.export(strict=False)``.

    Args:
        model: the module (left unchanged: its train/eval flags are restored),
            or an ``ExportedProgram`` you made yourself (then ``example_inputs``
            default to the program's own example inputs). A ``torch.fx``
            ``GraphModule`` is a module and is exported like any other.
        example_inputs: positional inputs of ``forward`` (a tensor or a tuple).
        kwargs: keyword inputs of ``forward``.
        check: re-run the captured graph and compare with eager outputs.
        dynamic_batch: mark dim 0 of every positional tensor input dynamic
            (``Dim.AUTO``), so that the graph runs for any batch size.

    Raises:
        TraceError: export failed (the message names the failing construct and
            what to do), or the captured graph does not reproduce the model.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return _capture_program(model, example_inputs, kwargs, check=check, rtol=rtol, atol=atol)
    if example_inputs is None:
        raise TraceError("build_spec needs example_inputs: a tensor or a tuple of forward's positional inputs")
    args = normalize_inputs(example_inputs)
    kwargs = dict(kwargs or {})
    with eval_mode(model), torch.no_grad():
        _check_signature(model, args, kwargs)
        try:
            with warnings.catch_warnings(), _quiet_export():
                # torch.nn.utils.prune recomputes `weight` in a forward pre-hook; export warns
                # about the attribute write, which is exactly the form we support
                warnings.filterwarnings("ignore", message=r"The tensor attributes .* were assigned during export")
                dynamic = _batch_dims(args) if dynamic_batch and not kwargs else None
                program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
        except Exception as exc:  # torch raises many unrelated types here
            raise TraceError(
                f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: "
                f"{_first_line(exc)}{_user_frame(exc)}\nWhat to do: pass `example_inputs` that match "
                "forward's signature (a tensor or a tuple of positional arguments); replace Python "
                "control flow on tensor values (`if x.sum() > 0`) with torch.where or torch.cond; "
                "or export the model yourself and pass the ExportedProgram to build_spec."
            ) from exc
        captured = _from_exported(program, dict(model.state_dict(keep_vars=True)), _buffers(model), args, kwargs)
        if check:
            _check_reproduces(
                captured, model.state_dict(), lambda: model(*args, **kwargs), args, kwargs, rtol=rtol, atol=atol
            )
    return captured


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Keep torch.export's diagnostics of a failed trace off the console.

    On a data-dependent branch, export logs a warning through the ``torch``
    logger and writes the partial graph to stderr, twice, before it raises;
    the :class:`TraceError` we raise then says what failed and what to do.
    The ``torch`` logger is raised to ERROR for the call, and stdout / stderr
    are buffered: replayed when export succeeds (so ``print`` in a model's
    forward still shows), dropped when it fails.
    """
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        logger.setLevel(level)
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())


def _batch_dims(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``dynamic_shapes`` marking dim 0 of every tensor argument ``Dim.AUTO``."""
    return tuple({0: torch.export.Dim.AUTO} if isinstance(a, Tensor) and a.dim() > 0 else None for a in args)


def _capture_program(
    program: torch.export.ExportedProgram,
    example_inputs: Any,
    kwargs: Mapping[str, Any] | None,
    **options: Any,
) -> CapturedGraph:
    if example_inputs is None:
        if program.example_inputs is None:
            raise TraceError("this ExportedProgram carries no example inputs; pass example_inputs")
        args, kwargs = program.example_inputs
    else:
        args = normalize_inputs(example_inputs)
    kwargs = dict(kwargs or {})
    state = dict(program.state_dict)
    buffers = {**state, **{k: v for k, v in program.constants.items() if isinstance(v, Tensor)}}
    captured = _from_exported(program, state, buffers, args, kwargs)
    if options.pop("check"):
        module = program.module()
        try:
            _check_reproduces(captured, state, lambda: module(*args, **kwargs), args, kwargs, **options)
        except TraceError:
            raise
        except Exception as exc:  # guards of the program, shape errors of its ops
            shapes = [tuple(x.shape) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
            raise TraceError(
                f"the ExportedProgram does not accept example_inputs of shapes {shapes}: "
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
            f"example_inputs do not match {type(model).__name__}.forward{inspect.signature(model.forward)}: "
            f"{exc}; pass a tuple of positional inputs (and kwargs=...)"
        ) from exc
    except ValueError:  # no signature (builtins): let export decide
        pass


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch, i.e. the user's construct."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
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
            raise TraceError(f"unsupported graph input {name!r} of kind {spec.kind.name}")
    user_outputs: list[str] = []
    mutated: dict[str, str] = {}
    for spec in program.graph_signature.output_specs:
        if spec.kind == gs.OutputKind.USER_OUTPUT:
            user_outputs.append(spec.arg.name)
        elif spec.kind == gs.OutputKind.BUFFER_MUTATION:
            mutated[spec.arg.name] = str(spec.target)
        else:
            raise TraceError(f"unsupported graph output {spec.arg.name!r} of kind {spec.kind.name}")
    _, input_spec = pytree.tree_flatten((args, dict(kwargs)))
    return CapturedGraph(program.graph, roles, constants, user_outputs, mutated, input_spec, _aliases(state))


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


def _check_reproduces(
    captured: CapturedGraph,
    state: Mapping[str, Tensor],
    run_eager: Callable[[], Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    rtol: float,
    atol: float,
) -> None:
    flat_inputs, _ = pytree.tree_flatten((args, dict(kwargs)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # example inputs are tiny: a second thread only adds contention
    try:
        got = captured.run(state, flat_inputs)
        expected = [leaf for leaf in pytree.tree_leaves(run_eager()) if isinstance(leaf, Tensor)]
    finally:
        torch.set_num_threads(threads)
    got = [leaf for leaf in got if isinstance(leaf, Tensor)]
    if len(got) != len(expected):
        raise TraceError(f"the captured graph returns {len(got)} tensors but the eager model returns {len(expected)}")
    for index, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape or not torch.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True):
            diff = (g - e).abs().max().item() if g.shape == e.shape else float("nan")
            raise TraceError(
                f"the captured graph does not reproduce output {index} of the eager model "
                f"(shapes {tuple(g.shape)} vs {tuple(e.shape)}, max abs diff {diff:.3g}); "
                "the model probably has data-dependent Python control flow"
            )


def _output_names(graph: torch.fx.Graph) -> list[str]:
    output = next(node for node in graph.nodes if node.op == "output")
    values = output.args[0]
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [value.name if isinstance(value, torch.fx.Node) else "" for value in values]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
