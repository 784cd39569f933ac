"""Permutations of a spec's groups, and applying them to models, state_dicts and masks.

Convention (used everywhere in maskalign): a permutation holds, per group, an
index tensor ``idx`` of shape ``(size,)``, and applying it to an axis of that
group selects ``new[j] = old[idx[j]]`` (``torch.index_select``). Matching
``match_*(a, b)`` returns ``pi`` with ``apply_permutation(a, pi)`` aligned to
``b``: unit ``idx[j]`` of A plays the role of unit ``j`` of B, so
``permute_mask(mask_a, pi)`` is A's mask expressed in B's units.

Safety: a permutation is applied only to the model it belongs to. Its spec
carries the graph's fingerprint (tensor names, shapes and which axes share a
permutation: :attr:`PermutationSpec.fingerprint`) and the class of every
module that holds tensors (:attr:`PermutationSpec.module_types`).
:func:`apply_permutation` compares the model's tensor names, shapes and module
classes with those (microseconds to milliseconds, no graph capture); pass
``spec=build_spec(model, x)`` to compare the full wiring too. A mismatch
raises :class:`~maskalign.SpecMismatchError` naming the first difference.
Tensors that share storage (a parameter that is a view of another, a ``.data``
alias kept elsewhere) are never written inconsistently or behind the user's
back: see :func:`apply_permutation`.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._utils.fileio import atomic_write
from ._utils.modes import plain_tensors
from .errors import ArgumentTypeError, MaskError, MissingFileError, SpecError, SpecMismatchError, _did_you_mean
from .errors import _describe as _describe_value
from .sparse.masks import _check_mask_set, _unknown_name_message
from .spec.axes import AxisTree, Concat, Leaf, Product, groups_of, index_vector
from .spec.permutation_spec import PermutationSpec, module_types, storage_sharing

__all__ = [
    "Permutation",
    "apply_permutation",
    "check_same_architecture",
    "permute_mask",
    "permute_state_dict",
    "random_permutation",
]

FORMAT = "maskalign.Permutation/2"
"""Format tag of the files :meth:`Permutation.save` writes."""

_LEGACY_FORMAT = "maskalign.Permutation/1"
"""Files of maskalign <= 0.x: fingerprint and indices only (no module
classes or axes). They load when the fingerprint matches, which checks the
same names, shapes and wiring; module classes are then not compared."""

_REBUILD = "build the permutation from this model's spec (ma.build_spec(model, example_inputs))"


class Permutation(Mapping[str, Tensor]):
    """One permutation (an int64 index tensor) per group of a :class:`PermutationSpec`.

    Behaves as a read-only mapping ``group name -> index tensor``. It belongs
    to the architecture of its spec: :attr:`fingerprint` (names, shapes,
    wiring) and ``spec.module_types`` are what :func:`apply_permutation`,
    :meth:`save` and :meth:`load` check.

    Args:
        spec: the spec the permutation belongs to.
        indices: group name -> 1-D integer tensor (or list of ints) of length
            ``group.size`` holding a permutation of ``range(group.size)``.
            Missing groups are identity. The tensors are copied.
        report: optional diagnostics from the matcher that produced it.

    Raises:
        ArgumentTypeError: ``spec`` is not a :class:`PermutationSpec`, or
            ``indices`` / ``report`` is not a mapping.
        SpecError: a group is not in the spec (close names are suggested),
            or indices are not integers (float indices such as 3.9 are
            refused, never truncated), not 1-D, of the wrong length, out of
            range or repeated.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        indices: Mapping[str, Tensor | Sequence[int]],
        report: Mapping[str, Any] | None = None,
    ) -> None:
        self._init(spec, indices, report, "")

    def _init(self, spec: Any, indices: Any, report: Any, where: str) -> None:
        """Validate and store; ``where`` (e.g. ``" in perm.pt"``) goes into messages."""
        spec = _require_spec(spec, "spec", "Permutation")
        if not isinstance(indices, Mapping):
            raise ArgumentTypeError(
                f"Argument 'indices' of Permutation{where} is {_describe(indices)}; pass a dict mapping group name -> "
                f"index tensor (the spec's groups: {_listing(spec.groups)})."
            )
        for name in indices:
            if name not in spec.groups:
                raise SpecError(_unknown_group_message(name, spec, where))
        if report is not None and not isinstance(report, Mapping):
            raise ArgumentTypeError(f"Argument 'report' of Permutation is {_describe(report)}; pass a dict or None.")
        self.spec = spec
        self.report: dict[str, Any] = dict(report or {})
        self._indices: dict[str, Tensor] = {}
        for name, group in spec.groups.items():
            value = indices.get(name)
            self._indices[name] = (
                torch.arange(group.size) if value is None else _as_index(name, value, group.size, where)
            )

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the graph its spec came from (:attr:`PermutationSpec.fingerprint`)."""
        return self.spec.fingerprint

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
        """The permutation that undoes this one: ``apply(apply(x, p), p.inverse()) == x``.

        Returns:
            A new :class:`Permutation` of the same spec whose index tensor of
            each group is the inverse of this one's (``inv[idx[j]] = j``).
        """
        inv = {}
        for name, idx in self._indices.items():
            out = torch.empty_like(idx)
            out[idx] = torch.arange(idx.numel())
            inv[name] = out
        return Permutation(self.spec, inv)

    def compose(self, then: Permutation) -> Permutation:
        """Apply ``self`` first, then ``then``: ``apply(x, p.compose(q)) == apply(apply(x, p), q)``.

        Args:
            then: the permutation applied second, of the same spec as ``self``.

        Returns:
            A new :class:`Permutation` of the same spec, with per group the
            indices ``self[g][then[g]]``.

        Raises:
            ArgumentTypeError: ``then`` is not a :class:`Permutation`.
            SpecMismatchError: ``then`` belongs to another spec (the first
                difference is named).
        """
        then = _require_permutation(then, "then", "Permutation.compose")
        _check_same_spec(self.spec, then.spec)
        return Permutation(self.spec, {g: self[g][then[g]] for g in self})

    def is_identity(self) -> bool:
        """Whether every group's indices are ``arange(size)``.

        Returns:
            ``True`` when applying the permutation changes nothing.
        """
        return all(torch.equal(idx, torch.arange(idx.numel())) for idx in self._indices.values())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index tensors and the spec's fingerprint to ``path``
        atomically, in a format that loads without executing pickled code
        (``torch.load(weights_only=True)``).

        The file also records the spec's module classes and axis trees, so
        that :meth:`load` with another spec names the first difference.

        Args:
            path: the file to write (a ``str`` or ``os.PathLike``); missing
                parent folders are created and an existing file is replaced.

        Raises:
            ArgumentTypeError: ``path`` is not a path.
            SpecError: ``path`` is a directory.
        """
        path = _require_path(path, "Permutation.save")
        if os.path.isdir(path):
            raise SpecError(
                f"{path} is a directory; pass a file path for Permutation.save, e.g. {Path(path) / 'perm.pt'}."
            )
        spec = self.spec
        payload = {
            "format": FORMAT,
            "fingerprint": spec.fingerprint,
            "modules": dict(spec.module_types),
            "shapes": {name: list(shape) for name, shape in spec.shapes.items()},
            "axes": {name: [_encode_tree(tree) for tree in trees] for name, trees in spec.axes.items()},
            "indices": dict(self._indices),
        }
        atomic_write(path, lambda handle: torch.save(payload, handle), mode="wb")

    @classmethod
    def load(cls, path: str | os.PathLike[str], spec: PermutationSpec) -> Permutation:
        """Read a permutation written by :meth:`save` for ``spec``.

        Files of the first format (``maskalign.Permutation/1``, no module
        classes recorded) load when their fingerprint matches ``spec``'s,
        which checks the same tensor names, shapes and wiring.

        Args:
            path: a file written by :meth:`save` (a ``str`` or ``os.PathLike``).
            spec: the spec of the model the permutation is for; its
                fingerprint must equal the one in the file.

        Returns:
            The :class:`Permutation` of ``spec`` held in the file (without
            the matcher's ``report``).

        Raises:
            SpecMismatchError: the file was saved for another spec (its
                fingerprint differs); the first difference is named when the
                file records its spec's structure.
            ArgumentTypeError: ``spec`` is not a spec, or ``path`` not a path.
            SpecError: ``path`` is a directory, or the file is not a saved
                permutation (not a torch file, no ``fingerprint`` or
                ``indices`` entry, indices that are not a dict of integer
                index tensors); the message names the file and the entry.
            MissingFileError: ``path`` does not exist (also a
                ``FileNotFoundError``).
        """
        spec = _require_spec(spec, "spec", "Permutation.load")
        path = _require_path(path, "Permutation.load")
        if os.path.isdir(path):
            raise SpecError(
                f"{path} is a directory, not a permutation file; pass the file that Permutation.save wrote "
                f"(e.g. {Path(path) / 'perm.pt'})."
            )
        if not os.path.exists(path):
            raise MissingFileError(f"{path} does not exist; pass the file that Permutation.save wrote.")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
            raise SpecError(
                f"{path} is not a permutation saved by maskalign ({type(exc).__name__}); write permutations with "
                "perm.save(path) and read them with ma.Permutation.load(path, spec)."
            ) from exc
        payload = _check_payload(path, payload, spec)
        if payload["fingerprint"] != spec.fingerprint:
            raise SpecMismatchError(
                f"{path} was saved for a spec with fingerprint {payload['fingerprint']}, not for this spec "
                f"(fingerprint {spec.fingerprint}): {_file_difference(payload, spec)}. Load it with the spec of the "
                "model it was made for, or rebuild the permutation from this model's spec."
            )
        perm = cls.__new__(cls)
        perm._init(spec, payload["indices"], None, f" in {path}")
        return perm

    def permute_tensor(self, name: str, tensor: Tensor) -> Tensor:
        """Permute ``tensor`` as the ``state_dict`` entry ``name`` of the spec.

        ``tensor`` itself is not modified.

        Args:
            name: a ``state_dict`` key of the spec's model (a parameter or
                buffer name).
            tensor: a tensor of the spec's shape for ``name``, on any device.

        Returns:
            A new tensor of the same shape, dtype and device, with every
            permuted axis reordered by ``index_select``.

        Raises:
            SpecError: ``name`` is not in the spec (close names are suggested).
            ArgumentTypeError: ``tensor`` is not a tensor.
            SpecMismatchError: ``tensor`` does not have the spec's shape.
        """
        key = name if name in self.spec.axes else self.spec.logical.get(name, name)
        axes = self.spec.axes.get(key)
        if axes is None:
            hint = _did_you_mean(name, self.spec.axes)
            raise SpecError(f"Tensor {name!r} is not a parameter or buffer of the spec's model.{hint}")
        if not isinstance(tensor, Tensor):
            raise ArgumentTypeError(
                f"Value for {name!r} is {_describe(tensor)}; pass a tensor of shape {self.spec.shapes[key]}."
            )
        expected = self.spec.shapes[key]
        if tuple(tensor.shape) != expected:
            raise SpecMismatchError(
                f"'{name}' has shape {tuple(tensor.shape)} but the spec expects {expected}; pass the tensor of a "
                "model of the spec's architecture, or build the spec from this model."
            )
        out = tensor
        for d, tree in enumerate(axes):
            if next(groups_of(tree), None) is not None:
                out = out.index_select(d, index_vector(tree, self._indices).to(tensor.device))
        return out.clone() if out is tensor else out


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> Permutation:
    """A uniformly random permutation of every group of ``spec`` (``torch.randperm``).

    Args:
        spec: the spec whose groups are permuted.
        generator: optional CPU ``torch.Generator`` for reproducible draws;
            ``None`` uses the global generator.

    Returns:
        A :class:`Permutation` of ``spec``.

    Raises:
        ArgumentTypeError: ``spec`` is not a :class:`PermutationSpec`, or
            ``generator`` is not a CPU ``torch.Generator`` (pass
            ``torch.Generator().manual_seed(seed)`` for a seed).
    """
    spec = _require_spec(spec, "spec", "random_permutation")
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        seed = generator if isinstance(generator, int) and not isinstance(generator, bool) else "seed"
        what = f"a {generator.device.type} torch.Generator" if isinstance(generator, torch.Generator) else None
        raise ArgumentTypeError(
            f"Argument 'generator' of random_permutation is {what or _describe(generator)}; pass a CPU generator, "
            f"torch.Generator().manual_seed({seed}), or None."
        )
    return Permutation(spec, {name: torch.randperm(g.size, generator=generator) for name, g in spec.groups.items()})


