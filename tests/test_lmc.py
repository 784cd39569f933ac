"""Tests for maskalign.evaluation.lmc: interpolation, BatchNorm re-estimation, loss barriers."""

from __future__ import annotations

import copy
from collections.abc import Sequence

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
from maskalign.evaluation.lmc import LMCResult
from maskalign.models import MLP


def labelled_batches(count: int = 2, size: int = 32, seed: int = 200) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (make_inputs(size, seed=seed + i), torch.randint(0, 10, (size,), generator=generator)) for i in range(count)
    ]


@torch.no_grad()
def outputs(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


# ------------------------------------ references written here, not by the library
def mixed_state(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``model_a`` loaded with ``(1 - alpha) a + alpha b`` for every
    floating-point state_dict entry (integer buffers from ``model_a``)."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    out = copy.deepcopy(model_a)
    out.load_state_dict({k: (1 - alpha) * v + alpha * sb[k] if v.is_floating_point() else v for k, v in sa.items()})
    return out


@torch.no_grad()
def loss_and_error(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """Mean cross-entropy per sample (log-sum-exp minus the target's logit)
    and error rate of a copy of ``model`` in eval mode over ``data``."""
    model = copy.deepcopy(model).eval()
    loss, wrong, count = 0.0, 0, 0
    for x, y in data:
        logits = model(x)
        loss += float((logits.logsumexp(-1) - logits[torch.arange(len(y)), y]).sum())
        wrong += int((logits.argmax(-1) != y).sum())
        count += len(y)
    return loss / count, wrong / count


@torch.no_grad()
def with_bn_averaged(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the plain
    average over ``data`` (PyTorch's cumulative average, ``momentum=None``,
    in train mode), then put in eval mode."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for x, _ in data:
        model(x)
    return model.eval()


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
    assert result.alphas == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    loss, error = loss_and_error(model, data)
    assert 0.0 < error < 1.0  # not a degenerate model
    assert result.losses == pytest.approx([loss] * 5, rel=1e-12)
    assert result.errors == pytest.approx([error] * 5)
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
    # the unaligned path: its endpoints are the two models' own losses, its
    # midpoint the loss of the state_dicts averaged here
    result = ma.lmc_barrier(permuted, model, data, num_points=3)
    expected = [loss_and_error(m, data) for m in (permuted, mixed_state(permuted, model, 0.5), model)]
    assert result.losses == pytest.approx([loss for loss, _ in expected], rel=1e-10)
    assert result.errors == pytest.approx([error for _, error in expected], abs=1e-12)
    # the midpoint of two relabelled copies is another function: the check
    # tells the midpoint from the endpoints (which compute one function)
    assert expected[0][0] == pytest.approx(expected[2][0], rel=1e-12)
    assert abs(expected[1][0] - expected[0][0]) > 1e-3


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
    expected = [loss_and_error(mixed_state(model_a, model_b, a), data)[1] for a in (0.0, 1 / 3, 2 / 3, 1.0)]
    assert result.losses == pytest.approx(expected, abs=1e-12)
    assert result.errors == pytest.approx(expected, abs=1e-12)


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


@pytest.mark.slow
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
    # every point: the state_dicts averaged here, BN statistics re-estimated
    # on bn_data (the endpoints included)
    expected = [
        loss_and_error(with_bn_averaged(mixed_state(model_a, model_b, a), bn_data), data)[0] for a in (0.0, 0.5, 1.0)
    ]
    assert result.losses == pytest.approx(expected, rel=1e-9)
    # the re-estimation matters: without it the endpoints' losses differ
    assert abs(loss_and_error(model_a, data)[0] - expected[0]) > 1e-3
    assert abs(loss_and_error(model_b, data)[0] - expected[2]) > 1e-3

    # a model with itself, BN reset at every alpha: zero barrier
    same = ma.lmc_barrier(model_a, model_a, data, num_points=3, bn_data=bn_data)
    assert abs(same.barrier) < 1e-9
    assert same.losses == pytest.approx([expected[0]] * 3, rel=1e-9)


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


@torch.no_grad()
def mlp_hidden_stats(model: nn.Sequential, data: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """Per-unit mean and (population) std over every sample of ``data`` of the
    outputs of ``model[0]`` and ``model[2]`` (the hidden linear layers of the
    Sequential MLP below), computed by running the layers by hand."""
    x = torch.cat([x for x, _ in data])
    h0 = F.linear(x, model[0].weight, model[0].bias)
    h2 = F.linear(torch.relu(h0), model[2].weight, model[2].bias)
    return [(h.mean(0), h.std(0, correction=0)) for h in (h0, h2)]


def test_repair_matches_interpolated_channel_statistics() -> None:
    torch.manual_seed(11)

    def mlp() -> nn.Sequential:
        return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3)).double()

    a, b = mlp(), mlp()
    data = [(torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))) for _ in range(3)]
    mid = mixed_state(a, b, 0.3)
    plain = copy.deepcopy(mid)
    snap_a, snap_b = snapshot(a), snapshot(b)
    assert ma.repair(mid, a, b, 0.3, data) is mid
    assert_unchanged(a, snap_a)
    assert_unchanged(b, snap_b)
    got, sa, sb = mlp_hidden_stats(mid, data), mlp_hidden_stats(a, data), mlp_hidden_stats(b, data)
    before = mlp_hidden_stats(plain, data)
    for layer in range(2):
        for stat in range(2):  # 0: mean, 1: std
            target = 0.7 * sa[layer][stat] + 0.3 * sb[layer][stat]
            torch.testing.assert_close(got[layer][stat], target, rtol=1e-9, atol=1e-9)
            if (layer, stat) != (0, 0):  # the first layer's mean is linear in the weights: already right
                assert not torch.allclose(before[layer][stat], target, atol=1e-3)  # REPAIR had work to do
    # the output layer is left alone
    assert torch.equal(mid[4].weight, plain[4].weight) and torch.equal(mid[4].bias, plain[4].bias)
    # lmc_barrier(repair_data=...) evaluates the repaired models: at alpha 0.5,
    # the interpolation REPAIRed here
    result = ma.lmc_barrier(a, b, data, num_points=3, repair_data=data)
    repaired = ma.repair(mixed_state(a, b, 0.5), a, b, 0.5, data)
    assert result.losses[1] == pytest.approx(loss_and_error(repaired, data)[0], rel=1e-10)
    assert result.losses[1] != pytest.approx(loss_and_error(mixed_state(a, b, 0.5), data)[0], rel=1e-6)


class SmallConvNet(nn.Module):
    """Two hidden convs without BatchNorm (the second without a bias), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


@torch.no_grad()
def conv_hidden_stats(model: SmallConvNet, data: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """Per-channel mean and (population) std over batch and positions of the
    outputs of conv1 and conv2, from ``F.conv2d`` run by hand."""
    x = torch.cat([x for x, _ in data])
    h1 = F.conv2d(x, model.conv1.weight, model.conv1.bias)
    h2 = F.conv2d(torch.relu(h1), model.conv2.weight, model.conv2.bias, padding=1)
    return [(h.mean((0, 2, 3)), h.std((0, 2, 3), correction=0)) for h in (h1, h2)]


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_repair_on_conv_layers_matches_interpolated_channel_statistics(alpha: float) -> None:
    def net(seed: int, gain: float) -> SmallConvNet:
        torch.manual_seed(seed)
        model = SmallConvNet().double()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * gain)
        return model

    a, b = net(20, 0.4), net(21, 1.1)  # endpoints of different scales: REPAIR moves means and stds
    g = torch.Generator().manual_seed(22)
    images = [torch.randn(n, 2, 7, 6, dtype=torch.float64, generator=g) for n in (8, 5)]  # batches of two sizes
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in images]
    mid = mixed_state(a, b, alpha)
    plain = copy.deepcopy(mid)
    snap_a, snap_b = snapshot(a), snapshot(b)
    ma.repair(mid, a, b, alpha, data)
    assert_unchanged(a, snap_a)
    assert_unchanged(b, snap_b)
    got, sa, sb, before = (conv_hidden_stats(m, data) for m in (mid, a, b, plain))
    for layer in range(2):
        for stat in range(2):  # 0: mean, 1: std
            target = (1 - alpha) * sa[layer][stat] + alpha * sb[layer][stat]
            torch.testing.assert_close(got[layer][stat], target, rtol=1e-9, atol=1e-9)
            if (layer, stat) != (0, 0):  # the first layer's mean is linear in the weights: already right
                assert not torch.allclose(before[layer][stat], target, atol=1e-2)  # REPAIR had work to do
    # conv2 had no bias: REPAIR gave it one (the mean shift needs it)
    assert isinstance(mid.conv2.bias, nn.Parameter) and mid.conv2.bias.shape == (4,)
    # REPAIR rescales each output channel and shifts it: conv1's weights are
    # the plain interpolation's, each output channel times one positive factor
    ratio = mid.conv1.weight / plain.conv1.weight
    assert bool((ratio > 0).all())
    torch.testing.assert_close(ratio, ratio.flatten(1)[:, :1, None, None].expand_as(ratio), rtol=1e-9, atol=0)
    # the output layer is left alone
    assert torch.equal(mid.fc.weight, plain.fc.weight) and torch.equal(mid.fc.bias, plain.fc.bias)
