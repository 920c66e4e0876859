"""The load-test tooling against a real server on the small graph: the built-in generator's
summary, ghz config parsing (proto and reflection alike), an induced overload, and the shipped
configs meaning the same files to ghz as to the built-in generator."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from test_server import make_config

from loadgen.generator import _Requests, run_load
from loadgen.ghz_config import DURATION_STOPS, load_ghz_config
from loadgen.harness import graph_directory, stop_process
from loadgen.method import from_proto, from_reflection
from loadgen.report import from_ghz_json, summarize, write_report
from loadgen.traffic import draw_requests, read_pipeline_inputs, write_requests
from walkrank.errors import ConfigError
from walkrank.graph.store import GraphStore
from walkrank.serving.server import WalkRankServer
from walkrank_client.pb.walkrank.v1 import recommender_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos" / "walkrank" / "v1" / "recommender.proto"
RECOMMEND = "walkrank.v1.Recommender.Recommend"


@pytest.fixture(scope="module")
def server(small_graph: GraphStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shipped tenants plus `tight`: home feed with a quota of one request in flight."""
    config = make_config(tmp_path_factory.mktemp("load_server"), small_graph)
    tight = yaml.safe_load((ROOT / "tenants" / "homefeed.yaml").read_text())
    tight["name"] = "tight"
    tight["limits"]["max_in_flight"] = 1
    # Long walks (no early stop) keep each call busy, so eight concurrent calls overlap.
    tight["walk"]["early_stopping"] = None
    (config.tenants_dir / "tight.yaml").write_text(yaml.safe_dump(tight))
    walkrank = WalkRankServer(config)
    port = walkrank.start()
    yield f"127.0.0.1:{port}"
    walkrank.stop(grace=1.0)


def write_config(path: Path, messages: list[dict], **settings: object) -> Path:
    data = path.parent / f"{path.stem}-data.json"
    data.write_text(json.dumps(messages))
    path.write_text(
        json.dumps(
            {
                "proto": str(PROTO),
                "import-paths": [str(ROOT / "protos")],
                "call": RECOMMEND,
                "insecure": True,
                "data-file": str(data),
                **settings,
            }
        )
    )
    return path


def test_builtin_generator_counts_every_call(
    small_graph: GraphStore, server: str, tmp_path: Path
) -> None:
    messages = draw_requests(small_graph, "homefeed", 7, seed=3)
    config = load_ghz_config(
        write_config(tmp_path / "homefeed.json", messages, total=45, concurrency=4)
    )
    [result] = run_load([config], server, processes=0)
    summary = result.summary
    assert summary.count == 45 and summary.messages_received == 45
    assert summary.status_codes == {"OK": 45} and summary.errors == {}
    assert 0 < summary.p50_ms <= summary.p90_ms <= summary.p99_ms <= summary.slowest_ms
    assert summary.rps > 0


def test_batch_calls_stream_one_response_per_user(
    small_graph: GraphStore, server: str, tmp_path: Path
) -> None:
    batches = draw_requests(small_graph, "email", 2, seed=4, batch_users=5)
    config = load_ghz_config(
        write_config(
            tmp_path / "email.json",
            batches,
            call="walkrank.v1.Recommender/RecommendBatch",
            total=4,
            concurrency=2,
        )
    )
    [result] = run_load([config], server, processes=0)
    assert result.summary.status_codes == {"OK": 4}
    assert result.summary.messages_received == 4 * 5


def test_ghz_config_is_parsed_into_the_same_requests(
    small_graph: GraphStore, server: str, tmp_path: Path
) -> None:
    messages = draw_requests(small_graph, "homefeed", 3, seed=5)
    messages[1]["request_id"] = "load-{{.RequestNumber}}"
    path = write_config(
        tmp_path / "homefeed.json",
        messages,
        total=10,
        concurrency=2,
        timeout="1500ms",
        metadata={"x-run": "w{{.WorkerID}}"},
    )
    config = load_ghz_config(path)
    assert config.timeout_s == 1.5 and config.total == 10 and config.concurrency == 2
    expected = [
        recommender_pb2.RecommendRequest(
            tenant=m["tenant"],
            user=recommender_pb2.User(**m["user"]),
            query_pins=[recommender_pb2.QueryPin(**q) for q in m["query_pins"]],
        )
        for m in messages
    ]
    expected[1].request_id = "load-4"
    # Compiled from the .proto, or asked of the server's reflection: the same bytes either way.
    for spec in (from_proto(config), from_reflection(config, server)):
        assert spec.path == "/walkrank.v1.Recommender/Recommend" and not spec.server_streaming
        requests = _Requests(config, spec)
        for number in (0, 4, 8):  # round-robin over the data array, as ghz sends it
            payload, metadata = requests.get("7", number)
            assert payload == expected[number % 3].SerializeToString()
            assert metadata == (("x-run", "w7"),)


