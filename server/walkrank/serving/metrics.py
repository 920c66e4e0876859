"""Prometheus metrics, one registry per server so several servers can share a process (tests)."""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Stage latencies are milliseconds-scale; buckets span a cache-hot walk to a slow batch.
_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self) -> None:
        self._http: WSGIServer | None = None
        self._children: dict[tuple[Any, ...], Any] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "walkrank_requests",
            "Recommend calls by tenant and status code",
            ["tenant", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "walkrank_stage_seconds",
            "Latency per request stage",
            ["tenant", "stage"],
            buckets=_BUCKETS_S,
            registry=self.registry,
        )
        self.candidates = Counter(
            "walkrank_candidates",
            "Candidates generated (kind=generated); every one is featurised and scored",
            ["tenant", "kind"],
            registry=self.registry,
        )
        # walkrank.experiments: exploration, experiment arms (docs/evaluation.md).
        self.arm_requests = Counter(
            "walkrank_arm_requests",
            "Recommend answers by tenant, traffic arm (explore, an experiment arm, default) "
            "and status code",
            ["tenant", "arm", "code"],
            registry=self.registry,
        )
        self.arm_latency = Histogram(
            "walkrank_arm_seconds",
            "Pipeline time of answered requests by tenant and traffic arm",
            ["tenant", "arm"],
            buckets=_BUCKETS_S,
            registry=self.registry,
        )
        self.client_errors = Counter(
            "walkrank_client_errors",
            "Calls refused for the client's doing (undecodable, invalid, too long, unknown "
            "tenant, credentials, quota), by tenant ('unknown' before one is named) and reason",
            ["tenant", "reason"],
            registry=self.registry,
        )
        self.model_version = Gauge(
            "walkrank_model_version",
            "Model version in use (0 = visit count)",
            ["tenant"],
            registry=self.registry,
        )
        self.tenant_load_error = Gauge(
            "walkrank_tenant_load_error",
            "1 while the tenant's file or model failed its last (re)load (it serves what it "
            "served before, or visit count)",
            ["tenant"],
            registry=self.registry,
        )
        # A repository's version number (0 for a plain graph directory), so a dashboard sees
        # every replica move to the new graph after a publish (docs/graphs.md).
        self.graph_version = Gauge(
            "walkrank_graph_version",
            "Version of the graph being served (0: not a repository)",
            registry=self.registry,
        )
        self.graph_load_error = Gauge(
            "walkrank_graph_load_error",
            "1 while the newest graph failed to load or was refused (the previous one serves)",
            registry=self.registry,
        )
        # Real-time edges (docs/graphs.md): what the delta holds against realtime.max_edges,
        # and what was refused or lost on the way in.
        self.realtime_edges = Gauge(
            "walkrank_realtime_edges",
            "Edges in the real-time delta (walks read them beside the graph)",
            registry=self.registry,
        )
        self.realtime_dropped = Gauge(
            "walkrank_realtime_dropped",
            "Tenants' saves refused at realtime.max_edges (what=saves), and append-log bytes "
            "skipped at startup as a truncated or corrupt tail (what=log_bytes)",
            ["what"],
            registry=self.registry,
        )
        # Every row a log accepted or refused but never wrote, by log (candidates, events)
        # and reason: queue_full, closed, writer_died, bad_record, write_error.
        self.log_dropped = Counter(
            "walkrank_log_dropped_rows",
            "Log rows offered but never written, by log and reason",
            ["log", "reason"],
            registry=self.registry,
        )

    def observe_request(
        self,
        tenant: str,
        code: str,
        timing_ms: dict[str, float] | None,
        generated: int = 0,
        arm: str = "",
    ) -> None:
        self._child(self.requests, tenant, code).inc()
        if arm:
            self._child(self.arm_requests, tenant, arm, code).inc()
            if timing_ms is not None and "total" in timing_ms:
                self._child(self.arm_latency, tenant, arm).observe(timing_ms["total"] / 1e3)
        for stage, ms in (timing_ms or {}).items():
            self._child(self.latency, tenant, stage).observe(ms / 1e3)
        if generated:
            self._child(self.candidates, tenant, "generated").inc(generated)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: every answered call observes about ten series, and
        `labels()` checks and locks on each lookup (none of these series is ever removed)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def serve(self, address: str) -> None:
        """Expose /metrics on `host:port` (a port separate from gRPC) until `close`."""
        host, _, port = address.rpartition(":")
        self._http, _ = start_http_server(
            int(port), addr=host or "127.0.0.1", registry=self.registry
        )

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
