"""Tests for maskalign.spec (build_spec) and maskalign.permutation.

The central property: permuting every axis of a group with one permutation
keeps the model's function, and a permutation that misses one member axis of a
group does not (negative control, so that the positive checks can fail).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_unchanged,
    axis_factors,
    axis_groups,
    make_inputs,
    make_model,
    randomize_bn,
    relative_error,
    snapshot,
    spec_for,
    state_dicts_equal,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import maskalign as ma
from maskalign.errors import SpecError, SpecMismatchError
from maskalign.models import MLP, VGG11, ResNet20

KEEP_TOL = 1e-10  # relative error allowed for a correct permutation (float64)
BREAK_TOL = 1e-6  # relative change required from a wrong permutation


@torch.no_grad()
def outputs(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def group_free_axes(spec: ma.PermutationSpec) -> set[tuple[str, int]]:
    """Every (tensor, dim) that carries at least one group factor."""
    return {
        (tensor, d) for tensor, shape in spec.shapes.items() for d in range(len(shape)) if axis_groups(spec, tensor, d)
    }


def group_of(spec: ma.PermutationSpec, tensor: str, dim: int) -> str | None:
    """Name of the (single) group on ``tensor``'s ``dim``; None when unpermuted."""
    names = axis_groups(spec, tensor, dim)
    assert len(names) <= 1, f"{tensor}[{dim}] carries several groups: {names}"
    return names[0] if names else None


# ------------------------------------------------------------------ function
def test_random_permutation_keeps_function_and_wrong_one_breaks_it(model_name: str) -> None:
    model = make_model(model_name, seed=1)
    spec = spec_for(model_name)
    x = make_inputs(16, seed=2)
    expected = outputs(model, x)
    assert float(expected.abs().max()) > 0
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        pi = ma.random_permutation(spec, generator)
        assert not pi.is_identity()
        permuted = ma.apply_permutation(model, pi)
        # a genuine relabelling: some weights moved
        assert not state_dicts_equal(permuted.state_dict(), model.state_dict())
        assert relative_error(outputs(permuted, x), expected) <= KEEP_TOL

    # negative control 1: permute one group's axis on a single member tensor only
    group = next(iter(spec.groups.values()))
    tensor, dim = group.members[0]
    swap = torch.arange(model.state_dict()[tensor].shape[dim])
    swap[0], swap[1] = 1, 0
    state = model.state_dict()
    state[tensor] = state[tensor].index_select(dim, swap)
    wrong = copy.deepcopy(model)
    wrong.load_state_dict(state)
    assert relative_error(outputs(wrong, x), expected) > BREAK_TOL

    # negative control 2: a correct permutation that forgets one member of a
    # group (a BatchNorm statistic where there is one, else a bias)
    pi = ma.random_permutation(spec, generator)
    left_out = next(
        (t for t, _ in group.members if t.endswith("running_mean")),
        next((t for t, _ in group.members if t.endswith("bias")), None),
    )
    assert left_out is not None
    state = ma.permute_state_dict(model.state_dict(), pi)
    state[left_out] = model.state_dict()[left_out].clone()
    wrong = copy.deepcopy(model)
    wrong.load_state_dict(state)
    assert relative_error(outputs(wrong, x), expected) > BREAK_TOL


def test_permuted_model_keeps_function_in_other_batch_sizes() -> None:
    model = make_model("resnet20_w1", seed=4)
    pi = ma.random_permutation(spec_for("resnet20_w1"), torch.Generator().manual_seed(5))
    permuted = ma.apply_permutation(model, pi)
    for n in (1, 3, 32):
        x = make_inputs(n, seed=n)
        assert relative_error(outputs(permuted, x), outputs(model, x)) <= KEEP_TOL


def test_apply_permutation_inplace_and_copy() -> None:
    model = make_model("mlp", seed=6)
    spec = spec_for("mlp")
    pi = ma.random_permutation(spec, torch.Generator().manual_seed(7))
    before = snapshot(model)
    copied = ma.apply_permutation(model, pi)
    assert copied is not model
    assert_unchanged(model, before)
    same = ma.apply_permutation(model, pi, inplace=True)
    assert same is model
    assert state_dicts_equal(model.state_dict(), copied.state_dict())


