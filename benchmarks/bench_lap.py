"""LAP solvers (issue 16): scipy ``linear_sum_assignment`` vs lapx's LAPJV, side by side.

For each size ``n`` and each signal ``s`` the script builds one dense float64
correlation matrix like activation matching produces: ``A`` holds ``2n``
samples of ``n`` Gaussian features, ``B = A[:, perm] * s + noise`` (unit
Gaussian noise), and ``C[i, j]`` is the Pearson correlation of ``A[:, i]`` and
``B[:, j]``. ``s = 0.6`` plants a clear matching (most units have a partner);
``s = 0`` plants none (a control: the correlations are sampling noise only).
The matrix is accumulated over chunks of samples with an in-place
``addmm_``, so only the ``(n, n)`` result is held (2 GiB at n = 16384).

Then, on the same matrix in one run:

* ``scipy.optimize.linear_sum_assignment(C, maximize=True)``;
* ``lap.lapjv(-C, extend_cost=False)`` (lapx; minimises, hence ``-C``: the
  negated copy is timed too, as scipy's ``maximize=True`` makes one inside);
* ``maskalign.matching.lap.solve_lap(C)`` (solver="auto": what the library
  does by default, choice and checks included).

Times are the best of ``--repeats`` (1 call for n >= ``--single-from``, 16384). Columns: each
time, scipy / lapjv, scipy / solve_lap, whether lapjv's assignment is the same
as scipy's, and lapjv's objective (the sum of the chosen similarities, summed
exactly with ``math.fsum``) minus scipy's. ``mutual`` is the fraction of
rows that are the best row of their own best column, the statistic
``solve_lap`` uses to choose.

Run: ``python benchmarks/bench_lap.py`` (``--sizes 1024,2048 --signals 0.6`` for a short run).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import scipy
import torch
from scipy.optimize import linear_sum_assignment

import maskalign
from maskalign.matching import lap as mlap

T = TypeVar("T")


def best_time(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Best wall time over ``repeats`` calls, and the last result."""
    best = math.inf
    result: T
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def correlation_matrix(n: int, signal: float, seed: int, samples: int | None = None, chunk: int = 2048) -> np.ndarray:
    """Float64 ``(n, n)`` Pearson correlations of ``A`` and ``B = A[:, perm] * signal + noise``.

    Built over chunks of ``chunk`` samples: sums, sums of squares and the cross
    product ``A^T B`` are accumulated in place; no ``(samples, n)`` array is held.
    """
    samples = 2 * n if samples is None else samples
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    cross = torch.zeros(n, n, dtype=torch.float64)
    sum_a, sum_b = np.zeros(n), np.zeros(n)
    sq_a, sq_b = np.zeros(n), np.zeros(n)
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        a = rng.standard_normal((k, n))
        b = a[:, perm] * signal + rng.standard_normal((k, n))
        cross.addmm_(torch.from_numpy(a).T, torch.from_numpy(b))
        sum_a += a.sum(0)
        sum_b += b.sum(0)
        sq_a += (a * a).sum(0)
        sq_b += (b * b).sum(0)
        del a, b
    out = cross.numpy()
    mean_a, mean_b = sum_a / samples, sum_b / samples
    std_a = np.sqrt(sq_a / samples - mean_a**2)
    std_b = np.sqrt(sq_b / samples - mean_b**2)
    rows = max(1, (1 << 24) // max(n, 1))  # in place, a block of rows at a time
    for r0 in range(0, n, rows):
        block = out[r0 : r0 + rows]
        block /= samples
        block -= np.outer(mean_a[r0 : r0 + rows], mean_b)
        block /= np.outer(std_a[r0 : r0 + rows], std_b)
    return out


def objective(matrix: np.ndarray, idx: np.ndarray) -> float:
    """Exact (correctly rounded) ``sum_j matrix[idx[j], j]``."""
    return math.fsum(matrix[idx, np.arange(matrix.shape[0])].tolist())


def scipy_idx(matrix: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    idx = np.empty(matrix.shape[0], dtype=np.int64)
    idx[cols] = rows
    return idx


def lapjv_idx(matrix: np.ndarray) -> np.ndarray:
    import lap

    _, _, y = lap.lapjv(np.negative(matrix), extend_cost=False)
    return np.asarray(y, dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,2048,4096,8192,16384", help="comma-separated n (default %(default)s)")
    parser.add_argument("--signals", default="0.6,0", help="comma-separated s of B = A[:, perm] * s + noise")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many calls (default %(default)s)")
    parser.add_argument("--single-from", type=int, default=16384, help="one call for n >= this (%(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    signals = [float(s) for s in args.signals.split(",")]

    import lap

    print(
        f"machine: {platform.platform()}, {platform.machine()}, cpu_count {os.cpu_count()}, "
        f"torch threads {torch.get_num_threads()} (matrix construction only; the LAP solvers are single-threaded)"
    )
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"lapx {lap.__version__}, maskalign {maskalign.__version__}; {datetime.date.today().isoformat()}; "
        f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"dense float64 correlation matrices, 2n samples, seed {args.seed}; "
        f"best of {args.repeats} (1 for n >= {args.single_from})"
    )
    print()
    print(
        "| n | signal | mutual | scipy s | lapjv s | solve_lap s (chose) | scipy/lapjv | scipy/solve_lap "
        "| same assignment | objective lapjv - scipy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for signal in signals:
            print(measure(n, signal, args.seed + n, 1 if n >= args.single_from else args.repeats), flush=True)


def measure(n: int, signal: float, seed: int, repeats: int) -> str:
    """One table row: the three solvers on one correlation matrix."""
    matrix = correlation_matrix(n, signal, seed)
    mutual = mlap._mutual_best(matrix)[0]
    t_scipy, ref = best_time(lambda: scipy_idx(matrix), repeats)
    t_lapjv, got = best_time(lambda: lapjv_idx(matrix), repeats)
    t_auto, auto = best_time(lambda: mlap.solve_lap(matrix).numpy(), repeats)
    chose = mlap._choose_solver(matrix, "auto")
    same = bool(np.array_equal(ref, got)) and bool(np.array_equal(ref, auto))
    diff = objective(matrix, got) - objective(matrix, ref)
    return (
        f"| {n} | {signal:g} | {mutual:.3f} | {t_scipy:.4f} | {t_lapjv:.4f} | {t_auto:.4f} ({chose}) | "
        f"{t_scipy / t_lapjv:.2f} | {t_scipy / t_auto:.2f} | {'yes' if same else 'NO'} | {diff:.3g} |"
    )


if __name__ == "__main__":
    main()
