"""The leak battery of issue 12: once ``ma.enforce_masks`` runs, masked entries
stay exactly 0 (weights, gradients and optimiser state of the parameter's
shape) after every optimizer step until ``handle.remove()``.

Three parts:

* one regression test per leak closed by issue 12 (each failed before it);
* the battery: every optimiser of ``torch.optim`` (and fused / foreach
  variants) times the training set-ups of the issue, all with 0 leaked
  entries, counted exactly (``== 0``), plus a negative control showing the
  counter does find leaks without ``enforce_masks``;
* the edges of the contract: ``handle.active``, deepcopy / pickle of an
  enforced model, stale optimisers, torch.func and what stays a documented
  gap (``torch.autograd.grad``).

Tiny models and a handful of steps: the whole file runs in seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import maskalign as ma
from maskalign.errors import MaskError

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- models


class Net(nn.Module):
    """6 -> 8 -> 3 MLP; with ``embedding=True`` a sparse-gradient embedding
    of 10 tokens feeds it (for SparseAdam)."""

    def __init__(self, embedding: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(10, 6, sparse=True) if embedding else None
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        if self.emb is not None:
            x = self.emb(x).sum(1)
        return self.fc2(torch.tanh(self.fc1(x)))


def net_masks(model: Net) -> dict[str, Tensor]:
    """About half of every entry pruned, never a whole tensor."""
    gen = torch.Generator().manual_seed(7)
    names = ["emb.weight"] if model.emb is not None else ["fc1.weight", "fc1.bias", "fc2.weight"]
    named = dict(model.named_parameters())
    masks = {}
    for name in names:
        mask = torch.rand(named[name].shape, generator=gen) > 0.5
        mask.view(-1)[0] = True
        masks[name] = mask
    return masks


def data(model: Net, seed: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        if model.emb is not None:
            x = torch.randint(0, 10, (8, 3), generator=gen)
        else:
            x = torch.randn(8, 6, generator=gen)
        yield x, torch.randint(0, 3, (8,), generator=gen)


def loss_of(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def mlp_masks(model: nn.Module) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {n: torch.rand(p.shape, generator=gen) > 0.5 for n, p in model.named_parameters() if n.endswith("weight")}


def mlp_step(model: nn.Module, opt: torch.optim.Optimizer | None, seed: int = 0, zero: bool = True) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    if opt is not None and zero:
        opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if opt is not None:
        opt.step()


# ------------------------------------------------------------ leak counting


def leaked(model: nn.Module, masks: dict[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
    """Masked entries that are not exactly 0 (NaN counts): in the weights, in
    ``.grad`` (dense or sparse) and in every optimiser-state tensor of the
    parameter's shape."""
    named = dict(model.named_parameters())
    count = 0
    for name, mask in masks.items():
        param = named[name]
        pruned = ~mask.to(param.device)
        values = [param.detach()]
        if param.grad is not None:
            values.append(param.grad.to_dense() if param.grad.is_sparse else param.grad)
        for opt in optimizers:
            values += [v for v in opt.state.get(param, {}).values() if isinstance(v, Tensor) and v.shape == param.shape]
        count += sum(int((v[pruned] != 0).sum()) for v in values)
    return count


def weight_leaks(model: nn.Module, masks: dict[str, Tensor]) -> int:
    named = dict(model.named_parameters())
    return sum(int((named[n].detach()[~m] != 0).sum()) for n, m in masks.items())


def grads_masked(model: nn.Module, masks: dict[str, Tensor]) -> bool:
    named = dict(model.named_parameters())
    for name, mask in masks.items():
        grad = named[name].grad
        if grad is not None and bool((grad[~mask] != 0).any()):
            return False
    return True


# =========================================== 1. one regression test per leak


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_dense_grad_present_at_enforce_time_is_masked(with_optimizer: bool) -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mlp_step(model, opt)  # a dense step ...
    mlp_step(model, None, seed=1)  # ... and gradient accumulation in progress
    handle = ma.enforce_masks(model, masks, opt if with_optimizer else None)
    assert grads_masked(model, masks)  # masked at enforce time
    mlp_step(model, None, seed=2)  # the last micro-batch
    opt.step()
    assert grads_masked(model, masks)
    assert weight_leaks(model, masks) == 0
    handle.remove()


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_parameter_unfrozen_after_enforce_gets_masked_gradients(with_optimizer: bool) -> None:
    model = mlp()
    masks = mlp_masks(model)
    model[0].weight.requires_grad_(False)  # a frozen backbone ...
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ma.enforce_masks(model, masks, opt if with_optimizer else None):
        mlp_step(model, opt)
        model[0].weight.requires_grad_(True)  # ... released after warm-up
        for seed in range(1, 4):
            mlp_step(model, opt, seed)
            assert grads_masked(model, masks)
            assert weight_leaks(model, masks) == 0


