"""Which activations activation matching correlates: ``points`` ("pre", "post",
"both", per group), ``stream_points`` ("all", "last"), and the pre-activation
tie-break of post-activation statistics.

The references here are computed independently of maskalign's statistics:
forward hooks on the modules collect the values, numpy computes the Pearson
correlation, scipy solves the assignment. Dead units (a ReLU unit whose bias
is so negative that it is 0 on every input) are what makes the tie-break
necessary; the negative controls show that without it post-activation
matching does not recover a permutation.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_inputs, make_model, spec_for
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

import maskalign as ma
import maskalign.matching.activation as am
from maskalign.errors import ArgumentTypeError, ArgumentValueError
from maskalign.models import MLP

RECIPES = [(points, stream) for points in ("pre", "post", "both") for stream in ("all", "last")]
COSTS = ("correlation", "covariance", "euclidean")
STAGE1 = "conv1.weight:0"  # ResNet20's first residual stream (stem + layer1)


# ----------------------------------------------------------------- helpers
def dead_mlp(seed: int, dead: tuple[int, ...] = (1, 4, 5, 9, 17, 30), hidden: tuple[int, int] = (32, 24)) -> MLP:
    """A float64 ReLU MLP for ``(N, 1, 8, 8)`` inputs whose first hidden layer
    has dead units ``dead`` (bias -1e3: 0 after the ReLU on every input, yet
    different pre-activations) and whose second has three."""
    torch.manual_seed(seed)
    model = MLP(in_features=64, hidden=hidden).double().eval()
    with torch.no_grad():
        model.layers[0].bias[list(dead)] = -1e3  # type: ignore[operator]
        model.layers[1].bias[[0, 7, 11]] = -1e3  # type: ignore[operator]
    return model


def batches(count: int = 4, size: int = 64, seed: int = 300) -> list[Tensor]:
    return [make_inputs(size, seed=seed + i) for i in range(count)]


def spec_of(model: nn.Module) -> ma.PermutationSpec:
    return ma.build_spec(model, (make_inputs(4, seed=1),))


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n, n)`` Pearson correlation of ``a``'s columns with ``b``'s (samples
    on rows), 0 where either unit has zero variance."""
    a, b = a - a.mean(0), b - b.mean(0)
    cov = a.T @ b / len(a)
    denom = np.outer(np.sqrt((a**2).mean(0)), np.sqrt((b**2).mean(0)))
    return np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)


def rows(x: Tensor) -> np.ndarray:
    """``(N, C, ...)`` activations as ``(samples, C)`` rows."""
    return x.movedim(1, -1).reshape(-1, x.shape[1]).numpy()


def record(model: nn.Module, modules: dict[str, nn.Module], data: list[Tensor]) -> dict[str, np.ndarray]:
    """Output of every module in ``modules`` over ``data``, as ``(samples, C)`` rows."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in modules}
    handles = [
        module.register_forward_hook(lambda _m, _i, y, name=name: out[name].append(rows(y.detach())))
        for name, module in modules.items()
    ]
    try:
        with torch.no_grad():
            for x in data:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: np.concatenate(parts) for name, parts in out.items()}


def mlp_values(model: Any, data: list[Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """``{"pre": {layer: ...}, "post": {layer: ...}}`` of the MLP's hidden layers."""
    linear = record(model, {f"layers.{i}": layer for i, layer in enumerate(model.layers)}, data)
    return {"pre": linear, "post": {k: np.maximum(v, 0.0) for k, v in linear.items()}}


def stage1_values(model: Any, data: list[Tensor]) -> dict[str, list[np.ndarray]]:
    """The values of ResNet20's first residual stream, by hand: the stem's
    BatchNorm output and each layer1 block's sum (before its ReLU), and the
    ReLU of each (the stem's ReLU and each block's output)."""
    blocks = list(model.layer1)
    modules: dict[str, nn.Module] = {"stem": model.bn1}
    for i, block in enumerate(blocks):
        modules.update({f"bn2.{i}": block.bn2, f"short.{i}": block.shortcut, f"out.{i}": block})
    got = record(model, modules, data)
    pre = [got["stem"]] + [got[f"bn2.{i}"] + got[f"short.{i}"] for i in range(len(blocks))]
    post = [np.maximum(got["stem"], 0.0)] + [got[f"out.{i}"] for i in range(len(blocks))]
    assert np.allclose(post[1:], [np.maximum(p, 0.0) for p in pre[1:]])  # the hooks see what forward computes
    return {"pre": pre, "post": post}


