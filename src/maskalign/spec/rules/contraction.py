"""Rules of contractions: matrix products, einsum, attention."""

from __future__ import annotations

import torch
import torch.fx

from .registry import (
    Dims,
    RuleContext,
    Value,
    arg,
    arg_list,
    describe,
    is_dims,
    op_name,
    output_dims,
    register_rule,
    used_outputs,
)


def _contract(
    ctx: RuleContext, node: torch.fx.Node, a: Dims, b: Dims, y: Dims, shapes: tuple[tuple[int, ...], ...]
) -> None:
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
    for operand, shape in zip((a_batch, b_batch), shapes):
        offset = len(y_batch) - len(operand)
        for k, dim in enumerate(operand):
            if offset + k >= 0 and int(shape[k]) == int(node.meta["val"].shape[offset + k]):
                ctx.unify(dim, y_batch[offset + k], f"batch axis of {where}")


def _matmul(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """matmul / mm / bmm, and addmm / baddbmm / addmv / addbmm (``beta * bias + alpha * a @ b``,
    scalars commute with any permutation); addbmm sums over the batch, so a's
    and b's batch axes unify with each other instead of with the output."""
    name = op_name(node)
    shift = 1 if name in ("aten::addmm", "aten::baddbmm", "aten::addmv", "aten::addbmm") else 0
    a, b = ctx.arg_dims(node, shift), ctx.arg_dims(node, shift + 1)
    y = output_dims(node, out)
    shapes = (ctx.shape(node.args[shift]), ctx.shape(node.args[shift + 1]))
    if name == "aten::addbmm":
        ctx.unify(a[0], b[0], f"summed batch axis of {describe(node)}")
        a, b, shapes = a[1:], b[1:], (shapes[0][1:], shapes[1][1:])
    _contract(ctx, node, a, b, y, shapes)
    if shift:
        bias = ctx.dims(node.args[0])
        if bias is not None:
            shape = ctx.shape(node.args[0])
            offset = len(y) - len(bias)
            for k, dim in enumerate(bias):
                if int(shape[k]) == int(node.meta["val"].shape[offset + k]):
                    ctx.unify(dim, y[offset + k], f"bias of {describe(node)}")


def _bilinear(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """bilinear(x1[..., i], x2[..., j], W[o, i, j], b[o]) -> y[..., o]: each input
    axis contracts with its own weight axis, the rows of W are y's features."""
    x1, x2, w = (ctx.arg_dims(node, k) for k in range(3))
    b = ctx.dims(ctx.arg(node, "bias"))
    y = output_dims(node, out)
    where = describe(node)
    ctx.unify(x1[-1], w[1], f"first contraction of {where}")
    ctx.unify(x2[-1], w[2], f"second contraction of {where}")
    ctx.unify(w[0], y[-1], f"output features of {where}")
    if b is not None:
        ctx.unify(b[0], y[-1], f"bias of {where}")
    for k in range(len(y) - 1):
        ctx.unify(x1[k], y[k], f"batch axis of {where}")
        ctx.unify(x2[k], y[k], f"batch axis of {where}")


def _similarity(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """cosine_similarity(x1, x2, dim) / pairwise_distance(x1, x2) (last dim): a
    sum over the reduced axis is invariant to permuting both inputs alike; the
    other axes broadcast through to the output."""
    x1, x2 = ctx.arg_dims(node, 0), ctx.arg_dims(node, 1)
    y = output_dims(node, out)
    where = describe(node)
    shapes = [ctx.shape(node.args[0]), ctx.shape(node.args[1])]
    ndim = max(len(x1), len(x2))
    if op_name(node) == "aten::cosine_similarity":
        axis, keep = int(ctx.arg(node, "dim", 1)) % ndim, False
    else:
        axis, keep = ndim - 1, bool(ctx.arg(node, "keepdim", False))
    kept = [k for k in range(ndim) if k != axis or keep]
    out_shape = ctx.shape(node)
    if len(kept) != len(y):
        ctx.freeze([*x1, *x2], f"unexpected output rank of {where}")
        return
    for x, shape in zip((x1, x2), shapes):
        offset = ndim - len(x)
        for k, dim in enumerate(x):
            if k + offset == axis:
                continue
            position = kept.index(k + offset)
            if shape[k] == out_shape[position]:
                ctx.unify(dim, y[position], f"broadcast axis of {where}")
    reduced = [x[axis - ndim + len(x)] for x, shape in zip((x1, x2), shapes) if shape[axis - ndim + len(x)] > 1]
    for dim in reduced[1:]:
        ctx.unify(reduced[0], dim, f"reduced axis of {where}")


def _dot(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """dot / vdot(a[n], b[n]) -> scalar: a sum over n is invariant to permuting a and b alike."""
    a, b = ctx.arg_dims(node, 0), ctx.arg_dims(node, 1)
    ctx.unify(a[0], b[0], f"contraction in {describe(node)}")


def _einsum_labels(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]] | None:
    """The label of every dim of every operand and of the output of an einsum
    equation (explicit ``->`` or implicit: the letters used exactly once, in
    alphabetical order). Ellipsis dims are labelled ``"...k"``, counted from the
    right, so that they broadcast right-aligned. None if the equation does not
    match the operand ranks."""
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(ranks):
        return None
    labels: list[list[str]] = []
    ellipsis = 0
    for term, rank in zip(terms, ranks):
        head, dots, tail = term.partition("...")
        width = rank - len(head) - len(tail)
        if (not dots and width) or width < 0:
            return None
        ellipsis = max(ellipsis, width)
        labels.append([*head, *(f"...{k}" for k in range(width, 0, -1)), *tail])
    if not arrow:
        counts: dict[str, int] = {}
        for term in terms:
            for letter in term.replace("...", ""):
                counts[letter] = counts.get(letter, 0) + 1
        output = "..." + "".join(sorted(letter for letter, n in counts.items() if n == 1))
    head, dots, tail = output.partition("...")
    return labels, [*head, *(f"...{k}" for k in range(ellipsis if dots else 0, 0, -1)), *tail]


def _einsum(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """einsum: every label (letter or ellipsis position) is one axis, shared by
    every operand and the output that carry it at full size (size-1 dims
    broadcast). A summed label is invariant to permuting all its occurrences
    alike; a kept one (a diagonal ``ii->i`` included) moves with them."""
    equation = str(arg(node, 0)).replace(" ", "")
    tensors = arg_list(node, 1)
    operands = [ctx.dims(x) for x in tensors]
    known = [o for o in operands if o is not None]
    where = describe(node)
    parsed = None
    if len(known) == len(operands) and is_dims(out):
        parsed = _einsum_labels(equation, [len(o) for o in known])
    if parsed is None or not is_dims(out):
        for operand in operands:
            ctx.freeze(operand, f"einsum equation not understood in {where}")
        ctx.freeze(out, f"einsum equation not understood in {where}")
        return
    labels, output = parsed
    shapes = [ctx.shape(x) for x in tensors] + [ctx.shape(node)]
    occurrences: dict[str, list[tuple[list[int], int]]] = {}
    for term, dims, shape in zip([*labels, output], [*known, out], shapes):
        for label, dim, size in zip(term, dims, shape):
            occurrences.setdefault(label, []).append((dim, size))
    for label, places in occurrences.items():
        full = max(size for _, size in places)
        first = next(dim for dim, size in places if size == full)
        for dim, size in places:
            if size == full:
                ctx.unify(first, dim, f"einsum axis '{label}' in {where}")


def _attention(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """scaled_dot_product_attention(q[..., L, E], k[..., S, E], v[..., S, Ev]) ->
    y[..., L, Ev]: q and k share their feature axis, k and v their key axis,
    v's feature axis flows to y; batch/head axes unify across all four (with
    enable_gqa, query heads are [kv heads, group]: each kv head moves with its
    block of query heads, exactly)."""
    q, k, v = (ctx.arg_dims(node, j) for j in range(3))
    outs = out if isinstance(out, tuple) else (out,)
    y = output_dims(node, out)
    where = describe(node)
    ctx.unify(q[-1], k[-1], f"query/key features of {where}")
    ctx.unify(k[-2], v[-2], f"keys of {where}")
    ctx.unify(q[-2], y[-2], f"queries of {where}")
    ctx.unify(v[-1], y[-1], f"value features of {where}")
    if bool(ctx.arg(node, "is_causal", False)):  # the mask depends on query/key positions
        for dim in (q[-2], k[-2], y[-2]):
            ctx.freeze_dim(dim, f"query/key positions under the causal mask of {where}", structural=True)
    shapes = [ctx.shape(x) for x in node.args[:3]]
    if bool(ctx.arg(node, "enable_gqa", False)) and len({int(s[-3]) for s in shapes if len(s) >= 3}) > 1:
        # key/value head j serves query heads j * group ... (j + 1) * group - 1: q heads = [kv heads, group]
        ctx.unify(k[-3], v[-3], f"key/value heads of {where}")
        kv_heads, _ = ctx.refine(q[-3], [shapes[1][-3], shapes[0][-3] // shapes[1][-3]], f"query groups of {where}")
        ctx.unify(kv_heads, k[-3], f"grouped-query heads of {where}")
    for dims, shape in zip((q, k, v), shapes):
        for j in range(1, len(dims) - 1):
            if j <= len(y) - 2 and int(shape[-2 - j]) == int(node.meta["val"].shape[-2 - j]):
                ctx.unify(dims[-2 - j], y[-2 - j], f"batch/head axis of {where}")
    mask = ctx.dims(ctx.arg(node, "attn_mask"))
    if mask is not None:
        mask_shape = ctx.shape(ctx.arg(node, "attn_mask"))
        scores = [*y[:-2], q[-2], k[-2]]
        score_shape = [*node.meta["val"].shape[:-2], shapes[0][-2], shapes[1][-2]]
        for j in range(1, len(mask) + 1):
            if j <= len(scores) and int(mask_shape[-j]) == int(score_shape[-j]):
                ctx.unify(mask[-j], scores[-j], f"attention mask of {where}")
    for extra in outs[1:]:
        ctx.freeze(extra, f"auxiliary output of {where}")


def _native_mha(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """_native_multi_head_attention (nn.MultiheadAttention's fast path): the rows of
    the packed qkv weight are Concat(q, k, v), each [heads, head_dim]; heads are
    shared by q, k, v and the output projection's columns, q and k share their
    head_dim (their dot products are invariant), v's head_dim flows through the
    output projection, and the embedding axis of query, key, value is the qkv
    weight's columns; the output projection's rows are the output's features."""
    where = describe(node)
    query, key, value = (ctx.arg_dims(node, j) for j in range(3))
    qkv_w, proj_w = (ctx.tensor_dims(node, ctx.arg(node, n), n) for n in ("qkv_weight", "proj_weight"))
    qkv_b, proj_b = (ctx.dims(ctx.arg(node, n)) for n in ("qkv_bias", "proj_bias"))
    y = output_dims(node, out)
    heads = int(ctx.arg(node, "num_head"))
    head_dim = int(ctx.arg(node, "embed_dim")) // heads
    head = ctx.new(heads)
    qk = head + ctx.new(head_dim)
    v = head + ctx.new(head_dim)
    rows = ctx.concat([qk, qk, v])
    ctx.unify(qkv_w[0], rows, f"packed q/k/v rows of {where}")
    if qkv_b is not None:
        ctx.unify(qkv_b[0], rows, f"packed q/k/v bias of {where}")
    for x in (query, key, value):
        ctx.unify(x[-1], qkv_w[1], f"embedding axis of {where}")
    ctx.unify(proj_w[1], v, f"output projection columns of {where}")
    ctx.unify(proj_w[0], y[-1], f"output features of {where}")
    if proj_b is not None:
        ctx.unify(proj_b[0], y[-1], f"output bias of {where}")
    for k in range(len(query) - 1):  # batch, queries
        ctx.unify(query[k], y[k], f"batch/query axis of {where}")
    if len(key) == 3:
        ctx.unify(key[0], query[0], f"batch axis of {where}")
    ctx.unify(key[-2], value[-2], f"keys of {where}")
    mask = ctx.dims(ctx.arg(node, "mask"))
    if mask is not None:
        ctx.freeze(mask, f"attention mask of {where}")
        for dim in (query[-2], key[-2]):
            ctx.freeze_dim(dim, f"query/key positions under the mask of {where}", structural=True)
    weights = out[1] if isinstance(out, tuple) and 1 in used_outputs(node) else None
    if weights is not None:
        ctx.freeze(weights, f"attention weights of {where}")
        ctx.freeze_dim(head, f"heads averaged or returned in the attention weights of {where}")


def _register() -> None:
    for name in "matmul mm bmm addmm baddbmm addmv addbmm mv".split():
        register_rule(f"aten::{name}", _matmul)
    register_rule("aten::einsum", _einsum)
    for name in "dot vdot".split():
        register_rule(f"aten::{name}", _dot)
    register_rule("aten::scaled_dot_product_attention", _attention)
    register_rule("aten::_native_multi_head_attention", _native_mha)
    register_rule("aten::_scaled_dot_product_flash_attention_for_cpu", _attention)
    register_rule("aten::bilinear", _bilinear)
    for name in "cosine_similarity pairwise_distance".split():
        register_rule(f"aten::{name}", _similarity)


_register()