def test_load_state_dict_assign_true_rebinds_the_new_parameters() -> None:
    model = mlp()
    dense = copy.deepcopy(model.state_dict())
    masks = mlp_masks(model)
    handle = ma.enforce_masks(model, masks)
    old = model[0].weight
    model.load_state_dict(dense, assign=True)
    assert model[0].weight is not old
    ma.assert_masked(model, masks)  # masked as it is loaded
    assert handle.active
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # rebuilt over the new parameters
    for seed in range(3):
        mlp_step(model, opt, seed)
        assert grads_masked(model, masks)
        ma.assert_masked(model, masks)
    handle.remove()


def test_parameter_assignment_is_followed_by_name() -> None:
    model = mlp()
    masks = mlp_masks(model)
    handle = ma.enforce_masks(model, masks)
    model[0].weight = nn.Parameter(torch.randn(16, 6))  # dense, and a new object
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for seed in range(3):
        mlp_step(model, opt, seed)
        assert grads_masked(model, masks)
        ma.assert_masked(model, masks)
    handle.remove()


def test_replaced_parameter_still_stepped_by_the_old_optimizer_raises() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ma.enforce_masks(model, masks, opt):
        mlp_step(model, opt)
        model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
        with pytest.raises(MaskError, match=r"^Parameter '0\.weight' was replaced .*optimizer") as info:
            mlp_step(model, opt, 1)
        assert "troubleshooting" in str(info.value)


