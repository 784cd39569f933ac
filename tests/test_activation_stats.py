"""ActivationStats, the streaming statistics of activation matching: shaped
like a torchmetrics Metric (update / merge / reset / sync / compute).

References are written here from the raw tensors with plain torch (samples
flattened to rows, means, centred products), never with the code under test.
The distributed tests run 2 gloo processes on CPU, including a rank whose
data yields no batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import make_inputs, make_model, run_workers, spec_for
from torch import Tensor

import maskalign as ma
from maskalign.errors import ArgumentTypeError, ArgumentValueError, DataError
from maskalign.matching import activation
from maskalign.matching.activation import ActivationStats
from maskalign.matching.stats import ActivationStats as StatsModuleActivationStats

COSTS = ("correlation", "covariance", "euclidean")


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def paired(samples: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Correlated ``(samples, n)`` activations with offsets far from 0."""
    a = randn(samples, n, seed=seed) * 2 + 50
    b = a.flip(1) + 0.3 * randn(samples, n, seed=seed + 1)
    return a, b


def reference(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Means, centred sums and the three similarities of ``(samples, n)``
    rows, by hand in float64."""
    a, b = a.double(), b.double()
    m = a.shape[0]
    mean_a, mean_b = a.sum(0) / m, b.sum(0) / m
    da, db = a - mean_a, b - mean_b
    cross = da.T @ db
    m2_a, m2_b = (da * da).sum(0), (db * db).sum(0)
    sd_a, sd_b = (m2_a / m).sqrt(), (m2_b / m).sqrt()
    distance = torch.stack([((a[:, i, None] - b) ** 2).sum(0) / m for i in range(a.shape[1])])
    return {
        "count": torch.tensor(m),
        "mean_a": mean_a,
        "mean_b": mean_b,
        "m2_a": m2_a,
        "m2_b": m2_b,
        "cross": cross,
        "covariance": cross / m,
        "correlation": cross / m / (sd_a[:, None] * sd_b[None, :]),
        "euclidean": -distance,
    }


def assert_close(got: Tensor, expected: Tensor, rtol: float = 1e-11) -> None:
    scale = max(float(expected.abs().max()), 1e-300)
    assert float((got.double() - expected.double()).abs().max()) <= rtol * scale


def assert_state(stats: ActivationStats, expected: dict[str, Tensor], rtol: float = 1e-11) -> None:
    assert stats.count == int(expected["count"])
    for name in ("mean_a", "mean_b", "m2_a", "m2_b", "cross"):
        assert_close(getattr(stats, name), expected[name], rtol)
    for cost in COSTS:
        assert_close(stats.compute(cost), expected[cost], rtol)


def test_activation_stats_is_importable_from_activation() -> None:
    assert ActivationStats is StatsModuleActivationStats
    assert "ActivationStats" in activation.__all__


# ------------------------------------------------------------- update / merge
def test_updates_over_batches_equal_one_update_over_their_concatenation() -> None:
    a, b = paired(230, 7, seed=1)
    chunked, whole = ActivationStats(7), ActivationStats(7)
    for start in (0, 13, 100, 101, 170):  # uneven chunks, one of a single sample
        stop = {0: 13, 13: 100, 100: 101, 101: 170, 170: 230}[start]
        chunked.update(a[start:stop], b[start:stop])
    whole.update(a, b)
    assert chunked.count == whole.count == 230
    for name in ("mean_a", "mean_b", "m2_a", "m2_b", "cross"):
        assert_close(getattr(chunked, name), getattr(whole, name))
    for cost in COSTS:
        assert_close(chunked.compute(cost), whole.compute(cost))
    assert_state(chunked, reference(a, b))


def test_3d_updates_over_batches_equal_one_update_over_their_concatenation() -> None:
    a, b = randn(12, 5, 9, seed=2) + 3, randn(12, 5, 9, seed=3) - 1
    chunked, whole = ActivationStats(5), ActivationStats(5)
    for start in range(0, 12, 4):
        chunked.update(a[start : start + 4], b[start : start + 4])
    whole.update(a, b)
    for cost in COSTS:
        assert_close(chunked.compute(cost), whole.compute(cost))


def test_merge_of_two_halves_equals_the_whole() -> None:
    a, b = paired(300, 6, seed=4)
    first, second, whole = ActivationStats(6), ActivationStats(6), ActivationStats(6)
    first.update(a[:120], b[:120])
    second.update(a[120:200], b[120:200])
    second.update(a[200:], b[200:])
    whole.update(a, b)
    before = {name: getattr(second, name).clone() for name in ("mean_a", "m2_a", "cross")}
    assert first.merge(second) is first
    assert first.count == 300
    for name in ("mean_a", "mean_b", "m2_a", "m2_b", "cross"):
        assert_close(getattr(first, name), getattr(whole, name))
    assert_state(first, reference(a, b))
    assert second.count == 180 and all(torch.equal(getattr(second, k), v) for k, v in before.items())


def test_merge_with_empty_statistics_on_either_side() -> None:
    a, b = paired(40, 3, seed=5)
    full = ActivationStats(3)
    full.update(a, b)
    assert_state(full.merge(ActivationStats(3)), reference(a, b))
    assert_state(ActivationStats(3).merge(full), reference(a, b))
    assert ActivationStats(3).merge(ActivationStats(3)).count == 0


def test_reset_returns_to_the_empty_state() -> None:
    a, b = paired(50, 4, seed=6)
    stats = ActivationStats(4)
    stats.update(a, b)
    stats.reset()
    empty = ActivationStats(4)
    assert stats.count == 0 and stats.n == 4
    for name in ("mean_a", "mean_b", "m2_a", "m2_b", "cross"):
        assert torch.equal(getattr(stats, name), getattr(empty, name))
    with pytest.raises(DataError, match="ActivationStats has no samples"):
        stats.compute()
    c, d = paired(30, 4, seed=7)
    stats.update(c, d)  # starts over: nothing of the first batch is left
    assert_state(stats, reference(c, d))


# ------------------------------------------------------- the 3-D update branch
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((6, 4, 10), id="units<=positions"),  # batched products
        pytest.param((5, 12, 3), id="units>positions"),  # centred (n, P*Q) rows
        pytest.param((7, 5, 1), id="Q=1"),
        pytest.param((1, 5, 8), id="P=1"),
    ],
)
def test_3d_update_matches_a_direct_computation(shape: tuple[int, int, int]) -> None:
    """``(P, n, Q)``: units on dim 1, samples on dims 0 and 2 (P * Q of them)."""
    p, n, q = shape
    a = randn(*shape, seed=8) * 3 + 20
    b = 0.5 * a.roll(1, dims=1) + randn(*shape, seed=9)
    stats = ActivationStats(n)
    stats.update(a, b)
    rows_a = a.permute(0, 2, 1).reshape(p * q, n)  # sample (i, k) -> row i * Q + k
    rows_b = b.permute(0, 2, 1).reshape(p * q, n)
    assert_state(stats, reference(rows_a, rows_b))


def test_3d_update_in_float32_is_accumulated_in_float64() -> None:
    a = randn(4, 6, 16, seed=10, dtype=torch.float32) + 2
    b = randn(4, 6, 16, seed=11, dtype=torch.float32) * 0.5 + a
    stats = ActivationStats(6)
    stats.update(a, b)
    assert stats.cross.dtype == torch.float64
    rows_a, rows_b = (x.permute(0, 2, 1).reshape(-1, 6) for x in (a, b))
    assert_state(stats, reference(rows_a, rows_b), rtol=1e-5)


def test_constant_unit_has_zero_correlation() -> None:
    a = randn(4, 3, 5, seed=12)
    a[:, 1] = 7.0
    stats = ActivationStats(3)
    stats.update(a, a)
    corr = stats.compute()
    assert torch.equal(corr[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(corr[:, 1], torch.zeros(3, dtype=torch.float64))
    assert stats.similarity() is not corr and torch.equal(stats.similarity(), corr)  # the earlier name


# ------------------------------------------------------------------- misuse
def test_merge_of_different_sizes_names_the_sizes() -> None:
    stats, other = ActivationStats(4), ActivationStats(5)
    other.update(*paired(10, 5, seed=13))
    with pytest.raises(ArgumentValueError, match=r"Argument 'other' of ActivationStats\.merge has 5 units") as info:
        stats.merge(other)
    assert "these statistics have 4" in str(info.value) and "troubleshooting" in str(info.value)
    assert stats.count == 0
    with pytest.raises(ArgumentTypeError, match=r"Argument 'other' of ActivationStats\.merge is a tensor of shape"):
        stats.merge(torch.zeros(4))  # type: ignore[arg-type]


def test_compute_before_any_update_names_the_culprit() -> None:
    with pytest.raises(DataError, match=r"ActivationStats has no samples; call update\(a, b\)") as info:
        ActivationStats(3).compute("covariance")
    assert info.value.message.startswith("ActivationStats")
    assert "troubleshooting/#dataerror" in str(info.value)


def test_update_of_a_wrong_shape_names_the_argument() -> None:
    stats = ActivationStats(4)
    with pytest.raises(ArgumentValueError, match=r"Argument 'a' of ActivationStats\.update has shape \(10, 3\)"):
        stats.update(torch.zeros(10, 3), torch.zeros(10, 3))
    with pytest.raises(ArgumentValueError, match=r"Argument 'a' .* has shape \(10,\)"):
        stats.update(torch.zeros(10), torch.zeros(10))
    with pytest.raises(ArgumentValueError, match=r"Argument 'b' .* has shape \(9, 4\) but 'a' has \(10, 4\)"):
        stats.update(torch.zeros(10, 4), torch.zeros(9, 4))
    with pytest.raises(ArgumentTypeError, match=r"Argument 'b' of ActivationStats\.update is a list"):
        stats.update(torch.zeros(10, 4), [[0.0] * 4] * 10)  # type: ignore[arg-type]
    with pytest.raises(ArgumentValueError, match="Argument 'n'"):
        ActivationStats(0)
    assert stats.count == 0


def test_sync_without_a_process_group_is_a_no_op() -> None:
    a, b = paired(20, 3, seed=14)
    stats = ActivationStats(3)
    stats.update(a, b)
    stats.sync()
    assert_state(stats, reference(a, b))


# -------------------------------------------------------------- distributed
WORLD = 2


def _mlp_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return make_model("mlp", seed=81), make_model("mlp", seed=82)


def _mlp_batches() -> list[Tensor]:
    return [make_inputs(16, seed=600 + i) for i in range(3)]


def _outcome(fn) -> object:  # type: ignore[no-untyped-def]
    """``fn()``'s permutation as ``{group: list}``, or ``("DataError", message)``."""
    try:
        pi = fn()
    except DataError as error:
        return ("DataError", error.message)
    return {g: pi[g].tolist() for g in pi}


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, object] = {}
        # the statistics themselves: rank 0 holds 70 samples, rank 1 none, then 30
        a, b = paired(100, 5, seed=15)
        stats = ActivationStats(5)
        if rank == 0:
            stats.update(a[:70], b[:70])
        stats.sync()
        results["stats_one_empty"] = (stats.count, stats.compute("correlation"), stats.cross)
        stats = ActivationStats(5)
        stats.update(*((a[:70], b[:70]) if rank == 0 else (a[70:], b[70:])))
        stats.sync()
        results["stats_split"] = (stats.count, stats.compute("correlation"), stats.cross)
        # match_activations: rank 1's data yields no batch
        model_a, model_b = _mlp_pair()
        spec = spec_for("mlp")
        shard = _mlp_batches() if rank == 0 else []
        results["empty_rank_with_spec"] = _outcome(
            lambda: ma.match_activations(model_a, model_b, shard, spec, progress=False)
        )
        results["empty_rank_without_spec"] = _outcome(
            lambda: ma.match_activations(model_a, model_b, iter(shard), progress=False)
        )
        results["no_rank_has_batches"] = _outcome(
            lambda: ma.match_activations(model_a, model_b, [], spec, progress=False)
        )
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_rank_without_batches_takes_part_instead_of_hanging(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = spec_for("mlp")  # built before the fork: both workers share it
    single = _outcome(lambda: ma.match_activations(*_mlp_pair(), _mlp_batches(), spec, progress=False))
    out = str(tmp_path / "results")
    run_workers(_worker, (str(tmp_path / "init"), out), WORLD, timeout=90.0)  # a hang fails here
    results = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD)]
    a, b = paired(100, 5, seed=15)
    expected = reference(a, b)
    for got in results:
        count, corr, cross = got["stats_one_empty"]
        head = reference(a[:70], b[:70])
        assert count == 70
        assert_close(corr, head["correlation"])
        assert_close(cross, head["cross"])
        count, corr, cross = got["stats_split"]
        assert count == 100
        assert_close(corr, expected["correlation"])
        assert_close(cross, expected["cross"])
        # every rank returns the permutation of one process on all batches
        assert got["empty_rank_with_spec"] == single
        # every rank raises the same typed error, naming the rank without batches
        kind, message = got["empty_rank_without_spec"]
        assert kind == "DataError" and message.startswith("Argument 'data' yielded no batches on rank 1 ")
        assert "pass spec=" in message
        kind, message = got["no_rank_has_batches"]
        assert kind == "DataError" and "no batches on any of the 2 ranks" in message
    assert results[0]["empty_rank_without_spec"] == results[1]["empty_rank_without_spec"]
    assert results[0]["no_rank_has_batches"] == results[1]["no_rank_has_batches"]
    assert isinstance(single, dict) and any(v != sorted(v) for v in single.values())  # not the identity
