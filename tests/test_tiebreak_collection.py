"""Restricted collection of the pre-activation tie-break statistic.

With ``points="post"`` a group's tie-break statistic is read only at units
that tie in the primary (post-activation) statistic. ``match_activations``
therefore accumulates its cross products only for the units of A and of B
that have been constant in the primary statistic so far (dead units), rows
and columns, instead of the whole ``(n, n)`` matrix. These tests check that
the permutations are those of the full collection (today's result before
the change), that units which start constant and then vary are dropped,
that the tie-break still decides dead units (negative control without it),
that fewer products are accumulated, and that a tie class whose units were
not collected keeps its primary assignment (reported as ``tied_kept``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import make_inputs, make_model
from torch import Tensor, nn

import maskalign as ma
import maskalign.matching.activation as am
from maskalign.matching.stats import ActivationStats, TieBreakStats
from maskalign.models import MLP

HIDDEN = "layers.0.weight:0"


def dead_mlp(seed: int, dead: tuple[int, ...] = (1, 4, 5, 9, 17, 30)) -> MLP:
    """A float64 ReLU MLP for ``(N, 1, 8, 8)`` inputs whose first hidden
    layer has dead units ``dead`` (bias -1e3: 0 after the ReLU on every
    input, with different pre-activations) and whose second has three."""
    torch.manual_seed(seed)
    model = MLP(in_features=64, hidden=(32, 24)).double().eval()
    with torch.no_grad():
        model.layers[0].bias[list(dead)] = -1e3  # type: ignore[operator]
        model.layers[1].bias[[0, 7, 11]] = -1e3  # type: ignore[operator]
    return model


def dead_resnet(seed: int) -> nn.Module:
    """ResNet20 whose every block's first BatchNorm has two dead channels."""
    model = make_model("resnet20_w1", seed=seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d) and name.endswith("bn1"):
                module.bias[[0, 3]] = -1e3
    return model


def batches(count: int = 4, size: int = 64, seed: int = 300) -> list[Tensor]:
    return [make_inputs(size, seed=seed + i) for i in range(count)]


