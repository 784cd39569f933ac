"""Matching benchmarks (issue 4), every ratio measured side by side in one run.

(a) ``match_activations`` time / time of the forward passes of A and B alone,
    on the same batches (target <= 1.5), for ResNet20x4 and VGG11;
(b) our one-pass activation matching vs a one-pass-per-group implementation
    like the paper's code (target >= 5x faster), for ResNet20;
(c) ``match_weights`` wall time / time spent inside the LAP solver (target <= 2);
(d) scipy ``linear_sum_assignment`` time for n = 512 ... 4096.

Run: ``python benchmarks/bench_matching.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import maskalign as ma
import maskalign.matching.weight as wm
from maskalign.matching.lap import solve_lap
from maskalign.models import VGG11, ResNet20


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Random weights with non-trivial BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def forward_only(a: nn.Module, b: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in batches:
            a(x)
            b(x)


def per_group_matching(a: nn.Module, b: nn.Module, batches: list[torch.Tensor], spec: ma.PermutationSpec) -> None:
    """The paper's pattern: one pass over the data per permutation group (each
    pass runs both models and collects only that group's activations)."""
    for group, points in spec.activations.items():
        one_group = dataclasses.replace(spec, activations={group: points})
        ma.match_activations(a, b, batches, one_group, progress=False)


def bench_activation(name: str, make: Callable[[], nn.Module], batches: list[torch.Tensor], repeats: int) -> None:
    a, b = trained_like(make(), 0), trained_like(make(), 1)
    spec = ma.build_spec(a, batches[0][:2])
    ma.match_activations(a, b, batches[:1], spec, progress=False)  # warm up: capture of the batch shape
    t_fwd = median_time(lambda: forward_only(a, b, batches), repeats)
    t_match = median_time(lambda: ma.match_activations(a, b, batches, spec, progress=False), repeats)
    print(
        f"(a) {name:<12} forward A+B {t_fwd:7.3f} s   match_activations {t_match:7.3f} s   "
        f"ratio {t_match / t_fwd:5.2f}  (target <= 1.5)"
    )


def bench_one_pass(batches: list[torch.Tensor], repeats: int) -> None:
    a, b = trained_like(ResNet20(width=1), 0), trained_like(ResNet20(width=1), 1)
    spec = ma.build_spec(a, batches[0][:2])
    ma.match_activations(a, b, batches[:1], spec, progress=False)
    t_ours = median_time(lambda: ma.match_activations(a, b, batches, spec, progress=False), repeats)
    t_paper = median_time(lambda: per_group_matching(a, b, batches, spec), repeats)
    print(
        f"(b) ResNet20     one pass {t_ours:7.3f} s   one pass per group ({len(spec.groups)} groups) "
        f"{t_paper:7.3f} s   speed-up {t_paper / t_ours:5.2f}x  (target >= 5)"
    )


def bench_weight(name: str, make: Callable[[], nn.Module], example: torch.Tensor, repeats: int) -> None:
    a, b = trained_like(make(), 0), trained_like(make(), 1)
    spec = ma.build_spec(a, example)
    lap_time = [0.0]

    def timed_lap(similarity: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = solve_lap(similarity)
        lap_time[0] += time.perf_counter() - start
        return out

    original = wm.solve_lap
    wm.solve_lap = timed_lap
    try:
        ratios, walls = [], []
        for _ in range(repeats):
            lap_time[0] = 0.0
            start = time.perf_counter()
            perm = ma.match_weights(a, b, spec, seed=0)
            wall = time.perf_counter() - start
            walls.append(wall)
            ratios.append(wall / lap_time[0])
    finally:
        wm.solve_lap = original
    print(
        f"(c) {name:<12} match_weights {statistics.median(walls):7.3f} s ({perm.report['sweeps']} sweeps)  "
        f"wall / LAP time {statistics.median(ratios):5.2f}  (target <= 2)"
    )


def bench_lap(sizes: list[int], repeats: int) -> None:
    rng = np.random.default_rng(0)
    for n in sizes:
        matrix = rng.standard_normal((n, n))
        t = median_time(lambda m=matrix: linear_sum_assignment(m, maximize=True), repeats)
        print(f"(d) LAP n={n:<5} scipy linear_sum_assignment {t:8.4f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats (smoke run)")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    n_batches, batch = (2, 16) if args.quick else (4, 64)
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    generator = torch.Generator().manual_seed(0)
    cifar = [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(n_batches)]
    bench_activation("ResNet20x4", lambda: ResNet20(width=4), cifar, repeats)
    bench_activation("VGG11", lambda: VGG11(), cifar, repeats)
    bench_one_pass(cifar, repeats)
    bench_weight("ResNet20x4", lambda: ResNet20(width=4), cifar[0][:2], repeats)
    bench_weight("VGG11", lambda: VGG11(), cifar[0][:2], repeats)
    bench_lap([512, 1024] if args.quick else [512, 1024, 2048, 4096], repeats)


if __name__ == "__main__":
    main()
