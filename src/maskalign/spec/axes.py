"""Axis trees: how one tensor axis decomposes into permutation groups.

An axis is a :class:`Leaf` (one group, or ``None`` for an unpermuted factor),
a :class:`Product` of sub-axes (row-major: heads x head_dim, or channels x
spatial positions after a flatten), or a :class:`Concat` of sub-axes (the
slices of ``torch.cat`` / ``torch.split``: each keeps its own permutation).
Applying a permutation to an axis is one ``index_select`` with the index vector
that :func:`index_vector` composes from the groups' permutations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AxisTree",
    "Concat",
    "Leaf",
    "Product",
    "co_groups",
    "groups_of",
    "index_vector",
    "tree_size",
    "unit_positions",
]


@dataclass(frozen=True)
class Leaf:
    """``size`` units permuted by group ``group`` (``None``: never permuted)."""

    group: str | None
    size: int


@dataclass(frozen=True)
class Product:
    """Row-major product of sub-axes: index ``(i_1, ..., i_k)`` is at
    ``sum_j i_j * prod(sizes after j)``."""

    parts: tuple[AxisTree, ...]


@dataclass(frozen=True)
class Concat:
    """Concatenation of sub-axes, each permuted within its own slice."""

    parts: tuple[AxisTree, ...]


AxisTree = Leaf | Product | Concat


def _fold(tree: AxisTree, leaf_value: Callable[[Leaf], int]) -> int:
    """Sum over concatenated parts, product over factors, ``leaf_value`` at leaves."""
    if isinstance(tree, Leaf):
        return leaf_value(tree)
    values = [_fold(part, leaf_value) for part in tree.parts]
    return sum(values) if isinstance(tree, Concat) else math.prod(values)


def tree_size(tree: AxisTree) -> int:
    """Number of positions of the axis."""
    return _fold(tree, lambda leaf: leaf.size)


def groups_of(tree: AxisTree) -> Iterator[str]:
    """Group names in the tree, in order (with repeats)."""
    if isinstance(tree, Leaf):
        if tree.group is not None:
            yield tree.group
        return
    for part in tree.parts:
        yield from groups_of(part)


def index_vector(tree: AxisTree, perm: Mapping[str, Tensor], skip: str | None = None) -> Tensor:
    """int64 ``idx`` with ``new[j] = old[idx[j]]`` for the whole axis.

    Args:
        tree: the axis.
        perm: group name -> index tensor (missing groups: identity).
        skip: a group to leave unpermuted (identity) wherever it occurs.
    """
    if isinstance(tree, Leaf):
        idx = perm.get(tree.group) if tree.group is not None and tree.group != skip else None
        return idx if idx is not None else torch.arange(tree.size)
    parts = [index_vector(p, perm, skip) for p in tree.parts]
    if isinstance(tree, Concat):
        out, offset = [], 0
        for part, sub in zip(parts, tree.parts):
            out.append(part + offset)
            offset += tree_size(sub)
        return torch.cat(out)
    idx = parts[0]
    for part, sub in zip(parts[1:], tree.parts[1:]):
        idx = (idx[:, None] * tree_size(sub) + part[None, :]).reshape(-1)
    return idx


def unit_positions(tree: AxisTree, group: str) -> Tensor | None:
    """Positions of the axis grouped by the unit of ``group`` they belong to.

    Returns an int64 ``(n, R)`` tensor: row ``i`` lists, in a fixed order, the
    ``R`` positions whose ``group`` factor is unit ``i`` (for a product, only
    the first factor that is ``group`` counts; a concat lists every slice that
    holds it). ``None`` if ``group`` does not occur.
    """
    if isinstance(tree, Leaf):
        return torch.arange(tree.size)[:, None] if tree.group == group else None
    if isinstance(tree, Concat):
        found, offset = [], 0
        for part in tree.parts:
            sub = unit_positions(part, group)
            if sub is not None:
                found.append(sub + offset)
            offset += tree_size(part)
        return torch.cat(found, dim=1) if found else None
    sizes = [tree_size(p) for p in tree.parts]
    for j, part in enumerate(tree.parts):
        sub = unit_positions(part, group)
        if sub is None:
            continue
        before, after = math.prod(sizes[:j]), math.prod(sizes[j + 1 :])
        pre = torch.arange(before)[None, :, None, None] * (sizes[j] * after)
        post = torch.arange(after)[None, None, None, :]
        positions = pre + sub[:, None, :, None] * after + post
        return positions.reshape(sub.shape[0], -1)
    return None


def co_groups(tree: AxisTree, group: str) -> set[str]:
    """Groups that share positions with ``group``'s units: those in the other
    factors of every product on the way to ``group``. Empty when pooling the
    axis by ``group``'s units never mixes in another permuted factor."""
    if isinstance(tree, Leaf):
        return set()
    holding = [part for part in tree.parts if group in set(groups_of(part))]
    if isinstance(tree, Concat):
        return set().union(*(co_groups(part, group) for part in holding))
    first = holding[0]
    others = {g for part in tree.parts if part is not first for g in groups_of(part)}
    return others | co_groups(first, group)
