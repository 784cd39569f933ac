"""No process-wide side effects of build_spec (issue 14).

While ``build_spec`` runs, on a model whose export fails (the ``TraceError``
path, where torch prints the partial graph) and on one that succeeds, another
thread of the program must see nothing change: every line it writes to
``sys.stderr`` or logs through its own logger reaches the real stream at once
and in order, and ``torch.get_num_threads()`` read from it stays what it was.

Each model's forward waits for the other thread to act (write lines, read the
thread count) while it runs, so the other thread certainly acts inside the
export and inside the eager check, not only before or after them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

import maskalign as ma


def build(which: str, sync: Callable[[Tensor], None]) -> None:
    """``build_spec`` of a model whose export fails on a data-dependent branch
    (``which="fails"``: a ``TraceError``) or of one that captures
    (``"captures"``); both models call ``sync(x)`` first thing in forward."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            sync(x)
            h = self.fc(x)
            return h if h.mean() > 0 else -h

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.fc2 = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            sync(x)
            return self.fc2(torch.relu(self.fc1(x)))

    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if which == "fails":
        with pytest.raises(ma.TraceError, match="torch.cond"):
            ma.build_spec(Branchy().double(), x)
    else:
        assert ma.build_spec(Plain().double(), x).groups


class Writer(threading.Thread):
    """Writes numbered lines until stopped, each one to ``sys.stderr`` (looked
    up at every write, as ``print(file=sys.stderr)`` does) and then through
    its own logger (a handler on the stream ``sys.stderr`` was at the start)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.logger = logging.getLogger("test_side_effects.writer")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(self.handler)
        self.count = 0
        self.changed = threading.Condition()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            sys.stderr.write(f"writer stderr {self.count}\n")
            sys.stderr.flush()
            self.logger.info("writer log %d", self.count)
            with self.changed:
                self.count += 1
                self.changed.notify_all()
            time.sleep(0.001)

    def wait_for_lines(self, n: int = 3) -> None:
        """Block until the writer wrote ``n`` more lines of each kind."""
        with self.changed:
            target = self.count + n
            assert self.changed.wait_for(lambda: self.count >= target, timeout=30), "writer thread stalled"

    def expected(self) -> list[str]:
        return [line for i in range(self.count) for line in (f"writer stderr {i}", f"writer log {i}")]

    @contextlib.contextmanager
    def running(self) -> Iterator[Writer]:
        self.start()
        try:
            yield self
        finally:
            self.done.set()
            self.join(timeout=30)
            self.logger.removeHandler(self.handler)


@pytest.mark.parametrize("which", ["fails", "captures"])
def test_another_threads_stderr_and_logging_arrive_in_order(which: str, capfd: pytest.CaptureFixture[str]) -> None:
    writer = Writer()
    during: list[int] = []  # the writer's count each time forward ran

    def sync(x: Tensor) -> None:
        writer.wait_for_lines()
        during.append(writer.count)

    with writer.running():
        writer.wait_for_lines()
        build(which, sync)
        writer.wait_for_lines()
    assert during, "forward never ran"
    err = capfd.readouterr().err
    got = [line for line in err.splitlines() if line.startswith("writer ")]
    assert got == writer.expected()
    assert writer.count > max(during)  # lines written after build_spec are there too
    assert "def forward" not in err  # torch's partial graph of the failed trace stays quiet


@pytest.mark.parametrize("which", ["fails", "captures"])
def test_thread_count_seen_from_another_thread_never_changes(which: str) -> None:
    """``torch.get_num_threads()`` is per thread under OpenMP (each thread's
    own count, taken from the last ``torch.set_num_threads`` of any thread
    when it first asks): read from a thread that was already running, and
    from a thread started while forward runs (inside export and inside the
    eager check), then read again from that one after build_spec."""
    before = torch.get_num_threads()
    threads = 2 if before == 1 else before  # one that a set_num_threads(1) inside build_spec would change
    torch.set_num_threads(threads)
    started: list[ThreadPoolExecutor] = []  # one thread started in each forward call
    try:
        polled: list[int] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                polled.append(torch.get_num_threads())
                time.sleep(0.0005)

        in_forward: list[tuple[bool, int, int]] = []  # (on fake tensors, running thread's, new thread's count)
        with ThreadPoolExecutor(max_workers=1) as running:
            assert running.submit(torch.get_num_threads).result(timeout=30) == threads

            def sync(x: Tensor) -> None:
                started.append(ThreadPoolExecutor(max_workers=1))
                counts = (running.submit(torch.get_num_threads), started[-1].submit(torch.get_num_threads))
                in_forward.append((is_fake(x), *(c.result(timeout=30) for c in counts)))

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            try:
                build(which, sync)
            finally:
                stop.set()
                poller.join(timeout=30)
        # forward ran in export's trace, and (when it captures) eagerly in the check
        assert {fake for fake, _, _ in in_forward} == ({True} if which == "fails" else {True, False})
        assert [counts for _, *counts in in_forward] == [[threads, threads]] * len(in_forward)
        assert [pool.submit(torch.get_num_threads).result(timeout=30) for pool in started] == [threads] * len(started)
        assert polled and set(polled) == {threads}
        assert torch.get_num_threads() == threads
    finally:
        for pool in started:
            pool.shutdown()
        torch.set_num_threads(before)


def test_torch_export_module_is_left_as_it_was() -> None:
    """build_spec routes torch's partial-graph print by standing in for
    ``print`` in torch's export module while it exports; afterwards (and after
    every earlier test) the module is as torch made it: no ``print`` of its own."""
    trace = importlib.import_module("torch.export._trace")
    assert "print" not in vars(trace)
    for which in ("fails", "captures"):
        build(which, lambda x: None)
        assert "print" not in vars(trace)


def test_only_the_exporting_thread_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    """While build_spec exports, a print of torch's export module (how it
    prints a partial graph) made by another thread reaches stderr; torch.export
    itself cannot run in two threads at once (module-level state), so the
    other thread calls that module's ``print`` as torch would."""
    trace = importlib.import_module("torch.export._trace")
    printed: list[bool] = []  # whether torch's module had its print replaced at that moment
    with ThreadPoolExecutor(max_workers=1) as other:

        def torch_print() -> None:
            printed.append("print" in vars(trace))
            vars(trace).get("print", print)("partial graph of another thread", file=sys.stderr)

        def sync(x: Tensor) -> None:
            if is_fake(x):  # inside build_spec's export
                other.submit(torch_print).result(timeout=30)

        build("captures", sync)
        build("fails", sync)
    assert printed and all(printed)  # the routing was in place: the test exercises it
    assert capfd.readouterr().err.splitlines().count("partial graph of another thread") == len(printed)
