"""Hostile input, as properties: whatever a caller sends, every call ends in bounded time with a
status that is not INTERNAL or UNKNOWN and a short one-line message, no ERROR is logged, and
the server stays healthy and keeps answering valid calls.

Property-based (hypothesis) over every RPC's messages (Recommender, Admin, Health), over raw
bytes sent through an untyped channel (undecodable messages, invalid UTF-8 in string fields),
and over hand-picked boundary values of every field; calls with a deadline and without one.
One real `walkrank serve` on loopback with API keys on, so authentication is fuzzed too; its
log is checked for ERROR lines. The strategies and the property live in
load_tests/loadgen/fuzz.py (load_tests/chaos.py sends the same at volume). The number of
generated cases is `WALKRANK_FUZZ_EXAMPLES` (default 2,400 over the module, derandomized);
more for a longer hunt:

    WALKRANK_FUZZ_EXAMPLES=50000 .venv/bin/python -m pytest -q tests/test_hostile.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from loadgen.fuzz import (
    BATCH,
    CHANNEL_OPTIONS,
    EVENTS,
    GET_TENANT,
    HANG,
    HEALTH_CHECK,
    HEALTH_WATCH,
    RECOMMEND,
    RELOAD,
    SHARES,
    STRICT_VARIANTS,
    Call,
    Credentials,
    Outcome,
    call_strategies,
    draw_calls,
    run_property,
    send,
    violations,
)
from loadgen.harness import ServeProcess, write_server_config
from walkrank.errors import ConfigError
from walkrank.graph.store import GraphStore
from walkrank_client.pb.walkrank.v1 import admin_pb2, events_pb2, recommender_pb2

REPO = Path(__file__).resolve().parents[1]

CREDENTIALS = Credentials(
    tenant_keys={"homefeed": "key-homefeed", "related_pins": "key-related", "email": "key-email"},
    admin_token="admin-token-for-fuzzing",
)
#: Generated cases over the whole module; each fuzz test takes its share.
FUZZ_EXAMPLES = int(os.environ.get("WALKRANK_FUZZ_EXAMPLES", "2400"))
HEALTH_EVERY = 200  # calls between health checks inside a fuzz run


class ServerLog:
    """The server's log (its stdout and stderr), read as it grows: ERROR lines and tracebacks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_errors(self) -> list[str]:
        with open(self.path, "rb") as log:
            log.seek(self._offset)
            text = log.read().decode(errors="replace")
            self._offset = log.tell()
        return [
            line for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback")
        ]


class Hostile:
    """The server under attack, an untyped channel to it, and the running tally."""

    def __init__(self, target: str, graph: GraphStore, log: ServerLog) -> None:
        self.log = log
        self.channel = grpc.insecure_channel(target, options=list(CHANNEL_OPTIONS))
        self.statuses: Counter[str] = Counter()
        self.calls = 0
        self.wedged = ""  # why the server stopped answering, once it has
        degree = np.diff(np.asarray(graph.pin_offsets))
        busy = np.argsort(-degree)[:32].tolist()
        self.known_pins = [str(p) for p in graph.pin_external(busy).tolist()]
        self.strategies = call_strategies(self.known_pins, CREDENTIALS)

    def call(self, call: Call) -> Outcome:
        outcome = send(self.channel, call)
        self.calls += 1
        self.statuses[outcome.code_name] += 1
        if self.calls % HEALTH_EVERY == 0:
            self.assert_healthy()
        return outcome

    def check(self, call: Call) -> Outcome:
        """`call`, then the property: bounded, a client-error status, a short one-line message."""
        outcome = self.call(call)
        found = violations(call, outcome)
        if outcome.code == HANG:
            self.wedged = found[0]
        assert not found, found[0]
        return outcome

    def assert_healthy(self) -> None:
        """Overall health SERVING, a valid call answered OK, and no ERROR logged so far."""
        health = send(
            self.channel,
            Call(
                HEALTH_CHECK,
                health_pb2.HealthCheckRequest(service="").SerializeToString(),
                timeout=5.0,
            ),
        )
        if health.code != grpc.StatusCode.OK:
            self.wedged = f"health check: {health.code_name} {health.details}"
        assert health.code == grpc.StatusCode.OK, self.wedged
        status = health_pb2.HealthCheckResponse.FromString(health.responses[0]).status
        assert status == health_pb2.HealthCheckResponse.SERVING, status
        request = recommender_pb2.RecommendRequest(
            tenant="homefeed", query_pins=[recommender_pb2.QueryPin(pin_id=self.known_pins[0])]
        )
        answer = send(
            self.channel,
            Call(RECOMMEND, request.SerializeToString(), CREDENTIALS.key("homefeed"), timeout=10.0),
        )
        assert answer.code == grpc.StatusCode.OK, f"valid call: {answer.code} {answer.details}"
        assert recommender_pb2.RecommendResponse.FromString(answer.responses[0]).candidates
        logged = self.log.new_errors()
        assert not logged, f"{len(logged)} ERROR lines logged for client input: {logged[:5]}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore) -> Iterator[Hostile]:
    """`walkrank serve` in its own process, so that a wedged server fails the tests instead of
    hanging them (it is killed when SIGTERM does not stop it)."""
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(REPO / "tenants", root / "tenants")
    config = write_server_config(
        root / "walkrank.yaml",
        small_graph.path,
        root / "tenants",
        root / "models",
        root / "logs",
        workers=8,
        auth=True,
        grace_seconds=2.0,
    )
    env = {
        **os.environ,
        "WALKRANK_ADMIN_TOKEN": CREDENTIALS.admin_token,
        "WALKRANK_API_KEYS": ",".join(f"{t}={k}" for t, k in CREDENTIALS.tenant_keys.items()),
    }
    with ServeProcess(config, root / "server.log", env=env) as server:
        hostile = Hostile(server.target, small_graph, ServerLog(server.log_path))
        try:
            yield hostile
        finally:
            hostile.channel.close()