def check_same_architecture(
    state: Mapping[str, Tensor] | nn.Module, spec: PermutationSpec, what: str = "model"
) -> None:
    """Raise :class:`SpecMismatchError` unless ``state`` (a ``state_dict`` or
    a model) has exactly the spec's tensors with the spec's shapes; for a
    model, its module classes are compared with ``spec.module_types`` too.

    Tensors of more than one element that the spec does not know (an extra
    layer) count as a difference; scalars are ignored.

    Args:
        state: a model's ``state_dict()``, or the model itself.
        spec: the spec to compare with.
        what: what ``state`` is called in the messages (``"model"``,
            ``"state_dict"``).

    Raises:
        SpecMismatchError: naming the first missing, extra or differently
            shaped tensor, or the first module of another class.
        ArgumentTypeError: ``state`` is not a mapping or a model, a value of
            a spec tensor is not a tensor, or ``spec`` is not a spec.
    """
    spec = _require_spec(spec, "spec", "check_same_architecture")
    if isinstance(state, nn.Module):
        _check_state(state.state_dict(keep_vars=True), spec, what)
        _check_modules(state, spec, f" of {what}", "the spec's model")
        return
    if not isinstance(state, Mapping):
        raise ArgumentTypeError(
            f"Argument 'state' of check_same_architecture is {_describe(state)}; pass a model or its state_dict()."
        )
    _check_state(state, spec, what)


