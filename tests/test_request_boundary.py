"""The request boundary through a real server: undecodable and oversized requests are client
errors (one line, counted, never logged), credentials come before any work, pin ids are
strict, and per-tenant health needs credentials."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server import busy_pins, make_config, running

from walkrank.graph.build import build_graph
from walkrank.graph.store import GraphStore
from walkrank.serving.auth import TENANT_HEADER
from walkrank.serving.config import AuthConfig
from walkrank.serving.server import WalkRankServer
from walkrank.serving.workers import FrontDoor, step_aside
from walkrank_client.pb.walkrank.v1 import (
    admin_pb2,
    events_pb2,
    recommender_pb2,
    recommender_pb2_grpc,
)

RECOMMEND = "/walkrank.v1.Recommender/Recommend"
BATCH = "/walkrank.v1.Recommender/RecommendBatch"
EVENTS = "/walkrank.v1.Recommender/ReportEvents"
GET_TENANT = "/walkrank.v1.Admin/GetTenant"
LIST_TENANTS = "/walkrank.v1.Admin/ListTenants"
HEALTH = "/grpc.health.v1.Health/Check"
KEYS = {"homefeed": "key-h", "email": "key-e"}
ADMIN = "admin-token"
MB = 1 << 20


class ErrorLog(logging.Handler):
    """ERROR records (or worse) logged in this process while the server runs."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def open_server(
    tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore, errors: ErrorLog
) -> Iterator[tuple[WalkRankServer, grpc.Channel]]:
    """Auth off; a raw channel (no serializers: bytes in, bytes out)."""
    config = make_config(tmp_path_factory.mktemp("open"), small_graph)
    with (
        running(config) as (server, _),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, channel


@pytest.fixture(scope="module")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore, errors: ErrorLog
) -> Iterator[tuple[WalkRankServer, grpc.Channel]]:
    auth = AuthConfig(
        enabled=True, tenant_keys={t: frozenset({k}) for t, k in KEYS.items()}, admin_token=ADMIN
    )
    config = make_config(tmp_path_factory.mktemp("keyed"), small_graph, auth=auth)
    with (
        running(config) as (server, _),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, channel


def call(
    channel: grpc.Channel, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[grpc.StatusCode, str, bytes]:
    """Status, details and (when OK) the answer's bytes of one raw call."""
    try:
        answer = channel.unary_unary(method)(payload, timeout=20, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", b""
    return grpc.StatusCode.OK, "", answer


def stream(
    channel: grpc.Channel, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[grpc.StatusCode, str]:
    try:
        list(channel.unary_stream(method)(payload, timeout=20, metadata=metadata))
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def client_errors(server: WalkRankServer, tenant: str, reason: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "walkrank_client_errors_total", {"tenant": tenant, "reason": reason}
    )
    return value or 0.0


def request(
    graph: GraphStore, tenant: str = "homefeed", pins: list[str] | None = None, **fields: object
) -> bytes:
    pins = busy_pins(graph, 1) if pins is None else pins
    return recommender_pb2.RecommendRequest(
        tenant=tenant, query_pins=[recommender_pb2.QueryPin(pin_id=p) for p in pins], **fields
    ).SerializeToString()


def assert_one_line(details: str, *needles: str) -> None:
    assert "\n" not in details and len(details) <= 512, details[:200]
    for needle in needles:
        assert needle in details, details


# -- undecodable requests --------------------------------------------------------------------

GARBAGE = [
    bytes(np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8)) for seed in range(4)
] + [b"\xff" * 9, b"\x0a\x05ab"]  # bad tag; truncated string


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        (RECOMMEND, "walkrank.v1.RecommendRequest"),
        (EVENTS, "walkrank.v1.ReportEventsRequest"),
        (GET_TENANT, "walkrank.v1.GetTenantRequest"),
        (HEALTH, "grpc.health.v1.HealthCheckRequest"),
    ],
)
def test_random_bytes_are_invalid_argument_counted_and_never_logged(
    open_server, errors: ErrorLog, method: str, kind: str
) -> None:
    server, channel = open_server
    before = client_errors(server, "unknown", "undecodable")
    undecodable = 0
    for payload in GARBAGE:
        code, details, _ = call(channel, method, payload)
        assert code in (
            grpc.StatusCode.OK,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
        ), (payload, code, details)
        if code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request:"):
            assert_one_line(details, f"not a valid {kind}")
            undecodable += 1
    assert undecodable >= 2  # 0xff... and the truncated string never parse
    assert client_errors(server, "unknown", "undecodable") == before + undecodable
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert call(channel, RECOMMEND, request(server.graph))[0] == grpc.StatusCode.OK


def test_batch_random_bytes_are_invalid_argument(open_server, errors: ErrorLog) -> None:
    server, channel = open_server
    code, details = stream(channel, BATCH, b"\xff" * 9)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_one_line(details, "not a valid walkrank.v1.RecommendBatchRequest")
    assert not errors.records


def test_invalid_utf8_in_a_string_field_is_named(open_server, errors: ErrorLog) -> None:
    server, channel = open_server
    valid = request(server.graph)
    # Field 2 (request_id), length 2, bytes that are not UTF-8, after a valid request.
    code, details, _ = call(channel, RECOMMEND, valid + b"\x12\x02\xff\xfe")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_one_line(details, "walkrank.v1.RecommendRequest", "UTF-8")
    assert not errors.records


# -- credentials before work -----------------------------------------------------------------


def test_without_credentials_undecodable_bytes_are_unauthenticated(keyed_server) -> None:
    server, channel = keyed_server
    for method in (RECOMMEND, GET_TENANT):
        code, details, _ = call(channel, method, b"\xff" * 9)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code, details)
    assert stream(channel, BATCH, b"\xff" * 9)[0] == grpc.StatusCode.UNAUTHENTICATED
    # With a key, the same bytes are what they are.
    code, _, _ = call(channel, RECOMMEND, b"\xff" * 9, (("x-api-key", KEYS["homefeed"]),))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        call(channel, LIST_TENANTS, b"", (("x-admin-token", "wrong"),))[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert call(channel, LIST_TENANTS, b"", (("x-admin-token", ADMIN),))[0] == grpc.StatusCode.OK


# -- length limits ---------------------------------------------------------------------------


def oversized(graph: GraphStore) -> list[tuple[str, str, bytes, str]]:
    """(name, method, payload, the field the error must name)."""
    user = recommender_pb2.User
    batch_users = [
        recommender_pb2.BatchUser(
            query_pins=[recommender_pb2.QueryPin(pin_id=busy_pins(graph, 1)[0])], request_id=rid
        )
        for rid in ("ok", "r" * 200)
    ]
    return [
        ("tenant 1 MiB", RECOMMEND, request(graph, tenant="t" * MB), "tenant"),
        (
            "request_id 3.9 MiB",
            RECOMMEND,
            request(graph, request_id="r" * (39 * MB // 10)),
            "request_id",
        ),
        ("user id", RECOMMEND, request(graph, user=user(id="u" * 129)), "user.id"),
        ("locale", RECOMMEND, request(graph, user=user(locale="l" * 65)), "user.locale"),
        (
            "an interest",
            RECOMMEND,
            request(graph, user=user(interests=["a", "i" * 129])),
            "user.interests[1]",
        ),
        (
            "65 interests",
            RECOMMEND,
            request(graph, user=user(interests=["a"] * 65)),
            "user.interests",
        ),
        (
            "a query pin id",
            RECOMMEND,
            request(graph, pins=["1", "9" * 129]),
            "query_pins[1].pin_id",
        ),
        ("an excluded pin", RECOMMEND, request(graph, exclude_pins=["p" * 129]), "exclude_pins[0]"),
        (
            "10,001 excluded pins",
            RECOMMEND,
            request(graph, exclude_pins=["1"] * 10_001),
            "exclude_pins",
        ),
        (
            "a batch user's request_id",
            BATCH,
            recommender_pb2.RecommendBatchRequest(
                tenant="email", users=batch_users
            ).SerializeToString(),
            "users[1].request_id",
        ),
        (
            "admin tenant name",
            GET_TENANT,
            admin_pb2.GetTenantRequest(name="n" * MB).SerializeToString(),
            "unknown tenant",
        ),
        (
            "an event type",
            EVENTS,
            events_pb2.ReportEventsRequest(
                tenant="homefeed",
                events=[
                    events_pb2.Event(request_id="r", pin_id="1", event="click"),
                    events_pb2.Event(request_id="r", pin_id="1", event="x" * MB),
                ],
            ).SerializeToString(),
            "events[1].event",
        ),
        (
            "an event's request_id",
            EVENTS,
            events_pb2.ReportEventsRequest(
                tenant="homefeed",
                events=[events_pb2.Event(request_id="r" * MB, pin_id="1", event="click")],
            ).SerializeToString(),
            "events[0].request_id",
        ),
    ]


OVERSIZED = (
    "tenant 1 MiB",
    "request_id 3.9 MiB",
    "user id",
    "locale",
    "an interest",
    "65 interests",
    "a query pin id",
    "an excluded pin",
    "10,001 excluded pins",
    "a batch user's request_id",
    "admin tenant name",
    "an event type",
    "an event's request_id",
)


@pytest.mark.parametrize("name", OVERSIZED)
def test_oversized_fields_are_refused_naming_the_field_without_echoing_it(
    open_server, errors: ErrorLog, name: str
) -> None:
    server, channel = open_server
    cases = {case[0]: case for case in oversized(server.graph)}
    assert set(cases) == set(OVERSIZED)
    _, method, payload, field = cases[name]
    if method == BATCH:
        code, details = stream(channel, method, payload)
    else:
        code, details, _ = call(channel, method, payload)
    expected = (
        grpc.StatusCode.NOT_FOUND if method == GET_TENANT else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code == expected, (name, code, details[:200])
    assert_one_line(details, field)
    assert not errors.records


def test_too_long_fields_are_counted_by_tenant(open_server) -> None:
    server, channel = open_server
    before = client_errors(server, "homefeed", "too_long")
    assert (
        call(channel, RECOMMEND, request(server.graph, request_id="r" * 129))[0]
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert client_errors(server, "homefeed", "too_long") == before + 1


def test_events_quote_only_a_prefix_of_an_unknown_tenant(open_server) -> None:
    server, channel = open_server
    payload = events_pb2.ReportEventsRequest(tenant="x" * 60 + "y" * MB).SerializeToString()
    code, details, _ = call(channel, EVENTS, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_one_line(details, "tenant")
    assert "y" * 100 not in details


# -- strict pin ids --------------------------------------------------------------------------


def variants(pin: str) -> list[str]:
    arabic = "".join(chr(0x0660 + int(d)) for d in pin)
    grouped = f"{int(pin):_}"
    return [grouped, f" {pin} ", f"+{pin}", arabic, pin + "\0", "0" + pin, f"{pin}\n"]


def test_pin_ids_resolve_only_in_their_own_spelling(open_server) -> None:
    server, channel = open_server
    pin = busy_pins(server.graph, 1)[0]
    for spelling in variants(pin):
        code, details, answer = call(channel, RECOMMEND, request(server.graph, pins=[spelling]))
        assert code == grpc.StatusCode.OK, (spelling, details)
        response = recommender_pb2.RecommendResponse.FromString(answer)
        assert list(response.unknown_query_pins) == [spelling] and not response.candidates
    code, _, answer = call(channel, RECOMMEND, request(server.graph, pins=[pin]))
    assert recommender_pb2.RecommendResponse.FromString(answer).candidates


def test_lookup_is_strict_for_integer_and_text_ids(tmp_path, small_graph: GraphStore) -> None:
    first = int(small_graph.pin_external([0])[0])
    assert small_graph.pin_index([str(first), first, float(first)]).tolist() == [0, 0, 0]
    assert (small_graph.pin_index(variants(str(first))) == -1).all()
    edges = pa.table({"pin_id": ["a", "b", "b"], "board_id": ["x", "x", "y"]})
    build_graph(tmp_path / "text", edges)
    text = GraphStore.load(tmp_path / "text")
    assert text.pin_index(["a", "a\0", " a", "b"]).tolist()[1:3] == [-1, -1]
    assert (text.pin_index(["a", "b"]) >= 0).all()


# -- per-tenant health -----------------------------------------------------------------------


def test_tenant_health_needs_credentials_overall_health_does_not(keyed_server) -> None:
    server, channel = keyed_server
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING

    def check(service: str, *metadata: tuple[str, str]) -> grpc.StatusCode | int:
        try:
            return stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10, metadata=metadata
            ).status
        except grpc.RpcError as exc:
            return exc.code()

    assert check("") == serving
    assert check("homefeed") == grpc.StatusCode.UNAUTHENTICATED
    assert check("no_such_tenant") == grpc.StatusCode.UNAUTHENTICATED  # names not revealed
    assert check("homefeed", ("x-api-key", "nonsense")) == grpc.StatusCode.UNAUTHENTICATED
    assert check("homefeed", ("x-api-key", KEYS["email"])) == grpc.StatusCode.PERMISSION_DENIED
    assert check("homefeed", ("x-api-key", KEYS["homefeed"])) == serving
    assert check("homefeed", ("x-admin-token", ADMIN)) == serving
    assert check("no_such_tenant", ("x-admin-token", ADMIN)) == grpc.StatusCode.NOT_FOUND
    assert check("s" * MB, ("x-admin-token", ADMIN)) == grpc.StatusCode.INVALID_ARGUMENT

    watch = stub.Watch(health_pb2.HealthCheckRequest(service="homefeed"), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        next(watch)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    watch = stub.Watch(
        health_pb2.HealthCheckRequest(service="homefeed"),
        timeout=10,
        metadata=(("x-api-key", KEYS["homefeed"]),),
    )
    assert next(watch).status == serving
    watch.cancel()


# -- overload --------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout_s} s: {what}"
        time.sleep(0.01)


def recommend_async(
    stub: recommender_pb2_grpc.RecommenderStub, tenant: str, pin: str
) -> grpc.Future:
    return stub.Recommend.future(
        recommender_pb2.RecommendRequest(
            tenant=tenant, query_pins=[recommender_pb2.QueryPin(pin_id=pin)]
        ),
        timeout=60,
    )


def test_refusals_and_other_tenants_never_wait_behind_admitted_calls(
    tmp_path, small_graph: GraphStore
) -> None:
    """On a server with 2 spare worker threads and its one compute thread held, email's
    quota full of calls waiting for compute: 16 more email calls are each refused
    RESOURCE_EXHAUSTED, and another tenant's call is admitted, all while compute is still
    held (before, the waiting calls held every worker thread and everything queued behind
    them). Every admitted call is answered once compute is free."""
    config = make_config(tmp_path, small_graph, workers=2, compute_slots=1)
    with (
        running(config) as (server, _),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        pin = busy_pins(server.graph, 1)[0]
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        release = threading.Event()
        holder = threading.Thread(target=server.serving.compute.run, args=(release.wait, 0))
        holder.start()
        try:
            email = server.tenants.counters("email").limiter
            quota = server.tenants.get("email").config.limits.max_in_flight
            admitted = [recommend_async(stub, "email", pin) for _ in range(quota)]
            wait_until(lambda: email.in_flight == quota, "email's quota full")
            flood = [recommend_async(stub, "email", pin) for _ in range(4 * quota)]
            other = recommend_async(stub, "homefeed", pin)
            for future in flood:
                assert future.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "its quota" in future.details()
            homefeed = server.tenants.counters("homefeed").limiter
            wait_until(lambda: homefeed.in_flight == 1, "the other tenant admitted")
            assert holder.is_alive() and not any(f.done() for f in admitted)
        finally:
            release.set()
            holder.join()
        for future in [*admitted, other]:
            assert future.result().candidates


def test_a_full_tenant_is_refused_by_its_header_before_its_request_is_read(
    tmp_path, small_graph: GraphStore, errors: ErrorLog
) -> None:
    """Keys on, email's quota full of calls waiting for the one compute thread: a call whose
    `x-walkrank-tenant` header names email is refused RESOURCE_EXHAUSTED from its metadata
    alone (its body random bytes, never decoded), counted as email's refusal, for Recommend
    and RecommendBatch, and so is one naming email over another tenant's body (the header
    never admits). The header never gets past credentials: no key is UNAUTHENTICATED, home
    feed's key PERMISSION_DENIED, neither counted as email's. A header naming no tenant the
    server has earns no refusal: the call goes the usual way and is refused for the mismatch.
    Once compute is free every admitted call is answered, email is served again (no slot
    leaked), and a header naming email over another body is refused for the mismatch. The
    server's thread pools end with it."""
    auth = AuthConfig(
        enabled=True, tenant_keys={t: frozenset({k}) for t, k in KEYS.items()}, admin_token=ADMIN
    )
    config = make_config(tmp_path, small_graph, auth=auth, workers=2, compute_slots=1)
    with (
        running(config) as (server, _),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        pin = busy_pins(server.graph, 1)[0]
        email_key = (("x-api-key", KEYS["email"]),)
        as_email = (*email_key, (TENANT_HEADER, "email"))
        recommend = channel.unary_unary(RECOMMEND)
        email = server.tenants.counters("email")
        quota = server.tenants.get("email").config.limits.max_in_flight

        def refused() -> int:
            return email.status_codes["RESOURCE_EXHAUSTED"]

        release = threading.Event()
        holder = threading.Thread(target=server.serving.compute.run, args=(release.wait, 0))
        holder.start()
        try:
            admitted = [
                recommend.future(request(server.graph, "email", [pin]), 60, as_email)
                for _ in range(quota)
            ]
            wait_until(lambda: email.limiter.in_flight == quota, "email's quota full")
            undecodable_before = client_errors(server, "unknown", "undecodable")
            code, details, _ = call(channel, RECOMMEND, GARBAGE[0], as_email)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert_one_line(details, "tenant 'email'", "its quota")
            assert client_errors(server, "unknown", "undecodable") == undecodable_before
            assert stream(channel, BATCH, GARBAGE[1], as_email)[0] == (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            assert refused() == 2
            # A header naming the full tenant over a home-feed body: refused, never admitted.
            code, _, _ = call(channel, RECOMMEND, request(server.graph, "homefeed"), as_email)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.tenants.counters("homefeed").limiter.in_flight == 0
            # Credentials first: without them, or with another tenant's key, no refusal.
            no_key = ((TENANT_HEADER, "email"),)
            homefeed_key = (("x-api-key", KEYS["homefeed"]), (TENANT_HEADER, "email"))
            assert call(channel, RECOMMEND, GARBAGE[0], no_key)[0] == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            assert call(channel, RECOMMEND, GARBAGE[0], homefeed_key)[0] == (
                grpc.StatusCode.PERMISSION_DENIED
            )
            assert refused() == 3
            # A tenant the server does not have: the usual way, refused for the mismatch.
            unknown = (*email_key, (TENANT_HEADER, "nosuch"))
            code, details, _ = call(channel, RECOMMEND, request(server.graph, "email"), unknown)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert_one_line(details, TENANT_HEADER, "'nosuch'")
            assert holder.is_alive() and not any(f.done() for f in admitted)
            assert email.limiter.in_flight == quota and refused() == 3
        finally:
            release.set()
            holder.join()
        for future in admitted:
            assert recommender_pb2.RecommendResponse.FromString(future.result()).candidates
        wait_until(lambda: email.limiter.in_flight == 0, "email's calls done")
        # Room again: a header naming email over a home-feed body is the mismatch it is.
        code, details, _ = call(channel, RECOMMEND, request(server.graph, "homefeed"), as_email)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert_one_line(details, TENANT_HEADER, "'email'", "'homefeed'")
        code, _, answer = call(channel, RECOMMEND, request(server.graph, "email", [pin]), as_email)
        assert code == grpc.StatusCode.OK and answer
        pools = [t for t in threading.enumerate() if t.name.startswith("walkrank-refusal")]
        assert pools  # the refusals above ran on it
    for thread in pools:
        thread.join(timeout=10)
        assert not thread.is_alive(), thread.name
    assert not errors.records, [r.getMessage() for r in errors.records]


def test_front_door_lets_lanes_in_round_robin() -> None:
    """Places held, five calls of one tenant waiting, then one of another: the other
    tenant's call is let in second, not sixth; a call that steps aside frees its place."""
    door = FrontDoor(places=1)
    entered: list[str] = []
    release = threading.Event()

    def call(name: str) -> None:
        with door.through(name.rstrip("0123456789")):
            entered.append(name)
            if name == "hold":
                release.wait()

    threads = [threading.Thread(target=call, args=("hold",))]
    threads[0].start()
    wait_until(lambda: entered == ["hold"], "the place taken")
    for waiting, name in enumerate(
        ("flood1", "flood2", "flood3", "flood4", "flood5", "other1"), start=1
    ):
        threads.append(threading.Thread(target=call, args=(name,)))
        threads[-1].start()
        wait_until(lambda n=waiting: door.waiting == n, "the call waiting")
    release.set()
    for thread in threads:
        thread.join()
    assert entered == ["hold", "flood1", "other1", "flood2", "flood3", "flood4", "flood5"]

    with door.through("a"):
        step_aside()
        with door.through("b"):  # the place was given back, so this does not wait
            pass
    assert door.waiting == 0


def test_health_watches_ending_beside_checks_never_wedge_the_server(open_server) -> None:
    """Watches ending by their deadline while others start, beside Checks, 8 at a time: every
    call ends (grpc_health's servicer sent under the lock the polling thread takes to close a
    Watch, and a send waits for that thread: the server wedged within a few hundred calls)."""
    server, channel = open_server
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="homefeed")

    def watch() -> grpc.StatusCode:
        stream = stub.Watch(request, timeout=0.05)
        try:
            for _ in stream:
                pass
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    def check() -> grpc.StatusCode:
        future = stub.Check.future(request)
        try:
            return future.result(timeout=10).status and grpc.StatusCode.OK
        except grpc.FutureTimeoutError:
            future.cancel()
            return grpc.StatusCode.UNAVAILABLE  # no answer in 10 s: wedged

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: watch() if i % 3 else check(), range(600)))
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    assert check() == grpc.StatusCode.OK
