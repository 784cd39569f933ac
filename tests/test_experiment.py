"""The end-to-end pipeline: a tiny digits run (every stage, every method, LMC,
diversity), the fake-CIFAR preset run through the CLI, reports, devices."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from maskalign._utils.fileio import atomic_write
from maskalign.matching.activation import match_activations
from maskalign.models import build_model
from maskalign.permutation import Permutation, permute_mask
from maskalign.repro.cli import main
from maskalign.repro.data import load_dataset, write_fake_cifar
from maskalign.repro.experiment import reproduce, resolve_device
from maskalign.repro.presets import METHODS, ReproduceConfig
from maskalign.repro.report import markdown_table, render, summarize
from maskalign.repro.training import batches
from maskalign.sparse.imp import imp_schedule
from maskalign.sparse.masks import sparsity
from maskalign.spec import build_spec

TINY = ReproduceConfig(
    epochs=3,
    rewind_epochs=(0, 1),
    seeds=2,
    sparsities=(0.5, 0.8),
    imp_epochs=1,
    barrier_points=3,
    hidden=(32, 32),
    threads=1,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("tiny")
    return reproduce(TINY, out=out), out


@pytest.mark.slow
def test_every_seed_k_sparsity_method_is_trained(tiny: tuple[dict, Path]) -> None:
    results, _ = tiny
    got = {(r["seed"], r["k"], r["sparsity"], r["method"]) for r in results["sparse"]}
    assert got == {(s, k, t, m) for s in range(2) for k in (0, 1) for t in (0.5, 0.8) for m in METHODS}
    for r in results["sparse"]:
        assert r["mask_sparsity"] == pytest.approx(r["sparsity"], abs=1e-3)
        assert 0.0 <= r["test_acc"] <= 1.0
    assert [r["sparsity"] for r in results["imp"]] == [0.5, 0.8, 0.5, 0.8]
    assert list(results["imp"][0]) == ["seed", "sparsity", "method", "test_loss", "test_acc", "mask_sparsity"]
    assert list(results["imp_history"][0]) == ["seed", "round", "sparsity", "test_loss", "test_acc"]
    assert results["imp_schedule"] == imp_schedule([0.5, 0.8])
    assert len(results["imp_history"]) == 2 * len(imp_schedule([0.5, 0.8]))
    assert {(r["seed"], r["model"]) for r in results["dense"]} == {(0, "A"), (0, "B"), (1, "A"), (1, "B")}


@pytest.mark.slow
def test_masks_and_starting_points_follow_the_protocol(tiny: tuple[dict, Path]) -> None:
    """IMP masks are nested; permuted = pi(m_A); sparse models are zero off-mask;
    LTH starts from A_k and naive/permuted from B_k (their training differs,
    so check that the init of a 0-epoch run would be the checkpoint: compare
    the stored rewind checkpoints of A and B instead)."""
    _, out = tiny
    stages = out / "stages"
    m50 = torch.load(stages / "imp/seed0/target_0.5.pt", weights_only=True)["masks"]
    m80 = torch.load(stages / "imp/seed0/target_0.8.pt", weights_only=True)["masks"]
    for name in m50:
        assert not bool((m80[name] & ~m50[name]).any())  # pruned at 0.5 stays pruned at 0.8
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8, hidden=(32, 32))
    spec = build_spec(model, torch.zeros(2, 1, 8, 8))
    perm = Permutation.load(stages / "match/seed0/perm.pt", spec)
    permuted = permute_mask(m80, perm)
    for method, masks in (("lth", m80), ("naive", m80), ("permuted", permuted)):
        state = torch.load(stages / f"sparse/seed0/k1/s0.8/{method}/model.pt", weights_only=True)
        for name, mask in masks.items():
            assert torch.all(state[name][~mask] == 0), (method, name)
        assert sparsity(masks).global_ == pytest.approx(0.8, abs=1e-3)
    a_k = torch.load(stages / "dense/seed0-A/rewind_k0.pt", weights_only=True)
    b_k = torch.load(stages / "dense/seed0-B/rewind_k0.pt", weights_only=True)
    assert not torch.equal(a_k["fc.weight"], b_k["fc.weight"])  # two different initialisations


@pytest.mark.slow
def test_lmc_curves_before_and_after_matching(tiny: tuple[dict, Path]) -> None:
    results, _ = tiny
    by_pair = {(c["seed"], c["pair"], c["k"], c["sparsity"]): c for c in results["lmc"]}
    for seed in range(2):
        before, after = by_pair[(seed, "A-B", None, None)], by_pair[(seed, "pi(A)-B", None, None)]
        assert len(before["losses"]) == 3
        # permuting A does not change its function: the endpoints agree
        assert after["losses"][0] == pytest.approx(before["losses"][0], rel=1e-5)
        assert after["losses"][-1] == pytest.approx(before["losses"][-1], rel=1e-5)
        for pair in ("lth-naive", "pi(lth)-permuted", "naive-permuted"):
            for k in (0, 1):
                for target in (0.5, 0.8):
                    assert (seed, pair, k, target) in by_pair


@pytest.mark.slow
def test_diversity_rows_in_both_modes(tiny: tuple[dict, Path]) -> None:
    results, _ = tiny
    rows = results["diversity"]
    for mode in ("pairwise", "reference"):
        methods = {(r["method"], r["k"], r["sparsity"]) for r in rows if r["mode"] == mode}
        assert ("dense", None, None) in methods and ("imp", None, 0.8) in methods
        assert {(m, 1, 0.5) for m in METHODS} <= methods
    for r in rows:
        assert 0 <= r["disagreement"] <= 1 and r["kl"] >= 0 and 0 <= r["js"] <= 0.6932
        assert (r["reference"] is None) == (r["mode"] == "pairwise")


SHARED = TINY.replace(seeds=3, rewind_epochs=(0, 1), sparsities=(0.5, 0.8), methods=("lth", "naive", "permuted"))


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch) -> tuple:
    """A 3-seed run that records the starting weights, mask and data-order
    seed of every sparse-training stage (wrapping ``train``)."""
    import maskalign.repro.experiment as experiment

    pending: list[tuple[dict, dict, int]] = []
    starts: dict[tuple[str, str], tuple[dict, dict, int]] = {}

    def recording_train(model: torch.nn.Module, *args, generator: torch.Generator, masks=None, **kwargs):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        pending.append((state, {k: v.clone() for k, v in (masks or {}).items()}, generator.initial_seed()))
        return train(model, *args, generator=generator, masks=masks, **kwargs)

    def on_stage_end(stage: str, key: str) -> None:
        if stage in ("sparse", "shared-sparse"):
            assert len(pending) == 1, (stage, key)
            starts[(stage, key)] = pending[0]
        pending.clear()

    train = experiment.train
    monkeypatch_module.setattr(experiment, "train", recording_train)
    out = tmp_path_factory.mktemp("shared")
    return reproduce(SHARED, out=out, on_stage_end=on_stage_end), out, starts


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _member(starts: dict, seed: int, method: str) -> tuple[dict, dict, int]:
    """Starting weights, mask and data-order seed of a shared-mask member
    (table1 level: 0.5 is the smallest sparsity, k = 1 the largest)."""
    stage = "sparse" if seed == 0 else "shared-sparse"
    return starts[(stage, f"seed{seed}/k1/s0.5/{method}")]


@pytest.mark.slow
def test_shared_mask_lth_members_share_init_and_mask(shared_run: tuple) -> None:
    """ICML Table 1 / Evci et al. 2022: every LTH member starts from A_0,k
    with the one mask m_A0; only the data order differs."""
    results, out, starts = shared_run
    shared = results["shared_mask"]
    assert (shared["protocol"], shared["sparsity"], shared["k"]) == ("shared-mask", 0.5, 1)
    assert SHARED.table1_level() == (0.5, 1)
    stages = out / "stages"
    m_a0 = torch.load(stages / "imp/seed0/target_0.5.pt", weights_only=True)["masks"]
    a0_k = torch.load(stages / "dense/seed0-A/rewind_k1.pt", weights_only=True)
    data_orders = set()
    for seed in range(3):
        state, masks, data_order = _member(starts, seed, "lth")
        assert masks.keys() == m_a0.keys() and all(torch.equal(masks[n], m_a0[n]) for n in m_a0)
        assert all(torch.equal(state[n], a0_k[n]) for n in a0_k)
        data_orders.add(data_order)
    assert len(data_orders) == 3  # different data orders
    # naive members: B_s,k with m_A0
    for seed in range(3):
        state, masks, _ = _member(starts, seed, "naive")
        b_k = torch.load(stages / f"dense/seed{seed}-B/rewind_k1.pt", weights_only=True)
        assert all(torch.equal(masks[n], m_a0[n]) for n in m_a0)
        assert all(torch.equal(state[n], b_k[n]) for n in b_k)
    assert {(r["seed"], r["method"]) for r in shared["sparse"]} == {
        (s, m) for s in range(3) for m in ("lth", "naive", "permuted")
    }
    # member 0 is the across-seed seed-0 run itself, not a second copy
    assert not (stages / "shared-sparse/seed0").exists()
    assert {(r["method"], r["members"]) for r in shared["diversity"]} == {
        (m, 3) for m in ("dense", "imp", "lth", "naive", "permuted")
    }


@pytest.mark.slow
def test_shared_mask_permuted_members_use_the_matching_from_a0(shared_run: tuple) -> None:
    """Permuted member s starts from B_s,k with pi'_s(m_A0), where pi'_s is
    activation matching A_0 -> B_s (pi'_0 = pi_0 of the across-seed run)."""
    results, out, starts = shared_run
    stages = out / "stages"
    m_a0 = torch.load(stages / "imp/seed0/target_0.5.pt", weights_only=True)["masks"]
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8, hidden=(32, 32))
    spec = build_spec(model, torch.zeros(2, 1, 8, 8))
    splits = load_dataset("digits")
    model_a0 = build_model("mlp", num_classes=10, in_channels=1, image_size=8, hidden=(32, 32))
    model_a0.load_state_dict(torch.load(stages / "dense/seed0-A/final.pt", weights_only=True))
    assert [r["seed"] for r in results["shared_mask"]["matching"]] == [1, 2]
    for seed in range(3):
        path = stages / ("match/seed0/perm.pt" if seed == 0 else f"shared-match/A0-B{seed}/perm.pt")
        perm = Permutation.load(path, spec)
        model_b = build_model("mlp", num_classes=10, in_channels=1, image_size=8, hidden=(32, 32))
        model_b.load_state_dict(torch.load(stages / f"dense/seed{seed}-B/final.pt", weights_only=True))
        assert perm == match_activations(model_a0, model_b, batches(splits.train, 256), spec, progress=False)
        if seed > 0:  # not pi_s, the matching A_s -> B_s of the seed's own pair
            assert perm != Permutation.load(stages / f"match/seed{seed}/perm.pt", spec)
        state, masks, _ = _member(starts, seed, "permuted")
        expected = permute_mask(m_a0, perm)
        assert all(torch.equal(masks[n], expected[n]) for n in expected)
        b_k = torch.load(stages / f"dense/seed{seed}-B/rewind_k1.pt", weights_only=True)
        assert all(torch.equal(state[n], b_k[n]) for n in b_k)


