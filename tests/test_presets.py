"""Presets: the paper's settings, overrides, validation, CLI printing."""

from __future__ import annotations

import pytest

from maskalign.repro.cli import _overrides, _parser, main
from maskalign.repro.presets import METHODS, PRESETS, ReproduceConfig, get_preset, preset_names


def test_digits_is_the_default_preset() -> None:
    assert preset_names()[0] == "digits"
    assert PRESETS["digits"] == ReproduceConfig(threads=1)  # dataclass defaults: the digits protocol


@pytest.mark.parametrize("width", [1, 4, 8, 16])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_resnet_presets_carry_the_papers_settings(dataset: str, width: int) -> None:
    config = get_preset(f"{dataset}-resnet20x{width}")
    # workshop App. A.1, Table 1 (dense/sparse training) and Table 2 (pruning)
    assert (config.dataset, config.model, config.width) == (dataset, "resnet20", width)
    assert (config.lr, config.sparse_lr, config.momentum, config.weight_decay) == (0.08, 0.02, 0.9, 5e-4)
    assert (config.batch_size, config.augment) == (128, True)
    assert (config.prune_rate, config.imp_epochs, config.imp_lr) == (0.2, 50, 0.01)
    assert config.sparsities == (0.8, 0.9, 0.95, 0.97)
    assert config.rewind_epochs == (0, 5, 10, 15, 20, 25, 50, 75, 100)  # Tables 3-4
    assert config.seeds == 3 and config.methods == METHODS


def test_vgg_preset_sweeps_rewinds_of_table_5() -> None:
    config = get_preset("cifar10-vgg11")
    assert config.model == "vgg11"
    assert config.rewind_epochs == (0, 5, 10, 15, 20, 25, 50)


def test_overrides_apply_and_validate() -> None:
    config = get_preset("cifar10-resnet20x4", epochs=3, rewind_epochs=[1, 0, 1], seeds=1)
    assert (config.epochs, config.rewind_epochs, config.seeds, config.width) == (3, (0, 1), 1, 4)
    with pytest.raises(TypeError, match="unknown setting"):
        get_preset("digits", epoch=3)
    with pytest.raises(KeyError, match="cifar10-vgg11"):
        get_preset("imagenet")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rewind_epochs": (5,), "epochs": 5},
        {"rewind_epochs": ()},
        {"sparsities": (1.0,)},
        {"seeds": 0},
        {"prune_rate": 0.0},
        {"methods": ("lth", "magic")},
        {"amp": "fp8"},
        {"barrier_points": 1},
        {"table1_sparsity": 0.5},  # not among the sparsities
        {"table1_k": 3},  # not among the rewind points
        {"match_points": "relu"},
        {"match_stream_points": "first"},
    ],
)
def test_config_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ReproduceConfig(**kwargs)


def test_table1_level_defaults_to_the_papers_sparsity_and_the_largest_k() -> None:
    assert ReproduceConfig().table1_level() == (0.9, 10)  # ICML Sec. 4.2: 90% sparsity
    assert ReproduceConfig(sparsities=(0.8, 0.5)).table1_level() == (0.5, 10)  # 0.9 absent: the smallest
    assert get_preset("cifar10-resnet20x1").table1_level() == (0.9, 100)
    config = ReproduceConfig(table1_sparsity=0.95, table1_k=2)
    assert config.table1_level() == (0.95, 2)
    assert config.replace(table1_k=None).table1_level() == (0.95, 10)


def test_list_presets_prints_every_resolved_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--list-presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"preset {name}" in out
    assert "sparse_lr = 0.02" in out and "imp_epochs = 50" in out


def test_cli_rejects_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--epochs", "2", "-k", "3", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "'rewind_epochs' (--rewind-epochs) is [3]" in err and "epochs=2" in err
    assert err.count("\n") == 1 and err.startswith("maskalign: ") and "troubleshooting/#configerror" in err


def test_matching_recipe_flags_reach_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"Setting 'match_points' \(--match-points\) is 'pots'.*'post'"):
        ReproduceConfig(match_points="pots")
    args = _parser().parse_args(["reproduce", "--match-points", "post", "--match-stream-points", "last"])
    assert _overrides(args) == {"match_points": "post", "match_stream_points": "last"}
    assert main(["reproduce", "--match-points", "both", "--out", "unused", "--seeds", "0"]) == 2
    assert "seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--match-points", "relu"])
    assert "invalid choice: 'relu'" in capsys.readouterr().err
