"""Mask-aware matching (issue 17): ``match_activations(..., mask=m_A)`` weights
each of A's units by the surviving mass ``M_i = sum |W_A * m_A|`` it carries
(``w_i = M_i / mean M``, rows of the similarity scaled by ``w_i``);
``match_weights(..., mask=m_A)`` matches A's masked weights against B's dense
ones; ``transfer_mask(..., mask_aware=True)`` passes ``mask_a`` on.

The references are computed here independently: correlations with numpy and
the assignment with scipy's ``linear_sum_assignment`` on a hand-weighted
similarity; weight matching against a model whose weights were multiplied by
the mask."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TwoHeadAttention, randomize
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

import maskalign as ma
from maskalign.errors import DOCS_URL
from maskalign.matching.mask_aware import position_weights
from maskalign.models import MLP
from maskalign.spec.axes import Leaf, Product

HIDDEN = "layers.0.weight:0"


def _pair(seed: int = 0, hidden: tuple[int, ...] = (12,)) -> tuple[MLP, MLP, list[Tensor]]:
    """Two random MLPs (float64) and 4 batches of inputs."""
    torch.manual_seed(seed)
    model_a = MLP(in_features=8, hidden=hidden, num_classes=4).double()
    model_b = MLP(in_features=8, hidden=hidden, num_classes=4).double()
    generator = torch.Generator().manual_seed(seed + 100)
    data = [torch.randn(64, 8, dtype=torch.float64, generator=generator) for _ in range(4)]
    return model_a, model_b, data


def _post_activations(model: MLP, data: list[Tensor]) -> np.ndarray:
    x = torch.cat(data)
    with torch.no_grad():
        return torch.relu(model.layers[0](x)).numpy()


def _correlation(h_a: np.ndarray, h_b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every unit of A with every unit of B."""
    a = (h_a - h_a.mean(0)) / h_a.std(0)
    b = (h_b - h_b.mean(0)) / h_b.std(0)
    return a.T @ b / len(a)


def _reference(similarity: np.ndarray) -> Tensor:
    """The optimal assignment of ``similarity`` (rows A, columns B) in the
    Permutation's convention: ``index[j]`` is A's unit matched to B's unit ``j``."""
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    index = np.empty(len(rows), dtype=np.int64)
    index[cols] = rows
    return torch.from_numpy(index)


def _masses(model: MLP, mask: dict[str, Tensor]) -> np.ndarray:
    """``M_i``: unit i's row of layers.0.weight and its column of fc.weight, masked."""
    w_in = (model.layers[0].weight.detach() * mask["layers.0.weight"]).abs().sum(1)
    w_out = (model.fc.weight.detach() * mask["fc.weight"]).abs().sum(0)
    return (w_in + w_out).numpy()


def _report(pi: ma.Permutation) -> dict[str, object]:
    """``pi.report`` without ``"max_memory"`` (half the memory free at the call)."""
    return {k: v for k, v in pi.report.items() if k != "max_memory"}


def _dense(model: nn.Module) -> dict[str, Tensor]:
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}