def permute_state_dict(
    state: Mapping[str, Tensor], perm: Permutation, *, spec: PermutationSpec | None = None
) -> dict[str, Tensor]:
    """A new ``state_dict`` with every tensor of ``perm.spec`` permuted.

    Entries that the spec does not know (scalars, non-tensor extra state) are
    copied unchanged. ``state`` is not modified. The per-module version
    metadata of a ``Module.state_dict()`` (its ``_metadata`` attribute, which
    ``_load_from_state_dict`` of e.g. torchvision's MNASNet reads) is kept.

    Source: the permutation symmetry of hidden units (Hecht-Nielsen 1990;
    Ainsworth et al., "Git Re-Basin", ICLR 2023, Sec. 2): permuting a
    hidden axis and every axis that shares its units keeps the function.

    Args:
        state: a model's ``state_dict()``.
        perm: a permutation of a spec built for this architecture.
        spec: optionally the spec of the model ``state`` comes from
            (``build_spec(model, x)``): then its wiring is compared with
            ``perm.spec``'s as well, not only names and shapes.

    Returns:
        A new ``state_dict`` (an ``OrderedDict``, in the order of ``state``)
        of new tensors; ``state`` is not modified.

    Raises:
        SpecMismatchError: a tensor of the spec is missing, extra or has
            another shape, or ``spec`` is wired differently from ``perm.spec``.
        ArgumentTypeError: an argument has the wrong type (a model for
            ``state``, swapped arguments, a non-tensor entry).
    """
    if isinstance(state, Permutation):
        raise ArgumentTypeError("Argument 'state' is a Permutation; call permute_state_dict(state, perm).")
    if isinstance(state, nn.Module):
        raise ArgumentTypeError(
            f"Argument 'state' of permute_state_dict is {_describe(state)}; pass model.state_dict(), or permute "
            "the model itself with ma.apply_permutation(model, perm)."
        )
    if not isinstance(state, Mapping):
        raise ArgumentTypeError(
            f"Argument 'state' of permute_state_dict is {_describe(state)}; pass a model's state_dict()."
        )
    perm = _require_permutation(perm, "perm", "permute_state_dict")
    if spec is not None:
        spec = _require_spec(spec, "spec", "permute_state_dict")
        _check_state(state, spec, "state_dict")
        _check_wiring(spec, perm.spec)
    check_same_architecture(state, perm.spec, "state_dict")
    out: OrderedDict[str, Tensor] = OrderedDict()
    for name, value in state.items():
        if name in perm.spec.axes:
            out[name] = perm.permute_tensor(name, value)
        else:
            out[name] = value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    return out