# --------------------------------------------------------- inverse, compose
def test_inverse_round_trip_is_bit_identical(model_name: str) -> None:
    model = make_model(model_name, seed=8)
    spec = spec_for(model_name)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        pi = ma.random_permutation(spec, generator)
        there = ma.permute_state_dict(state, pi)
        back = ma.permute_state_dict(there, pi.inverse())
        assert back.keys() == state.keys()
        for key in state:
            assert torch.equal(back[key], state[key]), key
        # and through models
        restored = ma.apply_permutation(ma.apply_permutation(model, pi), pi.inverse())
        assert state_dicts_equal(restored.state_dict(), state)
        # inverse the other way round too
        assert pi.compose(pi.inverse()).is_identity()
        assert pi.inverse().compose(pi).is_identity()
        assert pi.inverse().inverse() == pi


def test_compose_applies_self_first_then_other() -> None:
    name = "resnet20_w1"
    model = make_model(name, seed=10)
    spec = spec_for(name)
    generator = torch.Generator().manual_seed(11)
    p = ma.random_permutation(spec, generator)
    q = ma.random_permutation(spec, generator)
    state = model.state_dict()
    two_steps = ma.permute_state_dict(ma.permute_state_dict(state, p), q)
    one_step = ma.permute_state_dict(state, p.compose(q))
    for key in state:
        assert torch.equal(one_step[key], two_steps[key]), key
    # composition is not commutative in general: the order is meaningful
    other_order = ma.permute_state_dict(state, q.compose(p))
    assert not all(torch.equal(other_order[k], two_steps[k]) for k in state)
    # explicit index semantics: new[j] = old[idx[j]]
    for g in spec.groups:
        assert torch.equal(p.compose(q)[g], p[g][q[g]])


def test_compose_rejects_permutation_of_another_spec() -> None:
    p = ma.random_permutation(spec_for("mlp"), torch.Generator().manual_seed(0))
    q = ma.random_permutation(spec_for("vgg11"), torch.Generator().manual_seed(0))
    with pytest.raises(SpecMismatchError):
        p.compose(q)


def test_permutation_index_semantics_on_a_tensor() -> None:
    """Convention of the module docstring: new[j] = old[idx[j]] on every axis."""
    spec = spec_for("mlp")
    name = "layers.0.weight"
    group = group_of(spec, name, 0)
    assert group is not None
    idx = torch.randperm(spec.groups[group].size, generator=torch.Generator().manual_seed(1))
    pi = ma.Permutation(spec, {group: idx})
    w = torch.randn(spec.shapes[name], dtype=torch.float64)
    out = pi.permute_tensor(name, w)
    for j in range(idx.numel()):
        assert torch.equal(out[j], w[idx[j]])
    # input is untouched; the output is a new tensor
    assert out.data_ptr() != w.data_ptr()


def test_permutation_validates_indices() -> None:
    spec = spec_for("mlp")
    group = next(iter(spec.groups))
    n = spec.groups[group].size
    duplicate = torch.arange(n)
    duplicate[1] = 0
    with pytest.raises(SpecError, match=group):
        ma.Permutation(spec, {group: duplicate})
    with pytest.raises(SpecError):
        ma.Permutation(spec, {group: torch.arange(n - 1)})
    with pytest.raises(SpecError):
        ma.Permutation(spec, {group: torch.arange(1, n + 1)})
    with pytest.raises(SpecError, match="no_such_group"):
        ma.Permutation(spec, {"no_such_group": torch.arange(3)})
    # missing groups are identity; a valid permutation is accepted
    pi = ma.Permutation(spec, {group: torch.arange(n).flip(0)})
    assert not pi.is_identity()
    assert all(pi[g].equal(torch.arange(spec.groups[g].size)) for g in spec.groups if g != group)


def test_permute_tensor_rejects_unknown_name_and_wrong_shape() -> None:
    spec = spec_for("mlp")
    pi = ma.random_permutation(spec, torch.Generator().manual_seed(0))
    with pytest.raises(SpecError, match="nope"):
        pi.permute_tensor("nope", torch.zeros(3))
    with pytest.raises(SpecMismatchError, match="layers.0.weight"):
        pi.permute_tensor("layers.0.weight", torch.zeros(3, 3))
    other = make_model("vgg11", seed=0)
    with pytest.raises(SpecMismatchError):
        ma.apply_permutation(other, pi)


