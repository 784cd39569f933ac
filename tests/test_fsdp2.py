"""enforce_masks under FSDP2 (``torch.distributed.fsdp.fully_shard``) and on
hand-built DTensor parameters, on CPU with gloo.

FSDP2 shards each parameter as a DTensor on dim 0 (uneven shards as
``torch.chunk`` cuts them, an empty shard for a 1-row weight on rank 1),
swaps unsharded plain tensors in during forward/backward and reduce-scatters
the gradients into sharded DTensor ``.grad``s. The handle masks every local
shard with its shard of the mask (no all-gather per step). Two gloo
processes train the same model on halves of the same global batches; the
gathered result must equal one process training the unsharded model on the
whole batches, with every pruned weight and optimiser-state entry exactly 0.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_workers
from torch import Tensor, nn

import maskalign as ma

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
STEPS = 5
BATCH = 8  # global; each rank takes BATCH // WORLD rows
# float64 everywhere: the sharded and the single-process runs differ only in
# the order of the gradient sums (the reduce-scatter averages two half-batch
# means): measured 2.8e-17 (weights) and 2.5e-16 (momentum) after 5 steps, on
# values of order 1; 1e-13 leaves room for other BLAS kernels.
ATOL = 1e-13


class Net(nn.Module):
    """Weights of 7, 5 and 1 rows: uneven shards over 2 ranks (4/3, 3/2) and
    an empty shard (rank 1 of ``head.weight``). ``a`` and ``b`` get their
    own ``fully_shard``; ``head`` stays in the root's group, whose unsharded
    parameters stay registered after a forward without backward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 7)
        self.b = nn.Linear(7, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def make_masks() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    masks = {}
    for name, p in make_net().named_parameters():
        if name == "head.bias":
            continue
        mask = torch.rand(p.shape, generator=g, dtype=torch.float64) < 0.5
        mask.view(-1)[0], mask.view(-1)[1] = True, False  # some kept, some pruned in every tensor
        masks[name] = mask
    return masks


def global_batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 1, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def make_optimizer(kind: str, params: object) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)  # type: ignore[arg-type]
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # type: ignore[arg-type]


def train_reference(kind: str) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """One process, no sharding, masks enforced: the result FSDP2 must match."""
    model = make_net()
    opt = make_optimizer(kind, model.parameters())
    masks = make_masks()
    with ma.enforce_masks(model, masks, opt):
        for x, y in global_batches():
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x), y).backward()
            opt.step()
    ma.assert_masked(model, masks)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: v.clone() for k, v in s.items() if v.dim()} for p, s in opt.state.items()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}, state


# --------------------------------------------------------- the FSDP2 worker


def _shard(model: Net) -> Net:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.a)
    fully_shard(model.b)
    fully_shard(model)
    return model


