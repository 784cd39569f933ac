"""A permutation lands only on the model it belongs to, and never writes
through shared storage.

Central property: a permutation built for one architecture, applied to a
model with the same parameter names and shapes but other wiring (a residual
block instead of a plain one), raises :class:`SpecMismatchError` naming the
first difference, where the lower-level path (``permute_state_dict`` +
``load_state_dict``, which sees only names and shapes) changes the model's
output by O(1): the negative control that shows the check matters.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CrossTied, randomize
from torch import Tensor, nn

import maskalign as ma
import maskalign.spec
import maskalign.spec.capture
from maskalign.errors import DOCS_URL, SpecError, SpecMismatchError
from maskalign.models import ResNet20
from maskalign.permutation import FORMAT, check_same_architecture
from maskalign.spec import module_types, storage_sharing

KEEP_TOL = 1e-10  # a correct permutation keeps float64 outputs to rounding
BREAK_TOL = 1e-2  # a wrong one changes them by much more (relative to the output scale)


class Block(nn.Module):
    """``fc2(relu(fc1(x)))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ResidualBlock(Block):
    """The same parameters as :class:`Block`, with a residual connection."""

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class Net(nn.Module):
    """``inp -> norm -> blocks -> out``; ``flag`` adds residual connections
    around the blocks without changing any module class."""

    def __init__(self, block: type[Block] = Block, width: int = 16, depth: int = 2, flag: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.norm = nn.BatchNorm1d(width)
        self.blocks = nn.ModuleList(block(width) for _ in range(depth))
        self.out = nn.Linear(width, 3)
        self.flag = flag

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.inp(x))
        for block in self.blocks:
            x = x + block(x) if self.flag else block(x)
        return self.out(F.relu(x))


class PlainMLP(nn.Module):
    """Two hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class ResidualMLP(PlainMLP):
    """Same names and shapes as :class:`PlainMLP`; ``b`` is residual."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        return self.c(F.relu(h + self.b(h)))


class TiedAutoencoder(nn.Module):
    """``dec.weight`` is a transposed view of ``enc.weight`` (a second
    Parameter on the same storage); the graph ties their hidden axes."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4).double()
        self.dec = nn.Linear(4, 6).double()
        self.dec.weight = nn.Parameter(self.enc.weight.t())

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(F.relu(self.enc(x)))


def inputs(batch: int = 5, features: int = 8, seed: int = 1) -> Tensor:
    return torch.randn(batch, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def relative_change(model: nn.Module, other: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        ref = model(x)
        return float((other(x) - ref).abs().max() / ref.abs().max())


def same_weights(source: nn.Module, target: nn.Module) -> nn.Module:
    target.load_state_dict(source.state_dict())
    return target


@pytest.fixture(scope="module")
def plain() -> tuple[nn.Module, ma.PermutationSpec]:
    model = randomize(Net(Block))
    return model, ma.build_spec(model, inputs())


@pytest.fixture(scope="module")
def flagged(plain: tuple[nn.Module, ma.PermutationSpec]) -> tuple[nn.Module, ma.PermutationSpec]:
    model = same_weights(plain[0], randomize(Net(Block, flag=True)))
    return model, ma.build_spec(model, inputs())


def nontrivial(spec: ma.PermutationSpec, seed: int = 3) -> ma.Permutation:
    """A random permutation that moves every group of size > 1."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = ma.random_permutation(spec, generator)
        if all(not torch.equal(perm[g], torch.arange(perm[g].numel())) for g in perm if perm[g].numel() > 1):
            return perm


# ------------------------------------------------------------ wrong model
def test_permutation_keeps_the_function_of_its_own_model(plain) -> None:
    """Positive control: the checks let the right model through."""
    model, spec = plain
    perm = nontrivial(spec)
    permuted = ma.apply_permutation(model, perm)
    assert relative_change(model, permuted, inputs()) < KEEP_TOL
    assert relative_change(model, ma.apply_permutation(model, perm, spec=spec), inputs()) < KEEP_TOL


