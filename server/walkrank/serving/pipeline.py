"""The request path, top to bottom: validate → walk → features → score → select → log → respond.

Nothing here knows about protobuf or gRPC: the servicer converts messages into a
`RecommendInput` and a `RecommendOutput` back, so the pipeline is callable (and testable, and
benchmarkable) on its own. All per-candidate work is numpy or numba over whole arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from walkrank.experiments import EXPLORE_ARM, rank
from walkrank.features import RequestContext, compute_features
from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import CandidateBatch, CandidateSink
from walkrank.logs.events import MAX_EPOCH_SECONDS
from walkrank.serving.errors import DeadlineExceeded, InvalidArgument
from walkrank.serving.open_features import (
    add_extra_candidates,
    check_extra_candidates,
    request_features,
)
from walkrank.serving.tenant_table import TenantRuntime
from walkrank.walks.engine import WalkCancelled, WalkResult, walk


@dataclass(frozen=True)
class Action:
    """One recent action of the user; a request sends these or query pins."""

    pin_id: str
    action: str
    time: float | None = None  # epoch seconds; None means at the request time


@dataclass(frozen=True)
class RecommendInput:
    """One user's request, already decoded from the wire."""

    tenant: str
    request_id: str
    query_pins: tuple[str, ...]
    query_weights: tuple[float, ...] = ()
    user_id: str = ""
    locale: str = ""
    interests: tuple[str, ...] = ()
    num_results: int = 0
    exclude_pins: tuple[str, ...] = ()
    seed: int | None = None
    request_time: float | None = None  # epoch seconds; None means now
    actions: tuple[Action, ...] = ()  # instead of query pins
    features: tuple[tuple[str, float], ...] = ()  # the tenant's `request.<name>` features
    extra_candidates: tuple[tuple[str, str], ...] = ()  # (pin_id, source) of other generators


@dataclass(frozen=True)
class RecommendOutput:
    request_id: str
    pin_ids: np.ndarray
    scores: np.ndarray
    visits: np.ndarray
    walk_scores: np.ndarray  # the boosted visit counts that define visit-count order
    model_version: str
    unknown_query_pins: tuple[str, ...]
    empty_reason: str | None
    timing_ms: dict[str, float]
    candidates_generated: int
    sources: np.ndarray | None = None  # per returned candidate, "" for the walk; None: all
    arm: str = ""  # walkrank.experiments: explore, an experiment arm, or default
    propensities: np.ndarray | None = None  # per returned candidate: P(returned); None: all 1


