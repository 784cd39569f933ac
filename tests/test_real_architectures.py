"""build_spec on real architectures: small random-weight ``transformers``
models (no downloads) and the shipped ResNet20 / VGG11.

Every model is float64 in eval mode with noise added to every parameter and
random BatchNorm statistics. For each: the coverage target of the issue
("Permutation spec for any nn.Module: every real architecture, never a wrong
answer"): 1.0 for the convolutional networks, >= 0.95 for ViT, BERT and GPT-2;
a random permutation keeps the function (max relative error <= 1e-9 of the
output scale) and its inverse restores the weights bit for bit; a negative
control per group (one member axis permuted alone changes the outputs). Run
with ``pytest -s`` to see the coverage of each model.

Each model is built and exported once per module (MobileNetV2 takes seconds).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import aliased, relative_error, state_dicts_equal
from torch import Tensor, nn
from zoo.harness import nontrivial_permutation, one_member_alone

import maskalign as ma
from maskalign.models import VGG11, ResNet20

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# real architectures built and exported: the slow tier; one torch thread (conftest's one_thread)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

KEEP_TOL = 1e-9
BREAK_TOL = 1e-6
DT = torch.float64

COVERAGE_TARGETS = {
    "resnet": 1.0,
    "convnext": 1.0,
    "mobilenet_v2": 1.0,
    "resnet20": 1.0,
    "vgg11": 1.0,
    "vit": 0.95,
    "bert": 0.95,
    "gpt2": 0.95,
}


def nontrivial(model: nn.Module, example: Any, seed: int = 0, noise: float = 0.1) -> nn.Module:
    """float64, eval; N(0, noise^2) added to every parameter (so LayerNorm
    scales differ from 1 and biases from 0) and BatchNorm statistics that are
    random but realistic: measured on a random calibration batch, then each
    channel's mean shifted and variance scaled at random. (Purely random
    statistics wash the input out of a deep net: its outputs barely depend on
    the input, and every check on them would pass vacuously.)"""
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * noise)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average
                m.train()
            model(example)
            for m in norms:
                m.momentum = 0.1
                n = m.num_features
                m.running_mean.add_(torch.randn(n, generator=g, dtype=DT) * 0.1 * m.running_var.sqrt())
                m.running_var.mul_(torch.rand(n, generator=g, dtype=DT) * 0.6 + 0.7)
            model.eval()
    return model


def ids(batch: int, length: int, vocab: int, seed: int = 0) -> Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def images(batch: int, channels: int, size: int, seed: int = 0) -> Tensor:
    return torch.randn(batch, channels, size, size, dtype=DT, generator=torch.Generator().manual_seed(seed))


def make(name: str, seed: int = 0) -> tuple[nn.Module, tuple[Any, ...]]:
    """A small model with non-trivial float64 weights and its example inputs
    (``seed`` picks other inputs of the same shape)."""
    tr = transformers
    if name == "resnet":
        config = tr.ResNetConfig(
            num_channels=3,
            embedding_size=10,
            hidden_sizes=[16, 24],
            depths=[1, 2],
            layer_type="bottleneck",
            num_labels=7,
        )
        model, x = tr.ResNetForImageClassification(config), images(2, 3, 32, seed)
    elif name == "convnext":
        config = tr.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 12], depths=[1, 2], num_stages=2, num_labels=7, layer_scale_init_value=0.5
        )
        model, x = tr.ConvNextForImageClassification(config), images(2, 3, 32, seed)
    elif name == "mobilenet_v2":
        config = tr.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=7)
        model, x = tr.MobileNetV2ForImageClassification(config), images(2, 3, 32, seed)
    elif name == "vit":
        config = tr.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=40,
            num_labels=7,
        )
        model, x = tr.ViTForImageClassification(config), images(2, 3, 16, seed)
    elif name == "bert":
        config = tr.BertConfig(
            vocab_size=50,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=40,
            max_position_embeddings=16,
            num_labels=7,
        )
        model, x = tr.BertForSequenceClassification(config), ids(2, 9, 50, seed)
    elif name == "gpt2":
        config = tr.GPT2Config(
            vocab_size=50,
            n_positions=16,
            n_embd=24,
            n_layer=2,
            n_head=3,
            bos_token_id=0,
            eos_token_id=1,
            use_cache=False,
        )
        model, x = tr.GPT2LMHeadModel(config), ids(2, 9, 50, seed)
    elif name == "resnet20":
        model, x = ResNet20(width=1, num_classes=7, in_channels=3), images(2, 3, 16, seed)
    elif name == "vgg11":
        model, x = VGG11(num_classes=7, in_channels=3, image_size=16), images(2, 3, 16, seed)
    else:
        raise ValueError(name)
    calibration = images(16, *x.shape[1:3], seed=99) if x.is_floating_point() else None
    return nontrivial(model, calibration), (x,)


@dataclass
class Built:
    model: nn.Module
    inputs: tuple[Any, ...]
    spec: ma.PermutationSpec
    seconds: float


_BUILT: dict[str, Built] = {}


def built(name: str) -> Built:
    """The model, inputs and spec of ``name``, built once per module."""
    if name not in _BUILT:
        model, inputs = make(name)
        start = time.perf_counter()
        spec = ma.build_spec(model, inputs)
        _BUILT[name] = Built(model, inputs, spec, time.perf_counter() - start)
    return _BUILT[name]


@pytest.fixture(scope="module", autouse=True)
def _clear_cache() -> Iterator[None]:
    yield
    _BUILT.clear()


def logits(model: nn.Module, inputs: tuple[Any, ...]) -> Tensor:
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, Tensor) else out.logits


def check_model(name: str, *, tol: float = KEEP_TOL) -> ma.PermutationSpec:
    b = built(name)
    model, inputs, spec = b.model, b.inputs, b.spec
    print(
        f"\n{name}: coverage {spec.coverage:.4f}, {len(spec.groups)} groups, "
        f"{len(spec.frozen)} frozen axes, build_spec {b.seconds:.2f}s"
    )
    # the outputs depend on the inputs (else every check below is vacuous)
    other = make(name, seed=1)[1]
    expected = logits(model, inputs)
    assert relative_error(logits(model, other), expected) > 1e-2
    state = model.state_dict()
    assert set(state) <= set(spec.axes)
    assert all(spec.shapes[k] == tuple(v.shape) for k, v in state.items())
    assert spec.groups

    pi = nontrivial_permutation(spec, seed=1)
    report = ma.check_equivalence(model, pi, inputs, rtol=tol)
    assert report.ok and report.max_rel <= tol, report
    permuted = ma.apply_permutation(model, pi)
    assert not state_dicts_equal(permuted.state_dict(), state)
    assert relative_error(logits(permuted, inputs), expected) <= tol
    restored = ma.apply_permutation(permuted, pi.inverse())
    assert state_dicts_equal(restored.state_dict(), state)

    # negative control, once per group with several members: a weight matrix
    # (or kernel) of the group permuted alone changes the outputs
    tied = aliased(model)
    checked = 0
    for group in spec.groups.values():
        if len(group.members) < 2:
            continue
        member = next(((t, d) for t, d in group.members if len(spec.shapes[t]) >= 2 and t not in tied), None)
        if member is None:
            continue
        wrong = one_member_alone(model, spec, group.name, *member)
        change = relative_error(logits(wrong, inputs), expected)
        assert change > BREAK_TOL, f"{name}: permuting {member} alone ({group.name}) kept the outputs"
        checked += 1
    assert checked >= max(1, len(spec.groups) // 2)
    return spec


@pytest.mark.parametrize("name", list(COVERAGE_TARGETS))
def test_real_architecture(name: str) -> None:
    spec = check_model(name)
    assert spec.coverage >= COVERAGE_TARGETS[name], spec.summary()


def test_resnet20_and_vgg11_group_counts() -> None:
    assert len(built("resnet20").spec.groups) == 12  # 3 streams + 9 inner
    assert len(built("vgg11").spec.groups) == 8  # one per conv


def test_gpt2_tied_lm_head_and_frozen_vocabulary() -> None:
    spec = built("gpt2").spec
    assert spec.axes["lm_head.weight"] == spec.axes["transformer.wte.weight"]
    assert spec.axes["transformer.wte.weight"][0].group is None  # vocabulary
    assert spec.axes["transformer.wte.weight"][1].group is not None  # residual stream
    assert spec.axes["transformer.wpe.weight"][1].group == spec.axes["transformer.wte.weight"][1].group


def test_attention_heads_grouped_in_vit_and_bert() -> None:
    for name, query, key in (
        ("vit", "vit.layers.0.attention.q_proj", "vit.layers.0.attention.k_proj"),
        ("bert", "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key"),
    ):
        spec = built(name).spec
        q, k = spec.axes[f"{query}.weight"][0], spec.axes[f"{key}.weight"][0]
        assert q == k, name
        assert [p.size for p in q.parts] == [3, 8], name  # 3 heads x 8 features
        assert all(p.group is not None for p in q.parts), name


# ------------------------------------------------------------- tiny Llama
def tiny_llama() -> tuple[nn.Module, tuple[Tensor]]:
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return nontrivial(transformers.LlamaForCausalLM(config), None), (ids(2, 9, 50),)


def _rms_norm_in_input_dtype(self: nn.Module, hidden_states: Tensor) -> Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_tiny_llama_with_grouped_query_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = tiny_llama()  # build_spec's time on llamas: benchmarks/bench_spec.py
    spec = ma.build_spec(model, inputs)
    # residual stream, MLP and attention groups of every layer
    layer = "model.layers.0"
    stream = spec.axes["model.embed_tokens.weight"][1].group
    assert stream is not None and spec.groups[stream].size == 32
    assert spec.axes[f"{layer}.mlp.gate_proj.weight"][0] == spec.axes[f"{layer}.mlp.up_proj.weight"][0]
    assert spec.axes[f"{layer}.mlp.gate_proj.weight"][0].group is not None
    pi = nontrivial_permutation(spec, seed=2)
    # stock LlamaRMSNorm computes in float32, so float64 outputs only agree to
    # float32 rounding (summation order of the variance changes) ...
    report = ma.check_equivalence(model, pi, inputs, rtol=1e-5)
    assert report.ok, report
    expected = logits(model, inputs)
    wrong = one_member_alone(model, spec, stream, f"{layer}.self_attn.q_proj.weight", 1)
    assert relative_error(logits(wrong, inputs), expected) > 1e-3  # negative control
    # ... and with RMSNorm in the model's dtype the permutation is exact
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    report = ma.check_equivalence(model, pi, inputs, rtol=KEEP_TOL)
    assert report.ok and report.max_rel <= KEEP_TOL, report
