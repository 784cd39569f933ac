"""The ImageNet data path (``maskalign.repro.imagenet``) and ResNet50 against
torchvision, on a tiny fake ImageFolder of real JPEGs (vision tier: needs
torchvision; skipped cleanly without it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")

import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

from maskalign.errors import DataError, MissingFileError  # noqa: E402
from maskalign.models import ResNet50  # noqa: E402
from maskalign.repro import imagenet  # noqa: E402
from maskalign.repro.imagenet import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    MissingDependencyError,
    epoch_batches,
    eval_loader,
    fingerprint,
    load_imagefolder,
    match_subset,
    to_device,
    topk_correct,
    train_loader,
    write_fake_imagefolder,
)
from maskalign.repro.presets import get_preset  # noqa: E402
from maskalign.repro.rundata import ImageFolderRunData  # noqa: E402

CLASSES, PER_CLASS, SIZE, CROP = 3, 4, 32, 24


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest.py)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_imagefolder(tmp_path_factory.mktemp("imagenet"), classes=CLASSES, per_class=PER_CLASS, size=SIZE)


@pytest.fixture(scope="module")
def data(root: Path) -> imagenet.ImageFolderData:
    return load_imagefolder(root, image_size=CROP)


def _order(loader: torch.utils.data.DataLoader, epoch: int) -> list[int]:  # type: ignore[type-arg]
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    return list(iter(loader.sampler))


def test_fake_imagefolder_layout_and_data_fields(root: Path, data: imagenet.ImageFolderData) -> None:
    files = sorted(root.rglob("*.JPEG"))
    assert len(files) == 2 * CLASSES * PER_CLASS
    assert files[0].relative_to(root).as_posix() == "train/n00000000/n00000000_0.JPEG"
    with Image.open(files[0]) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
    assert (data.num_classes, data.in_channels, data.image_size) == (CLASSES, 3, CROP)
    assert data.classes == tuple(f"n{c:08d}" for c in range(CLASSES))
    assert len(data.train) == len(data.train_eval) == len(data.test) == CLASSES * PER_CLASS  # type: ignore[arg-type]


def test_loaders_give_shaped_normalised_batches(data: imagenet.ImageFolderData) -> None:
    images, labels = next(epoch_batches(train_loader(data.train, 4, seed=0, workers=0), 0))
    assert images.shape == (4, 3, CROP, CROP) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(CLASSES))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = images * std + mean  # undo Normalize: back in [0, 1]
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    test_images, test_labels = next(iter(eval_loader(data.test, 5, workers=0)))
    assert test_images.shape == (5, 3, CROP, CROP)
    assert test_labels.tolist() == [0, 0, 0, 0, 1]  # fixed order: the file order
    # the eval transform by hand: Resize(round(24 * 256 / 224) = 27), CenterCrop(24), ToTensor, Normalize
    path, _ = data.test.samples[0]  # type: ignore[attr-defined]
    F = torchvision.transforms.functional
    with Image.open(path) as image:
        expected = F.to_tensor(F.center_crop(F.resize(image.convert("RGB"), 27), [CROP, CROP]))
    torch.testing.assert_close(test_images[0], (expected - mean) / std)


def test_same_seed_same_order_other_seed_other_order(data: imagenet.ImageFolderData) -> None:
    a, b, c = (train_loader(data.train, 4, seed=s, workers=0) for s in (0, 0, 1))
    assert _order(a, 0) == _order(b, 0)
    assert _order(a, 0) != _order(c, 0)
    assert _order(a, 0) != _order(a, 1)  # each epoch its own order
    assert _order(a, 3) == _order(b, 3)  # an epoch's order does not depend on the epochs before it
    labels_a = [labels.tolist() for _, labels in epoch_batches(a, 2)]
    labels_b = [labels.tolist() for _, labels in epoch_batches(b, 2)]
    assert labels_a == labels_b and len(labels_a) == CLASSES * PER_CLASS // 4


def test_one_rank_order_is_a_one_rank_distributed_sampler(data: imagenet.ImageFolderData) -> None:
    loader = train_loader(data.train, 4, seed=2, workers=0)
    reference = DistributedSampler(data.train, num_replicas=1, rank=0, shuffle=True, seed=loader.sampler.seed)  # type: ignore[attr-defined]
    for epoch in (0, 5):
        reference.set_epoch(epoch)
        assert _order(loader, epoch) == list(reference)


def test_persistent_workers_give_reproducible_augmented_batches(data: imagenet.ImageFolderData) -> None:
    runs = []
    for _ in range(2):
        loader = train_loader(data.train, 4, seed=7, workers=2)
        assert loader.persistent_workers and loader.num_workers == 2
        assert not loader.pin_memory  # no CUDA device given
        runs.append([images for _, (images, _labels) in zip(range(2), epoch_batches(loader, 0))])
    for first, second in zip(*runs):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_two_ranks_split_an_epoch_without_overlap(data: imagenet.ImageFolderData) -> None:
    n = len(data.train)  # type: ignore[arg-type]
    for epoch in (0, 1):
        ranks = [_order(train_loader(data.train, 2, seed=0, rank=r, world=2, workers=0), epoch) for r in (0, 1)]
        assert isinstance(train_loader(data.train, 2, seed=0, rank=1, world=2, workers=0).sampler, DistributedSampler)
        assert len(ranks[0]) == len(ranks[1]) == n // 2
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == list(range(n))
    shards = [list(eval_loader(data.test, 2, rank=r, world=2, workers=0).sampler) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(len(data.test))) and not set(shards[0]) & set(shards[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        train_loader(data.train, 2, seed=0, rank=2, world=2)


def test_match_subset_is_deterministic_and_uses_the_eval_transform(data: imagenet.ImageFolderData) -> None:
    a, b, c = match_subset(data, 5, seed=0), match_subset(data, 5, seed=0), match_subset(data, 5, seed=1)
    assert a.indices == b.indices != c.indices and len(a) == 5 and a.indices == sorted(a.indices)
    first, again = a[0][0], a[0][0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # no random crop
    assert first.shape == (3, CROP, CROP)
    with pytest.raises(ValueError, match="'n'"):
        match_subset(data, 10_000)


def test_fingerprint_is_stable_and_sees_a_changed_file(tmp_path: Path) -> None:
    root = write_fake_imagefolder(tmp_path, classes=2, per_class=2, size=16)
    before = fingerprint(load_imagefolder(root, image_size=16))
    assert fingerprint(load_imagefolder(root, image_size=16)) == before
    assert fingerprint(load_imagefolder(root, image_size=12)) != before
    with (root / "val" / "n00000001" / "n00000001_0.JPEG").open("ab") as f:
        f.write(b"\0")
    assert fingerprint(load_imagefolder(root, image_size=16)) != before


def test_missing_torchvision_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_fake_imagefolder(tmp_path, classes=1, per_class=1, size=8)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        load_imagefolder(root)
    assert isinstance(info.value, ImportError)
    message = info.value.message
    assert message.startswith("The ImageNet data path needs torchvision")
    assert "pip install 'maskalign[imagenet]'" in message and message.endswith(".")
    with pytest.raises(MissingDependencyError, match=r"maskalign\[imagenet\]"):
        imagenet.train_transform()


def _fake(tmp_path: Path) -> Path:
    return write_fake_imagefolder(tmp_path / "data", classes=2, per_class=1, size=8)


def test_layout_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="nowhere"):
        load_imagefolder(tmp_path / "nowhere")
    root = _fake(tmp_path)
    for path in (root / "val").rglob("*"):
        if path.is_file():
            path.rename(root / "val" / path.name)  # the flat val folder ImageNet ships
    for path in list((root / "val").iterdir()):
        if path.is_dir():
            path.rmdir()
    with pytest.raises(DataError, match="val.*holds no class folders.*valprep"):
        load_imagefolder(root)
    assert str(root / "val") in str(pytest.raises(DataError, load_imagefolder, root).value)
    for path in list((root / "val").iterdir()):
        path.unlink()
    (root / "val").rmdir()
    with pytest.raises(DataError, match="does not exist") as info:
        load_imagefolder(root)
    assert str(root / "val") in str(info.value)


def test_layout_errors_for_different_classes_and_an_empty_class(tmp_path: Path) -> None:
    root = _fake(tmp_path)
    (root / "val" / "n00000001").rename(root / "val" / "n00000009")
    with pytest.raises(DataError, match="different classes") as info:
        load_imagefolder(root)
    assert str(root / "train") in str(info.value) and "n00000009" in str(info.value)
    (root / "val" / "n00000009").rename(root / "val" / "n00000001")
    (root / "train" / "n00000001" / "n00000001_0.JPEG").unlink()
    with pytest.raises(DataError, match="without images") as info:
        load_imagefolder(root)
    assert str(root / "train") in str(info.value)


def test_topk_correct() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    assert topk_correct(logits, torch.tensor([1, 2]), ks=(1, 3)) == [1, 2]


def test_resnet50_loads_torchvision_state_dict_and_matches_it() -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    ours = ResNet50()
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_short_resnet50_training_on_the_fake_data_is_finite(root: Path) -> None:
    data = load_imagefolder(root, image_size=32)
    torch.manual_seed(0)
    model = ResNet50(num_classes=data.num_classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = train_loader(data.train, 4, seed=0, workers=0)
    losses = []
    for _, (images, labels) in zip(range(2), epoch_batches(loader, 0)):
        images, labels = to_device(images, labels, "cpu", channels_last=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    with torch.no_grad():
        images, labels = next(iter(eval_loader(data.test, 6, workers=0)))
        top1, top3 = topk_correct(model(images), labels, ks=(1, 3))
    assert 0 <= top1 <= top3 == 6  # 3 classes: the top 3 hold every label


# ------------------------------------------- ImageNet evaluation sharded over ranks
VAL_ODD = 3  # 3 classes x 3 validation images: 9, which 2 ranks split 5 + 4


def _eval_model() -> nn.Module:
    """A small conv net with BatchNorm (eval mode: its running statistics),
    seeded: the same weights on every rank."""
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, CLASSES),
    )  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _run_data(root: str) -> ImageFolderRunData:
    config = get_preset("imagenet-resnet50", data_root=root, image_size=CROP, batch_size=2)
    return ImageFolderRunData(config, torch.device("cpu"), 2)


def _scores_worker(rank: int, init_file: str, root: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        data, model = _run_data(root), _eval_model()
        seen: list[int] = []
        hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
        sharded = data.scores(model)  # a collective: each rank its share, the sums all-reduced
        hook.remove()
        alone = data.scores(model, shard=False)  # this rank alone, the whole split (no collective)
        share = list(data._test_batches_of_rank(rank, 2).loader.sampler)
        torch.save({"sharded": sharded, "alone": alone, "share": share, "seen": sum(seen)}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_evaluate_their_shares_and_return_one_process_scores(tmp_path: Path) -> None:
    """Sharded ImageNet scores (2 gloo ranks, 9 validation images: an uneven
    split) equal one process's to 1e-12 (float summation order), on both
    ranks alike, and every image is evaluated once."""
    from conftest import run_workers

    root = write_fake_imagefolder(tmp_path / "data", classes=CLASSES, per_class=2, size=SIZE, val_per_class=VAL_ODD)
    one = _run_data(str(root)).scores(_eval_model())  # no process group: one process, the whole split
    run_workers(_scores_worker, (str(tmp_path / "init"), str(root), str(tmp_path / "out")), 2)
    got = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    assert got[0]["sharded"] == got[1]["sharded"]  # the all-reduced sums: the same on every rank
    assert set(one) == {"test_loss", "test_acc", "test_top5"}
    for r in range(2):
        assert got[r]["alone"] == one  # the unsharded path on one rank is the one-process evaluation
        for key, value in one.items():
            assert got[r]["sharded"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    shares = [got[r]["share"] for r in range(2)]
    assert shares == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]  # every image once: 5 + 4 of 9
    assert [got[r]["seen"] for r in range(2)] == [5, 4]  # each rank evaluated its share only
    assert one["test_top5"] == 1.0 and one["test_acc"] * 9 == round(one["test_acc"] * 9)  # counts over 9 images
