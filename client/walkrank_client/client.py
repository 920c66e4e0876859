"""`WalkRankClient`: a typed, retrying client of the WalkRank gRPC API.

Authentication travels as gRPC metadata, with the header names the server reads:

- `x-api-key`: the tenant API key, sent with Recommender calls (Recommend, RecommendBatch,
  ReportEvents);
- `x-walkrank-tenant`: the call's tenant, sent with Recommender calls, so an Envoy in front
  can hold each tenant to its quota before a call reaches a server (the server refuses a
  call whose header and request disagree);
- `x-admin-token`: the admin token, sent with Admin calls (ListTenants, GetTenant, Reload,
  GraphInfo).

Health checks (`grpc.health.v1.Health/Check`) carry neither. Every attempt of a call has a
deadline (the client's `timeout` unless the call passes its own), and a call is retried with
exponential backoff when the server is UNAVAILABLE (not started yet, restarting, connection
lost); any other status is raised at once as `WalkRankClientError`.

Replicas without a balancer in front: give several addresses (a list, or one comma-separated
string of `ip:port`s) or a DNS name with the `dns:` scheme (`dns:///walkrank-replicas:50051`,
every address the name has, re-resolved as replicas come and go). The channel then uses
gRPC's own `round_robin` policy (a replica per call) with client-side health checking: each
replica's `grpc.health.v1` status is watched and only SERVING replicas get calls. An
UNAVAILABLE call, retried, goes to the next replica. Admin calls that change a server
(`reload`) go to one replica; `reload_each` calls every one.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from walkrank_client.pb import (
    admin_pb2,
    admin_pb2_grpc,
    events_pb2,
    recommender_pb2,
    recommender_pb2_grpc,
)

API_KEY_HEADER = "x-api-key"
ADMIN_TOKEN_HEADER = "x-admin-token"
TENANT_HEADER = "x-walkrank-tenant"
_TENANT_NAME = re.compile(r"[a-z0-9_]{1,64}")  # walkrank.tenants.TENANT_NAME_RE

PinId = int | str
#: A moment: epoch seconds, or a datetime (naive means UTC).
Moment = datetime | float | int

#: Service config of a channel over several replicas: a replica per call, healthy ones only.
BALANCED_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
)

_T = TypeVar("_T")


class WalkRankClientError(Exception):
    """A call failed: `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.code = code
        self.details = details
        self.method = method


#: A user's action: a `UserAction`, or a mapping with `pin_id`, `action` and optionally `time`
#: (a `Moment`; unset means at the request time).
ActionLike = Mapping[str, Any] | recommender_pb2.UserAction
#: A candidate from the client's other generators: an `ExtraCandidate`, or a (pin id, source)
#: pair.
ExtraLike = tuple[PinId, str] | recommender_pb2.ExtraCandidate


@dataclass(frozen=True)
class UserQuery:
    """One user of a `recommend_batch` call: query `pins` (with `weights`) or `actions`."""

    pins: Sequence[PinId] = ()
    weights: Sequence[float] | None = None
    user_id: str | None = None
    locale: str | None = None
    interests: Sequence[str] | None = None
    exclude: Sequence[PinId] | None = None
    request_id: str | None = None
    request_time: Moment | None = None
    actions: Sequence[ActionLike] | None = None
    features: Mapping[str, float] | None = None
    extra_candidates: Sequence[ExtraLike] | None = None


def epoch_seconds(moment: Moment | None) -> float | None:
    """A moment as the API's epoch seconds (a naive datetime is UTC); None stays None (the
    server's now)."""
    if moment is None:
        return None
    if isinstance(moment, datetime):
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    return float(moment)


def query_pins(
    pins: Sequence[PinId], weights: Sequence[float] | None = None, *, field: str = "weights"
) -> list[recommender_pb2.QueryPin]:
    """Query pins with their weights (1.0 each when `weights` is None); `field` names the
    weights in the error when the lengths differ."""
    if weights is None:
        weights = [1.0] * len(pins)
    if len(weights) != len(pins):
        raise ValueError(f"{field}: {len(weights)} weights for {len(pins)} pins")
    return [
        recommender_pb2.QueryPin(pin_id=str(p), weight=w)
        for p, w in zip(pins, weights, strict=True)
    ]


_ACTION_FIELDS = frozenset({"pin_id", "action", "time"})


def user_actions(
    actions: Sequence[ActionLike] | None, pins: Sequence[PinId], *, field: str = "actions"
) -> list[recommender_pb2.UserAction]:
    """`UserAction` messages (the server weighs them with the tenant's `query` settings);
    ValueError naming `field` for a malformed one, or when `pins` are given too (a request
    sends query pins or actions)."""
    if not actions:
        return []
    if pins:
        raise ValueError(f"{field}: pass query pins or actions, not both")
    out = []
    for index, action in enumerate(actions):
        if isinstance(action, recommender_pb2.UserAction):
            out.append(action)
            continue
        unknown, missing = set(action) - _ACTION_FIELDS, {"pin_id", "action"} - set(action)
        if unknown or missing:
            problem = (
                f"unknown fields {sorted(unknown)}"
                if unknown
                else (f"missing fields {sorted(missing)}")
            )
            raise ValueError(f"{field}[{index}]: {problem}")
        out.append(
            recommender_pb2.UserAction(
                pin_id=str(action["pin_id"]),
                action=str(action["action"]),
                time=epoch_seconds(action.get("time")),
            )
        )
    return out


def _user(
    user_id: str | None, locale: str | None, interests: Sequence[str] | None
) -> recommender_pb2.User:
    return recommender_pb2.User(id=user_id or "", locale=locale or "", interests=interests or ())


def extra_candidate_messages(
    extras: Sequence[ExtraLike] | None,
) -> list[recommender_pb2.ExtraCandidate]:
    """Extra candidates as messages: (pin id, source) pairs or `ExtraCandidate`s."""
    return [
        e
        if isinstance(e, recommender_pb2.ExtraCandidate)
        else recommender_pb2.ExtraCandidate(pin_id=str(e[0]), source=e[1])
        for e in extras or ()
    ]


def _batch_user(
    query: UserQuery | recommender_pb2.BatchUser, index: int
) -> recommender_pb2.BatchUser:
    if isinstance(query, recommender_pb2.BatchUser):
        return query
    return recommender_pb2.BatchUser(
        request_id=query.request_id or "",
        user=_user(query.user_id, query.locale, query.interests),
        query_pins=query_pins(query.pins, query.weights, field=f"users[{index}].weights"),
        actions=user_actions(query.actions, query.pins, field=f"users[{index}].actions"),
        exclude_pins=[str(p) for p in query.exclude or ()],
        request_time=epoch_seconds(query.request_time),
        features=dict(query.features or {}),
        extra_candidates=extra_candidate_messages(query.extra_candidates),
    )


_EVENT_FIELDS = frozenset({"request_id", "pin_id", "event", "score", "timestamp", "board_id"})


def _event(event: Mapping[str, Any] | events_pb2.Event, index: int) -> events_pb2.Event:
    if isinstance(event, events_pb2.Event):
        return event
    unknown = set(event) - _EVENT_FIELDS
    if unknown:
        raise ValueError(f"events[{index}]: unknown fields {sorted(unknown)}")
    missing = {"request_id", "pin_id", "event"} - set(event)
    if missing:
        raise ValueError(f"events[{index}]: missing fields {sorted(missing)}")
    score = event.get("score")
    return events_pb2.Event(
        request_id=str(event["request_id"]),
        pin_id=str(event["pin_id"]),
        event=str(event["event"]),
        # None leaves an optional field unset (the server's defaults).
        score=None if score is None else float(score),
        timestamp=epoch_seconds(event.get("timestamp")),
        board_id=None if event.get("board_id") is None else str(event["board_id"]),
    )


def _replica_addresses(address: str | Sequence[str]) -> tuple[str, ...]:
    """The `host:port`s of a comma-separated string or a sequence, stripped."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    addresses = tuple(part.strip() for part in parts if part.strip())
    if not addresses:
        raise ValueError("address: no server address given")
    return addresses


def channel_target(addresses: Sequence[str]) -> tuple[str, bool]:
    """The gRPC target for `addresses` and whether it balances over replicas: one address is
    used as given (any gRPC target; `dns:` ones balance); several must be IP literals of one
    family and become an `ipv4:` / `ipv6:` target."""
    if len(addresses) == 1:
        return addresses[0], addresses[0].startswith("dns:")
    families = set()
    for address in addresses:
        host, sep, port = address.rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(
                f"address: {address!r}: several addresses must be ip:port each; "
                f"for a name with several addresses use 'dns:///NAME:PORT'"
            ) from None
        if not sep or not port.isdigit():
            raise ValueError(f"address: {address!r}: expected ip:port")
    if len(families) != 1:
        raise ValueError("address: mix of IPv4 and IPv6 addresses; give one family")
    return f"ipv{families.pop()}:{','.join(addresses)}", True


def resolve_replicas(address: str | Sequence[str]) -> list[str]:
    """Every replica `address` names: each of several addresses, every IP a `dns:` name
    resolves to now (`ip:port`), or the one address."""
    addresses = _replica_addresses(address)
    if len(addresses) > 1 or not addresses[0].startswith("dns:"):
        return list(addresses)
    name_port = addresses[0].removeprefix("dns:").lstrip("/").rpartition("/")[2]
    host, _, port = name_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address: {addresses[0]!r}: expected dns:///NAME:PORT")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"address: cannot resolve {host!r}: {exc.strerror or exc}") from None
    found = dict.fromkeys(
        f"[{info[4][0]}]:{port}" if info[0] == socket.AF_INET6 else f"{info[4][0]}:{port}"
        for info in infos
    )
    return list(found)


class WalkRankClient:
    """Client of a WalkRank server, or of several replicas (module docstring); use as a
    context manager or call `close()`.

    `tls`: False for plaintext, True for TLS with the system's root certificates, or the PEM
    bytes of the root certificates to trust. `retries` is how many times an UNAVAILABLE call
    is retried (so at most `retries + 1` attempts), waiting `backoff * 2**attempt` seconds.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        tls: bool | bytes = False,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.1,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout: must be positive, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries: must be >= 0, got {retries}")
        self.addresses = _replica_addresses(address)
        self.address = ",".join(self.addresses)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._tls = tls
        self._admin_token = admin_token
        target, balanced = channel_target(self.addresses)
        options = [("grpc.service_config", BALANCED_SERVICE_CONFIG)] if balanced else []
        if tls is False:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            roots = tls if isinstance(tls, bytes) else None
            self._channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(roots), options=options
            )
        self._tenant_metadata = ((API_KEY_HEADER, api_key),) if api_key else ()
        self._admin_metadata = ((ADMIN_TOKEN_HEADER, admin_token),) if admin_token else ()
        self._recommender = recommender_pb2_grpc.RecommenderStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> WalkRankClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _metadata_for(self, tenant: str) -> tuple[tuple[str, str], ...]:
        """A Recommender call's metadata: the API key and the tenant header (left out for a
        name no tenant can have, which the server then refuses by the request alone)."""
        if not _TENANT_NAME.fullmatch(tenant):
            return self._tenant_metadata
        return (*self._tenant_metadata, (TENANT_HEADER, tenant))

    def _call(self, method: str, attempt_call: Callable[[float], _T], timeout: float | None) -> _T:
        """Run `attempt_call(deadline_seconds)`, retrying UNAVAILABLE with backoff."""
        deadline = self.timeout if timeout is None else timeout
        attempt = 0
        while True:
            try:
                return attempt_call(deadline)
            except grpc.RpcError as exc:
                code = exc.code()
                if code is not grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise WalkRankClientError(code, exc.details() or "", method) from None
            time.sleep(self.backoff * 2**attempt)
            attempt += 1

    def _admin_call(
        self, method: str, request: object, timeout: float | None, *, stream: bool = False
    ) -> Any:
        """Admin.`method` with the admin token, retried as `_call` retries; `stream`: `request`
        is a sequence of messages, sent afresh by each attempt."""
        rpc = getattr(self._admin, method)

        def attempt(t: float) -> Any:
            sent = iter(request) if stream else request  # type: ignore[call-overload]
            return rpc(sent, timeout=t, metadata=self._admin_metadata)

        return self._call(method, attempt, timeout)

    def recommend(
        self,
        tenant: str,
        pins: Sequence[PinId] = (),
        *,
        weights: Sequence[float] | None = None,
        actions: Sequence[ActionLike] | None = None,
        user_id: str | None = None,
        locale: str | None = None,
        interests: Sequence[str] | None = None,
        num_results: int = 0,
        exclude: Sequence[PinId] | None = None,
        seed: int | None = None,
        request_id: str | None = None,
        request_time: Moment | None = None,
        features: Mapping[str, float] | None = None,
        extra_candidates: Sequence[ExtraLike] | None = None,
        timeout: float | None = None,
    ) -> recommender_pb2.RecommendResponse:
        """Candidates for one user from walks starting at `pins` (external ids), or at the
        pins of the user's recent `actions` (weighed by the tenant's `query.action_weights`
        and `recency_half_life_hours`); ages and the logged time are measured from
        `request_time` (epoch seconds or a datetime, default now: the server's clock).
        `features` feeds the tenant's `request.<name>` features; `extra_candidates` (pin id,
        source) from the client's other generators are ranked with the walk's."""
        request = recommender_pb2.RecommendRequest(
            tenant=tenant,
            request_id=request_id or "",
            user=_user(user_id, locale, interests),
            query_pins=query_pins(pins, weights),
            actions=user_actions(actions, pins),
            num_results=num_results,
            exclude_pins=[str(p) for p in exclude or ()],
            seed=seed,
            request_time=epoch_seconds(request_time),
            features=dict(features or {}),
            extra_candidates=extra_candidate_messages(extra_candidates),
        )
        return self._call(
            "Recommend",
            lambda t: self._recommender.Recommend(
                request, timeout=t, metadata=self._metadata_for(tenant)
            ),
            timeout,
        )

    def recommend_batch(
        self,
        tenant: str,
        users: Iterable[UserQuery | recommender_pb2.BatchUser],
        *,
        num_results: int = 0,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[recommender_pb2.RecommendResponse]:
        """One response per user, in order, as the server streams them.

        The request is built (and checked) at once; the call starts when iteration does. The
        deadline covers the whole stream. The call is retried on UNAVAILABLE only until the
        first response arrives; after that a failure is raised, since a retry would repeat
        responses already yielded.
        """
        request = recommender_pb2.RecommendBatchRequest(
            tenant=tenant,
            users=[_batch_user(u, i) for i, u in enumerate(users)],
            num_results=num_results,
            seed=seed,
        )
        return self._stream_batch(request, timeout)

    def _stream_batch(
        self, request: recommender_pb2.RecommendBatchRequest, timeout: float | None
    ) -> Iterator[recommender_pb2.RecommendResponse]:
        def first(t: float) -> tuple[Any, recommender_pb2.RecommendResponse | None]:
            stream = self._recommender.RecommendBatch(
                request, timeout=t, metadata=self._metadata_for(request.tenant)
            )
            return stream, next(stream, None)

        stream, response = self._call("RecommendBatch", first, timeout)
        if response is None:
            return
        yield response
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise WalkRankClientError(exc.code(), exc.details() or "", "RecommendBatch") from None

    def report_events(
        self,
        tenant: str,
        events: Iterable[Mapping[str, Any] | events_pb2.Event],
        *,
        timeout: float | None = None,
    ) -> events_pb2.ReportEventsResponse:
        """Report downstream events; each a mapping with `request_id`, `pin_id`, `event` and
        optionally `score`, `timestamp` (epoch seconds or a datetime) and `board_id` (the
        board of a save), or an `Event` message."""
        request = events_pb2.ReportEventsRequest(
            tenant=tenant, events=[_event(e, i) for i, e in enumerate(events)]
        )
        return self._call(
            "ReportEvents",
            lambda t: self._recommender.ReportEvents(
                request, timeout=t, metadata=self._metadata_for(tenant)
            ),
            timeout,
        )

    def list_tenants(self, *, timeout: float | None = None) -> admin_pb2.ListTenantsResponse:
        request = admin_pb2.ListTenantsRequest()
        return self._admin_call("ListTenants", request, timeout)

    def get_tenant(self, name: str, *, timeout: float | None = None) -> admin_pb2.TenantInfo:
        request = admin_pb2.GetTenantRequest(name=name)
        return self._admin_call("GetTenant", request, timeout)

    def reload(
        self, tenants: Sequence[str] = (), *, timeout: float | None = None
    ) -> admin_pb2.ReloadResponse:
        """Re-scan tenant files and re-read the model registries of `tenants` (default all),
        on the one server (or one of the replicas) this client calls; `reload_each` for all."""
        request = admin_pb2.ReloadRequest(tenants=tenants)
        return self._admin_call("Reload", request, timeout)

    def reload_each(
        self, tenants: Sequence[str] = (), *, timeout: float | None = None
    ) -> dict[str, admin_pb2.ReloadResponse | WalkRankClientError]:
        """`reload` on every replica this client's address names (`resolve_replicas`), one
        after another, each on its own connection: the answer, or the error, per `ip:port`.
        A replica that fails keeps serving what it served; the others still reload."""
        results: dict[str, admin_pb2.ReloadResponse | WalkRankClientError] = {}
        for replica in resolve_replicas(self.addresses):
            with WalkRankClient(
                replica,
                admin_token=self._admin_token,
                tls=self._tls,
                timeout=self.timeout,
                retries=self.retries,
                backoff=self.backoff,
            ) as one:
                try:
                    results[replica] = one.reload(tenants, timeout=timeout)
                except WalkRankClientError as exc:
                    results[replica] = exc
        return results

    def graph_info(self, *, timeout: float | None = None) -> admin_pb2.GraphInfoResponse:
        request = admin_pb2.GraphInfoRequest()
        return self._admin_call("GraphInfo", request, timeout)

    def add_edges(
        self,
        batches: Sequence[Sequence[tuple[str, str] | tuple[str, str, float]]],
        *,
        timeout: float | None = None,
    ) -> admin_pb2.AddEdgesResponse:
        """Add real-time pin-board edges, `(pin_id, board_id[, created_at])`, in batches of
        at most 10,000, streamed in one AddEdges call. Safe to retry: edges already added
        count as duplicates."""
        requests = [
            admin_pb2.AddEdgesRequest(
                edges=[
                    admin_pb2.NewEdge(pin_id=e[0], board_id=e[1], created_at=e[2])
                    if len(e) > 2
                    else admin_pb2.NewEdge(pin_id=e[0], board_id=e[1])
                    for e in batch
                ]
            )
            for batch in batches
        ]
        return self._admin_call("AddEdges", requests, timeout, stream=True)

    def health(self, tenant: str | None = None, *, timeout: float | None = None) -> str:
        """Serving status ("SERVING", "NOT_SERVING", ...) of the server, or of one tenant
        (the health service name is the tenant's name)."""
        request = health_pb2.HealthCheckRequest(service=tenant or "")
        response = self._call(
            "Health/Check", lambda t: self._health.Check(request, timeout=t), timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
