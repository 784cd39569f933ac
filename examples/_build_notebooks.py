"""Regenerate the example notebooks, executed, with outputs: 01 and 03 from
the sources below, 02 and 04 from ``_notebooks_02_04.py``.

    python examples/_build_notebooks.py          # all four
    python examples/_build_notebooks.py 03       # only 03_*.ipynb

Each notebook is written with ``nbformat`` (fixed cell ids), executed with
``nbclient`` on the ``python3`` kernel in this folder, stripped of
per-run metadata (timings) and saved in place. The kernel runs with
``OMP_NUM_THREADS=1`` (as in ``tests/test_notebooks.py``). With seeded training the
outputs are reproducible on one machine; floating-point details may differ
across CPUs and thread counts, so the notebooks print rounded numbers.
Needs ``pip install nbformat nbclient ipykernel`` (and the test extra).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.notebooknode import NotebookNode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _notebooks_02_04 import CIFAR, TRANSFER  # noqa: E402


def _notebook(cells: list[tuple[str, str]]) -> NotebookNode:
    """A notebook of ``(kind, source)`` cells (kind ``"md"`` or ``"code"``) with stable ids."""
    nb = nbformat.v4.new_notebook()
    for i, (kind, source) in enumerate(cells):
        source = source.strip("\n")
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        cell.id = f"cell-{i:02d}"
        nb.cells.append(cell)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return nb


# --------------------------------------------------------------- 01 quickstart
QUICKSTART = [
    (
        "md",
        """
# Quickstart: align two MLPs and transfer a lottery ticket

A winning-ticket mask found by pruning model **A** trains well from A's own early weights, but
reused on a fresh initialisation **B** ("naive") it loses accuracy. Hidden units can be permuted
without changing a network's function, so we find the permutation that aligns A to B and permute
A's mask with it ("permuted"; Adnan et al., *Sparse Training from Random Initialization: Aligning
Lottery Ticket Masks using Weight Symmetry*, ICML 2025).

This notebook, on scikit-learn's 8x8 digits (runs in well under a minute on 2 CPU cores):

1. trains two MLPs from different random initialisations,
2. derives their permutation spec (`build_spec`) and aligns A to B (`match_activations`),
3. shows the loss barrier on the straight line between them before and after alignment (`lmc_barrier`),
4. prunes A (`global_magnitude_prune`), moves the mask into B's units (`permute_mask`),
5. sparse-trains B with the naive and the permuted mask (`enforce_masks`) and compares.
""",
    ),
    (
        "code",
        """
import copy

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import maskalign as ma
from maskalign.repro.data import load_digits
from maskalign.models import MLP
from maskalign.repro.training import TrainConfig, batches, train

torch.manual_seed(0)
data = load_digits(seed=0)  # float32 images (N, 1, 8, 8), int64 labels, stratified split
train_batches = list(batches(data.train, 256))  # (inputs, targets) pairs
test_batches = list(batches(data.test, 256))
print(f"digits: {len(data.train)} training and {len(data.test)} test images, {data.num_classes} classes")
""",
    ),
    (
        "md",
        """
## 1. Two dense models

Same architecture (64 → 128 → 128 → 10), different seeds. As in the lottery-ticket experiments we
keep each model's weights after epoch *k* = 1 as its *rewind point*: sparse training restarts from
there.
""",
    ),
    (
        "code",
        """
EPOCHS, REWIND = 10, 1
config = TrainConfig(epochs=EPOCHS, lr=0.05, batch_size=64)


def accuracy(model):
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_batches)
    return correct / len(data.test)


def train_dense(seed):
    torch.manual_seed(seed)
    model = MLP(in_features=64, hidden=(128, 128), num_classes=10)
    rewind = {}

    def keep(epoch, m):
        if epoch == REWIND:
            rewind["model"] = copy.deepcopy(m)

    train(model, data.train, config, generator=torch.Generator().manual_seed(seed), on_epoch_end=keep)
    return model.eval(), rewind["model"].eval()


model_a, a_rewind = train_dense(seed=1)
model_b, b_rewind = train_dense(seed=2)
print(f"test accuracy  A: {accuracy(model_a):.3f}   B: {accuracy(model_b):.3f}")
""",
    ),
    (
        "md",
        """
## 2. Permutation spec and activation matching

`build_spec` traces the model once (with `torch.export`) and finds which tensor axes must be
permuted together (a *group*); axes that touch the model's input or output are *frozen*.
""",
    ),
    (
        "code",
        """
