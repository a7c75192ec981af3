"""Entry point of the `nf4tune` command."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import Nf4tuneError
from . import estimate, export, inference, merge, quantize, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nf4tune", description="QLoRA fine-tuning in plain PyTorch.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"nf4tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quantize.add_parser(sub)
    merge.add_parser(sub)
    export.add_parser(sub)
    train.add_parser(sub)
    estimate.add_parser(sub)
    inference.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except Nf4tuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
