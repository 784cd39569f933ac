"""``ma.transfer_mask``: A's mask moved into B's units in one call, equal to
the three steps it stands for (spec, matching, permute_mask), for both
matchers, on a model with a planted permutation (the answer is known) and
a transformers model (keyword batches)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize

import maskalign as ma
from maskalign.models import MLP, ResNet20


def _planted() -> tuple[MLP, MLP, ma.Permutation, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model_b = MLP(in_features=64, hidden=(48, 32), num_classes=10)
    spec = ma.build_spec(model_b, torch.randn(2, 64))
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(3))
    model_a = ma.apply_permutation(model_b, sigma)
    return model_a, model_b, sigma, ma.global_magnitude_prune(model_a, sparsity=0.8)


DATA = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_a_planted_relabelling_is_undone(method: str) -> None:
    model_a, model_b, sigma, mask_a = _planted()
    mask_b = ma.transfer_mask(model_a, mask_a, model_b, DATA, method=method, progress=False)
    expected = ma.permute_mask(mask_a, sigma.inverse())
    assert mask_b.keys() == mask_a.keys()
    assert all(torch.equal(mask_b[n], expected[n]) for n in mask_a)
    assert any(not torch.equal(mask_b[n], mask_a[n]) for n in mask_a)  # it did move the mask
    # the transferred mask prunes exactly B's copies of the weights A's mask pruned
    for name, mask in mask_a.items():
        kept_a = dict(model_a.named_parameters())[name].detach()[mask].abs().sort().values
        kept_b = dict(model_b.named_parameters())[name].detach()[mask_b[name]].abs().sort().values
        assert torch.equal(kept_a, kept_b)


@pytest.mark.slow  # five matchings of a ResNet20
def test_equals_the_three_steps_on_a_trained_like_resnet() -> None:
    torch.manual_seed(1)
    model_a, model_b = randomize(ResNet20(width=1), seed=1), randomize(ResNet20(width=1), seed=2)
    data = [(torch.randn(16, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (16,))) for _ in range(2)]
    mask_a = ma.global_magnitude_prune(model_a, sparsity=0.9)
    spec = ma.build_spec(model_a, data[0][0][:2])
    steps = ma.permute_mask(mask_a, ma.match_activations(model_a, model_b, data, spec, progress=False))
    one_call = ma.transfer_mask(model_a, mask_a, model_b, data, progress=False, points="pre")
    pre = ma.permute_mask(mask_a, ma.match_activations(model_a, model_b, data, spec, progress=False, points="pre"))
    assert all(torch.equal(one_call[n], pre[n]) for n in mask_a)  # options reach the matcher
    default = ma.transfer_mask(model_a, mask_a, model_b, data, progress=False)
    assert all(torch.equal(default[n], steps[n]) for n in mask_a)
    weights = ma.transfer_mask(model_a, mask_a, model_b, data, method="weight", progress=False)
    expected = ma.permute_mask(mask_a, ma.match_weights(model_a, model_b, spec, progress=False))
    assert all(torch.equal(weights[n], expected[n]) for n in mask_a)


@pytest.mark.slow
def test_keyword_batches_of_a_transformers_model() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    torch.manual_seed(2)
    model_a, model_b = transformers.BertModel(config).eval(), transformers.BertModel(config).eval()
    data = [{"input_ids": torch.randint(0, 50, (4, 12))} for _ in range(2)]
    mask_a = ma.global_magnitude_prune(model_a, sparsity=0.5)
    mask_b = ma.transfer_mask(model_a, mask_a, model_b, data, progress=False)
    spec = ma.build_spec(model_a, (), data[0])
    expected = ma.permute_mask(mask_a, ma.match_activations(model_a, model_b, data, spec, progress=False))
    assert all(torch.equal(mask_b[n], expected[n]) for n in mask_a)


def test_bad_input_is_named() -> None:
    model_a, model_b, _, mask_a = _planted()
    with pytest.raises(ma.ArgumentValueError, match=r"^Argument 'method' is 'weights'; pass one of .*'weight'"):
        ma.transfer_mask(model_a, mask_a, model_b, DATA, method="weights")
    with pytest.raises(
        ma.ArgumentTypeError, match=r"^Option 'pionts' is not an option of match_activations; .*'points'"
    ):
        ma.transfer_mask(model_a, mask_a, model_b, DATA, pionts="pre")
    with pytest.raises(ma.ArgumentTypeError, match=r"^Option 'points' is not an option of match_weights"):
        ma.transfer_mask(model_a, mask_a, model_b, DATA, method="weight", points="pre")
    with pytest.raises(ma.DataError, match=r"^Argument 'data' is missing"):
        ma.transfer_mask(model_a, mask_a, model_b)
    with pytest.raises(ma.DataError, match=r"^Argument 'data' holds no batch"):
        ma.transfer_mask(model_a, mask_a, model_b, [], method="weight")
    with pytest.raises(ma.MaskError, match="layers.9.weight"):
        ma.transfer_mask(model_a, {"layers.9.weight": mask_a["layers.0.weight"]}, model_b, DATA, progress=False)
    before = {n: m.clone() for n, m in mask_a.items()}
    ma.transfer_mask(model_a, mask_a, model_b, DATA, progress=False)
    assert all(torch.equal(before[n], mask_a[n]) for n in mask_a)  # not modified