@pytest.fixture
def live(hostile: Hostile) -> Hostile:
    """The module's server, unless an earlier test left it not answering (then fail at once
    instead of waiting out every call's bound)."""
    if hostile.wedged:
        pytest.fail(f"the server stopped answering in an earlier test: {hostile.wedged}")
    return hostile


@pytest.mark.parametrize("share", list(SHARES))
def test_fuzz(live: Hostile, share: str) -> None:
    """Hypothesis-drawn calls of one RPC family (raw: random and corrupted bytes to every
    method); then the server must be healthy, with no ERROR logged."""
    wanted = round(FUZZ_EXAMPLES * SHARES[share])
    before, statuses = live.calls, live.statuses.copy()
    run_property(live.strategies[share], wanted, live.check)
    live.assert_healthy()
    assert live.calls - before >= 0.9 * wanted, (share, live.calls - before, wanted)
    # The cases reach past authentication and validation to the work, not only refusals.
    seen = live.statuses - statuses
    assert seen["OK"] > 0 and len(seen) > 2, seen


# -- boundary values -----------------------------------------------------------------------

MB = 1 << 20


def recommend(
    tenant: str = "homefeed",
    pins: list[str] | None = None,
    weights: list[float] | None = None,
    **fields: object,
) -> recommender_pb2.RecommendRequest:
    weights = weights or [0.0] * len(pins or [])
    return recommender_pb2.RecommendRequest(
        tenant=tenant,
        query_pins=[
            recommender_pb2.QueryPin(pin_id=p, weight=w)
            for p, w in zip(pins or [], weights, strict=True)
        ],
        **fields,
    )


