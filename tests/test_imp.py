"""Tests for maskalign.sparse.imp: the IMP schedule, the three rewinding conventions,
resuming, leak handling and bad input."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import maskalign as ma
from maskalign.errors import MaskError
from maskalign.sparse.imp import IMPRound, imp_schedule, iterative_magnitude_pruning


class Net(nn.Module):
    """Conv body with a shortcut conv (the kind the paper's code leaves dense)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.shortcut = nn.Conv2d(2, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn(self.conv(x) + self.shortcut(x))).flatten(1))


def data(seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 2, 4, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(3)]


class Trainer:
    """A train_fn that records what each round starts from, then trains with
    its own SGD optimiser under enforce_masks (as the docs tell users to)."""

    def __init__(self, steps: int = 3) -> None:
        self.steps = steps
        self.rounds: list[IMPRound] = []
        self.starts: list[dict[str, Tensor]] = []

    def __call__(self, model: nn.Module, imp_round: IMPRound) -> None:
        self.rounds.append(imp_round)
        self.starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        torch.manual_seed(imp_round.index)  # deterministic per round, as a resumed run needs
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        with ma.enforce_masks(model, imp_round.masks, opt):
            for _ in range(self.steps):
                for x, y in data(imp_round.index):
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()


def test_schedule_prunes_rate_of_remaining_and_lands_on_each_target() -> None:
    schedule = imp_schedule([0.9, 0.5], rate=0.2)
    assert schedule[:3] == pytest.approx([0.2, 0.36, 0.488])
    assert 0.5 in schedule and schedule[-1] == 0.9
    for prev, cur in zip(schedule, schedule[1:]):
        assert prev < cur and (1 - cur) >= (1 - prev) * 0.8 - 1e-12
    assert len(schedule) == math.ceil(math.log(0.1) / math.log(0.8)) + 1
    assert imp_schedule(0.2, rate=0.2) == [0.2]


@pytest.mark.parametrize("bad", [{"targets": []}, {"targets": [1.0]}, {"targets": [0.0]}, {"rate": 1.0}])
def test_schedule_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        imp_schedule(bad.get("targets", [0.5]), rate=bad.get("rate", 0.2))


def test_no_rewind_fine_tunes_previous_round_and_masks_are_nested() -> None:
    model = Net()
    before = copy.deepcopy(model.state_dict())
    trainer = Trainer()
    result = iterative_magnitude_pruning(model, trainer, [0.5, 0.8])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "input model mutated"
    assert [r.index for r in trainer.rounds] == list(range(1, len(imp_schedule([0.5, 0.8])) + 1))
    assert all(r.start_epoch == 0 and r.rewind == "none" for r in trainer.rounds)
    ends = trainer.starts[1:]  # round r+1 starts from round r's trained weights, newly pruned entries zeroed
    for imp_round, start in zip(trainer.rounds[1:], ends):
        prev = trainer.rounds[imp_round.index - 2]
        # round r+1's mask = magnitude pruning of round r's trained weights
        # (so earlier pruned entries stay pruned: masks are nested)
        for name, mask in imp_round.masks.items():
            assert bool((mask <= prev.masks[name]).all())
            assert bool((start[name][~mask] == 0).all())
    for target in (0.5, 0.8):
        assert ma.sparsity(result.masks_at[target]).global_ == pytest.approx(target, abs=1e-3)
    assert result.masks is result.masks_at[0.8]
    assert set(result.masks) == {"conv.weight", "shortcut.weight", "head.weight"}
    ma.assert_masked(result.model, result.masks)
    assert [h["round"] for h in result.history] == [r.index for r in trainer.rounds]
    assert result.history[-1]["achieved"] == pytest.approx(0.8, abs=1e-3)


def test_each_round_prunes_the_smallest_trained_weights() -> None:
    trainer = Trainer()
    snapshots: list[nn.Module] = []
    result = iterative_magnitude_pruning(
        Net(), trainer, 0.6, on_round_end=lambda r, m: snapshots.append(copy.deepcopy(m))
    )
    levels = imp_schedule(0.6)
    for i in range(1, len(levels)):
        expected = ma.global_magnitude_prune(snapshots[i - 1], levels[i], masks=trainer.rounds[i - 1].masks)
        assert all(torch.equal(expected[n], trainer.rounds[i].masks[n]) for n in expected)
    assert len(result.history) == len(levels)


@pytest.mark.parametrize("mode", ["continue", "restart"])
def test_rewinding_modes_load_the_rewind_point_each_round(mode: str) -> None:
    model = Net()
    rewind_state = copy.deepcopy(Net(seed=5).state_dict())
    trainer = Trainer()
    iterative_magnitude_pruning(model, trainer, 0.5, rewind=mode, rewind_to=rewind_state, rewind_epoch=3)
    assert len(trainer.rounds) == len(imp_schedule(0.5))
    for imp_round, start in zip(trainer.rounds, trainer.starts):
        assert imp_round.start_epoch == (3 if mode == "continue" else 0)
        for key, value in rewind_state.items():
            if key in imp_round.masks:  # kept entries rewound, pruned ones zero
                mask = imp_round.masks[key]
                assert torch.equal(start[key][mask], value[mask])
                assert bool((start[key][~mask] == 0).all())
            else:
                assert torch.equal(start[key], value), key


def test_rewind_to_aliasing_the_model_is_snapshotted() -> None:
    model = Net()
    trainer = Trainer()
    live = model.state_dict()  # shares storage with the model's parameters
    expected = {k: v.clone() for k, v in live.items()}
    iterative_magnitude_pruning(model, trainer, 0.36, rewind="restart", rewind_to=live, inplace=True)
    second = trainer.starts[1]
    mask = trainer.rounds[1].masks["conv.weight"]
    assert torch.equal(second["conv.weight"][mask], expected["conv.weight"][mask])


def test_exclude_filter_keeps_shortcut_dense_and_params_choose() -> None:
    result = iterative_magnitude_pruning(Net(), Trainer(1), 0.5, exclude=lambda n: "shortcut" in n)
    assert set(result.masks) == {"conv.weight", "head.weight"}
    result = iterative_magnitude_pruning(Net(), Trainer(1), 0.5, params=["head.weight", "conv.bias"])
    assert set(result.masks) == {"head.weight", "conv.bias"}


def test_inplace_trains_the_given_model() -> None:
    model = Net()
    result = iterative_magnitude_pruning(model, Trainer(1), 0.2, inplace=True)
    assert result.model is model
    ma.assert_masked(model, result.masks)


def test_runs_are_deterministic_and_resume_gives_identical_masks() -> None:
    targets = [0.5, 0.8]
    checkpoints: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}

    def keep(imp_round: IMPRound, model: nn.Module) -> None:
        checkpoints[imp_round.index] = (copy.deepcopy(model.state_dict()), dict(imp_round.masks))

    full = iterative_magnitude_pruning(Net(), Trainer(), targets, on_round_end=keep, evaluate=lambda m: 0.0)
    again = iterative_magnitude_pruning(Net(), Trainer(), targets)
    assert all(torch.equal(full.masks[n], again.masks[n]) for n in full.masks)

    # "killed" after round 5 (past the 0.5 target): resume from its checkpoint
    state, masks = checkpoints[5]
    model = Net()
    model.load_state_dict(state)
    trainer = Trainer()
    resumed = iterative_magnitude_pruning(model, trainer, targets, masks=masks)
    assert trainer.rounds[0].index == 6
    assert [h["round"] for h in resumed.history] == [h["round"] for h in full.history][5:]
    assert set(resumed.masks_at) == {0.8}  # 0.5 was reached before the interruption
    for name in full.masks:
        assert torch.equal(resumed.masks[name], full.masks[name])
        assert torch.equal(resumed.model.state_dict()[name], full.model.state_dict()[name])
    # a target equal to the initial masks' sparsity maps to those masks
    state, masks = checkpoints[4]
    assert imp_schedule(targets)[3] == 0.5
    model = Net()
    model.load_state_dict(state)
    at_target = iterative_magnitude_pruning(model, Trainer(), targets, masks=masks)
    assert all(torch.equal(at_target.masks_at[0.5][n], masks[n]) for n in masks)