def test_written_requests_read_back_as_the_pipelines_inputs(
    small_graph: GraphStore, tmp_path: Path
) -> None:
    messages = draw_requests(small_graph, "homefeed", 4, seed=8)
    write_requests(tmp_path / "homefeed.json", messages)
    inputs = read_pipeline_inputs(tmp_path / "homefeed.json", "plain", "direct", calls=3)
    assert [i.request_id for i in inputs] == ["direct-0", "direct-1", "direct-2"]
    for read, m in zip(inputs, messages, strict=False):
        assert read.tenant == "plain"
        assert read.query_pins == tuple(q["pin_id"] for q in m["query_pins"])
        assert read.query_weights == tuple(q["weight"] for q in m["query_pins"])
        assert read.locale == m["user"]["locale"]
        assert read.interests == tuple(m["user"]["interests"])


def test_graph_argument_is_a_graph_directory_or_names_the_alternatives(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"run.py: --graph '.*' is neither a preset \(tiny\)"):
        graph_directory(str(tmp_path), "run.py", "a preset (tiny)")
    (tmp_path / "manifest.json").write_text("{}")
    assert graph_directory(str(tmp_path), "run.py", "a preset (tiny)") == tmp_path


def test_stop_process_terminates_and_kills_what_ignores_sigterm() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_process(polite, timeout_s=30)
    assert polite.returncode == -signal.SIGTERM
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    stop_process(stubborn, timeout_s=0.2)
    assert stubborn.returncode == -signal.SIGKILL
    stop_process(stubborn, timeout_s=0.2)  # already gone: nothing to do


def test_a_report_is_written_as_json_into_a_new_folder(tmp_path: Path) -> None:
    path = tmp_path / "results" / "run.json"
    write_report(path, {"rps": 12.5, "ok": True})
    assert json.loads(path.read_text()) == {"rps": 12.5, "ok": True}
    write_report(None, {"rps": 1.0})  # no --json: nothing written, no error


def test_ghz_config_errors_name_the_problem(tmp_path: Path) -> None:
    base = {"call": RECOMMEND, "data": {"tenant": "homefeed"}}
    cases = [
        ({"load-schedule": "step"}, "'load-schedule'"),
        ({"data": {"tenant": "{{randomString 8}}"}}, "randomString"),
        ({"duration": "ten seconds"}, "duration"),
        ({"total": 2, "concurrency": 4}, "total (2) must be >= concurrency (4)"),
        ({"call": "Recommend"}, "call"),
        ({"proto": "missing.proto"}, "proto: no such file"),
        ({"metadata-file": 3}, "metadata-file: expected a path string"),
        ({"metadata-file": "missing.json"}, "metadata-file: no such file"),
    ]
    for index, (change, message) in enumerate(cases):
        path = tmp_path / f"bad{index}.json"
        path.write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_ghz_config(path)
    bad_field = tmp_path / "bad-field.json"
    bad_field.write_text(
        json.dumps(
            {
                **base,
                "proto": str(PROTO),
                "import-paths": [str(ROOT / "protos")],
                "data": {"tenant": "homefeed", "pins": []},
            }
        )
    )
    config = load_ghz_config(bad_field)
    with pytest.raises(ConfigError, match="not a valid RecommendRequest"):
        _Requests(config, from_proto(config))


