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

__all__ = ["LMCResult", "evaluate", "interpolate", "lmc_barrier", "reset_bn_stats"]


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
) -> LMCResult:
    """Loss/error along ``(1 - alpha) * A + alpha * B`` for ``num_points``
    evenly spaced alphas in [0, 1], evaluated on ``data`` (``(inputs, targets)``
    batches). With ``bn_data`` (training batches), BatchNorm statistics are
    re-estimated at every alpha, endpoints included. ``loss_fn(logits, targets)``
    must return the summed loss of the batch (default: cross-entropy). For
    sparse models, ``masks_a`` / ``masks_b`` make the path run between the
    effective weights ``w * m``.

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
        loss, acc = evaluate(model, data, loss_fn)
        losses.append(loss)
        errors.append(1.0 - acc)
    return LMCResult(alphas, losses, errors)
