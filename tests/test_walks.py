"""Pixie walks: properties that fail if the walk, the budget, boosting or bias were wrong."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walkrank.cli import main
from walkrank.errors import ConfigError, DataError
from walkrank.graph.build import build_graph
from walkrank.graph.delta import DeltaSegment, Edge
from walkrank.graph.store import DeltaArrays, GraphArrays, GraphStore
from walkrank.walks import WalkParams, WalkResult, kernels, step_budgets, walk
from walkrank.walks.engine import (
    EARLY_STOP_MIN_PINS,
    WalkCancelled,
    new_slice_cache,
    new_visit_table,
)

FIELDS = ("pins", "scores", "visits", "query_hits", "degree", "steps_per_query", "unknown")


def _same(a: WalkResult, b: WalkResult) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS) and (
        a.steps_walked == b.steps_walked and a.empty_reason == b.empty_reason
    )


def _budgets(
    graph: GraphStore, query: np.ndarray, weights: np.ndarray, params: WalkParams
) -> np.ndarray:
    """The query pins' step budgets, as the engine splits them."""
    degrees = np.diff(graph.pin_offsets)[query]
    return step_budgets(degrees, weights, params.steps, int(graph.manifest["degree"]["pin_max"]))


def _query(graph: GraphStore, n: int, seed: int) -> np.ndarray:
    degree = np.diff(graph.pin_offsets)
    rng = np.random.default_rng(seed)
    return rng.choice(np.flatnonzero(degree > 0), n, replace=False).astype(np.int32)


def _walk_one(
    graph: GraphStore,
    pin: int,
    budget: int,
    restart: float,
    seed: int = 3,
    bias: float = 0.0,
    locale: int = -1,
    key_range: tuple[int, int] = (0, 0),
    early_stop_pins: int = 0,
    rows: int | None = None,
    cancel: np.ndarray | None = None,
    query_index: int = 0,
):
    """Kernel-level walk from one pin with a hash table (`rows`: default twice the budget),
    drawing the random streams of position `query_index` in a query; returns
    (steps, {pin: visits})."""
    table = new_visit_table(rows or 1 << (2 * budget - 1).bit_length())
    walk_settings = kernels.WalkSettings(
        np.int32(pin),
        np.int32(query_index),
        np.int64(budget),
        np.uint64(int(restart * 2**32)),
        np.uint64(int(bias * 2**32)),
        np.int32(locale),
        np.int32(key_range[0]),
        np.int32(key_range[1]),
        np.int64(early_stop_pins),
        np.int64(4),
        np.uint64(seed),
    )
    visits = kernels.VisitTable(
        False,
        table,
        np.zeros(table.shape[0]),
        np.zeros(table.shape[0], np.int32),
        np.ones(1),
    )
    done = kernels.walk_query_pin(
        *graph.walk_arrays,
        *graph.delta_arrays,
        *walk_settings,
        *visits,
        *new_slice_cache(key_range[0] < key_range[1]),
        np.zeros(1, np.uint8) if cancel is None else cancel,
    )
    used = table[table[:, 1] == query_index]
    assert np.array_equal(used[:, 2], used[:, 3])  # one query pin: its count is the total
    return done, dict(zip(used[:, 0].tolist(), used[:, 3].tolist(), strict=True))


@pytest.fixture(scope="module")
def two_locale_graph(synthetic_graph: Callable[..., GraphStore]) -> GraphStore:
    """2k pins in locales en / ja; boards mostly keep to one locale (home_share 0.85)."""
    return synthetic_graph(n_topics=4, n_locales=2, seed=3)


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory: pytest.TempPathFactory) -> GraphStore:
    """Hand-made: query pins 1 and 2 (two boards each) whose boards share pins 10..13."""
    edges = [
        (1, 100),
        (1, 101),
        (2, 102),
        (2, 103),
        (10, 100),
        (11, 100),
        (12, 100),
        (10, 101),
        (13, 101),
        (12, 102),
        (13, 102),
        (14, 102),
        (13, 103),
        (15, 103),
        (16, 103),
    ]
    out = tmp_path_factory.mktemp("graphs") / "tiny"
    build_graph(out, {"pin_id": [p for p, _ in edges], "board_id": [b for _, b in edges]})
    return GraphStore.load(out)


