"""Step time of sparse training: dense vs ``ma.enforce_masks`` vs
``torch.nn.utils.prune``, measured side by side in one run.

One training step = zero_grad, forward, cross-entropy backward, SGD step
(momentum 0.9, Nesterov, weight decay 5e-4, the paper's optimiser). Models:
ResNet20 (width 1) on CIFAR-sized random batches (128 x 3 x 32 x 32) and an
MLP 784-1024-1024-10 (batch 128), each linear/conv weight pruned to 90 %.

* dense: no masks.
* enforce_masks: ``ma.enforce_masks(model, masks, optimizer)``: one gradient
  hook per masked parameter, a forward pre-hook and a step pre-hook that only
  check the parameters' identity and version counters (issue 12: they re-bind
  replaced parameters and re-zero weights written outside the optimiser, which
  no step of this loop does), and a step post-hook re-masking weights and
  momentum.
* prune: ``torch.nn.utils.prune.custom_from_mask`` on the same masks: a
  forward pre-hook recomputes ``weight = weight_orig * weight_mask`` every
  forward.

The variants run interleaved, in an order rotated every round (A B C, B C A,
...), so that drift of a noisy machine and position effects hit them alike; each ratio is the median over rounds of the
per-round ratio. Targets (issues 5 and 12): enforce_masks / dense <= 1.05, and
enforce_masks no slower than prune.

Usage: ``python benchmarks/bench_sparse_training.py [--device cuda]
[--rounds 7] [--steps 5] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import maskalign as ma
from maskalign.models import ResNet20
from maskalign.sparse.masks import default_prunable

SPARSITY = 0.9


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def make_stepper(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], None]:
    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return one_step


def variants(
    build: Callable[[], nn.Module], x: Tensor, y: Tensor, device: torch.device
) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base = build().to(device)
    # Per-layer magnitude pruning: global pruning of an untrained network would
    # empty whole layers (their init scales differ); the kernels see the same
    # unstructured sparsity either way.
    masks = {n: ma.global_magnitude_prune(base, SPARSITY, params=[n])[n] for n in default_prunable(base)}

    dense = copy.deepcopy(base)
    sparse = copy.deepcopy(base)
    sparse_opt = sgd(sparse)
    ma.enforce_masks(sparse, masks, sparse_opt)  # kept attached for the whole benchmark
    pruned = ma.to_prune(copy.deepcopy(base), masks)
    return {
        "dense": make_stepper(dense, sgd(dense), x, y),
        "enforce_masks": make_stepper(sparse, sparse_opt, x, y),
        "prune": make_stepper(pruned, sgd(pruned), x, y),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    steppers: dict[str, Callable[[], None]], rounds: int, steps: int, device: torch.device
) -> dict[str, list[float]]:
    for run in steppers.values():  # warm-up: allocator, optimiser state, kernels
        for _ in range(2):
            run()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no variant always runs first
            run = steppers[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {platform.platform()}, {name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"device: {device}; sparsity {SPARSITY} per layer; {args.rounds} interleaved rounds of {args.steps} steps\n")
    gen = torch.Generator().manual_seed(0)
    cases = {
        "ResNet20 (b=128, 32x32)": (lambda: ResNet20(width=1), torch.randn(128, 3, 32, 32, generator=gen)),
        "MLP 784-1024-1024-10 (b=128)": (mlp, torch.randn(128, 1, 28, 28, generator=gen)),
    }
    print("| model | dense ms/step | enforce_masks ms/step | prune ms/step | enforce/dense | enforce/prune |")
    print("|---|---|---|---|---|---|")
    for label, (build, x) in cases.items():
        x = x.to(device)
        y = torch.randint(0, 10, (x.shape[0],), generator=gen).to(device)
        times = measure(variants(build, x, y, device), args.rounds, args.steps, device)
        ratio_dense = statistics.median(e / d for e, d in zip(times["enforce_masks"], times["dense"]))
        ratio_prune = statistics.median(e / p for e, p in zip(times["enforce_masks"], times["prune"]))
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        print(
            f"| {label} | {ms['dense']:.2f} | {ms['enforce_masks']:.2f} | {ms['prune']:.2f} "
            f"| {ratio_dense:.3f} | {ratio_prune:.3f} |"
        )
    print("\ntargets: enforce/dense <= 1.05; enforce/prune <= 1.0")


if __name__ == "__main__":
    main()
