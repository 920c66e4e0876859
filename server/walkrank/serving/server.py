"""Server lifecycle: load the graph and tenants, bind, serve, swap graphs, stop gracefully.

Shutdown order matters: stop accepting calls, let in-flight calls finish within the grace
period, then close the logs so every queued candidate and event reaches disk. A graph swap
(`reload`, or the repository watcher) opens, verifies and warms the new version beside the one
serving and replaces it in one assignment (`walkrank.serving.graphs`).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from walkrank.errors import ConfigError, WalkRankError
from walkrank.graph.delta import DeltaSegment
from walkrank.graph.repository import resolve_graph
from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import CandidateLog
from walkrank.logs.events import EventLog, RequestOwners
from walkrank.logs.partitioned import WriterOptions
from walkrank.logs.process import ProcessLog
from walkrank.logs.shipping import LogShipper
from walkrank.model_registry import ModelRegistry
from walkrank.serving.auth import Authenticator
from walkrank.serving.config import ServerConfig, check_port_free
from walkrank.serving.graphs import ServedGraph, open_graph, refuse_for_tenants
from walkrank.serving.health import TenantHealth
from walkrank.serving.interceptor import RequestBoundary
from walkrank.serving.metrics import ServerMetrics
from walkrank.serving.pipeline import NO_DEADLINE_S, RecommendInput, recommend
from walkrank.serving.reflection import enable_reflection
from walkrank.serving.scheduler import ComputePool, available_cores
from walkrank.serving.servicers import (
    ADMITTED_METHODS,
    AdminServicer,
    RecommenderServicer,
    ServingContext,
)
from walkrank.serving.tenant_table import ReloadReport, TenantTable
from walkrank.serving.wire import add_recommender
from walkrank.serving.workers import FrontDoor, WorkerPool
from walkrank.storage import check_store, pull, sync_graph
from walkrank_client.pb.walkrank.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    recommender_pb2,
)

log = logging.getLogger(__name__)

OVERALL = ""
RECOMMENDER = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
# Every compute job ends by its deadline (walks are cancelled then), so jobs waiting this
# long with none finishing mean the compute threads are stuck: overall health NOT_SERVING.
STALL_S = 5.0
# Niceness added to the thread that opens, verifies, pages in and warms a new graph (and to
# the checksum threads it starts, which inherit it): a swap takes idle CPU, not the calls'.
GRAPH_LOAD_NICE = 10
# Batches between the log child's ring reader and its writer thread; the reader waits when
# they are queued, so the ring, not this queue, is where candidates are dropped.
CHILD_QUEUE_BATCHES = 4096


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):  # niceness is per thread there
        os.setpriority(
            os.PRIO_PROCESS,
            threading.get_native_id(),
            min(19, os.getpriority(os.PRIO_PROCESS, 0) + GRAPH_LOAD_NICE),
        )


class WalkRankServer:
    """One process: one graph, every tenant. `start()` binds and returns the port."""

    def __init__(self, config: ServerConfig, *, reuse_port: bool = False) -> None:
        self.config = config
        # Graph and models on object storage: mirrored into the cache first (the store must
        # answer at start; later failures keep what serves), logs shipped there once closed.
        for store in (config.graph_store, config.models_store, config.logs_store):
            if store is not None:
                check_store(store)
        self._sync_graph()
        if config.models_store is not None:
            pull(config.models_store, config.models_dir)
        self.log_shipper: LogShipper | None = None
        # Verified before anything runs on it (a corrupt file is an error naming it, not a
        # crash in the kernels), and leased so `graph build --replace` and repository
        # retention leave it alone.
        served = open_graph(config.graph)
        if config.realtime is not None:  # replays the append log, if any
            delta = DeltaSegment(
                served.base,
                max_edges=config.realtime.max_edges,
                log_path=config.realtime.log,
                flush_s=config.realtime.flush_ms / 1e3,
            )
            served = dataclasses.replace(served, delta=delta)
        self.metrics = ServerMetrics()
        if served.delta is not None:  # read at each scrape; the delta outlives graph swaps
            delta = served.delta
            self.metrics.realtime_edges.set_function(lambda: delta.edges)
            self.metrics.realtime_dropped.labels("saves").set_function(lambda: delta.dropped_saves)
            self.metrics.realtime_dropped.labels("log_bytes").set(delta.replay.skipped_bytes)
        self._graph_lock = threading.Lock()
        self._set_graph_metrics(served, error=False)
        self.tenants = TenantTable(config.tenants_dir, ModelRegistry(config.models_dir))
        # Candidates are written by a child process (walkrank.logs.process), restarted if it
        # dies, events (few) by a thread. Every row offered and not written is counted.
        self.candidate_log = ProcessLog(
            functools.partial(CandidateLog, config.logs_dir),
            WriterOptions(queue_size=CHILD_QUEUE_BATCHES),
            ring_bytes=config.log_ring_mb << 20,
            on_lost=functools.partial(self._log_lost, "candidates"),
            nice=config.log_writer_nice,
            name="walkrank-candidate-log",
        )
        self.event_log = EventLog(
            config.logs_dir,
            WriterOptions(
                writer_nice=config.log_writer_nice,
                on_drop=lambda table: self._log_lost("events", "queue_full", table.num_rows),
                on_lost=functools.partial(self._log_lost, "events"),
            ),
        )
        if config.logs_store is not None:
            self.log_shipper = LogShipper(
                config.logs_dir,
                config.logs_store,
                interval=config.log_ship_seconds,
                registry=self.metrics.registry,
            )
        auth = Authenticator(config.auth)
        self.health = TenantHealth(auth)
        self.serving = ServingContext(
            served,
            self.tenants,
            self.candidate_log,
            self.event_log,
            auth,
            self.metrics,
            ComputePool(
                config.compute_slots or available_cores(),
                nice=config.compute_nice,
                spare=config.compute_spare,
            ),
            RequestOwners(config.recent_request_ids),
        )
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        self._workers = WorkerPool(config.workers)
        self._boundary = RequestBoundary(
            self.metrics,
            guards={RECOMMENDER: auth.authenticate, ADMIN: auth.check_admin},
            door=FrontDoor(config.workers),
            lane=self.serving.lane,
            shed={method: self.serving.shed for method in ADMITTED_METHODS},
        )
        self._server = grpc.server(
            self._workers,
            interceptors=[self._boundary],
            options=options,
            maximum_concurrent_rpcs=None,
        )
        add_recommender(RecommenderServicer(self.serving), self._server)
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminServicer(self.serving, self.reload), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        enable_reflection(
            self._server,
            [RECOMMENDER, ADMIN, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
        )
        self.port = 0
        self._reuse_port = reuse_port
        self._stopped = threading.Event()
        self.stall_after_s = STALL_S

    @property
    def graph(self) -> GraphStore:
        """The graph serving now (a swap may replace it at any moment)."""
        return self.serving.graph

    def _log_lost(self, kind: str, reason: str, rows: int) -> None:
        self.metrics.log_dropped.labels(kind, reason).inc(rows)

    def warm_up(self, graph: GraphStore | None = None) -> None:
        """Run each tenant's path once (no logging) on `graph` (default: the one serving) so
        compiled kernels load before traffic does."""
        graph = self.graph if graph is None else graph
        if graph.n_pins == 0:
            return
        first_pin = str(graph.pin_external([0])[0])
        for name, runtime in self.tenants.runtimes().items():
            # A day, not the tenant's deadline: loading (or, on a cold cache, compiling) the
            # kernels takes seconds.
            try:
                recommend(
                    graph,
                    runtime,
                    RecommendInput(tenant=name, request_id="warm-up", query_pins=(first_pin,)),
                    time_remaining=lambda: NO_DEADLINE_S,
                )
            except Exception:  # one tenant's failure never stops the server's startup
                log.exception("tenant %s: warm-up call failed", name)

    def start(self) -> int:
        """Load the tenants, warm up, bind and serve; on any failure everything started so far
        (the log writer process, the compute threads) is stopped before the error propagates,
        so a failed start exits instead of hanging."""
        try:
            return self._start()
        except BaseException:
            self.stop(grace=0)
            raise

    def _start(self) -> int:
        check_port_free(self.config.address, self._reuse_port)  # before seconds of loading
        if self.log_shipper is not None:  # its first pass ships what a previous run left
            self.log_shipper.start()
        self.reload()
        self.warm_up()
        # Everything loaded so far lives as long as the server: keep it out of the cyclic
        # collector, whose full passes over it hold the GIL for milliseconds (a tail event
        # for every request in flight).
        gc.collect()
        gc.freeze()
        self.port = self._bind()
        self._server.start()
        threading.Thread(target=self._watch_compute, name="walkrank-health", daemon=True).start()
        if self.config.graph_watch_seconds is not None:
            threading.Thread(
                target=self._watch_graph, name="walkrank-graph-watch", daemon=True
            ).start()
        if self.config.metrics_address:
            self.metrics.serve(self.config.metrics_address)
        log.info("serving %d tenants on port %d", len(self.tenants.runtimes()), self.port)
        return self.port

    def _bind(self) -> int:
        """Add the listening port; ConfigError naming the address when it cannot be bound."""
        credentials = None
        if self.config.tls is not None:
            try:
                credentials = grpc.ssl_server_credentials(
                    [
                        (
                            self.config.tls.key_file.read_bytes(),
                            self.config.tls.cert_file.read_bytes(),
                        )
                    ]
                )
            except OSError as exc:
                raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from exc
        try:
            port = (
                self._server.add_insecure_port(self.config.address)
                if credentials is None
                else self._server.add_secure_port(self.config.address, credentials)
            )
        except RuntimeError:  # grpcio 1.85 raises "Failed to bind to address ..." (no port 0)
            port = 0
        if port == 0:
            raise ConfigError(
                f"address: cannot bind {self.config.address} (the port is in use "
                f"or the host is not an address of this machine)"
            )
        return port

    def reload(self, models_for: frozenset[str] | None = None) -> ReloadReport:
        """Reload tenants (and the models of `models_for`, default all), swap in a new graph
        version if the repository's CURRENT moved, then publish health."""
        store_error = self._pull_models()
        report = self.tenants.reload(models_for)
        if store_error is not None:  # every tenant keeps the model it had
            names = models_for if models_for is not None else self.tenants.runtimes()
            report = dataclasses.replace(
                report,
                errors={**{name: store_error for name in names}, **report.errors},
                error_files={
                    **{name: str(self.config.models_store) for name in names},
                    **report.error_files,
                },
            )
        graph_change, graph_error = self.reload_graph()
        report = dataclasses.replace(report, graph=graph_change, graph_error=graph_error)
        runtimes = self.tenants.runtimes()
        for name in report.removed:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        for name, runtime in runtimes.items():
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            version = runtime.model.version if runtime.model is not None else 0
            self.metrics.model_version.labels(name).set(version)
        for name in set(runtimes) | set(report.errors) | set(report.removed):
            self.metrics.tenant_load_error.labels(name).set(int(name in report.errors))
        self.health.set(OVERALL, health_pb2.HealthCheckResponse.SERVING)
        self._workers.fit(sum(r.config.limits.max_in_flight for r in runtimes.values()))
        return report

    def reload_graph(self) -> tuple[str, tuple[str, str] | None]:
        """Swap in the graph `graph:` names now, if it is another version than the one
        serving: opened, verified, paged in, checked against the tenants' models and warmed
        up first, all off the request path. Returns (change, (path, error)); on an error the
        graph serving keeps serving."""
        with self._graph_lock:
            served = self.serving.served
            try:
                self._sync_graph()
                directory, version = resolve_graph(self.config.graph)
                if directory == served.path and version == served.version:
                    self._set_graph_metrics(served, error=False)  # e.g. rolled back to it
                    return "", None
                started = time.perf_counter()
                with futures.ThreadPoolExecutor(
                    1, "walkrank-graph-load", initializer=_lower_priority
                ) as loader:
                    new = loader.submit(self._open_checked, served).result()
            except Exception as exc:  # contained: whatever failed, the old graph serves on
                problem = (
                    str(exc) if isinstance(exc, WalkRankError) else (f"{type(exc).__name__}: {exc}")
                )
                log.error(
                    "graph %s: not swapped in, graph %s keeps serving: %s",
                    self.config.graph,
                    served.version,
                    problem,
                    exc_info=not isinstance(exc, WalkRankError),
                )
                self._set_graph_metrics(served, error=True)
                return "", (str(self.config.graph), problem)
            if served.delta is not None:
                # The delta moves to the new base: what a compaction folded in leaves it.
                # Calls starting in between walk the new base under the old version's label.
                served.delta.rebase(new.base)
                new = dataclasses.replace(new, delta=served.delta)
            self.serving.served = new  # the swap: calls that started before keep the old one
            log.info(
                "graph %s: now version %s (was %s): opened and verified in %.3f s, paged in "
                "%.3f s, ready after %.3f s",
                self.config.graph,
                new.version,
                served.version,
                new.open_s,
                new.page_in_s,
                time.perf_counter() - started,
            )
            self._set_graph_metrics(new, error=False)
            return f"now {new.version} (was {served.version})", None

    def _open_checked(self, served: ServedGraph) -> ServedGraph:
        """The configured graph opened, checked against the tenants' models and warmed up."""
        new = open_graph(self.config.graph)
        refuse_for_tenants(self.tenants.runtimes(), served, new)
        self.warm_up(new.store)
        return new

    def _sync_graph(self) -> None:
        """A graph repository on object storage: its CURRENT version into the local mirror."""
        if self.config.graph_store is not None:
            sync_graph(self.config.graph_store, self.config.graph)

    def _pull_models(self) -> str | None:
        """A model registry on object storage: its CURRENT versions into the local mirror;
        the error (the mirror stays as it was) or None."""
        if self.config.models_store is None:
            return None
        try:
            pull(self.config.models_store, self.config.models_dir)
        except WalkRankError as exc:
            log.error("models not refreshed, every tenant keeps its model: %s", exc)
            return f"models not refreshed from the store: {exc}"
        return None

    def _set_graph_metrics(self, served: ServedGraph, error: bool) -> None:
        self.metrics.graph_version.set(int(served.version) if served.version.isdigit() else 0)
        self.metrics.graph_load_error.set(int(error))

    def _watch_graph(self) -> None:
        """Follow the repository's CURRENT (`graph_watch_seconds`); a version that fails is
        reported once per attempt, in the log and `walkrank_graph_load_error`."""
        # (graph path, version), or ("", the error) when CURRENT cannot be read
        target: tuple[Path | str, str]
        failed: tuple[Path | str, str] | None = None
        while not self._stopped.wait(self.config.graph_watch_seconds):
            try:
                self._sync_graph()
                target = resolve_graph(self.config.graph)
            except Exception as exc:  # reported by the reload below, as on Admin.Reload
                target = ("", str(exc))
            served = self.serving.served
            if target == (served.path, served.version):
                if failed is not None:  # CURRENT is back at what serves: no error any more
                    self._set_graph_metrics(served, error=False)
                failed = None
                continue
            if target != failed:  # a version that failed is tried again only on Reload
                _, error = self.reload_graph()
                failed = target if error is not None else None

    def _watch_compute(self) -> None:
        """Overall health NOT_SERVING while the compute pool is stalled, SERVING again after."""
        stalled = False
        while not self._stopped.wait(self.stall_after_s / 4):
            stalled_s = self.serving.compute.stalled_for()
            if stalled_s > self.stall_after_s:
                if not stalled:
                    log.error(
                        "compute threads stalled: jobs waiting %.1f s, none finished", stalled_s
                    )
                stalled = True
                self.health.set(OVERALL, health_pb2.HealthCheckResponse.NOT_SERVING)
            elif stalled:
                stalled = False
                self.health.set(OVERALL, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, finish in-flight calls within the grace period, cancel the walks
        still running after it (they end within a lock-step round), then flush the logs."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self._server.stop(self.config.grace_seconds if grace is None else grace).wait()
        # gRPC leaves the thread pools it was given running: their threads are idle by now.
        self._workers.shutdown(wait=False)
        self._boundary.close()
        self.serving.compute.close()
        self.candidate_log.close()
        self.event_log.close()
        if self.log_shipper is not None:
            self.log_shipper.close()
        self.metrics.close()
        if self.serving.served.delta is not None:
            self.serving.served.delta.close()
        self.serving.served.release()

    def wait(self) -> None:
        self._server.wait_for_termination()