def pooled(values: dict[str, list[np.ndarray]], points: str, stream: str) -> np.ndarray:
    """The samples a recipe pools for one group, by hand."""
    chosen = {"pre": ["pre"], "post": ["post"], "both": ["pre", "post"]}[points]
    parts = [values[kind][-1:] if stream == "last" else values[kind] for kind in chosen]
    return np.concatenate([v for part in parts for v in part])


def lap(similarity: np.ndarray) -> np.ndarray:
    """``idx`` with ``idx[j]`` = A's unit matched to B's unit ``j`` (maximum total)."""
    r, c = linear_sum_assignment(similarity, maximize=True)
    idx = np.empty(len(r), dtype=np.int64)
    idx[c] = r
    return idx


def never_iterated() -> Iterator[Tensor]:
    raise AssertionError("data was read before the arguments were checked")
    yield torch.zeros(1)  # pragma: no cover


# -------------------------------------------------------------- the spec
@pytest.mark.slow
def test_spec_lists_pre_and_post_points_of_every_nonlinearity() -> None:
    """Every ReLU of ResNet20 gives a post point (the relu node) and a pre
    point (its input node) to the groups it carries, in graph order."""
    spec = spec_for("resnet20_w1")
    graph = spec.captured.flat_graph  # type: ignore[union-attr]
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    relus = [node for node in graph.nodes if node.target == torch.ops.aten.relu.default]
    assert len(relus) == 19  # stem + 2 per block
    post = {p.node for points in spec.activations.values() for p in points if p.kind == "post"}
    pre = {p.node for points in spec.activations.values() for p in points if p.kind == "pre"}
    assert post == {node.name for node in relus}
    assert pre == {node.args[0].name for node in relus}
    for points in spec.activations.values():
        assert [order[p.node] for p in points] == sorted(order[p.node] for p in points)
        assert {p.kind for p in points} == {"pre", "post"}
    stage = spec.activations[STAGE1]
    assert [p.node for p in stage if p.kind == "post"] == ["relu", "relu_2", "relu_4", "relu_6"]
    # the last of them feeds layer2: it is the stage's output
    last = next(node for node in relus if node.name == "relu_6")
    assert {user.target for user in last.users} >= {torch.ops.aten.conv2d.default}


