"""Misuse battery: ordinary mistakes get a typed maskalign error that names the
culprit, says what to do, links to its troubleshooting entry, and changes
nothing.

Every case asserts

* the exact error class (a :class:`~maskalign.MaskAlignError` subclass) and,
  where a built-in type was raised before, that it still is one
  (``ValueError`` / ``TypeError`` / ``KeyError``);
* that the message names the culprit (argument, key, layer, shape, batch);
* that ``str(error)`` carries :data:`maskalign.errors.DOCS_URL` and ends with
  the link of its class;
* that no input was mutated: model ``state_dict`` values, parameter objects,
  gradients and train flags, masks, data, files (:func:`snapshot`).

The command line is checked the same way through ``maskalign.repro.cli.main``: exit
status 2 and one ``maskalign: ...`` line with the link. Negative controls show
that correct use of the same functions works, and that :func:`snapshot`
catches each kind of mutation.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import maskalign as ma
from maskalign import errors
from maskalign.errors import (
    DOCS_URL,
    ArgumentTypeError,
    ArgumentValueError,
    ConfigError,
    DataError,
    MaskAlignError,
    MaskError,
    SpecError,
    SpecMismatchError,
    UnknownPresetError,
)
from maskalign.evaluation.lmc import evaluate
from maskalign.matching.lap import block_lap_values, solve_lap
from maskalign.models import MLP
from maskalign.repro.cli import main
from maskalign.repro.experiment import reproduce, resolve_device
from maskalign.repro.presets import get_preset

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------ nothing mutated
def snapshot(value: Any) -> Any:
    """A deep, comparable record of ``value``: a module's tensors (values,
    dtypes, the Parameter objects themselves, gradients, requires_grad) and
    every submodule's train flag; tensors (also sparse ones); mappings, lists
    and tuples element by element; a file's bytes or a folder's files."""
    if isinstance(value, nn.Module):
        return (
            "module",
            {k: snapshot(v) for k, v in value.state_dict(keep_vars=True).items()},
            [(name, module.training) for name, module in value.named_modules()],
            [
                (name, id(p), p.requires_grad, None if p.grad is None else snapshot(p.grad))
                for name, p in value.named_parameters()
            ],
        )
    if isinstance(value, Tensor):
        dense = value.detach().to_dense() if value.layout != torch.strided else value.detach()
        return ("tensor", value.layout, value.dtype, tuple(value.shape), dense.clone())
    if isinstance(value, Path):
        if value.is_dir():
            return ("dir", {str(p.relative_to(value)): p.read_bytes() for p in sorted(value.rglob("*")) if p.is_file()})
        return ("file", value.read_bytes()) if value.exists() else ("missing",)
    if isinstance(value, Mapping):
        return ("mapping", type(value), [(k, snapshot(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return ("sequence", type(value), [snapshot(v) for v in value])
    if isinstance(value, np.ndarray):
        return ("array", value.copy())
    return ("value", value)


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
    return torch.equal(a, b)


def difference(before: Any, after: Any, where: str = "input") -> str | None:
    """Where ``before`` and ``after`` (two :func:`snapshot` s) differ, or ``None``."""
    if type(before) is not type(after):
        return f"{where}: {type(before).__name__} became {type(after).__name__}"
    if isinstance(before, tuple) and before and before[0] == "tensor":
        if before[:4] != after[:4] or not _same_tensor(before[4], after[4]):
            return f"{where}: tensor changed"
        return None
    if isinstance(before, tuple) and before and before[0] == "array":
        return None if np.array_equal(before[1], after[1], equal_nan=True) else f"{where}: array changed"
    if isinstance(before, dict):
        if list(before) != list(after):
            return f"{where}: keys {list(before)} became {list(after)}"
        return next((d for k in before if (d := difference(before[k], after[k], f"{where}[{k!r}]"))), None)
    if isinstance(before, (list, tuple)):
        if len(before) != len(after):
            return f"{where}: length {len(before)} became {len(after)}"
        return next((d for i, (x, y) in enumerate(zip(before, after)) if (d := difference(x, y, f"{where}.{i}"))), None)
    return None if before == after else f"{where}: {before!r} became {after!r}"


def assert_unchanged(before: Any, inputs: Any) -> None:
    """Fail naming the first place where ``inputs`` no longer match ``before``."""
    changed = difference(before, snapshot(inputs))
    assert changed is None, f"an input was mutated: {changed}"


# ------------------------------------------------------------------ fixtures
def mlp(seed: int = 0) -> nn.Module:
    """Parameters 0.weight (8, 6), 1.weight/1.bias (LayerNorm), 3.weight (5, 8), 5.weight (3, 5), and biases."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def masks_for(model: nn.Module, sparsity: float = 0.5) -> dict[str, Tensor]:
    return ma.global_magnitude_prune(model, sparsity)


def net(seed: int) -> nn.Module:
    """The matching architecture: layers.0 (8, 12), fc (3, 8)."""
    torch.manual_seed(seed)
    return MLP(in_features=12, hidden=(8,), num_classes=3)


@functools.cache
def net_spec() -> ma.PermutationSpec:
    return ma.build_spec(net(0), torch.randn(2, 12))


def inputs_for_net(n: int = 2) -> list[Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(4, 12, generator=generator) for _ in range(n)]


def labelled(n: int = 2) -> list[tuple[Tensor, Tensor]]:
    return [(x, torch.arange(4) % 3) for x in inputs_for_net(n)]