def request_seed(request_id: str) -> int:
    """A stable seed per request id, so a retried request walks the same walk."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def is_sampled(request_id: str, sample_rate: float) -> bool:
    """Sample whole requests by a hash of their id (reproducible, independent of traffic)."""
    if sample_rate >= 1.0:
        return True
    if sample_rate <= 0.0:
        return False
    return (request_seed(request_id) % 1_000_000) < sample_rate * 1_000_000


def check_time(field: str, seconds: float | None) -> None:
    """InvalidArgument naming `field` unless `seconds` is None (now) or epoch seconds in
    1970..2100, as event timestamps (milliseconds are the usual mistake)."""
    if seconds is not None and not 0 <= seconds < MAX_EPOCH_SECONDS:
        milliseconds = MAX_EPOCH_SECONDS <= seconds < 1000 * MAX_EPOCH_SECONDS
        hint = " (milliseconds?)" if milliseconds else ""
        raise InvalidArgument(field, f"{seconds!r} is not epoch seconds in 1970..2100{hint}")


def query_from_actions(
    actions: tuple[Action, ...], runtime: TenantRuntime, now: float
) -> tuple[tuple[str, ...], np.ndarray]:
    """The query (pins, weights) of a user's actions, weighed as the tenant's `query` says:
    `action_weights[action] * 0.5 ** (age_hours / recency_half_life_hours)`, ages from `now`
    (clipped at 0), one pin's actions summed, pins in order of first action; pins that
    weigh 0 are left out."""
    query, limits = runtime.config.query, runtime.config.limits
    if not query.action_weights:
        raise InvalidArgument(
            "actions",
            f"tenant {runtime.name!r} (query.source {query.source}) takes query_pins, not actions",
        )
    if len(actions) > limits.max_query_pins:
        raise InvalidArgument(
            "actions",
            f"{len(actions)} actions, tenant {runtime.name!r} "
            f"allows at most {limits.max_query_pins}",
        )
    base = np.empty(len(actions), dtype=np.float64)
    halvings = np.zeros(len(actions), dtype=np.float64)
    half_life_s = (
        None if query.recency_half_life_hours is None else (query.recency_half_life_hours * 3600.0)
    )
    for i, action in enumerate(actions):
        if not action.pin_id:
            raise InvalidArgument(f"actions[{i}].pin_id", "empty")
        name = action.action.strip().lower()
        if name not in query.action_weights:
            raise InvalidArgument(
                f"actions[{i}].action",
                f"unknown action "
                f"{action.action!r}; tenant {runtime.name!r} weighs "
                f"{', '.join(sorted(query.action_weights))}",
            )
        check_time(f"actions[{i}].time", action.time)
        base[i] = query.action_weights[name]
        if half_life_s is not None and action.time is not None:
            halvings[i] = max(now - action.time, 0.0) / half_life_s
    weighted = base > 0
    if not weighted.any():
        raise InvalidArgument(
            "actions", f"every action weighs 0 in tenant {runtime.name!r}'s query.action_weights"
        )
    # Weights are shares: halvings counted from the freshest weighted action, so a history
    # of old actions keeps its proportions instead of underflowing to 0.
    weights = base * np.exp2(-(halvings - halvings[weighted].min()))
    pins, first, inverse = np.unique(
        np.array([a.pin_id for a in actions], dtype=object), return_index=True, return_inverse=True
    )
    totals = np.bincount(inverse, weights=weights)
    order = np.argsort(first, kind="stable")
    order = order[totals[order] > 0]
    return tuple(pins[order].tolist()), totals[order]


def validate(
    request: RecommendInput, runtime: TenantRuntime, now: float
) -> tuple[tuple[str, ...], np.ndarray, int]:
    """Check the request against the tenant's limits; returns (query pins, weights, number
    of results), the query built from the actions when the request sent them.

    Weights are shares of the tenant's step budget (their scale does not matter), so any
    finite weight > 0 is accepted.
    """
    check_time("request_time", request.request_time)
    if request.actions:
        if request.query_pins:
            raise InvalidArgument("actions", "send query_pins or actions, not both")
        pins, weights = query_from_actions(request.actions, runtime, now)
        return pins, weights, _num_results(request, runtime)
    limits = runtime.config.limits
    pins = request.query_pins
    if not pins:
        raise InvalidArgument("query_pins", "at least one query pin (or action) is required")
    if len(pins) > limits.max_query_pins:
        raise InvalidArgument(
            "query_pins",
            f"{len(pins)} query pins, tenant "
            f"{runtime.name!r} allows at most {limits.max_query_pins}",
        )
    if any(not pin for pin in pins):
        raise InvalidArgument("query_pins", "a query pin has an empty pin_id")
    if request.query_weights:
        if len(request.query_weights) != len(pins):
            raise InvalidArgument(
                "query_pins.weight", "weights must be given for every query pin or for none"
            )
        bad = [w for w in request.query_weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise InvalidArgument(
                "query_pins.weight", f"weights must be finite and > 0, got {bad[0]!r}"
            )
        weights = np.asarray(request.query_weights, dtype=np.float64)
    else:
        weights = np.ones(len(pins), dtype=np.float64)
    return pins, weights, _num_results(request, runtime)


def _num_results(request: RecommendInput, runtime: TenantRuntime) -> int:
    candidates = runtime.config.candidates
    num_results = request.num_results or candidates.return_
    if num_results < 0:
        raise InvalidArgument("num_results", f"must be >= 0, got {num_results}")
    if num_results > candidates.max_return:
        raise InvalidArgument(
            "num_results",
            f"{num_results} exceeds tenant {runtime.name!r} maximum of {candidates.max_return}",
        )
    return num_results


# Longer than any deadline a caller means: grpcio reports "no deadline" as a huge number of
# seconds (not None), and a wait that long overflows time_t.
NO_DEADLINE_S = 86_400.0


def caller_remaining_s(remaining: float | None) -> float | None:
    """The seconds a caller's deadline leaves, or None when the caller set no deadline
    (None, or more than NO_DEADLINE_S, as grpcio reports it); the tenant's default applies."""
    if remaining is None or not remaining <= NO_DEADLINE_S:
        return None
    return remaining


class Stopwatch:
    """Stage timings in milliseconds, and the deadline checked between stages."""

    def __init__(self, time_remaining: Callable[[], float | None], default_budget_s: float) -> None:
        self._time_remaining = time_remaining
        self._default_budget_s = default_budget_s
        self._last = time.perf_counter()
        self._start = self._last
        self.timing_ms: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timing_ms[stage] = (now - self._last) * 1e3
        self._last = now
        remaining = caller_remaining_s(self._time_remaining())
        if remaining is None:
            remaining = self._default_budget_s - (now - self._start)
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline exceeded after the {stage} stage")

    def total(self) -> None:
        self.timing_ms["total"] = (time.perf_counter() - self._start) * 1e3


def _take(result: WalkResult, keep: np.ndarray) -> WalkResult:
    return dataclasses.replace(
        result,
        pins=result.pins[keep],
        scores=result.scores[keep],
        visits=result.visits[keep],
        query_hits=result.query_hits[keep],
        degree=result.degree[keep],
    )


