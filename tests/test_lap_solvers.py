"""solve_lap's two solvers (scipy and lapx's LAPJV) give identical results.

"Identical" means: the same objective ``sum_j m[idx[j], j]`` always, and the
same assignment whenever the optimum is unique (random continuous matrices:
with probability 1). Tied matrices (integer entries, equal rows, symmetric)
may have several optima; there only the objective must agree for
``solver="lapjv"``, and ``solver="auto"`` must give scipy's own answer.

The reference is ``scipy.optimize.linear_sum_assignment`` called here, not
through the code under test.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from maskalign.errors import ArgumentTypeError, ArgumentValueError
from maskalign.matching import lap as mlap
from maskalign.matching.lap import solve_lap

SIZES = (1, 2, 3, 5, 8, 17, 64, 65, 128, 300)


def has_lapx() -> bool:
    try:
        import lap
    except ImportError:
        return False
    return hasattr(lap, "lapjv")


needs_lapx = pytest.mark.skipif(not has_lapx(), reason="lapx is not installed (pip install lapx)")


def reference(matrix: np.ndarray) -> np.ndarray:
    """scipy's maximising assignment as ``idx`` (``idx[j]`` = row matched to column j)."""
    rows, cols = linear_sum_assignment(np.asarray(matrix, dtype=np.float64), maximize=True)
    idx = np.empty(len(cols), dtype=np.int64)
    idx[cols] = rows
    return idx


def objective(matrix: np.ndarray, idx: np.ndarray) -> float:
    """Exactly rounded ``sum_j matrix[idx[j], j]`` (math.fsum)."""
    values = np.asarray(matrix, dtype=np.float64)[np.asarray(idx), np.arange(len(idx))]
    return math.fsum(values.tolist())


