"""What ``maskalign reproduce`` shows while it runs, and how it stops.

The command line runs as a user runs it, in a subprocess: in a
pseudo-terminal (a live progress bar that shows n/N and finishes at N/N) and
without one (short lines, no carriage returns), with per-stage lines in
``OUT/log.txt``. SIGINT or SIGTERM during a stage ends with one line naming
the stage and the count done, exit status 130, nothing half-written kept,
and a rerun that resumes to the same ``results.json`` as an uninterrupted
run. :class:`RunProgress` itself is checked on made-up plans."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from maskalign.repro import cli
from maskalign.repro.experiment import plan_stages
from maskalign.repro.presets import get_preset
from maskalign.repro.progress import RunProgress, clock, percent

# A run whose two dense stages take a few seconds each (T = 200 epochs of the
# default MLP) and everything else well under a second (k = 199: the sparse
# runs train one epoch).
SLOW_DENSE = ["--epochs", "200", "-k", "199", "--seeds", "1", "--sparsities", "0.5", "--imp-epochs", "1"]
SLOW_DENSE += ["--barrier-points", "3", "--methods", "lth", "permuted", "--threads", "1"]
# A quick run with several stages of every kind.
QUICK = ["--epochs", "3", "-k", "0", "1", "--seeds", "2", "--sparsities", "0.5", "--hidden", "24", "24"]
QUICK += ["--imp-epochs", "1", "--barrier-points", "3", "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _config(flags: list[str]):  # the ReproduceConfig the CLI builds from ``flags``
    args = cli._parser().parse_args(["reproduce", *flags])
    return get_preset("digits", **cli._overrides(args))


def _stage_count(flags: list[str]) -> int:
    return len(plan_stages(_config(flags), out=Path("/nonexistent")))


def _command(out: Path, flags: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "maskalign", "reproduce", *flags, "--out", str(out), *extra]


def _in_terminal(argv: list[str], columns: int = 120) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a pseudo-terminal of
    ``columns`` columns; its exit status and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return process.wait(timeout=120), b"".join(chunks).decode()


def _results(folder: Path) -> dict:
    """``results.json`` without its wall-clock timing."""
    results = json.loads((folder / "results.json").read_text())
    return {k: v for k, v in results.items() if k != "timing"}


# ------------------------------------------------------------ RunProgress
def _plan(total: int, reused: int = 0) -> list[dict]:
    return [
        {"stage": "sparse", "key": f"s{i}", "words": f"sparse {i}", "status": "reuse" if i < reused else "compute"}
        for i in range(total)
    ]


def test_without_a_terminal_a_long_run_prints_a_few_lines_and_ends_at_n_of_n() -> None:
    shown = io.StringIO()
    progress = RunProgress(shown, interactive=False)
    progress.start(_plan(250, reused=10))
    for i in range(10, 250):
        progress.begin("sparse", f"s{i}", f"sparse {i}")
        progress.computed("sparse", f"s{i}", f"sparse {i}", 0.01)
    progress.close()
    lines = shown.getvalue().splitlines()
    assert "\r" not in shown.getvalue()
    assert lines[0] == "250 stages: 240 to compute, 10 reused"
    assert 10 <= len(lines) <= 13, lines  # a line per tenth of the run, plus the plan and the end
    assert lines[-2].startswith("[250/250] sparse 249 done, ")
    assert re.fullmatch(r"250 stages: 240 computed, 10 reused in \d+:\d\d", lines[-1])
    counts = [int(re.match(r"\[ *(\d+)/250\]", line).group(1)) for line in lines[1:-1]]
    assert counts == sorted(counts) and counts[0] == 25


def test_a_stage_reused_twice_or_reused_after_being_computed_counts_once() -> None:
    progress = RunProgress(io.StringIO(), interactive=False)
    progress.start(_plan(3, reused=1))
    progress.reused("sparse", "s0", "sparse 0")  # planned as reused: already counted
    progress.begin("sparse", "s1", "sparse 1")
    progress.computed("sparse", "s1", "sparse 1", 0.5)
    progress.reused("sparse", "s1", "sparse 1")  # loaded again later in the run
    assert (progress.finished, progress.computed_count, progress.reused_count) == (2, 1, 1)
    assert progress.remaining_seconds() == pytest.approx(0.5)


def test_interrupted_says_where_and_how_much_is_done() -> None:
    progress = RunProgress(io.StringIO(), interactive=False)
    assert progress.interrupted() == "interrupted before any stage; rerun the same command to resume"
    progress.start(_plan(4, reused=1))
    progress.begin("sparse", "s1", "sparse seed 2 / k=5 / 99% / permuted")
    expected = "interrupted during sparse seed 2 / k=5 / 99% / permuted; rerun the same command to resume"
    assert progress.interrupted() == expected + " (1 of 4 stages done)"
    progress.computed("sparse", "s1", "sparse seed 2 / k=5 / 99% / permuted", 1.0)
    assert progress.interrupted().startswith("interrupted after sparse seed 2 / k=5 / 99% / permuted;")
    assert progress.interrupted().endswith("(2 of 4 stages done)")


def test_quiet_shows_nothing_but_keeps_count() -> None:
    shown = io.StringIO()
    progress = RunProgress(shown, interactive=False, enabled=False)
    progress.start(_plan(2))
    progress.begin("sparse", "s0", "sparse 0")
    progress.computed("sparse", "s0", "sparse 0", 0.1)
    progress.close()
    assert shown.getvalue() == "" and progress.finished == 1


@pytest.mark.parametrize(
    ("fraction", "text"), [(0.9, "90%"), (0.968, "96.8%"), (0.5, "50%"), (0.99, "99%"), (0.0, "0%")]
)
def test_percent(fraction: float, text: str) -> None:
    assert percent(fraction) == text


def test_clock() -> None:
    assert [clock(s) for s in (0, 59.6, 83.2, 3725)] == ["0:00", "1:00", "1:23", "1:02:05"]


def test_a_second_signal_exits_at_once_with_the_same_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exits: list[int] = []

    class Exited(Exception):
        pass

    def fake_exit(status: int) -> None:
        exits.append(status)
        raise Exited

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    interrupts = cli._Interrupts()
    interrupts.progress = RunProgress(io.StringIO(), interactive=False)
    interrupts.progress.start(_plan(3))
    interrupts.progress.begin("sparse", "s0", "sparse 0")
    with pytest.raises(KeyboardInterrupt):
        interrupts._handler(signal.SIGINT, None)
    assert exits == []
    with pytest.raises(Exited):  # the second one: no unwinding, straight out
        interrupts._handler(signal.SIGINT, None)
    assert exits == [130]
    interrupts.say()  # what main would print after the first: already said, not twice
    err = capsys.readouterr().err
    assert err == "maskalign: interrupted during sparse 0; rerun the same command to resume (0 of 3 stages done).\n"


def test_main_restores_the_signal_handlers() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert cli.main(["report", "/nonexistent-folder"]) == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ------------------------------------------------------ the command line
@pytest.mark.slow
def test_in_a_terminal_the_bar_counts_every_stage_up_to_n_of_n(tmp_path: Path) -> None:
    total = _stage_count(QUICK)
    status, shown = _in_terminal(_command(tmp_path, QUICK))
    assert status == 0, shown
    counts = [int(n) for n in re.findall(rf"\r(\d+)/{total} stages \|", shown)]
    assert counts and counts == sorted(counts) and counts[-1] == total, shown
    assert len(set(counts)) > total // 2  # it moves stage by stage, not in one jump
    assert f"{total} stages: {total} to compute, 0 reused" in shown
    assert f"{total} stages: {total} computed, 0 reused in " in shown
    assert "sparse seed 1 / k=1 / 50% / permuted" in shown  # the current stage, in words
    assert "[dense seed0-A] computed" not in shown  # per-stage lines go to the log, not here
    log = (tmp_path / "log.txt").read_text()
    assert log.count("] computed in ") == total

    status, shown = _in_terminal(_command(tmp_path, QUICK))  # all reused: the bar starts full
    assert status == 0
    assert f"{total} stages: 0 to compute, {total} reused" in shown
    assert set(re.findall(rf"\r(\d+)/{total} stages \|", shown)) == {str(total)}
    assert f"{total} stages: 0 computed, {total} reused in " in shown


@pytest.mark.slow
def test_without_a_terminal_the_output_is_short_lines(tmp_path: Path) -> None:
    total = _stage_count(QUICK)
    done = subprocess.run(_command(tmp_path, QUICK), capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == f"{total} stages: {total} to compute, 0 reused"
    assert lines[-2].startswith(f"[{total}/{total}] ") and lines[-1].startswith(f"{total} stages: {total} computed")
    assert len(lines) <= 13
    verbose = subprocess.run(
        _command(tmp_path / "verbose", QUICK, "--verbose"), capture_output=True, text=True, env=ENV, timeout=120
    )
    assert verbose.stderr.count("] computed in ") == total  # --verbose: the log's lines on the console too


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_command(out, SLOW_DENSE, "--quiet"), check=True, capture_output=True, env=ENV, timeout=300)
    return out


def _interrupt_during_dense_b(out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the slow run, wait until dense A is finished (its line in the
    log), then send ``sig``: dense B is being computed."""
    process = subprocess.Popen(
        _command(out, SLOW_DENSE, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    log = out / "log.txt"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "[dense seed0-A] computed" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before dense A was finished"
        time.sleep(0.02)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_stage_gives_one_line_and_a_rerun_resumes(
    uninterrupted: Path, tmp_path: Path, sig: int
) -> None:
    total = _stage_count(SLOW_DENSE)
    stopped = _interrupt_during_dense_b(tmp_path, sig)
    assert stopped.returncode == 130
    expected = (
        f"maskalign: interrupted during dense seed 0 / B; rerun the same command to resume (1 of {total} stages done)."
    )
    assert stopped.stderr == expected + "\n", stopped.stderr  # --quiet: nothing else, and no traceback
    assert not (tmp_path / "results.json").exists()
    # dense B was abandoned: no manifest, so the rerun computes it again instead of reading it half-written
    status = {(row["stage"], row["key"]): row["status"] for row in plan_stages(_config(SLOW_DENSE), out=tmp_path)}
    assert status[("dense", "seed0-A")] == "reuse" and status[("dense", "seed0-B")] == "compute"
    assert "interrupted during dense seed 0 / B" in (tmp_path / "log.txt").read_text()

    rerun = subprocess.run(_command(tmp_path, SLOW_DENSE), capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.splitlines()[0] == f"{total} stages: {total - 1} to compute, 1 reused"
    log = (tmp_path / "log.txt").read_text()
    assert log.count("[dense seed0-A] computed") == 1 and log.count("[dense seed0-B] computed") == 1
    assert _results(tmp_path) == _results(uninterrupted)
