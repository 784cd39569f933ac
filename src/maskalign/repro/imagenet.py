"""The ImageNet (ILSVRC 2012) data path: an ImageFolder on disk, read by
torchvision, streamed through ``DataLoader`` workers.

``maskalign reproduce`` reads ``dataset="imagenet"`` through this module
(:class:`ImageFolderTrainData` for training, the loaders below for the rest;
see :mod:`maskalign.repro.experiment`): the CIFAR and digits data sets are
in-memory tensors (:mod:`maskalign.repro.data`), which 1.28 million JPEGs are
not. Needs
torchvision (``pip install 'maskalign[imagenet]'``); the module imports
without it and raises :class:`MissingDependencyError` when a function needs it.

Layout (the standard one; ``val`` must already be sorted into class folders,
e.g. with the usual ``valprep.sh``)::

    root/train/<class>/*.JPEG      e.g. root/train/n01440764/n01440764_10026.JPEG
    root/val/<class>/*.JPEG        the same class folder names as train/

Transforms (the standard ImageNet recipe, He et al. 2016 / torchvision's
reference scripts): train ``RandomResizedCrop(size)`` +
``RandomHorizontalFlip()``; eval ``Resize(round(size * 256 / 224))`` +
``CenterCrop(size)``; both then ``ToTensor()`` and ``Normalize`` with
:data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.

Interface for the integrator (how the experiment gets what it needs):

(a) Shuffled training batches for epoch ``e`` with seed ``s`` on rank ``r``
    of ``w``::

        data = load_imagefolder(root, image_size=224)
        loader = train_loader(data.train, batch_size, seed=s, rank=r, world=w, device=device)
        for images, labels in epoch_batches(loader, e):   # calls sampler.set_epoch(e)
            images, labels = to_device(images, labels, device, channels_last=True)

    ``batch_size`` is per rank (the global batch is ``batch_size * w``).
    The order of epoch ``e`` depends only on ``(s, e, r, w)`` (resumable at
    an epoch boundary): with ``w > 1`` a ``DistributedSampler`` (the ranks
    split each epoch without overlap, padded to equal length by torch), with
    ``w == 1`` :class:`EpochShuffleSampler`, which gives the same order as a
    one-rank ``DistributedSampler``. The last incomplete batch is dropped.
    The random crops and flips run in the workers, seeded from the loader's
    generator (``s``, ``r``): reproducible from a fresh start with the same
    number of workers.
(b) Test batches: ``eval_loader(data.test, batch_size, rank=r, world=w)``:
    fixed order, rank ``r`` reads samples ``r, r + w, r + 2w, ...`` (no
    padding, no sample twice: sum correct counts / losses over ranks with
    ``all_reduce`` for exact accuracy). Top-5 accuracy (the paper's Figure 7
    metric) is :func:`topk_correct`.
(c) A deterministic subset of ``n`` training samples for activation
    matching (and BatchNorm re-estimation if wanted), under the eval
    transform (no random crop): ``match_subset(data, n, seed)``, then
    ``eval_loader(subset, batch_size)``. Same ``(n, seed)``, same samples,
    on every rank and machine (indices drawn from a seeded permutation).
(d) A fingerprint of the data: ``fingerprint(data)``, SHA-256 (16 hex digits)
    of the name, the image size, the class names and every sample's relative
    path, label and file size, both splits (one ``stat`` per file: a few
    seconds for ImageNet on a local disk).
(e) ``data.num_classes`` (1000 for ImageNet), ``data.in_channels`` (3),
    ``data.image_size`` (the crop side, 224).

Speed on CUDA: move batches with :func:`to_device` (``non_blocking``,
pinned memory, optional ``channels_last``) and put the model in
``channels_last`` too (``model.to(memory_format=torch.channels_last)``);
run the forward under ``torch.autocast("cuda", dtype=torch.bfloat16)`` (the
experiment's ``amp="bf16"``; bf16 needs no gradient scaler).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from ..errors import ArgumentValueError, DataError, MaskAlignError, MissingFileError
from .training import Share

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PIP_IMAGENET",
    "EpochShuffleSampler",
    "ImageFolderData",
    "ImageFolderTrainData",
    "MissingDependencyError",
    "ShardSampler",
    "check_layout",
    "epoch_batches",
    "eval_transform",
    "fingerprint",
    "load_imagefolder",
    "match_subset",
    "eval_loader",
    "subset_indices",
    "to_device",
    "topk_correct",
    "train_loader",
    "train_transform",
    "write_fake_imagefolder",
]

#: Per-channel (R, G, B) mean and std of ImageNet's training images in [0, 1]
#: (the values of torchvision's pretrained models).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The install command of the optional dependencies of this module.
PIP_IMAGENET = "pip install 'maskalign[imagenet]'"

#: Multiplier that keeps the sampler seeds of different experiment seeds
#: apart: epoch ``e`` of seed ``s`` is shuffled with ``s * _SEED_STRIDE + e``
#: (torch's samplers use ``seed + epoch``, so seed 0 epoch 1 would equal seed
#: 1 epoch 0).
_SEED_STRIDE = 1_000_003

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class MissingDependencyError(MaskAlignError, ImportError):
    """An optional dependency (torchvision, which brings PIL) is not
    installed; the message names the extra that installs it. Also an
    :class:`ImportError`."""

    docs_page = "how-to/imagenet/#install"


def _torchvision() -> ModuleType:
    """The ``torchvision`` module, or :class:`MissingDependencyError` naming the extra."""
    try:
        import torchvision
    except ImportError:
        raise MissingDependencyError(
            f"The ImageNet data path needs torchvision, which is not installed; run {PIP_IMAGENET}."
        ) from None
    return torchvision


@dataclass(frozen=True)
class ImageFolderData:
    """The two splits of an ImageFolder data set and what a model needs to know.

    Attributes:
        train: training images under :func:`train_transform` (random crop + flip).
        train_eval: the same training samples under :func:`eval_transform`
            (shares the file list with ``train``): for matching and BN statistics.
        test: the ``val`` folder under :func:`eval_transform`.
        classes: class folder names, sorted (label ``i`` is ``classes[i]``).
        num_classes, in_channels, image_size: ``len(classes)``, 3 (RGB), the crop side.
        root, name: the folder given to :func:`load_imagefolder` and the data set's name.
    """

    train: Dataset[Any]
    train_eval: Dataset[Any]
    test: Dataset[Any]
    classes: tuple[str, ...]
    num_classes: int
    in_channels: int
    image_size: int
    root: Path
    name: str


def _class_folders(split: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split) if entry.is_dir() and not entry.name.startswith("."))


def check_layout(root: str | os.PathLike[str]) -> tuple[str, ...]:
    """Check ``root/train/<class>/`` and ``root/val/<class>/`` (same class
    names) without reading any image; returns the sorted class names.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) ``root`` does not exist.
        DataError: (a ``ValueError``) naming the path: ``train`` or ``val``
            is missing, holds no class folders (a flat ``val`` of images:
            sort it into class folders), or the two class sets differ.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise MissingFileError(
            f"Folder {str(base)!r} does not exist; pass the ImageNet folder holding train/ and val/."
        )
    found: dict[str, list[str]] = {}
    for split in ("train", "val"):
        folder = base / split
        if not folder.is_dir():
            raise DataError(
                f"Folder {str(folder)!r} does not exist; the ImageNet folder must hold train/<class>/*.JPEG "
                "and val/<class>/*.JPEG."
            )
        classes = _class_folders(folder)
        if not classes:
            flat = any(Path(entry.name).suffix.lower() in _IMAGE_SUFFIXES for entry in os.scandir(folder))
            hint = (
                "it holds images directly: sort them into one folder per class (for ImageNet's val, e.g. "
                "with valprep.sh)"
                if flat
                else "put the images in one folder per class"
            )
            raise DataError(f"Folder {str(folder)!r} holds no class folders; {hint}.")
        found[split] = classes
    train, val = set(found["train"]), set(found["val"])
    if train != val:
        only_train, only_val = sorted(train - val), sorted(val - train)
        raise DataError(
            f"Folders {str(base / 'train')!r} and {str(base / 'val')!r} hold different classes "
            f"({len(train)} and {len(val)}; only in train: {only_train[:3]}, only in val: {only_val[:3]}); "
            "give both the same class folders."
        )
    return tuple(found["train"])


