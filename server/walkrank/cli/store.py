"""`walkrank store push|pull`: graph repositories, model registries and logs on object storage.

    walkrank store push var/models s3://bucket/walkrank/models     # after walkrank train
    walkrank store pull s3://bucket/walkrank/graphs /var/lib/walkrank/graphs   # then reload

What each direction guarantees: walkrank.storage (pointers last, only the named versions
pulled, published files never overwritten). Docs: docs/deployment.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from walkrank.errors import ConfigError
from walkrank.storage import Transfer, is_remote, pull, push


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "store", help="copy graphs, models and logs to and from object storage (s3://)"
    )
    commands = parser.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    upload = commands.add_parser("push", help="upload a local directory to a store URI")
    upload.add_argument("local", type=Path, help="a graph repository, model registry or logs")
    upload.add_argument("uri", help="s3://bucket/prefix")
    upload.set_defaults(func=run_push)
    download = commands.add_parser(
        "pull", help="mirror a store URI into a local directory (the CURRENT versions only)"
    )
    download.add_argument("uri", help="s3://bucket/prefix")
    download.add_argument("local", type=Path, help="the local directory servers read")
    download.set_defaults(func=run_pull)


def _remote(uri: str) -> str:
    if not is_remote(uri):
        raise ConfigError(f"{uri}: expected a store URI such as s3://bucket/prefix")
    return uri


def _report(action: str, done: Transfer) -> int:
    print(
        f"{action}: {len(done.copied)} files copied ({done.bytes:,} bytes), "
        f"{done.skipped} already there"
    )
    return 0


def run_push(args: argparse.Namespace) -> int:
    return _report("push", push(args.local, _remote(args.uri)))


def run_pull(args: argparse.Namespace) -> int:
    return _report("pull", pull(_remote(args.uri), args.local))
