"""Tables and plots of :func:`maskalign.repro.experiment.reproduce` results.

``results.md`` lays the accuracies out like Tables 3-5 of the workshop paper
(rows: sparsity x method, columns: rewind point k, mean +- sample std over
seeds), then the IMP accuracies, the LMC barriers, the ensemble diversity over
seeds (its mode stated) and the ICML paper's Table 1 itself (the shared-mask
protocol: one mask m_A0 shared by every member). Plots follow the papers'
figures: accuracy vs rewind point per sparsity (dense accuracy as a grey
line), accuracy vs sparsity per rewind point, and LMC curves; ``summary.png``
shows the run at a glance (accuracy vs sparsity, loss barriers before and
after matching). Everything is rendered from the results dict alone, so
:func:`render` re-draws a finished run from its ``results.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .._utils.fileio import atomic_write
from . import study_report
from .presets import METHODS
from .report_format import MeanStd, fmt, mean_std, new_figure, save_png

__all__ = [
    "brief_summary",
    "markdown_table",
    "plot_accuracy",
    "plot_accuracy_vs_rewind",
    "plot_lmc",
    "plot_summary",
    "render",
    "summarize",
    "write_results",
]

_LABELS = {"lth": "LTH", "naive": "naive", "permuted": "perm.", "random": "random", "imp": "IMP", "dense": "dense"}
_SPARSE_PAIRS = ("lth-naive", "pi(lth)-permuted", "naive-permuted")


def _select(rows: Iterable[dict[str, Any]], key: str, **match: Any) -> list[float]:
    return [r[key] for r in rows if all(r.get(k) == v for k, v in match.items())]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Means and sample stds over seeds.

    Returns:
        ``dense``: test accuracy (%) of all dense models; ``accuracy``:
        ``{sparsity: {method: {k: (mean, std)}}}`` test accuracy (%);
        ``imp``: ``{sparsity: (mean, std)}`` (%); ``barrier``:
        ``{(pair, k, sparsity): (mean, std)}`` test-loss barrier, with
        ``k = sparsity = None`` for the dense pairs ``A-B`` / ``pi(A)-B``.
    """
    config = results["config"]
    accuracy: dict[float, dict[str, dict[int, MeanStd]]] = {}
    for target in config["sparsities"]:
        accuracy[target] = {}
        for method in config["methods"]:
            row = {}
            for k in config["rewind_epochs"]:
                accs = [100 * a for a in _select(results["sparse"], "test_acc", sparsity=target, method=method, k=k)]
                if accs:
                    row[k] = mean_std(accs)
            accuracy[target][method] = row
    imp = {
        t: mean_std([100 * a for a in _select(results["imp"], "test_acc", sparsity=t)]) for t in config["sparsities"]
    }
    barrier: dict[tuple[str, int | None, float | None], MeanStd] = {}
    for curve in results["lmc"]:
        key = (curve["pair"], curve["k"], curve["sparsity"])
        if key not in barrier:
            barrier[key] = mean_std(_select(results["lmc"], "barrier", pair=key[0], k=key[1], sparsity=key[2]))
    return {
        "dense": mean_std([100 * r["test_acc"] for r in results["dense"]]),
        "accuracy": accuracy,
        "imp": imp,
        "barrier": barrier,
    }


def _top5(results: dict[str, Any]) -> dict[str, Any] | None:
    """Top-5 test accuracy (%) laid out like :func:`summarize`'s ``dense``,
    ``accuracy`` and ``imp`` (``imp`` holds only the sparsities whose records
    carry it), from the records' ``test_top5`` (ImageNet's); ``None`` when
    the dense records carry none (the other data sets)."""
    if not any("test_top5" in r for r in results["dense"]):
        return None
    config = results["config"]

    def top5(rows: Iterable[dict[str, Any]], **match: Any) -> list[float]:
        return [100 * r["test_top5"] for r in rows if "test_top5" in r and all(r.get(k) == v for k, v in match.items())]

    accuracy: dict[float, dict[str, dict[int, MeanStd]]] = {}
    for target in config["sparsities"]:
        accuracy[target] = {}
        for method in config["methods"]:
            found = {k: top5(results["sparse"], sparsity=target, method=method, k=k) for k in config["rewind_epochs"]}
            accuracy[target][method] = {k: mean_std(v) for k, v in found.items() if v}
    imp = {t: mean_std(v) for t in config["sparsities"] if (v := top5(results["imp"], sparsity=t))}
    return {"dense": mean_std(top5(results["dense"])), "accuracy": accuracy, "imp": imp}


