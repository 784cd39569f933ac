"""The ``maskalign`` command line as a user meets it: ``--version``, help in
plain words, ``reproduce --dry-run`` (which stages would be computed and which
reused, writing nothing), one ``maskalign: ...`` line per error (never a
traceback, even for a chained error), and missing optional dependencies said
at the start of a run."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import maskalign
from maskalign.errors import DOCS_URL, MaskAlignError
from maskalign.repro import cli
from maskalign.repro.cli import main
from maskalign.repro.experiment import plan_stages, reproduce
from maskalign.repro.presets import ReproduceConfig

# tests/test_resume.py's tiny run with one seed, as flags and as a config
TINY = ["--epochs", "3", "-k", "0", "1", "--seeds", "1", "--sparsities", "0.5", "--hidden", "24", "24"]
TINY += ["--imp-epochs", "1", "--barrier-points", "3", "--threads", "1"]
CONFIG = ReproduceConfig(
    epochs=3,
    rewind_epochs=(0, 1),
    seeds=1,
    sparsities=(0.5,),
    hidden=(24, 24),
    imp_epochs=1,
    barrier_points=3,
    threads=1,
)
PIP = "pip install 'maskalign[demo]'"
CLI_LINK = f"{DOCS_URL}/troubleshooting/#command-line"


def _reproduce(out: Path, *flags: str) -> list[str]:
    return ["reproduce", *TINY, "--out", str(out), "--quiet", *flags]


def _files(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (``None``) under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _listed(out: str) -> dict[str, str]:
    """``{"stage/key": "reuse" | "compute"}`` from a dry run's listing."""
    rows = [line.split() for line in out.splitlines() if line.startswith(("  reuse ", "  compute "))]
    return {row[1]: row[0] for row in rows}


def _assert_one_line(err: str, link: str = CLI_LINK) -> None:
    assert err.count("\n") == 1 and err.startswith("maskalign: "), err
    assert err.rstrip().endswith(link), err
    assert "Traceback" not in err


# ------------------------------------------------------------------ version
def test_version_prints_name_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--version", "-V"):
        with pytest.raises(SystemExit) as info:
            main([flag])
        assert info.value.code == 0
        assert capsys.readouterr().out == f"maskalign {maskalign.__version__}\n"


@pytest.mark.slow
def test_installed_console_script_prints_the_version() -> None:
    script = Path(sys.executable).with_name("maskalign")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "maskalign.repro.cli"]
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"maskalign {maskalign.__version__}\n"