def correlation(n: int, signal: float, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((2 * n + 2, n))
    b = a[:, rng.permutation(n)] * signal + rng.standard_normal(a.shape)
    a = (a - a.mean(0)) / a.std(0)
    b = (b - b.mean(0)) / b.std(0)
    return a.T @ b / a.shape[0]


def family(kind: str, n: int, seed: int) -> np.ndarray:
    """Continuous matrices whose optimum is unique with probability 1."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((n, n))
    if kind == "uniform":
        return rng.random((n, n))
    if kind == "correlation":  # a planted matching, like activation matching of related models
        return correlation(n, 0.6, rng)
    if kind == "noise-correlation":  # no matching planted
        return correlation(n, 0.0, rng)
    if kind == "low-rank":
        r = max(1, n // 10)
        return rng.standard_normal((n, r)) @ rng.standard_normal((r, n)) + 1e-3 * rng.standard_normal((n, n))
    if kind == "planted":  # a clear permutation plus small noise
        m = 0.1 * rng.standard_normal((n, n))
        m[rng.permutation(n), np.arange(n)] += 1.0
        return m
    if kind == "float32":
        return correlation(n, 0.6, rng).astype(np.float32)
    if kind == "negative":
        return -np.abs(rng.standard_normal((n, n))) - 1e3
    raise AssertionError(kind)


KINDS = ("gaussian", "uniform", "correlation", "noise-correlation", "low-rank", "planted", "float32", "negative")


@needs_lapx
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_lapjv_and_auto_equal_scipy_on_continuous_matrices(kind: str, n: int) -> None:
    matrix = family(kind, n, seed=1000 * n + KINDS.index(kind))
    expected = reference(matrix)
    for solver in ("lapjv", "auto", "scipy"):
        got = solve_lap(matrix, solver=solver)
        assert got.dtype == torch.int64 and got.shape == (n,)
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=f"{kind} n={n} solver={solver}")


@needs_lapx
@pytest.mark.parametrize("seed", range(20))
def test_lapjv_equals_scipy_on_many_random_correlations(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 200))
    matrix = correlation(n, float(rng.uniform(0.0, 1.0)), rng)
    np.testing.assert_array_equal(solve_lap(matrix, solver="lapjv").numpy(), reference(matrix))


@needs_lapx
def test_torch_inputs_float32_and_float64() -> None:
    matrix = family("correlation", 96, seed=3)
    expected = reference(matrix.astype(np.float32))  # the float32 values, solved in float64
    for tensor in (torch.from_numpy(matrix).float(), torch.from_numpy(matrix.astype(np.float32)).double()):
        for solver in ("lapjv", "auto"):
            np.testing.assert_array_equal(solve_lap(tensor, solver=solver).numpy(), expected)


def tied(kind: str, n: int, seed: int) -> np.ndarray:
    """Matrices with several optimal assignments (or likely so)."""
    rng = np.random.default_rng(seed)
    if kind == "integers":
        return rng.integers(0, 4, size=(n, n)).astype(np.float64)
    if kind == "binary":
        return (rng.random((n, n)) < 0.3).astype(np.float64)
    if kind == "constant":
        return np.full((n, n), 0.25)
    if kind == "zeros":
        return np.zeros((n, n))
    if kind == "quantised":
        return np.round(rng.standard_normal((n, n)), 1)
    if kind == "equal-rows":  # dead units: several all-zero rows, the rest continuous
        m = correlation(n, 0.6, rng)
        m[rng.choice(n, size=max(2, n // 8), replace=False)] = 0.0
        return m
    if kind == "equal-columns":
        m = correlation(n, 0.6, rng)
        m[:, 1] = m[:, 0]
        return m
    if kind == "symmetric":
        g = rng.standard_normal((n, n))
        return g + g.T
    raise AssertionError(kind)


TIED = ("integers", "binary", "constant", "zeros", "quantised", "equal-rows", "equal-columns", "symmetric")


@needs_lapx
@pytest.mark.parametrize("kind", TIED)
@pytest.mark.parametrize("n", (2, 3, 16, 64, 100, 257))
def test_ties_same_objective_and_auto_gives_scipys_optimum(kind: str, n: int) -> None:
    matrix = tied(kind, n, seed=n)
    expected = reference(matrix)
    got = solve_lap(matrix, solver="lapjv").numpy()
    assert sorted(got.tolist()) == list(range(n))
    assert objective(matrix, got) == pytest.approx(objective(matrix, expected), rel=1e-12, abs=1e-12)
    if kind in ("integers", "binary", "constant", "zeros"):
        assert objective(matrix, got) == objective(matrix, expected)  # integer sums are exact
    if n >= 64:
        assert mlap._choose_solver(matrix, "auto") == "scipy"
    np.testing.assert_array_equal(solve_lap(matrix).numpy(), expected)


@needs_lapx
def test_auto_uses_lapjv_when_installed_on_a_matrix_with_a_matching(monkeypatch: pytest.MonkeyPatch) -> None:
    import lap

    calls = []
    real = lap.lapjv

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lap, "lapjv", spy)
    matrix = family("correlation", 256, seed=7)
    assert mlap._choose_solver(matrix, "auto") == "lapjv"
    np.testing.assert_array_equal(solve_lap(matrix).numpy(), reference(matrix))
    assert len(calls) == 1
    # too small, or no visible matching (where LAPJV was measured slower): scipy
    for small_or_flat in (family("correlation", 32, seed=7), family("noise-correlation", 256, seed=7)):
        assert mlap._choose_solver(small_or_flat, "auto") == "scipy"
        np.testing.assert_array_equal(solve_lap(small_or_flat).numpy(), reference(small_or_flat))
    assert len(calls) == 1
    solve_lap(family("noise-correlation", 40, seed=1), solver="lapjv")  # explicit: whatever the matrix
    assert len(calls) == 2


def test_auto_uses_scipy_when_lapx_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lap", None)  # `import lap` now raises ImportError
    matrix = family("correlation", 256, seed=7)
    assert mlap._lapx() is None
    assert mlap._choose_solver(matrix, "auto") == "scipy"
    np.testing.assert_array_equal(solve_lap(matrix).numpy(), reference(matrix))
    np.testing.assert_array_equal(solve_lap(matrix, solver="scipy").numpy(), reference(matrix))


def test_lapjv_requested_without_lapx_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lap", None)
    with pytest.raises(ArgumentValueError) as info:
        solve_lap(np.eye(3), solver="lapjv")
    message = info.value.message
    assert message.startswith("Argument 'solver' is 'lapjv'")
    assert "pip install lapx" in message and message.endswith(".")
    assert isinstance(info.value, ValueError)


def test_a_package_named_lap_without_lapjv_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lap", type(sys)("lap"))
    assert mlap._lapx() is None
    with pytest.raises(ArgumentValueError, match="pip install lapx"):
        solve_lap(np.eye(3), solver="lapjv")


@pytest.mark.parametrize(
    ("solver", "error", "start"),
    [
        ("x", ArgumentValueError, "Argument 'solver' is 'x'; pass 'auto', 'scipy' or 'lapjv'."),
        ("LAPJV", ArgumentValueError, "Argument 'solver' is 'LAPJV'; pass"),
        (3, ArgumentTypeError, "Argument 'solver' is"),
        (None, ArgumentTypeError, "Argument 'solver' is"),
    ],
)
def test_bad_solver_argument(solver: object, error: type[Exception], start: str) -> None:
    with pytest.raises(error) as info:
        solve_lap(np.eye(3), solver=solver)  # type: ignore[arg-type]
    assert str(info.value).startswith(start)
    assert info.value.message.endswith(".")  # type: ignore[attr-defined]


@pytest.mark.parametrize("solver", ["auto", "scipy", pytest.param("lapjv", marks=needs_lapx)])
def test_non_finite_and_shape_errors_stay(solver: str) -> None:
    bad = np.eye(4)
    bad[2, 1] = np.nan
    with pytest.raises(ArgumentValueError, match=r"1 non-finite entries \(the first at \(2, 1\)\)"):
        solve_lap(bad, solver=solver)  # type: ignore[arg-type]
    with pytest.raises(ArgumentValueError, match="non-finite"):
        solve_lap(torch.full((3, 3), float("inf")), solver=solver)  # type: ignore[arg-type]
    with pytest.raises(ArgumentValueError, match="square"):
        solve_lap(np.ones((2, 3)), solver=solver)  # type: ignore[arg-type]


@pytest.mark.parametrize("solver", ["auto", "scipy", pytest.param("lapjv", marks=needs_lapx)])
def test_sizes_zero_and_one(solver: str) -> None:
    empty = solve_lap(np.zeros((0, 0)), solver=solver)  # type: ignore[arg-type]
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    one = solve_lap(torch.tensor([[-2.5]]), solver=solver)  # type: ignore[arg-type]
    assert one.tolist() == [0]


@pytest.mark.parametrize("solver", ["auto", "scipy", pytest.param("lapjv", marks=needs_lapx)])
def test_maximises_and_negative_control(solver: str) -> None:
    rng = np.random.default_rng(5)
    n = 80
    matrix = correlation(n, 0.6, rng)
    idx = solve_lap(matrix, solver=solver).numpy()  # type: ignore[arg-type]
    best = objective(matrix, idx)
    assert best == objective(matrix, reference(matrix))
    rows, cols = linear_sum_assignment(matrix)  # minimising: the wrong direction
    minimum = np.empty(n, dtype=np.int64)
    minimum[cols] = rows
    assert objective(matrix, minimum) < best - 1.0
    wrong = idx.copy()
    wrong[[0, 1]] = wrong[[1, 0]]  # a deliberately wrong assignment
    assert objective(matrix, wrong) < best
    assert objective(matrix, np.arange(n)) < best


@needs_lapx
def test_a_broken_lapjv_answer_falls_back_to_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    import lap

    def broken(cost: np.ndarray, extend_cost: bool = False) -> tuple[float, np.ndarray, np.ndarray]:
        n = cost.shape[0]
        return 0.0, np.full(n, -1, dtype=np.int32), np.zeros(n, dtype=np.int32)

    monkeypatch.setattr(lap, "lapjv", broken)
    matrix = family("correlation", 70, seed=2)
    np.testing.assert_array_equal(solve_lap(matrix, solver="lapjv").numpy(), reference(matrix))
