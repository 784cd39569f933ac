"""Overhead of data-parallel training (issue 16): one dense training stage of
``maskalign reproduce`` (the ``digits`` preset's MLP 64-128-128-10, batch 64,
SGD with the cosine schedule, :func:`maskalign.repro.training.train`) on 1
process and on N gloo processes, each with one CPU thread, side by side in
one run.

On a machine with few cores this measures the cost of
``DistributedDataParallel`` (an all-reduce of the gradient per step, the
per-epoch loss all-reduce, the share of each global batch), not a speed-up:
the model is tiny, so a step is mostly overhead. On GPUs with a real model
each rank computes ``1/N`` of every batch instead.

The two variants run interleaved (1 process, N processes, 1, N, ...), each
in fresh forked processes; a run is timed on rank 0 between two barriers
around :func:`train`, excluding start-up and data loading. Reported: the
median over rounds of steps per second for each, and of the per-round ratio
(N-process time / 1-process time).

Usage: ``python benchmarks/bench_distributed.py [--processes 2] [--rounds 5]
[--epochs 5]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maskalign.models import MLP
from maskalign.repro.data import load_digits
from maskalign.repro.training import TrainConfig, train


def _worker(rank: int, world: int, init_file: str, out_file: str, epochs: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        splits = load_digits()
        torch.manual_seed(0)
        model = MLP(in_features=64, hidden=(128, 128), num_classes=10)
        config = TrainConfig(epochs=epochs, lr=0.05, batch_size=64)
        if world > 1:
            dist.barrier()
        began = time.perf_counter()
        train(model, splits.train, config, generator=torch.Generator().manual_seed(1), distributed=True)
        if world > 1:
            dist.barrier()
        seconds = time.perf_counter() - began
        if rank == 0:
            steps = epochs * -(-len(splits.train) // config.batch_size)
            Path(out_file).write_text(f"{seconds} {steps}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def _time(world: int, epochs: int) -> tuple[float, int]:
    """Seconds and steps of one training run on ``world`` processes."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "time")
        args = (world, os.path.join(folder, "init"), out, epochs)
        mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method="fork")
        seconds, steps = Path(out).read_text().split()
    return float(seconds), int(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"digits MLP 64-128-128-10, batch 64 (global), {args.epochs} epochs, 1 thread per process"
    )
    single, multi, ratios = [], [], []
    steps = 0
    for _ in range(args.rounds):
        t1, steps = _time(1, args.epochs)
        tn, _ = _time(args.processes, args.epochs)
        single.append(steps / t1)
        multi.append(steps / tn)
        ratios.append(tn / t1)
    n = args.processes
    print(f"1 process:   {statistics.median(single):7.1f} steps/s ({steps} steps, median of {args.rounds})")
    print(f"{n} processes: {statistics.median(multi):7.1f} steps/s")
    print(f"time ratio {n} processes / 1 process: {statistics.median(ratios):.2f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
