"""Tests for maskalign.sparse: enforce_masks keeps pruned weights at exactly
zero through training, optimiser-state restores and dense weight writes."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable

import pytest
import torch
from torch import Tensor, nn

from maskalign.errors import MaskError
from maskalign.sparse import MaskHandle, assert_masked, enforce_masks
from maskalign.sparse.masks import global_magnitude_prune

OptFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def masks_for(model: nn.Module, s: float = 0.6) -> dict[str, Tensor]:
    masks = global_magnitude_prune(model, s)
    # Also mask one bias, a non-default parameter.
    bias = next(p for n, p in model.named_parameters() if n.endswith("bias"))
    bias_name = next(n for n, p in model.named_parameters() if p is bias)
    masks[bias_name] = torch.arange(bias.numel()).reshape(bias.shape) % 2 == 0
    return masks


def batch(model: nn.Module, gen: torch.Generator, device: str = "cpu") -> tuple[Tensor, Tensor]:
    if isinstance(model, ConvNet):
        x = torch.randn(8, 2, 5, 5, generator=gen)
    else:
        x = torch.randn(8, 6, generator=gen)
    return x.to(device), torch.randn(8, 3, generator=gen).to(device)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    masks: dict[str, Tensor] | None = None,
    clip: float | None = None,
    device: str = "cpu",
) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = batch(model, gen, device)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if masks is not None:
            assert_masked(model, masks)


def pruned_state_values(model: nn.Module, opt: torch.optim.Optimizer, masks: dict[str, Tensor]) -> list[Tensor]:
    """Every optimiser-state entry at a pruned position, for every masked param."""
    named = dict(model.named_parameters())
    out = []
    for name, mask in masks.items():
        for value in opt.state[named[name]].values():
            if isinstance(value, Tensor) and value.shape == mask.shape:
                out.append(value[~mask.to(value.device)])
    return out


def _supports(cls: type[torch.optim.Optimizer], kwarg: str) -> bool:
    return kwarg in inspect.signature(cls.__init__).parameters


OPTIMIZERS: dict[str, OptFactory] = {
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd_nesterov_wd_foreach": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, foreach=True
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_wd_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam_unfused": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False, fused=False),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_unfused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False, fused=False),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),
}
if _supports(torch.optim.Adam, "fused"):
    OPTIMIZERS["adam_fused"] = lambda p: torch.optim.Adam(p, lr=1e-2, fused=True)
    OPTIMIZERS["adamw_fused"] = lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True)


def _fused_kernels_on(device_type: str) -> bool:
    """Whether this torch build has fused optimiser kernels for ``device_type``
    (CPU got them in torch 2.4). Unknown (the private helper moved): True, so
    that the optimiser is built and any error it raises fails the test."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices as supported
    except ImportError:
        return True
    return device_type in supported()


