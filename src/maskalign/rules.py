"""Axis-propagation rules, one small rule per ATen op.

:func:`analyze` walks a captured graph once (like ``torch.fx.passes.shape_prop``,
but over axis atoms instead of shapes). Each node's value gets one atom list per
dimension; each op's rule unifies the atoms that must carry one permutation so
that the op commutes with it, and freezes the atoms that no permutation may touch
(spatial axes of a convolution, graph inputs and outputs, constants). An op
without a rule freezes every atom it touches, so an unknown op can only make the
spec smaller, never wrong.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.fx

from .atoms import AtomTable
from .capture import CapturedGraph

__all__ = ["Analysis", "analyze"]

Dims = list[list[int]]  # one atom list (ordered product) per tensor dimension
Value = Union[Dims, tuple["Value", ...], None]  # noqa: UP007 (recursive alias)


@dataclass
class Analysis:
    """Result of :func:`analyze`: the atom table, atoms of every graph value,
    and atoms of every parameter/buffer (by ``state_dict`` key)."""

    atoms: AtomTable
    node_dims: dict[str, Dims] = field(default_factory=dict)
    tensor_dims: dict[str, Dims] = field(default_factory=dict)
    node_ops: dict[str, str] = field(default_factory=dict)


class _Context:
    def __init__(self, atoms: AtomTable, values: dict[torch.fx.Node, Value]) -> None:
        self.atoms = atoms
        self.values = values

    def fresh(self, shape: Sequence[int]) -> Dims:
        return [[self.atoms.new(int(s))] if int(s) > 1 else [] for s in shape]

    def value(self, arg: Any) -> Value:
        return self.values.get(arg) if isinstance(arg, torch.fx.Node) else None

    def tensor(self, arg: Any) -> Dims | None:
        value = self.value(arg)
        return value if _is_dims(value) else None

    def unify(self, left: list[int], right: list[int], reason: str) -> None:
        if not self.atoms.unify(left, right):
            self.atoms.freeze(left + right, reason)

    def freeze(self, value: Value, reason: str) -> None:
        for dims in _flatten_value(value):
            for dim in dims:
                self.atoms.freeze(dim, reason)


def _is_dims(value: Value) -> bool:
    return isinstance(value, list)


def _flatten_value(value: Value) -> list[Dims]:
    if value is None:
        return []
    if _is_dims(value):
        return [value]  # type: ignore[list-item]
    out: list[Dims] = []
    for item in value:  # type: ignore[union-attr]
        out.extend(_flatten_value(item))
    return out


def _fresh_from_meta(ctx: _Context, meta: Any) -> Value:
    if isinstance(meta, torch.Tensor):
        return ctx.fresh(meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(_fresh_from_meta(ctx, m) for m in meta)
    return None


def _flat(dims: Dims) -> list[int]:
    return [a for dim in dims for a in dim]


def _describe(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    where = ""
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
        where = f" in module '{path}' ({cls_name})" if path else f" in the root module ({cls_name})"
    return f"{_op_name(node)} at node '{node.name}'{where}"


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return getattr(target, "__name__", str(target))


def _arg(node: torch.fx.Node, name: str, default: Any = None) -> Any:
    """The argument called ``name`` in the op's schema, positional or keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    if isinstance(node.target, torch._ops.OpOverload):
        for index, argument in enumerate(node.target._schema.arguments):
            if argument.name == name:
                return node.args[index] if index < len(node.args) else default
    return default


# --------------------------------------------------------------------- rules
Rule = Callable[[_Context, torch.fx.Node, Value], None]