spec = ma.build_spec(model_a, torch.randn(2, 1, 8, 8))
print(spec.summary())
""",
    ),
    (
        "md",
        """
`match_activations(a, b, data)` returns a permutation `pi` such that
`apply_permutation(a, pi)` is aligned to `b`: for every group it matches A's hidden units to B's by
the correlation of their activations on the training data. Permuting does not change A's
function, which `check_equivalence` confirms.
""",
    ),
    (
        "code",
        """
perm = ma.match_activations(model_a, model_b, train_batches, spec=spec, progress=False)
for group, stats in perm.report["groups"].items():
    print(f"{group:18s} mean matched correlation {stats['before']:.3f} -> {stats['after']:.3f}")

a_aligned = ma.apply_permutation(model_a, perm)
report = ma.check_equivalence(model_a, perm, torch.randn(8, 1, 8, 8))
print(f"same function after permuting: {report.ok} (max relative output difference {report.max_rel:.0e})")
print(f"A aligned to B, test accuracy {accuracy(a_aligned):.3f} (unchanged)")
""",
    ),
    (
        "md",
        """
## 3. Loss barrier before and after alignment

Linear mode connectivity: evaluate `(1 - alpha) * A + alpha * B` on the test set for alphas in
[0, 1]. Without alignment the loss climbs to a barrier midway between the two models; after
aligning A to B the path is nearly flat: the two sit in one basin. (Digits is easy, so even the
unaligned midpoint classifies most images correctly; the barrier shows in the loss.)
""",
    ),
    (
        "code",
        """
before = ma.lmc_barrier(model_a, model_b, test_batches, num_points=11)
after = ma.lmc_barrier(a_aligned, model_b, test_batches, num_points=11)
print(f"loss barrier   before {before.barrier:.3f}   after {after.barrier:.3f}")
print(f"error barrier  before {before.error_barrier:.3f}   after {after.error_barrier:.3f}")

fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
for result, label in ((before, "A to B (unaligned)"), (after, "pi(A) to B (aligned)")):
    ax_loss.plot(result.alphas, result.losses, marker="o", ms=3, label=label)
    ax_err.plot(result.alphas, result.errors, marker="o", ms=3, label=label)
ax_loss.set(xlabel="alpha", ylabel="test loss", title="loss on the path (1 - alpha) A + alpha B")
ax_err.set(xlabel="alpha", ylabel="test error", title="error on the path")
ax_loss.legend()
fig.tight_layout()
plt.show()
""",
    ),
    (
        "md",
        """
## 4. A's ticket, moved into B's units

We prune 95% of A's weights by global magnitude (one shot here; `maskalign reproduce` runs the
paper's iterative magnitude pruning). `permute_mask(mask_a, perm)` is the same ticket expressed in
B's hidden units: every layer keeps its number of weights, but the kept positions move.
""",
    ),
    (
        "code",
        """
SPARSITY = 0.95
mask_a = ma.global_magnitude_prune(model_a, sparsity=SPARSITY)  # parameter name -> bool tensor
mask_b = ma.permute_mask(mask_a, perm)
print(ma.sparsity(mask_b))
for name in mask_a:
    same = (mask_a[name] == mask_b[name]).float().mean().item()
    print(f"{name:16s} kept {int(mask_a[name].sum()):5d} -> {int(mask_b[name].sum()):5d}, same entries {same:.1%}")
""",
    ),
    (
        "md",
        """
## 5. Sparse training from B's rewind point

