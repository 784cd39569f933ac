"""Resumable runs: a run killed after any stage (or inside IMP) and restarted
in the same folder gives exactly the numbers of an uninterrupted run; a
changed setting is detected and reported, never mixed in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from maskalign.matching.activation import match_activations
from maskalign.models import build_model
from maskalign.permutation import Permutation
from maskalign.repro.data import load_dataset
from maskalign.repro.experiment import reproduce
from maskalign.repro.presets import ReproduceConfig
from maskalign.repro.stages import StageMismatchError
from maskalign.repro.training import batches
from maskalign.spec import build_spec

pytestmark = pytest.mark.slow  # every test runs the pipeline end to end

CONFIG = ReproduceConfig(
    epochs=3,
    rewind_epochs=(0, 1),
    seeds=2,
    sparsities=(0.5, 0.8),
    imp_epochs=1,
    methods=("lth", "naive", "permuted"),
    barrier_points=3,
    hidden=(24, 24),
    threads=1,
)


def _dense(out: Path, key: str, config: ReproduceConfig) -> nn.Module:
    """The final dense model ``key`` of the run in ``out``."""
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8, hidden=config.hidden)
    model.load_state_dict(torch.load(out / "stages/dense" / key / "final.pt", weights_only=True))
    return model.eval()


class Killed(Exception):
    """Stands in for the process being killed."""


def _numbers(results: dict) -> dict:
    """Everything but wall-clock timing."""
    return {k: v for k, v in results.items() if k != "timing"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return reproduce(CONFIG, out=tmp_path_factory.mktemp("full"))


@pytest.mark.parametrize(
    "kill_at",
    [
        ("imp-round", "seed0/round2"),
        ("match", "seed0"),
        ("sparse", "seed1/k1/s0.5/naive"),
        ("lmc", "seed1"),
        ("shared-match", "A0-B1"),  # the shared-mask protocol's stages (table1 level 0.5, k=1)
        ("shared-sparse", "seed1/k1/s0.5/permuted"),
    ],
)
def test_killed_run_resumes_to_identical_results(uninterrupted: dict, tmp_path: Path, kill_at: tuple) -> None:
    computed: list[tuple[str, str]] = []

    def kill(stage: str, key: str) -> None:
        computed.append((stage, key))
        if (stage, key) == kill_at:
            raise Killed

    with pytest.raises(Killed):
        reproduce(CONFIG, out=tmp_path, on_stage_end=kill)
    resumed_stages: list[tuple[str, str]] = []
    resumed = reproduce(CONFIG, out=tmp_path, on_stage_end=lambda s, k: resumed_stages.append((s, k)))
    assert _numbers(resumed) == _numbers(uninterrupted)
    # finished stages were loaded, not recomputed
    finished = [c for c in computed if c[0] != "imp-round" and c != kill_at]
    assert not set(finished) & set(resumed_stages)
    if kill_at[0] == "imp-round":  # resumed after round 2, not from round 1
        assert ("imp-round", "seed0/round1") not in resumed_stages
        assert ("imp-round", "seed0/round3") in resumed_stages


def test_rerun_of_finished_folder_loads_everything(uninterrupted: dict, tmp_path: Path) -> None:
    reproduce(CONFIG, out=tmp_path)
    recomputed: list[tuple[str, str]] = []
    again = reproduce(CONFIG, out=tmp_path, on_stage_end=lambda s, k: recomputed.append((s, k)))
    assert recomputed == []
    assert _numbers(again) == _numbers(uninterrupted)


def test_changed_setting_is_reported_by_stage_and_field(tmp_path: Path) -> None:
    small = CONFIG.replace(seeds=1, rewind_epochs=(1,), sparsities=(0.5,), methods=("lth",))
    reproduce(small, out=tmp_path)
    with pytest.raises(StageMismatchError) as info:
        reproduce(small.replace(sparse_lr=0.02), out=tmp_path)
    message = str(info.value)
    assert "Stage 'sparse/seed0/k1/s0.5/lth'" in message
    assert "sparse_lr: 0.05 -> 0.02" in message and "--force" in message
    with pytest.raises(StageMismatchError, match="Stage 'dense/seed0-A'.*epochs: 3 -> 4"):
        reproduce(small.replace(epochs=4), out=tmp_path)
    recomputed: list[tuple[str, str]] = []
    forced = reproduce(
        small.replace(sparse_lr=0.02), out=tmp_path, force=True, on_stage_end=lambda s, k: recomputed.append((s, k))
    )
    assert ("sparse", "seed0/k1/s0.5/lth") in recomputed and ("dense", "seed0-A") not in recomputed
    assert forced["config"]["sparse_lr"] == 0.02
    restarted: list[tuple[str, str]] = []
    reproduce(small, out=tmp_path, restart=True, on_stage_end=lambda s, k: restarted.append((s, k)))
    assert ("dense", "seed0-A") in restarted


def test_cli_reports_a_mismatch_and_force_recomputes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from maskalign.repro.cli import main

    tiny = ["reproduce", "--epochs", "2", "-k", "1", "--seeds", "1", "--sparsities", "0.5", "--hidden", "8", "8"]
    tiny += ["--imp-epochs", "1", "--methods", "lth", "--barrier-points", "2", "--out", str(tmp_path), "--quiet"]
    assert main(tiny) == 0
    capsys.readouterr()
    assert main([*tiny, "--imp-lr", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "Stage 'imp/seed0'" in err and "imp_lr: 0.01 -> 0.02" in err
    assert main([*tiny, "--imp-lr", "0.02", "--force"]) == 0


def test_killed_fake_cifar_resnet_run_resumes_to_identical_results(tmp_path: Path) -> None:
    """The same with BatchNorm (running statistics in every checkpoint) and
    augmentation, on the cifar10-resnet20x1 preset and a tiny fake CIFAR."""
    from maskalign.repro.data import write_fake_cifar
    from maskalign.repro.presets import get_preset

    write_fake_cifar(tmp_path / "data", n_train=32, n_test=16)
    config = get_preset(
        "cifar10-resnet20x1",
        data_root=str(tmp_path / "data"),
        epochs=2,
        rewind_epochs=(1,),
        sparsities=(0.2, 0.36),
        imp_epochs=1,
        seeds=1,
        methods=("lth", "permuted"),
        barrier_points=2,
        bn_batches=1,
        batch_size=16,
        device="cpu",
        threads=1,
    )
    full = reproduce(config, out=tmp_path / "full")

    def kill(stage: str, key: str) -> None:
        if (stage, key) == ("sparse", "seed0/k1/s0.2/permuted"):
            raise Killed

    with pytest.raises(Killed):
        reproduce(config, out=tmp_path / "killed", on_stage_end=kill)
    assert _numbers(reproduce(config, out=tmp_path / "killed")) == _numbers(full)


def test_matching_recipe_is_recorded_and_recomputes_only_what_depends_on_it(tmp_path: Path) -> None:
    """The recipe reaches match_activations (the stored permutation is the one
    a direct call with that recipe gives), is recorded in results.json, and a
    changed recipe recomputes the match, the permuted runs and LMC, never the
    dense, IMP, LTH or naive stages."""
    small = CONFIG.replace(seeds=1, rewind_epochs=(1,), sparsities=(0.5,), methods=("lth", "naive", "permuted"))
    first = reproduce(small, out=tmp_path)
    assert first["matching"][0]["recipe"] == {
        "method": "activation",
        "cost": "correlation",
        "points": small.match_points,
        "stream_points": small.match_stream_points,
        "samples": len(load_dataset("digits").train),
        "batch_size": 256,
    }
    other = "post" if small.match_points != "post" else "pre"
    with pytest.raises(
        StageMismatchError, match=f"Stage 'match/seed0'.*match_points: '{small.match_points}' -> '{other}'"
    ):
        reproduce(small.replace(match_points=other), out=tmp_path)
    recomputed: list[tuple[str, str]] = []
    changed = reproduce(
        small.replace(match_points=other), out=tmp_path, force=True, on_stage_end=lambda s, k: recomputed.append((s, k))
    )
    stages = {s for s, _ in recomputed}
    assert ("match", "seed0") in recomputed and ("sparse", "seed0/k1/s0.5/permuted") in recomputed
    assert ("lmc", "seed0") in recomputed
    assert not stages & {"dense", "imp", "imp-round"}
    assert ("sparse", "seed0/k1/s0.5/lth") not in recomputed and ("sparse", "seed0/k1/s0.5/naive") not in recomputed
    assert changed["matching"][0]["recipe"]["points"] == other
    stored = json.loads((tmp_path / "config.json").read_text())["config"]
    assert stored["match_points"] == other
    # the stored permutation is what match_activations gives with that recipe
    splits = load_dataset("digits")
    a, b = (_dense(tmp_path, f"seed0-{role}", small) for role in "AB")
    spec = build_spec(a, splits.train.tensors[0][:2])
    direct = match_activations(a, b, batches(splits.train, 256), spec, points=other, progress=False)
    stored_perm = Permutation.load(tmp_path / "stages/match/seed0/perm.pt", spec)
    assert all(torch.equal(direct[g], stored_perm[g]) for g in direct)
