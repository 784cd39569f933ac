"""match_activations within a memory budget (issue 16): the statistics are
planned into passes over the data that fit ``max_memory``; one pass when all
fit (the result of no budget), several when not, with the same permutation;
typed errors for a one-shot iterator read several times and for a group that
alone exceeds the budget; the planned bytes checked against the statistics as
actually allocated; float32 batch statistics against float64 ones."""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import make_inputs, make_model, randomize, run_workers, spec_for
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import maskalign as ma
from maskalign.errors import ArgumentTypeError, ArgumentValueError, DataError
from maskalign.matching import activation as am
from maskalign.matching.stats import ActivationStats


class TwoAttentionLayers(nn.Module):
    """Two 2-head self-attention layers on a ReLU stream: two units of nested
    groups (heads and head dims of each layer) that coordinate ascent solves."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.attn1 = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mid = nn.Linear(8, 12)
        self.back = nn.Linear(12, 8)
        self.attn2 = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        y, _ = self.attn1(h, h, h, need_weights=False)
        h = self.back(torch.relu(self.mid(torch.relu(y + h))))
        y, _ = self.attn2(h, h, h, need_weights=False)
        return self.out(torch.relu(y + h))


def _same(p: ma.Permutation, q: ma.Permutation) -> bool:
    """Equal permutations and equal per-group reports (values and order)."""
    return all(torch.equal(p[g], q[g]) for g in p.spec.groups) and json.dumps(p.report["groups"]) == json.dumps(
        q.report["groups"]
    )


def _units(a: nn.Module, b: nn.Module, spec: ma.PermutationSpec) -> list[am._Unit]:
    run = am._Pass(spec, a, b, am.DEFAULT_POINTS, am.DEFAULT_STREAM_POINTS, 4096, torch.device("cpu"), 2**62, None)
    return [unit for units in run.passes for unit in units]


def _tightest(a: nn.Module, b: nn.Module, spec: ma.PermutationSpec) -> int:
    """The smallest budget that fits every unit: the most passes."""
    return am.needed_budget(max(am.planned_bytes([unit]) for unit in _units(a, b, spec)))


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, nn.Module, ma.PermutationSpec, list[Tensor]]:
    return (
        make_model("resnet20_w1", seed=71),
        make_model("resnet20_w1", seed=72),
        spec_for("resnet20_w1"),
        [make_inputs(16, seed=700 + i) for i in range(3)],
    )


@pytest.fixture(scope="module")
def attention() -> tuple[nn.Module, nn.Module, ma.PermutationSpec, list[Tensor]]:
    torch.manual_seed(0)
    a, b = randomize(TwoAttentionLayers(), seed=81), randomize(TwoAttentionLayers(), seed=82)
    data = [torch.randn(6, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return a, b, ma.build_spec(a, data[0]), data


@pytest.mark.slow
def test_one_pass_when_everything_fits_is_identical_to_no_budget(resnet) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = resnet
    default = ma.match_activations(a, b, data, spec, progress=False)
    assert default.report["passes"] == 1
    exact = am.needed_budget(default.report["stats_bytes"])  # the budget that just fits
    for budget in (exact, 2**40):
        pi = ma.match_activations(a, b, data, spec, progress=False, max_memory=budget)
        assert pi.report["passes"] == 1 and pi.report["max_memory"] == budget
        assert _same(pi, default)
    assert not default.is_identity()
    split = ma.match_activations(a, b, data, spec, progress=False, max_memory=exact - 1)
    assert split.report["passes"] == 2  # one byte less does not fit
    assert _same(split, default)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["resnet", "attention"])
def test_a_small_budget_takes_several_passes_with_the_same_permutation(which: str, request) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = request.getfixturevalue(which)
    one = ma.match_activations(a, b, data, spec, progress=False)
    budget = _tightest(a, b, spec)
    several = ma.match_activations(a, b, data, spec, progress=False, max_memory=budget)
    assert 1 < several.report["passes"] <= len(_units(a, b, spec))
    assert several.report["stats_bytes"] <= am.usable_bytes(budget) < one.report["stats_bytes"]
    assert _same(several, one)
    assert not one.is_identity()
    if which == "attention":  # nested groups in two units, solved in different passes
        nested = [u for u in _units(a, b, spec) if u.joint]
        assert len(nested) == 2 and all(len(u.groups) >= 2 for u in nested)


def test_each_pass_runs_only_the_nodes_of_its_groups(resnet, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = resnet
    calls: list[frozenset[str]] = []
    original = am._Prober.__call__

    def spy(self, state_a, state_b, flat, visit, nodes=None):  # type: ignore[no-untyped-def]
        calls.append(frozenset(nodes or ()))
        return original(self, state_a, state_b, flat, visit, nodes)

    monkeypatch.setattr(am._Prober, "__call__", spy)
    pi = ma.match_activations(a, b, data, spec, progress=False, max_memory=_tightest(a, b, spec))
    passes = pi.report["passes"]
    assert len(calls) == passes * len(data)
    per_pass = [calls[i * len(data)] for i in range(passes)]
    assert all(calls[i * len(data) + k] == per_pass[i] for i in range(passes) for k in range(len(data)))
    for i, nodes in enumerate(per_pass):  # disjoint, and together every node of one pass
        assert nodes and not any(nodes & other for other in per_pass[i + 1 :])
    calls.clear()
    ma.match_activations(a, b, data, spec, progress=False)
    assert set().union(*per_pass) == calls[0]


@pytest.mark.slow
def test_a_one_shot_iterator_read_in_several_passes_says_to_pass_a_list(resnet) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = resnet
    budget = _tightest(a, b, spec)
    with pytest.raises(ArgumentTypeError) as info:
        ma.match_activations(a, b, (x for x in data), spec, progress=False, max_memory=budget)
    message = info.value.message
    assert message.startswith("Argument 'data' is a one-shot iterator (generator)")
    assert "passes over the data; pass a list of batches or a DataLoader" in message and message.endswith(".")
    # one pass reads it once: fine; a list and a DataLoader serve several passes
    assert _same(
        ma.match_activations(a, b, iter(data), spec, progress=False),
        ma.match_activations(a, b, data, spec, progress=False),
    )
    loader = DataLoader(TensorDataset(torch.cat(data)), batch_size=16)
    got = ma.match_activations(a, b, loader, spec, progress=False, max_memory=budget)
    assert got.report["passes"] > 1 and _same(got, ma.match_activations(a, b, loader, spec, progress=False))


def test_a_data_loader_that_shuffles_is_warned_about_when_read_in_several_passes(resnet) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = resnet
    loader = DataLoader(TensorDataset(torch.cat(data)), batch_size=16, shuffle=True)
    with pytest.warns(UserWarning, match="Argument 'data' is a DataLoader that shuffles"):
        ma.match_activations(a, b, loader, spec, progress=False, max_memory=_tightest(a, b, spec))


class _Reshuffled:
    """Re-iterable data that yields other batches each time it is iterated
    (``fewer``: one batch less after the first iteration)."""

    def __init__(self, batches: list[Tensor], fewer: bool = False) -> None:
        self.batches, self.fewer, self.round = batches, fewer, 0

    def __iter__(self) -> Iterator[Tensor]:
        self.round += 1
        batches = self.batches[:-1] if self.fewer and self.round > 1 else self.batches
        if self.round > 1 and not self.fewer:
            batches = [x.flip(0).roll(self.round, dims=-1) for x in batches]
        return iter(batches)


def test_negative_control_passes_over_other_data_give_another_permutation(resnet) -> None:  # type: ignore[no-untyped-def]
    """The equality of several passes with one is not vacuous: passes that see
    other batches change the permutation."""
    a, b, spec, data = resnet
    one = ma.match_activations(a, b, data, spec, progress=False)
    other = ma.match_activations(a, b, _Reshuffled(data), spec, progress=False, max_memory=_tightest(a, b, spec))
    assert other.report["passes"] > 1
    assert not _same(other, one)
    assert any(not torch.equal(other[g], one[g]) for g in spec.groups)


def test_data_that_yields_fewer_batches_in_a_later_pass_is_a_data_error(resnet) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = resnet
    with pytest.raises(DataError, match=r"^Argument 'data' yielded 3 batches in the first pass but 2 in pass 2"):
        ma.match_activations(
            a, b, _Reshuffled(data, fewer=True), spec, progress=False, max_memory=_tightest(a, b, spec)
        )


def test_a_group_larger_than_the_budget_is_named_with_the_bytes_it_needs(resnet) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = resnet
    units = _units(a, b, spec)
    widest = max(units, key=lambda u: am.planned_bytes([u]))
    need = am.planned_bytes([widest])
    budget = am.needed_budget(need)
    assert am.usable_bytes(budget) >= need > am.usable_bytes(budget - 1) and budget > need  # an eighth is kept free
    with pytest.raises(ArgumentValueError) as info:
        ma.match_activations(a, b, data, spec, progress=False, max_memory=budget - 1)
    message = info.value.message
    assert message.startswith(f"Group {widest.groups[0]!r} needs {need} bytes of statistics")
    assert f"more than max_memory={budget - 1}" in message and f"pass max_memory={budget} or more" in message
    assert message.endswith(".")
    assert ma.match_activations(a, b, data, spec, progress=False, max_memory=budget).report["passes"] > 1


def test_nested_groups_too_large_are_named_together(attention) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = attention
    nested = next(u for u in _units(a, b, spec) if u.joint)
    with pytest.raises(ArgumentValueError, match=r"^Groups '.+', '.+' \(matched together\) need \d+ bytes"):
        am.plan_passes([nested], am.needed_budget(am.planned_bytes([nested])) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["resnet", "attention"])
def test_planned_bytes_bound_the_statistics_as_allocated(which: str, request, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An independent count: every ActivationStats alive at each update
    (weak references: freed ones drop out), its tensors' numel * element_size,
    plus the (n, n) scratch the pass holds then."""
    a, b, spec, data = request.getfixturevalue(which)
    alive: weakref.WeakSet[ActivationStats] = weakref.WeakSet()
    held: list[tuple[int, int]] = []  # (state bytes alive, square scratch bytes) at each update
    original_init, original_update = ActivationStats.__init__, ActivationStats.update

    def init(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        alive.add(self)

    def update(self, x: Tensor, y: Tensor) -> None:  # type: ignore[no-untyped-def]
        original_update(self, x, y)
        state = sum(t.numel() * t.element_size() for s in alive for t in (s.mean_a, s.mean_b, s.m2_a, s.m2_b, s.cross))
        scratch = self._workspace.nbytes(square_only=True) if self._workspace is not None else 0
        held.append((state, scratch))

    monkeypatch.setattr(ActivationStats, "__init__", init)
    monkeypatch.setattr(ActivationStats, "update", update)
    units = _units(a, b, spec)
    for budget in (None, _tightest(a, b, spec), (_tightest(a, b, spec) + am.planned_bytes(units)) // 2):
        held.clear()
        pi = ma.match_activations(a, b, data, spec, progress=False, max_memory=budget)
        planned = pi.report["stats_bytes"]
        assert planned <= am.usable_bytes(pi.report["max_memory"]) < pi.report["max_memory"]
        assert max(state + scratch for state, scratch in held) <= planned
        # the planner's state count is exact: the largest pass's states are all alive while it updates
        run = am._Pass(spec, a, b, "post", "last", 4096, torch.device("cpu"), pi.report["max_memory"], None)
        states = [sum(ActivationStats.state_bytes(n) for u in units_ for n in u.sizes) for units_ in run.passes]
        assert len(states) == pi.report["passes"]
        assert max(state for state, _ in held) == max(states)
        assert planned == max(am.planned_bytes(units_) for units_ in run.passes)
        assert not list(alive)  # every statistic was freed once solved
    # negative control: the count sees a statistic kept alive
    kept = ActivationStats(7)
    assert sum(s.nbytes for s in alive) == ActivationStats.state_bytes(7) == kept.nbytes > 0


@pytest.mark.slow
def test_float32_batch_statistics_agree_with_float64() -> None:
    """A float32 model: batch statistics in float32 (the default) merged in
    float64 against statistics in float64 from the activations upcast."""
    a, b = make_model("resnet20_w2", seed=91).float(), make_model("resnet20_w2", seed=92).float()
    data = [make_inputs(64, seed=900 + i).float() for i in range(4)]
    spec = ma.build_spec(a, data[0])
    f64 = ma.match_activations(a, b, data, spec, progress=False, stats_dtype=torch.float64)
    f32 = ma.match_activations(a, b, data, spec, progress=False, stats_dtype=torch.float32)
    default = ma.match_activations(a, b, data, spec, progress=False)
    assert _same(default, f32)  # None: the activations' own precision
    units = sum(spec.groups[g].size for g in spec.groups)
    agree = sum(int((f32[g] == f64[g]).sum()) for g in spec.groups) / units
    assert agree >= 0.99
    for g, values in f64.report["groups"].items():
        assert f32.report["groups"][g]["after"] == pytest.approx(values["after"], abs=1e-5)
    # negative control: on other data the permutations agree far less
    other = [make_inputs(64, seed=950 + i).float() for i in range(4)]
    elsewhere = ma.match_activations(a, b, other, spec, progress=False, stats_dtype=torch.float64)
    assert sum(int((elsewhere[g] == f64[g]).sum()) for g in spec.groups) / units < agree - 0.05


def test_budget_and_dtype_arguments_are_checked(resnet) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = resnet
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"max_memory": 0}, ArgumentValueError, "Argument 'max_memory' is 0; pass an int >= 1."),
        ({"max_memory": "1GB"}, ArgumentTypeError, "Argument 'max_memory' is the str '1GB'; pass an int >= 1."),
        ({"stats_dtype": torch.float16}, ArgumentValueError, "Argument 'stats_dtype' is torch.float16; pass"),
        ({"stats_dtype": "float32"}, ArgumentTypeError, "Argument 'stats_dtype' is the str 'float32'; pass"),
    ]
    for kwargs, error, start in cases:
        with pytest.raises(error) as info:
            ma.match_activations(a, b, data, spec, progress=False, **kwargs)
        assert info.value.message.startswith(start)  # type: ignore[attr-defined]