# --------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [[], ["reproduce"], ["report"]], ids=lambda c: " ".join(["maskalign", *c]))
def test_help_is_plain_words(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: maskalign")
    for markup in ("``", ":func:", ":class:", ":mod:", ":data:", ":meth:", "::"):
        assert markup not in text, f"{markup!r} in the help of maskalign {' '.join(command)}"
    if not command:
        assert "reproduce" in text and "report" in text and "--version" in text
    if command == ["reproduce"]:
        assert "--dry-run" in text and "digits" in text


def test_every_flag_says_what_it_does() -> None:
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in {"": parser, **subparsers}.items():
        for action in sub._actions:
            if action.dest != "command":
                assert action.help, f"maskalign {name} {action.option_strings or action.dest} has no help"


# ------------------------------------------------------------------ dry run
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a finished tiny run through the command line."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(_reproduce(out)) == 0
    return out


@pytest.mark.slow
def test_dry_run_of_a_fresh_folder_computes_everything_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fresh"
    assert main(_reproduce(out, "--dry-run")) == 0
    printed = capsys.readouterr()
    listed = _listed(printed.out)
    # per seed: dense A and B, imp, match, 2 k x 4 methods sparse runs, lmc; then diversity
    assert len(listed) == 14 and set(listed.values()) == {"compute"}
    assert list(listed)[:4] == ["dense/seed0-A", "dense/seed0-B", "imp/seed0", "match/seed0"]
    assert printed.out.rstrip().endswith("14 stages: 14 to compute, 0 reused")
    assert "does not exist" in printed.out
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert printed.err == ""


@pytest.mark.slow
def test_dry_run_after_a_run_reuses_every_stage_and_writes_nothing(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _files(finished)
    manifests = {str(p.parent.relative_to(finished / "stages")) for p in (finished / "stages").rglob("manifest.json")}
    capsys.readouterr()
    assert main(_reproduce(finished, "--dry-run")) == 0
    out = capsys.readouterr().out
    listed = _listed(out)
    assert set(listed) == manifests and set(listed.values()) == {"reuse"}
    assert out.rstrip().endswith(f"{len(manifests)} stages: 0 to compute, {len(manifests)} reused")
    assert _files(finished) == before  # byte for byte, and no new file or folder
    # --restart would discard them all; still nothing is written
    assert main(_reproduce(finished, "--dry-run", "--restart")) == 0
    assert set(_listed(capsys.readouterr().out).values()) == {"compute"}
    assert _files(finished) == before


@pytest.mark.slow
def test_dry_run_with_a_changed_setting_lists_exactly_what_the_run_recomputes(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _files(finished)
    capsys.readouterr()
    assert main(_reproduce(finished, "--dry-run", "--sparse-lr", "0.02")) == 0
    out = capsys.readouterr().out
    listed = _listed(out)
    to_compute = {name for name, status in listed.items() if status == "compute"}
    assert to_compute == {n for n in listed if n.startswith("sparse/")} | {"lmc/seed0", "diversity/all"}
    assert {"dense/seed0-A", "dense/seed0-B", "imp/seed0", "match/seed0"} <= set(listed) - to_compute
    assert out.rstrip().splitlines()[-3] == "14 stages: 10 to compute, 4 reused"
    assert "without --force the run stops" in out and "sparse_lr: 0.05 -> 0.02" in out
    assert _files(finished) == before
    # with --force it only lists them
    assert main(_reproduce(finished, "--dry-run", "--sparse-lr", "0.02", "--force")) == 0
    forced = capsys.readouterr().out
    assert _listed(forced) == listed and forced.rstrip().endswith("14 stages: 10 to compute, 4 reused")
    # and the real run with --force recomputes exactly those stages
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    computed: list[str] = []
    reproduce(
        CONFIG.replace(sparse_lr=0.02),
        out=copy,
        force=True,
        on_stage_end=lambda stage, key: computed.append(f"{stage}/{key}") if stage != "imp-round" else None,
    )
    assert set(computed) == to_compute


@pytest.mark.slow
def test_the_plan_follows_the_run_stage_by_stage(tmp_path: Path) -> None:
    """Two seeds, so the shared-mask stages are planned too: a fresh run
    computes the planned stages in the planned order, and afterwards the
    plan reuses every one of them."""
    config = CONFIG.replace(seeds=2, rewind_epochs=(1,), methods=("lth", "naive", "permuted"))
    planned = plan_stages(config, out=tmp_path)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []
    assert {row["status"] for row in planned} == {"compute"}
    computed: list[tuple[str, str]] = []
    reproduce(config, out=tmp_path, on_stage_end=lambda stage, key: computed.append((stage, key)))
    assert [(row["stage"], row["key"]) for row in planned] == [c for c in computed if c[0] != "imp-round"]
    assert {"shared-match", "shared-sparse", "shared-diversity"} <= {row["stage"] for row in planned}
    assert {row["status"] for row in plan_stages(config, out=tmp_path)} == {"reuse"}


# ------------------------------------------------------------------- errors
def _error_classes() -> list[type[MaskAlignError]]:
    """MaskAlignError and every subclass defined in maskalign."""
    for module in pkgutil.walk_packages(maskalign.__path__, "maskalign."):
        importlib.import_module(module.name)
    found, todo = [], [MaskAlignError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("maskalign"):
            found.append(cls)
        todo += cls.__subclasses__()
    return sorted(set(found), key=lambda c: c.__name__)


@pytest.mark.parametrize("error", _error_classes(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_every_maskalign_error_is_one_line_even_with_a_cause(
    error: type[MaskAlignError],
    dry_run: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        try:
            raise RuntimeError("deep internal detail")
        except RuntimeError as cause:
            raise error("Setting 'x' is wrong;\nset it right.") from cause

    monkeypatch.setattr(cli, "plan_stages" if dry_run else "reproduce", fail)
    assert main(_reproduce(tmp_path / "out", *(["--dry-run"] if dry_run else []))) == 2
    err = capsys.readouterr().err
    _assert_one_line(err, error("").docs_link)
    assert "Setting 'x' is wrong; set it right." in err and "deep internal detail" not in err


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        (["reproduce", "--preset", "digit"], "invalid choice: 'digit'"),  # a bad preset
        (["reproduce", "--seeds", "abc"], "--seeds: invalid int value: 'abc'"),  # a bad flag value
        (["reproduce", "--methods", "ltx"], "--methods: invalid choice"),
        (["reproduce", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], culprit: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    _assert_one_line(err)
    assert culprit in err


def test_usual_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a report of a folder that holds no run
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    _assert_one_line(err)
    assert "results.json is missing" in err and "maskalign reproduce --out" in err
    # a setting out of range, through the run and the dry run
    for flags in ([], ["--dry-run"]):
        assert main([*_reproduce(tmp_path / "out", *flags), "--sparsities", "90"]) == 2
        err = capsys.readouterr().err
        _assert_one_line(err, f"{DOCS_URL}/troubleshooting/#configerror")
        assert "--sparsities" in err and "pass 0.9" in err
    assert not (tmp_path / "out").exists()
    # an output folder that is a file
    (tmp_path / "a-file").write_text("mine")
    for flags in ([], ["--dry-run"]):
        assert main(_reproduce(tmp_path / "a-file", *flags)) == 2
        err = capsys.readouterr().err
        _assert_one_line(err)
        assert "a-file is not a folder" in err
    assert (tmp_path / "a-file").read_text() == "mine"


# ------------------------------------------------------ optional dependencies
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_missing_scikit_learn_is_said_before_any_stage_runs(
    dry_run: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    ran: list[object] = []
    monkeypatch.setattr(cli, "reproduce", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(cli, "plan_stages", lambda *a, **k: ran.append(a))
    out = tmp_path / "out"
    assert main(_reproduce(out, *(["--dry-run"] if dry_run else []))) == 2
    printed = capsys.readouterr()
    _assert_one_line(printed.err)
    assert "The digits data set needs scikit-learn" in printed.err and PIP in printed.err
    assert ran == [] and not out.exists() and printed.out == ""


def test_missing_scikit_learn_does_not_matter_for_cifar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from maskalign.repro.data import write_fake_cifar

    write_fake_cifar(tmp_path / "data", n_train=8, n_test=8)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    argv = ["reproduce", "--preset", "cifar10-resnet20x1", "--data-root", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr()
    assert "scikit-learn" not in printed.err and "to compute" in printed.out


def _block_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every import of matplotlib fail, as if it were not installed."""
    real_import = __import__

    def without_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", without_matplotlib)


@pytest.mark.slow
def test_missing_matplotlib_is_said_at_the_start_and_the_run_goes_on(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for png in out.glob("*.png"):
        png.unlink()
    _block_matplotlib(monkeypatch)
    capsys.readouterr()
    assert main(["reproduce", *TINY, "--out", str(out)]) == 0  # every stage reused; not --quiet
    printed = capsys.readouterr()
    first = printed.err.splitlines()[0]
    assert first.startswith("maskalign: The plots need matplotlib, which is not installed; the run goes on")
    assert PIP in first and "maskalign report DIR" in first
    assert "Traceback" not in printed.err
    assert (out / "results.md").is_file() and list(out.glob("*.png")) == []
    assert "Finished in" in printed.out and "Figures: none (matplotlib is not installed)." in printed.out
    # `maskalign report` says it too
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err.startswith("maskalign: The plots need matplotlib") and printed.err.count("\n") == 1
    assert list(out.glob("*.png")) == []


def test_missing_matplotlib_is_said_by_the_dry_run_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _block_matplotlib(monkeypatch)
    assert main(_reproduce(tmp_path / "out", "--dry-run")) == 0
    printed = capsys.readouterr()
    assert printed.err.count("\n") == 1 and "The plots need matplotlib" in printed.err and PIP in printed.err


def test_no_word_about_dependencies_when_they_are_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert main(_reproduce(tmp_path / "out", "--dry-run")) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # a subprocess
def test_a_reader_that_goes_away_stops_the_output_quietly() -> None:
    """`maskalign ... | head -1`: no error line about a broken pipe, status 141 (128 + SIGPIPE)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "maskalign", "reproduce", "--list-presets"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()  # as `head -1` does after its line
    err = process.stderr.read().decode()
    assert first.startswith(b"preset digits") and process.wait(timeout=60) == 141 and err == ""
