"""The studies beyond the paper (early matching, matching sources) and the
permuted-ensemble compute: from the command line on digits, their stages,
their invariants and their tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from maskalign.errors import ConfigError
from maskalign.permutation import Permutation
from maskalign.repro.cli import main
from maskalign.repro.data import load_dataset
from maskalign.repro.experiment import plan_stages
from maskalign.repro.presets import get_preset
from maskalign.repro.studies import permutation_agreement, variants
from maskalign.repro.study_report import early_rows, ensemble_epochs, source_rows
from maskalign.repro.training import TrainConfig, train
from maskalign.spec import PermutationSpec, build_spec


def test_variants_of_a_config_name_every_permutation_once() -> None:
    config = get_preset("digits-quick", match_epochs=(1, 0), match_sources=("mask-aware", "subset", "imp"))
    names = [v.name for v in variants(config)]
    assert names == [
        "e0/AT-Be",
        "e0/Ae-Be",
        "e1/AT-Be",
        "e1/Ae-Be",
        "subset",
        "imp/s0.5",
        "imp/s0.8",
        "mask-aware/s0.5",
        "mask-aware/s0.8",
    ]
    targets = {v.name: v.targets(config) for v in variants(config)}
    assert targets["e1/AT-Be"] == (0.5, 0.8) and targets["subset"] == (0.5, 0.8)
    assert targets["imp/s0.8"] == (0.8,)
    assert variants(get_preset("digits-quick")) == []


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"match_epochs": (4,)}, "'match_epochs' (--match-epochs) is [4]; every matching epoch e must lie in [0, "),
        ({"match_epochs": (-1,)}, "'match_epochs' (--match-epochs) is [-1]"),
        ({"match_sources": ("subsets",)}, "holds 'subsets'; pass a subset of ['subset', 'imp', 'mask-aware']"),
        ({"subset_samples": 1}, "'subset_samples' (--subset-samples) is 1; pass at least 2"),
        ({"match_epochs": 2}, "'match_epochs' (--match-epochs) is 2; pass a list of values"),
    ],
)
def test_bad_study_settings_raise_config_errors_naming_them(overrides: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        get_preset("digits-quick", **overrides)
    assert words in str(info.value)


def test_unknown_source_suggests_the_close_name() -> None:
    with pytest.raises(ConfigError, match="Did you mean: 'subset'"):
        get_preset("digits-quick", match_sources=("subsett",))


def _mlp_spec() -> tuple[nn.Module, PermutationSpec]:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    return model, build_spec(model, torch.randn(2, 4))


def test_permutation_agreement_counts_units_mapped_alike() -> None:
    model, spec = _mlp_spec()
    identity = Permutation(spec, {})
    assert permutation_agreement(identity, identity) == 1.0
    groups = list(identity)
    sizes = [identity[g].numel() for g in groups]
    assert sorted(sizes) == [5, 6]
    # swap two units of the 6-wide group and reverse the 5-wide one: 4 + 1 of 11 units stay
    wide, narrow = (groups[0], groups[1]) if sizes[0] == 6 else (groups[1], groups[0])
    swapped = torch.tensor([1, 0, 2, 3, 4, 5])
    other = Permutation(spec, {wide: swapped, narrow: torch.tensor([4, 3, 2, 1, 0])})
    assert permutation_agreement(other, identity) == pytest.approx(5 / 11)
    assert permutation_agreement(identity, other) == pytest.approx(5 / 11)


def test_train_stop_after_e_is_the_full_runs_state_after_epoch_e() -> None:
    """B_e of the early-matching study: the first e epochs of the T-epoch
    schedule, bitwise what a full run holds after epoch e."""
    data = TensorDataset(torch.randn(48, 5), torch.randint(0, 3, (48,)))
    config = TrainConfig(3, 0.1, 0.9, 5e-4, 16, False, "off", False)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

    kept: dict[int, dict[str, torch.Tensor]] = {}
    full = fresh()
    train(
        full,
        data,
        config,
        generator=torch.Generator().manual_seed(3),
        on_epoch_end=lambda e, m: kept.setdefault(e, {k: v.clone() for k, v in m.state_dict().items()}),
    )
    for epoch in (1, 2):
        early = fresh()
        history = train(early, data, config, generator=torch.Generator().manual_seed(3), stop_after=epoch)
        assert len(history) == epoch
        for name, value in early.state_dict().items():
            assert torch.equal(value, kept[epoch][name]), (epoch, name)
    # negative control: one epoch of a 1-epoch schedule is not epoch 1 of the 3-epoch schedule
    short = fresh()
    train(
        short, data, TrainConfig(1, 0.1, 0.9, 5e-4, 16, False, "off", False), generator=torch.Generator().manual_seed(3)
    )
    assert not torch.equal(short.state_dict()["0.weight"], kept[1]["0.weight"])


@pytest.fixture(scope="module")
def study_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, int]:
    """digits-quick with every study, through the command line. The subset
    source holds every training sample, so its permutation must be the
    paper's: a check of the plumbing with a known answer."""
    out = tmp_path_factory.mktemp("studies")
    train_size = len(load_dataset("digits").train)
    argv = ["reproduce", "--preset", "digits-quick", "--out", str(out), "--quiet", "--match-epoch", "1", "0"]
    argv += ["--match-sources", "subset", "imp", "mask-aware", "--subset-samples", str(train_size)]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text()), out, train_size