def boundary_cases(pins: list[str]) -> list[tuple[str, str, bytes, str, set[str]]]:
    """(name, method, payload, tenant whose key is sent, allowed status names)."""
    client_errors = {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
    }
    invalid = {"INVALID_ARGUMENT"}
    ok = {"OK"}
    a, b = pins[0], pins[1]
    cases: list[tuple[str, str, object, str, set[str]]] = [
        ("empty request", RECOMMEND, recommend(""), "homefeed", client_errors),
        ("no query pins", RECOMMEND, recommend(), "homefeed", invalid),
        (
            "weights 1e20 (budget overflow)",
            RECOMMEND,
            recommend(pins=[a, b], weights=[1e20, 1e20]),
            "homefeed",
            ok,
        ),
        (
            "weight 1e20 beside an unweighted pin",
            RECOMMEND,
            recommend(pins=[a, b], weights=[1e20, 0.0]),
            "homefeed",
            ok,
        ),
        ("weight 5000", RECOMMEND, recommend(pins=[a], weights=[5000.0]), "homefeed", ok),
        ("weight 1e15", RECOMMEND, recommend(pins=[a], weights=[1e15]), "homefeed", ok),
        (
            "weight float32 max",
            RECOMMEND,
            recommend(pins=[a, b], weights=[3.4e38, 1e-45]),
            "homefeed",
            ok,
        ),
        ("weight NaN", RECOMMEND, recommend(pins=[a], weights=[math.nan]), "homefeed", invalid),
        ("weight inf", RECOMMEND, recommend(pins=[a], weights=[math.inf]), "homefeed", invalid),
        ("weight -inf", RECOMMEND, recommend(pins=[a], weights=[-math.inf]), "homefeed", invalid),
        ("weight negative", RECOMMEND, recommend(pins=[a], weights=[-1.0]), "homefeed", invalid),
        (
            "request_time NaN",
            RECOMMEND,
            recommend(pins=[a], request_time=math.nan),
            "homefeed",
            invalid,
        ),
        (
            "request_time -inf",
            RECOMMEND,
            recommend(pins=[a], request_time=-math.inf),
            "homefeed",
            invalid,
        ),
        (
            "request_time double max",
            RECOMMEND,
            recommend(pins=[a], request_time=1.8e308),
            "homefeed",
            invalid,
        ),
        ("request_time 0 (1970)", RECOMMEND, recommend(pins=[a], request_time=0.0), "homefeed", ok),
        (
            "actions with NaN and inf times",
            RECOMMEND,
            recommend(
                actions=[
                    recommender_pb2.UserAction(pin_id=a, action="save", time=math.nan),
                    recommender_pb2.UserAction(pin_id=b, action="save", time=math.inf),
                ]
            ),
            "homefeed",
            invalid,
        ),
        (
            "action name of 1 MiB",
            RECOMMEND,
            recommend(actions=[recommender_pb2.UserAction(pin_id=a, action="s" * MB)]),
            "homefeed",
            invalid,
        ),
        (
            "10k actions of one pin",
            RECOMMEND,
            recommend(actions=[recommender_pb2.UserAction(pin_id=a, action="save")] * 10_000),
            "homefeed",
            invalid,
        ),
        (
            "actions beside query pins",
            RECOMMEND,
            recommend(pins=[a], actions=[recommender_pb2.UserAction(pin_id=b, action="click")]),
            "homefeed",
            invalid,
        ),
        (
            "actions of 1970 and of 2096",
            RECOMMEND,
            recommend(
                actions=[
                    recommender_pb2.UserAction(pin_id=a, action="save", time=0.0),
                    recommender_pb2.UserAction(pin_id=b, action="view", time=4_000_000_000.0),
                ]
            ),
            "homefeed",
            ok,
        ),
        (
            "batch user with request_time NaN",
            BATCH,
            recommender_pb2.RecommendBatchRequest(
                tenant="email",
                users=[
                    recommender_pb2.BatchUser(
                        query_pins=[recommender_pb2.QueryPin(pin_id=a)], request_time=math.nan
                    )
                ],
            ),
            "email",
            invalid,
        ),
        (
            "num_results max uint32",
            RECOMMEND,
            recommend(pins=[a], num_results=2**32 - 1),
            "homefeed",
            invalid | ok,
        ),
        (
            "query pins past max_query_pins",
            RECOMMEND,
            recommend(pins=[a] * 201),
            "homefeed",
            invalid,
        ),
        (
            "two query pins for related_pins",
            RECOMMEND,
            recommend("related_pins", pins=[a, b]),
            "related_pins",
            invalid,
        ),
        ("unknown pins only", RECOMMEND, recommend(pins=["999", "1"]), "homefeed", ok | invalid),
        ("tenant of 1 MiB", RECOMMEND, recommend("t" * MB, pins=[a]), "homefeed", client_errors),
        (
            "request_id of 1.1 MB",
            RECOMMEND,
            recommend(pins=[a], request_id="r" * 1_100_000),
            "homefeed",
            invalid,
        ),
        (
            "request_id of 3.9 MiB",
            RECOMMEND,
            recommend(pins=[a], request_id="r" * (39 * MB // 10)),
            "homefeed",
            invalid,
        ),
        (
            "user id of 1 MiB",
            RECOMMEND,
            recommend(pins=[a], user=recommender_pb2.User(id="u" * MB)),
            "homefeed",
            invalid,
        ),
        (
            "locale of 1 MiB",
            RECOMMEND,
            recommend(pins=[a], user=recommender_pb2.User(locale="l" * MB)),
            "homefeed",
            invalid | ok,
        ),
        (
            "10k interests",
            RECOMMEND,
            recommend(pins=[a], user=recommender_pb2.User(interests=["x" * 100] * 10_000)),
            "homefeed",
            invalid | ok,
        ),
        ("pin id of 1 MiB", RECOMMEND, recommend(pins=["9" * MB]), "homefeed", invalid | ok),
        (
            "100k excluded pins",
            RECOMMEND,
            recommend(pins=[a], exclude_pins=[b] * 100_000),
            "homefeed",
            invalid | ok,
        ),
        (
            "message past max_message_bytes",
            RECOMMEND,
            recommend(pins=[a], request_id="r" * (5 * MB)),
            "homefeed",
            {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"},
        ),
        (
            "batch without users",
            BATCH,
            recommender_pb2.RecommendBatchRequest(tenant="email"),
            "email",
            invalid,
        ),
        (
            "batch of 2000 users without pins",
            BATCH,
            recommender_pb2.RecommendBatchRequest(
                tenant="email", users=[recommender_pb2.BatchUser()] * 2000
            ),
            "email",
            invalid,
        ),
        (
            "batch user with weight 1e20",
            BATCH,
            recommender_pb2.RecommendBatchRequest(
                tenant="email",
                users=[
                    recommender_pb2.BatchUser(
                        query_pins=[
                            recommender_pb2.QueryPin(pin_id=a, weight=1e20),
                            recommender_pb2.QueryPin(pin_id=b, weight=1e20),
                        ]
                    )
                ],
            ),
            "email",
            ok,
        ),
        (
            "events: 100k events",
            EVENTS,
            events_pb2.ReportEventsRequest(
                tenant="homefeed",
                events=[events_pb2.Event(request_id="r", pin_id=a, event="click")] * 100_000,
            ),
            "homefeed",
            client_errors | ok,
        ),
        (
            "events: NaN and inf score and time",
            EVENTS,
            events_pb2.ReportEventsRequest(
                tenant="homefeed",
                events=[
                    events_pb2.Event(
                        request_id="r", pin_id=a, event="save", score=math.nan, timestamp=math.inf
                    )
                ],
            ),
            "homefeed",
            client_errors | ok,
        ),
        (
            "events: request_id of 1 MiB",
            EVENTS,
            events_pb2.ReportEventsRequest(
                tenant="homefeed",
                events=[events_pb2.Event(request_id="r" * MB, pin_id=a, event="save")],
            ),
            "homefeed",
            client_errors | ok,
        ),
        (
            "admin: GetTenant of 1 MiB",
            GET_TENANT,
            admin_pb2.GetTenantRequest(name="n" * MB),
            "admin",
            client_errors,
        ),
        (
            "admin: Reload of a path",
            RELOAD,
            admin_pb2.ReloadRequest(tenants=["../../etc/passwd"]),
            "admin",
            client_errors | ok,
        ),
        (
            "health of 1 MiB",
            HEALTH_CHECK,
            health_pb2.HealthCheckRequest(service="s" * MB),
            "homefeed",
            client_errors,
        ),
    ]
    return [
        (name, method, message.SerializeToString(), who, allowed)
        for name, method, message, who, allowed in cases
    ]


@pytest.mark.parametrize("timeout", [3.0, None], ids=["deadline", "no-deadline"])
def test_boundary_values(live: Hostile, timeout: float | None) -> None:
    """Each field at its edges, with a deadline and without one: the documented status, and
    the weights' scale never changes the walk's total budget (the answer is not empty)."""
    failures = []
    for name, method, payload, who, allowed in boundary_cases(live.known_pins):
        metadata = CREDENTIALS.admin if who == "admin" else CREDENTIALS.key(who)
        try:
            outcome = live.check(Call(method, payload, metadata, timeout))
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
            continue
        code = outcome.code.name
        if code not in allowed:
            failures.append(
                f"{name}: {code} ({outcome.details[:120]}), expected one of {sorted(allowed)}"
            )
        elif code == "OK" and method == RECOMMEND and allowed == {"OK"}:
            answer = recommender_pb2.RecommendResponse.FromString(outcome.responses[0])
            if not answer.candidates:
                failures.append(f"{name}: OK with no candidates ({answer.empty_reason!r})")
    live.assert_healthy()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", STRICT_VARIANTS)
def test_pin_ids_are_strict(live: Hostile, variant: str) -> None:
    """A pin id is its decimal digits exactly: padded, signed, underscored, zero-led, non-ASCII
    digits or NUL-terminated forms never resolve to the pin."""
    outcome = live.check(
        Call(
            RECOMMEND,
            recommend(pins=[variant]).SerializeToString(),
            CREDENTIALS.key("homefeed"),
            timeout=3.0,
        )
    )
    if outcome.code == grpc.StatusCode.OK:
        answer = recommender_pb2.RecommendResponse.FromString(outcome.responses[0])
        assert list(answer.unknown_query_pins) == [variant] and not answer.candidates
    else:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.code


def test_concurrent_hostile_calls(live: Hostile) -> None:
    """Hostile calls 8 at a time, many of them health Watch calls ending by their deadlines
    while others start: every call keeps the property and the server stays healthy. (Sent one
    at a time, calls never race the server's own callbacks: a Watch that sent its first
    answer under the health servicer's lock while gRPC's poller waited for that lock to close
    another Watch wedged the whole server within seconds.)"""
    watches = [
        Call(
            HEALTH_WATCH,
            health_pb2.HealthCheckRequest(service=service).SerializeToString(),
            CREDENTIALS.key("homefeed"),
            timeout,
        )
        for service in ("", "homefeed")
        for timeout in (0.01, 0.05, 0.1, 0.2)
    ] * 40
    drawn = [
        call
        for share, count in (("health", 80), ("recommend", 80), ("raw", 80))
        for call in draw_calls(live.strategies[share], count, seed=5)
    ]
    calls = [call for pair in zip(watches, drawn * 2, strict=False) for call in pair]
    broken = threading.Event()  # a wedged server would make every later call wait its bound

    def one(call: Call) -> list[str]:
        if broken.is_set():
            return []
        outcome = send(live.channel, call)
        found = violations(call, outcome)
        if found:
            broken.set()
        if outcome.code == HANG:
            live.wedged = found[0]
        return found

    with ThreadPoolExecutor(8) as pool:
        found = [v for result in pool.map(one, calls) for v in result]
    assert not found, f"{len(found)} calls broke the property: {found[:3]}"
    live.assert_healthy()


def _has_envoy() -> bool:
    """The chaos run measures isolation through Envoy too when there is one (the lock has it)."""
    from walkrank.envoy import find_envoy

    try:
        find_envoy()
    except ConfigError:
        return False
    return True


def run_chaos_table(report: Path) -> str:
    """`chaos.py --table REPORT`: the Markdown the docs get."""
    return subprocess.run(
        [sys.executable, str(REPO / "load_tests" / "chaos.py"), "--table", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


@pytest.mark.slow
def test_chaos_quick_run_meets_the_zero_targets(tmp_path: Path) -> None:
    """load_tests/chaos.py --quick end to end against a real `walkrank serve`: the report has
    every promise figure, and each count that must be zero is zero."""
    out = tmp_path / "chaos.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "load_tests" / "chaos.py"), "--json", str(out), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.is_file(), run.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in (
        "fuzzed",
        "statuses",
        "internal_errors",
        "hangs",
        "crashes",
        "uncounted_log_loss_rows",
        "cross_tenant_events_accepted",
        "isolation_p99_ratio",
        "refusal_p99_ms",
        "isolation_p99_ratio_idle_aggressor",
        "refusal_p99_ms_idle_aggressor",
        "failed_calls_during_reload",
        *(
            (
                "isolation_p99_ratio_envoy",
                "refusal_p99_ms_envoy",
                "isolation_p99_ratio_envoy_idle_aggressor",
                "refusal_p99_ms_envoy_idle_aggressor",
            )
            if _has_envoy()
            else ()
        ),
    ):
        assert key in report and report[key] is not None, (key, report.get("context"))
    # Each isolation measurement says what the aggressor offered, and the table shows its
    # phases with every process's cores.
    measured = [s for s in ("", "_idle_aggressor") if report["context"].get(f"isolation{s}")]
    assert measured == ["", "_idle_aggressor"]
    for suffix in measured:
        isolation = report["context"][f"isolation{suffix}"]
        assert isolation["idle_aggressor"] == (suffix == "_idle_aggressor")
        assert isolation["aggressor_flood_rps"] > 0 and isolation["aggressor_together_rps"] > 0
    table = run_chaos_table(out)
    assert table.count("| phase | victim p50 / p99 (ms) |") == (4 if _has_envoy() else 2)
    assert "aggressor's generator at SCHED_IDLE" in table
    assert report["fuzzed"] >= 1_000 and sum(report["statuses"].values()) == report["fuzzed"]
    zeros = {
        key: report[key]
        for key in (
            "internal_errors",
            "hangs",
            "crashes",
            "uncounted_log_loss_rows",
            "cross_tenant_events_accepted",
            "failed_calls_during_reload",
        )
    }
    assert zeros == dict.fromkeys(zeros, 0), (zeros, report["context"])