def _gathered(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """Full parameters and full same-shape optimiser state (all-gathers)."""
    params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    state = {
        names[id(p)]: {k: v.full_tensor() for k, v in s.items() if hasattr(v, "full_tensor")}
        for p, s in opt.state.items()
    }
    return params, state


def _run(rank: int, kind: str, mode: str) -> dict[str, object]:
    """Train with FSDP2: ``mode`` "after" (enforce after fully_shard),
    "before" (enforce, then fully_shard, then attach the optimiser built
    over the sharded parameters) or "none" (masks applied once, not
    enforced: the negative control)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    masks = make_masks()
    model = make_net()
    handle = None
    report: dict[str, object] = {}
    if mode == "before":
        handle = ma.enforce_masks(model, masks)
    elif mode == "none":
        ma.apply_masks(model, masks)
    _shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = make_optimizer(kind, model.parameters())
    comm = CommDebugMode()
    with comm:  # each rank cuts its shards of the full masks itself
        if mode == "after":
            handle = ma.enforce_masks(model, masks, opt)
        elif mode == "before":
            assert handle is not None
            handle.attach(opt)
    report["collectives"] = comm.get_total_counts()
    if handle is not None:
        shards = handle.masks
        params = dict(model.named_parameters())
        for name in masks:  # the mask is sharded like its parameter
            assert isinstance(shards[name], DTensor), name
            assert shards[name].placements == params[name].placements, name
            assert shards[name].to_local().shape == params[name].to_local().shape, name
        report["local_mask_rows"] = {n: shards[n].to_local().shape[0] for n in masks}
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for x, y in global_batches():
        with torch.no_grad():  # the root's group stays unsharded after this forward
            model(x[rows])
        if handle is not None:
            assert handle.active
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x[rows]), y[rows]).backward()
        if handle is not None:  # the reduce-scattered sharded gradients are masked, on their local shards
            for name, shard in handle.masks.items():
                grad = model.get_parameter(name).grad
                assert isinstance(grad, DTensor)
                assert bool((grad.to_local()[~shard.to_local()] == 0).all()), name
        with comm:  # the step and its hooks mask local shards: no collective
            opt.step()
            if handle is not None:
                assert handle.active  # a sync, as at each forward
        report["collectives"] += comm.get_total_counts()  # type: ignore[operator]
        if handle is not None:
            ma.assert_masked(model, masks, grads=True)  # gathers: every rank calls it
            with warnings.catch_warnings():  # DTensor masks work too, checked over all shards
                warnings.simplefilter("error")  # (a rank whose shard is all pruned does not warn)
                ma.assert_masked(model, handle.masks)
    report["params"], report["state"] = _gathered(model, opt)
    if mode == "after" and kind == "sgd":
        report["revived"] = _write_outside_autograd(model, masks, rows)
    if handle is not None:
        handle.remove()
    return report


def _write_outside_autograd(model: Net, masks: dict[str, Tensor], rows: slice) -> dict[str, object]:
    """Writes to a local shard (``to_local().fill_``) and through the DTensor
    (``weight.fill_``) are undone by the next forward, which warns."""
    with torch.no_grad():
        model.a.weight.to_local().fill_(1.0)
        model.b.weight.fill_(1.0)
    x = global_batches()[0][0][rows]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(x)
    messages = [str(w.message) for w in caught if "had become non-zero" in str(w.message)]
    leaks = {}
    for name in ("a.weight", "b.weight"):
        full = model.get_parameter(name).detach().full_tensor()
        leaks[name] = int((full[~masks[name]] != 0).sum())
    return {"messages": messages, "leaks": leaks}


def _stale_optimizer(rank: int) -> str:
    """enforce_masks with an optimiser built before fully_shard, which then
    replaces the parameters that optimiser steps: its step raises."""
    model = make_net()
    opt = make_optimizer("sgd", model.parameters())
    handle = ma.enforce_masks(model, make_masks(), opt)
    _shard(model)
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    x, y = global_batches()[0]
    F.mse_loss(model(x[rows]), y[rows]).backward()
    try:
        opt.step()
    except ma.MaskError as exc:
        return str(exc)
    finally:
        handle.remove()
    return ""


def _fsdp_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, object] = {
            f"{kind}-{mode}": _run(rank, kind, mode)
            for kind, mode in (("sgd", "after"), ("adamw", "after"), ("sgd", "before"), ("sgd", "none"))
        }
        results["stale"] = _stale_optimizer(rank)
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, object]]]:
    tmp = tmp_path_factory.mktemp("fsdp2")
    out = str(tmp / "result")
    run_workers(_fsdp_worker, (str(tmp / "init"), out), WORLD, timeout=300.0)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD)]


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # two processes, four FSDP2 trainings (about 10 s)
@pytest.mark.parametrize("run", ["sgd-after", "adamw-after", "sgd-before"])
def test_fsdp2_training_stays_masked_and_matches_one_process(fsdp_results, run: str) -> None:
    kind = run.split("-")[0]
    ref_params, ref_state = train_reference(kind)
    masks = make_masks()
    for rank, results in enumerate(fsdp_results):
        got = results[run]
        assert got["collectives"] == 0, (rank, got["collectives"])
        params, state = got["params"], got["state"]
        assert isinstance(params, dict) and isinstance(state, dict)
        for name, mask in masks.items():  # exactly zero, weights and every same-shape state tensor
            assert bool((params[name][~mask] == 0).all()), (rank, name)
            for key, value in state[name].items():
                if value.shape == mask.shape:
                    assert bool((value[~mask] == 0).all()), (rank, name, key)
        # same as one process on the whole batches, up to the order of float64 sums
        assert _max_diff(params, ref_params) <= ATOL, (rank, _max_diff(params, ref_params))
        for name, values in ref_state.items():
            assert _max_diff(state[name], values) <= ATOL, (rank, name)
        # and it trained
        assert _max_diff(params, {n: p.detach() for n, p in make_net().named_parameters()}) > 1e-3
    # each rank holds its own shard of each mask: 7 rows -> 4 + 3, 5 -> 3 + 2, 1 -> 1 + 0
    if run != "sgd-before":
        rows = [r[run]["local_mask_rows"] for r in fsdp_results]
        assert rows[0]["a.weight"] == 4 and rows[1]["a.weight"] == 3  # type: ignore[index]
        assert rows[0]["head.weight"] == 1 and rows[1]["head.weight"] == 0  # type: ignore[index]


@pytest.mark.slow
def test_fsdp2_without_enforce_masks_pruned_weights_revive(fsdp_results) -> None:
    masks = make_masks()
    for results in fsdp_results:
        params = results["sgd-none"]["params"]
        assert isinstance(params, dict)
        leaked = sum(int((params[n][~m] != 0).sum()) for n, m in masks.items())
        assert leaked > 0.5 * sum(int((~m).sum()) for m in masks.values())


@pytest.mark.slow
def test_fsdp2_writes_outside_autograd_are_undone_at_the_next_forward(fsdp_results) -> None:
    for rank, results in enumerate(fsdp_results):
        revived = results["sgd-after"]["revived"]
        assert isinstance(revived, dict)
        assert revived["leaks"] == {"a.weight": 0, "b.weight": 0}, rank
        # each rank warns about its own shards (both have pruned entries in a and b)
        assert len(revived["messages"]) == 2, (rank, revived["messages"])


@pytest.mark.slow
def test_fsdp2_optimizer_built_before_fully_shard_raises(fsdp_results) -> None:
    for results in fsdp_results:
        assert "still steps the old one" in results["stale"]


# ------------------------------------------- hand-built DTensors, one process


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class DLinear(nn.Module):
    """A linear layer whose weight is a DTensor ``Shard(0)`` parameter."""

    def __init__(self, weight: Tensor, mesh: object) -> None:
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        self.mesh = mesh
        self.weight = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor, Replicate

        out = F.linear(DTensor.from_local(x, self.mesh, [Replicate()]), self.weight)  # type: ignore[arg-type]
        return out.full_tensor()


def test_dtensor_parameters_are_masked_on_their_local_shards(one_rank_group) -> None:
    from torch.distributed.tensor import DTensor

    weight = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = DLinear(weight, one_rank_group)
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(4)) < 0.5
    masks = {"weight": mask}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = ma.enforce_masks(model, masks, opt)
    assert isinstance(handle.masks["weight"], DTensor)
    ma.assert_masked(model, masks)
    x = torch.randn(3, 4, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        grad = model.weight.grad
        assert isinstance(grad, DTensor)
        assert bool((grad.to_local()[~mask] == 0).all())  # the gradient hook ran on the DTensor gradient
        opt.step()
        ma.assert_masked(model, masks, grads=True)
        ma.assert_masked(model, handle.masks)
    momentum = opt.state[model.weight]["momentum_buffer"]
    assert bool((momentum.to_local()[~mask] == 0).all()) and bool((momentum.to_local()[mask] != 0).any())
    # a DTensor has no storage of its own (data_ptr() is 0) and its local shard
    # has its own version counter: a write to to_local() is still seen
    with torch.no_grad():
        model.weight.to_local().fill_(2.0)
    with pytest.raises(ma.MaskError):
        ma.assert_masked(model, masks)
    with pytest.warns(UserWarning, match="had become non-zero"):
        model(x)
    ma.assert_masked(model, masks)
    assert bool((model.weight.to_local()[mask] == 2.0).all())
    handle.remove()


def test_dtensor_parameter_replaced_by_another_is_rebound(one_rank_group) -> None:
    """``load_state_dict(assign=True)``-style replacement, plain -> DTensor
    (what happens when enforce_masks ran before the parameters became
    DTensors): the new DTensor is masked at the next forward."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    weight = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    model = DLinear(weight, one_rank_group)
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(6)) < 0.5
    handle = ma.enforce_masks(model, {"weight": mask})
    model.weight = nn.Parameter(distribute_tensor(torch.ones(5, 4, dtype=torch.float64), one_rank_group, [Shard(0)]))
    model(torch.randn(2, 4, dtype=torch.float64))
    assert isinstance(model.weight, DTensor)
    ma.assert_masked(model, {"weight": mask})
    assert bool((model.weight.to_local()[mask] == 1.0).all())
    handle.remove()