def apply_permutation(
    model: nn.Module, perm: Permutation, *, inplace: bool = False, spec: PermutationSpec | None = None
) -> nn.Module:
    """Permute a model's parameters and buffers (BatchNorm running stats included).

    Before anything is written, the model is checked against the permutation:
    its tensor names and shapes (extra or missing tensors included), then the
    class of every module that holds tensors (``perm.spec.module_types``), so
    that a permutation of a plain block applied to a same-shaped residual
    block raises instead of silently changing the function. Those checks are
    cheap (about a millisecond for a ResNet20) and run no graph capture. The
    wiring inside modules of the same classes (a flag that adds a residual
    connection) is compared only when ``spec``, the model's own spec, is
    given.

    Source: the permutation symmetry of hidden units (Hecht-Nielsen 1990;
    Ainsworth et al., "Git Re-Basin", ICLR 2023, Sec. 2): permuting a
    hidden axis and every axis that shares its units keeps the function.

    Tensors that share one storage (``dec.weight = nn.Parameter(enc.weight.t())``)
    are permuted only when the permutation keeps the shared storage
    consistent, and keep sharing it (in a copy too); ``inplace=True`` refuses
    a model whose tensors share storage with a tensor outside it (a ``.data``
    alias, a ``state_dict()`` kept from before), which it would overwrite too.

    Args:
        model: the model; copied with ``copy.deepcopy`` unless ``inplace``.
        perm: a permutation of a spec built for this architecture.
        inplace: permute ``model`` itself.
        spec: optionally ``build_spec(model, example_inputs)``, for a full
            comparison of the wiring (costs a graph capture, about a second
            for a ResNet20, when built).

    Returns:
        The permuted model, which computes the same function as ``model``.

    Raises:
        SpecMismatchError: the model's tensors, module classes or (with
            ``spec``) wiring differ from the permutation's; the first
            difference is named.
        ArgumentTypeError: an argument has the wrong type (swapped
            arguments, a state_dict for ``model``, a spec for ``perm``).
        SpecError: a cache tensor appeared after the spec was built; tensors
            share storage in a way this permutation cannot keep, or
            (``inplace=True``) with tensors outside the model.
    """
    if isinstance(model, Permutation) and isinstance(perm, nn.Module):
        raise ArgumentTypeError(
            "Argument 'model' is a Permutation and 'perm' a model; call apply_permutation(model, perm)."
        )
    if not isinstance(model, nn.Module):
        hint = (
            "for a state_dict call ma.permute_state_dict(state, perm)"
            if isinstance(model, Mapping)
            else "pass the nn.Module to permute"
        )
        raise ArgumentTypeError(f"Argument 'model' of apply_permutation is {_describe(model)}; {hint}.")
    perm = _require_permutation(perm, "perm", "apply_permutation")
    if not isinstance(inplace, bool):
        raise ArgumentTypeError(f"Argument 'inplace' of apply_permutation is {_describe(inplace)}; pass True or False.")
    stale = sorted(plain_tensors(model) - perm.spec.plain_tensors)
    if stale:
        raise SpecError(
            f"Tensor attribute {stale[0]} of the model appeared after its spec was built (a cache that forward "
            f"filled{f', and {len(stale) - 1} more' if len(stale) > 1 else ''}); a permutation cannot update it, so "
            "the permuted model would compute with the old values. Clear the cache before permuting (for "
            "transformers' LeViT, model.train() then model.eval()), or register the tensor as a buffer."
        )
    live = _written_tensors(model, perm.spec)
    _check_state(live, perm.spec, "model")
    _check_modules(model, perm.spec, "", "the permutation's model")
    if spec is not None:
        spec = _require_spec(spec, "spec", "apply_permutation")
        _check_state(live, spec, "model (against spec=)")
        _check_modules(model, spec, "", "the spec passed as spec=")
        _check_wiring(spec, perm.spec)
    if inplace:
        _check_outside_aliases(model, live)
    new_state = permute_state_dict(model.state_dict(), perm)
    new_values = {
        name: new_state[name] if name in new_state else perm.permute_tensor(name, t) for name, t in live.items()
    }
    shared = [(names, _shared_contents(names, live, new_values)) for names in storage_sharing(live)]
    target = model if inplace else copy.deepcopy(model, _graph_free_memo(model))
    target.load_state_dict(new_state)
    with torch.no_grad():
        for name in perm.spec.nonpersistent:  # opted-in buffers outside the state_dict
            target.get_buffer(name).copy_(new_values[name])
        if shared and not inplace:  # deepcopy gives each Parameter its own storage: share it again
            copied = _written_tensors(target, perm.spec)
            for names, contents in shared:
                for name in names:
                    old = live[name]
                    copied[name].set_(contents, old.storage_offset(), old.shape, old.stride())
    return target