# ---------------------------------------------------------------- structure
def _check_common_structure(spec: ma.PermutationSpec, model: nn.Module) -> None:
    state = model.state_dict()
    assert set(spec.axes) == set(state)
    assert spec.shapes == {k: tuple(v.shape) for k, v in state.items()}
    assert spec.coverage == 1.0
    for group in spec.groups.values():
        assert group.size > 1
        for tensor, dim in group.members:
            assert group_of(spec, tensor, dim) == group.name
            assert spec.shapes[tensor][dim] % group.size == 0
    # every axis that carries a group is a member of that group
    for tensor, dim in group_free_axes(spec):
        name = group_of(spec, tensor, dim)
        assert name is not None
        assert (tensor, dim) in spec.groups[name].members
    # groups are disjoint
    seen: set[tuple[str, int]] = set()
    for group in spec.groups.values():
        assert not seen & set(group.members)
        seen |= set(group.members)


def _frozen_reason(spec: ma.PermutationSpec, tensor: str, dim: int) -> str:
    reasons = [f.reason for f in spec.frozen if f.tensor == tensor and f.dim == dim]
    assert reasons, f"{tensor}[{dim}] is not listed in spec.frozen"
    return reasons[0]


@pytest.mark.parametrize("width", [1, 2])
def test_resnet20_structure(width: int) -> None:
    name = f"resnet20_w{width}"
    spec = spec_for(name)
    model = make_model(name, bn=False)
    _check_common_structure(spec, model)
    assert len(spec.groups) == 12
    sizes = sorted(g.size for g in spec.groups.values())
    assert sizes == sorted([16 * width] * 4 + [32 * width] * 4 + [64 * width] * 4)

    # three residual streams, one per stage
    streams = [
        group_of(spec, "conv1.weight", 0),
        group_of(spec, "layer2.0.shortcut.conv.weight", 0),
        group_of(spec, "layer3.0.shortcut.conv.weight", 0),
    ]
    assert None not in streams and len(set(streams)) == 3
    for stage, stream in enumerate(streams, start=1):
        assert spec.groups[stream].size == 16 * width * 2 ** (stage - 1)  # type: ignore[index]
        for block in range(3):
            prefix = f"layer{stage}.{block}"
            for member in (
                (f"{prefix}.conv2.weight", 0),
                (f"{prefix}.bn2.weight", 0),
                (f"{prefix}.bn2.bias", 0),
                (f"{prefix}.bn2.running_mean", 0),
                (f"{prefix}.bn2.running_var", 0),
            ):
                assert group_of(spec, *member) == stream, member
            if block > 0 or stage == 1:
                assert group_of(spec, f"{prefix}.conv1.weight", 1) == stream
        if stage < 3:
            assert group_of(spec, f"layer{stage + 1}.0.conv1.weight", 1) == stream
            assert group_of(spec, f"layer{stage + 1}.0.shortcut.conv.weight", 1) == stream
    assert group_of(spec, "bn1.running_var", 0) == streams[0]
    assert group_of(spec, "fc.weight", 1) == streams[2]

    # nine inner groups: conv1 -> bn1 -> conv2 inside each block
    inner = set()
    for stage in (1, 2, 3):
        for block in range(3):
            prefix = f"layer{stage}.{block}"
            g = group_of(spec, f"{prefix}.conv1.weight", 0)
            assert g is not None and g not in streams
            assert set(spec.groups[g].members) == {
                (f"{prefix}.conv1.weight", 0),
                (f"{prefix}.bn1.weight", 0),
                (f"{prefix}.bn1.bias", 0),
                (f"{prefix}.bn1.running_mean", 0),
                (f"{prefix}.bn1.running_var", 0),
                (f"{prefix}.conv2.weight", 1),
            }
            inner.add(g)
    assert len(inner) == 9

    # classifier output frozen; input channels (size 1 here) carry no group
    assert "model output" in _frozen_reason(spec, "fc.weight", 0)
    assert "model output" in _frozen_reason(spec, "fc.bias", 0)
    assert group_of(spec, "conv1.weight", 1) is None
    # spatial kernel axes are never permuted
    assert group_of(spec, "layer1.0.conv1.weight", 2) is None
    assert group_of(spec, "layer1.0.conv1.weight", 3) is None


