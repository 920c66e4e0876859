"""Hostile input, as properties: whatever a caller sends, every call ends in bounded time with a
status that is not INTERNAL or UNKNOWN, no traceback is logged, and the server stays healthy
and keeps answering valid calls.

Property-based (hypothesis) over every RPC's messages (Recommender, Admin, Health), over raw
bytes sent through an untyped channel (undecodable messages, invalid UTF-8 in string fields),
and over hand-picked boundary values of every field; calls with a deadline and without one.
One real server on loopback with API keys on, so authentication is fuzzed too. The number of
generated cases is `WALKRANK_FUZZ_EXAMPLES` (default 2,400 over the whole module, about half a
minute here); more for a longer hunt:

    WALKRANK_FUZZ_EXAMPLES=50000 .venv/bin/python -m pytest -q tests/test_hostile.py
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from walkrank.graph.store import GraphStore
from walkrank.serving.config import AuthConfig, ServerConfig
from walkrank.serving.server import WalkRankServer
from walkrank_client.pb.walkrank.v1 import admin_pb2, events_pb2, recommender_pb2

REPO = Path(__file__).resolve().parents[1]
TENANT_KEYS = {"homefeed": "key-homefeed", "related_pins": "key-related", "email": "key-email"}
ADMIN_TOKEN = "admin-token-for-fuzzing"
TENANTS = tuple(TENANT_KEYS)

#: Generated cases over the whole module; each fuzz test takes its share.
FUZZ_EXAMPLES = int(os.environ.get("WALKRANK_FUZZ_EXAMPLES", "2400"))
SHARES = {"recommend": 0.30, "batch": 0.08, "events": 0.14, "admin": 0.08, "health": 0.05,
          "raw": 0.35}
#: A call with a deadline must end by then plus this (two shared cores, Python on both ends).
SLACK_S = 2.0
#: A call without a deadline gets the tenant's deadline_ms (at most 250 ms in the shipped
#: tenants); this bounds it generously, per message (a batch is one per user).
NO_DEADLINE_BOUND_S = 5.0
#: Error details are one line naming the problem, never an echo of a large input.
MAX_DETAILS = 512
#: Statuses client input must never get.
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
HEALTH_EVERY = 200  # calls between health checks inside a fuzz run

RECOMMEND = "/walkrank.v1.Recommender/Recommend"
BATCH = "/walkrank.v1.Recommender/RecommendBatch"
EVENTS = "/walkrank.v1.Recommender/ReportEvents"
LIST_TENANTS = "/walkrank.v1.Admin/ListTenants"
GET_TENANT = "/walkrank.v1.Admin/GetTenant"
RELOAD = "/walkrank.v1.Admin/Reload"
GRAPH_INFO = "/walkrank.v1.Admin/GraphInfo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
#: Server-streaming methods (reflection is bidirectional; one request message is sent).
STREAMING = {BATCH, HEALTH_WATCH, REFLECTION}
#: Watch streams until its deadline by design: it always gets this short one.
WATCH_DEADLINE_S = 0.2
RAW_METHODS = (RECOMMEND, BATCH, EVENTS, LIST_TENANTS, GET_TENANT, RELOAD, GRAPH_INFO,
               HEALTH_CHECK, HEALTH_WATCH, REFLECTION, "/walkrank.v1.Recommender/NoSuchMethod")

HANG = "HANG"  # the pseudo status of a call that outlived its bound


class ErrorRecords(logging.Handler):
    """Every ERROR (or worse) record logged in this process while the server runs."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        lines = [f"{r.name}: {r.getMessage()}" + (" (with traceback)" if r.exc_info else "")
                 for r in self.records]
        self.records.clear()
        return lines


@dataclass
class Outcome:
    code: grpc.StatusCode | str
    details: str
    elapsed_s: float
    bound_s: float
    responses: list[bytes]


