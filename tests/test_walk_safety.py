"""Issue 12, "every call ends, in bounded time, with a status": calls without a deadline, query
weights of any scale, walks cancelled at their deadline and at shutdown, health when the
compute threads stall. Through a real server on loopback (raw stubs, so no client-side
deadline is added) and a real `walkrank serve` process."""

from __future__ import annotations

import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_cli_serve import serve_process, write_config
from test_server import REPO, make_config, running

from walkrank.graph.store import GraphStore
from walkrank.serving.scheduler import ComputePool
from walkrank.serving.server import WalkRankServer
from walkrank.walks import WalkParams, walk
from walkrank.walks.engine import WalkCancelled
from walkrank_client.pb.walkrank.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    events_pb2,
    recommender_pb2,
    recommender_pb2_grpc,
)

# The longest walk a tenant may ask for (walk.steps at its cap), biased to a locale and topic
# so every step does binary searches: ~0.7 s on the small graph, far past the deadlines here.
SLOW_WALK = {
    "steps": 10_000_000,
    "restart_probability": 0.5,
    "early_stopping": None,
    "bias": {"strength": 1.0, "by": "locale_topic"},
}
SLOW_PARAMS = WalkParams(
    steps=10_000_000, early_stop_pins=0, bias_strength=1.0, bias_by="locale_topic"
)


def write_slow_tenant(tenants: Path, deadline_ms: int) -> None:
    """Tenant `slow`: the home feed with SLOW_WALK and the given default deadline."""
    config = yaml.safe_load((REPO / "tenants" / "homefeed.yaml").read_text())
    config["name"] = "slow"
    config["walk"] = SLOW_WALK
    config["limits"]["deadline_ms"] = deadline_ms
    (tenants / "slow.yaml").write_text(yaml.safe_dump(config))


def pin_ids(graph: GraphStore, n: int) -> list[str]:
    degree = np.diff(np.asarray(graph.pin_offsets))
    return [str(p) for p in graph.pin_external(np.argsort(-degree)[:n].tolist()).tolist()]


