"""Union-find over axis atoms: the algebra behind a permutation spec.

Every tensor dimension in the graph is an ordered product of *atoms*: a dim of
size 32 that a view splits into 4 heads x 8 features becomes the product
``[h(4), d(8)]`` of two atoms, exactly (row-major index order), never by a guess
on sizes. Two dims that index the same flat space (an op's input and output
channel, a parameter axis and the activation axis it contracts with, a tensor
before and after a view) are *unified*: their atom lists are brought to a common
refinement and matching atoms are merged into one class.

At the end every class of leaf atoms is either *frozen* (it met an op, input,
output or constant that a permutation would change) or free: a free class that
carries a parameter or buffer axis is a permutation group, and permuting every
member axis by one permutation keeps the model's function.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from ..errors import SpecError

__all__ = ["AtomTable", "Freeze"]


@dataclass(frozen=True)
class Freeze:
    """Why a class of atoms is not permutable.

    ``reason``: a sentence naming the op, node and module (the first freeze
    that reached the class). ``op``: the op that froze it (``"aten::roll"``),
    or a category for freezes that come from no op (``"model input"``,
    ``"constant"``). ``structural``: the axis is not a hidden axis at all (a
    model input or output, a kernel's spatial axis, a vocabulary, the index
    of stacked tensors): coverage leaves it out instead of counting it as lost.
    A class frozen once structurally stays structural.
    """

    reason: str
    op: str | None = None
    structural: bool = False

    def merged(self, other: Freeze) -> Freeze:
        """This freeze, structural if either is."""
        if other.structural and not self.structural:
            return Freeze(self.reason, self.op, True)
        return self


class AtomTable:
    """Atoms with sizes, a union-find over them, and refinements of classes.

    A class (identified by its root) is a leaf, or has a *product expansion*
    (ordered child atoms whose sizes multiply to its size: its index is the
    row-major mixed-radix combination of theirs), or a *concat expansion*
    (ordered child atoms whose sizes add up to its size: its index space is
    their concatenation, as made by ``torch.cat`` or taken apart by
    ``torch.split``). A concatenated class is opaque to products: it cannot be
    split into factors, and unifying it with a product fails (the caller
    freezes), so block structure is kept exactly or not at all.
    """

    def __init__(self) -> None:
        self._size: list[int] = []
        self._parent: list[int] = []
        self._expansion: dict[int, list[int]] = {}
        self._concat: dict[int, list[int]] = {}
        self._frozen: dict[int, Freeze] = {}

    # ------------------------------------------------------------------ atoms
    def new(self, size: int) -> int:
        """A fresh atom of ``size`` (> 1)."""
        self._size.append(int(size))
        self._parent.append(len(self._parent))
        return len(self._parent) - 1

    def concat(self, parts: list[int]) -> int:
        """A fresh atom whose index space is the concatenation of ``parts``'."""
        atom = self.new(sum(self._size[p] for p in parts))
        self._concat[atom] = list(parts)
        return atom

    def size(self, atom: int) -> int:
        return self._size[atom]

    def structure(self, atom: int) -> tuple[str, list[int]]:
        """``("product", children)``, ``("concat", children)`` or ``("leaf", [])``
        for the class of ``atom``."""
        root = self.find(atom)
        if root in self._expansion:
            return "product", self._expansion[root]
        if root in self._concat:
            return "concat", self._concat[root]
        return "leaf", []

    def find(self, atom: int) -> int:
        root = atom
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[atom] != root:  # path compression
            self._parent[atom], atom = root, self._parent[atom]
        return root

    def leaves(self, atoms: list[int]) -> list[int]:
        """Roots of the classes that ``atoms`` expand to through products, in
        order (concatenated classes count as leaves here)."""
        out: list[int] = []
        stack = [self.find(a) for a in reversed(atoms)]
        while stack:
            root = stack.pop()
            children = self._expansion.get(root)
            if children is None:
                out.append(root)
            else:
                stack.extend(self.find(c) for c in reversed(children))
        return out

    # --------------------------------------------------------------- freezing
    def freeze(self, atoms: list[int], reason: str, *, op: str | None = None, structural: bool = False) -> None:
        """Mark every leaf class below ``atoms`` as not permutable (see :class:`Freeze`)."""
        record = Freeze(reason, op, structural)
        for leaf in self.leaves(atoms):
            self._mark(leaf, record)

    def _mark(self, root: int, record: Freeze) -> None:
        old = self._frozen.get(root)
        self._frozen[root] = record if old is None else old.merged(record)

    def frozen(self, atom: int) -> Freeze | None:
        """The :class:`Freeze` of the leaf class of ``atom``, or None if it is free."""
        return self._frozen.get(self.find(atom))

    def finalize(self) -> None:
        """Push freezes of refined classes down to their leaves."""
        changed = True
        while changed:
            changed = False
            for root, record in list(self._frozen.items()):
                if self.find(root) != root:
                    self._frozen.pop(root)
                    self._mark(self.find(root), record)
                    changed = True
                elif root in self._expansion or root in self._concat:
                    children = self._expansion.get(root) or self._concat[root]
                    for leaf in self.leaves(children):
                        old = self._frozen.get(leaf)
                        if old is None or (record.structural and not old.structural):
                            self._mark(leaf, record)
                            changed = True

    # ---------------------------------------------------------------- merging
    def _split(self, root: int, first: int) -> tuple[int, int]:
        """Refine leaf class ``root`` into ``[first, size // first]``."""
        children = [self.new(first), self.new(self._size[root] // first)]
        self._expansion[root] = children
        record = self._frozen.get(root)
        if record is not None:
            for child in children:
                self._frozen[child] = record
        return children[0], children[1]

    def _union_roots(self, a: int, b: int) -> bool:
        """Merge two classes of equal size. Returns False, merging nothing,
        when their structures conflict (a concatenation against a product, or
        two concatenations cut at different places); the caller then freezes
        both, and :meth:`finalize` pushes that down to their parts."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return True
        if self._size[a] != self._size[b]:
            raise SpecError(
                f"Atoms {a} and {b} have different sizes ({self._size[a]} and {self._size[b]}) and cannot be joined; "
                "this is a bug in maskalign's axis analysis: please report it with the model."
            )
        cat_a, cat_b = self._concat.get(a), self._concat.get(b)
        exp_a, exp_b = self._expansion.get(a), self._expansion.get(b)
        if (cat_a and exp_b) or (cat_b and exp_a):
            return False
        if cat_a and cat_b and [self._size[c] for c in cat_a] != [self._size[c] for c in cat_b]:
            return False
        self._parent[b] = a
        record = self._frozen.pop(b, None)
        if record is not None:
            self._mark(a, record)
        for structure, mine, theirs in ((self._concat, cat_a, cat_b), (self._expansion, exp_a, exp_b)):
            if theirs is None:
                continue
            structure.pop(b)
            if mine is None:
                structure[a] = theirs
                continue
            merged = (
                all(self.unify([x], [y]) for x, y in zip(mine, theirs))
                if structure is self._concat
                else self.unify(mine, theirs)
            )
            if not merged:  # b's parts are detached from the tree now: freeze them explicitly
                self.freeze(mine + theirs, "incompatible factorisations of one axis")
                return False
        return True

    def unify(self, left: list[int], right: list[int]) -> bool:
        """Declare that two ordered atom products index the same flat space.

        Both lists are refined to their common mixed-radix refinement and
        matching atoms are merged. Returns False (and merges nothing further)
        when no common refinement exists (e.g. ``[3, 4]`` vs ``[4, 3]``) or
        when the total sizes differ; the caller then freezes both sides.
        """
        lhs = [a for a in self.leaves(left) if self._size[a] > 1]
        rhs = [b for b in self.leaves(right) if self._size[b] > 1]
        total_l = total_r = 1
        for a in lhs:
            total_l *= self._size[a]
        for b in rhs:
            total_r *= self._size[b]
        if total_l != total_r:
            return False
        i = j = 0
        while i < len(lhs) and j < len(rhs):
            a, b = self.find(lhs[i]), self.find(rhs[j])
            if a in self._expansion:  # refined by an earlier merge in this loop
                lhs[i : i + 1] = self.leaves([a])
                continue
            if b in self._expansion:
                rhs[j : j + 1] = self.leaves([b])
                continue
            sa, sb = self._size[a], self._size[b]
            if sa == sb:
                if not self._union_roots(a, b):
                    return False
                i += 1
                j += 1
                continue
            common = gcd(sa, sb)
            # a concatenation cannot be split into factors, but the other side can be split
            # around it (tokens [cls, patches] merged with the batch: [Concat(1, 4), 2] ~ [10])
            if common == 1 or (a in self._concat and sa != common) or (b in self._concat and sb != common):
                return False
            if sa != common:
                lhs[i : i + 1] = list(self._split(a, common))
            if sb != common:
                rhs[j : j + 1] = list(self._split(b, common))
        return i == len(lhs) and j == len(rhs)