def test_vgg11_structure() -> None:
    spec = spec_for("vgg11")
    model = make_model("vgg11", bn=False)
    _check_common_structure(spec, model)
    assert len(spec.groups) == 8
    convs = [f"features.conv{i}" for i in range(1, 9)]
    expected_sizes = [64, 128, 256, 256, 512, 512, 512, 512]
    for i, conv in enumerate(convs):
        g = group_of(spec, f"{conv}.weight", 0)
        assert g is not None
        assert spec.groups[g].size == expected_sizes[i]
        bn = conv.replace("conv", "bn")
        following = (f"{convs[i + 1]}.weight", 1) if i + 1 < len(convs) else ("classifier.weight", 1)
        assert set(spec.groups[g].members) == {
            (f"{conv}.weight", 0),
            (f"{bn}.weight", 0),
            (f"{bn}.bias", 0),
            (f"{bn}.running_mean", 0),
            (f"{bn}.running_var", 0),
            following,
        }
    assert "model output" in _frozen_reason(spec, "classifier.weight", 0)
    assert "model output" in _frozen_reason(spec, "classifier.bias", 0)
    assert group_of(spec, "features.conv1.weight", 1) is None


def test_mlp_structure_one_group_per_hidden_layer() -> None:
    model = MLP(in_features=64, hidden=(40, 30, 20)).double().eval()
    spec = ma.build_spec(model, (torch.randn(2, 64, dtype=torch.float64),))
    _check_common_structure(spec, model)
    assert len(spec.groups) == 3
    for i, size in enumerate((40, 30, 20)):
        g = group_of(spec, f"layers.{i}.weight", 0)
        assert g is not None and spec.groups[g].size == size
        nxt = f"layers.{i + 1}.weight" if i < 2 else "fc.weight"
        assert set(spec.groups[g].members) == {
            (f"layers.{i}.weight", 0),
            (f"layers.{i}.bias", 0),
            (nxt, 1),
        }
    assert "model output" in _frozen_reason(spec, "fc.weight", 0)
    assert "model output" in _frozen_reason(spec, "fc.bias", 0)
    assert "model input" in _frozen_reason(spec, "layers.0.weight", 1)


def test_default_mlp_structure_on_images() -> None:
    spec = spec_for("mlp")
    _check_common_structure(spec, make_model("mlp", bn=False))
    assert len(spec.groups) == 2
    assert sorted(g.size for g in spec.groups.values()) == [128, 128]
    assert group_of(spec, "layers.0.weight", 0) != group_of(spec, "layers.1.weight", 0)
    assert group_of(spec, "layers.0.weight", 1) is None


def test_frozen_lists_first_layer_input_axis_of_mlp_on_images() -> None:
    """An unpermuted axis that a flatten splits into several frozen factors
    (layers.0.weight dim 1 = 8 x 8 image positions) is listed in spec.frozen
    (regression: missing from spec.frozen before the axis-tree spec)."""
    spec = spec_for("mlp")
    factors = axis_factors(spec, "layers.0.weight", 1)
    assert [s for _, s in factors] in ([8, 8], [64]) and all(g is None for g, _ in factors)
    assert spec.shapes["layers.0.weight"] == (128, 64)
    assert "model input" in _frozen_reason(spec, "layers.0.weight", 1)


@pytest.mark.parametrize(
    ("model", "first"),
    [
        pytest.param(lambda: ResNet20(width=1, in_channels=3), "conv1.weight", id="resnet20"),
        pytest.param(lambda: VGG11(in_channels=3, image_size=8), "features.conv1.weight", id="vgg11"),
    ],
)
def test_first_conv_input_axis_frozen_with_reason(model, first: str) -> None:  # type: ignore[no-untyped-def]
    net = model().double().eval()
    spec = ma.build_spec(net, (torch.randn(2, 3, 8, 8, dtype=torch.float64),))
    assert spec.shapes[first][1] == 3
    assert group_of(spec, first, 1) is None
    assert "model input" in _frozen_reason(spec, first, 1)
    assert spec.coverage == 1.0


