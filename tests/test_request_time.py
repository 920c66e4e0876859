"""Request time: ages are measured from it and the candidate log is stamped with it, so
history can be replayed; through a real server on loopback."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from test_server import busy_pins, make_config, running

from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import REFERENCE_EPOCH
from walkrank.logs.candidates import read_candidates
from walkrank.logs.events import MAX_EPOCH_SECONDS, read_events
from walkrank_client import UserQuery, WalkRankClient, WalkRankClientError

DAY = 86_400.0


def _logged(logs_dir: Path, request_id: str) -> pd.DataFrame:
    logged = read_candidates(logs_dir, "homefeed").to_pandas()
    logged = logged[logged.request_id == request_id].set_index("pin_id").sort_index()
    assert len(logged), request_id
    return logged


def test_request_time_moves_ages_and_the_logged_time(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    query = busy_pins(small_graph, 3)
    # The synthetic pins were created up to two years before REFERENCE_EPOCH: a request a
    # year later sees every pin 365 days older than one at REFERENCE_EPOCH.
    then = float(REFERENCE_EPOCH)
    later = datetime.fromtimestamp(then + 365 * DAY, tz=UTC)
    with running(config) as (_, client):
        client.recommend("homefeed", query, seed=3, request_id="then", request_time=then)
        # A naive datetime is UTC.
        client.recommend(
            "homefeed", query, seed=3, request_id="later", request_time=later.replace(tzinfo=None)
        )
        client.recommend("homefeed", query, seed=3, request_id="now")
        batch = list(
            client.recommend_batch(
                "homefeed",
                [
                    UserQuery(pins=query, request_id="batch-then", request_time=then),
                    UserQuery(pins=query, request_id="batch-now"),
                ],
                seed=3,
            )
        )
        assert len(batch) == 2
        # Events of a replayed request carry their own time (a datetime here).
        saved = client.report_events(
            "homefeed",
            [
                {
                    "request_id": "then",
                    "pin_id": query[0],
                    "event": "save",
                    "timestamp": datetime.fromtimestamp(then + 60, tz=UTC),
                }
            ],
        )
        assert saved.accepted == 1
    at_then, at_later = _logged(config.logs_dir, "then"), _logged(config.logs_dir, "later")
    assert (at_then.index == at_later.index).all()
    assert (at_then.ts == pd.Timestamp(then, unit="s", tz="UTC")).all()
    assert (at_later.ts == pd.Timestamp(later)).all()
    # Ages are days from each pin's created_at to the request time, clipped at 0.
    created = np.asarray(small_graph.pin_created_at)[small_graph.pin_index(at_then.index.tolist())]
    for logged, moment in ((at_then, then), (at_later, later.timestamp())):
        expected = np.float32(np.maximum((moment - created) / DAY, 0.0))
        assert np.allclose(logged.f_pin_age_days, expected, rtol=1e-6)
    assert (at_later.f_pin_age_days - at_then.f_pin_age_days > 364).all()
    at_now = _logged(config.logs_dir, "now")
    now_ts = at_now.ts.iloc[0].timestamp()
    assert abs(now_ts - datetime.now(UTC).timestamp()) < 600
    # Per user of a batch: its own time, or now.
    assert (
        _logged(config.logs_dir, "batch-then").ts == pd.Timestamp(then, unit="s", tz="UTC")
    ).all()
    assert _logged(config.logs_dir, "batch-now").ts.iloc[0].timestamp() > then + 365 * DAY
    # Training windows read the log by its time: a historical window selects the backfill.
    window = read_candidates(config.logs_dir, "homefeed", then, then + DAY).to_pandas()
    assert set(window.request_id) == {"then", "batch-then"}
    events = read_events(config.logs_dir, then, then + DAY, tenant="homefeed").to_pandas()
    assert events.timestamp.tolist() == [pd.Timestamp(then + 60, unit="s", tz="UTC")]


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore
) -> Iterator[WalkRankClient]:
    with running(make_config(tmp_path_factory.mktemp("times"), small_graph)) as (_, client):
        yield client


@pytest.mark.parametrize(
    "moment", [math.nan, math.inf, -math.inf, -1.0, 4_102_444_800.0, 1.7e12, 1.8e308]
)
def test_request_time_outside_1970_to_2100_is_refused_naming_the_field(
    client: WalkRankClient, small_graph: GraphStore, moment: float
) -> None:
    query = busy_pins(small_graph, 1)
    with pytest.raises(WalkRankClientError) as info:
        client.recommend("homefeed", query, request_time=moment)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("request_time: "), info.value.details
    milliseconds = MAX_EPOCH_SECONDS <= moment < 1000 * MAX_EPOCH_SECONDS
    assert ("(milliseconds?)" in info.value.details) == milliseconds
    batch = client.recommend_batch(
        "email", [UserQuery(pins=query), UserQuery(pins=query, request_time=moment)]
    )
    # The whole batch is refused before its first user is served.
    with pytest.raises(WalkRankClientError) as info:
        next(iter(batch))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("users[1].request_time: "), info.value.details
