"""Queries from actions: a request sends the user's recent actions and the server weighs them
with the tenant's `query.action_weights` and `recency_half_life_hours`, from the request
time, capped at `query.max_pins`; through a real server on loopback."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
import yaml
from test_server import busy_pins, make_config, running

from walkrank.graph.store import GraphStore
from walkrank_client import UserQuery, WalkRankClient, WalkRankClientError
from walkrank_client.pb import recommender_pb2, recommender_pb2_grpc

HOUR = 3_600.0
T = 1_750_000_000.0  # the request time
# Powers of two, so the expected weights are exact in the float32 of QueryPin.weight.
QUERY = {
    "source": "recent_pins",
    "max_pins": 3,
    "recency_half_life_hours": 24,
    "action_weights": {"save": 1.0, "click": 0.5, "view": 0.25, "hide": 0.0},
}


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore
) -> Iterator[tuple[WalkRankClient, recommender_pb2_grpc.RecommenderStub]]:
    config = make_config(tmp_path_factory.mktemp("actions"), small_graph)
    path = config.tenants_dir / "homefeed.yaml"
    tenant = yaml.safe_load(path.read_text())
    tenant["query"] = QUERY
    path.write_text(yaml.safe_dump(tenant, sort_keys=False))
    with (
        running(config) as (server, client),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield client, recommender_pb2_grpc.RecommenderStub(channel)


def _pins(small_graph: GraphStore) -> list[str]:
    return busy_pins(small_graph, 6)


def test_actions_are_weighed_as_the_tenant_configures(served, small_graph: GraphStore) -> None:
    client, _ = served
    a, b, c, d, e, f = _pins(small_graph)
    actions = [
        {"pin_id": a, "action": "save", "time": T - 24 * HOUR},  # 1.0 * 0.5
        {"pin_id": b, "action": "click", "time": T},  # 0.5
        {"pin_id": a, "action": "view", "time": T - 48 * HOUR},  # 0.25 * 0.25, a: 0.5625
        {"pin_id": c, "action": "SAVE", "time": T - 72 * HOUR},  # 0.125 (names: any case)
        {"pin_id": d, "action": "view", "time": T + HOUR},  # after the request: age 0, 0.25
        {"pin_id": e, "action": "hide", "time": T},  # weighs 0: not a query pin
        {"pin_id": f, "action": "click"},  # no time: at the request time, 0.5
    ]
    from_actions = client.recommend("homefeed", actions=actions, request_time=T, seed=9)
    # max_pins 3: the heaviest three (a, b, f), in the order of their first action.
    explicit = client.recommend(
        "homefeed", [a, b, f], weights=[0.5625, 0.5, 0.5], request_time=T, seed=9
    )
    assert from_actions.candidates and list(from_actions.candidates) == list(explicit.candidates)
    # The weights matter: the same pins unweighted walk differently.
    unweighted = client.recommend("homefeed", [a, b, f], request_time=T, seed=9)
    assert list(unweighted.candidates) != list(from_actions.candidates)
    # Ages run from the request time: a day later every timed action has halved (a: 0.28125,
    # b: 0.25, d: 0.25 * 0.5 ** (23 / 24)); f, untimed, is still at the request time.
    day_later = client.recommend("homefeed", actions=actions, request_time=T + 24 * HOUR, seed=9)
    explicit = client.recommend(
        "homefeed", [a, b, f], weights=[0.28125, 0.25, 0.5], request_time=T + 24 * HOUR, seed=9
    )
    assert list(day_later.candidates) == list(explicit.candidates)
    # Only the proportions count: five years of half-lives (2 ** -1825, below float64's
    # range) leave a save and a click of the same day at 1 : 0.5.
    old = T - 5 * 365 * 24 * HOUR
    from_old = client.recommend(
        "homefeed",
        actions=[
            {"pin_id": a, "action": "save", "time": old},
            {"pin_id": b, "action": "click", "time": old},
        ],
        request_time=T,
        seed=9,
    )
    explicit = client.recommend("homefeed", [a, b], weights=[1.0, 0.5], request_time=T, seed=9)
    assert from_old.candidates and list(from_old.candidates) == list(explicit.candidates)
    # Unknown pins are reported as for query pins.
    answer = client.recommend(
        "homefeed",
        actions=[{"pin_id": "no-such-pin", "action": "save"}, {"pin_id": a, "action": "save"}],
    )
    assert list(answer.unknown_query_pins) == ["no-such-pin"] and answer.candidates


def test_batch_users_send_actions(served, small_graph: GraphStore) -> None:
    client, _ = served
    a, b, *_ = _pins(small_graph)
    answers = list(
        client.recommend_batch(
            "homefeed",
            [
                UserQuery(
                    actions=[
                        {"pin_id": a, "action": "save", "time": T - 24 * HOUR},
                        {"pin_id": b, "action": "view", "time": T},
                    ],
                    request_time=T,
                ),
                UserQuery(pins=[a, b], weights=[0.5, 0.25], request_time=T),
            ],
            seed=4,
        )
    )
    # Batch users derive their seeds from their position: compare each with a single call.
    single = [
        client.recommend("homefeed", [a, b], weights=[0.5, 0.25], request_time=T, seed=seed)
        for seed in (4, 5)
    ]
    assert [list(r.candidates) for r in answers] == [list(r.candidates) for r in single]


@pytest.mark.parametrize(
    ("actions", "field", "says"),
    [
        (
            [{"pin_id": "1", "action": "save"}, {"pin_id": "2", "action": "like"}],
            "actions[1].action",
            "unknown action 'like'; tenant 'homefeed' weighs click, hide, save, view",
        ),
        ([{"pin_id": "1", "action": "hide"}], "actions", "every action weighs 0"),
        ([{"pin_id": "", "action": "save"}], "actions[0].pin_id", "empty"),
        (
            [{"pin_id": "1", "action": "save", "time": math.nan}],
            "actions[0].time",
            "not epoch seconds in 1970..2100",
        ),
        ([{"pin_id": "1", "action": "save", "time": T * 1000}], "actions[0].time", "milliseconds?"),
        (
            [{"pin_id": "1", "action": "save"}] * 201,
            "actions",
            "201 actions, tenant 'homefeed' allows at most 200",
        ),
        ([{"pin_id": "1", "action": "s" * 65}], "actions[0].action", "65 characters, at most 64"),
    ],
)
def test_bad_actions_are_refused_naming_the_field(
    served, actions: list[dict], field: str, says: str
) -> None:
    client, _ = served
    with pytest.raises(WalkRankClientError) as info:
        client.recommend("homefeed", actions=actions)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith(f"{field}: ") and says in info.value.details, (
        info.value.details
    )
    with pytest.raises(WalkRankClientError) as info:
        list(
            client.recommend_batch("homefeed", [UserQuery(pins=["1"]), UserQuery(actions=actions)])
        )
    assert info.value.details.startswith(f"users[1].{field}: "), info.value.details


def test_query_pins_and_actions_together_or_for_a_viewed_pin_tenant_are_refused(
    served, small_graph: GraphStore
) -> None:
    client, stub = served
    pin = _pins(small_graph)[0]
    with pytest.raises(ValueError, match="actions: pass query pins or actions, not both"):
        client.recommend("homefeed", [pin], actions=[{"pin_id": pin, "action": "save"}])
    both = recommender_pb2.RecommendRequest(
        tenant="homefeed",
        query_pins=[recommender_pb2.QueryPin(pin_id=pin)],
        actions=[recommender_pb2.UserAction(pin_id=pin, action="save")],
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(both, timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "actions: send query_pins or actions, not both"
    with pytest.raises(WalkRankClientError) as info:
        client.recommend("related_pins", actions=[{"pin_id": pin, "action": "save"}])
    assert info.value.details == (
        "actions: tenant 'related_pins' (query.source viewed_pin) takes query_pins, not actions"
    )
