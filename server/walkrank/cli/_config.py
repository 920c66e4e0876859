"""Where commands find the graph, tenants, models and logs: one rule for every command.

`--config FILE`, else `./walkrank.yaml` when present, else the demo world's layout. Commands
that write or train on data (`train`, `evaluate`, `events import`) take the demo layout only
when asked (`--demo`): silently training on a generated world is never what a user meant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from walkrank.errors import ConfigError
from walkrank.serving.config import ServerConfig, load_server_config
from walkrank.tenants import TenantConfig, load_tenant

DEFAULT_CONFIG = Path("walkrank.yaml")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="server config (default: ./walkrank.yaml if present, else the demo world)",
    )


def add_demo_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--demo",
        action="store_true",
        help="without a config, use the demo world under var/demo/ (built on first use)",
    )


def config_path(args: argparse.Namespace) -> Path | None:
    """`--config`, else ./walkrank.yaml when present, else None."""
    return args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)


def require_config_or_demo(args: argparse.Namespace, command: str) -> None:
    """ConfigError with a hint unless a config exists or `--demo` asks for the demo world."""
    if config_path(args) is None and not args.demo:
        raise ConfigError(
            f"{command}: no --config and no ./walkrank.yaml, so there are no logs or models to "
            f"use; pass --config walkrank.yaml (docs/serving.md), or --demo for the demo world "
            f"under var/demo/"
        )


def server_config(args: argparse.Namespace) -> ServerConfig:
    path = config_path(args)
    if path is not None:
        return load_server_config(path)
    from walkrank.demo.world import demo_server_config

    return demo_server_config()


def tenant_config(config: ServerConfig, name: str) -> TenantConfig:
    """Tenant `name` from the config's tenants directory; ConfigError naming the file when
    there is none."""
    path = config.tenants_dir / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"{path}: no such tenant file for {name!r}")
    return load_tenant(path)
