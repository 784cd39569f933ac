"""The solver shared by both matchers (maskalign.matching.coordinate_ascent)
and what activation matching does around it: the costs, and the groups that
max_joint leaves out.

The small attention model has nested groups (2 heads x 4 head dims), so its
activation matching runs the block start and the coordinate ascent.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TwoHeadAttention, make_inputs, make_model, randomize, spec_for
from torch import Tensor, nn

import maskalign as ma
from maskalign.errors import SpecError
from maskalign.matching.coordinate_ascent import IMPROVEMENT, coordinate_ascent, lap_step, positions_of
from maskalign.spec.axes import Leaf, Product

COSTS = ("correlation", "covariance", "euclidean")
HEADS, HEAD_DIMS = "attn.in_proj_weight:0", "attn.in_proj_weight:0.1"


# ------------------------------------------------------------ the routine
def test_sweeps_follow_the_generator_and_visit_every_group() -> None:
    groups = ["a", "b", "c", "d"]
    calls: list[str] = []

    def step(group: str) -> bool:
        calls.append(group)
        return len(calls) <= 5  # changes during the first sweep and one step of the second

    sweeps, converged = coordinate_ascent(groups, step, torch.Generator().manual_seed(3), max_sweeps=10)
    assert (sweeps, converged) == (3, True)  # the third sweep changed nothing
    orders = torch.Generator().manual_seed(3)
    expected = [groups[i] for _ in range(3) for i in torch.randperm(4, generator=orders).tolist()]
    assert calls == expected  # every group of every sweep, in the generator's order


def test_max_sweeps_and_the_stopping_rule() -> None:
    always = lambda group: True  # noqa: E731
    assert coordinate_ascent(["a", "b"], always, torch.Generator(), max_sweeps=4) == (4, False)
    assert coordinate_ascent(["a", "b"], always, torch.Generator(), max_sweeps=0) == (0, False)
    seen: list[bool] = []

    def stop(changed: bool) -> bool:
        seen.append(changed)
        return len(seen) == 2

    assert coordinate_ascent(["a"], always, torch.Generator(), max_sweeps=9, stop=stop) == (2, True)
    assert seen == [True, True]
    assert coordinate_ascent([], always, torch.Generator(), max_sweeps=5) == (1, True)  # nothing to change


def test_lap_step_adopts_only_a_strict_improvement() -> None:
    similarity = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    best = torch.tensor([1, 0, 2])  # A's unit 1 -> B's 0, A's 0 -> B's 1
    found = lap_step(similarity, torch.arange(3))
    assert found is not None and torch.equal(found, best)
    assert lap_step(similarity, best) is None  # already optimal
    tie = torch.ones(3, 3, dtype=torch.float64)
    assert lap_step(tie, torch.tensor([2, 0, 1])) is None  # a tie keeps the current assignment
    # the margin: a gain of 1e-13 on a value of 1 is within IMPROVEMENT, on a scale of 1e-3 it is not
    small = torch.tensor([[0.5, 0.5 + 1e-13], [0.5 + 1e-13, 0.5]], dtype=torch.float64)
    assert IMPROVEMENT == 1e-12
    assert lap_step(small, torch.arange(2)) is None
    assert lap_step(small, torch.arange(2), scale=1e-3) is not None


def test_positions_of_a_group_not_on_the_axis_is_a_spec_error() -> None:
    tree = Product((Leaf("heads", 2), Leaf("dims", 3)))
    assert torch.equal(positions_of(tree, "heads", "x"), torch.tensor([[0, 1, 2], [3, 4, 5]]))
    with pytest.raises(SpecError, match=r"Group 'other' does not occur on the axis of tensor 'w' \(dim 1\)"):
        positions_of(tree, "other", "tensor 'w' (dim 1)")


# ------------------------------------------------------- activation matching
def _attention() -> tuple[nn.Module, list[Tensor], ma.PermutationSpec, ma.Permutation]:
    torch.manual_seed(0)
    model = randomize(TwoHeadAttention(), seed=3)
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 6, 5, dtype=torch.float64, generator=generator) for _ in range(3)]
    spec = ma.build_spec(model, (data[0],))
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(3))
    return model, data, spec, sigma


def _is_identity(index: Tensor) -> bool:
    return torch.equal(index, torch.arange(index.numel()))


def _assert_valid(pi: ma.Permutation, spec: ma.PermutationSpec) -> None:
    for group, info in spec.groups.items():
        assert torch.equal(pi[group].sort().values, torch.arange(info.size)), group


def test_the_attention_model_has_nested_groups_and_a_non_trivial_sigma() -> None:
    _, _, spec, sigma = _attention()
    assert {HEADS: 2, HEAD_DIMS: 4}.items() <= {g: grp.size for g, grp in spec.groups.items()}.items()
    assert not any(_is_identity(sigma[g]) for g in spec.groups)


@pytest.mark.parametrize("cost", ["covariance", "euclidean"])
@pytest.mark.parametrize("name", ["mlp", "resnet20_w1"])
def test_other_costs_recover_a_permuted_copy(name: str, cost: str) -> None:
    model = make_model(name, seed=93)
    spec = spec_for(name)
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(94))
    data = [make_inputs(32, seed=710 + i) for i in range(2)]
    pi = ma.match_activations(model, ma.apply_permutation(model, sigma), data, spec, cost=cost, progress=False)
    assert pi == sigma
    assert pi.report["cost"] == cost


@pytest.mark.parametrize("cost", COSTS)
def test_every_cost_recovers_a_permuted_attention_model(cost: str) -> None:
    """Heads and head dims go through the block start and the coordinate ascent."""
    model, data, spec, sigma = _attention()
    pi = ma.match_activations(model, ma.apply_permutation(model, sigma), data, spec, cost=cost, progress=False)
    assert pi == sigma


def test_on_two_different_models_the_costs_differ() -> None:
    """Negative control: the costs are not one statistic under three names
    (on a permuted copy they all find the same permutation, here they do not)."""
    a, b = make_model("mlp", seed=91), make_model("mlp", seed=92)
    data = [make_inputs(32, seed=700 + i) for i in range(2)]
    found = {cost: ma.match_activations(a, b, data, spec_for("mlp"), cost=cost, progress=False) for cost in COSTS}
    for pi in found.values():
        _assert_valid(pi, spec_for("mlp"))
    assert found["correlation"] != found["covariance"]
    assert found["correlation"] != found["euclidean"]
    assert found["covariance"] != found["euclidean"]


def _warnings_of(fn) -> tuple[ma.Permutation, list[warnings.WarningMessage]]:  # type: ignore[no-untyped-def]
    """``fn()`` and the max_joint warnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if "Activation matching skips" in str(w.message)]


