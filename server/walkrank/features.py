"""The feature registry: one feature set shared by every tenant, computed per candidate batch.

`compute_features` turns one walk result into a float32 matrix (candidates x features) with
whole-batch numpy operations, never a Python loop over candidates: it sits on the request path
between the walk and the scorer. The matrix is never NaN: each feature has an explicit default
for a missing input, and the candidate log stores exactly the matrix that was served, so
training reads the same values the model sees in serving.

Categories (locale, topic) are never fed as raw codes: a code means something else in every
graph's vocabulary, and a tree would split on arbitrary code ranges. The registry offers match
and share features instead (locale match, topic in the user's interests, share of query pins
on the candidate's topic), plus `*_missing` indicators. docs/features.md lists every feature.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from walkrank.errors import ConfigError, DataError, ModelError
from walkrank.feature_kernels import edge_time_stats

if TYPE_CHECKING:
    from walkrank.graph.store import GraphStore
    from walkrank.walks.engine import WalkResult

SECONDS_PER_DAY = 86_400.0
GROUPS = ("graph", "pin", "user", "query", "cross", "request", "source")

#: Features a tenant names by pattern (docs/features.md): `pin.<column>` reads an extra numeric
#: column of the graph's pin table, `request.<name>` a value the request sends in its
#: `features` map, `source.<name>` is 1 for candidates from that generator ("walk": the walk,
#: any other: the request's extra candidates). Only `pin.` and `request.` take a default.
DECLARED_RE = re.compile(r"(?P<kind>pin|request|source)\.(?P<name>[A-Za-z0-9_]{1,64})")
DEFAULTABLE = ("pin", "request")
WALK_SOURCE = "walk"
#: `pin_edges_last_<N>d` (and `..._share`): the candidate's edges created in the N days up to
#: the request time, N in 1..MAX_WINDOW_DAYS.
WINDOW_RE = re.compile(r"pin_edges_last_(?P<days>[0-9]{1,5})d(?P<share>_share)?")
MAX_WINDOW_DAYS = 36_500
#: `<feature>_rank`, for a built-in or `pin_edges_last_<N>d[_share]` feature: the candidate's
#: percentile among the request's candidates (1 = the highest value, ties share their mean
#: rank). Counts and walk scores change scale as the graph grows and with the step budget; a
#: model on ranks reads the same inputs from one graph version, period or budget to the next.
RANK_SUFFIX = "_rank"


@dataclass(frozen=True)
class FeatureSpec:
    """One named feature: `default` is the value served whenever its input is missing.

    `standard` features make up `feature_names()`, the list of a tenant that names none."""

    name: str
    group: str
    default: float
    description: str
    standard: bool = True


@dataclass(frozen=True, eq=False)
class RequestContext:
    """What one request says about its user and query, in the graph's codes.

    `user_locale` is a code in `graph.locales` (missing = len(graph.locales));
    `user_interests` holds distinct known topic codes; `query_pins` holds only known dense
    pins, aligned with `query_weights`; `now` is the request time in epoch seconds.
    """

    user_locale: int
    user_interests: np.ndarray
    query_pins: np.ndarray
    query_weights: np.ndarray
    now: float
    # <name> -> value of the `request.<name>` features the request sent (declared, finite).
    features: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require_array("user_interests", self.user_interests, np.int32)
        _require_array("query_pins", self.query_pins, np.int32)
        _require_array("query_weights", self.query_weights, np.float32)
        if self.query_pins.shape != self.query_weights.shape:
            raise DataError(
                f"request: query_pins has {self.query_pins.size} entries but query_weights "
                f"has {self.query_weights.size}"
            )
        if not np.isfinite(self.now):
            raise DataError(f"request: now must be finite epoch seconds, got {self.now!r}")


def _require_array(field: str, value: object, dtype: type) -> None:
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype != dtype:
        shown = getattr(value, "dtype", type(value).__name__)
        raise DataError(f"request: {field} must be a 1-D {np.dtype(dtype).name} array, got {shown}")


@dataclass(frozen=True, eq=False)
class CandidateSources:
    """Which generator each candidate came from: `codes[i]` indexes `names`."""

    names: tuple[str, ...]
    codes: np.ndarray


class _Batch:
    """Inputs of one `compute_features` call; shared intermediates are computed at most once."""

    def __init__(
        self,
        graph: GraphStore,
        walk: WalkResult,
        request: RequestContext,
        windows_days: tuple[int, ...],
        sources: CandidateSources | None,
    ) -> None:
        self.graph = graph
        self.walk = walk
        self.request = request
        self.pins = walk.pins
        self.n_locales = len(graph.locales)
        self.n_topics = len(graph.topics)
        self.windows_days = windows_days
        self.sources = sources

    @cached_property
    def edge_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(window counts, edges at the request time, first and last edge time) per
        candidate from the graph's edge times; None when the graph has none."""
        times = self.graph.pin_edge_times
        if times is None:
            return None
        n = self.pins.size
        counts = np.empty((n, len(self.windows_days)), dtype=np.int64)
        at_request = np.empty(n, dtype=np.int64)
        first = np.empty(n, dtype=np.float64)
        last = np.empty(n, dtype=np.float64)
        windows_s = np.asarray(self.windows_days, dtype=np.float64) * SECONDS_PER_DAY
        edge_time_stats(
            self.graph.pin_offsets,
            times,
            self.pins,
            float(self.request.now),
            windows_s,
            counts,
            at_request,
            first,
            last,
        )
        return counts, at_request, first, last

    def edge_window(self, days: int) -> np.ndarray:
        stats = self.edge_stats
        if stats is None:
            return np.zeros(self.pins.size)
        return stats[0][:, self.windows_days.index(days)]

    def edge_age_days(self, which: int, default: float) -> np.ndarray:
        """Days from the first (which=2) or last (3) edge at or before the request time."""
        stats = self.edge_stats
        if stats is None:
            return np.full(self.pins.size, default)
        moment = stats[which]
        age = np.maximum((self.request.now - moment) / SECONDS_PER_DAY, 0.0)
        return _fill(np.isnan(moment), age, default)

    @cached_property
    def locale(self) -> np.ndarray:
        return self.graph.pin_values(self.graph.pin_locale, self.pins, self.n_locales)

    @cached_property
    def topic(self) -> np.ndarray:
        return self.graph.pin_values(self.graph.pin_topic, self.pins, self.n_topics)

    @cached_property
    def quality(self) -> np.ndarray:
        return self.graph.pin_values(self.graph.pin_quality, self.pins, np.nan)

    @cached_property
    def created_at(self) -> np.ndarray:
        return self.graph.pin_values(self.graph.pin_created_at, self.pins, np.nan)

    @cached_property
    def interested(self) -> np.ndarray:
        """bool[n_topics + 1]: topic code -> in the user's interests.

        Only real topic codes count, so unknown (missing-code) or repeated interests, as the
        serving path passes them from `topic_code`, give the same features as the cleaned
        codes, and the missing code never matches a pin without a topic.
        """
        interests = self.request.user_interests
        mask = np.zeros(self.n_topics + 1, dtype=bool)
        mask[interests[(interests >= 0) & (interests < self.n_topics)]] = True
        return mask

    @cached_property
    def query_weight_total(self) -> float:
        return float(self.request.query_weights.sum(dtype=np.float64))

    def query_share(self, pin_codes: np.ndarray, candidate_codes: np.ndarray, n_codes: int):
        """Weighted share of query pins whose code equals each candidate's code.

        A weighted histogram of the query pins' codes, read at the candidates' codes: O(k + q).
        The missing code (`n_codes`) never matches, so it is zeroed.
        """
        if self.query_weight_total <= 0.0:
            return np.zeros(self.pins.size)
        query_codes = self.graph.pin_values(pin_codes, self.request.query_pins, n_codes)
        histogram = np.bincount(
            query_codes, weights=self.request.query_weights, minlength=n_codes + 1
        )
        histogram[n_codes] = 0.0
        return histogram[candidate_codes] / self.query_weight_total


