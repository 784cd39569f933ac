"""Matching at scale (issue 16): time and peak memory of ``match_activations``
on wide models, every ratio measured side by side in one run.

(a) ResNet50 (``maskalign.models.ResNet50``, 64x64 inputs, random weights,
    BatchNorm running statistics set by train-mode passes over random data):
    ``match_activations`` vs the forward passes of A and B alone on the same
    batches (target <= 1.5), medians over interleaved repeats, and the
    seconds one more match spends in statistics updates and in solves; at
    4 batches of 32 and at 16 (``--more-batches``: the solves and the
    similarities are a fixed cost per match that more data amortises),
    and from the two the cost of one more batch (the marginal ratio), the
    fixed cost per match, and the ratio they give at the 10,000 matching
    samples of the ``imagenet-resnet50`` preset;
(b) peak memory growth of ``match_activations`` on ResNet50 and on a
    GPT-2-medium-sized model (24 layers, width 1024, MLP 4096, random
    weights, 8 sequences x 64 tokens), without a budget (the default: half
    the free memory) and with ``max_memory=1 GiB`` (target: planned
    statistics and measured growth both under 1 GiB);
(c) permutation agreement of float32 batch statistics (merged in float64,
    the default for a float32 model) with float64 ones (``stats_dtype``).

Peak memory: each configuration runs in its own subprocess, which builds the
models and the spec and warms up, collects garbage and returns freed heap
memory to the system (``malloc_trim``), then resets the kernel's high-water mark
of its resident set (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0),
reads ``VmRSS``, matches, and reads ``VmHWM``: growth = VmHWM - VmRSS before.
This counts every byte the process touched (torch's CPU allocator, numpy,
scipy), unlike tracemalloc. Where clear_refs is unavailable it falls back to
``resource.getrusage`` maxrss after minus VmRSS before (which misses a peak
lower than the setup's).

Run: ``python benchmarks/bench_matching_scale.py`` (``--quick`` for a smoke run;
``--threads 1`` with ``OMP_NUM_THREADS=1`` on a shared machine, where two
threads' timings swing by several times between runs).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import maskalign as ma

GIB = 2**30


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _settle() -> None:
    """Collect garbage and return freed heap memory to the system, so that
    VmRSS before matching is the memory live then (a baseline inflated by
    freed setup memory would hide the matching's growth under it)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def resnet50_pair(batch: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Two random ResNet50s whose BatchNorm running statistics come from a few
    train-mode forward passes over random data (cumulative averages)."""
    from maskalign.models import ResNet50

    models = []
    for k in range(2):
        torch.manual_seed(seed + k)
        model = ResNet50(num_classes=100)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(batch, 3, 64, 64) * 1.5 + 0.2)
        models.append(model.eval())
    return models[0], models[1]


def resnet50_batches(batches: int, batch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 64, 64, generator=generator) for _ in range(batches)]


def gpt2_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    import transformers as tr

    config = tr.GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_inner=4096, use_cache=False)
    models = []
    for k in range(2):
        torch.manual_seed(seed + k)
        models.append(tr.GPT2LMHeadModel(config).eval())
    return models[0], models[1]


def gpt2_batches(batches: int, sequences: int, tokens: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(0, 50257, (sequences, tokens), generator=generator) for _ in range(batches)]


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, the functions interleaved per repeat."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def worker_time(args: argparse.Namespace) -> dict[str, Any]:
    a, b = resnet50_pair(args.batch_size)
    batches = resnet50_batches(args.batches, args.batch_size)
    spec = ma.build_spec(a, batches[0])
    ma.match_activations(a, b, batches[:1], spec, progress=False)  # warm up

    def forward() -> None:
        with torch.no_grad():
            for x in batches:
                a(x)
                b(x)

    times = median_times(
        {"forward": forward, "match": lambda: ma.match_activations(a, b, batches, spec, progress=False)}, args.repeats
    )
    return {"forward_s": times["forward"], "match_s": times["match"], **_breakdown(a, b, batches, spec)}


def _breakdown(a: nn.Module, b: nn.Module, batches: list[torch.Tensor], spec: ma.PermutationSpec) -> dict[str, float]:
    """Where one more (untimed above) match spends its time: the statistics
    updates (``ActivationStats.update``) and the assignment solves
    (``solve_lap`` as the matching calls it), wrapped in timers."""
    from maskalign.matching import activation, stats

    spent = {"updates_s": 0.0, "lap_s": 0.0, "lap_calls": 0.0}
    update, solve_lap = stats.ActivationStats.update, activation.solve_lap
    restricted = getattr(stats, "TieBreakStats", None)  # restricted tie-break statistics (absent before)
    originals = {} if restricted is None else {"prepare": restricted.prepare, "accumulate": restricted.accumulate}

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent["updates_s"] += time.perf_counter() - start
            return out

        return run

    def timed_update(self: stats.ActivationStats, x: torch.Tensor, y: torch.Tensor) -> None:
        start = time.perf_counter()
        update(self, x, y)
        spent["updates_s"] += time.perf_counter() - start

    def timed_solve(matrix: Any, solver: Any = "auto") -> torch.Tensor:
        start = time.perf_counter()
        out = solve_lap(matrix, solver)
        spent["lap_s"] += time.perf_counter() - start
        spent["lap_calls"] += 1
        return out

    stats.ActivationStats.update, activation.solve_lap = timed_update, timed_solve  # type: ignore[method-assign]
    for name, fn in originals.items():
        setattr(restricted, name, timed(fn))
    try:
        start = time.perf_counter()
        ma.match_activations(a, b, batches, spec, progress=False)
        spent["instrumented_s"] = time.perf_counter() - start
    finally:
        stats.ActivationStats.update, activation.solve_lap = update, solve_lap  # type: ignore[method-assign]
        for name, fn in originals.items():
            setattr(restricted, name, fn)
    return spent


def worker_memory(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "resnet50":
        a, b = resnet50_pair(args.batch_size)
        batches = resnet50_batches(args.batches, args.batch_size)
    else:
        a, b = gpt2_pair()
        batches = gpt2_batches(args.batches, args.sequences, args.tokens)
    spec = ma.build_spec(a, batches[0])
    with torch.no_grad():  # warm up the kernels outside the measurement
        a(batches[0][:1])
    budget = None if args.budget_mib is None else args.budget_mib * 2**20
    _settle()
    exact = _reset_peak()
    before_kib = _rss_kib("VmRSS")
    start = time.perf_counter()
    pi = ma.match_activations(a, b, batches, spec, progress=False, max_memory=budget)
    seconds = time.perf_counter() - start
    peak_kib = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "growth_bytes": (peak_kib - before_kib) * 1024,
        "method": "VmHWM reset" if exact else "ru_maxrss",
        "passes": pi.report["passes"],
        "stats_bytes": pi.report["stats_bytes"],
        "max_memory": pi.report["max_memory"],
        "groups": len(spec.groups),
    }


def worker_agreement(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    a, b = resnet50_pair(args.batch_size)
    batches = resnet50_batches(args.batches, args.batch_size)
    spec = ma.build_spec(a, batches[0])
    runs = {}
    for dtype in (torch.float32, torch.float64):
        start = time.perf_counter()
        runs[dtype] = ma.match_activations(a, b, batches, spec, progress=False, stats_dtype=dtype)
        out[f"{str(dtype)[6:]}_s"] = time.perf_counter() - start
    units = sum(spec.groups[g].size for g in spec.groups)
    same = sum(int((runs[torch.float32][g] == runs[torch.float64][g]).sum()) for g in spec.groups)
    groups_same = sum(torch.equal(runs[torch.float32][g], runs[torch.float64][g]) for g in spec.groups)
    after = [
        abs(runs[torch.float32].report["groups"][g]["after"] - v["after"])
        for g, v in runs[torch.float64].report["groups"].items()
    ]
    out.update(agreement=same / units, units=units, groups_same=groups_same, groups=len(spec.groups))
    out["max_after_diff"] = max(after)
    return out


WORKERS = {"time": worker_time, "memory": worker_memory, "agreement": worker_agreement}


def run_worker(kind: str, options: list[str], threads: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", kind, "--threads", str(threads), *options]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {kind} {options} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(count: float) -> str:
    return f"{count / 2**20:8.0f} MiB"


def _print_marginal(timed: dict[int, dict[str, Any]], batch_size: int) -> None:
    """From the two batch counts of (a): what one more batch costs (the
    marginal ratio: extra match time over extra forward time), the fixed cost
    of a match (solves, similarities), and the ratio that these give at the
    ``imagenet-resnet50`` preset's 10,000 matching samples."""
    few, many = sorted(timed)
    d_match = (timed[many]["match_s"] - timed[few]["match_s"]) / (many - few)
    d_forward = (timed[many]["forward_s"] - timed[few]["forward_s"]) / (many - few)
    fixed = timed[few]["match_s"] - few * d_match
    batches = -(-10_000 // batch_size)
    at_preset = (fixed + batches * d_match) / (batches * d_forward)
    print(
        f"(a) per batch of {batch_size} (from {few} and {many}): forward A+B {d_forward:.3f} s, match {d_match:.3f} s, "
        f"marginal ratio {d_match / d_forward:.2f}; fixed per match {fixed:.2f} s; at 10,000 samples "
        f"({batches} batches) the ratio would be {at_preset:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats, GPT-2 skipped (smoke run)")
    parser.add_argument("--batches", type=int, default=None, help="ResNet50 batches (default 4; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="ResNet50 batch size (default 32; 8 quick)")
    parser.add_argument(
        "--more-batches", type=int, default=16, help="a second ResNet50 timing with this many batches (0: none)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3; 1 quick)")
    parser.add_argument("--budget-mib", type=int, default=1024, help="max_memory of the budgeted GPT-2 run (MiB)")
    parser.add_argument("--skip-gpt2", action="store_true", help="leave out the GPT-2-medium runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="resnet50", help=argparse.SUPPRESS)
    parser.add_argument("--sequences", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--gpt2-batches", type=int, default=1, help="GPT-2 batches of 8 x 64 tokens (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        args.budget_mib = None if args.budget_mib <= 0 else args.budget_mib
        print(json.dumps(WORKERS[args.worker](args)))
        return
    batches = args.batches or (2 if args.quick else 4)
    batch_size = args.batch_size or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{args.threads} torch threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    common = ["--batches", str(batches), "--batch-size", str(batch_size), "--repeats", str(repeats)]
    counts = [batches] + ([args.more_batches] if args.more_batches and not args.quick else [])
    timed: dict[int, dict[str, Any]] = {}
    for count in counts:
        options = ["--batches", str(count), *common[2:]]
        got = timed[count] = run_worker("time", options, args.threads)
        print(
            f"(a) ResNet50 {count}x{batch_size} at 64x64  forward A+B {got['forward_s']:7.2f} s   "
            f"match_activations {got['match_s']:7.2f} s   ratio {got['match_s'] / got['forward_s']:5.2f}  "
            "(target <= 1.5)"
        )
        print(
            f"(a) one more match, instrumented: {got['instrumented_s']:.2f} s, of which statistics updates "
            f"{got['updates_s']:.2f} s, {got['lap_calls']:.0f} assignment solves {got['lap_s']:.2f} s"
        )
    if len(timed) == 2:
        _print_marginal(timed, batch_size)
    configs = [("ResNet50", ["--model", "resnet50", "--budget-mib", "0", *common])]
    if not args.skip_gpt2 and not args.quick:
        gpt = ["--model", "gpt2", "--batches", str(args.gpt2_batches)]
        configs += [
            ("GPT-2-medium", [*gpt, "--budget-mib", "0"]),
            (f"GPT-2-medium, max_memory={args.budget_mib} MiB", [*gpt, "--budget-mib", str(args.budget_mib)]),
        ]
    print(f"(b) {'configuration':<36} {'passes':>6} {'planned':>12} {'measured growth':>16} {'budget':>12} {'time':>8}")
    for name, options in configs:
        got = run_worker("memory", options, args.threads)
        print(
            f"(b) {name:<36} {got['passes']:>6} {_mib(got['stats_bytes']):>12} {_mib(got['growth_bytes']):>16} "
            f"{_mib(got['max_memory']):>12} {got['seconds']:7.1f}s  ({got['method']}, {got['groups']} groups)"
        )
    got = run_worker("agreement", common, args.threads)
    print(
        f"(c) ResNet50 float32 vs float64 batch statistics: {got['agreement']:.4%} of {got['units']} units matched "
        f"alike, {got['groups_same']}/{got['groups']} groups identical, largest |after| difference "
        f"{got['max_after_diff']:.1e}; time {got['float32_s']:.1f} s vs {got['float64_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
