"""`walkrank serve`: run the gRPC server until SIGTERM/SIGINT, then stop gracefully."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import threading

from walkrank.cli import report_error
from walkrank.cli._config import add_config_argument, server_config
from walkrank.errors import WalkRankError
from walkrank.serving.config import DEFAULT_ADDRESS, ServerConfig, check_port_free

log = logging.getLogger("walkrank.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve recommendations over gRPC",
        description="Serve the graph and tenants named in walkrank.yaml; without one, the demo "
                    "world (generated and cached on first run).")
    add_config_argument(parser)
    parser.add_argument("--address", help=f"host:port to bind (default {DEFAULT_ADDRESS})")
    parser.add_argument("--metrics-address", help="host:port for Prometheus /metrics")
    parser.add_argument("--workers", type=int, help="gRPC worker threads per process")
    parser.add_argument("--processes", type=int, default=1,
                        help="server processes sharing the port (SO_REUSEPORT) and the "
                             "memory-mapped graph; see docs/serving.md")
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> ServerConfig:
    config = server_config(args)
    overrides = {key: value for key, value in (
        ("address", args.address), ("metrics_address", args.metrics_address),
        ("workers", args.workers)) if value is not None}
    return config.replace(**overrides)


def serve_forever(config: ServerConfig, reuse_port: bool) -> None:
    from walkrank.serving.server import WalkRankServer

    server = WalkRankServer(config, reuse_port=reuse_port)
    port = server.start()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping (grace %.0fs)", signum, config.grace_seconds)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host = config.address.rpartition(":")[0]
    print(f"walkrank: serving {sorted(server.tenants.runtimes())} on {host}:{port}", flush=True)
    stop.wait()
    server.stop()
    print("walkrank: stopped", flush=True)


def _serve_child(config: ServerConfig) -> None:
    """One of `--processes`: a startup error is one line and exit status 2, as in one process."""
    try:
        serve_forever(config, reuse_port=True)
    except (WalkRankError, OSError) as exc:
        report_error(exc)
        sys.exit(2)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    config = resolve_config(args)
    if args.processes <= 1:
        serve_forever(config, reuse_port=False)
        return 0
    if config.address.endswith(":0"):
        log.error("--processes needs a fixed port, not :0")
        return 2
    check_port_free(config.address, reuse_port=True)  # once, not one error per child
    # Fork after nothing heavy is loaded: each child maps the same graph files, so the page
    # cache holds one copy whatever the process count.
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_serve_child, args=(config,), daemon=False)
                for _ in range(args.processes)]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return max((child.exitcode or 0) for child in children)
