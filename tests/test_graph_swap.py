"""Graph versions swapped into a running server: a real server on loopback following a real
graph repository, swapped by real Admin.Reload calls (and the repository watcher)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from test_server import _wait_until, make_config, running

from loadgen.models import publish_random_model
from walkrank.graph.build import build_graph
from walkrank.graph.repository import GraphRepository
from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import SyntheticTables, generate_graph_tables
from walkrank.logs.candidates import read_candidates
from walkrank.serving.config import ServerConfig
from walkrank.serving.server import WalkRankServer
from walkrank.serving.servicers import GRAPH_VERSION_KEY
from walkrank_client.pb.walkrank.v1 import recommender_pb2, recommender_pb2_grpc


def tables(seed: int) -> SyntheticTables:
    return generate_graph_tables(
        n_pins=2_000, n_boards=400, n_edges=20_000, n_topics=6, n_locales=3, seed=seed
    )


def publish(repo: Path, data: SyntheticTables) -> int:
    return (
        GraphRepository(repo)
        .publish(lambda out: build_graph(out, data.edges, data.pins, data.boards))
        .version
    )


def query_pins(repo: Path, n: int) -> list[str]:
    """Busy pins of version 1 (the same ids exist in every version here)."""
    graph = GraphStore.load(repo / "1", verify=False)
    return [str(p) for p in graph.pin_external(np.argsort(-graph.pin_degree())[:n])]


@contextmanager
def stub(server: WalkRankServer) -> Iterator[recommender_pb2_grpc.RecommenderStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield recommender_pb2_grpc.RecommenderStub(channel)


def recommend(
    recommender: recommender_pb2_grpc.RecommenderStub,
    pins: list[str],
    seed: int = 5,
    request_id: str = "",
) -> tuple[list[str], str]:
    """(pin ids answered, graph version in the trailing metadata)."""
    answer, call = recommender.Recommend.with_call(
        recommender_pb2.RecommendRequest(
            tenant="homefeed",
            query_pins=[recommender_pb2.QueryPin(pin_id=p) for p in pins],
            seed=seed,
            user=recommender_pb2.User(locale="en"),
            request_id=request_id,
        ),
        timeout=20,
    )
    return [c.pin_id for c in answer.candidates], dict(call.trailing_metadata())[GRAPH_VERSION_KEY]


def publish_model(config: ServerConfig) -> None:
    publish_random_model(
        config.models_dir, config.tenants_dir / "homefeed.yaml", trees=8, depth=3, rows=2_000
    )


def mapped(path: Path) -> bool:
    """Whether this process maps any file under `path`."""
    return str(path) + "/" in Path("/proc/self/maps").read_text()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "graphs"
    publish(root, tables(11))
    return root


def test_reload_swaps_in_the_new_current_version_and_unmaps_the_old(
    tmp_path: Path, repo: Path
) -> None:
    config = make_config(tmp_path, GraphStore.load(repo / "1")).replace(graph=repo)
    gc.collect()
    with running(config) as (server, client), stub(server) as recommender:
        info = client.graph_info()
        assert (info.version, info.repository, info.path) == ("1", str(repo), str(repo / "1"))
        pins = query_pins(repo, 3)
        before, version = recommend(recommender, pins)
        assert version == "1"
        assert publish(repo, tables(12)) == 2
        response = client.reload()
        assert [(c.tenant, c.kind, c.detail) for c in response.changes] == [
            ("", "graph", "now 2 (was 1)")
        ]
        assert not response.errors
        info = client.graph_info()
        assert (info.version, info.path, info.n_edges) == ("2", str(repo / "2"), 20_000)
        after, version = recommend(recommender, pins)
        assert version == "2" and after != before
        # Nobody reads version 1 any more: its files are unmapped and the lease is gone.
        gc.collect()
        assert not mapped(repo / "1") and mapped(repo / "2")
        assert [(v.version, v.held) for v in GraphRepository(repo).versions()] == [
            (1, False),
            (2, True),
        ]
        assert not client.reload().changes  # nothing moved: nothing to report
        metrics = server.metrics.registry
        assert metrics.get_sample_value("walkrank_graph_version") == 2.0


def test_a_call_in_flight_finishes_on_the_graph_it_started_with(tmp_path: Path, repo: Path) -> None:
    config = make_config(tmp_path, GraphStore.load(repo / "1")).replace(graph=repo)
    homefeed = config.tenants_dir / "homefeed.yaml"  # no candidate log: 1.5M rows per batch
    homefeed.write_text(homefeed.read_text().replace("sample_rate: 1.0", "sample_rate: 0.0"))
    pins = query_pins(repo, 40)
    # Enough users and candidates that the stream outruns HTTP/2 flow control: the server is
    # still answering when the swap happens.
    request = recommender_pb2.RecommendBatchRequest(
        tenant="homefeed",
        num_results=1000,
        seed=3,
        users=[
            recommender_pb2.BatchUser(
                request_id=f"u{i}", query_pins=[recommender_pb2.QueryPin(pin_id=pins[i % 40])]
            )
            for i in range(1500)
        ],
    )
    with running(config) as (server, client), stub(server) as recommender:
        on_v1 = [[c.pin_id for c in r.candidates] for r in recommender.RecommendBatch(request)]
        stream = recommender.RecommendBatch(request, timeout=120)
        first = [c.pin_id for c in next(stream).candidates]
        publish(repo, tables(12))
        assert client.reload().changes[0].detail == "now 2 (was 1)"
        gc.collect()
        assert GraphRepository(repo).versions()[0].held  # the open call still reads it
        rest = [[c.pin_id for c in r.candidates] for r in stream]
        assert [first, *rest] == on_v1
        assert dict(stream.trailing_metadata())[GRAPH_VERSION_KEY] == "1"
        gc.collect()
        assert not GraphRepository(repo).versions()[0].held and not mapped(repo / "1")
        on_v2 = recommender.RecommendBatch(request)
        assert [[c.pin_id for c in r.candidates] for r in on_v2] != on_v1
        assert dict(on_v2.trailing_metadata())[GRAPH_VERSION_KEY] == "2"


def test_a_version_that_fails_to_load_is_reported_and_the_old_keeps_serving(
    tmp_path: Path, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, GraphStore.load(repo / "1")).replace(graph=repo)
    with running(config) as (server, client), stub(server) as recommender:
        publish(repo, tables(12))
        corrupt = repo / "2" / "board_adj.npy"
        corrupt.chmod(0o644)
        with open(corrupt, "r+b") as f:
            f.seek(300)
            f.write(b"\x01\x02\x03\x04")
        response = client.reload()
        assert not response.changes
        [error] = response.errors
        assert error.path == str(repo)
        assert "board_adj.npy: checksum mismatch" in error.message
        assert "graph 1 keeps serving" in caplog.text
        assert client.graph_info().version == "1"
        assert recommend(recommender, query_pins(repo, 2))[1] == "1"
        metrics = server.metrics.registry
        assert metrics.get_sample_value("walkrank_graph_load_error") == 1.0
        GraphRepository(repo).rollback(1)
        assert not client.reload().errors
        assert metrics.get_sample_value("walkrank_graph_load_error") == 0.0
        publish(repo, tables(13))
        assert client.reload().changes[0].detail == "now 3 (was 1)"


def test_swap_refused_when_a_tenant_model_needs_graph_data_the_new_version_lacks(
    tmp_path: Path, repo: Path
) -> None:
    config = make_config(tmp_path, GraphStore.load(repo / "1")).replace(graph=repo)
    publish_model(config)
    data = tables(12)
    without_locales = SyntheticTables(
        edges=data.edges,
        pins=data.pins.drop_columns(["locale"]),
        boards=data.boards.drop_columns(["locale"]),
    )
    with running(config) as (server, client):
        publish(repo, without_locales)
        [error] = client.reload().errors
        assert (
            "tenant 'homefeed' (model v1) uses pin_locale_missing, user_locale_missing, "
            "query_locale_share, locale_match, which need locales: graph 1 has them, "
            "graph 2 does not"
        ) in error.message
        assert "email" not in error.message  # tenants without a model read no model inputs
        assert client.graph_info().version == "1"
        publish(repo, data)  # the same graph with its locales swaps in
        assert client.reload().changes[0].detail == "now 3 (was 1)"


def test_categories_are_matched_by_name_on_whichever_graph_answers(
    tmp_path: Path, repo: Path
) -> None:
    """Version 2 adds a locale that sorts first, so every other locale's code moves by one: the
    model's locale features still compare names (logged features match the pins' names)."""
    config = make_config(tmp_path, GraphStore.load(repo / "1")).replace(graph=repo)
    publish_model(config)
    data = tables(11)
    locale = data.pins.column("locale").cast(pa.string()).to_numpy(zero_copy_only=False).copy()
    locale[:50] = "aa"
    shifted = SyntheticTables(
        edges=data.edges,
        boards=data.boards,
        pins=data.pins.set_column(1, "locale", pa.array(locale)),
    )
    pins = query_pins(repo, 3)
    with running(config) as (server, client), stub(server) as recommender:
        assert recommend(recommender, pins, request_id="on-1")[1] == "1"
        publish(repo, shifted)
        assert client.reload().changes[0].detail == "now 2 (was 1)"
        assert recommend(recommender, pins, request_id="on-2")[1] == "2"
    logged = read_candidates(config.logs_dir, "homefeed")
    for version in ("1", "2"):
        graph = GraphStore.load(repo / version)
        assert graph.locales == (("aa", "de", "en", "ja") if version == "2" else ("de", "en", "ja"))
        rows = logged.filter(pc.equal(logged["request_id"], f"on-{version}"))
        assert rows.num_rows > 0 and set(rows["model_version"].to_pylist()) == {"v1"}
        dense = graph.pin_index(rows["pin_id"].to_numpy(zero_copy_only=False).astype(np.int64))
        names = np.array([*graph.locales, ""])[graph.pin_locale[dense]]
        assert np.array_equal(rows["f_locale_match"].to_numpy() == 1.0, names == "en")


def test_the_watcher_follows_current_without_a_reload(tmp_path: Path, repo: Path) -> None:
    config = make_config(tmp_path, GraphStore.load(repo / "1")).replace(
        graph=repo, graph_watch_seconds=0.02
    )
    with running(config) as (server, client):
        metrics = server.metrics.registry
        publish(repo, tables(12))
        _wait_until(lambda: client.graph_info().version == "2", "the watcher swapped in 2")
        (repo / "CURRENT").write_text("9\n")  # a version that does not exist
        _wait_until(
            lambda: metrics.get_sample_value("walkrank_graph_load_error") == 1.0,
            "the watcher reported the bad pointer",
        )
        assert client.graph_info().version == "2"
        GraphRepository(repo).rollback(1)
        _wait_until(lambda: client.graph_info().version == "1", "the watcher swapped in 1")
        assert metrics.get_sample_value("walkrank_graph_load_error") == 0.0


def test_swaps_under_load_fail_no_call(tmp_path: Path, repo: Path) -> None:
    config = make_config(tmp_path, GraphStore.load(repo / "1")).replace(graph=repo)
    publish(repo, tables(12))
    GraphRepository(repo).rollback(1)
    pins = query_pins(repo, 20)
    failures: list[str] = []
    versions: set[str] = set()
    stop = threading.Event()
    with running(config) as (server, client):

        def hammer(offset: int) -> None:
            with stub(server) as recommender:
                i = offset
                while not stop.is_set():
                    try:
                        versions.add(recommend(recommender, pins[i % 20 : i % 20 + 3], seed=i)[1])
                    except grpc.RpcError as exc:
                        failures.append(f"{exc.code()}: {exc.details()}")
                    i += 1

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        try:
            for swap in range(8):
                GraphRepository(repo).rollback(2 - swap % 2)
                response = client.reload()
                assert not response.errors and response.changes[0].kind == "graph"
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert failures == []
    assert versions == {"1", "2"}


def test_graph_settings_are_checked(tmp_path: Path) -> None:
    from walkrank.errors import ConfigError
    from walkrank.features import FEATURES, GRAPH_INPUTS
    from walkrank.serving.config import load_server_config

    assert all(name in FEATURES for names in GRAPH_INPUTS.values() for name in names)
    path = tmp_path / "walkrank.yaml"
    path.write_text(
        "graph: graphs\ntenants_dir: t\nmodels_dir: m\nlogs_dir: l\ngraph_watch_seconds: 0\n"
    )
    with pytest.raises(ConfigError, match="graph_watch_seconds: must be > 0"):
        load_server_config(path)
    path.write_text(path.read_text().replace("graph_watch_seconds: 0", "graph_watch_seconds: 5"))
    assert load_server_config(path).graph_watch_seconds == 5
