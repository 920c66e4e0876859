"""Real-time edges through a real server: Admin.AddEdges, the delta segment the walks read,
its limit, its append log (replay, a truncated tail) and hostile input."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_server import busy_pins, code_of, make_config, running

from walkrank.errors import ConfigError, DataError
from walkrank.graph.build import build_graph
from walkrank.graph.delta import DeltaSegment, Edge
from walkrank.graph.repository import GraphRepository
from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import read_candidates
from walkrank.serving.config import RealtimeConfig, load_server_config, resolve_auth
from walkrank.serving.server import WalkRankServer
from walkrank.walks import WalkParams, walk
from walkrank_client import WalkRankClient, WalkRankClientError
from walkrank_client.pb.walkrank.v1 import admin_pb2, admin_pb2_grpc

NEW_PIN = "987654321"  # not a pin of the small graph (its ids start at 1000000000)


def _saves_onto_boards_of(graph: GraphStore, query: str, pin: str = NEW_PIN) -> list:
    """Edges saving `pin` onto every board of the query pin: its walks reach `pin` often."""
    dense = int(graph.pin_index([query])[0])
    return [(pin, str(b), 1_700_000_000.0) for b in graph.board_external(graph.boards_of(dense))]


def _ids(answer) -> list[str]:
    return [c.pin_id for c in answer.candidates]


def test_a_pin_added_by_add_edges_is_recommended_by_the_next_request(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph, realtime=RealtimeConfig(max_edges=1000))
    with running(config) as (server, client):
        query = busy_pins(small_graph, 1)
        assert NEW_PIN not in _ids(client.recommend("homefeed", query, seed=1))
        added = client.add_edges([_saves_onto_boards_of(small_graph, query[0])])
        assert added.added == small_graph.pin_degree()[int(small_graph.pin_index(query)[0])]
        assert (added.new_pins, added.new_boards, added.duplicates) == (1, 0, 0)
        assert added.delta_edges == added.added and added.max_edges == 1000
        answer = client.recommend("homefeed", query, seed=1)
        assert NEW_PIN in _ids(answer)[:10]
        info = client.graph_info()
        assert info.n_pins == small_graph.n_pins + 1
        assert info.n_edges == small_graph.n_edges + added.added
        # Sent again: every edge is a duplicate, nothing changes.
        again = client.add_edges([_saves_onto_boards_of(small_graph, query[0])])
        assert (again.added, again.duplicates) == (0, added.added)
        # The new pin is a query pin too: its boards' pins come back.
        from_new = client.recommend("homefeed", [NEW_PIN], seed=2)
        assert from_new.candidates and not from_new.unknown_query_pins
        # And an extra candidate from another generator (scored, here by visit count: last).
        other = "987654322"
        client.add_edges([[(other, str(small_graph.board_ids[-1]))]])
        walked = client.recommend("homefeed", query, seed=1)
        extra = client.recommend("homefeed", query, seed=1, extra_candidates=[(other, "fresh")])
        assert extra.candidates_generated == walked.candidates_generated + 1
    # New pins are logged like any other candidate (the server stopped: its logs are written).
    assert NEW_PIN in set(read_candidates(config.logs_dir, "homefeed")["pin_id"].to_pylist())


def test_edges_survive_a_restart_when_durable(tmp_path: Path, small_graph: GraphStore) -> None:
    realtime = RealtimeConfig(max_edges=1000, log=tmp_path / "realtime" / "edges.log")
    config = make_config(tmp_path, small_graph, realtime=realtime)
    query = busy_pins(small_graph, 1)
    with running(config) as (_, client):
        client.add_edges([_saves_onto_boards_of(small_graph, query[0])])
    with running(config) as (_, client):
        assert NEW_PIN in _ids(client.recommend("homefeed", query, seed=1))[:10]
    # Without a log the delta is memory only: a restart forgets it.
    memory_only = config.replace(realtime=RealtimeConfig(max_edges=1000))
    with running(memory_only) as (_, client):
        assert NEW_PIN not in _ids(client.recommend("homefeed", query, seed=1))


def test_the_delta_limit_is_enforced_with_a_clear_status(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph, realtime=RealtimeConfig(max_edges=10))
    with running(config) as (server, client):
        first = client.add_edges([[(f"{9000 + i}", "1000000000") for i in range(8)]])
        assert first.added == 8
        with pytest.raises(Exception) as info:
            client.add_edges([[("9100", "1000000001")], [(f"{9200 + i}", "1") for i in range(5)]])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "realtime.max_edges is 10" in info.value.details
        assert "1 edges of this call's earlier batches were added" in info.value.details
        assert client.add_edges([[("9300", "1000000000")]]).delta_edges == 10
        assert server.metrics.registry.get_sample_value("walkrank_realtime_edges") == 10


def test_a_truncated_append_log_is_reported_and_skipped_never_a_crash(
    tmp_path: Path, small_graph: GraphStore, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "edges.log"
    realtime = RealtimeConfig(max_edges=1000, log=path)
    config = make_config(tmp_path, small_graph, realtime=realtime)
    query = busy_pins(small_graph, 1)
    with running(config) as (_, client):
        client.add_edges([_saves_onto_boards_of(small_graph, query[0])])
        client.add_edges([[("555", "1000000000")]])
    good = path.read_bytes()
    path.write_bytes(good[:-5])  # the last record loses its end: a crash mid-write
    with caplog.at_level(logging.WARNING), running(config) as (server, client):
        assert NEW_PIN in _ids(client.recommend("homefeed", query, seed=1))[:10]
        skipped = server.serving.served.delta.replay.skipped_bytes
        assert skipped > 0
        sample = server.metrics.registry.get_sample_value
        assert sample("walkrank_realtime_dropped", {"what": "log_bytes"}) == skipped
        # New records follow the good ones, and survive the next restart.
        client.add_edges([[("556", "1000000000")]])
    assert any(
        str(path) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records
    )
    assert path.with_name("edges.log.skipped").stat().st_size > 0
    with running(config) as (server, client):
        assert server.serving.served.delta.replay.skipped_bytes == 0
        assert client.graph_info().n_pins == small_graph.n_pins + 2  # NEW_PIN and 556


def test_hostile_add_edges_input_is_refused_with_invalid_argument(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph, realtime=RealtimeConfig(max_edges=100_000))
    with running(config) as (_, client):
        cases = {
            "requests[0].edges[0].pin_id": [("abc", "1")],
            "requests[0].edges[1].board_id": [("1", "2"), ("1", "1e3")],
            "requests[0].edges[0].pin_id: 200 characters": [("1" * 200, "1")],
            "requests[0].edges[0].pin_id: required": [("", "1")],
            "requests[0].edges[0].created_at": [("1", "2", math.nan)],
            "requests[0].edges[0].created_at: inf": [("1", "2", math.inf)],
            "requests[0].edges[0].created_at: 1e+300": [("1", "2", 1e300)],
            "requests[0].edges: 10001 values": [(str(i), "1") for i in range(10_001)],
        }
        for expected, batch in cases.items():
            with pytest.raises(Exception) as info:
                client.add_edges([batch])
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, expected
            assert expected in info.value.details, (expected, info.value.details)
        assert client.graph_info().n_edges == small_graph.n_edges  # nothing was added


def test_add_edges_needs_the_admin_token_and_realtime_on(
    tmp_path: Path, small_graph: GraphStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running(make_config(tmp_path / "off", small_graph)) as (_, client):
        off = code_of(lambda: client.add_edges([[("1", "2")]]))
        assert off == grpc.StatusCode.FAILED_PRECONDITION
    monkeypatch.setenv("WALKRANK_API_KEYS", "homefeed=hf-key")
    monkeypatch.setenv("WALKRANK_ADMIN_TOKEN", "admin-secret")
    config = make_config(
        tmp_path / "auth",
        small_graph,
        auth=resolve_auth(True, None),
        realtime=RealtimeConfig(max_edges=100),
    )
    server = WalkRankServer(config)
    address = f"127.0.0.1:{server.start()}"
    try:
        with WalkRankClient(address, api_key="hf-key") as tenant_only:
            refused = code_of(lambda: tenant_only.add_edges([[("1", "1000000000")]]))
            assert refused == grpc.StatusCode.UNAUTHENTICATED
        with WalkRankClient(address, admin_token="admin-secret") as admin:
            assert admin.add_edges([[("1", "1000000000")]]).added == 1
    finally:
        server.stop()


def test_walks_on_base_plus_delta_match_walks_on_the_merged_graph(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    """The kernel's delta path draws like a graph built with the delta's edges in it: random
    edges between existing pins and boards, plus new pins on new and existing boards."""
    rng = np.random.default_rng(5)
    picked_pins = small_graph.pin_ids[rng.integers(0, small_graph.n_pins, 400)]
    picked_boards = small_graph.board_ids[rng.integers(0, small_graph.n_boards, 400)]
    extra = [Edge(str(p), str(b)) for p, b in zip(picked_pins, picked_boards, strict=True)]
    extra += [Edge(f"{7000 + i % 5}", f"{8000 + i % 3}") for i in range(15)]
    extra += [Edge(f"{7000 + i}", str(small_graph.board_ids[i])) for i in range(5)]
    delta = DeltaSegment(small_graph, max_edges=10_000, flush_s=1.0)
    delta.add(extra)
    delta.publish()
    live = delta.view()
    delta.close()

    degree = np.diff(small_graph.pin_offsets)
    base_pins = np.repeat(small_graph.pin_ids, degree)
    base_boards = small_graph.board_ids[small_graph.pin_adj]
    edges = pa.table(
        {
            "pin_id": np.concatenate([base_pins, [int(e.pin_id) for e in extra]]),
            "board_id": np.concatenate([base_boards, [int(e.board_id) for e in extra]]),
        }
    )
    build_graph(tmp_path / "merged", edges)
    merged = GraphStore.load(tmp_path / "merged")
    assert (merged.n_edges, merged.n_pins) == (live.n_edges, live.n_pins)

    params = WalkParams(steps=400_000, early_stop_pins=0)
    query = busy_pins(small_graph, 1) + ["7000"]

    def visits(graph: GraphStore) -> dict[int, int]:
        result = walk(graph, graph.pin_index(query), np.ones(2), params, seed=3)
        return dict(
            zip(graph.pin_external(result.pins).tolist(), result.visits.tolist(), strict=True)
        )

    on_live, on_merged = visits(live), visits(merged)
    for pin in sorted(on_merged, key=on_merged.__getitem__, reverse=True)[:30]:
        expected = on_merged[pin]
        assert abs(on_live.get(pin, 0) - expected) < 5 * math.sqrt(expected) + 20, pin


def test_saves_on_a_board_become_edges_for_a_tenant_that_opts_in(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph, realtime=RealtimeConfig(max_edges=1000))
    homefeed = config.tenants_dir / "homefeed.yaml"
    homefeed.write_text(homefeed.read_text() + "\ngraph:\n  realtime_saves: true\n")
    query = busy_pins(small_graph, 1)
    saves = [
        {"request_id": "r1", "pin_id": pin, "event": "save", "board_id": board, "timestamp": at}
        for pin, board, at in _saves_onto_boards_of(small_graph, query[0])
    ]
    with running(config) as (server, client):
        delta = server.serving.served.delta
        # A tenant without the setting, and events that are not saves on a board: no edges.
        client.report_events("email", saves)
        client.report_events("homefeed", [{**saves[0], "event": "click"}])
        client.report_events("homefeed", [{k: v for k, v in saves[0].items() if k != "board_id"}])
        assert delta.edges == 0
        # A rejected event (a timestamp in milliseconds) adds no edge either.
        bad = client.report_events("homefeed", [{**saves[0], "timestamp": 1.7e12}])
        assert (bad.accepted, bad.rejected, delta.edges) == (0, 1, 0)
        answer = client.report_events("homefeed", saves)
        assert answer.accepted == len(saves) and delta.edges == len(saves)
        delta.publish()  # what the background thread does within realtime.flush_ms
        assert NEW_PIN in _ids(client.recommend("homefeed", query, seed=1))[:10]
        refused = code_of(
            lambda: client.report_events("homefeed", [{**saves[0], "board_id": "b-1"}])
        )
        assert refused == grpc.StatusCode.INVALID_ARGUMENT


def test_compact_folds_the_delta_into_a_new_version_and_the_delta_restarts_empty(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    repository = tmp_path / "graphs"
    GraphRepository(repository).publish(lambda out: shutil.copytree(small_graph.path, out))
    log_path = tmp_path / "edges.log"
    realtime = RealtimeConfig(max_edges=1000, log=log_path)
    config = make_config(tmp_path, small_graph, realtime=realtime).replace(graph=repository)
    query = busy_pins(small_graph, 1)
    with running(config) as (server, client):
        client.add_edges([_saves_onto_boards_of(small_graph, query[0])])
        folded = server.serving.served.delta.edges
        compact = subprocess.run(
            [sys.executable, "-m", "walkrank.cli", "graph", "compact", str(repository)]
            + ["--log", str(log_path)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert compact.returncode == 0, compact.stderr
        assert "into version 2" in compact.stdout
        client.add_edges([[("555", "1000000000")]])  # after the compaction: stays in the delta
        changes = client.reload().changes
        assert [c.detail for c in changes if c.kind == "graph"] == ["now 2 (was 1)"]
        info = client.graph_info()
        assert info.version == "2"
        assert server.serving.served.base.n_edges == small_graph.n_edges + folded
        assert server.serving.served.delta.edges == 1  # 555's edge only
        assert info.n_pins == small_graph.n_pins + 2
        assert NEW_PIN in _ids(client.recommend("homefeed", query, seed=1))[:10]
    # The log was rotated: it holds only what the new version lacks, and replays onto it.
    with running(config) as (server, client):
        assert server.serving.served.delta.replay.records == 1
        assert server.serving.served.delta.edges == 1
        assert NEW_PIN in _ids(client.recommend("homefeed", query, seed=1))[:10]


def test_the_realtime_section_of_walkrank_yaml(tmp_path: Path) -> None:
    base = "graph: g\ntenants_dir: t\nmodels_dir: m\nlogs_dir: l\n"
    path = tmp_path / "walkrank.yaml"
    path.write_text(base + "realtime:\n  max_edges: 500\n  log: rt/edges.log\n")
    realtime = load_server_config(path).realtime
    assert realtime == RealtimeConfig(max_edges=500, log=tmp_path / "rt" / "edges.log")
    path.write_text(base)
    assert load_server_config(path).realtime is None
    for section, expected in (
        ("realtime:\n  max_edges: 0\n", "realtime.max_edges: must be in [1, 2**31 - 1], got 0"),
        ("realtime:\n  max_edges: 1.5\n", "realtime.max_edges: expected an integer, got 1.5"),
        ("realtime:\n  flush_ms: 5\n", "realtime.flush_ms: must be in [10, 1000], got 5"),
        ("realtime:\n  logs: x\n", "realtime: expected {max_edges: int, log: path"),
        ("realtime:\n  log: 3\n", "realtime.log: expected a path, got 3"),
    ):
        path.write_text(base + section)
        with pytest.raises(ConfigError) as info:
            load_server_config(path)
        assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)


def test_one_server_per_append_log(tmp_path: Path, small_graph: GraphStore) -> None:
    path = tmp_path / "edges.log"
    first = DeltaSegment(small_graph, max_edges=10, log_path=path)
    try:
        with pytest.raises(DataError, match="another server process holds this real-time"):
            DeltaSegment(small_graph, max_edges=10, log_path=path)
    finally:
        first.close()
    DeltaSegment(small_graph, max_edges=10, log_path=path).close()  # free again


def test_edges_added_while_requests_run_fail_no_call(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph, realtime=RealtimeConfig(max_edges=100_000))
    query = busy_pins(small_graph, 3)
    boards = [str(b) for b in small_graph.board_ids[:50]]
    with running(config) as (server, client):

        def recommend(seed: int) -> int:
            return len(client.recommend("homefeed", query, seed=seed).candidates)

        with ThreadPoolExecutor(4) as pool:
            answers = pool.map(recommend, range(40))
            for n in range(20):  # new pins on existing boards, one batch per call
                client.add_edges([[(str(5000 + n * 50 + i), b) for i, b in enumerate(boards)]])
            assert all(size > 0 for size in answers)
        assert server.serving.served.delta.edges == 1000
        assert client.graph_info().n_pins == small_graph.n_pins + 1000


@pytest.mark.parametrize("option", [["--processes", "2"], ["--replicas", "2"]])
def test_serve_refuses_real_time_edges_in_several_processes(
    tmp_path: Path, small_graph: GraphStore, option: list[str]
) -> None:
    config = tmp_path / "walkrank.yaml"
    config.write_text(
        f"graph: {small_graph.path}\ntenants_dir: t\nmodels_dir: m\nlogs_dir: l\n"
        "address: 127.0.0.1:50999\nrealtime:\n  max_edges: 10\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "walkrank.cli", "serve", "--config", str(config), *option],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 2
    assert "real-time edges need one server process" in done.stderr


ID_TEXT = st.one_of(
    st.text(max_size=140),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["", "0", "-0", "01", " 1", "1e3", "١", "1\0", "x" * 129]),
)
EDGE = st.tuples(
    ID_TEXT,
    ID_TEXT,
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)


def test_fuzzed_add_edges_get_a_clear_status_and_never_an_internal_error(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph, realtime=RealtimeConfig(max_edges=2000))
    allowed = {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    seen: Counter[grpc.StatusCode] = Counter()
    with running(config) as (server, client):

        @settings(max_examples=300, derandomize=True, deadline=None, database=None)
        @given(st.lists(st.lists(EDGE, max_size=6), min_size=1, max_size=3))
        def call(batches: list[list[tuple[str, str, float | None]]]) -> None:
            edges = [[(p, b) if t is None else (p, b, t) for p, b, t in batch] for batch in batches]
            try:
                client.add_edges(edges)
                seen[grpc.StatusCode.OK] += 1
            except WalkRankClientError as exc:
                assert exc.code in allowed, (exc.code, exc.details)
                assert "\n" not in exc.details and len(exc.details) < 1024
                seen[exc.code] += 1

        call()
        assert client.recommend("homefeed", busy_pins(small_graph, 1)).candidates
        assert server.serving.served.delta.edges <= 2000
    assert seen[grpc.StatusCode.OK] and seen[grpc.StatusCode.INVALID_ARGUMENT]


def test_a_graph_of_text_ids_takes_new_text_ids(tmp_path: Path) -> None:
    edges = pa.table(
        {
            "pin_id": [f"p{i}" for i in range(40)],
            "board_id": [f"b{i % 4}" for i in range(40)],
        }
    )
    build_graph(tmp_path / "text", edges)
    graph = GraphStore.load(tmp_path / "text")
    delta = DeltaSegment(graph, max_edges=10, flush_s=1.0)
    try:
        added = delta.add([Edge("fresh pin", "b0"), Edge("p1", "new board"), Edge("p1", "b1")])
        assert (added.added, added.duplicates, added.new_pins, added.new_boards) == (2, 1, 1, 1)
        delta.publish()
        live = delta.view()
        dense = live.pin_index(["fresh pin", "p1", "nope"])
        assert dense.tolist() == [graph.n_pins, int(graph.pin_index(["p1"])[0]), -1]
        assert live.pin_external(dense[:2]).tolist() == ["fresh pin", "p1"]
        assert live.board_external([graph.n_boards]).tolist() == ["new board"]
        result = walk(live, dense[:1], np.ones(1), WalkParams(steps=2000), seed=1)
        assert {f"p{i}" for i in range(0, 40, 4)} <= set(live.pin_external(result.pins).tolist())
    finally:
        delta.close()


def test_a_retried_add_edges_sends_every_batch_again() -> None:
    """The client retries an AddEdges that failed UNAVAILABLE part-way with all its batches,
    not what the first attempt left of one shared iterator (a real gRPC server that drops the
    first attempt after one batch)."""
    received: list[int] = []

    class FlakyAdmin(admin_pb2_grpc.AdminServicer):
        def AddEdges(
            self, request_iterator: Iterator[admin_pb2.AddEdgesRequest], context: Any
        ) -> admin_pb2.AddEdgesResponse:
            batches = [len(next(request_iterator).edges)]
            if not received:
                received.append(0)
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            batches += [len(request.edges) for request in request_iterator]
            received.append(len(batches))
            return admin_pb2.AddEdgesResponse(added=sum(batches))

    server = grpc.server(ThreadPoolExecutor(2))
    admin_pb2_grpc.add_AdminServicer_to_server(FlakyAdmin(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        batches = [[("p1", "b1")], [("p2", "b1"), ("p3", "b2")], [("p4", "b3")]]
        with WalkRankClient(f"127.0.0.1:{port}", timeout=10.0, backoff=0.0) as client:
            response = client.add_edges(batches)
        assert received == [0, 3]  # the retry sent all three batches
        assert response.added == 4
    finally:
        server.stop(None)
