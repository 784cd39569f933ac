"""Permutations of a spec's groups, and applying them to models, state_dicts and masks.

Convention (used everywhere in maskalign): a permutation holds, per group, an
index tensor ``idx`` of shape ``(size,)``, and applying it to an axis of that
group selects ``new[j] = old[idx[j]]`` (``torch.index_select``). Matching
``match_*(a, b)`` returns ``pi`` with ``apply_permutation(a, pi)`` aligned to
``b``: unit ``idx[j]`` of A plays the role of unit ``j`` of B, so
``permute_mask(mask_a, pi)`` is A's mask expressed in B's units.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .axes import groups_of, index_vector
from .errors import MaskError, SpecError, SpecMismatchError
from .fileio import atomic_write
from .modes import plain_tensors
from .spec import PermutationSpec

__all__ = [
    "Permutation",
    "apply_permutation",
    "check_same_architecture",
    "permute_mask",
    "permute_state_dict",
    "random_permutation",
]


class Permutation(Mapping[str, Tensor]):
    """One permutation (an int64 index tensor) per group of a :class:`PermutationSpec`.

    Behaves as a read-only mapping ``group name -> index tensor``.

    Args:
        spec: the spec the permutation belongs to.
        indices: group name -> int64 tensor of shape ``(group.size,)`` holding a
            permutation of ``range(group.size)``. Missing groups are identity.
        report: optional diagnostics from the matcher that produced it.

    Raises:
        SpecError: an unknown group, a wrong length, or indices that are not a
            permutation.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        indices: Mapping[str, Tensor],
        report: Mapping[str, Any] | None = None,
    ) -> None:
        unknown = sorted(set(indices) - set(spec.groups))
        if unknown:
            raise SpecError(f"permutation names groups that are not in the spec: {unknown[:5]}")
        self.spec = spec
        self.report: dict[str, Any] = dict(report or {})
        self._indices: dict[str, Tensor] = {}
        for name, group in spec.groups.items():
            idx = indices.get(name)
            if idx is None:
                idx = torch.arange(group.size)
            idx = torch.as_tensor(idx).detach().to("cpu", torch.long).reshape(-1)
            if idx.numel() != group.size or not torch.equal(torch.sort(idx).values, torch.arange(group.size)):
                raise SpecError(
                    f"indices for group '{name}' are not a permutation of range({group.size}) "
                    f"(got shape {tuple(idx.shape)})"
                )
            self._indices[name] = idx

    def __getitem__(self, group: str) -> Tensor:
        return self._indices[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Permutation):
            return NotImplemented
        return self.spec.fingerprint == other.spec.fingerprint and all(torch.equal(self[g], other[g]) for g in self)

    def __repr__(self) -> str:
        moved = sum(int((idx != torch.arange(idx.numel())).any()) for idx in self._indices.values())
        return f"Permutation({len(self)} groups, {moved} non-identity)"

    def inverse(self) -> Permutation:
        """The permutation that undoes this one: ``apply(apply(x, p), p.inverse()) == x``."""
        inv = {}
        for name, idx in self._indices.items():
            out = torch.empty_like(idx)
            out[idx] = torch.arange(idx.numel())
            inv[name] = out
        return Permutation(self.spec, inv)

    def compose(self, then: Permutation) -> Permutation:
        """Apply ``self`` first, then ``then``: ``apply(x, p.compose(q)) == apply(apply(x, p), q)``."""
        _check_same_spec(self.spec, then.spec)
        return Permutation(self.spec, {g: self[g][then[g]] for g in self})

    def is_identity(self) -> bool:
        return all(torch.equal(idx, torch.arange(idx.numel())) for idx in self._indices.values())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index tensors and the spec's fingerprint to ``path``
        atomically, in a format that loads without executing pickled code
        (``torch.load(weights_only=True)``)."""
        payload = {
            "format": "maskalign.Permutation/1",
            "fingerprint": self.spec.fingerprint,
            "indices": dict(self._indices),
        }
        atomic_write(path, lambda handle: torch.save(payload, handle), mode="wb")

    @classmethod
    def load(cls, path: str | os.PathLike[str], spec: PermutationSpec) -> Permutation:
        """Read a permutation written by :meth:`save` for ``spec``.

        Raises:
            SpecMismatchError: the file was saved for another spec (its
                fingerprint differs).
            SpecError: the file is not a saved permutation (not a torch
                file, or one holding something else).
            FileNotFoundError: ``path`` does not exist.
        """
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            raise SpecError(f"{path} is not a permutation saved by maskalign ({type(exc).__name__}).") from exc
        if not isinstance(payload, dict) or payload.get("format") != "maskalign.Permutation/1":
            raise SpecError(f"{path} is not a permutation saved by maskalign")
        if payload["fingerprint"] != spec.fingerprint:
            raise SpecMismatchError(
                f"{path} was saved for a spec with fingerprint {payload['fingerprint']}, "
                f"not for this spec ({spec.fingerprint}): was it made for another architecture?"
            )
        return cls(spec, payload["indices"])

    def permute_tensor(self, name: str, tensor: Tensor) -> Tensor:
        """Permute ``tensor`` as the ``state_dict`` entry ``name`` of the spec.

        Returns a new tensor; ``tensor`` itself is not modified.

        Raises:
            SpecError: ``name`` is not in the spec.
            SpecMismatchError: ``tensor`` does not have the spec's shape.
        """
        name = name if name in self.spec.axes else self.spec.logical.get(name, name)
        axes = self.spec.axes.get(name)
        if axes is None:
            raise SpecError(f"'{name}' is not a parameter or buffer of the spec's model")
        expected = self.spec.shapes[name]
        if tuple(tensor.shape) != expected:
            raise SpecMismatchError(f"'{name}' has shape {tuple(tensor.shape)} but the spec expects {expected}")
        out = tensor
        for d, tree in enumerate(axes):
            if next(groups_of(tree), None) is not None:
                out = out.index_select(d, index_vector(tree, self._indices).to(tensor.device))
        return out.clone() if out is tensor else out


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> Permutation:
    """A uniformly random permutation of every group of ``spec`` (``torch.randperm``)."""
    return Permutation(spec, {name: torch.randperm(g.size, generator=generator) for name, g in spec.groups.items()})


def check_same_architecture(state: Mapping[str, Tensor], spec: PermutationSpec, what: str = "model") -> None:
    """Raise :class:`SpecMismatchError` unless ``state`` has every tensor of the
    spec with the spec's shape."""
    missing = [name for name in spec.axes if name not in state and name not in spec.nonpersistent]
    if missing:
        raise SpecMismatchError(
            f"{what} has no tensor(s) {missing[:5]} that the permutation spec expects; "
            "was the spec built from another architecture?"
        )
    for name, shape in spec.shapes.items():
        if name in state and tuple(state[name].shape) != shape:
            raise SpecMismatchError(
                f"{what}: '{name}' has shape {tuple(state[name].shape)} but the spec expects {shape}"
            )


