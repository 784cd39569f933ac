"""Command line: ``maskalign reproduce`` runs the paper's lottery-ticket mask
transfer experiment (see :mod:`maskalign.experiment`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .experiment import ReproduceConfig, reproduce
from .report import markdown_table, write_results

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    defaults = ReproduceConfig()
    parser = argparse.ArgumentParser(prog="maskalign", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser(
        "reproduce",
        help="train A and B, find A's winning ticket by IMP, and compare LTH / naive / permuted / random masks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rep.add_argument("--dataset", default=defaults.dataset, choices=["digits", "cifar10", "cifar100"])
    rep.add_argument("--data-root", default=None, help="folder holding the CIFAR python-pickle batches")
    rep.add_argument("--model", default=defaults.model, choices=["mlp", "resnet20", "vgg11"])
    rep.add_argument("--width", type=int, default=defaults.width, help="width multiplier")
    rep.add_argument("--hidden", type=int, nargs="+", default=list(defaults.hidden), help="MLP hidden sizes")
    rep.add_argument("--sparsities", type=float, nargs="+", default=list(defaults.sparsities))
    rep.add_argument("--rewind-epoch", "-k", type=int, default=defaults.rewind_epoch)
    rep.add_argument("--epochs", "-T", type=int, default=defaults.epochs)
    rep.add_argument("--seeds", type=int, default=defaults.seeds, help="number of seeds (A/B pairs)")
    rep.add_argument("--batch-size", type=int, default=defaults.batch_size)
    rep.add_argument("--lr", type=float, default=defaults.lr, help="dense peak learning rate")
    rep.add_argument("--sparse-lr", type=float, default=defaults.sparse_lr, help="sparse (and IMP) peak learning rate")
    rep.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    rep.add_argument(
        "--prune-rate",
        type=float,
        default=defaults.prune_rate,
        help="fraction of remaining weights pruned per IMP round",
    )
    rep.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR)")
    rep.add_argument("--device", default=defaults.device)
    rep.add_argument("--out", default="maskalign-results", help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = ReproduceConfig(
            dataset=args.dataset,
            data_root=args.data_root,
            model=args.model,
            width=args.width,
            hidden=tuple(args.hidden),
            sparsities=tuple(args.sparsities),
            rewind_epoch=args.rewind_epoch,
            epochs=args.epochs,
            seeds=args.seeds,
            batch_size=args.batch_size,
            lr=args.lr,
            sparse_lr=args.sparse_lr,
            weight_decay=args.weight_decay,
            prune_rate=args.prune_rate,
            augment=args.augment,
            device=args.device,
        )
    except ValueError as exc:
        print(f"maskalign: {exc}", file=sys.stderr)
        return 2
    results = reproduce(config)
    paths = write_results(results, args.out)
    print(markdown_table(results))
    print(f"\nfinished in {results['elapsed_s']:.1f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