def test_the_default_budget_is_half_the_free_memory(resnet) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, data = resnet
    pi = ma.match_activations(a, b, data[:1], spec, progress=False)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # physical memory bounds the free memory
    assert 0 < pi.report["max_memory"] <= total // 2
    assert pi.report["stats_bytes"] <= pi.report["max_memory"]


WORLD = 2


def _worker(rank: int, init_file: str, out_file: str, budget: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        a, b = make_model("resnet20_w1", seed=71), make_model("resnet20_w1", seed=72)
        shard = [make_inputs(16, seed=700 + i) for i in range(4)][rank::WORLD]
        pi = ma.match_activations(a, b, shard, spec_for("resnet20_w1"), progress=False, max_memory=budget)
        torch.save({"indices": {g: pi[g] for g in pi}, "passes": pi.report["passes"]}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_in_several_passes_match_like_one_process(resnet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b, spec, _ = resnet
    data = [make_inputs(16, seed=700 + i) for i in range(4)]
    single = ma.match_activations(a, b, data, spec, progress=False)
    budget = _tightest(a, b, spec)
    out = str(tmp_path / "perm")
    run_workers(_worker, (str(tmp_path / "init"), out, budget), WORLD)
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["passes"] > 1
        for group in single:
            assert torch.equal(got["indices"][group], single[group]), (rank, group)
