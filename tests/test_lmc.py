"""Tests for maskalign.evaluation.lmc: interpolation, BatchNorm re-estimation, loss barriers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_unchanged,
    make_inputs,
    make_model,
    randomize_bn,
    snapshot,
    spec_for,
    state_dicts_equal,
)
from torch import Tensor, nn

import maskalign as ma
from maskalign.errors import DataError, SpecMismatchError
from maskalign.evaluation.lmc import LMCResult, evaluate
from maskalign.models import MLP


def labelled_batches(count: int = 2, size: int = 32, seed: int = 200) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (make_inputs(size, seed=seed + i), torch.randint(0, 10, (size,), generator=generator)) for i in range(count)
    ]


@torch.no_grad()
def outputs(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


# --------------------------------------------------------------- interpolate
@pytest.mark.parametrize("name", ["mlp", "resnet20_w1"])
def test_interpolate_endpoints_and_midpoint(name: str) -> None:
    model_a, model_b = make_model(name, seed=61), make_model(name, seed=62)
    # distinct integer buffers: they must come from model_a at every alpha
    for module in model_b.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.num_batches_tracked.fill_(7)
    snap_a, snap_b = snapshot(model_a), snapshot(model_b)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    x = make_inputs(8, seed=63)

    at0 = ma.interpolate(model_a, model_b, 0.0)
    at1 = ma.interpolate(model_a, model_b, 1.0)
    mid = ma.interpolate(model_a, model_b, 0.5)
    assert at0 is not model_a and at1 is not model_b
    assert state_dicts_equal(at0.state_dict(), sa)
    s1, smid = at1.state_dict(), mid.state_dict()
    for key in sa:
        if sa[key].is_floating_point():
            torch.testing.assert_close(s1[key], sb[key], rtol=0, atol=1e-15)
            torch.testing.assert_close(smid[key], (sa[key] + sb[key]) / 2, rtol=1e-15, atol=1e-15)
            assert s1[key].dtype == sa[key].dtype
        else:
            assert torch.equal(s1[key], sa[key]) and torch.equal(smid[key], sa[key]), key
    torch.testing.assert_close(outputs(at0, x), outputs(model_a, x), rtol=0, atol=0)
    torch.testing.assert_close(outputs(at1, x), outputs(model_b, x), rtol=1e-12, atol=1e-12)
    # the midpoint is a genuinely different model
    assert not torch.allclose(outputs(mid, x), outputs(model_a, x))
    assert_unchanged(model_a, snap_a)
    assert_unchanged(model_b, snap_b)


def test_interpolate_is_affine_in_alpha() -> None:
    model_a, model_b = make_model("mlp", seed=64), make_model("mlp", seed=65)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for alpha in (0.1, 0.3, 0.75, 0.9):
        mixed = ma.interpolate(model_a, model_b, alpha).state_dict()
        for key in sa:
            torch.testing.assert_close(mixed[key], (1 - alpha) * sa[key] + alpha * sb[key], rtol=1e-13, atol=1e-14)


def test_interpolate_rejects_different_architectures() -> None:
    torch.manual_seed(66)
    a = MLP(in_features=64, hidden=(128, 128)).double()
    b = MLP(in_features=64, hidden=(64, 64)).double()
    with pytest.raises(SpecMismatchError, match="layers.0.weight"):
        ma.interpolate(a, b, 0.5)
    c = MLP(in_features=64, hidden=(128, 128, 128)).double()
    with pytest.raises(SpecMismatchError, match="layers.2"):
        ma.interpolate(a, c, 0.5)


# ----------------------------------------------------------------- LMCResult
def test_lmc_result_barriers_hand_computed() -> None:
    result = LMCResult(
        alphas=[0.0, 0.25, 0.5, 0.75, 1.0],
        losses=[1.0, 3.0, 2.0, 1.5, 2.0],
        errors=[0.1, 0.5, 0.3, 0.2, 0.3],
    )
    # linear baseline 1 + alpha: [1, 1.25, 1.5, 1.75, 2]; excess [0, 1.75, 0.5, -0.25, 0]
    assert result.barrier == pytest.approx(1.75)
    # max loss 3 minus mean of endpoints 1.5
    assert result.barrier_mean == pytest.approx(1.5)
    # baseline 0.1 + 0.2 alpha: [0.1, 0.15, 0.2, 0.25, 0.3]; excess [0, .35, .1, -.05, 0]
    assert result.error_barrier == pytest.approx(0.35)


def test_lmc_result_convex_path_has_zero_barrier() -> None:
    result = LMCResult(alphas=[0.0, 0.5, 1.0], losses=[2.0, 0.5, 1.0], errors=[0.2, 0.1, 0.4])
    assert result.barrier == 0.0
    assert result.error_barrier == 0.0
    # the mean definition differs: max(L) = L(0) = 2, mean of endpoints 1.5
    assert result.barrier_mean == pytest.approx(0.5)


# ------------------------------------------------------------------ barrier
def test_lmc_barrier_of_model_with_itself_is_zero() -> None:
    model = make_model("mlp", seed=67)
    data = labelled_batches()
    snap = snapshot(model)
    result = ma.lmc_barrier(model, model, data, num_points=5)
    assert result.alphas[0] == 0.0 and result.alphas[-1] == 1.0 and len(result.alphas) == 5
    loss, acc = evaluate(model, data)
    assert result.losses == pytest.approx([loss] * 5, rel=1e-12)
    assert result.errors == pytest.approx([1 - acc] * 5)
    assert abs(result.barrier) < 1e-10
    assert abs(result.barrier_mean) < 1e-10
    assert abs(result.error_barrier) < 1e-12
    assert_unchanged(model, snap)


def test_lmc_barrier_of_aligned_copy_is_zero_and_endpoints_match_evaluate() -> None:
    model = make_model("mlp", seed=68)
    spec = spec_for("mlp")
    permuted = ma.apply_permutation(model, ma.random_permutation(spec, torch.Generator().manual_seed(69)))
    data = labelled_batches()
    # aligning the permuted copy back gives the same model: zero barrier
    pi = ma.match_weights(permuted, model, spec)
    aligned = ma.apply_permutation(permuted, pi)
    assert abs(ma.lmc_barrier(aligned, model, data, num_points=3).barrier) < 1e-10
    # the endpoints of the unaligned path match the two models' own losses
    result = ma.lmc_barrier(permuted, model, data, num_points=3)
    assert result.losses[0] == pytest.approx(evaluate(permuted, data)[0], rel=1e-12)
    assert result.losses[-1] == pytest.approx(evaluate(model, data)[0], rel=1e-12)
    assert result.losses[1] == pytest.approx(evaluate(ma.interpolate(permuted, model, 0.5), data)[0], rel=1e-12)


def test_lmc_barrier_argument_errors() -> None:
    model = make_model("mlp", seed=70)
    with pytest.raises(ValueError):
        ma.lmc_barrier(model, model, labelled_batches(), num_points=1)
    with pytest.raises(DataError):
        ma.lmc_barrier(model, model, [], num_points=2)
    torch.manual_seed(71)
    other = MLP(in_features=64, hidden=(64, 64)).double()
    with pytest.raises(SpecMismatchError):
        ma.lmc_barrier(model, other, labelled_batches(), num_points=2)


def test_lmc_barrier_custom_loss_fn() -> None:
    model_a, model_b = make_model("mlp", seed=72), make_model("mlp", seed=73)
    data = labelled_batches()

    def zero_one_sum(out: Tensor, y: Tensor) -> Tensor:
        return (out.argmax(-1) != y).double().sum()

    result = ma.lmc_barrier(model_a, model_b, data, zero_one_sum, num_points=4)
    assert result.losses == pytest.approx(result.errors, abs=1e-12)


# --------------------------------------------------------------- BatchNorm
class SmallBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3, momentum=0.3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def test_reset_bn_stats_plain_average_and_restores_modes() -> None:
    torch.manual_seed(74)
    model = SmallBNNet().double().eval()
    randomize_bn(model, torch.Generator().manual_seed(75))
    model.bn2.train()  # mixed flags
    flags = [m.training for m in model.modules()]
    data = labelled_batches(3, 16, seed=76)

    ma.reset_bn_stats(model, data)

    assert model.bn.momentum == 0.3 and model.bn2.momentum is None
    assert [m.training for m in model.modules()] == flags
    # running stats of the first BN: average over batches of the per-batch mean
    # and unbiased variance of its input (all batches have one size)
    with torch.no_grad():
        pre = [model.conv(x) for x, _ in data]
    means = torch.stack([p.mean(dim=(0, 2, 3)) for p in pre])
    variances = torch.stack([p.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for p in pre])
    torch.testing.assert_close(model.bn.running_mean, means.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.bn.running_var, variances.mean(0), rtol=1e-10, atol=1e-12)
    assert int(model.bn.num_batches_tracked) == 3


def test_reset_bn_stats_num_batches_and_no_bn_is_noop() -> None:
    torch.manual_seed(77)
    model = SmallBNNet().double().eval()
    data = labelled_batches(3, 16, seed=78)
    ma.reset_bn_stats(model, data, num_batches=1)
    assert int(model.bn.num_batches_tracked) == 1
    with torch.no_grad():
        expected = model.conv(data[0][0]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn.running_mean, expected, rtol=1e-10, atol=1e-12)

    mlp = make_model("mlp", seed=79)
    snap = snapshot(mlp)
    ma.reset_bn_stats(mlp, data)
    assert_unchanged(mlp, snap)


def test_lmc_barrier_with_bn_data_resets_each_alpha_and_keeps_inputs() -> None:
    model_a = make_model("resnet20_w1", seed=80)
    model_b = make_model("resnet20_w1", seed=81)
    for model in (model_a, model_b):
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.05
    model_b.train()
    snap_a, snap_b = snapshot(model_a), snapshot(model_b)
    data = labelled_batches(1, 16, seed=82)
    bn_data = labelled_batches(2, 32, seed=83)

    result = ma.lmc_barrier(model_a, model_b, data, num_points=3, bn_data=bn_data)
    assert_unchanged(model_a, snap_a)
    assert_unchanged(model_b, snap_b)
    # endpoint 0: model_a with BN statistics re-estimated on bn_data
    reset_a = ma.interpolate(model_a, model_a, 0.0)
    ma.reset_bn_stats(reset_a, bn_data)
    assert all(m.momentum == 0.05 for m in reset_a.modules() if isinstance(m, nn.BatchNorm2d))
    assert not state_dicts_equal(reset_a.state_dict(), model_a.state_dict())
    assert result.losses[0] == pytest.approx(evaluate(reset_a, data)[0], rel=1e-10)

    # a model with itself, BN reset at every alpha: zero barrier
    same = ma.lmc_barrier(model_a, model_a, data, num_points=3, bn_data=bn_data)
    assert abs(same.barrier) < 1e-9
    assert same.losses[0] == pytest.approx(result.losses[0], rel=1e-12)


def test_reset_bn_stats_rejects_empty_data() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(DataError, match="no batches"):
        ma.reset_bn_stats(model, iter([]))


def test_interpolate_uses_effective_weights_of_sparse_models() -> None:
    torch.manual_seed(3)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    mask_a = {"weight": torch.rand(3, 4) > 0.5}
    mask_b = {"weight": torch.rand(3, 4) > 0.5}
    mid = ma.interpolate(a, b, 0.5, mask_a, mask_b)
    expected = 0.5 * (a.weight * mask_a["weight"]) + 0.5 * (b.weight * mask_b["weight"])
    assert torch.allclose(mid.weight, expected)
    assert torch.allclose(mid.bias, 0.5 * (a.bias + b.bias))
    with pytest.raises(ma.MaskError, match="nope"):
        ma.interpolate(a, b, 0.5, {"nope": torch.ones(1, dtype=torch.bool)})


def test_repair_matches_interpolated_channel_statistics() -> None:
    from maskalign.evaluation.lmc import _channel_stats

    torch.manual_seed(11)

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3)).double()

    a, b = mlp(), mlp()
    data = [(torch.randn(64, 6, dtype=torch.float64), torch.zeros(64, dtype=torch.long)) for _ in range(3)]
    mid = ma.interpolate(a, b, 0.3)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    ma.repair(mid, a, b, 0.3, data)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())  # endpoints untouched
    names = ["0", "2"]
    got = _channel_stats(mid, names, data)
    sa, sb = _channel_stats(a, names, data), _channel_stats(b, names, data)
    for name in names:
        assert torch.allclose(got[name][0], 0.7 * sa[name][0] + 0.3 * sb[name][0], atol=1e-9)
        assert torch.allclose(got[name][1], 0.7 * sa[name][1] + 0.3 * sb[name][1], atol=1e-9)
    # the output layer is left alone
    assert torch.equal(mid[4].weight, ma.interpolate(a, b, 0.3)[4].weight)
    result = ma.lmc_barrier(a, b, data, num_points=3, repair_data=data)
    assert len(result.losses) == 3
