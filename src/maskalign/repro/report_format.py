"""What the run report (:mod:`maskalign.repro.report`) and the studies'
sections (:mod:`maskalign.repro.study_report`) share: mean +- standard
deviation over seeds and its table cell, and PNG figures drawn on their own
Agg canvas (no pyplot state) and written atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .._utils.fileio import atomic_write

__all__ = ["MeanStd", "fmt", "fmt_values", "mean_std", "new_figure", "save_png"]

MeanStd = tuple[float, float]

DPI = 100


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def fmt(value: MeanStd | None, digits: int = 2) -> str:
    """``"97.02 +- 0.32"``, or ``"-"`` for no value."""
    return "-" if value is None else f"{value[0]:.{digits}f} +- {value[1]:.{digits}f}"


def fmt_values(values: Sequence[float] | None, digits: int = 2) -> str:
    """:func:`fmt` of the :func:`mean_std` of ``values`` (``"-"`` for none)."""
    return fmt(mean_std(values) if values else None, digits)


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure (inches) on its own Agg canvas, constrained layout.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write ``fig`` to ``path`` as a PNG at :data:`DPI` dots per inch, atomically."""
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=DPI), mode="wb")