@pytest.mark.slow
def test_studies_run_from_the_command_line_with_every_stage(study_run: tuple[dict, Path, int]) -> None:
    results, out, _ = study_run
    matching, sparse = results["variants"]["matching"], results["variants"]["sparse"]
    names = {
        v.name
        for v in variants(
            get_preset("digits-quick", match_epochs=(0, 1), match_sources=("subset", "imp", "mask-aware"))
        )
    }
    assert {(m["seed"], m["variant"]) for m in matching} == {(s, n) for s in (0, 1) for n in names}
    # early and subset variants at both sparsities, imp and mask-aware at their own
    assert len(sparse) == 2 * (4 * 2 + 2 + 2 + 2)
    for r in sparse:
        assert r["k"] == 2 and 0.0 <= r["test_acc"] <= 1.0
        assert r["mask_sparsity"] == pytest.approx(r["sparsity"], abs=1e-3)
    for m in matching:
        assert 0.0 <= m["agreement"] <= 1.0 and m["barrier"] == m["barrier"]
        assert (m["barrier_b_e"] is None) == (m["family"] != "early")
    # e = 1 is not a rewind point: A_1 and B_1 trained again, stopped after one epoch
    early_dense = sorted(
        p.parent.relative_to(out / "stages" / "early-dense").as_posix()
        for p in (out / "stages" / "early-dense").rglob("model.pt")
    )
    assert early_dense == ["seed0-A/e1", "seed0-B/e1", "seed1-A/e1", "seed1-B/e1"]
    # plan and run agree: a finished folder reuses every planned stage
    config = get_preset(
        "digits-quick", match_epochs=(0, 1), match_sources=("subset", "imp", "mask-aware"), subset_samples=study_run[2]
    )
    statuses = {row["status"] for row in plan_stages(config, out=out)}
    assert statuses == {"reuse"}
    planned = [row for row in plan_stages(config, out=out) if row["stage"].startswith(("variant", "early"))]
    # per seed: A_1, B_1 and one match per variant; the two early ensembles: member 1's match and sparse run
    # each, and their diversity
    assert len(planned) == 2 * (2 + len(names)) + len(sparse) + 2 * 2 + 1


@pytest.mark.slow
def test_subset_of_every_sample_gives_the_papers_permutation_and_accuracy(study_run: tuple[dict, Path, int]) -> None:
    results, _, _ = study_run
    paper = {(r["seed"], r["k"], r["sparsity"]): r["test_acc"] for r in results["sparse"] if r["method"] == "permuted"}
    subset = [m for m in results["variants"]["matching"] if m["variant"] == "subset"]
    assert [m["agreement"] for m in subset] == [1.0, 1.0]
    for r in results["variants"]["sparse"]:
        if r["variant"] == "subset":
            assert r["test_acc"] == paper[(r["seed"], r["k"], r["sparsity"])]
    # negative control: matching two random initialisations (A_0 -> B_0) is not the paper's permutation
    random_pair = [m["agreement"] for m in results["variants"]["matching"] if m["variant"] == "e0/Ae-Be"]
    assert max(random_pair) < 0.3


