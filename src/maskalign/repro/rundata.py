"""The data of a reproduce run, as its stages read it.

One small interface, :class:`RunData`, with two implementations: the
in-memory data sets of :mod:`maskalign.repro.data` held on the device
(:class:`MemoryData`), and an ImageFolder streamed by
:mod:`maskalign.repro.imagenet` (:class:`ImageFolderRunData`,
``dataset="imagenet"``). :func:`load_run_data` picks one for a config.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..errors import ArgumentValueError, ConfigError, DataError
from ..evaluation.lmc import evaluate
from . import distributed, imagenet
from .data import DatasetSplits, load_dataset, splits_fingerprint, splits_to_device
from .presets import ReproduceConfig
from .training import TrainData, batches

__all__ = [
    "EVAL_BATCH",
    "MATCH_BATCH",
    "ImageFolderRunData",
    "MemoryData",
    "RunData",
    "load_run_data",
]

EVAL_BATCH = 512
MATCH_BATCH = 256

#: The crop side of ``dataset="imagenet"`` when ``ReproduceConfig.image_size``
#: is ``None`` (the standard 224). The size is part of the data fingerprint
#: (:func:`~maskalign.repro.imagenet.fingerprint`), so stages at another size
#: are not reused.
_IMAGENET_IMAGE_SIZE = 224

#: Training samples of the matching subset of ``dataset="imagenet"`` when
#: ``ReproduceConfig.match_samples`` is ``None``
#: (:func:`~maskalign.repro.imagenet.match_subset`, seed 0; all of them when
#: there are fewer): "a small subset of the training dataset" (paper), 10,000
#: assumed (``PRESET_SOURCES["imagenet-resnet50"]["match_samples"]``).
_IMAGENET_MATCH_SAMPLES = 10_000

#: The seed of every matching subset (:func:`~maskalign.repro.imagenet.subset_indices`).
_SUBSET_SEED = 0

#: ``DataLoader`` workers of ``dataset="imagenet"`` on CUDA (on the CPU the
#: images load in the main process: the CPU is busy training).
IMAGENET_WORKERS = 8


class RunData(Protocol):
    """The data of a run as the stages read it (:class:`MemoryData`,
    :class:`ImageFolderRunData`).

    ``train`` goes to :func:`~maskalign.repro.training.train` (a
    ``TensorDataset`` or a :class:`~maskalign.repro.training.TrainData`);
    ``targets``: the test labels (CPU, in :meth:`test_batches` order);
    ``match_samples``: how many samples :meth:`match_batches` holds over all
    ranks (``ReproduceConfig.match_samples`` resolved); ``channels_last``:
    models and batches in ``channels_last``; :meth:`settings`: what every
    stage's settings record besides the config and the fingerprint (for
    in-memory data the layout of image models and the matching subset, if
    any)."""

    train: TensorDataset | TrainData
    fingerprint: str
    num_classes: int
    in_channels: int
    image_size: int
    channels_last: bool
    targets: Tensor
    match_samples: int

    def example_inputs(self) -> Tensor:
        """Two training inputs on the device (for :func:`build_spec`)."""
        ...

    def test_batches(self) -> Iterable[tuple[Tensor, Tensor]]:
        """The test set as ``(inputs, targets)`` batches on the device, re-iterable, in a fixed order."""
        ...

    def scores(self, model: nn.Module) -> dict[str, float]:
        """``test_loss`` (mean nats), ``test_acc`` (fraction) and any other
        test metric. Under a process group it may be a collective (every rank
        calls it: :meth:`ImageFolderRunData.scores`); the evaluation-only
        stages that run on rank 0 alone read :meth:`test_batches` instead."""
        ...

    def match_batches(self, samples: int | None = None) -> Iterable[tuple[Tensor, Tensor]]:
        """This rank's share of the activation-matching batches, re-iterable:
        ``match_samples`` training samples, or ``samples`` when given (the
        fixed subset of :func:`~maskalign.repro.imagenet.subset_indices`, seed 0)."""
        ...

    def bn_batches(self, n: int, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
        """``n`` training batches of ``batch_size`` (fixed, without
        augmentation) to re-estimate BatchNorm statistics, re-iterable."""
        ...

    def settings(self) -> dict[str, Any]:
        """Settings every stage records besides the config and the fingerprint."""
        ...


def _subset_size(samples: int, total: int, what: str) -> int:
    """``samples``, checked against the ``total`` training samples (``what``
    names the value in the error: a setting or an argument).

    Raises:
        ConfigError: (``what`` is a setting) or ArgumentValueError: outside ``[2, total]``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or not 2 <= samples <= total:
        error = ConfigError if what.startswith("Setting") else ArgumentValueError
        raise error(
            f"{what} is {samples!r}, but the training set holds {total} samples; pass 2 .. {total} "
            "(a correlation needs two samples)."
        )
    return samples


