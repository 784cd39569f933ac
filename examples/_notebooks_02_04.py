"""Cell sources of example notebooks 02 (lottery-ticket transfer on digits)
and 04 (CIFAR-10 with ResNet20); ``examples/_build_notebooks.py`` writes and
executes them with 01 and 03:

    python examples/_build_notebooks.py 02 04

02 runs on a CPU in well under a minute and is executed by
``tests/test_notebooks.py``. 04 needs a CUDA GPU and a local CIFAR-10 copy; on
a machine without them it stores the output of its first cell, which says how
to run it.
"""

# ------------------------------------------------------ 02 lottery-ticket transfer
TRANSFER = [
    (
        "md",
        """
# Lottery-ticket transfer: LTH vs naive vs permuted vs random

The experiment of Adnan, Jain, Sharma, Krishnan & Ioannou, *Sparse Training from Random
Initialization: Aligning Lottery Ticket Masks using Weight Symmetry* (ICML 2025), at small
scale: the 8x8 digits data and an MLP 64-128-128-10, so that it runs on a CPU in well under
a minute.

1. Train two dense networks **A** and **B** from different random initialisations for `T`
   epochs, keeping each one's weights at the rewind epoch `k` (`A_k`, `B_k`).
2. Find A's winning tickets `m_A` by **iterative magnitude pruning** (IMP): prune 20% of the
   remaining weights per round, globally, and fine-tune between rounds (no rewinding, as the
   paper's masks were found).
3. Find the permutation `pi` that aligns A's hidden units to B's by **activation matching**.
4. Sparse-train for `T - k` epochs:
   * **LTH**: `A_k` with `m_A` (the lottery ticket, the upper reference);
   * **naive**: `B_k` with `m_A` as is;
   * **permuted**: `B_k` with `pi(m_A)`;
   * **random**: `B_k` with a random mask of `m_A`'s per-layer density.

The paper's claim: *permuted* recovers most of the gap between *naive* and *LTH*.
`maskalign reproduce` runs the same protocol from the command line.
""",
    ),
    (
        "code",
        """
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import maskalign as ma
from maskalign.repro.data import load_digits
from maskalign.evaluation.lmc import evaluate
from maskalign.models import MLP
from maskalign.repro.training import TrainConfig, batches, train

torch.set_num_threads(1)  # these models are tiny: one thread is faster than several fighting over 2 cores
start = time.perf_counter()

SEEDS = 3                       # A/B pairs
EPOCHS, REWIND = 20, 2          # T and k
SPARSITIES = [0.8, 0.9, 0.95, 0.98]
IMP_RATE, IMP_EPOCHS = 0.2, 2   # IMP: prune 20% of the remaining weights, fine-tune 2 epochs per round
LR, BATCH = 0.05, 64

splits = load_digits()
test_batches = list(batches(splits.test, 512))
image_shape = tuple(splits.train.tensors[0].shape[1:])
print(f"digits: {len(splits.train)} training and {len(splits.test)} test images of {image_shape}")
""",
    ),
    (
        "md",
        """
## The building blocks

Dense training keeps the rewind checkpoint; IMP gets a `train_fn` that trains with the round's
masks (`train(..., masks=...)` keeps pruned weights, their gradients and the optimiser state at
zero); sparse training starts from a rewind checkpoint with a fixed mask.
""",
    ),
    (
        "code",
        """
def accuracy(model):
    return evaluate(model, test_batches)[1]


def train_dense(seed):
    \"\"\"Dense model trained for T epochs and its weights at epoch k.\"\"\"
    torch.manual_seed(seed)
    model, saved = MLP(), {}

    def keep(epoch, m):
        if epoch == REWIND:
            saved["rewind"] = copy.deepcopy(m.state_dict())

    train(model, splits.train, TrainConfig(EPOCHS, LR, batch_size=BATCH),
          generator=torch.Generator().manual_seed(seed), on_epoch_end=keep)
    return model, saved["rewind"]


def imp_train_fn(model, imp_round):
    train(model, splits.train, TrainConfig(IMP_EPOCHS, LR, batch_size=BATCH),
          generator=torch.Generator().manual_seed(1000 + imp_round.index), masks=imp_round.masks)


def sparse_train(rewind_state, masks, seed):
    model = MLP()
    model.load_state_dict(rewind_state)
    train(model, splits.train, TrainConfig(EPOCHS - REWIND, LR, batch_size=BATCH),
          generator=torch.Generator().manual_seed(seed), masks=masks)
    ma.assert_masked(model, masks)
    return accuracy(model)
""",
    ),
    (
        "md",
        """
## Run it

For each seed: dense A and B, IMP on A, matching, loss barriers before and after matching,
then the four sparse runs at every sparsity.
""",
    ),
    (
        "code",
        """
rows, barriers, overlaps = [], [], []
for seed in range(SEEDS):
    model_a, rewind_a = train_dense(2 * seed)
    model_b, rewind_b = train_dense(2 * seed + 1)
    imp = ma.iterative_magnitude_pruning(model_a, imp_train_fn, SPARSITIES, rate=IMP_RATE)

    spec = ma.build_spec(model_a, splits.train.tensors[0][:2])
    pi = ma.match_activations(model_a, model_b, batches(splits.train, 256), spec=spec, progress=False)
    before = ma.lmc_barrier(model_a, model_b, test_batches, num_points=11)
    after = ma.lmc_barrier(ma.apply_permutation(model_a, pi), model_b, test_batches, num_points=11)
    barriers.append((before, after))

    for sparsity in SPARSITIES:
        mask_a = imp.masks_at[sparsity]
        mask_b = ma.permute_mask(mask_a, pi)
        runs = {
            "lth": (rewind_a, mask_a),
            "naive": (rewind_b, mask_a),
            "permuted": (rewind_b, mask_b),
            "random": (rewind_b, ma.random_masks_like(mask_a, torch.Generator().manual_seed(seed))),
        }
        for method, (state, masks) in runs.items():
            rows.append({"seed": seed, "sparsity": sparsity, "method": method,
                         "accuracy": sparse_train(state, masks, seed=500 + seed)})
        # how much of B's own magnitude ticket does each mask keep?
        own_b = ma.global_magnitude_prune(model_b, sparsity)
        kept = sum(int(m.sum()) for m in own_b.values())
        for method, masks in (("naive", mask_a), ("permuted", mask_b)):
            shared = sum(int((masks[n] & own_b[n]).sum()) for n in own_b)
            overlaps.append({"seed": seed, "sparsity": sparsity, "method": method, "overlap": shared / kept})
    print(f"seed {seed}: dense A {accuracy(model_a):.3f}, B {accuracy(model_b):.3f}; "
          f"loss barrier {before.barrier:.3f} -> {after.barrier:.3f} after matching")
print(f"{len(rows)} sparse runs")
""",
    ),
    (
        "md",
        """
## Accuracy vs sparsity

Mean test accuracy over seeds (the bars span the lowest and highest seed).
""",
    ),
    (
        "code",
        """
methods = ["lth", "naive", "permuted", "random"]
table = {m: [[r["accuracy"] for r in rows if r["method"] == m and r["sparsity"] == s] for s in SPARSITIES]
         for m in methods}

print("sparsity  " + "  ".join(f"{m:>9s}" for m in methods))
for i, s in enumerate(SPARSITIES):
    print(f"{s:8.2f}  " + "  ".join(f"{np.mean(table[m][i]):9.3f}" for m in methods))

x = np.arange(len(SPARSITIES))
styles = {"lth": "k--", "naive": "C3-o", "permuted": "C0-o", "random": "C7-s"}
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for m in methods:
    mean = np.array([np.mean(v) for v in table[m]])
    low = mean - np.array([np.min(v) for v in table[m]])
    high = np.array([np.max(v) for v in table[m]]) - mean
    left.errorbar(x, mean, yerr=[low, high], fmt=styles[m], capsize=3, label=m)
    if m in ("naive", "permuted"):
        gap = 100 * (mean - np.array([np.mean(v) for v in table["lth"]]))
        right.plot(x, gap, styles[m], label=m)
left.set_ylabel("test accuracy")
left.set_title(f"sparse training, digits MLP, {SEEDS} seeds")
right.axhline(0, color="k", ls="--", lw=1, label="lth")
right.set_ylabel("accuracy - LTH accuracy (points)")
right.set_title("gap to the lottery ticket")
for ax in (left, right):
    ax.set_xticks(x, [f"{s:.2f}" for s in SPARSITIES])
    ax.set_xlabel("sparsity (fraction of weights pruned)")
    ax.legend()
    ax.grid(alpha=0.3)
plt.show()
""",
    ),
    (
        "md",
        """
The permuted mask trains B nearly as well as A's own ticket trains A, while the same mask
used without the permutation degrades quickly with sparsity. A random mask of the same
per-layer density is far worse: the ticket carries real information, but only in A's unit
order.

## Why: the permutation puts A's ticket onto B's units

The share of B's own magnitude-pruning mask (one-shot, same sparsity) that each transferred
mask keeps:
""",
    ),
    (
        "code",
        """
print("sparsity   naive  permuted")
for s in SPARSITIES:
    naive = np.mean([o["overlap"] for o in overlaps if o["sparsity"] == s and o["method"] == "naive"])
    permuted = np.mean([o["overlap"] for o in overlaps if o["sparsity"] == s and o["method"] == "permuted"])
    print(f"{s:8.2f}  {naive:6.3f}  {permuted:8.3f}")
""",
    ),
    (
        "md",
        """
## Linear mode connectivity

Loss along the straight line between A and B (seed 0): unaligned there is a high barrier;
after permuting A onto B's units the two networks are (nearly) linearly connected, which is
why A's mask fits B once permuted.
""",
    ),
    (
        "code",
        """
before, after = barriers[0]
fig, ax = plt.subplots(figsize=(6.5, 3.5))
ax.plot(before.alphas, before.losses, "C3-o", label=f"A -> B (barrier {before.barrier:.2f})")
ax.plot(after.alphas, after.losses, "C0-o", label=f"pi(A) -> B (barrier {after.barrier:.2f})")
ax.set_xlabel("alpha: (1 - alpha) A + alpha B")
ax.set_ylabel("test loss")
ax.legend()
ax.grid(alpha=0.3)
plt.show()
print(f"mean barrier over seeds: {np.mean([b.barrier for b, _ in barriers]):.3f} before, "
      f"{np.mean([a.barrier for _, a in barriers]):.3f} after matching")
print(f"notebook ran in {time.perf_counter() - start:.0f} s")
""",
    ),
    (
        "md",
        """
## Next

* `maskalign reproduce` runs this protocol (also sweeping the rewind epoch `k`) and writes
  `results.json`, `results.md` and plots; `maskalign reproduce --list-presets` shows the
  settings, including the paper's CIFAR presets.
* `04_cifar10_resnet20.ipynb` runs the paper's CIFAR-10 / ResNet20 setting on a GPU.
* The docs' how-to guides do each step on your own models: *Align two of your own models*,
  *Permute a mask and sparse-train*.
""",
    ),
]