def full_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tie-break statistic collected in full (``ActivationStats``), as
    before the restriction and as under ``torch.distributed``."""
    monkeypatch.setattr(am._Pass, "_stats", lambda self, n, key=None: _plain(self, n))


def _plain(run: am._Pass, n: int) -> ActivationStats:
    stats = ActivationStats(n, run.device, run.stats_dtype)
    stats._workspace = run.workspace
    return stats


def tiebreak_instances(monkeypatch: pytest.MonkeyPatch) -> list[TieBreakStats]:
    made: list[TieBreakStats] = []
    original = TieBreakStats.__init__

    def init(self: TieBreakStats, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(TieBreakStats, "__init__", init)
    return made


def same(p: ma.Permutation, q: ma.Permutation) -> bool:
    """Equal permutations and per-group reports (values and order)."""
    return all(torch.equal(p[g], q[g]) for g in p.spec.groups) and json.dumps(p.report["groups"]) == json.dumps(
        q.report["groups"]
    )


def match(a: nn.Module, b: nn.Module, data: list[Tensor], spec: ma.PermutationSpec, **kw: Any) -> ma.Permutation:
    return ma.match_activations(a, b, data, spec, progress=False, **kw)


# --------------------------------------------------------- exact recovery
@pytest.mark.parametrize("stream", ["all", "last"])
def test_planted_permutation_with_dead_units_is_recovered(stream: str) -> None:
    model = dead_mlp(3)
    data = batches()
    spec = ma.build_spec(model, data[0])
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(7))
    permuted = ma.apply_permutation(model, sigma)
    pi = match(model, permuted, data, spec, stream_points=stream)
    assert pi == sigma
    assert pi.report["groups"][HIDDEN]["tied"] >= 6
    assert all("tied_kept" not in values for values in pi.report["groups"].values())


@pytest.mark.slow
def test_planted_permutation_of_a_resnet_with_dead_channels_is_recovered() -> None:
    model = dead_resnet(23)
    data = batches(3, 32)
    spec = ma.build_spec(model, data[0])
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(24))
    pi = match(model, ma.apply_permutation(model, sigma), data, spec)
    assert pi == sigma
    assert sum(values.get("tied", 0) for values in pi.report["groups"].values()) >= 2 * 9


@pytest.mark.parametrize("cost", ["correlation", "covariance", "euclidean"])
@pytest.mark.parametrize("seeds", [(1, 2), (5, 6)])
def test_same_as_full_collection_on_independent_mlps(
    monkeypatch: pytest.MonkeyPatch, cost: str, seeds: tuple[int, int]
) -> None:
    """Two independent MLPs with dead units: permutations and reports (tied
    counts included) are those of the full tie-break statistic."""
    a, b = dead_mlp(seeds[0]), dead_mlp(seeds[1], dead=(0, 2, 4, 8))
    data = batches()
    spec = ma.build_spec(a, data[0])
    restricted = match(a, b, data, spec, cost=cost)
    assert restricted.report["groups"][HIDDEN]["tied"] >= 4
    full_collection(monkeypatch)
    assert same(restricted, match(a, b, data, spec, cost=cost))


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [(71, 72), (23, 24)])
def test_same_as_full_collection_on_resnets(monkeypatch: pytest.MonkeyPatch, seeds: tuple[int, int]) -> None:
    a, b = dead_resnet(seeds[0]), dead_resnet(seeds[1])
    data = batches(3, 32)
    spec = ma.build_spec(a, data[0])
    restricted = match(a, b, data, spec)
    planned = match(
        a, b, data, spec, max_memory=am.needed_budget(max(am.planned_bytes([u]) for u in _units(a, b, spec)))
    )
    assert planned.report["passes"] > 1
    full_collection(monkeypatch)
    full = match(a, b, data, spec)
    assert same(restricted, full)
    assert all(torch.equal(planned[g], full[g]) for g in spec.groups)
    assert json.dumps(planned.report["groups"]) == json.dumps(full.report["groups"])


def _units(a: nn.Module, b: nn.Module, spec: ma.PermutationSpec) -> list[am._Unit]:
    run = am._Pass(spec, a, b, "post", "last", 4096, torch.device("cpu"), 2**62, None)
    return [unit for units in run.passes for unit in units]


def test_mask_aware_zero_mass_units_stay_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit whose weights are all pruned has a weighted row of zeros: it
    ties although it varies, so it is collected from the start."""
    a, b = dead_mlp(1), dead_mlp(2)
    data = batches()
    spec = ma.build_spec(a, data[0])
    mask = {name: torch.ones_like(p, dtype=torch.bool) for name, p in a.named_parameters()}
    mask["layers.0.weight"][[2, 3, 6]] = False
    mask["layers.0.bias"][[2, 3, 6]] = False
    mask["layers.1.weight"][:, [2, 3, 6]] = False
    made = tiebreak_instances(monkeypatch)
    restricted = match(a, b, data, spec, mask=mask)
    first = next(s for s in made if s.n == 32)
    assert first.rows[[1, 4, 5, 9, 17, 30]].all() and first.rows[[2, 3, 6]].all()
    assert all("tied_kept" not in values for values in restricted.report["groups"].values())
    full_collection(monkeypatch)
    assert same(restricted, match(a, b, data, spec, mask=mask))