# -- kernel ----------------------------------------------------------------------------------


def test_visit_totals_equal_steps_walked(small_graph: GraphStore) -> None:
    pin = int(_query(small_graph, 1, 0)[0])
    for budget in (1, 63, 64, 65, 10_000):
        done, visits = _walk_one(small_graph, pin, budget, restart=0.5)
        assert done == budget
        assert sum(visits.values()) == budget


def test_full_restart_only_reaches_pins_sharing_a_board(small_graph: GraphStore) -> None:
    pin = int(_query(small_graph, 1, 1)[0])
    done, visits = _walk_one(small_graph, pin, 5_000, restart=1.0)
    two_hop = {int(p) for b in small_graph.boards_of(pin) for p in small_graph.pins_of(b)}
    assert set(visits) <= two_hop
    assert len(visits) > 0.8 * len(two_hop)  # 5000 steps cover nearly every neighbour


def test_visit_distribution_matches_plain_reference(small_graph: GraphStore) -> None:
    pin, other = (int(p) for p in _query(small_graph, 2, 2))
    steps = 200_000
    reference = (
        kernels.reference_walk(
            small_graph.pin_offsets,
            small_graph.pin_adj,
            small_graph.board_offsets,
            small_graph.board_adj,
            pin,
            steps,
            0.5,
            7,
        )
        / steps
    )
    fast = np.zeros(small_graph.n_pins)
    for p, v in _walk_one(small_graph, pin, steps, restart=0.5)[1].items():
        fast[p] = v / steps
    elsewhere = np.zeros(small_graph.n_pins)
    for p, v in _walk_one(small_graph, other, steps, restart=0.5)[1].items():
        elsewhere[p] = v / steps
    # Total variation distance: sampling noise alone vs. a walk from a different pin.
    assert 0.5 * np.abs(fast - reference).sum() < 0.06
    assert 0.5 * np.abs(elsewhere - reference).sum() > 0.3


def test_early_stop_counter_stops_only_past_n_p(small_graph: GraphStore) -> None:
    pin = int(_query(small_graph, 1, 3)[0])
    done, visits = _walk_one(small_graph, pin, 50_000, restart=0.5, early_stop_pins=100)
    reached = sum(v >= 4 for v in visits.values())
    assert done < 50_000
    assert reached > 100
    assert sum(visits.values()) == done
    # One lock-step round earlier (the same walk, cut there) n_p had not yet been crossed.
    _, before = _walk_one(small_graph, pin, done - kernels.WALKERS, restart=0.5)
    assert sum(v >= 4 for v in before.values()) <= 100


# -- budget ----------------------------------------------------------------------------------


def test_budget_split_follows_the_formula() -> None:
    degrees = np.array([1, 10, 100, 1000, 0])
    weights = np.array([1.0, 1.0, 2.0, 1.0, 1.0])
    budgets = step_budgets(degrees, weights, 100_000, max_degree=1000)
    c = math.log(1001)
    scale = np.array([d * (c - math.log(d)) if d else 0.0 for d in degrees])
    expected = 100_000 * weights * scale / (weights * scale).sum()
    assert np.all(np.abs(budgets - expected) < 1)
    assert budgets.sum() == 100_000
    assert budgets[3] > 0  # the highest-degree pin still walks
    assert budgets[4] == 0  # a pin without boards cannot
    # Sub-linear: 10x the degree buys less than 10x the steps.
    assert budgets[2] / 2 < 10 * budgets[1]


