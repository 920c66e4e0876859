"""`walkrank events import FILE`: bring a team's own labels into the event log."""

from __future__ import annotations

import argparse
from pathlib import Path

from walkrank.cli._config import (
    add_config_argument,
    add_demo_argument,
    config_path,
    require_config_or_demo,
)
from walkrank.errors import DataError
from walkrank.logs.events import EVENT_TYPES, import_events
from walkrank.logs.shipping import LogShipper
from walkrank.serving.config import load_server_config
from walkrank.storage import check_store


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("events", help="downstream events (labels)")
    commands = group.add_subparsers(dest="events_command", required=True, metavar="COMMAND")
    importer = commands.add_parser(
        "import",
        help="validate an events file and add its rows to the event log",
        description="Columns: request_id, pin_id, event, optional timestamp (epoch seconds or "
        f"ISO 8601, UTC), optional score, optional tenant. Event types: "
        f"{', '.join(EVENT_TYPES)}. Events label only their own tenant's candidates.",
    )
    importer.add_argument("file", type=Path, help="CSV (optionally .gz/.bz2/.zst) or Parquet")
    importer.add_argument(
        "--tenant",
        help="the tenant the events belong to (required unless the file has "
        "a tenant column; with both, rows naming another tenant are rejected)",
    )
    importer.add_argument(
        "--logs",
        type=Path,
        help="log root; events go under LOGS/events/ (default: the server "
        "config's logs_dir, as `walkrank serve` would log)",
    )
    add_config_argument(importer)
    add_demo_argument(importer)
    importer.set_defaults(func=_import)


def _logs_dir(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The local log directory written, and the store URI it is shipped to (None: none)."""
    # The same rule as the other commands, without building the demo graph just to find logs.
    if args.logs is not None:
        return args.logs, None
    require_config_or_demo(args, "events import")
    path = config_path(args)
    if path is not None:
        config = load_server_config(path)
        return config.logs_dir, config.logs_store
    from walkrank.demo.world import DEMO_HOME

    return DEMO_HOME.resolve() / "logs", None


def _import(args: argparse.Namespace) -> int:
    logs, store = _logs_dir(args)
    if store is not None:
        check_store(store)
    accepted, report = import_events(args.file, logs, tenant=args.tenant)
    if store is not None:  # written locally, then shipped as a server ships its logs
        shipper = LogShipper(logs, store)
        shipper.ship()
        if shipper.last_error is not None:
            raise DataError(
                f"{args.file}: {accepted} events written under {logs / 'events'} but not "
                f"shipped to {store}: {shipper.last_error} (a server with this config ships "
                f"them when it starts)"
            )
    print(
        f"{args.file}: {accepted} accepted, {report.count} rejected; "
        f"written under {logs / 'events'}"
    )
    if report.count:
        problems = ", ".join(f"{problem}: {n}" for problem, n in report.by_problem.items())
        print(f"rejected by problem: {problems}")
        # Row 1 is the first data row (a CSV's line 2, after the header).
        for line in report.lines(row_offset=1):
            print(f"  {line}")
    return 0
