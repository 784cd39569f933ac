"""Tests for maskalign.sparse.prune_interop: masks and state_dicts from and to the
form of torch.nn.utils.prune (``weight_orig`` / ``weight_mask``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

import maskalign as ma
from maskalign.errors import MaskError


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def x() -> Tensor:
    return torch.randn(7, 2, 5, 5, generator=torch.Generator().manual_seed(3))


def paper_style_pruned(seed: int = 0) -> nn.Module:
    """A model pruned as the paper's code does: global L1 unstructured, two rounds."""
    model = net(seed)
    targets = [(model[0], "weight"), (model[3], "weight")]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.2)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.2)
    return model


def test_masks_from_pruned_module_and_from_its_state_dict_agree() -> None:
    model = paper_style_pruned()
    from_module = ma.masks_from_prune(model)
    from_state = ma.masks_from_prune(model.state_dict())
    assert set(from_module) == set(from_state) == {"0.weight", "3.weight"}
    for name in from_module:
        assert from_module[name].dtype == torch.bool
        assert torch.equal(from_module[name], from_state[name])
    # two rounds of 20 % of the remaining: 36 % pruned overall
    assert ma.sparsity(from_module).global_ == pytest.approx(0.36, abs=0.01)


def test_paper_checkpoint_loads_into_a_plain_model_with_the_same_function() -> None:
    pruned = paper_style_pruned()
    checkpoint = copy.deepcopy(pruned.state_dict())
    before = copy.deepcopy(checkpoint)
    plain = net(seed=9)
    plain.load_state_dict(ma.state_dict_from_prune(checkpoint))  # strict: every key matches
    masks = ma.masks_from_prune(checkpoint)
    ma.assert_masked(plain, masks)
    torch.testing.assert_close(plain(x()), pruned(x()), rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in checkpoint.items()), "input state_dict mutated"
    # and it sparse-trains under enforce_masks from there
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    with ma.enforce_masks(plain, masks, opt):
        for _ in range(5):
            opt.zero_grad()
            plain(x()).square().mean().backward()
            opt.step()
    ma.assert_masked(plain, masks)


def test_to_prune_round_trip_and_same_outputs_as_apply_masks() -> None:
    model = net()
    masks = ma.global_magnitude_prune(model, 0.5)
    masked = copy.deepcopy(model)
    ma.apply_masks(masked, masks)
    pruned = ma.to_prune(copy.deepcopy(model), masks)
    assert {"0.weight_orig", "0.weight_mask", "3.weight_orig", "3.weight_mask"} <= set(pruned.state_dict())
    torch.testing.assert_close(pruned(x()), masked(x()), rtol=0, atol=0)
    back = ma.masks_from_prune(pruned)
    assert all(torch.equal(back[n], masks[n]) for n in masks)
    plain = ma.state_dict_from_prune(pruned.state_dict())
    assert all(torch.equal(plain[k], v) for k, v in masked.state_dict().items())


def test_nan_in_pruned_orig_becomes_zero() -> None:
    pruned = paper_style_pruned()
    state = copy.deepcopy(pruned.state_dict())
    mask = state["0.weight_mask"] == 0
    state["0.weight_orig"][mask] = float("nan")
    plain = ma.state_dict_from_prune(state)
    assert bool((plain["0.weight"][mask] == 0).all())
    assert not bool(plain["0.weight"].isnan().any())


def test_unpruned_module_gives_no_masks() -> None:
    assert ma.masks_from_prune(net()) == {}
    assert ma.masks_from_prune(net().state_dict()) == {}


def test_bad_prune_state_dicts_raise() -> None:
    state = paper_style_pruned().state_dict()
    with pytest.raises(MaskError, match=r"'0\.weight_mask' holds values other than 0 and 1"):
        ma.masks_from_prune({**state, "0.weight_mask": state["0.weight_mask"] * 0.5})
    lonely = {k: v for k, v in state.items() if k != "3.weight_orig"}
    with pytest.raises(MaskError, match=r"'3\.weight_mask' has no '3\.weight_orig' partner"):
        ma.masks_from_prune(lonely)
    with pytest.raises(MaskError, match="shape"):
        ma.masks_from_prune({**state, "3.weight_mask": torch.ones(2)})
    with pytest.raises(MaskError, match=r"both plain and prune-form keys for \['0\.weight'\]"):
        ma.state_dict_from_prune({**state, "0.weight": torch.zeros(4, 2, 3, 3)})


def test_to_prune_rejects_bad_masks_and_changes_nothing() -> None:
    model = net()
    keys = set(model.state_dict())
    good = ma.global_magnitude_prune(model, 0.5)
    with pytest.raises(MaskError, match="shape"):
        ma.to_prune(model, {**good, "3.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(MaskError, match="dtype"):
        ma.to_prune(model, {**good, "3.weight": good["3.weight"].float()})
    assert set(model.state_dict()) == keys and ma.masks_from_prune(model) == {}
    pruned = paper_style_pruned()
    with pytest.raises(MaskError, match=r"already pruned with torch.nn.utils.prune"):
        ma.to_prune(pruned, {"0.weight": torch.ones(4, 2, 3, 3, dtype=torch.bool)})


def test_to_prune_rejects_tied_weights() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, t: Tensor) -> Tensor:
            return self.b(self.a(t))

    model = Tied()
    with pytest.raises(MaskError, match="shared as"):
        ma.to_prune(model, {"a.weight": torch.ones(4, 4, dtype=torch.bool)})
