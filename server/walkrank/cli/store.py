"""`walkrank store push|pull|prune`: graphs, models and logs on object storage.

    walkrank store push var/models s3://bucket/walkrank/models     # after walkrank train
    walkrank store pull s3://bucket/walkrank/graphs /var/lib/walkrank/graphs   # then reload
    walkrank store prune s3://bucket/walkrank/models --keep 5      # retention in the store

What each direction guarantees: walkrank.storage (pointers last, only the named versions
pulled, published files never overwritten). Docs: docs/deployment.md.

Also the other commands' access to a walkrank.yaml whose `models_dir` or `logs_dir` is a
store URI: `models_for` / `publish_models` (the registry mirrored under `cache_dir`, every
version, and pushed back after a change) and `logs_location` (the store itself: readers open
it through pyarrow, nothing is copied).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from walkrank.errors import ConfigError
from walkrank.serving.config import ServerConfig
from walkrank.storage import (
    Location,
    Transfer,
    check_store,
    is_remote,
    prune_store,
    pull,
    push,
)


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
    prune = commands.add_parser(
        "prune",
        help="delete old versions inside a store (never one CURRENT or LAST_VERSION names)",
    )
    prune.add_argument("uri", help="a graph repository or model registry: s3://bucket/prefix")
    prune.add_argument(
        "--keep", type=int, required=True, metavar="N", help="versions kept besides CURRENT (>= 1)"
    )
    prune.set_defaults(func=run_prune)


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


def run_prune(args: argparse.Namespace) -> int:
    deleted = prune_store(_remote(args.uri), args.keep)
    print(f"prune: {len(deleted)} versions deleted" + "".join(f"\n  {d}" for d in deleted))
    return 0


def models_for(config: ServerConfig) -> Path:
    """The model registry a command works on: `models_dir`, or the local mirror of its store
    with every version pulled (so listing, evaluating and rolling back see them all)."""
    if config.models_store is not None:
        check_store(config.models_store)
        pull(config.models_store, config.models_dir, every_version=True)
    return config.models_dir


def publish_models(config: ServerConfig) -> None:
    """After a command changed the registry `models_for` gave: push it to the store (new
    version files, then the pointers). One publisher per store at a time."""
    if config.models_store is not None:
        push(config.models_dir, config.models_store)


def logs_location(config: ServerConfig) -> Location:
    """Where trainers read the logs: the store URI when `logs_dir` is one, else the directory."""
    if config.logs_store is not None:
        check_store(config.logs_store)
        return config.logs_store
    return config.logs_dir
