"""Tests for weight matching, activation matching and permute_mask.

Matching a model with a permuted copy of itself must recover the permutation
exactly, in the direction documented in maskalign.permutation: with
``pi = match_*(a, b)``, ``apply_permutation(a, pi)`` is aligned to ``b``.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (
    assert_unchanged,
    is_permuted,
    make_inputs,
    make_model,
    snapshot,
    spec_for,
    state_dicts_equal,
)
from torch import Tensor, nn

import maskalign as ma
from maskalign.errors import DataError, MaskError, SpecMismatchError
from maskalign.matching import DEFAULT_POINTS, DEFAULT_STREAM_POINTS
from maskalign.models import MLP

RECOVERY_MODELS = ["mlp", "resnet20_w1", "resnet20_w2", "vgg11"]
# the larger models run in the full suite only (several seconds each); the fast tier keeps mlp and resnet20_w1
_LARGE = ("resnet20_w2", "vgg11")
_DEFAULT = (DEFAULT_POINTS, DEFAULT_STREAM_POINTS)


def data_batches(count: int = 4, size: int = 64, seed: int = 100) -> list[Tensor]:
    return [make_inputs(size, seed=seed + i) for i in range(count)]


def weight_distance(a: nn.Module, b: nn.Module) -> float:
    """Squared L2 distance over the floating-point state (parameters and BN stats)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sum(float(((sa[k] - sb[k]) ** 2).sum()) for k in sa if sa[k].is_floating_point())


# ------------------------------------------------------------ self-recovery
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _LARGE else n for n in RECOVERY_MODELS]
)
def test_match_weights_recovers_permutation(name: str) -> None:
    model_b = make_model(name, seed=21)
    spec = spec_for(name)
    generator = torch.Generator().manual_seed(22)
    for _ in range(1 if name == "vgg11" else 3):  # VGG11 has 9M weights: one round keeps the suite fast
        sigma = ma.random_permutation(spec, generator)
        permuted = ma.apply_permutation(model_b, sigma)
        pi = ma.match_weights(model_b, permuted, spec)
        assert pi == sigma
        # the other direction gives the inverse
        assert ma.match_weights(permuted, model_b, spec) == sigma.inverse()


# every activation recipe (points x stream_points); "last" only where there are
# residual streams (elsewhere it selects what "all" does: test_activation_points)
RECOVERY_RECIPES = [
    pytest.param(
        name,
        points,
        stream,
        id=f"{name}-{points}-{stream}",
        # beyond the MLP, the fast tier keeps one ResNet20 recipe (the default)
        marks=[pytest.mark.slow] if name in _LARGE or (name != "mlp" and (points, stream) != _DEFAULT) else [],
    )
    for name in RECOVERY_MODELS
    for points in ("pre", "post", "both")
    for stream in ("all", "last")
    if stream == "all" or name.startswith("resnet")
]


@pytest.mark.parametrize(("name", "points", "stream"), RECOVERY_RECIPES)
def test_match_activations_recovers_permutation(name: str, points: str, stream: str) -> None:
    model_b = make_model(name, seed=23)
    spec = spec_for(name)
    batches = data_batches()
    generator = torch.Generator().manual_seed(24)
    recipe = {"points": points, "stream_points": stream, "progress": False}
    if points != "pre":  # dead ReLU units have correlation 0 after the ReLU: "after" is that of the model with itself
        itself = ma.match_activations(model_b, model_b, batches, spec, **recipe).report["groups"]
    for _ in range(2 if points == "pre" else 1):  # one round for the other recipes keeps the suite's time
        sigma = ma.random_permutation(spec, generator)
        permuted = ma.apply_permutation(model_b, sigma)
        pi = ma.match_activations(model_b, permuted, batches, spec, **recipe)
        assert pi == sigma
        assert (pi.report["points"], pi.report["stream_points"]) == (points, stream)
        report = pi.report["groups"]
        assert set(report) == set(spec.groups)
        for group in spec.groups:
            expected = 1.0 if points == "pre" else itself[group]["after"]
            assert report[group]["after"] == pytest.approx(expected, abs=1e-9)
    back = ma.match_activations(permuted, model_b, batches, spec, **recipe)
    assert back == sigma.inverse()


