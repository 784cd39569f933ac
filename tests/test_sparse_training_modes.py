"""enforce_masks under the training set-ups of issue 5 that test_sparse.py does
not cover: Muon (dense orthogonalised updates), EMA copy-back, AMP with a
GradScaler, torch.compile, DDP over 2 gloo processes; CPU always, CUDA where
present."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_workers
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import maskalign as ma
from maskalign.errors import MaskError

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


def mlp(seed: int = 0, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)


def batches(n: int, device: str = "cpu", seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 12, generator=gen).to(device), torch.randint(0, 4, (16,), generator=gen).to(device))
        for _ in range(n)
    ]


def pruned_state_is_zero(model: nn.Module, opt: torch.optim.Optimizer, masks: dict[str, Tensor]) -> bool:
    named = dict(model.named_parameters())
    for name, mask in masks.items():
        for value in opt.state.get(named[name], {}).values():
            if isinstance(value, Tensor) and value.shape == mask.shape and bool((value[~mask] != 0).any()):
                return False
    return True


def step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def muon(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02, weight_decay=0.1)


# --- Muon: the update is orthogonalised, hence dense even where the gradient is 0


@pytest.mark.parametrize("device", DEVICES)
def test_muon_dense_updates_are_re_masked_after_each_step(device: str) -> None:
    model = mlp(device=device)
    masks = {n: m for n, m in ma.global_magnitude_prune(model, 0.8).items()}

    control = copy.deepcopy(model)  # gradient hooks alone: Muon's update leaks after each step
    control_opt = muon(control)
    with ma.enforce_masks(control, masks):
        with pytest.warns(UserWarning, match="not passed to enforce_masks"):  # seen at the next forward
            for x, y in batches(3, device):
                step(control, control_opt, x, y)
        with pytest.raises(MaskError):
            ma.assert_masked(control, masks)

    opt = muon(model)
    with ma.enforce_masks(model, masks, opt):
        for x, y in batches(40, device):
            step(model, opt, x, y)
            ma.assert_masked(model, masks)
        assert pruned_state_is_zero(model, opt, masks)


# --- EMA copy-back: weights loaded from a dense average


@pytest.mark.parametrize("device", DEVICES)
def test_ema_copy_back_is_masked_as_it_loads(device: str) -> None:
    model = mlp(device=device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema.update_parameters(model)  # the average starts from the dense weights
    masks = ma.global_magnitude_prune(model, 0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    with ma.enforce_masks(model, masks, opt):
        for i, (x, y) in enumerate(batches(30, device)):
            step(model, opt, x, y)
            ema.update_parameters(model)
            ma.assert_masked(model, masks)
            if i % 10 == 9:  # copy the average back, as EMA training loops do
                model.load_state_dict(ema.module.state_dict())
                ma.assert_masked(model, masks)  # the load_state_dict post-hook masks what it loads
        step(model, opt, *batches(1, device, seed=9)[0])
        ma.assert_masked(model, masks)
        assert pruned_state_is_zero(model, opt, masks)


# --- AMP with a GradScaler, gradient clipping on unscaled gradients


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_with_grad_scaler_and_clipping(device: str) -> None:
    model = mlp(device=device)
    masks = ma.global_magnitude_prune(model, 0.7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    skipped = 0
    with ma.enforce_masks(model, masks, opt):
        for i, (x, y) in enumerate(batches(30, device)):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=amp_dtype):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if i == 5:  # an overflow: the scaler skips this step
                model[0].bias.grad[0] = float("inf")
                skipped += 1
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            ma.assert_masked(model, masks)
        assert scaler.get_scale() < 2.0**10  # the skip happened
        assert pruned_state_is_zero(model, opt, masks)
    assert skipped == 1


# --- torch.compile


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize(
    ("device", "backend"),
    [
        ("cpu", "aot_eager"),  # inductor on CPU compiles C++ for minutes on 2 cores
        pytest.param(
            "cuda",
            "inductor",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def test_torch_compile_keeps_masks_and_matches_eager(device: str, backend: str) -> None:
    torch._dynamo.reset()
    eager = mlp(device=device)
    compiled_model = copy.deepcopy(eager)
    masks = ma.global_magnitude_prune(eager, 0.8)
    opts = []
    handles = []
    for model in (eager, compiled_model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        opts.append(opt)
        handles.append(ma.enforce_masks(model, masks, opt))
    compiled = torch.compile(compiled_model, backend=backend)
    for x, y in batches(10, device):
        step(eager, opts[0], x, y)
        step(compiled, opts[1], x, y)
        ma.assert_masked(compiled_model, masks)
    assert list(compiled_model.state_dict()) == list(eager.state_dict())
    for p, q in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    for handle in handles:
        handle.remove()


# --- DDP over 2 gloo processes

WORLD = 2


def _ddp_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = mlp(seed=rank)  # different inits: DDP broadcasts rank 0's weights
        ddp = nn.parallel.DistributedDataParallel(model)
        masks = {f"module.{n}": m for n, m in ma.global_magnitude_prune(mlp(seed=0), 0.8).items()}
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        with ma.enforce_masks(ddp, masks, opt):
            named = dict(ddp.named_parameters())
            for x, y in batches(20, seed=100 + rank):  # each rank its own shard
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(x), y).backward()
                # masked before DDP's all-reduce: no pruned gradient reaches clipping or momentum
                assert all(bool((named[n].grad[~m] == 0).all()) for n, m in masks.items())
                opt.step()
                ma.assert_masked(ddp, masks)
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a restore mid-run
            for x, y in batches(5, seed=200 + rank):
                step(ddp, opt, x, y)
            ma.assert_masked(ddp, masks)
            ok = pruned_state_is_zero(ddp, opt, masks)
        torch.save({"state": model.state_dict(), "state_zero": ok}, f"{out_file}.{rank}")
        # Free DDP (and its gloo work) before the group goes: a DDP object
        # collected after destroy_process_group() can hang in gloo's destructor.
        del ddp, opt, model
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_gloo_ranks_stay_masked_and_in_sync(tmp_path) -> None:
    out = str(tmp_path / "ddp")
    run_workers(_ddp_worker, (str(tmp_path / "init"), out), WORLD)
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]
    assert all(r["state_zero"] for r in results)
    masks = ma.global_magnitude_prune(mlp(seed=0), 0.8)
    reference = mlp(seed=0)
    for rank, result in enumerate(results):
        reference.load_state_dict(result["state"])
        ma.assert_masked(reference, masks)
        for key, value in result["state"].items():  # gradients were all-reduced: ranks agree
            torch.testing.assert_close(value, results[0]["state"][key], rtol=0, atol=0, msg=f"rank {rank} {key}")
    assert not torch.equal(results[0]["state"]["0.weight"], mlp(seed=0).state_dict()["0.weight"])  # it trained