class Hostile:
    """The server under attack, an untyped channel to it, and the running tally."""

    def __init__(self, server: WalkRankServer, target: str, graph: GraphStore,
                 errors: ErrorRecords) -> None:
        self.server = server
        self.graph = graph
        self.errors = errors
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.max_metadata_size", 1 << 20)]
        self.channel = grpc.insecure_channel(target, options=options)
        self.statuses: Counter[str] = Counter()
        self.calls = 0
        degree = np.diff(np.asarray(graph.pin_offsets))
        busy = np.argsort(-degree)[:32].tolist()
        self.known_pins = [str(p) for p in graph.pin_external(busy).tolist()]

    def call(self, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = (),
             timeout: float | None = None, messages: int = 1) -> Outcome:
        """One raw call; ends within its bound or is cancelled and reported as a hang."""
        if method == HEALTH_WATCH:
            timeout = min(timeout or WATCH_DEADLINE_S, WATCH_DEADLINE_S)
        bound = (timeout + SLACK_S) if timeout is not None else NO_DEADLINE_BOUND_S * max(
            1, messages)
        started = time.monotonic()
        responses: list[bytes] = []
        if method in STREAMING:
            call = self.channel.unary_stream(method)(payload, timeout=timeout, metadata=metadata)
            timer = threading.Timer(bound, call.cancel)
            timer.start()
            try:
                responses.extend(call)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            finally:
                timer.cancel()
            if time.monotonic() - started >= bound:
                code = HANG
        else:
            future = self.channel.unary_unary(method).future(payload, timeout=timeout,
                                                              metadata=metadata)
            try:
                responses.append(future.result(timeout=bound))
                code, details = grpc.StatusCode.OK, ""
            except grpc.FutureTimeoutError:
                future.cancel()
                code, details = HANG, ""
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
        outcome = Outcome(code, details, time.monotonic() - started, bound, responses)
        self.calls += 1
        self.statuses[code if isinstance(code, str) else code.name] += 1
        if self.calls % HEALTH_EVERY == 0:
            self.assert_healthy()
        return outcome

    def check(self, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = (),
              timeout: float | None = None, messages: int = 1) -> Outcome:
        """`call`, then the property: bounded, a client-error status, a short one-line message."""
        outcome = self.call(method, payload, metadata, timeout, messages)
        where = f"{method} ({len(payload)} bytes, timeout {timeout})"
        assert outcome.code != HANG, f"{where}: no status within {outcome.bound_s:.1f}s"
        assert outcome.code not in SERVER_FAULTS, f"{where}: {outcome.code}: {outcome.details}"
        assert outcome.elapsed_s <= outcome.bound_s, where
        one_short_line = "\n" not in outcome.details and len(outcome.details) <= MAX_DETAILS
        assert one_short_line, (f"{where}: {outcome.code}: details of {len(outcome.details)} "
                                f"chars: {outcome.details[:120]!r}")
        return outcome

    def assert_healthy(self) -> None:
        """Overall health SERVING, a valid call answered OK, and no ERROR logged so far."""
        health = self.call(HEALTH_CHECK, health_pb2.HealthCheckRequest(
            service="").SerializeToString(), timeout=5.0)
        assert health.code == grpc.StatusCode.OK, f"health check: {health.code} {health.details}"
        status = health_pb2.HealthCheckResponse.FromString(health.responses[0]).status
        assert status == health_pb2.HealthCheckResponse.SERVING, status
        request = recommender_pb2.RecommendRequest(
            tenant="homefeed", query_pins=[recommender_pb2.QueryPin(pin_id=self.known_pins[0])])
        answer = self.call(RECOMMEND, request.SerializeToString(), key("homefeed"), timeout=10.0)
        assert answer.code == grpc.StatusCode.OK, f"valid call: {answer.code} {answer.details}"
        assert recommender_pb2.RecommendResponse.FromString(answer.responses[0]).candidates
        logged = self.errors.take()
        assert not logged, f"{len(logged)} ERROR records logged for client input: {logged[:5]}"