def test_to_empty_from_meta_then_load_is_protected() -> None:
    dense = mlp()
    masks = mlp_masks(dense)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    handle = ma.enforce_masks(model, masks)
    model.to_empty(device="cpu")  # new Parameter objects, uninitialised memory
    model.load_state_dict(dense.state_dict())
    ma.assert_masked(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for seed in range(3):
        mlp_step(model, opt, seed)
        assert grads_masked(model, masks)
        ma.assert_masked(model, masks)
    assert handle.active and all(m.device.type == "cpu" for m in handle.masks.values())
    handle.remove()


def test_to_empty_then_load_without_optimizer_is_masked_at_load() -> None:
    model = mlp()
    dense = copy.deepcopy(model.state_dict())
    masks = mlp_masks(model)
    with ma.enforce_masks(model, masks):
        model.to_empty(device="cpu")
        model.load_state_dict(dense)
        ma.assert_masked(model, masks)


def test_load_state_dict_without_optimizer_is_masked_at_load() -> None:
    model = mlp()
    dense = copy.deepcopy(model.state_dict())
    masks = mlp_masks(model)
    with ma.enforce_masks(model, masks):
        model.load_state_dict(dense)
        ma.assert_masked(model, masks)
        model[0].load_state_dict({k[2:]: v for k, v in dense.items() if k.startswith("0.")})  # a submodule
        with pytest.warns(UserWarning, match=r"^'0\.weight': \d+ masked entries .*load_state_dict of a submodule"):
            mlp_step(model, None)  # masked at the next forward
        ma.assert_masked(model, masks)


def test_dense_write_without_optimizer_is_removed_at_next_forward() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    with ma.enforce_masks(model, masks):
        mlp_step(model, opt)
        with torch.no_grad():
            model[0].weight.fill_(1.0)
        with pytest.warns(UserWarning, match=r"^'0\.weight': \d+ masked entries"):
            mlp_step(model, opt, 1)
        ma.assert_masked(model, masks)
        assert grads_masked(model, masks)


def test_optimizer_with_dense_state_not_passed_is_detected() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for seed in range(3):  # dense momentum
        mlp_step(model, opt, seed)
    with ma.enforce_masks(model, masks):  # the optimizer is not passed
        mlp_step(model, opt, 4)  # its momentum revives masked weights ...
        with pytest.warns(UserWarning, match=r"optimizer.*not passed to enforce_masks"):
            mlp_step(model, None, 5)  # ... which the next forward detects and re-zeroes
        ma.assert_masked(model, masks)


def test_ema_built_before_masking_and_copied_back() -> None:
    model = mlp()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema.update_parameters(model)  # the average starts from the dense weights
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ma.enforce_masks(model, masks):
        for seed in range(4):
            mlp_step(model, opt, seed)
            ema.update_parameters(model)
            model.load_state_dict(ema.module.state_dict())  # copy back, as EMA loops do
            ma.assert_masked(model, masks)
    assert weight_leaks(ema.module, masks) > 0  # the average itself is the documented gap ...
    ma.apply_masks(ema.module, masks)  # ... and its fix
    ma.assert_masked(ema.module, masks)


def test_deepcopy_of_an_enforced_model_is_protected_too() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ma.enforce_masks(model, masks, opt):
        mlp_step(model, opt)
        clone = copy.deepcopy(model)
        clone_opt = torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        for seed in range(3):
            mlp_step(clone, clone_opt, seed)
            assert grads_masked(clone, masks)
            ma.assert_masked(clone, masks)
        mlp_step(model, opt, 5)
        ma.assert_masked(model, masks)


def test_swapped_tensor_impls_keep_their_gradient_hooks() -> None:
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model = mlp()
        masks = mlp_masks(model)
        with ma.enforce_masks(model, masks):
            weight = model[0].weight
            model.double()  # swaps the TensorImpl under the same Parameter object
            assert model[0].weight is weight
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
            F.cross_entropy(model(x), y).backward()
            assert grads_masked(model, masks)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def test_sparse_embedding_gradients_are_masked() -> None:
    model = Net(embedding=True)
    masks = net_masks(model)
    opt = torch.optim.SparseAdam([model.emb.weight], lr=0.05)
    batches = data(model)
    with ma.enforce_masks(model, masks, opt):
        for _ in range(3):
            opt.zero_grad()
            loss_of(model, next(batches)).backward()
            grad = model.emb.weight.grad
            assert grad is not None and grad.is_sparse
            assert bool((grad.to_dense()[~masks["emb.weight"]] == 0).all())
            opt.step()
            assert leaked(model, masks, [opt]) == 0


def test_handle_active_tells_the_truth_when_a_parameter_disappears() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = ma.enforce_masks(model, masks, opt)
    assert handle.active
    torch.nn.utils.prune.identity(model[0], "weight")  # '0.weight' becomes '0.weight_orig'
    assert not handle.active
    with pytest.raises(MaskError, match=r"^Parameter '0\.weight' is no longer a parameter of the model"):
        mlp_step(model, opt)
    handle.remove()
    assert not handle.active


# ============================================================ 2. the battery


@dataclass(frozen=True)
class OptSpec:
    """How to build one optimiser: ``make(params, weight_decay)``."""

    make: Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
    embedding: bool = False  # SparseAdam: the sparse-gradient embedding model
    matrices_only: bool = False  # Muon: 2-D parameters only
    closure: bool = False  # LBFGS: step(closure)


optim = torch.optim
OPTIMIZERS: dict[str, OptSpec] = {
    "sgd": OptSpec(lambda p, wd: optim.SGD(p, lr=0.05, weight_decay=wd)),
    "sgd_momentum_nesterov": OptSpec(lambda p, wd: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=wd)),
    "sgd_momentum_foreach": OptSpec(lambda p, wd: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=wd, foreach=True)),
    "sgd_momentum_fused": OptSpec(lambda p, wd: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=wd, fused=True)),
    "adam": OptSpec(lambda p, wd: optim.Adam(p, lr=1e-2, weight_decay=wd, foreach=False)),
    "adam_amsgrad_foreach": OptSpec(lambda p, wd: optim.Adam(p, lr=1e-2, weight_decay=wd, amsgrad=True, foreach=True)),
    "adam_fused": OptSpec(lambda p, wd: optim.Adam(p, lr=1e-2, weight_decay=wd, fused=True)),
    "adamw": OptSpec(lambda p, wd: optim.AdamW(p, lr=1e-2, weight_decay=wd, foreach=False)),
    "adamw_fused": OptSpec(lambda p, wd: optim.AdamW(p, lr=1e-2, weight_decay=wd, fused=True)),
    "adamax": OptSpec(lambda p, wd: optim.Adamax(p, lr=1e-2, weight_decay=wd)),
    "nadam_decoupled": OptSpec(lambda p, wd: optim.NAdam(p, lr=1e-2, weight_decay=wd, decoupled_weight_decay=True)),
    "radam": OptSpec(lambda p, wd: optim.RAdam(p, lr=1e-2, weight_decay=wd)),
    "adagrad": OptSpec(lambda p, wd: optim.Adagrad(p, lr=0.05, weight_decay=wd, initial_accumulator_value=0.1)),
    "adagrad_fused": OptSpec(lambda p, wd: optim.Adagrad(p, lr=0.05, weight_decay=wd, fused=True)),
    "adadelta": OptSpec(lambda p, wd: optim.Adadelta(p, lr=1.0, weight_decay=wd)),
    "rmsprop_centered_momentum": OptSpec(
        lambda p, wd: optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True, weight_decay=wd)
    ),
    "rprop": OptSpec(lambda p, wd: optim.Rprop(p, lr=1e-2)),
    "asgd": OptSpec(lambda p, wd: optim.ASGD(p, lr=0.05, t0=1.0, weight_decay=wd)),
    "lbfgs": OptSpec(lambda p, wd: optim.LBFGS(p, lr=0.5, max_iter=2, history_size=4), closure=True),
    "adafactor": OptSpec(lambda p, wd: optim.Adafactor(p, lr=1e-2, weight_decay=wd)),
    "muon": OptSpec(lambda p, wd: optim.Muon(p, lr=0.02, weight_decay=wd), matrices_only=True),
    "sparse_adam": OptSpec(lambda p, wd: optim.SparseAdam(p, lr=0.05), embedding=True),
}


