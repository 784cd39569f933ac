"""Does mask-aware matching help? (issue 17, "Mask-aware matching")

On the real digits data with the MLP of the ``digits`` preset (128-128,
T = 20 epochs, batch 64, lr 0.05, IMP 20 % per round with 5 epochs at lr
0.01 and no rewinding, sparse training at lr 0.05), per seed (8 by default,
about 15 s each on one thread): train A and B
densely (different inits and data orders), run IMP on A to 0.9 and 0.98
sparsity, and find the permutation pi from A_T to B_T by plain and by
mask-aware activation matching (``mask=m_A``; default recipe otherwise,
matched on the training set) and by plain and mask-aware weight matching.
Compared, plain vs mask-aware:

* (a) agreement: the fraction of hidden units that both permutations send
  to the same unit of B;
* (b) the test-loss barrier between the dense pi(A_T) and B_T (25 points);
* (c) the test accuracy of B_k sparse-trained with pi(m_A) for T - k epochs,
  k = 0 and k = 10 (B rewound to its epoch-k weights).

Printed: mean +- std over seeds of each, and of the per-seed difference
aware - plain, with its margin in units of the seed noise (the std of the
plain numbers over seeds) and a paired t statistic (mean / (std / sqrt(n))).

    OMP_NUM_THREADS=1 python benchmarks/bench_mask_aware.py [--seeds 8]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import maskalign as ma
from maskalign.evaluation.lmc import evaluate
from maskalign.models import build_model
from maskalign.repro.data import load_dataset
from maskalign.repro.training import TrainConfig, train

T, K_VALUES, SPARSITIES = 20, (0, 10), (0.9, 0.98)
LR, SPARSE_LR, IMP_LR, IMP_EPOCHS, BATCH = 0.05, 0.05, 0.01, 5, 64


def _config(epochs: int, lr: float) -> TrainConfig:
    return TrainConfig(epochs, lr, 0.9, 5e-4, BATCH)


def _batches(dataset: TensorDataset, size: int = 256) -> list[tuple[Tensor, Tensor]]:
    x, y = dataset.tensors
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _agreement(p: ma.Permutation, q: ma.Permutation) -> float:
    same = sum(int((p[g] == q[g]).sum()) for g in p)
    return same / sum(p[g].numel() for g in p)


def run_seed(seed: int, splits: object) -> dict[tuple[str, float, str], dict[str, float]]:
    """Per (matcher, sparsity, "plain"/"aware"): agreement, barrier, acc_k<k>."""
    train_set, test = splits.train, _batches(splits.test)  # type: ignore[attr-defined]
    match_data = [x for x, _ in _batches(train_set)]

    def build(init_seed: int) -> nn.Module:
        torch.manual_seed(init_seed)
        return build_model("mlp", num_classes=10, in_channels=1, image_size=8, hidden=(128, 128))

    model_a, model_b = build(1000 * seed + 1), build(1000 * seed + 2)
    rewind_b: dict[int, dict[str, Tensor]] = {0: copy.deepcopy(model_b.state_dict())}

    def keep(epoch: int, model: nn.Module) -> None:
        if epoch in K_VALUES:
            rewind_b[epoch] = copy.deepcopy(model.state_dict())

    train(model_a, train_set, _config(T, LR), generator=torch.Generator().manual_seed(1000 * seed + 3))
    train(
        model_b, train_set, _config(T, LR), generator=torch.Generator().manual_seed(1000 * seed + 4), on_epoch_end=keep
    )

    def imp_train(model: nn.Module, imp_round: ma.IMPRound) -> None:
        generator = torch.Generator().manual_seed(1000 * seed + 10 + imp_round.index)
        train(model, train_set, _config(IMP_EPOCHS, IMP_LR), generator=generator, masks=imp_round.masks)

    imp = ma.iterative_magnitude_pruning(model_a, imp_train, list(SPARSITIES), rate=0.2)
    spec = ma.build_spec(model_a, match_data[0][:2])
    plain = {
        "activation": ma.match_activations(model_a, model_b, match_data, spec, progress=False),
        "weight": ma.match_weights(model_a, model_b, spec, progress=False),
    }
    out: dict[tuple[str, float, str], dict[str, float]] = {}
    barriers: dict[tuple[str, float | None], float] = {}
    for sparsity in SPARSITIES:
        mask_a = imp.masks_at[sparsity]
        for matcher, pi_plain in plain.items():
            if matcher == "activation":
                pi_aware = ma.match_activations(model_a, model_b, match_data, spec, progress=False, mask=mask_a)
            else:
                pi_aware = ma.match_weights(model_a, model_b, spec, progress=False, mask=mask_a)
            for kind, pi in (("plain", pi_plain), ("aware", pi_aware)):
                row = {"agreement": _agreement(pi_plain, pi_aware)}
                key = (matcher, sparsity if kind == "aware" else None)  # plain: one barrier for both sparsities
                if key not in barriers:
                    aligned = ma.apply_permutation(model_a, pi)
                    barriers[key] = ma.lmc_barrier(aligned, model_b, test, num_points=25).barrier
                row["barrier"] = barriers[key]
                mask_b = ma.permute_mask(mask_a, pi)
                for k in K_VALUES:
                    sparse = build(0)
                    sparse.load_state_dict(rewind_b[k])
                    generator = torch.Generator().manual_seed(1000 * seed + 50 + k)
                    train(sparse, train_set, _config(T - k, SPARSE_LR), generator=generator, masks=mask_b)
                    row[f"acc_k{k}"] = evaluate(sparse, test)[1]
                out[(matcher, sparsity, kind)] = row
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    splits = load_dataset("digits")
    runs = []
    for seed in range(args.seeds):
        runs.append(run_seed(seed, splits))
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    metrics = ["barrier", *(f"acc_k{k}" for k in K_VALUES)]
    print(f"\n{args.seeds} seeds, mean +- std; diff = aware - plain per seed; noise = std of plain over seeds;")
    print("t = paired t statistic of the diff (two-sided p < 0.05: |t| > 4.30 at 3 seeds, > 2.36 at 8)\n")
    print("| matcher | sparsity | agreement | metric | plain | mask-aware | diff | diff / noise | t |")
    print("|---|---|---|---|---|---|---|---|---|")
    for matcher in ("activation", "weight"):
        for sparsity in SPARSITIES:
            agreement = _mean_std([r[(matcher, sparsity, "aware")]["agreement"] for r in runs])
            for metric in metrics:
                plain = [r[(matcher, sparsity, "plain")][metric] for r in runs]
                aware = [r[(matcher, sparsity, "aware")][metric] for r in runs]
                diff = [b - a for a, b in zip(plain, aware)]
                (pm, ps), (am, as_), (dm, ds) = _mean_std(plain), _mean_std(aware), _mean_std(diff)
                scale, digits = (100.0, 2) if metric.startswith("acc") else (1.0, 4)
                t = dm / (ds / math.sqrt(len(diff))) if ds > 0 else float("inf") if dm else 0.0
                print(
                    f"| {matcher} | {sparsity} | {agreement[0]:.1%} +- {agreement[1]:.1%} | "
                    f"{metric}{' (%)' if scale != 1 else ''} | {pm * scale:.{digits}f} +- {ps * scale:.{digits}f} | "
                    f"{am * scale:.{digits}f} +- {as_ * scale:.{digits}f} | "
                    f"{dm * scale:+.{digits}f} +- {ds * scale:.{digits}f} | "
                    f"{dm / ps if ps else float('nan'):+.2f} | {t:+.1f} |"
                )
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