class Recorder:
    """A train_fn that records its calls (there must be none)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, model: nn.Module, imp_round: ma.IMPRound) -> None:
        self.calls.append(imp_round.index)


# --------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], tuple[Callable[[], object], Any]]
    error: type[MaskAlignError]
    old: tuple[type[BaseException], ...]
    culprits: tuple[str, ...]


CASES: list[Case] = []


def case(
    error: type[MaskAlignError], *culprits: str, old: tuple[type[BaseException], ...] = ()
) -> Callable[[Callable[[], tuple[Callable[[], object], Any]]], Callable[[], Any]]:
    """Register a case: the decorated function builds fresh inputs and returns
    ``(call, inputs)``; ``call()`` must raise ``error`` naming every culprit."""

    def register(make: Callable[[], tuple[Callable[[], object], Any]]) -> Callable[[], Any]:
        CASES.append(Case(make.__name__, make, error, old, culprits))
        return make

    return register


V, T = (ValueError,), (TypeError,)

# --- masks


@case(ArgumentTypeError, "'masks'", "list of 3 items", "dict(pairs)", old=T)
def masks_as_list_of_pairs():
    model = mlp()
    pairs = list(masks_for(model).items())
    return lambda: ma.validate_masks(model, pairs), (model, pairs)


@case(ArgumentTypeError, "'masks'", "None", old=T)
def masks_none():
    model = mlp()
    return lambda: ma.apply_masks(model, None), (model,)


@case(ArgumentTypeError, "'model'", "OrderedDict", "state_dict", old=T)
def state_dict_where_a_model_goes():
    model = mlp()
    state, masks = model.state_dict(), masks_for(model)
    return lambda: ma.apply_masks(state, masks), (model, state, masks)


@case(ArgumentTypeError, "'model'", "mask set", old=T)
def masks_and_model_swapped():
    model = mlp()
    masks = masks_for(model)
    return lambda: ma.validate_masks(masks, model), (model, masks)


@case(MaskError, "'0.weight'", "sparse_coo", "to_dense()", old=V)
def sparse_layout_mask():
    model = mlp()
    masks = {"0.weight": torch.ones(8, 6, dtype=torch.bool).to_sparse()}
    return lambda: ma.validate_masks(model, masks), (model, masks)


@case(MaskError, "'0.wieght'", "Did you mean: '0.weight'", old=V)
def mask_key_typo():
    model = mlp()
    masks = {"0.wieght": torch.ones(8, 6, dtype=torch.bool)}
    return lambda: ma.apply_masks(model, masks), (model, masks)


@case(MaskError, "'0.weight'", "(6, 8)", "(8, 6)", old=V)
def mask_transposed():
    model = mlp()
    masks = {"0.weight": torch.ones(6, 8, dtype=torch.bool)}
    return lambda: ma.apply_masks(model, masks), (model, masks)


@case(MaskError, "'3.weight'", "torch.float32", "mask.bool()", old=V)
def float_mask():
    model = mlp()
    masks = {"3.weight": torch.ones(5, 8)}
    return lambda: ma.apply_masks(model, masks), (model, masks)


@case(MaskError, "'0.weight'", "ndarray", "torch.as_tensor", old=V)
def numpy_mask():
    model = mlp()
    masks = {"0.weight": np.ones((8, 6), dtype=bool)}
    return lambda: ma.validate_masks(model, masks), (model, masks)


@case(MaskError, "Mask key 0", "int", "named_parameters", old=V)
def integer_mask_key():
    model = mlp()
    masks = {0: torch.ones(8, 6, dtype=torch.bool)}
    return lambda: ma.validate_masks(model, masks), (model, masks)


@case(MaskError, "'3.weight'", "(5, 8)", old=V)
def second_mask_bad_first_good_nothing_applied():
    model = mlp()
    masks = {"0.weight": torch.rand(8, 6) > 0.5, "3.weight": torch.ones(8, 5, dtype=torch.bool)}
    return lambda: ma.apply_masks(model, masks), (model, masks)


@case(MaskError, "'1.running_mean'", "not a parameter", old=V)
def mask_for_a_buffer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    masks = {"1.running_mean": torch.ones(3, dtype=torch.bool)}
    return lambda: ma.apply_masks(model, masks), (model, masks)


# --- pruning


@case(ArgumentValueError, "'sparsity'", "1.5", "[0, 1)", old=V)
def sparsity_above_one():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, sparsity=1.5), (model,)


@case(ArgumentValueError, "'sparsity'", "90", "looks like a percentage", "pass 0.9", old=V)
def sparsity_as_percentage():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, sparsity=90), (model,)


@case(ArgumentValueError, "'sparsity'", "-0.1", old=V)
def sparsity_negative():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, -0.1), (model,)


@case(ArgumentValueError, "'sparsity'", "nan", old=V)
def sparsity_nan():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, math.nan), (model,)


@case(ArgumentValueError, "'sparsity'", "1.0", old=V)
def sparsity_one_prunes_everything():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, 1.0), (model,)


@case(ArgumentTypeError, "'sparsity'", "'0.5'", old=T)
def sparsity_as_string():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, "0.5"), (model,)


@case(MaskError, "'3.wieght'", "Did you mean: '3.weight'", old=V)
def prune_params_typo():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, 0.5, params=["0.weight", "3.wieght"]), (model,)


@case(ArgumentTypeError, "'params'", "['0.weight']", old=T)
def prune_params_as_string():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, 0.5, params="0.weight"), (model,)


@case(ArgumentValueError, "'params' is empty", old=V)
def prune_params_empty():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, 0.5, params=[]), (model,)


@case(MaskError, "'params'", "['0.weight']", "more than once", old=V)
def prune_params_repeated():
    model = mlp()
    return lambda: ma.global_magnitude_prune(model, 0.5, params=["0.weight", "0.weight"]), (model,)


@case(ArgumentValueError, "LayerNorm", "default_prunable", "params=", old=V)
def prune_model_without_linear_layers():
    model = nn.LayerNorm(4)
    return lambda: ma.global_magnitude_prune(model, 0.5), (model,)


@case(MaskError, "['0.bias']", "params", old=V)
def prune_masks_outside_params():
    model = mlp()
    masks = {"0.bias": torch.ones(8, dtype=torch.bool)}
    return lambda: ma.global_magnitude_prune(model, 0.5, masks=masks), (model, masks)


@case(MaskError, "0.3", "already prune", "cannot be revived", old=V)
def prune_below_existing_masks():
    model = mlp()
    masks = masks_for(model, 0.5)
    return lambda: ma.global_magnitude_prune(model, 0.3, masks=masks), (model, masks)


@case(DataError, "'3.weight'", "NaN", old=V)
def prune_nan_weights():
    model = mlp()
    with torch.no_grad():
        model[3].weight[1, 2] = math.nan
    return lambda: ma.global_magnitude_prune(model, 0.5), (model,)


@case(ArgumentTypeError, "'model'", "global_magnitude_prune(model, sparsity)", old=T)
def prune_masks_where_the_model_goes():
    model = mlp()
    masks = masks_for(model)
    return lambda: ma.global_magnitude_prune(masks, 0.5), (model, masks)


@case(ArgumentTypeError, "'masks'", "Sequential", old=T)
def random_masks_of_a_model():
    model = mlp()
    return lambda: ma.random_masks_like(model), (model,)


@case(ArgumentTypeError, "'generator'", "0", "manual_seed", old=T)
def random_masks_with_a_seed_for_generator():
    model = mlp()
    masks = masks_for(model)
    return lambda: ma.random_masks_like(masks, generator=0), (masks,)


@case(MaskError, "'0.weight'", "torch.bool", old=V)
def random_masks_of_float_masks():
    masks = {"0.weight": torch.ones(8, 6)}
    return lambda: ma.random_masks_like(masks), (masks,)


@case(ArgumentTypeError, "'masks'", "sparsity(model, masks)", old=T)
def sparsity_of_masks_with_masks():
    masks = masks_for(mlp())
    return lambda: ma.sparsity(masks, masks=masks), (masks,)


@case(ArgumentTypeError, "'obj'", "list", old=T)
def sparsity_of_a_list():
    pairs = list(masks_for(mlp()).items())
    return lambda: ma.sparsity(pairs), (pairs,)


@case(MaskError, "'0.weight'", "sparse_coo", old=V)
def sparsity_of_sparse_masks():
    masks = {"0.weight": torch.ones(8, 6, dtype=torch.bool).to_sparse()}
    return lambda: ma.sparsity(masks), (masks,)


@case(ArgumentTypeError, "'model'", "state_dict", old=T)
def default_prunable_of_a_state_dict():
    model = mlp()
    state = model.state_dict()
    return lambda: ma.sparse.masks.default_prunable(state), (model, state)


# --- IMP


@case(ArgumentValueError, "'target_sparsity'", "1.5", "(0, 1)", old=V)
def imp_schedule_target_above_one():
    return lambda: ma.imp_schedule(1.5), ()


@case(ArgumentValueError, "'target_sparsity[1]'", "looks like a percentage", "pass 0.95", old=V)
def imp_schedule_percentages():
    targets = [0.9, 95]
    return lambda: ma.imp_schedule(targets), (targets,)


@case(ArgumentValueError, "'target_sparsity' is empty", old=V)
def imp_schedule_no_target():
    return lambda: ma.imp_schedule([]), ()


@case(ArgumentValueError, "'rate'", "20", "pass 0.2", old=V)
def imp_rate_as_percentage():
    return lambda: ma.imp_schedule(0.5, rate=20), ()


@case(ArgumentTypeError, "'target_sparsity'", "'0.5'", old=T)
def imp_target_as_string():
    return lambda: ma.imp_schedule("0.5"), ()


def _imp(**kwargs: Any) -> tuple[Callable[[], object], Any]:
    model, trainer = mlp(), Recorder()
    kwargs = {k: (v(model) if callable(v) and k in ("rewind_to", "masks") else v) for k, v in kwargs.items()}
    call = lambda: ma.iterative_magnitude_pruning(model, trainer, 0.5, **kwargs)  # noqa: E731
    return call, (model, trainer.calls, kwargs.get("rewind_to"), kwargs.get("masks"))


@case(ArgumentValueError, "'rewind'", "'restrat'", "Did you mean: 'restart'", old=V)
def imp_rewind_typo():
    return _imp(rewind="restrat")


@case(ArgumentValueError, "'rewind_to' is missing", "rewind='continue'", old=V)
def imp_rewind_without_checkpoint():
    return _imp(rewind="continue")


@case(ArgumentValueError, "'rewind_to'", "rewind='none'", old=V)
def imp_checkpoint_without_rewind():
    return _imp(rewind_to=lambda m: m.state_dict())


@case(ArgumentValueError, "'rewind_epoch'", "rewind='none'", old=V)
def imp_rewind_epoch_without_rewind():
    return _imp(rewind_epoch=3)


@case(ArgumentValueError, "'rewind_epoch'", "-1", old=V)
def imp_negative_rewind_epoch():
    return _imp(rewind="restart", rewind_to=lambda m: m.state_dict(), rewind_epoch=-1)


@case(ArgumentTypeError, "'rewind_epoch'", "2.5", "int", old=T)
def imp_fractional_rewind_epoch():
    return _imp(rewind="continue", rewind_to=lambda m: m.state_dict(), rewind_epoch=2.5)


@case(ArgumentTypeError, "'rewind_to'", "Sequential", "state_dict()", old=T)
def imp_model_as_checkpoint():
    return _imp(rewind="restart", rewind_to=lambda m: copy.deepcopy(m))


@case(ArgumentValueError, "'rewind_to'", "missing keys ['3.bias']", old=V)
def imp_checkpoint_missing_a_key():
    return _imp(rewind="restart", rewind_to=lambda m: {k: v for k, v in m.state_dict().items() if k != "3.bias"})


@case(ArgumentValueError, "rewind_to['0.weight']", "(6, 8)", "(8, 6)", old=V)
def imp_checkpoint_of_another_shape():
    return _imp(rewind="restart", rewind_to=lambda m: {**m.state_dict(), "0.weight": torch.zeros(6, 8)})


@case(ArgumentTypeError, "'train_fn'", "list", "train_fn(model, round)", old=T)
def imp_data_as_train_fn():
    model, data = mlp(), [torch.randn(2, 6)]
    return lambda: ma.iterative_magnitude_pruning(model, data, 0.5), (model, data)


@case(ArgumentTypeError, "'evaluate'", "float", old=T)
def imp_evaluate_not_callable():
    return _imp(evaluate=0.9)


@case(MaskError, "'5.wieght'", "Did you mean: '5.weight'", old=V)
def imp_params_typo():
    return _imp(params=["0.weight", "5.wieght"])


@case(ArgumentValueError, "'params'", "'exclude'", "no parameter to prune", old=V)
def imp_exclude_everything():
    return _imp(exclude=lambda name: True)


@case(ArgumentTypeError, "'masks'", "dict(pairs)", old=T)
def imp_masks_as_pairs():
    return _imp(masks=lambda m: list(masks_for(m, 0.2).items()))


@case(ArgumentTypeError, "'model'", "state_dict", old=T)
def imp_state_dict_as_model():
    model, trainer = mlp(), Recorder()
    state = model.state_dict()
    return lambda: ma.iterative_magnitude_pruning(state, trainer, 0.5), (model, state, trainer.calls)


# --- activation matching


def _pair(seed_a: int = 1, seed_b: int = 2) -> tuple[nn.Module, nn.Module]:
    return net(seed_a), net(seed_b)


@case(ArgumentTypeError, "'model_a'", "list", "match_activations(model_a, model_b, data", old=T)
def match_activations_arguments_swapped():
    a, b = _pair()
    data = inputs_for_net()
    return lambda: ma.match_activations(data, a, b, progress=False), (a, b, data)


@case(ArgumentTypeError, "'data'", "MLP", "match_activations(model_a, model_b, data", old=T)
def match_activations_model_as_data():
    a, b = _pair()
    c = net(3)
    return lambda: ma.match_activations(a, b, c, progress=False), (a, b, c)


@case(ArgumentTypeError, "'data'", "(4, 12)", "[x]", old=T)
def match_activations_tensor_as_data():
    a, b = _pair()
    x = inputs_for_net(1)[0]
    return lambda: ma.match_activations(a, b, x, spec=net_spec(), progress=False), (a, b, x)


@case(ArgumentTypeError, "'data'", "one batch", "[batch]", old=T)
def match_activations_one_dict_as_data():
    a, b = _pair()
    batch = {"x": inputs_for_net(1)[0]}
    return lambda: ma.match_activations(a, b, batch, progress=False), (a, b, batch)


@case(ArgumentTypeError, "'data'", "None", old=T)
def match_activations_no_data():
    a, b = _pair()
    return lambda: ma.match_activations(a, b, None, progress=False), (a, b)


@case(ArgumentTypeError, "'model_b'", "state_dict", old=T)
def match_activations_state_dict_as_model_b():
    a, b = _pair()
    state, data = b.state_dict(), inputs_for_net()
    return lambda: ma.match_activations(a, state, data, progress=False), (a, b, state, data)


@case(ArgumentValueError, "'cost'", "'corelation'", "Did you mean: 'correlation'", old=V)
def match_activations_cost_typo():
    a, b = _pair()
    data = inputs_for_net()
    return lambda: ma.match_activations(a, b, data, cost="corelation", progress=False), (a, b, data)


@case(ArgumentValueError, "'num_batches'", "0", old=V)
def match_activations_zero_batches():
    a, b = _pair()
    data = inputs_for_net()
    return lambda: ma.match_activations(a, b, data, num_batches=0, progress=False), (a, b, data)


@case(ArgumentTypeError, "'max_joint'", "'big'", old=T)
def match_activations_max_joint_string():
    a, b = _pair()
    data = inputs_for_net()
    return lambda: ma.match_activations(a, b, data, max_joint="big", progress=False), (a, b, data)


@case(ArgumentTypeError, "'input_fn'", "str", old=T)
def match_activations_input_fn_not_callable():
    a, b = _pair()
    data = inputs_for_net()
    return lambda: ma.match_activations(a, b, data, input_fn="x", progress=False), (a, b, data)


@case(ArgumentTypeError, "'spec'", "Permutation", "perm.spec", old=T)
def match_activations_permutation_as_spec():
    a, b = _pair()
    data, perm = inputs_for_net(), ma.random_permutation(net_spec())
    return lambda: ma.match_activations(a, b, data, spec=perm, progress=False), (a, b, data)


@case(SpecMismatchError, "'layers.0.weight'", "torch.float32", "torch.float64", "model_b.to(")
def match_activations_models_of_two_dtypes():
    a, b = _pair()
    b = b.double()
    data = inputs_for_net()
    return lambda: ma.match_activations(a, b, data, spec=net_spec(), progress=False), (a, b, data)


@case(SpecMismatchError, "model_a", "layers.0.weight")
def match_activations_spec_of_another_architecture():
    torch.manual_seed(0)
    a, b = MLP(in_features=12, hidden=(6,), num_classes=3), MLP(in_features=12, hidden=(6,), num_classes=3)
    data = inputs_for_net()
    return lambda: ma.match_activations(a, b, data, spec=net_spec(), progress=False), (a, b, data)


@case(DataError, "Batch 0", "'x'", "list of numbers", "torch.tensor", old=V)
def match_activations_batches_of_python_lists():
    a, b = _pair()
    data = [{"x": x.tolist()} for x in inputs_for_net()]
    return lambda: ma.match_activations(a, b, data, progress=False), (a, b, data)


@case(DataError, "Batch 1", "None", "holds no tensor", old=V)
def match_activations_a_none_batch():
    a, b = _pair()
    data = [*inputs_for_net(1), None]
    return lambda: ma.match_activations(a, b, data, spec=net_spec(), progress=False), (a, b, data)


@case(DataError, "Batch 0", "numpy array", "torch.from_numpy", old=V)
def match_activations_numpy_batches():
    a, b = _pair()
    data = [x.numpy() for x in inputs_for_net()]
    return lambda: ma.match_activations(a, b, data, progress=False), (a, b, data)


@case(DataError, "'data' yielded no batches", old=V)
def match_activations_exhausted_iterator():
    a, b = _pair()
    data = inputs_for_net()
    used = iter(data)
    list(used)
    return lambda: ma.match_activations(a, b, used, spec=net_spec(), progress=False), (a, b, data)


@case(DataError, "Batch 0", "keyword inputs ['x']", "1 positional input(s)", old=V)
def match_activations_dict_batches_for_a_positional_spec():
    a, b = _pair()
    data = [{"x": x} for x in inputs_for_net()]
    return lambda: ma.match_activations(a, b, data, spec=net_spec(), progress=False), (a, b, data)


@case(ArgumentValueError, "'cost'", "'pearson'", old=V)
def activation_stats_unknown_cost():
    stats = ma.matching.activation.ActivationStats(3)
    stats.update(torch.randn(5, 3), torch.randn(5, 3))
    return lambda: stats.similarity("pearson"), ()


@case(DataError, "ActivationStats has no samples", "update(a, b)", old=V)
def activation_stats_without_samples():
    stats = ma.matching.activation.ActivationStats(3)
    return lambda: stats.similarity(), ()


# --- weight matching


@case(DataError, "'layers.0.weight'", "model_b", "non-finite", old=V)
def match_weights_nan_weights():
    a, b = _pair()
    with torch.no_grad():
        b.layers[0].weight[0, 0] = math.nan
    return lambda: ma.match_weights(a, b, net_spec()), (a, b)


@case(DataError, "'layers.0.bias'", "model_a", "non-finite", old=V)
def match_weights_inf_weights():
    a, b = _pair()
    with torch.no_grad():
        a.layers[0].bias[1] = math.inf
    return lambda: ma.match_weights(a, b, net_spec()), (a, b)


@case(SpecMismatchError, "'layers.0.weight'", "torch.float64", "torch.float32")
def match_weights_models_of_two_dtypes():
    a, b = _pair()
    a = a.double()
    return lambda: ma.match_weights(a, b, net_spec()), (a, b)


@case(ArgumentValueError, "'restarts'", "0", old=V)
def match_weights_zero_restarts():
    a, b = _pair()
    return lambda: ma.match_weights(a, b, net_spec(), restarts=0), (a, b)


@case(ArgumentValueError, "'max_iter'", "-1", old=V)
def match_weights_negative_max_iter():
    a, b = _pair()
    return lambda: ma.match_weights(a, b, net_spec(), max_iter=-1), (a, b)


@case(ArgumentTypeError, "'seed'", "'0'", old=T)
def match_weights_seed_as_string():
    a, b = _pair()
    return lambda: ma.match_weights(a, b, net_spec(), seed="0"), (a, b)


@case(ArgumentTypeError, "'model_b'", "PermutationSpec", "match_weights(model_a, model_b, spec)", old=T)
def match_weights_spec_where_model_b_goes():
    a, b = _pair()
    return lambda: ma.match_weights(a, net_spec(), b), (a, b)


@case(ArgumentTypeError, "'init'", "dict", "Permutation", old=T)
def match_weights_init_as_dict():
    a, b = _pair()
    init = {"layers.0.weight:0": torch.arange(8)}
    return lambda: ma.match_weights(a, b, net_spec(), init=init), (a, b, init)


@case(SpecMismatchError, "'init'", "units")
def match_weights_init_for_another_spec():
    a, b = _pair()
    torch.manual_seed(0)
    other = ma.build_spec(MLP(in_features=12, hidden=(6,), num_classes=3), torch.randn(2, 12))
    init = ma.random_permutation(other)
    return lambda: ma.match_weights(a, b, net_spec(), init=init), (a, b)


@case(SpecError, "'spec'", "example_inputs")
def match_weights_without_spec_or_inputs():
    a, b = _pair()
    return lambda: ma.match_weights(a, b), (a, b)


# --- linear assignment


@case(ArgumentValueError, "'similarity'", "(3, 4)", "square", old=V)
def lap_not_square():
    similarity = torch.randn(3, 4)
    return lambda: solve_lap(similarity), (similarity,)


@case(ArgumentValueError, "'similarity'", "non-finite", "(0, 1)", old=V)
def lap_nan_entry():
    similarity = torch.randn(3, 3)
    similarity[0, 1] = math.nan
    return lambda: solve_lap(similarity), (similarity,)


@case(ArgumentTypeError, "'similarity'", "list", old=T)
def lap_list():
    similarity = [[1.0, 0.0], [0.0, 1.0]]
    return lambda: solve_lap(similarity), (similarity,)


@case(ArgumentValueError, "'blocks'", "(2, 2, 3)", old=V)
def block_lap_wrong_rank():
    blocks = torch.randn(2, 2, 3)
    return lambda: block_lap_values(blocks), (blocks,)


# --- LMC


@case(ArgumentValueError, "'alpha'", "nan", old=V)
def interpolate_nan_alpha():
    a, b = _pair()
    return lambda: ma.interpolate(a, b, math.nan), (a, b)


@case(ArgumentTypeError, "'alpha'", "'0.5'", old=T)
def interpolate_alpha_as_string():
    a, b = _pair()
    return lambda: ma.interpolate(a, b, "0.5"), (a, b)


@case(MaskError, "'fc.wieght'", "Did you mean: 'fc.weight'", old=V)
def interpolate_mask_key_typo():
    a, b = _pair()
    masks = {"fc.wieght": torch.ones(3, 8, dtype=torch.bool)}
    return lambda: ma.interpolate(a, b, 0.5, masks_a=masks), (a, b, masks)


@case(MaskError, "'fc.weight'", "(8, 3)", "(3, 8)", old=V)
def interpolate_mask_of_another_shape():
    a, b = _pair()
    masks = {"fc.weight": torch.ones(8, 3, dtype=torch.bool)}
    return lambda: ma.interpolate(a, b, 0.5, masks_b=masks), (a, b, masks)


@case(ArgumentTypeError, "'model_b'", "state_dict", old=T)
def interpolate_state_dict():
    a, b = _pair()
    state = b.state_dict()
    return lambda: ma.interpolate(a, state, 0.5), (a, b, state)


@case(SpecMismatchError, "'layers.0.weight'", "(6, 12)", "(8, 12)")
def interpolate_two_architectures():
    a = net(1)
    torch.manual_seed(0)
    b = MLP(in_features=12, hidden=(6,), num_classes=3)
    return lambda: ma.interpolate(b, a, 0.5), (a, b)


@case(ArgumentValueError, "'num_points'", "1", old=V)
def lmc_one_point():
    a, b = _pair()
    data = labelled()
    return lambda: ma.lmc_barrier(a, b, data, num_points=1), (a, b, data)


@case(ArgumentTypeError, "'model_a'", "lmc_barrier(model_a, model_b, data)", old=T)
def lmc_arguments_swapped():
    a, b = _pair()
    data = labelled()
    return lambda: ma.lmc_barrier(data, a, b, num_points=2), (a, b, data)


@case(ArgumentTypeError, "'data'", "one-shot iterator", "list", old=T)
def lmc_generator_data():
    a, b = _pair()
    data = labelled()
    return lambda: ma.lmc_barrier(a, b, (batch for batch in data), num_points=2), (a, b, data)


@case(DataError, "Batch 0", "(inputs, targets)", old=V)
def lmc_unlabelled_batches():
    a, b = _pair()
    data = inputs_for_net()
    return lambda: ma.lmc_barrier(a, b, data, num_points=2), (a, b, data)


@case(ArgumentTypeError, "'loss_fn'", "str", old=T)
def lmc_loss_fn_not_callable():
    a, b = _pair()
    data = labelled()
    return lambda: ma.lmc_barrier(a, b, data, "cross_entropy", num_points=2), (a, b, data)


@case(MaskError, "'nope'", "not a parameter", old=V)
def lmc_mask_of_unknown_tensor():
    a, b = _pair()
    data, masks = labelled(), {"nope": torch.ones(1, dtype=torch.bool)}
    return lambda: ma.lmc_barrier(a, b, data, num_points=2, masks_a=masks), (a, b, data, masks)


@case(DataError, "'data' of reset_bn_stats", "no batches", old=V)
def reset_bn_stats_without_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return lambda: ma.reset_bn_stats(model, []), (model,)


@case(ArgumentValueError, "'num_batches'", "0", old=V)
def reset_bn_stats_zero_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = [torch.randn(5, 3)]
    return lambda: ma.reset_bn_stats(model, data, num_batches=0), (model, data)


@case(DataError, "Batch 0 of bn data", "dict", old=V)
def reset_bn_stats_dict_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = [{"x": torch.randn(5, 3)}]
    return lambda: ma.reset_bn_stats(model, data), (model, data)


@case(ArgumentTypeError, "'data'", "one-shot iterator", old=T)
def repair_generator_data():
    a, b = _pair()
    mid = ma.interpolate(a, b, 0.5)
    data = inputs_for_net()
    return lambda: ma.repair(mid, a, b, 0.5, iter(data)), (a, b, mid, data)


@case(DataError, "Batch 0", "dict", "(inputs, targets)", old=V)
def evaluate_dict_batches():
    a = net(1)
    data = [{"x": x, "y": torch.zeros(4, dtype=torch.long)} for x in inputs_for_net()]
    return lambda: evaluate(a, data), (a, data)


# --- metrics


@case(DataError, "'a' and 'b'", "(4, 3)", "(5, 3)", old=V)
def disagreement_shapes_differ():
    p, q = torch.randn(4, 3), torch.randn(5, 3)
    return lambda: ma.metrics.disagreement(p, q), (p, q)


@case(DataError, "targets", "torch.float32", old=V)
def ensemble_accuracy_float_targets():
    logits, targets = [torch.randn(4, 3)], torch.zeros(4)
    return lambda: ma.metrics.ensemble_accuracy(logits, targets), (logits, targets)


@case(DataError, "p", "list", old=V)
def kl_of_lists():
    p, q = [[0.0, 1.0]], torch.randn(1, 2)
    return lambda: ma.metrics.kl_divergence(p, q), (p, q)


@case(DataError, "'logits' has 1 member", "reference=", old=V)
def pairwise_diversity_of_one_member():
    logits, targets = [torch.randn(4, 3)], torch.zeros(4, dtype=torch.long)
    return lambda: ma.metrics.diversity(logits, targets), (logits, targets)


# --- presets and the experiment


@case(UnknownPresetError, "'cifar10-vgg'", "Did you mean: 'cifar10-vgg11'", old=(KeyError, ValueError))
def preset_typo():
    return lambda: get_preset("cifar10-vgg"), ()


@case(ArgumentTypeError, "'epoch'", "Did you mean: 'epochs'", old=T)
def preset_unknown_setting():
    return lambda: get_preset("digits", epoch=3), ()


@case(ConfigError, "'sparsities' (--sparsities)", "90", "pass 0.9", old=V)
def preset_sparsity_percentage():
    return lambda: get_preset("digits", sparsities=(0.5, 90)), ()


@case(ConfigError, "'seeds' (--seeds)", "0", old=V)
def preset_no_seeds():
    return lambda: get_preset("digits", seeds=0), ()


@case(ConfigError, "'rewind_epochs' (--rewind-epochs)", "[0, 5]", "epochs=3", old=V)
def preset_rewind_beyond_training():
    return lambda: get_preset("digits", epochs=3, rewind_epochs=(0, 5)), ()


@case(ConfigError, "'hidden' (--hidden)", "'wide'", old=V)
def preset_hidden_not_a_number():
    return lambda: get_preset("digits", hidden=("wide",)), ()


@case(ConfigError, "'device' (--device)", "'cuda:99'", old=V)
def device_beyond_the_visible():
    return lambda: resolve_device("cuda:99"), ()


@case(ConfigError, "'device' (--device)", "'gpu'", "not a device", old=V)
def device_name_unknown():
    return lambda: resolve_device("gpu"), ()


@case(ConfigError, "'amp' (--amp)", "'bf16'", "CUDA", old=V)
def amp_without_cuda():
    out = Path(tempfile.mkdtemp(prefix="maskalign-misuse-")) / "run"  # must stay absent
    config = get_preset("digits", amp="bf16", device="cpu")
    return lambda: reproduce(config, out=out), (out,)


@case(ArgumentTypeError, "'config'", "dict", "ReproduceConfig", old=T)
def reproduce_with_a_dict_of_settings():
    out = Path(tempfile.mkdtemp(prefix="maskalign-misuse-")) / "run"  # must stay absent
    settings = {"seeds": 1}
    return lambda: reproduce(settings, out=out), (out, settings)


# ------------------------------------------------------------------- battery
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_misuse_raises_a_typed_error_that_names_the_culprit_and_changes_nothing(case: Case) -> None:
    call, inputs = case.make()
    before = snapshot(inputs)
    with pytest.raises(MaskAlignError) as info:
        call()
    error = info.value
    assert type(error) is case.error, f"raised {type(error).__name__}: {error}"
    for old in case.old:
        assert isinstance(error, old), f"{type(error).__name__} is no longer a {old.__name__}"
    message = str(error)
    for culprit in case.culprits:
        assert culprit in message, f"{culprit!r} not in {message!r}"
    assert DOCS_URL in message
    assert message.endswith(f"\nSee {DOCS_URL}/{case.error.docs_page}")
    assert not re.search(r"\bSee https?://\S+.*\bSee https?://", message, re.S), "the link is given twice"
    assert_unchanged(before, inputs)


def test_the_battery_is_large_and_covers_every_area() -> None:
    assert len(CASES) >= 55
    assert len({c.name for c in CASES}) == len(CASES)
    raised = {c.error for c in CASES}
    for cls in (ArgumentTypeError, ArgumentValueError, ConfigError, UnknownPresetError, MaskError, DataError):
        assert cls in raised


# ------------------------------------------------------------- command line
CLI_CASES = [
    (["reproduce", "--sparsities", "1.5"], "configerror", ["'sparsities' (--sparsities)", "1.5"]),
    (["reproduce", "--sparsities", "0.5", "90"], "configerror", ["90", "pass 0.9"]),
    (["reproduce", "--seeds", "0"], "configerror", ["'seeds' (--seeds)", "0"]),
    (["reproduce", "-k", "0", "5", "-T", "3"], "configerror", ["--rewind-epochs", "[0, 5]", "epochs=3"]),
    (["reproduce", "--device", "cuda:99", "--seeds", "1"], "configerror", ["'device' (--device)", "'cuda:99'"]),
    (["reproduce", "--prune-rate", "20"], "configerror", ["--prune-rate", "pass 0.2"]),
    (["reproduce", "--amp", "fp16", "--device", "cpu"], "configerror", ["--amp", "'fp16'", "CUDA"]),
    (["reproduce", "--seeds", "abc"], "command-line", ["reproduce", "--seeds", "'abc'", "--help"]),
    (["reproduce", "--preset", "cifar10-vgg"], "command-line", ["--preset", "'cifar10-vgg'"]),
    (["reproduce", "--no-such-flag"], "command-line", ["--no-such-flag"]),
    (["report", "{out}"], "command-line", ["results.json", "maskalign reproduce --out"]),
]
if not torch.cuda.is_available():
    CLI_CASES.append((["reproduce", "--device", "cuda", "--seeds", "1"], "configerror", ["'cuda'", "not available"]))


@pytest.mark.parametrize(
    ("argv", "anchor", "culprits"), CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_cli_errors_are_one_line_with_the_docs_link(
    argv: list[str], anchor: str, culprits: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    args = [a.replace("{out}", str(out)) for a in argv]
    if args[0] == "reproduce":
        args += ["--out", str(out), "--quiet"]
    try:
        status = main(args)
    except SystemExit as exit_:  # argparse's own errors exit
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maskalign: "), err
    assert f"See {DOCS_URL}/troubleshooting/#{anchor}" in err
    assert err.rstrip().endswith(f"#{anchor}")
    for culprit in culprits:
        assert culprit in err, f"{culprit!r} not in {err!r}"
    assert_unchanged(before, out)


# --------------------------------------------------------- negative controls
def test_correct_use_of_the_same_functions_works() -> None:
    model = mlp()
    masks = masks_for(model, 0.5)
    ma.validate_masks(model, masks)
    assert ma.sparsity(masks).global_ == pytest.approx(0.5, abs=0.02)
    assert ma.global_magnitude_prune(model, 0.9, masks=masks, params=list(masks))
    assert ma.random_masks_like(masks, generator=torch.Generator().manual_seed(0)).keys() == masks.keys()
    assert ma.imp_schedule([0.5, 0.9], rate=0.2)[-1] == pytest.approx(0.9)
    recorder = Recorder()
    ma.iterative_magnitude_pruning(model, recorder, 0.5, rewind="restart", rewind_to=model.state_dict())
    assert recorder.calls
    a, b = _pair()
    data = inputs_for_net()
    assert isinstance(ma.match_activations(a, b, data, progress=False), ma.Permutation)
    assert isinstance(ma.match_activations(a, b, [{"x": x} for x in data], progress=False), ma.Permutation)
    assert isinstance(ma.match_weights(a, b, net_spec(), seed=0, max_iter=0), ma.Permutation)
    assert torch.equal(solve_lap(torch.eye(3)), torch.arange(3))
    assert ma.lmc_barrier(a, b, labelled(), num_points=2).losses
    assert ma.interpolate(a, b, 1.5, masks_a={"fc.weight": torch.ones(3, 8, dtype=torch.bool)})  # extrapolation
    assert get_preset("digits", sparsities=(0.5,), seeds=1).seeds == 1
    assert resolve_device("cpu") == torch.device("cpu")


def test_cli_correct_use_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--list-presets"]) == 0
    assert capsys.readouterr().err == ""


def test_snapshot_catches_every_kind_of_mutation(tmp_path: Path) -> None:
    """The "nothing mutated" check can fail: each mutation below is found."""

    def caught(inputs: Any, mutate: Callable[[], object]) -> str | None:
        before = snapshot(inputs)
        mutate()
        return difference(before, snapshot(inputs))

    model = mlp()
    assert caught(model, lambda: model[0].weight.data.add_(1)) is not None
    model = mlp()
    assert caught(model, lambda: model[1].train(False)) is not None
    model = mlp()
    assert (
        caught(model, lambda: setattr(model[0], "weight", nn.Parameter(model[0].weight.detach().clone()))) is not None
    )
    model = mlp()
    assert caught(model, lambda: model[0].weight.requires_grad_(False)) is not None
    model = mlp()
    model[3].weight.grad = torch.zeros(5, 8)
    assert caught(model, lambda: model[3].weight.grad.add_(1)) is not None
    masks = masks_for(mlp())
    assert caught(masks, lambda: masks["0.weight"].fill_(True)) is not None
    assert caught(masks, lambda: masks.pop("0.weight")) is not None
    data = inputs_for_net()
    assert caught(data, lambda: data.append(data[0])) is not None
    data = inputs_for_net()
    assert caught(data, lambda: data[1].mul_(2)) is not None
    sparse = {"m": torch.ones(2, 2, dtype=torch.bool).to_sparse()}
    assert caught(sparse, lambda: sparse.__setitem__("m", torch.zeros(2, 2, dtype=torch.bool).to_sparse())) is not None
    path = tmp_path / "f.txt"
    path.write_text("a")
    assert caught(path, lambda: path.write_text("b")) is not None
    assert caught(tmp_path, lambda: (tmp_path / "new.txt").write_text("x")) is not None
    nan = torch.tensor([math.nan, 1.0])
    assert caught(nan, lambda: None) is None  # NaN equals NaN here: no false alarm
    model = mlp()
    assert caught(model, lambda: model(torch.randn(2, 6))) is None  # a forward in eval/train changes nothing


def test_every_error_class_has_a_troubleshooting_entry_and_a_reference_row() -> None:
    troubleshooting = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    reference = (ROOT / "docs" / "reference" / "errors.md").read_text(encoding="utf-8")
    classes = [getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)]
    assert ArgumentTypeError in classes and ConfigError in classes
    for cls in classes:
        assert issubclass(cls, MaskAlignError)
        if cls is MaskAlignError:
            continue
        page, _, anchor = cls.docs_page.partition("#")
        assert page == "troubleshooting/" and anchor == cls.__name__.lower(), cls
        assert f"{{ #{anchor} }}" in troubleshooting, f"no troubleshooting section for {cls.__name__}"
        assert f"| `{cls.__name__}` |" in reference, f"{cls.__name__} missing from docs/reference/errors.md"
        assert cls.__doc__


def test_one_did_you_mean_wording_everywhere() -> None:
    """The same suggestion wording (masks._unknown_name_message) from every
    function that takes parameter names."""
    model = mlp()
    wording = "'0.wieght' is not a parameter of the model. Did you mean: '0.weight'"
    calls = [
        lambda: ma.validate_masks(model, {"0.wieght": torch.ones(8, 6, dtype=torch.bool)}),
        lambda: ma.apply_masks(model, {"0.wieght": torch.ones(8, 6, dtype=torch.bool)}),
        lambda: ma.sparsity(model, {"0.wieght": torch.ones(8, 6, dtype=torch.bool)}),
        lambda: ma.global_magnitude_prune(model, 0.5, params=["0.wieght"]),
        lambda: ma.iterative_magnitude_pruning(model, Recorder(), 0.5, params=["0.wieght"]),
        lambda: ma.interpolate(model, mlp(1), 0.5, masks_a={"0.wieght": torch.ones(8, 6, dtype=torch.bool)}),
        lambda: ma.enforce_masks(model, {"0.wieght": torch.ones(8, 6, dtype=torch.bool)}),
    ]
    for call in calls:
        with pytest.raises(MaskError) as info:
            call()
        assert wording in str(info.value)
