"""Server configuration (`walkrank.yaml`): where the graph, tenants, models and logs live.

Secrets never live here: API keys and the admin token come from the environment or from a
secrets file named here (kept out of git), so the config file itself can be committed.

`graph`, `models_dir` and `logs_dir` may be store URIs (`s3://bucket/prefix`; credentials
and endpoint from the environment, walkrank.storage). The server then works on local copies
under `cache_dir`: the fields keep the local directory and `*_store` the URI.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from walkrank.errors import ConfigError
from walkrank.storage import is_remote, mirror_dir, open_store_uri

DEFAULT_ADDRESS = "127.0.0.1:50051"
API_KEYS_ENV = "WALKRANK_API_KEYS"
ADMIN_TOKEN_ENV = "WALKRANK_ADMIN_TOKEN"


@dataclass(frozen=True)
class AuthConfig:
    """Per-tenant API keys and an admin token; off unless `enabled`."""

    enabled: bool = False
    secrets_file: Path | None = None
    tenant_keys: dict[str, frozenset[str]] = field(default_factory=dict)
    admin_token: str | None = None


@dataclass(frozen=True)
class RealtimeConfig:
    """Real-time edges (`walkrank.graph.delta`): the delta's edge limit, where its append log
    lives (None: not durable, lost on restart) and how often walks get a new snapshot."""

    max_edges: int = 1_000_000
    log: Path | None = None
    flush_ms: int = 200

    def __post_init__(self) -> None:
        if not 1 <= self.max_edges <= 2**31 - 1:
            raise ConfigError(
                f"realtime.max_edges: must be in [1, 2**31 - 1], got {self.max_edges}"
            )
        if not 10 <= self.flush_ms <= 1000:
            raise ConfigError(f"realtime.flush_ms: must be in [10, 1000], got {self.flush_ms}")


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class ServerConfig:
    graph: Path
    tenants_dir: Path
    models_dir: Path
    logs_dir: Path
    address: str = DEFAULT_ADDRESS
    metrics_address: str | None = None
    workers: int = 8
    # Requests running the pipeline at once (walkrank.serving.scheduler); None: one per core.
    compute_slots: int | None = None
    # Threads beyond the slots that start only an interactive tenant's first request while
    # every slot is busy (walkrank.serving.scheduler); 0: none.
    compute_spare: int = 0
    # Niceness added to the compute threads, so the gRPC threads' short work goes first.
    compute_nice: int = 5
    grace_seconds: float = 10.0
    # Shared memory between the server and its candidate-log writer (walkrank.logs.process).
    log_ring_mb: int = 32
    # Niceness added to the log writer threads: logging takes idle CPU, not the requests'.
    log_writer_nice: int = 10
    # Request ids remembered (oldest forgotten first) so ReportEvents can refuse events that
    # quote another tenant's request; 0 turns the check off (walkrank.logs.events.RequestOwners).
    recent_request_ids: int = 200_000
    max_message_bytes: int = 4 * 1024 * 1024
    # Seconds between checks of a graph repository's CURRENT (a new version is swapped in as
    # on Admin.Reload); None: only Admin.Reload swaps graphs (docs/graphs.md).
    graph_watch_seconds: float | None = None
    # Store URIs of `graph`, `models_dir`, `logs_dir` when they are on object storage; the
    # fields above then name their local copies under `cache_dir` (walkrank.storage).
    cache_dir: Path | None = None
    graph_store: str | None = None
    models_store: str | None = None
    logs_store: str | None = None
    # Seconds between passes of the log shipper (closed log files to `logs_store`).
    log_ship_seconds: float = 10.0
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig | None = None
    # Real-time edges (Admin.AddEdges, tenants' saves); None: off (docs/graphs.md).
    realtime: RealtimeConfig | None = None

    def __post_init__(self) -> None:
        """The one check of the settings' bounds: the YAML loader and the CLI's overrides
        (`replace`) both pass through here, so a bad value from either is refused the same way."""
        for key in ("workers", "compute_slots", "log_ring_mb"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if self.graph_watch_seconds is not None and self.graph_watch_seconds <= 0:
            raise ConfigError(
                "graph_watch_seconds: must be > 0 (leave it out to swap "
                "graphs only on Admin.Reload)"
            )
        if not self.log_ship_seconds > 0:
            raise ConfigError(f"log_ship_seconds: must be > 0, got {self.log_ship_seconds}")
        if self.compute_spare < 0:
            raise ConfigError(f"compute_spare: must be >= 0, got {self.compute_spare}")
        if self.recent_request_ids < 0:
            raise ConfigError(f"recent_request_ids: must be >= 0, got {self.recent_request_ids}")
        for key in ("compute_nice", "log_writer_nice"):
            if not 0 <= getattr(self, key) <= 19:
                raise ConfigError(f"{key}: must be in [0, 19], got {getattr(self, key)}")

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)


_TOP_KEYS = {
    "graph",
    "tenants_dir",
    "models_dir",
    "logs_dir",
    "address",
    "metrics_address",
    "workers",
    "compute_slots",
    "compute_spare",
    "compute_nice",
    "grace_seconds",
    "log_ring_mb",
    "log_writer_nice",
    "recent_request_ids",
    "max_message_bytes",
    "graph_watch_seconds",
    "cache_dir",
    "log_ship_seconds",
    "auth",
    "tls",
    "realtime",
}

# Settings that went away, with what to do instead: a config naming one gets that, not
# "unknown setting".
_REMOVED_KEYS = {
    "log_queue_batches": "candidates are buffered (and dropped when full) in the shared-memory "
    "ring, sized by log_ring_mb; remove the line",
}


def parse_tenant_keys(text: str, source: str) -> dict[str, frozenset[str]]:
    """Parse `tenant=key[,tenant=key...]` (several keys per tenant allowed, for rotation)."""
    keys: dict[str, set[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        tenant, sep, key = item.partition("=")
        if not sep or not tenant.strip() or not key.strip():
            raise ConfigError(f"{source}: expected 'tenant=key' entries, got {item!r}")
        keys.setdefault(tenant.strip(), set()).add(key.strip())
    return {tenant: frozenset(values) for tenant, values in keys.items()}


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; errors name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings in the {what}")
    return data


def _load_secrets(path: Path) -> tuple[dict[str, frozenset[str]], str | None]:
    data = _read_mapping(path, "secrets file")
    raw_keys = data.get("tenant_keys", {}) or {}
    if not isinstance(raw_keys, dict):
        raise ConfigError(f"{path}: tenant_keys: expected a mapping tenant -> key or list of keys")
    keys: dict[str, frozenset[str]] = {}
    for tenant, value in raw_keys.items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{path}: tenant_keys.{tenant}: expected a key or a list of keys")
        keys[str(tenant)] = frozenset(values)
    token = data.get("admin_token")
    if token is not None and not isinstance(token, str):
        raise ConfigError(f"{path}: admin_token: expected a string")
    return keys, token


def resolve_auth(enabled: bool, secrets_file: Path | None) -> AuthConfig:
    """Collect keys from the secrets file, then the environment (which wins)."""
    if not enabled:
        return AuthConfig()
    keys: dict[str, frozenset[str]] = {}
    token: str | None = None
    if secrets_file is not None:
        keys, token = _load_secrets(secrets_file)
    if os.environ.get(API_KEYS_ENV):
        for tenant, values in parse_tenant_keys(os.environ[API_KEYS_ENV], API_KEYS_ENV).items():
            keys[tenant] = keys.get(tenant, frozenset()) | values
    token = os.environ.get(ADMIN_TOKEN_ENV) or token
    return AuthConfig(enabled=True, secrets_file=secrets_file, tenant_keys=keys, admin_token=token)


def _expect(path: Path, raw: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{path}: {key}: expected {names}, got {value!r}")
    return value


def load_server_config(path: Path) -> ServerConfig:
    """Parse `walkrank.yaml`; relative paths are relative to the file's directory."""
    raw = _read_mapping(path, "server config")
    for key in sorted(set(raw) & set(_REMOVED_KEYS)):
        raise ConfigError(f"{path}: {key}: no longer a setting; {_REMOVED_KEYS[key]}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}; valid: {sorted(_TOP_KEYS)}")
    for required in ("graph", "tenants_dir", "models_dir", "logs_dir"):
        if required not in raw:
            raise ConfigError(f"{path}: {required}: required")
    base = path.parent

    def resolve(key: str) -> Path:
        return (base / _expect(path, raw, key, str)).resolve()

    values: dict[str, Any] = {key: resolve(key) for key in ("tenants_dir",)}
    if raw.get("cache_dir") is not None:
        values["cache_dir"] = resolve("cache_dir")
    for key, store_key in (
        ("graph", "graph_store"),
        ("models_dir", "models_store"),
        ("logs_dir", "logs_store"),
    ):
        location = _expect(path, raw, key, str)
        if not is_remote(location):
            values[key] = resolve(key)
            continue
        if "cache_dir" not in values:
            raise ConfigError(
                f"{path}: {key}: {location} is on object storage, so cache_dir must name a "
                f"local directory for the server's copies of the graph, models and logs"
            )
        try:
            uri = open_store_uri(location)
            values[key] = mirror_dir(values["cache_dir"], uri)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
        values[store_key] = uri
    for key, kind in (
        ("address", str),
        ("metrics_address", str),
        ("workers", int),
        ("compute_slots", int),
        ("compute_spare", int),
        ("compute_nice", int),
        ("grace_seconds", (int, float)),
        ("log_ring_mb", int),
        ("log_writer_nice", int),
        ("recent_request_ids", int),
        ("max_message_bytes", int),
        ("graph_watch_seconds", (int, float)),
        ("log_ship_seconds", (int, float)),
    ):
        if key in raw and raw[key] is not None:
            values[key] = _expect(path, raw, key, kind)
    auth_raw = raw.get("auth") or {}
    if not isinstance(auth_raw, dict) or set(auth_raw) - {"enabled", "secrets_file"}:
        raise ConfigError(f"{path}: auth: expected {{enabled: bool, secrets_file: path}}")
    secrets = auth_raw.get("secrets_file")
    values["auth"] = resolve_auth(
        bool(auth_raw.get("enabled", False)), (base / secrets).resolve() if secrets else None
    )
    tls_raw = raw.get("tls")
    if tls_raw is not None:
        if not isinstance(tls_raw, dict) or set(tls_raw) != {"cert_file", "key_file"}:
            raise ConfigError(f"{path}: tls: expected {{cert_file: path, key_file: path}}")
        values["tls"] = TlsConfig(
            (base / tls_raw["cert_file"]).resolve(), (base / tls_raw["key_file"]).resolve()
        )
    realtime_raw = raw.get("realtime")
    if realtime_raw is not None:
        if not isinstance(realtime_raw, dict) or set(realtime_raw) - {
            "max_edges",
            "log",
            "flush_ms",
        }:
            raise ConfigError(
                f"{path}: realtime: expected {{max_edges: int, log: path, flush_ms: int}}"
            )
        for key in ("max_edges", "flush_ms"):
            value = realtime_raw.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{path}: realtime.{key}: expected an integer, got {value!r}")
        log_path = realtime_raw.get("log")
        if log_path is not None and not isinstance(log_path, str):
            raise ConfigError(f"{path}: realtime.log: expected a path, got {log_path!r}")
        try:
            values["realtime"] = RealtimeConfig(
                **{k: v for k, v in realtime_raw.items() if k != "log"},
                log=(base / log_path).resolve() if log_path else None,
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    try:
        return ServerConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_port_free(address: str, reuse_port: bool) -> None:
    """ConfigError when another process listens on `address`'s port: one line, before the
    server loads anything (gRPC would fail only at bind time, and log a C-core error line).
    The probe binds as gRPC does (SO_REUSEADDR, and SO_REUSEPORT for `--processes`) and
    closes at once; anything but a port in use is left to gRPC's own bind to report."""
    host, _, port = address.rpartition(":")
    try:
        targets = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError):
        return
    for family, kind, proto, _, target in targets:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(target)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"address: cannot bind {address}: the port is in use by another process"
                    ) from None