# ------------------------------------------------ units that start constant
def test_units_constant_on_the_first_batch_only_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Units 1, 4, 5 are dead on the first (tiny) batch and active on the
    later ones: candidates after batch 0, dropped at batch 1; the result is
    that of the full statistic, and the planted permutation is recovered."""
    model = dead_mlp(3, dead=(9, 17, 30))
    with torch.no_grad():
        model.layers[0].bias[[1, 4, 5]] = -0.5  # type: ignore[index]
    data = [make_inputs(64, seed=400) * 1e-3, *batches(3, 64, 401)]
    spec = ma.build_spec(model, data[0])
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(9))
    permuted = ma.apply_permutation(model, sigma)
    made = tiebreak_instances(monkeypatch)
    restricted = match(model, permuted, data[:1], spec)
    after_one = next(s for s in made if s.n == 32)
    assert {1, 4, 5, 9, 17, 30} <= set(torch.nonzero(after_one.rows).flatten().tolist())
    made.clear()
    restricted = match(model, permuted, data, spec)
    stats = next(s for s in made if s.n == 32)
    rows = set(torch.nonzero(stats.rows).flatten().tolist())
    assert {9, 17, 30} <= rows and not {1, 4, 5} & rows
    assert restricted == sigma
    full_collection(monkeypatch)
    assert same(restricted, match(model, permuted, data, spec))


def test_candidates_shrink_only() -> None:
    stats = TieBreakStats(6)
    stats.restrict(torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool), torch.ones(6, dtype=torch.bool))
    stats.restrict(torch.ones(6, dtype=torch.bool), torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool))
    assert stats.rows.tolist() == [True, True, False, True, False, True]
    assert stats.cols.tolist() == [False, True, False, False, False, False]


@pytest.mark.parametrize("cost", ["correlation", "covariance", "euclidean"])
@pytest.mark.parametrize("shape", [(50, 10), (4, 10, 30), (40, 10, 3)])
def test_collected_entries_equal_the_full_statistic(cost: str, shape: tuple[int, ...]) -> None:
    """Entries at collected rows and columns equal ActivationStats.compute's
    (float64 products; a smaller GEMM may round its sums differently), in
    every layout; the first update, all units still candidates, is bitwise."""
    generator = torch.Generator().manual_seed(11)
    full, restricted = ActivationStats(10), TieBreakStats(10)
    rows = torch.zeros(10, dtype=torch.bool)
    rows[[1, 4, 8]] = True
    cols = torch.zeros(10, dtype=torch.bool)
    cols[[2, 4]] = True
    for t in range(3):
        a = torch.randn(*shape, dtype=torch.float64, generator=generator) + 3.0
        b = torch.randn(*shape, dtype=torch.float64, generator=generator) - 1.0
        if t:
            restricted.restrict(rows, cols)
        full.update(a, b)
        restricted.update(a, b)
        if not t:
            assert torch.equal(full.cross, restricted.cross) and restricted.entries == 100
    similarity, blocks = full.compute(cost), restricted.compute_blocks(cost)
    assert blocks.rows.tolist() == [1, 4, 8] and blocks.cols.tolist() == [2, 4]
    torch.testing.assert_close(blocks.row_block, similarity[[1, 4, 8]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocks.col_block, similarity[:, [2, 4]], rtol=1e-12, atol=1e-12)
    assert restricted.entries == 100 + 2 * (3 * 10 + 7 * 2)
    assert blocks.for_rows(torch.tensor([1, 8]), torch.tensor([0, 5])) is not None
    assert blocks.for_rows(torch.tensor([1, 2]), torch.tensor([0, 5])) is None  # unit 2 was not collected
    assert blocks.for_cols(torch.tensor([0, 9]), torch.tensor([4, 2])) is not None
    assert blocks.for_cols(torch.tensor([0, 9]), torch.tensor([4, 3])) is None


# ------------------------------------------------------- negative control
def test_without_the_tie_break_dead_units_are_misassigned(monkeypatch: pytest.MonkeyPatch) -> None:
    model = dead_mlp(3)
    data = batches()
    spec = ma.build_spec(model, data[0])
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(7))
    permuted = ma.apply_permutation(model, sigma)
    assert match(model, permuted, data, spec) == sigma
    monkeypatch.setattr(am, "_break_ties", lambda primary, secondary, idx: (idx, 0))
    without = match(model, permuted, data, spec)
    wrong = (without[HIDDEN] != sigma[HIDDEN]).nonzero().flatten()
    dead_in_b = set(torch.argsort(sigma[HIDDEN])[[1, 4, 5, 9, 17, 30]].tolist())
    assert len(wrong) >= 2 and set(wrong.tolist()) <= dead_in_b


# ------------------------------------------------------------ the saving
def test_no_constant_unit_accumulates_no_tiebreak_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without dead units (next to) no tie-break cross product is
    accumulated (the full collection adds n * n per update); with them,
    rows of A's dead units and columns of B's."""
    torch.manual_seed(0)
    a, b = MLP(in_features=64, hidden=(32, 24)).double().eval(), MLP(in_features=64, hidden=(32, 24)).double().eval()
    data = batches(3)
    spec = ma.build_spec(a, data[0])
    made = tiebreak_instances(monkeypatch)
    pi = match(a, b, data, spec)
    assert len(made) == 2 and all(s.count == 3 * 64 and not s.rows.any() and not s.cols.any() for s in made)
    full = 3 * (32 * 32 + 24 * 24)  # what the full statistic adds over 3 updates
    assert made[0].entries == 0  # the first hidden layer: no unit constant on any batch
    assert sum(s.entries for s in made) <= 0.02 * full  # (a unit of the second was constant on one batch)
    assert all("tied" not in values or values["tied"] == 0 for values in pi.report["groups"].values())
    made.clear()
    a, b = dead_mlp(1), dead_mlp(2, dead=(0, 2))
    match(a, b, data, spec)
    hidden = next(s for s in made if s.n == 32)
    assert hidden.entries == 3 * (6 * 32 + (32 - 6) * 2)  # 3 updates of 6 rows and 2 columns
    assert hidden.entries < 3 * 32 * 32 / 4


