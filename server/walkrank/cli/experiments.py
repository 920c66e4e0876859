"""`walkrank experiments report`: each traffic arm's online metrics, intervals and a verdict."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from walkrank.cli._config import add_config_argument, add_demo_argument
from walkrank.cli.store import logs_location
from walkrank.cli.train import _add_window_arguments, _tenant, window_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    experiments = subparsers.add_parser(
        "experiments",
        help="online experiments: each traffic arm's measured metrics",
        description="Reports on a tenant's traffic arms (experiment arms, exploration, "
        "default) from its logged candidates and reported events (docs/evaluation.md).",
    )
    commands = experiments.add_subparsers(dest="experiments_command", required=True)
    report = commands.add_parser(
        "report",
        help="funnel efficiency, actions per thousand returned pins and local share per arm, "
        "with bootstrap intervals over users and whether each arm differs from the control",
    )
    report.add_argument("--tenant", required=True)
    _add_window_arguments(report)
    report.add_argument(
        "--control", help="arm the others are compared with (default: default, else the first)"
    )
    report.add_argument("--out", type=Path, help="also write experiments.json and .md here")
    add_config_argument(report)
    add_demo_argument(report)
    report.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from walkrank.training.online import experiment_report
    from walkrank.training.pipeline import StepTimer, load_joined

    tenant, config = _tenant(args)
    steps = StepTimer(tenant.name, print)
    joined = load_joined(tenant, logs_location(config), window_from_args(args), steps)
    result = experiment_report(joined, tenant.name, control=args.control)
    print(result.table())
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "experiments.json").write_text(
            json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
        )
        (args.out / "experiments.md").write_text(
            f"# Online experiments of {tenant.name}\n\n{result.table()}\n"
        )
        print(f"wrote {args.out / 'experiments.json'}, {args.out / 'experiments.md'}")
    return 0