def slow_request(graph: GraphStore, weight: float = 0.0) -> recommender_pb2.RecommendRequest:
    """Three query pins for tenant `slow`, the first weighted `weight` (0: unweighted), from a
    user whose locale and topic the walk is biased to."""
    first, *others = pin_ids(graph, 3)
    return recommender_pb2.RecommendRequest(
        tenant="slow",
        query_pins=[recommender_pb2.QueryPin(pin_id=first, weight=weight)]
        + [recommender_pb2.QueryPin(pin_id=p) for p in others],
        user=recommender_pb2.User(locale=graph.locales[0], interests=[graph.topics[0]]),
    )


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore
) -> Iterator[tuple[WalkRankServer, grpc.Channel]]:
    """One compute thread, so a walk that kept it would block the next call."""
    root = tmp_path_factory.mktemp("walk_safety")
    config = make_config(root, small_graph, compute_slots=1)
    write_slow_tenant(config.tenants_dir, deadline_ms=50)
    with (
        running(config) as (server, _),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, channel


def test_calls_without_a_deadline_are_answered(served) -> None:
    """grpcio reports "no deadline" as a huge time_remaining; it failed with "timestamp out of
    range for platform time_t" and must mean the tenant's deadline_ms instead."""
    server, channel = served
    recommender = recommender_pb2_grpc.RecommenderStub(channel)
    query = [recommender_pb2.QueryPin(pin_id=p) for p in pin_ids(server.graph, 2)]
    answer = recommender.Recommend(
        recommender_pb2.RecommendRequest(tenant="homefeed", query_pins=query)
    )
    assert len(answer.candidates) > 0
    users = [recommender_pb2.BatchUser(query_pins=query, request_id=f"u{i}") for i in range(3)]
    stream = recommender.RecommendBatch(
        recommender_pb2.RecommendBatchRequest(tenant="email", users=users)
    )
    assert [len(r.candidates) > 0 for r in stream] == [True] * 3
    events = recommender.ReportEvents(
        events_pb2.ReportEventsRequest(
            tenant="homefeed",
            events=[
                events_pb2.Event(
                    request_id=answer.request_id, pin_id=answer.candidates[0].pin_id, event="click"
                )
            ],
        )
    )
    assert events.accepted + events.rejected == 1
    admin = admin_pb2_grpc.AdminStub(channel)
    assert "homefeed" in {t.name for t in admin.ListTenants(admin_pb2.ListTenantsRequest()).tenants}
    assert admin.GetTenant(admin_pb2.GetTenantRequest(name="homefeed")).name == "homefeed"
    assert admin.GraphInfo(admin_pb2.GraphInfoRequest()).n_pins == server.graph.n_pins
    assert not admin.Reload(admin_pb2.ReloadRequest()).errors


def test_huge_weights_answer_and_leave_the_server_serving(served) -> None:
    """The issue's request (weight 1e20 beside an unweighted pin), sent twice, wedged both
    compute threads for good; 1e15 answered with no candidates."""
    server, channel = served
    recommender = recommender_pb2_grpc.RecommenderStub(channel)
    first, second = pin_ids(server.graph, 2)
    for weight in (1e20, 1e20, 1e15, 5000.0, 1e-30):
        answer = recommender.Recommend(
            recommender_pb2.RecommendRequest(
                tenant="homefeed",
                query_pins=[
                    recommender_pb2.QueryPin(pin_id=first, weight=weight),
                    recommender_pb2.QueryPin(pin_id=second),
                ],
            ),
            timeout=10,
        )
        assert len(answer.candidates) > 0, weight
    normal = recommender.Recommend(
        recommender_pb2.RecommendRequest(
            tenant="homefeed", query_pins=[recommender_pb2.QueryPin(pin_id=first)]
        ),
        timeout=10,
    )
    assert len(normal.candidates) > 0 and server.serving.compute.running == 0


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), float("-inf")])
def test_weights_must_be_finite_and_positive(served, weight: float) -> None:
    server, channel = served
    recommender = recommender_pb2_grpc.RecommenderStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        recommender.Recommend(
            recommender_pb2.RecommendRequest(
                tenant="homefeed",
                query_pins=[
                    recommender_pb2.QueryPin(pin_id=p, weight=weight if i else 1.0)
                    for i, p in enumerate(pin_ids(server.graph, 2))
                ],
            ),
            timeout=10,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("query_pins.weight: weights must be finite and > 0")


def test_a_walk_past_its_deadline_is_cancelled_and_frees_the_compute_thread(served) -> None:
    """No caller deadline, so the tenant's 50 ms applies and the server's own status comes
    back: the walk stopped far short of its 10M steps, and the only compute thread is free
    when the answer arrives."""
    server, channel = served
    recommender = recommender_pb2_grpc.RecommenderStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        recommender.Recommend(slow_request(server.graph))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    steps = re.search(r"walk cancelled after ([\d,]+) steps", info.value.details())
    assert steps is not None, info.value.details()
    assert int(steps.group(1).replace(",", "")) < SLOW_PARAMS.steps
    assert server.serving.compute.running == 0
    answer = recommender.Recommend(
        recommender_pb2.RecommendRequest(
            tenant="homefeed",
            query_pins=[recommender_pb2.QueryPin(pin_id=pin_ids(server.graph, 1)[0])],
        )
    )
    assert len(answer.candidates) > 0


def test_health_says_not_serving_while_the_compute_threads_are_stuck(served) -> None:
    """A job that ignores cancellation holds the only compute thread while another waits:
    overall health goes NOT_SERVING, and SERVING again once they move."""
    server, channel = served
    health = health_pb2_grpc.HealthStub(channel)

    def overall() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

    server.stall_after_s = 0.2  # read by the watchdog at its next poll
    gate = threading.Event()
    pool = server.serving.compute
    holders = [threading.Thread(target=pool.run, args=(lambda: gate.wait(30), 0)) for _ in range(2)]
    try:
        for holder in holders:
            holder.start()
        deadline = time.monotonic() + 10
        while overall() != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never left SERVING"
            gate.wait(0.05)
        assert pool.stalled_for() > 0.2
    finally:
        gate.set()
        for holder in holders:
            holder.join(30)
    deadline = time.monotonic() + 10
    while overall() != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "health never came back to SERVING"
        threading.Event().wait(0.05)


def test_the_pool_cancels_a_walk_at_its_due_time_and_on_close(small_graph: GraphStore) -> None:
    """The cancel cell is set by the caller's thread when `due` passes, and by close() for
    what still runs: the walk stops early (WalkCancelled after fewer steps than its budget)."""
    query = small_graph.pin_index(pin_ids(small_graph, 3))

    def slow_walk(cancel: np.ndarray) -> None:
        walk(
            small_graph, query, np.ones(3), SLOW_PARAMS, user_locale=0, user_topic=0, cancel=cancel
        )

    pool = ComputePool(1)
    cancel = np.zeros(1, np.uint8)
    with pytest.raises(WalkCancelled) as info:
        pool.run(lambda: slow_walk(cancel), 0, due=time.perf_counter() + 0.02, cancel=cancel)
    assert info.value.steps < SLOW_PARAMS.steps and cancel[0] == 1

    on_close = np.zeros(1, np.uint8)
    outcome: list[WalkCancelled] = []

    def caller() -> None:
        try:
            pool.run(lambda: slow_walk(on_close), 0, cancel=on_close)  # no deadline
        except WalkCancelled as exc:
            outcome.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    while pool.running == 0:
        threading.Event().wait(0.001)
    pool.close()
    thread.join(30)
    assert len(outcome) == 1 and outcome[0].steps < SLOW_PARAMS.steps


@pytest.mark.slow
def test_sigterm_during_long_walks_exits_within_the_grace_period_plus_a_second(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    """The issue's 2.5e9-step walk (a heavy query weight) kept a SIGTERM'd server up 28.5 s
    past a 10 s grace. Walks still running when the grace period ends are cancelled."""
    shutil.copytree(REPO / "tenants", tmp_path / "tenants")
    write_slow_tenant(tmp_path / "tenants", deadline_ms=600_000)
    grace = 0.2
    config = write_config(tmp_path, small_graph.path, grace_seconds=grace)
    with serve_process(config) as (process, address):
        with grpc.insecure_channel(address) as channel:
            recommender = recommender_pb2_grpc.RecommenderStub(channel)
            request = slow_request(small_graph, weight=5000.0)
            users = [
                recommender_pb2.BatchUser(query_pins=request.query_pins, user=request.user)
                for _ in range(40)
            ]
            stream = recommender.RecommendBatch(
                recommender_pb2.RecommendBatchRequest(tenant="slow", users=users), timeout=600
            )
            next(stream)  # the first user is answered: the second user's walk is running
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            exited_s = time.monotonic() - started
        assert process.returncode == 0
        assert exited_s <= grace + 1.0, f"exited {exited_s:.2f} s after SIGTERM"