_WEIGHTS = st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    weights=st.lists(_WEIGHTS, min_size=1, max_size=12),
    degrees=st.lists(st.integers(0, 5000), min_size=12, max_size=12),
    steps=st.integers(1, 10_000_000),
    exponent=st.integers(-1000, 1000),
)
def test_weights_are_shares_of_exactly_the_step_budget(weights, degrees, steps, exponent) -> None:
    """Issue 12: the budgets add up to N for any positive finite weights, never overflow,
    and do not depend on the weights' scale (1e20 once made the total negative). Scaling by
    a power of two is exact, so the budgets must be identical."""
    weights = np.array(weights)
    degrees = np.array(degrees[: len(weights)])
    budgets = step_budgets(degrees, weights, steps, max_degree=5000)
    assert budgets.dtype == np.int64 and np.all(budgets >= 0)
    assert budgets.sum() == (steps if degrees.any() else 0)
    assert np.all(budgets[degrees == 0] == 0)
    with np.errstate(over="ignore", under="ignore"):
        scaled = weights * 2.0**exponent
    if (
        np.all(np.isfinite(scaled))
        and np.all(scaled >= np.finfo(np.float64).tiny)
        and np.all(weights >= np.finfo(np.float64).tiny)
    ):
        assert np.array_equal(step_budgets(degrees, scaled, steps, max_degree=5000), budgets)


def test_the_issue_weights_split_like_their_ratio() -> None:
    degrees = np.array([40, 7])
    budgets = step_budgets(degrees, np.array([1e20, 1.0]), 100_000, max_degree=50)
    assert list(budgets) == [100_000, 0]
    # A pin that cannot walk (no boards) does not scale the others, however heavy.
    budgets = step_budgets(
        np.array([0, 40, 7]), np.array([1e300, 1e-300, 1e-300]), 10, max_degree=50
    )
    assert budgets.sum() == 10 and budgets[0] == 0
    assert (
        np.abs(
            step_budgets(degrees, np.array([3e7, 1e7]), 100_000, max_degree=50)
            - step_budgets(degrees, np.array([3.0, 1.0]), 100_000, max_degree=50)
        ).max()
        <= 1
    )


def test_huge_and_tiny_weights_walk_the_tenant_budget(small_graph: GraphStore) -> None:
    """Issue 12: weight 1e20 wedged the server, 1e15 returned no candidates, 5000 walked
    5000x the budget."""
    query = _query(small_graph, 2, 5)
    params = WalkParams(steps=20_000, early_stop_pins=0)
    for weights in ([1e20, 1.0], [1e15, 1.0], [5000.0, 1.0], [1e-30, 1e-30], [3e38, 3e38]):
        result = walk(small_graph, query, np.array(weights, np.float32), params, seed=1)
        assert result.steps_walked == params.steps, weights
        assert len(result) > 0 and result.empty_reason is None, weights
    same = walk(small_graph, query, np.array([1e-30, 1e-30]), params, seed=1)
    assert _same(same, walk(small_graph, query, np.ones(2), params, seed=1))


def test_a_full_hash_table_raises_instead_of_probing_forever(small_graph: GraphStore) -> None:
    pin = int(_query(small_graph, 1, 6)[0])
    with pytest.raises(ValueError, match="visit table full"):
        _walk_one(small_graph, pin, 5_000, restart=0.1, rows=16)


def test_a_set_cancel_flag_stops_the_walk(small_graph: GraphStore) -> None:
    pin = int(_query(small_graph, 1, 7)[0])
    done, visits = _walk_one(small_graph, pin, 5_000, restart=0.5, cancel=np.ones(1, np.uint8))
    assert done == 0 and not visits
    query = _query(small_graph, 3, 7)
    with pytest.raises(WalkCancelled, match="walk cancelled after 0 steps"):
        walk(small_graph, query, np.ones(3), WalkParams(), cancel=np.ones(1, np.uint8))


def test_engine_splits_unit_weight_budget_exactly(small_graph: GraphStore) -> None:
    query = _query(small_graph, 4, 4)
    params = WalkParams(steps=30_001, early_stop_pins=0)
    result = walk(small_graph, query, np.ones(4, np.float32), params, seed=1)
    degree = np.diff(small_graph.pin_offsets)[query]
    expected = step_budgets(degree, np.ones(4), 30_001, int(np.diff(small_graph.pin_offsets).max()))
    assert np.array_equal(result.steps_per_query, expected)
    assert result.steps_walked == 30_001


# -- early stopping, boosting, bias ----------------------------------------------------------


