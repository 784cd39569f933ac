"""Rules of contractions: matrix products, einsum, attention."""

from __future__ import annotations

import torch
import torch.fx

from .registry import Dims, RuleContext, Value, describe, is_dims, op_name, register_rule


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
    equation = str(node.args[0]).replace(" ", "")
    operands = [ctx.dims(x) for x in node.args[1]]
    y: Dims = out  # type: ignore[assignment]
    where = describe(node)
    parsed = None
    if all(o is not None for o in operands) and is_dims(out):
        parsed = _einsum_labels(equation, [len(o) for o in operands])  # type: ignore[arg-type]
    if parsed is None:
        for operand in operands:
            ctx.freeze(operand, f"einsum equation not understood in {where}")
        ctx.freeze(out, f"einsum equation not understood in {where}")
        return
    labels, output = parsed
    shapes = [ctx.shape(x) for x in node.args[1]] + [ctx.shape(node)]
    occurrences: dict[str, list[tuple[list[int], int]]] = {}
    for term, dims, shape in zip([*labels, output], [*operands, y], shapes):
        for label, dim, size in zip(term, dims, shape):  # type: ignore[arg-type]
            occurrences.setdefault(label, []).append((dim, size))
    for label, dims in occurrences.items():
        full = max(size for _, size in dims)
        first = next(dim for dim, size in dims if size == full)
        for dim, size in dims:
            if size == full:
                ctx.unify(first, dim, f"einsum axis '{label}' in {where}")


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
