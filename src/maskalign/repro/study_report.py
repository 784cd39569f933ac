"""The report of the studies (:mod:`maskalign.repro.studies`): the
early-matching and matching-source tables of ``results.md`` and the
early-matching plot.

Every accuracy is compared with the paper's permuted run at the same seed,
rewind point and sparsity (same start B_k, same mask m_A, same data order:
only the permutation differs), as a paired difference: mean +- sample std
over seeds of (variant - paper), in percentage points. A difference is
called *beyond seed noise* when its mean is more than twice its standard
error (std / sqrt(seeds)) away from 0, about a 95% paired test; it takes at least 3 seeds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .report_format import fmt_values, mean_std, new_figure, save_png

__all__ = ["early_rows", "ensemble_epochs", "has_early_matching", "plot_early_matching", "sections", "source_rows"]

_PAIR_WORDS = {"AT-Be": "A_T -> B_e", "Ae-Be": "A_e -> B_e"}
_SOURCE_WORDS = {
    "subset": "subset of the training data",
    "imp": "A's IMP solution (sparse A)",
    "mask-aware": "mask-aware (units weighted by m_A)",
}


def _beyond_noise(diffs: Sequence[float]) -> str:
    """``"yes (+)"`` / ``"yes (-)"`` when the paired mean is beyond 2 standard
    errors, ``"no"`` when not, ``"- (2 seeds)"`` with fewer than 3 seeds."""
    if len(diffs) < 3:
        return f"- ({len(diffs)} seed{'s' if len(diffs) > 1 else ''})"
    mean, std = mean_std(diffs)
    if abs(mean) > 2 * std / math.sqrt(len(diffs)):
        return "yes (+)" if mean > 0 else "yes (-)"
    return "no"


def _paper_accuracy(results: dict[str, Any], method: str = "permuted") -> dict[tuple[int, int, float], float]:
    """(seed, k, sparsity) -> test accuracy (%) of the paper's ``method`` run."""
    return {(r["seed"], r["k"], r["sparsity"]): 100 * r["test_acc"] for r in results["sparse"] if r["method"] == method}


def _paper_barriers(results: dict[str, Any]) -> dict[int, float]:
    """seed -> the dense pi(A)-B loss barrier (nats) of the paper's permutation."""
    return {c["seed"]: c["barrier"] for c in results["lmc"] if c["pair"] == "pi(A)-B"}


def _variants(results: dict[str, Any]) -> dict[str, Any]:
    return results.get("variants") or {"matching": [], "sparse": []}


def _rows(results: dict[str, Any], family: str) -> list[dict[str, Any]]:
    """One row per (variant name without its sparsity, sparsity), over seeds:
    its label fields, accuracies, paired differences, barriers, agreement."""
    studies = _variants(results)
    paper = _paper_accuracy(results)
    matches = {(m["seed"], m["variant"]): m for m in studies["matching"] if m["family"] == family}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in studies["sparse"]:
        if r["family"] != family:
            continue
        label = (r["epoch"], r["pair"], r["source"], r["sparsity"])
        groups.setdefault(label, []).append(r)
    rows = []
    for (epoch, pair, source, target), runs in groups.items():
        accs = [100 * r["test_acc"] for r in runs]
        diffs = [100 * r["test_acc"] - paper[(r["seed"], r["k"], r["sparsity"])] for r in runs]
        m = [matches[(r["seed"], r["variant"])] for r in runs]
        rows.append(
            {
                "epoch": epoch,
                "pair": pair,
                "source": source,
                "sparsity": target,
                "k": runs[0]["k"],
                "epochs_saved": runs[0]["epochs_saved"],
                "accuracy": accs,
                "difference": diffs,
                "barrier": [x["barrier"] for x in m],
                "barrier_b_e": [x["barrier_b_e"] for x in m if x["barrier_b_e"] is not None],
                "agreement": [100 * x["agreement"] for x in m],
                "seeds": len(runs),
            }
        )
    return rows