def _settings_line(config: dict[str, Any]) -> str:
    return (
        f"T={config['epochs']} epochs, rewind points k={config['rewind_epochs']}, "
        f"sparsities {config['sparsities']}, {config['seeds']} seed(s), batch {config['batch_size']}, "
        f"SGD momentum {config['momentum']}, weight decay {config['weight_decay']}, cosine schedule, "
        f"dense lr {config['lr']}, sparse lr {config['sparse_lr']}, augmentation {config['augment']}; "
        f"IMP without rewinding: {config['prune_rate']:g} of the remaining weights per round, "
        f"{config['imp_epochs']} epochs per round at lr {config['imp_lr']}. "
        f"{_recipe_words(config)}"
    )


def _recipe_words(config: dict[str, Any]) -> str:
    """The matching recipe in words (results from before it was a setting: the then-only recipe)."""
    points = config.get("match_points", "pre")
    stream = config.get("match_stream_points", "all")
    where = {"pre": "pre-activations", "post": "post-activations", "both": "pre- and post-activations"}[points]
    streams = "every point of a residual stage" if stream == "all" else "the last point of each residual stage"
    return f"Permutation: activation matching (correlation) of {where}; residual streams on {streams}."


def _accuracy_section(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """The opening of ``results.md``: heading, settings, dense accuracy and
    the test-accuracy table by rewind point (``summary``: :func:`summarize`);
    when the records carry top-5 accuracy (ImageNet, the paper's Figure 7
    metric), the dense top-5 accuracy and a top-5 table after it."""
    config = results["config"]
    ks = config["rewind_epochs"]
    top5 = _top5(results)
    preset = results.get("preset") or "custom settings"
    width = f"x{config['width']}" if config["model"] != "mlp" else f" {config['hidden']}"
    lines = [
        f"# maskalign reproduce: {preset} ({config['model']}{width} on {config['dataset']}, {results['device']})",
        "",
        _settings_line(config),
        "",
        f"Dense test accuracy (A and B, all seeds): {fmt(summary['dense'])} %.",
        *([] if top5 is None else ["", f"Dense top-5 test accuracy (A and B, all seeds): {fmt(top5['dense'])} %."]),
        "",
        f"## Test accuracy (%) by rewind point k, mean +- std over {config['seeds']} seed(s)",
        "",
        "LTH: A_k with m_A; naive: B_k with m_A; perm.: B_k with pi(m_A); random: B_k with a random mask "
        "of m_A's per-layer density; each trained for T - k epochs.",
        "",
        "| S | method | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    lines += _accuracy_rows(summary["accuracy"], ks)
    if top5 is not None:
        lines += [
            "",
            f"## Top-5 test accuracy (%) by rewind point k, mean +- std over {config['seeds']} seed(s)",
            "",
            "| S | method | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks),
            *_accuracy_rows(top5["accuracy"], ks),
        ]
    return lines


def _accuracy_rows(accuracy: dict[float, dict[str, dict[int, MeanStd]]], ks: Sequence[int]) -> list[str]:
    """The rows of an accuracy table by rewind point: one per sparsity and method."""
    lines = []
    for target, methods in accuracy.items():
        for i, (method, row) in enumerate(methods.items()):
            cells = " | ".join(fmt(row.get(k)) for k in ks)
            lines.append(f"| {f'{100 * target:g}%' if i == 0 else ''} | {_LABELS[method]} | {cells} |")
    return lines


def _dense_barriers(summary: dict[str, Any]) -> tuple[str, str]:
    """The dense A-B loss barrier before and after matching, formatted (nats)."""
    return fmt(summary["barrier"].get(("A-B", None, None)), 4), fmt(summary["barrier"].get(("pi(A)-B", None, None)), 4)


def markdown_table(results: dict[str, Any]) -> str:
    """The whole ``results.md``: accuracy by rewind point (Tables 3-5 of the
    workshop paper), IMP accuracy, LMC barriers, ensemble diversity over seeds
    at the largest rewind point, and the shared-mask protocol's diversity laid
    out like the ICML paper's Table 1."""
    config = results["config"]
    summary = summarize(results)
    ks = config["rewind_epochs"]
    before, after = _dense_barriers(summary)
    lines = _accuracy_section(results, summary)
    lines += [
        "",
        "## IMP (the pruned solution w_A^T * m_A), test accuracy (%)",
        "",
        *_imp_rows(summary["imp"], (_top5(results) or {}).get("imp")),
        "",
        "## Linear mode connectivity: test-loss barrier (nats), mean +- std over seeds",
        "",
        f"Dense A-B before matching: {before}; after activation matching, pi(A)-B: {after}.",
        "",
        "Between sparse solutions (effective weights w * m interpolated; LTH mapped to B's units by pi):",
        "",
        "| S | k | " + " | ".join(_SPARSE_PAIRS) + " |",
        "|---|---|" + "---|" * len(_SPARSE_PAIRS),
    ]
    for target in config["sparsities"]:
        for k in ks:
            barriers = [fmt(summary["barrier"].get((p, k, target)), 4) for p in _SPARSE_PAIRS]
            if any(c != "-" for c in barriers):
                lines.append(f"| {100 * target:g}% | {k} | " + " | ".join(barriers) + " |")
    lines += ["", *_diversity_section(results), *_shared_mask_section(results), *study_report.sections(results)]
    return "\n".join(lines)


def _imp_rows(imp: dict[float, MeanStd], top5: dict[float, MeanStd] | None) -> list[str]:
    """The IMP accuracy table (%): top-1, and top-5 beside it when the records carry it."""
    if not top5:
        return ["| S | IMP |", "|---|---|", *(f"| {100 * t:g}% | {fmt(v)} |" for t, v in imp.items())]
    rows = (f"| {100 * t:g}% | {fmt(v)} | {fmt(top5.get(t))} |" for t, v in imp.items())
    return ["| S | IMP | IMP top-5 |", "|---|---|---|", *rows]


def brief_summary(results: dict[str, Any]) -> str:
    """What ``maskalign reproduce`` prints at the end of a run: the opening
    of :func:`markdown_table` (heading, settings, dense accuracy and the
    accuracy table by rewind point, in %) and the dense loss barrier (nats)
    before and after matching. The IMP, sparse-barrier and diversity tables
    are in ``results.md`` only."""
    summary = summarize(results)
    before, after = _dense_barriers(summary)
    head = "\n".join(_accuracy_section(results, summary))
    return f"{head}\n\nLoss barrier between dense A and B (nats): {before} before matching, {after} after (pi(A)-B)."


#: Row order of the ICML paper's Table 1.
_TABLE1_ORDER = ("dense", "imp", "lth", "permuted", "naive")


def _shared_mask_section(results: dict[str, Any]) -> list[str]:
    """The shared-mask protocol laid out like the ICML paper's Table 1: member
    test accuracy (mean +- sample std over the members), ensemble accuracy,
    pairwise disagreement, KL and JS. Empty when the run has none (one seed,
    or results written before the protocol existed)."""
    shared = results.get("shared_mask")
    if not shared:
        return []
    seeds = results["config"]["seeds"]
    rows = {r["method"]: r for r in shared["diversity"]}
    lines = [
        "",
        f"## Ensemble diversity, shared-mask protocol (ICML paper Table 1) at sparsity "
        f"{100 * shared['sparsity']:g}%, k={shared['k']}",
        "",
        f"Protocol **{shared['protocol']}** (ICML Sec. 4.2, after Evci et al. 2022): one pruned model A_0 and one "
        f"mask m_A0 shared by all {seeds} members s = 0..{seeds - 1}. LTH: A_0,k with m_A0, trained with "
        "data-order seed s; naive: B_s,k with m_A0; perm.: B_s,k with pi'_s(m_A0), pi'_s the activation matching "
        "A_0 -> B_s; dense: the independently trained A_s,T; IMP: the pruned solution of each A_s. "
        "Metrics are means over the pairs of members (KL over both orders); ensemble accuracy from the averaged "
        "probabilities of all members. Training epochs: every epoch the ensemble cost, shared parts once "
        "(A_0 and its IMP rounds for LTH, naive and perm.; each B_s trained to B_T for perm.'s matching).",
        "",
        "| solution | test acc. (%) | ensemble acc. (%) | disagreement | KL | JS | training epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in (m for m in _TABLE1_ORDER if m in rows):
        r = rows[method]
        acc = mean_std([100 * a for a in r["member_accuracies"]])
        epochs = study_report.ensemble_epochs(results, method)
        lines.append(
            f"| {_LABELS[method]} | {fmt(acc)} | {100 * r['ensemble_accuracy']:.2f} | "
            f"{r['disagreement']:.4f} | {r['kl']:.4f} | {r['js']:.4f} | {epochs} |"
        )
    return lines


def _diversity_section(results: dict[str, Any]) -> list[str]:
    """Diversity tables over seeds (the metrics of ICML Table 1) at the largest rewind point, one per mode."""
    config = results["config"]
    k = max(config["rewind_epochs"])
    rows = [r for r in results.get("diversity", []) if r["k"] in (None, k)]
    summary = summarize(results)
    lines = [
        f"## Ensemble diversity over seeds (the metrics of ICML paper Table 1) at k={k}, on the test set",
        "",
        "Disagreement: fraction of test samples whose top-1 predictions differ; KL, JS: divergences of the "
        "predictive distributions in nats (float64, from log-probabilities); ensemble accuracy: argmax of the "
        "averaged probabilities of all seeds' models.",
    ]
    modes = (
        (
            "pairwise",
            f"Mode **pairwise**: mean over the pairs of the {config['seeds']} seeds' models (each seed has its "
            "own A, B and mask m_A; the ICML paper's Table 1 ensembles runs that share one mask m_A: see the "
            "shared-mask table below).",
        ),
        (
            "reference",
            "Mode **reference**: each seed's model against the dense A_T of the same seed "
            "(dense row: B_T against A_T), averaged over seeds; KL is KL(reference || model).",
        ),
    )
    for mode, text in modes:
        selected = [r for r in rows if r["mode"] == mode]
        if not selected:
            continue
        lines += [
            "",
            text,
            "",
            "| S | solution | test acc. (%) | ensemble acc. (%) | disagreement | KL | JS |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in selected:
            if r["method"] == "dense":
                acc = summary["dense"]
            elif r["method"] == "imp":
                acc = summary["imp"][r["sparsity"]]
            else:
                acc = summary["accuracy"][r["sparsity"]][r["method"]].get(k)
            ensemble = "-" if r["ensemble_accuracy"] is None else f"{100 * r['ensemble_accuracy']:.2f}"
            target = "-" if r["sparsity"] is None else f"{100 * r['sparsity']:g}%"
            lines.append(
                f"| {target} | {_LABELS[r['method']]} | {fmt(acc)} | {ensemble} | "
                f"{r['disagreement']:.4f} | {r['kl']:.4f} | {r['js']:.4f} |"
            )
    return lines


# ---------------------------------------------------------------- plots
#
# Every figure is built by a ``_figure_*`` function that returns the
# matplotlib Figure (tests inspect it) and saved by its public ``plot_*``.
# One style per method and per LMC pair, shared by all figures; one shared
# legend per figure, outside the panels (below them), so no legend covers data.

#: Colour, marker and line style of each method, the same in every figure.
_STYLES: dict[str, dict[str, Any]] = {
    "lth": {"color": "#1f77b4", "marker": "o", "linestyle": "-"},
    "imp": {"color": "black", "marker": "s", "linestyle": "--", "markerfacecolor": "none"},
    "permuted": {"color": "#2ca02c", "marker": "^", "linestyle": "-"},
    "naive": {"color": "#ff7f0e", "marker": "D", "linestyle": ":"},
    "random": {"color": "#9467bd", "marker": "v", "linestyle": "-."},
}
#: The dense reference line (mean over all dense models A and B).
_DENSE_STYLE: dict[str, Any] = {"color": "#7f7f7f", "linestyle": "-", "linewidth": 2.0, "alpha": 0.6}
_DENSE_LABEL = "dense (A and B)"

#: LMC pairs: legend label and style. The curve runs from the first model
#: (alpha = 0) to the second (alpha = 1).
_PAIR_STYLES: dict[str, tuple[str, dict[str, Any]]] = {
    "A-B": ("A-B, before matching", {"color": "#d62728", "marker": "x", "linestyle": ":"}),
    "pi(A)-B": ("pi(A)-B, after matching (A permuted to B)", {"color": "#2ca02c", "marker": "^", "linestyle": "-"}),
    "lth-naive": ("LTH-naive", {"color": "#ff7f0e", "marker": "D", "linestyle": ":"}),
    "pi(lth)-permuted": (
        "pi(LTH)-perm. (LTH permuted to B)",
        {"color": "#17becf", "marker": "o", "linestyle": "-"},
    ),
    "naive-permuted": ("naive-perm.", {"color": "#8c564b", "marker": "s", "linestyle": "-."}),
}
#: Bars of the summary's barrier panel: unaligned pairs vs pairs aligned by pi.
_UNALIGNED_COLOR, _ALIGNED_COLOR = "#d62728", "#2ca02c"

_PANEL_WIDTH, _PANEL_HEIGHT = 3.6, 3.1


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _percent(fraction: float) -> str:
    """A sparsity written the one way of every plot: ``0.968 -> "96.8%"``."""
    return f"{100 * fraction:.4g}%"


def _seeds_words(results: dict[str, Any], what: str = "mean +- std") -> str:
    """``"mean +- std over 3 seeds"``, or ``"1 seed"`` (no std to show)."""
    seeds = results["config"]["seeds"]
    return "1 seed" if seeds == 1 else f"{what} over {seeds} seeds"


def _accuracy_label(results: dict[str, Any]) -> str:
    return f"test accuracy (%),\n{_seeds_words(results)}"


def _errorbar(ax: Any, xs: Sequence[float], stats: Sequence[MeanStd], results: dict[str, Any], **style: Any) -> None:
    """One line of ``(mean, std)`` points on ``ax``, std error bars unless there is one seed."""
    yerr = None if results["config"]["seeds"] == 1 else [e for _, e in stats]
    ax.errorbar(xs, [m for m, _ in stats], yerr=yerr, capsize=3, markersize=5, **style)


def _grid(count: int, *, sharey: bool = True) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels, at most 3 per row (4 as 2 x 2), so it
    reads at the width of a page; the unused panels hidden."""
    cols = 2 if count == 4 else min(count, 3)
    rows = -(-count // cols)
    fig = new_figure((_PANEL_WIDTH * cols + 0.4, _PANEL_HEIGHT * rows + 1.0))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    for ax in flat[:count]:
        ax.grid(alpha=0.3)
    return fig, flat[:count]


def _ylabel(axes: Sequence[Any], label: str) -> None:
    """``label`` on the first panel of every row."""
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(label)


def _shared_legend(fig: Any, axes: Sequence[Any], ncols: int | None = None) -> Any:
    """One legend for the figure, below the panels (outside every axes), from
    the labelled artists of ``axes`` (first occurrence of each label)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if _DENSE_LABEL in handles:  # the reference line last
        handles[_DENSE_LABEL] = handles.pop(_DENSE_LABEL)
    ncols = ncols or min(len(handles), 6)
    try:
        return fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=ncols)
    except ValueError:  # matplotlib < 3.7 has no "outside" locations: reserve a band at the bottom
        fig.get_layout_engine().set(rect=(0, 0.1, 1, 0.9))
        return fig.legend(handles.values(), handles.keys(), loc="lower center", ncols=ncols)


def _sparsity_axis(ax: Any, targets: Sequence[float]) -> None:
    """Sparsity on a logit axis (90%, 95%, 98%, 99% spread out), ticked at the measured levels."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("logit")
    ax.set_xticks(list(targets), [_percent(t) for t in targets])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("sparsity (%), logit axis")


def _dense_line(ax: Any, summary: dict[str, Any]) -> None:
    ax.axhline(summary["dense"][0], label=_DENSE_LABEL, **_DENSE_STYLE)


def _figure_accuracy_vs_rewind(results: dict[str, Any]) -> Any:
    """The figure of :func:`plot_accuracy_vs_rewind`."""
    summary = summarize(results)
    targets = list(summary["accuracy"])
    fig, axes = _grid(len(targets))
    for ax, target in zip(axes, targets):
        for method, row in summary["accuracy"][target].items():
            if row:
                ks = sorted(row)
                _errorbar(ax, ks, [row[k] for k in ks], results, label=_LABELS[method], **_STYLES[method])
        _dense_line(ax, summary)
        ax.set_title(f"sparsity {_percent(target)}")
        ax.set_xlabel("rewind point k (epochs)")
        ax.set_xticks(results["config"]["rewind_epochs"])
    _ylabel(axes, _accuracy_label(results))
    fig.suptitle(_title(results))
    _shared_legend(fig, axes)
    return fig


def _figure_accuracy(results: dict[str, Any]) -> Any:
    """The figure of :func:`plot_accuracy`."""
    summary = summarize(results)
    ks = results["config"]["rewind_epochs"]
    targets = list(summary["accuracy"])
    fig, axes = _grid(len(ks))
    for ax, k in zip(axes, ks):
        for method in METHODS:
            points = [(t, summary["accuracy"][t].get(method, {}).get(k)) for t in targets]
            present = [(t, v) for t, v in points if v is not None]
            if present:
                _errorbar(
                    ax, [t for t, _ in present], [v for _, v in present], results, label=_LABELS[method],
                    **_STYLES[method],
                )  # fmt: skip
        _errorbar(ax, targets, [summary["imp"][t] for t in targets], results, label="IMP", **_STYLES["imp"])
        _dense_line(ax, summary)
        ax.set_title(f"rewind point k = {k}")
        _sparsity_axis(ax, targets)
    _ylabel(axes, _accuracy_label(results))
    fig.suptitle(_title(results))
    _shared_legend(fig, axes)
    return fig


def _mean_curve(results: dict[str, Any], key: tuple[str, int | None, float | None]) -> tuple[list[float], list[float]]:
    """Alphas and the mean test loss over seeds of the LMC curves ``key``; empty when there are none."""
    curves = [c for c in results["lmc"] if (c["pair"], c["k"], c["sparsity"]) == key]
    if not curves:
        return [], []
    return curves[0]["alphas"], [sum(v) / len(v) for v in zip(*(c["losses"] for c in curves))]


def _figure_lmc(results: dict[str, Any]) -> Any:
    """The figure of :func:`plot_lmc`."""
    config = results["config"]
    k = max(config["rewind_epochs"])
    dense_x = "interpolation weight alpha\n(0 = A or pi(A), 1 = B)"
    sparse_x = "interpolation weight alpha\n(0 = first, 1 = second of each pair)"
    panels: list[tuple[str, str, list[tuple[str, int | None, float | None]]]] = [
        ("dense models A and B", dense_x, [("A-B", None, None), ("pi(A)-B", None, None)])
    ]
    panels += [
        (f"sparsity {_percent(t)}, k = {k}", sparse_x, [(p, k, t) for p in _SPARSE_PAIRS]) for t in config["sparsities"]
    ]
    present = {(c["pair"], c["k"], c["sparsity"]) for c in results["lmc"]}
    panels = [panel for panel in panels if present.intersection(panel[2])]
    fig, axes = _grid(len(panels))
    for ax, (title, xlabel, keys) in zip(axes, panels):
        for key in keys:
            alphas, mean = _mean_curve(results, key)
            if alphas:
                label, style = _PAIR_STYLES[key[0]]
                ax.plot(alphas, mean, label=label, markersize=5, **style)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
    _ylabel(axes, f"test loss (nats),\n{_seeds_words(results, 'mean')}")
    fig.suptitle(_title(results))
    _shared_legend(fig, axes, ncols=3)
    return fig


def _barrier_groups(results: dict[str, Any]) -> list[tuple[str, tuple[str, Any, Any], tuple[str, Any, Any]]]:
    """Groups of the summary's barrier panel: ``(name, unaligned key, aligned key)``;
    the dense pair, then the sparse pairs at the largest rewind point, per sparsity."""
    config = results["config"]
    k = max(config["rewind_epochs"])
    groups: list[tuple[str, tuple[str, Any, Any], tuple[str, Any, Any]]] = [
        ("dense", ("A-B", None, None), ("pi(A)-B", None, None))
    ]
    groups += [(_percent(t), ("lth-naive", k, t), ("pi(lth)-permuted", k, t)) for t in config["sparsities"]]
    barrier = summarize(results)["barrier"]
    return [g for g in groups if g[1] in barrier and g[2] in barrier]


def _figure_summary(results: dict[str, Any]) -> Any:
    """The figure of :func:`plot_summary`."""
    summary = summarize(results)
    config = results["config"]
    k = max(config["rewind_epochs"])
    targets = list(summary["accuracy"])
    fig = new_figure((11.0, 4.8))
    halves = fig.subfigures(1, 2, width_ratios=(1.0, 1.15), wspace=0.02)
    left, right = (half.subplots() for half in halves)
    for method in ("lth", "permuted", "naive", "random"):
        points = [(t, summary["accuracy"][t].get(method, {}).get(k)) for t in targets]
        present = [(t, v) for t, v in points if v is not None]
        if present:
            _errorbar(
                left, [t for t, _ in present], [v for _, v in present], results, label=_LABELS[method],
                **_STYLES[method],
            )  # fmt: skip
    _dense_line(left, summary)
    _sparsity_axis(left, targets)
    left.set_ylabel(_accuracy_label(results))
    left.set_title(f"sparse training from rewind point k = {k}")
    left.grid(alpha=0.3)

    groups = _barrier_groups(results)
    barrier = summary["barrier"]
    xs = list(range(len(groups)))
    width = 0.38
    std = config["seeds"] > 1
    for offset, which, label, color in (
        (-width / 2, 1, "not aligned: A-B, LTH-naive", _UNALIGNED_COLOR),
        (width / 2, 2, "aligned by pi: pi(A)-B, pi(LTH)-perm.", _ALIGNED_COLOR),
    ):
        stats = [barrier[g[which]] for g in groups]
        bars = right.bar(
            [x + offset for x in xs], [m for m, _ in stats], width, yerr=[e for _, e in stats] if std else None,
            capsize=3, color=color, label=label,
        )  # fmt: skip
        right.bar_label(
            bars, labels=[f"{m:.2f}" if m >= 0.1 else f"{m:.3f}" for m, _ in stats], padding=2, fontsize="small"
        )
    right.set_xticks(xs, [g[0] for g in groups])
    right.set_xlabel(f"dense models, and sparse solutions at k = {k} by sparsity")
    right.set_ylabel(f"test-loss barrier (nats),\n{_seeds_words(results)}")
    right.set_title("loss barrier on the linear path, before / after matching")
    right.set_ylim(0, right.get_ylim()[1] * 1.1)
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(_title(results))
    _shared_legend(halves[0], (left,), ncols=3)
    _shared_legend(halves[1], (right,), ncols=1)
    return fig


def plot_accuracy_vs_rewind(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Test accuracy vs rewind point k (workshop Figs. 3-4).

    One panel per sparsity, one line per method (LTH, naive, perm., random):
    test accuracy in %, mean over seeds with sample-std error bars (no bars
    with one seed); the grey line is the mean dense accuracy of A and B.
    Saved as PNG atomically.

    Args:
        results: the results dict of :func:`~maskalign.repro.experiment.reproduce`.
        path: the PNG to write.

    Raises:
        ImportError: matplotlib is not installed.
    """
    save_png(_figure_accuracy_vs_rewind(results), path)


def plot_accuracy(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Test accuracy vs sparsity (workshop Fig. 7).

    One panel per rewind point k, one line per method plus IMP (the pruned
    solution, independent of k): test accuracy in %, mean over seeds with
    sample-std error bars; the grey line is the mean dense accuracy. The
    sparsity axis is a logit axis ticked at the measured levels. Saved as PNG
    atomically.

    Args:
        results: the results dict of :func:`~maskalign.repro.experiment.reproduce`.
        path: the PNG to write.

    Raises:
        ImportError: matplotlib is not installed.
    """
    save_png(_figure_accuracy(results), path)


def plot_lmc(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Test loss along the linear paths between models (LMC).

    First panel: the dense models, A to B before matching and pi(A) (A
    permuted to B's units) to B after; then one panel per sparsity at the
    largest rewind point: LTH to naive, pi(LTH) to perm., naive to perm.
    Each curve is the mean test loss (nats) over seeds at each interpolation
    weight alpha (0: the first model of the pair, 1: the second). Saved as
    PNG atomically.

    Args:
        results: the results dict of :func:`~maskalign.repro.experiment.reproduce`.
        path: the PNG to write.

    Raises:
        ImportError: matplotlib is not installed.
    """
    save_png(_figure_lmc(results), path)


def plot_summary(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """The run at a glance, two panels.

    Left: test accuracy (%) vs sparsity at the largest rewind point k for
    LTH, perm., naive and random, mean over seeds with sample-std error bars,
    and the mean dense accuracy as a grey reference line. Right: the
    test-loss barrier (nats, the largest rise of the test loss on the linear
    path above the straight line between its ends), mean over seeds with
    sample-std error bars, of the dense pair before matching (A-B) and after
    (pi(A)-B), and of the sparse solutions at that k per sparsity without
    alignment (LTH-naive) and with it (pi(LTH)-perm.). The title names the
    model, data and number of seeds. Saved as PNG atomically.

    Args:
        results: the results dict of :func:`~maskalign.repro.experiment.reproduce`.
        path: the PNG to write.

    Raises:
        ImportError: matplotlib is not installed.
    """
    save_png(_figure_summary(results), path)


def _title(results: dict[str, Any]) -> str:
    config = results["config"]
    model = f"mlp {config['hidden']}" if config["model"] == "mlp" else f"{config['model']}x{config['width']}"
    preset = f"preset {results['preset']!r}" if results.get("preset") else "custom settings"
    seeds = config["seeds"]
    return (
        f"{model} on {config['dataset']}, T={config['epochs']} epochs, "
        f"{seeds} seed{'s' if seeds != 1 else ''} ({preset})"
    )


def write_results(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (when matplotlib is
    installed) ``summary.png``, ``accuracy_vs_rewind.png``,
    ``accuracy_vs_sparsity.png`` and ``lmc.png`` into ``out_dir``, each
    atomically; returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / "results.json"}
    atomic_write(paths["json"], lambda h: json.dump(results, h, indent=1))
    return {**paths, **_render(results, out)}


def _render(results: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {"markdown": out / "results.md"}
    atomic_write(paths["markdown"], lambda h: h.write(markdown_table(results) + "\n"))
    if not _have_matplotlib():
        return paths
    for name, plot in (
        ("summary", plot_summary),
        ("accuracy_vs_rewind", plot_accuracy_vs_rewind),
        ("accuracy_vs_sparsity", plot_accuracy),
        ("lmc", plot_lmc),
    ):
        paths[name] = out / f"{name}.png"
        plot(results, paths[name])
    if study_report.has_early_matching(results):
        paths["early_matching"] = out / "early_matching.png"
        study_report.plot_early_matching(results, paths["early_matching"])
    return paths


def render(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Re-render ``results.md`` and the plots of a finished run from its
    ``results.json``; returns the paths written.

    Raises:
        FileNotFoundError: ``folder`` has no ``results.json``.
    """
    out = Path(folder)
    source = out / "results.json"
    if not source.is_file():
        raise FileNotFoundError(f"File {source} is missing; run `maskalign reproduce --out {out}` first.")
    return _render(json.loads(source.read_text()), out)