# ------------------------------------------------------ activation matching
def test_mask_none_is_the_plain_result_bitwise() -> None:
    model_a, model_b, data = _pair(0)
    plain = ma.match_activations(model_a, model_b, data, progress=False)
    none = ma.match_activations(model_a, model_b, data, progress=False, mask=None)
    assert none == plain and _report(none) == _report(plain)
    assert plain.report["mask_aware"] is False
    assert "weighted_after" not in plain.report["groups"][HIDDEN]
    # and the plain result is the unweighted optimum, computed independently
    h_a, h_b = _post_activations(model_a, data), _post_activations(model_b, data)
    assert (h_a.std(0) > 0).all() and (h_b.std(0) > 0).all()  # no dead unit: the optimum is unique
    assert torch.equal(plain[HIDDEN], _reference(_correlation(h_a, h_b)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activation_matching_maximises_the_hand_weighted_similarity(seed: int) -> None:
    model_a, model_b, data = _pair(seed)
    mask = ma.global_magnitude_prune(model_a, sparsity=0.8)
    similarity = _correlation(_post_activations(model_a, data), _post_activations(model_b, data))
    masses = _masses(model_a, mask)
    weights = masses / masses.mean()
    pi = ma.match_activations(model_a, model_b, data, progress=False, mask=mask)
    assert torch.equal(pi[HIDDEN], _reference(weights[:, None] * similarity))
    assert pi.report["mask_aware"] is True
    # the report: the unweighted and the weighted means of the matched pairs
    n, index = len(weights), pi[HIDDEN].numpy()
    values = pi.report["groups"][HIDDEN]
    assert values["after"] == pytest.approx(similarity[index, np.arange(n)].mean(), abs=1e-10)
    assert values["weighted_after"] == pytest.approx((weights[:, None] * similarity)[index, np.arange(n)].mean())
    assert values["weighted_before"] == pytest.approx(float(np.trace(weights[:, None] * similarity)) / n)


def test_the_weighting_changes_some_assignment() -> None:
    """The premise of the test above: on these pairs the weights decide."""
    changed = 0
    for seed in range(3):
        model_a, model_b, data = _pair(seed)
        mask = ma.global_magnitude_prune(model_a, sparsity=0.8)
        plain = ma.match_activations(model_a, model_b, data, progress=False)
        aware = ma.match_activations(model_a, model_b, data, progress=False, mask=mask)
        changed += int(not torch.equal(plain[HIDDEN], aware[HIDDEN]))
    assert changed >= 1


def test_a_dense_mask_weights_by_the_dense_magnitudes_and_equal_masses_change_nothing() -> None:
    model_a, model_b, data = _pair(3)
    similarity = _correlation(_post_activations(model_a, data), _post_activations(model_b, data))
    dense = ma.match_activations(model_a, model_b, data, progress=False, mask=_dense(model_a))
    masses = _masses(model_a, _dense(model_a))
    assert torch.equal(dense[HIDDEN], _reference(masses[:, None] / masses.mean() * similarity))
    # every unit carrying the same mass: w = 1 up to the mean-1 normalisation, the plain result
    with torch.no_grad():
        for layer in (model_a.layers[0], model_a.fc):
            layer.weight.copy_(0.3 * torch.sign(layer.weight))
    plain = ma.match_activations(model_a, model_b, data, progress=False)
    equal = ma.match_activations(model_a, model_b, data, progress=False, mask=_dense(model_a))
    assert equal == plain


def _contested() -> tuple[MLP, MLP, list[Tensor]]:
    """A's unit 0 ~ x0 + 0.1 x2 and unit 1 ~ x0 + 0.3 x1; B's units are x0 and
    x1 (a bias of 10 keeps every ReLU linear). Both of A's units correlate
    best with B's unit 0: unweighted, unit 0 takes it (0.995 + 0.287 beats
    0.958 + 0)."""
    model_a = MLP(in_features=3, hidden=(2,), num_classes=2).double()
    model_b = MLP(in_features=3, hidden=(2,), num_classes=2).double()
    with torch.no_grad():
        model_a.layers[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.1], [1.0, 0.3, 0.0]]))
        model_b.layers[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        for model in (model_a, model_b):
            model.layers[0].bias.fill_(10.0)
            model.fc.weight.fill_(0.5)
    generator = torch.Generator().manual_seed(5)
    return model_a, model_b, [torch.randn(128, 3, dtype=torch.float64, generator=generator) for _ in range(2)]


def test_killing_a_units_weights_hands_its_contested_column_to_another_unit() -> None:
    model_a, model_b, data = _contested()
    plain = ma.match_activations(model_a, model_b, data, progress=False)
    assert plain[HIDDEN].tolist() == [0, 1]  # unit 0 of A wins B's unit 0
    kill = _dense(model_a)
    kill["layers.0.weight"][0] = False  # unit 0's incoming weights ...
    kill["fc.weight"][:, 0] = False  # ... and outgoing ones: it carries nothing of the sparse network
    aware = ma.match_activations(model_a, model_b, data, progress=False, mask=kill)
    assert aware[HIDDEN].tolist() == [1, 0]  # now unit 1 of A gets B's unit 0
    assert ma.match_activations(model_a, model_b, data, progress=False, mask=_dense(model_a)) == plain


def test_a_float_mask_of_zeros_and_ones_is_the_bool_mask() -> None:
    model_a, model_b, data = _pair(4)
    mask = ma.global_magnitude_prune(model_a, sparsity=0.8)
    as_bool = ma.match_activations(model_a, model_b, data, progress=False, mask=mask)
    as_float = ma.match_activations(
        model_a, model_b, data, progress=False, mask={n: m.double() for n, m in mask.items()}
    )
    assert as_float == as_bool and _report(as_float) == _report(as_bool)


def test_a_planted_relabelling_is_undone_even_where_the_mask_kills_units() -> None:
    """Each row's maximum is its true partner, for any weights >= 0; units
    whose kept weights are all 0 have zero rows, a tie class placed exactly
    by the pre-activation tie-break."""
    torch.manual_seed(0)
    model_b = MLP(in_features=8, hidden=(24, 16), num_classes=4).double()
    spec = ma.build_spec(model_b, torch.randn(2, 8, dtype=torch.float64))
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(2))
    model_a = ma.apply_permutation(model_b, sigma)
    mask = ma.global_magnitude_prune(model_a, sparsity=0.7)
    for unit in range(5):  # five units of the first hidden layer carry nothing
        mask["layers.0.weight"][unit] = False
        mask["layers.1.weight"][:, unit] = False
    data = [torch.randn(64, 8, dtype=torch.float64) for _ in range(3)]
    pi = ma.match_activations(model_a, model_b, data, spec, progress=False, mask=mask)
    assert pi == sigma.inverse()
    assert pi.report["groups"][HIDDEN]["tied"] >= 5


