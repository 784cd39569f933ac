"""Sparse training: keep pruned weights at exactly zero while a model trains.

:func:`enforce_masks` works with hooks only. Parameters stay ordinary
``nn.Parameter`` objects under their original names, so ``state_dict`` keys,
``named_parameters()``, optimisers and checkpoints are unchanged (unlike
``torch.nn.utils.prune``, which reparametrises ``weight`` into
``weight_orig`` and ``weight_mask``).

The promise: once enforced, a mask stays enforced until
:meth:`MaskHandle.remove`; with the optimiser passed (or attached with
:meth:`MaskHandle.attach`), masked entries of the weights, of ``.grad`` and
of every optimiser-state tensor of the parameter's shape are exactly ``0``
after every ``optimizer.step()``. Four mechanisms cooperate:

1. a post-accumulate-grad hook per masked parameter sets ``param.grad`` to
   exactly ``0`` at pruned entries, in place, as soon as the gradient is
   accumulated: before DDP reduces it, before clipping and before the
   optimiser reads it. It works on the gradient's bits (a bitwise AND), so a
   NaN or infinite gradient there becomes ``0`` too, where ``grad * mask``
   would keep NaN. Sparse (COO) gradients, as from
   ``nn.Embedding(sparse=True)``, are masked value by value;
2. each attached optimiser gets a step pre-hook (re-binding, see 4, and a
   check that it does not step a replaced parameter), a step post-hook that
   re-zeros the pruned weights and every optimiser-state tensor of the
   parameter's shape after each ``optimizer.step()``, and a
   ``load_state_dict`` post-hook that zeroes restored state at once. This
   removes leaks that gradient masking cannot stop: decoupled weight decay
   on a weight written densely outside autograd, Muon's orthogonalised
   (dense) update, momentum or Adam moments restored from a dense checkpoint;
3. a ``load_state_dict`` post-hook on the model zeroes the pruned entries of
   whatever was loaded, and a forward pre-hook re-zeros weights that changed
   since the handle last saw them (a write outside autograd, an optimiser
   that was not passed); the first time it finds revived entries in a
   parameter it warns. It writes only when a weight changed, so two
   forwards before one backward are unaffected;
4. the handle follows the *module*, not the Parameter object: the hooks of
   3 and 2 look each masked name up in the module tree and re-bind it when
   ``load_state_dict(assign=True)``, ``module.weight = nn.Parameter(...)``,
   ``to_empty`` from the meta device or an FSDP-style re-materialisation put
   a new Parameter there (its weights and gradient are masked and a gradient
   hook is installed), or when ``swap_tensors`` (``torch.__future__``'s
   ``set_swap_module_params_on_conversion``) replaced the tensor under the
   same object. A parameter frozen at enforce time (``requires_grad=False``,
   which cannot carry a gradient hook) gets its hook when it is unfrozen.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) each parameter is a
DTensor sharded on dim 0. The handle cuts each rank's shard of the full mask
once (``distribute_tensor(mask, mesh, placements, src_data_rank=None)``: no
communication; uneven and empty shards as FSDP2 cuts them) and masks every
DTensor it meets (weights, the sharded ``.grad`` that FSDP2 reduce-scatters,
optimiser state) on its local shard (``to_local()``), so a step costs no
collective. FSDP2 runs the sharded parameter's post-accumulate-grad hooks
after its reduce-scatter, so the sharded gradient is masked before clipping
and the optimiser (the step pre-hook masks it again). Between its pre-forward
and its reshard FSDP2 registers unsharded stand-ins on the module: the
handle leaves them alone and stays bound to the sharded parameters. A
DTensor has no storage of its own (``data_ptr()`` is 0), so the stamp of 3
reads its local shard's version and data pointer too.

Remaining gaps (``docs/how-to/sparse-train.md#guarantees``): gradients
returned by ``torch.autograd.grad`` are never accumulated into ``.grad`` and
are not masked (an attached optimiser's step still re-zeros the weights made
from a ``.grad`` assigned from them); an optimiser that is not attached can
revive masked weights at each of its steps (they are zeroed again at the
next forward, and a warning says so once); under ``torch.compile`` the
forward pre-hook does nothing, and writes through ``param.data`` bypass the
version counter it checks (the optimiser hooks and the ``load_state_dict``
hook still run).

Sparse training with fixed masks follows the lottery-ticket protocol of
Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019.
"""

from __future__ import annotations

import numbers
import warnings
import weakref
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import DOCS_URL, ArgumentTypeError, ArgumentValueError, MaskError
from .masks import validate_masks

# DTensor (FSDP2's parameters) and FSDP2's module class, where torch has them:
# not in builds without torch.distributed; public from torch 2.5 / 2.6.
_DTENSOR: tuple[type, ...] = ()
_FSDP: tuple[type, ...] = ()
try:
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Partial as _Partial
    from torch.distributed.tensor import Replicate as _Replicate
    from torch.distributed.tensor import distribute_tensor as _distribute_tensor
except ImportError:  # pragma: no cover
    pass