def key(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", TENANT_KEYS[tenant]),)


ADMIN = (("x-admin-token", ADMIN_TOKEN),)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore
            ) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(REPO / "tenants", root / "tenants")
    auth = AuthConfig(enabled=True, tenant_keys={t: frozenset({k}) for t, k in
                                                 TENANT_KEYS.items()}, admin_token=ADMIN_TOKEN)
    config = ServerConfig(graph=small_graph.path, tenants_dir=root / "tenants",
                          models_dir=root / "models", logs_dir=root / "logs",
                          address="127.0.0.1:0", workers=8, grace_seconds=2.0, auth=auth)
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    server = WalkRankServer(config)
    port = server.start()
    hostile = Hostile(server, f"127.0.0.1:{port}", small_graph, errors)
    try:
        yield hostile
    finally:
        hostile.channel.close()
        # A wedged server must not hang the suite: stopping it gets a bounded wait.
        stopper = threading.Thread(target=server.stop, daemon=True)
        stopper.start()
        stopper.join(timeout=config.grace_seconds + 10)
        logging.getLogger().removeHandler(errors)
        assert not stopper.is_alive(), "the server did not stop within its grace period + 10 s"


def fuzz_settings(share: str) -> settings:
    return settings(max_examples=max(1, round(FUZZ_EXAMPLES * SHARES[share])), deadline=None,
                    derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck))


def run_fuzz(hostile: Hostile, share: str, test: Callable[[], None]) -> None:
    """Run a hypothesis test, then require its share of cases and a healthy server."""
    before = hostile.calls
    test()
    hostile.assert_healthy()
    wanted = round(FUZZ_EXAMPLES * SHARES[share])
    assert hostile.calls - before >= 0.9 * wanted, (share, hostile.calls - before, wanted)


# -- strategies ----------------------------------------------------------------------------

BOUNDARY_STRINGS = ["", " ", "\x00", "a\x00b", "1000000001\x00", "é", "\U0001f600", "\ufeff",
                    "\u202e", "../../etc/passwd", "%s%n", "{{.UUID}}", "\r\nX-Injected: 1",
                    "'", '"', "\\", "null"]


def rarely(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int = 12
           ) -> st.SearchStrategy:
    """`rare` about once in `odds` draws: huge values are tried, but do not dominate the run."""
    return st.integers(0, odds - 1).flatmap(lambda n: rare if n == 0 else common)


def big_string(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """A long string, cheap to generate: one character repeated."""
    return st.builds(lambda c, n: c * n, st.characters(codec="utf-8"),
                     st.integers(min_size, max_size))


def strings(max_big: int = 70_000) -> st.SearchStrategy[str]:
    return rarely(st.one_of(st.text(max_size=24), st.sampled_from(BOUNDARY_STRINGS)),
                  big_string(300, max_big))


#: Forms of pin 1000000001 that must not resolve to it (the first is the pin itself).
STRICT_VARIANTS = [" 1000000001 ", "+1000000001", "1_000_000_001", "1000000001\x00",
                   "\u0661\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661"]
PIN_VARIANTS = ["1000000001", *STRICT_VARIANTS, "01000000001", "-1", "0", "1e9", "9" * 40,
                "18446744073709551616", "0x3B9ACA01", "abc", ""]


def pin_ids(hostile: Hostile) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(hostile.known_pins), st.sampled_from(PIN_VARIANTS),
                     st.integers(0, 2**64).map(str), strings(5_000))


WEIGHTS = st.one_of(st.floats(width=32), st.sampled_from(
    [0.0, -0.0, 1.0, 5000.0, 1e15, 1e20, 3.4e38, -1.0, math.nan, math.inf, -math.inf, 1e-45]))


def query_pins(hostile: Hostile) -> st.SearchStrategy[list[recommender_pb2.QueryPin]]:
    pin = st.builds(recommender_pb2.QueryPin, pin_id=pin_ids(hostile), weight=WEIGHTS)
    many = st.builds(lambda p, n: [recommender_pb2.QueryPin(pin_id=p)] * n,
                     st.sampled_from(hostile.known_pins), st.integers(2, 400))
    return rarely(st.lists(pin, max_size=6), many, odds=6)


def users() -> st.SearchStrategy[recommender_pb2.User]:
    return st.builds(recommender_pb2.User, id=strings(), locale=strings(),
                     interests=st.lists(strings(2_000), max_size=5))


def exclude_pins(hostile: Hostile) -> st.SearchStrategy[list[str]]:
    return rarely(st.lists(pin_ids(hostile), max_size=5),
                  st.integers(1_000, 60_000).map(lambda n: [str(10**9 + i) for i in range(n)]),
                  odds=20)