def train_transform(size: int = 224) -> Any:
    """``RandomResizedCrop(size)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize``."""
    t = _torchvision().transforms
    return t.Compose(
        [t.RandomResizedCrop(size), t.RandomHorizontalFlip(), t.ToTensor(), t.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def eval_transform(size: int = 224) -> Any:
    """``Resize(round(size * 256 / 224))``, ``CenterCrop(size)``, ``ToTensor()``, ``Normalize``."""
    t = _torchvision().transforms
    return t.Compose(
        [
            t.Resize(round(size * 256 / 224)),
            t.CenterCrop(size),
            t.ToTensor(),
            t.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_imagefolder(root: str | os.PathLike[str], image_size: int = 224, name: str = "imagenet") -> ImageFolderData:
    """Read the file lists of ``root/train`` and ``root/val`` (torchvision's
    ``datasets.ImageFolder``; images are decoded lazily, in the loader's workers).

    Raises:
        MissingDependencyError: (an ``ImportError``) torchvision is not installed.
        MissingFileError, DataError: the layout is wrong (see :func:`check_layout`),
            or a class folder holds no image (the message names it).
        ArgumentValueError: ``image_size`` is not positive.
    """
    if image_size < 1:
        raise ArgumentValueError(f"Argument 'image_size' is {image_size}; pass a positive crop side such as 224.")
    datasets = _torchvision().datasets
    base = Path(root).expanduser()
    classes = check_layout(base)
    splits = {}
    for split, transform in (("train", train_transform(image_size)), ("val", eval_transform(image_size))):
        try:
            splits[split] = datasets.ImageFolder(str(base / split), transform=transform)
        except FileNotFoundError as error:  # a class folder without any image
            raise DataError(f"Folder {str(base / split)!r} has a class folder without images ({error}).") from None
    train, test = splits["train"], splits["val"]
    if tuple(train.classes) != classes or tuple(test.classes) != classes:  # hidden folders and the like
        raise DataError(f"Folder {str(base)!r}: torchvision found other class folders than the layout check.")
    train_eval = copy.copy(train)  # shares the file list; only the transform differs
    train_eval.transform = eval_transform(image_size)
    return ImageFolderData(train, train_eval, test, classes, len(classes), 3, image_size, base, name)


class EpochShuffleSampler(Sampler[int]):
    """A seeded shuffle per epoch: epoch ``e`` is ``torch.randperm(n)`` drawn
    with a generator seeded ``seed + e`` (the order a one-rank
    ``DistributedSampler(seed=seed)`` gives), so an epoch's order does not
    depend on the epochs before it. Call :meth:`set_epoch` before each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next pass as epoch ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class ShardSampler(Sampler[int]):
    """Samples ``rank, rank + world, ...`` in order: every sample on exactly one rank."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.indices = range(rank, n, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ArgumentValueError(f"Arguments 'rank' and 'world' are {rank} and {world}; pass 0 <= rank < world.")


def _loader_options(workers: int, device: torch.device | str | None) -> dict[str, Any]:
    if workers < 0:
        raise ArgumentValueError(f"Argument 'workers' is {workers}; pass 0 (load in the main process) or more.")
    cuda = device is not None and torch.device(device).type == "cuda"
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": cuda}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def train_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world: int = 1,
    workers: int = 8,
    device: torch.device | str | None = None,
    drop_last: bool = True,
) -> DataLoader[Any]:
    """Shuffled training batches of ``batch_size`` (per rank); see the module
    docstring, item (a). Iterate with :func:`epoch_batches`.

    ``workers`` loader processes (persistent across epochs when > 0), pinned
    memory when ``device`` is CUDA. ``world > 1``: a ``DistributedSampler``
    (``shuffle=True``, seed ``seed * 1000003``); else an
    :class:`EpochShuffleSampler` with the same seed.

    Raises:
        ArgumentValueError: ``batch_size`` < 1, ``workers`` < 0 or ``rank`` outside ``[0, world)``.
    """
    if batch_size < 1:
        raise ArgumentValueError(f"Argument 'batch_size' is {batch_size}; pass at least 1.")
    _check_rank(rank, world)
    order_seed = seed * _SEED_STRIDE
    sampler: Sampler[int]
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=order_seed)
    else:
        sampler = EpochShuffleSampler(len(dataset), order_seed)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(order_seed + rank)  # the workers' augmentation seeds
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        generator=generator,
        **_loader_options(workers, device),
    )


#: Training seeds drawn by :func:`maskalign.repro.training.train` are 62-bit;
#: :class:`ImageFolderTrainData` reduces them modulo this before
#: :func:`train_loader` multiplies by :data:`_SEED_STRIDE` (the samplers'
#: generators take seeds below 2**63).
_SEED_MODULUS = 2**40


class ImageFolderTrainData:
    """:class:`~maskalign.repro.training.TrainData` over an ImageFolder split:
    what :func:`maskalign.repro.training.train` reads for ``dataset="imagenet"``.

    Each call of :meth:`epoch` reads rank ``rank``'s loader of
    :func:`train_loader` (per-rank batch ``batch_size / world``, the
    transform of ``dataset``, e.g. :func:`train_transform`) through
    :func:`epoch_batches`. Global batch ``i`` of an epoch is positions
    ``i * batch_size .. (i + 1) * batch_size - 1`` of the epoch's seeded
    permutation whatever ``world`` is (``DistributedSampler`` deals position
    ``p`` to rank ``p % world``: the shares of
    :func:`~maskalign.repro.training.share_indices`), so N ranks train on
    one process's global batches.

    The last incomplete batch: the loaders drop it, so an epoch is the
    ``len(dataset) // batch_size`` full global batches, and ``len()`` is the
    number of samples used, ``steps * batch_size`` (the ``TrainData``
    contract, ``ceil(len / batch_size)`` shares per rank, then holds; the
    padding of ``DistributedSampler`` is never reached). ``batch_size`` and
    ``world`` are therefore fixed when the object is made, and
    :meth:`epoch` checks them.

    Augmentation randomness: with ``workers > 0`` the workers are seeded from
    the loader's generator (the epoch seed and the rank); with ``workers ==
    0`` the transforms draw from torch's global generator, so each batch is
    loaded under :func:`torch.random.fork_rng` with a private state seeded
    the same way: the run's own global random state is neither read nor
    changed, and a resumed stage draws what an uninterrupted one does.

    Raises:
        ArgumentValueError: ``batch_size`` is not a positive multiple of
            ``world``, or the data set holds fewer than ``batch_size`` samples.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        world: int = 1,
        *,
        workers: int = 8,
        channels_last: bool = False,
    ) -> None:
        if world < 1 or batch_size < 1 or batch_size % world:
            raise ArgumentValueError(
                f"Argument 'batch_size' is {batch_size} for {world} rank(s); pass a positive multiple of the "
                "number of ranks (each rank loads batch_size / world images per step)."
            )
        n = len(dataset)  # type: ignore[arg-type]
        if n < batch_size:
            raise ArgumentValueError(
                f"Argument 'dataset' holds {n} training images, fewer than one batch of {batch_size}; "
                "pass a smaller batch size."
            )
        self.dataset, self.batch_size, self.world = dataset, batch_size, world
        self.workers, self.channels_last = workers, channels_last
        self.steps = n // batch_size
        self._loader: tuple[tuple[int, int, str], DataLoader[Any]] | None = None

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def _get_loader(self, seed: int, rank: int, device: torch.device) -> DataLoader[Any]:
        key = (seed, rank, str(device))
        if self._loader is None or self._loader[0] != key:  # one loader (persistent workers) per training run
            self._loader = None
            loader = train_loader(
                self.dataset,
                self.batch_size // self.world,
                seed=seed,
                rank=rank,
                world=self.world,
                workers=self.workers,
                device=device,
            )
            self._loader = (key, loader)
        return self._loader[1]

    def epoch(
        self, epoch: int, seed: int, batch_size: int, rank: int, world: int, device: torch.device
    ) -> Iterator[Share]:
        """Rank ``rank``'s :class:`~maskalign.repro.training.Share` of each
        global batch of ``epoch``, on ``device`` (``channels_last`` when set)."""
        if (batch_size, world) != (self.batch_size, self.world):
            raise ArgumentValueError(
                f"Arguments 'batch_size' and 'world' are {batch_size} and {world}, but this ImageFolderTrainData "
                f"was made for {self.batch_size} and {self.world}; make one for these."
            )
        seed = seed % _SEED_MODULUS
        loader = self._get_loader(seed, rank, device)
        batches = itertools.islice(epoch_batches(loader, epoch), self.steps)
        state = torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch * 7919 + rank).get_state()
        while True:
            if self.workers == 0:  # the transforms draw from the global generator: give them their own
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(state)
                    batch = next(batches, None)
                    state = torch.get_rng_state()
            else:
                batch = next(batches, None)
            if batch is None:
                return
            images, labels = to_device(batch[0], batch[1], device, channels_last=self.channels_last)
            yield Share(images, labels, self.batch_size)


def epoch_batches(loader: DataLoader[Any], epoch: int) -> Iterator[Any]:
    """The batches of ``epoch``: sets the sampler's epoch, then iterates ``loader``."""
    set_epoch = getattr(loader.sampler, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    return iter(loader)


def eval_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    rank: int = 0,
    world: int = 1,
    workers: int = 8,
    device: torch.device | str | None = None,
) -> DataLoader[Any]:
    """Batches in a fixed order, rank ``rank`` reading every ``world``-th
    sample (:class:`ShardSampler`); see the module docstring, item (b).

    Raises:
        ArgumentValueError: as :func:`train_loader`.
    """
    if batch_size < 1:
        raise ArgumentValueError(f"Argument 'batch_size' is {batch_size}; pass at least 1.")
    _check_rank(rank, world)
    sampler = ShardSampler(len(dataset), rank, world)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **_loader_options(workers, device))