def test_nested_groups_are_weighted_by_the_product_of_their_units_weights() -> None:
    tree = Product((Leaf("heads", 2), Leaf("dims", 3)))
    weights = {"heads": torch.tensor([0.5, 1.5], dtype=torch.float64)}
    assert torch.equal(position_weights(tree, weights), torch.tensor([0.5] * 3 + [1.5] * 3, dtype=torch.float64))
    weights["dims"] = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    expected = torch.outer(weights["heads"], weights["dims"]).reshape(-1)
    assert torch.allclose(position_weights(tree, weights), expected / expected.mean())
    assert position_weights(tree, {"other": torch.ones(4)}) is None


def test_an_attention_model_is_matched_mask_aware() -> None:
    model = randomize(TwoHeadAttention(), seed=3)
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 6, 5, dtype=torch.float64, generator=generator) for _ in range(3)]
    spec = ma.build_spec(model, (data[0],))
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(3))
    other = ma.apply_permutation(model, sigma)
    mask = ma.global_magnitude_prune(model, sparsity=0.6)
    pi = ma.match_activations(model, other, data, spec, points="pre", progress=False, mask=mask)
    assert pi == sigma  # a permuted copy is still found, heads and head dims included
    weighted = [g for g, values in pi.report["groups"].items() if "weighted_after" in values]
    assert len(weighted) == len(spec.groups)  # every group, the nested ones via their joint axis
    stranger = randomize(TwoHeadAttention(), seed=4)
    first = ma.match_activations(model, stranger, data, spec, progress=False, mask=mask)
    again = ma.match_activations(model, stranger, data, spec, progress=False, mask=mask)
    assert first == again and _report(first) == _report(again)


# ---------------------------------------------------------- weight matching
@pytest.mark.slow
def test_weight_matching_with_a_mask_is_matching_the_masked_model() -> None:
    model_a, model_b, data = _pair(5, hidden=(24, 16))
    spec = ma.build_spec(model_a, data[0][:2])
    mask = ma.global_magnitude_prune(model_a, sparsity=0.8)
    masked = copy.deepcopy(model_a)
    with torch.no_grad():
        for name, param in masked.named_parameters():
            if name in mask:
                param.mul_(mask[name])
    aware = ma.match_weights(model_a, model_b, spec, progress=False, mask=mask)
    reference = ma.match_weights(masked, model_b, spec, progress=False)
    assert aware == reference
    assert aware.report["objective"] == reference.report["objective"]
    assert aware.report["mask_aware"] is True and reference.report["mask_aware"] is False
    plain = ma.match_weights(model_a, model_b, spec, progress=False)
    assert plain != aware  # the premise: the mask matters here
    assert ma.match_weights(model_a, model_b, spec, progress=False, mask=None) == plain


# ----------------------------------------------------------- transfer_mask
@pytest.mark.parametrize("method", ["activation", "weight"])
def test_transfer_mask_mask_aware_matches_with_mask_a(method: str) -> None:
    model_a, model_b, data = _pair(6, hidden=(24, 16))
    mask = ma.global_magnitude_prune(model_a, sparsity=0.8)
    spec = ma.build_spec(model_a, data[0][:2])
    matcher = ma.match_activations if method == "activation" else ma.match_weights
    args = (model_a, model_b, data, spec) if method == "activation" else (model_a, model_b, spec)
    aware = ma.permute_mask(mask, matcher(*args, progress=False, mask=mask))
    plain = ma.permute_mask(mask, matcher(*args, progress=False))
    got = ma.transfer_mask(model_a, mask, model_b, data, method=method, spec=spec, mask_aware=True, progress=False)
    default = ma.transfer_mask(model_a, mask, model_b, data, method=method, spec=spec, progress=False)
    assert all(torch.equal(got[n], aware[n]) for n in mask)
    assert all(torch.equal(default[n], plain[n]) for n in mask)
    assert any(not torch.equal(aware[n], plain[n]) for n in mask)  # the two differ here


