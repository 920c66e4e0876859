"""`walkrank train` and `walkrank evaluate`: a tenant's ranker from its own logs, and its report."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from walkrank.cli._config import (
    add_config_argument,
    add_demo_argument,
    require_config_or_demo,
    server_config,
    tenant_config,
)
from walkrank.cli.store import logs_location, models_for, publish_models
from walkrank.errors import ConfigError
from walkrank.serving.config import ServerConfig
from walkrank.tenants import TenantConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train, check and publish a tenant's ranker from its logs",
        description="Joins the tenant's logged candidates with the events over the window, "
        "builds labels by the tenant's strategy, trains on all but the last 20%% "
        "of requests (early stopping on those held out), converts to ONNX through "
        "the validation gate, compares the new model with the serving one and "
        "with visit count on the held-out requests and publishes a new version "
        "unless it is worse than either on the tenant's primary metric. The "
        "server serves it after Admin.Reload.",
    )
    train.add_argument("--tenant", required=True)
    _add_window_arguments(train)
    train.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS",
        help="train on a Dask cluster (xgboost.dask) instead of in-process",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="publish even when the new model is worse than the serving one",
    )
    train.add_argument(
        "--search",
        action="store_true",
        help="train one model per point of the tenant's ranker.search grid "
        "and keep the best that passes the gate (docs/training.md)",
    )
    add_config_argument(train)
    add_demo_argument(train)
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="compare a tenant's model with visit count on logged requests",
        description="Replays the logged candidates of held-out requests (default: the last "
        "20%% of the log, as train holds out; or every request in --since/--until/"
        "--days) in visit-count order and in the model's order, and writes "
        "evaluation.json, evaluation.md and evaluation.png.",
    )
    evaluate.add_argument("--tenant", required=True)
    _add_window_arguments(evaluate)
    evaluate.add_argument("--version", type=int, help="model version (default: the serving one)")
    evaluate.add_argument(
        "--out", type=Path, help="report directory (default: <logs>/evaluations/<tenant>/v<N>)"
    )
    evaluate.add_argument("--k", type=int, default=50, help="cut-off for the @K metrics")
    add_config_argument(evaluate)
    add_demo_argument(evaluate)
    evaluate.set_defaults(func=run_evaluate)


def _add_window_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", type=_iso_time, metavar="ISO", help="window start, ISO 8601 (naive = UTC)"
    )
    parser.add_argument(
        "--until", type=_iso_time, metavar="ISO", help="window end, exclusive (default: open)"
    )
    parser.add_argument(
        "--days",
        type=float,
        metavar="N",
        help="window of the N days before --until (or before now)",
    )


def _iso_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def window_from_args(
    args: argparse.Namespace, *, now: datetime | None = None
) -> tuple[datetime | None, datetime | None] | None:
    """(start, end) from --since/--until/--days, or None when none is given."""
    if args.days is not None:
        if args.since is not None:
            raise ConfigError("--days and --since both set the window start; give one")
        if not args.days > 0:
            raise ConfigError(f"--days must be > 0, got {args.days}")
        end = args.until or now or datetime.now(UTC)
        return end - timedelta(days=args.days), args.until
    if args.since is None and args.until is None:
        return None
    return args.since, args.until


def _tenant(args: argparse.Namespace) -> tuple[TenantConfig, ServerConfig]:
    require_config_or_demo(args, f"walkrank {args.command}")
    config = server_config(args)
    return tenant_config(config, args.tenant), config


def run_train(args: argparse.Namespace) -> int:
    from walkrank.training.pipeline import train_tenant

    tenant, config = _tenant(args)
    report = train_tenant(
        tenant,
        logs_location(config),
        models_for(config),
        window=window_from_args(args),
        force=args.force,
        dask_scheduler=args.dask_scheduler,
        search=args.search,
    )
    if report.version is None:
        print(
            f"walkrank: refusing to publish for {tenant.name!r}: {report.refused}; "
            "rerun with --force to publish anyway",
            file=sys.stderr,
        )
        return 1
    publish_models(config)
    print(
        f"published {tenant.name} v{report.version}; run Admin.Reload "
        "(walkrank-client reload) so the server serves it"
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from walkrank.training.pipeline import evaluate_tenant

    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    tenant, config = _tenant(args)
    evaluate_tenant(
        tenant,
        logs_location(config),
        models_for(config),
        window=window_from_args(args),
        version=args.version,
        k=args.k,
        out_dir=args.out,
    )
    return 0