def subset_indices(total: int, n: int, seed: int = 0) -> list[int]:
    """The indices of a fixed subset of ``n`` of ``total`` samples, in
    increasing order: the first ``n`` of ``torch.randperm(total)`` drawn with
    a generator seeded ``seed``, sorted. The same for the same ``(total, n,
    seed)`` on every rank and machine; ``n == total`` gives ``0 .. total - 1``.
    The matching subsets of ``maskalign reproduce`` (:func:`match_subset`,
    and the in-memory data sets' ``match_samples``).

    Raises:
        ArgumentValueError: ``n`` is not in ``[1, total]``.
    """
    if not 1 <= n <= total:
        raise ArgumentValueError(f"Argument 'n' is {n}; pass 1 .. {total} (the training samples).")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:n].sort().values.tolist()


def match_subset(data: ImageFolderData, n: int, seed: int = 0) -> Subset[Any]:
    """``n`` training samples under the eval transform, the same for the same
    ``(n, seed)`` everywhere (:func:`subset_indices`: the first ``n`` of a
    seeded permutation, in file order); see the module docstring, item (c).

    Raises:
        ArgumentValueError: ``n`` is not in ``[1, number of training samples]``.
    """
    total = len(data.train_eval)  # type: ignore[arg-type]
    return Subset(data.train_eval, subset_indices(total, n, seed))