_COMPUTE: dict[str, Callable[[_Batch], np.ndarray]] = {}
_SPECS: dict[str, FeatureSpec] = {}


def _feature(name: str, group: str, default: float, description: str, standard: bool = True):
    def register(compute: Callable[[_Batch], np.ndarray]) -> Callable[[_Batch], np.ndarray]:
        _SPECS[name] = FeatureSpec(name, group, float(default), description, standard)
        _COMPUTE[name] = compute
        return compute

    return register


def _fill(missing: np.ndarray, value: np.ndarray, default: float) -> np.ndarray:
    return np.where(missing, default, value)


# --- graph: from the walk ------------------------------------------------------------------


@_feature("walk_score", "graph", 0.0, "multi-hit boosted visit score (sum_q sqrt V_q)^2")
def _walk_score(b: _Batch) -> np.ndarray:
    return b.walk.scores


@_feature("walk_visits", "graph", 0.0, "raw visit count summed over query pins")
def _walk_visits(b: _Batch) -> np.ndarray:
    return b.walk.visits


@_feature("walk_query_hits", "graph", 0.0, "how many query pins' walks reached the candidate")
def _walk_query_hits(b: _Batch) -> np.ndarray:
    return b.walk.query_hits


@_feature(
    "walk_query_hit_share",
    "graph",
    0.0,
    "query hits / number of known query pins (0 without query pins)",
)
def _walk_query_hit_share(b: _Batch) -> np.ndarray:
    n_query = b.request.query_pins.size
    if n_query == 0:
        return np.zeros(b.pins.size)
    return b.walk.query_hits / n_query


