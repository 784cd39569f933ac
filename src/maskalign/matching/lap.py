"""Linear assignment (LAP) with maskalign's direction convention."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..errors import ArgumentTypeError, ArgumentValueError, _describe

__all__ = ["block_lap_values", "solve_lap"]


def solve_lap(similarity: Tensor | np.ndarray) -> Tensor:
    """Maximise ``sum_j similarity[idx[j], j]`` over permutations ``idx``.

    Args:
        similarity: ``(n, n)`` matrix; rows index units of model A, columns
            units of model B.

    Returns:
        int64 tensor ``idx`` of shape ``(n,)``: unit ``idx[j]`` of A is matched
        to unit ``j`` of B, so ``a.index_select(axis, idx)`` is aligned to B.

    Uses ``scipy.optimize.linear_sum_assignment`` (Jonker-Volgenant / Crouse 2016).

    Raises:
        ArgumentTypeError: ``similarity`` is not a tensor or numpy array.
        ArgumentValueError: it is not a square matrix, or holds NaN or
            infinite entries (the first is named).
    """
    matrix = _matrix(similarity, "similarity")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ArgumentValueError(f"Argument 'similarity' has shape {tuple(matrix.shape)}; pass a square (n, n) matrix.")
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    idx = np.empty(matrix.shape[0], dtype=np.int64)
    idx[cols] = rows
    return torch.from_numpy(idx)


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