def fingerprint(data: ImageFolderData) -> str:
    """SHA-256 (hex, 16 digits) of the name, image size, classes and every
    sample's relative path, label and file size; see the module docstring, item (d)."""
    digest = hashlib.sha256(f"{data.name}|{data.image_size}|{','.join(data.classes)}".encode())
    for split, dataset in (("train", data.train), ("val", data.test)):
        digest.update(f"|{split}".encode())
        folder = data.root / split
        for path, label in sorted(getattr(dataset, "samples", [])):
            relative = Path(path).relative_to(folder).as_posix()
            digest.update(f"\n{relative}\t{label}\t{os.path.getsize(path)}".encode())
    return digest.hexdigest()[:16]


def to_device(
    images: Tensor, labels: Tensor, device: torch.device | str, *, channels_last: bool = False
) -> tuple[Tensor, Tensor]:
    """Move a batch to ``device`` (``non_blocking``: overlaps with compute from
    pinned memory), the images in ``channels_last`` when asked."""
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return (
        images.to(device, non_blocking=True, memory_format=memory_format),
        labels.to(device, non_blocking=True),
    )


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many of the batch have their label among the top ``k`` logits, per ``k``."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def write_fake_imagefolder(
    root: str | os.PathLike[str],
    classes: int = 3,
    per_class: int = 4,
    size: int = 32,
    val_per_class: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny ImageFolder of random-noise JPEGs (PIL, which torchvision
    brings) in the layout of :func:`check_layout`: ``classes`` folders
    ``n0000000<i>`` with ``per_class`` training and ``val_per_class``
    (default ``per_class``) validation images of ``size`` x ``size``
    (slightly varied, so resizing matters). For tests and examples.

    Returns:
        ``Path(root)``.
    Raises:
        MissingDependencyError: PIL is not installed.
        ArgumentValueError: a count or size is not positive.
    """
    n_val = per_class if val_per_class is None else val_per_class
    for name, value in (("classes", classes), ("per_class", per_class), ("val_per_class", n_val), ("size", size)):
        if value < 1:
            raise ArgumentValueError(f"Argument {name!r} is {value}; pass a positive integer.")
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        raise MissingDependencyError(
            f"Writing a fake ImageFolder needs PIL (from torchvision), which is not installed; run {PIP_IMAGENET}."
        ) from None
    base = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", n_val)):
        for c in range(classes):
            folder = base / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = size + int(rng.integers(0, 3)), size + int(rng.integers(0, 5))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.JPEG", quality=90)
    return base
