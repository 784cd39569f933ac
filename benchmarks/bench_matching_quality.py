"""Matching quality by recipe (issue 13): which way of matching gives the best
permutation, measured on independently trained pairs.

For each architecture, ``--pairs`` pairs (A, B) are trained from independent
seeds on real data (scikit-learn's digits; 8x8 for the MLP, padded to 3x32x32
for ResNet20 w=1 and the plain VGG11 without BatchNorm, the models of the
paper's side-by-side comparison). Every recipe then aligns A to B and the
benchmark prints, per recipe, mean +- std over the pairs of:

* **loss barrier** and **error barrier** (percentage points) of the test loss
  along ``(1 - alpha) A' + alpha B`` (11 points, ``ma.lmc_barrier``), A' the
  permuted A, with BatchNorm statistics re-estimated at every alpha;
* **stability**: the share of units (over all groups) that two matches on two
  disjoint halves of the matching data (``--samples`` training images, 1024 by
  default, in batches of ``--batch``) assign alike (1.0 for data-free weight
  matching: it reads no data);
* **time** of one match (s).

``--sparse`` also trains B from its initialisation with A's one-shot magnitude
mask (``--sparsity``) permuted by the two recipes of lowest mean loss barrier
(and naive, the unpermuted mask), on the MLP pairs, and prints test accuracy,
so the choice is checked against accuracy too (one-shot magnitude pruning of the
trained A stands in for IMP here, and B trains from its epoch-0 weights).

Recipes are the options of ``ma.match_activations`` (``points``,
``stream_points``) and ``ma.match_weights`` (``include_buffers``) that the
installed maskalign offers; options it lacks are left out of the table.

Run::

    python benchmarks/bench_matching_quality.py                       # mlp, resnet20, vgg11; 3 pairs
    python benchmarks/bench_matching_quality.py --archs mlp --pairs 2 --quick
    python benchmarks/bench_matching_quality.py --sparse --cache /tmp/mq

Trained models are cached under ``--cache`` (default
``benchmarks/.cache/matching_quality``), keyed by architecture, seed and
epochs, so a rerun only matches and evaluates.
"""

from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import maskalign as ma
from maskalign.models import MLP, VGG11, ResNet20
from maskalign.repro.data import DatasetSplits, load_digits
from maskalign.repro.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent
Batches = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    padded: bool  # digits padded to 3x32x32
    config: TrainConfig


ARCHS = {
    "mlp": Arch("mlp", lambda: MLP(64, (128, 128), 10), False, TrainConfig(epochs=30, lr=0.05, batch_size=64)),
    "resnet20": Arch(
        "resnet20", lambda: ResNet20(width=1, num_classes=10), True, TrainConfig(epochs=12, lr=0.1, batch_size=64)
    ),
    "vgg11": Arch(
        "vgg11",
        lambda: VGG11(num_classes=10, in_channels=3, image_size=32, batch_norm=False),
        True,
        TrainConfig(epochs=8, lr=0.02, batch_size=64),
    ),
}


def padded(ds: TensorDataset) -> TensorDataset:
    """8x8 single-channel digits as 3x32x32 images (zero padding, channel repeated)."""
    x, y = ds.tensors
    return TensorDataset(F.pad(x, (12, 12, 12, 12)).repeat(1, 3, 1, 1), y)


def split_batches(ds: TensorDataset, size: int, limit: int | None = None, drop_last: bool = False) -> Batches:
    """``(inputs, targets)`` batches of ``size`` from the first ``limit`` samples."""
    x, y = ds.tensors
    n = len(x) if limit is None else min(limit, len(x))
    stop = n - n % size if drop_last else n
    return [(x[i : i + size], y[i : i + size]) for i in range(0, stop, size)]


