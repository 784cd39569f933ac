"""Models in ``channels_last`` (what ``maskalign reproduce`` uses for image
data, and what ImageNet training uses on CUDA): tracing, activation
matching, permuting, masks and mask enforcement give the same answers as
for the contiguous model, on a ResNet20 with non-trivial weights and
BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, relative_error

import maskalign as ma
from maskalign.models import ResNet20

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest.py)


def _pair(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same randomised ResNet20 (width 1, 3 input channels) twice: contiguous and ``channels_last``."""
    model = randomize(ResNet20(width=1, num_classes=10), seed=seed).double()
    last = randomize(ResNet20(width=1, num_classes=10), seed=seed).double()
    return model, last.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 3, 32, 32, generator=g, dtype=torch.float64), torch.zeros(16)) for _ in range(n)]


def test_the_layout_is_really_channels_last() -> None:
    _, last = _pair(0)
    weight = last.layer2[0].conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


@pytest.mark.slow  # two specs and two matchings of a float64 ResNet20
def test_spec_matching_and_permutation_agree_with_the_contiguous_model() -> None:
    a, a_last = _pair(1)
    b, b_last = _pair(2)
    x = _data(1)[0][0]
    spec, spec_last = ma.build_spec(a, x[:2]), ma.build_spec(a_last, x[:2])
    assert spec.groups == spec_last.groups
    perm = ma.match_activations(a, b, _data(), spec, progress=False)
    perm_last = ma.match_activations(a_last, b_last, _data(), spec_last, progress=False)
    assert perm.keys() == perm_last.keys()
    assert all(torch.equal(perm[g], perm_last[g]) for g in perm)
    permuted = ma.apply_permutation(a_last, perm_last)
    with torch.no_grad():
        for train in (False, True):
            a_last.train(train)
            permuted.train(train)
            assert relative_error(permuted(x), a_last(x)) < 1e-10
        a_last.eval()
        wrong = ma.apply_permutation(a_last, perm_last).eval()
        wrong.layer2[1].conv1.weight.copy_(wrong.layer2[1].conv1.weight.roll(1, 0))  # a wrong permutation
        assert relative_error(wrong(x), a_last(x)) > 1e-3


@pytest.mark.slow  # a spec and three SGD steps of a float64 ResNet20
def test_masks_permute_and_stay_enforced_in_channels_last() -> None:
    a, a_last = _pair(3)
    masks = ma.global_magnitude_prune(a, 0.8)
    masks_last = ma.global_magnitude_prune(a_last, 0.8)
    assert masks.keys() == masks_last.keys() and all(torch.equal(masks[k], masks_last[k]) for k in masks)
    spec = ma.build_spec(a_last, _data(1)[0][0][:2])
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(4))
    moved = ma.permute_mask(masks_last, perm, spec=spec)
    with torch.no_grad():
        for name, param in a_last.named_parameters():
            if name in masks_last:
                param.mul_(masks_last[name])  # A pruned: its nonzeros are exactly its mask
    permuted = ma.apply_permutation(a_last, perm)
    for name, param in permuted.named_parameters():
        if name in moved:  # pi(w * m) == pi(w) * pi(m): the permuted mask is where pi(A) is nonzero
            assert torch.equal(moved[name], param != 0), name
    assert any(not torch.equal(moved[k], masks_last[k]) for k in moved)  # the permutation moved something
    optimizer = torch.optim.SGD(a_last.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, _ = _data(1)[0]
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(5))
    with ma.enforce_masks(a_last, masks_last, optimizer):
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(a_last(x), y).backward()
            optimizer.step()
    for name, param in a_last.named_parameters():
        if name in masks_last:
            assert not param[~masks_last[name]].any(), name  # no leak into pruned weights
            assert param.is_contiguous(memory_format=torch.channels_last) or param.dim() != 4
