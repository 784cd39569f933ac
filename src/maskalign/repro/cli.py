"""Command line.

``maskalign reproduce [--preset NAME] [--SETTING VALUE ...] [--out DIR]`` runs
(or resumes) the paper's lottery-ticket mask transfer experiment
(:mod:`maskalign.repro.experiment`); ``maskalign report DIR`` re-renders the tables
and plots of a finished run from its ``results.json``.

Every error is printed as one line ``maskalign: <what is wrong and what to
do> See <troubleshooting link>`` on stderr, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..errors import DOCS_URL, MaskAlignError
from ..matching.activation import POINTS, STREAM_POINTS
from .experiment import reproduce
from .presets import AMP_MODES, METHODS, PRESETS, ReproduceConfig, get_preset
from .report import markdown_table, render, write_results

__all__ = ["main"]

_CLI_DOCS = f"{DOCS_URL}/troubleshooting/#command-line"


def _error_line(exc: BaseException) -> str:
    """One ``maskalign: ...`` line for ``exc``, ending with its docs link."""
    if isinstance(exc, MaskAlignError):
        return f"maskalign: {exc.one_line()}"
    text = (str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)).strip()
    if not text.endswith((".", "?", "!")):
        text += "."
    return "maskalign: " + " ".join(f"{text} See {_CLI_DOCS}".split())


class _Parser(argparse.ArgumentParser):
    """``argparse`` whose usage errors end in one ``maskalign: ...`` line with the docs link."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("maskalign").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"maskalign: {where}{message}; see `{self.prog} --help`. See {_CLI_DOCS}\n")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ReproduceConfig` setting; unset flags keep the preset's value."""
    add = parser.add_argument_group("settings (override the preset)").add_argument
    keep = argparse.SUPPRESS
    add("--dataset", choices=["digits", "cifar10", "cifar100"], default=keep)
    add("--data-root", default=keep, help="folder holding the CIFAR python-pickle batches")
    add("--model", choices=["mlp", "resnet20", "vgg11"], default=keep)
    add("--width", type=int, default=keep, help="width multiplier")
    add("--hidden", type=int, nargs="+", default=keep, help="MLP hidden sizes")
    add("--epochs", "-T", type=int, default=keep, help="dense epochs T")
    add("--rewind-epochs", "-k", type=int, nargs="+", default=keep, help="rewind points k (sweep)")
    add("--sparsities", type=float, nargs="+", default=keep)
    add("--seeds", type=int, default=keep, help="number of seeds (A/B pairs)")
    add("--batch-size", type=int, default=keep)
    add("--lr", type=float, default=keep, help="dense peak learning rate")
    add("--sparse-lr", type=float, default=keep, help="sparse peak learning rate")
    add("--momentum", type=float, default=keep)
    add("--weight-decay", type=float, default=keep)
    add("--augment", action=argparse.BooleanOptionalAction, default=keep, help="random crop + flip")
    add("--prune-rate", type=float, default=keep, help="fraction of remaining weights pruned per IMP round")
    add("--imp-epochs", type=int, default=keep, help="fine-tuning epochs per IMP round")
    add("--imp-lr", type=float, default=keep, help="IMP fine-tuning peak learning rate")
    add("--methods", nargs="+", choices=METHODS, default=keep)
    add("--table1-sparsity", type=float, default=keep, help="sparsity of the shared-mask diversity table")
    add("--table1-k", type=int, default=keep, help="rewind point of the shared-mask diversity table")
    add("--match-points", choices=POINTS, default=keep, help="activations matched: pre, post or both (nonlinearity)")
    add(
        "--match-stream-points",
        choices=STREAM_POINTS,
        default=keep,
        help="residual streams: match every point of a stage (all) or its last one",
    )
    add("--barrier-points", type=int, default=keep, help="interpolation points per LMC curve")
    add("--bn-batches", type=int, default=keep, help="training batches for BatchNorm re-estimation in LMC")
    add("--device", default=keep, help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    add("--amp", choices=AMP_MODES, default=keep, help="mixed precision (CUDA only)")
    add("--threads", type=int, default=keep, help="CPU threads for torch (0: torch's default)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskalign", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser(
        "reproduce",
        help="train A and B, find A's ticket by IMP, compare LTH / naive / permuted / random masks",
        description="Run or resume the experiment. Presets: " + ", ".join(PRESETS) + ".",
    )
    rep.add_argument("--preset", default="digits", choices=list(PRESETS), help="named settings (default: digits)")
    rep.add_argument("--list-presets", action="store_true", help="print every preset's settings and exit")
    rep.add_argument("--out", default="maskalign-results", help="output folder (reused: the run resumes)")
    rep.add_argument("--force", action="store_true", help="recompute stages whose settings changed")
    rep.add_argument("--restart", action="store_true", help="discard every stored stage first")
    rep.add_argument("--quiet", action="store_true", help="no per-stage log lines")
    _add_settings(rep)
    report = commands.add_parser("report", help="re-render results.md and the plots from DIR/results.json")
    report.add_argument("folder")
    return parser


_RUN_FLAGS = ("command", "preset", "list_presets", "out", "force", "restart", "quiet")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {k: v for k, v in vars(args).items() if k not in _RUN_FLAGS}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _print_settings(name: str, config: ReproduceConfig, overrides: dict[str, Any]) -> None:
    print(f"preset {name}" + (f" with overrides {sorted(overrides)}" if overrides else "") + ":")
    for key, value in config.to_dict().items():
        print(f"  {key} = {value}" + ("  (override)" if key in overrides else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``maskalign`` script; returns the exit status
    (0 done, 2 bad settings or an output folder that does not match them).
    Errors are printed as one ``maskalign: ...`` line ending with the link to
    their troubleshooting entry."""
    args = _parser().parse_args(argv)
    if args.command == "report":
        try:
            paths = render(args.folder)
        except (FileNotFoundError, NotADirectoryError, MaskAlignError, ValueError) as exc:
            print(_error_line(exc), file=sys.stderr)
            return 2
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    if args.list_presets:
        for name, config in PRESETS.items():
            _print_settings(name, config, {})
        return 0
    overrides = _overrides(args)
    try:
        config = get_preset(args.preset, **overrides)
    except (MaskAlignError, ValueError, TypeError, KeyError) as exc:
        print(_error_line(exc), file=sys.stderr)
        return 2
    _print_settings(args.preset, config, overrides)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        results = reproduce(config, out=args.out, preset=args.preset, force=args.force, restart=args.restart, log=log)
    except (MaskAlignError, ValueError) as exc:
        print(_error_line(exc), file=sys.stderr)
        return 2
    results["overrides"] = sorted(overrides)
    paths = write_results(results, args.out)
    print(markdown_table(results))
    print(f"\nfinished in {results['timing']['elapsed_s']:.1f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
