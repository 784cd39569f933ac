"""The paper's lottery-ticket transfer experiment, end to end.

Adnan, Jain, Sharma, Krishnan, Ioannou (ICML 2025), method of the workshop
version's Appendix A.5:

1. train dense A and B from two random initialisations for T epochs, keeping
   the rewind checkpoints A_k, B_k at epoch k;
2. IMP on A: global unstructured magnitude pruning of 20% of the remaining
   weights per round, each round retraining from the rewind point A_k for
   T - k epochs (Frankle & Carbin 2019; Frankle et al. 2020), down to each
   target sparsity -> masks m_A;
3. activation matching A_T -> B_T gives the permutation pi;
4. sparse training for T - k epochs of: LTH (A_k, m_A), naive (B_k, m_A),
   permuted (B_k, pi(m_A)) and random (B_k, a random mask with m_A's per-layer
   density).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .activation_matching import match_activations
from .data import DatasetSplits, load_dataset
from .lmc import evaluate, lmc_barrier
from .masks import global_magnitude_prune, random_masks_like, sparsity
from .models import build_model
from .permutation import apply_permutation, permute_mask
from .spec import PermutationSpec, build_spec
from .training import TrainConfig, batches, train

__all__ = ["METHODS", "ReproduceConfig", "imp_schedule", "reproduce"]

METHODS = ("lth", "naive", "permuted", "random")


@dataclass(frozen=True)
class ReproduceConfig:
    """Settings of :func:`reproduce`. Defaults: digits, MLP 64-128-128-10,
    T = 20 epochs, rewind epoch k = 2, sparsities 0.9/0.95/0.98/0.99, 3 seeds."""

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "mlp"
    width: int = 1
    hidden: tuple[int, ...] = (128, 128)
    sparsities: tuple[float, ...] = (0.9, 0.95, 0.98, 0.99)
    rewind_epoch: int = 2
    epochs: int = 20
    seeds: int = 3
    batch_size: int = 64
    lr: float = 0.05
    sparse_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    prune_rate: float = 0.2
    augment: bool = False
    barrier_points: int = 11
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 <= self.rewind_epoch < self.epochs:
            raise ValueError(f"rewind epoch k={self.rewind_epoch} must lie in [0, epochs={self.epochs})")
        if not self.sparsities or any(not 0 < s < 1 for s in self.sparsities):
            raise ValueError(f"sparsities must lie in (0, 1), got {self.sparsities}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if not 0 < self.prune_rate < 1:
            raise ValueError(f"prune_rate must lie in (0, 1), got {self.prune_rate}")


def imp_schedule(targets: Sequence[float], rate: float = 0.2) -> list[float]:
    """Sparsity after each IMP round: prune ``rate`` of the remaining weights
    per round; a round that would overshoot the next target lands on it.

    >>> [round(s, 4) for s in imp_schedule([0.5], 0.2)]
    [0.2, 0.36, 0.488, 0.5]
    """
    schedule: list[float] = []
    current = 0.0
    for target in sorted(set(targets)):
        while current < target - 1e-12:
            current = 1 - (1 - current) * (1 - rate)
            if current > target - 1e-9:  # land exactly on the target
                current = target
            schedule.append(current)
    return schedule


@dataclass
class _Run:
    """One seed's dense models and rewind checkpoints."""

    final: nn.Module
    rewind_state: dict[str, Tensor]
    test_loss: float
    test_acc: float


@dataclass
class _Progress:
    total: int
    callback: Callable[[str], None] | None
    bar: Any = field(default=None)

    def __post_init__(self) -> None:
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="reproduce", unit="run")
        except ImportError:
            self.bar = None

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)
        if self.callback is not None:
            self.callback(what)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _train_dense(config: ReproduceConfig, splits: DatasetSplits, seed: int, device: torch.device) -> _Run:
    torch.manual_seed(seed)
    model = build_model(
        config.model,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        width=config.width,
        hidden=config.hidden,
    ).to(device)
    checkpoints: dict[int, dict[str, Tensor]] = {}

    def keep(epoch: int, m: nn.Module) -> None:
        if epoch == config.rewind_epoch:
            checkpoints[epoch] = copy.deepcopy(m.state_dict())

    keep(0, model)
    dense = TrainConfig(
        config.epochs, config.lr, config.momentum, config.weight_decay, config.batch_size, config.augment
    )
    train(model, splits.train, dense, generator=_seeded(seed), on_epoch_end=keep)
    loss, acc = evaluate(model, batches(splits.test, 512, device=device))
    return _Run(model, checkpoints[config.rewind_epoch], loss, acc)