def permute_mask(
    masks: Mapping[str, Tensor], perm: Permutation, *, spec: PermutationSpec | None = None
) -> dict[str, Tensor]:
    """Permute pruning masks (``param name -> bool tensor``) with ``perm``.

    For weights ``w`` and masks ``m``: ``pi(w * m) == pi(w) * pi(m)`` and every
    mask keeps its number of kept entries (per-layer sparsity). With ``perm``
    from ``match_*(model_a, model_b)``, ``permute_mask(mask_a, perm)`` is the
    mask for ``model_b`` (Adnan et al., ICML 2025, Sec. 3).

    Keys are parameter names; for a model in ``torch.nn.utils.prune`` form the
    logical names (``"conv.weight"`` for ``conv.weight_orig``) are accepted.

    Source: the permuted masks of Adnan et al., "Sparse Training from Random
    Initialization: Aligning Lottery Ticket Masks using Weight Symmetry",
    ICML 2025, Sec. 3.

    Args:
        masks: parameter name -> dense ``torch.bool`` mask of the parameter's shape.
        perm: the permutation.
        spec: optionally the spec of the model the masks belong to: its
            wiring is compared with ``perm.spec``'s.

    Returns:
        A new dict, name -> permuted ``torch.bool`` mask (same shapes as
        ``masks``); ``masks`` is not modified.

    Raises:
        ArgumentTypeError: ``masks`` is not a mapping (a Permutation:
            swapped arguments; a model; a list of pairs; ``None``), or
            ``perm`` is not a :class:`Permutation`.
        MaskError: a key that is not a parameter of the spec (close names
            are suggested, in the wording of :func:`~maskalign.validate_masks`),
            a value that is not a dense tensor, a shape mismatch, or a
            non-bool mask.
        SpecMismatchError: ``spec`` is wired differently from ``perm.spec``.

    Example:
        >>> import torch, maskalign as ma
        >>> from maskalign.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MLP(in_features=64, hidden=(32, 32), num_classes=10)
        >>> spec = ma.build_spec(model, torch.randn(2, 64))
        >>> pi = ma.random_permutation(spec, torch.Generator().manual_seed(1))
        >>> mask = ma.global_magnitude_prune(model, sparsity=0.5)
        >>> mask_b = ma.permute_mask(mask, pi)
        >>> all(int(mask_b[n].sum()) == int(mask[n].sum()) for n in mask)  # per-layer density kept
        True
        >>> w, m = model.layers[0].weight.detach(), mask["layers.0.weight"]
        >>> permute = lambda t: pi.permute_tensor("layers.0.weight", t)
        >>> torch.equal(permute(w * m), permute(w) * permute(m))
        True
    """
    if isinstance(masks, Permutation):
        raise ArgumentTypeError("Argument 'masks' is a Permutation; call permute_mask(masks, perm).")
    masks = _check_mask_set(masks)
    perm = _require_permutation(perm, "perm", "permute_mask")
    if spec is not None:
        _check_wiring(_require_spec(spec, "spec", "permute_mask"), perm.spec)
    parameters = [n for n in perm.spec.axes if n in perm.spec.parameters] + list(perm.spec.logical)
    out: dict[str, Tensor] = {}
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise MaskError(
                f"Mask key {name!r} is a {type(name).__name__}, not a parameter name; key masks by the "
                "names (str) of model.named_parameters()."
            )
        if name not in perm.spec.parameters and name not in perm.spec.logical:
            if name in perm.spec.axes:
                raise MaskError(
                    f"Mask key {name!r} is a buffer, not a parameter, of the permutation spec's model; masks cover "
                    "parameters only: drop it."
                )
            raise MaskError(_unknown_name_message(name, parameters, "Mask key"))
        if not isinstance(mask, Tensor):
            raise MaskError(
                f"Mask for {name!r} is a {type(mask).__name__}, expected a torch.bool tensor; "
                "convert it with torch.as_tensor(mask, dtype=torch.bool)."
            )
        if mask.layout != torch.strided:
            raise MaskError(
                f"Mask for {name!r} is a {mask.layout} tensor; pass a dense torch.bool tensor (mask.to_dense())."
            )
        shape = perm.spec.shapes[perm.spec.logical.get(name, name)]
        if tuple(mask.shape) != shape:
            raise MaskError(
                f"Mask for {name!r} has shape {tuple(mask.shape)} but the parameter has shape {shape}; pass a mask "
                "of the parameter's shape."
            )
        if mask.dtype != torch.bool:
            raise MaskError(
                f"Mask for {name!r} has dtype {mask.dtype}, expected torch.bool; "
                "convert it with `mask.bool()` or `mask != 0`."
            )
        out[name] = perm.permute_tensor(name, mask)
    return out


# ------------------------------------------------------------------ checks
def _describe(value: object) -> str:
    """:func:`maskalign.errors._describe` (one wording across the package),
    naming a model as ``a model (Net)`` and a Permutation or spec by its class."""
    if isinstance(value, nn.Module):
        return f"a model ({type(value).__name__})"
    if isinstance(value, (Permutation, PermutationSpec)):
        return f"a {type(value).__name__}"
    return _describe_value(value)


def _listing(names: Sequence[str] | Mapping[str, Any], limit: int = 5) -> str:
    """The first ``limit`` names, and how many more."""
    names = list(names)
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more if names else "none"


def _require_spec(value: Any, argument: str, function: str) -> PermutationSpec:
    """``value`` if it is a spec, else a :class:`SpecError` saying what to pass."""
    if isinstance(value, PermutationSpec):
        return value
    if isinstance(value, Permutation):
        hint = f"pass its spec, {argument}=perm.spec"
    elif isinstance(value, nn.Module):
        hint = "build the model's spec with ma.build_spec(model, example_inputs) and pass that"
    else:
        hint = "pass the PermutationSpec from ma.build_spec(model, example_inputs)"
    raise ArgumentTypeError(f"Argument '{argument}' of {function} is {_describe(value)}; {hint}.")


