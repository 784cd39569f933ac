"""Tests for the report of activation matching (``pi.report["groups"]``).

Under ``cost="correlation"`` every group's ``"before"`` and ``"after"`` are
mean Pearson correlations of matched units: in ``[-1, 1]``, also for groups
nested in joint axes (attention heads, the dims inside a head), whose matched
total sums one correlation per position of the axis; ``"after"`` is at
least ``"before"``, and 1 for a model against a permuted copy of itself. A
plain group's values are checked against correlations computed here from raw
activations captured with forward hooks.

Every match here uses ``points="pre"``: the hooks capture the inputs of the
nonlinearities, and on post-activations a dead ReLU unit (zero variance) has
correlation 0 even with itself, so "after" of a self-match is the share of
live units rather than 1 (checked in the last test).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TwoHeadAttention, make_inputs, make_model, randomize, spec_for
from torch import Tensor, nn

import maskalign as ma
from maskalign.spec.axes import co_groups

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 50, 12
HIDDEN, HEADS = 32, 2
TOL = 1e-9


def small_bert(seed: int) -> nn.Module:
    """A 2-layer BertModel (hidden 32, 2 heads of 16 dims) with random weights
    far from the initialisation (float64, eval)."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return randomize(transformers.BertModel(config, add_pooling_layer=False), seed=seed)


def token_batches(count: int = 3, batch: int = 8, seed: int = 0) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (batch, SEQ), generator=generator)} for _ in range(count)]


_BERT_SPEC: list[ma.PermutationSpec] = []


def bert_spec() -> ma.PermutationSpec:
    if not _BERT_SPEC:
        _BERT_SPEC.append(ma.build_spec(small_bert(0), (), token_batches(1)[0]))
    return _BERT_SPEC[0]


def nested_groups(spec: ma.PermutationSpec) -> list[str]:
    """Groups that share an activation axis with another group (heads, head dims)."""
    return [g for g, points in spec.activations.items() if any(co_groups(p.tree, g) for p in points)]


def assert_sensible(report: dict[str, dict[str, float]], spec: ma.PermutationSpec) -> None:
    assert set(report) == set(spec.groups)
    for group, values in report.items():
        for key in ("before", "after"):
            assert -1.0 - TOL <= values[key] <= 1.0 + TOL, (group, key, values[key])
        assert values["after"] >= values["before"] - TOL, (group, values)


def matched_correlation(acts_a: Tensor, acts_b: Tensor, index: Tensor) -> tuple[float, float]:
    """Mean Pearson correlation of A's unit ``index[j]`` and B's unit ``j`` over
    samples (rows), and that of unit ``j`` with unit ``j`` (the identity)."""
    a, b = acts_a.reshape(-1, acts_a.shape[-1]).numpy(), acts_b.reshape(-1, acts_b.shape[-1]).numpy()
    n = a.shape[1]
    corr = np.corrcoef(a, b, rowvar=False)[:n, n:]  # corr[i, j]: A's unit i, B's unit j
    return float(np.mean(np.diag(corr))), float(np.mean(corr[index.numpy(), np.arange(n)]))


def hooked_outputs(model: nn.Module, module: nn.Module, batches: list[object]) -> Tensor:
    """The outputs of ``module`` over ``batches`` (run through ``model``), stacked."""
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        handle.remove()
    return torch.cat(seen)


# ------------------------------------------------------------------ BERT
def test_bert_has_head_groups() -> None:
    spec = bert_spec()
    sizes = {spec.groups[g].size for g in nested_groups(spec)}
    assert HEADS in sizes and HIDDEN // HEADS in sizes


def test_bert_report_of_independent_models_is_a_correlation() -> None:
    spec = bert_spec()
    pi = ma.match_activations(small_bert(1), small_bert(2), token_batches(), spec, points="pre", progress=False)
    assert_sensible(pi.report["groups"], spec)
    for group in nested_groups(spec):  # the heads were the groups reported above 1
        assert pi.report["groups"][group]["after"] > pi.report["groups"][group]["before"], group


def test_bert_self_matching_reports_correlation_one() -> None:
    spec, model = bert_spec(), small_bert(3)
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(4))
    pi = ma.match_activations(
        model, ma.apply_permutation(model, sigma), token_batches(), spec, points="pre", progress=False
    )
    assert pi == sigma
    report = pi.report["groups"]
    assert_sensible(report, spec)
    for group in spec.groups:
        assert report[group]["after"] == pytest.approx(1.0, abs=TOL), group
    assert any(report[group]["before"] < 0.5 for group in nested_groups(spec))


@pytest.mark.parametrize("cost", ["covariance", "euclidean"])
def test_bert_self_matching_other_costs_are_means_per_pair(cost: str) -> None:
    """``after`` is the mean over matched pairs: for a permuted copy under
    ``"euclidean"`` every matched pair is at distance 0."""
    spec, model = bert_spec(), small_bert(3)
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(4))
    pi = ma.match_activations(
        model, ma.apply_permutation(model, sigma), token_batches(), spec, cost=cost, points="pre", progress=False
    )
    assert pi == sigma
    for group, values in pi.report["groups"].items():
        assert values["after"] >= values["before"] - TOL, group
        if cost == "euclidean":
            assert values["after"] == pytest.approx(0.0, abs=1e-9), group


