"""Linear mode connectivity (LMC): loss and error along the straight line
between two models, and the loss barrier (Frankle et al., ICML 2020;
Entezari et al., ICLR 2022; Ainsworth et al., ICLR 2023, Sec. 2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import eval_mode
from .errors import DataError, MaskError, SpecMismatchError

__all__ = ["LMCResult", "evaluate", "interpolate", "lmc_barrier", "repair", "reset_bn_stats"]


@dataclass(frozen=True)
class LMCResult:
    """Loss and error (fraction in [0, 1]) at each interpolation coefficient.

    ``barrier`` is ``max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]``
    (Frankle et al. 2020); ``barrier_mean`` is ``max_alpha L(alpha) - (L(0) + L(1)) / 2``
    (Entezari et al. 2022); ``error_barrier`` is the first definition on the error.
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
        return self._barrier(self.alphas, self.losses)

    @property
    def barrier_mean(self) -> float:
        return max(self.losses) - (self.losses[0] + self.losses[-1]) / 2

    @property
    def error_barrier(self) -> float:
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

    Raises:
        SpecMismatchError: the models have different tensor names or shapes.
    """
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if set(state_a) != set(state_b):
        diff = sorted(set(state_a) ^ set(state_b))
        raise SpecMismatchError(f"model_a and model_b have different tensors: {diff[:5]}")
    for name, tensor in state_a.items():
        if tensor.shape != state_b[name].shape:
            raise SpecMismatchError(
                f"'{name}' has shape {tuple(tensor.shape)} in model_a and {tuple(state_b[name].shape)} in model_b"
            )
    state_a = _effective(state_a, masks_a)
    state_b = _effective(state_b, masks_b)
    mixed = {
        name: torch.lerp(t, state_b[name].to(t.dtype), alpha) if t.is_floating_point() else t.clone()
        for name, t in state_a.items()
    }
    out = copy.deepcopy(model_a)
    out.load_state_dict(mixed)
    return out


def _effective(state: dict[str, Tensor], masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``state`` with every masked tensor replaced by ``w * m``."""
    if not masks:
        return state
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise MaskError(f"masks name tensors that the model does not have: {unknown[:5]}")
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
            for batch in data:
                model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, (count, total, squares) in sums.items():
        if count == 0:
            raise DataError("repair data yielded no batches")
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

    Args:
        interpolated: e.g. ``interpolate(model_a, model_b, alpha)``; modified.
        model_a: the endpoint at ``alpha = 0`` (not modified).
        model_b: the endpoint at ``alpha = 1``, same architecture (not
            modified).
        data: batches (a list: it is read once per layer plus twice).

    Returns:
        ``interpolated``.
    """
    names = [n for n, m in interpolated.named_modules() if isinstance(m, _REPAIRABLE)][:-1]
    stats_a, stats_b = _channel_stats(model_a, names, data), _channel_stats(model_b, names, data)
    for name in names:
        module = interpolated.get_submodule(name)
        mean, std = _channel_stats(interpolated, [name], data)[name]
        target_mean = (1 - alpha) * stats_a[name][0] + alpha * stats_b[name][0]
        target_std = (1 - alpha) * stats_a[name][1] + alpha * stats_b[name][1]
        scale = target_std / std.clamp_min(eps)
        weight = module.weight
        view = (-1,) + (1,) * (weight.dim() - 1)
        weight.mul_(scale.to(weight.dtype).view(view))
        bias = module.bias if module.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
        new_bias = (bias.double() - mean) * scale + target_mean
        if module.bias is None:
            module.bias = nn.Parameter(new_bias.to(weight.dtype).to(weight.device))
        else:
            module.bias.copy_(new_bias.to(bias.dtype))
    return interpolated


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise DataError("evaluation batches must be (inputs, targets) pairs")
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

    Raises:
        DataError: ``data`` yields no batch (statistics would be left reset).
    """
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
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(inputs.to(device))
            seen += 1
        if seen == 0:
            raise DataError("reset_bn_stats got no batches (an exhausted iterator?); pass a list or a DataLoader")
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
        DataError: ``data`` yields no sample.
    """
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    device = _device_of(model)
    total_loss, correct, count = 0.0, 0, 0
    with eval_mode(model):
        for batch in data:
            inputs, targets = _split_batch(batch)
            inputs, targets = inputs.to(device), targets.to(device)
            out = model(inputs)
            loss = loss_fn(out, targets)
            total_loss += float(loss)
            correct += int((out.argmax(-1) == targets).sum())
            count += targets.shape[0]
    if count == 0:
        raise DataError("evaluation data yielded no samples")
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

    Raises:
        SpecMismatchError: the models differ in architecture.
        DataError: ``data`` is empty.
        ValueError: ``num_points < 2``.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
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