def _require_permutation(value: Any, argument: str, function: str) -> Permutation:
    """``value`` if it is a permutation, else a :class:`SpecError` saying what to pass."""
    if isinstance(value, Permutation):
        return value
    if isinstance(value, PermutationSpec):
        hint = "pass a Permutation of it (ma.random_permutation(spec), ma.match_weights(a, b, spec))"
    elif isinstance(value, Mapping):
        hint = "wrap index tensors as ma.Permutation(spec, indices)"
    else:
        hint = "pass the Permutation from ma.match_weights, ma.match_activations or ma.random_permutation"
    raise ArgumentTypeError(f"Argument '{argument}' of {function} is {_describe(value)}; {hint}.")


def _require_path(value: Any, function: str) -> str | os.PathLike[str]:
    """``value`` if it is a path, else a :class:`SpecError`."""
    if isinstance(value, (str, os.PathLike)):
        return value
    hint = (
        " (to build a permutation from index tensors, use ma.Permutation(spec, indices))"
        if isinstance(value, Mapping)
        else ""
    )
    raise ArgumentTypeError(f"Argument 'path' of {function} is {_describe(value)}; pass a file path{hint}.")


def _unknown_group_message(name: object, spec: PermutationSpec, where: str) -> str:
    """Message for a group name that is not in the spec, with close names."""
    hint = _did_you_mean(name, spec.groups)
    return (
        f"Group {name!r}{where} is not a group of the spec.{hint} Pass indices only for the spec's groups "
        f"({_listing(spec.groups)})."
    )


def _as_index(group: str, value: Any, size: int, where: str) -> Tensor:
    """``value`` as a fresh CPU int64 permutation of ``range(size)``, or a
    :class:`SpecError` naming the group and what is wrong."""
    culprit = f"Indices for group {group!r}{where}"
    if isinstance(value, Tensor):
        idx = value.detach()
    else:
        try:
            idx = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SpecError(
                f"{culprit} are {_describe(value)}; pass a 1-D integer tensor holding a permutation of range({size})."
            ) from exc
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise SpecError(
            f"{culprit} have dtype {idx.dtype}; pass integer indices (torch.long): float indices are refused, "
            "not truncated (3.9 would become 3)."
        )
    if idx.ndim != 1:
        raise SpecError(f"{culprit} have shape {tuple(idx.shape)}; pass a 1-D tensor of shape ({size},).")
    if idx.numel() != size:
        raise SpecError(
            f"{culprit} have length {idx.numel()} but the group has {size} units; pass a permutation of range({size})."
        )
    idx = idx.to("cpu", torch.long, copy=True)
    if size:
        outside = idx[(idx < 0) | (idx >= size)]
        if outside.numel():
            raise SpecError(
                f"{culprit} hold {int(outside[0])}, outside range({size}); pass a permutation of range({size})."
            )
        counts = torch.bincount(idx, minlength=size)
        repeated = torch.nonzero(counts > 1).flatten()
        if repeated.numel():
            unit = int(repeated[0])
            raise SpecError(
                f"{culprit} hold {unit} {int(counts[unit])} times (and miss {int(torch.nonzero(counts == 0)[0])}); "
                f"pass a permutation of range({size}), each unit once."
            )
    return idx


def _check_state(state: Mapping[str, Any], spec: PermutationSpec, what: str) -> None:
    """Names, types and shapes of ``state`` against the spec (see
    :func:`check_same_architecture`)."""
    missing = [name for name in spec.axes if name not in state and name not in spec.nonpersistent]
    if missing:
        nested = next((k for k, v in state.items() if isinstance(v, Mapping) and any(n in v for n in spec.axes)), None)
        if nested is not None:
            raise SpecMismatchError(
                f"{what} has no tensor {missing[0]!r} but holds a state_dict under key {nested!r}; pass "
                f"checkpoint[{nested!r}], not the whole checkpoint."
            )
        raise SpecMismatchError(
            f"{what} has no tensor(s) {missing[:5]} that the permutation spec expects; "
            f"was the spec built from another architecture? Then {_REBUILD}."
        )
    for name, shape in spec.shapes.items():
        if name not in state:
            continue
        value = state[name]
        if not isinstance(value, Tensor):
            raise ArgumentTypeError(
                f"Entry {name!r} of {what} is {_describe(value)}, not a tensor; pass model.state_dict()."
            )
        if tuple(value.shape) != shape:
            raise SpecMismatchError(
                f"{what}: '{name}' has shape {tuple(value.shape)} but the spec expects {shape}; {_REBUILD}."
            )
    extra = [
        name
        for name, value in state.items()
        if name not in spec.axes and isinstance(value, Tensor) and value.numel() > 1
    ]
    if extra:
        raise SpecMismatchError(
            f"{what} has tensor {extra[0]!r} (shape {tuple(state[extra[0]].shape)}) that the permutation spec does "
            f"not know{f', and {len(extra) - 1} more' if len(extra) > 1 else ''}, so it would be left unpermuted; "
            f"{_REBUILD}."
        )


def _article(name: str) -> str:
    return f"an {name}" if name[:1].upper() in "AEIOU" else f"a {name}"


def _module_difference(here: Mapping[str, str], there: Mapping[str, str], of_what: str, there_label: str) -> str | None:
    """The first module path whose class differs between ``here`` and
    ``there`` (module path -> class name), as a sentence; ``None`` when they
    agree or either is unknown (empty)."""
    if not here or not there:
        return None

    def module(path: str) -> str:
        return f"The model{of_what}" if path == "" else f"Module {path!r}{of_what}"

    for path, cls in here.items():
        other = there.get(path)
        if other is None:
            return f"{module(path)} ({cls}) holds tensors here but not in {there_label}"
        if other != cls:
            return f"{module(path)} is {_article(cls)} here but {_article(other)} in {there_label}"
    for path, cls in there.items():
        if path not in here:
            return f"{module(path)} ({cls} in {there_label}) holds no tensors here"
    return None