class Run:
    """One battery case: a tiny model, its masks, its data and its
    optimiser factory."""

    def __init__(self, spec: OptSpec, weight_decay: bool = False) -> None:
        self.spec = spec
        self.weight_decay = 0.05 if weight_decay else 0.0
        self.model = Net(embedding=spec.embedding)
        self.masks = net_masks(self.model)
        self.batches = data(self.model)

    def params(self, model: nn.Module) -> list[nn.Parameter]:
        if self.spec.embedding:
            return [model.emb.weight]
        return [p for p in model.parameters() if p.ndim == 2 or not self.spec.matrices_only]

    def optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        try:
            return self.spec.make(self.params(model or self.model), self.weight_decay)
        except (RuntimeError, AttributeError) as exc:  # a fused kernel or an optimizer this torch lacks
            pytest.skip(f"unavailable here: {exc}")

    def backward(self, model: nn.Module | None = None) -> None:
        loss_of(model or self.model, next(self.batches)).backward()

    def step(
        self, opt: torch.optim.Optimizer, model: nn.Module | None = None, micro: int = 1, zero: bool = True
    ) -> None:
        model = model or self.model
        batches = [next(self.batches) for _ in range(micro)]
        if self.spec.closure:

            def closure() -> Tensor:
                opt.zero_grad()
                losses = [loss_of(model, b) for b in batches]
                for loss in losses:
                    loss.backward()
                return sum(losses, torch.zeros(()))

            opt.step(closure)
            return
        if zero:
            opt.zero_grad()
        for b in batches:
            loss_of(model, b).backward()
        opt.step()

    def check(self, *opts: torch.optim.Optimizer, model: nn.Module | None = None) -> None:
        assert leaked(model or self.model, self.masks, opts) == 0

    def dense_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """A model and optimiser state of a dense twin after 2 steps: dense
        weights and dense moments at every masked entry."""
        twin = Net(embedding=self.spec.embedding)
        opt = self.optimizer(twin)
        for _ in range(2):
            self.step(opt, twin)
        return copy.deepcopy(twin.state_dict()), copy.deepcopy(opt.state_dict())

    def first_masked(self) -> tuple[nn.Module, str]:
        return (self.model.emb, "weight") if self.spec.embedding else (self.model.fc1, "weight")


def setup_fresh(run: Run) -> None:
    start = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt):
        for _ in range(4):
            run.step(opt)
            run.check(opt)
    named = dict(run.model.named_parameters())
    assert any(not torch.equal(named[n].detach()[m], start[n][m]) for n, m in run.masks.items())  # it trained


