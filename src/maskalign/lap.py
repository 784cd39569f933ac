"""Linear assignment (LAP) with maskalign's direction convention."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

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
    """
    matrix = similarity.detach().cpu().double().numpy() if isinstance(similarity, Tensor) else similarity
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {matrix.shape}")
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
    """
    n = blocks.shape[0]
    values = blocks.detach().cpu().double().numpy()
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            rows, cols = linear_sum_assignment(values[i, j], maximize=True)
            out[i, j] = values[i, j][rows, cols].sum()
    return torch.from_numpy(out)