def permute_state_dict(state: Mapping[str, Tensor], perm: Permutation) -> dict[str, Tensor]:
    """A new ``state_dict`` with every tensor of ``perm.spec`` permuted.

    Entries that the spec does not know (e.g. ``num_batches_tracked``) are
    copied unchanged. ``state`` is not modified. The per-module version
    metadata of a ``Module.state_dict()`` (its ``_metadata`` attribute, which
    ``_load_from_state_dict`` of e.g. torchvision's MNASNet reads) is kept.

    Raises:
        SpecMismatchError: a tensor of the spec is missing or has another shape.
    """
    check_same_architecture(state, perm.spec, "state_dict")
    out: OrderedDict[str, Tensor] = OrderedDict(
        (name, perm.permute_tensor(name, t) if name in perm.spec.axes else t.clone()) for name, t in state.items()
    )
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    return out


def apply_permutation(model: nn.Module, perm: Permutation, *, inplace: bool = False) -> nn.Module:
    """Permute a model's parameters and buffers (BatchNorm running stats included).

    Args:
        model: the model; copied with ``copy.deepcopy`` unless ``inplace``.
        perm: a permutation of a spec built for this architecture.
        inplace: permute ``model`` itself.

    Returns:
        The permuted model, which computes the same function as ``model``.

    Raises:
        SpecMismatchError: the model's tensors do not match the spec.
    """
    stale = sorted(plain_tensors(model) - perm.spec.plain_tensors)
    if stale:
        raise SpecError(
            f"Tensor attribute {stale[0]} of the model appeared after its spec was built (a cache that forward "
            f"filled{f', and {len(stale) - 1} more' if len(stale) > 1 else ''}); a permutation cannot update it, so "
            "the permuted model would compute with the old values. Clear the cache before permuting (for "
            "transformers' LeViT, model.train() then model.eval()), or register the tensor as a buffer."
        )
    state = model.state_dict()
    new_state = permute_state_dict(state, perm)
    target = model if inplace else copy.deepcopy(model, _graph_free_memo(model))
    target.load_state_dict(new_state)
    with torch.no_grad():
        for name in perm.spec.nonpersistent:  # opted-in buffers outside the state_dict
            buffer = target.get_buffer(name)
            buffer.copy_(perm.permute_tensor(name, buffer))
    return target


def _graph_free_memo(model: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo that copies tensor attributes outside parameters and
    buffers which carry autograd history (``torch.nn.utils.prune``'s
    ``weight = weight_orig * weight_mask``, recomputed before every forward)
    as detached clones: deepcopy refuses non-leaf tensors."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for key, value in vars(module).items():
            if isinstance(value, Tensor) and not key.startswith("_") and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return memo


def permute_mask(masks: Mapping[str, Tensor], perm: Permutation) -> dict[str, Tensor]:
    """Permute pruning masks (``param name -> bool tensor``) with ``perm``.

    For weights ``w`` and masks ``m``: ``pi(w * m) == pi(w) * pi(m)`` and every
    mask keeps its number of kept entries (per-layer sparsity). With ``perm``
    from ``match_*(model_a, model_b)``, ``permute_mask(mask_a, perm)`` is the
    mask for ``model_b`` (Adnan et al., ICML 2025, Sec. 3).

    Keys are parameter names; for a model in ``torch.nn.utils.prune`` form the
    logical names (``"conv.weight"`` for ``conv.weight_orig``) are accepted.

    Raises:
        MaskError: a key that is not a parameter of the spec, a shape mismatch,
            or a non-bool mask.
    """
    out: dict[str, Tensor] = {}
    for name, mask in masks.items():
        if name not in perm.spec.parameters and name not in perm.spec.logical:
            kind = "a buffer, not a parameter," if name in perm.spec.axes else "not a parameter"
            raise MaskError(f"mask key '{name}' is {kind} of the permutation spec's model")
        if mask.dtype != torch.bool:
            raise MaskError(f"mask '{name}' has dtype {mask.dtype}; pass a bool mask (e.g. `mask != 0`)")
        shape = perm.spec.shapes[perm.spec.logical.get(name, name)]
        if tuple(mask.shape) != shape:
            raise MaskError(f"mask '{name}' has shape {tuple(mask.shape)} but the parameter has {shape}")
        out[name] = perm.permute_tensor(name, mask)
    return out


def _check_same_spec(a: PermutationSpec, b: PermutationSpec) -> None:
    if a.fingerprint != b.fingerprint:
        raise SpecMismatchError("the two permutations belong to different permutation specs")
