"""The typed accessors rules use to read a node's arguments: the right type
when the graph holds it, a SpecError naming the op, the node and the argument
(and what to do) when it does not."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx

from maskalign.errors import SpecError
from maskalign.spec.rules.registry import arg, arg_int, arg_ints, arg_list, arg_name, arg_node


def _graph() -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """``linear(x, 3.0)`` (a float where the schema wants a tensor), ``sum(x, [1, 0])``
    and ``getitem(x, 2)``, built by hand."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    bad_linear = graph.call_function(torch.ops.aten.linear.default, (x, 3.0))
    summed = graph.call_function(torch.ops.aten.sum.dim_IntList, (x, [1, 0]))
    item = graph.call_function(operator.getitem, (x, 2))
    return bad_linear, summed, item


def test_names_come_from_the_schema() -> None:
    linear, summed, item = _graph()
    assert arg_name(linear, 0) == "input" and arg_name(linear, 1) == "weight"
    assert arg_name(summed, 1) == "dim"
    assert arg_name(item, 1) == "args[1]"  # no schema


def test_accessors_return_typed_values() -> None:
    linear, summed, item = _graph()
    assert arg_node(linear, 0).name == "x"
    assert arg_ints(summed, 1) == [1, 0] and arg_list(summed, 1) == [1, 0]
    assert arg_int(item, 1) == 2
    assert arg(summed, 1) == [1, 0]


@pytest.mark.parametrize(
    ("read", "words"),
    [
        (lambda g: arg_node(g[0], 1), r"Argument 'weight' of aten::linear at node 'linear_default' is 3\.0, not"),
        (lambda g: arg_int(g[1], 0), r"Argument 'self' of aten::sum at node 'sum_dim_int_list'"),
        (lambda g: arg_ints(g[0], 0), r"Argument 'input' of aten::linear"),
        (lambda g: arg(g[2], 5), r"args\[5\]"),
    ],
)
def test_a_wrong_argument_raises_a_spec_error_naming_it(read, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=words) as info:
        read(_graph())
    message = str(info.value)
    assert message.startswith("Argument ") and "register_rule" in message
