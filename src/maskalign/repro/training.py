"""A small, deterministic training loop for dense and sparse runs.

SGD with momentum and weight decay under a cosine learning-rate schedule
(the paper's setting, workshop App. A.1), on in-memory ``TensorDataset``s.
Sparse runs enforce fixed masks with :func:`maskalign.enforce_masks`.

Data loading: the data sets are in-memory tensors. Put them on the training
device once (:func:`maskalign.repro.data.splits_to_device`); each batch is then one
index-select on the device, so the accelerator never waits for a loader (no
host-to-device copy per step, no worker processes). Optional mixed precision
on CUDA: ``amp="bf16"`` (autocast) or ``"fp16"`` (autocast + gradient scaling).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..errors import ConfigError
from ..sparse.enforce import enforce_masks
from .data import augment_crop_flip

__all__ = ["TrainConfig", "batches", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run.

    ``lr`` is the peak learning rate of a cosine schedule that decays to 0 over
    ``epochs`` (stepped per iteration). ``amp``: ``"off"``, ``"bf16"`` or
    ``"fp16"`` (CUDA only).
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = False
    amp: str = "off"


def batches(
    dataset: TensorDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(inputs, targets)`` batches of an in-memory dataset, optionally shuffled
    with ``generator`` (a CPU generator; deterministic when seeded). Indexing
    happens where the data lives, then each batch moves to ``device``
    (a no-op when the data already lives there)."""
    inputs, targets = dataset.tensors[0], dataset.tensors[1]
    n = inputs.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(inputs.device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield inputs[idx].to(device, non_blocking=True), targets[idx].to(device, non_blocking=True)


def train(
    model: nn.Module,
    dataset: TensorDataset,
    config: TrainConfig,
    *,
    generator: torch.Generator,
    masks: Mapping[str, Tensor] | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> list[float]:
    """Train ``model`` in place; returns the mean training loss of each epoch.

    Args:
        model: the model (its device is used for the data).
        dataset: ``TensorDataset(inputs, targets)``.
        config: hyperparameters.
        generator: seeds shuffling and augmentation.
        masks: fixed pruning masks (``param name -> bool``), enforced throughout
            (masked weights, gradients and optimizer state stay exactly zero).
        on_epoch_end: called as ``on_epoch_end(epoch, model)`` after each epoch
            (1-based), e.g. to keep a rewind checkpoint.

    Raises:
        ValueError: ``config.amp`` is not ``"off"`` on a non-CUDA model, or unknown.
    """
    device = next(model.parameters()).device
    autocast_dtype = _autocast_dtype(config.amp, device)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-len(dataset) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * steps_per_epoch))
    handle = enforce_masks(model, masks, optimizer) if masks is not None else None
    history: list[float] = []
    model.train()
    try:
        for epoch in range(1, config.epochs + 1):
            total, count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
            for inputs, targets in batches(
                dataset, config.batch_size, shuffle=True, generator=generator, device=device
            ):
                if config.augment:
                    inputs = augment_crop_flip(inputs, generator=generator)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                scheduler.step()
                total += loss.detach().float() * targets.shape[0]
                count += targets.shape[0]
            history.append(float(total) / max(count, 1))
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
    finally:
        if handle is not None:
            handle.remove()
    return history


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` mode, ``None`` for ``"off"``.

    Raises:
        ValueError: unknown mode, or mixed precision requested off CUDA.
    """
    dtypes = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ConfigError(f"Setting 'amp' is {amp!r}; pass one of {list(dtypes)}.")
    if amp != "off" and device.type != "cuda":
        raise ConfigError(
            f"Setting 'amp' is {amp!r}, which needs a CUDA model, but this one is on {device}; pass --amp off."
        )
    return dtypes[amp]
