"""gRPC servicers: decode messages, admit the request (tenant, auth, quota), run the pipeline,
encode the answer. The work itself lives in `walkrank.serving.pipeline`."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc
import numpy as np
import yaml

from walkrank.errors import ConfigError, WalkRankError
from walkrank.experiments import request_arm
from walkrank.graph.delta import MAX_BATCH_EDGES, BadEdge, DeltaFull, DeltaSegment, Edge
from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import CandidateSink
from walkrank.logs.events import EventLog, RequestOwners, validate_events
from walkrank.serving.auth import Authenticator, check_tenant_header
from walkrank.serving.errors import (
    DeadlineExceeded,
    InvalidArgument,
    QuotaExceeded,
    TenantNotFound,
    quote,
)
from walkrank.serving.fields import (
    EVENT_CHARS,
    ID_CHARS,
    INTEREST_CHARS,
    LOCALE_CHARS,
    MAX_BATCH_USERS,
    MAX_EXCLUDE_PINS,
    MAX_INTERESTS,
    TENANT_CHARS,
    check_count,
    check_each,
    check_events,
    check_length,
)
from walkrank.serving.graphs import ServedGraph
from walkrank.serving.interceptor import CALL_TENANT, status_of
from walkrank.serving.metrics import ServerMetrics
from walkrank.serving.pipeline import (
    Action,
    RecommendInput,
    RecommendOutput,
    caller_remaining_s,
    check_time,
    recommend,
)
from walkrank.serving.scheduler import ComputePool, SlotTimeout
from walkrank.serving.tenant_table import ReloadReport, TenantRuntime, TenantTable
from walkrank.serving.wire import encode_response
from walkrank.serving.workers import step_aside
from walkrank.tenants import PRIORITIES
from walkrank_client.pb.walkrank.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    events_pb2,
    recommender_pb2,
    recommender_pb2_grpc,
)

#: Response metadata (trailing) naming the graph version that answered a Recommender call.
GRAPH_VERSION_KEY = "walkrank-graph-version"
#: ReportEventsResponse.rejections: the first few, never a huge batch echoed back.
REJECTIONS_SHOWN = 10
#: The methods a tenant's quota admits (`ServingContext.admitted`), which a call of a full
#: tenant is refused before it is read (`ServingContext.shed`).
ADMITTED_METHODS = tuple(
    f"/{recommender_pb2.DESCRIPTOR.services_by_name['Recommender'].full_name}/{name}"
    for name in ("Recommend", "RecommendBatch")
)


class ServingContext:
    """What every servicer shares: the graph, the tenant table, logs, auth and metrics."""

    def __init__(
        self,
        served: ServedGraph,
        tenants: TenantTable,
        candidate_log: CandidateSink,
        event_log: EventLog,
        auth: Authenticator,
        metrics: ServerMetrics,
        compute: ComputePool,
        request_owners: RequestOwners | None = None,
    ) -> None:
        # Replaced whole by a graph swap; a call reads it once (`call_graph`) and keeps it.
        self.served = served
        self.tenants = tenants
        self.candidate_log = candidate_log
        self.event_log = event_log
        # Which tenant served each recent request id (ReportEvents refuses foreign ones).
        self.request_owners = request_owners or RequestOwners(0)
        self.auth = auth
        self.metrics = metrics
        self.compute = compute

    @property
    def graph(self) -> GraphStore:
        return self.served.store

    def call_graph(self, context: grpc.ServicerContext) -> ServedGraph:
        """The graph this call reads from start to end, whatever swaps meanwhile; its version
        goes back in the trailing metadata."""
        served = self.served
        context.set_trailing_metadata(((GRAPH_VERSION_KEY, served.version),))
        return served

    def runtime(self, tenant: str, context: grpc.ServicerContext) -> TenantRuntime:
        """The tenant a request names, once the caller's key may call it."""
        if not tenant:
            raise InvalidArgument("tenant", "required")
        check_length("tenant", tenant, TENANT_CHARS)
        check_tenant_header(context, tenant)
        runtime = self.tenants.get(tenant)
        if runtime is not None:
            CALL_TENANT.set(runtime.name)
        self.auth.check_tenant(context, tenant)
        if runtime is None:
            known = ", ".join(sorted(self.tenants.runtimes())) or "none"
            raise TenantNotFound(f"unknown tenant {quote(tenant)} (known: {known})")
        return runtime

    def lane(self, message: Any) -> str:
        """A call's front-door lane (`walkrank.serving.workers`): its tenant's when it names
        one the server has, else one per message type (health, Admin, unknown tenants)."""
        tenant = getattr(message, "tenant", "")
        if tenant and self.tenants.get(tenant) is not None:
            return tenant
        return type(message).__name__

    @contextmanager
    def admitted(self, runtime: TenantRuntime) -> Iterator[None]:
        """Hold one of the tenant's in-flight slots, or refuse at once when it has none."""
        limiter = self.tenants.counters(runtime.name).limiter
        if not limiter.try_acquire(runtime.config.limits.max_in_flight):
            self._refuse(runtime)
        step_aside()  # it holds its thread until it answers, but no front-door place
        try:
            yield
        finally:
            limiter.release()

    def shed(self, tenant: str) -> Callable[[grpc.ServicerContext], NoReturn] | None:
        """The early refusal (`walkrank.serving.interceptor.Shed`) of a call whose header
        names `tenant`: None unless it is a tenant the server has with every in-flight slot
        taken (read without the lock: a stale answer only moves a refusal to `admitted`)."""
        runtime = self.tenants.get(tenant)
        if runtime is None:
            return None
        if self.tenants.counters(tenant).limiter.in_flight < runtime.config.limits.max_in_flight:
            return None
        return functools.partial(self._refuse_early, runtime)

    def _refuse_early(self, runtime: TenantRuntime, context: grpc.ServicerContext) -> NoReturn:
        CALL_TENANT.set(runtime.name)
        self.auth.check_tenant(context, runtime.name)
        self._refuse(runtime)

    def _refuse(self, runtime: TenantRuntime) -> NoReturn:
        self.record(runtime.name, "RESOURCE_EXHAUSTED")
        raise QuotaExceeded(
            f"tenant {quote(runtime.name)} has {runtime.config.limits.max_in_flight} requests "
            "in flight (its quota); retry later"
        )

    def record(
        self, tenant: str, code: str, output: RecommendOutput | None = None, arm: str = ""
    ) -> None:
        """Count an answer; `arm`: the traffic arm of a request that failed (an answer's
        own arm is in its output)."""
        self.tenants.counters(tenant).record(code)
        if output is None:
            self.metrics.observe_request(tenant, code, None, arm=arm)
        else:
            self.metrics.observe_request(
                tenant,
                code,
                output.timing_ms,
                generated=output.candidates_generated,
                arm=output.arm,
            )

    def serve_one(
        self,
        runtime: TenantRuntime,
        request: RecommendInput,
        context: grpc.ServicerContext,
        graph: GraphStore,
    ) -> bytes:
        """Run the pipeline for one user on a compute thread; the serialized response.

        The call's deadline (the tenant's `deadline_ms` when the caller set none; each user
        of a batch gets it anew) bounds everything: the wait for a compute thread ends at 90%
        of it, so the caller hears why before its own deadline fires, and a walk still
        running when it passes is cancelled (DEADLINE_EXCEEDED), freeing the thread.
        """
        limits = runtime.config.limits
        remaining = caller_remaining_s(context.time_remaining())
        budget_s = limits.deadline_ms / 1e3 if remaining is None else max(0.0, remaining)
        due = time.perf_counter() + budget_s
        cancel = np.zeros(1, np.uint8)
        self.request_owners.add(request.request_id, runtime.name)  # events may quote it
        try:
            output, queue_s = self.compute.run(
                functools.partial(
                    recommend,
                    graph,
                    runtime,
                    request,
                    candidate_log=self.candidate_log,
                    time_remaining=lambda: due - time.perf_counter(),
                    cancel=cancel,
                ),
                PRIORITIES.index(limits.priority),
                wait_s=budget_s * 0.9,
                due=due,
                cancel=cancel,
                tenant=runtime.name,
                weight=limits.max_in_flight,
            )
        except SlotTimeout as exc:
            self.record(runtime.name, "DEADLINE_EXCEEDED", arm=request_arm(runtime, request))
            raise DeadlineExceeded(str(exc)) from None
        except WalkRankError as exc:
            self.record(runtime.name, status_of(exc).name, arm=request_arm(runtime, request))
            raise
        output = dataclasses.replace(output, timing_ms={**output.timing_ms, "queue": queue_s * 1e3})
        self.record(runtime.name, "OK", output)
        return encode_response(runtime.name, output)


