"""What ``maskalign reproduce`` shows while it runs: one progress display for
the whole run.

:func:`~maskalign.repro.experiment.reproduce` tells a :class:`StageObserver`
about every stage instance: the plan at the start (:meth:`~StageObserver.start`),
each stage it reuses from the output folder, each one it begins and finishes
computing, and notes within a stage (IMP's rounds). :class:`RunProgress` is
the command line's observer:

* on a terminal, one tqdm bar: ``37/250 stages``, the current stage in words,
  elapsed time and an estimate of what remains (from the computed stages
  only: reused ones take no time);
* without one (CI, ``nohup``, a pipe) or without tqdm, a short line-based
  log: the plan, one line per tenth of the run, and the end.

Both end with ``250 stages: 240 computed, 10 reused in 1:47``. The observer
also knows, at any moment, what an interruption should say
(:meth:`RunProgress.interrupted`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol, TextIO

__all__ = ["RunProgress", "StageObserver", "percent"]


def percent(fraction: float) -> str:
    """A sparsity (a fraction) in percent, as every display and plot writes
    it: ``0.9`` -> ``"90%"``, ``0.968`` -> ``"96.8%"``."""
    return f"{100 * fraction:.4g}%"


def clock(seconds: float) -> str:
    """``83.2`` -> ``"1:23"``, ``3725`` -> ``"1:02:05"``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StageObserver(Protocol):
    """What :func:`~maskalign.repro.experiment.reproduce` tells about its
    stages. ``stage`` is one of :data:`~maskalign.repro.experiment.STAGES`,
    ``key`` the instance's folder under ``OUT/stages/<stage>`` and ``words``
    its name in words (``sparse seed 2 / k=5 / 99% / permuted``)."""

    def start(self, plan: Sequence[dict[str, Any]]) -> None:
        """The run's plan, before any stage: the rows of
        :func:`~maskalign.repro.experiment.plan_stages`."""

    def reused(self, stage: str, key: str, words: str) -> None:
        """A stage loaded from the output folder (may repeat for one instance)."""

    def begin(self, stage: str, key: str, words: str) -> None:
        """A stage starts computing."""

    def note(self, text: str) -> None:
        """Progress within the current stage, e.g. ``round 3 of 14``."""

    def computed(self, stage: str, key: str, words: str, seconds: float) -> None:
        """A stage finished computing after ``seconds`` (wall clock)."""


