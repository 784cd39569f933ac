"""The plots of ``maskalign reproduce`` read at a glance: checked on the
matplotlib Figure objects the ``_figure_*`` builders return, from the results
of a tiny real run (2 seeds, and 1 seed for the single-seed wording).

* sparsity is written in percent in every title and tick label;
* axis labels say what is averaged (mean +- std over N seeds, or 1 seed) and
  the LMC axes say which model sits at alpha 0 and 1;
* no legend covers a plotted data point (checked in display coordinates
  after drawing; a legend deliberately put over data is caught);
* LTH and IMP differ in marker and line style, and every method keeps one
  style in every figure;
* the summary's barrier bars are the mean barriers over seeds of the results.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from maskalign.repro.experiment import reproduce  # noqa: E402
from maskalign.repro.presets import ReproduceConfig  # noqa: E402
from maskalign.repro.report import (  # noqa: E402
    _figure_accuracy,
    _figure_accuracy_vs_rewind,
    _figure_lmc,
    _figure_summary,
    _percent,
    write_results,
)

pytestmark = pytest.mark.slow  # a real (tiny) experiment per module

BUILDERS = {
    "accuracy_vs_rewind": _figure_accuracy_vs_rewind,
    "accuracy_vs_sparsity": _figure_accuracy,
    "lmc": _figure_lmc,
    "summary": _figure_summary,
}


def _run(tmp: Path, seeds: int) -> dict[str, Any]:
    config = ReproduceConfig(
        epochs=3, rewind_epochs=(0, 1), seeds=seeds, sparsities=(0.5, 0.8), hidden=(24, 24), imp_epochs=1,
        barrier_points=3, threads=1,
    )  # fmt: skip
    return reproduce(config, out=tmp)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("run2"), seeds=2)


@pytest.fixture(scope="module")
def results_one_seed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("run1"), seeds=1)


def _drawn(builder: Any, results: dict[str, Any]) -> Figure:
    fig = builder(results)
    assert isinstance(fig, Figure)
    fig.canvas.draw()  # runs the constrained layout: positions are final
    return fig


def _figures(fig: Any) -> Iterator[Any]:
    """The figure and its subfigures, recursively."""
    yield fig
    for sub in fig.subfigs:
        yield from _figures(sub)


def _legends(fig: Figure) -> list[Any]:
    found = [legend for f in _figures(fig) for legend in f.legends]
    return found + [ax.get_legend() for ax in fig.get_axes() if ax.get_legend() is not None]


def _visible_axes(fig: Figure) -> list[Any]:
    return [ax for ax in fig.get_axes() if ax.get_visible()]


def _data_points(ax: Any) -> list[tuple[float, float]]:
    """Every plotted data point of ``ax`` in display coordinates: line
    vertices (data lines, error-bar caps, reference lines), error-bar ends and
    the corners and centre of every bar."""
    points: list[tuple[float, float]] = []
    for line in ax.get_lines():
        if line.get_visible():
            points += [tuple(p) for p in line.get_transform().transform(line.get_xydata())]
    for collection in ax.collections:
        for segment in getattr(collection, "get_segments", lambda: [])():
            points += [tuple(p) for p in collection.get_transform().transform(segment)]
    for patch in ax.patches:
        box = patch.get_window_extent()
        points += [(box.x0, box.y0), (box.x1, box.y1), (box.x0, box.y1), (box.x1, box.y0)]
        points.append(((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2))
    return [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _overlaps(fig: Figure) -> list[str]:
    """``"<legend> covers <axes title> at (x, y)"`` for each data point inside a legend's box."""
    renderer = fig.canvas.get_renderer()
    found = []
    for legend in _legends(fig):
        box = legend.get_window_extent(renderer)
        for ax in _visible_axes(fig):
            for x, y in _data_points(ax):
                if box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1:
                    found.append(f"legend {box} covers {ax.get_title()!r} at ({x:.0f}, {y:.0f})")
    return found


def _errorbars(ax: Any) -> dict[str, ErrorbarContainer]:
    return {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}


def _titles(fig: Figure) -> list[str]:
    """Suptitles and panel titles (the sparsity axes' tick labels are checked on their own)."""
    texts = [f._suptitle.get_text() for f in _figures(fig) if f._suptitle is not None]
    return texts + [ax.get_title() for ax in _visible_axes(fig)]


def test_percent_helper_writes_one_format() -> None:
    assert [_percent(s) for s in (0.9, 0.968, 0.5, 0.99, 0.995)] == ["90%", "96.8%", "50%", "99%", "99.5%"]


def test_sparsity_is_written_in_percent_in_every_figure(results: dict[str, Any]) -> None:
    rewind = _drawn(_figure_accuracy_vs_rewind, results)
    assert [ax.get_title() for ax in _visible_axes(rewind)] == ["sparsity 50%", "sparsity 80%"]
    lmc = _drawn(_figure_lmc, results)
    assert [ax.get_title() for ax in _visible_axes(lmc)][1:] == ["sparsity 50%, k = 1", "sparsity 80%, k = 1"]
    for name in ("accuracy_vs_sparsity", "summary"):
        fig = _drawn(BUILDERS[name], results)
        first = _visible_axes(fig)[0]
        assert [t.get_text() for t in first.get_xticklabels()] == ["50%", "80%"], name
        assert first.get_xlabel().startswith("sparsity (%)"), name
    for name, builder in BUILDERS.items():
        for text in _titles(_drawn(builder, results)):
            assert "0.5" not in text and "0.8" not in text, (name, text)