@_feature(
    "walk_score_share",
    "graph",
    0.0,
    "walk score / sum of the request's candidate scores: comparable across step budgets",
)
def _walk_score_share(b: _Batch) -> np.ndarray:
    total = float(b.walk.scores.sum(dtype=np.float64))
    if total <= 0.0:
        return np.zeros(b.pins.size)
    return b.walk.scores / np.float64(total)


@_feature("candidate_degree", "graph", 0.0, "number of boards the candidate pin is on")
def _candidate_degree(b: _Batch) -> np.ndarray:
    return b.walk.degree


# --- pin: from the graph store -------------------------------------------------------------


@_feature("pin_quality", "pin", 0.0, "pin quality column as given; 0 when missing")
def _pin_quality(b: _Batch) -> np.ndarray:
    quality = b.quality
    return _fill(~np.isfinite(quality), quality, _SPECS["pin_quality"].default)


@_feature("pin_quality_missing", "pin", 1.0, "1 when the pin has no quality value")
def _pin_quality_missing(b: _Batch) -> np.ndarray:
    return ~np.isfinite(b.quality)


@_feature(
    "pin_age_days",
    "pin",
    -1.0,
    "days from pin_created_at to the request time, clipped at 0; -1 when missing",
)
def _pin_age_days(b: _Batch) -> np.ndarray:
    created = b.created_at
    age = np.maximum((b.request.now - created) / SECONDS_PER_DAY, 0.0)
    return _fill(~np.isfinite(created), age, _SPECS["pin_age_days"].default)


@_feature("pin_age_missing", "pin", 1.0, "1 when the pin has no created_at")
def _pin_age_missing(b: _Batch) -> np.ndarray:
    return ~np.isfinite(b.created_at)


@_feature("pin_locale_missing", "pin", 1.0, "1 when the pin's locale is unknown")
def _pin_locale_missing(b: _Batch) -> np.ndarray:
    return b.locale >= b.n_locales


@_feature("pin_topic_missing", "pin", 1.0, "1 when the pin's topic is unknown")
def _pin_topic_missing(b: _Batch) -> np.ndarray:
    return b.topic >= b.n_topics


# --- user: from the request ----------------------------------------------------------------


@_feature("user_locale_missing", "user", 1.0, "1 when the request carries no known locale")
def _user_locale_missing(b: _Batch) -> np.ndarray:
    return np.full(b.pins.size, b.request.user_locale >= b.n_locales)


@_feature("user_interest_count", "user", 0.0, "number of the user's interests known to the graph")
def _user_interest_count(b: _Batch) -> np.ndarray:
    return np.full(b.pins.size, np.count_nonzero(b.interested))


# --- query: the candidate against the query pins -------------------------------------------


@_feature("query_pin_count", "query", 0.0, "number of known query pins the walk started from")
def _query_pin_count(b: _Batch) -> np.ndarray:
    return np.full(b.pins.size, b.request.query_pins.size)


@_feature(
    "query_topic_share",
    "query",
    0.0,
    "weighted share of query pins on the candidate's topic; 0 when either topic is missing",
)
def _query_topic_share(b: _Batch) -> np.ndarray:
    return b.query_share(b.graph.pin_topic, b.topic, b.n_topics)


@_feature(
    "query_locale_share",
    "query",
    0.0,
    "weighted share of query pins in the candidate's locale; 0 when either locale is missing",
)
def _query_locale_share(b: _Batch) -> np.ndarray:
    return b.query_share(b.graph.pin_locale, b.locale, b.n_locales)