def test_early_stopping_cuts_steps_and_keeps_top_results(small_graph: GraphStore) -> None:
    overlaps, fractions = [], []
    for i in range(8):
        query = _query(small_graph, 3, 10 + i)
        weights = np.ones(3, np.float32)
        full = walk(
            small_graph, query, weights, WalkParams(steps=50_000, early_stop_pins=0), seed=i
        )
        early = walk(small_graph, query, weights, WalkParams(steps=50_000), seed=i)
        overlaps.append(np.intersect1d(full.pins[:100], early.pins[:100]).size / 100)
        fractions.append(early.steps_walked / full.steps_walked)
    # The defaults (n_p 500, n_v 8). Paper: 84% overlap at a third of the steps; measured
    # here 0.81 at 0.30.
    assert np.mean(fractions) < 0.45
    assert np.mean(overlaps) > 0.75


def test_early_stop_pins_are_split_like_the_steps(small_graph: GraphStore) -> None:
    """Each query pin stops by Pixie's rule with n_p scaled by its share of the steps, so a
    many-pin query stops early where an unsplit n_p could never be reached."""
    query = _query(small_graph, 5, 30)
    params = WalkParams(steps=20_000, early_stop_pins=1_200, early_stop_visits=4)
    # Weights that even out the degree-scaled shares: every pin's share of n_p clears the floor.
    weights = 1.0 / _budgets(small_graph, query, np.ones(5), params)
    result = walk(small_graph, query, weights, params, seed=7)
    budgets = _budgets(small_graph, query, weights, params)
    # Unsplit, each pin would need 1,200 pins x 4 visits: more visits than its budget.
    assert params.early_stop_pins * params.early_stop_visits > budgets.max()
    assert (result.steps_per_query < budgets).all()
    for position, pin in enumerate(query):
        share_of_n_p = math.ceil(params.early_stop_pins * budgets[position] / params.steps)
        assert share_of_n_p > EARLY_STOP_MIN_PINS  # the floor plays no part here
        alone, _ = _walk_one(
            small_graph,
            int(pin),
            int(budgets[position]),
            restart=0.5,
            seed=7,
            early_stop_pins=share_of_n_p,
            query_index=position,
        )
        assert result.steps_per_query[position] == alone


def test_a_small_share_waits_for_the_floor_of_pins(small_graph: GraphStore) -> None:
    """A query pin whose share of n_p is under EARLY_STOP_MIN_PINS stops only once that many
    pins reached n_v, later than its share alone would have."""
    query = _query(small_graph, 2, 32)
    weights = np.array([1.0, 0.05])
    params = WalkParams(steps=20_000, early_stop_pins=500, early_stop_visits=4)
    result = walk(small_graph, query, weights, params, seed=5)
    budgets = _budgets(small_graph, query, weights, params)
    share_of_n_p = math.ceil(params.early_stop_pins * budgets[1] / params.steps)
    assert share_of_n_p < EARLY_STOP_MIN_PINS
    steps = {
        stop_pins: _walk_one(
            small_graph,
            int(query[1]),
            int(budgets[1]),
            restart=0.5,
            seed=5,
            early_stop_pins=stop_pins,
            query_index=1,
        )[0]
        for stop_pins in (share_of_n_p, EARLY_STOP_MIN_PINS)
    }
    assert result.steps_per_query[1] == steps[EARLY_STOP_MIN_PINS]
    assert steps[share_of_n_p] < steps[EARLY_STOP_MIN_PINS]


def test_a_pin_that_stops_early_keeps_its_share_of_the_score(small_graph: GraphStore) -> None:
    """Score = (sum_q sqrt(visits from q * budget_q / steps_q))**2: a stopped pin's counts
    are scaled to its budget, so it does not cede its weight to the pins that walked on."""
    query = _query(small_graph, 2, 31)
    params = WalkParams(
        steps=20_000, early_stop_pins=300, early_stop_visits=4, max_candidates=10**6
    )
    both = walk(small_graph, query, np.ones(2), params, seed=4)
    budgets = _budgets(small_graph, query, np.ones(2), params)
    steps = both.steps_per_query
    assert steps[0] < budgets[0] and steps[1] < budgets[1]
    assert steps[0] * budgets[1] != steps[1] * budgets[0]  # the pins stopped at unlike shares
    visits = []
    for position in range(2):
        # The same walk cut where it stopped: the same position, so the same random streams.
        alone = walk(
            small_graph,
            np.where(np.arange(2) == position, query, -1),
            np.ones(2),
            WalkParams(steps=int(steps[position]), early_stop_pins=0, max_candidates=10**6),
            seed=4,
        )
        visits.append(dict(zip(alone.pins.tolist(), alone.visits.tolist(), strict=True)))
    for pin, score, raw in zip(both.pins.tolist(), both.scores, both.visits, strict=True):
        counts = [visits[q].get(pin, 0) for q in range(2)]
        expected = (
            sum(math.sqrt(c * b / s) for c, b, s in zip(counts, budgets, steps, strict=True)) ** 2
        )
        assert score == pytest.approx(expected, rel=1e-6)
        assert raw == sum(counts)  # visits stay raw counts


