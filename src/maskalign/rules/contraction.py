"""Rules of contractions: matrix products, einsum, attention."""

from __future__ import annotations

import torch
import torch.fx

from .registry import Dims, RuleContext, Value, describe, op_name, register_rule


def _contract(ctx: RuleContext, node: torch.fx.Node, a: Dims, b: Dims, y: Dims) -> None:
    """Batched matrix product ``y = a @ b`` with numpy broadcasting of batch dims:
    the contracted axis unifies between a and b (summing over a permuted axis
    is invariant), rows of a and columns of b pass to y."""
    where = describe(node)
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


def _matmul(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """matmul / mm / bmm, and addmm / baddbmm / addmv (``bias + a @ b``)."""
    name = op_name(node)
    shift = 1 if name in ("aten::addmm", "aten::baddbmm", "aten::addmv", "aten::addbmm") else 0
    a, b = ctx.dims(node.args[shift]), ctx.dims(node.args[shift + 1])
    y: Dims = out  # type: ignore[assignment]
    assert a is not None and b is not None
    _contract(ctx, node, a, b, y)
    if shift:
        bias = ctx.dims(node.args[0])
        if bias is not None:
            shape = node.args[0].meta["val"].shape
            offset = len(y) - len(bias)
            for k, dim in enumerate(bias):
                if int(shape[k]) == int(node.meta["val"].shape[offset + k]):
                    ctx.unify(dim, y[offset + k], f"bias of {describe(node)}")


def _einsum(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """einsum without ellipsis: every subscript letter is one axis."""
    equation = str(node.args[0]).replace(" ", "")
    operands = [ctx.dims(x) for x in node.args[1]]
    y: Dims = out  # type: ignore[assignment]
    if "..." in equation or any(o is None for o in operands):
        for operand in operands:
            ctx.freeze(operand, f"einsum with ellipsis in {describe(node)}")
        ctx.freeze(out, f"einsum with ellipsis in {describe(node)}")
        return
    inputs, _, output = equation.partition("->")
    letters: dict[str, list[int]] = {}
    for subscripts, dims in zip(inputs.split(","), operands):
        for letter, dim in zip(subscripts, dims):  # type: ignore[arg-type]
            if letter in letters:
                ctx.unify(letters[letter], dim, f"einsum axis '{letter}' in {describe(node)}")
            elif dim:
                letters[letter] = dim
    for letter, dim in zip(output, y):
        if letter in letters:
            ctx.unify(letters[letter], dim, f"einsum axis '{letter}' in {describe(node)}")


def _attention(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """scaled_dot_product_attention(q[..., L, E], k[..., S, E], v[..., S, Ev]) ->
    y[..., L, Ev]: q and k share their feature axis, k and v their key axis,
    v's feature axis flows to y; batch/head axes unify across all four."""
    q, k, v = (ctx.dims(x) for x in node.args[:3])
    outs = out if isinstance(out, tuple) else (out,)
    y: Dims = outs[0]  # type: ignore[assignment]
    assert q is not None and k is not None and v is not None
    where = describe(node)
    ctx.unify(q[-1], k[-1], f"query/key features of {where}")
    ctx.unify(k[-2], v[-2], f"keys of {where}")
    ctx.unify(q[-2], y[-2], f"queries of {where}")
    ctx.unify(v[-1], y[-1], f"value features of {where}")
    if bool(ctx.arg(node, "is_causal", False)):  # the mask depends on query/key positions
        for dim in (q[-2], k[-2], y[-2]):
            ctx.freeze_dim(dim, f"query/key positions under the causal mask of {where}", structural=True)
    shapes = [x.meta["val"].shape for x in node.args[:3]]
    if bool(ctx.arg(node, "enable_gqa", False)) and len({int(s[-3]) for s in shapes if len(s) >= 3}) > 1:
        for dims in (q, k, v, y):
            if len(dims) >= 3:
                ctx.freeze_dim(dims[-3], f"grouped-query heads of {where}")
    for dims, shape in zip((q, k, v), shapes):
        for j in range(1, len(dims) - 1):
            if j <= len(y) - 2 and int(shape[-2 - j]) == int(node.meta["val"].shape[-2 - j]):
                ctx.unify(dims[-2 - j], y[-2 - j], f"batch/head axis of {where}")
    mask = ctx.dims(ctx.arg(node, "attn_mask"))
    if mask is not None:
        mask_shape = ctx.arg(node, "attn_mask").meta["val"].shape
        scores = [*y[:-2], q[-2], k[-2]]
        score_shape = [*node.meta["val"].shape[:-2], shapes[0][-2], shapes[1][-2]]
        for j in range(1, len(mask) + 1):
            if j <= len(scores) and int(mask_shape[-j]) == int(score_shape[-j]):
                ctx.unify(mask[-j], scores[-j], f"attention mask of {where}")
    for extra in outs[1:]:
        ctx.freeze(extra, f"auxiliary output of {where}")


def _register() -> None:
    for name in "matmul mm bmm addmm baddbmm addmv mv".split():
        register_rule(f"aten::{name}", _matmul)
    register_rule("aten::einsum", _einsum)
    register_rule("aten::scaled_dot_product_attention", _attention)


_register()
