"""Tables and plots of :func:`maskalign.repro.experiment.reproduce` results.

``results.md`` lays the accuracies out like Tables 3-5 of the workshop paper
(rows: sparsity x method, columns: rewind point k, mean +- sample std over
seeds), then the IMP accuracies, the LMC barriers, the ensemble diversity over
seeds (its mode stated) and the ICML paper's Table 1 itself (the shared-mask
protocol: one mask m_A0 shared by every member). Plots follow the papers'
figures: accuracy vs rewind point per sparsity (dense accuracy dashed),
accuracy vs sparsity per rewind point, and LMC curves. Everything is rendered
from the results dict alone, so :func:`render` re-draws a finished run from
its ``results.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .._utils.fileio import atomic_write
from .presets import METHODS

__all__ = [
    "markdown_table",
    "plot_accuracy",
    "plot_accuracy_vs_rewind",
    "plot_lmc",
    "render",
    "summarize",
    "write_results",
]

_LABELS = {"lth": "LTH", "naive": "naive", "permuted": "perm.", "random": "random", "imp": "IMP", "dense": "dense"}
_SPARSE_PAIRS = ("lth-naive", "pi(lth)-permuted", "naive-permuted")

MeanStd = tuple[float, float]


def _mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _fmt(value: MeanStd | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value[0]:.{digits}f} +- {value[1]:.{digits}f}"


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
                    row[k] = _mean_std(accs)
            accuracy[target][method] = row
    imp = {
        t: _mean_std([100 * a for a in _select(results["imp"], "test_acc", sparsity=t)]) for t in config["sparsities"]
    }
    barrier: dict[tuple[str, int | None, float | None], MeanStd] = {}
    for curve in results["lmc"]:
        key = (curve["pair"], curve["k"], curve["sparsity"])
        if key not in barrier:
            barrier[key] = _mean_std(_select(results["lmc"], "barrier", pair=key[0], k=key[1], sparsity=key[2]))
    return {
        "dense": _mean_std([100 * r["test_acc"] for r in results["dense"]]),
        "accuracy": accuracy,
        "imp": imp,
        "barrier": barrier,
    }


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


def markdown_table(results: dict[str, Any]) -> str:
    """The whole ``results.md``: accuracy by rewind point (Tables 3-5 of the
    workshop paper), IMP accuracy, LMC barriers, ensemble diversity over seeds
    at the largest rewind point, and the shared-mask protocol's diversity laid
    out like the ICML paper's Table 1."""
    config = results["config"]
    summary = summarize(results)
    ks = config["rewind_epochs"]
    seeds = config["seeds"]
    preset = results.get("preset") or "custom settings"
    width = f"x{config['width']}" if config["model"] != "mlp" else f" {config['hidden']}"
    lines = [
        f"# maskalign reproduce: {preset} ({config['model']}{width} on {config['dataset']}, {results['device']})",
        "",
        _settings_line(config),
        "",
        f"Dense test accuracy (A and B, all seeds): {_fmt(summary['dense'])} %.",
        "",
        f"## Test accuracy (%) by rewind point k, mean +- std over {seeds} seed(s)",
        "",
        "LTH: A_k with m_A; naive: B_k with m_A; perm.: B_k with pi(m_A); random: B_k with a random mask "
        "of m_A's per-layer density; each trained for T - k epochs.",
        "",
        "| S | method | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for target, methods in summary["accuracy"].items():
        for i, (method, row) in enumerate(methods.items()):
            cells = " | ".join(_fmt(row.get(k)) for k in ks)
            lines.append(f"| {f'{100 * target:g}%' if i == 0 else ''} | {_LABELS[method]} | {cells} |")
    lines += [
        "",
        "## IMP (the pruned solution w_A^T * m_A), test accuracy (%)",
        "",
        "| S | IMP |",
        "|---|---|",
        *(f"| {100 * t:g}% | {_fmt(v)} |" for t, v in summary["imp"].items()),
        "",
        "## Linear mode connectivity: test-loss barrier (nats), mean +- std over seeds",
        "",
        f"Dense A-B before matching: {_fmt(summary['barrier'].get(('A-B', None, None)), 4)}; "
        f"after activation matching, pi(A)-B: {_fmt(summary['barrier'].get(('pi(A)-B', None, None)), 4)}.",
        "",
        "Between sparse solutions (effective weights w * m interpolated; LTH mapped to B's units by pi):",
        "",
        "| S | k | " + " | ".join(_SPARSE_PAIRS) + " |",
        "|---|---|" + "---|" * len(_SPARSE_PAIRS),
    ]
    for target in config["sparsities"]:
        for k in ks:
            barriers = [_fmt(summary["barrier"].get((p, k, target)), 4) for p in _SPARSE_PAIRS]
            if any(c != "-" for c in barriers):
                lines.append(f"| {100 * target:g}% | {k} | " + " | ".join(barriers) + " |")
    lines += ["", *_diversity_section(results), *_shared_mask_section(results)]
    return "\n".join(lines)


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
        "probabilities of all members.",
        "",
        "| solution | test acc. (%) | ensemble acc. (%) | disagreement | KL | JS |",
        "|---|---|---|---|---|---|",
    ]
    for method in (m for m in _TABLE1_ORDER if m in rows):
        r = rows[method]
        acc = _mean_std([100 * a for a in r["member_accuracies"]])
        lines.append(
            f"| {_LABELS[method]} | {_fmt(acc)} | {100 * r['ensemble_accuracy']:.2f} | "
            f"{r['disagreement']:.4f} | {r['kl']:.4f} | {r['js']:.4f} |"
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
                f"| {target} | {_LABELS[r['method']]} | {_fmt(acc)} | {ensemble} | "
                f"{r['disagreement']:.4f} | {r['kl']:.4f} | {r['js']:.4f} |"
            )
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110), mode="wb")
    _pyplot().close(fig)