def make_opt(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser ``name`` over ``model``'s parameters. The one condition
    under which an optimiser is unavailable: a fused variant on a device this
    torch build has no fused kernels for (a skip that names it); any other
    error in building it is a failure."""
    device = next(model.parameters()).device.type
    if name.endswith("_fused") and not _fused_kernels_on(device):
        pytest.skip(f"{name}: torch {torch.__version__} has no fused optimiser kernels for {device!r} tensors")
    return OPTIMIZERS[name](model.parameters())


# --- training


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 0.1])
def test_masked_weights_stay_exactly_zero_for_50_steps(opt_name: str, clip: float | None) -> None:
    model = mlp()
    masks = masks_for(model)
    opt = make_opt(opt_name, model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with enforce_masks(model, masks, optimizer=opt):
        train(model, opt, 50, masks=masks, clip=clip)
        for value in pruned_state_values(model, opt, masks):
            assert bool((value == 0).all())
    named = dict(model.named_parameters())
    for n, m in masks.items():  # the kept weights did train
        assert not torch.equal(named[n].detach()[m], start[n][m])


@pytest.mark.parametrize("opt_name", ["sgd_nesterov_wd", "adamw"])
def test_gradient_hooks_alone_keep_weights_zero(opt_name: str) -> None:
    model = ConvNet()
    masks = masks_for(model)
    opt = make_opt(opt_name, model)
    with enforce_masks(model, masks):
        train(model, opt, 50, masks=masks, clip=1.0)


@pytest.mark.parametrize("opt_name", ["sgd_nesterov_wd", "adam", "adamw_foreach", "rmsprop_momentum"])
def test_dense_optimizer_state_cannot_leak(opt_name: str) -> None:
    model = mlp()
    masks = masks_for(model)
    opt = make_opt(opt_name, model)
    train(model, opt, 5)  # dense state: momentum / moments non-zero everywhere

    # Control: with gradient hooks only, the dense state leaks into pruned weights.
    control = copy.deepcopy(model)
    control_opt = make_opt(opt_name, control)
    control_opt.load_state_dict(opt.state_dict())
    with enforce_masks(control, masks):
        train(control, control_opt, 1)
        with pytest.raises(MaskError):
            assert_masked(control, masks)

    handle = enforce_masks(model, masks, optimizer=opt)
    assert all(bool((v == 0).all()) for v in pruned_state_values(model, opt, masks))
    train(model, opt, 50, masks=masks)
    assert all(bool((v == 0).all()) for v in pruned_state_values(model, opt, masks))
    handle.remove()


@pytest.mark.parametrize("opt_name", ["sgd_nesterov_wd", "adamw"])
def test_load_state_dict_mid_training_is_masked_as_it_loads(opt_name: str) -> None:
    model = mlp()
    dense_state = copy.deepcopy(model.state_dict())
    masks = masks_for(model)
    opt = make_opt(opt_name, model)
    with enforce_masks(model, masks, optimizer=opt) as handle:
        train(model, opt, 10, masks=masks)
        model.load_state_dict(dense_state)
        assert_masked(model, masks)
        with torch.no_grad():  # a dense write outside autograd and load_state_dict ...
            model[0].weight.copy_(dense_state["0.weight"])
        with pytest.raises(MaskError, match=r"'0\.weight': \d+ of \d+ masked entries"):
            assert_masked(model, masks)
        with pytest.warns(UserWarning, match=r"'0\.weight': \d+ masked entries"):
            train(model, opt, 1)  # ... is removed by the next forward, which warns once
        assert_masked(model, masks)
        train(model, opt, 20, masks=masks)
        assert handle.active


def test_dense_optimizer_load_state_dict_mid_training() -> None:
    model = mlp()
    masks = masks_for(model)
    dense_model = copy.deepcopy(model)
    dense_opt = make_opt("adam", dense_model)
    train(dense_model, dense_opt, 5)
    opt = make_opt("adam", model)
    with enforce_masks(model, masks, optimizer=opt):
        train(model, opt, 5, masks=masks)
        opt.load_state_dict(dense_opt.state_dict())
        train(model, opt, 20, masks=masks)
        assert all(bool((v == 0).all()) for v in pruned_state_values(model, opt, masks))


def test_weight_write_outside_autograd_without_optimizer_is_zeroed_at_next_forward() -> None:
    model = mlp()
    masks = masks_for(model)
    opt = make_opt("sgd_nesterov_wd", model)
    with enforce_masks(model, masks):
        with torch.no_grad():
            model[0].weight.fill_(1.0)
        with pytest.raises(MaskError, match=r"'0\.weight'"):
            assert_masked(model, masks)
        with pytest.warns(UserWarning, match=r"'0\.weight': \d+ masked entries"):
            train(model, opt, 1)
        assert_masked(model, masks)


# --- NaN gradients


class SqrtAbsLinear(nn.Module):
    """y = x @ sqrt(|W|)^T: the gradient is NaN exactly where W == 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.abs().sqrt().T


def test_nan_gradients_at_masked_positions_do_not_propagate() -> None:
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    masks = {"weight": mask}
    x = torch.randn(5, 4)

    # Control: after zeroing, masked gradients are NaN, and multiplying by the
    # mask does not fix them.
    control = SqrtAbsLinear()
    with torch.no_grad():
        control.weight[~mask] = 0.0
    control(x).sum().backward()
    assert control.weight.grad is not None
    assert bool(torch.isnan(control.weight.grad[~mask]).all())
    assert bool(torch.isnan(control.weight.grad * mask).any())

    model = SqrtAbsLinear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with enforce_masks(model, masks, optimizer=opt):
        for _ in range(5):
            opt.zero_grad()
            model(x).sum().backward()
            assert model.weight.grad is not None
            assert bool(torch.isfinite(model.weight.grad).all())
            assert bool((model.weight.grad[~mask] == 0).all())
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            assert bool(torch.isfinite(model.weight).all())
            assert_masked(model, masks)


# --- structure


def test_names_state_dict_keys_and_deepcopy_unchanged() -> None:
    model = ConvNet()
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    param_ids = [id(p) for p in model.parameters()]
    masks = masks_for(model)
    handle = enforce_masks(model, masks)
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names
    assert [id(p) for p in model.parameters()] == param_ids
    assert all(type(p) is nn.Parameter for p in model.parameters())
    clone = copy.deepcopy(model)
    assert list(clone.state_dict()) == keys
    assert_masked(clone, masks)
    clone.load_state_dict(model.state_dict())
    handle.remove()


def test_remove_restores_plain_behaviour_and_is_idempotent() -> None:
    model = mlp()
    masks = masks_for(model)
    opt = make_opt("sgd_nesterov_wd", model)
    handle = enforce_masks(model, masks, optimizer=opt)
    assert handle.active
    handle.remove()
    handle.remove()
    assert not handle.active
    assert "removed" in repr(handle)
    assert_masked(model, masks)  # removal leaves the weights as they were
    train(model, opt, 1)
    assert model[0].weight.grad is not None
    assert bool((model[0].weight.grad[~masks["0.weight"]] != 0).any())
    with pytest.raises(MaskError):
        assert_masked(model, masks)


def test_context_manager_removes_hooks() -> None:
    model = mlp()
    masks = masks_for(model)
    with enforce_masks(model, masks) as handle:
        assert isinstance(handle, MaskHandle) and handle.active
    assert not handle.active


def test_masks_not_mutated_and_handle_has_private_copies() -> None:
    model = mlp()
    masks = masks_for(model)
    before = {n: m.clone() for n, m in masks.items()}
    handle = enforce_masks(model, masks)
    for n, m in masks.items():
        assert torch.equal(m, before[n])
        assert torch.equal(handle.masks[n], m)
        assert handle.masks[n].data_ptr() != m.data_ptr()
    with pytest.raises(TypeError):
        handle.masks["x"] = torch.ones(1, dtype=torch.bool)  # type: ignore[index]
    handle.remove()


def test_invalid_masks_touch_nothing() -> None:
    model = mlp()
    opt = make_opt("sgd_nesterov_wd", model)
    train(model, opt, 2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())
    bad = {
        "0.weight": torch.rand(16, 6) > 0.5,
        "2.weight": torch.ones(8, 16),  # not bool
    }
    with pytest.raises(MaskError, match=r"'2\.weight'"):
        enforce_masks(model, bad, optimizer=opt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    for pid, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(v, opt_state["state"][pid][k])
    plain = copy.deepcopy(model)  # deepcopy never carries tensor hooks
    x = torch.randn(4, 6)
    opt.zero_grad()
    model(x).sum().backward()
    plain(x).sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):  # no hook was installed
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad)


