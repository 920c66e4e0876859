"""The SDK over several replicas without a balancer: gRPC round_robin with health checking."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from grpc_health.v1 import health_pb2
from test_server import make_config, pins, running

from walkrank.graph.store import GraphStore
from walkrank.serving.server import WalkRankServer
from walkrank_client import WalkRankClient
from walkrank_client.cli import main as client_main
from walkrank_client.client import channel_target, resolve_replicas


@pytest.fixture(scope="module")
def two_replicas(
    tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore
) -> Iterator[list[tuple[WalkRankServer, str]]]:
    """Two servers on the same graph, tenants and models, as replicas are."""
    root = tmp_path_factory.mktemp("replicas")
    with ExitStack() as stack:
        replicas = []
        for _ in range(2):
            server, _ = stack.enter_context(running(make_config(root, small_graph)))
            replicas.append((server, f"127.0.0.1:{server.port}"))
        yield replicas


def requests_served(server: WalkRankServer, tenant: str) -> int:
    return server.tenants.counters(tenant).requests


def test_several_addresses_spread_calls_per_request(two_replicas, small_graph) -> None:
    before = [requests_served(s, "related_pins") for s, _ in two_replicas]
    with WalkRankClient([a for _, a in two_replicas], timeout=20.0) as client:
        for _ in range(20):
            client.recommend("related_pins", pins(small_graph, 3))
    served = [
        requests_served(s, "related_pins") - b
        for (s, _), b in zip(two_replicas, before, strict=True)
    ]
    assert sum(served) == 20
    assert min(served) >= 8, served  # round robin: 10 each, once both are connected


def test_a_replica_not_serving_gets_no_calls(two_replicas, small_graph) -> None:
    sick, _ = two_replicas[0]
    sick.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        before = requests_served(sick, "related_pins")
        addresses = ",".join(a for _, a in two_replicas)  # the comma-separated spelling
        with WalkRankClient(addresses, timeout=20.0) as client:
            for _ in range(10):
                client.recommend("related_pins", pins(small_graph, 4))
        assert requests_served(sick, "related_pins") == before
    finally:
        sick.health.set("", health_pb2.HealthCheckResponse.SERVING)


def test_reload_each_reaches_every_replica(two_replicas, capsys) -> None:
    addresses = [a for _, a in two_replicas]
    with WalkRankClient(addresses, timeout=20.0) as client:
        results = client.reload_each()
    assert list(results) == addresses
    assert all(not r.errors for r in results.values())
    assert client_main(["--address", ",".join(addresses), "reload"]) == 0
    out = capsys.readouterr().out
    assert all(f"== {a}" in out for a in addresses)


def test_dns_name_resolves_to_every_address() -> None:
    assert channel_target(["dns:///localhost:50051"]) == ("dns:///localhost:50051", True)
    assert "127.0.0.1:50051" in resolve_replicas("dns:///localhost:50051")
    assert channel_target(["127.0.0.1:1"]) == ("127.0.0.1:1", False)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("localhost:1,localhost:2", "dns:///NAME:PORT"),
        ("127.0.0.1:1,[::1]:2", "one family"),
        ("127.0.0.1:1,127.0.0.1:x", "expected ip:port"),
        (" , ", "no server address"),
    ],
)
def test_bad_replica_lists_are_refused_naming_the_address(address: str, message: str) -> None:
    with pytest.raises(ValueError, match="address") as info:
        WalkRankClient(address)
    assert message in str(info.value)