else:
    _DTENSOR = (_DTensor,)
try:
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # pragma: no cover
    pass
else:
    _FSDP = (_FSDPModule,)

__all__ = ["MaskHandle", "assert_masked", "enforce_masks"]


def _is_dtensor(value: object) -> bool:
    return bool(_DTENSOR) and isinstance(value, _DTENSOR)


def _spec(value: Tensor) -> tuple[Any, tuple[Any, ...]] | None:
    """``(device_mesh, placements)`` of a DTensor, ``None`` for a plain tensor."""
    if _is_dtensor(value):
        return value.device_mesh, tuple(value.placements)  # type: ignore[attr-defined]
    return None


def _local(value: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place ops write through to
    the DTensor), or ``value`` itself."""
    if _is_dtensor(value):
        with torch.no_grad():
            return value.to_local()  # type: ignore[attr-defined]
    return value


def _shard_like(mask: Tensor, spec: tuple[Any, tuple[Any, ...]], device: torch.device) -> Tensor:
    """The full (global-shape) ``mask`` as a DTensor laid out like a DTensor
    of ``spec``: each rank slices its own shard of its own copy (``Shard``:
    ``torch.chunk``'s uneven shards, as FSDP2 and DTensor cut them;
    ``Replicate``: the whole mask), without communication. A ``Partial``
    tensor holds full-shape summands, each masked by the whole mask.
    ``device`` is where the local shard goes (the parameter's)."""
    mesh, placements = spec
    kept = [_Replicate() if isinstance(p, _Partial) else p for p in placements]
    return _distribute_tensor(mask.to(device), mesh, kept, src_data_rank=None)


# Integer dtype of each element size: a tensor viewed as these bits is
# zeroed exactly by AND-ing with 0 and kept bit for bit by AND-ing with -1.
_BITS_OF_SIZE: dict[int, torch.dtype] = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _BitMask:
    """One parameter's mask as an AND-pattern on the bits of its values.

    Zeroing through ``bitwise_and`` on an integer view of the tensor is exact
    (``+0.0`` at pruned entries, even where the value was NaN or infinite;
    kept entries unchanged bit for bit) and, on CPU, 5-20x faster than
    ``torch.where`` / ``masked_fill_`` with a bool mask, which is what keeps
    :func:`enforce_masks` within a few percent of dense step time
    (``benchmarks/bench_sparse_training.py``). The pattern costs one integer
    per entry of each element size in use. Sparse COO tensors (the gradient
    of ``nn.Embedding(sparse=True)``) are masked value by value; other
    tensors that cannot be viewed as same-size integers (16-byte dtypes)
    fall back to ``masked_fill_``.

    For a DTensor parameter (FSDP2's ``fully_shard``), ``mask`` is this
    rank's shard of the mask and ``spec`` the parameter's mesh and
    placements: DTensor values of that layout (the parameter, its gradient,
    optimiser state made with ``zeros_like``) are masked on their local
    shard, with no communication; a DTensor of another layout gets its own
    local mask, cut from ``source`` (the full mask) on first use.
    """

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask  # bool, the shape and device of the (local) values masked
        self.source = mask  # the full mask
        self.spec: tuple[Any, tuple[Any, ...]] | None = None
        self._patterns: dict[int, Tensor] = {}
        self._other: dict[tuple[Any, ...], Tensor] = {}

    def retarget(self, mask: Tensor, spec: tuple[Any, tuple[Any, ...]] | None = None) -> None:
        """Use ``mask`` (same values, on the parameter's new device; for a
        DTensor parameter of layout ``spec``, its local shard) from now on;
        the gradient hook, a bound method, stays valid."""
        self.mask = mask
        self.spec = spec
        self._patterns.clear()
        self._other.clear()

    def _local_mask(self, value: Tensor) -> tuple[Tensor, Tensor]:
        """``value``'s local shard and the mask of that shard (``value``
        itself and :attr:`mask` for a plain tensor)."""
        spec = _spec(value)
        local = _local(value)
        if spec == self.spec or (spec is None and value.shape == self.mask.shape):
            return local, self.mask
        if spec is None:  # a plain tensor of the full shape, for a DTensor parameter
            return value, self.source
        key = (*spec, local.device)
        mask = self._other.get(key)
        if mask is None:
            mask = _local(_shard_like(self.source, spec, local.device))
            self._other[key] = mask
        return local, mask

    def _pattern(self, value: Tensor) -> Tensor | None:
        bits = _BITS_OF_SIZE.get(value.element_size())
        if bits is None or value.layout != torch.strided or value.dtype == torch.bool:
            return None
        pattern = self._patterns.get(value.element_size())
        if pattern is None or pattern.device != value.device:
            pattern = self.mask.to(value.device).to(bits).neg_()  # True -> -1 (all bits set), False -> 0
            self._patterns[value.element_size()] = pattern
        return pattern

    def grad_hook(self, param: Tensor) -> None:
        """Post-accumulate-grad hook: mask ``param.grad`` in place."""
        if param.grad is not None:
            self.mask_(param.grad)

    def mask_(self, value: Tensor) -> None:
        """Set the pruned entries of ``value`` (the mask's shape, strided or
        sparse COO; a DTensor on its local shard) to ``+0.0`` in place."""
        value, mask = self._local_mask(value)
        if mask is not self.mask:  # another layout than the parameter's: rare
            value.masked_fill_(~mask.to(value.device), 0)
            return
        if value.layout == torch.sparse_coo:
            # _indices()/_values() alias the (possibly uncoalesced) storage;
            # duplicate indices are each zeroed, so their sum is zero too.
            keep = self.mask.to(value.device)[tuple(value._indices())]  # (nnz, *dense dims)
            value._values().masked_fill_(~keep, 0)
            return
        pattern = self._pattern(value)
        if pattern is None:
            value.masked_fill_(~self.mask.to(value.device), 0)
        else:
            value.view(pattern.dtype).bitwise_and_(pattern)

    def revived(self, value: Tensor) -> int:
        """How many pruned entries of the strided ``value`` are not ``0``
        (NaN counts; of a DTensor, on this rank's shard); reads only, one
        device sync."""
        value, mask = self._local_mask(value)
        return int(((value != 0) & ~mask.to(value.device)).sum())


def _stamp(param: Tensor) -> tuple[int, int]:
    """What changes when a tensor's values may have changed: its version
    counter (every in-place op) and its data pointer (``param.data = ...``,
    ``to_empty``). A DTensor has no storage of its own (its ``data_ptr()``
    is 0) and two version counters: its own, bumped by in-place DTensor ops
    (an optimiser's step), and its local shard's, bumped by writes to
    ``to_local()``; both only grow, so their sum changes when either does."""
    if _is_dtensor(param):
        local = _local(param)
        return param._version + local._version, local.data_ptr()
    return param._version, param.data_ptr()


def _register_grad_hook(param: nn.Parameter, bitmask: _BitMask) -> RemovableHandle:
    """Register ``bitmask.grad_hook`` as a post-accumulate-grad hook of
    ``param`` (which requires grad).

    ``torch.utils.swap_tensors`` (``model.to()`` under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``) moves the
    C++ tensor under the Python object but leaves the hooks dict behind, so a
    hook added to that dict would never run; assigning the dict again
    registers it with the current C++ tensor (a no-op otherwise).
    """
    handle = param.register_post_accumulate_grad_hook(bitmask.grad_hook)
    param._post_accumulate_grad_hooks = param._post_accumulate_grad_hooks
    return handle


class _Binding:
    """One masked name and the Parameter object currently bound to it.

    ``path`` and ``leaf`` locate the parameter in the module tree
    (``"layer1.0.conv1.weight"`` -> ``("layer1", "0", "conv1")``,
    ``"weight"``), so a replaced Parameter is found by name. ``cdata``
    identifies the C++ tensor under the Python object (``swap_tensors``
    changes it, and with it drops the gradient hook); ``stamp`` is
    :func:`_stamp` of the weights when the handle last masked them.
    ``replaced`` holds weak references to Parameter objects this name was
    bound to before, to detect an optimiser that still steps one.
    """

    __slots__ = (
        "name",
        "path",
        "leaf",
        "source",
        "bitmask",
        "sharded",
        "param",
        "cdata",
        "hook",
        "stamp",
        "probed",
        "replaced",
    )

    def __init__(self, name: str, source: Tensor) -> None:
        prefix, _, leaf = name.rpartition(".")
        self.name = name
        self.path: tuple[str, ...] = tuple(prefix.split(".")) if prefix else ()
        self.leaf = leaf
        self.source = source  # the user's mask, private copy on its own device
        self.bitmask = _BitMask(source)
        self.sharded: Tensor | None = None  # the mask as a DTensor laid out like a DTensor parameter
        self.param: nn.Parameter | None = None
        self.cdata = 0
        self.hook: RemovableHandle | None = None
        self.stamp = (-1, -1)
        self.probed = False
        self.replaced: list[weakref.ref[Tensor]] = []


class _ModelHook:
    """Forward pre-hook (``kind="forward"``) or ``load_state_dict``
    post-hook (``kind="load"``) of a :class:`MaskHandle` on its model.

    A plain object, not a closure, so that ``copy.deepcopy`` and pickling of
    the model carry it over: the copy gets its own handle (see
    :meth:`MaskHandle.__reduce__`).
    """

    __slots__ = ("handle", "kind")

    def __init__(self, handle: MaskHandle, kind: str) -> None:
        self.handle = handle
        self.kind = kind

    def __call__(self, module: nn.Module, _arg: Any) -> None:
        handle = self.handle
        if handle._removed or module is not handle._model:  # a DataParallel replica, a shallow copy
            return
        if self.kind == "load":
            handle._sync(remask=True, probe=False)
        elif not torch.compiler.is_compiling():
            handle._sync(remask=not handle._stepping, probe=True)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ModelHook, (self.handle, self.kind))