def test_max_joint_skips_a_nested_group_with_a_warning_naming_it() -> None:
    model, data, spec, sigma = _attention()
    permuted = ma.apply_permutation(model, sigma)
    # 7 < 8 = heads x head dims: every point of the heads and head dims is skipped
    pi, caught = _warnings_of(lambda: ma.match_activations(model, permuted, data, spec, max_joint=7, progress=False))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("Activation matching skips nodes [")
    assert f"'{HEADS}'" in message and f"'{HEAD_DIMS}'" in message and "max_joint=7" in message
    assert "troubleshooting/#warning-max-joint" in message
    assert caught[0].filename == __file__  # points at the caller
    _assert_valid(pi, spec)
    assert _is_identity(pi[HEADS]) and _is_identity(pi[HEAD_DIMS])  # no statistic left: the identity
    assert torch.equal(pi["inp.weight:0"], sigma["inp.weight:0"])  # the other groups are still matched
    assert set(pi.report["groups"]) == {"inp.weight:0"}


def test_max_joint_that_keeps_some_points_still_recovers() -> None:
    model, data, spec, sigma = _attention()
    permuted = ma.apply_permutation(model, sigma)
    # 8 keeps the (heads x head dims) points; the (3 x heads x head dims) in-projection output is skipped
    pi, caught = _warnings_of(lambda: ma.match_activations(model, permuted, data, spec, max_joint=8, progress=False))
    assert [str(w.message).count(f"'{HEADS}'") for w in caught] == [1]
    assert pi == sigma
    _, caught = _warnings_of(lambda: ma.match_activations(model, permuted, data, spec, progress=False))
    assert caught == []  # the default keeps every point of this model
