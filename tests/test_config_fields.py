"""The settings ``image_size`` (ImageNet's crop side) and ``match_samples``
(the training samples of activation matching): validation, the command-line
flags, the matching subset of the in-memory data sets and what the stages
record (nothing new while they are unset, so older output folders resume)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from maskalign.errors import ArgumentValueError, ConfigError
from maskalign.repro import imagenet
from maskalign.repro.cli import _overrides, _parser, main
from maskalign.repro.data import DatasetSplits
from maskalign.repro.experiment import _Run
from maskalign.repro.presets import PRESETS, ReproduceConfig, get_preset
from maskalign.repro.rundata import MATCH_BATCH, MemoryData, load_run_data
from maskalign.repro.stages import StageStore
from maskalign.repro.training import batches

N_TRAIN = 600  # three matching batches of 256, the last one partial


def _splits() -> DatasetSplits:
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(N_TRAIN, 1, 4, 4, generator=g), torch.randint(0, 3, (N_TRAIN,), generator=g))
    test = TensorDataset(torch.randn(20, 1, 4, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    return DatasetSplits(train, test, num_classes=3, in_channels=1, image_size=4, name="tiny")


def _data(match_samples: int | None = None) -> MemoryData:
    return MemoryData(_splits(), torch.device("cpu"), "fp", match_samples)


def _inputs(data: MemoryData, **kwargs: int) -> torch.Tensor:
    return torch.cat([x for x, _ in data.match_batches(**kwargs)])


# ------------------------------------------------------------ the settings
def test_both_default_to_none_and_the_imagenet_preset_keeps_the_defaults() -> None:
    assert ReproduceConfig().image_size is None and ReproduceConfig().match_samples is None
    config = get_preset("imagenet-resnet50")
    assert (config.image_size, config.match_samples) == (None, None)  # 224 and 10,000: the data path's defaults
    assert get_preset("imagenet-resnet50", image_size=160, match_samples=5000).image_size == 160
    assert ReproduceConfig(match_samples=100).match_samples == 100  # in-memory data: a subset


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"image_size": 32}, "Setting 'image_size' (--image-size) is 32 for dataset 'digits', but it applies to "
         "dataset imagenet only"),
        ({"dataset": "imagenet", "image_size": 0}, "Setting 'image_size' (--image-size) is 0; pass a positive"),
        ({"dataset": "imagenet", "image_size": 22.5}, "Setting 'image_size' (--image-size) is 22.5; pass an int"),
        ({"match_samples": 1}, "Setting 'match_samples' (--match-samples) is 1; pass at least 2"),
        ({"match_samples": True}, "Setting 'match_samples' (--match-samples) is True; pass an int"),
        ({"match_samples": "all"}, "Setting 'match_samples' (--match-samples) is 'all'; pass an int"),
    ],
)  # fmt: skip
def test_bad_values_are_config_errors_naming_the_setting_and_its_flag(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        ReproduceConfig(**kwargs)
    assert words in info.value.message


def test_the_flags_reach_the_config_and_a_bad_one_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["reproduce", "--image-size", "160", "--match-samples", "5000"])
    assert _overrides(args) == {"image_size": 160, "match_samples": 5000}
    assert main(["reproduce", "--image-size", "32", "--out", "unused"]) == 2  # digits: imagenet only
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(--image-size) is 32" in err and "imagenet only" in err, err
    help_text = _parser()._subparsers._group_actions[0].choices["reproduce"].format_help()  # type: ignore[union-attr]
    assert "--image-size PIXELS" in help_text and "--match-samples N" in help_text
    assert main(["reproduce", "--list-presets"]) == 0
    assert "match_samples = None" in capsys.readouterr().out


# ------------------------------------------------- the layout of image models
def test_image_data_runs_its_models_in_channels_last_and_records_it(tmp_path) -> None:
    data = _data()
    assert data.channels_last and data.settings() == {"memory_format": "channels_last"}
    config = ReproduceConfig(model="resnet20")
    run = _Run(config, data, torch.device("cpu"), StageStore(tmp_path), "fp", lambda _: None, None)
    assert run.ref_match(0).settings["memory_format"] == "channels_last"
    moved = run.to_device(run.build())
    weight = moved.layer1[0].conv1.weight  # 16 input channels: the two layouts differ
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    g = torch.Generator().manual_seed(0)
    flat = DatasetSplits(
        TensorDataset(torch.randn(10, 16, generator=g), torch.randint(0, 3, (10,), generator=g)),
        TensorDataset(torch.randn(4, 16, generator=g), torch.randint(0, 3, (4,), generator=g)),
        num_classes=3,
        in_channels=1,
        image_size=4,
        name="flat",
    )
    flat_data = MemoryData(flat, torch.device("cpu"), "fp")
    assert not flat_data.channels_last and flat_data.settings() == {}  # MLP runs record what they did before


# ------------------------------------------------- the in-memory matching subset
def test_unset_or_all_samples_match_on_the_whole_training_set_in_its_order() -> None:
    whole = list(batches(_splits().train, MATCH_BATCH))  # the batches matched before the setting existed
    for data in (_data(), _data(N_TRAIN)):
        got = list(data.match_batches())
        assert len(got) == len(whole) == 3 and data.match_samples == N_TRAIN
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, whole))
        assert data.settings() == {"memory_format": "channels_last"}  # no subset recorded: only the layout
        assert torch.equal(_inputs(data, samples=N_TRAIN), torch.cat([x for x, _ in whole]))


def test_a_subset_is_a_fixed_seeded_choice_in_training_set_order() -> None:
    data = _data(100)
    x, y = _splits().train.tensors
    index = imagenet.subset_indices(N_TRAIN, 100, seed=0)
    assert index == sorted(set(index)) and len(index) == 100 and index != list(range(100))
    got = list(data.match_batches())
    assert [b[0].shape[0] for b in got] == [100]
    assert torch.equal(got[0][0], x[index]) and torch.equal(got[0][1], y[index])
    assert torch.equal(_inputs(_data(100)), got[0][0])  # the same samples every time
    assert data.settings() == {"match_samples": 100, "memory_format": "channels_last"} and data.match_samples == 100
    # the argument overrides the setting: the same kind of subset, of its size
    assert torch.equal(_inputs(data, samples=300), x[imagenet.subset_indices(N_TRAIN, 300, seed=0)])
    assert torch.equal(_inputs(_data(), samples=100), got[0][0])
    assert imagenet.subset_indices(N_TRAIN, N_TRAIN) == list(range(N_TRAIN))


def test_too_many_samples_are_refused_naming_the_training_set_size() -> None:
    too_many = r"'match_samples' \(--match-samples\) is 601, but the training set holds 600"
    with pytest.raises(ConfigError, match=too_many):
        _data(601)
    config = ReproduceConfig(match_samples=601)
    with pytest.raises(ConfigError, match="holds 600 samples; pass 2 .. 600"):
        load_run_data(config, _splits(), torch.device("cpu"), 1)
    for bad in (1, 601):
        with pytest.raises(ArgumentValueError, match=f"Argument 'samples' is {bad}, but the training set holds 600"):
            _data().match_batches(samples=bad)


def test_the_stage_settings_record_a_subset_only(tmp_path) -> None:
    def settings(config: ReproduceConfig) -> dict:
        data = load_run_data(config, _splits(), torch.device("cpu"), 1)
        run = _Run(config, data, torch.device("cpu"), StageStore(tmp_path), "fp", lambda _: None, None)
        return run.ref_match(0).settings

    base = PRESETS["digits"]
    today = settings(base)
    assert "match_samples" not in today and "image_size" not in today
    assert settings(base.replace(match_samples=N_TRAIN)) == today  # all of them: the same stages
    assert settings(base.replace(match_samples=200)) == {**today, "match_samples": 200}
    assert {"dataset", "match_points", "data"} <= set(today)
