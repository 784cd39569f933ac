"""Linear assignment (LAP) with maskalign's direction convention."""

from __future__ import annotations

import types
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..errors import ArgumentTypeError, ArgumentValueError, _describe

__all__ = ["block_lap_values", "solve_lap"]

Solver = Literal["auto", "scipy", "lapjv"]
SOLVERS: tuple[str, ...] = ("auto", "scipy", "lapjv")

# "auto" hands a matrix to LAPJV only from this size on (below it scipy's lower
# per-call overhead wins: 2 us vs 14 us at n = 8) ...
_LAPJV_MIN_SIZE = 64
# ... and only when at least this fraction of the rows' best columns have that
# row as their best row too (a matching is visible in the matrix). There LAPJV's
# reductions settle most rows at once and it was 2.5-7x faster than scipy; on
# matrices without one (mutual fraction ~0.5 for noise, ~0.05 for low-rank) it
# was 1.5-10x slower (benchmarks/bench_lap.py; "LAP solvers" in benchmarks/README.md).
_LAPJV_MIN_MUTUAL = 0.7
# Entries sampled to detect quantised (tie-prone) matrices.
_SAMPLE = 4096


def solve_lap(similarity: Tensor | np.ndarray, solver: Solver = "auto") -> Tensor:
    """Maximise ``sum_j similarity[idx[j], j]`` over permutations ``idx``.

    Two exact solvers give the same optimum: scipy's
    ``linear_sum_assignment`` (always available) and LAPJV from the optional
    ``lapx`` package (``pip install lapx`` or ``pip install maskalign[fast]``).
    Both solve the same float64 problem (``-similarity`` is minimised, exactly);
    the objective they reach is the same, and so is the assignment whenever the
    optimum is unique. When several assignments are optimal they may return
    different ones.

    ``solver="auto"`` uses LAPJV only where it was measured faster and ties are
    unlikely, scipy elsewhere, so its answer is scipy's wherever two optima
    could differ:

    * LAPJV needs lapx installed, ``n >= 64``, and a visible matching: at least
      70% of the rows are the best row of their own best column. On dense
      float64 correlation matrices with a planted matching
      (``benchmarks/bench_lap.py``, 2 shared cores, best of 3) LAPJV was
      2.5-3.4x faster than scipy for n = 1024-8192, and ``solve_lap`` with its
      checks 1.5-2.7x; at n = 16384 (one call each, heavy load) ``solve_lap``
      was 3.0x faster, while the timings of the 2 GiB copies varied by up
      to 5x (the "LAP solvers" tables in docs/benchmarks.md). On matrices
      without such structure (noise correlations, Gaussian or low-rank
      matrices) LAPJV was 1.5-10x slower, and those stay with scipy.
    * Tie-prone matrices stay with scipy: two identical rows or columns (dead
      units), a symmetric matrix, integer-valued or quantised entries (many
      repeats among 4096 sampled entries).
    * The checks are O(n^2) reads (a row argmax, a column max and a sample),
      a few percent of the solve.

    Args:
        similarity: ``(n, n)`` matrix; rows index units of model A, columns
            units of model B. Any real dtype; it is solved in float64.
        solver: ``"auto"`` (the default, as above), ``"scipy"``
            (``scipy.optimize.linear_sum_assignment``) or ``"lapjv"`` (lapx's
            ``lap.lapjv``, whatever the matrix).

    Returns:
        int64 tensor ``idx`` of shape ``(n,)``: unit ``idx[j]`` of A is matched
        to unit ``j`` of B, so ``a.index_select(axis, idx)`` is aligned to B.

    Raises:
        ArgumentTypeError: ``similarity`` is not a tensor or numpy array, or
            ``solver`` is not a string.
        ArgumentValueError: ``similarity`` is not a square matrix, or holds NaN
            or infinite entries (the first is named); ``solver`` is not one of
            the three, or is ``"lapjv"`` while lapx is not installed.

    Source:
        scipy: Crouse, "On implementing 2D rectangular assignment algorithms",
        IEEE TAES 2016 (a shortest augmenting path variant of Jonker-Volgenant).
        lapx: Jonker and Volgenant, "A shortest augmenting path algorithm for
        dense and sparse linear assignment problems", Computing 1987.
    """
    matrix = _matrix(similarity, "similarity")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ArgumentValueError(f"Argument 'similarity' has shape {tuple(matrix.shape)}; pass a square (n, n) matrix.")
    if _choose_solver(matrix, solver) == "lapjv":
        idx = _solve_lapjv(matrix)
        if idx is not None:
            return torch.from_numpy(idx)
    return torch.from_numpy(_solve_scipy(matrix))


def _choose_solver(matrix: np.ndarray, solver: object) -> str:
    """``"scipy"`` or ``"lapjv"``: what :func:`solve_lap` runs for ``matrix``."""
    if not isinstance(solver, str):
        raise ArgumentTypeError(f"Argument 'solver' is {_describe(solver)}; pass 'auto', 'scipy' or 'lapjv'.")
    if solver not in SOLVERS:
        raise ArgumentValueError(f"Argument 'solver' is {solver!r}; pass 'auto', 'scipy' or 'lapjv'.")
    if solver == "scipy":
        return "scipy"
    if solver == "lapjv":
        if _lapx() is None:
            raise ArgumentValueError(
                "Argument 'solver' is 'lapjv', but lapx is not installed; install it with `pip install lapx` "
                "(or `pip install maskalign[fast]`), or pass solver='auto' or 'scipy'."
            )
        return "lapjv"
    n = matrix.shape[0]
    if n < _LAPJV_MIN_SIZE or _lapx() is None:
        return "scipy"
    mutual, row_max, col_max = _mutual_best(matrix)
    if mutual < _LAPJV_MIN_MUTUAL or _tie_prone(matrix, row_max, col_max):
        return "scipy"
    return "lapjv"


