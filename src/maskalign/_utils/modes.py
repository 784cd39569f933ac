"""Train mode versus eval mode: does a model compute the same graph in both?

A permutation spec must keep the model's function in eval mode *and* in train
mode. Most models run the same ops in both modes, differing only in flags that
do not change which axes meet (BatchNorm's batch statistics, dropout). Some do
not: an auxiliary head used only while training (GoogLeNet, Inception-v3), a
train-only projection, a branch on ``self.training``. Their train-mode graph
must be analysed too.

Exporting a second graph doubles the cost of :func:`maskalign.build_spec`, so
:func:`mode_difference` first decides whether it is needed: it runs the model
eagerly once per mode on the example inputs, records every torch call at the
``__torch_function__`` level (the function, the provenance and shape of each
tensor argument, every non-boolean constant, the output shapes), and compares
the two traces. Identical traces (up to boolean flags, and the rate of dropout
calls) mean the two modes read the same tensors through the same ops, so the
train-mode graph has the same axis constraints as the eval-mode one. Any
difference names the first call where the modes part, and the train-mode graph
is exported and analysed as well.

The probe never changes the model or the process: it runs without gradients,
restores every buffer (BatchNorm running statistics) and every module's
``training`` flag, and forks the random number generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

__all__ = ["eval_mode", "mode_difference", "plain_tensors", "preserved_attributes", "preserved_state", "run_in_mode"]

_MODE_FLAGGED = frozenset(
    """
    dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout feature_dropout
    native_dropout batch_norm instance_norm rrelu lstm gru rnn_tanh rnn_relu multi_head_attention_forward
    scaled_dot_product_attention
    """.split()
)
"""Calls whose boolean flags and rates follow the mode without changing which
axes meet: dropout is elementwise, batch statistics are per channel like the
running ones, a recurrent layer's dropout acts between layers. For every other
call a boolean argument must be equal in both modes."""


class _Recorder(TorchFunctionMode):
    """Records top-level torch calls (a handler's own inner calls are not seen:
    the mode is disabled while it runs)."""

    def __init__(self, labels: dict[int, str]) -> None:
        super().__init__()
        self.labels = labels
        self.calls: list[tuple[Any, ...]] = []
        self.keep: list[Any] = []  # outputs stay alive, so that ids are never reused

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        loose = name in _MODE_FLAGGED
        described = tuple(self._describe(a, loose) for a in args)
        described_kw = tuple((k, self._describe(v, loose)) for k, v in sorted(kwargs.items()))
        self.keep.append(out)
        leaves = [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, Tensor)]
        inputs = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)]
        if all(t.dim() == 0 for t in leaves + inputs):
            # scalars carry no axes (BatchNorm's num_batches_tracked counter, a loss)
            for leaf in leaves:
                self.labels[id(leaf)] = "a scalar"
            return out
        index = len(self.calls)
        for j, leaf in enumerate(leaves):  # an identity (eval-mode dropout) returns its input: relabel
            self.labels[id(leaf)] = f"call {index} output {j}"
        self.calls.append((name, described, described_kw, tuple(tuple(t.shape) for t in leaves)))
        return out

    def _describe(self, value: Any, loose: bool) -> Any:
        if isinstance(value, Tensor):
            return ("tensor", self.labels.get(id(value), "a tensor made outside torch calls"), tuple(value.shape))
        if isinstance(value, (list, tuple)):
            return tuple(self._describe(v, loose) for v in value)
        if loose and isinstance(value, (bool, int, float)):
            return "flag or rate"
        if isinstance(value, (int, float, str, torch.dtype, torch.device, torch.Size)):
            return value
        return type(value).__name__


_MODULE_FIELDS = frozenset({"_parameters", "_buffers", "_modules"})


def _containers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(path, value)`` for every attribute of every submodule that is a
    tensor, or a dict / list holding tensors, outside parameters and buffers."""
    for path, module in model.named_modules(remove_duplicate=False):
        for key, value in vars(module).items():
            if key in _MODULE_FIELDS or key.startswith("__"):
                continue
            where = f"{path}.{key}" if path else key
            if isinstance(value, Tensor) or (
                isinstance(value, (dict, list)) and any(isinstance(v, Tensor) for v in _values(value))
            ):
                yield where, value


def _values(container: dict[Any, Any] | list[Any]) -> list[Any]:
    return list(container.values()) if isinstance(container, dict) else list(container)


