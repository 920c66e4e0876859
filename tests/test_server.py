"""End to end through a real server on a loopback port: tenants, errors, quotas, reloads."""

from __future__ import annotations

import functools
import math
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import read_candidates
from walkrank.model_registry import ModelRegistry
from walkrank.ranking.export import export_model
from walkrank.ranking.fit import train_model
from walkrank.serving.config import ServerConfig, resolve_auth
from walkrank.serving.errors import DeadlineExceeded
from walkrank.serving.pipeline import RecommendInput, recommend
from walkrank.serving.server import WalkRankServer
from walkrank.tenants import load_tenant
from walkrank_client import WalkRankClient, WalkRankClientError

REPO = Path(__file__).resolve().parents[1]


def publish_model(models_dir: Path, tenants_dir: Path, tenant: str, seed: int = 0) -> int:
    """Train a small real model on the tenant's features and publish it through the gate."""
    config = load_tenant(tenants_dir / f"{tenant}.yaml")
    rng = np.random.default_rng(seed)
    x = rng.random((600, len(config.features)), dtype=np.float32)
    y = (x[:, 0] + 0.3 * rng.random(600) > 0.6).astype(np.float32)
    groups = np.repeat(np.arange(60), 10)
    objective = config.ranker.objective
    trained = train_model(
        x,
        y,
        objective=objective,
        groups=groups,
        params={"n_estimators": 8, "max_depth": 3},
        seed=seed,
    )
    exported = export_model(
        trained.booster,
        list(config.features),
        converter=config.ranker.converter,
        objective=objective,
        sample=x,
    )
    return ModelRegistry(models_dir).publish(tenant, exported.onnx_bytes, exported.metadata).version


def make_config(root: Path, graph: GraphStore, **changes: object) -> ServerConfig:
    tenants = root / "tenants"
    if not tenants.exists():
        shutil.copytree(REPO / "tenants", tenants)
    config = ServerConfig(
        graph=graph.path,
        tenants_dir=tenants,
        models_dir=root / "models",
        logs_dir=root / "logs",
        address="127.0.0.1:0",
        workers=8,
        grace_seconds=5.0,
    )
    return config.replace(**changes)


@contextmanager
def running(config: ServerConfig) -> Iterator[tuple[WalkRankServer, WalkRankClient]]:
    """A started server and a client of it; the server stops (gracefully) on exit."""
    server = WalkRankServer(config)
    port = server.start()
    host = config.address.rpartition(":")[0]
    try:
        with WalkRankClient(f"{host}:{port}", timeout=20.0) as client:
            yield server, client
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore
) -> Iterator[tuple[WalkRankServer, WalkRankClient]]:
    """One server shared by the module's tests that only read: answers, errors, the API."""
    with running(make_config(tmp_path_factory.mktemp("served"), small_graph)) as pair:
        yield pair


@pytest.fixture()
def fresh(
    tmp_path: Path, small_graph: GraphStore
) -> Iterator[tuple[WalkRankServer, WalkRankClient]]:
    """A server of the test's own, for tests that count what it did (exact counts) or hold
    its quotas and compute threads."""
    with running(make_config(tmp_path, small_graph)) as pair:
        yield pair


def pins(graph: GraphStore, *dense: int) -> list[str]:
    return [str(p) for p in graph.pin_external(list(dense)).tolist()]


def busy_pins(graph: GraphStore, n: int) -> list[str]:
    degree = np.diff(np.asarray(graph.pin_offsets))
    return pins(graph, *np.argsort(-degree)[:n].tolist())


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(WalkRankClientError) as info:
        call()  # type: ignore[operator]
    return info.value.code


def test_three_tenants_in_one_process_answer_differently(served) -> None:
    server, client = served
    query = busy_pins(server.graph, 1)
    answers = {
        t: client.recommend(t, query, locale="en", seed=3)
        for t in ("homefeed", "related_pins", "email")
    }
    sizes = {t: len(a.candidates) for t, a in answers.items()}
    assert sizes["homefeed"] > sizes["related_pins"] > sizes["email"] > 0
    tops = {t: tuple(c.pin_id for c in a.candidates[:20]) for t, a in answers.items()}
    assert len(set(tops.values())) == 3
    for answer in answers.values():
        assert answer.model_version == "visit_count"
        assert query[0] not in {c.pin_id for c in answer.candidates}
        assert [c.rank for c in answer.candidates] == list(range(1, len(answer.candidates) + 1))
        scores = [c.score for c in answer.candidates]
        assert scores == sorted(scores, reverse=True)
        assert answer.timing.total_ms >= answer.timing.walk_ms > 0


