"""The end-to-end pipeline: IMP schedule, a tiny `reproduce` run, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from maskalign.cli import main
from maskalign.experiment import METHODS, ReproduceConfig, imp_schedule, reproduce
from maskalign.fileio import atomic_write
from maskalign.report import markdown_table, summarize


def test_imp_schedule_prunes_20_percent_of_remaining_and_lands_on_targets() -> None:
    schedule = imp_schedule([0.9, 0.5], rate=0.2)
    assert schedule[:3] == pytest.approx([0.2, 0.36, 0.488])
    assert 0.5 in schedule and schedule[-1] == 0.9
    for prev, cur in zip(schedule, schedule[1:]):
        assert cur > prev
        # never prunes more than 20% of what remains
        assert (1 - cur) >= (1 - prev) * 0.8 - 1e-12
    expected_rounds = math.ceil(math.log(0.1) / math.log(0.8)) + 1  # +1: the extra landing on 0.5
    assert len(schedule) == expected_rounds


@pytest.mark.parametrize(
    "kwargs",
    [{"rewind_epoch": 5, "epochs": 5}, {"sparsities": (1.0,)}, {"seeds": 0}, {"prune_rate": 0.0}],
)
def test_config_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ReproduceConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_results() -> dict:
    config = ReproduceConfig(
        epochs=3, rewind_epoch=1, seeds=1, sparsities=(0.5, 0.8), barrier_points=3, hidden=(32, 32)
    )
    return reproduce(config)


def test_tiny_reproduce_produces_every_method_and_barrier(tiny_results: dict) -> None:
    sparse = tiny_results["sparse"]
    for target in (0.5, 0.8):
        methods = {r["method"] for r in sparse if r["sparsity"] == target}
        assert methods == set(METHODS)
        for r in sparse:
            if r["sparsity"] == target:
                assert r["mask_sparsity"] == pytest.approx(target, abs=1e-3)
                assert 0.0 <= r["test_acc"] <= 1.0
    (barrier,) = tiny_results["barrier"]
    assert len(barrier["losses_before"]) == 3
    # matching must not make the endpoints different: alpha = 0 of "after" is A permuted
    assert barrier["losses_after"][0] == pytest.approx(barrier["losses_before"][0], rel=1e-5)
    assert barrier["losses_after"][-1] == pytest.approx(barrier["losses_before"][-1], rel=1e-5)
    table = markdown_table(tiny_results)
    assert "| 0.5 |" in table and "permuted" in table
    summary = summarize(tiny_results)
    assert set(summary["accuracy"]["0.8"]) == set(METHODS)


def test_cli_writes_results(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "reproduce",
            "--epochs",
            "2",
            "-k",
            "1",
            "--seeds",
            "1",
            "--sparsities",
            "0.5",
            "--hidden",
            "16",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["epochs"] == 2
    assert (out / "results.md").read_text().startswith("Test accuracy")
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 1000
    assert "permuted" in capsys.readouterr().out


def test_cli_rejects_bad_config(capsys) -> None:
    assert main(["reproduce", "--epochs", "2", "-k", "3"]) == 2
    assert "rewind epoch" in capsys.readouterr().err


def test_atomic_write_keeps_old_file_on_failure(tmp_path) -> None:
    path = tmp_path / "f.txt"
    atomic_write(path, lambda h: h.write("old"))

    def broken(handle) -> None:
        handle.write("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
