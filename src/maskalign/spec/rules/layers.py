"""Rules of layers with parameters: linear, convolutions, normalisation,
pooling, embeddings."""

from __future__ import annotations

import torch
import torch.fx

from .registry import (
    Dims,
    Rule,
    RuleContext,
    Value,
    arg_list,
    describe,
    flatten_value,
    is_dims,
    op_name,
    output_dims,
    output_list,
    register_rule,
    used_outputs,
)


def _linear(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """aten.linear(x[..., in], W[out, in], b[out]) -> y[..., out]."""
    x, w, b = ctx.arg_dims(node, 0), ctx.arg_dims(node, 1), ctx.dims(ctx.arg(node, "bias"))
    y = output_dims(node, out)
    where = describe(node)
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


def _conv(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """Convolutions: channel axes unify, spatial axes freeze.

    Regular conv: W[out, in / groups, *k]. Transposed conv: W[in, out / groups, *k].
    A grouped conv factors its channels as [groups, channels per group]: whole
    groups permute together with their weights, and one permutation acts
    inside every group (depthwise: the channel permutation passes through).
    """
    x, w = ctx.arg_dims(node, 0), ctx.arg_dims(node, 1)
    b = ctx.dims(ctx.arg(node, "bias"))
    y = output_dims(node, out)
    where = describe(node)
    transposed = bool(ctx.arg(node, "transposed", op_name(node).startswith("aten::conv_transpose")))
    groups = int(ctx.arg(node, "groups", 1))
    nspatial = len(w) - 2
    c_axis = len(x) - nspatial - 1
    for dim in w[2:] + x[c_axis + 1 :] + y[c_axis + 1 :]:
        ctx.freeze_dim(dim, f"spatial axis of {where}", structural=True)
    for k in range(c_axis):
        ctx.unify(x[k], y[k], f"batch axis in {where}")
    in_channels = ctx.shape(node.args[0])[c_axis]
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


def _batch_norm(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """batch_norm / instance_norm: per-channel (axis 1) affine and statistics."""
    x = ctx.arg_dims(node, 0)
    where = describe(node)
    channel = x[1] if len(x) > 1 else x[0]
    for name in ("weight", "bias", "running_mean", "running_var"):
        stat = ctx.dims(ctx.arg(node, name))
        if stat is not None:
            ctx.unify(stat[0], channel, f"channel of {where}")
    outs = out if isinstance(out, tuple) else (out,)
    first = output_dims(node, out)
    for k, dim in enumerate(x):
        ctx.unify(dim, first[k], f"{where}")
    for extra in outs[1:]:  # saved mean / invstd (training variants)
        for stats in flatten_value(extra):
            if len(stats) == 1:
                ctx.unify(stats[0], channel, f"{where}")
            else:
                ctx.freeze(stats, f"saved statistics of {where}")


def _layer_norm(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """layer_norm(x, shape, w, b) / rms_norm(x, shape, w): statistics over the
    last len(shape) dims are invariant to permuting them; w, b follow."""
    x = ctx.arg_dims(node, 0)
    outs = out if isinstance(out, tuple) else (out,)
    y = output_dims(node, out)
    where = describe(node)
    for k, dim in enumerate(x):
        ctx.unify(dim, y[k], f"{where}")
    normalized = len(arg_list(node, 1))
    for name in ("weight", "bias"):
        param = ctx.dims(ctx.arg(node, name))
        if param is None:
            continue
        for k in range(normalized):
            ctx.unify(param[k], x[len(x) - normalized + k], f"affine of {where}")
    for extra in outs[1:]:
        ctx.freeze(extra, f"saved statistics of {where}")


def _group_norm(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """group_norm(x[N, C, *], G, w[C], b[C]): channels factor as [G, C / G];
    whole groups permute, and one permutation acts inside every group."""
    x = ctx.arg_dims(node, 0)
    outs = out if isinstance(out, tuple) else (out,)
    y = output_dims(node, out)
    where = describe(node)
    channels = ctx.shape(node.args[0])[1]
    groups = int(ctx.arg(node, "num_groups", ctx.arg(node, "group", 1)))
    for k, dim in enumerate(x):
        ctx.unify(dim, y[k], f"{where}")
    factors = [ctx.atoms.new(f) for f in (groups, channels // groups) if f > 1]
    ctx.unify(x[1], factors, f"groups of {where}")
    for name in ("weight", "bias"):
        param = ctx.dims(ctx.arg(node, name))
        if param is not None:
            ctx.unify(param[0], x[1], f"affine of {where}")
    for extra in outs[1:]:
        ctx.freeze(extra, f"saved statistics of {where}")


def _pool(nspatial: int) -> Rule:
    def rule(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
        """Pooling: batch and channel axes pass through, spatial axes freeze."""
        x = ctx.arg_dims(node, 0)
        where = describe(node)
        outs = out if isinstance(out, tuple) else (out,)
        for value in outs:
            if not is_dims(value):
                continue
            for k in range(len(x) - nspatial):
                ctx.unify(x[k], value[k], f"{where}")
            for k in range(len(x) - nspatial, len(x)):
                ctx.freeze_dim(x[k], f"spatial axis of {where}", structural=True)
                ctx.freeze_dim(value[k], f"spatial axis of {where}", structural=True)

    return rule


def _embedding(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """embedding(W[vocab, d], idx) -> y[..., d]: the vocabulary axis is fixed."""
    w, idx = ctx.arg_dims(node, 0), ctx.arg_dims(node, 1)
    y = output_dims(node, out)
    where = describe(node)
    ctx.freeze_dim(w[0], f"vocabulary axis of {where}", structural=True)
    ctx.unify(w[1], y[-1], f"{where}")
    for k, dim in enumerate(idx):
        ctx.unify(dim, y[k], f"{where}")


def _embedding_bag(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """embedding_bag(W[vocab, d], idx, offsets, ..., per_sample_weights) -> (y[bags, d], ...):
    sums / means / maxes of rows act per feature, so d passes through; the vocabulary is fixed."""
    w = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    ctx.freeze_dim(w[0], f"vocabulary axis of {describe(node)}", structural=True)
    ctx.unify(w[1], y[-1], f"{describe(node)}")


def _native_dropout(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """native_dropout(x) -> (y, mask): elementwise, y and the mask follow x
    (a random mask is drawn per position, so train-mode outputs agree in distribution)."""
    x = ctx.arg_dims(node, 0)
    for value in flatten_value(out):
        ctx.unify_dims(x, value, f"{describe(node)}")


def _prelu(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """prelu(x, w): one slope per channel, channels on dim 1 (dim 0 for 1-d x)."""
    x, w = ctx.arg_dims(node, 0), ctx.dims(node.args[1])
    y = output_dims(node, out)
    for k, dim in enumerate(x):
        ctx.unify(dim, y[k], f"{describe(node)}")
    if w is not None and w and w[0]:
        ctx.unify(w[0], x[1] if len(x) > 1 else x[0], f"channel slopes of {describe(node)}")


def _weight_norm(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """_weight_norm / _weight_norm_interface(v, g, dim) and norm_except_dim(v, pow, dim):
    ``v * g / ||v||`` with the norm over every axis but ``dim``, which is invariant
    to permuting those axes and moves with ``dim``; w follows v, g and the norms
    follow v along the axes they keep."""
    v = ctx.arg_dims(node, 0)
    shape = ctx.shape(node.args[0])
    dim = int(ctx.arg(node, "dim", 0))
    where = describe(node)
    others = [(ctx.dims(a), ctx.shape(a)) for a in node.args[1:]]
    others += [(dims, tuple(m.shape)) for dims, m in zip(flatten_value(out), _metas(node))]
    for dims, other in others:
        if dims is None or not other:
            continue
        if len(other) == len(shape):
            for k, (a, b) in enumerate(zip(shape, other)):
                if a == b:
                    ctx.unify(v[k], dims[k], f"{where}")
        elif len(other) == 1 and dim != -1 and other[0] == shape[dim]:
            ctx.unify(v[dim], dims[0], f"norms of {where}")
        else:
            ctx.freeze(dims, f"norms of {where}")


def _metas(node: torch.fx.Node) -> list[torch.Tensor]:
    """The fake tensors of a node's (possibly several) tensor outputs."""
    meta = node.meta["val"]
    return [meta] if isinstance(meta, torch.Tensor) else [m for m in meta if isinstance(m, torch.Tensor)]


_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_CONSTANT_FILLS = frozenset(f"aten::{n}" for n in "zeros ones full new_zeros new_ones new_full".split())


def _constant_fill(arg: object) -> bool:
    """Whether ``arg`` is a tensor made by a constant-fill factory (an RNN's
    default zero state): equal everywhere, so any permutation leaves it alone."""
    return isinstance(arg, torch.fx.Node) and arg.op == "call_function" and op_name(arg) in _CONSTANT_FILLS


class _Cell:
    """The atoms of one recurrent cell (one layer and direction): the gate
    blocks (structural: the row blocks i, f, g, o of an LSTM, never mixed), the
    hidden (cell) units, and the units of the recurrent state and output (the
    projection's when ``proj_size`` is set, the hidden units otherwise)."""

    def __init__(self, ctx: RuleContext, gates: int, hidden: int, state: int, where: str) -> None:
        self.gate = ctx.new(gates)
        ctx.freeze_dim(self.gate, f"gate blocks of {where}", structural=True)
        self.hidden = ctx.new(hidden)
        self.state = ctx.new(state) if state != hidden else self.hidden

    def bind(self, ctx: RuleContext, weights: list[Dims], inputs: list[int], where: str) -> None:
        """Unify w_ih, w_hh (b_ih, b_hh) (w_hr) with the cell's atoms and w_ih's columns with ``inputs``."""
        w_ih, w_hh, *rest = weights
        rows = self.gate + self.hidden
        ctx.unify(w_ih[0], rows, f"input weight rows of {where}")
        ctx.unify(w_ih[1], inputs, f"input weight columns of {where}")
        ctx.unify(w_hh[0], rows, f"recurrent weight rows of {where}")
        ctx.unify(w_hh[1], self.state, f"recurrent weight columns of {where}")
        for extra in rest:
            if len(extra) == 1:  # b_ih, b_hh
                ctx.unify(extra[0], rows, f"gate bias of {where}")
            else:  # w_hr: the LSTM's output projection
                ctx.unify(extra[0], self.state, f"projection rows of {where}")
                ctx.unify(extra[1], self.hidden, f"projection columns of {where}")


def _recurrent(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """lstm / gru / rnn_tanh / rnn_relu (flat weight list): per layer and direction,
    weight rows are [gates, hidden]; permuting the hidden (and projection) units
    of one cell alike in its gate rows, recurrent columns, biases and the next
    layer's input columns commutes with every step, because the gates act
    elementwise on those units and every matrix meets them on both sides."""
    where = describe(node)
    gates = _GATES[op_name(node).removeprefix("aten::")]
    x = ctx.arg_dims(node, 0)
    y = output_dims(node, out)
    params = [ctx.tensor_dims(node, p, "params") for p in ctx.arg(node, "params")]
    layers, bidirectional = int(ctx.arg(node, "num_layers")), bool(ctx.arg(node, "bidirectional"))
    directions = 2 if bidirectional else 1
    per = len(params) // (layers * directions)
    shapes = [ctx.shape(p) for p in ctx.arg(node, "params")]
    packed = isinstance(node.target, torch._ops.OpOverload) and any(
        a.name == "batch_sizes" for a in node.target._schema.arguments
    )
    time = 0 if packed or len(x) == 2 or not bool(ctx.arg(node, "batch_first")) else 1
    batch = None if packed or len(x) == 2 else 1 - time
    for dims in (x, y):
        ctx.freeze_dim(dims[time], f"sequence axis of {where}", structural=True)
    if batch is not None:
        ctx.unify(x[batch], y[batch], f"batch axis of {where}")
    cells: list[_Cell] = []
    features = x[-1]
    for layer in range(layers):
        outputs = []
        for direction in range(directions):
            first = (layer * directions + direction) * per
            w_ih, w_hh = shapes[first], shapes[first + 1]
            cell = _Cell(ctx, gates, w_ih[0] // gates, w_hh[1], where)
            cell.bind(ctx, params[first : first + per], features, where)
            cells.append(cell)
            outputs.append(cell.state)
        features = ctx.concat(outputs) if bidirectional else outputs[0]
    ctx.unify(features, y[-1], f"output features of {where}")
    hx = ctx.arg(node, "hx")
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    used = used_outputs(node)
    for k, state in enumerate(states):  # (h0, h_n), (c0, c_n): one tensor for every layer and direction
        pairs = [ctx.tensor_dims(node, state, "hx")] if not _constant_fill(state) else []
        pairs += [output_dims(node, out, k + 1)] if k + 1 in used else []
        for dims in pairs:
            ctx.freeze_dim(dims[0], f"stacked layers of the state of {where}", structural=True)
            if batch is not None and len(dims) == 3:
                ctx.unify(dims[1], x[batch], f"batch axis of the state of {where}")
            for cell in cells:  # all layers share the state's feature axis: one permutation for all
                ctx.unify(dims[-1], cell.state if k == 0 else cell.hidden, f"state of {where}")


def _recurrent_cell(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """lstm_cell / gru_cell / rnn_tanh_cell / rnn_relu_cell: one step of a cell,
    hidden units permuted alike in gate rows, recurrent columns, biases, state and output."""
    where = describe(node)
    gates = _GATES[op_name(node).removeprefix("aten::").removesuffix("_cell")]
    x = ctx.arg_dims(node, 0)
    weights = [ctx.tensor_dims(node, ctx.arg(node, name), name) for name in ("w_ih", "w_hh")]
    biases = [ctx.dims(ctx.arg(node, name)) for name in ("b_ih", "b_hh")]
    shape = ctx.shape(ctx.arg(node, "w_ih"))
    cell = _Cell(ctx, gates, shape[0] // gates, shape[0] // gates, where)
    cell.bind(ctx, weights + [b for b in biases if b is not None], x[-1], where)
    hx = ctx.arg(node, "hx")
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    for dims in [ctx.tensor_dims(node, s, "hx") for s in states if not _constant_fill(s)] + output_list(node, out):
        ctx.unify(dims[-1], cell.hidden, f"state of {where}")
        if len(dims) == 2 and len(x) == 2:
            ctx.unify(dims[0], x[0], f"batch axis of {where}")


def _register() -> None:
    register_rule("aten::linear", _linear)
    for (
        name
    ) in "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution _convolution".split():
        register_rule(f"aten::{name}", _conv)
    for name in (
        "batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training "
        "_native_batch_norm_legit_functional instance_norm cudnn_batch_norm"
    ).split():
        register_rule(f"aten::{name}", _batch_norm)
    for name in "layer_norm native_layer_norm rms_norm".split():
        register_rule(f"aten::{name}", _layer_norm)
    for name in "group_norm native_group_norm".split():
        register_rule(f"aten::{name}", _group_norm)
    register_rule("aten::embedding", _embedding)
    for name in "embedding_bag _embedding_bag".split():
        register_rule(f"aten::{name}", _embedding_bag)
    register_rule("aten::native_dropout", _native_dropout, role="view")
    for name in "_weight_norm _weight_norm_interface norm_except_dim".split():
        register_rule(f"aten::{name}", _weight_norm)
    for name in _GATES:
        register_rule(f"aten::{name}", _recurrent)
        register_rule(f"aten::{name}_cell", _recurrent_cell)
    register_rule("aten::prelu", _prelu, role="nonlinearity")
    register_rule("aten::_prelu_kernel", _prelu, role="nonlinearity")
    for n in (1, 2, 3):
        for op in (
            f"max_pool{n}d",
            f"avg_pool{n}d",
            f"adaptive_avg_pool{n}d",
            f"adaptive_max_pool{n}d",
            f"max_pool{n}d_with_indices",
            f"lp_pool{n}d",
            f"upsample_nearest{n}d",
            f"_upsample_nearest_exact{n}d",
        ):
            register_rule(f"aten::{op}", _pool(n))
    for op in (
        "upsample_linear1d",
        "upsample_bilinear2d",
        "upsample_bicubic2d",
        "upsample_trilinear3d",
        "_upsample_bilinear2d_aa",
        "_upsample_bicubic2d_aa",
    ):
        register_rule(f"aten::{op}", _pool(int(next(c for c in op if c.isdigit()))))


_register()