# -------------------------------------------------------- hypothesis: MLPs
@pytest.mark.slow  # hypothesis sweep of random architectures
@settings(max_examples=15, deadline=None)
@given(
    hidden=st.lists(st.integers(2, 12), min_size=1, max_size=4, unique=True),
    in_features=st.integers(2, 8),
    num_classes=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_property_random_mlps(hidden: list[int], in_features: int, num_classes: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = MLP(in_features=in_features, hidden=tuple(hidden), num_classes=num_classes).double().eval()
    x = torch.randn(5, in_features, dtype=torch.float64)
    spec = ma.build_spec(model, (x,))
    assert len(spec.groups) == len(hidden)
    assert sorted(g.size for g in spec.groups.values()) == sorted(hidden)
    assert spec.coverage == 1.0
    generator = torch.Generator().manual_seed(seed)
    pi = ma.random_permutation(spec, generator)
    expected = outputs(model, x)
    permuted = ma.apply_permutation(model, pi)
    assert relative_error(outputs(permuted, x), expected) <= KEEP_TOL
    back = ma.apply_permutation(permuted, pi.inverse())
    assert state_dicts_equal(back.state_dict(), model.state_dict())


# --------------------------------------------------- hypothesis: conv nets
class RandomConvNet(nn.Module):
    """conv(3x3) -> BN -> relu blocks, a block adding its input when ``residual``
    and the channel counts match, an optional 2x2 max-pool, then flatten (with
    spatial size > 1) into a linear classifier."""

    def __init__(
        self,
        in_channels: int,
        size: int,
        blocks: list[tuple[int, bool, bool]],
        pool: bool,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.residual: list[bool] = []
        channels = in_channels
        for out_channels, residual, bias in blocks:
            self.convs.append(nn.Conv2d(channels, out_channels, 3, padding=1, bias=bias))
            self.bns.append(nn.BatchNorm2d(out_channels))
            self.residual.append(residual and out_channels == channels)
            channels = out_channels
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        spatial = size // 2 if pool else size
        self.fc = nn.Linear(channels * spatial * spatial, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for conv, bn, residual in zip(self.convs, self.bns, self.residual):
            out = bn(conv(x))
            x = F.relu(out + x) if residual else F.relu(out)
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.slow  # hypothesis sweep of random architectures
@settings(max_examples=15, deadline=None)
@given(
    in_channels=st.integers(1, 3),
    size=st.integers(4, 6),
    blocks=st.lists(
        st.tuples(st.integers(1, 3).map(lambda c: 2 * c), st.booleans(), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    pool=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_conv_nets(
    in_channels: int, size: int, blocks: list[tuple[int, bool, bool]], pool: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = RandomConvNet(in_channels, size, blocks, pool, num_classes=3).double().eval()
    randomize_bn(model, torch.Generator().manual_seed(seed))
    x = torch.randn(4, in_channels, size, size, dtype=torch.float64)
    spec = ma.build_spec(model, (x,))

    # expected structure: one group per residual stream; a stream that starts
    # at the model input is frozen
    n_streams = sum(not r for r in model.residual)
    assert len(spec.groups) == n_streams
    stream_of_block: list[int] = []
    stream = -1
    for residual in model.residual:
        stream = stream if residual else stream + 1
        stream_of_block.append(stream)
    # a stream tied to the model input is not a hidden axis (structural), and
    # every other stream is one group: all hidden units are covered
    assert spec.coverage == 1.0 and not spec.frozen_share
    frozen = {(a.tensor, a.dim): a for a in spec.frozen}
    for conv, s in zip(model.convs, stream_of_block):
        name = next(n for n, m in model.named_modules() if m is conv)
        if s < 0:
            assert frozen[(f"{name}.weight", 0)].structural
            assert "model input" in frozen[(f"{name}.weight", 0)].reason
        else:
            assert (f"{name}.weight", 0) not in frozen
    # the classifier's input axis factors as (channels, H, W): channels in the
    # last stream's group (if any), spatial factors frozen
    fc_in = axis_factors(spec, "fc.weight", 1)
    spatial = size // 2 if pool else size
    assert [s for _, s in fc_in] == [model.convs[-1].out_channels, spatial, spatial]
    assert fc_in[1][0] is None and fc_in[2][0] is None
    assert (fc_in[0][0] is not None) == (stream_of_block[-1] >= 0)

    expected = outputs(model, x)
    generator = torch.Generator().manual_seed(seed + 1)
    pi = ma.random_permutation(spec, generator)
    permuted = ma.apply_permutation(model, pi)
    assert relative_error(outputs(permuted, x), expected) <= KEEP_TOL
    back = ma.permute_state_dict(ma.permute_state_dict(model.state_dict(), pi), pi.inverse())
    assert state_dicts_equal(back, model.state_dict())


# --------------------------------------------------------- unsupported ops
class UnsupportedOpNet(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 7)
        self.fc3 = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))
        h = torch.cumsum(h, dim=-1) if self.op == "cumsum" else torch.roll(h, 1, dims=-1)
        h = F.relu(self.fc2(h))
        return self.fc3(h)


@pytest.mark.parametrize("op", ["cumsum", "roll"])
def test_position_dependent_op_freezes_instead_of_guessing(op: str) -> None:
    torch.manual_seed(0)
    model = UnsupportedOpNet(op).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    spec = ma.build_spec(model, (x,))
    affected = [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]
    members = {m for g in spec.groups.values() for m in g.members}
    for tensor, dim in affected:
        assert (tensor, dim) not in members
        assert group_of(spec, tensor, dim) is None
        reason = _frozen_reason(spec, tensor, dim)
        assert f"aten::{op}" in reason and "does not commute with permuting it" in reason
    # the unaffected hidden layer is still permutable
    g = group_of(spec, "fc2.weight", 0)
    assert g is not None
    assert set(spec.groups[g].members) == {("fc2.weight", 0), ("fc2.bias", 0), ("fc3.weight", 1)}
    assert len(spec.groups) == 1
    assert spec.coverage == pytest.approx(7 / 15)

    pi = ma.random_permutation(spec, torch.Generator().manual_seed(1))
    assert not pi.is_identity()
    assert relative_error(outputs(ma.apply_permutation(model, pi), x), outputs(model, x)) <= KEEP_TOL
    # negative control: permuting the frozen hidden axis consistently (as a
    # guessing implementation would) changes the function
    idx = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    state = model.state_dict()
    state["fc1.weight"] = state["fc1.weight"][idx]
    state["fc1.bias"] = state["fc1.bias"][idx]
    state["fc2.weight"] = state["fc2.weight"][:, idx]
    guessed = copy.deepcopy(model)
    guessed.load_state_dict(state)
    assert relative_error(outputs(guessed, x), outputs(model, x)) > BREAK_TOL


# ------------------------------------------------------------ no mutation
def test_build_spec_does_not_mutate_model() -> None:
    model = make_model("resnet20_w1", seed=12)
    model.train()
    model.layer2.eval()  # mixed flags must come back exactly
    model.layer3[1].bn1.train()
    before = snapshot(model)
    spec = ma.build_spec(model, (make_inputs(4, seed=13),))
    assert len(spec.groups) == 12
    assert_unchanged(model, before)
    assert model.training and not model.layer2.training and model.layer3[1].bn1.training


def test_summary_names_groups_and_frozen_axes() -> None:
    spec = spec_for("vgg11")
    text = spec.summary()
    assert "8 groups" in text
    for name in spec.groups:
        assert name in text
    assert "classifier.weight[0]" in text
    assert str(spec) == text


def test_failed_export_keeps_the_console_clean_and_prints_survive(capsys: pytest.CaptureFixture[str]) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return h if h.mean() > 0 else -h

    class Chatty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            print("hello from forward")
            return self.fc(x)

    with pytest.raises(ma.TraceError, match="torch.where or torch.cond"):
        ma.build_spec(Branchy(), torch.randn(2, 4))
    captured = capsys.readouterr()
    assert "def forward" not in captured.err + captured.out  # torch's partial-graph dump is dropped
    ma.build_spec(Chatty(), torch.randn(2, 4))
    assert "hello from forward" in capsys.readouterr().out