def early_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The early-matching rows, sorted by sparsity, e and pair: lists over
    seeds of ``accuracy`` (%), ``difference`` (percentage points against
    the paper's permuted run), ``barrier`` (pi_e(A_T)-B_T, nats),
    ``barrier_b_e`` (pi_e(A_T)-B_e, nats) and ``agreement`` (% of units
    mapped as the paper's pi maps them), with ``epoch``, ``pair``, ``k``,
    ``sparsity`` and ``epochs_saved``."""
    order = {p: i for i, p in enumerate(_PAIR_WORDS)}
    return sorted(_rows(results, "early"), key=lambda r: (r["sparsity"], r["epoch"], order[r["pair"]]))


def source_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The matching-source rows (as :func:`early_rows`, without the
    early-matching fields), sorted by sparsity and source."""
    order = {s: i for i, s in enumerate(_SOURCE_WORDS)}
    return sorted(_rows(results, "source"), key=lambda r: (r["sparsity"], order[r["source"]]))


def has_early_matching(results: dict[str, Any]) -> bool:
    """Whether the run has early-matching rows (and so the early-matching plot)."""
    return any(m["family"] == "early" for m in _variants(results)["matching"])


def ensemble_epochs(results: dict[str, Any], method: str, epoch: int | None = None) -> int:
    """Training epochs (passes over the training set, dense or sparse: equal
    cost on dense hardware) spent on the shared-mask ensemble of ``method``
    with N = ``seeds`` members, T epochs, rewind point k and R IMP rounds of
    ``imp_epochs`` to the protocol's sparsity: dense N T; IMP N (T + R
    imp_epochs); LTH T + R imp_epochs (A_0 and its mask, once) + N (T - k);
    naive that + N k (each B_s to B_k); permuted that + N T (each B_s trained
    to B_T for its matching pi'_s); permuted with early matching at
    ``epoch`` = e that + N max(e, k) instead (each B_s trained to B_e, and
    at least to B_k). Matching itself (a pass over the data in evaluation
    mode) is not counted."""
    config, shared = results["config"], results["shared_mask"]
    n, epochs, k = config["seeds"], config["epochs"], shared["k"]
    rounds = sum(1 for level in results["imp_schedule"] if level <= shared["sparsity"] + 1e-9)
    mask = epochs + rounds * config["imp_epochs"]
    cost = {
        "dense": n * epochs,
        "imp": n * mask,
        "lth": mask + n * (epochs - k),
        "naive": mask + n * (epochs - k) + n * k,
        "permuted": mask + n * (epochs - k) + n * (epochs if epoch is None else max(epoch, k)),
    }
    return cost[method]


def _reference_rows(results: dict[str, Any], target: float, k: int) -> list[str]:
    """The paper's permuted run (e = T, all the data, dense A_T) and naive, as table rows."""
    config = results["config"]
    perm = [v for (s, kk, t), v in _paper_accuracy(results).items() if kk == k and t == target]
    naive = [v for (s, kk, t), v in _paper_accuracy(results, "naive").items() if kk == k and t == target]
    barriers = list(_paper_barriers(results).values())
    rows = [
        f"| {100 * target:g}% | T={config['epochs']} (paper) | A_T -> B_T | 0 | {fmt_values(perm)} | 0 | - | "
        f"{fmt_values(barriers, 4)} | - | 100 |"
    ]
    if naive:
        rows.append(f"| {100 * target:g}% | naive (no permutation) | - | - | {fmt_values(naive)} | - | - | - | - | - |")
    return rows


def _early_section(results: dict[str, Any]) -> list[str]:
    rows = early_rows(results)
    if not rows:
        return []
    seeds = results["config"]["seeds"]
    lines = [
        "",
        f"## Early matching: B trained only e epochs, mean +- std over {seeds} seed(s)",
        "",
        f"The permutation from A_T -> B_e or A_e -> B_e (B, and A, after e of T={results['config']['epochs']} "
        f"epochs), used for pi_e(m_A) and sparse training from B_k (k={rows[0]['k']}) for T - k epochs with the "
        "data order of the paper's permuted run. B epochs saved: dense epochs of B not trained, T - max(e, k). "
        "Accuracy and its paired difference to the paper's permuted run in % and percentage points; barriers "
        "in nats (pi_e(A_T) to B_T, and to B_e); agreement: % of units mapped as the paper's pi maps them. "
        "Beyond noise: |mean difference| > 2 standard errors over seeds.",
        "",
        "| S | e | matched | B epochs saved | perm. acc | diff. vs paper | beyond noise | barrier to B_T "
        "| barrier to B_e | agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    previous = None
    for r in rows:
        if r["sparsity"] != previous:
            lines += _reference_rows(results, r["sparsity"], r["k"])
            previous = r["sparsity"]
        lines.append(
            f"| {100 * r['sparsity']:g}% | {r['epoch']} | {_PAIR_WORDS[r['pair']]} | {r['epochs_saved']} | "
            f"{fmt_values(r['accuracy'])} | {fmt_values(r['difference'])} | {_beyond_noise(r['difference'])} | "
            f"{fmt_values(r['barrier'], 4)} | {fmt_values(r['barrier_b_e'], 4)} | {fmt_values(r['agreement'], 1)} |"
        )
    return lines


def _source_section(results: dict[str, Any]) -> list[str]:
    rows = source_rows(results)
    if not rows:
        return []
    config = results["config"]
    paper = _paper_accuracy(results)
    barriers = list(_paper_barriers(results).values())
    lines = [
        "",
        f"## Matching sources, mean +- std over {config['seeds']} seed(s)",
        "",
        "Where the permutation comes from, against the paper's (activation matching of dense A_T to dense B_T on "
        f"all the training data): a subset of {config.get('subset_samples')} training samples, A's pruned IMP "
        "solution at the row's sparsity, or dense A_T with each unit weighted by the surviving mass of m_A. "
        f"Sparse training from B_k (k={rows[0]['k']}) with the data order of the paper's permuted run; columns "
        "as in the early-matching table.",
        "",
        "| S | source | perm. acc | diff. vs paper | beyond noise | barrier to B_T | agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    previous = None
    for r in rows:
        if r["sparsity"] != previous:
            perm = [v for (s, kk, t), v in paper.items() if kk == r["k"] and t == r["sparsity"]]
            lines.append(
                f"| {100 * r['sparsity']:g}% | paper (all data, dense A_T) | {fmt_values(perm)} | 0 | - | "
                f"{fmt_values(barriers, 4)} | 100 |"
            )
            previous = r["sparsity"]
        lines.append(
            f"| {100 * r['sparsity']:g}% | {_SOURCE_WORDS[r['source']]} | {fmt_values(r['accuracy'])} | "
            f"{fmt_values(r['difference'])} | {_beyond_noise(r['difference'])} | {fmt_values(r['barrier'], 4)} | "
            f"{fmt_values(r['agreement'], 1)} |"
        )
    return lines


_ENSEMBLE_LABELS = {
    "dense": "dense",
    "imp": "IMP",
    "lth": "LTH",
    "naive": "naive",
    "permuted": "perm., matched at e = T",
}


def _ensemble_section(results: dict[str, Any]) -> list[str]:
    """Permuted ensembles with early matching next to the shared-mask
    protocol's ensembles, with the training epochs of each."""
    ensembles = _variants(results).get("ensembles") or {}
    rows = ensembles.get("diversity") or []
    shared = results.get("shared_mask")
    if not rows or not shared:
        return []
    config = results["config"]
    lines = [
        "",
        f"## Permuted ensembles with early matching, at sparsity {100 * shared['sparsity']:g}%, k={shared['k']}",
        "",
        f"The shared-mask protocol's ensembles of {config['seeds']} members (one pruned A_0, one mask m_A0), and "
        "permuted ensembles whose member s is B_s,k with pi'_s,e(m_A0), pi'_s,e the matching A_0,T -> B_s,e: "
        "each B_s trained to max(e, k) instead of T. Member test accuracy mean +- std over members; ensemble "
        "accuracy from the averaged probabilities; pairwise disagreement, KL and JS (nats); training epochs of "
        "the whole ensemble (passes over the training set, shared parts once).",
        "",
        "| ensemble | test acc. (%) | ensemble acc. (%) | disagreement | KL | JS | training epochs |",
        "|---|---|---|---|---|---|---|",
    ]

    def line(label: str, r: dict[str, Any], epochs: int) -> str:
        return (
            f"| {label} | {fmt_values([100 * a for a in r['member_accuracies']])} | "
            f"{100 * r['ensemble_accuracy']:.2f} | "
            f"{r['disagreement']:.4f} | {r['kl']:.4f} | {r['js']:.4f} | {epochs} |"
        )

    for r in shared["diversity"]:
        if r["method"] in _ENSEMBLE_LABELS:
            lines.append(line(_ENSEMBLE_LABELS[r["method"]], r, ensemble_epochs(results, r["method"])))
    for r in sorted(rows, key=lambda r: r["epoch"]):
        label = f"perm., matched at e = {r['epoch']}"
        lines.append(line(label, r, ensemble_epochs(results, "permuted", r["epoch"])))
    return lines


def sections(results: dict[str, Any]) -> list[str]:
    """The markdown lines of the studies' tables (none without studies)."""
    return [*_early_section(results), *_source_section(results), *_ensemble_section(results)]


def plot_early_matching(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``early_matching.png``: permuted test accuracy (%) against e, the
    epochs B was trained before matching, one panel per sparsity (each with
    its own y range), a line per
    pair (A_T -> B_e, A_e -> B_e), mean +- std over seeds; the paper's
    permuted run (e = T) and naive at the same k as horizontal lines.

    Raises:
        ImportError: matplotlib is not installed.
    """
    rows = early_rows(results)
    targets = sorted({r["sparsity"] for r in rows})
    cols = 2 if len(targets) == 4 else min(len(targets), 3)
    rows_of_panels = -(-len(targets) // cols)
    fig = new_figure((3.9 * cols + 0.4, 3.1 * rows_of_panels + 1.0))
    grid = fig.subplots(rows_of_panels, cols, squeeze=False)  # own y range per panel: naive can be far below
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(targets) :]:
        ax.set_visible(False)
    epochs = results["config"]["epochs"]
    styles = {"AT-Be": {"color": "#2ca02c", "marker": "o"}, "Ae-Be": {"color": "#9467bd", "marker": "s"}}
    for ax, target in zip(axes, targets):
        for pair, style in styles.items():
            line = [r for r in rows if r["sparsity"] == target and r["pair"] == pair]
            stats = [mean_std(r["accuracy"]) for r in line]
            ax.errorbar(
                [r["epoch"] for r in line],
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                capsize=3,
                label=f"permuted, matched {_PAIR_WORDS[pair]}",
                **style,
            )
        k = rows[0]["k"]
        for method, label, color in (
            ("permuted", f"permuted, matched at e = T = {epochs}", "#1f77b4"),
            ("naive", "naive (no permutation)", "#d62728"),
        ):
            values = [v for (s, kk, t), v in _paper_accuracy(results, method).items() if kk == k and t == target]
            if values:
                ax.axhline(mean_std(values)[0], color=color, linestyle="--", label=label)
        ax.set_xticks(sorted({r["epoch"] for r in rows}))
        ax.set_title(f"sparsity {100 * target:g}%, k = {k}")
        ax.set_xlabel("e: epochs B was trained before matching")
        ax.grid(alpha=0.3)
    for ax in axes[: len(targets)]:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(f"test accuracy (%),\nmean +- std over {results['config']['seeds']} seeds")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2)
    save_png(fig, path)