def test_transfer_mask_rejects_a_mask_option_and_a_non_bool_flag() -> None:
    model_a, model_b, data = _pair(0)
    mask = ma.global_magnitude_prune(model_a, sparsity=0.5)
    with pytest.raises(ma.ArgumentTypeError, match="Option 'mask' .* mask_aware=True"):
        ma.transfer_mask(model_a, mask, model_b, data, mask=mask)
    with pytest.raises(ma.ArgumentTypeError, match="Argument 'mask_aware' is the str 'yes'; pass True or False"):
        ma.transfer_mask(model_a, mask, model_b, data, mask_aware="yes")


# ------------------------------------------------------------- bad inputs
def _call(method: str, mask: object) -> None:
    model_a, model_b, data = _pair(0)
    if method == "activation":
        ma.match_activations(model_a, model_b, data, progress=False, mask=mask)  # type: ignore[arg-type]
    else:
        ma.match_weights(model_a, model_b, example_inputs=data[0], progress=False, mask=mask)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_bad_masks_raise_typed_errors_that_name_the_key(method: str) -> None:
    good = _dense(_pair(0)[0])
    cases: list[tuple[object, type[Exception], str]] = [
        (
            {**good, "layers.0.wieght": good["fc.weight"]},
            ma.MaskError,
            r"Mask key 'layers.0.wieght' .*'layers.0.weight'",
        ),
        (
            {"fc.weight": torch.ones(3, 3, dtype=torch.bool)},
            ma.MaskError,
            r"'fc.weight' has shape \(3, 3\) .*\(4, 12\)",
        ),
        ({"fc.weight": torch.full((4, 12), 0.5)}, ma.MaskError, r"'fc.weight' holds 48 value\(s\) other than 0 and 1"),
        ({"fc.weight": torch.full((4, 12), float("nan"))}, ma.MaskError, r"'fc.weight' holds 48 value"),
        ({"fc.weight": [[True] * 12] * 4}, ma.MaskError, r"Mask for 'fc.weight' is a list"),
        ({0: good["fc.weight"]}, ma.MaskError, r"Mask key 0 is a int"),
        ([("fc.weight", good["fc.weight"])], ma.ArgumentTypeError, r"Argument 'mask' is a list .*dict\(pairs\)"),
        (good["fc.weight"], ma.ArgumentTypeError, r"Argument 'mask' is a tensor"),
        (MLP(), ma.ArgumentTypeError, r"Argument 'mask' is a MLP, .*swapped arguments"),
    ]
    for mask, error, pattern in cases:
        with pytest.raises(error, match=pattern) as raised:
            _call(method, mask)
        assert str(raised.value).rstrip().split("\n")[-1].startswith(f"See {DOCS_URL}/")


def test_a_permutation_in_place_of_the_mask_is_named() -> None:
    model_a, model_b, data = _pair(0)
    pi = ma.match_activations(model_a, model_b, data, progress=False)
    with pytest.raises(ma.ArgumentTypeError, match="Argument 'mask' is a Permutation"):
        _call("activation", pi)
    with pytest.raises(ma.ArgumentTypeError, match="Argument 'mask' is a Permutation"):
        _call("weight", pi)


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_inputs_are_not_mutated(method: str) -> None:
    model_a, model_b, data = _pair(7)
    mask = {n: m.double() for n, m in ma.global_magnitude_prune(model_a, sparsity=0.8).items()}
    before_mask = {n: m.clone() for n, m in mask.items()}
    before_a = {n: t.clone() for n, t in model_a.state_dict().items()}
    before_b = {n: t.clone() for n, t in model_b.state_dict().items()}
    if method == "activation":
        ma.match_activations(model_a, model_b, data, progress=False, mask=mask)
    else:
        ma.match_weights(model_a, model_b, example_inputs=data[0], progress=False, mask=mask)
    assert mask.keys() == before_mask.keys()
    assert all(torch.equal(mask[n], before_mask[n]) and mask[n].dtype == torch.float64 for n in mask)
    assert all(torch.equal(t, before_a[n]) for n, t in model_a.state_dict().items())
    assert all(torch.equal(t, before_b[n]) for n, t in model_b.state_dict().items())