# --- cross: user x pin ---------------------------------------------------------------------


@_feature(
    "locale_match",
    "cross",
    0.0,
    "1 when the pin's locale equals the user's; 0 when either is missing",
)
def _locale_match(b: _Batch) -> np.ndarray:
    user_locale = b.request.user_locale
    if user_locale >= b.n_locales:
        return np.zeros(b.pins.size)
    return b.locale == user_locale


@_feature(
    "topic_in_interests",
    "cross",
    0.0,
    "1 when the pin's topic is one of the user's interests; 0 when its topic is missing",
)
def _topic_in_interests(b: _Batch) -> np.ndarray:
    return b.interested[b.topic]


# --- graph: from the edges' times (opt-in: a tenant lists them) ------------------------------


@_feature(
    "pin_edges_at_request",
    "graph",
    0.0,
    "the candidate's edges created at or before the request time; 0 without edge times",
    standard=False,
)
def _pin_edges_at_request(b: _Batch) -> np.ndarray:
    stats = b.edge_stats
    return np.zeros(b.pins.size) if stats is None else stats[1]


@_feature(
    "pin_first_edge_age_days",
    "graph",
    -1.0,
    "days from the candidate's first edge to the request time; -1 without one",
    standard=False,
)
def _pin_first_edge_age_days(b: _Batch) -> np.ndarray:
    return b.edge_age_days(2, _SPECS["pin_first_edge_age_days"].default)


@_feature(
    "pin_last_edge_age_days",
    "graph",
    -1.0,
    "days from the candidate's latest edge at or before the request time; -1 without one",
    standard=False,
)
def _pin_last_edge_age_days(b: _Batch) -> np.ndarray:
    return b.edge_age_days(3, _SPECS["pin_last_edge_age_days"].default)


FEATURES: Mapping[str, FeatureSpec] = MappingProxyType(_SPECS)


# --- declared and windowed features: resolved from their names ------------------------------


def _window_feature(days: int, share: bool) -> Callable[[_Batch], np.ndarray]:
    if not share:
        return lambda b: b.edge_window(days)

    def compute(b: _Batch) -> np.ndarray:
        counts = b.edge_window(days)
        total = float(counts.sum())
        return counts / total if total > 0 else np.zeros(b.pins.size)

    return compute


