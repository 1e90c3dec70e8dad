"""The ``fesmia-hooks`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fesmia-hooks", description="Watch a model's privacy leakage while it trains."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model on digits and watch it leak")
    demo.add_argument("--log-dir", default="runs/fesmia-demo", help="TensorBoard/history folder")
    demo.add_argument("--epochs", type=int, default=100, help="most epochs to train")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, model and probe")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fesmia-hooks``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.epochs < 1:
            print(f"fesmia-hooks: --epochs must be a positive int, got {args.epochs}",
                  file=sys.stderr)
            return 2
        from fesmia_hooks.demos.digits import run_torch_demo

        run_torch_demo(log_dir=args.log_dir, epochs=args.epochs, seed=args.seed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
