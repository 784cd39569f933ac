"""Is ``channels_last`` worth it on the CPU? (why ``MemoryData`` uses it)

The in-memory image runs of ``maskalign reproduce`` (``mnist5k``, CIFAR)
put their models in ``channels_last``. This measures, side by side in one
run, a training step (forward, backward, SGD with momentum) and an eval
forward of the CIFAR ResNet20 at batch 128 with the model in the contiguous
layout and in ``channels_last`` (inputs stay contiguous, as the in-memory
batches are), interleaved over ``--repeats`` rounds, and prints the median
time of each and the ratio contiguous / channels_last (> 1: channels_last
is faster), and how far the weights of the two layouts drift apart in
training (float rounding only: the same model, data and steps).

    python benchmarks/bench_channels_last.py [--threads 2] [--channels 1] [--width 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskalign.models import ResNet20


def _model(fmt: torch.memory_format, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = ResNet20(width=args.width, num_classes=10, in_channels=args.channels)
    return model.to(memory_format=fmt)  # type: ignore[call-overload]


def _steps(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> float:
    """Seconds per SGD step over ``steps`` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def _evals(model: nn.Module, x: Tensor, steps: int) -> float:
    """Seconds per eval forward over ``steps`` forwards."""
    model.eval()
    start = time.perf_counter()
    for _ in range(steps):
        model(x)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", type=int, default=1, help="input channels (1: mnist5k, 3: CIFAR)")
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.channels, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    train: dict[str, list[float]] = {name: [] for name in layouts}
    evals: dict[str, list[float]] = {name: [] for name in layouts}
    final: dict[str, nn.Module] = {}
    for _ in range(args.repeats):
        for name, fmt in layouts.items():
            model = _model(fmt, args)
            _steps(model, x, y, 2)  # warm-up (oneDNN primitive caches)
            train[name].append(_steps(model, x, y, args.steps))
            evals[name].append(_evals(model, x, args.steps))
            final[name] = model
    print(
        f"ResNet20 w={args.width}, {args.channels}x32x32, batch {args.batch}, {args.threads} thread(s), "
        f"medians of {args.repeats} interleaved rounds of {args.steps} steps"
    )
    for what, times in (("train step", train), ("eval forward", evals)):
        a, b = statistics.median(times["contiguous"]), statistics.median(times["channels_last"])
        print(f"  {what:12s} contiguous {a * 1e3:7.1f} ms   channels_last {b * 1e3:7.1f} ms   ratio {a / b:.2f}")
    drift = max(
        float((p - q).detach().abs().max())
        for p, q in zip(final["contiguous"].parameters(), final["channels_last"].parameters(), strict=True)
    )
    print(f"  largest weight difference after {args.steps + 2} steps (float rounding, grown by training): {drift:.2e}")


if __name__ == "__main__":
    main()
