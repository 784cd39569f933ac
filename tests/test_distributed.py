"""Activation matching under torch.distributed: 2 gloo processes on CPU, each
with half of the batches, give the permutation of one process on all batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import make_inputs, make_model, run_workers, spec_for

import maskalign as ma

WORLD = 2


def _batches() -> list[torch.Tensor]:
    return [make_inputs(32, seed=500 + i) for i in range(4)]


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return make_model("resnet20_w1", seed=61), make_model("resnet20_w1", seed=62)


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        a, b = _models()
        shard = _batches()[rank::WORLD]
        pi = ma.match_activations(a, b, shard, spec_for("resnet20_w1"), progress=False)
        torch.save({g: pi[g] for g in pi}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_match_like_one_process(tmp_path) -> None:
    a, b = _models()
    single = ma.match_activations(a, b, _batches(), spec_for("resnet20_w1"), progress=False)
    out = str(tmp_path / "perm")
    run_workers(_worker, (str(tmp_path / "init"), out), WORLD)
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert set(got) == set(single)
        for group in single:
            assert torch.equal(got[group], single[group]), (rank, group)
    # the matching is not trivial: independent models need a non-identity permutation
    assert not single.is_identity()