def test_multi_hit_boosting_follows_its_formula(tiny_graph: GraphStore) -> None:
    q1, q2 = (int(p) for p in tiny_graph.pin_index([1, 2]))
    params = WalkParams(steps=2_000, early_stop_pins=0, max_candidates=100)
    both = walk(tiny_graph, np.array([q1, q2], np.int32), np.ones(2, np.float32), params, seed=5)
    assert list(both.steps_per_query) == [1_000, 1_000]  # equal degrees: equal budgets
    # The same walks one at a time: same positions in the query, so the same random streams.
    half = dataclasses.replace(params, steps=1_000)
    alone1 = walk(tiny_graph, np.array([q1, -1], np.int32), np.ones(2), half, seed=5)
    alone2 = walk(tiny_graph, np.array([-1, q2], np.int32), np.ones(2), half, seed=5)
    v1 = dict(zip(alone1.pins.tolist(), alone1.visits.tolist(), strict=True))
    v2 = dict(zip(alone2.pins.tolist(), alone2.visits.tolist(), strict=True))
    assert set(both.pins.tolist()) == (set(v1) | set(v2)) - {q1, q2}
    for pin, score, visits, hits in zip(
        both.pins, both.scores, both.visits, both.query_hits, strict=True
    ):
        a, b = v1.get(int(pin), 0), v2.get(int(pin), 0)
        assert score == pytest.approx((math.sqrt(a) + math.sqrt(b)) ** 2, rel=1e-6)
        assert visits == a + b
        assert hits == (a > 0) + (b > 0)
    # With every walk one step long, only pins 12 and 13 (on boards of both query pins) are
    # reached twice, and they outrank pins with as many visits from one query pin.
    one_step = WalkParams(steps=2_000, restart_probability=1.0, early_stop_pins=0)
    short = walk(tiny_graph, np.array([q1, q2], np.int32), np.ones(2, np.float32), one_step)
    shared = set(tiny_graph.pin_index([12, 13]).tolist())
    assert {int(p) for p, h in zip(short.pins, short.query_hits, strict=True) if h == 2} == shared
    assert set(short.pins[:2].tolist()) == shared


def test_bias_raises_matching_locale_share(two_locale_graph: GraphStore) -> None:
    graph = two_locale_graph
    ja = graph.locale_code("ja")
    degree = np.diff(graph.pin_offsets)
    query = np.flatnonzero((graph.pin_locale != ja) & (degree > 0))[:5].astype(np.int32)
    weights = np.ones(5, np.float32)

    def ja_share(strength: float) -> float:
        params = WalkParams(steps=20_000, bias_strength=strength, max_candidates=200)
        result = walk(graph, query, weights, params, user_locale=ja, seed=1)
        return float(np.mean(graph.pin_locale[result.pins] == ja))

    unbiased, biased = ja_share(0.0), ja_share(0.5)
    assert unbiased < 0.2
    assert biased > 5 * unbiased
    assert ja_share(1.0) > biased