def test_leaking_train_fn_warns_and_is_zeroed() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # one optimiser across rounds

    def leaky(m: nn.Module, imp_round: IMPRound) -> None:
        for x, y in data():  # no enforce_masks with the optimiser: momentum moves pruned weights
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

    with pytest.warns(UserWarning) as caught:
        result = iterative_magnitude_pruning(model, leaky, 0.36, inplace=True)
    messages = [str(w.message) for w in caught]
    assert any(re.search(r"IMP round 2: train_fn left pruned weights non-zero", m) for m in messages)
    # enforce_masks' forward pre-hook sees the optimiser it was not given, and says so once per parameter
    assert any(re.search(r"masked entries had become non-zero .* handle\.attach\(optimizer\)", m) for m in messages)
    ma.assert_masked(model, result.masks)


def test_evaluate_is_recorded_per_round() -> None:
    calls = []

    def evaluate(m: nn.Module) -> float:
        calls.append(float(ma.sparsity(m).global_))
        return calls[-1]

    result = iterative_magnitude_pruning(Net(), Trainer(1), 0.36, evaluate=evaluate)
    assert [h["metric"] for h in result.history] == calls
    assert calls == pytest.approx([0.2, 0.36], abs=1e-2)  # sparsity of the weights the model ends with


@pytest.mark.slow  # IMP training on digits
def test_imp_finds_trainable_tickets_on_digits() -> None:
    """End to end: a digits MLP pruned to 80 % by IMP keeps its accuracy."""
    splits = ma_data_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = splits

    def fit(m: nn.Module, imp_round: IMPRound | None = None) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        handle = ma.enforce_masks(m, imp_round.masks, opt) if imp_round is not None else None
        gen = torch.Generator().manual_seed(0)
        for _ in range(15):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                opt.zero_grad()
                F.cross_entropy(m(x[idx]), y[idx]).backward()
                opt.step()
        if handle is not None:
            handle.remove()

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    fit(model)
    dense = accuracy(model)
    result = iterative_magnitude_pruning(model, fit, 0.8, evaluate=accuracy)
    assert dense > 0.95
    assert result.history[-1]["metric"] > dense - 0.03
    assert ma.sparsity(result.model, result.masks).global_ >= 0.8 - 1e-3