class _OptimizerHook:
    """Step pre-hook, step post-hook or ``load_state_dict`` post-hook of a
    :class:`MaskHandle` on an attached optimiser. A copy (``deepcopy`` or
    pickle of the optimiser) does nothing: a copied optimiser is not
    attached."""

    __slots__ = ("handle", "kind")

    def __init__(self, handle: MaskHandle | None, kind: str) -> None:
        self.handle = handle
        self.kind = kind

    def __call__(self, optimizer: torch.optim.Optimizer, *_args: Any) -> None:
        handle = self.handle
        if handle is None or handle._removed:
            return
        if self.kind == "pre":
            handle._before_step(optimizer)
        elif self.kind == "post":
            handle._after_step(optimizer)
        else:
            handle._mask_optimizer(optimizer)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_OptimizerHook, (None, self.kind))


# Dicts of nn.Module that hold the hooks a MaskHandle registers on its model.
_MODEL_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_load_state_dict_post_hooks")


class MaskHandle:
    """Masks enforced on a model by :func:`enforce_masks`.

    The handle follows the model's module tree: a masked name whose
    Parameter object is replaced (``load_state_dict(assign=True)``,
    ``module.weight = nn.Parameter(...)``, ``to_empty``) is re-bound at the
    next forward, ``load_state_dict``, attached optimiser step, or read of
    :attr:`active`.

    ``remove()`` (or leaving a ``with`` block) removes every hook; it is
    idempotent. The weights are not touched by removal: they stay as they
    are (pruned entries zero) but are no longer kept at zero.

    ``copy.deepcopy(model)`` (and pickling) of an enforced model gives a copy
    with its own handle, enforcing the same masks without an optimiser:
    ``MaskHandle.of(copy)`` returns it, and ``attach`` adds the copy's
    optimiser. ``copy.deepcopy((model, handle))`` returns the copy and its
    handle together.

    Handles are made by :func:`enforce_masks`, not constructed directly.

    Args:
        model: the model whose parameters are masked.
        masks: name -> ``torch.bool`` mask of the parameter's shape, already
            validated and copied by :func:`enforce_masks`.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor]) -> None:
        self._model = model
        self._bindings = [_Binding(name, mask) for name, mask in masks.items()]
        self._removed = False
        self._stepping = False  # inside an attached optimiser's step (LBFGS calls forward there)
        self._hook_ids: tuple[int, ...] = ()  # ids of the model hooks, the same in copies
        self._attached: list[tuple[weakref.ref[torch.optim.Optimizer], list[RemovableHandle]]] = []

    # ------------------------------------------------------------ public

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Read-only name -> ``torch.bool`` mask (parameter shape, on the
        parameter's device), private copies of the masks passed; for a
        DTensor parameter (FSDP2), a DTensor mask sharded like it."""
        return MappingProxyType(
            {b.name: b.sharded if b.sharded is not None else b.bitmask.mask for b in self._bindings}
        )

    @property
    def active(self) -> bool:
        """Whether every mask is enforced: ``False`` after :meth:`remove`, or
        when a masked name no longer holds a Parameter of its mask's shape
        (deleted, reparametrised by ``torch.nn.utils.parametrize`` or
        ``prune``, flattened by FSDP1's FlatParameter); the next forward or
        attached optimiser step then raises :class:`~maskalign.MaskError`
        (FSDP2's unsharded stand-ins, between its pre-forward and reshard,
        do not count: the sharded DTensor stays bound). Reading it
        re-binds Parameter objects replaced since the last forward (masking
        them), as the next forward would."""
        if self._removed:
            return False
        try:
            self._sync(remask=not self._stepping, probe=True)
        except MaskError:
            return False
        return True

    def attach(self, optimizer: torch.optim.Optimizer) -> MaskHandle:
        """Protect ``optimizer`` too (idempotent): zero the pruned entries of
        its state now, and install its step pre-/post-hooks and
        ``load_state_dict`` post-hook (see :func:`enforce_masks`).

        Use it for an optimiser made after :func:`enforce_masks` (rebuilt
        after ``load_state_dict(assign=True)``, the optimiser of a deep copy,
        a second optimiser for other parameter groups).

        Args:
            optimizer: a ``torch.optim.Optimizer`` stepping (some of) the
                masked parameters, or a wrapper with its ``param_groups``,
                ``state`` and step-hook API.

        Returns:
            This handle.

        Raises:
            ArgumentTypeError: if ``optimizer`` is not an optimiser (a list
                of them, a scheduler, a class); also a ``TypeError``.
            MaskError: if the handle was removed, or a masked name no longer
                holds a Parameter of its mask's shape.
        """
        _check_optimizer(optimizer)
        if self._removed:
            raise MaskError(
                "This MaskHandle was removed; call ma.enforce_masks(model, masks, optimizer) to enforce the "
                "masks again."
            )
        if any(ref() is optimizer for ref, _ in self._attached):
            return self
        self._sync(remask=True, probe=False)
        _rezero(self._bindings, optimizer)
        hooks = [
            optimizer.register_step_pre_hook(_OptimizerHook(self, "pre")),
            optimizer.register_step_post_hook(_OptimizerHook(self, "post")),
        ]
        if hasattr(optimizer, "register_load_state_dict_post_hook"):  # a wrapper may not forward it
            hooks.append(optimizer.register_load_state_dict_post_hook(_OptimizerHook(self, "load")))
        self._attached = [(ref, h) for ref, h in self._attached if ref() is not None]
        self._attached.append((weakref.ref(optimizer), hooks))
        return self

    def remove(self) -> None:
        """Remove every gradient, model and optimiser hook. Idempotent."""
        if self._removed:
            return
        self._removed = True
        for binding in self._bindings:
            if binding.hook is not None:
                binding.hook.remove()
                binding.hook = None
        for _, hooks in self._attached:
            for hook in hooks:
                hook.remove()
        self._attached.clear()
        for dict_name in _MODEL_HOOK_DICTS:
            hook_dict = getattr(self._model, dict_name, None)
            if not isinstance(hook_dict, dict):
                continue
            for hook_id in self._hook_ids:
                entry = hook_dict.get(hook_id)
                if entry is True or (isinstance(entry, _ModelHook) and entry.handle is self):
                    del hook_dict[hook_id]

    @staticmethod
    def of(model: nn.Module) -> tuple[MaskHandle, ...]:
        """The handles enforcing masks on ``model`` (not removed), in the
        order they were made; for a deep copy of an enforced model, the
        copy's own handle.

        Args:
            model: any ``nn.Module``.

        Returns:
            A tuple of :class:`MaskHandle`, empty if none enforces on
            ``model`` itself (handles on submodules are not included).
        """
        hooks = getattr(model, "_forward_pre_hooks", {})
        found = []
        for hook in hooks.values():
            if isinstance(hook, _ModelHook) and hook.handle._model is model and not hook.handle._removed:
                if hook.handle not in found:
                    found.append(hook.handle)
        return tuple(found)

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"MaskHandle({len(self._bindings)} masks, {state})"

    def __reduce__(self) -> tuple[Any, ...]:
        # deepcopy / pickle: a handle for the copied model with the same
        # masks, bound lazily (at the copy's first forward, load_state_dict,
        # attach or read of ``active``), without the optimisers.
        sources = {b.name: b.source for b in self._bindings}
        return (_rebuilt_handle, (self._model, sources, self._hook_ids, self._removed))

    # ----------------------------------------------------------- internal

    def _install(self) -> None:
        """Bind every masked name (masking weights and existing gradients)
        and register the model hooks."""
        self._sync(remask=True, probe=False)
        forward = self._model.register_forward_pre_hook(_ModelHook(self, "forward"), prepend=True)
        load = self._model.register_load_state_dict_post_hook(_ModelHook(self, "load"))
        self._hook_ids = (forward.id, load.id)

    def _resolve(self, binding: _Binding) -> tuple[Tensor | None, bool]:
        """What the model holds under ``binding``'s name now: a Parameter, a
        plain tensor standing in for it (``torch.func.functional_call``), or
        ``None`` if nothing is registered there; and whether a module on the
        way (the model included) is an FSDP2 ``FSDPModule``."""
        module: Any = self._model
        fsdp = isinstance(module, _FSDP)
        for part in binding.path:
            module = module._modules.get(part)
            if module is None:
                return None, fsdp
            fsdp = fsdp or isinstance(module, _FSDP)
        value = module._parameters.get(binding.leaf)
        return (value if isinstance(value, Tensor) else None), fsdp

    def _sync(self, *, remask: bool, probe: bool) -> None:
        """Make the hooks match the model as it is now.

        For each masked name: re-bind a replaced Parameter (mask its weights
        and gradient, move the gradient hook), install the gradient hook of
        a parameter that has started to require grad, and if ``remask``
        re-zero weights that changed since the handle last masked them
        (``probe``: warn the first time that finds revived entries).

        Raises:
            MaskError: naming the parameter, if a masked name no longer
                holds a tensor, or holds one of another shape than its mask.
        """
        for b in self._bindings:
            param, fsdp = self._resolve(b)
            if param is None:
                raise MaskError(
                    f"Parameter {b.name!r} is no longer a parameter of the model (deleted, reparametrised by "
                    "torch.nn.utils.parametrize or prune, or flattened by FSDP1's FlatParameter), so its mask "
                    "cannot be enforced; call handle.remove() before changing the model's structure and "
                    "enforce_masks again with masks for its new parameters."
                )
            if not isinstance(param, nn.Parameter):
                continue  # a stand-in for the duration of a functional call: leave it alone
            if fsdp and param is not b.param and b.bitmask.spec is not None and _spec(param) != b.bitmask.spec:
                # FSDP2's unsharded parameter (a plain tensor, or a DTensor of
                # another layout under tensor parallelism), registered from its
                # pre-forward to its reshard: the sharded one stays bound
                continue
            if param is not b.param or param._cdata != b.cdata:
                self._bind(b, param)
                continue
            if b.hook is None and param.requires_grad:  # unfrozen since
                b.hook = _register_grad_hook(param, b.bitmask)
                if param.grad is not None:
                    b.bitmask.mask_(param.grad)
            if remask and _stamp(param) != b.stamp:
                self._remask(b, param, probe)

    def _bind(self, b: _Binding, param: nn.Parameter) -> None:
        """Bind ``b``'s name to ``param``: mask its weights and gradient, and
        give it the gradient hook (if it requires grad)."""
        if tuple(param.shape) != tuple(b.source.shape):
            raise MaskError(
                f"Parameter {b.name!r} was replaced by one of shape {tuple(param.shape)}, but its mask has shape "
                f"{tuple(b.source.shape)}; call handle.remove() and enforce_masks with masks of the new shape."
            )
        dtensor = _is_dtensor(param)
        if not dtensor and type(param.detach()) is not Tensor and param.layout == torch.strided:
            raise MaskError(
                f"Parameter {b.name!r} is a {type(param.detach()).__name__} (a tensor subclass other than "
                "DTensor), which enforce_masks cannot mask; enforce the masks on a model of plain tensors or "
                "DTensors, or apply them with ma.apply_masks after each optimizer step."
            )
        if b.hook is not None:
            b.hook.remove()
            b.hook = None
        if b.param is not None and b.param is not param:
            b.replaced.append(weakref.ref(b.param))
        self._retarget(b, param)
        b.param, b.cdata = param, param._cdata
        with torch.no_grad():
            b.bitmask.mask_(param)
            if param.grad is not None:
                b.bitmask.mask_(param.grad)
        if param.requires_grad:
            b.hook = _register_grad_hook(param, b.bitmask)
        b.stamp = _stamp(param)

    @staticmethod
    def _retarget(b: _Binding, param: nn.Parameter) -> None:
        """Give ``b``'s bit mask the layout of ``param``: the mask on its
        device or, for a DTensor, this rank's shard of it, cut without
        communication (:func:`_shard_like`)."""
        spec = _spec(param)
        if spec is None:
            b.sharded = None
            if b.bitmask.spec is not None or b.bitmask.mask.device != param.device:
                b.bitmask.retarget(b.source.to(param.device))
            return
        device = _local(param).device
        if spec != b.bitmask.spec or b.bitmask.mask.device != device:
            b.sharded = _shard_like(b.source, spec, device)
            b.bitmask.retarget(_local(b.sharded), spec)

    def _remask(self, b: _Binding, param: nn.Parameter, probe: bool) -> None:
        """Re-zero ``param``'s pruned weights, which changed since the handle
        last masked them; the first probe that finds revived entries warns."""
        if probe and not b.probed:
            b.probed = True
            if param.layout == torch.strided and param.device.type != "meta":
                count = b.bitmask.revived(param.detach())
                if count:
                    warnings.warn(
                        f"{b.name!r}: {count} masked entries had become non-zero since the handle last masked "
                        "them, written by an optimizer not passed to enforce_masks (momentum from dense steps, or "
                        "an update that is dense by design such as Muon's) or outside autograd (copy_, "
                        "reset_parameters, load_state_dict of a submodule); they are zeroed again at every "
                        "forward, but after each step of such an optimizer they are not: pass it to "
                        "enforce_masks(model, masks, optimizer) or handle.attach(optimizer). "
                        f"See {DOCS_URL}/how-to/sparse-train/#guarantees",
                        UserWarning,
                        stacklevel=2,
                    )
        stamp = _stamp(param)
        self._retarget(b, param)  # model.to(device): same object, new memory
        with torch.no_grad():
            b.bitmask.mask_(param)
            if stamp[1] != b.stamp[1] and param.grad is not None:
                b.bitmask.mask_(param.grad)  # new memory (to_empty, .to()) came with a new .grad too
        b.stamp = _stamp(param)

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step pre-hook: re-bind, re-zero changed weights, and refuse to let
        ``optimizer`` step a Parameter object the model no longer uses.

        DTensor gradients are masked once more here: FSDP2 writes the
        sharded ``.grad`` itself after its reduce-scatter, and runs the
        parameter's post-accumulate-grad hooks only in recent torch."""
        self._sync(remask=True, probe=True)
        with torch.no_grad():
            for b in self._bindings:
                if b.bitmask.spec is not None and b.param is not None and b.param.grad is not None:
                    b.bitmask.mask_(b.param.grad)
        stale = [b for b in self._bindings if b.replaced]
        if stale:
            stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for b in stale:
                b.replaced = [ref for ref in b.replaced if ref() is not None]
                if any(id(ref()) in stepped for ref in b.replaced):
                    raise MaskError(
                        f"Parameter {b.name!r} was replaced by a new Parameter object after enforce_masks "
                        "(load_state_dict(assign=True), attribute assignment, to_empty from meta), but this "
                        "optimizer still steps the old one, so the model's parameter would not train; build a new "
                        "optimizer over model.parameters() and pass it to handle.attach(optimizer)."
                    )
        self._stepping = True

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step post-hook: re-zero weights and the optimiser's state."""
        self._stepping = False
        _rezero(self._bindings, optimizer)

    def _mask_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimiser ``load_state_dict`` post-hook: zero restored state now."""
        _rezero(self._bindings, optimizer)


_OPTIMIZER_API = ("param_groups", "state", "register_step_pre_hook", "register_step_post_hook")


def _check_optimizer(optimizer: object) -> None:
    """Accept a ``torch.optim.Optimizer`` or a wrapper with its hook API.

    Raises:
        ArgumentTypeError: naming the argument, for anything else (a list of
            optimisers, a learning-rate scheduler, a class).
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return
    if isinstance(optimizer, type) or not all(hasattr(optimizer, a) for a in _OPTIMIZER_API):
        raise ArgumentTypeError(
            f"Argument 'optimizer' is a {type(optimizer).__name__}, not a torch.optim.Optimizer; pass the "
            "optimizer instance that steps the model's parameters (or None), and attach more with "
            "handle.attach(optimizer)."
        )