def setup_pre_existing_grad(run: Run) -> None:
    opt = run.optimizer()
    for _ in range(2):  # dense steps: dense state
        run.step(opt)
    run.backward()  # gradient accumulation in progress
    with ma.enforce_masks(run.model, run.masks, opt):
        run.check(opt)
        run.step(opt, zero=False)  # the rest of the accumulation
        run.check(opt)
        for _ in range(2):
            run.step(opt)
            run.check(opt)


def setup_late_unfreeze(run: Run) -> None:
    owner, _ = run.first_masked()
    frozen = list(owner.parameters())
    for p in frozen:
        p.requires_grad_(False)
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt):
        run.step(opt)
        run.check(opt)
        for p in frozen:
            p.requires_grad_(True)
        for _ in range(3):
            run.step(opt)
            run.check(opt)


def setup_assign_reload(run: Run) -> None:
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt) as handle:
        for _ in range(2):
            run.step(opt)
        model_state, opt_state = run.dense_checkpoint()
        run.model.load_state_dict(model_state, assign=True)
        run.check()
        opt = run.optimizer()  # over the new Parameter objects
        opt.load_state_dict(opt_state)
        handle.attach(opt)
        run.check(opt)
        for _ in range(3):
            run.step(opt)
            run.check(opt)


def setup_parameter_reassignment(run: Run) -> None:
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt) as handle:
        for _ in range(2):
            run.step(opt)
        owner, leaf = run.first_masked()
        setattr(owner, leaf, nn.Parameter(torch.randn_like(getattr(owner, leaf))))
        opt = run.optimizer()
        handle.attach(opt)
        for _ in range(3):
            run.step(opt)
            run.check(opt)


def setup_to_empty_reload(run: Run) -> None:
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt):
        for _ in range(2):
            run.step(opt)
        model_state, _ = run.dense_checkpoint()
        run.model.to_empty(device="cpu")
        run.model.load_state_dict(model_state)
        run.check(opt)
        for _ in range(3):
            run.step(opt)
            run.check(opt)


def setup_flat_rematerialisation(run: Run) -> None:
    """FSDP-style: every parameter becomes a new Parameter viewing one flat
    buffer (new objects, new memory, same names)."""
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt) as handle:
        for _ in range(2):
            run.step(opt)
        model_state, _ = run.dense_checkpoint()
        flat = torch.cat([t.flatten() for t in model_state.values()])
        offset = 0
        for name, value in model_state.items():
            owner, _, leaf = name.rpartition(".")
            view = flat[offset : offset + value.numel()].view(value.shape)
            setattr(run.model.get_submodule(owner), leaf, nn.Parameter(view))
            offset += value.numel()
        opt = run.optimizer()
        handle.attach(opt)
        run.check(opt)
        for _ in range(3):
            run.step(opt)
            run.check(opt)


def setup_deepcopy(run: Run) -> None:
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt):
        for _ in range(2):
            run.step(opt)
        clone = copy.deepcopy(run.model)
        (clone_handle,) = ma.MaskHandle.of(clone)
        clone_opt = run.optimizer(clone)
        clone_opt.load_state_dict(run.dense_checkpoint()[1])
        clone_handle.attach(clone_opt)
        for _ in range(3):
            run.step(clone_opt, clone)
            run.check(clone_opt, model=clone)
        run.step(opt)
        run.check(opt)
        clone_handle.remove()


def setup_grad_accumulation(run: Run) -> None:
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt):
        for _ in range(3):
            run.step(opt, micro=3)
            run.check(opt)


def setup_weight_decay_dense_write(run: Run) -> None:
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt):
        run.step(opt)
        model_state, _ = run.dense_checkpoint()
        named = dict(run.model.named_parameters())
        with torch.no_grad():  # written outside autograd and load_state_dict
            for name in run.masks:
                named[name].copy_(model_state[name])
        with pytest.warns(UserWarning, match="masked entries had become non-zero"):
            run.step(opt)
        run.check(opt)
        for _ in range(2):
            run.step(opt)
            run.check(opt)


def setup_dense_optimizer_state_reload(run: Run) -> None:
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt):
        for _ in range(2):
            run.step(opt)
        opt.load_state_dict(run.dense_checkpoint()[1])
        run.check(opt)
        for _ in range(3):
            run.step(opt)
            run.check(opt)


