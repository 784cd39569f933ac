"""Self-recovery at scale: weight matching finds 100 of 100 random
permutations of the MLP / ResNet20 family, and both matchers recover the
permutation of transformer models with nested head groups."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, spec_for

import maskalign as ma

pytestmark = pytest.mark.slow  # matching at scale: hundreds of matchings, transformer models


@pytest.mark.parametrize("name", ["mlp", "resnet20_w1"])
def test_match_weights_recovers_100_of_100(name: str) -> None:
    model = make_model(name, seed=71)
    spec = spec_for(name)
    generator = torch.Generator().manual_seed(72)
    recovered = 0
    for _ in range(100):
        sigma = ma.random_permutation(spec, generator)
        recovered += ma.match_weights(model, ma.apply_permutation(model, sigma), spec) == sigma
    assert recovered == 100


def _transformers():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _noisy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for parameter in model.parameters():  # far from init: attention is not uniform
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def _vit(t):  # type: ignore[no-untyped-def]
    config = t.ViTConfig(
        num_labels=5,
        image_size=16,
        patch_size=4,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=40,
    )
    return t.ViTForImageClassification(config), lambda g: (torch.randn(16, 3, 16, 16, generator=g).double(),)


def _gpt2(t):  # type: ignore[no-untyped-def]
    config = t.GPT2Config(
        vocab_size=50, n_embd=24, n_layer=2, n_head=3, n_positions=32, use_cache=False, bos_token_id=0, eos_token_id=0
    )
    return t.GPT2LMHeadModel(config), lambda g: (torch.randint(0, 50, (8, 12), generator=g),)


@pytest.mark.parametrize("build", [_vit, _gpt2], ids=["vit", "gpt2"])
def test_both_matchers_recover_transformer_permutations(build) -> None:  # type: ignore[no-untyped-def]
    model, make_inputs = build(_transformers())
    model = _noisy(model, seed=73)
    generator = torch.Generator().manual_seed(74)
    batches = [make_inputs(generator) for _ in range(4)]
    spec = ma.build_spec(model, batches[0])
    nested = [g for g, grp in spec.groups.items() if grp.size == 3]  # the heads
    assert nested, "expected a group of attention heads"
    for _ in range(2):
        sigma = ma.random_permutation(spec, generator)
        permuted = ma.apply_permutation(model, sigma)
        assert ma.match_weights(model, permuted, spec) == sigma
        found = ma.match_activations(model, permuted, batches, spec, progress=False, input_fn=lambda b: b)
        assert found == sigma