def test_same_seed_same_answer_and_excluded_pins_never_return(served) -> None:
    server, client = served
    query = busy_pins(server.graph, 2)
    first = client.recommend("homefeed", query, seed=11)
    again = client.recommend("homefeed", query, seed=11)
    assert [c.pin_id for c in first.candidates] == [c.pin_id for c in again.candidates]
    banned = [c.pin_id for c in first.candidates[:10]]
    filtered = client.recommend("homefeed", query, seed=11, exclude=banned)
    assert not set(banned) & {c.pin_id for c in filtered.candidates}


def test_unknown_query_pins_are_reported_not_fatal(served) -> None:
    server, client = served
    query = busy_pins(server.graph, 1)
    answer = client.recommend("homefeed", [*query, "no-such-pin"])
    assert list(answer.unknown_query_pins) == ["no-such-pin"]
    assert answer.candidates
    nothing = client.recommend("homefeed", ["no-such-pin", "nor-this"])
    assert not nothing.candidates and nothing.empty_reason


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({"tenant": "no_such_tenant"}, grpc.StatusCode.NOT_FOUND, "no_such_tenant"),
        ({"pins": []}, grpc.StatusCode.INVALID_ARGUMENT, "query_pins"),
        ({"pins": [str(i) for i in range(300)]}, grpc.StatusCode.INVALID_ARGUMENT, "query_pins"),
        ({"weights": [-1.0]}, grpc.StatusCode.INVALID_ARGUMENT, "weight"),
        ({"weights": [math.nan]}, grpc.StatusCode.INVALID_ARGUMENT, "weight"),
        ({"weights": [math.inf]}, grpc.StatusCode.INVALID_ARGUMENT, "weight"),
        ({"num_results": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "num_results"),
        ({"pins": ["x" * 5_000_000]}, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
)
def test_bad_requests_get_their_status_and_a_message_naming_the_field(
    served, kwargs: dict, code: grpc.StatusCode, field: str
) -> None:
    server, client = served
    call = {"tenant": "homefeed", "pins": busy_pins(server.graph, 1), **kwargs}
    with pytest.raises(WalkRankClientError) as info:
        client.recommend(call.pop("tenant"), call.pop("pins"), **call)
    assert info.value.code == code
    assert field in info.value.details


def test_quota_refuses_at_once_with_resource_exhausted(fresh) -> None:
    server, client = fresh
    limiter = server.tenants.counters("email").limiter
    limit = server.tenants.get("email").config.limits.max_in_flight
    for _ in range(limit):  # the email quota is full of (pretend) in-flight batches
        assert limiter.try_acquire(limit)
    try:
        query = busy_pins(server.graph, 1)
        assert (
            code_of(lambda: client.recommend("email", query)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert client.recommend("homefeed", query).candidates  # other tenants unaffected
    finally:
        for _ in range(limit):
            limiter.release()
    assert client.recommend("email", busy_pins(server.graph, 1)).candidates


def test_expired_deadline_returns_deadline_exceeded(served) -> None:
    """The pipeline stops at the first stage boundary past the deadline (checked directly:
    over gRPC a fast call can beat a short deadline), and a call whose deadline passes
    before any answer can come ends as DEADLINE_EXCEEDED."""
    server, client = served
    query = busy_pins(server.graph, 5)
    late = RecommendInput(tenant="homefeed", request_id="late", query_pins=tuple(query))
    with pytest.raises(DeadlineExceeded, match="after the walk stage"):
        recommend(server.graph, server.tenants.get("homefeed"), late, time_remaining=lambda: 0.0)
    assert (
        code_of(lambda: client.recommend("homefeed", query, timeout=1e-6))
        == grpc.StatusCode.DEADLINE_EXCEEDED
    )


def test_batch_streams_one_answer_per_user_in_order(served) -> None:
    from walkrank_client import UserQuery

    server, client = served
    users = [
        UserQuery(pins=busy_pins(server.graph, 3)[i : i + 1], request_id=f"r{i}") for i in range(3)
    ]
    answers = list(client.recommend_batch("email", users))
    assert [a.request_id for a in answers] == ["r0", "r1", "r2"]
    assert all(len(a.candidates) == 20 for a in answers)
    bad = [*users, UserQuery(pins=[])]
    with pytest.raises(WalkRankClientError) as info:
        list(client.recommend_batch("email", bad))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "users[3].query_pins:" in info.value.details


def test_events_are_validated_counted_and_kept(fresh) -> None:
    server, client = fresh
    answer = client.recommend("homefeed", busy_pins(server.graph, 1))
    pin = answer.candidates[0].pin_id
    result = client.report_events(
        "homefeed",
        [
            {"request_id": answer.request_id, "pin_id": pin, "event": "impression", "score": 0.7},
            {"request_id": answer.request_id, "pin_id": pin, "event": "save"},
            {"request_id": answer.request_id, "pin_id": pin, "event": "like"},
            {"request_id": "", "pin_id": pin, "event": "click"},
        ],
    )
    assert (result.accepted, result.rejected) == (2, 2)
    reasons = {r.index: r.reason for r in result.rejections}
    assert "like" in reasons[2] and "request_id" in reasons[3]
    counters = client.get_tenant("homefeed").counters
    assert (counters.events_accepted, counters.events_rejected) == (2, 2)


def test_admin_and_health(fresh) -> None:
    server, client = fresh
    assert [t.name for t in client.list_tenants().tenants] == ["email", "homefeed", "related_pins"]
    info = client.get_tenant("homefeed")
    assert info.counters.requests == 0
    client.recommend("homefeed", busy_pins(server.graph, 1))
    assert "walk:" in info.config_yaml
    assert client.get_tenant("homefeed").counters.requests == 1
    graph = client.graph_info()
    assert graph.n_pins == server.graph.n_pins and list(graph.locales) == list(server.graph.locales)
    assert client.health() == "SERVING"
    assert client.health("homefeed") == "SERVING"
    assert code_of(lambda: client.get_tenant("nobody")) == grpc.StatusCode.NOT_FOUND


def test_grpcurl_resolves_the_method_symbol_through_reflection(served) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(grpcurl).exists():
        pytest.skip("grpcurl is not installed")
    server, _ = served
    out = subprocess.run(
        [
            grpcurl,
            "-plaintext",
            f"127.0.0.1:{server.port}",
            "describe",
            "walkrank.v1.Recommender.Recommend",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "rpc Recommend" in out.stdout


def test_model_published_then_reloaded_is_served_and_rollback_works(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    with running(config) as (_, client):
        query = busy_pins(small_graph, 1)
        assert client.recommend("related_pins", query).model_version == "visit_count"
        publish_model(config.models_dir, config.tenants_dir, "related_pins", seed=1)
        changes = client.reload()
        assert any(c.tenant == "related_pins" and c.kind == "model" for c in changes.changes)
        answer = client.recommend("related_pins", query)
        assert answer.model_version == "v1"
        assert client.get_tenant("related_pins").model_engine in ("kernel", "onnxruntime")
        publish_model(config.models_dir, config.tenants_dir, "related_pins", seed=2)
        client.reload()
        assert client.recommend("related_pins", query).model_version == "v2"
        ModelRegistry(config.models_dir).rollback("related_pins")
        client.reload()
        assert client.recommend("related_pins", query).model_version == "v1"
        # A corrupt newer model is refused; v1 keeps serving and the error is reported.
        v3 = publish_model(config.models_dir, config.tenants_dir, "related_pins", seed=3)
        model_file = config.models_dir / "related_pins" / str(v3) / "model.onnx"
        model_file.write_bytes(model_file.read_bytes()[:100])
        result = client.reload()
        [error] = result.errors
        assert error.path == str(config.models_dir / "related_pins") and error.message
        assert client.recommend("related_pins", query).model_version == "v1"
        assert client.get_tenant("related_pins").last_reload_error


def test_onboarding_by_yaml_and_broken_files_never_disturb_working_tenants(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    with running(config) as (_, client):
        query = busy_pins(small_graph, 1)
        text = (config.tenants_dir / "related_pins.yaml").read_text()
        (config.tenants_dir / "shop.yaml").write_text(
            text.replace("name: related_pins", "name: shop")
        )
        result = client.reload()
        assert ("shop", "added") in {(c.tenant, c.kind) for c in result.changes}
        assert client.recommend("shop", query).candidates
        assert client.health("shop") == "SERVING"
        (config.tenants_dir / "shop.yaml").write_text(
            text.replace("name: related_pins", "name: shop").replace("steps: 30_000", "steps: -5")
        )
        (config.tenants_dir / "broken.yaml").write_text("name: [unclosed\n")
        result = client.reload()
        messages = " ".join(e.message for e in result.errors)
        assert "walk.steps" in messages and "broken.yaml" in messages
        assert {Path(e.path).name for e in result.errors} == {"shop.yaml", "broken.yaml"}
        assert client.recommend("shop", query).candidates  # the old shop config serves
        assert client.get_tenant("shop").last_reload_error


def test_reload_while_serving_loses_no_request(tmp_path: Path, small_graph: GraphStore) -> None:
    config = make_config(tmp_path, small_graph)
    server = WalkRankServer(config)
    port = server.start()
    failures: list[BaseException] = []
    served_versions: set[str] = set()
    stop = threading.Event()
    query = busy_pins(small_graph, 3)

    def hammer(tenant: str) -> None:
        pins_for_tenant = query[:1] if tenant == "related_pins" else query
        with WalkRankClient(f"127.0.0.1:{port}", timeout=20.0) as client:
            while not stop.is_set():
                try:
                    answer = client.recommend(tenant, pins_for_tenant)
                    if tenant == "related_pins":
                        served_versions.add(answer.model_version)
                except BaseException as exc:  # noqa: BLE001 - every failure counts
                    failures.append(exc)

    threads = [
        threading.Thread(target=hammer, args=(t,))
        for t in ("related_pins", "related_pins", "homefeed", "email")
    ]
    for thread in threads:
        thread.start()
    try:
        with WalkRankClient(f"127.0.0.1:{port}", timeout=20.0) as admin:
            for seed in range(4):
                publish_model(config.models_dir, config.tenants_dir, "related_pins", seed=seed)
                admin.reload()
                yaml_file = config.tenants_dir / "email.yaml"
                yaml_file.write_text(yaml_file.read_text())  # touched: re-parsed on reload
                admin.reload()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop()
    assert failures == []
    assert "v4" in served_versions  # the last model published was served


def test_graceful_shutdown_writes_every_logged_candidate(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    server = WalkRankServer(config)
    port = server.start()
    generated = 0
    with WalkRankClient(f"127.0.0.1:{port}", timeout=20.0) as client:
        for i in range(5):
            answer = client.recommend("homefeed", busy_pins(small_graph, 5)[i : i + 1])
            generated += answer.candidates_generated
    server.stop()
    logged = read_candidates(config.logs_dir, "homefeed")
    assert logged.num_rows == generated > 0
    assert set(logged.column_names) >= {
        "request_id",
        "pin_id",
        "rank",
        "returned",
        "model_version",
        "f_walk_score",
    }


def test_auth_keys_per_tenant_and_admin_token(
    tmp_path: Path, small_graph: GraphStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WALKRANK_API_KEYS", "homefeed=hf-key,email=em-key")
    monkeypatch.setenv("WALKRANK_ADMIN_TOKEN", "admin-secret")
    config = make_config(tmp_path, small_graph, auth=resolve_auth(True, None))
    server = WalkRankServer(config)
    port = server.start()
    address = f"127.0.0.1:{port}"
    query = busy_pins(small_graph, 1)
    try:
        with WalkRankClient(address, api_key="hf-key", admin_token="admin-secret") as ok:
            assert ok.recommend("homefeed", query).candidates
            assert ok.list_tenants().tenants
        with WalkRankClient(address, api_key="em-key") as other:
            assert (
                code_of(lambda: other.recommend("homefeed", query))
                == grpc.StatusCode.PERMISSION_DENIED
            )
        with WalkRankClient(address) as anonymous:
            assert (
                code_of(lambda: anonymous.recommend("homefeed", query))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            assert code_of(lambda: anonymous.list_tenants()) == grpc.StatusCode.UNAUTHENTICATED
        with WalkRankClient(address, api_key="hf-key", admin_token="wrong") as wrong:
            assert code_of(lambda: wrong.reload()) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop()


def test_tls_when_given_a_certificate(tmp_path: Path, small_graph: GraphStore) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    from walkrank.serving.config import TlsConfig

    config = make_config(tmp_path, small_graph, tls=TlsConfig(cert, key), address="localhost:0")
    server = WalkRankServer(config)
    port = server.start()
    try:
        with WalkRankClient(f"localhost:{port}", tls=cert.read_bytes()) as client:
            assert client.recommend("email", busy_pins(small_graph, 1)).candidates
        with WalkRankClient(f"localhost:{port}", retries=0) as plaintext:
            assert (
                code_of(lambda: plaintext.recommend("email", busy_pins(small_graph, 1)))
                == grpc.StatusCode.UNAVAILABLE
            )
    finally:
        server.stop()


def test_prometheus_metrics_on_their_own_port(tmp_path: Path, small_graph: GraphStore) -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:  # a free loopback port for the metrics listener
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    config = make_config(tmp_path, small_graph, metrics_address=f"127.0.0.1:{metrics_port}")
    with running(config) as (_, client):
        answer = client.recommend("homefeed", busy_pins(small_graph, 1))
        with pytest.raises(WalkRankClientError):
            client.recommend("homefeed", [])
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
            text = page.read().decode()
    assert 'walkrank_requests_total{code="OK",tenant="homefeed"} 1.0' in text
    assert 'walkrank_requests_total{code="INVALID_ARGUMENT",tenant="homefeed"} 1.0' in text
    assert 'walkrank_stage_seconds_count{stage="walk",tenant="homefeed"}' in text
    generated = float(answer.candidates_generated)
    assert f'walkrank_candidates_total{{kind="generated",tenant="homefeed"}} {generated}' in text
    assert 'kind="scored"' not in text  # it always equalled generated
    assert 'walkrank_model_version{tenant="homefeed"} 0.0' in text


def _wait_until(condition, what: str, timeout_s: float = 20.0) -> None:
    """Poll `condition` until it holds (the server works in its own threads)."""
    done = threading.Event()
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        done.wait(0.005)
    raise AssertionError(f"timed out waiting until {what}")


def test_compute_slots_serve_interactive_before_batch_and_honour_deadlines(fresh) -> None:
    from walkrank_client import UserQuery

    server, client = fresh
    compute = server.serving.compute
    # Every compute thread, the spare ones too, busy with a job that waits for its gate (one
    # tenant each: a spare thread starts only a tenant's first job).
    threads = compute.slots + compute.spare
    gates = [threading.Event() for _ in range(threads)]
    blockers = [
        threading.Thread(
            target=compute.run,
            args=(functools.partial(gate.wait, 60), 0),
            kwargs={"tenant": f"blocker-{i}"},
        )
        for i, gate in enumerate(gates)
    ]
    for blocker in blockers:
        blocker.start()
    _wait_until(lambda: compute.running == threads, "every compute thread is busy")
    answers: dict[str, object] = {}
    try:
        query = busy_pins(server.graph, 1)
        with pytest.raises(WalkRankClientError) as info:
            client.recommend("homefeed", query, timeout=1.0)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "compute slot" in str(info.value)

        def call(name: str, fn) -> threading.Thread:
            thread = threading.Thread(target=lambda: answers.__setitem__(name, fn()))
            thread.start()
            return thread

        email = call(
            "email",
            lambda: list(client.recommend_batch("email", [UserQuery(pins=query, request_id="e0")])),
        )
        _wait_until(lambda: compute.waiting == 1, "the email user waits for a slot")
        homefeed = call("homefeed", lambda: client.recommend("homefeed", query))
        _wait_until(lambda: compute.waiting == 2, "the home-feed request waits too")
        # All but slots - 1 threads come free: the later, interactive request goes first, and
        # the email user only after it.
        for gate in gates[: compute.spare + 1]:
            gate.set()
        homefeed.join(20)
        email.join(20)
    finally:
        for gate in gates:
            gate.set()
        for blocker in blockers:
            blocker.join(20)
    feed = answers["homefeed"].timing  # type: ignore[attr-defined]
    [email_answer] = answers["email"]  # type: ignore[misc]
    assert email_answer.candidates and feed.queue_ms > 0
    assert email_answer.timing.queue_ms > feed.queue_ms + feed.total_ms