def _errorbar(ax: Any, xs: Sequence[float], stats: Sequence[tuple[float, float]], **style: Any) -> None:
    """One line of ``(mean, std)`` points with std error bars on ``ax``."""
    ax.errorbar(xs, [m for m, _ in stats], yerr=[e for _, e in stats], capsize=3, **style)


def _grid(plt: Any, count: int) -> tuple[Any, list[Any]]:
    cols = min(count, 4)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def plot_accuracy_vs_rewind(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Test accuracy vs rewind point k, one panel per sparsity, one line per
    method (error bars: std over seeds), dense accuracy dashed (workshop
    Figs. 3-4). Saved as PNG atomically. Needs matplotlib."""
    plt = _pyplot()
    summary = summarize(results)
    targets = list(summary["accuracy"])
    fig, axes = _grid(plt, len(targets))
    for ax, target in zip(axes, targets):
        for method, row in summary["accuracy"][target].items():
            if row:
                ks = sorted(row)
                _errorbar(ax, ks, [row[k] for k in ks], marker="o", label=_LABELS[method])
        ax.axhline(summary["dense"][0], linestyle="--", color="gray", label="dense")
        ax.set_title(f"sparsity = {target:g}")
        ax.set_xlabel("rewind point k (epochs)")
        ax.set_ylabel("test accuracy (%)")
    axes[0].legend()
    fig.suptitle(_title(results))
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Test accuracy vs sparsity, one panel per rewind point k, one line per
    method plus IMP (error bars: std over seeds), dense dashed (workshop
    Fig. 7). Saved as PNG atomically. Needs matplotlib."""
    plt = _pyplot()
    summary = summarize(results)
    ks = results["config"]["rewind_epochs"]
    targets = list(summary["accuracy"])
    fig, axes = _grid(plt, len(ks))
    for ax, k in zip(axes, ks):
        for method in METHODS:
            points = [(t, summary["accuracy"][t].get(method, {}).get(k)) for t in targets]
            points = [(t, v) for t, v in points if v is not None]
            if points:
                _errorbar(ax, [100 * t for t, _ in points], [v for _, v in points], marker="o", label=_LABELS[method])
        _errorbar(
            ax, [100 * t for t in targets], [summary["imp"][t] for t in targets], marker="s", label="IMP", color="black"
        )
        ax.axhline(summary["dense"][0], linestyle="--", color="gray", label="dense")
        ax.set_title(f"k = {k}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
    axes[0].legend()
    fig.suptitle(_title(results))
    fig.tight_layout()
    _save(fig, path)


def plot_lmc(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Mean test loss along the LMC paths (over seeds): dense A-B before and
    after matching, and the sparse pairs at the largest rewind point, one
    panel per sparsity. Saved as PNG atomically. Needs matplotlib."""
    plt = _pyplot()
    config = results["config"]
    k = max(config["rewind_epochs"])
    panels: list[tuple[str, list[tuple[str, int | None, float | None]]]] = [
        ("dense A-B", [("A-B", None, None), ("pi(A)-B", None, None)])
    ]
    panels += [(f"sparsity {t:g}, k={k}", [(p, k, t) for p in _SPARSE_PAIRS]) for t in config["sparsities"]]
    present = {(c["pair"], c["k"], c["sparsity"]) for c in results["lmc"]}
    panels = [(title, keys) for title, keys in panels if present.intersection(keys)]
    fig, axes = _grid(plt, len(panels))
    for ax, (title, keys) in zip(axes, panels):
        for pair, kk, target in keys:
            curves = [c for c in results["lmc"] if (c["pair"], c["k"], c["sparsity"]) == (pair, kk, target)]
            if curves:
                mean = [sum(v) / len(v) for v in zip(*(c["losses"] for c in curves))]
                ax.plot(curves[0]["alphas"], mean, marker=".", label=pair)
        ax.set_title(title)
        ax.set_xlabel("alpha")
        ax.set_ylabel("test loss")
        ax.legend(fontsize="small")
    fig.suptitle(_title(results))
    fig.tight_layout()
    _save(fig, path)


def _title(results: dict[str, Any]) -> str:
    config = results["config"]
    model = config["model"] if config["model"] == "mlp" else f"{config['model']}x{config['width']}"
    preset = f"preset {results['preset']!r}" if results.get("preset") else "custom settings"
    return f"{model} on {config['dataset']}, T={config['epochs']}, {config['seeds']} seeds ({preset})"


def write_results(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (when matplotlib is
    installed) ``accuracy_vs_rewind.png``, ``accuracy_vs_sparsity.png`` and
    ``lmc.png`` into ``out_dir``, each atomically; returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / "results.json"}
    atomic_write(paths["json"], lambda h: json.dump(results, h, indent=1))
    return {**paths, **_render(results, out)}


def _render(results: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {"markdown": out / "results.md"}
    atomic_write(paths["markdown"], lambda h: h.write(markdown_table(results) + "\n"))
    try:
        _pyplot()
    except ImportError:
        return paths
    for name, plot in (
        ("accuracy_vs_rewind", plot_accuracy_vs_rewind),
        ("accuracy_vs_sparsity", plot_accuracy),
        ("lmc", plot_lmc),
    ):
        paths[name] = out / f"{name}.png"
        plot(results, paths[name])
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