def test_match_activations_accepts_input_target_pairs_and_builds_spec() -> None:
    model_b = make_model("mlp", seed=25)
    sigma = ma.random_permutation(spec_for("mlp"), torch.Generator().manual_seed(26))
    permuted = ma.apply_permutation(model_b, sigma)
    pairs = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in data_batches(3)]
    pi = ma.match_activations(model_b, permuted, pairs, progress=False)  # spec built here
    assert pi.spec.fingerprint == spec_for("mlp").fingerprint
    assert pi == sigma


def test_match_weights_recovers_twenty_permutations_of_mlp() -> None:
    model_b = make_model("mlp", seed=27)
    spec = spec_for("mlp")
    generator = torch.Generator().manual_seed(28)
    for _ in range(20):
        sigma = ma.random_permutation(spec, generator)
        assert ma.match_weights(model_b, ma.apply_permutation(model_b, sigma), spec) == sigma


def test_match_weights_builds_spec_from_example_inputs() -> None:
    model_b = make_model("mlp", seed=29)
    sigma = ma.random_permutation(spec_for("mlp"), torch.Generator().manual_seed(30))
    pi = ma.match_weights(model_b, ma.apply_permutation(model_b, sigma), example_inputs=make_inputs(2))
    assert pi == sigma
    with pytest.raises(ma.SpecError):
        ma.match_weights(model_b, model_b)


# -------------------------------------------------------- direction convention
@pytest.mark.parametrize("matcher", ["weights", "activations"])
def test_direction_convention_permuted_copy(matcher: str) -> None:
    name = "resnet20_w1"
    model_b = make_model(name, seed=31)
    spec = spec_for(name)
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(32))
    model_a = ma.apply_permutation(model_b, sigma)
    if matcher == "weights":
        pi = ma.match_weights(model_a, model_b, spec)
    else:
        pi = ma.match_activations(model_a, model_b, data_batches(), spec, progress=False)
    assert weight_distance(model_a, model_b) > 0
    aligned = ma.apply_permutation(model_a, pi)
    assert state_dicts_equal(aligned.state_dict(), model_b.state_dict())


@pytest.mark.parametrize("name", ["mlp", "resnet20_w1"])
def test_direction_convention_independent_models(name: str) -> None:
    model_a, model_b = make_model(name, seed=33), make_model(name, seed=34)
    spec = spec_for(name)
    pi = ma.match_weights(model_a, model_b, spec)
    assert not pi.is_identity()
    before = weight_distance(model_a, model_b)
    after = weight_distance(ma.apply_permutation(model_a, pi), model_b)
    assert after < before
    # the opposite direction would generally not help: applying pi to b does not
    # bring b to a by the same amount unless pi is an involution
    inverse_after = weight_distance(ma.apply_permutation(model_a, pi.inverse()), model_b)
    assert after < inverse_after

    act = ma.match_activations(model_a, model_b, data_batches(2), spec, progress=False)
    for group, values in act.report["groups"].items():
        assert values["after"] >= values["before"] - 1e-12, group


# ----------------------------------------------------------- weight matching
@pytest.mark.parametrize("name", ["mlp", "resnet20_w1"])
def test_match_weights_objective_is_non_decreasing_and_correct(name: str) -> None:
    model_a, model_b = make_model(name, seed=35), make_model(name, seed=36)
    spec = spec_for(name)
    pi = ma.match_weights(model_a, model_b, spec, seed=1)
    objective = pi.report["objective"]
    assert len(objective) == pi.report["sweeps"] + 1 >= 2
    scale = max(abs(v) for v in objective)
    for earlier, later in zip(objective, objective[1:]):
        assert later >= earlier - 1e-12 * scale
    assert objective[-1] > objective[0]

    # objective = sum_t <pi(W_A[t]), W_B[t]> over parameters carrying a group (buffers excluded by default)
    def inner(perm: ma.Permutation) -> float:
        sa, sb = model_a.state_dict(), model_b.state_dict()
        total = 0.0
        for tensor in spec.axes:
            if is_permuted(spec, tensor) and tensor in spec.parameters:
                total += float((perm.permute_tensor(tensor, sa[tensor]) * sb[tensor]).sum())
        return total

    identity = ma.Permutation(spec, {})
    assert objective[0] == pytest.approx(inner(identity), rel=1e-12)
    assert objective[-1] == pytest.approx(inner(pi), rel=1e-12)
    # a local optimum of coordinate descent: no random permutation beats it
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        assert inner(ma.random_permutation(spec, generator)) < objective[-1]