def test_bert_plain_group_matches_a_reference_from_hooks() -> None:
    """The intermediate (MLP) units of layer 0: their pre-activation is the
    output of ``intermediate.dense``, pooled over batch and sequence."""
    spec = bert_spec()
    model_a, model_b, batches = small_bert(5), small_bert(6), token_batches(seed=7)
    group = "encoder.layer.0.intermediate.dense.weight:0"
    assert group in spec.groups and group not in nested_groups(spec)
    pi = ma.match_activations(model_a, model_b, batches, spec, points="pre", progress=False)

    def outputs(model: nn.Module) -> Tensor:
        return hooked_outputs(model, model.encoder.layer[0].intermediate.dense, batches)

    before, after = matched_correlation(outputs(model_a), outputs(model_b), pi[group])
    assert pi.report["groups"][group]["before"] == pytest.approx(before, abs=1e-9)
    assert pi.report["groups"][group]["after"] == pytest.approx(after, abs=1e-9)


# ------------------------------------------------------- MLP and ResNet20
@pytest.mark.parametrize("name", ["mlp", "resnet20_w1"])
def test_report_of_independent_models_is_a_correlation(name: str) -> None:
    spec = spec_for(name)
    data = [make_inputs(64, seed=300 + i) for i in range(2)]
    pi = ma.match_activations(
        make_model(name, seed=41), make_model(name, seed=42), data, spec, points="pre", progress=False
    )
    assert_sensible(pi.report["groups"], spec)


@pytest.mark.parametrize("name", ["mlp", "resnet20_w1"])
def test_self_matching_reports_correlation_one(name: str) -> None:
    spec, model = spec_for(name), make_model(name, seed=43)
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(44))
    data = [make_inputs(64, seed=310 + i) for i in range(2)]
    pi = ma.match_activations(model, ma.apply_permutation(model, sigma), data, spec, points="pre", progress=False)
    assert pi == sigma
    assert_sensible(pi.report["groups"], spec)
    for group, values in pi.report["groups"].items():
        assert values["after"] == pytest.approx(1.0, abs=TOL), group


def test_mlp_plain_group_matches_a_reference_from_hooks() -> None:
    model_a, model_b = make_model("mlp", seed=45), make_model("mlp", seed=46)
    data = [make_inputs(64, seed=320 + i) for i in range(3)]
    pi = ma.match_activations(model_a, model_b, data, spec_for("mlp"), points="pre", progress=False)
    for i, layer in enumerate(model_a.layers):
        group = f"layers.{i}.weight:0"
        other = model_b.layers[i]
        before, after = matched_correlation(
            hooked_outputs(model_a, layer, data), hooked_outputs(model_b, other, data), pi[group]
        )
        assert after > before
        assert pi.report["groups"][group]["before"] == pytest.approx(before, abs=1e-9)
        assert pi.report["groups"][group]["after"] == pytest.approx(after, abs=1e-9)


# ---------------------------------------------- a small attention model
def test_attention_heads_report_a_mean_correlation() -> None:
    """Its heads' "after" under self-matching was once reported as 8.0 (a sum
    over the 8 positions of the joint axis, not a mean)."""
    generator = torch.Generator().manual_seed(8)
    data = [torch.randn(8, 6, 5, dtype=torch.float64, generator=generator) for _ in range(3)]
    model, other = randomize(TwoHeadAttention(), seed=9), randomize(TwoHeadAttention(), seed=10)
    spec = ma.build_spec(model, (data[0],))
    assert nested_groups(spec)
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(11))
    itself = ma.match_activations(model, ma.apply_permutation(model, sigma), data, spec, points="pre", progress=False)
    assert itself == sigma
    for group, values in itself.report["groups"].items():
        assert values["after"] == pytest.approx(1.0, abs=TOL), group
    pi = ma.match_activations(model, other, data, spec, points="pre", progress=False)
    assert_sensible(pi.report["groups"], spec)


def test_post_activation_self_match_reports_the_share_of_live_units() -> None:
    """With ``points="post"`` a unit that is 0 on every input has no
    correlation, even with itself: a self-match reports the share of units
    that are live, counted here directly from the ReLU outputs."""
    model = randomize(make_model("mlp", seed=51), seed=52)
    spec = spec_for("mlp")
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(53))
    data = [make_inputs(64, seed=54 + i) for i in range(3)]
    pi = ma.match_activations(model, ma.apply_permutation(model, sigma), data, spec, points="post", progress=False)
    assert pi == sigma
    x = torch.cat(data)
    hidden, shares = x.flatten(1), []
    for index, layer in enumerate(model.layers):
        hidden = torch.relu(layer(hidden))
        shares.append(float((hidden.std(0) > 0).double().mean()))
        assert pi.report["groups"][f"layers.{index}.weight:0"]["after"] == pytest.approx(shares[-1], abs=1e-9)
    assert min(shares) < 1  # the premise: some unit is dead, so "after" is not 1