TENANT_NAMES = rarely(st.sampled_from(TENANTS), strings(1_200_000), odds=5)
#: Mostly the right key, so most calls get past authentication to the work.
CREDENTIALS = st.sampled_from(["own"] * 6 + ["other", "none", "garbage", "admin"])
TIMEOUTS = st.sampled_from([None, None, 0.001, 0.05, 0.5, 3.0])
NUM_RESULTS = st.one_of(st.integers(0, 60), st.sampled_from([1000, 2**31, 2**32 - 1]))
SEEDS = st.one_of(st.none(), st.integers(0, 2**64 - 1))


def credentials(choice: str, tenant: str) -> tuple[tuple[str, str], ...]:
    own = tenant if tenant in TENANT_KEYS else "homefeed"
    return {"own": key(own), "other": key("email" if own != "email" else "homefeed"),
            "none": (), "garbage": (("x-api-key", "not-a-key-" + "z" * 400),),
            "admin": ADMIN}[choice]


# -- the fuzz tests ------------------------------------------------------------------------


def test_recommend_messages(hostile: Hostile) -> None:
    request = st.builds(
        recommender_pb2.RecommendRequest, tenant=TENANT_NAMES, request_id=strings(1_200_000),
        user=users(), query_pins=query_pins(hostile), num_results=NUM_RESULTS,
        exclude_pins=exclude_pins(hostile), seed=SEEDS)

    @fuzz_settings("recommend")
    @given(request, CREDENTIALS, TIMEOUTS)
    def one(message: recommender_pb2.RecommendRequest, who: str, timeout: float | None) -> None:
        hostile.check(RECOMMEND, message.SerializeToString(), credentials(who, message.tenant),
                      timeout)

    run_fuzz(hostile, "recommend", one)


def test_recommend_batch_messages(hostile: Hostile) -> None:
    batch_user = st.builds(recommender_pb2.BatchUser, request_id=strings(), user=users(),
                           query_pins=query_pins(hostile), exclude_pins=exclude_pins(hostile))
    request = st.builds(recommender_pb2.RecommendBatchRequest, tenant=TENANT_NAMES,
                        users=st.lists(batch_user, max_size=6), num_results=NUM_RESULTS,
                        seed=SEEDS)

    @fuzz_settings("batch")
    @given(request, CREDENTIALS, TIMEOUTS)
    def one(message: recommender_pb2.RecommendBatchRequest, who: str,
            timeout: float | None) -> None:
        hostile.check(BATCH, message.SerializeToString(), credentials(who, message.tenant),
                      timeout, messages=len(message.users))

    run_fuzz(hostile, "batch", one)


def test_report_events_messages(hostile: Hostile) -> None:
    optional = st.one_of(st.none(), st.floats(), st.sampled_from([-1.0, 0.0, 1e300, 4e9]))

    def event(request_id: str, pin_id: str, name: str, score: float | None,
              timestamp: float | None) -> events_pb2.Event:
        message = events_pb2.Event(request_id=request_id, pin_id=pin_id, event=name)
        if score is not None:
            message.score = score
        if timestamp is not None:
            message.timestamp = timestamp
        return message

    names = st.one_of(st.sampled_from(["impression", "click", "save", "closeup", "hide", "view",
                                       "SAVE", ""]), strings(3_000))
    events = st.builds(event, strings(200_000), pin_ids(hostile), names, optional, optional)
    many = st.builds(lambda e, n: [e] * n, events, st.integers(100, 5_000))
    request = st.builds(events_pb2.ReportEventsRequest, tenant=TENANT_NAMES,
                        events=rarely(st.lists(events, max_size=8), many, odds=10))

    @fuzz_settings("events")
    @given(request, CREDENTIALS, TIMEOUTS)
    def one(message: events_pb2.ReportEventsRequest, who: str, timeout: float | None) -> None:
        hostile.check(EVENTS, message.SerializeToString(), credentials(who, message.tenant),
                      timeout)

    run_fuzz(hostile, "events", one)


def test_admin_messages(hostile: Hostile) -> None:
    names = st.one_of(st.sampled_from([*TENANTS, "", "nobody"]), strings(1_200_000))
    calls = st.one_of(
        st.just((LIST_TENANTS, admin_pb2.ListTenantsRequest())),
        st.just((GRAPH_INFO, admin_pb2.GraphInfoRequest())),
        st.builds(lambda n: (GET_TENANT, admin_pb2.GetTenantRequest(name=n)), names),
        st.builds(lambda ns: (RELOAD, admin_pb2.ReloadRequest(tenants=ns)),
                  st.lists(names, max_size=4)))
    tokens = st.sampled_from(["admin", "admin", "none", "own", "garbage"])

    @fuzz_settings("admin")
    @given(calls, tokens, TIMEOUTS)
    def one(call: tuple[str, object], who: str, timeout: float | None) -> None:
        method, message = call
        hostile.check(method, message.SerializeToString(), credentials(who, "homefeed"),
                      timeout)

    run_fuzz(hostile, "admin", one)


def test_health_messages(hostile: Hostile) -> None:
    services = st.one_of(st.sampled_from(["", *TENANTS, "nobody"]), strings(1_200_000))

    @fuzz_settings("health")
    @given(services, CREDENTIALS, TIMEOUTS, st.booleans())
    def one(service: str, who: str, timeout: float | None, watch: bool) -> None:
        payload = health_pb2.HealthCheckRequest(service=service).SerializeToString()
        hostile.check(HEALTH_WATCH if watch else HEALTH_CHECK, payload,
                      credentials(who, service), timeout)

    run_fuzz(hostile, "health", one)


# -- raw bytes -----------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"ok\x80",
                b"\xe2\x82", b"\xc0\xaf"]


@st.composite
def raw_payloads(draw: st.DrawFn) -> bytes:
    """Random bytes; valid messages truncated or with bytes flipped; and well-formed messages
    whose string fields hold invalid UTF-8 (at the top level or inside User / QueryPin /
    BatchUser / Event)."""
    kind = draw(st.sampled_from(["random", "random", "mutated", "utf8", "utf8", "wire"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    bad = draw(st.sampled_from(INVALID_UTF8)) * draw(st.integers(1, 3))
    if kind == "utf8":
        field = draw(st.integers(1, 8))
        nested = draw(st.sampled_from([
            lambda b: length_delimited(field, b),                          # a top-level string
            lambda b: length_delimited(3, length_delimited(1, b)),         # User.id / Event
            lambda b: length_delimited(4, length_delimited(1, b)),         # QueryPin.pin_id
            lambda b: length_delimited(2, length_delimited(1, b)),         # BatchUser / Event
        ]))
        prefix = length_delimited(1, b"homefeed") if draw(st.booleans()) else b""
        return prefix + nested(bad)
    valid = recommender_pb2.RecommendRequest(
        tenant="homefeed", request_id="r", user=recommender_pb2.User(id="u", locale="en"),
        query_pins=[recommender_pb2.QueryPin(pin_id="1000000001", weight=1.0)],
        num_results=5).SerializeToString()
    if kind == "mutated":
        data = bytearray(valid[:draw(st.integers(0, len(valid)))])
        for _ in range(draw(st.integers(0, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    # Wire-level oddities: wrong wire types, huge lengths, deep nesting, a fixed64 weight.
    return draw(st.sampled_from([
        varint(1 << 3 | 0) + varint(2**63),                 # tenant as a varint
        varint(2 << 3 | 2) + varint(2**31),                 # a length past the end
        length_delimited(4, struct.pack("<f", math.nan)),   # QueryPin as raw float bytes
        length_delimited(4, varint(2 << 3 | 5) + struct.pack("<f", math.nan)),
        length_delimited(3, length_delimited(3, length_delimited(3, b"\x08" * 64))),
        varint(5 << 3 | 0) + b"\xff" * 10 + b"\x01",       # an 11-byte varint
        varint(99999 << 3 | 2) + varint(3) + b"abc",        # an unknown field
        varint(1 << 3 | 3) + varint(1 << 3 | 4),            # a group
    ])) + draw(st.binary(max_size=16))


def test_raw_bytes_to_every_method(hostile: Hostile) -> None:
    """Undecodable requests and invalid UTF-8 are client errors, checked before any work."""

    @fuzz_settings("raw")
    @given(st.sampled_from(RAW_METHODS), raw_payloads(), CREDENTIALS, TIMEOUTS)
    def one(method: str, payload: bytes, who: str, timeout: float | None) -> None:
        hostile.check(method, payload, credentials(who, "homefeed"), timeout)

    run_fuzz(hostile, "raw", one)


# -- boundary values -----------------------------------------------------------------------

MB = 1 << 20


def recommend(tenant: str = "homefeed", pins: list[str] | None = None,
              weights: list[float] | None = None, **fields: object
              ) -> recommender_pb2.RecommendRequest:
    weights = weights or [0.0] * len(pins or [])
    return recommender_pb2.RecommendRequest(
        tenant=tenant, query_pins=[recommender_pb2.QueryPin(pin_id=p, weight=w)
                                   for p, w in zip(pins or [], weights, strict=True)], **fields)


def boundary_cases(pins: list[str]) -> list[tuple[str, str, bytes, str, set[str]]]:
    """(name, method, payload, tenant whose key is sent, allowed status names)."""
    client_errors = {"INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED",
                     "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "OUT_OF_RANGE"}
    invalid = {"INVALID_ARGUMENT"}
    ok = {"OK"}
    a, b = pins[0], pins[1]
    cases: list[tuple[str, str, object, str, set[str]]] = [
        ("empty request", RECOMMEND, recommend(""), "homefeed", client_errors),
        ("no query pins", RECOMMEND, recommend(), "homefeed", invalid),
        ("weights 1e20 (budget overflow)", RECOMMEND, recommend(pins=[a, b],
                                                                weights=[1e20, 1e20]),
         "homefeed", ok),
        ("weight 1e20 beside an unweighted pin", RECOMMEND,
         recommend(pins=[a, b], weights=[1e20, 0.0]), "homefeed", ok),
        ("weight 5000", RECOMMEND, recommend(pins=[a], weights=[5000.0]), "homefeed", ok),
        ("weight 1e15", RECOMMEND, recommend(pins=[a], weights=[1e15]), "homefeed", ok),
        ("weight float32 max", RECOMMEND, recommend(pins=[a, b], weights=[3.4e38, 1e-45]),
         "homefeed", ok),
        ("weight NaN", RECOMMEND, recommend(pins=[a], weights=[math.nan]), "homefeed", invalid),
        ("weight inf", RECOMMEND, recommend(pins=[a], weights=[math.inf]), "homefeed", invalid),
        ("weight -inf", RECOMMEND, recommend(pins=[a], weights=[-math.inf]), "homefeed",
         invalid),
        ("weight negative", RECOMMEND, recommend(pins=[a], weights=[-1.0]), "homefeed", invalid),
        ("num_results max uint32", RECOMMEND, recommend(pins=[a], num_results=2**32 - 1),
         "homefeed", invalid | ok),
        ("query pins past max_query_pins", RECOMMEND, recommend(pins=[a] * 201), "homefeed",
         invalid),
        ("two query pins for related_pins", RECOMMEND, recommend("related_pins", pins=[a, b]),
         "related_pins", invalid),
        ("unknown pins only", RECOMMEND, recommend(pins=["999", "1"]), "homefeed", ok | invalid),
        ("tenant of 1 MiB", RECOMMEND, recommend("t" * MB, pins=[a]), "homefeed",
         client_errors),
        ("request_id of 1.1 MB", RECOMMEND, recommend(pins=[a], request_id="r" * 1_100_000),
         "homefeed", invalid),
        ("request_id of 3.9 MiB", RECOMMEND, recommend(pins=[a], request_id="r" * (39 * MB // 10)),
         "homefeed", invalid),
        ("user id of 1 MiB", RECOMMEND, recommend(pins=[a], user=recommender_pb2.User(
            id="u" * MB)), "homefeed", invalid),
        ("locale of 1 MiB", RECOMMEND, recommend(pins=[a], user=recommender_pb2.User(
            locale="l" * MB)), "homefeed", invalid | ok),
        ("10k interests", RECOMMEND, recommend(pins=[a], user=recommender_pb2.User(
            interests=["x" * 100] * 10_000)), "homefeed", invalid | ok),
        ("pin id of 1 MiB", RECOMMEND, recommend(pins=["9" * MB]), "homefeed", invalid | ok),
        ("100k excluded pins", RECOMMEND, recommend(pins=[a], exclude_pins=[b] * 100_000),
         "homefeed", invalid | ok),
        ("message past max_message_bytes", RECOMMEND, recommend(pins=[a],
                                                                request_id="r" * (5 * MB)),
         "homefeed", {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}),
        ("batch without users", BATCH, recommender_pb2.RecommendBatchRequest(tenant="email"),
         "email", invalid),
        ("batch of 2000 users without pins", BATCH, recommender_pb2.RecommendBatchRequest(
            tenant="email", users=[recommender_pb2.BatchUser()] * 2000), "email", invalid),
        ("batch user with weight 1e20", BATCH, recommender_pb2.RecommendBatchRequest(
            tenant="email", users=[recommender_pb2.BatchUser(query_pins=[
                recommender_pb2.QueryPin(pin_id=a, weight=1e20),
                recommender_pb2.QueryPin(pin_id=b, weight=1e20)])]), "email", ok),
        ("events: 100k events", EVENTS, events_pb2.ReportEventsRequest(
            tenant="homefeed", events=[events_pb2.Event(request_id="r", pin_id=a,
                                                        event="click")] * 100_000),
         "homefeed", client_errors | ok),
        ("events: NaN and inf score and time", EVENTS, events_pb2.ReportEventsRequest(
            tenant="homefeed", events=[events_pb2.Event(request_id="r", pin_id=a, event="save",
                                                        score=math.nan, timestamp=math.inf)]),
         "homefeed", client_errors | ok),
        ("events: request_id of 1 MiB", EVENTS, events_pb2.ReportEventsRequest(
            tenant="homefeed", events=[events_pb2.Event(request_id="r" * MB, pin_id=a,
                                                        event="save")]),
         "homefeed", client_errors | ok),
        ("admin: GetTenant of 1 MiB", GET_TENANT, admin_pb2.GetTenantRequest(name="n" * MB),
         "admin", client_errors),
        ("admin: Reload of a path", RELOAD, admin_pb2.ReloadRequest(tenants=["../../etc/passwd"]),
         "admin", client_errors | ok),
        ("health of 1 MiB", HEALTH_CHECK, health_pb2.HealthCheckRequest(service="s" * MB),
         "homefeed", client_errors),
    ]
    return [(name, method, message.SerializeToString(), who, allowed)
            for name, method, message, who, allowed in cases]


@pytest.mark.parametrize("timeout", [3.0, None], ids=["deadline", "no-deadline"])
def test_boundary_values(hostile: Hostile, timeout: float | None) -> None:
    """Each field at its edges, with a deadline and without one: the documented status, and
    the weights' scale never changes the walk's total budget (the answer is not empty)."""
    failures = []
    for name, method, payload, who, allowed in boundary_cases(hostile.known_pins):
        metadata = ADMIN if who == "admin" else key(who)
        try:
            outcome = hostile.check(method, payload, metadata, timeout)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
            continue
        code = outcome.code.name
        if code not in allowed:
            failures.append(f"{name}: {code} ({outcome.details[:120]}), expected one of "
                            f"{sorted(allowed)}")
        elif code == "OK" and method == RECOMMEND and allowed == {"OK"}:
            answer = recommender_pb2.RecommendResponse.FromString(outcome.responses[0])
            if not answer.candidates:
                failures.append(f"{name}: OK with no candidates ({answer.empty_reason!r})")
    hostile.assert_healthy()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", STRICT_VARIANTS)
def test_pin_ids_are_strict(hostile: Hostile, variant: str) -> None:
    """A pin id is its decimal digits exactly: padded, signed, underscored, zero-led, non-ASCII
    digits or NUL-terminated forms never resolve to the pin."""
    outcome = hostile.check(RECOMMEND, recommend(pins=[variant]).SerializeToString(),
                            key("homefeed"), timeout=3.0)
    if outcome.code == grpc.StatusCode.OK:
        answer = recommender_pb2.RecommendResponse.FromString(outcome.responses[0])
        assert list(answer.unknown_query_pins) == [variant] and not answer.candidates
    else:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.code
