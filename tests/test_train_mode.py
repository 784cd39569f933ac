"""Train mode: a spec keeps the model's function in train mode as well as in
eval mode, including parameters and ops used only while training, and
analysing it costs no second export when both modes run the same calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from torch import Tensor, nn

import maskalign as ma
from maskalign._utils.modes import mode_difference
from maskalign.models import ResNet20
from maskalign.spec import capture as capture_module

DT = torch.float64


def _scaled(model: nn.Module, seed: int = 0, scale: float = 1.5) -> nn.Module:
    """Non-trivial float64 weights and random BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)
    model = model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=DT) * scale / max(1, p.shape[-1]) ** 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator, dtype=DT))
                m.running_var.copy_(torch.rand(m.num_features, generator=generator, dtype=DT) + 0.5)
    return model


class AuxHead(nn.Module):
    """GoogLeNet / Inception-v3 pattern: an auxiliary classifier on the trunk,
    used only while training."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)
        self.aux = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        h = F.relu(self.fc1(x))
        out = self.head(F.relu(self.fc2(h)))
        if self.training:
            return out, self.aux(h)
        return out


class TrainOnlyProjection(nn.Module):
    """A projection applied to the trunk only in train mode (a train-time
    adapter), and an eval-only reordering (a cumulative sum, which freezes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.proj = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 7)
        self.fc3 = nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x))
        if self.training:
            h = h + self.proj(h)
        g = torch.tanh(self.fc2(h))
        if not self.training:
            g = torch.cumsum(g, dim=-1)
        return self.fc3(g)


def _group(spec: ma.PermutationSpec, tensor: str, dim: int) -> str | None:
    return next((g.name for g in spec.groups.values() if (tensor, dim) in g.members), None)


def test_parameter_used_only_in_training_is_permuted_with_the_trunk() -> None:
    model = _scaled(AuxHead()).eval()
    x = torch.randn(8, 6, dtype=DT)
    spec = ma.build_spec(model, x)
    assert spec.train_mode.startswith("own graph analysed")
    trunk = _group(spec, "fc1.weight", 0)
    assert trunk is not None and _group(spec, "aux.weight", 1) == trunk
    assert not any(a.tensor == "aux.weight" and a.dim == 1 for a in spec.frozen)
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(1))
    assert ma.check_equivalence(model, perm, x, train=True)
    assert ma.check_equivalence(model, perm, x)
    assert not model.training  # flags restored


def test_negative_control_eval_only_spec_breaks_train_mode() -> None:
    """The eval-mode graph alone leaves aux.weight's input axis out of the
    trunk's group: permuting the trunk without it changes the train-mode output."""
    model = _scaled(AuxHead()).eval()
    x = torch.randn(8, 6, dtype=DT)
    spec = ma.build_spec(model, x)
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(1))
    permuted = ma.apply_permutation(model, perm)
    with torch.no_grad():
        permuted.aux.weight.copy_(model.aux.weight)  # what an eval-only spec would do
    permuted.train()
    model.train()
    try:
        with torch.no_grad():
            assert relative_error(permuted(x)[1], model(x)[1]) > 1e-3
            assert relative_error(permuted(x)[0], model(x)[0]) < 1e-12
    finally:
        model.eval()


def test_union_of_train_and_eval_constraints() -> None:
    model = _scaled(TrainOnlyProjection()).eval()
    x = torch.randn(8, 5, dtype=DT)
    spec = ma.build_spec(model, x)
    hidden = _group(spec, "fc1.weight", 0)
    assert hidden is not None and {("proj.weight", 0), ("proj.weight", 1)} <= set(spec.groups[hidden].members)
    # fc2's outputs meet cumsum in eval mode: frozen in both modes
    assert _group(spec, "fc2.weight", 0) is None
    reason = next(a.reason for a in spec.frozen if a.tensor == "fc2.weight" and a.dim == 0)
    assert "cumsum" in reason
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(2))
    assert not perm.is_identity()
    assert ma.check_equivalence(model, perm, x, train=True)
    assert ma.check_equivalence(model, perm, x)


@pytest.mark.slow
def test_same_graph_in_both_modes_costs_no_second_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchNorm (batch statistics) and dropout run the same calls in both
    modes: one export only, and the spec still keeps the train-mode function."""
    calls: list[bool] = []
    real = capture_module.capture

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(bool(kwargs.get("train", False)))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("maskalign.spec.permutation_spec.capture", counting)
    model = _scaled(ResNet20(width=1), scale=1.0).eval()
    x = torch.randn(4, 3, 32, 32, dtype=DT)
    spec = ma.build_spec(model, x)
    assert calls == [False]
    assert spec.train_mode == "same graph as eval mode"
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(3))
    assert ma.check_equivalence(model, perm, x, train=True)
    # negative control: one BatchNorm's statistics axis permuted alone
    wrong = ma.apply_permutation(model, perm)
    with torch.no_grad():
        bn = (
            wrong.layers[0].bn1
            if hasattr(wrong, "layers")
            else next(m for m in wrong.modules() if isinstance(m, nn.BatchNorm2d))
        )
        bn.weight.copy_(bn.weight.flip(0))
    wrong.train()
    model.train()
    try:
        with torch.no_grad():
            assert relative_error(wrong(x), model(x)) > 1e-3
    finally:
        model.eval()


def test_dropout_rate_that_follows_the_mode_is_the_same_graph() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = F.dropout(F.relu(self.fc1(x)), p=0.2 if self.training else 0.0, training=self.training)
            return self.fc2(h)

    assert mode_difference(Net(), (torch.randn(3, 4),), {}) is None


def test_a_boolean_that_changes_with_the_mode_outside_known_calls_is_a_difference() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return torch.sort(self.fc(x), dim=0, descending=self.training).values

    difference = mode_difference(Net(), (torch.randn(3, 4),), {})
    assert difference == "call 1: sort gets other arguments"


def test_an_extra_call_in_train_mode_is_named() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return torch.cumsum(self.fc(x), dim=-1) if self.training else self.fc(x)

    assert mode_difference(Net(), (torch.randn(3, 4),), {}) == "call 1: only train mode runs cumsum"


@pytest.mark.slow
def test_probe_leaves_model_and_random_state_unchanged() -> None:
    model = _scaled(ResNet20(width=1), scale=1.0).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    rng = torch.get_rng_state()
    ma.build_spec(model, x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m.training for m in model.modules())
    model.train()
    ma.build_spec(model, x)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
