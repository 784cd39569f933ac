"""Rules of higher-order control flow: ``torch.cond``.

Both branches of a ``cond`` run on the same operands and must return the same
values, so each branch is analysed as a subgraph with its inputs bound to the
operands' atoms and its outputs unified with the ``cond``'s. The constraints of
both branches then hold at once: a permutation of the spec commutes with
whichever branch the predicate picks. Where the branches disagree (one keeps
an axis that the other reorders), unification fails and the axis freezes.
"""

from __future__ import annotations

import torch
import torch.fx

from .registry import RuleContext, Value, describe, flatten_value, register_rule


def _cond(ctx: RuleContext, node: torch.fx.Node, out: Value) -> None:
    """cond(pred, true_graph, false_graph, operands): both branches, one set of atoms."""
    where = describe(node)
    pred, branches, operands = node.args[0], node.args[1:3], node.args[3]
    ctx.freeze(ctx.value(pred), f"predicate of {where}")
    operand_values = [ctx.value(x) for x in operands] if isinstance(operands, (tuple, list)) else []
    results = [flatten_value(out) if not isinstance(out, list) else [out]]
    for branch in branches:
        returned = ctx.propagate(branch, operand_values)
        if returned is None:  # a branch we cannot read: nothing it touches may move
            ctx.freeze(tuple(operand_values), f"unreadable branch of {where}")
            ctx.freeze(out, f"unreadable branch of {where}")
            return
        outputs = [dims for value in returned for dims in flatten_value(value)]
        if len(outputs) != len(results[0]):
            ctx.freeze(tuple(operand_values), f"branches of {where} return other values")
            ctx.freeze(out, f"branches of {where} return other values")
            return
        for mine, theirs in zip(results[0], outputs):
            if len(mine) != len(theirs):
                ctx.freeze_dim([a for d in mine + theirs for a in d], f"branches of {where} disagree")
                continue
            ctx.unify_dims(theirs, mine, f"branches of {where} disagree")


def _register() -> None:
    register_rule(torch.ops.higher_order.cond, _cond)


_register()