def _user_input(
    tenant: str,
    message: recommender_pb2.RecommendRequest | recommender_pb2.BatchUser,
    num_results: int,
    seed: int | None,
    field: str = "",
) -> RecommendInput:
    """One user's request (a RecommendRequest or a batch's BatchUser: the same fields), every
    string within its limit (`walkrank.serving.fields`); `field` prefixes the field named in
    an error (`users[3].`)."""
    user = message.user
    check_length(f"{field}request_id", message.request_id, ID_CHARS)
    check_length(f"{field}user.id", user.id, ID_CHARS)
    check_length(f"{field}user.locale", user.locale, LOCALE_CHARS)
    check_count(f"{field}user.interests", user.interests, MAX_INTERESTS)
    check_each(f"{field}user.interests", user.interests, INTEREST_CHARS)
    pins = tuple(p.pin_id for p in message.query_pins)
    check_each(f"{field}query_pins", pins, ID_CHARS, suffix=".pin_id")
    check_count(f"{field}exclude_pins", message.exclude_pins, MAX_EXCLUDE_PINS)
    check_each(f"{field}exclude_pins", message.exclude_pins, ID_CHARS)
    check_each(f"{field}actions", (a.pin_id for a in message.actions), ID_CHARS, suffix=".pin_id")
    check_each(
        f"{field}actions", (a.action for a in message.actions), EVENT_CHARS, suffix=".action"
    )
    request_time = message.request_time if message.HasField("request_time") else None
    check_time(f"{field}request_time", request_time)
    return RecommendInput(
        tenant=tenant,
        request_id=message.request_id or uuid.uuid4().hex,
        query_pins=pins,
        # A weight of 0 means "unweighted" on the wire (proto3 has no unset floats).
        query_weights=tuple(float(p.weight) if p.weight != 0 else 1.0 for p in message.query_pins),
        user_id=user.id,
        locale=user.locale,
        interests=tuple(user.interests),
        num_results=num_results,
        exclude_pins=tuple(message.exclude_pins),
        seed=seed,
        request_time=request_time,
        actions=tuple(
            Action(a.pin_id, a.action, a.time if a.HasField("time") else None)
            for a in message.actions
        ),
        features=tuple(message.features.items()),
        extra_candidates=tuple((c.pin_id, c.source) for c in message.extra_candidates),
    )


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, serving: ServingContext) -> None:
        self.serving = serving

    def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> bytes:
        runtime = self.serving.runtime(request.tenant, context)
        # Admission before anything else: a tenant past its quota is refused at once.
        with self.serving.admitted(runtime):
            decoded = _user_input(
                runtime.name,
                request,
                request.num_results,
                request.seed if request.HasField("seed") else None,
            )
            graph = self.serving.call_graph(context).store
            return self.serving.serve_one(runtime, decoded, context, graph)

    def RecommendBatch(
        self, request: recommender_pb2.RecommendBatchRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        runtime = self.serving.runtime(request.tenant, context)
        if not request.users:
            raise InvalidArgument("users", "at least one user is required")
        check_count("users", request.users, MAX_BATCH_USERS)
        # A batch holds one in-flight slot for its whole run: a burst of email batches
        # therefore occupies at most the email quota of server threads.
        with self.serving.admitted(runtime):
            graph = self.serving.call_graph(context).store  # every user on the same graph
            seeded = request.HasField("seed")
            # Every user's fields are checked before the first is served.
            users = [
                _user_input(
                    runtime.name,
                    user,
                    request.num_results,
                    (request.seed + position) % 2**64 if seeded else None,
                    field=f"users[{position}].",
                )
                for position, user in enumerate(request.users)
            ]
            for position, decoded in enumerate(users):
                if not context.is_active():
                    raise DeadlineExceeded(f"call ended before user {position} of the batch")
                try:
                    yield self.serving.serve_one(runtime, decoded, context, graph)
                except InvalidArgument as exc:
                    raise InvalidArgument(
                        f"users[{position}].{exc.field}", exc.problem, exc.reason
                    ) from exc

    def ReportEvents(
        self, request: events_pb2.ReportEventsRequest, context: grpc.ServicerContext
    ) -> events_pb2.ReportEventsResponse:
        runtime = self.serving.runtime(request.tenant, context)
        events = list(request.events)
        check_events(events)
        delta = self.serving.served.delta if runtime.config.realtime_saves else None
        saves = _saves_on_boards(events, delta)
        columns = {
            "request_id": [e.request_id for e in events],
            "pin_id": [e.pin_id for e in events],
            "event": [e.event for e in events],
            "timestamp": [e.timestamp if e.HasField("timestamp") else None for e in events],
            "score": [e.score if e.HasField("score") else None for e in events],
        }
        # Stored with the reporting tenant; a request id served for another tenant is
        # refused row by row, without saying whose it is.
        accepted, report = validate_events(
            columns,
            tenant=runtime.name,
            owners=self.serving.request_owners,
            source="events",
            max_examples=len(events) if saves else REJECTIONS_SHOWN,  # saves: every rejection
        )
        if accepted.num_rows and not self.serving.event_log.submit(accepted):
            raise QuotaExceeded(
                "the event log queue is full; nothing from this call was kept, retry later"
            )
        self.serving.tenants.counters(runtime.name).add_events(accepted.num_rows, report.count)
        if saves and delta is not None:  # the accepted saves become edges
            rejected = {r.index for r in report.examples}
            delta.add_saves([edge for i, edge in saves if i not in rejected])
        return events_pb2.ReportEventsResponse(
            accepted=accepted.num_rows,
            rejected=report.count,
            rejections=[
                events_pb2.EventRejection(index=r.index, reason=r.reason)
                for r in report.examples[:REJECTIONS_SHOWN]
            ],
        )


def _saves_on_boards(events: list[Any], delta: DeltaSegment | None) -> list[tuple[int, Edge]]:
    """The "save" events naming a board, as (index, pin-board edge), when `delta` takes them
    (the tenant has `graph.realtime_saves` and the server real-time edges); an id the graph
    cannot hold is INVALID_ARGUMENT naming the event, before anything is kept."""
    if delta is None:
        return []
    saves = []
    for index, event in enumerate(events):
        if event.HasField("board_id") and event.event.strip().lower() == "save":
            moment = event.timestamp if event.HasField("timestamp") else None
            edge = Edge(event.pin_id, event.board_id, moment)
            try:
                delta.check(Edge(edge.pin_id, edge.board_id), f"events[{index}]")
            except BadEdge as exc:
                raise InvalidArgument(exc.field, exc.problem) from None
            saves.append((index, edge))
    return saves


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Admin calls; the admin token is checked for every one of them by the request
    boundary (`RequestBoundary` guards), before the request is decoded."""

    def __init__(
        self, serving: ServingContext, reload: Callable[[frozenset[str] | None], ReloadReport]
    ) -> None:
        self.serving = serving
        self._reload = reload

    def _tenant_summary(self, runtime: TenantRuntime) -> admin_pb2.TenantSummary:
        return admin_pb2.TenantSummary(
            name=runtime.name,
            model_version=runtime.model_version,
            config_file=str(runtime.config.source),
        )

    def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListTenantsResponse:
        runtimes = self.serving.tenants.runtimes()
        return admin_pb2.ListTenantsResponse(
            tenants=[self._tenant_summary(runtimes[name]) for name in sorted(runtimes)]
        )

    def GetTenant(
        self, request: admin_pb2.GetTenantRequest, context: grpc.ServicerContext
    ) -> admin_pb2.TenantInfo:
        runtime = self.serving.tenants.get(request.name)
        if runtime is None:
            raise TenantNotFound(f"unknown tenant {quote(request.name)}")
        counters = self.serving.tenants.counters(runtime.name).snapshot()
        return admin_pb2.TenantInfo(
            name=runtime.name,
            config_yaml=yaml.safe_dump(runtime.config.to_dict(), sort_keys=False),
            config_file=str(runtime.config.source),
            model_version=runtime.model_version,
            model_engine=runtime.scorer.engine if runtime.scorer is not None else "",
            counters=admin_pb2.TenantCounters(**counters),
            last_reload_error=self.serving.tenants.errors.get(runtime.name, ""),
        )

    def Reload(
        self, request: admin_pb2.ReloadRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ReloadResponse:
        check_each("tenants", request.tenants, TENANT_CHARS)
        report = self._reload(frozenset(request.tenants) or None)
        changes = [admin_pb2.ReloadChange(tenant=t, kind="added") for t in report.added]
        changes += [admin_pb2.ReloadChange(tenant=t, kind="removed") for t in report.removed]
        changes += [admin_pb2.ReloadChange(tenant=t, kind="config") for t in report.updated]
        changes += [
            admin_pb2.ReloadChange(tenant=t, kind="model", detail=f"now {v}")
            for t, v in sorted(report.models.items())
            if t not in report.added
        ]
        if report.graph:
            changes.append(admin_pb2.ReloadChange(kind="graph", detail=report.graph))
        errors = [
            admin_pb2.FileError(path=report.error_files[name], message=message)
            for name, message in sorted(report.errors.items())
        ]
        if report.graph_error is not None:
            path, message = report.graph_error
            errors.append(admin_pb2.FileError(path=path, message=message))
        return admin_pb2.ReloadResponse(changes=changes, errors=errors)

    def GraphInfo(
        self, request: admin_pb2.GraphInfoRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GraphInfoResponse:
        served = self.serving.served
        graph = served.store
        manifest = {k: v for k, v in graph.manifest.items() if k != "checksums"}
        return admin_pb2.GraphInfoResponse(
            path=str(served.path),
            n_pins=graph.n_pins,
            n_boards=graph.n_boards,
            n_edges=graph.n_edges,
            locales=list(graph.locales),
            topics=list(graph.topics),
            manifest_json=json.dumps(manifest, default=str, sort_keys=True),
            version=served.version,
            repository=str(served.source) if served.source != served.path else "",
        )

    def AddEdges(
        self, requests: Iterator[admin_pb2.AddEdgesRequest], context: grpc.ServicerContext
    ) -> admin_pb2.AddEdgesResponse:
        delta = self.serving.served.delta
        if delta is None:
            raise ConfigError(
                "real-time edges are off on this server: add a `realtime:` section to "
                "walkrank.yaml (docs/graphs.md)"
            )
        totals = np.zeros(4, np.int64)  # added, duplicates, new pins, new boards
        try:
            for number, request in enumerate(requests):
                field = f"requests[{number}].edges"
                check_count(field, request.edges, MAX_BATCH_EDGES)
                edges = [
                    Edge(e.pin_id, e.board_id, e.created_at if e.HasField("created_at") else None)
                    for e in request.edges
                ]
                try:
                    result = delta.add(edges, field=field)
                except BadEdge as exc:
                    raise InvalidArgument(exc.field, exc.problem) from None
                except DeltaFull as exc:
                    raise QuotaExceeded(
                        f"{exc}; {int(totals[0]):,} edges of this call's earlier batches were added"
                    ) from None
                totals += (result.added, result.duplicates, result.new_pins, result.new_boards)
        finally:
            delta.publish()  # what was added is visible to the next call
        return admin_pb2.AddEdgesResponse(
            added=int(totals[0]),
            duplicates=int(totals[1]),
            new_pins=int(totals[2]),
            new_boards=int(totals[3]),
            delta_edges=delta.edges,
            max_edges=delta.max_edges,
        )
