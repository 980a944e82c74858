"""The `pwdaemon` command line: `demo`, `cache`, `warm`, `doctor`, the service, `--version`.

Each subcommand registers itself on the parser and sets `func`, which takes the parsed
namespace and returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pwdaemon.cli.cache import add_cache_parser
from pwdaemon.cli.doctor import add_doctor_parser
from pwdaemon.cli.service import add_service_parsers
from pwdaemon.cli.warm import add_warm_parser
from pwdaemon.demo.args import add_demo_parser
from pwdaemon.version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The full `pwdaemon` parser, with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="pwdaemon",
        description="pwdaemon: background compilation for PyTorch models in production. "
        "Start with `pwdaemon demo`.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"pwdaemon {__version__}",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo_parser(subparsers)
    add_cache_parser(subparsers)
    add_warm_parser(subparsers)
    add_doctor_parser(subparsers)
    add_service_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code: int = func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
