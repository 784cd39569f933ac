"""Rules of layers with parameters: linear, convolutions, normalisation,
pooling, embeddings."""

from __future__ import annotations

import torch
import torch.fx

from .registry import Dims, Rule, RuleContext, Value, describe, flatten_value, is_dims, op_name, register_rule


def _linear(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """aten.linear(x[..., in], W[out, in], b[out]) -> y[..., out]."""
    x, w, b = ctx.dims(node.args[0]), ctx.dims(node.args[1]), ctx.dims(ctx.arg(node, "bias"))
    y: Dims = out  # type: ignore[assignment]
    where = describe(node)
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


def _conv(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """Convolutions: channel axes unify, spatial axes freeze.

    Regular conv: W[out, in / groups, *k]. Transposed conv: W[in, out / groups, *k].
    A grouped conv factors its channels as [groups, channels per group]: whole
    groups permute together with their weights, and one permutation acts
    inside every group (depthwise: the channel permutation passes through).
    """
    x, w = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    b = ctx.dims(ctx.arg(node, "bias"))
    y: Dims = out  # type: ignore[assignment]
    assert x is not None and w is not None
    where = describe(node)
    transposed = bool(ctx.arg(node, "transposed", op_name(node).startswith("aten::conv_transpose")))
    groups = int(ctx.arg(node, "groups", 1))
    nspatial = len(w) - 2
    c_axis = len(x) - nspatial - 1
    for dim in w[2:] + x[c_axis + 1 :] + y[c_axis + 1 :]:
        ctx.freeze_dim(dim, f"spatial axis of {where}", structural=True)
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


def _batch_norm(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """batch_norm / instance_norm: per-channel (axis 1) affine and statistics."""
    x = ctx.dims(node.args[0])
    assert x is not None
    where = describe(node)
    channel = x[1] if len(x) > 1 else x[0]
    for name in ("weight", "bias", "running_mean", "running_var"):
        stat = ctx.dims(ctx.arg(node, name))
        if stat is not None:
            ctx.unify(stat[0], channel, f"channel of {where}")
    outs = out if isinstance(out, tuple) else (out,)
    first = outs[0]
    for k, dim in enumerate(x):
        ctx.unify(dim, first[k], f"{where}")  # type: ignore[index]
    for extra in outs[1:]:  # saved mean / invstd (training variants)
        for dim in flatten_value(extra):
            if len(dim) == 1:
                ctx.unify(dim[0], channel, f"{where}")
            else:
                ctx.freeze(dim, f"saved statistics of {where}")


def _layer_norm(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """layer_norm(x, shape, w, b) / rms_norm(x, shape, w): statistics over the
    last len(shape) dims are invariant to permuting them; w, b follow."""
    x = ctx.dims(node.args[0])
    assert x is not None
    outs = out if isinstance(out, tuple) else (out,)
    y = outs[0]
    where = describe(node)
    for k, dim in enumerate(x):
        ctx.unify(dim, y[k], f"{where}")  # type: ignore[index]
    normalized = len(node.args[1])
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
    x = ctx.dims(node.args[0])
    outs = out if isinstance(out, tuple) else (out,)
    y: Dims = outs[0]  # type: ignore[assignment]
    assert x is not None
    where = describe(node)
    channels = int(node.args[0].meta["val"].shape[1])
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
        x = ctx.dims(node.args[0])
        assert x is not None
        where = describe(node)
        outs = out if isinstance(out, tuple) else (out,)
        for value in outs:
            if not is_dims(value):
                continue
            for k in range(len(x) - nspatial):
                ctx.unify(x[k], value[k], f"{where}")  # type: ignore[index]
            for k in range(len(x) - nspatial, len(x)):
                ctx.freeze_dim(x[k], f"spatial axis of {where}", structural=True)
                ctx.freeze_dim(value[k], f"spatial axis of {where}", structural=True)  # type: ignore[index]

    return rule


def _embedding(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """embedding(W[vocab, d], idx) -> y[..., d]: the vocabulary axis is fixed."""
    w, idx = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    y: Dims = out  # type: ignore[assignment]
    assert w is not None and idx is not None
    where = describe(node)
    ctx.freeze_dim(w[0], f"vocabulary axis of {where}", structural=True)
    ctx.unify(w[1], y[-1], f"{where}")
    for k, dim in enumerate(idx):
        ctx.unify(dim, y[k], f"{where}")


def _prelu(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """prelu(x, w): one slope per channel, channels on dim 1 (dim 0 for 1-d x)."""
    x, w = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    y: Dims = out  # type: ignore[assignment]
    assert x is not None
    for k, dim in enumerate(x):
        ctx.unify(dim, y[k], f"{describe(node)}")
    if w is not None and w and w[0]:
        ctx.unify(w[0], x[1] if len(x) > 1 else x[0], f"channel slopes of {describe(node)}")


def _register() -> None:
    register_rule("aten::linear", _linear)
    for name in "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution".split():
        register_rule(f"aten::{name}", _conv)
    for name in (
        "batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training "
        "_native_batch_norm_legit_functional instance_norm"
    ).split():
        register_rule(f"aten::{name}", _batch_norm)
    for name in "layer_norm native_layer_norm rms_norm".split():
        register_rule(f"aten::{name}", _layer_norm)
    for name in "group_norm native_group_norm".split():
        register_rule(f"aten::{name}", _group_norm)
    register_rule("aten::embedding", _embedding)
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