@pytest.mark.slow
def test_groups_without_nonlinearity_inputs_list_values() -> None:
    """A group that meets no nonlinearity (GPT-2's residual stream, the heads)
    lists every other value as kind "value"; "post" falls back to them."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=50, n_embd=24, n_layer=2, n_head=3, n_positions=32, use_cache=False, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).double().eval()
    spec = ma.build_spec(model, (torch.randint(0, 50, (2, 12)),))
    stream = "transformer.wte.weight:1"
    assert {p.kind for p in spec.activations[stream]} == {"value"}
    mlp = next(g for g in spec.groups if g.endswith("mlp.c_fc.weight:1"))
    assert sorted(p.kind for p in spec.activations[mlp]) == ["post", "pre"]
    for points in ("pre", "post", "both"):
        primary, tiebreak = am.select_points(spec.activations[stream], stream, points, "all")
        assert primary == spec.activations[stream] and tiebreak == []
        primary, _ = am.select_points(spec.activations[stream], stream, points, "last")
        assert [p.node for p in primary] == [spec.activations[stream][-1].node]
    heads = next(g for g, grp in spec.groups.items() if grp.size == 3)
    primary, _ = am.select_points(spec.activations[heads], heads, "post", "last")
    assert primary == spec.activations[heads]  # nested groups keep all their points


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "vgg11"])
def test_stream_points_do_not_change_plain_networks(name: str) -> None:
    """Without residual streams every group has one point per kind, so
    "last" selects exactly what "all" does."""
    spec = spec_for(name)
    for group, points in spec.activations.items():
        assert sorted(p.kind for p in points) == ["post", "pre"], group
        for choice in ("pre", "post", "both"):
            assert am.select_points(points, group, choice, "all") == am.select_points(points, group, choice, "last")


# ------------------------------------------------- independent references
@pytest.mark.parametrize(("points", "stream"), RECIPES)
def test_mlp_statistics_match_a_hand_computed_correlation(points: str, stream: str) -> None:
    """Two independent MLPs with dead units: the mean correlation at the
    identity is that of the hand-pooled pre/post values, the matched total is
    the optimum of the hand matrix, and (for "pre"/"both", no ties) the
    permutation is the hand LAP's."""
    model_a, model_b = dead_mlp(1), dead_mlp(2)
    data = batches()
    spec = spec_of(model_a)
    pi = ma.match_activations(model_a, model_b, data, spec, points=points, stream_points=stream, progress=False)
    va, vb = mlp_values(model_a, data), mlp_values(model_b, data)
    for i in range(2):
        group = f"layers.{i}.weight:0"
        a = pooled({k: [v[f"layers.{i}"]] for k, v in va.items()}, points, stream)
        b = pooled({k: [v[f"layers.{i}"]] for k, v in vb.items()}, points, stream)
        sim = pearson(a, b)
        n = sim.shape[0]
        report = pi.report["groups"][group]
        assert report["before"] == pytest.approx(float(np.trace(sim)) / n, abs=1e-10)
        best = lap(sim)
        optimum = float(sim[best, np.arange(n)].sum())
        assert report["after"] == pytest.approx(optimum / n, abs=1e-10)
        found = pi[group].numpy()
        assert float(sim[found, np.arange(n)].sum()) == pytest.approx(optimum, abs=1e-9)
        if points == "post":  # dead units tie: they are matched by their pre-activations
            pre = pearson(va["pre"][f"layers.{i}"], vb["pre"][f"layers.{i}"])
            dead_a = np.flatnonzero(np.all(sim == 0, axis=1))
            assert len(dead_a) >= 3
            cols = np.array([np.flatnonzero(found == r)[0] for r in dead_a])
            sub = pre[np.ix_(dead_a, cols)]
            assert float(sub[lap(sub), np.arange(len(cols))].sum()) == pytest.approx(
                float(pre[found[cols], cols].sum()), abs=1e-9
            )
            assert report["tied"] >= len(dead_a)
        else:
            assert np.array_equal(found, best)


@pytest.mark.slow
@pytest.mark.parametrize(("points", "stream"), RECIPES)
def test_resnet_stream_statistics_match_the_hand_pooled_values(points: str, stream: str) -> None:
    """ResNet20's first stream, by hooks: "post"/"last" is the output of
    layer1's last block (the paper's choice), "pre"/"all" the stem's
    BatchNorm output and every block's sum, and so on; a block's inner group
    is the same for "all" and "last"."""
    model_a: Any = make_model("resnet20_w1", seed=41)
    model_b: Any = make_model("resnet20_w1", seed=42)
    spec = spec_for("resnet20_w1")
    data = batches(3, 32)
    pi = ma.match_activations(model_a, model_b, data, spec, points=points, stream_points=stream, progress=False)
    sim = pearson(
        pooled(stage1_values(model_a, data), points, stream), pooled(stage1_values(model_b, data), points, stream)
    )
    n = sim.shape[0]
    report = pi.report["groups"][STAGE1]
    assert report["before"] == pytest.approx(float(np.trace(sim)) / n, abs=1e-10)
    best = lap(sim)
    assert report["after"] == pytest.approx(float(sim[best, np.arange(n)].sum()) / n, abs=1e-10)
    if points != "post":
        assert np.array_equal(pi[STAGE1].numpy(), best)
    inner = "layer1.1.conv1.weight:0"
    bn = record(model_a, {"bn": model_a.layer1[1].bn1}, data)["bn"]
    bn_b = record(model_b, {"bn": model_b.layer1[1].bn1}, data)["bn"]
    values = {"pre": [bn], "post": [np.maximum(bn, 0.0)]}
    values_b = {"pre": [bn_b], "post": [np.maximum(bn_b, 0.0)]}
    inner_sim = pearson(pooled(values, points, "all"), pooled(values_b, points, "all"))
    assert pi.report["groups"][inner]["before"] == pytest.approx(float(np.trace(inner_sim)) / len(inner_sim), abs=1e-10)