def plain_tensors(model: nn.Module) -> frozenset[str]:
    """Where the model keeps tensors outside its parameters and buffers:
    ``"block.attn.cache['cpu']"`` for a dict entry, ``"block.scale"`` for a
    plain attribute. A permutation cannot update these (a cache of tensors
    derived from the weights, as LeViT's attention biases)."""
    found: set[str] = set()
    for where, value in _containers(model):
        if isinstance(value, Tensor):
            found.add(where)
        elif isinstance(value, dict):
            found.update(f"{where}[{k!r}]" for k, v in value.items() if isinstance(v, Tensor))
        else:
            found.update(f"{where}[{i}]" for i, v in enumerate(value) if isinstance(v, Tensor))
    return frozenset(found)


@contextlib.contextmanager
def preserved_attributes(model: nn.Module) -> Iterator[None]:
    """Restore, on exit, the contents of every public dict or list attribute
    of the model's modules (caches a forward fills), and drop tensor, dict and
    list attributes that were added."""
    saved = [(module, dict(vars(module))) for module in model.modules()]
    contents = {
        id(value): (value, value.copy())
        for module in model.modules()
        for key, value in vars(module).items()
        if not key.startswith("_") and isinstance(value, (dict, list))
    }
    try:
        yield
    finally:
        for module, before in saved:
            for key, value in list(vars(module).items()):
                if not isinstance(value, (Tensor, dict, list)) or key.startswith("_"):
                    continue
                if key not in before:
                    delattr(module, key)
                elif value is not before[key]:  # torch.export swaps in copies of dict attributes
                    setattr(module, key, before[key])
        for value, copied in contents.values():
            if isinstance(value, dict):
                value.clear()
                value.update(copied)
            else:
                value[:] = copied


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run code that may update the model's buffers (BatchNorm in train mode)
    or flags, and the CPU random number generator; restore all of them on exit."""
    flags = [(module, module.training) for module in model.modules()]
    tensors = list(model.buffers())
    saved = [t.detach().clone() for t in tensors]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                if tensor.shape == value.shape:
                    tensor.copy_(value)
        for module, flag in flags:
            module.training = flag


def run_in_mode(
    model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], *, train: bool, seed: int | None = None
) -> Any:
    """``model(*args, **kwargs)`` without gradients in train or eval mode,
    leaving the model (flags, buffers) and the random number generator as they
    were; ``seed`` seeds the (forked) generator for the call."""
    with preserved_state(model), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        model.train(train)
        return model(*args, **kwargs)


def _trace(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], *, train: bool) -> list[tuple[Any, ...]]:
    # forward may write into its inputs: run on copies
    args, kwargs = pytree.tree_map_only(Tensor, lambda t: t.clone(), (args, dict(kwargs)))
    labels = {id(t): f"'{name}'" for name, t in model.state_dict(keep_vars=True).items()}
    for k, leaf in enumerate(pytree.tree_leaves((args, dict(kwargs)))):
        if isinstance(leaf, Tensor):
            labels[id(leaf)] = f"input {k}"
    recorder = _Recorder(labels)
    with preserved_state(model), torch.no_grad():
        torch.manual_seed(0)
        model.train(train)
        with recorder:
            model(*args, **kwargs)
    return recorder.calls


def mode_difference(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
    """``None`` when ``model`` runs the same torch calls on the same tensors in
    train and eval mode (up to the mode flags and dropout rates of the calls in
    ``_MODE_FLAGGED``); otherwise
    where the two modes part, in words (``"call 12: eval runs linear, train
    runs dropout"``).

    Args:
        model: the model (left unchanged).
        args, kwargs: example inputs of ``forward``.

    When the eager runs fail (``torch.cond`` compiles its branches with
    dynamo, which refuses to run under the recording mode), the modes count as
    different, so the train-mode graph is analysed.
    """
    try:
        eval_calls = _trace(model, args, kwargs, train=False)
        train_calls = _trace(model, args, kwargs, train=True)
    except Exception as exc:  # torch.cond compiles with dynamo, which refuses a function mode
        return f"the modes could not be compared eagerly ({type(exc).__name__})"
    for index, (e, t) in enumerate(zip(eval_calls, train_calls)):
        if e != t:
            what = f"eval runs {e[0]}, train runs {t[0]}" if e[0] != t[0] else f"{e[0]} gets other arguments"
            return f"call {index}: {what}"
    if len(eval_calls) < len(train_calls):
        return f"call {len(eval_calls)}: only train mode runs {train_calls[len(eval_calls)][0]}"
    if len(eval_calls) > len(train_calls):
        return f"call {len(train_calls)}: only eval mode runs {eval_calls[len(train_calls)][0]}"
    return None


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every submodule of ``models`` in eval mode; restore each flag on exit."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag
