"""Hostile calls for every RPC, and the property each must satisfy; shared by the hypothesis
suite (tests/test_hostile.py) and the chaos run (load_tests/chaos.py).

A `Call` is a method path, raw request bytes, metadata and a deadline (or none). `send` makes
it through an untyped channel (no serializer, so undecodable bytes reach the server as they
are) and always returns within the call's bound: a call that outlives it is cancelled and
reported as a hang. `violations` names what an outcome breaks: every call ends within its
bound, with a status other than INTERNAL or UNKNOWN, and a one-line message of at most
`MAX_DETAILS` characters (client input is never echoed at length).

The strategies (`call_strategies`) draw messages of every RPC with boundary values in every
field: empty, NUL, huge and odd strings, pin ids in near-miss forms, NaN/inf/negative/huge
weights, huge result counts and lists; raw bytes, truncated or corrupted messages, and
well-formed messages whose string fields hold invalid UTF-8; and credentials (the tenant's
own key most of the time, another tenant's, none, a wrong one, the admin token).
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from walkrank_client.pb.walkrank.v1 import admin_pb2, events_pb2, recommender_pb2

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
STREAMING = frozenset({BATCH, HEALTH_WATCH, REFLECTION})
RAW_METHODS = (
    RECOMMEND,
    BATCH,
    EVENTS,
    LIST_TENANTS,
    GET_TENANT,
    RELOAD,
    GRAPH_INFO,
    HEALTH_CHECK,
    HEALTH_WATCH,
    REFLECTION,
    "/walkrank.v1.Recommender/NoSuchMethod",
)
#: Watch streams until its deadline by design: it always gets this short one.
WATCH_DEADLINE_S = 0.2
#: A call with a deadline must end by then plus this (two shared cores, Python on both ends).
SLACK_S = 2.0
#: A call without a deadline gets its tenant's deadline_ms (at most 250 ms in the shipped
#: tenants); this bounds it generously, per message (a batch is one per user).
NO_DEADLINE_BOUND_S = 5.0
#: Error details are one line naming the problem, never an echo of a large input.
MAX_DETAILS = 512
#: Statuses client input must never get.
SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
#: The pseudo status of a call that outlived its bound.
HANG = "HANG"
#: How a run's cases divide over the RPC families of `call_strategies`.
SHARES = {
    "recommend": 0.30,
    "batch": 0.08,
    "events": 0.14,
    "admin": 0.08,
    "health": 0.05,
    "raw": 0.35,
}
#: Channel options for hostile traffic: large messages and error details pass, so that the
#: server's answer (not the client's limits) is what gets checked.
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_metadata_size", 1 << 20),
)


@dataclass(frozen=True)
class Call:
    method: str
    payload: bytes
    metadata: tuple[tuple[str, str], ...] = ()
    timeout: float | None = None
    messages: int = 1  # responses expected at most (a batch's users), for the bound

    @property
    def effective_timeout(self) -> float | None:
        if self.method == HEALTH_WATCH:
            return min(self.timeout or WATCH_DEADLINE_S, WATCH_DEADLINE_S)
        return self.timeout

    @property
    def bound_s(self) -> float:
        timeout = self.effective_timeout
        if timeout is not None:
            return timeout + SLACK_S
        return NO_DEADLINE_BOUND_S * max(1, self.messages)


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode | str  # a grpc.StatusCode, or HANG
    details: str
    elapsed_s: float
    responses: tuple[bytes, ...]

    @property
    def code_name(self) -> str:
        return self.code if isinstance(self.code, str) else self.code.name


def send(channel: grpc.Channel, call: Call) -> Outcome:
    """Make one raw call; it ends within `call.bound_s` or is cancelled and reported HANG."""
    timeout, bound = call.effective_timeout, call.bound_s
    started = time.monotonic()
    responses: list[bytes] = []
    code: grpc.StatusCode | str
    if call.method in STREAMING:
        stream = channel.unary_stream(call.method)(
            call.payload, timeout=timeout, metadata=call.metadata
        )
        timer = threading.Timer(bound, stream.cancel)
        timer.start()
        try:
            responses.extend(stream)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        finally:
            timer.cancel()
        if time.monotonic() - started >= bound:
            code = HANG
    else:
        future = channel.unary_unary(call.method).future(
            call.payload, timeout=timeout, metadata=call.metadata
        )
        try:
            responses.append(future.result(timeout=bound))
            code, details = grpc.StatusCode.OK, ""
        except grpc.FutureTimeoutError:
            future.cancel()
            code, details = HANG, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
    return Outcome(code, details, time.monotonic() - started, tuple(responses))


def violations(call: Call, outcome: Outcome) -> list[str]:
    """What the outcome breaks of the promise (empty: nothing)."""
    where = f"{call.method} ({len(call.payload)} bytes, timeout {call.timeout})"
    if outcome.code == HANG:
        return [f"{where}: no status within {call.bound_s:.1f}s"]
    found = []
    if outcome.code in SERVER_FAULTS:
        found.append(f"{where}: {outcome.code_name}: {outcome.details[:200]}")
    if outcome.elapsed_s > call.bound_s:
        found.append(f"{where}: took {outcome.elapsed_s:.2f}s, bound {call.bound_s:.1f}s")
    if "\n" in outcome.details or len(outcome.details) > MAX_DETAILS:
        found.append(
            f"{where}: {outcome.code_name}: details of {len(outcome.details)} chars: "
            f"{outcome.details[:120]!r}"
        )
    return found


@dataclass(frozen=True)
class Credentials:
    """The server's API keys (tenant -> key) and admin token."""

    tenant_keys: dict[str, str]
    admin_token: str

    def key(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.tenant_keys[tenant]),)

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        return (("x-admin-token", self.admin_token),)

    def metadata(self, choice: str, tenant: str) -> tuple[tuple[str, str], ...]:
        """own: the tenant's key (or the first tenant's, for an unknown name); other: another
        tenant's key; none; garbage: a key nobody has; admin: the admin token."""
        names = list(self.tenant_keys)
        own = tenant if tenant in self.tenant_keys else names[0]
        other = next(n for n in names if n != own) if len(names) > 1 else own
        return {
            "own": self.key(own),
            "other": self.key(other),
            "none": (),
            "garbage": (("x-api-key", "not-a-key-" + "z" * 400),),
            "admin": self.admin,
        }[choice]


# -- strategies ----------------------------------------------------------------------------

BOUNDARY_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "1000000001\x00",
    "é",
    "\U0001f600",
    "\ufeff",
    "\u202e",
    "../../etc/passwd",
    "%s%n",
    "{{.UUID}}",
    "\r\nX-Injected: 1",
    "'",
    '"',
    "\\",
    "null",
)
#: Forms of pin 1000000001 that must not resolve to it.
STRICT_VARIANTS = (
    " 1000000001 ",
    "+1000000001",
    "1_000_000_001",
    "1000000001\x00",
    "\u0661\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661",
)
PIN_VARIANTS = (
    "1000000001",
    *STRICT_VARIANTS,
    "01000000001",
    "-1",
    "0",
    "1e9",
    "9" * 40,
    "18446744073709551616",
    "0x3B9ACA01",
    "abc",
    "",
)
WEIGHTS = st.one_of(
    st.floats(width=32),
    st.sampled_from(
        [0.0, -0.0, 1.0, 5000.0, 1e15, 1e20, 3.4e38, -1.0, math.nan, math.inf, -math.inf, 1e-45]
    ),
)
TIMEOUTS = st.sampled_from([None, None, 0.001, 0.05, 0.5, 3.0])
NUM_RESULTS = st.one_of(st.integers(0, 60), st.sampled_from([1000, 2**31, 2**32 - 1]))
SEEDS = st.one_of(st.none(), st.integers(0, 2**64 - 1))
#: Mostly the right key, so most calls get past authentication to the work.
CHOICES = st.sampled_from(["own"] * 6 + ["other", "none", "garbage", "admin"])
INVALID_UTF8 = (
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"ok\x80",
    b"\xe2\x82",
    b"\xc0\xaf",
)


def rarely(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int = 12) -> st.SearchStrategy:
    """`rare` about once in `odds` draws: huge values are tried, but do not dominate a run."""
    return st.integers(0, odds - 1).flatmap(lambda n: rare if n == 0 else common)


def big_string(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """A long string, cheap to generate: one character repeated."""
    return st.builds(
        lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(min_size, max_size)
    )


def strings(max_big: int = 70_000) -> st.SearchStrategy[str]:
    return rarely(
        st.one_of(st.text(max_size=24), st.sampled_from(BOUNDARY_STRINGS)), big_string(300, max_big)
    )


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (string, bytes or message)."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


@st.composite
def raw_payloads(draw: st.DrawFn) -> bytes:
    """Random bytes; a valid message truncated or with bytes changed; well-formed messages
    whose string fields hold invalid UTF-8 (top level, or inside User / QueryPin / BatchUser /
    Event); and wire-level oddities (wrong wire types, lengths past the end, groups)."""
    kind = draw(st.sampled_from(["random", "random", "mutated", "utf8", "utf8", "wire"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "utf8":
        bad = draw(st.sampled_from(INVALID_UTF8)) * draw(st.integers(1, 3))
        field = draw(st.integers(1, 8))
        inner = draw(st.sampled_from([0, 1, 2, 3, 4]))
        body = (
            length_delimited(field, bad)
            if inner == 0
            else length_delimited(inner + 1, length_delimited(1, bad))
        )
        prefix = length_delimited(1, b"homefeed") if draw(st.booleans()) else b""
        return prefix + body
    if kind == "mutated":
        valid = recommender_pb2.RecommendRequest(
            tenant="homefeed",
            request_id="r",
            user=recommender_pb2.User(id="u", locale="en"),
            query_pins=[recommender_pb2.QueryPin(pin_id="1000000001", weight=1.0)],
            num_results=5,
        ).SerializeToString()
        data = bytearray(valid[: draw(st.integers(0, len(valid)))])
        for _ in range(draw(st.integers(0, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return draw(
        st.sampled_from(
            [
                varint(1 << 3 | 0) + varint(2**63),  # tenant as a varint
                varint(2 << 3 | 2) + varint(2**31),  # a length past the end
                length_delimited(4, struct.pack("<f", math.nan)),  # QueryPin as raw float bytes
                length_delimited(4, varint(2 << 3 | 5) + struct.pack("<f", math.nan)),
                length_delimited(3, length_delimited(3, length_delimited(3, b"\x08" * 64))),
                varint(5 << 3 | 0) + b"\xff" * 10 + b"\x01",  # an 11-byte varint
                varint(99999 << 3 | 2) + varint(3) + b"abc",  # an unknown field
                varint(1 << 3 | 3) + varint(1 << 3 | 4),  # a group
            ]
        )
    ) + draw(st.binary(max_size=16))


def call_strategies(
    known_pins: Sequence[str], credentials: Credentials
) -> dict[str, st.SearchStrategy[Call]]:
    """Hostile calls per RPC family: recommend, batch, events, admin, health, raw."""
    tenants = tuple(credentials.tenant_keys)
    tenant_names = rarely(st.sampled_from(tenants), strings(1_200_000), odds=5)
    pin_ids = st.one_of(
        st.sampled_from(list(known_pins)),
        st.sampled_from(PIN_VARIANTS),
        st.integers(0, 2**64).map(str),
        strings(5_000),
    )
    pin = st.builds(recommender_pb2.QueryPin, pin_id=pin_ids, weight=WEIGHTS)
    many_pins = st.builds(
        lambda p, n: [recommender_pb2.QueryPin(pin_id=p)] * n,
        st.sampled_from(list(known_pins)),
        st.integers(2, 400),
    )
    query_pins = rarely(st.lists(pin, max_size=6), many_pins, odds=6)
    users = st.builds(
        recommender_pb2.User,
        id=strings(),
        locale=strings(),
        interests=st.lists(strings(2_000), max_size=5),
    )
    exclude = rarely(
        st.lists(pin_ids, max_size=5),
        st.integers(1_000, 60_000).map(lambda n: [str(10**9 + i) for i in range(n)]),
        odds=20,
    )

    def tenant_call(
        method: str, message: object, choice: str, timeout: float | None, messages: int = 1
    ) -> Call:
        tenant = message.tenant  # type: ignore[attr-defined]
        return Call(
            method,
            message.SerializeToString(),  # type: ignore[attr-defined]
            credentials.metadata(choice, tenant),
            timeout,
            messages,
        )

    recommend = st.builds(
        recommender_pb2.RecommendRequest,
        tenant=tenant_names,
        request_id=strings(1_200_000),
        user=users,
        query_pins=query_pins,
        num_results=NUM_RESULTS,
        exclude_pins=exclude,
        seed=SEEDS,
    )
    batch_user = st.builds(
        recommender_pb2.BatchUser,
        request_id=strings(),
        user=users,
        query_pins=query_pins,
        exclude_pins=exclude,
    )
    batch = st.builds(
        recommender_pb2.RecommendBatchRequest,
        tenant=tenant_names,
        users=st.lists(batch_user, max_size=6),
        num_results=NUM_RESULTS,
        seed=SEEDS,
    )

    optional = st.one_of(st.none(), st.floats(), st.sampled_from([-1.0, 0.0, 1e300, 4e9]))

    def event(
        request_id: str, pin_id: str, name: str, score: float | None, timestamp: float | None
    ) -> events_pb2.Event:
        message = events_pb2.Event(request_id=request_id, pin_id=pin_id, event=name)
        if score is not None:
            message.score = score
        if timestamp is not None:
            message.timestamp = timestamp
        return message

    names = st.one_of(
        st.sampled_from(["impression", "click", "save", "closeup", "hide", "view", "SAVE", ""]),
        strings(3_000),
    )
    one_event = st.builds(event, strings(200_000), pin_ids, names, optional, optional)
    many_events = st.builds(lambda e, n: [e] * n, one_event, st.integers(100, 5_000))
    events = st.builds(
        events_pb2.ReportEventsRequest,
        tenant=tenant_names,
        events=rarely(st.lists(one_event, max_size=8), many_events, odds=10),
    )

    admin_names = st.one_of(st.sampled_from([*tenants, "", "nobody"]), strings(1_200_000))
    admin_messages = st.one_of(
        st.just((LIST_TENANTS, admin_pb2.ListTenantsRequest())),
        st.just((GRAPH_INFO, admin_pb2.GraphInfoRequest())),
        st.builds(lambda n: (GET_TENANT, admin_pb2.GetTenantRequest(name=n)), admin_names),
        st.builds(
            lambda ns: (RELOAD, admin_pb2.ReloadRequest(tenants=ns)),
            st.lists(admin_names, max_size=4),
        ),
    )
    admin_choices = st.sampled_from(["admin", "admin", "none", "own", "garbage"])
    services = st.one_of(st.sampled_from(["", *tenants, "nobody"]), strings(1_200_000))

    return {
        "recommend": st.builds(
            lambda m, c, t: tenant_call(RECOMMEND, m, c, t), recommend, CHOICES, TIMEOUTS
        ),
        "batch": st.builds(
            lambda m, c, t: tenant_call(BATCH, m, c, t, len(m.users)), batch, CHOICES, TIMEOUTS
        ),
        "events": st.builds(
            lambda m, c, t: tenant_call(EVENTS, m, c, t), events, CHOICES, TIMEOUTS
        ),
        "admin": st.builds(
            lambda mm, c, t: Call(
                mm[0], mm[1].SerializeToString(), credentials.metadata(c, tenants[0]), t
            ),
            admin_messages,
            admin_choices,
            TIMEOUTS,
        ),
        "health": st.builds(
            lambda s, c, t, w: Call(
                HEALTH_WATCH if w else HEALTH_CHECK,
                health_pb2.HealthCheckRequest(service=s).SerializeToString(),
                credentials.metadata(c, s),
                t,
            ),
            services,
            CHOICES,
            TIMEOUTS,
            st.booleans(),
        ),
        "raw": st.builds(
            lambda m, p, c, t: Call(m, p, credentials.metadata(c, tenants[0]), t),
            st.sampled_from(RAW_METHODS),
            raw_payloads(),
            CHOICES,
            TIMEOUTS,
        ),
    }


def fuzz_settings(max_examples: int) -> settings:
    """Deterministic (derandomized), no shrinking against a live server, no time limits."""
    return settings(
        max_examples=max(1, max_examples),
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


def draw_calls(strategy: st.SearchStrategy[Call], count: int, seed: int) -> list[Call]:
    """Up to `count` distinct calls from `strategy`, the same ones for the same seed."""
    calls: list[Call] = []

    @settings(fuzz_settings(count), derandomize=False)
    @hypothesis_seed(seed)
    @given(strategy)
    def collect(call: Call) -> None:
        calls.append(call)

    collect()
    return calls


def run_property(
    strategy: st.SearchStrategy[Call], max_examples: int, check: Callable[[Call], None]
) -> None:
    """`check` every call hypothesis draws (it raises on a violation; hypothesis reports the
    call that did)."""

    @fuzz_settings(max_examples)
    @given(strategy)
    def each(call: Call) -> None:
        check(call)

    each()