def _rank_feature(base: Callable[[_Batch], np.ndarray]) -> Callable[[_Batch], np.ndarray]:
    def compute(b: _Batch) -> np.ndarray:
        return percentile_ranks(np.asarray(base(b), dtype=np.float64))

    return compute


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Each value's mid-rank percentile in (0, 1]: (values below + (values equal + 1) / 2) / n.
    The highest value gets 1 (or less when tied); a constant column is 0.5 + 0.5 / n."""
    ordered = np.sort(values)
    below = np.searchsorted(ordered, values, side="left")
    up_to = np.searchsorted(ordered, values, side="right")
    return (below + up_to + 1) / (2.0 * values.size)


def _rank_base(name: str) -> str | None:
    """The feature a `<feature>_rank` name ranks (built-in or windowed), else None."""
    if not name.endswith(RANK_SUFFIX):
        return None
    base = name[: -len(RANK_SUFFIX)]
    return base if base in _COMPUTE or WINDOW_RE.fullmatch(base) else None


def _pin_attribute(column: str, default: float) -> Callable[[_Batch], np.ndarray]:
    def compute(b: _Batch) -> np.ndarray:
        values = b.graph.pin_columns.get(column)
        if values is None:
            return np.full(b.pins.size, default)
        picked = b.graph.pin_values(values, b.pins, np.nan)
        return _fill(~np.isfinite(picked), picked, default)

    return compute


def _request_feature(name: str, default: float) -> Callable[[_Batch], np.ndarray]:
    return lambda b: np.full(b.pins.size, b.request.features.get(name, default))


def _source_indicator(name: str) -> Callable[[_Batch], np.ndarray]:
    def compute(b: _Batch) -> np.ndarray:
        if b.sources is None:
            return np.full(b.pins.size, 1.0 if name == WALK_SOURCE else 0.0)
        if name not in b.sources.names:
            return np.zeros(b.pins.size)
        return b.sources.codes == b.sources.names.index(name)

    return compute


def window_days(name: str) -> int | None:
    """N of a `pin_edges_last_<N>d[_share][_rank]` name, None for any other name."""
    match = WINDOW_RE.fullmatch(_rank_base(name) or name)
    return None if match is None else int(match["days"])


def _unknown(names: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"unknown features {list(names)}; valid features are: {', '.join(FEATURES)}, "
        f"pin_edges_last_<N>d and pin_edges_last_<N>d_share (N days, 1..{MAX_WINDOW_DAYS}, "
        f"no leading zeros), <any of those>{RANK_SUFFIX}, pin.<pin column>, request.<name> "
        "and source.<name> (names of A-Z, a-z, 0-9, _)"
    )


def _resolve(name: str, default: float | None) -> Callable[[_Batch], np.ndarray]:
    """The compute function of one feature name; `default` only for `pin.`/`request.`."""
    if name in _COMPUTE:
        return _COMPUTE[name]
    ranked = _rank_base(name)
    if ranked is not None:
        return _rank_feature(_resolve(ranked, None))
    window = WINDOW_RE.fullmatch(name)
    if window is not None:
        days = int(window["days"])
        if not 1 <= days <= MAX_WINDOW_DAYS or str(days) != window["days"]:
            raise _unknown([name])
        return _window_feature(days, name.endswith("_share"))
    match = DECLARED_RE.fullmatch(name)
    if match is None:
        raise _unknown([name])
    kind, declared = match["kind"], match["name"]
    if kind == "pin":
        return _pin_attribute(declared, 0.0 if default is None else default)
    if kind == "request":
        return _request_feature(declared, 0.0 if default is None else default)
    return _source_indicator(declared)


def is_known(name: str) -> bool:
    """Whether this server can compute a feature of that name."""
    try:
        _resolve(name, None)
    except ConfigError:
        return False
    return True


def feature_names() -> list[str]:
    """The standard features in registry order: the feature list of a tenant naming none."""
    return [name for name, spec in FEATURES.items() if spec.standard]


def check_feature_names(names: Sequence[str]) -> tuple[str, ...]:
    """Validate a feature list (tenant config, training request): known names, no repeats."""
    names = tuple(names)
    unknown = [name for name in names if not is_known(name)]
    if unknown:
        raise _unknown(unknown)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"features listed more than once: {repeated}")
    if not names:
        raise ConfigError("the feature list is empty")
    return names


def request_feature_names(names: Sequence[str]) -> frozenset[str]:
    """The `<name>`s of a feature list's `request.<name>` features: what requests may send."""
    return frozenset(
        match["name"]
        for match in map(DECLARED_RE.fullmatch, names)
        if match is not None and match["kind"] == "request"
    )


@lru_cache(maxsize=64)
def _plan(
    names: tuple[str, ...], defaults: tuple[tuple[str, float], ...]
) -> tuple[tuple[Callable[[_Batch], np.ndarray], ...], tuple[int, ...]]:
    given = dict(defaults)
    computes = tuple(_resolve(name, given.get(name)) for name in check_feature_names(names))
    windows = sorted({days for days in map(window_days, names) if days is not None})
    return computes, tuple(windows)


def compute_features(
    graph: GraphStore,
    walk_result: WalkResult,
    request: RequestContext,
    names: Sequence[str],
    defaults: Mapping[str, float] | None = None,
    sources: CandidateSources | None = None,
) -> np.ndarray:
    """The (candidates x len(names)) float32 feature matrix, columns in `names` order.

    Only the named features are computed; shared inputs (pin topics, locales, edge-time
    counts...) are gathered once per call. `defaults` are the tenant's values of missing
    `pin.`/`request.` features (0 otherwise); `sources` says which generator each candidate
    came from (None: all from the walk).
    """
    plan, windows = _plan(tuple(names), tuple(sorted((defaults or {}).items())))
    n_candidates = walk_result.pins.size
    out = np.empty((n_candidates, len(plan)), dtype=np.float32)
    if n_candidates == 0:
        return out
    batch = _Batch(graph, walk_result, request, windows, sources)
    for column, compute in enumerate(plan):
        out[:, column] = compute(batch)
    return out


