"""Rules of the tensor ops that move values without mixing units: elementwise
ops, views and transposes, reductions, concatenation, splits and slices,
indexing, position-dependent ops, factories and channel/pixel shuffles."""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.node import Argument

from .registry import (
    Dims,
    Rule,
    RuleContext,
    Value,
    arg_int,
    arg_ints,
    arg_list,
    as_node,
    describe,
    flatten_value,
    is_dims,
    op_name,
    output_dims,
    output_list,
    register_rule,
)


# ------------------------------------------------------------------ helpers
def _base(node: torch.fx.Node) -> str:
    """The op's name without namespace and ``_copy`` suffix (``aten::select_copy`` -> ``select``)."""
    name = op_name(node).split("::")[-1]
    return name[: -len("_copy")] if name.endswith("_copy") and name not in ("lift_fresh_copy", "_to_copy") else name


def _param(node: torch.fx.Node, name: str) -> Any:
    """The argument ``name`` of the op's schema, falling back to the schema's default."""
    if name in node.kwargs:
        return node.kwargs[name]
    if isinstance(node.target, torch._ops.OpOverload):
        for index, argument in enumerate(node.target._schema.arguments):
            if argument.name == name:
                if index < len(node.args):
                    return node.args[index]
                return argument.default_value if argument.has_default_value() else None
    return None


def _axes(dims: Any, ndim: int) -> list[int]:
    """Non-negative axes of an ``int`` / ``int[]`` argument."""
    if dims is None:
        return []
    return [int(d) % max(ndim, 1) for d in ([dims] if isinstance(dims, int) else dims)]


def _size(node: Any, k: int) -> int:
    return int(node.meta["val"].shape[k])


def _broadcast(ctx: RuleContext, node: torch.fx.Node, arg: Argument, out: Dims) -> None:
    """Unify one operand with the output of a broadcasting op: dims of equal size, right-aligned."""
    dims = ctx.dims(arg)
    if dims is None:
        return
    if len(dims) > len(out):
        ctx.freeze(dims, f"operand of {describe(node)} has more dims than its output")
        return
    offset = len(out) - len(dims)
    out_shape = node.meta["val"].shape
    for k, dim in enumerate(dims):
        if _size(arg, k) == int(out_shape[offset + k]):
            ctx.unify(dim, out[offset + k], f"broadcast in {describe(node)}")


def _positional(ctx: RuleContext, node: torch.fx.Node, out: Value, axes: Collection[int], what: str) -> None:
    """The axes ``axes`` of ``x`` (and of every output, of x's rank) freeze;
    every other axis passes from ``x`` to each output at its place."""
    x = ctx.arg_dims(node, 0)
    reason = f"{describe(node)} along this axis: {what} does not commute with permuting it"
    for k in axes:
        ctx.freeze_dim(x[k], reason)
    for value in flatten_value(out):
        for k, dim in enumerate(value):
            if k in axes:
                ctx.freeze_dim(dim, reason)
            else:
                ctx.unify(x[k], dim, describe(node))