def _check_modules(model: nn.Module, spec: PermutationSpec, of_what: str, there_label: str) -> None:
    """:class:`SpecMismatchError` when a module of ``model`` has another class
    than in ``spec.module_types``."""
    difference = _module_difference(module_types(model), spec.module_types, of_what, there_label)
    if difference is not None:
        raise SpecMismatchError(f"{difference}; {_REBUILD}.")


def _tree_text(tree: AxisTree) -> str:
    """``group 'a'``, ``no group (not permuted)``, ``groups ('a' x -)`` for messages."""

    def short(t: AxisTree) -> str:
        if isinstance(t, Leaf):
            return repr(t.group) if t.group is not None else f"-[{t.size}]"
        joiner = " x " if isinstance(t, Product) else ", "
        inner = joiner.join(short(p) for p in t.parts)
        return f"({inner})" if isinstance(t, Product) else f"cat({inner})"

    if isinstance(tree, Leaf):
        return f"group {tree.group!r}" if tree.group is not None else "no group (not permuted)"
    return f"groups {short(tree)}"


def _structure_difference(
    axes: Mapping[str, Sequence[AxisTree]],
    shapes: Mapping[str, Sequence[int]],
    other_axes: Mapping[str, Sequence[AxisTree]],
    other_shapes: Mapping[str, Sequence[int]],
    there: str,
) -> str | None:
    """The first difference of names, shapes or axis trees between a spec
    (``axes``, ``shapes``: "here") and another (``there``), as a sentence."""
    for name in axes:
        if name not in other_axes:
            return f"Tensor {name!r} is in this model but not in {there}"
    for name in other_axes:
        if name not in axes:
            return f"Tensor {name!r} of {there} is not in this model"
    for name in axes:
        if tuple(shapes[name]) != tuple(other_shapes[name]):
            return f"Tensor {name!r} has shape {tuple(shapes[name])} here but {tuple(other_shapes[name])} in {there}"
    for name, trees in axes.items():
        for d, (mine, theirs) in enumerate(zip(trees, other_axes[name])):
            if mine != theirs:
                return (
                    f"Axis {d} of {name!r} is in {_tree_text(mine)} here but in {_tree_text(theirs)} in {there}: "
                    "the models are wired differently (a residual connection, a shared weight)"
                )
    return None


def _check_wiring(spec: PermutationSpec, perm_spec: PermutationSpec) -> None:
    """:class:`SpecMismatchError` when the model's ``spec`` and the
    permutation's differ in names, shapes or wiring."""
    if spec.fingerprint == perm_spec.fingerprint:
        return
    difference = _structure_difference(
        spec.axes, spec.shapes, perm_spec.axes, perm_spec.shapes, "the permutation's model"
    ) or (f"The model's spec has fingerprint {spec.fingerprint} but the permutation's {perm_spec.fingerprint}")
    raise SpecMismatchError(f"{difference}; {_REBUILD}.")


def _check_same_spec(a: PermutationSpec, b: PermutationSpec) -> None:
    if a.fingerprint != b.fingerprint:
        difference = _structure_difference(a.axes, a.shapes, b.axes, b.shapes, "the spec of 'then'")
        raise SpecMismatchError(
            f"Permutation 'then' belongs to another permutation spec (fingerprint {b.fingerprint}, not "
            f"{a.fingerprint}){f': {difference}' if difference else ''}; compose permutations of one spec."
        )


# ---------------------------------------------------------------- storage
def _written_tensors(model: nn.Module, spec: PermutationSpec) -> dict[str, Tensor]:
    """The tensors :func:`apply_permutation` writes, as the objects themselves:
    the ``state_dict`` entries and the spec's opted-in non-persistent buffers."""
    live = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, Tensor)}
    for name in spec.nonpersistent:
        try:
            live[name] = model.get_buffer(name)
        except AttributeError:
            raise SpecMismatchError(
                f"The model has no buffer {name!r}, which the permutation's spec permutes; {_REBUILD}."
            ) from None
    return live


def _shared_contents(
    names: Sequence[str], live: Mapping[str, Tensor], new: Mapping[str, Tensor]
) -> torch.UntypedStorage:
    """The new contents of a storage that ``names`` share: a copy of it with
    every tensor's permuted value written through its own view. Raises
    :class:`SpecError` naming two tensors when one write undoes another (the
    permutation moves the two views differently)."""
    first = live[names[0]]
    contents = first.untyped_storage().clone()

    def view(name: str) -> Tensor:
        t = live[name]
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(contents, t.storage_offset(), t.shape, t.stride())

    with torch.no_grad():
        for name in names:
            view(name).copy_(new[name])
        for name in names:
            if not torch.equal(view(name), new[name]):
                other = next(n for n in names if n != name)
                raise SpecError(
                    f"Tensors {other!r} and {name!r} share one storage (one is a view of the other, e.g. "
                    f"nn.Parameter(enc.weight.t())), and this permutation moves them differently, so no content of "
                    f"the storage holds both permuted tensors. Give {name!r} its own storage (nn.Parameter(... "
                    f".clone())), or compute it from {other!r} in forward (e.g. F.linear(x, enc.weight.t())) so that "
                    "build_spec ties their axes."
                )
    return contents