# ------------------------------------------------------------- 04 CIFAR-10 ResNet20
CIFAR = [
    (
        "md",
        """
# CIFAR-10, ResNet20: the paper's setting (GPU)

The lottery-ticket transfer experiment of Adnan et al. (ICML 2025) on CIFAR-10 with a
width-scalable ResNet20, on a CUDA GPU. It needs

* a **local copy of CIFAR-10** in the python-pickle layout (`cifar-10-batches-py/` with
  `data_batch_1` ... `data_batch_5` and `test_batch`; nothing is downloaded), and
* a **CUDA GPU** (on a CPU one dense ResNet20 run alone takes hours).

Set `CIFAR_ROOT` (or the environment variable `MASKALIGN_CIFAR10`) to the folder that holds
`cifar-10-batches-py`. Without data or GPU the first code cell prints what to do and the later
cells do nothing. This notebook is not executed in CI.

Settings follow the paper (workshop version, Appendix A.1): SGD, momentum 0.9, weight decay
5e-4, batch 128, cosine schedule, random crop + flip; IMP prunes 20% of the remaining weights
per round. `QUICK = True` shortens every schedule (the third cell prints how many epochs the
run trains in all; hours on one modern GPU); `QUICK = False` uses the paper's lengths (days).
""",
    ),
    (
        "code",
        """
import os
from pathlib import Path

import torch

CIFAR_ROOT = os.environ.get("MASKALIGN_CIFAR10", "~/data")
root = Path(CIFAR_ROOT).expanduser()
has_data = (root / "cifar-10-batches-py" / "test_batch").is_file() or (root / "test_batch").is_file()
has_gpu = torch.cuda.is_available()
READY = has_data and has_gpu
if READY:
    print(f"CIFAR-10 found under {root}; GPU: {torch.cuda.get_device_name(0)}")
else:
    print("This notebook needs a local CIFAR-10 copy and a CUDA GPU; nothing was run.")
    if not has_data:
        print(f"  - no CIFAR-10 under {root}: download the python version from "
              "https://www.cs.toronto.edu/~kriz/cifar.html, extract it so that "
              "<folder>/cifar-10-batches-py/test_batch exists, then set "
              "MASKALIGN_CIFAR10=<folder> (or CIFAR_ROOT in this cell).")
    if not has_gpu:
        print("  - no CUDA GPU visible to torch (torch.cuda.is_available() is False): "
              "run on a GPU machine with a CUDA build of torch.")
    print("The same experiment from the command line (the paper's full settings):\\n"
          "  maskalign reproduce --preset cifar10-resnet20x4 --data-root <folder> --device cuda")
""",
    ),
    (
        "code",
        """
import copy
import time

import matplotlib.pyplot as plt
import numpy as np

import maskalign as ma
from maskalign.repro.data import load_cifar
from maskalign.evaluation.lmc import evaluate
from maskalign.models import ResNet20
from maskalign.repro.training import TrainConfig, batches, train

QUICK = True
WIDTH = 4                                       # ResNet20x4 (the paper also uses x1)
EPOCHS = 30 if QUICK else 200                   # T (dense epochs; the paper does not state T)
REWIND = 3 if QUICK else 5                      # k
SPARSITIES = [0.8, 0.9, 0.95, 0.97]
IMP_EPOCHS, IMP_LR = (2, 0.01) if QUICK else (50, 0.01)
DENSE_LR, SPARSE_LR = 0.08, 0.02
SEEDS = 1 if QUICK else 3
DEVICE = torch.device("cuda")


def dense_config(epochs):
    return TrainConfig(epochs, DENSE_LR, batch_size=128, augment=True)


def sparse_config(epochs, lr):
    return TrainConfig(epochs, lr, batch_size=128, augment=True)


imp_rounds = len(ma.imp_schedule(SPARSITIES, 0.2))
total = SEEDS * (2 * EPOCHS + imp_rounds * IMP_EPOCHS + 4 * len(SPARSITIES) * (EPOCHS - REWIND))
print(f"{SEEDS} seed(s): 2 dense runs of {EPOCHS} epochs, {imp_rounds} IMP rounds of {IMP_EPOCHS}, "
      f"{4 * len(SPARSITIES)} sparse runs of {EPOCHS - REWIND}: {total} epochs of CIFAR-10 in all")
""",
    ),
    (
        "code",
        """
if READY:
    splits = load_cifar(root, num_classes=10)
    test_batches = list(batches(splits.test, 1000, device=DEVICE))
    train_batches = list(batches(splits.train, 500, device=DEVICE))[:20]   # for matching and BatchNorm

    def accuracy(model):
        return evaluate(model, test_batches)[1]

    def train_dense(seed):
        torch.manual_seed(seed)
        model, saved = ResNet20(width=WIDTH, num_classes=10).to(DEVICE), {}

        def keep(epoch, m):
            if epoch == REWIND:
                saved["rewind"] = copy.deepcopy(m.state_dict())

        train(model, splits.train, dense_config(EPOCHS), generator=torch.Generator().manual_seed(seed),
              on_epoch_end=keep)
        return model, saved["rewind"]

    def imp_train_fn(model, imp_round):
        train(model, splits.train, sparse_config(IMP_EPOCHS, IMP_LR),
              generator=torch.Generator().manual_seed(imp_round.index), masks=imp_round.masks)

    def sparse_train(template, rewind_state, masks, seed):
        model = copy.deepcopy(template)
        model.load_state_dict(rewind_state)
        train(model, splits.train, sparse_config(EPOCHS - REWIND, SPARSE_LR),
              generator=torch.Generator().manual_seed(seed), masks=masks)
        return accuracy(model)

    rows, barriers = [], []
    start = time.perf_counter()
    for seed in range(SEEDS):
        model_a, rewind_a = train_dense(2 * seed)
        model_b, rewind_b = train_dense(2 * seed + 1)
        print(f"seed {seed}: dense A {accuracy(model_a):.3f}, B {accuracy(model_b):.3f} "
              f"({time.perf_counter() - start:.0f} s)")
        imp = ma.iterative_magnitude_pruning(model_a, imp_train_fn, SPARSITIES, rate=0.2)
        spec = ma.build_spec(model_a, train_batches[0][0][:2])
        pi = ma.match_activations(model_a, model_b, train_batches, spec=spec, progress=False)
        before = ma.lmc_barrier(model_a, model_b, test_batches, num_points=11, bn_data=train_batches)
        after = ma.lmc_barrier(ma.apply_permutation(model_a, pi), model_b, test_batches, num_points=11,
                               bn_data=train_batches)
        barriers.append((before, after))
        for sparsity in SPARSITIES:
            mask_a = imp.masks_at[sparsity]
            runs = {
                "lth": (model_a, rewind_a, mask_a),
                "naive": (model_b, rewind_b, mask_a),
                "permuted": (model_b, rewind_b, ma.permute_mask(mask_a, pi)),
                "random": (model_b, rewind_b, ma.random_masks_like(mask_a, torch.Generator().manual_seed(seed))),
            }
            for method, (template, state, masks) in runs.items():
                acc = sparse_train(template, state, masks, seed=500 + seed)
                rows.append({"seed": seed, "sparsity": sparsity, "method": method, "accuracy": acc})
                print(f"  {method:8s} @ {sparsity:.2f}: {acc:.3f} ({time.perf_counter() - start:.0f} s)")
else:
    print("skipped (see the first cell)")
""",
    ),
    (
        "code",
        """
if READY:
    methods = ["lth", "naive", "permuted", "random"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m, style in zip(methods, ["k--", "C3-o", "C0-o", "C7-s"]):
        means = [np.mean([r["accuracy"] for r in rows if r["method"] == m and r["sparsity"] == s])
                 for s in SPARSITIES]
        ax.plot(SPARSITIES, means, style, label=m)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"CIFAR-10, ResNet20x{WIDTH}, k={REWIND}")
    ax.legend()
    ax.grid(alpha=0.3)
    plt.show()
    print("loss barrier before / after matching:",
          [(round(b.barrier, 3), round(a.barrier, 3)) for b, a in barriers])
else:
    print("skipped (see the first cell)")
""",
    ),
]