def check_feature_list(model_features: Sequence[str], tenant_features: Sequence[str]) -> None:
    """Refuse a model whose feature list differs from the tenant's, naming the difference.

    A model reads columns by position, so the same names in another order is a mismatch too.
    """
    model = list(model_features)
    tenant = list(tenant_features)
    problems = []
    tenant_set, model_set = set(tenant), set(model)
    missing = [name for name in model if name not in tenant_set]
    extra = [name for name in tenant if name not in model_set]
    if missing:
        unknown = [name for name in missing if not is_known(name)]
        note = f" ({unknown} unknown to this server)" if unknown else ""
        problems.append(f"missing features the model needs: {missing}{note}")
    if extra:
        problems.append(f"extra features the model was not trained on: {extra}")
    for label, names in (("model", model), ("tenant", tenant)):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            problems.append(f"{label} lists features more than once: {repeated}")
    if not problems and model != tenant:
        position = next(i for i, (m, t) in enumerate(zip(model, tenant, strict=True)) if m != t)
        problems.append(
            f"order mismatch at column {position}: model has {model[position]!r}, "
            f"tenant has {tenant[position]!r}"
        )
    if problems:
        raise ModelError("model feature list does not match the tenant's: " + "; ".join(problems))


def check_feature_defaults(model: Mapping[str, float] | None, tenant: Mapping[str, float]) -> None:
    """Refuse a model trained with other `feature_defaults` than the tenant's: a missing
    input would reach it as a value it never saw. Models from before defaults were recorded
    (None) were trained with none, so the tenant must have none too."""
    if dict(model or {}) != dict(tenant):
        raise ModelError(
            f"model feature_defaults {dict(model or {})} do not match the tenant's "
            f"{dict(tenant)}; retrain, or restore the defaults the model was trained with"
        )


#: The graph data each feature needs beyond the walk: a graph without it (no locale or topic
#: vocabulary, no quality or created_at column) serves the feature at its default for every
#: candidate. Categories are matched by name per request (the request's locale and interests
#: are looked up in the serving graph's vocabulary), so a new graph with other codes serves a
#: model unchanged; only a graph that lacks an input altogether changes what the model sees.
GRAPH_INPUTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "locales": (
            "pin_locale_missing",
            "user_locale_missing",
            "query_locale_share",
            "locale_match",
        ),
        "topics": (
            "pin_topic_missing",
            "user_interest_count",
            "query_topic_share",
            "topic_in_interests",
        ),
        "pins.quality": ("pin_quality", "pin_quality_missing"),
        "pins.created_at": ("pin_age_days", "pin_age_missing"),
    }
)


#: The edge-time features read the graph's `pin_edge_times` (edges built with created_at).
EDGE_TIME_INPUT = "pin_edge_times"


def feature_input(name: str) -> str | None:
    """The graph input a feature reads beyond the walk (`GRAPH_INPUTS`, `pin_edge_times`
    for the edge-time features, `pins.<column>` for `pin.<column>`), or None."""
    name = _rank_base(name) or name
    for data, features in GRAPH_INPUTS.items():
        if name in features:
            return data
    if window_days(name) is not None or name in (
        "pin_edges_at_request",
        "pin_first_edge_age_days",
        "pin_last_edge_age_days",
    ):
        return EDGE_TIME_INPUT
    match = DECLARED_RE.fullmatch(name)
    if match is not None and match["kind"] == "pin":
        return f"pins.{match['name']}"
    return None


def graph_inputs(graph: GraphStore) -> frozenset[str]:
    """The graph inputs a graph provides (a vocabulary with names, a column it was built
    with, edge times, its extra pin columns)."""
    schema = graph.manifest.get("schema", {})
    present = {
        "locales": graph.n_locales > 0,
        "topics": graph.n_topics > 0,
        "pins.quality": "pins.quality" in schema,
        "pins.created_at": "pins.created_at" in schema or "edges.created_at" in schema,
        EDGE_TIME_INPUT: graph.pin_edge_times is not None,
    }
    present.update({f"pins.{column}": True for column in graph.pin_columns})
    return frozenset(name for name, ok in present.items() if ok)


def inputs_lost(names: Sequence[str], served: GraphStore, new: GraphStore) -> dict[str, list[str]]:
    """Graph inputs the served graph gives `names` and the new graph would not: input ->
    the features that would fall to their defaults."""
    lost = graph_inputs(served) - graph_inputs(new)
    by_input: dict[str, list[str]] = {}
    for name in names:
        data = feature_input(name)
        if data in lost:
            by_input.setdefault(data, []).append(name)
    return dict(sorted(by_input.items()))