@pytest.mark.slow
def test_report_has_the_early_matching_and_source_tables_and_plot(study_run: tuple[dict, Path, int]) -> None:
    results, out, _ = study_run
    assert main(["report", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "## Early matching: B trained only e epochs" in text and "## Matching sources" in text
    assert (out / "early_matching.png").stat().st_size > 10_000
    early = early_rows(results)
    assert [(r["sparsity"], r["epoch"], r["pair"]) for r in early] == [
        (s, e, p) for s in (0.5, 0.8) for e in (0, 1) for p in ("AT-Be", "Ae-Be")
    ]
    # B trained to k = 2 anyway: T - max(e, k) = 2 epochs saved
    assert {r["epochs_saved"] for r in early} == {2}
    subset = [r for r in source_rows(results) if r["source"] == "subset"]
    assert all(d == 0.0 for r in subset for d in r["difference"])
    for r in early:
        line = f"| {100 * r['sparsity']:g}% | {r['epoch']} | "
        assert line in text


def test_ensemble_epochs_count_every_training_pass_once() -> None:
    results = {
        "config": {"seeds": 3, "epochs": 10, "imp_epochs": 2},
        "imp_schedule": [0.2, 0.36, 0.488, 0.5904, 0.6723, 0.7379, 0.7903, 0.8, 0.84, 0.872, 0.8976, 0.9],
        "shared_mask": {"sparsity": 0.8, "k": 4},
    }
    # 8 rounds of 2 epochs reach 0.8; A_0 costs 10 + 16 = 26
    assert ensemble_epochs(results, "dense") == 30
    assert ensemble_epochs(results, "imp") == 3 * 26
    assert ensemble_epochs(results, "lth") == 26 + 3 * 6
    assert ensemble_epochs(results, "naive") == 26 + 3 * 6 + 3 * 4
    assert ensemble_epochs(results, "permuted") == 26 + 3 * 6 + 3 * 10


@pytest.mark.slow
def test_permuted_ensembles_with_early_matching(study_run: tuple[dict, Path, int]) -> None:
    """One mask m_A0, member s = B_s,k with pi'_s,e(m_A0): member 0 is the
    seed-0 A_T -> B_e run, member 1 its own stages; the table shows the
    ensemble next to the shared-mask protocol's with its training epochs."""
    results, out, _ = study_run
    ensembles = results["variants"]["ensembles"]
    target, k = 0.5, 2  # the shared-mask level of digits-quick: the smallest sparsity, the largest k
    assert [(m["seed"], m["seed_a"], m["variant"]) for m in ensembles["matching"]] == [
        (1, 0, "e0/AT-Be"),
        (1, 0, "e1/AT-Be"),
    ]
    assert all(r["mask_seed"] == 0 and r["sparsity"] == target and r["k"] == k for r in ensembles["sparse"])
    rows = {r["variant"]: r for r in ensembles["diversity"]}
    assert set(rows) == {"e0/AT-Be", "e1/AT-Be"}
    member0 = {
        r["variant"]: r["test_acc"]
        for r in results["variants"]["sparse"]
        if r["seed"] == 0 and r["sparsity"] == target and r["pair"] == "AT-Be"
    }
    member1 = {r["variant"]: r["test_acc"] for r in ensembles["sparse"]}
    for name, row in rows.items():
        assert row["members"] == 2 and row["mode"] == "pairwise"
        assert row["member_accuracies"] == pytest.approx([member0[name], member1[name]], abs=1e-12)
        assert 0.0 < row["disagreement"] < 1.0
    text = (out / "results.md").read_text()
    assert "## Permuted ensembles with early matching, at sparsity 50%, k=2" in text
    # A_0 and 4 IMP rounds to 50% (8 epochs), 2 members x (T - k) = 4, each B_s to max(e, k) = 2: 16
    assert "| perm., matched at e = 0 |" in text and text.split("| perm., matched at e = 0 |")[1].split("\n")[
        0
    ].endswith("| 16 |")
