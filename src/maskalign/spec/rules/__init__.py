"""Axis-propagation rules, one small rule per op, and the pass that runs them.

* :mod:`~maskalign.spec.rules.registry`: the op table, :func:`register_rule` and
  :class:`RuleContext`, the interface a rule is written against;
* :mod:`~maskalign.spec.rules.analysis`: :func:`analyze`, one pass over a captured graph;
* the built-in rules, registered through the same API: :mod:`~maskalign.spec.rules.core`
  (elementwise ops, views, reductions, concatenation and slicing),
  :mod:`~maskalign.spec.rules.layers` (linear, convolution, normalisation, pooling,
  embedding) and :mod:`~maskalign.spec.rules.contraction` (matrix products, einsum,
  attention) and :mod:`~maskalign.spec.rules.control_flow` (``torch.cond``).
"""

from . import contraction, control_flow, core, layers  # noqa: F401  (register the built-in rules)
from .analysis import Analysis, analyze
from .registry import OpInfo, Role, Rule, RuleContext, lookup, register_rule

__all__ = ["Analysis", "OpInfo", "Role", "Rule", "RuleContext", "analyze", "lookup", "register_rule"]