def test_overload_is_refused_with_resource_exhausted(
    small_graph: GraphStore, server: str, tmp_path: Path
) -> None:
    messages = draw_requests(small_graph, "homefeed", 8, seed=6)
    for message in messages:
        message["tenant"] = "tight"
    config = load_ghz_config(
        write_config(tmp_path / "tight.json", messages, total=64, concurrency=8, timeout="20s")
    )
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
    assert (
        summarize("x", "builtin", [float(v) for v in range(1, 11)], ["OK"] * 10, 1.0, {}).p50_ms
        == 5.0
    )  # a whole-number rank: the 5th of 10

    ms = 1_000_000  # ghz writes Go durations, in nanoseconds
    ghz = from_ghz_json(
        "x",
        {
            "count": 6,
            "total": 2_000 * ms,
            "average": round(115 / 6 * ms),
            "fastest": 1 * ms,
            "slowest": 5 * ms,
            "rps": 3.0,
            "errorDistribution": errors,
            "statusCodeDistribution": {"OK": 5, "ResourceExhausted": 1},
            "latencyDistribution": [
                {"percentage": p, "latency": v * ms}
                for p, v in ((10, 1), (25, 2), (50, 3), (75, 4), (90, 5), (95, 5), (99, 5))
            ],
        },
    )
    for name in (
        "count",
        "total_s",
        "rps",
        "fastest_ms",
        "slowest_ms",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "status_codes",
        "errors",
    ):
        assert getattr(ghz, name) == pytest.approx(getattr(builtin, name)), name

    # Every call refused: no latency to report, from either engine, and no crash.
    refused = summarize("y", "builtin", [1.0, 2.0], ["UNAVAILABLE"] * 2, 1.0, {})
    ghz_refused = from_ghz_json(
        "y",
        {
            "count": 2,
            "total": 1_000 * ms,
            "average": 1 * ms,
            "fastest": 0,
            "slowest": 0,
            "rps": 2.0,
            "statusCodeDistribution": {"Unavailable": 2},
            "latencyDistribution": None,
        },
    )
    for summary in (refused, ghz_refused):
        assert summary.status_codes == {"UNAVAILABLE": 2}
        assert all(math.isnan(v) for v in (summary.p50_ms, summary.p99_ms, summary.fastest_ms))


SHIPPED_CONFIGS = sorted(
    [*(ROOT / "load_tests").glob("*.json"), *(ROOT / "load_tests" / "mixed").glob("*.json")]
)
PATH_KEYS = ("proto", "data-file", "metadata-file")


def test_shipped_configs_resolve_from_the_repo_root_as_ghz_resolves_them() -> None:
    """ghz opens a config's relative paths against its working directory, not the file's:
    every shipped config names files that exist from the repo root (where the README runs
    them), and each duration run lets its last calls finish (ghz's default cuts them off)."""
    assert len(SHIPPED_CONFIGS) == 7
    for path in SHIPPED_CONFIGS:
        raw = json.loads(path.read_text())
        for key in PATH_KEYS:
            if key in raw:
                assert not Path(raw[key]).is_absolute() and (ROOT / raw[key]).is_file(), (path, key)
        assert all((ROOT / p).is_dir() for p in raw.get("import-paths", [])), path
        if "duration" in raw:
            assert raw.get("duration-stop") == "wait", path
        config = load_ghz_config(path, workdir=ROOT)
        assert config.workdir == ROOT and config.messages
        assert config.proto is None or config.proto == PROTO
    # From the config's own directory (what run.py used to do) the files are not there, and
    # the error says where relative paths resolve.
    with pytest.raises(ConfigError, match="relative paths resolve against the working directory"):
        load_ghz_config(ROOT / "load_tests" / "homefeed.json", workdir=ROOT / "load_tests")


def test_readme_ghz_commands_name_configs_that_load_from_the_repo_root() -> None:
    readme = (ROOT / "load_tests" / "README.md").read_text()
    commands = re.findall(r"^ghz --config (\S+)", readme, re.MULTILINE)
    assert commands, "load_tests/README.md shows no direct ghz command"
    for config in commands:
        assert load_ghz_config(ROOT / config, workdir=ROOT).source == ROOT / config


FAKE_GHZ = '''#!{python}
"""Stands in for ghz v0.121's file handling: every relative path (the config's proto and
data-file, --output) opens against the working directory."""
import json, sys

args, options = sys.argv[1:], {{}}
while args:
    flag = args.pop(0)
    if flag in ("--config", "--format", "--output"):
        options[flag] = args.pop(0)
config = json.load(open(options["--config"]))
for key in ("proto", "data-file"):
    if key in config:
        try:
            open(config[key]).close()
        except OSError:
            sys.exit(f"open {{config[key]}}: no such file or directory")
ms = 1_000_000
with open(options["--output"], "w") as out:
    json.dump({{"count": 3, "total": 1000 * ms, "average": ms, "fastest": ms, "slowest": ms,
               "rps": 3.0, "statusCodeDistribution": {{"OK": 3}},
               "latencyDistribution": [{{"percentage": p, "latency": ms}}
                                       for p in (10, 25, 50, 75, 90, 95, 99)]}}, out)
'''