# ------------------------------------------------------- self-recovery
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize(("points", "stream"), RECIPES)
def test_dead_unit_mlp_self_recovery_for_every_recipe_and_cost(points: str, stream: str, cost: str) -> None:
    model = dead_mlp(3)
    spec = spec_of(model)
    data = batches()
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        sigma = ma.random_permutation(spec, generator)
        permuted = ma.apply_permutation(model, sigma)
        kw: dict[str, Any] = {"points": points, "stream_points": stream, "cost": cost, "progress": False}
        assert ma.match_activations(model, permuted, data, spec, **kw) == sigma
        assert ma.match_activations(permuted, model, data, spec, **kw) == sigma.inverse()


def test_dead_units_are_dead_and_their_pre_activations_differ() -> None:
    """The premise of the tie tests: constant 0 after the ReLU, distinct before."""
    values = mlp_values(dead_mlp(3), batches())
    dead = [1, 4, 5, 9, 17, 30]
    assert np.all(values["post"]["layers.0"][:, dead] == 0)
    assert np.all(values["pre"]["layers.0"][:, dead].std(0) > 0)
    corr = pearson(values["pre"]["layers.0"][:, dead], values["pre"]["layers.0"][:, dead])
    assert np.abs(corr[~np.eye(len(dead), dtype=bool)]).max() < 1 - 1e-6  # no two alike before the ReLU


@pytest.mark.slow
@pytest.mark.parametrize("cost", ["covariance", "euclidean"])
@pytest.mark.parametrize("points", ["post", "both"])
def test_resnet_self_recovery_with_other_costs(points: str, cost: str) -> None:
    model = make_model("resnet20_w1", seed=23)
    spec = spec_for("resnet20_w1")
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(6))
    permuted = ma.apply_permutation(model, sigma)
    pi = ma.match_activations(
        model, permuted, batches(3, 32), spec, points=points, stream_points="last", cost=cost, progress=False
    )
    assert pi == sigma


@pytest.mark.slow
@pytest.mark.parametrize(("points", "stream"), [("post", "last"), ("both", "last"), ("post", "all")])
@pytest.mark.parametrize("build", ["vit", "gpt2"])
def test_transformer_self_recovery_for_other_recipes(build: str, points: str, stream: str) -> None:
    """Nested head groups, a residual stream with no nonlinearity input
    (fallback values; "last" keeps the final LayerNorm's output) and GELU
    MLPs: every recipe recovers the permutation."""
    from test_matching_architectures import _gpt2, _noisy, _transformers, _vit

    model, make = {"vit": _vit, "gpt2": _gpt2}[build](_transformers())
    model = _noisy(model, seed=73)
    generator = torch.Generator().manual_seed(75)
    data = [make(generator) for _ in range(3)]
    spec = ma.build_spec(model, data[0])
    sigma = ma.random_permutation(spec, generator)
    permuted = ma.apply_permutation(model, sigma)
    found = ma.match_activations(
        model, permuted, data, spec, points=points, stream_points=stream, progress=False, input_fn=lambda b: b
    )
    assert found == sigma