def test_distributed_and_full_plans_collect_everything() -> None:
    """Under torch.distributed (restrict_ties=False) the tie-break statistic
    is a plain ActivationStats: ranks cannot agree on constant units before
    the data is all seen."""
    model = dead_mlp(1)
    data = batches(1)
    spec = ma.build_spec(model, data[0])
    for restrict, kind in ((True, TieBreakStats), (False, ActivationStats)):
        run = am._Pass(
            spec, model, model, "post", "last", 4096, torch.device("cpu"), 2**62, None, restrict_ties=restrict
        )
        run.start(0)
        tiebreaks = [s for (g, role), s in run.clean.items() if role == am.TIEBREAK]
        assert tiebreaks and all(type(s) is kind for s in tiebreaks)


# ------------------------------------------- ties among non-constant units
def test_ties_of_varying_units_keep_their_primary_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two copies of one unit tie without being constant: they were not
    collected, so their class keeps the primary assignment (same primary
    total as the full collection), counted as ``tied_kept``."""
    a, b = dead_mlp(1), dead_mlp(2)
    with torch.no_grad():
        a.layers[0].weight[12] = a.layers[0].weight[13]  # type: ignore[index]
        a.layers[0].bias[12] = a.layers[0].bias[13]  # type: ignore[index]
    data = batches()
    spec = ma.build_spec(a, data[0])
    restricted = match(a, b, data, spec)
    report = restricted.report["groups"][HIDDEN]
    assert report["tied_kept"] == 2 and report["tied"] >= 6
    full_collection(monkeypatch)
    full = match(a, b, data, spec)
    assert "tied_kept" not in full.report["groups"][HIDDEN]
    assert report["after"] == pytest.approx(full.report["groups"][HIDDEN]["after"], abs=1e-12)
    differ = (restricted[HIDDEN] != full[HIDDEN]).nonzero().flatten()
    assert set(restricted[HIDDEN][differ].tolist()) <= {12, 13}