def recommend(
    graph: GraphStore,
    runtime: TenantRuntime,
    request: RecommendInput,
    *,
    candidate_log: CandidateSink | None = None,
    time_remaining: Callable[[], float | None] = lambda: None,
    cancel: np.ndarray | None = None,
) -> RecommendOutput:
    """Recommend for one user. `time_remaining` gives the caller's seconds left (None, or
    more than NO_DEADLINE_S: the tenant's `deadline_ms` applies); setting `cancel[0]` from
    another thread stops the walk at once (DeadlineExceeded)."""
    config = runtime.config
    clock = Stopwatch(time_remaining, config.limits.deadline_ms / 1e3)
    now = time.time() if request.request_time is None else request.request_time
    pins, weights, num_results = validate(request, runtime, now)
    declared = request_features(request.features, config)
    check_extra_candidates(request.extra_candidates)

    query_pins = np.asarray(pins, dtype=object)
    if len(query_pins) > config.query.max_pins:
        # The tenant walks from its `max_pins` heaviest query pins; ties keep request order.
        keep = np.sort(np.argsort(-weights, kind="stable")[: config.query.max_pins])
        query_pins, weights = query_pins[keep], weights[keep]
    dense = graph.pin_index(query_pins.tolist())
    unknown = tuple(query_pins[i] for i in np.flatnonzero(dense < 0))
    locale = graph.locale_code(request.locale or None)
    interests = np.array([graph.topic_code(t) for t in request.interests], dtype=np.int32)
    user_topic = int(interests[0]) if len(interests) else -1
    seed = request.seed if request.seed is not None else request_seed(request.request_id)
    try:
        result = walk(
            graph,
            dense,
            weights,
            config.walk_params,
            user_locale=locale,
            user_topic=user_topic,
            seed=seed,
            cancel=cancel,
        )
    except WalkCancelled as exc:
        raise DeadlineExceeded(f"deadline exceeded during the walk ({exc})") from None
    if request.exclude_pins and len(result.pins):
        excluded = graph.pin_index(list(request.exclude_pins))
        result = _take(result, ~np.isin(result.pins, excluded[excluded >= 0]))
    sources = None
    if request.extra_candidates:
        skip = np.concatenate([dense, graph.pin_index(list(request.exclude_pins))])
        result, sources = add_extra_candidates(graph, result, request.extra_candidates, skip)
    clock.lap("walk")

    known = dense >= 0
    # Features use the weights as shares too; over their maximum they fit float32.
    shares = weights[known] / weights[known].max(initial=0.0)
    context = RequestContext(
        user_locale=locale,
        user_interests=interests,
        query_pins=dense[known],
        query_weights=shares.astype(np.float32),
        now=now,
        features=declared,
    )
    features = compute_features(
        graph, result, context, config.features, config.feature_defaults, sources
    )
    clock.lap("features")

    # The request's arm (exploration, an experiment arm, or the tenant's model) orders them.
    ranked = rank(
        runtime,
        features,
        result.scores,
        num_results,
        user_id=request.user_id,
        request_id=request.request_id,
        request_seed=request_seed(request.request_id),
    )
    scores, order = ranked.scores, ranked.order
    clock.lap("scoring")

    top = order[:num_results]
    pin_ids = graph.pin_external(result.pins[top])
    if (
        candidate_log is not None
        and len(result.pins)
        and (
            is_sampled(request.request_id, config.logging.sample_rate)
            # Exploration requests are few, and what unbiased evaluation reads: all logged.
            or (ranked.arm == EXPLORE_ARM and config.logging.sample_rate > 0)
        )
    ):
        ranks = np.empty(len(order), dtype=np.int32)
        ranks[order] = np.arange(len(order), dtype=np.int32)
        returned = np.zeros(len(order), dtype=bool)
        returned[top] = True
        candidate_log.submit(
            CandidateBatch(
                request_id=request.request_id,
                tenant=config.name,
                ts=context.now,
                user_id=request.user_id,
                user_locale=request.locale,
                user_interests=list(request.interests),
                pin_ids=graph.pin_external(result.pins),
                feature_names=list(config.features),
                features=features,
                visit_scores=result.scores,
                model_scores=scores,
                ranks=ranks,
                returned=returned,
                sources=None if sources is None else (sources.names, sources.codes),
                model_version=ranked.model_version,
                arm=ranked.arm,
                propensities=ranked.propensity,
                shadow_version=ranked.shadow_version,
                shadow_scores=ranked.shadow_scores,
            )
        )
    clock.lap("logging")
    clock.total()
    return RecommendOutput(
        request_id=request.request_id,
        pin_ids=pin_ids,
        scores=scores[top],
        visits=result.visits[top],
        walk_scores=result.scores[top],
        model_version=ranked.model_version,
        unknown_query_pins=unknown,
        empty_reason=result.empty_reason,
        timing_ms=clock.timing_ms,
        candidates_generated=len(result.pins),
        sources=None if sources is None else np.array(["", *sources.names[1:]])[sources.codes[top]],
        arm=ranked.arm,
        propensities=ranked.propensity[top],
    )
