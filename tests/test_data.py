"""Tests for maskalign.repro.data: digits split, CIFAR reader, augmentation, dispatch."""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskalign.errors import DataError
from maskalign.repro.data import (
    CIFAR_STATS,
    DatasetSplits,
    augment_crop_flip,
    load_cifar,
    load_dataset,
    load_digits,
    splits_fingerprint,
    splits_to_device,
    write_fake_cifar,
)

_N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    pytest.importorskip("sklearn")
    return load_digits(seed=0)


def test_digits_shapes_and_split_sizes(digits: DatasetSplits) -> None:
    x_train, y_train = digits.train.tensors
    x_test, y_test = digits.test.tensors
    n_test = math.ceil(0.25 * _N_DIGITS)
    assert x_test.shape == (n_test, 1, 8, 8)
    assert x_train.shape == (_N_DIGITS - n_test, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert y_test.shape == (n_test,)
    meta = (digits.num_classes, digits.in_channels, digits.image_size, digits.name)
    assert meta == (10, 1, 8, "digits")


def test_digits_split_is_stratified(digits: DatasetSplits) -> None:
    y_train, y_test = digits.train.tensors[1], digits.test.tensors[1]
    totals = torch.bincount(torch.cat([y_train, y_test]), minlength=10)
    test_counts = torch.bincount(y_test, minlength=10)
    assert torch.all((test_counts - 0.25 * totals).abs() <= 1.0)


def test_digits_standardised_with_train_stats(digits: DatasetSplits) -> None:
    x_train, x_test = digits.train.tensors[0], digits.test.tensors[0]
    assert abs(x_train.mean().item()) < 1e-4
    assert abs(x_train.std(unbiased=False).item() - 1.0) < 1e-4
    assert abs(x_test.mean().item()) < 0.1


def test_digits_deterministic_per_seed(digits: DatasetSplits) -> None:
    again = load_digits(seed=0)
    other = load_digits(seed=1)
    assert torch.equal(again.train.tensors[0], digits.train.tensors[0])
    assert torch.equal(again.test.tensors[1], digits.test.tensors[1])
    assert not torch.equal(other.test.tensors[1], digits.test.tensors[1])


def test_digits_rejects_bad_test_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def _read_raw(folder: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Read what write_fake_cifar wrote, independently of load_cifar."""
    data, labels = [], []
    for name in files:
        with (folder / name).open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data.append(batch[b"data"])
        labels.append(np.asarray(batch[label_key]))
    return np.concatenate(data), np.concatenate(labels)


def _expected_images(raw: np.ndarray, num_classes: int) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_STATS[num_classes])
    return (torch.from_numpy(raw).float().view(-1, 3, 32, 32) / 255.0 - mean) / std


_TRAIN_FILES = {10: [f"data_batch_{i}" for i in range(1, 6)], 100: ["train"]}
_TEST_FILE = {10: "test_batch", 100: "test"}
_LABEL_KEY = {10: b"labels", 100: b"fine_labels"}


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("give_parent", [True, False])
def test_cifar_round_trip(tmp_path: Path, num_classes: int, give_parent: bool) -> None:
    folder = write_fake_cifar(tmp_path, num_classes=num_classes, n_train=23, n_test=7, seed=3)
    assert folder.parent == tmp_path
    splits = load_cifar(tmp_path if give_parent else folder, num_classes=num_classes)

    raw_train, labels_train = _read_raw(folder, _TRAIN_FILES[num_classes], _LABEL_KEY[num_classes])
    raw_test, labels_test = _read_raw(folder, [_TEST_FILE[num_classes]], _LABEL_KEY[num_classes])
    x_train, y_train = splits.train.tensors
    x_test, y_test = splits.test.tensors
    assert x_train.shape == (23, 3, 32, 32) and x_test.shape == (7, 3, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    torch.testing.assert_close(x_train, _expected_images(raw_train, num_classes))
    torch.testing.assert_close(x_test, _expected_images(raw_test, num_classes))
    assert torch.equal(y_train, torch.from_numpy(labels_train).long())
    assert torch.equal(y_test, torch.from_numpy(labels_test).long())
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (num_classes, 3, 32)
    assert splits.name == f"cifar{num_classes}"


def test_cifar_fake_layout_matches_standard(tmp_path: Path) -> None:
    folder10 = write_fake_cifar(tmp_path, num_classes=10, n_train=12)
    folder100 = write_fake_cifar(tmp_path, num_classes=100)
    assert folder10.name == "cifar-10-batches-py"
    assert sorted(p.name for p in folder10.iterdir()) == sorted([*_TRAIN_FILES[10], "test_batch"])
    assert folder100.name == "cifar-100-python"
    assert sorted(p.name for p in folder100.iterdir()) == ["test", "train"]


def test_cifar_missing_folder_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path / "nowhere", num_classes=10)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "downloaded" in message


def test_cifar_missing_file_names_path(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        {b"data": np.zeros((2, 3072), np.uint8)},
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
        {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 0]},
        [1, 2, 3],
    ],
)
def test_cifar_malformed_file_names_file(tmp_path: Path, content: object) -> None:
    folder = write_fake_cifar(tmp_path)
    bad = folder / "data_batch_3"
    with bad.open("wb") as f:
        pickle.dump(content, f)
    with pytest.raises(DataError) as info:
        load_cifar(folder)
    assert str(bad) in str(info.value)


def test_cifar_unpicklable_file_names_file(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path, num_classes=100)
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test"):
        load_cifar(tmp_path, num_classes=100)


def test_cifar_rejects_other_class_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="10 or 100"):
        load_cifar(tmp_path, num_classes=20)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, num_classes=100, n_train=4, n_test=2)
    assert load_dataset("CIFAR100", root=str(tmp_path)).name == "cifar100"
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="digits"):
        load_dataset("mnist")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_load_dataset_digits_uses_seed(digits: DatasetSplits) -> None:
    loaded = load_dataset("Digits", seed=0)
    assert loaded.name == "digits"
    assert torch.equal(loaded.test.tensors[1], digits.test.tensors[1])


def test_augment_shape_dtype_and_determinism() -> None:
    x = torch.randn(16, 3, 32, 32)
    out = augment_crop_flip(x, _gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment_crop_flip(x, _gen(0)))
    assert not torch.equal(out, augment_crop_flip(x, _gen(1)))
    changed = (out != x).flatten(1).any(dim=1)
    assert changed.sum() >= 8


def test_augment_without_padding_only_flips() -> None:
    x = torch.randn(64, 2, 5, 5)
    out = augment_crop_flip(x, _gen(0), padding=0)
    flipped = (out == x.flip(-1)).flatten(1).all(dim=1)
    kept = (out == x).flatten(1).all(dim=1)
    assert torch.all(flipped | kept)
    assert flipped.any() and kept.any()


def test_augment_outputs_are_flipped_crops_of_padded_input() -> None:
    padding, size = 2, 6
    x = torch.randn(12, 2, size, size)
    out = augment_crop_flip(x, _gen(5), padding=padding)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = range(2 * padding + 1)
    for i in range(x.shape[0]):
        crops = [padded[i, :, dy : dy + size, dx : dx + size] for dy in offsets for dx in offsets]
        candidates = crops + [crop.flip(-1) for crop in crops]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_augment_rejects_non_4d() -> None:
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        augment_crop_flip(torch.zeros(3, 32, 32))


def test_digits_without_sklearn_explains_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"maskalign\[demo\]"):
        load_digits()


def test_splits_to_device_on_cpu_is_a_no_op(digits: DatasetSplits) -> None:
    assert splits_to_device(digits, "cpu") is digits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_splits_to_device_moves_every_tensor_once(digits: DatasetSplits) -> None:
    moved = splits_to_device(digits, "cuda")
    for ds in (moved.train, moved.test):
        assert all(t.is_cuda for t in ds.tensors)
    assert torch.equal(moved.test.tensors[1].cpu(), digits.test.tensors[1])


def test_fingerprint_identifies_the_data(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "a", n_train=6, n_test=2, seed=0)
    write_fake_cifar(tmp_path / "b", n_train=6, n_test=2, seed=0)
    write_fake_cifar(tmp_path / "c", n_train=6, n_test=2, seed=1)
    a, b, c = (splits_fingerprint(load_cifar(tmp_path / name)) for name in "abc")
    assert a == b  # same content, another folder
    assert a != c
