"""Tables and plots of :func:`maskalign.experiment.reproduce` results."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .experiment import METHODS
from .fileio import atomic_write

__all__ = ["markdown_table", "plot_accuracy", "summarize", "write_results"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Mean and sample std over seeds: test accuracy (percent) per sparsity and
    method, dense accuracy, and loss barriers before/after matching."""
    dense = [r["test_acc"] * 100 for r in results["dense"]]
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for sparsity in sorted({r["sparsity"] for r in results["sparse"]}):
        row = {}
        for method in METHODS:
            accs = [
                r["test_acc"] * 100 for r in results["sparse"] if r["sparsity"] == sparsity and r["method"] == method
            ]
            if accs:
                row[method] = _mean_std(accs)
        table[f"{sparsity:g}"] = row
    return {
        "dense": _mean_std(dense),
        "accuracy": table,
        "barrier_before": _mean_std([b["before"] for b in results["barrier"]]),
        "barrier_after": _mean_std([b["after"] for b in results["barrier"]]),
    }


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (mean +- std test accuracy in percent
    over seeds), followed by the loss barrier between A and B."""
    summary = summarize(results)
    config = results["config"]
    seeds = len({r["seed"] for r in results["dense"]})
    dense_mean, dense_std = summary["dense"]
    lines = [
        f"Test accuracy (%) on {config['dataset']}, {config['model']} (width {config['width']}), "
        f"T={config['epochs']}, k={config['rewind_epoch']}, mean +- std over {seeds} seed(s).",
        "",
        "| sparsity | dense | LTH | naive | permuted | random |",
        "|---|---|---|---|---|---|",
    ]
    for sparsity, row in summary["accuracy"].items():
        cells = [f"{row[m][0]:.2f} +- {row[m][1]:.2f}" if m in row else "-" for m in METHODS]
        lines.append(f"| {sparsity} | {dense_mean:.2f} +- {dense_std:.2f} | " + " | ".join(cells) + " |")
    (b0, s0), (b1, s1) = summary["barrier_before"], summary["barrier_after"]
    lines += [
        "",
        f"Test-loss barrier between A and B: {b0:.4f} +- {s0:.4f} before matching, "
        f"{b1:.4f} +- {s1:.4f} after activation matching.",
    ]
    return "\n".join(lines)


def plot_accuracy(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Accuracy vs sparsity per method (error bars: std over seeds), dense
    accuracy dashed, saved to ``path`` (PNG) atomically. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    sparsities = [float(s) for s in summary["accuracy"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        points = [
            (s, summary["accuracy"][k][method])
            for s, k in zip(sparsities, summary["accuracy"])
            if method in summary["accuracy"][k]
        ]
        if points:
            xs = [100 * s for s, _ in points]
            ax.errorbar(
                xs, [m for _, (m, _) in points], yerr=[e for _, (_, e) in points], marker="o", capsize=3, label=method
            )
    ax.axhline(summary["dense"][0], linestyle="--", color="gray", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    config = results["config"]
    ax.set_title(f"{config['model']} on {config['dataset']}: LTH mask transfer")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120), mode="wb")
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``accuracy_vs_sparsity.png``
    (when matplotlib is installed) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write(paths["json"], lambda h: json.dump(results, h, indent=2))
    atomic_write(paths["markdown"], lambda h: h.write(markdown_table(results) + "\n"))
    try:
        plot_accuracy(results, out / "accuracy_vs_sparsity.png")
        paths["plot"] = out / "accuracy_vs_sparsity.png"
    except ImportError:
        pass
    return paths
