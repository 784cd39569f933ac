"""``match_activations`` and ``match_weights`` show their own tqdm bar (a
bar over the batches, a bar over the sweeps), and ``progress=False`` is
silent: no bar is even made."""

from __future__ import annotations

import pytest
import torch

import maskalign as ma
from maskalign.models import MLP

tqdm_auto = pytest.importorskip("tqdm.auto")


class RecordingBar(tqdm_auto.tqdm):  # type: ignore[misc, name-defined]
    """tqdm that remembers every bar made and how far it got."""

    made: list[RecordingBar] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True  # count, but draw nothing
        super().__init__(*args, **kwargs)
        self.made_with = kwargs
        self.updates = 0
        RecordingBar.made.append(self)

    def update(self, n: float | None = 1) -> bool | None:
        self.updates += 1
        return super().update(n)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[RecordingBar]:
    RecordingBar.made = []
    monkeypatch.setattr(tqdm_auto, "tqdm", RecordingBar)
    return RecordingBar.made


def _pair() -> tuple[MLP, MLP, ma.PermutationSpec]:
    torch.manual_seed(0)
    a, b = MLP(in_features=16, hidden=(32, 32), num_classes=4), MLP(in_features=16, hidden=(32, 32), num_classes=4)
    return a, b, ma.build_spec(a, torch.randn(2, 16))


def test_weight_matching_counts_its_sweeps_on_a_bar(bars: list[RecordingBar]) -> None:
    a, b, spec = _pair()
    pi = ma.match_weights(a, b, spec, restarts=2)
    assert len(bars) == 1 and bars[0].made_with["desc"] == "weight matching"
    assert bars[0].made_with["leave"] is False and bars[0].made_with["delay"] > 0  # short calls show nothing
    run_sweeps = pi.report["sweeps"]
    assert bars[0].updates >= run_sweeps >= 1  # every sweep of every run (the greedy sweep is not a coordinate sweep)


def test_activation_matching_counts_its_batches_on_a_bar(bars: list[RecordingBar]) -> None:
    a, b, spec = _pair()
    data = [torch.randn(8, 16) for _ in range(5)]
    ma.match_activations(a, b, data, spec)
    assert len(bars) == 1 and bars[0].made_with["desc"] == "activation matching"
    assert bars[0].made_with["total"] == 5


@pytest.mark.parametrize("matcher", ["weight", "activation"])
def test_progress_false_makes_no_bar(bars: list[RecordingBar], matcher: str) -> None:
    a, b, spec = _pair()
    if matcher == "weight":
        ma.match_weights(a, b, spec, progress=False)
    else:
        ma.match_activations(a, b, [torch.randn(8, 16)], spec, progress=False)
    assert bars == []


def test_progress_must_be_a_bool() -> None:
    a, b, spec = _pair()
    with pytest.raises(ma.ArgumentTypeError, match=r"^Argument 'progress' is .*; pass True or False\."):
        ma.match_weights(a, b, spec, progress="no")  # type: ignore[arg-type]