class MemoryData:
    """:class:`RunData` of in-memory :class:`DatasetSplits` (already on the
    device): the test set held as a list of batches, matching on the
    training set in order (batches of ``MATCH_BATCH``, every
    ``world``-th batch from ``rank`` on each rank), BatchNorm on the first
    training batches.

    ``match_samples`` (``ReproduceConfig.match_samples``; ``None``: every
    training sample): matching on a fixed subset of that many training
    samples, the seeded random subset of
    :func:`~maskalign.repro.imagenet.subset_indices` (seed 0, not
    stratified: the first ``match_samples`` of a seeded permutation), kept in
    training-set order. The whole set is the training set in its own order,
    so ``None`` and the number of training samples match exactly as before
    the setting existed, and then :meth:`settings` records nothing; a
    smaller subset is recorded as ``match_samples``.

    Image data (4-D inputs) runs its models in ``channels_last`` on every
    device: a training step of ResNet20 on mnist5k's 1x32x32 inputs is about
    1.3x faster on the CPU in that layout (``benchmarks/bench_channels_last.py``), and the result
    differs from the contiguous layout only by float rounding, so its stages
    record ``memory_format`` and a folder computed in the other layout
    recomputes rather than mixes the two.

    Raises:
        ConfigError: ``match_samples`` is not in ``[2, training samples]``.
    """

    def __init__(
        self, splits: DatasetSplits, device: torch.device, fingerprint: str, match_samples: int | None = None
    ) -> None:
        self.splits, self.device, self.fingerprint = splits, device, fingerprint
        self.train: TensorDataset | TrainData = splits.train
        self.num_classes, self.in_channels, self.image_size = splits.num_classes, splits.in_channels, splits.image_size
        self.test_data = list(batches(splits.test, EVAL_BATCH, device=device))
        self.targets = splits.test.tensors[1].cpu()
        self.channels_last = splits.train.tensors[0].dim() == 4
        total = len(splits.train)
        what = "Setting 'match_samples' (--match-samples)"
        self.match_samples = total if match_samples is None else _subset_size(match_samples, total, what)

    def example_inputs(self) -> Tensor:
        return self.splits.train.tensors[0][:2].to(self.device)

    def test_batches(self) -> Iterable[tuple[Tensor, Tensor]]:
        return self.test_data

    def scores(self, model: nn.Module) -> dict[str, float]:
        loss, acc = evaluate(model, self.test_data)
        return {"test_loss": loss, "test_acc": acc}

    def match_batches(self, samples: int | None = None) -> Iterable[tuple[Tensor, Tensor]]:
        """This rank's share (every ``world``-th batch of ``MATCH_BATCH``
        from ``rank``) of the matching subset: ``match_samples`` samples, or
        ``samples`` when given (the same kind of subset: seeded, seed 0, in
        training-set order; all of them: the whole set in order).

        Raises:
            ArgumentValueError: ``samples`` is not in ``[2, training samples]``.
        """
        train, total = self.splits.train, len(self.splits.train)
        n = self.match_samples if samples is None else _subset_size(samples, total, "Argument 'samples'")
        if n < total:
            index = torch.tensor(imagenet.subset_indices(total, n, _SUBSET_SEED), device=train.tensors[0].device)
            train = TensorDataset(*(t[index] for t in train.tensors))
        data = list(batches(train, MATCH_BATCH, device=self.device))
        return data[distributed.rank() :: distributed.world_size()]

    def bn_batches(self, n: int, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
        return list(itertools.islice(batches(self.splits.train, batch_size, device=self.device), n))

    def settings(self) -> dict[str, Any]:
        subset = {"match_samples": self.match_samples} if self.match_samples < len(self.splits.train) else {}
        return {**subset, "memory_format": "channels_last"} if self.channels_last else subset


class LoaderBatches:
    """A re-iterable view of a ``DataLoader``: each pass moves the batches
    to the device (:func:`~maskalign.repro.imagenet.to_device`), at most
    ``limit`` of them."""

    def __init__(self, loader: Any, device: torch.device, channels_last: bool, limit: int | None = None) -> None:
        self.loader, self.device, self.channels_last, self.limit = loader, device, channels_last, limit

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for inputs, targets in itertools.islice(self.loader, self.limit):
            yield imagenet.to_device(inputs, targets, self.device, channels_last=self.channels_last)


class ImageFolderRunData:
    """:class:`RunData` of an ImageFolder (``dataset="imagenet"``,
    :mod:`maskalign.repro.imagenet`), streamed: training through
    :class:`~maskalign.repro.imagenet.ImageFolderTrainData` (the last
    incomplete global batch of an epoch dropped), the ``val`` split through
    :func:`~maskalign.repro.imagenet.eval_loader` at every evaluation
    (never held; :meth:`scores` shards it over the ranks, :meth:`test_batches`
    is the whole split), matching and
    BatchNorm re-estimation on :func:`~maskalign.repro.imagenet.match_subset`
    (eval transform; for matching each rank reads every ``world``-th sample
    of it); on CUDA the models and batches are ``channels_last``. Test
    metrics add ``test_top5`` (the paper's Figure 7 metric). Images are read
    only when a stage needs them (a dry run reads the file list and sizes).

    Settings: ``image_size`` (``None``: 224) and ``match_samples``
    (``None``: 10,000, or every training image when there are fewer; an
    explicit value must not exceed them). Every stage records
    ``match_samples`` and the loader workers, and ``image_size`` when it is
    not 224 (the size is also part of the fingerprint).

    Raises:
        DataError: no ``data_root``.
        ConfigError: ``batch_size`` is not a multiple of ``world``, or
            ``match_samples`` exceeds the training images.
    """

    def __init__(self, config: ReproduceConfig, device: torch.device, world: int) -> None:
        if config.data_root is None:
            raise DataError(
                "Data set imagenet is read from a local folder and cannot be downloaded at run time; pass its "
                "location with --data-root (the folder holding train/<class>/ and val/<class>/)."
            )
        if config.batch_size % world:
            raise ConfigError(
                f"Setting 'batch_size' (--batch-size) is {config.batch_size} for {world} ranks; pass a multiple "
                "of the number of ranks (each loads batch_size / ranks images per step)."
            )
        self.device = device
        size = _IMAGENET_IMAGE_SIZE if config.image_size is None else config.image_size
        self.data = imagenet.load_imagefolder(config.data_root, image_size=size, name=config.dataset)
        self.fingerprint = imagenet.fingerprint(self.data)
        self.num_classes, self.in_channels = self.data.num_classes, self.data.in_channels
        self.image_size = self.data.image_size
        self.channels_last = device.type == "cuda"
        self.workers = IMAGENET_WORKERS if device.type == "cuda" else 0
        # augment=False (--no-augment) trains on the eval transform (resize + center crop), as for in-memory data
        images = self.data.train if config.augment else self.data.train_eval
        self.train: TensorDataset | TrainData = imagenet.ImageFolderTrainData(
            images, config.batch_size, world, workers=self.workers, channels_last=self.channels_last
        )
        self.targets = torch.tensor(self.data.test.targets, dtype=torch.long)  # type: ignore[attr-defined]
        total = len(self.data.train_eval)  # type: ignore[arg-type]
        if config.match_samples is None:
            self.match_samples = min(_IMAGENET_MATCH_SAMPLES, total)
        else:
            self.match_samples = _subset_size(config.match_samples, total, "Setting 'match_samples' (--match-samples)")
        self._test: LoaderBatches | None = None
        self._test_share: tuple[tuple[int, int], LoaderBatches] | None = None

    def _loader(self, dataset: Any, batch_size: int, rank: int = 0, world: int = 1) -> Any:
        return imagenet.eval_loader(
            dataset, batch_size, rank=rank, world=world, workers=self.workers, device=self.device
        )

    def example_inputs(self) -> Tensor:
        return torch.stack([self.data.train_eval[i][0] for i in range(2)]).to(self.device)

    def test_batches(self) -> Iterable[tuple[Tensor, Tensor]]:
        if self._test is None:  # one loader (persistent workers) for every evaluation
            self._test = LoaderBatches(self._loader(self.data.test, EVAL_BATCH), self.device, self.channels_last)
        return self._test

    def _test_batches_of_rank(self, rank: int, world: int) -> LoaderBatches:
        """Rank ``rank``'s share of the ``val`` split: samples ``rank, rank + world, ...``."""
        if self._test_share is None or self._test_share[0] != (rank, world):
            self._test_share = None  # one loader (persistent workers) for every sharded evaluation
            loader = self._loader(self.data.test, EVAL_BATCH, rank, world)
            self._test_share = ((rank, world), LoaderBatches(loader, self.device, self.channels_last))
        return self._test_share[1]

    @torch.no_grad()
    def scores(self, model: nn.Module, *, shard: bool = True) -> dict[str, float]:
        """``test_loss`` (mean cross-entropy, nats), ``test_acc`` and
        ``test_top5`` (fractions) over the ``val`` split, in eval mode (the
        model's mode is restored).

        Under a process group of N > 1 ranks (and ``shard``), each rank
        evaluates its share (every N-th image:
        :func:`~maskalign.repro.imagenet.eval_loader` with ``rank`` and
        ``world``, so every image once, also when N does not divide the
        split) and the sums of loss, top-1 and top-5 hits and images are
        all-reduced in float64: a collective, which every rank must call
        (the training stages do), and every rank returns the same scores,
        those of one process up to the order of the float additions. The
        losses are summed in float64 from float64 cross-entropies.
        ``shard=False``, or one process: this process evaluates the whole
        split alone (no collective).
        """
        world = distributed.world_size() if shard else 1
        data = self.test_batches() if world == 1 else self._test_batches_of_rank(distributed.rank(), world)
        was_training = model.training
        model.eval()
        loss, top1, top5, count = 0.0, 0, 0, 0
        for inputs, targets in data:
            out = model(inputs)
            loss += float(torch.nn.functional.cross_entropy(out.double(), targets, reduction="sum"))
            hits = imagenet.topk_correct(out, targets, (1, 5))
            top1, top5, count = top1 + hits[0], top5 + hits[1], count + targets.shape[0]
        model.train(was_training)
        if world > 1:  # NCCL reduces CUDA tensors, gloo CPU ones
            where = self.device if self.device.type == "cuda" else torch.device("cpu")
            sums = torch.tensor([loss, top1, top5, count], dtype=torch.float64, device=where)
            dist.all_reduce(sums)
            loss, top1, top5, count = sums.tolist()
        return {"test_loss": loss / count, "test_acc": top1 / count, "test_top5": top5 / count}

    def match_batches(self, samples: int | None = None) -> Iterable[tuple[Tensor, Tensor]]:
        """This rank's share (every ``world``-th sample) of
        :func:`~maskalign.repro.imagenet.match_subset` (seed 0) of
        ``match_samples`` training images, or ``samples`` when given.

        Raises:
            ArgumentValueError: ``samples`` is not in ``[2, training images]``.
        """
        total = len(self.data.train_eval)  # type: ignore[arg-type]
        n = self.match_samples if samples is None else _subset_size(samples, total, "Argument 'samples'")
        subset = imagenet.match_subset(self.data, n, seed=_SUBSET_SEED)
        loader = self._loader(subset, MATCH_BATCH, distributed.rank(), distributed.world_size())
        return LoaderBatches(loader, self.device, self.channels_last)

    def bn_batches(self, n: int, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
        subset = imagenet.match_subset(self.data, self.match_samples, seed=_SUBSET_SEED)
        return LoaderBatches(self._loader(subset, batch_size), self.device, self.channels_last, limit=n)

    def settings(self) -> dict[str, Any]:
        # the loader workers seed the random crops (reproducible with the same number of workers)
        size = {"image_size": self.image_size} if self.image_size != _IMAGENET_IMAGE_SIZE else {}
        return {"match_samples": self.match_samples, "loader_workers": self.workers, **size}


def load_run_data(
    config: ReproduceConfig, splits: DatasetSplits | None, device: torch.device, world: int
) -> MemoryData | ImageFolderRunData:
    """The data of a run: ``splits`` (or ``config.dataset``'s in-memory
    splits) on ``device``, or the ImageFolder of ``dataset="imagenet"``;
    matching on ``config.match_samples`` training samples.

    Raises:
        ConfigError: ``match_samples`` exceeds the training samples (and as
            :class:`ImageFolderRunData`).
        DataError, ValueError: as :func:`~maskalign.repro.data.load_dataset`
            or :class:`ImageFolderRunData`.
    """
    if splits is None and config.dataset == "imagenet":
        return ImageFolderRunData(config, device, world)
    splits = splits or load_dataset(config.dataset, config.data_root)
    fingerprint = splits_fingerprint(splits)
    return MemoryData(splits_to_device(splits, device), device, fingerprint, config.match_samples)