# ------------------------------------------------------ negative controls
def _no_tie_break(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(am, "_break_ties", lambda primary, secondary, idx: (idx, 0))


@pytest.mark.parametrize("stream", ["all", "last"])
def test_post_without_tie_break_fails_on_dead_units(monkeypatch: pytest.MonkeyPatch, stream: str) -> None:
    """The same match with the tie-break switched off loses the dead units
    (and only them): the tie-break is what keeps self-recovery exact."""
    model = dead_mlp(3)
    spec = spec_of(model)
    data = batches()
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(7))
    permuted = ma.apply_permutation(model, sigma)
    with_ties = ma.match_activations(model, permuted, data, spec, points="post", stream_points=stream, progress=False)
    assert with_ties == sigma
    _no_tie_break(monkeypatch)
    without = ma.match_activations(model, permuted, data, spec, points="post", stream_points=stream, progress=False)
    assert without != sigma
    group = "layers.0.weight:0"
    wrong = (without[group] != sigma[group]).nonzero().flatten()
    dead_in_b = set(torch.argsort(sigma[group])[[1, 4, 5, 9, 17, 30]].tolist())  # where A's dead units went in B
    assert len(wrong) >= 2 and set(wrong.tolist()) <= dead_in_b
    # the primary objective cannot see the difference
    assert without.report["groups"][group]["after"] == pytest.approx(
        with_ties.report["groups"][group]["after"], abs=1e-12
    )


@pytest.mark.slow
def test_post_without_tie_break_fails_on_resnet(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("resnet20_w1", seed=23)
    spec = spec_for("resnet20_w1")
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(24))
    permuted = ma.apply_permutation(model, sigma)
    data = batches(3, 32)
    _no_tie_break(monkeypatch)
    assert ma.match_activations(model, permuted, data, spec, points="post", progress=False) != sigma
    assert ma.match_activations(model, permuted, data, spec, points="pre", progress=False) == sigma


def test_hand_made_post_matching_needs_the_tie_break() -> None:
    """Independently of maskalign's solver: a LAP on the hand-computed
    post-activation correlation does not recover the dead units; breaking
    the ties of equal rows by the pre-activation correlation does."""
    model = dead_mlp(3)
    data = batches()
    sigma = ma.random_permutation(spec_of(model), torch.Generator().manual_seed(8))
    permuted = ma.apply_permutation(model, sigma)
    va, vb = mlp_values(model, data), mlp_values(permuted, data)
    post, pre = (
        pearson(va["post"]["layers.0"], vb["post"]["layers.0"]),
        pearson(va["pre"]["layers.0"], vb["pre"]["layers.0"]),
    )
    truth = sigma["layers.0.weight:0"].numpy()
    naive = lap(post)
    assert not np.array_equal(naive, truth)
    dead = np.flatnonzero(np.all(post == 0, axis=1))
    cols = np.array([np.flatnonzero(naive == r)[0] for r in dead])
    fixed = naive.copy()
    fixed[cols] = dead[lap(pre[np.ix_(dead, cols)])]
    assert np.array_equal(fixed, truth)


# ------------------------------------------------------------ tie-break unit
def test_break_ties_keeps_the_primary_total_and_follows_the_secondary() -> None:
    generator = torch.Generator().manual_seed(9)
    primary = torch.randn(6, 6, dtype=torch.float64, generator=generator)
    primary[[1, 4]] = 0.0  # two dead units of A
    primary[4, 2] = -0.0  # signed zeros are still a tie
    primary[:, [0, 5]] = primary[:, [0]]  # two B units that look the same
    secondary = torch.randn(6, 6, dtype=torch.float64, generator=generator)
    idx = am.solve_lap(primary)
    ar = torch.arange(6)
    cols_of_dead = [int(j) for j in ar if int(idx[j]) in (1, 4)]
    assert not {0, 5} & set(cols_of_dead)  # the premise: the two tie classes do not overlap
    new, pairs = am._break_ties(primary, secondary, idx)
    assert float(primary[new, ar].sum()) == float(primary[idx, ar].sum())
    assert sorted(new.tolist()) == list(range(6))
    assert pairs == 4
    assert cols_of_dead == [int(j) for j in ar if int(new[j]) in (1, 4)]
    assert float(secondary[new[cols_of_dead], cols_of_dead].sum()) == max(
        float(secondary[1, cols_of_dead[0]] + secondary[4, cols_of_dead[1]]),
        float(secondary[4, cols_of_dead[0]] + secondary[1, cols_of_dead[1]]),
    )
    rows_of_twins = new[[0, 5]]
    assert float(secondary[rows_of_twins, [0, 5]].sum()) == max(
        float(secondary[rows_of_twins[0], 0] + secondary[rows_of_twins[1], 5]),
        float(secondary[rows_of_twins[1], 0] + secondary[rows_of_twins[0], 5]),
    )
    untouched = torch.randn(5, 5, dtype=torch.float64, generator=generator)
    same, none = am._break_ties(untouched, secondary[:5, :5], am.solve_lap(untouched))
    assert none == 0 and torch.equal(same, am.solve_lap(untouched))


