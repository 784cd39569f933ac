"""Rules of the tensor ops that move values without mixing units: elementwise
ops, views and transposes, reductions, concatenation, splits and slices."""

from __future__ import annotations

import operator

import torch
import torch.fx

from .registry import Dims, RuleContext, Value, describe, flatten_value, is_dims, op_name, register_rule


def _pointwise(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """Elementwise ops with broadcasting: dims of equal size unify, right-aligned."""
    if not is_dims(out):
        ctx.freeze(out, f"non-tensor output of {describe(node)}")
        return
    out_dims: Dims = out  # type: ignore[assignment]
    for arg in list(node.args) + list(node.kwargs.values()):
        dims = ctx.dims(arg)
        if dims is None:
            continue
        meta = arg.meta["val"]
        out_meta = node.meta["val"]
        if len(dims) > len(out_dims):
            ctx.freeze(dims, f"operand of {describe(node)} has more dims than its output")
            continue
        offset = len(out_dims) - len(dims)
        for k, dim in enumerate(dims):
            if int(meta.shape[k]) == int(out_meta.shape[offset + k]):
                ctx.unify(dim, out_dims[offset + k], f"broadcast in {describe(node)}")


def _reshape(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """view/reshape/flatten/(un)squeeze: the row-major flat index is preserved."""
    src = ctx.dims(node.args[0])
    if src is None or not is_dims(out):
        return
    flat_in = [a for dim in src for a in dim]
    flat_out = [a for dim in out for a in dim]  # type: ignore[union-attr]
    ctx.unify(flat_in, flat_out, f"reshape without a common factorisation in {describe(node)}")


def _permute_dims(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    src = ctx.dims(node.args[0])
    if src is None or not is_dims(out):
        return
    ndim = len(src)
    name = op_name(node)
    if name == "aten::permute":
        order = [d % ndim for d in node.args[1]]
    else:
        order = list(range(ndim))
        if name != "aten::t" or ndim == 2:
            d0, d1 = (0, 1) if name == "aten::t" else (node.args[1] % ndim, node.args[2] % ndim)
            order[d0], order[d1] = order[d1], order[d0]
    for k, d in enumerate(order):
        ctx.unify(src[d], out[k], f"transpose in {describe(node)}")  # type: ignore[index]


def _reduction(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """sum/mean/amax/var...: reducing over a permuted axis is invariant."""
    src = ctx.dims(node.args[0])
    if src is None:
        return
    if any(isinstance(arg, torch.fx.Node) for arg in node.args[1:]):  # max.other, min.other
        _pointwise(ctx, node, out)
        return
    dims_arg = ctx.arg(node, "dim")
    keepdim = bool(ctx.arg(node, "keepdim", False))
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
        if not is_dims(value):
            continue
        if keepdim:
            pairs = [(d, d) for d in kept]
        else:
            pairs = list(zip(kept, range(len(kept))))
        for s, o in pairs:
            ctx.unify(src[s], value[o], f"reduction in {describe(node)}")  # type: ignore[index]
    if len(outs) > 1:  # (values, indices): indices along a permuted axis change
        for d in reduced:
            ctx.freeze_dim(src[d], f"arg-reduction (indices) in {describe(node)}")


def _getitem(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    source = ctx.value(node.args[0])
    if isinstance(source, tuple):
        item = source[node.args[1]]
        for a, b in zip(flatten_value(item), flatten_value(out)):
            for da, db in zip(a, b):
                ctx.unify(da, db, f"{describe(node)}")
    else:
        ctx.freeze(out, f"indexing of a non-tuple in {describe(node)}")


def _cat(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """cat: each input keeps its own permutation inside its slice of the
    concatenated axis (block structure); the other axes unify."""
    parts = [ctx.dims(x) for x in node.args[0]]
    y: Dims = out  # type: ignore[assignment]
    ndim = len(y)
    axis = int(ctx.arg(node, "dim", 0)) % ndim
    where = describe(node)
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


def _split(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """split / split_with_sizes / chunk / unbind: the reverse of cat."""
    x = ctx.dims(node.args[0])
    assert x is not None
    pieces = [p for p in (out if isinstance(out, tuple) else (out,))]
    metas = node.meta["val"]
    ndim = len(x)
    axis = int(ctx.arg(node, "dim", 0)) % ndim
    where = describe(node)
    unbind = op_name(node) == "aten::unbind"
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


def _slice(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """slice / narrow / select / pad: the sliced (padded) axes freeze unless
    the op keeps them whole; every other axis passes through."""
    x = ctx.dims(node.args[0])
    y: Dims = out  # type: ignore[assignment]
    assert x is not None
    name = op_name(node)
    where = describe(node)
    in_shape = node.args[0].meta["val"].shape
    out_shape = node.meta["val"].shape
    ndim = len(x)
    if name in ("aten::pad", "aten::constant_pad_nd"):
        pads = list(node.args[1])
        touched = {ndim - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
        removed: int | None = None
    else:
        axis = int(ctx.arg(node, "dim", 0)) % ndim
        touched = {axis} if int(in_shape[axis]) != int(out_shape[axis] if name != "aten::select" else -1) else set()
        removed = axis if name == "aten::select" else None
    for k in range(ndim):
        if k in touched:
            ctx.freeze_dim(x[k], f"sliced or padded axis of {where}")
            if k != removed:
                ctx.freeze_dim(y[k], f"sliced or padded axis of {where}")
        elif k != removed:
            ctx.unify(x[k], y[k if removed is None or k < removed else k - 1], f"{where}")


def _repeat(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """repeat (tile): an output dim repeated r times is ``Product(r, input dim)``
    in row-major order, exactly; new leading dims are fresh."""
    x = ctx.dims(node.args[0])
    y: Dims = out  # type: ignore[assignment]
    assert x is not None
    repeats = [int(r) for r in node.args[1]]
    offset = len(y) - len(x)
    for k, dim in enumerate(x):
        r = repeats[offset + k]
        ctx.unify(y[offset + k], ([ctx.atoms.new(r)] if r > 1 else []) + dim, f"{describe(node)}")
    for k in range(offset):
        ctx.freeze_dim(y[k], f"new axis of {describe(node)}", structural=True)


def _stack(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """stack: the new axis indexes the inputs (never permuted); other axes unify."""
    y: Dims = out  # type: ignore[assignment]
    axis = int(ctx.arg(node, "dim", 0)) % len(y)
    ctx.freeze_dim(y[axis], f"stacked axis of {describe(node)}", structural=True)
    for x in node.args[0]:
        dims = ctx.dims(x)
        if dims is None:
            continue
        for k, dim in enumerate(dims):
            ctx.unify(dim, y[k if k < axis else k + 1], f"{describe(node)}")


def _factory(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """arange / ones / new_zeros ...: constants made inside the graph."""
    ctx.freeze(out, f"constant made by {describe(node)}")


_NONLINEAR = (
    "relu relu6 gelu silu sigmoid tanh hardtanh leaky_relu elu selu mish hardswish softplus celu "
    "softsign tanhshrink hardshrink softshrink"
)
_VIEW_LIKE = "clone contiguous alias detach dropout feature_dropout alpha_dropout lift_fresh_copy"
_POINTWISE = """
abs add addcdiv addcmul bitwise_not ceil clamp clamp_max clamp_min clip copy cos cosh div eq erf erfc
exp exp2 expm1 fill floor floor_divide fmod ge gt isfinite isinf isnan le lerp log log10 log1p log2
logical_and logical_not logical_or lt masked_fill maximum minimum mul ne neg pow reciprocal remainder
round rsqrt rsub sign sin sinh sqrt square sub tan to true_divide trunc type_as where xlogy _to_copy
_log_softmax _softmax log_softmax softmax hardsigmoid log_sigmoid rrelu threshold
zeros_like ones_like empty_like full_like rand_like randn_like
__and__ __or__ __xor__ bitwise_and bitwise_or bitwise_xor
"""
_METADATA = (
    "_assert_tensor_metadata _assert_scalar _assert_async sym_constrain_range_for_size sym_size sym_numel sym_stride"
)
_FACTORIES = "arange ones zeros full empty new_ones new_zeros new_full new_empty scalar_tensor rand randn randint "
_FACTORIES += "tensor"


def _no_constraint(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """Shape reads and runtime asserts: no constraint."""


def _register() -> None:
    for name in _NONLINEAR.split():
        register_rule(f"aten::{name}", _pointwise, role="nonlinearity")
    for name in _VIEW_LIKE.split():
        register_rule(f"aten::{name}", _pointwise, role="view")
    for name in _POINTWISE.split():
        register_rule(f"aten::{name}", _pointwise)
    for name in _METADATA.split():
        register_rule(f"aten::{name}", _no_constraint, role="metadata")
    for name in _FACTORIES.split():
        register_rule(f"aten::{name}", _factory)
    for name in "view reshape _unsafe_view flatten unflatten squeeze unsqueeze view_as reshape_as".split():
        register_rule(f"aten::{name}", _reshape, role="view")
    for name in "permute transpose swapaxes t".split():
        register_rule(f"aten::{name}", _permute_dims, role="view")
    for name in "expand expand_as".split():  # broadcasting: equal-size dims unify, right-aligned
        register_rule(f"aten::{name}", _pointwise, role="view")
    for name in "sum mean amax amin var std logsumexp max min linalg_vector_norm norm prod".split():
        register_rule(f"aten::{name}", _reduction)
    register_rule("aten::repeat", _repeat)
    register_rule("aten::stack", _stack)
    for name in "cat concat".split():
        register_rule(f"aten::{name}", _cat)
    for name in "split split_with_sizes chunk unbind tensor_split".split():
        register_rule(f"aten::{name}", _split)
    for name in "slice narrow select pad constant_pad_nd".split():
        register_rule(f"aten::{name}", _slice)
    register_rule(operator.getitem, _getitem)


_register()