def test_match_weights_warm_start_at_solution_stays() -> None:
    model_b = make_model("resnet20_w1", seed=37)
    spec = spec_for("resnet20_w1")
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(38))
    pi = ma.match_weights(model_b, ma.apply_permutation(model_b, sigma), spec, init=sigma)
    assert pi == sigma
    assert pi.report["sweeps"] == 1


# -------------------------------------------------------------- permute_mask
@pytest.mark.parametrize("name", ["mlp", "resnet20_w1", "resnet20_w2"])
def test_permute_mask_properties(name: str) -> None:
    model = make_model(name, seed=39)
    spec = spec_for(name)
    masks = ma.global_magnitude_prune(model, 0.8)
    pi = ma.random_permutation(spec, torch.Generator().manual_seed(40))
    permuted = ma.permute_mask(masks, pi)
    assert permuted.keys() == masks.keys()
    state = model.state_dict()
    changed = 0
    for key, mask in masks.items():
        new = permuted[key]
        assert new.dtype == torch.bool and new.shape == mask.shape
        assert int(new.sum()) == int(mask.sum()), key
        w = state[key]
        assert torch.equal(pi.permute_tensor(key, w * mask), pi.permute_tensor(key, w) * new), key
        changed += int(not torch.equal(new, mask))
    assert changed > 0
    # magnitude pruning commutes with the permutation (no ties in random float64 weights)
    permuted_model = ma.apply_permutation(model, pi)
    pruned_after = ma.global_magnitude_prune(permuted_model, 0.8)
    for key in masks:
        assert torch.equal(pruned_after[key], permuted[key]), key
    # and the inverse brings the masks back
    back = ma.permute_mask(permuted, pi.inverse())
    assert all(torch.equal(back[k], masks[k]) for k in masks)


def test_permute_mask_with_matched_permutation_follows_units() -> None:
    """A mask found on A, permuted with match(A, B), is A's mask in B's units:
    for B a permuted copy of A it is exactly the mask B itself would get."""
    model_a = make_model("resnet20_w1", seed=41)
    spec = spec_for("resnet20_w1")
    model_b = ma.apply_permutation(model_a, ma.random_permutation(spec, torch.Generator().manual_seed(42)))
    pi = ma.match_weights(model_a, model_b, spec)
    mask_a = ma.global_magnitude_prune(model_a, 0.7)
    mask_b = ma.global_magnitude_prune(model_b, 0.7)
    aligned = ma.permute_mask(mask_a, pi)
    assert all(torch.equal(aligned[k], mask_b[k]) for k in mask_b)


def test_permute_mask_errors_name_the_key() -> None:
    spec = spec_for("mlp")
    pi = ma.random_permutation(spec, torch.Generator().manual_seed(43))
    with pytest.raises(MaskError, match="layers.9.weight"):
        ma.permute_mask({"layers.9.weight": torch.ones(3, 3, dtype=torch.bool)}, pi)
    with pytest.raises(MaskError, match=re.escape("layers.0.weight")):
        ma.permute_mask({"layers.0.weight": torch.ones(64, 128, dtype=torch.bool)}, pi)
    with pytest.raises(MaskError, match=re.escape("layers.1.weight")):
        ma.permute_mask({"layers.1.weight": torch.ones(128, 128)}, pi)
    with pytest.raises(MaskError, match=re.escape("fc.weight")):
        ma.permute_mask({"fc.weight": torch.ones(10, 128, dtype=torch.uint8)}, pi)
    # MaskError is a ValueError too
    with pytest.raises(ValueError):
        ma.permute_mask({"nope": torch.ones(1, dtype=torch.bool)}, pi)