def _sparse_train(
    config: ReproduceConfig,
    splits: DatasetSplits,
    template: nn.Module,
    state: dict[str, Tensor],
    masks: dict[str, Tensor],
    seed: int,
) -> tuple[nn.Module, float, float]:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    sparse = TrainConfig(
        config.epochs - config.rewind_epoch,
        config.sparse_lr,
        config.momentum,
        config.weight_decay,
        config.batch_size,
        config.augment,
    )
    train(model, splits.train, sparse, generator=_seeded(seed), masks=masks)
    device = next(model.parameters()).device
    loss, acc = evaluate(model, batches(splits.test, 512, device=device))
    return model, loss, acc


def reproduce(
    config: ReproduceConfig = ReproduceConfig(),
    *,
    splits: DatasetSplits | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the experiment for ``config.seeds`` seeds; returns a JSON-ready dict
    with the config, dense / sparse test results, loss barriers between A and
    B before and after matching, and matching diagnostics.

    Seed ``s`` trains A from ``2 s`` and B from ``2 s + 1``.
    """
    start = time.perf_counter()
    device = torch.device(config.device)
    splits = splits or load_dataset(config.dataset, config.data_root)
    schedule = imp_schedule(config.sparsities, config.prune_rate)
    targets = sorted(set(config.sparsities))
    runs_per_seed = 2 + len(schedule) + 1 + 3 * len(targets)
    progress = _Progress(config.seeds * runs_per_seed, log)
    results: dict[str, Any] = {
        "config": asdict(config),
        "imp_schedule": schedule,
        "dense": [],
        "sparse": [],
        "barrier": [],
        "matching": [],
    }
    spec: PermutationSpec | None = None
    has_bn = False
    try:
        for seed in range(config.seeds):
            run_a = _train_dense(config, splits, 2 * seed, device)
            progress.step(f"seed {seed}: dense A")
            run_b = _train_dense(config, splits, 2 * seed + 1, device)
            progress.step(f"seed {seed}: dense B")
            for name, run in (("A", run_a), ("B", run_b)):
                results["dense"].append(
                    {"seed": seed, "model": name, "test_loss": run.test_loss, "test_acc": run.test_acc}
                )
            has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run_a.final.modules())

            # IMP on A with rewinding to A_k; LTH results fall out of the rounds.
            masks_by_target: dict[float, dict[str, Tensor]] = {}
            current: dict[str, Tensor] | None = None
            pruned_from = run_a.final
            for round_index, level in enumerate(schedule):
                current = global_magnitude_prune(pruned_from, level, masks=current)
                model, loss, acc = _sparse_train(
                    config, splits, run_a.final, run_a.rewind_state, current, 1000 * seed + round_index
                )
                pruned_from = model
                if level in targets:
                    masks_by_target[level] = current
                    results["sparse"].append(_record(seed, level, "lth", loss, acc, current))
                progress.step(f"seed {seed}: IMP round {round_index + 1} ({level:.3f})")

            # Activation matching A_T -> B_T on the training data.
            match_data = list(batches(splits.train, 256, device=device))
            if spec is None:
                spec = build_spec(run_a.final, match_data[0][0][:2])
            perm = match_activations(run_a.final, run_b.final, match_data, spec, progress=False)
            aligned = apply_permutation(run_a.final, perm)
            test_data = list(batches(splits.test, 512, device=device))
            bn_data = match_data if has_bn else None
            before = lmc_barrier(run_a.final, run_b.final, test_data, num_points=config.barrier_points, bn_data=bn_data)
            after = lmc_barrier(aligned, run_b.final, test_data, num_points=config.barrier_points, bn_data=bn_data)
            results["barrier"].append(
                {
                    "seed": seed,
                    "before": before.barrier,
                    "after": after.barrier,
                    "before_mean": before.barrier_mean,
                    "after_mean": after.barrier_mean,
                    "alphas": before.alphas,
                    "losses_before": before.losses,
                    "losses_after": after.losses,
                }
            )
            results["matching"].append({"seed": seed, "groups": perm.report.get("groups", {})})
            progress.step(f"seed {seed}: matching")

            for target in targets:
                mask_a = masks_by_target[target]
                candidates = {
                    "naive": mask_a,
                    "permuted": permute_mask(mask_a, perm),
                    "random": random_masks_like(mask_a, _seeded(7919 * seed + int(target * 1e4))),
                }
                for method, mask in candidates.items():
                    _, loss, acc = _sparse_train(
                        config, splits, run_b.final, run_b.rewind_state, mask, 1000 * seed + 500 + int(target * 1e3)
                    )
                    results["sparse"].append(_record(seed, target, method, loss, acc, mask))
                    progress.step(f"seed {seed}: {method} @ {target}")
    finally:
        progress.close()
    results["elapsed_s"] = time.perf_counter() - start
    return results


def _record(seed: int, target: float, method: str, loss: float, acc: float, masks: dict[str, Tensor]) -> dict[str, Any]:
    return {
        "seed": seed,
        "sparsity": target,
        "method": method,
        "test_loss": loss,
        "test_acc": acc,
        "mask_sparsity": sparsity(masks).global_,
    }