def test_bias_by_locale_and_topic_narrows_further(two_locale_graph: GraphStore) -> None:
    graph = two_locale_graph
    ja, topic = graph.locale_code("ja"), 2
    query = _query(graph, 5, 6)
    weights = np.ones(5, np.float32)

    def visit_shares(bias_by: str) -> tuple[float, float]:
        params = WalkParams(steps=20_000, bias_strength=1.0, bias_by=bias_by, max_candidates=10**6)
        result = walk(graph, query, weights, params, user_locale=ja, user_topic=topic, seed=1)
        in_locale = graph.pin_locale[result.pins] == ja
        exact = in_locale & (graph.pin_topic[result.pins] == topic)
        total = result.visits.sum()
        return result.visits[in_locale].sum() / total, result.visits[exact].sum() / total

    locale_share, locale_exact = visit_shares("locale")
    topic_locale_share, topic_exact = visit_shares("locale_topic")
    assert locale_share > 0.9 and topic_locale_share > 0.8
    assert topic_exact > 0.7
    assert topic_exact > 2 * locale_exact


def test_bias_falls_back_to_uniform_when_no_neighbour_matches(small_graph: GraphStore) -> None:
    pin = int(_query(small_graph, 1, 5)[0])
    locale = int(small_graph.pin_locale[pin])
    uniform = _walk_one(small_graph, pin, 5_000, restart=0.5)
    # No neighbour has a key in this range: every biased step must fall back to uniform,
    # drawing the same neighbours from the same random numbers.
    nothing = (10**6, 10**6 + 1)
    assert (
        _walk_one(small_graph, pin, 5_000, restart=0.5, bias=1.0, locale=locale, key_range=nothing)
        == uniform
    )
    # No locale (-1): unbiased whatever the strength.
    assert _walk_one(small_graph, pin, 5_000, restart=0.5, bias=1.0) == uniform
    # The locale alone does change the walk.
    assert _walk_one(small_graph, pin, 5_000, restart=0.5, bias=1.0, locale=locale) != uniform


def test_locale_index_and_key_search_take_the_same_slice(small_graph: GraphStore) -> None:
    """A key range covering the whole locale is binary-searched (and cached), the locale alone
    is read from the locale index: the walks draw the same neighbours."""
    n_topics = len(small_graph.topics)
    for pin in _query(small_graph, 3, 8):
        locale = int(small_graph.pin_locale[pin])
        whole_locale = (locale * (n_topics + 1), (locale + 1) * (n_topics + 1))
        by_index = _walk_one(small_graph, int(pin), 5_000, restart=0.3, bias=0.7, locale=locale)
        by_search = _walk_one(
            small_graph,
            int(pin),
            5_000,
            restart=0.3,
            bias=0.7,
            locale=locale,
            key_range=whole_locale,
        )
        assert by_index == by_search


# -- contract: determinism, exclusion, threads, edge cases -----------------------------------


def test_same_seed_same_result_different_seed_different(small_graph: GraphStore) -> None:
    query = _query(small_graph, 3, 20)
    weights = np.array([1.0, 0.5, 2.0], np.float32)
    params = WalkParams(steps=20_000)
    first = walk(small_graph, query, weights, params, seed=42)
    assert _same(first, walk(small_graph, query, weights, params, seed=42))
    other = walk(small_graph, query, weights, params, seed=43)
    assert not np.array_equal(first.visits, other.visits)


def test_kernel_parameters_are_the_named_groups() -> None:
    """Callers spread the groups into the kernels: their fields must be the parameters."""
    groups = (
        GraphArrays,
        DeltaArrays,
        kernels.WalkSettings,
        kernels.VisitTable,
        kernels.SliceCache,
    )
    walk_names = tuple(inspect.signature(kernels.walk_query_pin.py_func).parameters)
    assert walk_names == (*(name for group in groups for name in group._fields), "cancel")
    top_names = tuple(inspect.signature(kernels.top_candidates.py_func).parameters)
    assert top_names[: len(kernels.VisitTable._fields)] == kernels.VisitTable._fields


def test_direct_and_hash_counters_agree(small_graph: GraphStore) -> None:
    query = _query(small_graph, 3, 21)
    weights = np.ones(3, np.float32)
    params = WalkParams(steps=20_000, early_stop_pins=300)
    direct = walk(small_graph, query, weights, params, seed=9, counter="direct")
    hashed = walk(small_graph, query, weights, params, seed=9, counter="hash")
    assert _same(direct, hashed)


