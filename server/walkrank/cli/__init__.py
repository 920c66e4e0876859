"""`walkrank` command line: every module in this package adds one command group.

Each public module defines `register(subparsers)`; the commands it adds set `func(args) -> int`.
Discovery keeps the command groups independent of each other.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from walkrank import __version__
from walkrank.errors import WalkRankError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walkrank", description="Pixie random walks + lightweight ranking, served over gRPC."
    )
    parser.add_argument("--version", action="version", version=f"walkrank {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):  # _config, __main__: not command groups
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def report_error(exc: BaseException) -> None:
    """One line on stderr, no traceback: the message names the file, field or address."""
    message = " ".join(line.strip() for line in str(exc).splitlines())
    print(f"walkrank: error: {message}", file=sys.stderr, flush=True)


def announce(line: str) -> None:
    """One line on stdout in one write: server processes may share the pipe, and print()
    writes the text and its newline apart when stdout is unbuffered (PYTHONUNBUFFERED), so
    two processes' lines could interleave into one line and an empty one."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (WalkRankError, OSError) as exc:
        report_error(exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