def _rebuilt_handle(model: nn.Module, masks: dict[str, Tensor], hook_ids: tuple[int, ...], removed: bool) -> MaskHandle:
    """The handle of a deep-copied or unpickled model (``model`` may not be
    fully built yet: it is only read at the first sync)."""
    handle = MaskHandle(model, masks)
    handle._hook_ids = tuple(hook_ids)
    handle._removed = removed
    return handle


def _rezero(bindings: list[_Binding], optimizer: torch.optim.Optimizer | None) -> None:
    """Zero the pruned entries of each bound parameter and, if ``optimizer``
    is given, of every state tensor of the parameter's shape (for a pruned
    0-d parameter that includes a 0-d ``step`` counter, which only restarts
    the bias correction of a parameter that is pruned anyway); record the
    weights' stamps."""
    state = optimizer.state if optimizer is not None else None
    with torch.no_grad():
        for b in bindings:
            param = b.param
            if param is None:
                continue
            b.bitmask.mask_(param)
            b.stamp = _stamp(param)
            if state is None:
                continue
            for value in state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    b.bitmask.mask_(value)


def _full(value: Tensor) -> Tensor:
    """A DTensor gathered to its full (global) tensor on every rank (a
    collective: every rank must call), or ``value`` itself."""
    if _is_dtensor(value):
        return value.full_tensor()  # type: ignore[attr-defined]
    return value