def test_result_is_sorted_and_top_k_is_a_prefix(small_graph: GraphStore) -> None:
    query = _query(small_graph, 2, 22)
    weights = np.ones(2, np.float32)
    everything = walk(small_graph, query, weights, WalkParams(steps=20_000, max_candidates=10**6))
    top = walk(small_graph, query, weights, WalkParams(steps=20_000, max_candidates=50))
    assert np.all(np.diff(everything.scores) <= 0)
    assert len(top) == 50
    assert np.array_equal(top.pins, everything.pins[:50])
    assert np.array_equal(top.degree, np.diff(small_graph.pin_offsets)[top.pins])


def test_query_pins_never_come_back(small_graph: GraphStore) -> None:
    query = _query(small_graph, 5, 23)
    result = walk(
        small_graph, query, np.ones(5, np.float32), WalkParams(steps=50_000, max_candidates=10**6)
    )
    assert len(result) > 100
    assert not np.isin(query, result.pins).any()


def test_concurrent_walks_match_sequential(small_graph: GraphStore) -> None:
    queries = [_query(small_graph, 3, 30 + i) for i in range(8)]
    params = WalkParams(steps=30_000)

    def run(i: int) -> WalkResult:
        return walk(small_graph, queries[i], np.ones(3, np.float32), params, seed=i)

    sequential = [run(i) for i in range(8)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        concurrent = list(pool.map(run, range(8)))
    assert all(_same(a, b) for a, b in zip(sequential, concurrent, strict=True))


def test_unknown_pins_are_ignored_and_reported(small_graph: GraphStore) -> None:
    query = _query(small_graph, 2, 24)
    mixed = np.array([-1, query[0], -1, query[1]], np.int32)
    result = walk(small_graph, mixed, np.ones(4, np.float32), WalkParams(steps=10_000), seed=1)
    clean = walk(
        small_graph,
        np.array([-1, query[0], -1, query[1]], np.int32),
        np.array([0, 1, 0, 1], np.float32),
        WalkParams(steps=10_000),
        seed=1,
    )
    assert list(result.unknown) == [0, 2]
    assert list(result.steps_per_query[[0, 2]]) == [0, 0]
    assert result.empty_reason is None and _same(result, clean)


@pytest.mark.parametrize(
    ("pins", "weights", "reason"),
    [
        ([], [], "empty query"),
        ([-1, -1], [1.0, 1.0], "all query pins unknown"),
        ([0], [0.0], "no steps to walk: query pins have no boards or zero weight"),
    ],
)
def test_empty_results_say_why(small_graph: GraphStore, pins, weights, reason) -> None:
    result = walk(
        small_graph, np.array(pins, np.int32), np.array(weights, np.float32), WalkParams()
    )
    assert len(result) == 0 and result.steps_walked == 0
    assert result.empty_reason == reason


@pytest.mark.parametrize(
    ("pins", "weights", "message"),
    [
        ([0, 1], [1.0], "query_pins has 2 entries but query_weights has 1"),
        ([0, 10**6], [1.0, 1.0], "query pin 1000000 at position 1"),
        ([0, 2**32], [1.0, 1.0], "query pin 4294967296 at position 1"),
        ([0, -2], [1.0, 1.0], "query pin -2 at position 1"),
        ([0], [-1.0], "query weight -1.0 at position 0"),
        ([0], [float("nan")], "query weight nan at position 0"),
    ],
)
def test_bad_queries_are_refused(small_graph: GraphStore, pins, weights, message) -> None:
    with pytest.raises(DataError, match=message):
        walk(small_graph, np.array(pins), np.array(weights, np.float32), WalkParams())


def test_bad_user_codes_and_params_are_refused(small_graph: GraphStore) -> None:
    query, weights = np.array([0], np.int32), np.ones(1, np.float32)
    with pytest.raises(DataError, match="user_locale code 99"):
        walk(small_graph, query, weights, WalkParams(bias_strength=0.5), user_locale=99)
    with pytest.raises(ConfigError, match="counter='fast'"):
        walk(small_graph, query, weights, WalkParams(), counter="fast")
    for field, value in [
        ("steps", 0),
        ("steps", 2.5),
        ("steps", 10**9),
        ("early_stop_pins", -1),
        ("restart_probability", 0.0),
        ("bias_strength", 1.5),
        ("bias_by", "topic"),
        ("early_stop_visits", 0),
        ("max_candidates", 0),
    ]:
        with pytest.raises(ConfigError, match=f"walk parameter {field}="):
            WalkParams(**{field: value})


# -- CLI -------------------------------------------------------------------------------------


def test_cli_walk_prints_candidates_with_external_ids(
    small_graph: GraphStore, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = small_graph.pin_external(_query(small_graph, 2, 40)).tolist()
    pins = ",".join(str(i) for i in ids + ["no-such-pin"])
    code = main(
        [
            "walk",
            "--graph",
            str(small_graph.path),
            "--pins",
            pins,
            "--weights",
            "2,2,1",
            "--steps",
            "5000",
            "--top",
            "5",
            "--seed",
            "3",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unknown"] == ["no-such-pin"]
    assert len(out["candidates"]) == 5
    first = out["candidates"][0]
    assert set(first) == {"pin", "score", "visits", "query_hits", "degree"}
    assert first["pin"] in small_graph.pin_external(np.arange(small_graph.n_pins)).tolist()
    assert first["pin"] not in ids
    assert out["steps_walked"] == 5000  # weights are shares of --steps, whatever their scale


def test_cli_walk_table_and_errors(
    small_graph: GraphStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pin = str(small_graph.pin_external([int(_query(small_graph, 1, 41)[0])])[0])
    assert (
        main(
            [
                "walk",
                "--graph",
                str(small_graph.path),
                "--pins",
                pin,
                "--steps",
                "2000",
                "--locale",
                "ja",
                "--bias",
                "0.8",
                "--top",
                "3",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "score" in table and "visits" in table and len(table.strip().splitlines()) >= 4
    assert main(["walk", "--graph", str(small_graph.path), "--pins", pin, "--weights", "1,2"]) == 2
    assert "--weights has 2 values but --pins has 1" in capsys.readouterr().err
    assert main(["walk", "--graph", str(tmp_path / "missing"), "--pins", pin]) == 2


def test_biased_steps_draw_real_time_delta_neighbours(two_locale_graph: GraphStore) -> None:
    """A pin saved in real time onto boards whose locale slice is not empty: every step of a
    fully biased walk draws from that slice, so only a biased draw that reads the board's
    delta list reaches it, about once in (slice + 1) arrivals at such a board."""
    graph = two_locale_graph
    ja = graph.locale_code("ja")
    ends = graph.board_locale_ends.astype(np.int64)
    board_slice = ends[:, ja] - (ends[:, ja - 1] if ja > 0 else 0)
    degree = np.diff(graph.pin_offsets)
    candidates = np.flatnonzero((graph.pin_locale == ja) & (degree >= 4))
    query = int(next(p for p in candidates if (board_slice[graph.boards_of(p)] > 0).all()))
    boards = graph.boards_of(query)
    ja_boards = boards[graph.board_locale[boards] == ja]
    assert ja_boards.size and (board_slice[boards] > 0).all()
    delta = DeltaSegment(graph, max_edges=1_000, flush_s=3600.0)
    delta.add([Edge("987654321", str(b)) for b in graph.board_external(boards)])
    delta.publish()
    live = delta.view()
    delta.close()
    new = int(live.pin_index(["987654321"])[0])
    steps = 20_000

    def new_pin_visits(bias_by: str) -> int:
        params = WalkParams(
            steps=steps, early_stop_pins=0, bias_strength=1.0, bias_by=bias_by, max_candidates=10**6
        )
        result = walk(
            live,
            np.array([query], np.int32),
            np.ones(1),
            params,
            user_locale=ja,
            user_topic=int(graph.pin_topic[query]),
            seed=4,
        )
        return int(result.visits[result.pins == new].sum())

    # Half the steps start at the query pin (restart 0.5) and go to one of its ja boards.
    first_hop = 0.5 * steps * np.mean(1.0 / (board_slice[ja_boards] + 1))
    assert new_pin_visits("locale") > 0.7 * first_hop
    assert new_pin_visits("locale_topic") > 0
