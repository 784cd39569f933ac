"""``torchrun -m maskalign reproduce --preset imagenet-resnet50`` with two
gloo processes on the CPU, end to end on a tiny fake ImageFolder of real
JPEGs (vision tier: needs torchvision).

* The ImageNet data path (the per-rank shares of each global batch through
  ``DistributedSampler``, the sharded test evaluation, the sharded matching
  subset) gives one process's ``results.json``: with the MLP (``--model mlp``,
  no BatchNorm) and ``--no-augment`` the two runs differ only by the order
  of float additions, compared to ``atol=1e-5`` as in
  ``tests/test_distributed_reproduce.py``; test accuracies exactly.
* The preset's own ResNet50 runs under ``torchrun`` too (slow tier:
  ``python -m pytest -m slow tests/vision``): with BatchNorm over
  each rank's share (no ``SyncBatchNorm`` on the CPU) its numbers are not one
  process's, so the test checks what must hold: every stage, one writer,
  finite scores, the per-rank BatchNorm recorded, and a rerun under
  ``torchrun`` reusing every stage byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import assert_results_close, run_results

pytest.importorskip("torchvision")

from maskalign.repro import imagenet  # noqa: E402
from maskalign.repro.presets import PRESETS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORLD, ATOL, SIZE = 2, 1e-5, 32
COMMON = [
    "--preset", "imagenet-resnet50", "--epochs", "2", "-k", "1", "--sparsities", "0.5", "--imp-epochs", "1",
    "--batch-size", "4", "--barrier-points", "3", "--bn-batches", "1",
    "--lr", "0.01", "--sparse-lr", "0.01", "--imp-lr", "0.001",  # the preset's 0.1 diverges at batch 4
    "--device", "cpu", "--threads", "1", "--amp", "off", "--quiet", "--image-size", str(SIZE),
]  # fmt: skip
# two seeds: the shared-mask stages run too; no BatchNorm and no augmentation: one process's numbers
MLP = ["--model", "mlp", "--hidden", "16", "16", "--no-augment", "--seeds", "2"]
RESNET50 = ["--seeds", "1"]

needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imagenet")
    return imagenet.write_fake_imagefolder(folder, classes=3, per_class=4, size=SIZE, val_per_class=3)


def _run(root: Path, out: Path, processes: int, flags: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    reproduce = ["-m", "maskalign", "reproduce", *COMMON, *flags, "--data-root", str(root), "--out", str(out)]
    launch = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run([sys.executable, *launch, *reproduce], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.suffix != ".png")


def _manifests(out: Path) -> dict[str, bytes]:
    return {str(p.parent.relative_to(out)): p.read_bytes() for p in sorted((out / "stages").rglob("manifest.json"))}


@needs_dist
def test_two_gloo_processes_give_one_process_results_on_the_imagefolder_path(root: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _run(root, one, 1, MLP)
    _run(root, two, WORLD, MLP)
    expected, got = run_results(one), run_results(two)
    assert expected["config"]["dataset"] == "imagenet" and expected["config"]["augment"] is False
    assert {r["seed"] for r in expected["sparse"]} == {0, 1} and expected["shared_mask"]  # both seeds, shared masks
    assert_results_close(got, expected, ATOL)
    assert json.loads((two / "results.json").read_text())["world_size"] == WORLD
    assert _files(two) == _files(one)  # rank 1 wrote nothing of its own
    assert (two / "log.txt").read_text().count("reproduce --preset") == 1
    # the stages record the same settings: one process and two share their stages
    for stage, manifest in _manifests(one).items():
        assert json.loads(_manifests(two)[stage])["settings"] == json.loads(manifest)["settings"], stage


@pytest.mark.slow  # 75 s: ResNet50 traced and trained under torchrun twice (the vision slow tier runs it)
@needs_dist
def test_the_resnet50_preset_runs_under_torchrun_and_resumes_every_stage(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(root, out, WORLD, RESNET50)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == WORLD and results["config"]["model"] == "resnet50"
    methods = PRESETS["imagenet-resnet50"].methods
    assert sorted(r["method"] for r in results["sparse"]) == sorted(methods)
    for record in results["dense"] + results["sparse"] + results["imp"]:
        assert 0.0 <= record["test_acc"] <= record["test_top5"] <= 1.0 and math.isfinite(record["test_loss"])
    assert all(math.isfinite(c["barrier"]) for c in results["lmc"])
    manifests = _manifests(out)
    assert len(manifests) == 6 + len(methods)  # dense A and B, imp, match, the sparse runs, lmc, diversity
    trained = [json.loads(m)["settings"] for s, m in manifests.items() if s.split("/")[1] in ("dense", "sparse")]
    assert trained and all(s["bn_stats"] == f"per rank of {WORLD}" for s in trained)
    _run(root, out, WORLD, RESNET50)  # again under torchrun: every stage reused, nothing rewritten
    assert _manifests(out) == manifests
