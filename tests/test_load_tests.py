"""The load-test tooling against a real server on the small graph: the built-in generator's
summary, ghz config parsing (proto and reflection alike), and an induced overload."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from walkrank.errors import ConfigError
from walkrank.graph.store import GraphStore
from walkrank.serving.config import ServerConfig
from walkrank.serving.server import WalkRankServer
from walkrank_client.pb.walkrank.v1 import recommender_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "load_tests"))

from loadgen.generator import _Requests, run_load  # noqa: E402
from loadgen.ghz_config import load_ghz_config  # noqa: E402
from loadgen.method import from_proto, from_reflection  # noqa: E402
from loadgen.report import from_ghz_json, summarize  # noqa: E402
from loadgen.traffic import draw_requests  # noqa: E402

PROTO = ROOT / "protos" / "walkrank" / "v1" / "recommender.proto"
RECOMMEND = "walkrank.v1.Recommender.Recommend"


@pytest.fixture(scope="module")
def server(small_graph: GraphStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shipped tenants plus `tight`: home feed with a quota of one request in flight."""
    root = tmp_path_factory.mktemp("load_server")
    tenants = root / "tenants"
    shutil.copytree(ROOT / "tenants", tenants)
    tight = yaml.safe_load((ROOT / "tenants" / "homefeed.yaml").read_text())
    tight["name"] = "tight"
    tight["limits"]["max_in_flight"] = 1
    # Long walks (no early stop) keep each call busy, so eight concurrent calls overlap.
    tight["walk"]["early_stopping"] = None
    (tenants / "tight.yaml").write_text(yaml.safe_dump(tight))
    config = ServerConfig(graph=small_graph.path, tenants_dir=tenants, models_dir=root / "models",
                          logs_dir=root / "logs", address="127.0.0.1:0", workers=8)
    walkrank = WalkRankServer(config)
    port = walkrank.start()
    yield f"127.0.0.1:{port}"
    walkrank.stop(grace=1.0)


def write_config(path: Path, messages: list[dict], **settings: object) -> Path:
    data = path.parent / f"{path.stem}-data.json"
    data.write_text(json.dumps(messages))
    path.write_text(json.dumps({"proto": str(PROTO), "import-paths": [str(ROOT / "protos")],
                                "call": RECOMMEND, "insecure": True, "data-file": data.name,
                                **settings}))
    return path


def test_builtin_generator_counts_every_call(small_graph: GraphStore, server: str,
                                             tmp_path: Path) -> None:
    messages = draw_requests(small_graph, "homefeed", 7, seed=3)
    config = load_ghz_config(write_config(tmp_path / "homefeed.json", messages, total=45,
                                          concurrency=4))
    [result] = run_load([config], server, processes=0)
    summary = result.summary
    assert summary.count == 45 and summary.messages_received == 45
    assert summary.status_codes == {"OK": 45} and summary.errors == {}
    assert 0 < summary.p50_ms <= summary.p90_ms <= summary.p99_ms <= summary.slowest_ms
    assert summary.rps > 0


def test_batch_calls_stream_one_response_per_user(small_graph: GraphStore, server: str,
                                                  tmp_path: Path) -> None:
    batches = draw_requests(small_graph, "email", 2, seed=4, batch_users=5)
    config = load_ghz_config(write_config(
        tmp_path / "email.json", batches, call="walkrank.v1.Recommender/RecommendBatch",
        total=4, concurrency=2))
    [result] = run_load([config], server, processes=0)
    assert result.summary.status_codes == {"OK": 4}
    assert result.summary.messages_received == 4 * 5


def test_ghz_config_is_parsed_into_the_same_requests(small_graph: GraphStore, server: str,
                                                     tmp_path: Path) -> None:
    messages = draw_requests(small_graph, "homefeed", 3, seed=5)
    messages[1]["request_id"] = "load-{{.RequestNumber}}"
    path = write_config(tmp_path / "homefeed.json", messages, total=10, concurrency=2,
                        timeout="1500ms", metadata={"x-run": "w{{.WorkerID}}"})
    config = load_ghz_config(path)
    assert config.timeout_s == 1.5 and config.total == 10 and config.concurrency == 2
    expected = [recommender_pb2.RecommendRequest(
        tenant=m["tenant"], user=recommender_pb2.User(**m["user"]),
        query_pins=[recommender_pb2.QueryPin(**q) for q in m["query_pins"]])
        for m in messages]
    expected[1].request_id = "load-4"
    # Compiled from the .proto, or asked of the server's reflection: the same bytes either way.
    for spec in (from_proto(config), from_reflection(config, server)):
        assert spec.path == "/walkrank.v1.Recommender/Recommend" and not spec.server_streaming
        requests = _Requests(config, spec)
        for number in (0, 4, 8):  # round-robin over the data array, as ghz sends it
            payload, metadata = requests.get("7", number)
            assert payload == expected[number % 3].SerializeToString()
            assert metadata == (("x-run", "w7"),)


