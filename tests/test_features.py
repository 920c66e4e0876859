"""Feature registry: the batch path against a plain per-candidate reference, on real walks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from walkrank.errors import ConfigError, DataError, ModelError
from walkrank.features import (
    FEATURES,
    GROUPS,
    RequestContext,
    check_feature_list,
    check_feature_names,
    compute_features,
    feature_names,
)
from walkrank.graph.build import build_graph
from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import REFERENCE_EPOCH, generate_graph_tables
from walkrank.walks.engine import WalkParams, WalkResult, walk

NOW = REFERENCE_EPOCH + 3 * 86_400.0


def reference_features(
    graph: GraphStore, result: WalkResult, request: RequestContext
) -> np.ndarray:
    """Every feature, one candidate at a time, written from docs/features.md."""
    n_locales, n_topics = len(graph.locales), len(graph.topics)
    query = [
        (int(p), float(w)) for p, w in zip(request.query_pins, request.query_weights, strict=True)
    ]
    total_weight = sum(w for _, w in query)
    total_score = sum(float(s) for s in result.scores)
    interests = {int(t) for t in request.user_interests if 0 <= t < n_topics}
    user_locale = int(request.user_locale)
    rows = []
    for i in range(len(result.pins)):
        pin = int(result.pins[i])
        locale, topic = int(graph.pin_locale[pin]), int(graph.pin_topic[pin])
        quality, created = float(graph.pin_quality[pin]), float(graph.pin_created_at[pin])
        row = {
            "walk_score": float(result.scores[i]),
            "walk_visits": float(result.visits[i]),
            "walk_query_hits": float(result.query_hits[i]),
            "walk_query_hit_share": float(result.query_hits[i]) / len(query) if query else 0.0,
            "walk_score_share": float(result.scores[i]) / total_score if total_score else 0.0,
            # From the store, not the walk result: checks the walk's degree on the way.
            "candidate_degree": float(graph.pin_offsets[pin + 1] - graph.pin_offsets[pin]),
            "pin_quality": quality if math.isfinite(quality) else 0.0,
            "pin_quality_missing": 0.0 if math.isfinite(quality) else 1.0,
            "pin_age_days": max((request.now - created) / 86_400.0, 0.0)
            if math.isfinite(created)
            else -1.0,
            "pin_age_missing": 0.0 if math.isfinite(created) else 1.0,
            "pin_locale_missing": 1.0 if locale == n_locales else 0.0,
            "pin_topic_missing": 1.0 if topic == n_topics else 0.0,
            "user_locale_missing": 1.0 if user_locale == n_locales else 0.0,
            "user_interest_count": float(len(interests)),
            "query_pin_count": float(len(query)),
            "query_topic_share": 0.0,
            "query_locale_share": 0.0,
            "locale_match": 1.0 if user_locale < n_locales and locale == user_locale else 0.0,
            "topic_in_interests": 1.0 if topic in interests else 0.0,
        }
        if total_weight > 0:
            if topic < n_topics:
                same = sum(w for q, w in query if int(graph.pin_topic[q]) == topic)
                row["query_topic_share"] = same / total_weight
            if locale < n_locales:
                same = sum(w for q, w in query if int(graph.pin_locale[q]) == locale)
                row["query_locale_share"] = same / total_weight
        rows.append([row[name] for name in feature_names()])
    return np.array(rows, dtype=np.float32).reshape(len(rows), len(feature_names()))


def _with_holes(column: pa.ChunkedArray, share: float, rng: np.random.Generator) -> pa.Array:
    column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    hole = pa.array(rng.random(len(column)) < share)
    return pc.if_else(hole, pa.scalar(None, column.type), column)


@pytest.fixture(scope="module")
def holey_graph(tmp_path_factory: pytest.TempPathFactory) -> GraphStore:
    """8k pins where a fifth of quality, created_at, locale and topic values are missing."""
    tables = generate_graph_tables(
        n_pins=8_000, n_boards=1_000, n_edges=60_000, n_topics=6, n_locales=3, seed=5
    )
    rng = np.random.default_rng(5)
    pins = tables.pins
    for column in ("quality", "created_at", "locale", "topic"):
        index = pins.schema.get_field_index(column)
        pins = pins.set_column(index, column, _with_holes(pins[column], 0.2, rng))
    out = tmp_path_factory.mktemp("graphs") / "holey"
    build_graph(out, tables.edges, pins, tables.boards)
    return GraphStore.load(out)


def _context(
    graph: GraphStore,
    locale: str | None,
    interests: list[str],
    query_pins: np.ndarray | list[int],
    query_weights: np.ndarray | list[float],
    now: float = NOW,
) -> RequestContext:
    """The request as the serving path builds it: raw codes, unknown (-1) query pins dropped."""
    pins = np.asarray(query_pins, dtype=np.int32)
    return RequestContext(
        user_locale=graph.locale_code(locale),
        user_interests=np.array([graph.topic_code(t) for t in interests], dtype=np.int32),
        query_pins=pins[pins >= 0],
        query_weights=np.asarray(query_weights, dtype=np.float32)[pins >= 0],
        now=now,
    )


def _request(
    graph: GraphStore,
    n_query: int,
    locale: str | None,
    interests: list[str],
    steps: int,
    seed: int,
    now: float = NOW,
) -> tuple[WalkResult, RequestContext]:
    """A real walk from high- and mid-degree pins (plus one unknown pin) and its request."""
    degree = np.diff(graph.pin_offsets)
    by_degree = np.argsort(-degree, kind="stable")
    dense = np.r_[by_degree[: n_query - 1], by_degree[graph.n_pins // 3], -1].astype(np.int32)
    weights = np.linspace(0.25, 2.0, dense.size).astype(np.float32)
    context = _context(graph, locale, interests, dense, weights, now)
    result = walk(
        graph,
        dense,
        weights,
        WalkParams(steps=steps, early_stop_pins=0),
        user_locale=context.user_locale,
        seed=seed,
    )
    return result, context


def test_registry_is_ordered_and_documented() -> None:
    # The standard features first: a tenant naming none gets them, the rest it lists.
    assert feature_names() == list(FEATURES)[: len(feature_names())]
    assert all(not FEATURES[name].standard for name in list(FEATURES)[len(feature_names()) :])
    assert len(set(feature_names())) == len(feature_names())
    for name, spec in FEATURES.items():
        assert spec.name == name
        assert spec.group in GROUPS
        assert math.isfinite(spec.default)
        assert spec.description
    docs = (Path(__file__).parents[1] / "docs" / "features.md").read_text()
    for name in FEATURES:
        assert f"`{name}`" in docs, f"{name} is not documented in docs/features.md"


@pytest.mark.parametrize(
    "locale,interests", [("ja", ["topic01", "topic03", "not-a-topic"]), (None, [])]
)
def test_batch_equals_reference_on_small_graph(
    small_graph: GraphStore, locale: str | None, interests: list[str]
) -> None:
    result, context = _request(small_graph, 4, locale, interests, steps=30_000, seed=1)
    assert len(result) > 100
    assert np.array_equal(result.degree, np.diff(small_graph.pin_offsets)[result.pins])
    matrix = compute_features(small_graph, result, context, feature_names())
    assert matrix.dtype == np.float32
    assert matrix.shape == (len(result), len(feature_names()))
    np.testing.assert_allclose(
        matrix, reference_features(small_graph, result, context), rtol=1e-6, atol=0
    )
    # The request features must actually vary with the request, or this test checks little.
    column = feature_names().index("user_locale_missing")
    assert matrix[0, column] == (1.0 if locale is None else 0.0)


def test_missing_pin_values_get_defaults_never_nan(holey_graph: GraphStore) -> None:
    result, context = _request(holey_graph, 6, "en", ["topic00", "topic02"], steps=200_000, seed=2)
    matrix = compute_features(holey_graph, result, context, feature_names())
    assert np.isfinite(matrix).all()
    np.testing.assert_allclose(
        matrix, reference_features(holey_graph, result, context), rtol=1e-6, atol=0
    )

    column = {name: j for j, name in enumerate(feature_names())}
    quality_missing = np.isnan(holey_graph.pin_quality[result.pins])
    created_missing = np.isnan(holey_graph.pin_created_at[result.pins])
    locale_missing = holey_graph.pin_locale[result.pins] == len(holey_graph.locales)
    topic_missing = holey_graph.pin_topic[result.pins] == len(holey_graph.topics)
    for missing in (quality_missing, created_missing, locale_missing, topic_missing):
        assert 0 < missing.sum() < len(result), "the walk must reach pins with and without"
    assert np.array_equal(matrix[:, column["pin_quality_missing"]], quality_missing)
    assert (matrix[quality_missing, column["pin_quality"]] == FEATURES["pin_quality"].default).all()
    assert np.array_equal(matrix[:, column["pin_age_missing"]], created_missing)
    assert (matrix[created_missing, column["pin_age_days"]] == -1.0).all()
    assert (matrix[~created_missing, column["pin_age_days"]] >= 0.0).all()
    assert np.array_equal(matrix[:, column["pin_locale_missing"]], locale_missing)
    assert (matrix[locale_missing, column["locale_match"]] == 0.0).all()
    assert (matrix[locale_missing, column["query_locale_share"]] == 0.0).all()
    assert np.array_equal(matrix[:, column["pin_topic_missing"]], topic_missing)
    assert (matrix[topic_missing, column["topic_in_interests"]] == 0.0).all()
    assert (matrix[topic_missing, column["query_topic_share"]] == 0.0).all()


def test_request_without_weight_or_candidates_is_never_nan(small_graph: GraphStore) -> None:
    result, _ = _request(small_graph, 3, "en", ["topic00"], steps=10_000, seed=3)
    zero_weight = _context(small_graph, "en", ["topic00"], result.pins[:2], [0.0, 0.0])
    matrix = compute_features(small_graph, result, zero_weight, feature_names())
    assert np.isfinite(matrix).all()
    np.testing.assert_allclose(
        matrix, reference_features(small_graph, result, zero_weight), rtol=1e-6, atol=0
    )

    no_query = _context(small_graph, None, [], [-1], [1.0])
    empty = walk(small_graph, np.array([-1], np.int32), np.ones(1, np.float32), WalkParams())
    assert len(empty) == 0
    assert compute_features(small_graph, empty, no_query, feature_names()).shape == (
        0,
        len(feature_names()),
    )


def test_subset_and_order_are_respected(small_graph: GraphStore) -> None:
    result, context = _request(small_graph, 4, "de", ["topic02"], steps=20_000, seed=4)
    everything = compute_features(small_graph, result, context, feature_names())
    names = ["topic_in_interests", "walk_score", "pin_age_days", "query_topic_share"]
    subset = compute_features(small_graph, result, context, names)
    assert subset.shape == (len(result), len(names))
    for j, name in enumerate(names):
        assert np.array_equal(subset[:, j], everything[:, feature_names().index(name)]), name


def test_raw_interest_codes_match_clean_ones(small_graph: GraphStore) -> None:
    """The serving path passes codes straight from `topic_code`: repeats and unknowns."""
    result, context = _request(small_graph, 4, "ja", ["topic01", "topic04"], steps=20_000, seed=5)
    raw = RequestContext(
        user_locale=context.user_locale,
        user_interests=np.array(
            [small_graph.topic_code(t) for t in ("topic04", "nope", "topic01", "topic04")],
            dtype=np.int32,
        ),
        query_pins=context.query_pins,
        query_weights=context.query_weights,
        now=NOW,
    )
    assert np.array_equal(
        compute_features(small_graph, result, raw, feature_names()),
        compute_features(small_graph, result, context, feature_names()),
    )


def test_request_context_checks_its_arrays() -> None:
    with pytest.raises(DataError, match="query_weights must be a 1-D float32"):
        RequestContext(0, np.zeros(0, np.int32), np.zeros(1, np.int32), np.ones(1), NOW)
    with pytest.raises(DataError, match="now must be finite"):
        RequestContext(
            0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), math.nan
        )


def test_unknown_or_repeated_names_are_config_errors(small_graph: GraphStore) -> None:
    result, context = _request(small_graph, 2, "en", [], steps=5_000, seed=6)
    with pytest.raises(ConfigError, match="unknown features \\['walk_scroe'\\]") as info:
        compute_features(small_graph, result, context, ["walk_score", "walk_scroe"])
    assert all(name in str(info.value) for name in FEATURES)
    with pytest.raises(ConfigError, match="more than once: \\['walk_score'\\]"):
        check_feature_names(["walk_score", "locale_match", "walk_score"])
    with pytest.raises(ConfigError, match="empty"):
        check_feature_names([])
    assert check_feature_names(["locale_match"]) == ("locale_match",)


def test_check_feature_list_names_the_difference() -> None:
    names = feature_names()
    check_feature_list(names, list(names))
    with pytest.raises(ModelError, match=r"missing features the model needs: \['locale_match'\]"):
        check_feature_list(["walk_score", "locale_match"], ["walk_score"])
    with pytest.raises(ModelError, match=r"extra features .*: \['pin_quality'\]"):
        check_feature_list(["walk_score"], ["walk_score", "pin_quality"])
    with pytest.raises(
        ModelError,
        match=r"missing .*\['from_the_future'\] \(\['from_the_fut"
        r"ure'\] unknown to this server\).*extra .*"
        r"\['walk_visits'\]",
    ):
        check_feature_list(["walk_score", "from_the_future"], ["walk_score", "walk_visits"])
    with pytest.raises(
        ModelError,
        match="order mismatch at column 1: model has 'walk_visits', tenant has 'pin_quality'",
    ):
        check_feature_list(
            ["walk_score", "walk_visits", "pin_quality"],
            ["walk_score", "pin_quality", "walk_visits"],
        )
    with pytest.raises(ModelError, match=r"model lists features more than once: \['walk_score'\]"):
        check_feature_list(["walk_score", "walk_score"], ["walk_score"])


def test_two_thousand_candidates_in_one_batch(holey_graph: GraphStore) -> None:
    """The serving size: one matrix for 2,000 candidates, still equal to the reference.

    The request time lies inside the pins' creation range, so ages are clipped at 0 too.
    """
    a_year_earlier = REFERENCE_EPOCH - 365 * 86_400.0
    result, context = _request(
        holey_graph, 8, "ja", ["topic05"], steps=300_000, seed=7, now=a_year_earlier
    )
    assert len(result) == WalkParams().max_candidates == 2_000
    matrix = compute_features(holey_graph, result, context, feature_names())
    assert matrix.shape == (2_000, len(feature_names()))
    assert matrix.flags.c_contiguous
    created_later = holey_graph.pin_created_at[result.pins] > a_year_earlier
    assert 0 < created_later.sum() < len(result)
    assert (matrix[created_later, feature_names().index("pin_age_days")] == 0.0).all()
    np.testing.assert_allclose(
        matrix, reference_features(holey_graph, result, context), rtol=1e-6, atol=0
    )