@pytest.mark.slow
def test_shared_mask_table_in_markdown(shared_run: tuple) -> None:
    results, _, _ = shared_run
    table = markdown_table(results)
    assert "shared-mask protocol (ICML paper Table 1) at sparsity 50%, k=1" in table
    assert "Protocol **shared-mask**" in table
    lines = table[table.rindex("\n| solution | test acc.") + 1 :].splitlines()
    assert [line.split(" | ")[0] for line in lines[2:7]] == ["| dense", "| IMP", "| LTH", "| perm.", "| naive"]
    lth = next(r for r in results["shared_mask"]["diversity"] if r["method"] == "lth")
    members = [r["test_acc"] for r in results["shared_mask"]["sparse"] if r["method"] == "lth"]
    assert lth["member_accuracies"] == pytest.approx(members)
    assert reproduce(TINY.replace(seeds=1, rewind_epochs=(1,), sparsities=(0.5,)))["shared_mask"] is None


@pytest.mark.slow
def test_markdown_lays_out_tables_like_the_paper(tiny: tuple[dict, Path]) -> None:
    results, _ = tiny
    table = markdown_table(results)
    assert "| S | method | k=0 | k=1 |" in table
    assert "| 50% | LTH |" in table and "|  | perm. |" in table
    assert "Mode **pairwise**" in table and "Mode **reference**" in table
    summary = summarize(results)
    assert set(summary["accuracy"][0.8]) == set(METHODS)
    mean, std = summary["accuracy"][0.8]["lth"][1]
    accs = [100 * r["test_acc"] for r in results["sparse"] if (r["sparsity"], r["method"], r["k"]) == (0.8, "lth", 1)]
    assert mean == pytest.approx(sum(accs) / 2) and std >= 0


