"""ResNet50 (``maskalign.models.ResNet50``): torchvision's layout and names,
parameter count, ``build_model("resnet50")``, and maskalign's support: a
random permutation of its spec keeps the function in eval and train mode
(float64, non-trivial weights and BatchNorm statistics), a wrong one does not.

The state_dict round trip with torchvision's own ``resnet50()`` is in
``tests/vision/test_imagenet.py`` (needs torchvision)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, relative_error
from torch import nn

import maskalign as ma
from maskalign.models import MODEL_NAMES, Bottleneck, ResNet50, build_model

# every key of torchvision's resnet50().state_dict() lies in one of these
# patterns (blocks per stage 3, 4, 6, 3; downsample in block 0 of each stage)
_BLOCKS = (3, 4, 6, 3)


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest.py)


def _torchvision_keys() -> list[str]:
    """torchvision's resnet50 state_dict keys, in order, written out from its layout."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{b}" for b in bn)]
    for stage, blocks in enumerate(_BLOCKS, start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            for j in (1, 2, 3):
                keys += [f"{p}.conv{j}.weight", *(f"{p}.bn{j}.{b}" for b in bn)]
            if i == 0:
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{b}" for b in bn)]
    return [*keys, "fc.weight", "fc.bias"]


def test_resnet50_names_shapes_and_parameter_count() -> None:
    model = ResNet50()
    state = model.state_dict()
    assert list(state) == _torchvision_keys()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert state["layer4.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["fc.weight"].shape == (1000, 2048)
    for stage in (model.layer2, model.layer3, model.layer4):  # v1.5: the stride sits on conv2
        first = stage[0]
        assert isinstance(first, Bottleneck)
        assert (first.conv1.stride, first.conv2.stride) == ((1, 1), (2, 2))
        assert first.downsample is not None and first.downsample[0].stride == (2, 2)
    assert model.layer1[1].downsample is None
    assert {type(model.maxpool), type(model.avgpool), type(model.relu)} == {
        nn.MaxPool2d,
        nn.AdaptiveAvgPool2d,
        nn.ReLU,
    }


def test_resnet50_initialisation_and_zero_init_residual() -> None:
    torch.manual_seed(0)
    model = ResNet50(num_classes=10)
    assert all(float(m.weight.detach().min()) == 1.0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    std = float(model.conv1.weight.detach().std())  # Kaiming normal, fan-out = 64 * 7 * 7
    assert abs(std - (2 / (64 * 49)) ** 0.5) < 0.1 * std
    zeroed = ResNet50(num_classes=10, zero_init_residual=True)
    blocks = [m for m in zeroed.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == sum(_BLOCKS)
    assert all(float(b.bn3.weight.detach().abs().max()) == 0.0 for b in blocks)
    assert float(zeroed.bn1.weight.detach().min()) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("width", "in_channels", "size"), [(1, 3, 64), (2, 1, 32)])
def test_resnet50_output_shape_width_and_channels(width: int, in_channels: int, size: int) -> None:
    model = ResNet50(num_classes=7, in_channels=in_channels, width=width).eval()
    assert model.fc.in_features == 2048 * width
    assert model.conv1.in_channels == in_channels
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


def test_build_model_resnet50() -> None:
    assert "resnet50" in MODEL_NAMES
    model = build_model("ResNet50", num_classes=5, in_channels=1, image_size=32, width=1)
    assert isinstance(model, ResNet50)
    assert model.fc.out_features == 5 and model.conv1.in_channels == 1
    with pytest.raises(ValueError, match="width"):
        ResNet50(width=0)


@pytest.mark.slow  # ResNet50 in float64, eval and train mode
def test_resnet50_random_permutation_keeps_the_function_wrong_one_moves_it() -> None:
    model = randomize(ResNet50(num_classes=10), seed=3)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spec = ma.build_spec(model, x)
    assert spec.coverage == 1.0
    # one stem group, one residual stream per stage, two inner groups per block
    assert len(spec.groups) == 1 + 4 + 2 * sum(_BLOCKS)
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(1))
    permuted = ma.apply_permutation(model, perm)
    with torch.no_grad():
        expected = model(x)
        assert relative_error(permuted(x), expected) < 1e-10
        model.train()
        permuted.train()
        expected_train = model(x)
        assert relative_error(permuted(x), expected_train) < 1e-10
        assert relative_error(expected_train, expected) > 1e-3  # train mode really differs (batch statistics)
        model.eval()
        wrong = ma.apply_permutation(model, perm).eval()
        wrong.layer3[2].conv2.weight.copy_(wrong.layer3[2].conv2.weight.roll(1, 0))
        assert relative_error(wrong(x), expected) > 1e-3


def test_imagenet_preset_carries_the_papers_settings_and_says_where_each_comes_from() -> None:
    import dataclasses
    import json

    from maskalign.repro.presets import PRESET_SOURCES, ReproduceConfig, get_preset

    config = get_preset("imagenet-resnet50")
    assert (config.dataset, config.model, config.width) == ("imagenet", "resnet50", 1)
    assert config.sparsities == (0.8, 0.9, 0.95)  # ICML 2025, Fig. 7
    assert config.methods == ("lth", "naive", "permuted")
    assert (config.epochs, config.batch_size, config.lr, config.weight_decay) == (90, 256, 0.1, 1e-4)
    sources = PRESET_SOURCES["imagenet-resnet50"]
    default = ReproduceConfig()
    changed = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(default, f.name)}
    assert changed - {"data_root"} <= set(sources), changed - set(sources)
    for key in ("momentum", "image_size", "match_samples", "metric", "label_smoothing"):
        assert key in sources
    assert all(v.split(":")[0] in ("paper", "standard", "assumed") for v in sources.values())
    json.dumps({"config": config.to_dict(), "sources": dict(sources)})  # recordable in results.json