def test_wrong_architecture_raises_naming_the_module_and_the_check_matters(plain) -> None:
    model, spec = plain
    perm = nontrivial(spec)
    residual = same_weights(model, randomize(Net(ResidualBlock)))
    assert residual.state_dict().keys() == model.state_dict().keys()
    before = copy.deepcopy(residual.state_dict())
    with pytest.raises(SpecMismatchError) as info:
        ma.apply_permutation(residual, perm)
    message = str(info.value)
    assert message.startswith("Module 'blocks.0' is a ResidualBlock here but a Block in the permutation's model")
    assert "build_spec" in message and DOCS_URL in message
    assert all(torch.equal(before[k], v) for k, v in residual.state_dict().items())
    with pytest.raises(SpecMismatchError, match="blocks.0"):
        ma.apply_permutation(residual, perm, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in residual.state_dict().items())
    # negative control: the names-and-shapes path permutes it and breaks its function
    wrong = copy.deepcopy(residual)
    wrong.load_state_dict(ma.permute_state_dict(residual.state_dict(), perm))
    assert relative_change(residual, wrong, inputs()) > BREAK_TOL
    # and the residual model's own permutation is fine
    own = nontrivial(ma.build_spec(residual, inputs()))
    assert relative_change(residual, ma.apply_permutation(residual, own), inputs()) < KEEP_TOL


def test_wrong_model_class_at_the_root_is_named() -> None:
    plain_model = randomize(PlainMLP())
    residual = same_weights(plain_model, randomize(ResidualMLP()))
    perm = nontrivial(ma.build_spec(plain_model, inputs()))
    with pytest.raises(SpecMismatchError, match=r"^The model is a ResidualMLP here but a PlainMLP"):
        ma.apply_permutation(residual, perm)
    with pytest.raises(SpecMismatchError, match="ResidualMLP"):
        check_same_architecture(residual, perm.spec)
    check_same_architecture(plain_model, perm.spec)  # positive control
    wrong = copy.deepcopy(residual)
    wrong.load_state_dict(ma.permute_state_dict(residual.state_dict(), perm))
    assert relative_change(residual, wrong, inputs()) > BREAK_TOL


def test_same_classes_other_wiring_is_caught_with_the_models_spec(plain, flagged) -> None:
    """A flag that adds residual connections changes no module class: the
    cheap check cannot see it (documented), the full comparison with the
    model's own spec does, naming the first axis that is wired differently."""
    model, spec = plain
    flag_model, flag_spec = flagged
    perm = nontrivial(spec)
    assert spec.fingerprint != flag_spec.fingerprint
    assert spec.module_types == flag_spec.module_types
    unchecked = ma.apply_permutation(flag_model, perm)
    assert relative_change(flag_model, unchecked, inputs()) > BREAK_TOL  # what spec= prevents
    with pytest.raises(SpecMismatchError) as info:
        ma.apply_permutation(flag_model, perm, spec=flag_spec)
    message = str(info.value)
    assert message.startswith("Axis 0 of 'blocks.0.fc2.weight' is in group ")
    assert "wired differently" in message
    with pytest.raises(SpecMismatchError, match="blocks.0.fc2.weight"):
        ma.permute_state_dict(flag_model.state_dict(), perm, spec=flag_spec)
    masks = {"inp.weight": torch.ones(16, 8, dtype=torch.bool)}
    with pytest.raises(SpecMismatchError, match="wired differently"):
        ma.permute_mask(masks, perm, spec=flag_spec)
    with pytest.raises(SpecMismatchError, match="'then'"):
        perm.compose(nontrivial(flag_spec))
    # spec= must be the model's own spec
    other = randomize(PlainMLP())
    with pytest.raises(SpecMismatchError):
        ma.apply_permutation(model, perm, spec=ma.build_spec(other, inputs()))


def test_an_extra_layer_the_spec_does_not_know_is_refused(plain) -> None:
    model, spec = plain
    deeper = randomize(Net(Block, depth=3))
    with pytest.raises(SpecMismatchError, match=r"tensor 'blocks\.2\.fc1\.weight' \(shape \(16, 16\)\)"):
        ma.apply_permutation(deeper, nontrivial(spec))
    with pytest.raises(SpecMismatchError, match="blocks.2"):
        ma.permute_state_dict(deeper.state_dict(), nontrivial(spec))


