"""Tests for maskalign.models: output shapes, parameter counts, names, build_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskalign.models import MLP, MODEL_NAMES, VGG11, ResNet20, build_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet20_param_count(width: int, num_classes: int, in_channels: int) -> int:
    """Parameter count of ResNet20 from the architecture (He et al. 2016, option B)."""

    def conv_bn(c_in: int, c_out: int, k: int) -> int:
        return c_in * c_out * k * k + 2 * c_out

    total = conv_bn(in_channels, 16 * width, 3)
    c_in = 16 * width
    for c_out in (16 * width, 32 * width, 64 * width):
        for _ in range(3):
            total += conv_bn(c_in, c_out, 3) + conv_bn(c_out, c_out, 3)
            if c_in != c_out:
                total += conv_bn(c_in, c_out, 1)
            c_in = c_out
    return total + 64 * width * num_classes + num_classes


@pytest.mark.parametrize("width", [1, 2])
def test_resnet20_output_shape(width: int) -> None:
    model = ResNet20(width=width, num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet20_param_count_width_1() -> None:
    model = ResNet20(width=1, num_classes=10)
    expected = _resnet20_param_count(width=1, num_classes=10, in_channels=3)
    assert _n_params(model) == expected
    assert 0.26e6 < expected < 0.28e6


def test_resnet20_param_count_width_2_cifar100() -> None:
    model = ResNet20(width=2, num_classes=100, in_channels=1)
    assert _n_params(model) == _resnet20_param_count(width=2, num_classes=100, in_channels=1)


def test_resnet20_structure_and_names() -> None:
    model = ResNet20(width=1)
    names = dict(model.named_parameters())
    expected = (
        "conv1.weight",
        "bn1.weight",
        "layer1.0.conv1.weight",
        "layer3.2.bn2.bias",
        "fc.weight",
    )
    for name in expected:
        assert name in names
    assert "conv1.bias" not in names
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)
    for stage in (model.layer2, model.layer3):
        first = stage[0]
        assert first.conv1.stride == (2, 2)
        assert first.shortcut.conv.bias is None
        assert isinstance(first.shortcut.bn, nn.BatchNorm2d)
    assert model.fc.in_features == 64


def test_resnet20_runs_on_digit_sized_input() -> None:
    model = ResNet20(in_channels=1).eval()
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize(("image_size", "in_channels"), [(32, 3), (8, 1)])
def test_vgg11_output_shape(image_size: int, in_channels: int) -> None:
    model = VGG11(num_classes=10, in_channels=in_channels, image_size=image_size).eval()
    x = torch.randn(2, in_channels, image_size, image_size)
    assert model(x).shape == (2, 10)
    assert model.classifier.in_features == 512


def test_vgg11_skips_pools_at_1x1_and_sizes_classifier_from_image() -> None:
    pools_8 = [m for m in VGG11(image_size=8).features if isinstance(m, nn.MaxPool2d)]
    pools_32 = [m for m in VGG11(image_size=32).features if isinstance(m, nn.MaxPool2d)]
    assert (len(pools_8), len(pools_32)) == (3, 5)
    model = VGG11(width=2, image_size=64, num_classes=3).eval()
    assert model.classifier.in_features == 2 * 512 * 2 * 2
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_vgg11_structure_and_names() -> None:
    model = VGG11(width=2)
    names = dict(model.named_parameters())
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    base = (64, 128, 256, 256, 512, 512, 512, 512)
    assert [c.out_channels for c in convs] == [2 * c for c in base]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    expected = (
        "features.conv1.weight",
        "features.bn1.weight",
        "features.conv8.weight",
        "classifier.weight",
    )
    for name in expected:
        assert name in names
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


def test_mlp_accepts_images_and_flat_input() -> None:
    model = MLP(in_features=64, hidden=(32, 16), num_classes=5)
    images = torch.randn(4, 1, 8, 8)
    out = model(images)
    assert out.shape == (4, 5)
    torch.testing.assert_close(model(images.flatten(1)), out)
    assert [layer.out_features for layer in model.layers] == [32, 16]
    assert model.fc.in_features == 16


def test_mlp_rejects_empty_hidden() -> None:
    with pytest.raises(ValueError, match="hidden"):
        MLP(hidden=())


@pytest.mark.parametrize("name", ["mlp", "ResNet20", "VGG11"])
def test_build_model_case_insensitive(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1, image_size=8).eval()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_build_model_mlp_width_multiplies_hidden() -> None:
    model = build_model("mlp", num_classes=4, in_channels=3, image_size=4, width=2, hidden=(8, 6))
    assert isinstance(model, MLP)
    assert model.layers[0].in_features == 3 * 4 * 4
    assert [layer.out_features for layer in model.layers] == [16, 12]


def test_build_model_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet56", num_classes=10, in_channels=3, image_size=32)
    for valid in MODEL_NAMES:
        assert valid in str(info.value)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_are_fx_traceable(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1, image_size=8).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.slow
def test_vgg11_without_batch_norm_is_the_plain_vgg_and_permutes_exactly() -> None:
    """``batch_norm=False``: no BatchNorm, a bias on every convolution; a random
    permutation of its spec keeps the function (float64, non-trivial weights),
    a wrong one (one conv's output channels rolled alone) does not."""
    import maskalign as ma

    torch.manual_seed(0)
    model = VGG11(num_classes=5, in_channels=3, image_size=16, batch_norm=False).double().eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is not None for c in convs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    spec = ma.build_spec(model, x)
    assert len(spec.groups) == 8 and spec.coverage == 1.0
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(ma.apply_permutation(model, perm)(x), expected, rtol=1e-10, atol=1e-12)
        wrong = ma.apply_permutation(model, perm)
        wrong.features.conv3.weight.copy_(wrong.features.conv3.weight.roll(1, 0))
        assert (wrong(x) - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.slow
def test_plain_vgg11_keeps_the_signal_at_initialisation() -> None:
    """Without BatchNorm, PyTorch's default init shrinks the signal about 4x
    per layer (features std ~0.006 on unit-variance inputs) and SGD stays at
    chance; He initialisation keeps it (~0.1). Both measured on the same draw."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    model = VGG11(batch_norm=False)
    he = float(model.features(x).std())
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()  # PyTorch's default initialisation
    default = float(model.features(x).std())
    assert he > 0.05 and he > 10 * default
    assert all(float(m.bias.abs().max()) == 0.0 for m in VGG11(batch_norm=False).features if isinstance(m, nn.Conv2d))