# ------------------------------------------------------- per-group choices
def test_per_group_mapping_and_callable() -> None:
    model_a, model_b = dead_mlp(1), dead_mlp(2)
    spec = spec_of(model_a)
    data = batches(2)
    run = lambda points: ma.match_activations(model_a, model_b, data, spec, points=points, progress=False)  # noqa: E731
    other = "pre" if am.DEFAULT_POINTS != "pre" else "post"  # a choice that is not the default
    chosen, default = run(other), run(am.DEFAULT_POINTS)
    assert chosen.report["groups"] != default.report["groups"]  # the premise: the choice matters here
    mapping = run({"layers.0.weight:0": other})  # layers.1 left out: the default
    called = run(lambda group: other if group == "layers.0.weight:0" else am.DEFAULT_POINTS)
    for mixed in (mapping, called):
        assert mixed.report["points"] == {"layers.0.weight:0": other, "layers.1.weight:0": am.DEFAULT_POINTS}
        assert mixed.report["groups"]["layers.0.weight:0"] == chosen.report["groups"]["layers.0.weight:0"]
        assert mixed.report["groups"]["layers.1.weight:0"] == default.report["groups"]["layers.1.weight:0"]
        assert torch.equal(mixed["layers.0.weight:0"], chosen["layers.0.weight:0"])
        assert torch.equal(mixed["layers.1.weight:0"], default["layers.1.weight:0"])


# ----------------------------------------------------- report and defaults
def test_report_records_the_recipe_and_is_json() -> None:
    model = dead_mlp(1)
    pi = ma.match_activations(model, dead_mlp(2), batches(2), points="both", stream_points="last", progress=False)
    assert pi.report["points"] == "both" and pi.report["stream_points"] == "last"
    assert json.loads(json.dumps(pi.report)) == pi.report
    default = ma.match_activations(model, model, batches(1), progress=False)
    assert default.report["points"] == am.DEFAULT_POINTS == "post"
    assert default.report["stream_points"] == am.DEFAULT_STREAM_POINTS == "last"
    parameters = inspect.signature(ma.match_activations).parameters
    assert parameters["points"].default is am.DEFAULT_POINTS
    assert parameters["stream_points"].default is am.DEFAULT_STREAM_POINTS


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"points": "psot"}, ArgumentValueError, ["'points'", "Did you mean: 'post'"]),
        ({"points": "Pre"}, ArgumentValueError, ["'points'", "'pre', 'post', 'both'"]),
        ({"stream_points": "lats"}, ArgumentValueError, ["'stream_points'", "Did you mean: 'last'"]),
        ({"points": 3}, ArgumentTypeError, ["'points'", "a dict group name"]),
        ({"points": ["post"]}, ArgumentTypeError, ["'points'"]),
    ],
)
def test_bad_points_are_refused_before_reading_data(kwargs: dict, error: type, words: list[str]) -> None:
    model = dead_mlp(1)
    with pytest.raises(error) as info:
        ma.match_activations(model, model, never_iterated(), spec_of(model), progress=False, **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("points", "words"),
    [
        ({"layers.0.weight:1": "post"}, ["'points'", "'layers.0.weight:1'", "Did you mean: 'layers.0.weight:0'"]),
        ({"layers.0.weight:0": "psot"}, ["'points'", "'layers.0.weight:0'", "Did you mean: 'post'"]),
        (lambda group: "poost", ["'points'", "'layers.0.weight:0'", "Did you mean: 'post'"]),
        (lambda group: None, ["'points'", "None"]),
    ],
)
def test_bad_per_group_points_name_the_group(points: object, words: list[str]) -> None:
    model = dead_mlp(1)
    with pytest.raises(ArgumentValueError) as info:
        ma.match_activations(model, model, batches(1), spec_of(model), points=points, progress=False)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value)