def test_checks_run_no_graph_capture(plain, monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_permutation compares names, shapes and module classes only:
    capturing the model again (about a second for a ResNet20) never happens."""
    model, spec = plain
    perm = nontrivial(spec)

    def no_capture(*args: object, **kwargs: object) -> None:
        raise AssertionError("apply_permutation captured the model")

    monkeypatch.setattr(maskalign.spec.capture, "capture", no_capture)
    monkeypatch.setattr(maskalign.spec.permutation_spec, "capture", no_capture)
    ma.apply_permutation(model, perm)
    ma.apply_permutation(model, perm, spec=spec)


def test_module_types_cover_containers_not_parameter_free_leaves() -> None:
    types = module_types(ResNet20())
    assert types[""] == "ResNet20" and types["layer1.0"] == "BasicBlock" and types["layer1"] == "Sequential"
    assert "pool" not in types and "flatten" not in types and "layer1.0.shortcut" not in types
    assert types["layer2.0.shortcut"] == "Sequential"


def test_exported_program_spec_skips_the_class_check(plain) -> None:
    model, spec = plain
    program = torch.export.export(model, (inputs(),), strict=False)
    exported = ma.build_spec(program)
    assert exported.module_types == {} and exported.fingerprint == spec.fingerprint
    perm = ma.Permutation(exported, dict(nontrivial(spec)))
    assert relative_change(model, ma.apply_permutation(model, perm), inputs()) < KEEP_TOL


# -------------------------------------------------------------- save / load
def test_save_load_round_trips_the_fingerprint_and_names_the_difference(plain, tmp_path: Path) -> None:
    model, spec = plain
    perm = nontrivial(spec)
    assert perm.fingerprint == spec.fingerprint
    path = tmp_path / "perm.pt"
    perm.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["fingerprint"] == spec.fingerprint
    assert payload["modules"] == spec.module_types
    loaded = ma.Permutation.load(path, spec)
    assert loaded == perm and loaded.fingerprint == perm.fingerprint
    residual_spec = ma.build_spec(same_weights(model, randomize(Net(ResidualBlock))), inputs())
    with pytest.raises(SpecMismatchError) as info:
        ma.Permutation.load(path, residual_spec)
    message = str(info.value)
    assert message.startswith(f"{path} was saved for a spec with fingerprint {spec.fingerprint}")
    assert "Axis 0 of 'blocks.0.fc2.weight'" in message


def test_legacy_file_loads_when_its_fingerprint_matches(plain, tmp_path: Path) -> None:
    """Files of format 1 (fingerprint and indices, as maskalign wrote before
    module classes were recorded) keep loading: the fingerprint formula did
    not change, and it checks names, shapes and wiring."""
    model, spec = plain
    perm = nontrivial(spec)
    path = tmp_path / "old.pt"
    torch.save({"format": "maskalign.Permutation/1", "fingerprint": spec.fingerprint, "indices": dict(perm)}, path)
    assert ma.Permutation.load(path, spec) == perm
    residual_spec = ma.build_spec(same_weights(model, randomize(Net(ResidualBlock))), inputs())
    with pytest.raises(SpecMismatchError, match="older format"):
        ma.Permutation.load(path, residual_spec)


def test_load_refuses_files_that_are_not_saved_permutations(plain, tmp_path: Path) -> None:
    model, spec = plain
    perm = nontrivial(spec)
    cases = {
        "nofp.pt": ({"format": FORMAT, "indices": dict(perm)}, "'fingerprint'"),
        "lists.pt": ({"format": FORMAT, "fingerprint": spec.fingerprint, "indices": [1, 2]}, "Entry 'indices'"),
        "bare.pt": (dict(perm), "ma.Permutation(spec, torch.load(path))"),
        "future.pt": ({"format": "maskalign.Permutation/9", "fingerprint": "x", "indices": {}}, "format"),
    }
    for name, (payload, culprit) in cases.items():
        torch.save(payload, tmp_path / name)
        with pytest.raises(SpecError) as info:
            ma.Permutation.load(tmp_path / name, spec)
        assert name in str(info.value) and culprit in str(info.value), str(info.value)
    with pytest.raises(SpecError, match="is a directory"):
        ma.Permutation.load(tmp_path, spec)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ma.Permutation.load(tmp_path / "missing.pt", spec)


def test_saved_indices_are_validated_naming_the_file(plain, tmp_path: Path) -> None:
    model, spec = plain
    group = next(g for g in spec.groups if spec.groups[g].size > 1)
    path = tmp_path / "float.pt"
    indices = {group: torch.arange(spec.groups[group].size, dtype=torch.float32) + 0.9}
    torch.save({"format": FORMAT, "fingerprint": spec.fingerprint, "indices": indices}, path)
    with pytest.raises(SpecError, match=rf"^Indices for group '{group}' in {path} have dtype torch.float32"):
        ma.Permutation.load(path, spec)


# ------------------------------------------------------------------ indices
def test_float_indices_are_refused_not_truncated(plain) -> None:
    model, spec = plain
    group = next(iter(spec.groups))
    n = spec.groups[group].size
    floats = torch.arange(n, dtype=torch.float64).flip(0) + 0.9  # truncation would give a valid permutation
    assert torch.equal(torch.sort(floats.long()).values, torch.arange(n))  # truncated, it would pass
    with pytest.raises(SpecError, match=rf"Indices for group '{group}' have dtype torch.float64.*3.9"):
        ma.Permutation(spec, {group: floats})
    with pytest.raises(SpecError, match="dtype torch.float"):
        ma.Permutation(spec, {group: [float(i) for i in range(n)]})
    with pytest.raises(SpecError, match="torch.bool"):
        ma.Permutation(spec, {group: torch.ones(n, dtype=torch.bool)})


def test_integer_indices_of_any_kind_are_accepted_and_copied(plain) -> None:
    model, spec = plain
    group = next(iter(spec.groups))
    n = spec.groups[group].size
    reverse = list(range(n))[::-1]
    for value in (reverse, tuple(reverse), np.array(reverse), torch.tensor(reverse, dtype=torch.int32)):
        assert torch.equal(ma.Permutation(spec, {group: value})[group], torch.tensor(reverse))
    source = torch.tensor(reverse)
    perm = ma.Permutation(spec, {group: source})
    source[0] = 0  # the permutation owns a copy
    assert perm[group][0] == n - 1 and perm[group].dtype == torch.long


@pytest.mark.parametrize(
    ("make", "culprit"),
    [
        (lambda n: torch.arange(n).reshape(1, n), r"have shape \(1, \d+\); pass a 1-D"),
        (lambda n: torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(n - 1)]), "hold 0 2 times"),
        (lambda n: torch.arange(1, n + 1), r"hold \d+, outside range"),
        (lambda n: torch.arange(n) - 1, r"hold -1, outside range"),
        (lambda n: torch.arange(n + 1), r"have length \d+ but the group has"),
        (lambda n: torch.tensor(3), r"have shape \(\); pass a 1-D"),
    ],
)
def test_non_permutation_indices_are_refused(plain, make, culprit: str) -> None:
    model, spec = plain
    group = next(iter(spec.groups))
    with pytest.raises(SpecError, match=rf"^Indices for group '{group}' {culprit}"):
        ma.Permutation(spec, {group: make(spec.groups[group].size)})


# ----------------------------------------------------------- shared storage
def test_a_parameter_that_views_another_is_found_at_spec_time_and_kept_shared() -> None:
    torch.manual_seed(0)
    model = TiedAutoencoder().eval()
    x = inputs(features=6)
    spec = ma.build_spec(model, x)
    assert spec.shared_storage == (("enc.weight", "dec.weight"),)
    assert "shared storage: enc.weight, dec.weight" in spec.summary()
    perm = nontrivial(spec)
    for inplace in (False, True):
        target = copy.deepcopy(model) if inplace else model
        if inplace:  # deepcopy gives each Parameter its own storage: tie again
            target.dec.weight = nn.Parameter(target.enc.weight.t())
        permuted = ma.apply_permutation(target, perm, inplace=inplace)
        assert permuted.dec.weight.untyped_storage().data_ptr() == permuted.enc.weight.untyped_storage().data_ptr()
        assert torch.equal(permuted.dec.weight, permuted.enc.weight.t())
        assert relative_change(model, permuted, x) < KEEP_TOL
    assert model.dec.weight.untyped_storage().data_ptr() == model.enc.weight.untyped_storage().data_ptr()


def test_shared_storage_the_permutation_cannot_keep_is_refused_naming_both() -> None:
    torch.manual_seed(0)
    model = CrossTied().eval()
    x = inputs(features=4)
    spec = ma.build_spec(model, x)
    assert spec.shared_storage == (("a.weight", "b.weight"),)
    perm = nontrivial(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for inplace in (False, True):
        with pytest.raises(SpecError) as info:
            ma.apply_permutation(model, perm, inplace=inplace)
        assert "'a.weight'" in str(info.value) and "'b.weight'" in str(info.value)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # negative control: what load_state_dict would do (the second write undoes the first)
    broken = copy.deepcopy(model)
    broken.b.weight = nn.Parameter(broken.a.weight.t())
    broken.load_state_dict(ma.permute_state_dict(model.state_dict(), perm))
    assert relative_change(model, broken, x) > BREAK_TOL
    # b.weight[i, j] == a.weight[j, i]: moving a's rows and b's columns alike keeps the storage consistent
    assert sorted(spec.groups) == ["a.weight:0", "h.weight:0"]
    same = torch.tensor([2, 0, 3, 1])
    safe = ma.Permutation(spec, {"a.weight:0": same, "h.weight:0": same})
    permuted = ma.apply_permutation(model, safe)
    assert permuted.b.weight.untyped_storage().data_ptr() == permuted.a.weight.untyped_storage().data_ptr()
    assert relative_change(model, permuted, x) < KEEP_TOL
    assert relative_change(model, ma.apply_permutation(permuted, safe.inverse()), x) < KEEP_TOL


def test_inplace_refuses_to_write_through_an_alias_kept_elsewhere(plain) -> None:
    model, spec = plain
    target = copy.deepcopy(model)
    perm = nontrivial(spec)
    alias = target.blocks[0].fc1.weight.data
    kept = alias.clone()
    with pytest.raises(SpecError, match=r"^Tensor 'blocks\.0\.fc1\.weight' of the model shares its storage with 1"):
        ma.apply_permutation(target, perm, inplace=True)
    assert torch.equal(alias, kept) and torch.equal(target.blocks[0].fc1.weight, kept)
    copied = ma.apply_permutation(target, perm)  # a copy never writes through
    assert torch.equal(alias, kept) and relative_change(target, copied, inputs()) < KEEP_TOL
    del alias
    snapshot = target.state_dict()  # detached views of every tensor
    with pytest.raises(SpecError, match="state_dict"):
        ma.apply_permutation(target, perm, inplace=True)
    del snapshot
    permuted = ma.apply_permutation(target, perm, inplace=True)
    assert permuted is target and relative_change(model, target, inputs()) < KEEP_TOL


def test_a_view_parameter_in_another_model_is_not_overwritten(plain) -> None:
    """``nn.Parameter(enc.weight.t())`` across two models: permuting one in
    place would silently change the other."""
    model, spec = plain
    target = copy.deepcopy(model)
    other = nn.Linear(16, 16).double()
    other.weight = nn.Parameter(target.blocks[1].fc2.weight.t())
    kept = other.weight.detach().clone()
    with pytest.raises(SpecError, match="blocks.1.fc2.weight"):
        ma.apply_permutation(target, nontrivial(spec), inplace=True)
    assert torch.equal(other.weight, kept)


def test_storage_sharing_lists_distinct_tensors_only() -> None:
    base = torch.randn(4, 4)
    same = nn.Parameter(torch.randn(3))
    found = storage_sharing({"w": base, "wt": base.t(), "p": same, "p_tied": same, "lone": torch.randn(2)})
    assert found == [["w", "wt"]]


@pytest.mark.slow
def test_fingerprint_and_module_check_are_cheap() -> None:
    """A millisecond-scale check on a ResNet20 (generous bound for shared CI
    machines); the measured costs are in docs/reference/permutation.md."""
    import time

    model = ResNet20().eval()
    spec = ma.build_spec(model, torch.randn(2, 3, 32, 32))
    start = time.perf_counter()
    for _ in range(10):
        module_types(model)
        _ = spec.fingerprint
    assert (time.perf_counter() - start) / 10 < 0.05
