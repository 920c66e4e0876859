"""`walkrank models list|publish|rollback`: the model registry from the shell."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from walkrank.cli._config import add_config_argument, server_config, tenant_config
from walkrank.cli.store import models_for, publish_models
from walkrank.errors import ModelError
from walkrank.model_registry import ModelRegistry


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list, publish and roll back tenant models")
    commands = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    listing = commands.add_parser("list", help="versions of a tenant's model (* = serving)")
    listing.add_argument("--tenant", required=True)
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_config_argument(listing)
    listing.set_defaults(func=run_list)

    publish = commands.add_parser(
        "publish",
        help="convert an XGBoost model to ONNX, check it, publish a new version",
        description="Converts with the tenant's converter, checks the ONNX scores against "
        "XGBoost's own on probe rows around every split (the validation gate), "
        "and publishes atomically. The running server serves it after a reload.",
    )
    publish.add_argument("--tenant", required=True)
    publish.add_argument(
        "--xgboost",
        type=Path,
        required=True,
        dest="xgboost_model",
        help="XGBoost model file (.json or .ubj)",
    )
    publish.add_argument(
        "--converter",
        choices=["onnxmltools", "hummingbird"],
        help="default: the tenant's ranker.converter",
    )
    add_config_argument(publish)
    publish.set_defaults(func=run_publish)

    rollback = commands.add_parser("rollback", help="serve an earlier version again")
    rollback.add_argument("--tenant", required=True)
    rollback.add_argument(
        "--to",
        type=int,
        dest="version",
        help="version to serve (default: the one before the current)",
    )
    add_config_argument(rollback)
    rollback.set_defaults(func=run_rollback)


def _registry(args: argparse.Namespace) -> ModelRegistry:
    return ModelRegistry(models_for(server_config(args)))


def run_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    current = registry.current(args.tenant)
    versions = registry.versions(args.tenant)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "version": v.version,
                        "created_at": v.created_at,
                        "serving": current is not None and v.version == current.version,
                    }
                    for v in versions
                ],
                indent=2,
            )
        )
        return 0
    if not versions:
        print(f"no models published for tenant {args.tenant!r} (it ranks by visit count)")
        return 0
    for v in versions:
        mark = "*" if current is not None and v.version == current.version else " "
        print(f"{mark} v{v.version}  {v.created_at}  {v.path}")
    return 0


def run_publish(args: argparse.Namespace) -> int:
    import xgboost

    from walkrank.ranking.export import export_model

    config = server_config(args)
    tenant = tenant_config(config, args.tenant)
    booster = xgboost.Booster()
    try:
        booster.load_model(str(args.xgboost_model))
    except xgboost.core.XGBoostError as exc:
        raise ModelError(
            f"{args.xgboost_model}: not a readable XGBoost model: {str(exc).splitlines()[0]}"
        ) from exc
    if booster.num_features() != len(tenant.features):
        raise ModelError(
            f"{args.xgboost_model}: model has {booster.num_features()} features, "
            f"tenant {args.tenant!r} has {len(tenant.features)} "
            f"({', '.join(tenant.features)})"
        )
    exported = export_model(
        booster,
        list(tenant.features),
        converter=args.converter or tenant.ranker.converter,
        objective=tenant.ranker.objective,
        extra_metadata={"source": str(args.xgboost_model)},
    )
    version = ModelRegistry(models_for(config)).publish(
        args.tenant, exported.onnx_bytes, exported.metadata
    )
    publish_models(config)
    print(
        f"published {args.tenant} v{version.version} ({version.path}); "
        f"reload the server to serve it"
    )
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    config = server_config(args)
    version = ModelRegistry(models_for(config)).rollback(args.tenant, args.version)
    publish_models(config)
    print(f"{args.tenant} now serves v{version.version}; reload the server to apply")
    return 0