# ------------------------------------------------------------- elementwise
def _pointwise(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """Elementwise ops with broadcasting commute with any permutation applied
    to all operands and the output alike: dims of equal size unify, right-aligned."""
    if not is_dims(out):
        ctx.freeze(out, f"non-tensor output of {describe(node)}")
        return
    for arg in list(node.args) + list(node.kwargs.values()):
        _broadcast(ctx, node, arg, out)


def _first_operand(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """type_as / to / _to_copy / expand_as: the values come from ``x`` alone
    (broadcast to the output), so only ``x`` unifies with the output; a second
    tensor only donates its dtype, device or shape, never its values."""
    _broadcast(ctx, node, node.args[0], output_dims(node, out))


# ------------------------------------------------------------------- views
def _reshape(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """view/reshape/flatten/(un)squeeze: the row-major flat index is preserved,
    so the flat atom products of input and output unify exactly."""
    src = ctx.dims(node.args[0])
    if src is None or not is_dims(out):
        return
    flat_in = [a for dim in src for a in dim]
    flat_out = [a for dim in out for a in dim]
    ctx.unify(flat_in, flat_out, f"reshape without a common factorisation in {describe(node)}")


def _transpose_order(node: torch.fx.Node, ndim: int) -> list[int]:
    """``order[k]``: the input dim that output dim ``k`` is."""
    name = _base(node)
    order = list(range(ndim))
    if name == "permute":
        return _axes(node.args[1], ndim)
    if name == "numpy_T":
        return order[::-1]
    if name in ("movedim", "moveaxis"):
        source, destination = _axes(node.args[1], ndim), _axes(node.args[2], ndim)
        moved = dict(zip(destination, source))
        rest = iter(d for d in order if d not in source)
        return [moved[k] if k in moved else next(rest) for k in order]
    if ndim < 2:
        return order
    if name in ("t", "mT", "mH", "adjoint", "matrix_H"):
        d0, d1 = (0, 1) if name == "t" else (ndim - 2, ndim - 1)
    else:  # transpose / swapaxes / swapdims
        d0, d1 = _axes(node.args[1], ndim)[0], _axes(node.args[2], ndim)[0]
    order[d0], order[d1] = order[d1], order[d0]
    return order


def _permute_dims(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """permute / transpose / t / .T / .H / .mT / .mH / adjoint / movedim: a
    relabelling of dims, so each output dim is its source dim."""
    src = ctx.dims(node.args[0])
    if src is None or not is_dims(out):
        return
    for k, d in enumerate(_transpose_order(node, len(src))):
        ctx.unify(src[d], out[k], f"transpose in {describe(node)}")


# -------------------------------------------------------------- reductions
def _reduction(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """sum/mean/amax/var/median...: reducing over a permuted axis is invariant,
    kept axes pass through; indices (argmax, max.dim's second output) are
    positions along the reduced axes, which therefore freeze."""
    src = ctx.dims(node.args[0])
    if src is None:
        return
    if any(isinstance(arg, torch.fx.Node) for arg in node.args[1:]):  # max.other, min.other
        _pointwise(ctx, node, out)
        return
    ndim = len(src)
    reduced = set(_axes(_param(node, "dim"), ndim)) or set(range(ndim))
    keepdim = bool(_param(node, "keepdim"))
    kept = [d for d in range(ndim) if d not in reduced]
    outs = out if isinstance(out, tuple) else (out,)
    for value in outs:
        if not is_dims(value):
            continue
        pairs = [(d, d) for d in kept] if keepdim else list(zip(kept, range(len(kept))))
        for s, o in pairs:
            ctx.unify(src[s], value[o], f"reduction in {describe(node)}")
    if len(outs) > 1 or _base(node) in ("argmax", "argmin"):
        for d in reduced:
            ctx.freeze_dim(src[d], f"positions (indices) along the reduced axis of {describe(node)}")


def _along_dim(what: str, dim: str = "dim") -> Rule:
    def rule(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
        """cumsum / cummax / sort / topk / flip / roll: the op moves or mixes
        values along its axes by position, so they freeze; the others pass."""
        x = ctx.arg_dims(node, 0)
        axes = _axes(_param(node, dim), len(x))
        if _base(node) == "msort":
            axes = [0]
        if _base(node) == "roll" and not axes:  # roll of the flattened tensor
            axes = list(range(len(x)))
        _positional(ctx, node, out, axes, what)

    return rule


def _triangle(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """tril / triu: the mask depends on the positions of the last two axes
    (a causal mask), so they freeze; leading axes pass."""
    x = ctx.arg_dims(node, 0)
    _positional(ctx, node, out, range(max(len(x) - 2, 0), len(x)), "a triangular mask")


def _diagonal(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """diagonal(x, 0, d1, d2): ``P x P^T`` has diagonal ``P diag(x)``, so with
    offset 0 d1, d2 and the new last axis unify; any other offset freezes them."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    ndim = len(x)
    d1, d2 = _axes(_param(node, "dim1"), ndim)[0], _axes(_param(node, "dim2"), ndim)[0]
    where = describe(node)
    for k, dim in zip([k for k in range(ndim) if k not in (d1, d2)], y[:-1]):
        ctx.unify(x[k], dim, where)
    if int(_param(node, "offset")) == 0 and _size(node.args[0], d1) == _size(node.args[0], d2):
        ctx.unify(x[d1], x[d2], f"the two axes of {where}")
        ctx.unify(x[d1], y[-1], f"diagonal of {where}")
    else:
        ctx.freeze(x[d1 : d1 + 1] + x[d2 : d2 + 1] + y[-1:], f"off-diagonal band of {where}")


# ----------------------------------------------------------- cat and split
def _getitem(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """getitem of a multi-output op: the item is the op's output, unchanged."""
    source = ctx.value(node.args[0])
    if isinstance(source, tuple):
        item = source[arg_int(node, 1, "index")]
        for a, b in zip(flatten_value(item), flatten_value(out)):
            for da, db in zip(a, b):
                ctx.unify(da, db, f"{describe(node)}")
    else:
        ctx.freeze(out, f"indexing of a non-tuple in {describe(node)}")


def _cat(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """cat: each input keeps its own permutation inside its slice of the
    concatenated axis (block structure); the other axes unify."""
    tensors = arg_list(node, 0)
    parts = [ctx.dims(x) for x in tensors]
    y = output_dims(node, out)
    ndim = len(y)
    axis = int(ctx.arg(node, "dim", 0)) % ndim
    where = describe(node)
    segments = []
    for x, dims in zip(tensors, parts):
        if dims is None or len(dims) != ndim:  # legacy empty tensors
            ctx.freeze(dims, f"empty operand of {where}")
            continue
        for k in range(ndim):
            if k != axis:
                ctx.unify(dims[k], y[k], f"{where}")
        segment = ctx.atoms.new(_size(x, axis))
        ctx.unify([segment], dims[axis], f"{where}")
        segments.append(segment)
    ctx.unify([ctx.atoms.concat(segments)], y[axis], f"concatenated axis of {where}")


def _split(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """split / split_with_sizes / chunk / unbind: the reverse of cat."""
    x = ctx.arg_dims(node, 0)
    pieces = output_list(node, out)
    metas = node.meta["val"]
    ndim = len(x)
    axis = int(ctx.arg(node, "dim", 0)) % ndim
    where = describe(node)
    unbind = _base(node) == "unbind"
    segments = []
    for piece, meta in zip(pieces, metas):
        for k in range(ndim):
            if k == axis:
                continue
            ctx.unify(x[k], piece[k - 1 if unbind and k > axis else k], f"{where}")
        segment = ctx.atoms.new(1 if unbind else int(meta.shape[axis]))
        if not unbind:
            ctx.unify([segment], piece[axis], f"{where}")
        segments.append(segment)
    ctx.unify([ctx.atoms.concat(segments)], x[axis], f"split axis of {where}")


def _slice(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """slice / narrow / select / pad: the sliced (padded) axes freeze unless
    the op keeps them whole; every other axis passes through."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    name = _base(node)
    where = describe(node)
    in_shape = ctx.shape(node.args[0])
    out_shape = node.meta["val"].shape
    ndim = len(x)
    if name in ("pad", "constant_pad_nd"):
        pads = arg_list(node, 1)
        touched = {ndim - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
        removed: int | None = None
    else:
        axis = int(ctx.arg(node, "dim", 0)) % ndim
        touched = {axis} if int(in_shape[axis]) != int(out_shape[axis] if name != "select" else -1) else set()
        removed = axis if name == "select" else None
    split: int | None = None
    if name == "slice" and touched:
        pieces = _partition(node, axis, int(in_shape[axis]))
        interval = _interval(node, int(in_shape[axis]))  # one of the pieces when they tile the axis
        if pieces is not None and interval is not None:  # the slices of the source tile the axis: x[..., a:b]
            segments = [ctx.atoms.new(end - start) for start, end in pieces]
            mine = segments[pieces.index(interval)]
            ctx.unify([ctx.atoms.concat(segments)], x[axis], f"sliced axis of {where}")
            ctx.unify([mine], y[axis], f"sliced axis of {where}")
            split, touched = axis, set()
    for k in range(ndim):
        if k == split:
            continue
        if k in touched:
            if k == removed and _enumerated(node, k, int(in_shape[k])):
                # every index of the axis is selected: an unbind written as x[0], x[1], ...
                # (nn.MultiheadAttention's packed q/k/v): the index of stacked tensors
                ctx.freeze_dim(x[k], f"axis taken apart index by index in {where}", structural=True)
                continue
            ctx.freeze_dim(x[k], f"sliced or padded axis of {where}")
            if k != removed:
                ctx.freeze_dim(y[k], f"sliced or padded axis of {where}")
        elif k != removed:
            ctx.unify(x[k], y[k if removed is None or k < removed else k - 1], f"{where}")


def _interval(node: torch.fx.Node, size: int) -> tuple[int, int] | None:
    """``(start, end)`` of a unit-step ``aten::slice`` along its axis, clamped like Python slicing."""
    start, end, step = (RuleContext.arg(node, n, d) for n, d in (("start", None), ("end", None), ("step", 1)))
    if step != 1 or not all(v is None or isinstance(v, int) for v in (start, end)):
        return None
    lo, hi, _ = slice(start, end).indices(size)
    return (lo, hi) if hi > lo else None


def _partition(node: torch.fx.Node, axis: int, size: int) -> list[tuple[int, int]] | None:
    """The intervals of the unit-step slices of ``node``'s source along
    ``axis``, in order, when they tile ``[0, size)`` exactly (Phi-3's
    ``qkv[..., :q]``, ``qkv[..., q:q + k]``, ...); otherwise None."""
    source = node.args[0]
    if not isinstance(source, torch.fx.Node):
        return None
    ndim = len(source.meta["val"].shape)
    intervals: set[tuple[int, int]] = set()
    for user in source.users:
        if user.op != "call_function" or _base(user) != "slice" or user.args[0] is not source:
            continue
        dim = RuleContext.arg(user, "dim", 0)
        if isinstance(dim, int) and dim % ndim == axis:
            interval = _interval(user, size)
            if interval is None:
                return None
            intervals.add(interval)
    ordered = sorted(intervals)
    edges = [0] + [end for _, end in ordered]
    if [start for start, _ in ordered] != edges[:-1] or edges[-1] != size or len(ordered) < 2:
        return None
    return ordered


def _enumerated(node: torch.fx.Node, axis: int, size: int) -> bool:
    """Whether the selects of ``node``'s source along ``axis`` cover every index."""
    source = node.args[0]
    if not isinstance(source, torch.fx.Node):
        return False
    ndim = len(source.meta["val"].shape)
    seen: set[int] = set()
    for user in source.users:
        if user.op != "call_function" or _base(user) != "select" or user.args[0] is not source:
            continue
        dim, index = RuleContext.arg(user, "dim", 0), RuleContext.arg(user, "index", 0)
        if isinstance(dim, int) and isinstance(index, int) and dim % ndim == axis:
            seen.add(index % size)
    return len(seen) == size


def _slice_scatter(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """slice_scatter / select_scatter(x, src, dim, ...) (functionalized
    ``x[..., a:b] = src``): x and the output unify; the written axis freezes
    unless the slice keeps it whole; src's other axes unify with x's."""
    x, src = ctx.arg_dims(node, 0), ctx.arg_dims(node, 1)
    y = output_dims(node, out)
    where = describe(node)
    ctx.unify_dims(x, y, where)
    axis = _axes(_param(node, "dim"), len(x))[0]
    select = _base(node) == "select_scatter"
    for k, dim in enumerate(x):
        if k != axis:
            ctx.unify(dim, src[k - 1 if select and k > axis else k], where)
        elif select or _size(node.args[1], k) != _size(node.args[0], k):
            ctx.freeze_dim(dim, f"written slice of {where}")
        else:
            ctx.unify(dim, src[k], where)


def _stack(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """stack: the new axis indexes the inputs (never permuted); other axes unify."""
    y = output_dims(node, out)
    axis = int(ctx.arg(node, "dim", 0)) % len(y)
    ctx.freeze_dim(y[axis], f"stacked axis of {describe(node)}", structural=True)
    for x in arg_list(node, 0):
        dims = ctx.dims(x)
        if dims is None:
            continue
        for k, dim in enumerate(dims):
            ctx.unify(dim, y[k if k < axis else k + 1], f"{describe(node)}")


# ----------------------------------------------------------------- repeats
def _repeat(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """repeat (tile): an output dim repeated r times is ``Product(r, input dim)``
    in row-major order, exactly; new leading dims are fresh."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    repeats = arg_ints(node, 1)
    offset = len(y) - len(x)
    for k, dim in enumerate(x):
        r = repeats[offset + k]
        ctx.unify(y[offset + k], ([ctx.atoms.new(r)] if r > 1 else []) + dim, f"{describe(node)}")
    for k in range(offset):
        ctx.freeze_dim(y[k], f"new axis of {describe(node)}", structural=True)


def _repeat_interleave(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """repeat_interleave(x, r: int, dim): each element repeated r times in a
    row, so the output dim is ``Product(input dim, r)`` row-major (the copies,
    all equal, are a free factor); without dim, of the flattened input. Tensor
    repeats (one count per element, or the bare index form) freeze."""
    x = ctx.dims(node.args[0])
    where = describe(node)
    repeats = node.args[1] if len(node.args) > 1 else None
    if x is None or not isinstance(repeats, int):
        ctx.freeze(x, f"tensor repeats of {where}")
        ctx.freeze(ctx.dims(repeats), f"tensor repeats of {where}")
        ctx.freeze(out, f"tensor repeats of {where}")
        return
    y = output_dims(node, out)
    dim = _param(node, "dim")
    if dim is None:
        ctx.unify(y[0], [a for d in x for a in d] + ctx.new(repeats), f"{where}")
        return
    axis = int(dim) % len(x)
    for k, d in enumerate(x):
        ctx.unify(y[k], d + ctx.new(repeats) if k == axis else d, f"{where}")


# ---------------------------------------------------------------- indexing
def _indexed(ctx: RuleContext, node: torch.fx.Node, source: Argument, dims: Sequence[list[int]], what: str) -> None:
    """Freeze axes whose positions are read or written by index values: an
    axis of a placeholder (a parameter or buffer used as a lookup table, like
    an embedding's vocabulary or stacked experts) is structural."""
    structural = isinstance(source, torch.fx.Node) and source.op == "placeholder"
    for dim in dims:
        ctx.freeze_dim(dim, f"{what} of {describe(node)}", structural=structural)


def _index_layout(ndim: int, positions: list[int], nb: int) -> list[tuple[bool, int]]:
    """The dims of ``x[indices]`` (advanced indexing): ``(False, k)`` for x's
    kept dim k, ``(True, j)`` for dim j of the broadcast index shape, which
    replaces adjacent indexed dims in place and goes first otherwise."""
    bdims = [(True, j) for j in range(nb)]
    if positions != list(range(positions[0], positions[-1] + 1)):
        return bdims + [(False, k) for k in range(ndim) if k not in positions]
    before = [(False, k) for k in range(positions[0])]
    return before + bdims + [(False, k) for k in range(positions[-1] + 1, ndim)]


def _index_tensors(
    ctx: RuleContext, node: torch.fx.Node, tensors: list[torch.fx.Node], bdims: list[list[int]], bshape: Sequence[int]
) -> None:
    """Unify each index tensor's dims with the broadcast index dims (right-aligned, equal sizes)."""
    for t in tensors:
        dims = ctx.dims(t)
        if dims is None:
            continue
        offset = len(bshape) - len(dims)
        for j, dim in enumerate(dims):
            if _size(t, j) == int(bshape[offset + j]):
                ctx.unify(dim, bdims[offset + j], f"index tensor of {describe(node)}")


def _is_mask(index: Argument) -> bool:
    return isinstance(index, torch.fx.Node) and index.meta["val"].dtype in (torch.bool, torch.uint8)


def _index(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """x[i0, :, i2] (aten.index): ``out[b] = x[i(b)]``, so permuting the
    broadcast index dims b in the index tensors and the output alike keeps it;
    indexed axes of x freeze and the others pass to their place in the output.
    Boolean masks (data-dependent shapes) freeze everything."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    indices = arg_list(node, 1)
    positions = [k for k, t in enumerate(indices) if t is not None]
    tensors = [as_node(node, indices[k], "indices") for k in positions]
    if any(_is_mask(t) for t in tensors):
        for value in [x, y] + [ctx.dims(t) for t in tensors]:
            ctx.freeze(value, f"boolean-mask indexing in {describe(node)}")
        return
    if not positions:
        ctx.unify_dims(x, y, describe(node))
        return
    bshape = torch.broadcast_shapes(*(t.meta["val"].shape for t in tensors))
    layout = _index_layout(len(x), positions, len(bshape))
    bdims: list[list[int]] = [[] for _ in bshape]
    for (is_b, k), dim in zip(layout, y):
        if is_b:
            bdims[k] = dim
        else:
            ctx.unify(x[k], dim, describe(node))
    _index_tensors(ctx, node, tensors, bdims, bshape)
    _indexed(ctx, node, node.args[0], [x[k] for k in positions], "indexed axis")


def _index_put(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """x[indices] = v (index_put): the output is x with the indexed entries
    written; indexed axes freeze, the others unify with v's matching dims. The
    broadcast index dims pair index tensors with v; they unify when the writes
    accumulate (sums commute) and freeze otherwise (which duplicate write wins
    depends on order). A boolean mask with a single value is masked_fill."""
    x, values = ctx.arg_dims(node, 0), ctx.dims(node.args[2])
    y = output_dims(node, out)
    where = describe(node)
    ctx.unify_dims(x, y, where)
    indices = arg_list(node, 1)
    positions = [k for k, t in enumerate(indices) if t is not None]
    tensors = [as_node(node, indices[k], "indices") for k in positions]
    if any(_is_mask(t) for t in tensors):
        single = isinstance(node.args[2], torch.fx.Node) and node.args[2].meta["val"].numel() == 1
        mask = ctx.dims(tensors[0])
        if len(tensors) == 1 and single and mask is not None:
            start = positions[0]
            for j, dim in enumerate(mask):
                if _size(tensors[0], j) == _size(node.args[0], start + j):
                    ctx.unify(dim, x[start + j], f"mask of {where}")
        else:
            for value in [x, values] + [ctx.dims(t) for t in tensors]:
                ctx.freeze(value, f"boolean-mask assignment in {where}")
        return
    bshape = torch.broadcast_shapes(*(t.meta["val"].shape for t in tensors))
    layout = _index_layout(len(x), positions, len(bshape))
    bdims = [ctx.new(s) for s in bshape]
    _index_tensors(ctx, node, tensors, bdims, bshape)
    if values is not None:
        offset = len(layout) - len(values)
        for j, dim in enumerate(values):
            if offset + j < 0:  # a leading size-1 dim of the broadcast values
                continue
            is_b, k = layout[offset + j]
            if _size(node.args[2], j) == (int(bshape[k]) if is_b else _size(node.args[0], k)):
                ctx.unify(dim, bdims[k] if is_b else x[k], f"values of {where}")
    if not bool(_param(node, "accumulate")):
        ctx.freeze_dim([a for dim in bdims for a in dim], f"overwriting index pairs of {where}")
    _indexed(ctx, node, node.args[0], [x[k] for k in positions], "indexed axis")


def _index_select(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """index_select(x, dim, idx): ``out[.., j, ..] = x[.., idx[j], ..]``: the
    selected axis of x freezes, idx's axis becomes the output's; others pass."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    axis = _axes(_param(node, "dim"), len(x))[0]
    index = ctx.dims(_param(node, "index"))
    for k, dim in enumerate(x):
        if k != axis:
            ctx.unify(dim, y[k], describe(node))
    if index:
        ctx.unify(index[0], y[axis], f"index of {describe(node)}")
    _indexed(ctx, node, node.args[0], [x[axis]], "selected axis")


def _gather(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """gather(x, dim, idx) / take_along_dim(x, idx, dim): the output has idx's
    layout and ``out[.., j, ..] = x[.., idx[.., j, ..], ..]``: x's axis ``dim``
    freezes, idx and the output unify on every axis, and x unifies with them
    on the other axes (broadcast for take_along_dim; a smaller idx slices x,
    which freezes that axis)."""
    index_name = "index" if _base(node) == "gather" else "indices"
    index_node = _param(node, index_name)
    x, index = ctx.arg_dims(node, 0), ctx.tensor_dims(node, index_node, index_name)
    y = output_dims(node, out)
    where = describe(node)
    dim = _param(node, "dim")
    if dim is None:  # take_along_dim of the flattened tensor
        ctx.freeze(x, f"flattened {where}")
        ctx.freeze(index, f"flattened {where}")
        ctx.freeze(y, f"flattened {where}")
        return
    axis = _axes(dim, len(x))[0]
    for k in range(len(y)):
        if _size(index_node, k) == _size(node, k):
            ctx.unify(index[k], y[k], f"index of {where}")
        if k == axis:
            continue
        if _size(node.args[0], k) == _size(node, k):
            ctx.unify(x[k], y[k], where)
        elif _size(node.args[0], k) != 1:
            ctx.freeze_dim(x[k], f"axis sliced by the index of {where}")
            ctx.freeze_dim(y[k], f"axis sliced by the index of {where}")
    _indexed(ctx, node, node.args[0], [x[axis]], "gathered axis")


def _scatter(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """scatter / scatter_add / scatter_reduce(x, dim, idx, src):
    ``out[.., idx[.., j, ..], ..] = src[.., j, ..]``: x and the output unify,
    x's axis ``dim`` freezes (written at index values); on the other axes x,
    idx and src unify (equal sizes) or freeze (a smaller idx slices them);
    along ``dim`` idx and src pair up: they unify when the writes accumulate
    (sums and other reductions commute) and freeze otherwise (which duplicate
    write wins depends on order)."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    where = describe(node)
    ctx.unify_dims(x, y, where)
    axis = _axes(_param(node, "dim"), len(x))[0]
    index_node, src_node = _param(node, "index"), _param(node, "src")
    index, src = ctx.tensor_dims(node, index_node, "index"), ctx.dims(src_node)
    operands = [(index_node, index)] + ([(src_node, src)] if src is not None else [])
    for k in range(len(x)):
        sizes = {_size(n, k) for n, _ in operands} | ({_size(node, k)} if k != axis else set())
        if len(sizes) > 1:
            for dims in [d for _, d in operands] + ([x] if k != axis else []):
                ctx.freeze_dim(dims[k], f"axis sliced by the index of {where}")
            continue
        for _, dims in operands[1:]:
            ctx.unify(index[k], dims[k], f"index/source pairs of {where}")
        if k != axis:
            ctx.unify(index[k], x[k], where)
        elif src is not None and _base(node) == "scatter" and _param(node, "reduce") is None:
            ctx.freeze_dim(index[k], f"overwriting index/source pairs of {where}")
    _indexed(ctx, node, node.args[0], [x[axis]], "written axis")


def _index_add(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """index_add / index_reduce / index_copy / index_fill(x, dim, idx, src):
    ``out[.., idx[j], ..] = src[.., j, ..]`` (accumulated or not): x and the
    output unify, x's axis ``dim`` freezes, src's other axes unify with x's;
    idx pairs with src's axis ``dim``: unified when the writes accumulate,
    frozen for index_copy (which duplicate write wins depends on order)."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    where = describe(node)
    ctx.unify_dims(x, y, where)
    axis = _axes(_param(node, "dim"), len(x))[0]
    index, source = ctx.dims(_param(node, "index")), ctx.dims(_param(node, "source"))
    if source is not None:
        for k, dim in enumerate(source):
            if k != axis:
                ctx.unify(dim, x[k], where)
        if index:
            ctx.unify(index[0], source[axis], f"index/source pairs of {where}")
        if _base(node) == "index_copy":
            ctx.freeze_dim(source[axis], f"overwriting index/source pairs of {where}")
    _indexed(ctx, node, node.args[0], [x[axis]], "written axis")


# ------------------------------------------------------ windows and shuffles
def _unfold(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """Tensor.unfold(dim, size, step): sliding windows along ``dim``; the
    windowed axis freezes, the window index and the new last (in-window) axis
    are positions (structural); every other axis passes."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    where = describe(node)
    axis = _axes(_param(node, "dimension"), len(x))[0] if x else 0
    for k, dim in enumerate(x):
        if k != axis:
            ctx.unify(dim, y[k], where)
    ctx.freeze(x[axis : axis + 1], f"{where} along this axis: sliding windows do not commute with permuting it")
    ctx.freeze(y[axis : axis + 1] + y[-1:], f"window axes of {where}", structural=True)


def _kernel_factors(ctx: RuleContext, node: torch.fx.Node) -> list[int]:
    """Structurally frozen atoms for the kernel positions of im2col / col2im."""
    factors = [a for k in _param(node, "kernel_size") for a in ctx.new(int(k))]
    ctx.freeze_dim(factors, f"kernel positions of {describe(node)}", structural=True)
    return factors


def _im2col(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """F.unfold (im2col): image[N, C, H, W] -> patches[N, C*kh*kw, L], row-major
    with C outer, so ``patches[-2] = Product(C, kh, kw)`` exactly; F.fold
    (col2im) is the reverse (overlapping patches sum per channel). Kernel,
    spatial and patch axes are positions (structural); the batch axis passes."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    where = describe(node)
    patches, image = (y, x) if _base(node) == "im2col" else (x, y)
    ctx.unify(patches[-2], image[-3] + _kernel_factors(ctx, node), f"patch channels of {where}")
    ctx.freeze(image[-2:] + patches[-1:], f"spatial axis of {where}", structural=True)
    ctx.unify_dims(image[:-3], patches[:-2], where)


def _pixel_shuffle(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """pixel_shuffle(x[*, C*r*r, H, W], r) -> [*, C, H*r, W*r] with
    ``y[c, h*r+i, w*r+j] = x[c*r*r + i*r + j, h, w]``: a pure relabelling of
    index factors, so ``x[-3] = Product(C, r, r)``, ``y[-2] = Product(H, r)``,
    ``y[-1] = Product(W, r)`` unify exactly; pixel_unshuffle is the reverse."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    where = describe(node)
    shuffle = _base(node) == "pixel_shuffle"
    r = arg_int(node, 1)
    ri, rj = ctx.new(r), ctx.new(r)
    wide, narrow = (x, y) if shuffle else (y, x)  # the side with r*r channels and small images
    ctx.unify(wide[-3], narrow[-3] + ri + rj, f"sub-pixel channels of {where}")
    ctx.unify(narrow[-2], wide[-2] + ri, f"sub-pixel rows of {where}")
    ctx.unify(narrow[-1], wide[-1] + rj, f"sub-pixel columns of {where}")
    ctx.unify_dims(x[:-3], y[:-3], where)


def _channel_shuffle(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """channel_shuffle(x[N, C, *], g): ``view(g, C/g) -> transpose -> flatten``,
    so ``x[1] = Product(g, C/g)`` and ``y[1] = Product(C/g, g)`` exactly."""
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    where = describe(node)
    groups = arg_int(node, 1)
    outer, inner = ctx.new(groups), ctx.new(_size(node.args[0], 1) // groups)
    ctx.unify(x[1], outer + inner, f"channel groups of {where}")
    ctx.unify(y[1], inner + outer, f"shuffled channel groups of {where}")
    for k in range(len(x)):
        if k != 1:
            ctx.unify(x[k], y[k], where)


# --------------------------------------------------------------- factories
def _constant(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """zeros / ones / full / empty / new_* / *_like: a value constant along
    every axis is unchanged by any permutation of them, so its fresh atoms stay
    free (a tensor argument only donates shape and dtype)."""


def _positional_factory(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """arange / rand / randn / tensor ...: values that depend on the position
    (or on the random stream, drawn in order), so every axis freezes."""
    ctx.freeze(out, f"position-dependent constant made by {describe(node)}")


def _no_constraint(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """Shape reads and runtime asserts: no constraint."""


_NONLINEAR = (
    "relu relu6 gelu silu sigmoid tanh hardtanh leaky_relu elu selu mish hardswish softplus celu "
    "softsign tanhshrink hardshrink softshrink"
)
_VIEW_LIKE = (
    "clone contiguous alias detach dropout feature_dropout alpha_dropout lift_fresh_copy alias_copy detach_copy"
)
_POINTWISE = """
abs add addcdiv addcmul bitwise_not ceil clamp clamp_max clamp_min clip copy cos cosh div eq erf erfc
exp exp2 expm1 fill floor floor_divide fmod ge gt isfinite isinf isnan le lerp log log10 log1p log2
logical_and logical_not logical_or lt masked_fill maximum minimum mul ne neg pow reciprocal remainder
round rsqrt rsub sign sin sinh sqrt square sub tan true_divide trunc where xlogy
_log_softmax _softmax log_softmax softmax hardsigmoid log_sigmoid rrelu threshold
__and__ __or__ __xor__ bitwise_and bitwise_or bitwise_xor
multiply divide subtract negative positive absolute greater greater_equal less less_equal not_equal fix
acos asin atan atan2 arccos arcsin arctan hypot logit nan_to_num frac signbit float_power heaviside copysign fmax fmin
"""
_METADATA = (
    "_assert_tensor_metadata _assert_scalar _assert_async sym_constrain_range_for_size sym_size sym_numel sym_stride"
)
_CONSTANTS = (
    "zeros ones full empty empty_strided new_zeros new_ones new_full new_empty "
    "zeros_like ones_like full_like empty_like"
)
_POSITIONAL_FACTORIES = "arange scalar_tensor tensor rand randn randint rand_like randn_like randint_like"
_RESHAPES = (
    "view reshape _unsafe_view flatten unflatten squeeze unsqueeze view_as reshape_as ravel "
    "view_copy _reshape_copy squeeze_copy unsqueeze_copy"
)
_TRANSPOSES = (
    "permute transpose swapaxes swapdims t numpy_T mT mH adjoint matrix_H movedim moveaxis "
    "permute_copy transpose_copy t_copy"
)
_REDUCTIONS = (
    "sum mean amax amin var std logsumexp max min linalg_vector_norm norm prod any all nansum nanmean "
    "count_nonzero median nanmedian kthvalue mode argmax argmin"
)


def _register() -> None:
    for name in _NONLINEAR.split():
        register_rule(f"aten::{name}", _pointwise, role="nonlinearity")
    for name in _VIEW_LIKE.split():
        register_rule(f"aten::{name}", _pointwise, role="view")
    for name in _POINTWISE.split():
        register_rule(f"aten::{name}", _pointwise)
    for name in "type_as to _to_copy".split():
        register_rule(f"aten::{name}", _first_operand)
    for name in _METADATA.split():
        register_rule(f"aten::{name}", _no_constraint, role="metadata")
    for name in _CONSTANTS.split():
        register_rule(f"aten::{name}", _constant)
    for name in _POSITIONAL_FACTORIES.split():
        register_rule(f"aten::{name}", _positional_factory)
    for name in _RESHAPES.split():
        register_rule(f"aten::{name}", _reshape, role="view")
    for name in _TRANSPOSES.split():
        register_rule(f"aten::{name}", _permute_dims, role="view")
    for name in "expand expand_copy broadcast_to".split():  # broadcasting: equal-size dims unify, right-aligned
        register_rule(f"aten::{name}", _pointwise, role="view")
    register_rule("aten::expand_as", _first_operand, role="view")
    for name in _REDUCTIONS.split():
        register_rule(f"aten::{name}", _reduction)
    for name in "cumsum cumprod logcumsumexp cummax cummin".split():
        register_rule(f"aten::{name}", _along_dim("a running reduction"))
    for name in "sort argsort topk msort".split():
        register_rule(f"aten::{name}", _along_dim("sorting (values and indices by position)"))
    register_rule("aten::flip", _along_dim("reversal", "dims"))
    register_rule("aten::roll", _along_dim("rolling", "dims"))
    for name in "tril triu".split():
        register_rule(f"aten::{name}", _triangle)
    for name in "diagonal diagonal_copy".split():
        register_rule(f"aten::{name}", _diagonal, role="view")
    register_rule("aten::repeat", _repeat)
    register_rule("aten::repeat_interleave", _repeat_interleave)
    register_rule("aten::stack", _stack)
    for name in "cat concat".split():
        register_rule(f"aten::{name}", _cat)
    for name in (
        "split split_with_sizes chunk unbind tensor_split unsafe_split unsafe_split_with_sizes unsafe_chunk "
        "split_copy split_with_sizes_copy unbind_copy"
    ).split():
        register_rule(f"aten::{name}", _split)
    for name in "slice narrow select pad constant_pad_nd slice_copy narrow_copy select_copy".split():
        register_rule(f"aten::{name}", _slice)
    for name in "slice_scatter select_scatter".split():
        register_rule(f"aten::{name}", _slice_scatter)
    register_rule("aten::index", _index)
    register_rule("aten::index_put", _index_put)
    register_rule("aten::index_select", _index_select)
    for name in "gather take_along_dim".split():
        register_rule(f"aten::{name}", _gather)
    for name in "scatter scatter_add scatter_reduce".split():
        register_rule(f"aten::{name}", _scatter)
    for name in "index_add index_reduce index_copy index_fill".split():
        register_rule(f"aten::{name}", _index_add)
    for name in "unfold unfold_copy".split():
        register_rule(f"aten::{name}", _unfold, role="view")
    register_rule("aten::im2col", _im2col)
    register_rule("aten::col2im", _im2col)
    for name in "pixel_shuffle pixel_unshuffle".split():
        register_rule(f"aten::{name}", _pixel_shuffle, role="view")
    for name in "channel_shuffle native_channel_shuffle".split():
        register_rule(f"aten::{name}", _channel_shuffle, role="view")
    register_rule(operator.getitem, _getitem)


_register()
