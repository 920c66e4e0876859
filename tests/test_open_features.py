"""Open features through a real server: edge-time features, declared pin attributes and
request features reach the model and the log, undeclared ones are refused with the field
named, and extra candidates are scored, logged with their source and returned."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from test_server import busy_pins, make_config, running

from walkrank.errors import ConfigError, ModelError
from walkrank.features import (
    RequestContext,
    check_feature_defaults,
    check_feature_names,
    compute_features,
    inputs_lost,
)
from walkrank.graph.build import build_graph
from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import REFERENCE_EPOCH, generate_graph_tables
from walkrank.logs.candidates import read_candidates
from walkrank.model_registry import ModelRegistry
from walkrank.ranking.export import export_model
from walkrank.ranking.fit import train_model
from walkrank.ranking.scorer import Scorer
from walkrank.serving.open_features import MAX_EXTRA_CANDIDATES
from walkrank.tenants import load_tenant
from walkrank.walks.engine import WalkParams, walk
from walkrank_client import UserQuery, WalkRankClient, WalkRankClientError
from walkrank_client.pb.walkrank.v1.recommender_pb2 import RecommendResponse

DAY = 86_400.0
TENANT = "open"
FEATURES = [
    "walk_score",
    "walk_query_hits",
    "pin_edges_last_30d",
    "pin_edges_last_30d_share",
    "pin_edges_at_request",
    "pin_first_edge_age_days",
    "pin_last_edge_age_days",
    "pin.likes",
    "request.user_age",
    "source.walk",
    "source.trending",
]
TENANT_YAML = f"""
name: {TENANT}
query:
  source: recent_pins
  max_pins: 10
walk:
  steps: 600
candidates:
  generate: 400
  return: 50
  max_return: 400
features: [{", ".join(FEATURES)}]
feature_defaults:
  pin.likes: -1
  request.user_age: 30