def test_frozen_parameter_can_be_masked() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    masks = masks_for(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with enforce_masks(model, masks, optimizer=opt):
        train(model, opt, 3, masks=masks)


# --- assert_masked


def test_assert_masked_message_and_atol() -> None:
    model = mlp()
    masks = masks_for(model)
    masks_pruned = int((~masks["2.weight"]).sum())
    with pytest.raises(MaskError, match=rf"'2\.weight': {masks_pruned} of {masks_pruned} masked"):
        assert_masked(model, {"2.weight": masks["2.weight"]})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p[~masks[n]] = 0.0
        model[2].weight[~masks["2.weight"]] = 1e-4
    with pytest.raises(MaskError, match=r"'2\.weight': \d+ of \d+ .*max \|w\| = 0\.0001"):
        assert_masked(model, masks)
    assert_masked(model, masks, atol=1e-3)
    with torch.no_grad():
        model[2].weight[~masks["2.weight"]] = float("nan")
    with pytest.raises(MaskError, match=r"'2\.weight'"):
        assert_masked(model, masks, atol=1.0)
    with pytest.raises(ValueError, match="atol"):
        assert_masked(model, masks, atol=-1.0)
    with pytest.raises(MaskError, match="'nope'"):
        assert_masked(model, {"nope": torch.ones(1, dtype=torch.bool)})


# --- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_state_and_weight_leak_removed_on_cuda() -> None:
    model = mlp().cuda()
    masks = global_magnitude_prune(model, 0.6)
    cpu_masks = {n: m.cpu() for n, m in masks.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    dense_state = copy.deepcopy(model.state_dict())
    train(model, opt, 3, device="cuda")
    with enforce_masks(model, cpu_masks, optimizer=opt) as handle:
        assert all(m.device.type == "cuda" for m in handle.masks.values())
        train(model, opt, 20, masks=cpu_masks, device="cuda")
        model.load_state_dict(dense_state)
        train(model, opt, 1, device="cuda")
        assert_masked(model, cpu_masks)
        assert all(bool((v == 0).all()) for v in pruned_state_values(model, opt, cpu_masks))


# --- the bitwise masking kernel


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
)
@pytest.mark.parametrize("contiguous", [True, False])
def test_bitmask_zeroes_exactly_and_keeps_kept_entries_bit_for_bit(dtype: torch.dtype, contiguous: bool) -> None:
    from maskalign.sparse.enforce import _BitMask

    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 5, generator=gen) > 0.5
    value = torch.randn(6, 5, generator=gen).to(dtype)
    value[0, :] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1.0]).to(dtype)
    if not contiguous:  # a transposed view: strides differ from the mask's
        mask, value = mask.T.contiguous().T, value.T.contiguous().T
        assert not value.is_contiguous()
    got = value.clone()
    _BitMask(mask).mask_(got)
    assert got.dtype == dtype and got.shape == value.shape
    pruned = got[~mask]
    assert bool((pruned == 0).all()) and not bool(torch.signbit(pruned.real).any())  # +0.0, never NaN
    kept, expected = got[mask], value[mask]
    assert torch.equal(kept.isnan(), expected.isnan())
    assert torch.equal(kept[~kept.isnan()], expected[~expected.isnan()])
