"""Regenerate the figures of a real ``maskalign reproduce`` run for the docs
(run from the repository root):

    python docs/figures/make_run_figures.py [--out DIR]

Runs (or resumes) the default run, preset ``digits`` (an MLP on the bundled
8x8 digits, 3 seeds, about 2 minutes on 2 CPU cores), in ``DIR`` (default
``/tmp/maskalign-docs-run``; its ``results.json``, ``results.md`` and plots
are written there too), then renders ``summary.png``,
``accuracy_vs_sparsity.png``, ``accuracy_vs_rewind.png`` and ``lmc.png`` into
``docs/figures/run/``: the same plots ``maskalign reproduce`` writes, their
colours reduced to a 128-colour palette to keep the repository small.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from maskalign.repro.experiment import reproduce
from maskalign.repro.presets import get_preset
from maskalign.repro.report import plot_accuracy, plot_accuracy_vs_rewind, plot_lmc, plot_summary, write_results

HERE = Path(__file__).resolve().parent
FIGURES = {
    "summary.png": plot_summary,
    "accuracy_vs_sparsity.png": plot_accuracy,
    "accuracy_vs_rewind.png": plot_accuracy_vs_rewind,
    "lmc.png": plot_lmc,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/maskalign-docs-run"), help="run folder (resumable)")
    args = parser.parse_args()
    results = reproduce(get_preset("digits"), out=args.out, preset="digits", log=print)
    write_results(results, args.out)
    target = HERE / "run"
    for name, plot in FIGURES.items():
        plot(results, target / name)
        with Image.open(target / name) as image:
            small = image.convert("RGB").quantize(colors=128)
        small.save(target / name, optimize=True)
        print(f"wrote {target / name}")


if __name__ == "__main__":
    main()