def ma_data_digits() -> tuple[Tensor, Tensor]:
    from maskalign.repro.data import load_digits

    train = load_digits().train
    return train.tensors[0].flatten(1), train.tensors[1]


# --- bad input


def test_bad_arguments_raise_clear_errors() -> None:
    model, trainer = Net(), Trainer(1)
    state = model.state_dict()
    with pytest.raises(ValueError, match="Argument 'rewind' is 'sometimes'; pass one of 'none', 'continue', 'restart'"):
        iterative_magnitude_pruning(model, trainer, 0.5, rewind="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Argument 'rewind_to' is missing: rewind='continue' needs"):
        iterative_magnitude_pruning(model, trainer, 0.5, rewind="continue")
    with pytest.raises(ValueError, match="Argument 'rewind_to' is given but rewind='none'"):
        iterative_magnitude_pruning(model, trainer, 0.5, rewind_to=state)
    with pytest.raises(ValueError, match="Argument 'rewind_epoch' is 2 but has no effect"):
        iterative_magnitude_pruning(model, trainer, 0.5, rewind_epoch=2)
    with pytest.raises(ValueError, match=r"Argument 'rewind_epoch' is -1; pass an int >= 0"):
        iterative_magnitude_pruning(model, trainer, 0.5, rewind="restart", rewind_to=state, rewind_epoch=-1)
    with pytest.raises(ValueError, match=r"missing keys \['bn.running_mean'\]"):
        partial = {k: v for k, v in state.items() if k != "bn.running_mean"}
        iterative_magnitude_pruning(model, trainer, 0.5, rewind="restart", rewind_to=partial)
    with pytest.raises(ValueError, match=r"rewind_to\['head.weight'\] has shape \(3, 5\)"):
        iterative_magnitude_pruning(
            model, trainer, 0.5, rewind="restart", rewind_to={**state, "head.weight": torch.zeros(3, 5)}
        )
    with pytest.raises(ValueError, match=r"Argument 'rate' is 0\.0; pass a fraction in \(0, 1\)"):
        iterative_magnitude_pruning(model, trainer, 0.5, rate=0.0)
    with pytest.raises(ValueError, match=r"Argument 'target_sparsity\[1\]' is 1\.0; pass a fraction in \(0, 1\)"):
        iterative_magnitude_pruning(model, trainer, [0.5, 1.0])
    with pytest.raises(MaskError, match="'nope'"):
        iterative_magnitude_pruning(model, trainer, 0.5, params=["nope"])
    with pytest.raises(ValueError, match="leave no parameter to prune"):
        iterative_magnitude_pruning(model, trainer, 0.5, exclude=lambda n: True)
    masks = ma.global_magnitude_prune(model, 0.6)
    with pytest.raises(MaskError, match="not pruned"):
        iterative_magnitude_pruning(model, trainer, 0.8, masks=masks, exclude=lambda n: n == "head.weight")
    with pytest.raises(MaskError, match="shape"):
        iterative_magnitude_pruning(model, trainer, 0.8, masks={"head.weight": torch.ones(2, dtype=torch.bool)})
    assert trainer.rounds == []  # nothing ran


def test_ten_rounds_leave_the_model_as_large_as_before() -> None:
    """torch.nn.utils.prune's hooks keep growing the pickled module across IMP
    rounds; here the model keeps its parameters and buffers only."""
    import io
    import pickle

    def size(m: nn.Module) -> int:
        buffer = io.BytesIO()
        torch.save(m, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
        return buffer.tell()

    model = Net()
    result = iterative_magnitude_pruning(model, Trainer(1), imp_schedule(0.9)[9], exclude=lambda n: "head" in n)
    assert len(result.history) == 10
    assert list(result.model.state_dict()) == list(model.state_dict())
    assert size(result.model) <= size(model) * 1.01
