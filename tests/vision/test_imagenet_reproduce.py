"""``maskalign reproduce --preset imagenet-resnet50`` end to end on a tiny
fake ImageFolder of real JPEGs (vision tier: needs torchvision; skipped
cleanly without it). The crop side is set to 32 with ``--image-size``
(``ReproduceConfig.image_size``; 224 in a real run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")

from maskalign.errors import ArgumentValueError, ConfigError  # noqa: E402
from maskalign.repro import imagenet  # noqa: E402
from maskalign.repro.cli import main  # noqa: E402
from maskalign.repro.presets import PRESETS, get_preset  # noqa: E402
from maskalign.repro.rundata import ImageFolderRunData  # noqa: E402

CLASSES, PER_CLASS, VAL_PER_CLASS, SIZE = 3, 4, 2, 32
TINY = [
    "--epochs", "1", "-k", "0", "--sparsities", "0.2", "--imp-epochs", "1", "--seeds", "1",
    "--batch-size", "4", "--barrier-points", "2", "--bn-batches", "1",
    "--lr", "0.01", "--sparse-lr", "0.01", "--imp-lr", "0.001",  # the preset's 0.1 diverges at batch 4
    "--device", "cpu", "--threads", "1", "--amp", "off", "--quiet", "--image-size", str(SIZE),
]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imagenet")
    return imagenet.write_fake_imagefolder(folder, classes=CLASSES, per_class=PER_CLASS, size=SIZE, val_per_class=2)


def _argv(root: Path, out: Path, *flags: str) -> list[str]:
    return ["reproduce", "--preset", "imagenet-resnet50", "--data-root", str(root), *TINY, "--out", str(out), *flags]


def _listed(out: str) -> dict[str, str]:
    rows = [line.split() for line in out.splitlines() if line.startswith(("  reuse ", "  compute "))]
    return {row[1]: row[0] for row in rows}


def _manifests(out: Path) -> dict[str, bytes]:
    stages = out / "stages"
    return {str(p.parent.relative_to(stages)): p.read_bytes() for p in sorted(stages.rglob("manifest.json"))}


def test_the_dry_run_lists_every_stage_and_reads_no_image(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(_argv(root, out, "--dry-run")) == 0
    listed = _listed(capsys.readouterr().out)
    methods = PRESETS["imagenet-resnet50"].methods
    expected = ["dense/seed0-A", "dense/seed0-B", "imp/seed0", "match/seed0"]
    expected += [f"sparse/seed0/k0/s0.2/{m}" for m in methods] + ["lmc/seed0", "diversity/all"]
    assert list(listed) == expected and set(listed.values()) == {"compute"}
    assert not out.exists()


def test_the_preset_runs_end_to_end_and_a_rerun_reuses_every_stage(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(_argv(root, out)) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    data = imagenet.load_imagefolder(root, image_size=SIZE)
    assert results["preset"] == "imagenet-resnet50"
    assert results["data_fingerprint"] == imagenet.fingerprint(data)
    assert results["config"]["dataset"] == "imagenet" and results["config"]["model"] == "resnet50"
    assert [(r["seed"], r["model"]) for r in results["dense"]] == [(0, "A"), (0, "B")]
    for record in results["dense"] + results["sparse"]:
        assert 0.0 <= record["test_acc"] <= record["test_top5"] <= 1.0  # 3 classes: top-5 is every class
        assert record["test_top5"] == 1.0 and record["test_loss"] > 0
    assert sorted(r["method"] for r in results["sparse"]) == sorted(PRESETS["imagenet-resnet50"].methods)
    assert [r["sparsity"] for r in results["imp"]] == [0.2]
    for record in results["imp"] + results["imp_history"]:  # IMP records carry top-5 too
        assert 0.0 <= record["test_acc"] <= record["test_top5"] == 1.0
    assert "## Top-5 test accuracy (%) by rewind point k" in (out / "results.md").read_text()
    assert "| S | IMP | IMP top-5 |" in (out / "results.md").read_text()
    assert results["matching"][0]["recipe"]["samples"] == CLASSES * PER_CLASS  # all of them (< 10,000)
    assert {c["pair"] for c in results["lmc"]} >= {"A-B", "pi(A)-B"}
    assert results["diversity"] and results["shared_mask"] is None  # one seed
    manifests = _manifests(out)
    assert len(manifests) == 9  # dense A and B, imp, match, 3 sparse, lmc, diversity
    for manifest in manifests.values():
        settings = json.loads(manifest)["settings"]
        assert settings["data"] == results["data_fingerprint"] and settings["loader_workers"] == 0
        assert settings["image_size"] == SIZE and settings["match_samples"] == CLASSES * PER_CLASS
    # a second run computes nothing: every stage is reused, byte for byte
    assert main(_argv(root, out)) == 0
    assert _manifests(out) == manifests
    assert main(_argv(root, out, "--dry-run")) == 0
    listed = _listed(capsys.readouterr().out)
    assert set(listed) == set(manifests) and set(listed.values()) == {"reuse"}


def test_the_training_data_gives_each_rank_its_share_of_one_global_order(root: Path) -> None:
    """Every rank's shares of a global batch are disjoint and together are
    the one-process batch; the last incomplete batch is dropped."""
    data = imagenet.load_imagefolder(root, image_size=SIZE)
    one = imagenet.ImageFolderTrainData(data.train_eval, 5, 1, workers=0)
    assert len(one) == 10 and one.steps == 2  # 12 images, batches of 5
    cpu = torch.device("cpu")
    whole = [s for s in one.epoch(1, 7, 5, 0, 1, cpu)]
    two = imagenet.ImageFolderTrainData(data.train_eval, 6, 2, workers=0)
    single = imagenet.ImageFolderTrainData(data.train_eval, 6, 1, workers=0)
    for epoch in (1, 2):
        ref = list(single.epoch(epoch, 7, 6, 0, 1, cpu))
        shares = [list(two.epoch(epoch, 7, 6, r, 2, cpu)) for r in range(2)]
        assert len(ref) == len(shares[0]) == len(shares[1]) == 2
        for i, batch in enumerate(ref):
            a, b = shares[0][i], shares[1][i]
            assert a.global_count == b.global_count == batch.global_count == 6
            assert torch.equal(batch.inputs[0::2], a.inputs) and torch.equal(batch.inputs[1::2], b.inputs)
            assert torch.equal(batch.targets[0::2], a.targets) and torch.equal(batch.targets[1::2], b.targets)
    assert [s.inputs.shape[0] for s in whole] == [5, 5]
    with pytest.raises(ValueError, match="multiple"):
        imagenet.ImageFolderTrainData(data.train, 5, 2)


def test_usual_mistakes_are_one_line_before_anything_is_written(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    no_root = [a for a in _argv(root, out, "--dry-run") if a not in ("--data-root", str(root))]
    assert main(no_root) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Data set imagenet" in err and "--data-root" in err, err
    assert main(_argv(tmp_path / "missing", out, "--dry-run")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "does not exist" in err, err
    monkeypatch.setenv("WORLD_SIZE", "3")  # a dry run under torchrun with 3 ranks: batch 4 does not split
    assert main(_argv(root, out, "--dry-run")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Setting 'batch_size' (--batch-size) is 4 for 3 ranks" in err, err
    assert not out.exists()


def test_the_matching_subset_follows_match_samples_and_the_argument(root: Path) -> None:
    """``match_samples`` picks :func:`imagenet.match_subset` (seed 0) of that
    size; ``match_batches(samples=n)`` another size; too many are refused."""
    config = get_preset("imagenet-resnet50", data_root=str(root), image_size=SIZE, batch_size=4, match_samples=6)
    data = ImageFolderRunData(config, torch.device("cpu"), 1)
    subset = imagenet.match_subset(data.data, 6, seed=0)
    expected = torch.stack([subset[i][0] for i in range(6)])
    assert torch.equal(torch.cat([x for x, _ in data.match_batches()]), expected)
    assert data.match_samples == 6 and data.settings()["match_samples"] == 6
    assert sum(x.shape[0] for x, _ in data.match_batches(samples=9)) == 9
    with pytest.raises(ArgumentValueError, match="Argument 'samples' is 13, but the training set holds 12"):
        data.match_batches(samples=13)
    with pytest.raises(ConfigError, match=r"'match_samples' \(--match-samples\) is 13, but the training set holds 12"):
        ImageFolderRunData(config.replace(match_samples=13), torch.device("cpu"), 1)
    default = ImageFolderRunData(config.replace(match_samples=None, image_size=None), torch.device("cpu"), 1)
    assert (default.image_size, default.match_samples) == (224, 12)  # 224 and all 12 (fewer than 10,000)
    assert "image_size" not in default.settings()  # 224, the standard, is not recorded


def test_no_augment_trains_on_the_eval_transform(root: Path) -> None:
    """``augment=False`` (``--no-augment``) is not ignored on an ImageFolder:
    training reads the eval transform's images, the same in every epoch."""
    config = get_preset("imagenet-resnet50", data_root=str(root), image_size=SIZE, batch_size=4)
    cpu = torch.device("cpu")
    plain = ImageFolderRunData(config.replace(augment=False), cpu, 1)
    augmented = ImageFolderRunData(config, cpu, 1)
    assert plain.train.dataset is plain.data.train_eval and augmented.train.dataset is augmented.data.train
    first = [s.inputs for s in plain.train.epoch(1, 7, 4, 0, 1, cpu)]
    again = [s.inputs for s in plain.train.epoch(1, 7, 4, 0, 1, cpu)]
    crops = [s.inputs for s in augmented.train.epoch(1, 7, 4, 0, 1, cpu)]
    order = torch.cat([s.targets for s in plain.train.epoch(1, 7, 4, 0, 1, cpu)])
    assert torch.equal(order, torch.cat([s.targets for s in augmented.train.epoch(1, 7, 4, 0, 1, cpu)]))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, crops))  # random crops and flips differ
