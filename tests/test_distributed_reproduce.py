"""``maskalign reproduce`` under ``torchrun`` (issue 16): the sharding of the
global batches, data-parallel training equal to one process, rank-0-only
writing, the checks that every rank holds the same mask and permutation, and
end to end: two gloo processes on the CPU give one process's results.json,
and a run whose rank 1 is killed resumes under ``torchrun`` to the same.

Tolerance: the numbers of 2 and 1 processes differ only by the order of
float additions (the all-reduce of the gradient, the per-rank loss sums); on
the digits MLP the largest difference measured in results.json is 2e-7
(a loss barrier), so floats are compared to ``atol=1e-5``; test accuracies
are counts over the test set and must be exactly equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import assert_results_close, run_results, run_workers
from torch import nn
from torch.utils.data import TensorDataset

import maskalign as ma
from maskalign.errors import ConfigError
from maskalign.repro import distributed
from maskalign.repro.data import load_dataset
from maskalign.repro.experiment import _Run, reproduce
from maskalign.repro.presets import ReproduceConfig
from maskalign.repro.stages import StageMismatchError, StageStore
from maskalign.repro.training import InMemoryData, TrainConfig, share_indices, train

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
ATOL = 1e-5

needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _images(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _rows(x: torch.Tensor) -> list[bytes]:
    return sorted(row.numpy().tobytes() for row in x.reshape(x.shape[0], -1))


# ------------------------------------------------------------------ sharding
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augment"])
def test_shares_of_every_global_batch_are_disjoint_and_make_the_single_process_batch(world, augment) -> None:
    data = InMemoryData(_images(37), augment=augment)  # 37 = 4 * 8 + 5: a partial last batch
    cpu = torch.device("cpu")
    for epoch in (1, 2):
        single = list(data.epoch(epoch, 1234, 8, 0, 1, cpu))
        shares = [list(data.epoch(epoch, 1234, 8, r, world, cpu)) for r in range(world)]
        assert [s.global_count for s in single] == [8, 8, 8, 8, 5]
        for r in range(world):
            assert len(shares[r]) == len(single)  # every rank takes the same number of steps
        for b, whole in enumerate(single):
            parts = [shares[r][b] for r in range(world)]
            assert all(p.global_count == whole.global_count for p in parts)
            sizes = [p.targets.numel() for p in parts]
            assert sum(sizes) == whole.global_count and max(sizes) - min(sizes) <= 1
            joined = torch.cat([p.inputs for p in parts])
            assert _rows(joined) == _rows(whole.inputs)  # together: the single-process batch
            assert len(set(_rows(joined))) == whole.global_count  # disjoint (the images are distinct)
            for r, p in enumerate(parts):  # rank r: positions r, r + world, ... (DistributedSampler's deal)
                positions = share_indices(whole.global_count, r, world)
                assert torch.equal(p.inputs, whole.inputs[positions])
                assert torch.equal(p.targets, whole.targets[positions])
    # the order is the epoch's: another epoch, another order; the same epoch, the same
    first = [s.targets for s in data.epoch(1, 1234, 8, 0, 1, cpu)]
    assert any(not torch.equal(a, b) for a, b in zip(first, [s.targets for s in data.epoch(2, 1234, 8, 0, 1, cpu)]))
    assert all(torch.equal(a, b) for a, b in zip(first, [s.targets for s in data.epoch(1, 1234, 8, 0, 1, cpu)]))


def test_a_rank_may_get_an_empty_share_of_a_tiny_last_batch() -> None:
    data = InMemoryData(_images(17))  # last global batch: 1 sample
    last = [list(data.epoch(1, 0, 8, r, 2, torch.device("cpu")))[-1] for r in range(2)]
    assert [s.targets.numel() for s in last] == [1, 0] and all(s.global_count == 1 for s in last)


# ------------------------------------------------- training: 2 ranks = 1 process
def _mlp() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _masks() -> dict[str, torch.Tensor]:
    return ma.global_magnitude_prune(_mlp(), 0.7)


_TRAIN_CONFIG = TrainConfig(epochs=2, lr=0.05, batch_size=8)


def _train_worker(rank: int, init_file: str, out_file: str, n: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _mlp()
        history = train(
            model,
            _images(n),
            _TRAIN_CONFIG,
            generator=torch.Generator().manual_seed(3),
            masks=_masks(),
            distributed=True,
        )
        torch.save({"state": model.state_dict(), "history": history}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
@needs_dist
@pytest.mark.parametrize("n", [37, 33], ids=["uneven-last-batch", "empty-share"])
def test_two_ranks_train_like_one_process(tmp_path, n) -> None:
    model = _mlp()
    history = train(model, _images(n), _TRAIN_CONFIG, generator=torch.Generator().manual_seed(3), masks=_masks())
    run_workers(_train_worker, (str(tmp_path / "init"), str(tmp_path / "out"), n), WORLD)
    got = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(WORLD)]
    for key, value in model.state_dict().items():
        assert torch.equal(got[0]["state"][key], got[1]["state"][key]), key  # the ranks agree bit for bit
        torch.testing.assert_close(got[0]["state"][key], value, rtol=0, atol=1e-6, msg=key)
    assert got[0]["history"] == got[1]["history"]
    assert got[0]["history"] == pytest.approx(history, abs=1e-6)
    ma.assert_masked(model, _masks())


# ---------------------------------------- rank-0-only writing, same-on-ranks checks
def _store_worker(rank: int, init_file: str, root: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result: dict[str, Any] = {}
    try:
        store = StageStore(Path(root))
        settings = {"lr": 0.1}
        result["before"] = store.finished("dense", "seed0-A", settings)
        path = store.save_tensors("dense", "seed0-A", "final.pt", {"w": torch.full((2,), float(rank))})
        result["read_back"] = torch.load(path, weights_only=True)["w"].tolist()  # after the call: rank 0's file
        data = None if rank else {"rank": rank, "acc": 0.5}
        result["record"] = store.finish("dense", "seed0-A", settings, data)
        result["after"] = store.finished("dense", "seed0-A", settings)
        try:
            store.finished("dense", "seed0-A", {"lr": 0.2})
        except StageMismatchError as exc:
            result["mismatch"] = exc.message
        same = {"0.weight": torch.ones(3, 3, dtype=torch.bool)}
        distributed.assert_same_on_ranks(distributed.tensor_digest(same), "The test mask")  # passes
        different = {"0.weight": torch.eye(3, dtype=torch.bool) if rank else torch.ones(3, 3, dtype=torch.bool)}
        try:
            distributed.assert_same_on_ranks(distributed.tensor_digest(different), "The test mask")
        except distributed.RankDivergenceError as exc:
            result["divergence"] = str(exc)
        perm = torch.tensor([1, 0, 2]) if rank else torch.tensor([0, 1, 2])
        try:
            distributed.assert_same_on_ranks(distributed.tensor_digest({"g": perm}), "The permutation of match/x")
        except distributed.RankDivergenceError as exc:
            result["perm_divergence"] = str(exc)
        result["broadcast"] = distributed.broadcast(f"from {rank}")
        try:  # SyncBatchNorm is CUDA-only: said before any stage runs
            reproduce(ReproduceConfig(model="resnet20", sync_bn=True, device="cpu"), out=Path(root) / "bn")
        except ConfigError as exc:
            result["sync_bn"] = exc.message
        torch.save(result, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
@needs_dist
def test_only_rank_0_writes_and_every_rank_sees_what_it_wrote(tmp_path) -> None:
    root = tmp_path / "run"
    run_workers(_store_worker, (str(tmp_path / "init"), str(root), str(tmp_path / "out")), WORLD)
    results = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(WORLD)]
    assert torch.load(root / "stages/dense/seed0-A/final.pt", weights_only=True)["w"].tolist() == [0.0, 0.0]
    manifest = json.loads((root / "stages/dense/seed0-A/manifest.json").read_text())
    assert manifest["data"] == {"rank": 0, "acc": 0.5}
    assert sorted(p.name for p in (root / "stages/dense/seed0-A").iterdir()) == ["final.pt", "manifest.json"]
    for r in results:
        assert r["before"] is None
        assert r["read_back"] == [0.0, 0.0]
        assert r["record"] == r["after"] == {"rank": 0, "acc": 0.5}  # rank 0's record on every rank
        assert "lr: 0.1 -> 0.2" in r["mismatch"]  # the same error on every rank
        assert r["broadcast"] == "from 0"
        # negative controls: a different mask or permutation on one rank is caught on every rank
        assert "The test mask differs between ranks" in r["divergence"] and "rank(s) [1]" in r["divergence"]
        assert "The permutation of match/x differs between ranks" in r["perm_divergence"]
        assert "SyncBatchNorm runs on CUDA only" in r["sync_bn"]
    assert not (root / "bn").exists()  # stopped before writing anything


@pytest.mark.parametrize(
    ("model", "world", "sync_bn", "recorded"),
    [
        ("resnet20", 1, False, False),  # one process: the stages of before
        ("resnet20", 2, False, True),  # BatchNorm over per-rank shares: depends on the number of ranks
        ("resnet20", 2, True, False),  # SyncBatchNorm: one process's statistics
        ("mlp", 2, False, False),  # no BatchNorm: nothing depends on the ranks
    ],
)
def test_per_rank_batchnorm_is_part_of_the_stage_settings(tmp_path, model, world, sync_bn, recorded) -> None:
    config = ReproduceConfig(model=model, sync_bn=sync_bn)
    run = _Run(config, load_dataset("digits"), torch.device("cpu"), StageStore(tmp_path), "x", print, None, world=world)
    refs = [run.ref_dense(0, "A"), run.ref_imp(0), run.ref_match(0), run.ref_sparse(0, 0, 0.9, "lth"), run.ref_lmc(0)]
    for ref in refs:
        assert ("bn_stats" in ref.settings) == recorded, ref.key
        if recorded:
            assert ref.settings["bn_stats"] == "per rank of 2"


def test_one_process_needs_no_group() -> None:
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()
    assert distributed.broadcast("x") == "x"
    distributed.assert_same_on_ranks("anything", "a value")
    a = {"w": torch.ones(2)}
    assert distributed.tensor_digest(a) == distributed.tensor_digest({"w": torch.ones(2)})
    assert distributed.tensor_digest(a) != distributed.tensor_digest({"w": torch.tensor([1.0, 0.0])})
    assert distributed.tensor_digest(a) != distributed.tensor_digest({"v": torch.ones(2)})


# ----------------------------------------------------------------- end to end
# 2 seeds, so that the shared-mask stages run too; one sparsity and one rewind point for speed
SETTINGS = "--preset digits-quick --seeds 2 --epochs 3 --rewind-epochs 2 --sparsities 0.8 --quiet".split()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return env


def _command(out: Path, processes: int) -> list[str]:
    reproduce = ["-m", "maskalign", "reproduce", *SETTINGS, "--out", str(out)]
    if processes == 1:
        return [sys.executable, *reproduce]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *reproduce]


def _run(out: Path, processes: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(out, processes), env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> dict[int, Path]:
    """The same run on 1 process and on 2 gloo processes under torchrun."""
    outs = {}
    for processes in (1, WORLD):
        out = tmp_path_factory.mktemp(f"p{processes}") / "run"
        done = _run(out, processes)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[processes] = out
    return outs


@pytest.mark.slow  # three torchrun launches
@needs_dist
def test_two_gloo_processes_give_the_results_of_one(reference_runs) -> None:
    one, two = (run_results(reference_runs[p]) for p in (1, WORLD))
    assert_results_close(two, one, ATOL)
    assert json.loads((reference_runs[WORLD] / "results.json").read_text())["world_size"] == WORLD
    assert json.loads((reference_runs[1] / "results.json").read_text())["world_size"] == 1
    # one log, one results file, the stage folders of one process: rank 1 wrote nothing of its own
    names = lambda out: sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.suffix != ".png")  # noqa: E731
    assert names(reference_runs[WORLD]) == names(reference_runs[1])
    assert (reference_runs[WORLD] / "log.txt").read_text().count("reproduce --preset") == 1


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` under ``launcher``: a
    descendant whose environment holds ``RANK=<rank>`` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if f"RANK={rank}".encode() not in environ:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        while ppid > 1 and ppid != launcher:
            try:
                text = Path(f"/proc/{ppid}/status").read_text()
            except OSError:
                break
            ppid = int(next(line.split()[1] for line in text.splitlines() if line.startswith("PPid:")))
        if ppid == launcher:
            return int(entry.name)
    return None


@pytest.mark.slow  # two torchrun launches
@needs_dist
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_a_run_whose_rank_1_is_killed_resumes_under_torchrun(tmp_path, reference_runs) -> None:
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        _command(out, WORLD), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        marker = out / "stages/match/seed0/manifest.json"  # dense and IMP of seed 0 done; sparse training next
        while not marker.exists():
            assert launcher.poll() is None, "the run ended before the stage to kill after"
            assert time.monotonic() < deadline, "no finished match stage within 300 s"
            time.sleep(0.02)
        pid = _worker_pid(launcher.pid, 1)
        assert pid is not None, "no torchrun worker with RANK=1"
        os.kill(pid, signal.SIGKILL)
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0, output[-3000:]  # torchrun tore the run down
    assert not (out / "results.json").exists()
    finished = {p.parent.relative_to(out / "stages") for p in (out / "stages").rglob("manifest.json")}
    assert Path("match/seed0") in finished and Path("shared-diversity/k2/s0.8") not in finished
    rerun = _run(out, WORLD)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert run_results(out) == run_results(reference_runs[WORLD])  # the uninterrupted 2-process run, exactly
    summary = (out / "log.txt").read_text().splitlines()[-1]
    reused = int(summary.split(" reused")[0].rsplit(" ", 1)[1])
    assert reused >= len(finished) > 0, summary