def _mutual_best(matrix: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Fraction of rows that are the best row of their own best column; row and column maxima."""
    n = matrix.shape[0]
    best_col = matrix.argmax(axis=1)
    row_max = matrix[np.arange(n), best_col]
    col_max = matrix.max(axis=0)
    return float(np.mean(row_max == col_max[best_col])), row_max, col_max


def _tie_prone(matrix: np.ndarray, row_max: np.ndarray, col_max: np.ndarray) -> bool:
    """Whether ``matrix`` is of a kind whose optimum is often not unique.

    Identical rows (or columns) can swap partners at no cost; a symmetric
    matrix scores ``idx`` and its inverse alike; integer or quantised entries
    make equal sums common. Continuous data has none of these with probability 1.
    """
    n = matrix.shape[0]
    rng = np.random.default_rng(0)
    flat = rng.choice(n * n, size=min(_SAMPLE, n * n), replace=False)
    sample = matrix.reshape(-1)[flat]
    if np.all(sample == np.round(sample)) or np.unique(sample).size < 0.95 * sample.size:
        return True
    rows, cols = np.divmod(flat, n)
    if np.array_equal(sample, matrix[cols, rows]) and np.array_equal(matrix, matrix.T):
        return True
    return _has_equal_lines(matrix, row_max) or _has_equal_lines(matrix.T, col_max)


def _has_equal_lines(matrix: np.ndarray, maxima: np.ndarray) -> bool:
    """Whether two rows of ``matrix`` are equal (equal rows have equal maxima)."""
    order = np.argsort(maxima, kind="stable")
    same = np.flatnonzero(maxima[order][1:] == maxima[order][:-1])
    return any(np.array_equal(matrix[order[k]], matrix[order[k + 1]]) for k in same)


def _lapx() -> types.ModuleType | None:
    """lapx's ``lap`` module, or None when it is not installed."""
    try:
        import lap
    except ImportError:
        return None
    return lap if hasattr(lap, "lapjv") else None


def _solve_scipy(matrix: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    idx = np.empty(matrix.shape[0], dtype=np.int64)
    idx[cols] = rows
    return idx


def _solve_lapjv(matrix: np.ndarray) -> np.ndarray | None:
    """LAPJV's ``idx``, or None (the caller then uses scipy) when its answer
    is not a permutation or lapx is not importable."""
    n = matrix.shape[0]
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    lap = _lapx()
    if lap is None:
        return None
    _, _, rows = lap.lapjv(np.negative(matrix), extend_cost=False)
    idx = np.asarray(rows, dtype=np.int64)
    if idx.shape != (n,) or idx.min() < 0 or np.bincount(idx, minlength=n).max() != 1:
        return None
    return idx


def block_lap_values(blocks: Tensor) -> Tensor:
    """``(n, n)`` best-assignment values of ``(n, n, R, R)`` blocks.

    ``out[i, j] = max_sigma sum_r blocks[i, j, r, sigma(r)]``: how well unit
    ``i`` of A matches unit ``j`` of B when each is a block of ``R`` positions
    (a head of ``R`` dims) whose inner alignment is not known yet. One LAP of
    size ``R`` per pair; used to start the matching of nested groups.

    Raises:
        ArgumentTypeError: ``blocks`` is not a tensor or numpy array.
        ArgumentValueError: it is not of shape ``(n, n, R, R)``, or holds NaN
            or infinite entries.
    """
    values = _matrix(blocks, "blocks")
    shape = tuple(values.shape)
    if len(shape) != 4 or shape[0] != shape[1] or shape[2] != shape[3]:
        raise ArgumentValueError(f"Argument 'blocks' has shape {shape}; pass an (n, n, R, R) tensor.")
    n = shape[0]
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            rows, cols = linear_sum_assignment(values[i, j], maximize=True)
            out[i, j] = values[i, j][rows, cols].sum()
    return torch.from_numpy(out)


def _matrix(value: object, argument: str) -> np.ndarray:
    """``value`` as a float64 numpy array, checked to be finite."""
    if isinstance(value, Tensor):
        if value.is_complex():
            raise ArgumentValueError(f"Argument {argument!r} is a complex tensor; pass real similarities.")
        matrix = value.detach().cpu().double().numpy()
    elif isinstance(value, np.ndarray):
        matrix = value.astype(np.float64, copy=False)
    else:
        raise ArgumentTypeError(f"Argument {argument!r} is {_describe(value)}; pass a torch.Tensor or numpy array.")
    finite = np.isfinite(matrix)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ArgumentValueError(
            f"Argument {argument!r} has {int((~finite).sum())} non-finite entries (the first at {first}); "
            "pass finite similarities (NaN weights or activations upstream?)."
        )
    return matrix