def trained(arch: Arch, seed: int, splits: DatasetSplits, cache: Path, epochs: int) -> nn.Module:
    """``arch`` trained from seed ``seed`` (cached)."""
    path = cache / f"{arch.name}-seed{seed}-e{epochs}.pt"
    torch.manual_seed(seed)
    model = arch.build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    data = padded(splits.train) if arch.padded else splits.train
    config = TrainConfig(**{**arch.config.__dict__, "epochs": epochs})
    start = time.perf_counter()
    train(model, data, config, generator=torch.Generator().manual_seed(1000 + seed))
    test = padded(splits.test) if arch.padded else splits.test
    with torch.no_grad():
        accuracy = float((model.eval()(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())
    print(
        f"  trained {arch.name} seed {seed}: {time.perf_counter() - start:.0f} s, test accuracy {accuracy:.3f}",
        flush=True,
    )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval()


# ------------------------------------------------------------------ recipes
Recipe = Callable[[nn.Module, nn.Module, ma.PermutationSpec, Batches], ma.Permutation]


def recipes(has_bn: bool) -> dict[str, Recipe]:
    """The recipes the installed maskalign offers."""
    act = inspect.signature(ma.match_activations).parameters
    wm = inspect.signature(ma.match_weights).parameters
    out: dict[str, Recipe] = {}

    def activation(**options: object) -> Recipe:
        def run(a: nn.Module, b: nn.Module, spec: ma.PermutationSpec, data: Batches) -> ma.Permutation:
            return ma.match_activations(a, b, data, spec, progress=False, **options)  # type: ignore[arg-type]

        return run

    if "points" in act:
        streams = ("all", "last") if "stream_points" in act else ("all",)
        for points in ("pre", "post", "both"):
            for stream in streams:
                extra = {"stream_points": stream} if "stream_points" in act else {}
                out[f"activation points={points} stream={stream}"] = activation(points=points, **extra)
    else:
        out["activation (pre-activations)"] = activation()

    def weights(**options: object) -> Recipe:
        def run(a: nn.Module, b: nn.Module, spec: ma.PermutationSpec, data: Batches) -> ma.Permutation:
            return ma.match_weights(a, b, spec, **options)  # type: ignore[arg-type]

        return run

    if "include_buffers" in wm and has_bn:
        out["weight include_buffers=True"] = weights(include_buffers=True)
        out["weight include_buffers=False"] = weights(include_buffers=False)
    else:
        out["weight"] = weights()
    return out


def agreement(p: ma.Permutation, q: ma.Permutation) -> float:
    """Share of units (over all groups) that ``p`` and ``q`` map alike."""
    same = sum(int((p[g] == q[g]).sum()) for g in p)
    return same / max(1, sum(len(p[g]) for g in p))


@dataclass
class Row:
    barrier: list[float]
    error_barrier: list[float]
    stability: list[float]
    seconds: list[float]


def evaluate(a: nn.Module, b: nn.Module, test: Batches, bn: Batches | None) -> ma.LMCResult:
    return ma.lmc_barrier(a, b, test, num_points=11, bn_data=bn)


def _fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def bench_arch(arch: Arch, pairs: int, cache: Path, epochs: int, batch: int, samples: int) -> dict[str, Row]:
    splits = load_digits(seed=0)
    train_ds = padded(splits.train) if arch.padded else splits.train
    test_ds = padded(splits.test) if arch.padded else splits.test
    match_data = split_batches(train_ds, batch, samples, drop_last=True)  # one batch shape: one graph
    halves = (match_data[0::2], match_data[1::2])
    test = split_batches(test_ds, 256)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in arch.build().modules())
    bn = split_batches(train_ds, 256) if has_bn else None
    rows: dict[str, Row] = {"identity (no matching)": Row([], [], [], [])}
    available = recipes(has_bn)
    for name in available:
        rows[name] = Row([], [], [], [])
    for pair in range(pairs):
        a = trained(arch, 2 * pair + 1, splits, cache, epochs)
        b = trained(arch, 2 * pair + 2, splits, cache, epochs)
        spec = ma.build_spec(a, match_data[0][0])
        base = evaluate(a, b, test, bn)
        rows["identity (no matching)"].barrier.append(base.barrier)
        rows["identity (no matching)"].error_barrier.append(base.error_barrier)
        for name, recipe in available.items():
            start = time.perf_counter()
            perm = recipe(a, b, spec, match_data)
            seconds = time.perf_counter() - start
            result = evaluate(ma.apply_permutation(a, perm), b, test, bn)
            row = rows[name]
            row.barrier.append(result.barrier)
            row.error_barrier.append(result.error_barrier)
            row.seconds.append(seconds)
            if name.startswith("activation"):
                row.stability.append(agreement(recipe(a, b, spec, halves[0]), recipe(a, b, spec, halves[1])))
            else:
                row.stability.append(1.0)
            print(
                f"  {arch.name} pair {pair}: {name:38s} barrier {result.barrier:.3f} "
                f"error barrier {100 * result.error_barrier:.1f} pp ({seconds:.1f} s)",
                flush=True,
            )
    return rows


def print_table(arch: str, rows: dict[str, Row], pairs: int) -> None:
    print(f"\n### {arch} ({pairs} pairs; mean +- std over pairs)\n")
    print("| recipe | loss barrier | error barrier (pp) | stability | time (s) |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {_fmt(row.barrier)} | {_fmt(row.error_barrier, 100, 1)} | {_fmt(row.stability, 1, 3)} | "
            f"{_fmt(row.seconds, 1, 2)} |"
        )


def sparse_check(rows: dict[str, Row], pairs: int, cache: Path, sparsity: float, epochs: int) -> None:
    """Sparse training of B's init with A's mask permuted by the two best recipes (MLP, digits)."""
    arch = ARCHS["mlp"]
    splits = load_digits(seed=0)
    match_data = split_batches(splits.train, 128, 1024, drop_last=True)
    ranked = sorted((n for n in rows if n != "identity (no matching)"), key=lambda n: statistics.fmean(rows[n].barrier))
    best = ranked[:2]
    available = recipes(False)
    accuracy: dict[str, list[float]] = {"naive": [], **{n: [] for n in best}}
    for pair in range(pairs):
        a = trained(arch, 2 * pair + 1, splits, cache, epochs)
        b = trained(arch, 2 * pair + 2, splits, cache, epochs)
        spec = ma.build_spec(a, match_data[0][0])
        mask_a = ma.global_magnitude_prune(a, sparsity=sparsity)
        for name in accuracy:
            mask = mask_a if name == "naive" else ma.permute_mask(mask_a, available[name](a, b, spec, match_data))
            torch.manual_seed(2 * pair + 2)
            init_b = arch.build()  # B's epoch-0 weights (same seed as B)
            train(init_b, splits.train, arch.config, generator=torch.Generator().manual_seed(7), masks=mask)
            x, y = splits.test.tensors
            with torch.no_grad():
                accuracy[name].append(float((init_b.eval()(x).argmax(1) == y).float().mean()))
    print(f"\n### sparse training at sparsity {sparsity} (MLP on digits, {pairs} pairs): test accuracy\n")
    print("| mask | accuracy |")
    print("|---|---|")
    for name, values in accuracy.items():
        print(f"| {name} | {_fmt(values, 100, 1)} % |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="mlp,resnet20,vgg11")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "matching_quality")
    parser.add_argument("--quick", action="store_true", help="a third of the epochs (smoke run)")
    parser.add_argument("--sparse", action="store_true", help="also the sparse-training check (MLP)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=128, help="matching batch size")
    parser.add_argument("--samples", type=int, default=1024, help="training samples used for matching")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"maskalign {ma.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    mlp_rows: dict[str, Row] | None = None
    for name in args.archs.split(","):
        arch = ARCHS[name]
        epochs = max(1, arch.config.epochs // 3) if args.quick else arch.config.epochs
        rows = bench_arch(arch, args.pairs, args.cache, epochs, args.batch, args.samples)
        print_table(name, rows, args.pairs)
        if name == "mlp":
            mlp_rows = rows
    if args.sparse:
        if mlp_rows is None:
            mlp_rows = bench_arch(
                ARCHS["mlp"], args.pairs, args.cache, ARCHS["mlp"].config.epochs, args.batch, args.samples
            )
        epochs = max(1, ARCHS["mlp"].config.epochs // 3) if args.quick else ARCHS["mlp"].config.epochs
        sparse_check(mlp_rows, args.pairs, args.cache, args.sparsity, epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
