"""Entry point of the `nf4tune` command.

Parsing imports no torch (each command imports its work when it runs), so `nf4tune --help` and
argument mistakes answer at once.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from ..errors import Nf4tuneError
from . import doctor, estimate, export, inference, merge, quantize, train
from . import eval as eval_cli
from . import judge as judge_cli


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake said in one line (and where the full usage is) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nf4tune", description="QLoRA fine-tuning in plain PyTorch.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"nf4tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quantize.add_parser(sub)
    merge.add_parser(sub)
    export.add_parser(sub)
    train.add_parser(sub)
    estimate.add_parser(sub)
    inference.add_parsers(sub)
    doctor.add_parser(sub)
    eval_cli.add_parser(sub)
    judge_cli.add_parser(sub)
    return parser


OVERRIDE = re.compile(r"[A-Za-z_][\w.-]*=")  # a recipe override: dotted.key=value


def is_override(token: str) -> bool:
    """Whether a command-line word is a `dotted.key=value` recipe override."""
    return OVERRIDE.match(token) is not None


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, where a command taking `key=value` overrides takes them anywhere on its line
    (argparse alone takes positionals only before the first flag), in the order written.

    `--resume` (an optional value) takes a path only if it is one: `--resume training.max_steps=45` is
    `--resume` (the latest checkpoint) and an override, unless a path of that name exists."""
    args, extras = parser.parse_known_args(argv)
    if not hasattr(args, "overrides"):
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return args
    unknown = [t for t in extras if not is_override(t)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    taken = set(args.overrides) | set(extras)
    resume = getattr(args, "resume", None)
    if isinstance(resume, str) and is_override(resume) and not Path(resume).exists():
        args.resume = True
        taken.add(resume)
        argv = [resume if t == f"--resume={resume}" else t for t in argv]
    # Each word of argv in order, so a later override of the same key wins as it reads.
    args.overrides = [t for t in argv if t in taken]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command in `argv`; returns the exit status (2: bad input, 130: interrupted)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(build_parser(), sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:  # argparse printed the usage and its one-line error (or --help / --version)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        return args.run(args) or 0
    except Nf4tuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
