"""Tests for maskalign.sparse.masks: validation, global magnitude pruning (IMP),
random masks, sparsity reports and apply_masks."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from maskalign.errors import MaskError
from maskalign.sparse.masks import (
    SparsityReport,
    apply_masks,
    default_prunable,
    global_magnitude_prune,
    random_masks_like,
    sparsity,
    validate_masks,
)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.c1 = nn.Conv1d(3, 4, 3)
        self.c2 = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.c3 = nn.Conv3d(1, 2, 2, bias=False)
        self.up = nn.ConvTranspose2d(3, 2, 2)
        self.head = nn.Linear(4, 2)
        self.tied = nn.Linear(4, 2)
        self.tied.weight = self.head.weight


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def total_prunable(model: nn.Module) -> int:
    named = dict(model.named_parameters())
    return sum(named[n].numel() for n in default_prunable(model))


# --- default_prunable


def test_default_prunable_mlp() -> None:
    assert default_prunable(mlp()) == ["0.weight", "3.weight", "5.weight"]


def test_default_prunable_skips_bias_norm_embedding_transposed_and_dedups_tied() -> None:
    names = default_prunable(ConvNet())
    assert names == ["c1.weight", "c2.weight", "c3.weight", "head.weight"]


# --- validate_masks


def test_validate_masks_accepts_good_masks_silently() -> None:
    model = mlp()
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_masks(model, masks)
        validate_masks(model, {})


def test_validate_masks_unknown_key_suggests_close_names() -> None:
    model = mlp()
    with pytest.raises(MaskError, match=r"'0\.weigth'.*not a parameter.*'0\.weight'"):
        validate_masks(model, {"0.weigth": torch.ones(8, 6, dtype=torch.bool)})


def test_validate_masks_unknown_key_without_close_names() -> None:
    with pytest.raises(MaskError, match=r"'zzz' is not a parameter of the model\.\nSee https://"):
        validate_masks(mlp(), {"zzz": torch.ones(1, dtype=torch.bool)})


def test_validate_masks_shape_mismatch_gives_both_shapes() -> None:
    with pytest.raises(MaskError, match=r"'3\.weight'.*\(8, 5\).*\(5, 8\)"):
        validate_masks(mlp(), {"3.weight": torch.ones(8, 5, dtype=torch.bool)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_validate_masks_non_bool_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(MaskError, match=r"'0\.bias'.*mask\.bool\(\).*mask != 0"):
        validate_masks(mlp(), {"0.bias": torch.ones(8, dtype=dtype)})


def test_validate_masks_non_tensor() -> None:
    with pytest.raises(MaskError, match=r"'0\.bias'.*list"):
        validate_masks(mlp(), {"0.bias": [True] * 8})  # type: ignore[dict-item]


def test_validate_masks_warns_when_a_layer_is_fully_pruned() -> None:
    with pytest.warns(UserWarning, match=r"'5\.weight'.*every entry"):
        validate_masks(mlp(), {"5.weight": torch.zeros(3, 5, dtype=torch.bool)})


def test_mask_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_masks(mlp(), {"nope": torch.ones(1, dtype=torch.bool)})


# --- global_magnitude_prune


@settings(max_examples=40, deadline=None)
@given(s=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_prune_exact_count_and_smallest_magnitudes(s: float, seed: int) -> None:
    model = mlp(seed)
    masks = global_magnitude_prune(model, s)
    total = total_prunable(model)
    assert list(masks) == default_prunable(model)
    assert sum(int((~m).sum()) for m in masks.values()) == round(s * total)
    named = dict(model.named_parameters())
    pruned = torch.cat([named[n].detach().abs()[~m] for n, m in masks.items()])
    kept = torch.cat([named[n].detach().abs()[m] for n, m in masks.items()])
    if pruned.numel() and kept.numel():
        assert pruned.max() <= kept.min()
    for n, m in masks.items():
        assert m.dtype == torch.bool and m.shape == named[n].shape


def test_imp_cumulative_rounds_prune_20_percent_of_remaining() -> None:
    model = mlp(1)
    total = total_prunable(model)
    masks: dict[str, Tensor] | None = None
    previous_pruned = 0
    for r in range(1, 9):
        # Perturb the weights between rounds, as training would.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        new = global_magnitude_prune(model, 1 - 0.8**r, masks=masks)
        n_pruned = sum(int((~m).sum()) for m in new.values())
        assert n_pruned == round((1 - 0.8**r) * total)
        assert n_pruned - previous_pruned == pytest.approx(0.2 * (total - previous_pruned), abs=1)
        if masks is not None:
            for n in masks:  # pruned entries stay pruned
                assert not bool((new[n] & ~masks[n]).any())
        masks, previous_pruned = new, n_pruned
        apply_masks(model, masks)


def test_already_pruned_entries_ignore_their_weight_value() -> None:
    # A pruned entry with a huge weight stays pruned and counts towards sparsity.
    model = mlp(2)
    masks = global_magnitude_prune(model, 0.3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p[~masks[n]] = 1e6
    new = global_magnitude_prune(model, 0.5, masks=masks)
    total = total_prunable(model)
    assert sum(int((~m).sum()) for m in new.values()) == round(0.5 * total)
    for n in masks:
        assert not bool((new[n] & ~masks[n]).any())


def test_same_sparsity_as_masks_returns_equal_copies() -> None:
    model = mlp()
    masks = global_magnitude_prune(model, 0.4)
    again = global_magnitude_prune(model, 0.4, masks=masks)
    for n in masks:
        assert torch.equal(again[n], masks[n])
        assert again[n] is not masks[n]


def test_ties_broken_by_flat_index_deterministically() -> None:
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-0.5)
    names = default_prunable(model)
    total = total_prunable(model)
    k = round(0.45 * total)
    masks = global_magnitude_prune(model, 0.45)
    flat = torch.cat([masks[n].reshape(-1) for n in names])
    expected = torch.ones(total, dtype=torch.bool)
    expected[:k] = False
    assert torch.equal(flat, expected)
    for _ in range(3):
        again = global_magnitude_prune(model, 0.45)
        assert all(torch.equal(again[n], masks[n]) for n in names)


def test_partial_ties_follow_params_order() -> None:
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    # Reversing params reverses which layer's tied entries are pruned first.
    params = ["5.weight", "3.weight"]
    masks = global_magnitude_prune(model, 0.5, params=params)  # 15 + 40 entries
    assert not bool(masks["5.weight"].any())
    assert int((~masks["3.weight"]).sum()) == round(0.5 * 55) - 15
    assert not bool(masks["3.weight"].reshape(-1)[:13].any())
    assert bool(masks["3.weight"].reshape(-1)[13:].all())


def test_params_subset_and_nondefault_params() -> None:
    model = mlp()
    masks = global_magnitude_prune(model, 0.5, params=["0.weight", "0.bias"])
    assert list(masks) == ["0.weight", "0.bias"]
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * 56)


def test_prune_conv_net() -> None:
    model = ConvNet()
    masks = global_magnitude_prune(model, 0.7)
    assert list(masks) == default_prunable(model)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.7 * total_prunable(model))


def test_prune_does_not_mutate_model_or_masks() -> None:
    model = mlp(3)
    masks = global_magnitude_prune(model, 0.3)
    masks_before = {n: m.clone() for n, m in masks.items()}
    before = snapshot(model)
    new = global_magnitude_prune(model, 0.6, masks=masks)
    assert_same_state(model, before)
    for n in masks:
        assert torch.equal(masks[n], masks_before[n])
        assert new[n].data_ptr() != masks[n].data_ptr()


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_prune_rejects_sparsity_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match=r"Argument 'sparsity' is .*; pass a fraction in \[0, 1\)"):
        global_magnitude_prune(mlp(), bad)


def test_prune_rejects_sparsity_below_existing() -> None:
    model = mlp()
    masks = global_magnitude_prune(model, 0.5)
    with pytest.raises(MaskError, match="already prune"):
        global_magnitude_prune(model, 0.3, masks=masks)


def test_prune_rejects_unknown_or_repeated_params() -> None:
    model = mlp()
    with pytest.raises(MaskError, match=r"'0\.wieght'.*'0\.weight'"):
        global_magnitude_prune(model, 0.5, params=["0.wieght"])
    with pytest.raises(MaskError, match=r"'0\.weight'.*more than once"):
        global_magnitude_prune(model, 0.5, params=["0.weight", "3.weight", "0.weight"])
    with pytest.raises(ValueError, match="'params' is empty"):
        global_magnitude_prune(model, 0.5, params=[])


def test_prune_rejects_masks_outside_params() -> None:
    model = mlp()
    masks = {"0.bias": torch.ones(8, dtype=torch.bool)}
    with pytest.raises(MaskError, match=r"'0\.bias'"):
        global_magnitude_prune(model, 0.5, masks=masks)


def test_prune_validates_masks() -> None:
    model = mlp()
    with pytest.raises(MaskError, match=r"'0\.weight'.*mask\.bool\(\)"):
        global_magnitude_prune(model, 0.5, masks={"0.weight": torch.ones(8, 6)})


def test_prune_rejects_nan_kept_weights_but_not_pruned_ones() -> None:
    model = mlp()
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'3\.weight'.*NaN"):
        global_magnitude_prune(model, 0.5)
    mask = torch.ones(5, 8, dtype=torch.bool)
    mask[0, 0] = False
    masks = global_magnitude_prune(model, 0.5, masks={"3.weight": mask})
    assert not bool(masks["3.weight"][0, 0])


# --- random_masks_like


@settings(max_examples=25, deadline=None)
@given(s=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_random_masks_like_keeps_per_layer_counts(s: float, seed: int) -> None:
    model = mlp(seed)
    masks = global_magnitude_prune(model, s)
    before = {n: m.clone() for n, m in masks.items()}
    rand = random_masks_like(masks, generator=torch.Generator().manual_seed(seed))
    assert rand.keys() == masks.keys()
    for n, m in masks.items():
        assert rand[n].dtype == torch.bool and rand[n].shape == m.shape
        assert rand[n].device == m.device
        assert int(rand[n].sum()) == int(m.sum())
        assert torch.equal(m, before[n])
    assert sparsity(rand).per_layer == sparsity(masks).per_layer


def test_random_masks_like_is_reproducible_and_random() -> None:
    masks = global_magnitude_prune(mlp(), 0.5)
    a = random_masks_like(masks, generator=torch.Generator().manual_seed(0))
    b = random_masks_like(masks, generator=torch.Generator().manual_seed(0))
    c = random_masks_like(masks, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[n], b[n]) for n in masks)
    assert not all(torch.equal(a[n], c[n]) for n in masks)
    assert random_masks_like(masks).keys() == masks.keys()


def test_random_masks_like_rejects_non_bool() -> None:
    with pytest.raises(MaskError, match=r"'w'.*mask\.bool\(\)"):
        random_masks_like({"w": torch.ones(3)})


# --- sparsity


def test_sparsity_of_masks() -> None:
    masks = {
        "a": torch.tensor([True, False, False, True]),
        "b": torch.zeros(2, 3, dtype=torch.bool),
        "empty": torch.zeros(0, dtype=torch.bool),
    }
    rep = sparsity(masks)
    assert isinstance(rep, SparsityReport)
    assert rep.per_layer == {"a": 0.5, "b": 1.0, "empty": 0.0}
    assert rep.pruned == {"a": 2, "b": 6, "empty": 0}
    assert rep.numel == {"a": 4, "b": 6, "empty": 0}
    assert rep.global_ == pytest.approx(0.8)
    assert sparsity({}).global_ == 0.0


def test_sparsity_of_model_with_and_without_masks() -> None:
    model = mlp()
    assert sparsity(model).global_ == 0.0
    masks = global_magnitude_prune(model, 0.6)
    apply_masks(model, masks)
    rep = sparsity(model)
    assert list(rep.per_layer) == default_prunable(model)
    assert rep.global_ == pytest.approx(sparsity(masks).global_)
    with torch.no_grad():
        model[0].bias.zero_()
    rep_bias = sparsity(model, {"0.bias": torch.ones(8, dtype=torch.bool)})
    assert rep_bias.per_layer == {"0.bias": 1.0}


def test_sparsity_errors() -> None:
    with pytest.raises(TypeError):
        sparsity({"a": torch.ones(2, dtype=torch.bool)}, masks={})
    with pytest.raises(MaskError, match="'a'"):
        sparsity({"a": torch.ones(2)})
    with pytest.raises(MaskError, match="'nope'"):
        sparsity(mlp(), {"nope": torch.ones(1, dtype=torch.bool)})


def test_sparsity_str_is_a_table() -> None:
    text = str(sparsity({"layer.weight": torch.tensor([True, False, False, False])}))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "numel", "pruned", "sparsity"]
    assert lines[2].split() == ["layer.weight", "4", "3", "75.00%"]
    assert lines[-1].split() == ["total", "4", "3", "75.00%"]


def test_float_of_a_sparsity_report_is_the_global_sparsity() -> None:
    masks = {"a": torch.tensor([True, False, False, True]), "b": torch.zeros(2, 3, dtype=torch.bool)}
    rep = sparsity(masks)
    assert isinstance(float(rep), float)
    assert float(rep) == rep.global_ == pytest.approx(0.8)
    assert float(sparsity({})) == 0.0
    assert float(sparsity({"a": torch.ones(3, dtype=torch.bool)})) == 0.0
    model = mlp()
    pruned = global_magnitude_prune(model, 0.6)
    apply_masks(model, pruned)
    assert float(sparsity(model)) == sparsity(model).global_ == pytest.approx(float(sparsity(pruned)))
    assert 0.5 < float(sparsity(model)) < 0.7
    assert f"{float(rep):.0%}" == "80%"


# --- apply_masks


def test_apply_masks_zeros_pruned_entries_in_place_even_nan() -> None:
    model = mlp()
    masks = global_magnitude_prune(model, 0.5)
    masks_before = {n: m.clone() for n, m in masks.items()}
    with torch.no_grad():
        model[0].weight[~masks["0.weight"]] = float("nan")
    before = snapshot(model)
    weight = model[0].weight
    apply_masks(model, masks)
    assert model[0].weight is weight
    named = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.equal(named[n].detach()[~m], torch.zeros(int((~m).sum())))
        assert torch.equal(named[n].detach()[m], before[n][m])
        assert torch.equal(m, masks_before[n])


def test_apply_masks_validates_before_mutating() -> None:
    model = mlp()
    before = snapshot(model)
    masks = {
        "0.weight": torch.zeros(8, 6, dtype=torch.bool),
        "3.weight": torch.zeros(8, 5, dtype=torch.bool),
    }
    with pytest.raises(MaskError, match=r"'3\.weight'"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_masks(model, masks)
    assert_same_state(model, before)