def test_ghz_config_errors_name_the_problem(tmp_path: Path) -> None:
    base = {"call": RECOMMEND, "data": {"tenant": "homefeed"}}
    cases = [({"load-schedule": "step"}, "'load-schedule'"),
             ({"data": {"tenant": "{{randomString 8}}"}}, "randomString"),
             ({"duration": "ten seconds"}, "duration"),
             ({"total": 2, "concurrency": 4}, "total (2) must be >= concurrency (4)"),
             ({"call": "Recommend"}, "call")]
    for index, (change, message) in enumerate(cases):
        path = tmp_path / f"bad{index}.json"
        path.write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_ghz_config(path)
    bad_field = tmp_path / "bad-field.json"
    bad_field.write_text(json.dumps({**base, "proto": str(PROTO),
                                     "import-paths": [str(ROOT / "protos")],
                                     "data": {"tenant": "homefeed", "pins": []}}))
    config = load_ghz_config(bad_field)
    with pytest.raises(ConfigError, match="not a valid RecommendRequest"):
        _Requests(config, from_proto(config))


def test_overload_is_refused_with_resource_exhausted(small_graph: GraphStore, server: str,
                                                      tmp_path: Path) -> None:
    messages = draw_requests(small_graph, "homefeed", 8, seed=6)
    for message in messages:
        message["tenant"] = "tight"
    config = load_ghz_config(write_config(tmp_path / "tight.json", messages, total=64,
                                          concurrency=8, timeout="20s"))
    [result] = run_load([config], server, processes=0)
    codes = result.summary.status_codes
    assert result.summary.count == 64
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["RESOURCE_EXHAUSTED"] > 0 and codes["OK"] > 0


def test_both_engines_summarize_as_ghz_does() -> None:
    """Average over every call; fastest, slowest and nearest-rank percentiles over the OK
    calls only (ghz's runner/reporter.go), whether computed here or read from ghz's JSON."""
    latencies = [5.0, 1.0, 3.0, 2.0, 100.0, 4.0]
    codes = ["OK", "OK", "OK", "OK", "RESOURCE_EXHAUSTED", "OK"]
    errors = {"rpc error: code = ResourceExhausted desc = quota": 1}
    builtin = summarize("x", "builtin", latencies, codes, total_s=2.0, errors=errors)
    assert (builtin.count, builtin.rps, builtin.average_ms) == (6, 3.0, 115 / 6)
    # OK calls sorted: 1 2 3 4 5; p50 is rank ceil(2.5) = 3, p90 rank ceil(4.5) = 5.
    assert (builtin.fastest_ms, builtin.slowest_ms) == (1.0, 5.0)
    assert (builtin.p50_ms, builtin.p90_ms, builtin.p99_ms) == (3.0, 5.0, 5.0)
    assert summarize("x", "builtin", [float(v) for v in range(1, 11)], ["OK"] * 10, 1.0,
                     {}).p50_ms == 5.0  # a whole-number rank: the 5th of 10

    ms = 1_000_000  # ghz writes Go durations, in nanoseconds
    ghz = from_ghz_json("x", {
        "count": 6, "total": 2_000 * ms, "average": round(115 / 6 * ms), "fastest": 1 * ms,
        "slowest": 5 * ms, "rps": 3.0, "errorDistribution": errors,
        "statusCodeDistribution": {"OK": 5, "ResourceExhausted": 1},
        "latencyDistribution": [{"percentage": p, "latency": v * ms} for p, v in (
            (10, 1), (25, 2), (50, 3), (75, 4), (90, 5), (95, 5), (99, 5))]})
    for name in ("count", "total_s", "rps", "fastest_ms", "slowest_ms", "p50_ms", "p90_ms",
                 "p99_ms", "status_codes", "errors"):
        assert getattr(ghz, name) == pytest.approx(getattr(builtin, name)), name

    # Every call refused: no latency to report, from either engine, and no crash.
    refused = summarize("y", "builtin", [1.0, 2.0], ["UNAVAILABLE"] * 2, 1.0, {})
    ghz_refused = from_ghz_json("y", {
        "count": 2, "total": 1_000 * ms, "average": 1 * ms, "fastest": 0, "slowest": 0,
        "rps": 2.0, "statusCodeDistribution": {"Unavailable": 2}, "latencyDistribution": None})
    for summary in (refused, ghz_refused):
        assert summary.status_codes == {"UNAVAILABLE": 2}
        assert all(math.isnan(v) for v in (summary.p50_ms, summary.p99_ms, summary.fastest_ms))
