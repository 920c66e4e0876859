"""Where commands find the graph, tenants, models and logs: one rule for every command.

`--config FILE`, else `./walkrank.yaml` when present, else the demo world's layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from walkrank.serving.config import ServerConfig, load_server_config

DEFAULT_CONFIG = Path("walkrank.yaml")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="server config (default: ./walkrank.yaml "
                        "if present, else the demo world)")


def server_config(args: argparse.Namespace) -> ServerConfig:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is not None:
        return load_server_config(path)
    from walkrank.demo.world import demo_server_config

    return demo_server_config()