def test_permute_mask_rejects_buffer_key() -> None:
    spec = spec_for("resnet20_w1")
    pi = ma.random_permutation(spec, torch.Generator().manual_seed(44))
    try:
        ma.permute_mask({"bn1.running_mean": torch.ones(16, dtype=torch.bool)}, pi)
    except MaskError as error:
        assert "bn1.running_mean" in str(error)
    else:
        raise AssertionError("permute_mask accepted a mask for the buffer 'bn1.running_mean'")


# ----------------------------------------------------------------- bad input
def _mlps_of_different_width() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(45)
    a = MLP(in_features=64, hidden=(128, 128)).double().eval()
    b = MLP(in_features=64, hidden=(64, 64)).double().eval()
    return a, b


def _names_a_tensor(message: str, model: nn.Module) -> bool:
    return any(key in message for key in model.state_dict())


def test_different_architectures_raise_spec_mismatch() -> None:
    a, b = _mlps_of_different_width()
    spec = ma.build_spec(a, (make_inputs(2),))
    with pytest.raises(SpecMismatchError) as info:
        ma.match_weights(a, b, spec)
    assert _names_a_tensor(str(info.value), b)
    with pytest.raises(SpecMismatchError) as info:
        ma.match_weights(b, a, spec)
    assert _names_a_tensor(str(info.value), b)
    with pytest.raises(SpecMismatchError) as info:
        ma.match_activations(a, b, data_batches(1, 8), spec, progress=False)
    assert _names_a_tensor(str(info.value), b)
    with pytest.raises(SpecMismatchError) as info:
        ma.match_activations(a, b, data_batches(1, 8), progress=False)  # spec built from a
    assert _names_a_tensor(str(info.value), b)


def test_empty_data_raises_data_error() -> None:
    model = make_model("mlp", seed=46)
    with pytest.raises(DataError):
        ma.match_activations(model, model, [], spec_for("mlp"), progress=False)
    with pytest.raises(DataError):
        ma.match_activations(model, model, [], progress=False)
    with pytest.raises(DataError):
        ma.match_activations(model, model, iter([]), spec_for("mlp"), progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_on_different_devices_raise_spec_mismatch() -> None:
    a = make_model("mlp", seed=47)
    b = make_model("mlp", seed=48).cuda()
    with pytest.raises(SpecMismatchError, match="device"):
        ma.match_activations(a, b, data_batches(1, 8), spec_for("mlp"), progress=False)


@pytest.mark.parametrize("name", ["mlp", "resnet20_w1"])
def test_non_finite_activation_raises_data_error_naming_a_node(name: str) -> None:
    model_a, model_b = make_model(name, seed=49), make_model(name, seed=50)
    first_weight = next(k for k, v in model_a.state_dict().items() if v.dim() >= 2)
    with torch.no_grad():
        model_a.state_dict()[first_weight].view(-1)[3] = float("nan")
    spec = spec_for(name)
    with pytest.raises(DataError) as info:
        ma.match_activations(model_a, model_b, data_batches(2, 16), spec, progress=False)
    message = str(info.value)
    nodes = {node.name for node in spec.captured.graph.nodes}  # type: ignore[union-attr]
    quoted = re.findall(r"'([^']+)'", message)
    assert any(q in nodes for q in quoted), message
    assert "model_a" in message


def _mixed_flags(model: nn.Module) -> nn.Module:
    model.train()
    for index, module in enumerate(model.modules()):
        if index % 3 == 1:
            module.eval()
    return model


@pytest.mark.parametrize("name", ["mlp", "resnet20_w1"])
def test_matchers_do_not_mutate_inputs(name: str) -> None:
    model_a = _mixed_flags(make_model(name, seed=51))
    model_b = _mixed_flags(make_model(name, seed=52))
    snap_a, snap_b = snapshot(model_a), snapshot(model_b)
    spec = spec_for(name)
    batches = data_batches(2, 16)
    batches_before = [x.clone() for x in batches]
    ma.match_weights(model_a, model_b, spec)
    assert_unchanged(model_a, snap_a)
    assert_unchanged(model_b, snap_b)
    ma.match_activations(model_a, model_b, batches, spec, progress=False)
    assert_unchanged(model_a, snap_a)
    assert_unchanged(model_b, snap_b)
    assert all(torch.equal(x, y) for x, y in zip(batches, batches_before))


@pytest.mark.parametrize("cost", ["correlation", "covariance", "euclidean"])
def test_activation_stats_match_batch_formulas_with_large_offsets(cost: str) -> None:
    from maskalign.matching.activation import ActivationStats

    generator = torch.Generator().manual_seed(5)
    a = torch.randn(300, 6, dtype=torch.float64, generator=generator) * 3 + 1e4
    b = a[:, [2, 0, 1, 5, 4, 3]] + 0.1 * torch.randn(300, 6, dtype=torch.float64, generator=generator)
    stats = ActivationStats(6)
    for start in range(0, 300, 70):  # uneven chunks
        stats.update(a[start : start + 70], b[start : start + 70])
    joint = torch.cat([a, b], 1).T
    expected = {
        "correlation": torch.corrcoef(joint)[:6, 6:],
        "covariance": torch.cov(joint, correction=0)[:6, 6:],
        "euclidean": -((a[:, :, None] - b[:, None, :]) ** 2).mean(0),
    }[cost]
    scale = float(expected.abs().max())
    assert float((stats.similarity(cost) - expected).abs().max()) <= 1e-10 * scale


def test_activation_stats_dead_unit_has_zero_correlation() -> None:
    from maskalign.matching.activation import ActivationStats

    a = torch.randn(50, 3, dtype=torch.float64)
    a[:, 1] = 2.0  # a constant unit
    stats = ActivationStats(3)
    stats.update(a, a)
    corr = stats.similarity()
    assert torch.isfinite(corr).all()
    assert torch.equal(corr[1], torch.zeros(3, dtype=torch.float64))
    assert corr[0, 0] == pytest.approx(1.0) and corr[2, 2] == pytest.approx(1.0)


def test_permutation_save_load_round_trip_and_rejects_other_spec(tmp_path) -> None:
    spec = spec_for("mlp")
    pi = ma.random_permutation(spec, torch.Generator().manual_seed(3))
    path = tmp_path / "perm.pt"
    pi.save(path)
    assert ma.Permutation.load(path, spec) == pi
    with pytest.raises(SpecMismatchError, match="fingerprint"):
        ma.Permutation.load(path, spec_for("resnet20_w1"))
    torch.save({"not": "a permutation"}, tmp_path / "other.pt")
    with pytest.raises(ma.SpecError, match="not a permutation"):
        ma.Permutation.load(tmp_path / "other.pt", spec)
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ma.SpecError, match=r"text\.pt is not a permutation saved by maskalign \(\w+\)"):
        ma.Permutation.load(tmp_path / "text.pt", spec)


