"""``maskalign reproduce`` under ``torchrun``: the process group and what the
ranks agree on.

``torchrun`` starts one process per device and tells each its place in the
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`process_group` reads it, initialises the default
``torch.distributed`` process group (NCCL on CUDA, gloo on the CPU; each rank
on ``cuda:LOCAL_RANK``) and destroys it at the end. Without ``torchrun``, or
with ``WORLD_SIZE=1``, it does nothing: a single-process run is unchanged.

Everything else here is a thin layer over ``torch.distributed`` that is also
right on one process: :func:`rank` is 0, :func:`world_size` 1,
:func:`barrier` and :func:`broadcast` do nothing, and
:func:`assert_same_on_ranks` passes. Each rank-dependent helper reads the
default process group, so code that calls them runs unchanged on one
process or many.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError, MaskAlignError

__all__ = [
    "RankDivergenceError",
    "assert_same_on_ranks",
    "barrier",
    "broadcast",
    "env_rank",
    "env_world_size",
    "is_distributed",
    "is_main",
    "process_group",
    "rank",
    "rank_device",
    "sync_batchnorm",
    "tensor_digest",
    "world_size",
]

T = TypeVar("T")

#: How long a rank waits in a collective: the ranks that do not evaluate wait
#: while rank 0 alone computes the loss barriers and diversity (an hour or more
#: on the large CIFAR presets), so far longer than torch's default.
TIMEOUT = timedelta(hours=6)


class RankDivergenceError(MaskAlignError, RuntimeError):
    """Ranks that must hold the same value (a mask, a permutation) do not:
    a bug, never a user error. Raised on every rank, naming the ranks; the
    link points to how a distributed run is laid out. Also a
    :class:`RuntimeError`."""

    docs_page = "how-to/distributed/"


def env_world_size() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it; 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` as ``torchrun`` sets it; 0 without it."""
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this is rank 0: the rank that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    """``dist.barrier()`` under a process group; nothing on one process."""
    if is_distributed():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (``dist.broadcast_object_list``;
    picklable values). On one process, ``value`` itself."""
    if not is_distributed():
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex, 16 digits) of the names, dtypes, shapes and bytes of
    ``tensors``: equal exactly when every tensor is bitwise equal."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def assert_same_on_ranks(digest: str, what: str) -> None:
    """Check that every rank holds the same ``digest`` (e.g. a
    :func:`tensor_digest` of a mask); a collective, so every rank must call it.

    Raises:
        RankDivergenceError: on every rank alike, naming ``what`` and the
            ranks whose digest differs from rank 0's.
    """
    if not is_distributed():
        return
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RankDivergenceError(
            f"{what} differs between ranks: rank 0 has {digests[0]}, rank(s) {differ} have "
            f"{[digests[r] for r in differ]}. Every rank must hold the same; this is a bug in maskalign."
        )


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank for a run on ``device``: under a process
    group, CUDA means ``cuda:LOCAL_RANK`` (one device per rank).

    Raises:
        ConfigError: a process group with a numbered CUDA device (``cuda:1``):
            each rank takes its own.
    """
    if not is_distributed() or device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    if device.index is not None and device.index != local:
        raise ConfigError(
            f"Setting 'device' (--device) is {str(device)!r}, but under torchrun each rank uses its own "
            f"device (this one cuda:{local}); pass cuda or auto."
        )
    return torch.device("cuda", local)


@contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """The default process group of a ``torchrun`` launch, for the length of
    the block; yields whether one was initialised.

    With ``WORLD_SIZE`` above 1 (``torchrun`` sets it, with ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``): on CUDA, selects
    ``cuda:LOCAL_RANK`` and initialises NCCL; otherwise gloo. The group is
    destroyed on exit, also after an error. Without ``torchrun``
    (``WORLD_SIZE`` unset or 1), or when a group is already up (the caller
    owns it), nothing is done.
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield False
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE is above 1 (torchrun?) but this torch has no torch.distributed; run one process.")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield True
    finally:
        dist.destroy_process_group()


def _batchnorm_children(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, child)`` of every BatchNorm module of ``model``."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.modules.batchnorm._BatchNorm)
    ]


@contextmanager
def sync_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """``model`` with every BatchNorm layer replaced by
    ``torch.nn.SyncBatchNorm`` (``convert_sync_batchnorm``, which shares the
    parameters and running statistics) for the length of the block; the
    original layers, holding the trained values, are put back on exit. Does
    nothing unless ``enabled`` under a process group of more than one rank."""
    if not (enabled and is_distributed()) or isinstance(model, nn.modules.batchnorm._BatchNorm):
        yield model
        return
    originals = _batchnorm_children(model)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    try:
        yield converted
    finally:
        for parent, name, child in originals:
            setattr(parent, name, child)
