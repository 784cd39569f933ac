"""torch.cond: axes pass through both branches, which must agree."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import maskalign as ma

DT = torch.float64


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=DT))
    return model


class Branchy(nn.Module):
    """A layer on one branch, an elementwise op on the other; the predicate
    (a sum over the hidden units) is permutation invariant."""

    def __init__(self, shift_in_branch: bool = False) -> None:
        super().__init__()
        self.shift_in_branch = shift_in_branch
        self.a, self.c, self.b = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        if self.shift_in_branch:
            h = torch.cond(h.sum() > 0, lambda t: t.roll(1, -1), lambda t: t * 2, (h,))
        else:
            h = torch.cond(h.sum() > 0, lambda t: self.c(t), lambda t: t * 2, (h,))
        return self.b(h)


@pytest.mark.slow
def test_both_branches_share_the_operands_groups() -> None:
    model = _randomized(Branchy())
    x = torch.randn(5, 4, dtype=DT)
    spec = ma.build_spec(model, x)
    assert spec.coverage == 1.0 and len(spec.groups) == 1
    (group,) = spec.groups.values()
    assert {("a.weight", 0), ("c.weight", 0), ("c.weight", 1), ("b.weight", 1)} <= set(group.members)
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(1))
    for inputs in (x, -x * 100):  # the predicate takes both values
        assert ma.check_equivalence(model, perm, inputs)
    # negative control: c permuted on its output axis only (a wrong spec) changes the true branch
    wrong = ma.apply_permutation(model, perm)
    with torch.no_grad():
        wrong.c.weight.copy_(wrong.c.weight.roll(1, 0))
        assert (wrong(x) - model(x)).abs().max() > 1e-3 or (wrong(-x * 100) - model(-x * 100)).abs().max() > 1e-3


@pytest.mark.slow
def test_a_branch_that_reorders_units_freezes_them() -> None:
    model = _randomized(Branchy(shift_in_branch=True))
    x = torch.randn(5, 4, dtype=DT)
    spec = ma.build_spec(model, x)
    assert not spec.groups and spec.coverage == 0.0
    reasons = {a.reason for a in spec.frozen if a.tensor == "a.weight" and a.dim == 0}
    assert any("roll" in r for r in reasons)
