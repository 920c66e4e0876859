"""Events stay with their tenant, through a real server and the real training join: an event
quoting another tenant's request is refused over gRPC, and one the server could not know to
refuse (after a restart) is stored with its own tenant and never labels the other's
candidates."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
from test_server import busy_pins, make_config, running

from walkrank.graph.store import GraphStore
from walkrank.logs.events import read_events
from walkrank.serving.config import resolve_auth
from walkrank.tenants import load_tenant
from walkrank.training.pipeline import StepTimer, load_joined
from walkrank_client import WalkRankClient


def test_foreign_request_ids_are_refused_and_never_join_at_training(
    tmp_path: Path, small_graph: GraphStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WALKRANK_API_KEYS", "homefeed=hf-key,email=em-key")
    config = make_config(tmp_path, small_graph, auth=resolve_auth(True, None))
    query = busy_pins(small_graph, 1)
    with running(config) as (server, _):
        address = f"127.0.0.1:{server.port}"
        with (
            WalkRankClient(address, api_key="hf-key") as home,
            WalkRankClient(address, api_key="em-key") as email,
        ):
            served = home.recommend("homefeed", query)
            own = email.recommend("email", query)
            shown, acted = served.candidates[0].pin_id, served.candidates[1].pin_id
            # With its own key, email quotes home feed's request: refused, whose not said.
            result = email.report_events(
                "email",
                [
                    {"request_id": served.request_id, "pin_id": acted, "event": "click"},
                    {
                        "request_id": own.request_id,
                        "pin_id": own.candidates[0].pin_id,
                        "event": "click",
                    },
                    {"request_id": "never-served", "pin_id": acted, "event": "click"},
                ],
            )
            assert (result.accepted, result.rejected) == (2, 1)
            [rejection] = result.rejections
            assert (rejection.index, rejection.reason) == (
                0,
                "request_id: unknown request_id for this tenant",
            )
            assert (
                home.report_events(
                    "homefeed",
                    [{"request_id": served.request_id, "pin_id": shown, "event": "impression"}],
                ).accepted
                == 1
            )
    # A restarted server has forgotten which tenant served the request: the event is taken,
    # stored as email's, and can only ever label email's candidates.
    with (
        running(config) as (server, _),
        WalkRankClient(f"127.0.0.1:{server.port}", api_key="em-key") as email,
    ):
        assert (
            email.report_events(
                "email", [{"request_id": served.request_id, "pin_id": acted, "event": "save"}]
            ).accepted
            == 1
        )

    events = read_events(config.logs_dir)
    quoted = events.filter(pc.field("request_id") == served.request_id)
    assert sorted(zip(quoted["tenant"].to_pylist(), quoted["event"].to_pylist(), strict=True)) == [
        ("email", "save"),
        ("homefeed", "impression"),
    ]
    homefeed = load_tenant(config.tenants_dir / "homefeed.yaml")
    joined = load_joined(homefeed, config.logs_dir, None, StepTimer("homefeed", lambda _: None))
    mine = joined.filter(pc.field("request_id") == served.request_id)
    outcome = {
        pin: (impressions, clicks, saves)
        for pin, impressions, clicks, saves in zip(
            *(mine[c].to_pylist() for c in ("pin_id", "n_impression", "n_click", "n_save")),
            strict=True,
        )
    }
    assert outcome[shown] == (1, 0, 0)
    assert outcome[acted] == (0, 0, 0)  # email's click and save never label home feed's pins
    assert sum(sum(v) for v in outcome.values()) == 1
