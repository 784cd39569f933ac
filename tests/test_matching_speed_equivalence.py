"""The merge of a float32 batch into the float64 statistics widens the batch's
cross products inside the add instead of copying them to float64 first
(issue 16: one pass over an ``(n, n)`` matrix and one float64 ``(n, n)``
scratch matrix less per update). It gives the bits of the formula it
replaced: ``cross += (outer(da, db) * weight) + float64(batch)``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from maskalign.matching.stats import ActivationStats, _Workspace

STATE = ("mean_a", "mean_b", "m2_a", "m2_b", "cross")


class CopyFirst(ActivationStats):
    """The merge as it was: the batch's cross products copied to float64 whole first."""

    def _merge(self, m: int, mean_a: Tensor, mean_b: Tensor, m2_a: Tensor, m2_b: Tensor, cross: Tensor) -> None:
        super()._merge(m, mean_a, mean_b, m2_a, m2_b, cross.double())


def by_hand(stats: ActivationStats, a: Tensor, b: Tensor, scale_first: bool = False) -> None:
    """A ``(samples, n)`` update written out in full, the old roundings
    (``scale_first``: ``outer(da * weight, db)``, the same value rounded otherwise)."""
    m = a.shape[0]
    mean_a, mean_b = a.mean(0), b.mean(0)
    centred_a, centred_b = a - mean_a, b - mean_b
    cross = (centred_a.T @ centred_b).double()
    total = stats.count + m
    da, db = mean_a.double() - stats.mean_a, mean_b.double() - stats.mean_b
    weight = stats.count * m / total
    stats.m2_a += centred_a.square().sum(0).double() + weight * da**2
    stats.m2_b += centred_b.square().sum(0).double() + weight * db**2
    term = torch.outer(da * weight, db) if scale_first else torch.outer(da, db).mul_(weight)
    stats.cross += term.add_(cross)
    stats.mean_a += da * (m / total)
    stats.mean_b += db * (m / total)
    stats.count = total


def batches(shape: tuple[int, ...]) -> list[tuple[Tensor, Tensor]]:
    """Four float32 batches whose offsets differ per batch (a non-zero merge term)."""
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(shape, generator=generator).relu_() + 3.0 * k,
            torch.randn(shape, generator=generator) - 2.0 * k,
        )
        for k in range(4)
    ]


# (samples, n); (P, n, Q) with units <= positions (batched products) and units > positions (rows)
@pytest.mark.parametrize("shape", [(50, 29), (3, 29, 40), (6, 29, 4)])
def test_widened_merge_gives_the_bits_of_the_float64_copy(shape: tuple[int, ...]) -> None:
    got, expected = ActivationStats(29), CopyFirst(29)
    got._workspace = expected._workspace = _Workspace()  # scratch shared and reused, as in match_activations
    for a, b in batches(shape):
        got.update(a, b)
        expected.update(a, b)
    assert got.count == expected.count
    for name in STATE:
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_widened_merge_gives_the_bits_of_the_update_by_hand() -> None:
    got, expected, control = ActivationStats(29), ActivationStats(29), ActivationStats(29)
    for a, b in batches((50, 29)):
        got.update(a, b)
        by_hand(expected, a, b)
        by_hand(control, a, b, scale_first=True)
    for name in STATE:
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    # negative control: the comparison tells roundings apart (the same value, rounded in another order)
    assert torch.allclose(control.cross, expected.cross, rtol=1e-12, atol=0)
    assert not torch.equal(control.cross, expected.cross)


def test_widened_merge_makes_no_float64_copy() -> None:
    """The ``(n, n)`` scratch of a float32 update: the cross products (float32)
    and the merge term (float64), no float64 copy of the cross products."""
    n = 32
    stats = ActivationStats(n)
    stats._workspace = _Workspace()
    for a, b in batches((40, n)):
        stats.update(a, b)
    buffers = {(role, dtype): t.numel() for (role, dtype, _), t in stats._workspace._buffers.items()}
    assert buffers == {("centred_a", torch.float32): 40 * n, ("centred_b", torch.float32): 40 * n,
                       ("cross", torch.float32): n * n, ("outer", torch.float64): n * n}  # fmt: skip
    assert stats._workspace.nbytes(square_only=True) == 12 * n * n