def _pointwise(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """Elementwise ops with broadcasting: dims of equal size unify, right-aligned."""
    if not _is_dims(out):
        ctx.freeze(out, f"non-tensor output of {_describe(node)}")
        return
    out_dims: Dims = out  # type: ignore[assignment]
    for arg in list(node.args) + list(node.kwargs.values()):
        dims = ctx.tensor(arg)
        if dims is None:
            continue
        meta = arg.meta["val"]
        out_meta = node.meta["val"]
        if len(dims) > len(out_dims):
            ctx.freeze(dims, f"operand of {_describe(node)} has more dims than its output")
            continue
        offset = len(out_dims) - len(dims)
        for k, dim in enumerate(dims):
            if int(meta.shape[k]) == int(out_meta.shape[offset + k]):
                ctx.unify(dim, out_dims[offset + k], f"broadcast in {_describe(node)}")


def _reshape(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """view/reshape/flatten/(un)squeeze: the row-major flat index is preserved."""
    src = ctx.tensor(node.args[0])
    if src is None or not _is_dims(out):
        return
    ctx.unify(_flat(src), _flat(out), f"reshape without a common factorisation in {_describe(node)}")  # type: ignore[arg-type]


def _permute_dims(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    src = ctx.tensor(node.args[0])
    if src is None or not _is_dims(out):
        return
    ndim = len(src)
    name = _op_name(node)
    if name == "aten::permute":
        order = [d % ndim for d in node.args[1]]
    else:
        order = list(range(ndim))
        if name != "aten::t" or ndim == 2:
            d0, d1 = (0, 1) if name == "aten::t" else (node.args[1] % ndim, node.args[2] % ndim)
            order[d0], order[d1] = order[d1], order[d0]
    for k, d in enumerate(order):
        ctx.unify(src[d], out[k], f"transpose in {_describe(node)}")  # type: ignore[index]


def _reduction(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """sum/mean/amax/var...: reducing over a permuted axis is invariant."""
    src = ctx.tensor(node.args[0])
    if src is None:
        return
    if any(isinstance(arg, torch.fx.Node) for arg in node.args[1:]):  # max.other, min.other
        _pointwise(ctx, node, out)
        return
    dims_arg = _arg(node, "dim")
    keepdim = bool(_arg(node, "keepdim", False))
    ndim = len(src)
    if dims_arg is None or dims_arg == []:
        reduced = set(range(ndim))
    elif isinstance(dims_arg, int):
        reduced = {dims_arg % ndim}
    else:
        reduced = {d % ndim for d in dims_arg}
    kept = [d for d in range(ndim) if d not in reduced]
    outs = out if isinstance(out, tuple) else (out,)
    for value in outs:
        if not _is_dims(value):
            continue
        if keepdim:
            pairs = [(d, d) for d in kept]
        else:
            pairs = list(zip(kept, range(len(kept))))
        for s, o in pairs:
            ctx.unify(src[s], value[o], f"reduction in {_describe(node)}")  # type: ignore[index]
    if len(outs) > 1:  # (values, indices): indices along a permuted axis change
        for d in reduced:
            ctx.atoms.freeze(src[d], f"arg-reduction (indices) in {_describe(node)}")


def _linear(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """aten.linear(x[..., in], W[out, in], b[out]) -> y[..., out]."""
    x, w, b = ctx.tensor(node.args[0]), ctx.tensor(node.args[1]), ctx.tensor(_arg(node, "bias"))
    y: Dims = out  # type: ignore[assignment]
    where = _describe(node)
    assert x is not None and w is not None
    if len(w) == 1:  # vector weight: y = x @ w
        ctx.unify(x[-1], w[0], f"contraction in {where}")
        for k in range(len(x) - 1):
            ctx.unify(x[k], y[k], f"batch axis in {where}")
        return
    ctx.unify(x[-1], w[1], f"contraction in {where}")
    ctx.unify(w[0], y[-1], f"output axis in {where}")
    if b is not None and len(b) == 1:
        ctx.unify(b[0], y[-1], f"bias in {where}")
    elif b is not None:
        ctx.freeze(b, f"scalar bias in {where}")
    for k in range(len(x) - 1):
        ctx.unify(x[k], y[k], f"batch axis in {where}")


def _conv(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """Convolutions: channel axes unify, spatial axes freeze.

    Regular conv: W[out, in / groups, *k]. Transposed conv: W[in, out / groups, *k].
    A grouped conv factors its channels as [groups, channels per group]: whole
    groups permute together with their weights, and one permutation acts
    inside every group (depthwise: the channel permutation passes through).
    """
    x, w = ctx.tensor(node.args[0]), ctx.tensor(node.args[1])
    b = ctx.tensor(_arg(node, "bias"))
    y: Dims = out  # type: ignore[assignment]
    assert x is not None and w is not None
    where = _describe(node)
    transposed = bool(_arg(node, "transposed", _op_name(node).startswith("aten::conv_transpose")))
    groups = int(_arg(node, "groups", 1))
    nspatial = len(w) - 2
    c_axis = len(x) - nspatial - 1
    for dim in w[2:] + x[c_axis + 1 :] + y[c_axis + 1 :]:
        ctx.atoms.freeze(dim, f"spatial axis of {where}")
    for k in range(c_axis):
        ctx.unify(x[k], y[k], f"batch axis in {where}")
    in_channels = int(node.args[0].meta["val"].shape[c_axis])
    out_channels = int(node.meta["val"].shape[c_axis])
    if groups == 1:
        w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
        ctx.unify(x[c_axis], w_in, f"input channels of {where}")
        ctx.unify(y[c_axis], w_out, f"output channels of {where}")
    else:  # channels factor as [groups, per group]; depthwise is per group == 1
        group = [ctx.atoms.new(groups)]
        x_inner = [ctx.atoms.new(in_channels // groups)] if in_channels > groups else []
        y_inner = [ctx.atoms.new(out_channels // groups)] if out_channels > groups else []
        ctx.unify(x[c_axis], group + x_inner, f"input channel groups of {where}")
        ctx.unify(y[c_axis], group + y_inner, f"output channel groups of {where}")
        w_rows, w_cols = (group + x_inner, y_inner) if transposed else (group + y_inner, x_inner)
        ctx.unify(w[0], w_rows, f"weight of {where}")
        ctx.unify(w[1], w_cols, f"weight of {where}")
    if b is not None:
        ctx.unify(b[0], y[c_axis], f"bias of {where}")


def _batch_norm(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """batch_norm / instance_norm: per-channel (axis 1) affine and statistics."""
    x = ctx.tensor(node.args[0])
    assert x is not None
    where = _describe(node)
    channel = x[1] if len(x) > 1 else x[0]
    for name in ("weight", "bias", "running_mean", "running_var"):
        stat = ctx.tensor(_arg(node, name))
        if stat is not None:
            ctx.unify(stat[0], channel, f"channel of {where}")
    outs = out if isinstance(out, tuple) else (out,)
    first = outs[0]
    for k, dim in enumerate(x):
        ctx.unify(dim, first[k], f"{where}")  # type: ignore[index]
    for extra in outs[1:]:  # saved mean / invstd (training variants)
        for dim in _flatten_value(extra):
            if len(dim) == 1:
                ctx.unify(dim[0], channel, f"{where}")
            else:
                ctx.freeze(dim, f"saved statistics of {where}")


def _layer_norm(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """layer_norm(x, shape, w, b) / rms_norm(x, shape, w): statistics over the
    last len(shape) dims are invariant to permuting them; w, b follow."""
    x = ctx.tensor(node.args[0])
    assert x is not None
    outs = out if isinstance(out, tuple) else (out,)
    y = outs[0]
    where = _describe(node)
    for k, dim in enumerate(x):
        ctx.unify(dim, y[k], f"{where}")  # type: ignore[index]
    normalized = len(node.args[1])
    for name in ("weight", "bias"):
        param = ctx.tensor(_arg(node, name))
        if param is None:
            continue
        for k in range(normalized):
            ctx.unify(param[k], x[len(x) - normalized + k], f"affine of {where}")
    for extra in outs[1:]:
        ctx.freeze(extra, f"saved statistics of {where}")


def _pool(nspatial: int) -> Rule:
    def rule(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
        """Pooling: batch and channel axes pass through, spatial axes freeze."""
        x = ctx.tensor(node.args[0])
        assert x is not None
        where = _describe(node)
        outs = out if isinstance(out, tuple) else (out,)
        for value in outs:
            if not _is_dims(value):
                continue
            for k in range(len(x) - nspatial):
                ctx.unify(x[k], value[k], f"{where}")  # type: ignore[index]
            for k in range(len(x) - nspatial, len(x)):
                ctx.atoms.freeze(x[k], f"spatial axis of {where}")
                ctx.atoms.freeze(value[k], f"spatial axis of {where}")  # type: ignore[index]

    return rule


def _embedding(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """embedding(W[vocab, d], idx) -> y[..., d]: the vocabulary axis is fixed."""
    w, idx = ctx.tensor(node.args[0]), ctx.tensor(node.args[1])
    y: Dims = out  # type: ignore[assignment]
    assert w is not None and idx is not None
    where = _describe(node)
    ctx.atoms.freeze(w[0], f"vocabulary axis of {where}")
    ctx.unify(w[1], y[-1], f"{where}")
    for k, dim in enumerate(idx):
        ctx.unify(dim, y[k], f"{where}")


def _prelu(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """prelu(x, w): one slope per channel, channels on dim 1 (dim 0 for 1-d x)."""
    x, w = ctx.tensor(node.args[0]), ctx.tensor(node.args[1])
    y: Dims = out  # type: ignore[assignment]
    assert x is not None
    for k, dim in enumerate(x):
        ctx.unify(dim, y[k], f"{_describe(node)}")
    if w is not None and w and w[0]:
        ctx.unify(w[0], x[1] if len(x) > 1 else x[0], f"channel slopes of {_describe(node)}")


def _getitem(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    source = ctx.value(node.args[0])
    if isinstance(source, tuple):
        item = source[node.args[1]]
        for a, b in zip(_flatten_value(item), _flatten_value(out)):
            for da, db in zip(a, b):
                ctx.unify(da, db, f"{_describe(node)}")
    else:
        ctx.freeze(out, f"indexing of a non-tuple in {_describe(node)}")


def _contract(ctx: _Context, node: torch.fx.Node, a: Dims, b: Dims, y: Dims) -> None:
    """Batched matrix product ``y = a @ b`` with numpy broadcasting of batch dims:
    the contracted axis unifies between a and b (summing over a permuted axis
    is invariant), rows of a and columns of b pass to y."""
    where = _describe(node)
    a_vec, b_vec = len(a) == 1, len(b) == 1
    ctx.unify(a[-1], b[0] if b_vec else b[-2], f"contraction in {where}")
    if not a_vec:
        ctx.unify(a[-2], y[-1] if b_vec else y[-2], f"rows of {where}")
    if not b_vec:
        ctx.unify(b[-1], y[-1], f"columns of {where}")
    a_batch, b_batch = a[:-2], b[:-2]
    y_batch = y[: len(y) - (0 if a_vec else 1) - (0 if b_vec else 1)]
    a_meta, b_meta = node.args[0], node.args[1]
    for operand, meta_node in ((a_batch, a_meta), (b_batch, b_meta)):
        shape = meta_node.meta["val"].shape if isinstance(meta_node, torch.fx.Node) else ()
        offset = len(y_batch) - len(operand)
        for k, dim in enumerate(operand):
            if offset + k >= 0 and int(shape[k]) == int(node.meta["val"].shape[offset + k]):
                ctx.unify(dim, y_batch[offset + k], f"batch axis of {where}")


def _matmul(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """matmul / mm / bmm, and addmm / baddbmm / addmv (``bias + a @ b``)."""
    name = _op_name(node)
    shift = 1 if name in ("aten::addmm", "aten::baddbmm", "aten::addmv", "aten::addbmm") else 0
    a, b = ctx.tensor(node.args[shift]), ctx.tensor(node.args[shift + 1])
    y: Dims = out  # type: ignore[assignment]
    assert a is not None and b is not None
    _contract(ctx, node, a, b, y)
    if shift:
        bias = ctx.tensor(node.args[0])
        if bias is not None:
            shape = node.args[0].meta["val"].shape
            offset = len(y) - len(bias)
            for k, dim in enumerate(bias):
                if int(shape[k]) == int(node.meta["val"].shape[offset + k]):
                    ctx.unify(dim, y[offset + k], f"bias of {_describe(node)}")


def _einsum(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """einsum without ellipsis: every subscript letter is one axis."""
    equation = str(node.args[0]).replace(" ", "")
    operands = [ctx.tensor(x) for x in node.args[1]]
    y: Dims = out  # type: ignore[assignment]
    if "..." in equation or any(o is None for o in operands):
        for operand in operands:
            ctx.freeze(operand, f"einsum with ellipsis in {_describe(node)}")
        ctx.freeze(out, f"einsum with ellipsis in {_describe(node)}")
        return
    inputs, _, output = equation.partition("->")
    letters: dict[str, list[int]] = {}
    for subscripts, dims in zip(inputs.split(","), operands):
        for letter, dim in zip(subscripts, dims):  # type: ignore[arg-type]
            if letter in letters:
                ctx.unify(letters[letter], dim, f"einsum axis '{letter}' in {_describe(node)}")
            elif dim:
                letters[letter] = dim
    for letter, dim in zip(output, y):
        if letter in letters:
            ctx.unify(letters[letter], dim, f"einsum axis '{letter}' in {_describe(node)}")


def _attention(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """scaled_dot_product_attention(q[..., L, E], k[..., S, E], v[..., S, Ev]) ->
    y[..., L, Ev]: q and k share their feature axis, k and v their key axis,
    v's feature axis flows to y; batch/head axes unify across all four."""
    q, k, v = (ctx.tensor(x) for x in node.args[:3])
    outs = out if isinstance(out, tuple) else (out,)
    y: Dims = outs[0]  # type: ignore[assignment]
    assert q is not None and k is not None and v is not None
    where = _describe(node)
    ctx.unify(q[-1], k[-1], f"query/key features of {where}")
    ctx.unify(k[-2], v[-2], f"keys of {where}")
    ctx.unify(q[-2], y[-2], f"queries of {where}")
    ctx.unify(v[-1], y[-1], f"value features of {where}")
    if bool(_arg(node, "is_causal", False)):  # the mask depends on query/key positions
        for dim in (q[-2], k[-2], y[-2]):
            ctx.atoms.freeze(dim, f"query/key positions under the causal mask of {where}")
    shapes = [x.meta["val"].shape for x in node.args[:3]]
    if bool(_arg(node, "enable_gqa", False)) and len({int(s[-3]) for s in shapes if len(s) >= 3}) > 1:
        for dims in (q, k, v, y):
            if len(dims) >= 3:
                ctx.atoms.freeze(dims[-3], f"grouped-query heads of {where}")
    for dims, shape in zip((q, k, v), shapes):
        for j in range(1, len(dims) - 1):
            if j <= len(y) - 2 and int(shape[-2 - j]) == int(node.meta["val"].shape[-2 - j]):
                ctx.unify(dims[-2 - j], y[-2 - j], f"batch/head axis of {where}")
    mask = ctx.tensor(_arg(node, "attn_mask"))
    if mask is not None:
        mask_shape = _arg(node, "attn_mask").meta["val"].shape
        scores = [*y[:-2], q[-2], k[-2]]
        score_shape = [*node.meta["val"].shape[:-2], shapes[0][-2], shapes[1][-2]]
        for j in range(1, len(mask) + 1):
            if j <= len(scores) and int(mask_shape[-j]) == int(score_shape[-j]):
                ctx.unify(mask[-j], scores[-j], f"attention mask of {where}")
    for extra in outs[1:]:
        ctx.freeze(extra, f"auxiliary output of {where}")


def _group_norm(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """group_norm(x[N, C, *], G, w[C], b[C]): channels factor as [G, C / G];
    whole groups permute, and one permutation acts inside every group."""
    x = ctx.tensor(node.args[0])
    outs = out if isinstance(out, tuple) else (out,)
    y: Dims = outs[0]  # type: ignore[assignment]
    assert x is not None
    where = _describe(node)
    channels = int(node.args[0].meta["val"].shape[1])
    groups = int(_arg(node, "num_groups", _arg(node, "group", 1)))
    for k, dim in enumerate(x):
        ctx.unify(dim, y[k], f"{where}")
    factors = [ctx.atoms.new(f) for f in (groups, channels // groups) if f > 1]
    ctx.unify(x[1], factors, f"groups of {where}")
    for name in ("weight", "bias"):
        param = ctx.tensor(_arg(node, name))
        if param is not None:
            ctx.unify(param[0], x[1], f"affine of {where}")
    for extra in outs[1:]:
        ctx.freeze(extra, f"saved statistics of {where}")


def _cat(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """cat: each input keeps its own permutation inside its slice of the
    concatenated axis (block structure); the other axes unify."""
    parts = [ctx.tensor(x) for x in node.args[0]]
    y: Dims = out  # type: ignore[assignment]
    ndim = len(y)
    axis = int(_arg(node, "dim", 0)) % ndim
    where = _describe(node)
    segments = []
    for x, dims in zip(node.args[0], parts):
        if dims is None or len(dims) != ndim:  # legacy empty tensors
            ctx.freeze(dims, f"empty operand of {where}")
            continue
        for k in range(ndim):
            if k != axis:
                ctx.unify(dims[k], y[k], f"{where}")
        segment = ctx.atoms.new(int(x.meta["val"].shape[axis]))
        ctx.unify([segment], dims[axis], f"{where}")
        segments.append(segment)
    ctx.unify([ctx.atoms.concat(segments)], y[axis], f"concatenated axis of {where}")


def _split(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """split / split_with_sizes / chunk / unbind: the reverse of cat."""
    x = ctx.tensor(node.args[0])
    assert x is not None
    pieces = [p for p in (out if isinstance(out, tuple) else (out,))]
    metas = node.meta["val"]
    ndim = len(x)
    axis = int(_arg(node, "dim", 0)) % ndim
    where = _describe(node)
    unbind = _op_name(node) == "aten::unbind"
    segments = []
    for piece, meta in zip(pieces, metas):
        for k in range(ndim):
            if k == axis:
                continue
            ctx.unify(x[k], piece[k - 1 if unbind and k > axis else k], f"{where}")  # type: ignore[index]
        segment = ctx.atoms.new(1 if unbind else int(meta.shape[axis]))
        if not unbind:
            ctx.unify([segment], piece[axis], f"{where}")  # type: ignore[index]
        segments.append(segment)
    ctx.unify([ctx.atoms.concat(segments)], x[axis], f"split axis of {where}")


def _slice(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """slice / narrow / select / pad: the sliced (padded) axes freeze unless
    the op keeps them whole; every other axis passes through."""
    x = ctx.tensor(node.args[0])
    y: Dims = out  # type: ignore[assignment]
    assert x is not None
    name = _op_name(node)
    where = _describe(node)
    in_shape = node.args[0].meta["val"].shape
    out_shape = node.meta["val"].shape
    ndim = len(x)
    if name in ("aten::pad", "aten::constant_pad_nd"):
        pads = list(node.args[1])
        touched = {ndim - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
        removed: int | None = None
    else:
        axis = int(_arg(node, "dim", 0)) % ndim
        touched = {axis} if int(in_shape[axis]) != int(out_shape[axis] if name != "aten::select" else -1) else set()
        removed = axis if name == "aten::select" else None
    for k in range(ndim):
        if k in touched:
            ctx.atoms.freeze(x[k], f"sliced or padded axis of {where}")
            if k != removed:
                ctx.atoms.freeze(y[k], f"sliced or padded axis of {where}")
        elif k != removed:
            ctx.unify(x[k], y[k if removed is None or k < removed else k - 1], f"{where}")


def _repeat(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """repeat (tile): an output dim repeated r times is ``Product(r, input dim)``
    in row-major order, exactly; new leading dims are fresh."""
    x = ctx.tensor(node.args[0])
    y: Dims = out  # type: ignore[assignment]
    assert x is not None
    repeats = [int(r) for r in node.args[1]]
    offset = len(y) - len(x)
    for k, dim in enumerate(x):
        r = repeats[offset + k]
        ctx.unify(y[offset + k], ([ctx.atoms.new(r)] if r > 1 else []) + dim, f"{_describe(node)}")
    for k in range(offset):
        ctx.atoms.freeze(y[k], f"new axis of {_describe(node)}")


def _stack(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """stack: the new axis indexes the inputs (never permuted); other axes unify."""
    y: Dims = out  # type: ignore[assignment]
    axis = int(_arg(node, "dim", 0)) % len(y)
    ctx.atoms.freeze(y[axis], f"stacked axis of {_describe(node)}")
    for x in node.args[0]:
        dims = ctx.tensor(x)
        if dims is None:
            continue
        for k, dim in enumerate(dims):
            ctx.unify(dim, y[k if k < axis else k + 1], f"{_describe(node)}")


def _factory(ctx: _Context, node: torch.fx.Node, out: Value) -> None:
    """arange / ones / new_zeros ...: constants made inside the graph."""
    ctx.freeze(out, f"constant made by {_describe(node)}")


_POINTWISE = """
abs add addcdiv addcmul alias bitwise_not ceil clamp clamp_max clamp_min clip clone contiguous
copy cos cosh detach div dropout elu eq erf erfc exp exp2 expm1 feature_dropout fill floor
floor_divide fmod ge gelu gt hardsigmoid hardswish hardtanh isfinite isinf isnan
le leaky_relu lerp lift_fresh_copy log log10 log1p log2 log_sigmoid logical_and logical_not
logical_or lt masked_fill maximum minimum mish mul ne neg pow reciprocal relu relu6
remainder round rrelu rsqrt rsub selu sigmoid sign silu sin sinh softplus sqrt square sub tan
tanh threshold to true_divide trunc type_as where xlogy _to_copy _log_softmax _softmax
log_softmax softmax alpha_dropout zeros_like ones_like empty_like full_like rand_like randn_like
__and__ __or__ __xor__ bitwise_and bitwise_or bitwise_xor
"""

_IGNORED = {
    "aten::_assert_tensor_metadata",
    "aten::_assert_scalar",
    "aten::_assert_async",
    "aten::sym_constrain_range_for_size",
    "aten::sym_size",
    "aten::sym_numel",
    "aten::sym_stride",
}

RULES: dict[str, Rule] = {f"aten::{name}": _pointwise for name in _POINTWISE.split()}
RULES.update(
    {
        "aten::view": _reshape,
        "aten::reshape": _reshape,
        "aten::_unsafe_view": _reshape,
        "aten::flatten": _reshape,
        "aten::unflatten": _reshape,
        "aten::squeeze": _reshape,
        "aten::unsqueeze": _reshape,
        "aten::view_as": _reshape,
        "aten::reshape_as": _reshape,
        "aten::permute": _permute_dims,
        "aten::transpose": _permute_dims,
        "aten::swapaxes": _permute_dims,
        "aten::t": _permute_dims,
        "aten::expand": _pointwise,  # broadcasting: equal-size dims unify, right-aligned
        "aten::expand_as": _pointwise,
        "aten::sum": _reduction,
        "aten::mean": _reduction,
        "aten::amax": _reduction,
        "aten::amin": _reduction,
        "aten::var": _reduction,
        "aten::std": _reduction,
        "aten::logsumexp": _reduction,
        "aten::max": _reduction,
        "aten::min": _reduction,
        "aten::linalg_vector_norm": _reduction,
        "aten::norm": _reduction,
        "aten::prod": _reduction,
        "aten::repeat": _repeat,
        "aten::stack": _stack,
        "aten::linear": _linear,
        "aten::conv1d": _conv,
        "aten::conv2d": _conv,
        "aten::conv3d": _conv,
        "aten::conv_transpose1d": _conv,
        "aten::conv_transpose2d": _conv,
        "aten::conv_transpose3d": _conv,
        "aten::convolution": _conv,
        "aten::batch_norm": _batch_norm,
        "aten::native_batch_norm": _batch_norm,
        "aten::_native_batch_norm_legit": _batch_norm,
        "aten::_native_batch_norm_legit_no_training": _batch_norm,
        "aten::_native_batch_norm_legit_functional": _batch_norm,
        "aten::instance_norm": _batch_norm,
        "aten::layer_norm": _layer_norm,
        "aten::native_layer_norm": _layer_norm,
        "aten::rms_norm": _layer_norm,
        "aten::embedding": _embedding,
        "aten::prelu": _prelu,
        "aten::_prelu_kernel": _prelu,
        "aten::matmul": _matmul,
        "aten::mm": _matmul,
        "aten::bmm": _matmul,
        "aten::addmm": _matmul,
        "aten::baddbmm": _matmul,
        "aten::addmv": _matmul,
        "aten::mv": _matmul,
        "aten::einsum": _einsum,
        "aten::scaled_dot_product_attention": _attention,
        "aten::group_norm": _group_norm,
        "aten::native_group_norm": _group_norm,
        "aten::cat": _cat,
        "aten::concat": _cat,
        "aten::split": _split,
        "aten::split_with_sizes": _split,
        "aten::chunk": _split,
        "aten::unbind": _split,
        "aten::tensor_split": _split,
        "aten::slice": _slice,
        "aten::narrow": _slice,
        "aten::select": _slice,
        "aten::pad": _slice,
        "aten::constant_pad_nd": _slice,
    }
)
for _name in (
    "arange ones zeros full empty new_ones new_zeros new_full new_empty scalar_tensor rand randn randint tensor".split()
):
    RULES[f"aten::{_name}"] = _factory
for _n in (1, 2, 3):
    for _op in (
        f"max_pool{_n}d",
        f"avg_pool{_n}d",
        f"adaptive_avg_pool{_n}d",
        f"adaptive_max_pool{_n}d",
        f"max_pool{_n}d_with_indices",
        f"lp_pool{_n}d",
        f"upsample_nearest{_n}d",
        f"_upsample_nearest_exact{_n}d",
    ):
        RULES[f"aten::{_op}"] = _pool(_n)
for _op in (
    "upsample_linear1d",
    "upsample_bilinear2d",
    "upsample_bicubic2d",
    "upsample_trilinear3d",
    "_upsample_bilinear2d_aa",
    "_upsample_bicubic2d_aa",
):
    RULES[f"aten::{_op}"] = _pool(int(next(c for c in _op if c.isdigit())))


def rule_for(node: torch.fx.Node) -> Rule | None:
    """The rule of a call_function node (in-place variants share the rule)."""
    if node.target is operator.getitem:
        return _getitem
    name = _op_name(node)
    rule = RULES.get(name)
    if rule is None and name.endswith("_") and not name.endswith("__"):
        rule = RULES.get(name[:-1])
    return rule


def analyze(captured: CapturedGraph, permutable_buffers: Collection[str] = ()) -> Analysis:
    """Propagate axis atoms through ``captured.graph`` (one pass, linear in its size).

    ``permutable_buffers`` names non-persistent buffers (or lifted constants)
    that may be permuted along with the axes they meet instead of freezing them.
    """
    atoms = AtomTable()
    values: dict[torch.fx.Node, Value] = {}
    ctx = _Context(atoms, values)
    result = Analysis(atoms)
    for node in captured.graph.nodes:
        if node.op == "placeholder":
            meta = node.meta.get("val")
            value = ctx.fresh(meta.shape) if isinstance(meta, torch.Tensor) else None
            values[node] = value
            role = captured.roles[node.name]
            if value is None:
                continue
            result.node_dims[node.name] = value
            if role.kind in ("parameter", "buffer"):
                result.tensor_dims[role.target] = value
            elif role.kind == "constant" and role.target in permutable_buffers:
                result.tensor_dims[role.target] = value
            elif role.kind == "constant":
                ctx.freeze(
                    value,
                    f"constant tensor '{role.target}' (not in the state_dict; pass "
                    f"permutable_buffers=['{role.target}'] if it should be permuted)",
                )
            else:
                ctx.freeze(value, f"model input '{node.name}'")
        elif node.op == "call_function":
            out = _fresh_from_meta(ctx, node.meta.get("val"))
            values[node] = out
            if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.name in _IGNORED:
                continue
            rule = rule_for(node)
            if rule is None:
                reason = f"unsupported op {_describe(node)}"
                for arg in node.all_input_nodes:
                    ctx.freeze(values.get(arg), reason)
                ctx.freeze(out, reason)
                continue
            rule(ctx, node, out)
            if _is_dims(out):
                result.node_dims[node.name] = out  # type: ignore[assignment]
                result.node_ops[node.name] = _op_name(node)
        elif node.op == "output":
            outputs = node.args[0]
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            for arg in outputs:
                if not isinstance(arg, torch.fx.Node):
                    continue
                if arg.name in captured.mutated_buffers:
                    target = captured.mutated_buffers[arg.name]
                    for a, b in zip(_flatten_value(values.get(arg)), [result.tensor_dims.get(target, [])]):
                        for da, db in zip(a, b):
                            ctx.unify(da, db, f"buffer mutation of '{target}'")
                else:
                    ctx.freeze(values.get(arg), f"model output '{arg.name}'")
        else:  # get_attr / call_module / call_method do not occur in exported graphs
            reason = f"unexpected {node.op} node '{node.name}'"
            for arg in node.all_input_nodes:
                ctx.freeze(values.get(arg), reason)
            values[node] = None
    _tie_aliases(ctx, captured, result)
    atoms.finalize()
    return result


def _tie_aliases(ctx: _Context, captured: CapturedGraph, result: Analysis) -> None:
    """Tied tensors (one storage under several names) share every axis; a
    parameter or buffer that forward never reads, and that is tied to none
    that it does, is frozen rather than left free."""
    used = {
        captured.roles[node.name].target
        for node in captured.graph.nodes
        if node.op == "placeholder" and node.users and node.name in captured.roles
    }
    tied: set[str] = set()
    for names in captured.aliases:
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
            ctx.freeze(dims, f"'{name}' is not used by forward")