"""


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> tuple[GraphStore, pd.DataFrame]:
    """A graph whose edges carry times (some repeated, some unknown) and whose pins a
    `likes` column (missing for some); with the raw edges."""
    tables = generate_graph_tables(
        n_pins=1_500, n_boards=300, n_edges=12_000, n_topics=4, n_locales=2, seed=21
    )
    rng = np.random.default_rng(21)
    edges = tables.edges.to_pandas()[["pin_id", "board_id"]]
    edges = pd.concat([edges, edges.sample(2_000, random_state=1)], ignore_index=True)
    created = REFERENCE_EPOCH - rng.uniform(0, 400 * DAY, len(edges)).round()
    created[::97] = np.nan
    edges["created_at"] = created
    likes = rng.integers(0, 500, tables.pins.num_rows).astype(float)
    likes[::5] = np.nan
    pins = tables.pins.append_column("likes", pa.array(likes))
    out = tmp_path_factory.mktemp("timed") / "graph"
    build_graph(out, pa.Table.from_pandas(edges, preserve_index=False), pins, tables.boards)
    return GraphStore.load(out), edges


def test_edge_time_features_match_the_raw_edges(timed: tuple[GraphStore, pd.DataFrame]) -> None:
    graph, edges = timed
    query = graph.pin_index(busy_pins(graph, 3))
    result = walk(graph, query, np.ones(3, np.float32), WalkParams(steps=20_000), seed=2)
    now = REFERENCE_EPOCH - 100 * DAY  # a replayed request: later edges do not exist yet
    context = RequestContext(0, np.zeros(0, np.int32), query, np.ones(3, np.float32), float(now))
    names = [
        "pin_edges_last_30d",
        "pin_edges_last_7d",
        "pin_edges_last_30d_share",
        "pin_edges_at_request",
        "pin_first_edge_age_days",
        "pin_last_edge_age_days",
    ]
    matrix = compute_features(graph, result, context, names)
    assert np.isfinite(matrix).all()
    # The reference: each (pin, board) edge once at its earliest known time, as pandas sees it.
    earliest = edges.groupby(["pin_id", "board_id"])["created_at"].min().reset_index()
    pin_ids = graph.pin_external(result.pins)
    expected = np.zeros((len(pin_ids), len(names)))
    by_pin = {pin: group["created_at"].to_numpy() for pin, group in earliest.groupby("pin_id")}
    for i, pin in enumerate(pin_ids.tolist()):
        times = by_pin[pin]
        seen = times[times <= now]  # NaN compares False: unknown times never count
        expected[i, 0] = np.sum(seen > now - 30 * DAY)
        expected[i, 1] = np.sum(seen > now - 7 * DAY)
        expected[i, 3] = seen.size
        expected[i, 4] = (now - seen.min()) / DAY if seen.size else -1
        expected[i, 5] = (now - seen.max()) / DAY if seen.size else -1
    expected[:, 2] = expected[:, 0] / expected[:, 0].sum()
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-6)
    assert expected[:, 0].sum() > 0 and expected[:, 3].max() < result.degree.max()


def test_rank_features_are_percentiles_among_the_request_candidates(
    timed: tuple[GraphStore, pd.DataFrame],
) -> None:
    graph, _ = timed
    query = graph.pin_index(busy_pins(graph, 3))
    result = walk(graph, query, np.ones(3, np.float32), WalkParams(steps=20_000), seed=3)
    context = RequestContext(
        0, np.zeros(0, np.int32), query, np.ones(3, np.float32), REFERENCE_EPOCH - 50 * DAY
    )
    ranked = ["walk_score", "candidate_degree", "pin_edges_last_30d_share", "pin_edges_last_7d"]
    # A ranked window alone still gets its window counted (no plain pin_edges_last_7d listed).
    names = [*ranked[:3], *(f"{name}_rank" for name in ranked)]
    matrix = compute_features(graph, result, context, names)
    raw = compute_features(graph, result, context, ranked)
    assert np.isfinite(matrix).all() and result.pins.size > 100
    for j, name in enumerate(ranked):
        # pandas' mid-rank percentile: ties share their mean rank, the highest value is 1.
        expected = pd.Series(raw[:, j]).rank(method="average", pct=True).to_numpy()
        np.testing.assert_allclose(matrix[:, 3 + j], expected, rtol=1e-6, err_msg=name)
    assert len(np.unique(raw[:, 3])) > 1  # the window was counted, not served at 0
    for bad in ("walk_score_rank_rank", "nothing_rank", "pin_edges_last_0d_rank"):
        with pytest.raises(ConfigError, match="unknown features"):
            check_feature_names([bad])


def test_window_names_are_checked() -> None:
    tenants = Path(__file__).parents[1] / "tenants" / "templates"
    assert load_tenant(tenants / "own_data.yaml")  # the shipped template stays valid
    for bad in ("pin_edges_last_0d", "pin_edges_last_030d", "pin_edges_last_99999d", "pin.a-b"):
        with pytest.raises(ConfigError, match="unknown features"):
            check_feature_names([bad])


def _tenant_dir(root: Path, text: str = TENANT_YAML) -> Path:
    tenants = root / "tenants"
    tenants.mkdir(parents=True, exist_ok=True)
    (tenants / f"{TENANT}.yaml").write_text(text)
    return tenants


@pytest.mark.parametrize(
    "change,message",
    [
        ("feature_defaults:\n  walk_score: 1\n", "feature_defaults.walk_score: only pin."),
        ("feature_defaults:\n  request.other: 1\n", "not in the tenant's features list"),
        ("feature_defaults:\n  pin.likes: .nan\n", "feature_defaults.pin.likes: must be"),
    ],
)
def test_tenant_file_errors_name_the_field(tmp_path: Path, change: str, message: str) -> None:
    text = TENANT_YAML.split("feature_defaults:")[0] + change
    tenants = _tenant_dir(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_tenant(tenants / f"{TENANT}.yaml")
    assert str(tenants / f"{TENANT}.yaml") in str(info.value)


def _publish(models: Path, tenants: Path) -> None:
    """A real model whose score rises with the request's user_age and the pin's likes."""
    config = load_tenant(tenants / f"{TENANT}.yaml")
    rng = np.random.default_rng(0)
    x = rng.random((2_000, len(config.features)), dtype=np.float32)
    x[:, FEATURES.index("request.user_age")] *= 80
    x[:, FEATURES.index("pin.likes")] *= 500
    signal = x[:, FEATURES.index("request.user_age")] / 80 + x[:, FEATURES.index("pin.likes")] / 500
    y = (signal + 0.2 * rng.random(2_000) > 1.1).astype(np.float32)
    trained = train_model(x, y, params={"n_estimators": 20, "max_depth": 3}, seed=0)
    exported = export_model(
        trained.booster, list(config.features), converter="onnxmltools", objective="binary"
    )
    metadata = {**exported.metadata, "feature_defaults": dict(config.feature_defaults)}
    ModelRegistry(models).publish(TENANT, exported.onnx_bytes, metadata)
    # Trained with other defaults, a model would see missing inputs as values it never saw.
    with pytest.raises(ModelError, match="feature_defaults"):
        check_feature_defaults({"pin.likes": 0.0}, config.feature_defaults)


def test_declared_features_and_extra_candidates_through_the_server(
    tmp_path: Path, timed: tuple[GraphStore, pd.DataFrame]
) -> None:
    graph, _ = timed
    tenants = _tenant_dir(tmp_path)
    config = make_config(tmp_path, graph)
    _publish(config.models_dir, tenants)
    query = busy_pins(graph, 2)
    when = REFERENCE_EPOCH - 10 * DAY

    def ask(client: WalkRankClient, **extra: Any) -> RecommendResponse:
        """The same walk every time (query, seed, request time): only `extra` differs."""
        return client.recommend(TENANT, query, num_results=400, seed=4, request_time=when, **extra)

    with running(config) as (_, client):
        plain = ask(client, request_id="plain")
    # Pins this walk does not reach, an unknown pin, a repeat and a query pin.
    reached = graph.pin_index([c.pin_id for c in plain.candidates] + query)
    assert len(plain.candidates) < 390  # room for the extra candidates in the answer
    unreached = np.setdiff1d(np.arange(graph.n_pins), reached)
    quiet = [str(p) for p in graph.pin_external(unreached[:4]).tolist()]
    extras = [(pin, "trending") for pin in quiet[:3]] + [
        (quiet[3], "fresh"),
        ("no-such-pin", "fresh"),
        (quiet[0], "fresh"),
        (query[0], "fresh"),
    ]
    with running(config) as (_, client):
        answer = ask(
            client, request_id="with", features={"user_age": 71.0}, extra_candidates=extras
        )
        young = ask(client, request_id="young", features={"user_age": 5.0})
        batch, batch_extra = client.recommend_batch(
            TENANT,
            [
                UserQuery(pins=query, request_id="batch", request_time=when),
                UserQuery(
                    pins=query,
                    request_id="batch-extra",
                    request_time=when,
                    features={"user_age": 44.0},
                    extra_candidates=[(quiet[1], "fresh")],
                ),
            ],
            seed=4,
            num_results=400,
        )
        for features, field in (
            ({"age": 3.0}, "features['age']"),
            ({"user_age": math.inf}, "features['user_age']"),
            ({"user_age": math.nan}, "features['user_age']"),
        ):
            with pytest.raises(WalkRankClientError) as info:
                client.recommend(TENANT, query, features=features)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert field in info.value.details, info.value.details
        for extra, field in (
            ([("", "x")], "extra_candidates[0].pin_id"),
            ([(query[1], "walk")], "extra_candidates[0].source"),
            ([(query[1], "bad source")], "extra_candidates[0].source"),
            ([(query[1], "x")] * (MAX_EXTRA_CANDIDATES + 1), "extra_candidates"),
        ):
            with pytest.raises(WalkRankClientError) as info:
                client.recommend(TENANT, query, extra_candidates=extra)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert field in info.value.details, info.value.details
    assert answer.model_version == "v1"
    sources = {c.pin_id: c.source for c in answer.candidates}
    assert {p: sources[p] for p in quiet[:4]} == {
        quiet[0]: "trending",
        quiet[1]: "trending",
        quiet[2]: "trending",
        quiet[3]: "fresh",
    }
    assert "no-such-pin" not in sources and query[0] not in sources
    assert {sources[p] for p in sources if p not in quiet} == {""}  # the walk's

    logged = read_candidates(config.logs_dir, TENANT).to_pandas()
    mine = logged[logged.request_id == "with"].set_index("pin_id")
    assert len(mine) == len(answer.candidates)
    assert (mine.loc[quiet[:3], "source"] == "trending").all()
    assert mine.loc[quiet[3], "source"] == "fresh"
    walked = mine.source == "walk"
    assert walked.sum() == len(mine) - 4
    extra_rows = mine.loc[quiet[:4]]
    for name in ("walk_score", "walk_query_hits", "source.walk"):
        assert (extra_rows[f"f_{name}"] == 0).all() and (mine[walked][f"f_{name}"] > 0).all()
    assert (extra_rows.loc[quiet[:3], "f_source.trending"] == 1).all()
    assert (mine[walked]["f_source.trending"] == 0).all()
    assert (mine["f_request.user_age"] == 71).all()
    likes = np.asarray(graph.pin_columns["likes"])[graph.pin_index(mine.index.tolist())]
    assert np.array_equal(mine["f_pin.likes"], np.where(np.isnan(likes), -1, likes))
    batch_rows = logged[logged.request_id == "batch"]
    assert (batch_rows["f_request.user_age"] == 30).all()  # the tenant's default
    assert (batch_rows.source == "walk").all()
    extra_user = logged[logged.request_id == "batch-extra"].set_index("pin_id")
    assert (extra_user["f_request.user_age"] == 44).all()
    assert extra_user.loc[quiet[1], "source"] == "fresh"
    assert {c.pin_id: c.source for c in batch_extra.candidates}.get(quiet[1]) == "fresh"

    # The model saw exactly the logged rows: its scores of them are the served scores.
    model = ModelRegistry(config.models_dir).load(TENANT)
    scorer = Scorer.from_onnx(model.onnx_bytes, len(FEATURES))
    rows = mine[[f"f_{name}" for name in FEATURES]].to_numpy(np.float32)
    np.testing.assert_allclose(scorer.score(rows), mine.model_score, rtol=1e-6)
    served = {c.pin_id: c.score for c in answer.candidates}
    np.testing.assert_allclose([served[p] for p in mine.index], mine.model_score, rtol=1e-6)
    # ... and the request feature moved them: the same walk, another user_age.
    other = {c.pin_id: c.score for c in young.candidates}
    common = [p for p in other if p in served]
    assert np.mean([served[p] > other[p] for p in common]) > 0.9
    assert len(batch.candidates) > 0


def test_a_graph_without_the_inputs_is_named_before_a_swap(
    timed: tuple[GraphStore, pd.DataFrame], small_graph: GraphStore
) -> None:
    """A new graph without edge times or a pin column would serve those features at their
    defaults: the swap check names the input and the features it feeds."""
    graph, _ = timed
    names = ["walk_score", "pin_edges_last_30d", "pin_first_edge_age_days", "pin.likes"]
    assert inputs_lost(names, graph, small_graph) == {
        "pin_edge_times": ["pin_edges_last_30d", "pin_first_edge_age_days"],
        "pins.likes": ["pin.likes"],
    }
    assert inputs_lost(names, graph, graph) == {}