def setup_ema_built_before_masking(run: Run) -> None:
    ema = AveragedModel(run.model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    ema.update_parameters(run.model)  # dense average
    opt = run.optimizer()
    with ma.enforce_masks(run.model, run.masks, opt):
        for i in range(4):
            run.step(opt)
            ema.update_parameters(run.model)
            if i % 2:
                run.model.load_state_dict(ema.module.state_dict())  # copy back
            run.check(opt)


SETUPS: dict[str, Callable[[Run], None]] = {
    "fresh": setup_fresh,
    "pre_existing_grad": setup_pre_existing_grad,
    "late_unfreeze": setup_late_unfreeze,
    "assign_reload": setup_assign_reload,
    "parameter_reassignment": setup_parameter_reassignment,
    "to_empty_reload": setup_to_empty_reload,
    "flat_rematerialisation": setup_flat_rematerialisation,
    "deepcopy": setup_deepcopy,
    "grad_accumulation": setup_grad_accumulation,
    "weight_decay_dense_write": setup_weight_decay_dense_write,
    "dense_optimizer_state_reload": setup_dense_optimizer_state_reload,
    "ema_built_before_masking": setup_ema_built_before_masking,
}


def _fused_sgd_steps_late_gradients() -> bool:
    """Whether fused SGD with momentum can step a parameter whose first
    gradient comes after its first step (torch 2.13 cannot, with or without
    maskalign: a None momentum buffer reaches the kernel)."""
    model = nn.Linear(2, 2)
    model.weight.requires_grad_(False)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        for _ in range(2):
            opt.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            model.weight.requires_grad_(True)
    except (RuntimeError, TypeError):
        return False
    return True


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_leak_battery(opt_name: str, setup: str) -> None:
    if (opt_name, setup) == ("sgd_momentum_fused", "late_unfreeze") and not _fused_sgd_steps_late_gradients():
        pytest.skip("torch's fused SGD cannot step a parameter unfrozen after the first step, even without masks")
    SETUPS[setup](Run(OPTIMIZERS[opt_name], weight_decay=setup == "weight_decay_dense_write"))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_negative_control_without_enforce_masks_entries_leak(opt_name: str) -> None:
    run = Run(OPTIMIZERS[opt_name])
    ma.apply_masks(run.model, run.masks)  # masked once, not enforced
    opt = run.optimizer()
    for _ in range(3):
        run.step(opt)
    assert leaked(run.model, run.masks, [opt]) > 0
    assert weight_leaks(run.model, run.masks) > 0  # the weights themselves revive


# ================================================= 3. the edges of the contract


def test_handle_active_rebinds_a_replaced_parameter() -> None:
    model = mlp()
    masks = mlp_masks(model)
    handle = ma.enforce_masks(model, masks)
    model[0].weight = nn.Parameter(torch.randn(16, 6))
    assert handle.active  # reading it re-binds: the new weights are masked now
    ma.assert_masked(model, masks)
    handle.remove()
    assert not handle.active and "removed" in repr(handle)
    model[0].weight = nn.Parameter(torch.randn(16, 6))
    with pytest.raises(MaskError):  # nothing follows the model after remove()
        ma.assert_masked(model, masks)


def test_a_replaced_parameter_of_another_shape_raises_naming_it() -> None:
    model = mlp()
    masks = mlp_masks(model)
    handle = ma.enforce_masks(model, masks)
    model[0].weight = nn.Parameter(torch.randn(4, 6))
    assert not handle.active
    with pytest.raises(MaskError, match=r"^Parameter '0\.weight' was replaced by one of shape \(4, 6\)"):
        mlp_step(model, None)
    handle.remove()


def test_model_to_another_device_or_dtype_keeps_the_masks() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ma.enforce_masks(model, masks, opt) as handle:
        mlp_step(model, opt)
        model.to(torch.float64)  # param.data = ...: the same objects, new memory
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            assert leaked(model, masks, [opt]) == 0
        assert all(m.dtype == torch.bool for m in handle.masks.values())


def test_frozen_parameter_outside_the_optimizer_is_no_stale_optimizer() -> None:
    model = mlp()
    masks = mlp_masks(model)
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with ma.enforce_masks(model, masks, opt):
        model[0].weight = nn.Parameter(torch.randn(16, 6), requires_grad=False)  # swapped, still frozen
        for seed in range(2):
            mlp_step(model, opt, seed)
            ma.assert_masked(model, masks)


def test_deepcopy_gives_the_copy_its_own_handle() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = ma.enforce_masks(model, masks, opt)
    assert ma.MaskHandle.of(model) == (handle,)
    clone, clone_handle = copy.deepcopy((model, handle))
    assert ma.MaskHandle.of(clone) == (clone_handle,) and clone_handle is not handle
    assert clone_handle.active and clone_handle.masks.keys() == handle.masks.keys()
    clone_handle.remove()  # independent of each other
    assert handle.active and ma.MaskHandle.of(clone) == ()
    with torch.no_grad():
        clone[0].weight.fill_(1.0)
    mlp_step(clone, None)
    with pytest.raises(MaskError):
        ma.assert_masked(clone, masks)
    copy.deepcopy(opt)  # an optimiser copied alone does not drag the model along ...
    assert len(ma.MaskHandle.of(model)) == 1
    mlp_step(model, opt)
    ma.assert_masked(model, masks)
    handle.remove()
    assert ma.MaskHandle.of(copy.deepcopy(model)) == ()  # ... and a removed handle is not copied


def test_pickled_enforced_model_stays_protected(tmp_path) -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ma.enforce_masks(model, masks, opt):
        mlp_step(model, opt)
        torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    (handle,) = ma.MaskHandle.of(loaded)
    loaded_opt = torch.optim.SGD(loaded.parameters(), lr=0.1, momentum=0.9)
    handle.attach(loaded_opt)
    loaded.load_state_dict(mlp().state_dict())  # dense weights
    for seed in range(3):
        mlp_step(loaded, loaded_opt, seed)
        assert leaked(loaded, masks, [loaded_opt]) == 0


def test_functional_call_leaves_the_tensors_passed_alone() -> None:
    model = mlp()
    masks = mlp_masks(model)
    with ma.enforce_masks(model, masks):
        dense = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        before = {n: t.clone() for n, t in dense.items()}
        torch.func.functional_call(model, dense, (torch.randn(2, 6),))
        assert all(torch.equal(dense[n], before[n]) for n in dense)
        ma.assert_masked(model, masks)


def test_two_forwards_before_one_backward_still_work() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ma.enforce_masks(model, masks):  # no optimizer: weights are re-zeroed at forward
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            a, b = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
            opt.zero_grad()
            (model(a).sum() + model(b).sum()).backward()  # no in-place write between the forwards
            opt.step()
            ma.assert_masked(model, masks)


def test_autograd_grad_is_the_documented_gap() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ma.enforce_masks(model, masks, opt):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        params = list(model.parameters())
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        assert bool((grads[0][~masks["0.weight"]] != 0).any())  # never accumulated: not masked
        for p, g in zip(params, grads):
            p.grad = g
        with pytest.raises(MaskError, match=r"^'0\.weight\.grad': \d+ of \d+ masked entries"):
            ma.assert_masked(model, masks, grads=True)
        opt.step()
        ma.assert_masked(model, masks)  # the attached optimizer's step still re-zeros the weights


def test_optimizer_argument_and_removed_handle_errors() -> None:
    model = mlp()
    masks = mlp_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ma.ArgumentTypeError, match=r"^Argument 'optimizer' is a list, not a torch\.optim\.Optimizer"):
        ma.enforce_masks(model, masks, [torch.optim.SGD(model.parameters(), lr=0.1)])  # type: ignore[arg-type]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing touched
    assert ma.MaskHandle.of(model) == ()
    handle = ma.enforce_masks(model, masks)
    handle.remove()
    with pytest.raises(MaskError, match="removed"):
        handle.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    for atol in (-1.0, float("nan"), "0", True):
        with pytest.raises(ma.ArgumentValueError, match=r"^Argument 'atol' must be a number >= 0"):
            ma.assert_masked(model, masks, atol=atol)  # type: ignore[arg-type]


def test_attach_is_idempotent_and_masks_state_at_once() -> None:
    model = mlp()
    masks = mlp_masks(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(2):
        mlp_step(model, opt, seed)  # dense moments
    handle = ma.enforce_masks(model, masks)
    assert handle.attach(opt) is handle and handle.attach(opt) is handle
    assert leaked(model, masks, [opt]) == 0
    assert len(opt._optimizer_step_post_hooks) == 1
    handle.remove()
    assert len(opt._optimizer_step_post_hooks) == 0