`enforce_masks(model, masks, optimizer)` zeroes the pruned weights and keeps them (and the
optimizer's momentum) at exactly zero through every step; `assert_masked` checks it afterwards.
Three runs, each for the remaining 9 epochs:

* **LTH**: A's rewind point with A's mask (the lottery ticket itself),
* **naive**: B's rewind point with A's mask, unchanged,
* **permuted**: B's rewind point with the permuted mask.
""",
    ),
    (
        "code",
        """
def sparse_train(init, masks, seed=0, epochs=EPOCHS - REWIND):
    model = copy.deepcopy(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with ma.enforce_masks(model, masks, optimizer):
        for _ in range(epochs):
            for x, y in batches(data.train, 64, shuffle=True, generator=generator):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    ma.assert_masked(model, masks)
    return model.eval()


runs = {
    "LTH (A_k, m_A)": sparse_train(a_rewind, mask_a),
    "naive (B_k, m_A)": sparse_train(b_rewind, mask_a),
    "permuted (B_k, pi(m_A))": sparse_train(b_rewind, mask_b),
}
print(f"sparsity {SPARSITY:.0%}, test accuracy (dense A {accuracy(model_a):.3f}, dense B {accuracy(model_b):.3f})")
for name, model in runs.items():
    print(f"  {name:24s} {accuracy(model):.3f}")
""",
    ),
    (
        "md",
        """
The permuted mask recovers most of the accuracy that the naive mask loses on the new
initialisation. Next steps: `02_lottery_ticket_transfer.ipynb` (the full experiment),
`03_your_own_architecture.ipynb` (specs for your own models), and `maskalign reproduce --help`.
""",
    ),
]


# ---------------------------------------------------- 03 your own architecture
YOUR_OWN = [
    (
        "md",
        """
# Your own architecture: permutation specs for any `nn.Module`

`build_spec(model, example_inputs)` traces the model's forward with `torch.export`, checks the
captured graph against the eager model, and propagates *axes* through every op: a hidden-unit
axis that can be permuted consistently in every tensor it touches becomes a **group**; an axis
that meets an op without a propagation rule, a graph input/output or a constant is **frozen**
(never guessed). Any permutation of the spec therefore keeps the model's function.

This notebook uses small `transformers` models built from a config (random weights, nothing is
downloaded) and a hand-written module. Runs in a few seconds on CPU.
""",
    ),
    (
        "code",
        """
import warnings

import torch
from torch import nn

import maskalign as ma

# transformers imports tqdm.auto, which warns in a notebook without ipywidgets
warnings.filterwarnings("ignore", message="IProgress not found")
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
_ = torch.manual_seed(0)
""",
    ),
    (
        "md",
        """
## 1. GPT-2 from a config

The example inputs are what `forward` receives: here a batch of token ids `(batch, length)`. The
output may be any structure (here a `CausalLMOutputWithCrossAttentions`); every floating-point
leaf counts as an output.
""",
    ),
    (
        "code",
        """
config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, use_cache=False)
gpt2 = transformers.GPT2LMHeadModel(config).eval()
ids = torch.randint(0, config.vocab_size, (2, 16))

spec = ma.build_spec(gpt2, (ids,))
print(spec.summary())
""",
    ),
    (
        "md",
        """
Reading the summary:

* `transformer.wte.weight:1` (64) is the **residual stream**: one permutation shared by the token
  and position embeddings, every LayerNorm, every block's input and output projections, and the
  tied `lm_head` (which shares its storage with `wte`).
* Attention is grouped **per head**: `...c_attn.weight:1` (size 4) permutes the heads, `:1.1` (16)
  the query/key dimensions inside a head, `:1.2` (16) the value dimensions. Heads move as blocks;
  queries and keys move together, so the attention scores do not change.
* `...mlp.c_fc.weight:1` (256) is each block's MLP hidden layer.
* Frozen: the vocabulary and position axes of the embeddings (their rows are looked up by index).

`spec.coverage` is the fraction of the hidden units of the parameters that can be permuted:
""",
    ),
    (
        "code",
        """
print(f"coverage {spec.coverage:.3f}, {len(spec.groups)} groups, {len(spec.frozen)} frozen axes")
for axis in spec.frozen:
    print(f"  frozen {axis.tensor}[{axis.dim}]: {axis.reason}")
""",
    ),
    (
        "md",
        """
## 2. Equivalence check

`random_permutation(spec)` draws one permutation per group; `check_equivalence` applies it and
compares the outputs (float32: relative tolerance 1e-4 by default). The permuted weights are
different tensors, yet the logits agree to float32 rounding.
""",
    ),
    (
        "code",
        """
pi = ma.random_permutation(spec, generator=torch.Generator().manual_seed(0))
report = ma.check_equivalence(gpt2, pi, (ids,))
print(f"equivalent: {report.ok}, max relative output difference {report.max_rel:.0e} (tolerance 1e-4)")

permuted = ma.apply_permutation(gpt2, pi)  # a new model; gpt2 is unchanged
with torch.no_grad():
    logits, logits_permuted = gpt2(ids).logits, permuted(ids).logits
w, w_perm = gpt2.transformer.h[0].mlp.c_fc.weight, permuted.transformer.h[0].mlp.c_fc.weight
print(f"weights changed: {not torch.equal(w, w_perm)}")
print(f"max |logits - logits_permuted| = {(logits - logits_permuted).abs().max().item():.0e}")
restored = ma.apply_permutation(permuted, pi.inverse())
print(f"inverse restores the weights exactly: {torch.equal(restored.transformer.h[0].mlp.c_fc.weight, w)}")
""",
    ),
    (
        "md",
        """
## 3. Other families: BERT and ViT

The same call works for encoders and vision transformers; only the example inputs change.
""",
    ),
    (
        "code",
        """
bert_config = transformers.BertConfig(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=32,
    num_labels=3,
)
vit_config = transformers.ViTConfig(
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    num_labels=10,
)
bert = transformers.BertForSequenceClassification(bert_config).eval()
vit = transformers.ViTForImageClassification(vit_config).eval()

for name, model, inputs in (
    ("BERT", bert, (torch.randint(0, 128, (2, 16)),)),
    ("ViT", vit, (torch.randn(2, 3, 32, 32),)),
):
    s = ma.build_spec(model, inputs)
    pi_model = ma.random_permutation(s, generator=torch.Generator().manual_seed(1))
    report = ma.check_equivalence(model, pi_model, inputs)
    print(
        f"{name:5s} coverage {s.coverage:.3f}, {len(s.groups):2d} groups, {len(s.frozen)} frozen axes, "
        f"equivalent under a random permutation: {report.ok}"
    )
""",
    ),
    (
        "md",
        """
## 4. What a frozen axis looks like

A hand-written module with an op that mixes hidden units in an order-dependent way
(`cumsum` over the feature axis: permuting the units changes the result). maskalign's rule for
`cumsum` knows that a running sum does not commute with permuting its axis, so it **freezes**
every axis that reaches it and says why; an op without any rule freezes what it touches the same
way, instead of guessing. The first hidden layer (before the `cumsum`) is still permutable;
coverage drops to 0.5.
""",
    ),
    (
        "code",
        """
class CumsumMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.cumsum(self.fc2(h), dim=-1)  # order of the hidden units matters here
        return self.fc3(h)


odd = CumsumMLP().eval()
x = torch.randn(4, 8)
odd_spec = ma.build_spec(odd, x)
print(odd_spec.summary())
report = ma.check_equivalence(odd, ma.random_permutation(odd_spec, generator=torch.Generator().manual_seed(0)), x)
print(f"equivalent under a random permutation of this spec: {report.ok}")
""",
    ),
    (
        "md",
        """
The spec's `frozen` list holds the same information as data (`tensor`, `dim`, `reason`).
If an op you rely on is frozen, rewriting that step with supported ops (or, for a
buffer that must follow its channels, `build_spec(..., permutable_buffers=[...])`) makes the
axis permutable again. If `torch.export` cannot trace the model at all (for example Python
control flow on tensor values such as `if x.sum() > 0:`), `build_spec` raises a `TraceError`
that names the line and suggests `torch.where` / `torch.cond`.
""",
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_lottery_ticket_transfer.ipynb": TRANSFER,
    "03_your_own_architecture.ipynb": YOUR_OWN,
    "04_cifar10_resnet20.ipynb": CIFAR,
}


def _coalesce_streams(outputs: list[NotebookNode]) -> list[NotebookNode]:
    """Merge consecutive stream outputs of one stream (how a print is split
    into messages depends on timing, not on the notebook)."""
    merged: list[NotebookNode] = []
    for output in outputs:
        last = merged[-1] if merged else None
        if (
            last is not None
            and output.output_type == "stream"
            and last.output_type == "stream"
            and last.name == output.name
        ):
            last.text += output.text
        else:
            merged.append(output)
    return merged


def build(name: str, *, timeout: int = 600) -> float:
    """Write, execute and save ``examples/<name>``; returns the execution time in seconds."""
    nb = _notebook(NOTEBOOKS[name])
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(HERE)}},
        record_timing=False,
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "version": ".".join(map(str, sys.version_info[:3]))},
    }
    for cell in nb.cells:
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs = _coalesce_streams(cell.outputs)
    nbformat.validate(nb)
    nbformat.write(nb, HERE / name)
    return seconds


def main(argv: list[str]) -> None:
    # One intra-op thread in the kernel (it inherits the environment): the
    # models are tiny, and on a busy machine 2 threads train ~10x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    names = [n for n in NOTEBOOKS if not argv or any(n.startswith(a) for a in argv)]
    if not names:
        raise SystemExit(f"no notebook matches {argv}; known: {list(NOTEBOOKS)}")
    for name in names:
        print(f"{name}: executed in {build(name):.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
