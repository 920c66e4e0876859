"""Pixie walks for one request: validate the query, split the step budget, run the kernels.

The kernels (`walkrank.walks.kernels`) see arrays and scalars only; this module owns
validation, the budget formula, the bias key range, and the memory each call walks in, so
concurrent calls from several threads share nothing mutable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from walkrank.errors import ConfigError, DataError, WalkRankError
from walkrank.graph.store import GraphStore
from walkrank.tenants import MAX_STEPS
from walkrank.walks import kernels

BiasBy = Literal["locale", "locale_topic"]
Counter = Literal["auto", "direct", "hash"]

# Direct counter (a row per pin, at the pin's id) or hash table (rows ~1.25x the steps): both
# cost one scan of their rows to extract the top candidates, so direct only pays off on graphs
# with about as many pins as steps. Measured by benchmarks/walks.py (5-pin query, N = 100k,
# p50): 100k-pin graph direct 2.69 ms, hash 2.97 ms; 1M-pin graph direct 9.3 ms, hash 3.9 ms.
DIRECT_MAX_PINS_PER_STEP = 1

# No query pin stops early before this many pins (or n_p, if fewer) have n_v visits from it,
# whatever its share of the steps: multi-hit boosting adds up square roots of the query pins'
# scaled counts, so a pin with a small share weighs more in the top of the list than its
# share, and one stopped after a few dozen pins had reached n_v adds their scaled-up noise.
# 200 is twice the depth early stopping is judged at (top-100 overlap with the full walk):
# the smallest floor of those measured at 500 / 8 (100, 150, 200) that kept recall@50 within
# 2% of the full walk on both real-data relevance cases (docs/performance.md has the figures);
# it walks more of the steps where queries have many pins, each with a small share.
EARLY_STOP_MIN_PINS = 200


class WalkCancelled(WalkRankError):
    """The walks stopped early because the caller set the cancel flag."""

    def __init__(self, steps: int) -> None:
        super().__init__(f"walk cancelled after {steps:,} steps")
        self.steps = steps


@dataclass(frozen=True)
class WalkParams:
    """Walk settings, shared by every request of a tenant; validated once."""

    steps: int = 100_000
    restart_probability: float = 0.5
    # Pixie's n_p (of the whole query, split like the steps, no pin under
    # EARLY_STOP_MIN_PINS; 0: off) and n_v. 500 / 8 at 100k steps: on the real-data relevance
    # graphs fewer steps at a top-100 overlap above 0.9 with the full walk, recall@50 within
    # 2% of it (docs/performance.md); 2000 / 4 stopped later and kept a noisier (4-visit)
    # boundary.
    early_stop_pins: int = 500
    early_stop_visits: int = 8
    bias_strength: float = 0.0
    bias_by: BiasBy = "locale"
    max_candidates: int = 2000

    def __post_init__(self) -> None:
        def whole(value: object) -> bool:
            return isinstance(value, int | np.integer) and not isinstance(value, bool)

        checks = {
            # int32 visit counters, and a visit table of ~30 bytes per step.
            "steps": whole(self.steps) and 1 <= self.steps <= MAX_STEPS,
            "restart_probability": 0.0 < self.restart_probability <= 1.0,
            "early_stop_pins": whole(self.early_stop_pins) and self.early_stop_pins >= 0,
            "early_stop_visits": whole(self.early_stop_visits) and self.early_stop_visits >= 1,
            "bias_strength": 0.0 <= self.bias_strength <= 1.0,
            "bias_by": self.bias_by in ("locale", "locale_topic"),
            "max_candidates": whole(self.max_candidates) and self.max_candidates >= 1,
        }
        expected = {
            "steps": f"an integer in [1, {MAX_STEPS:,}]",
            "restart_probability": "in (0, 1]",
            "early_stop_pins": "an integer >= 0 (0 = off)",
            "early_stop_visits": "an integer >= 1",
            "bias_strength": "in [0, 1]",
            "bias_by": "'locale' or 'locale_topic'",
            "max_candidates": "an integer >= 1",
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"walk parameter {name}={getattr(self, name)!r}: expected {expected[name]}"
                )


@dataclass(frozen=True, eq=False)
class WalkResult:
    """Candidates of one walk, aligned arrays sorted by boosted score descending.

    Query pins are never candidates. `steps_per_query` and `unknown` refer to positions in
    the request's query (unknown pins walked 0 steps).
    """

    pins: np.ndarray  # int32[k] dense pin ids
    scores: np.ndarray  # float32[k] multi-hit boosted visit score (counts scaled to budgets)
    visits: np.ndarray  # int32[k] raw visits summed over query pins
    query_hits: np.ndarray  # int32[k] number of query pins whose walk reached the pin
    degree: np.ndarray  # int32[k] number of boards of the pin
    steps_walked: int
    steps_per_query: np.ndarray  # int64[q]
    unknown: np.ndarray  # int32 positions in the query whose pin is unknown (-1)
    empty_reason: str | None

    def __len__(self) -> int:
        return int(self.pins.shape[0])


def step_budgets(
    degrees: np.ndarray, weights: np.ndarray, steps: int, max_degree: int
) -> np.ndarray:
    """Pixie's per-query-pin budget `N_q = N * w_q s_q / sum_r w_r s_r`, rounded to integers.

    Weights are shares: only their ratios matter, and the budgets add up to exactly N
    whatever their scale (as long as some pin with boards has a weight > 0), so no weight can
    make a request walk more than its tenant's `walk.steps`. `s_q = deg(q) * (C - log deg(q))`
    with `C = log(max_degree + 1)`: the paper's C = log(max degree) would give the
    highest-degree pin s_q = 0 and no walk at all; the +1 keeps every s_q > 0 and changes C
    by less than 1/max_degree. Pins without boards (or weight 0) get 0. Rounding is
    largest-remainder among the pins with a share.
    """
    degrees = np.asarray(degrees, np.float64)
    weights = np.asarray(weights, np.float64)
    budgets = np.zeros(degrees.shape[0], np.int64)
    c = math.log(max_degree + 1)
    safe = np.maximum(degrees, 1.0)
    scale = np.where(degrees > 0, np.maximum(degrees * (c - np.log(safe)), 0.0), 0.0)
    walks = scale > 0
    top = weights[walks].max(initial=0.0)
    if not top > 0:
        return budgets
    # Over the largest weight of a pin that can walk, those pins' weights are in [0, 1] (no
    # overflow from any finite weight) and that pin's share is its s_q > 0, so the total is.
    share = np.zeros(degrees.shape[0])
    share[walks] = weights[walks] / top * scale[walks]
    real = steps * (share / share.sum())  # each <= steps
    budgets[:] = np.floor(real)
    remainder = steps - int(budgets.sum())
    if remainder > 0:
        order = np.argsort(-(real - budgets), kind="stable")
        order = order[share[order] > 0][:remainder]
        budgets[order] += 1
    return budgets


@dataclass(frozen=True)
class BiasTarget:
    """What a biased step aims at: a locale, and within it a [key_lo, key_hi) bias-key range
    (`key_lo == key_hi`: the whole locale, read from the graph's locale index; a narrower
    range is read from the nodes' key runs)."""

    locale: int
    key_lo: int = 0
    key_hi: int = 0


UNBIASED = BiasTarget(locale=-1)


def bias_target(
    graph: GraphStore, bias_by: BiasBy, user_locale: int, user_topic: int
) -> BiasTarget | None:
    """The neighbours a biased step draws from, for a user's locale and top topic codes.

    None (unbiased) when the user's locale is unknown: biasing toward the "missing locale"
    pins would be noise. An unknown topic under "locale_topic" falls back to the locale.
    """
    n_locales, n_topics = len(graph.locales), len(graph.topics)
    if not -1 <= user_locale <= n_locales:
        raise DataError(f"user_locale code {user_locale} outside [-1, {n_locales}]")
    if not -1 <= user_topic <= n_topics:
        raise DataError(f"user_topic code {user_topic} outside [-1, {n_topics}]")
    if user_locale < 0 or user_locale == n_locales:
        return None
    if bias_by == "locale_topic" and 0 <= user_topic < n_topics:
        key = graph.bias_key(user_locale, user_topic)
        return BiasTarget(user_locale, key, key + 1)
    return BiasTarget(user_locale)


def _table_size(entries: int) -> int:
    """Rows of a visit hash table for at most `entries` distinct pins: a power of two > 1.25x.

    Distinct pins never exceed the steps walked, so the table cannot fill (load <= 0.8 in
    the worst case); measured on the bench graph a walk visits ~0.6 new pins per step, so
    the usual load is ~0.45 and probes stay short, while the table is half the size (and
    half the init and scan) of one sized at 2x.
    """
    return 1 << max(4, int(1.25 * max(entries, 1)).bit_length())


def new_visit_table(rows: int) -> np.ndarray:
    """int32 rows [pin, owner, count, visits] = [EMPTY, EMPTY, 0, 0], one per slot.

    Written as two int64 columns (all-ones is -1 in both int32 halves): 4x faster than
    filling the int32 columns one by one.
    """
    pairs = np.empty((rows, 2), np.int64)
    pairs[:, 0] = -1
    pairs[:, 1] = 0
    return pairs.view(np.int32)


def new_slice_cache(by_key: bool) -> kernels.SliceCache:
    """A request's empty key-slice cache: SLICE_CACHE_ROWS rows a side for a walk by bias
    key, one (unused) otherwise."""
    rows = kernels.SLICE_CACHE_ROWS if by_key else 1
    return kernels.SliceCache(
        np.full((rows, 4), kernels.EMPTY, np.int32), np.full((rows, 4), kernels.EMPTY, np.int32)
    )


def _validate_query(
    graph: GraphStore, query_pins: np.ndarray, query_weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    pins = np.asarray(query_pins)
    weights = np.asarray(query_weights)
    if pins.ndim != 1 or weights.ndim != 1:
        raise DataError(
            f"query_pins and query_weights must be 1-D, got shapes {pins.shape} and {weights.shape}"
        )
    if pins.shape != weights.shape:
        raise DataError(
            f"query_pins has {pins.shape[0]} entries but query_weights has {weights.shape[0]}"
        )
    if pins.size and not np.issubdtype(pins.dtype, np.integer):
        raise DataError(f"query_pins must be integer dense ids, got dtype {pins.dtype}")
    bad = np.flatnonzero((pins < -1) | (pins >= graph.n_pins))
    if bad.size:
        raise DataError(
            f"query pin {int(pins[bad[0]])} at position {int(bad[0])} is not a dense id in "
            f"[0, {graph.n_pins}) nor -1 (unknown)"
        )
    pins = pins.astype(np.int32, copy=False)
    weights = weights.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
    if bad.size:
        raise DataError(
            f"query weight {float(weights[bad[0]])} at position {int(bad[0])} must be finite "
            "and >= 0 (0: the pin walks no steps)"
        )
    return pins, weights


def _empty(query_length: int, unknown: np.ndarray, reason: str) -> WalkResult:
    return WalkResult(
        pins=np.empty(0, np.int32),
        scores=np.empty(0, np.float32),
        visits=np.empty(0, np.int32),
        query_hits=np.empty(0, np.int32),
        degree=np.empty(0, np.int32),
        steps_walked=0,
        steps_per_query=np.zeros(query_length, np.int64),
        unknown=unknown,
        empty_reason=reason,
    )


def walk(
    graph: GraphStore,
    query_pins: np.ndarray,
    query_weights: np.ndarray,
    params: WalkParams,
    *,
    user_locale: int = -1,
    user_topic: int = -1,
    seed: int = 0,
    counter: Counter = "auto",
    cancel: np.ndarray | None = None,
) -> WalkResult:
    """Pixie walk from weighted query pins (dense ids, -1 = unknown, ignored and reported).

    Each known query pin walks its own budget with its own early stopping; the per-pin
    visit counts are combined by multi-hit boosting (a pin repeated in the query counts as
    two query pins). Deterministic for a given seed; the bias applies only when
    `params.bias_strength > 0` and `user_locale` is a known locale code.
    `counter` picks the visit counter ("auto": by DIRECT_MAX_PINS_PER_STEP).
    `cancel` (uint8[1]) lets another thread stop the walks: once it sets `cancel[0]` to
    nonzero they end within a lock-step round and this raises `WalkCancelled`.
    """
    pins, weights = _validate_query(graph, query_pins, query_weights)
    if counter not in ("auto", "direct", "hash"):
        raise ConfigError(f"counter={counter!r}: expected 'auto', 'direct' or 'hash'")
    unknown = np.flatnonzero(pins == -1).astype(np.int32)
    if pins.shape[0] == 0:
        return _empty(0, unknown, "empty query")
    known = np.flatnonzero(pins >= 0)
    if known.shape[0] == 0:
        return _empty(pins.shape[0], unknown, "all query pins unknown")
    target = UNBIASED
    if params.bias_strength > 0:
        target = bias_target(graph, params.bias_by, user_locale, user_topic) or UNBIASED

    known_pins = pins[known]
    degrees = graph.pin_degrees(known_pins)
    max_degree = graph.pin_max_degree
    budgets = np.zeros(pins.shape[0], np.int64)
    budgets[known] = step_budgets(degrees, weights[known], params.steps, max_degree)
    total_budget = int(budgets.sum())
    if total_budget == 0:
        return _empty(
            pins.shape[0], unknown, "no steps to walk: query pins have no boards or zero weight"
        )
    if cancel is None:
        cancel = np.zeros(1, np.uint8)

    direct = counter == "direct" or (
        counter == "auto" and graph.n_pins <= DIRECT_MAX_PINS_PER_STEP * total_budget
    )
    # Distinct pins counted <= min(steps, pins) < the hash table's rows.
    slots = graph.n_pins if direct else _table_size(min(total_budget, graph.n_pins))

    restart_threshold = np.uint64(min(params.restart_probability * 2**32, 2**32))
    bias_threshold = np.uint64(0)
    if target.locale >= 0:
        bias_threshold = np.uint64(min(params.bias_strength * 2**32, 2**32))
    seed64 = np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    graph_arrays, delta_arrays = graph.walk_arrays, graph.delta_arrays

    # Pixie's early stop per query pin, with n_p split like the steps: a pin walking a share s
    # of walk.steps stops once more than max(ceil(s * n_p), min(n_p, EARLY_STOP_MIN_PINS))
    # pins have n_v visits from it (a fixed n_p per pin can never be reached once the budget
    # is split many ways; the floor, see its comment, keeps a small share from stopping on a
    # handful of pins). A pin that stops early has its counts scaled to its budget in the
    # score (`count_scale`), so it keeps its share of the boosting instead of ceding it to
    # the pins that walked on.
    floor = min(params.early_stop_pins, EARLY_STOP_MIN_PINS)
    stop_pins = np.maximum(-(-params.early_stop_pins * budgets // params.steps), floor)
    visits = kernels.VisitTable(
        direct,
        new_visit_table(slots),
        np.zeros(slots, np.float64),
        np.zeros(slots, np.int32),
        np.ones(pins.shape[0], np.float64),  # count_scale
    )
    slices = new_slice_cache(target.key_lo < target.key_hi and bool(bias_threshold > 0))
    steps_per_query = np.zeros(pins.shape[0], np.int64)
    for position in known:
        if budgets[position] == 0:
            continue
        settings = kernels.WalkSettings(
            np.int32(pins[position]),
            np.int32(position),
            np.int64(budgets[position]),
            restart_threshold,
            bias_threshold,
            np.int32(target.locale),
            np.int32(target.key_lo),
            np.int32(target.key_hi),
            np.int64(stop_pins[position]),
            np.int64(params.early_stop_visits),
            seed64,
        )
        steps_per_query[position] = kernels.walk_query_pin(
            *graph_arrays, *delta_arrays, *settings, *visits, *slices, cancel
        )
        if steps_per_query[position]:
            visits.count_scale[position] = budgets[position] / steps_per_query[position]
    if cancel[0]:
        raise WalkCancelled(int(steps_per_query.sum()))

    out = kernels.top_candidates(*visits, known_pins, params.max_candidates, graph.pin_offsets)
    cand_pins, scores, cand_visits, query_hits, cand_degree = out
    if graph.has_delta:  # the kernel counts base boards only
        cand_degree = graph.pin_degrees(cand_pins).astype(np.int32)
    return WalkResult(
        pins=cand_pins,
        scores=scores,
        visits=cand_visits,
        query_hits=query_hits,
        degree=cand_degree,
        steps_walked=int(steps_per_query.sum()),
        steps_per_query=steps_per_query,
        unknown=unknown,
        empty_reason=None if cand_pins.shape[0] else "walks reached no pin besides the query",
    )