def enforce_masks(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> MaskHandle:
    """Keep the pruned entries of ``model``'s parameters at exactly zero
    during training, until ``handle.remove()``.

    Steps, in order: validate ``masks`` and ``optimizer`` (nothing is
    touched if they are malformed); copy each mask to its parameter's
    device; zero the pruned weights and any ``.grad`` already there (a step
    taken before, gradient accumulation in progress) **in place**; register
    a gradient hook per masked parameter (a frozen one gets it when it is
    unfrozen), a forward pre-hook and a ``load_state_dict`` post-hook on
    ``model``; if ``optimizer`` is given, :meth:`MaskHandle.attach` it: zero
    the pruned entries of its state **in place** and register hooks that
    re-zero the pruned weights and every optimiser-state tensor with the
    parameter's shape (momentum buffers, Adam ``exp_avg`` / ``exp_avg_sq`` /
    ``max_exp_avg_sq``, ...) after every ``optimizer.step()`` and after
    ``optimizer.load_state_dict``.

    What is guaranteed:

    * with the optimiser (every optimiser stepping masked parameters)
      attached, masked entries of weights, gradients and same-shape state are
      exactly ``0`` after every ``optimizer.step()``;
    * with or without it, gradients are masked as they are accumulated,
      ``model.load_state_dict`` zeroes what it loads, and every forward sees
      masked weights (a weight written outside autograd is re-zeroed at the
      next forward, except under ``torch.compile``);
    * a Parameter object replaced under a masked name is followed by name;
      an attached optimiser that still steps the old object raises a
      :class:`~maskalign.MaskError` at its next step.

    An optimiser that is not attached can revive masked weights at each step
    (dense momentum from steps taken before ``enforce_masks``, Muon's dense
    update); they are zeroed again at the next forward and a warning says
    so once. Gradients from ``torch.autograd.grad`` are not masked.
    ``copy.deepcopy(model)`` gives a copy enforcing the same masks, without
    an optimiser (``MaskHandle.of(copy)[0].attach(copy_optimizer)``).

    FSDP2: call it on every rank *after* ``fully_shard`` and after building
    the optimiser over the sharded parameters, with the same full
    (global-shape) masks on every rank::

        fully_shard(model)  # and its blocks before it
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        handle = ma.enforce_masks(model, masks, optimizer)

    Each rank keeps a copy of the full masks and its own shard of each
    (cut without communication), and masks its local shards of weights,
    gradients and optimiser state:
    the promise above holds for the gathered (``full_tensor()``) tensors,
    with no collective per step. Called *before* ``fully_shard``, the
    handle re-binds to the sharded DTensor parameters at the next
    ``attach``, attached step, ``load_state_dict`` or read of
    :attr:`MaskHandle.active` (``handle.attach(optimizer)`` with the
    optimiser built after ``fully_shard`` does it at once). An optimiser
    built before ``fully_shard`` steps parameters FSDP2 has replaced: its
    next step raises a :class:`~maskalign.MaskError`. :func:`assert_masked`
    gathers, so it is a collective on FSDP2 models.

    Args:
        model: network to mask in place.
        masks: name -> ``torch.bool`` mask of the parameter's shape (any
            device); not modified (the handle keeps its own copies). A
            DTensor mask is gathered once, here (a collective).
        optimizer: optional optimiser stepping the masked parameters;
            more can be added with :meth:`MaskHandle.attach`.

    Returns:
        A :class:`MaskHandle`; ``handle.remove()`` or a ``with`` block
        uninstalls the hooks.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module`` or ``masks`` is
            not a mapping (see :func:`~maskalign.validate_masks`), or
            ``optimizer`` is not an optimiser (see :meth:`MaskHandle.attach`).
        MaskError: a mask is malformed for ``model`` (see
            :func:`~maskalign.validate_masks`).

    Source: sparse training from a rewind point with a fixed mask, as in the
    lottery ticket hypothesis (Frankle & Carbin, ICLR 2019; Frankle et al.,
    ICML 2020) and the permuted masks of Adnan et al. (ICML 2025, Sec. 3).

    Example:
        >>> import torch, maskalign as ma
        >>> from maskalign.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MLP(in_features=64, hidden=(32, 32), num_classes=10)
        >>> mask = ma.global_magnitude_prune(model, sparsity=0.5)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        >>> with ma.enforce_masks(model, mask, opt):
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         loss = model(torch.randn(8, 64)).logsumexp(1).mean()
        ...         loss.backward()
        ...         opt.step()
        >>> all(bool((model.get_parameter(n)[~m] == 0).all()) for n, m in mask.items())
        True
        >>> round(ma.sparsity(mask).global_, 2)
        0.5
    """
    validate_masks(model, masks)
    if optimizer is not None:
        _check_optimizer(optimizer)
    handle = MaskHandle(model, {name: _full(mask).detach().clone() for name, mask in masks.items()})
    handle._install()
    if optimizer is not None:
        handle.attach(optimizer)
    return handle


def assert_masked(model: nn.Module, masks: Mapping[str, Tensor], atol: float = 0.0, *, grads: bool = False) -> None:
    """Check that every pruned weight is zero (``|w| <= atol``; NaN fails).

    Only what the model holds is checked: gradients returned by
    ``torch.autograd.grad`` never reach ``.grad`` and are not masked by
    :func:`enforce_masks` (mask them yourself, e.g. ``g * mask``, before
    using them).

    DTensor parameters (FSDP2), gradients and masks are gathered
    (``full_tensor()``) and checked whole, so on such a model it is a
    collective: call it on every rank; every rank then raises the same
    error.

    Args:
        model: network to check; not modified.
        masks: name -> ``torch.bool`` mask of the parameter's shape (any
            device), or a DTensor mask (``MaskHandle.masks`` of an FSDP2
            model).
        atol: tolerance on ``|w|`` at pruned entries, ``>= 0``.
        grads: also check ``param.grad`` (dense or sparse) where present.

    Raises:
        ArgumentValueError: if ``atol`` is not a number, negative or NaN.
        MaskError: if ``masks`` is malformed
            (see :func:`~maskalign.validate_masks`); or naming each parameter
            with the number of pruned entries that are not zero and their
            largest magnitude.
    """
    if isinstance(atol, bool) or not isinstance(atol, numbers.Real) or not atol >= 0.0:
        raise ArgumentValueError(f"Argument 'atol' must be a number >= 0, got {atol!r}; pass a tolerance such as 0.0.")
    validate_masks(model, masks)
    named = dict(model.named_parameters())
    problems = []
    for name, mask in masks.items():
        values = [("", _full(named[name].detach()))]
        grad = named[name].grad
        if grads and grad is not None:
            values.append((".grad", grad.to_dense() if grad.is_sparse else _full(grad)))
        mask = _full(mask)
        for suffix, value in values:
            pruned = ~mask.to(value.device)
            leaked = pruned & ~(value.abs() <= atol)
            count = int(leaked.sum())
            if count:
                worst = value[leaked].abs().max().item()
                problems.append(
                    f"{name + suffix!r}: {count} of {int(pruned.sum())} masked entries are non-zero "
                    f"(max |w| = {worst:.3g})"
                )
    if problems:
        raise MaskError(
            "; ".join(problems) + f" (atol={atol}): masked entries must be exactly 0; enforce the masks with "
            "ma.enforce_masks(model, masks, optimizer) so that no step revives them, or zero them with ma.apply_masks."
        )
