"""Linear mode connectivity (LMC): loss and error along the straight line
between two models, and the loss barrier (Frankle et al., ICML 2020;
Entezari et al., ICLR 2022; Ainsworth et al., ICLR 2023, Sec. 2).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils.modes import eval_mode
from ..errors import (
    ArgumentTypeError,
    ArgumentValueError,
    DataError,
    SpecMismatchError,
    _check_callable,
    _check_int,
    _check_module,
    _check_reusable,
    _describe,
)
from ..sparse.masks import _check_mask_set, validate_masks

__all__ = ["LMCResult", "evaluate", "interpolate", "lmc_barrier", "repair", "reset_bn_stats"]


@dataclass(frozen=True)
class LMCResult:
    """Loss and error (fraction in [0, 1]) at each interpolation coefficient.

    ``barrier`` is ``max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]``
    (Entezari et al. 2022, Def. 1; as in Git Re-Basin); ``barrier_mean`` is
    ``max_alpha L(alpha) - (L(0) + L(1)) / 2`` (the instability of Frankle et al.
    2020, there on the error); ``error_barrier`` is the first definition on the error.

    Source: linear mode connectivity and the loss barrier (Frankle et al.,
    ICML 2020; Entezari et al., ICLR 2022), as used by Git Re-Basin
    (Ainsworth et al., ICLR 2023, Sec. 2).

    Attributes:
        alphas: the interpolation coefficients, increasing from 0 (model A)
            to 1 (model B).
        losses: the mean loss per sample at each coefficient (nats for the
            default cross-entropy).
        errors: the error (1 - accuracy, a fraction in [0, 1]) at each
            coefficient.
    """

    alphas: list[float]
    losses: list[float]
    errors: list[float]

    @staticmethod
    def _barrier(alphas: list[float], values: list[float]) -> float:
        start, end = values[0], values[-1]
        return max(v - ((1 - a) * start + a * end) for a, v in zip(alphas, values))

    @property
    def barrier(self) -> float:
        """The loss barrier above the straight line between the endpoints'
        losses, ``max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]``
        (in the loss's units)."""
        return self._barrier(self.alphas, self.losses)

    @property
    def barrier_mean(self) -> float:
        """The loss barrier above the mean of the endpoints' losses,
        ``max_alpha L(alpha) - (L(0) + L(1)) / 2`` (in the loss's units)."""
        return max(self.losses) - (self.losses[0] + self.losses[-1]) / 2

    @property
    def error_barrier(self) -> float:
        """:attr:`barrier` computed on the errors: a difference of
        fractions, in [0, 1]."""
        return self._barrier(self.alphas, self.errors)


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    alpha: float,
    masks_a: Mapping[str, Tensor] | None = None,
    masks_b: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """A new model with every floating-point tensor ``(1 - alpha) * a + alpha * b``.

    Parameters and buffers (BatchNorm running statistics) are interpolated;
    integer buffers (``num_batches_tracked``) are taken from ``model_a``.
    For sparse models pass their masks: the effective weights ``w * m`` are
    interpolated. Neither input is modified.

    Source: the linear path between two networks of linear mode connectivity
    (Frankle et al., ICML 2020; Entezari et al., ICLR 2022).

    Args:
        model_a: the endpoint at ``alpha = 0``.
        model_b: the endpoint at ``alpha = 1``, of the same architecture
            (same ``state_dict`` names and shapes).
        alpha: the interpolation coefficient, a finite number; values
            outside ``[0, 1]`` extrapolate.
        masks_a: optional mask set of ``model_a`` (name -> ``torch.bool``
            mask of the parameter's shape).
        masks_b: optional mask set of ``model_b``.

    Returns:
        A deep copy of ``model_a`` holding the interpolated tensors.

    Raises:
        ArgumentTypeError: (a ``TypeError``) a model is not an ``nn.Module``,
            ``alpha`` is not a number, or a mask set is not a mapping.
        ArgumentValueError: (a ``ValueError``) ``alpha`` is NaN or infinite.
        SpecMismatchError: the models have different tensor names or shapes.
        MaskError: a mask set is malformed for its model (see
            :func:`~maskalign.validate_masks`).
    """
    _check_module(model_a, "model_a", "interpolate(model_a, model_b, alpha)")
    _check_module(model_b, "model_b", "interpolate(model_a, model_b, alpha)")
    alpha = _check_alpha(alpha)
    _check_masks(model_a, model_b, masks_a, masks_b)
    state_a, state_b = _same_tensors(model_a, model_b)
    state_a = _effective(state_a, masks_a)
    state_b = _effective(state_b, masks_b)
    mixed = {
        name: torch.lerp(t, state_b[name].to(t.dtype), alpha) if t.is_floating_point() else t.clone()
        for name, t in state_a.items()
    }
    out = copy.deepcopy(model_a)
    out.load_state_dict(mixed)
    return out


def _check_alpha(alpha: object) -> float:
    """``alpha`` as a finite float."""
    if isinstance(alpha, Tensor) and alpha.numel() == 1:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ArgumentTypeError(f"Argument 'alpha' is {_describe(alpha)}; pass a number (0: model_a, 1: model_b).")
    if not math.isfinite(float(alpha)):
        raise ArgumentValueError(f"Argument 'alpha' is {alpha!r}; pass a finite number (0: model_a, 1: model_b).")
    return float(alpha)


def _check_masks(
    model_a: nn.Module,
    model_b: nn.Module,
    masks_a: Mapping[str, Tensor] | None,
    masks_b: Mapping[str, Tensor] | None,
) -> None:
    """Each given mask set is well-formed for its model."""
    for model, masks, argument in ((model_a, masks_a, "masks_a"), (model_b, masks_b, "masks_b")):
        if masks is not None:
            validate_masks(model, _check_mask_set(masks, argument))


def _same_tensors(model_a: nn.Module, model_b: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Both ``state_dict`` s, checked to hold the same names and shapes."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if set(state_a) != set(state_b):
        only_a = sorted(set(state_a) - set(state_b))[:5]
        only_b = sorted(set(state_b) - set(state_a))[:5]
        raise SpecMismatchError(
            f"Arguments 'model_a' and 'model_b' have different tensors (only in model_a: {only_a}, only in "
            f"model_b: {only_b}); interpolate between two models of one architecture."
        )
    for name, tensor in state_a.items():
        if tensor.shape != state_b[name].shape:
            raise SpecMismatchError(
                f"Tensor {name!r} has shape {tuple(tensor.shape)} in model_a and {tuple(state_b[name].shape)} "
                "in model_b; interpolate between two models of one architecture."
            )
    return state_a, state_b


def _inputs_of(batch: Any, index: int, what: str) -> Tensor:
    """The input tensor of a batch (a tensor, or the first element of an
    ``(inputs, targets)`` pair)."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(inputs, Tensor):
        raise DataError(
            f"Batch {index} of {what} is {_describe(batch)}; pass batches that are tensors or (inputs, targets) "
            "pairs of tensors."
        )
    return inputs


def _effective(state: dict[str, Tensor], masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``state`` with every masked tensor replaced by ``w * m`` (the masks are
    validated by the caller)."""
    if not masks:
        return state
    return {name: t * masks[name].to(t.device, t.dtype) if name in masks else t for name, t in state.items()}


_REPAIRABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def _channel_stats(model: nn.Module, names: list[str], data: Iterable[Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and std (float64) of the outputs of the modules ``names``
    (channels: dim 1 of a conv output, the last dim of a linear output)."""
    sums: dict[str, list[Any]] = {n: [0, 0.0, 0.0] for n in names}

    def hook(name: str, module: nn.Module) -> Any:
        channel = -1 if isinstance(module, nn.Linear) else 1

        def record(_: nn.Module, __: Any, out: Tensor) -> None:
            x = out.double().movedim(channel, -1).reshape(-1, out.shape[channel])
            sums[name][0] += x.shape[0]
            sums[name][1] = sums[name][1] + x.sum(0)
            sums[name][2] = sums[name][2] + (x * x).sum(0)

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n, model.get_submodule(n))) for n in names]
    device = _device_of(model)
    try:
        with eval_mode(model):
            for index, batch in enumerate(data):
                model(_inputs_of(batch, index, "repair data").to(device))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, (count, total, squares) in sums.items():
        if count == 0:
            raise DataError("Argument 'data' of repair yielded no batches; pass a non-empty list of batches.")
        mean = total / count
        out[name] = (mean, (squares / count - mean**2).clamp_min(0).sqrt())
    return out


@torch.no_grad()
def repair(
    interpolated: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    alpha: float,
    data: Iterable[Any],
    eps: float = 1e-8,
) -> nn.Module:
    """REPAIR (Jordan et al., "REPAIR: REnormalizing Permuted Activations for
    Interpolation Repair", ICLR 2023, Sec. 3): rescale every hidden linear/conv
    output channel of an interpolated model (in place) so that its mean and
    std over ``data`` equal ``(1 - alpha)`` A's plus ``alpha`` B's; layers are
    corrected in forward order, each measured after the earlier corrections.
    For networks without BatchNorm (with BatchNorm, ``reset_bn_stats`` does
    this job). The last linear/conv layer (the output) is left alone.

    Source: Jordan et al., "REPAIR", ICLR 2023, Sec. 3.

    Args:
        interpolated: e.g. ``interpolate(model_a, model_b, alpha)``; modified.
        model_a: the endpoint at ``alpha = 0`` (not modified).
        model_b: the endpoint at ``alpha = 1``, same architecture (not
            modified).
        alpha: the interpolation coefficient ``interpolated`` was made with,
            a finite number.
        data: batches (a list: it is read once per layer plus twice).
        eps: lower bound on the measured std of a channel of
            ``interpolated`` before dividing by it (in the activation's units).

    Returns:
        ``interpolated``.

    Raises:
        ArgumentTypeError: a model is not an ``nn.Module``, ``alpha`` is not a
            number, or ``data`` is a one-shot iterator.
        ArgumentValueError: ``alpha`` is NaN or infinite.
        DataError: ``data`` yields no batch, or a batch holds no input tensor.
    """
    for model, argument in ((interpolated, "interpolated"), (model_a, "model_a"), (model_b, "model_b")):
        _check_module(model, argument, "repair(interpolated, model_a, model_b, alpha, data)")
    alpha = _check_alpha(alpha)
    _check_reusable(data, "data")
    names = [n for n, m in interpolated.named_modules() if isinstance(m, _REPAIRABLE)][:-1]
    stats_a, stats_b = _channel_stats(model_a, names, data), _channel_stats(model_b, names, data)
    for name in names:
        module = interpolated.get_submodule(name)
        mean, std = _channel_stats(interpolated, [name], data)[name]
        target_mean = (1 - alpha) * stats_a[name][0] + alpha * stats_b[name][0]
        target_std = (1 - alpha) * stats_a[name][1] + alpha * stats_b[name][1]
        scale = target_std / std.clamp_min(eps)
        weight: Tensor = module.weight  # type: ignore[assignment]  # a linear or convolution layer
        current: Tensor | None = module.bias  # type: ignore[assignment]
        view = (-1,) + (1,) * (weight.dim() - 1)
        weight.mul_(scale.to(weight.dtype).view(view))
        bias = current if current is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
        new_bias = (bias.double() - mean) * scale + target_mean
        if current is None:
            module.bias = nn.Parameter(new_bias.to(weight.dtype).to(weight.device))
        else:
            current.copy_(new_bias.to(bias.dtype))
    return interpolated


def _split_batch(batch: Any, index: int) -> tuple[Tensor, Tensor]:
    if (
        not isinstance(batch, (tuple, list))
        or len(batch) < 2
        or not isinstance(batch[0], Tensor)
        or not isinstance(batch[1], Tensor)
    ):
        raise DataError(
            f"Batch {index} is {_describe(batch)}; evaluation batches must be (inputs, targets) pairs of tensors."
        )
    return batch[0], batch[1]


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def reset_bn_stats(model: nn.Module, data: Iterable[Any], num_batches: int | None = None) -> None:
    """Re-estimate the running statistics of every BatchNorm layer (in place)
    as the plain average over ``data`` (``momentum=None``); modes and momenta
    are restored. Needed after interpolating (Jordan et al., REPAIR, ICLR 2023).

    Source: Jordan et al., "REPAIR", ICLR 2023 (resetting BatchNorm
    statistics of an interpolated network).

    Args:
        model: the network, modified in place (only its BatchNorm running
            statistics change); a model without BatchNorm is left as is.
        data: batches, each a tensor of inputs or an ``(inputs, targets)``
            pair; moved to the model's device.
        num_batches: read at most this many batches of ``data``; None reads
            all of them.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``, or
            ``num_batches`` is not an int.
        ArgumentValueError: ``num_batches < 1``.
        DataError: ``data`` yields no batch (statistics would be left reset),
            or a batch holds no input tensor.
    """
    _check_module(model, "model", "reset_bn_stats(model, data)")
    _check_int(num_batches, "num_batches", 1, allow_none=True)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    device = _device_of(model)
    saved = [(m, m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for index, batch in enumerate(data):
            if num_batches is not None and index >= num_batches:
                break
            model(_inputs_of(batch, index, "bn data").to(device))
            seen += 1
        if seen == 0:
            raise DataError(
                "Argument 'data' of reset_bn_stats yielded no batches (an exhausted iterator?); pass a list or a "
                "DataLoader."
            )
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.training = training


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[float, float]:
    """Mean loss per sample and accuracy (fraction) of ``model`` in eval mode
    over ``(inputs, targets)`` batches. ``loss_fn(logits, targets)`` must return
    the summed loss of the batch (default: cross-entropy, ``reduction='sum'``).

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``, or ``loss_fn``
            is not callable.
        DataError: ``data`` yields no sample, or a batch is not an
            ``(inputs, targets)`` pair of tensors.
    """
    _check_module(model, "model", "evaluate(model, data)")
    if loss_fn is not None:
        _check_callable(loss_fn, "loss_fn", "loss_fn(logits, targets) -> summed loss")
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    device = _device_of(model)
    total_loss, correct, count = 0.0, 0, 0
    with eval_mode(model):
        for index, batch in enumerate(data):
            inputs, targets = _split_batch(batch, index)
            inputs, targets = inputs.to(device), targets.to(device)
            out = model(inputs)
            loss = loss_fn(out, targets)
            total_loss += float(loss)
            correct += int((out.argmax(-1) == targets).sum())
            count += targets.shape[0]
    if count == 0:
        raise DataError("Argument 'data' yielded no samples; pass a non-empty list of (inputs, targets) batches.")
    return total_loss / count, correct / count


def lmc_barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    num_points: int = 25,
    bn_data: Iterable[Any] | None = None,
    masks_a: Mapping[str, Tensor] | None = None,
    masks_b: Mapping[str, Tensor] | None = None,
    repair_data: Iterable[Any] | None = None,
) -> LMCResult:
    """Loss/error along ``(1 - alpha) * A + alpha * B`` for ``num_points``
    evenly spaced alphas in [0, 1], evaluated on ``data`` (``(inputs, targets)``
    batches). With ``bn_data`` (training batches), BatchNorm statistics are
    re-estimated at every alpha, endpoints included. ``loss_fn(logits, targets)``
    must return the summed loss of the batch (default: cross-entropy). For
    sparse models, ``masks_a`` / ``masks_b`` make the path run between the
    effective weights ``w * m``. With ``repair_data`` (a list of training
    batches), :func:`repair` corrects every interpolated model (networks
    without BatchNorm).

    Source: the loss barrier of linear mode connectivity (Frankle et al.,
    ICML 2020; Entezari et al., ICLR 2022), as used by Git Re-Basin
    (Ainsworth et al., ICLR 2023, Sec. 2).

    Args:
        model_a: the endpoint at ``alpha = 0``.
        model_b: the endpoint at ``alpha = 1``, of the same architecture.
        data: evaluation batches, ``(inputs, targets)`` pairs of tensors,
            read at every alpha (a list or a ``DataLoader``).
        loss_fn: ``loss_fn(logits, targets)`` returning the summed loss of a
            batch; None uses cross-entropy (nats).
        num_points: the number of evenly spaced alphas, endpoints included
            (an int >= 2).
        bn_data: optional training batches to re-estimate BatchNorm
            statistics at every alpha (:func:`reset_bn_stats`).
        masks_a: optional mask set of ``model_a``: the path starts at its
            effective weights ``w * m``.
        masks_b: optional mask set of ``model_b``.
        repair_data: optional list of training batches for :func:`repair`
            at every alpha (networks without BatchNorm).

    Returns:
        An :class:`LMCResult` with the alphas, the mean loss per sample and
        the error (a fraction) at each; its ``barrier`` is the loss barrier.

    Raises:
        ArgumentTypeError: (a ``TypeError``) a model is not an ``nn.Module``
            (e.g. the arguments are swapped), ``loss_fn`` is not callable,
            ``num_points`` is not an int, or ``data`` / ``bn_data`` /
            ``repair_data`` is a one-shot iterator (they are read at every
            alpha).
        ArgumentValueError: (a ``ValueError``) ``num_points < 2``.
        SpecMismatchError: the models differ in architecture.
        MaskError: a mask set is malformed for its model.
        DataError: ``data`` is empty or its batches are not
            ``(inputs, targets)`` pairs.
    """
    call = "lmc_barrier(model_a, model_b, data)"
    _check_module(model_a, "model_a", call)
    _check_module(model_b, "model_b", call)
    _check_int(num_points, "num_points", 2)
    if loss_fn is not None:
        _check_callable(loss_fn, "loss_fn", "loss_fn(logits, targets) -> summed loss")
    for batches, argument in ((data, "data"), (bn_data, "bn_data"), (repair_data, "repair_data")):
        if batches is not None:
            _check_reusable(batches, argument)
    _check_masks(model_a, model_b, masks_a, masks_b)
    _same_tensors(model_a, model_b)
    alphas = torch.linspace(0, 1, num_points).tolist()
    losses, errors = [], []
    for alpha in alphas:
        model = interpolate(model_a, model_b, alpha, masks_a, masks_b)
        if bn_data is not None:
            reset_bn_stats(model, bn_data)
        if repair_data is not None:
            repair(model, model_a, model_b, alpha, repair_data)
        loss, acc = evaluate(model, data, loss_fn)
        losses.append(loss)
        errors.append(1.0 - acc)
    return LMCResult(alphas, losses, errors)