def load_run_module():
    spec = importlib.util.spec_from_file_location("load_tests_run", ROOT / "load_tests" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_with_ghz_and_a_relative_out_directory(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run.py run CONFIG --out relative/dir` under ghz: ghz runs where the config's paths
    resolve and writes its report where run.py reads it, whatever directory the config is in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ghz = bin_dir / "ghz"
    ghz.write_text(FAKE_GHZ.format(python=sys.executable))
    ghz.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "data.json").write_text(json.dumps([{"tenant": "homefeed"}]))
    (work / "configs" / "homefeed.json").write_text(
        json.dumps(
            {
                "name": "homefeed",
                "proto": str(PROTO),
                "call": RECOMMEND,
                "total": 3,
                "concurrency": 1,
                "data-file": "configs/data.json",
            }
        )
    )
    monkeypatch.chdir(work)
    run = load_run_module()
    assert (
        run.main(
            [
                "run",
                "configs/homefeed.json",
                "--out",
                "results/rel",
                "--engine",
                "ghz",
                "--target",
                server,
            ]
        )
        == 0
    )
    summary = json.loads((work / "results" / "rel" / "homefeed.json").read_text())
    assert (work / "results" / "rel" / "ghz-homefeed.json").is_file()
    assert "OK" in json.dumps(summary) and not (work / "configs" / "results").exists()


class _HoldingPeer(grpc.GenericRpcHandler):
    """Holds every Recommend call `hold_s` (or until cancelled), then answers empty bytes: a
    call certainly in flight when a short duration ends."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        def hold(_request: bytes, context: grpc.ServicerContext) -> bytes:
            end = time.monotonic() + self.hold_s
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.005)
            return b""

        if details.method == "/walkrank.v1.Recommender/Recommend":
            return grpc.unary_unary_rpc_method_handler(hold)
        return None


def test_generator_honours_duration_stop(tmp_path: Path) -> None:
    """At the end of a `duration`, calls in flight are cut off and counted CANCELLED (close,
    ghz's default), awaited and counted as they end (wait), or cut off and left out (ignore)."""
    hold_s, duration_s = 1.0, 0.2
    peer = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[_HoldingPeer(hold_s)])
    port = peer.add_insecure_port("127.0.0.1:0")
    peer.start()
    try:
        results = {}
        for stop in DURATION_STOPS:
            path = write_config(
                tmp_path / f"{stop}.json",
                [{"tenant": "homefeed"}],
                duration=f"{duration_s}s",
                concurrency=2,
                timeout="10s",
                **{"duration-stop": stop.upper()},
            )
            config = load_ghz_config(path)
            assert config.duration_stop == stop
            [results[stop]] = run_load([config], f"127.0.0.1:{port}", processes=0)
    finally:
        peer.stop(0)
    close, wait, ignore = (results[s].summary for s in ("close", "wait", "ignore"))
    assert close.status_codes == {"CANCELLED": 2} and close.total_s < hold_s
    assert wait.status_codes == {"OK": 2} and wait.total_s >= hold_s
    assert ignore.count == 0 and ignore.total_s < hold_s
    bad = tmp_path / "bad-stop.json"
    bad.write_text(json.dumps({"call": RECOMMEND, "duration": "1s", "duration-stop": "later"}))
    with pytest.raises(ConfigError, match="duration-stop: expected one of close, wait, ignore"):
        load_ghz_config(bad)


def test_idle_aggressor_is_refused_where_the_platform_has_no_sched_idle(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--idle-aggressor` on a platform without SCHED_IDLE: one usage error before any
    server or load starts, not a failed child mid-measurement."""
    from loadgen import isolation

    monkeypatch.setattr(isolation, "IDLE_SCHEDULING", False)
    with pytest.raises(SystemExit) as exit_info:
        isolation.main(["--idle-aggressor"])
    assert exit_info.value.code == 2
    assert "--idle-aggressor needs SCHED_IDLE" in capsys.readouterr().err
