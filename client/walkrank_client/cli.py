"""`walkrank-client`: call a WalkRank server from the shell.

    walkrank-client [--address 127.0.0.1:50051] recommend --tenant homefeed --pins 1,2,3 [--json]
    walkrank-client tenants | tenant NAME | reload | graph | health [--tenant T]

The tenant API key comes from `--api-key` or `WALKRANK_API_KEY`, the admin token from
`--admin-token` or `WALKRANK_ADMIN_TOKEN`. A failed call prints its gRPC status code and message
and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import Message

from walkrank_client.client import WalkRankClient, WalkRankClientError

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in _csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"weights: not comma-separated numbers: {exc}") from None


def _pem(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read root certificate {path}: {exc}") from None


def _print_json(message: Message) -> None:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # Declaration order, as in the .proto, rather than set fields first.
    ordered = {f.name: data[f.name] for f in message.DESCRIPTOR.fields if f.name in data}
    print(json.dumps(ordered, indent=2))


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _recommend(client: WalkRankClient, args: argparse.Namespace) -> int:
    response = client.recommend(
        args.tenant,
        args.pins,
        weights=args.weights,
        user_id=args.user_id,
        locale=args.locale,
        interests=args.interests,
        num_results=args.num,
        exclude=args.exclude,
        seed=args.seed,
        request_id=args.request_id,
    )
    if args.json:
        _print_json(response)
        return 0
    t = response.timing
    print(
        f"tenant {response.tenant}  request {response.request_id}  "
        f"model {response.model_version}  candidates generated {response.candidates_generated}"
    )
    print(
        f"timing ms: walk {t.walk_ms:.2f}  features {t.features_ms:.2f}  "
        f"scoring {t.scoring_ms:.2f}  total {t.total_ms:.2f}  queued {t.queue_ms:.2f}"
    )
    if response.unknown_query_pins:
        print(f"unknown query pins: {', '.join(response.unknown_query_pins)}")
    if response.empty_reason:
        print(f"no candidates: {response.empty_reason}")
    _print_table(
        ("rank", "pin_id", "score", "visits"),
        [(c.rank, c.pin_id, f"{c.score:.6g}", c.visit_count) for c in response.candidates],
    )
    return 0


def _tenants(client: WalkRankClient, args: argparse.Namespace) -> int:
    response = client.list_tenants()
    if args.json:
        _print_json(response)
        return 0
    _print_table(
        ("tenant", "model_version", "config_file"),
        [(t.name, t.model_version, t.config_file) for t in response.tenants],
    )
    return 0


def _tenant(client: WalkRankClient, args: argparse.Namespace) -> int:
    info = client.get_tenant(args.name)
    if args.json:
        _print_json(info)
        return 0
    c = info.counters
    print(f"tenant         {info.name}")
    print(f"config file    {info.config_file}")
    print(
        f"model version  {info.model_version}"
        + (f" ({info.model_engine})" if info.model_engine else "")
    )
    print(f"requests       {c.requests}  errors {c.errors}  in flight {c.in_flight}")
    print(f"events         accepted {c.events_accepted}  rejected {c.events_rejected}")
    if info.last_reload_error:
        print(f"last reload error: {info.last_reload_error}")
    print("config:")
    print(info.config_yaml.rstrip())
    return 0


def _reload(client: WalkRankClient, args: argparse.Namespace) -> int:
    """Every replica the address names reloads (one after another); each is reported,
    headed by its address when there are several."""
    failed = False
    results = client.reload_each(args.tenant)
    for address, response in results.items():
        if len(results) > 1:
            print(f"== {address}")
        if isinstance(response, WalkRankClientError):
            print(f"walkrank-client: {response.code.name}: {response.details}", file=sys.stderr)
            failed = True
            continue
        failed = failed or bool(response.errors)
        if args.json:
            _print_json(response)
            continue
        for change in response.changes:
            print(f"{change.tenant}: {change.kind} {change.detail}".rstrip())
        if not response.changes:
            print("nothing changed")
        for error in response.errors:
            print(f"error: {error.path}: {error.message}", file=sys.stderr)
    return 1 if failed else 0


def _graph(client: WalkRankClient, args: argparse.Namespace) -> int:
    info = client.graph_info()
    if args.json:
        _print_json(info)
        return 0
    print(f"graph    {info.path}")
    print(f"pins     {info.n_pins}")
    print(f"boards   {info.n_boards}")
    print(f"edges    {info.n_edges}")
    print(f"locales  {', '.join(info.locales)}")
    print(f"topics   {', '.join(info.topics)}")
    if info.manifest_json:
        print("manifest:")
        print(json.dumps(json.loads(info.manifest_json), indent=2))
    return 0


def _health(client: WalkRankClient, args: argparse.Namespace) -> int:
    status = client.health(args.tenant)
    print(status)
    return 0 if status == "SERVING" else 1


Command = Callable[[WalkRankClient, argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walkrank-client", description="Call a WalkRank gRPC server."
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("WALKRANK_ADDRESS", DEFAULT_ADDRESS),
        help=f"host:port (default $WALKRANK_ADDRESS or {DEFAULT_ADDRESS}); "
        "replicas: ip:port,ip:port or dns:///NAME:PORT (calls are "
        "balanced, reload reaches every replica)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("WALKRANK_API_KEY"),
        help="tenant API key (default $WALKRANK_API_KEY)",
    )
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("WALKRANK_ADMIN_TOKEN"),
        help="admin token (default $WALKRANK_ADMIN_TOKEN)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt")
    parser.add_argument("--retries", type=int, default=3, help="retries when UNAVAILABLE")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--tls", action="store_true", help="TLS with the system root certificates")
    tls.add_argument("--root-cert", type=_pem, help="TLS trusting this PEM root certificate")

    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print the response as JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    recommend = commands.add_parser("recommend", parents=[output], help="candidates for a user")
    recommend.add_argument("--tenant", required=True)
    recommend.add_argument("--pins", type=_csv, required=True, help="query pin ids, a,b,c")
    recommend.add_argument("--weights", type=_weights, help="one weight per query pin")
    recommend.add_argument("--num", type=int, default=0, help="results (0: tenant default)")
    recommend.add_argument("--locale")
    recommend.add_argument("--interests", type=_csv, help="topics, a,b")
    recommend.add_argument("--user-id")
    recommend.add_argument("--exclude", type=_csv, help="pin ids not to return, a,b")
    recommend.add_argument("--seed", type=int, help="walk seed, for reproducible results")
    recommend.add_argument("--request-id")
    recommend.set_defaults(run=_recommend)

    commands.add_parser("tenants", parents=[output], help="list tenants").set_defaults(run=_tenants)
    tenant = commands.add_parser("tenant", parents=[output], help="one tenant in full")
    tenant.add_argument("name")
    tenant.set_defaults(run=_tenant)
    reload = commands.add_parser(
        "reload",
        parents=[output],
        help="reload tenant files and models on every replica --address names (exit 1 if a "
        "file failed to load or a replica failed)",
    )
    reload.add_argument(
        "--tenant",
        action="append",
        default=[],
        help="re-read only this tenant's models (repeatable)",
    )
    reload.set_defaults(run=_reload)
    commands.add_parser("graph", parents=[output], help="graph summary").set_defaults(run=_graph)
    health = commands.add_parser("health", help="SERVING or not (exit 1 if not)")
    health.add_argument("--tenant", help="a tenant's status instead of the server's")
    health.set_defaults(run=_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tls: bool | bytes = args.root_cert or args.tls
    run: Command = args.run
    try:
        with WalkRankClient(
            args.address,
            api_key=args.api_key,
            admin_token=args.admin_token,
            tls=tls,
            timeout=args.timeout,
            retries=args.retries,
        ) as client:
            return run(client, args)
    except WalkRankClientError as exc:
        print(f"walkrank-client: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"walkrank-client: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