def test_match_weights_restarts_keep_the_best_run() -> None:
    """On this pair (a 4-layer MLP of width 6, found by a search over small
    MLPs and seeds) the first run stops in a worse local optimum than the
    second (greedy sweep in reverse order): restarts improve the result."""

    def mlp(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return MLP(in_features=16, hidden=(6, 6, 6, 6), num_classes=4).double()

    a, b = mlp(11), mlp(1011)
    spec = ma.build_spec(a, (torch.randn(2, 16, dtype=torch.float64),))
    single = ma.match_weights(a, b, spec, seed=0)
    several = ma.match_weights(a, b, spec, restarts=4, seed=0)
    finals = several.report["restarts"]
    assert len(finals) == 4
    assert finals[0] == single.report["objective"][-1]  # the first run is the single run
    best = several.report["objective"][-1]
    assert best == max(finals) and best > single.report["objective"][-1] + 0.1  # here by 2.76 -> 3.34
    assert finals.index(best) != 0
    assert several != single

    def objective(pi: ma.Permutation) -> float:  # J computed from the weights, not from the report
        aligned, reference = ma.apply_permutation(a, pi).state_dict(), b.state_dict()
        return sum(float((aligned[k] * reference[k]).sum()) for k in aligned if is_permuted(spec, k))

    assert objective(several) == pytest.approx(best, rel=1e-12)  # the result is the best run's permutation
    assert objective(single) == pytest.approx(single.report["objective"][-1], rel=1e-12)
    with pytest.raises(ValueError, match="restarts"):
        ma.match_weights(a, b, spec, restarts=0)