@pytest.mark.slow
def test_fake_cifar_preset_end_to_end_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cifar10-resnet20x1 preset on a tiny fake CIFAR folder: 1 epoch, 2
    IMP rounds, every stage, the reports, and `maskalign report`."""
    write_fake_cifar(tmp_path / "data", n_train=32, n_test=16)
    out = tmp_path / "out"
    argv = [
        "reproduce", "--preset", "cifar10-resnet20x1", "--data-root", str(tmp_path / "data"),
        "--epochs", "1", "-k", "0", "--sparsities", "0.2", "0.36", "--imp-epochs", "1", "--seeds", "2",
        "--methods", "lth", "naive", "permuted", "--barrier-points", "2", "--bn-batches", "1",
        "--batch-size", "16", "--device", "cpu", "--threads", "1", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "preset cifar10-resnet20x1 with overrides " in printed and "sparse_lr=0.02" in printed
    assert "epochs=1 " in printed and "batch_size=16 " in printed and "sparsities=0.2,0.36 " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "cifar10-resnet20x1"
    assert results["config"]["augment"] is True and results["config"]["lr"] == 0.08
    assert "epochs" in results["overrides"]
    assert len(results["imp_history"]) == 2 * 2  # two rounds per seed
    assert len(results["sparse"]) == 2 * 2 * 3
    for name in ("accuracy_vs_rewind.png", "accuracy_vs_sparsity.png", "lmc.png"):
        (out / name).unlink()
    (out / "results.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").read_text().startswith("# maskalign reproduce: cifar10-resnet20x1")
    assert (out / "lmc.png").stat().st_size > 1000 and (out / "accuracy_vs_rewind.png").stat().st_size > 1000


def test_report_of_missing_folder_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        render(tmp_path)


def test_devices_resolve_and_amp_needs_cuda() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="amp"):
            reproduce(TINY.replace(amp="bf16", device="cpu"))


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write(path, lambda h: h.write("old"))

    def broken(handle) -> None:
        handle.write("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