def test_axis_labels_say_what_is_averaged(results: dict[str, Any], results_one_seed: dict[str, Any]) -> None:
    for name in ("accuracy_vs_rewind", "accuracy_vs_sparsity", "summary"):
        ylabel = _visible_axes(_drawn(BUILDERS[name], results))[0].get_ylabel()
        assert "test accuracy (%)" in ylabel and "mean +- std over 2 seeds" in ylabel, name
    summary = _visible_axes(_drawn(_figure_summary, results))
    assert "barrier (nats)" in summary[1].get_ylabel() and "mean +- std over 2 seeds" in summary[1].get_ylabel()
    lmc = _visible_axes(_drawn(_figure_lmc, results))
    assert "test loss (nats)" in lmc[0].get_ylabel() and "mean over 2 seeds" in lmc[0].get_ylabel()
    assert "(0 = A or pi(A), 1 = B)" in lmc[0].get_xlabel()  # A-B and pi(A)-B: a (or a permuted) at 0, b at 1
    assert all("0 = first, 1 = second" in ax.get_xlabel() for ax in lmc[1:])
    lmc_labels = lmc[0].get_legend_handles_labels()[1]
    assert lmc_labels == ["A-B, before matching", "pi(A)-B, after matching (A permuted to B)"]

    for name, builder in BUILDERS.items():
        fig = _drawn(builder, results_one_seed)
        first = _visible_axes(fig)[0]
        assert "1 seed" in first.get_ylabel() and "std" not in first.get_ylabel(), name
        assert "1 seed " in fig._suptitle.get_text() and "seeds" not in fig._suptitle.get_text(), name
        for ax in _visible_axes(fig):  # no error bars of zero length
            assert all(not c.has_yerr for c in _errorbars(ax).values()), name


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_no_legend_covers_a_data_point(name: str, results: dict[str, Any], results_one_seed: dict[str, Any]) -> None:
    for run in (results, results_one_seed):
        fig = _drawn(BUILDERS[name], run)
        assert _legends(fig), name
        assert sum(len(_data_points(ax)) for ax in _visible_axes(fig)) > 10
        assert _overlaps(fig) == []


def test_overlap_check_catches_a_legend_over_data(results: dict[str, Any]) -> None:
    fig = _drawn(_figure_accuracy, results)
    ax = _visible_axes(fig)[0]
    line = _errorbars(ax)["LTH"].lines[0]
    x, y = ax.transAxes.inverted().transform(line.get_transform().transform(line.get_xydata()[0]))
    ax.legend(loc="center", bbox_to_anchor=(x, y))  # centred on LTH's first point
    fig.canvas.draw()
    assert any("covers" in o for o in _overlaps(fig))


def test_methods_keep_one_distinct_style(results: dict[str, Any]) -> None:
    accuracy = _errorbars(_visible_axes(_drawn(_figure_accuracy, results))[0])
    lth, imp = accuracy["LTH"].lines[0], accuracy["IMP"].lines[0]
    assert lth.get_marker() != imp.get_marker() and lth.get_linestyle() != imp.get_linestyle()

    def style(container: ErrorbarContainer) -> tuple[Any, ...]:
        line = container.lines[0]
        return line.get_color(), line.get_marker(), line.get_linestyle()

    styles = {label: style(c) for label, c in accuracy.items()}
    assert set(styles) == {"LTH", "naive", "perm.", "random", "IMP"}
    for field in range(2):  # every method its own colour and marker (LTH and perm. share the solid line)
        assert len({s[field] for s in styles.values()}) == len(styles), field
    for name in ("accuracy_vs_rewind", "summary"):
        for label, container in _errorbars(_visible_axes(_drawn(BUILDERS[name], results))[0]).items():
            assert style(container) == styles[label], (name, label)


def test_summary_bars_are_the_mean_barriers_over_seeds(results: dict[str, Any]) -> None:
    fig = _drawn(_figure_summary, results)
    left, right = _visible_axes(fig)
    assert set(_errorbars(left)) == {"LTH", "perm.", "naive", "random"}
    title = fig._suptitle.get_text()
    assert "mlp [24, 24]" in title and "digits" in title and "2 seeds" in title

    def stats(pair: str, k: int | None, sparsity: float | None) -> tuple[float, float]:
        values = [c["barrier"] for c in results["lmc"] if (c["pair"], c["k"], c["sparsity"]) == (pair, k, sparsity)]
        assert len(values) == 2
        return statistics.mean(values), statistics.stdev(values)

    expected = {
        "not aligned: A-B, LTH-naive": [
            stats("A-B", None, None), stats("lth-naive", 1, 0.5), stats("lth-naive", 1, 0.8),
        ],
        "aligned by pi: pi(A)-B, pi(LTH)-perm.": [
            stats("pi(A)-B", None, None), stats("pi(lth)-permuted", 1, 0.5), stats("pi(lth)-permuted", 1, 0.8),
        ],
    }  # fmt: skip
    bars = {c.get_label(): c for c in right.containers if isinstance(c, BarContainer)}
    assert set(bars) == set(expected)
    for label, container in bars.items():
        heights = [patch.get_height() for patch in container.patches]
        assert heights == pytest.approx([m for m, _ in expected[label]], abs=1e-12), label
        assert container.errorbar is not None
        segments = container.errorbar.lines[2][0].get_segments()
        assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([2 * e for _, e in expected[label]]), label
    assert [t.get_text() for t in right.get_xticklabels()] == ["dense", "50%", "80%"]


def test_write_results_writes_the_four_figures(results: dict[str, Any], tmp_path: Path) -> None:
    from matplotlib.image import imread

    paths = write_results(results, tmp_path)
    for name in ("summary", "accuracy_vs_rewind", "accuracy_vs_sparsity", "lmc"):
        assert paths[name] == tmp_path / f"{name}.png"
        height, width, _ = imread(paths[name]).shape
        assert 300 < height < 1200 and 500 < width < 1400, (name, width, height)
