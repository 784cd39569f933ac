"""Regenerate the figures of the docs (run from the repository root):

    python docs/figures/make_figures.py

Writes ``docs/figures/permutation.png`` and ``docs/figures/mask_transfer.png``.
Both are computed with maskalign itself on a tiny MLP, so they show what the
library does, not a drawing of it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

import maskalign as ma  # noqa: E402
from maskalign.models import MLP  # noqa: E402

HERE = Path(__file__).resolve().parent
IN, HIDDEN, OUT = 6, 8, 4
UNIT_COLORS = plt.get_cmap("tab10")(np.arange(HIDDEN) % 10)


def _tiny_mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=IN, hidden=(HIDDEN,), num_classes=OUT)


def _strip(ax, order, where: str) -> None:
    """Colour strip naming the hidden unit of each row (``left``) or column (``top``)."""
    colors = UNIT_COLORS[np.asarray(order)]
    if where == "left":
        ax.imshow(colors[:, None, :], aspect="auto", extent=(-1.6, -0.6, HIDDEN - 0.5, -0.5))
        for i, unit in enumerate(order):
            ax.text(-1.1, i, str(int(unit)), ha="center", va="center", fontsize=7, color="white")
        ax.set_xlim(-1.7, ax.get_images()[0].get_array().shape[1] - 0.5)
        ax.set_ylim(HIDDEN - 0.5, -0.5)
    else:
        ax.imshow(colors[None, :, :], aspect="auto", extent=(-0.5, HIDDEN - 0.5, -0.6, -1.6))
        for j, unit in enumerate(order):
            ax.text(j, -1.1, str(int(unit)), ha="center", va="center", fontsize=7, color="white")
        ax.set_xlim(-0.5, HIDDEN - 0.5)
        ax.set_ylim(OUT - 0.5, -1.7)


def permutation_figure(path: Path) -> None:
    model = _tiny_mlp(0)
    spec = ma.build_spec(model, torch.randn(2, IN))
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(3))
    permuted = ma.apply_permutation(model, perm)
    mask = ma.global_magnitude_prune(model, sparsity=0.6)
    mask_p = ma.permute_mask(mask, perm)
    x = torch.randn(5, IN)
    same = torch.allclose(model(x), permuted(x), atol=1e-6)
    (group,) = spec.groups
    order = perm[group].numpy()

    fig, axes = plt.subplots(2, 3, figsize=(10, 6.2), gridspec_kw={"width_ratios": [IN, HIDDEN, IN]})
    rows = [
        ("model", model, mask, np.arange(HIDDEN)),
        ("apply_permutation(model, pi)", permuted, mask_p, order),
    ]
    vmax = max(float(model.layers[0].weight.detach().abs().max()), float(model.fc.weight.detach().abs().max()))
    for r, (label, net, m, units) in enumerate(rows):
        w1 = net.layers[0].weight.detach().numpy()
        w2 = net.fc.weight.detach().numpy()
        ax = axes[r, 0]
        ax.imshow(w1, cmap="RdBu", vmin=-vmax, vmax=vmax)
        _strip(ax, units, "left")
        ax.set_title(f"{label}\nlayers.0.weight (hidden x in)", fontsize=9)
        ax = axes[r, 1]
        ax.imshow(w2, cmap="RdBu", vmin=-vmax, vmax=vmax)
        _strip(ax, units, "top")
        ax.set_title("fc.weight (out x hidden)", fontsize=9, pad=14)
        ax = axes[r, 2]
        ax.imshow(m["layers.0.weight"].numpy(), cmap=ListedColormap(["#eeeeee", "#222222"]), vmin=0, vmax=1)
        _strip(ax, units, "left")
        ax.set_title("mask of layers.0.weight\n(black = kept)", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        "Permuting the hidden units: rows of layers.0.weight, columns of fc.weight and the mask's rows move together\n"
        f"(colour = hidden unit; outputs equal: {same})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mask_transfer_figure(path: Path) -> None:
    """A and B compute the same hidden features in different orders (B is a
    permuted copy of A). A's mask keeps A's large weights; used as
    is on B ("naive") it keeps the wrong rows; permuted with the matching it
    keeps B's large weights."""
    model_a = _tiny_mlp(0)
    spec = ma.build_spec(model_a, torch.randn(2, IN))
    true_pi = ma.random_permutation(spec, torch.Generator().manual_seed(5))
    model_b = ma.apply_permutation(model_a, true_pi)
    pi = ma.match_weights(model_a, model_b, spec)
    assert pi == true_pi, "weight matching should recover the shuffle"
    mask_a = ma.global_magnitude_prune(model_a, sparsity=0.6)
    naive = mask_a
    permuted = ma.permute_mask(mask_a, pi)
    big_b = ma.global_magnitude_prune(model_b, sparsity=0.6)  # B's own magnitude mask, for reference

    def overlap(m):
        return float((m["layers.0.weight"] & big_b["layers.0.weight"]).sum() / big_b["layers.0.weight"].sum())

    panels = [
        ("A's weights |W_A| and A's mask m_A", model_a, mask_a, None),
        (f"naive: m_A on B\n(keeps {overlap(naive):.0%} of B's largest weights)", model_b, naive, None),
        (f"permuted: pi(m_A) on B\n(keeps {overlap(permuted):.0%} of B's largest weights)", model_b, permuted, None),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (title, net, m, _) in zip(axes, panels):
        w = net.layers[0].weight.detach().abs().numpy()
        ax.imshow(w, cmap="Greys", vmin=0)
        keep = m["layers.0.weight"].numpy()
        ys, xs = np.nonzero(keep)
        ax.scatter(xs, ys, s=60, facecolors="none", edgecolors="#d62728", linewidths=1.5)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("inputs")
        ax.set_ylabel("hidden units")
    fig.suptitle(
        "Shade = |weight| of layers.0.weight; red circles = entries the mask keeps. "
        "B = A with its hidden units shuffled; pi found by match_weights(A, B).",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    permutation_figure(HERE / "permutation.png")
    mask_transfer_figure(HERE / "mask_transfer.png")
    print(f"wrote {HERE / 'permutation.png'} and {HERE / 'mask_transfer.png'}")


if __name__ == "__main__":
    main()