def _storage_uses(tensor: Tensor) -> int | None:
    """How many tensors reference ``tensor``'s storage (``None`` when this
    PyTorch cannot tell)."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:
        return None
    storage = tensor.untyped_storage()  # held: the count includes this handle
    return int(counter(storage._cdata)) - 1


def _storage_key(tensor: Tensor) -> tuple[str, int] | None:
    """``(device, storage address)``; ``None`` for tensors without a storage of their own."""
    if tensor.numel() == 0 or tensor.is_meta or tensor.layout != torch.strided:
        return None
    try:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None


def _check_outside_aliases(model: nn.Module, live: Mapping[str, Tensor]) -> None:
    """:class:`SpecError` when a written tensor's storage is referenced by a
    tensor that is not a parameter or buffer of ``model`` (a ``.data`` or
    ``detach()`` alias, a view, a ``state_dict()`` kept from before): writing
    in place would change it too."""
    written: dict[tuple[str, int], tuple[str, Tensor]] = {}
    for name, tensor in live.items():
        key = _storage_key(tensor)
        if key is not None:
            written.setdefault(key, (name, tensor))
    objects: dict[tuple[str, int], set[int]] = {}
    for module in model.modules():
        for owned in (*module._parameters.values(), *module._buffers.values()):
            key = None if owned is None else _storage_key(owned)
            if key is not None and key in written:
                objects.setdefault(key, set()).add(id(owned))
    for key, (name, tensor) in written.items():
        uses = _storage_uses(tensor)
        if uses is None:
            return
        outside = uses - len(objects.get(key, set()) | {id(tensor)})
        if outside > 0:
            raise SpecError(
                f"Tensor {name!r} of the model shares its storage with {outside} tensor(s) outside the model's "
                "state_dict (a `.data` or `.detach()` alias, a view, a state_dict() kept from before, another "
                "model's weights); apply_permutation(..., inplace=True) would overwrite them too. Drop those "
                "references, or call apply_permutation(model, perm) without inplace=True to get a permuted copy."
            )


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


# ------------------------------------------------------------------ files
def _encode_tree(tree: AxisTree) -> list[Any]:
    """An axis tree as nested lists of str / int / None (``weights_only``-loadable)."""
    if isinstance(tree, Leaf):
        return ["leaf", tree.group, tree.size]
    return ["product" if isinstance(tree, Product) else "concat", [_encode_tree(p) for p in tree.parts]]


def _decode_tree(data: Any) -> AxisTree:
    """Inverse of :func:`_encode_tree`."""
    kind = data[0]
    if kind == "leaf":
        return Leaf(data[1], int(data[2]))
    parts = tuple(_decode_tree(p) for p in data[1])
    return Product(parts) if kind == "product" else Concat(parts)


def _check_payload(path: str | os.PathLike[str], payload: Any, spec: PermutationSpec) -> dict[str, Any]:
    """``payload`` if it is a saved permutation, else a :class:`SpecError`
    naming the file and the missing or malformed entry."""
    if not isinstance(payload, dict):
        raise SpecError(
            f"{path} is not a permutation saved by maskalign: it holds {_describe(payload)}; write permutations "
            "with perm.save(path)."
        )
    fmt = payload.get("format")
    if fmt is None:
        if payload and all(k in spec.groups for k in payload):
            raise SpecError(
                f"{path} is not a permutation saved by maskalign: it holds index tensors without the 'format' and "
                "'fingerprint' entries that perm.save(path) writes; if they are indices for this spec, build "
                "ma.Permutation(spec, torch.load(path)) and save that with perm.save(path)."
            )
        raise SpecError(
            f"{path} is not a permutation saved by maskalign (no 'format' entry; keys {_listing(payload)}); write "
            "permutations with perm.save(path)."
        )
    if fmt not in (FORMAT, _LEGACY_FORMAT):
        raise SpecError(
            f"{path} has format {fmt!r}, which is not a permutation format this maskalign reads ({FORMAT!r}, "
            f"{_LEGACY_FORMAT!r}); save it again with this version's perm.save(path)."
        )
    if not isinstance(payload.get("fingerprint"), str):
        raise SpecError(
            f"{path} has no 'fingerprint' entry (a string), so it cannot be checked against the spec; save the "
            "permutation again with perm.save(path) (or, if you know it was made for this spec, build "
            "ma.Permutation(spec, torch.load(path)['indices']))."
        )
    if "indices" not in payload:
        raise SpecError(f"{path} has no 'indices' entry; save the permutation again with perm.save(path).")
    if not isinstance(payload["indices"], Mapping):
        raise SpecError(
            f"Entry 'indices' of {path} is {_describe(payload['indices'])}; perm.save(path) writes a dict group "
            "name -> index tensor: save the permutation again with it."
        )
    return payload


def _file_difference(payload: Mapping[str, Any], spec: PermutationSpec) -> str:
    """The first difference between the spec a file was saved for and
    ``spec``, when the file records it (format 2)."""
    there = "the file's spec"
    modules = _module_difference(spec.module_types, payload.get("modules") or {}, "", there)
    try:
        axes = {name: [_decode_tree(t) for t in trees] for name, trees in payload["axes"].items()}
        shapes = {name: tuple(int(s) for s in shape) for name, shape in payload["shapes"].items()}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return modules or "the file does not record its spec's structure (an older format), so no difference is named"
    structure = _structure_difference(spec.axes, spec.shapes, axes, shapes, there)
    return structure or modules or "the specs differ"