class RunProgress:
    """The progress display of ``maskalign reproduce`` (a :class:`StageObserver`).

    Args:
        stream: where the display goes (the console's ``sys.stderr`` by default).
        interactive: a live tqdm bar (``True``) or short lines (``False``);
            default: a bar when ``stream`` is a terminal and tqdm is installed.
        enabled: ``False`` shows nothing (``--quiet``); the counts are kept
            for :meth:`interrupted`.

    Example:
        >>> import io
        >>> shown = io.StringIO()
        >>> progress = RunProgress(shown, interactive=False)
        >>> progress.start([{"stage": "dense", "key": "seed0-A", "words": "dense seed 0 / A", "status": "compute"}])
        >>> progress.begin("dense", "seed0-A", "dense seed 0 / A")
        >>> progress.interrupted()
        'interrupted during dense seed 0 / A; rerun the same command to resume (0 of 1 stages done)'
    """

    #: Lines without a terminal: one per this fraction of the run.
    STEP = 0.1

    def __init__(self, stream: TextIO | None = None, *, interactive: bool | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            interactive = _isatty(self.stream) and _has_tqdm()
        self.interactive = interactive and enabled
        self.enabled = enabled
        self.total = 0
        self.done: set[tuple[str, str]] = set()
        self.computed_count = 0
        self.reused_count = 0
        self.current: str | None = None
        self.last: str | None = None
        self.began = time.perf_counter()
        self._compute_seconds = 0.0
        self._next_line = 0
        self._bar: Any = None

    # ------------------------------------------------------------- counts
    @property
    def finished(self) -> int:
        """Stage instances done: reused or computed."""
        return len(self.done)

    def remaining_seconds(self) -> float | None:
        """Estimated seconds left: the mean time of the stages computed so
        far times the stages still to do; ``None`` before the first."""
        if not self.computed_count:
            return None
        return self._compute_seconds / self.computed_count * max(self.total - self.finished, 0)

    def interrupted(self) -> str:
        """What an interruption now should say, in one line."""
        if self.current:
            where = f"during {self.current}"
        else:
            where = f"after {self.last}" if self.last else "before any stage"
        done = f" ({self.finished} of {self.total} stages done)" if self.total else ""
        return f"interrupted {where}; rerun the same command to resume{done}"

    def summary(self) -> str:
        """``250 stages: 240 computed, 10 reused in 1:47``."""
        elapsed = clock(time.perf_counter() - self.began)
        return f"{self.total} stages: {self.computed_count} computed, {self.reused_count} reused in {elapsed}"

    # ------------------------------------------------------ StageObserver
    def start(self, plan: Sequence[dict[str, Any]]) -> None:
        """The plan: total count and the stages already finished (counted as reused)."""
        self.began = time.perf_counter()
        self.total = len(plan)
        reused = {(row["stage"], row["key"]) for row in plan if row["status"] == "reuse"}
        self.done |= reused
        self.reused_count = len(reused)
        self._next_line = self._step(self.finished)
        head = f"{self.total} stages: {self.total - self.reused_count} to compute, {self.reused_count} reused"
        self._write(head)
        if self.interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=self.finished,
                file=self.stream,
                unit="stage",
                dynamic_ncols=True,
                bar_format="{n}/{total} stages |{bar:16}| {elapsed}<{remaining}  {desc}",
            )

    def reused(self, stage: str, key: str, words: str) -> None:
        """A stage loaded from the output folder: counted once, as reused."""
        if (stage, key) not in self.done:
            self.done.add((stage, key))
            self.reused_count += 1
            self.last = words
            self._advance()

    def begin(self, stage: str, key: str, words: str) -> None:
        """The current stage, shown in words."""
        self.current = words
        if self._bar is not None:
            self._bar.set_description_str(words, refresh=True)

    def note(self, text: str) -> None:
        """Progress within the current stage, shown after its name."""
        if self._bar is not None and self.current:
            self._bar.set_description_str(f"{self.current}, {text}", refresh=True)

    def computed(self, stage: str, key: str, words: str, seconds: float) -> None:
        """A computed stage: counted, and its time feeds the estimate."""
        self.current, self.last = None, words
        self._compute_seconds += seconds
        if (stage, key) not in self.done:
            self.done.add((stage, key))
            self.computed_count += 1
            self._advance()

    def close(self) -> None:
        """End the display with :meth:`summary` (the bar, when there is one, stays)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.total:
            self._write(self.summary())

    def abandon(self) -> None:
        """End the display without a summary (the run was interrupted)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def write(self, line: str) -> None:
        """One line on the display's stream, above the bar when there is one."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    # ------------------------------------------------------------ helpers
    def _step(self, finished: int) -> int:
        """The next count at which the line-based display prints."""
        step = max(1, round(self.total * self.STEP))
        return (finished // step + 1) * step

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar.n = self.finished
            self._bar.set_description_str(self.current or "", refresh=False)
            self._bar.refresh()
            return
        if self.finished >= self._next_line or self.finished == self.total:
            self._next_line = self._step(self.finished)
            left = self.remaining_seconds()
            eta = f", about {clock(left)} left" if left is not None and self.finished < self.total else ""
            width = len(str(self.total))
            self._write(
                f"[{self.finished:>{width}}/{self.total}] {self.last} done, "
                f"{clock(time.perf_counter() - self.began)} elapsed{eta}"
            )

    def _write(self, line: str) -> None:
        if self.enabled:
            self.write(line)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True
