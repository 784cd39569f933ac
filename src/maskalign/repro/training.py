"""A small, deterministic training loop for dense and sparse runs, on one
process or data-parallel over ``torch.distributed``.

SGD with momentum and weight decay under a cosine learning-rate schedule
(the paper's setting, workshop App. A.1). Sparse runs enforce fixed masks
with :func:`maskalign.enforce_masks`.

Data: :func:`train` reads a :class:`TrainData`, which gives each rank its
share of every global batch of an epoch; an in-memory ``TensorDataset`` is
wrapped in :class:`InMemoryData`. The global order of an epoch depends only
on the seed drawn from the run's generator and the epoch (as
``DistributedSampler.set_epoch``), never on the number of processes, so one
process and N processes see the same global batches: with ``distributed=True``
under a process group of N ranks the model is wrapped in
``DistributedDataParallel``, each rank computes the loss of its share, and
the averaged gradient is the single-process gradient of the global batch up
to the order of float additions.

The last global batch of an epoch may be smaller than ``batch_size``; it is
kept and split as evenly as possible (shares differ by at most one sample; a
rank may get none when the batch has fewer samples than there are ranks).
Each rank's loss is the *sum* of its samples' cross-entropies times
``world / global_count``, so that DDP's mean over ranks is the mean over the
global batch whatever the shares' sizes.

Data loading: put in-memory data sets on the training device once
(:func:`maskalign.repro.data.splits_to_device`); each batch is then one
index-select on the device, so the accelerator never waits for a loader (no
host-to-device copy per step, no worker processes). Optional mixed precision
on CUDA: ``amp="bf16"`` (autocast) or ``"fp16"`` (autocast + gradient scaling).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..errors import ConfigError
from ..sparse.enforce import enforce_masks
from . import distributed as ranks
from .data import augment_crop_flip

__all__ = ["InMemoryData", "Share", "TrainConfig", "TrainData", "batches", "share_indices", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run.

    ``lr`` is the peak learning rate of a cosine schedule that decays to 0 over
    ``epochs`` (stepped per iteration). ``batch_size`` is the global batch (all
    ranks together). ``amp``: ``"off"``, ``"bf16"`` or ``"fp16"`` (CUDA only).
    ``sync_bn``: BatchNorm statistics over the global batch under
    ``distributed=True`` (``torch.nn.SyncBatchNorm``, CUDA only); otherwise
    each rank normalises with its share's statistics.
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = False
    amp: str = "off"
    sync_bn: bool = False


class Share(NamedTuple):
    """One rank's part of a global batch: its inputs and targets, and the
    number of samples in the whole global batch."""

    inputs: Tensor
    targets: Tensor
    global_count: int


class TrainData(Protocol):
    """Training data as :func:`train` reads it.

    ``len(data)`` is the number of samples of an epoch (all ranks together).
    ``data.epoch(epoch, seed, batch_size, rank, world, device)`` yields, for
    each global batch of ``epoch`` (1-based) in order, rank ``rank`` of
    ``world``'s :class:`Share`, on ``device``. The contract: the global order
    depends only on ``seed`` and ``epoch``; every rank yields
    ``ceil(len(data) / batch_size)`` shares; the shares of one global batch
    are disjoint and together are that batch. :class:`InMemoryData` is the
    in-memory implementation; a loader over files (a ``DataLoader`` with a
    ``DistributedSampler`` seeded with ``seed`` and ``set_epoch(epoch)``, and
    the per-rank batch size ``batch_size / world``) can be another.
    """

    def __len__(self) -> int: ...

    def epoch(
        self, epoch: int, seed: int, batch_size: int, rank: int, world: int, device: torch.device
    ) -> Iterator[Share]: ...


def share_indices(count: int, rank: int, world: int) -> slice:
    """The positions of rank ``rank``'s share in a global batch of ``count``
    samples: every ``world``-th from ``rank`` (as ``DistributedSampler``
    deals them), so the shares differ in size by at most one."""
    return slice(rank, count, world)


@dataclass(frozen=True)
class InMemoryData:
    """:class:`TrainData` of an in-memory ``TensorDataset(inputs, targets)``.

    Epoch ``e`` shuffles with a CPU generator seeded with ``seed + e``
    (``DistributedSampler``'s rule), takes consecutive global batches of that
    order and gives rank ``r`` of ``w`` the positions ``r, r + w, ...`` of each
    (:func:`share_indices`). With ``augment``, each global batch is augmented
    whole (random crop and flip drawn from the same generator, so every rank
    draws alike) before its share is taken.
    """

    dataset: TensorDataset
    augment: bool = False

    def __len__(self) -> int:
        return int(self.dataset.tensors[0].shape[0])

    def epoch(
        self, epoch: int, seed: int, batch_size: int, rank: int, world: int, device: torch.device
    ) -> Iterator[Share]:
        inputs, targets = self.dataset.tensors[0], self.dataset.tensors[1]
        n = inputs.shape[0]
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator).to(inputs.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            mine = share_indices(idx.numel(), rank, world)
            if self.augment:
                x = augment_crop_flip(inputs[idx], generator=generator)[mine]
            else:
                x = inputs[idx[mine]]
            y = targets[idx[mine]]
            yield Share(x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx.numel())


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
    dataset: TensorDataset | TrainData,
    config: TrainConfig,
    *,
    generator: torch.Generator,
    masks: Mapping[str, Tensor] | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    distributed: bool = False,
    stop_after: int | None = None,
) -> list[float]:
    """Train ``model`` in place; returns the mean training loss of each epoch
    (over the global batches, the same on every rank).

    Args:
        model: the model (its device is used for the data).
        dataset: ``TensorDataset(inputs, targets)`` (read through
            :class:`InMemoryData`, augmented when ``config.augment``), or any
            :class:`TrainData` (which augments by itself).
        config: hyperparameters.
        generator: one seed is drawn from it, which fixes the order of every
            epoch (and the augmentation of :class:`InMemoryData`).
        masks: fixed pruning masks (``param name -> bool``), enforced throughout
            (masked weights, gradients and optimizer state stay exactly zero).
        on_epoch_end: called as ``on_epoch_end(epoch, model)`` after each epoch
            (1-based), e.g. to keep a rewind checkpoint.
        distributed: data-parallel over the default ``torch.distributed``
            process group (``DistributedDataParallel``), when one of more
            than one rank is up: every rank calls :func:`train` with the same
            weights, config and generator state, reads its share of each
            global batch, and ends with the same weights. Without a group,
            one process as usual.
        stop_after: train only epochs ``1 .. stop_after`` of the
            ``config.epochs``-epoch schedule (same learning rates and data
            order): the state a full run has after epoch ``stop_after``,
            bitwise on the CPU; ``None``: every epoch.

    Raises:
        ValueError: ``config.amp`` is not ``"off"`` on a non-CUDA model, or unknown.
    """
    device = next(model.parameters()).device
    autocast_dtype = _autocast_dtype(config.amp, device)
    data: TrainData = InMemoryData(dataset, config.augment) if isinstance(dataset, TensorDataset) else dataset
    parallel = distributed and ranks.is_distributed()
    rank, world = (ranks.rank(), ranks.world_size()) if parallel else (0, 1)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-len(data) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * steps_per_epoch))
    history: list[float] = []
    model.train()
    with ranks.sync_batchnorm(model, config.sync_bn and parallel) as net:
        if parallel:
            ids = [device.index] if device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        prefix = "module." if parallel else ""
        handle = enforce_masks(net, {prefix + k: v for k, v in masks.items()}, optimizer) if masks is not None else None
        try:
            last = config.epochs if stop_after is None else min(stop_after, config.epochs)
            for epoch in range(1, last + 1):
                total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, count: no sync per step
                for inputs, targets, global_count in data.epoch(epoch, seed, config.batch_size, rank, world, device):
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        loss_sum = F.cross_entropy(net(inputs), targets, reduction="sum")
                    loss = loss_sum * (world / global_count)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is None:
                        loss.backward()
                        optimizer.step()
                    else:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    scheduler.step()
                    total[0] += loss_sum.detach().double()
                    total[1] += targets.shape[0]
                if parallel:
                    dist.all_reduce(total)
                history.append(float(total[0]) / max(float(total[1]), 1.0))
                if on_epoch_end is not None:
                    on_epoch_end(epoch, model)
        finally:
            if handle is not None:
                handle.remove()
            # Free DDP (and its gloo work) before the process group goes: a DDP
            # object collected after destroy_process_group() can hang in gloo.
            del net
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
