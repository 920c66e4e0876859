"""Offline evaluation: two orders over the same logged candidates, compared per request.

The candidate log holds every generated candidate with the features it was served with, so a
model can be replayed on exactly the candidates the walk produced, and compared with the order
it replaces (visit count, or the model currently serving) without serving a single request.
Every metric is computed per request and averaged over the requests where it is defined,
because a ranker only ever orders candidates within one request:

- `recall_impressions@K`: share of the impressed pins in the top K (funnel efficiency: how much
  of what the full ranker ended up showing the light ranker would have passed on);
- `recall_actions@K`: the same for actioned pins (click, save, closeup, ...);
- `ndcg@K`: NDCG with the tenant's label weights as gains (a pin's gain is the largest weight
  of its events; hides and unlabelled pins gain 0);
- `auc`: impressed against not impressed, per request (ties count half);
- `local_share@K`: share of the top K whose locale matches the user's (`f_locale_match`); not
  reported, with a note saying so, when no request or no candidate pin has a locale.

`train` uses the same functions for its before/after comparison, so the numbers it prints
are the numbers `walkrank evaluate` writes.

Exposure: a request's labels exist only for what the ranker that served it returned. The
comparison therefore runs on the requests served by neither compared ranker when there are
enough of them (`select_requests`), says which requests it used and why, and warns when most
were served by one of the two. Every metric has a bootstrap interval over requests, and on
exploration traffic (`shuffle_top`, with logged propensities) the rankers' online metrics
are estimated by inverse propensity scoring (`walkrank.training.estimators`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from walkrank.errors import DataError
from walkrank.experiments import SHUFFLE_TOP
from walkrank.logs.events import ACTION_EVENTS
from walkrank.training.estimators import (
    Interval,
    PolicyComparison,
    compare_policies,
    lift_interval,
    rank_positions,
    ratio_interval,
)
from walkrank.training.labels import DEFAULT_EVENT_WEIGHT, locale_matches, strongest_action_weight

LOCALE_MATCH_COLUMN = "f_locale_match"
METRICS = ("recall_impressions", "recall_actions", "ndcg", "auc", "local_share")
"""Metric names in report order; all but `auc` are reported at a cut-off K (`name@K`)."""
# A comparison is flagged when at least this share of its requests was served by one of the
# two rankers compared (labels then follow that ranker's exposure).
EXPOSURE_WARNING_SHARE = 0.5
# Fewer requests served by neither compared ranker than this: compare on all of them (warned).
MIN_NEUTRAL_REQUESTS = 20
#: The exploration requests the estimates replay at most (a seeded sample beyond): the
#: slots-aware replay's memory and time grow with requests x 2,560 score cells, and its
#: interval at this many requests is already narrow.
MAX_EXPLORED_REQUESTS = 5_000


@dataclass(frozen=True, eq=False)
class Targets:
    """What happened to each logged candidate, aligned with the rows being evaluated.

    `request` numbers the requests 0..n-1 (any row order); `local` is None when the log has no
    locale-match feature or the data no locales, and `local_share` is then not reported
    (`local_note` says why, for the report).
    """

    request: np.ndarray  # int64
    impressed: np.ndarray  # bool
    actioned: np.ndarray  # bool
    gain: np.ndarray  # float64, >= 0
    local: np.ndarray | None  # bool
    local_note: str | None = None
    # Exploration (walkrank.experiments): what was returned, each row's probability of being
    # returned, which rows belong to shuffle_top requests, action events per row.
    returned: np.ndarray | None = None  # bool
    propensity: np.ndarray | None = None  # float64
    explored: np.ndarray | None = None  # bool
    actions: np.ndarray | None = None  # float64
    # The client's score of each pin (its events' `score`), NaN where it reported none.
    client_score: np.ndarray | None = None  # float64

    def __post_init__(self) -> None:
        n = len(self.request)
        for name in (
            "impressed",
            "actioned",
            "gain",
            "local",
            "returned",
            "propensity",
            "explored",
            "actions",
            "client_score",
        ):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise DataError(
                    f"evaluation targets: {name} has {len(value)} rows, request has {n}"
                )

    @property
    def n_requests(self) -> int:
        return int(self.request.max()) + 1 if len(self.request) else 0


def targets_from_joined(joined: pa.Table, weights: Mapping[str, float]) -> Targets:
    """Targets from a `join_candidates_events` table and the tenant's label weights.

    What counts as an action, and its gain, is `labels.strongest_action_weight`: the action
    types the tenant weighs above 0, so labels and metrics agree.
    """
    _, request = np.unique(
        joined.column("request_id").to_numpy(zero_copy_only=False), return_inverse=True
    )
    impressed = _bool_column(joined, "impressed")
    strongest = strongest_action_weight(joined, weights)
    actioned = strongest > 0
    impression_gain = max(weights.get("impression", DEFAULT_EVENT_WEIGHT), 0.0)
    gain = np.maximum(np.where(impressed, impression_gain, 0.0), strongest)
    if "n_hide" in joined.column_names:
        gain = np.where(
            np.asarray(pc.fill_null(joined.column("n_hide"), 0).to_numpy()) > 0, 0.0, gain
        )
    local, note = None, None
    if LOCALE_MATCH_COLUMN in joined.column_names:
        if _has_locales(joined):
            local = locale_matches(joined)
        else:
            note = "no locales in data (no request or no candidate pin has a locale)"
    returned = _bool_column(joined, "returned") if "returned" in joined.column_names else None
    propensity = explored = None
    if returned is not None:
        propensity = returned.astype(np.float64)
        if "propensity" in joined.column_names:  # older logs: returned pins had probability 1
            logged = joined["propensity"].to_numpy(zero_copy_only=False)
            propensity = np.where(np.isnan(logged), propensity, logged)
        explored = np.zeros(joined.num_rows, dtype=bool)
        if "model_version" in joined.column_names:
            explored = np.asarray(
                pc.fill_null(pc.equal(joined["model_version"], SHUFFLE_TOP), False).to_numpy(
                    zero_copy_only=False
                ),
                dtype=bool,
            )
    actions = np.zeros(joined.num_rows)
    for kind in ACTION_EVENTS:
        if f"n_{kind}" in joined.column_names:
            actions += pc.fill_null(joined[f"n_{kind}"], 0).to_numpy(zero_copy_only=False)
    client_score = None
    if "full_score" in joined.column_names:
        client_score = np.asarray(
            pc.fill_null(pc.cast(joined["full_score"], pa.float64()), math.nan).to_numpy(
                zero_copy_only=False
            ),
            dtype=np.float64,
        )
    return Targets(
        request.astype(np.int64),
        impressed,
        actioned,
        gain.astype(np.float64),
        local,
        note,
        returned,
        propensity,
        explored,
        actions,
        client_score,
    )


def _has_locales(joined: pa.Table) -> bool:
    """Some request names a locale and some candidate pin has one: otherwise every locale
    match is 0 by construction and a local share would measure nothing."""
    if "user_locale" in joined.column_names:
        named = pc.fill_null(pc.not_equal(joined["user_locale"].cast(pa.string()), ""), False)
        if not pc.any(named).as_py():
            return False
    if "f_pin_locale_missing" in joined.column_names:
        return bool(pc.min(joined["f_pin_locale_missing"]).as_py() < 0.5)
    return True


def _bool_column(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        raise DataError(
            f"joined candidates have no {name!r} column (columns: {', '.join(table.column_names)})"
        )
    return np.asarray(
        pc.fill_null(table.column(name), False).to_numpy(zero_copy_only=False), dtype=bool
    )


# --- metrics -----------------------------------------------------------------------------------


PerRequest = tuple[np.ndarray, np.ndarray]
"""(value, defined) per request: a metric's value where its denominator is > 0."""


def _per_request(numerator: np.ndarray, denominator: np.ndarray) -> PerRequest:
    defined = denominator > 0
    value = np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=defined)
    return value, defined


def _mean(per_request: PerRequest) -> float:
    value, defined = per_request
    return float(np.mean(value[defined])) if defined.any() else math.nan


def _auc(targets: Targets, scores: np.ndarray) -> PerRequest:
    """Per-request AUC of impressed vs not (Mann-Whitney with average ranks for ties)."""
    n = len(scores)
    m = targets.n_requests
    order = np.lexsort((scores, targets.request))
    req = targets.request[order]
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = (np.arange(n) - first + 1).astype(np.float64)
    # Equal scores in one request share their average rank.
    run_starts = np.flatnonzero(np.r_[True, (req[1:] != req[:-1]) | (s[1:] != s[:-1])])
    run_lengths = np.diff(np.r_[run_starts, n])
    run_mean = np.add.reduceat(rank, run_starts) / run_lengths
    rank = np.repeat(run_mean, run_lengths)
    positive = targets.impressed[order]
    n_pos = np.bincount(req, weights=positive, minlength=m)
    n_all = np.bincount(req, minlength=m).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(req, weights=rank * positive, minlength=m)
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return _per_request(u, n_pos * n_neg)


def ranking_metrics(targets: Targets, scores: np.ndarray, k: int) -> dict[str, float]:
    """Every metric of `METRICS` for one order (higher score = earlier), keyed `name@K`
    (`auc` without K). A metric no request defines (no impressions at all) is NaN."""
    return {name: _mean(values) for name, values in per_request_metrics(targets, scores, k).items()}


def per_request_metrics(targets: Targets, scores: np.ndarray, k: int) -> dict[str, PerRequest]:
    """`ranking_metrics` before averaging: each metric's (value, defined) per request."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != targets.request.shape:
        raise DataError(
            f"evaluation: {scores.shape[0]} scores for {len(targets.request)} candidates"
        )
    if not np.isfinite(scores).all():
        raise DataError("evaluation: scores contain NaN or infinite values")
    if k < 1:
        raise DataError(f"evaluation: K must be >= 1, got {k}")
    m = targets.n_requests
    order, position = rank_positions(targets.request, scores)
    req = targets.request[order]
    top = position < k
    metrics: dict[str, PerRequest] = {}
    for name, relevant in (
        ("recall_impressions", targets.impressed),
        ("recall_actions", targets.actioned),
    ):
        hits = np.bincount(req, weights=relevant[order] & top, minlength=m)
        total = np.bincount(req, weights=relevant[order], minlength=m)
        metrics[f"{name}@{k}"] = _per_request(hits, total)
    discount = 1.0 / np.log2(position + 2.0)
    dcg = np.bincount(req, weights=targets.gain[order] * discount * top, minlength=m)
    ideal_order, ideal_position = rank_positions(targets.request, targets.gain)
    ideal_gain = targets.gain[ideal_order] * (ideal_position < k) / np.log2(ideal_position + 2.0)
    idcg = np.bincount(targets.request[ideal_order], weights=ideal_gain, minlength=m)
    metrics[f"ndcg@{k}"] = _per_request(dcg, idcg)
    metrics["auc"] = _auc(targets, scores)
    if targets.local is not None:
        local_top = np.bincount(req, weights=targets.local[order] & top, minlength=m)
        shown = np.bincount(req, weights=top, minlength=m)
        metrics[f"local_share@{k}"] = _per_request(local_top, shown)
    return metrics


# --- comparison and reports --------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Two orders of the same candidates on the same requests: `candidate` against `baseline`
    (visit count or the serving model).

    `selection` says which requests were compared and why; `intervals` holds each metric's
    bootstrap interval over requests (`baseline`, `candidate`, and the paired `lift`);
    `estimates` the online metrics of both rankers estimated on exploration requests (None
    when the requests hold none)."""

    baseline: str
    candidate: str
    k: int
    requests: int
    candidates: int
    baseline_metrics: dict[str, float]
    candidate_metrics: dict[str, float]
    window: dict[str, str | None] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # metrics left out and why
    served_by: dict[str, int] = field(default_factory=dict)  # requests per ranker that served
    selection: str = ""
    intervals: dict[str, dict[str, Interval]] = field(default_factory=dict)
    estimates: dict[str, PolicyComparison] | None = None

    @property
    def exposed_by(self) -> str | None:
        """The compared ranker that served most of the requests, if one did.

        Their labels then come from what that ranker returned (only it could be impressed
        and acted on), so the comparison measures that exposure as much as either ranker.
        """
        total = sum(self.served_by.values())
        for ranker in (self.baseline, self.candidate):
            served = self.served_by.get(logged_name(ranker), 0)
            if total and served / total >= EXPOSURE_WARNING_SHARE:
                return ranker
        return None

    @property
    def exposure_warning(self) -> str | None:
        ranker = self.exposed_by
        if ranker is None:
            return None
        total = sum(self.served_by.values())
        share = self.served_by[logged_name(ranker)] / total
        return (
            f"WARNING: {share:.0%} of these {total:,} requests were "
            f"served by {ranker}, one of the two rankers compared: their labels come from what "
            f"it returned, so this comparison is biased by that exposure (see "
            f"docs/evaluation.md)"
        )

    def lift(self) -> dict[str, float]:
        """Relative change per metric (candidate / baseline - 1); NaN where undefined."""
        lifts = {}
        for name, before in self.baseline_metrics.items():
            after = self.candidate_metrics.get(name, math.nan)
            lifts[name] = after / before - 1.0 if before and math.isfinite(before) else math.nan
        return lifts

    def worse_on(self, metric: str) -> bool:
        """True when the candidate scores strictly below the baseline on `metric`."""
        return _value(self.candidate_metrics, metric) < _value(self.baseline_metrics, metric)

    def describe(self, metric: str) -> str:
        return (
            f"{metric}: {self.candidate} {_value(self.candidate_metrics, metric):.4f} vs "
            f"{self.baseline} {_value(self.baseline_metrics, metric):.4f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "k": self.k,
            "requests": self.requests,
            "candidates": self.candidates,
            "window": self.window,
            "selection": self.selection,
            "notes": list(self.notes),
            "served_by": dict(self.served_by),
            "exposure_warning": self.exposure_warning,
            "metrics": {
                name: {
                    "baseline": _json_number(self.baseline_metrics[name]),
                    "candidate": _json_number(self.candidate_metrics.get(name)),
                    "lift": _json_number(lift),
                    **{
                        f"{part}_interval": interval.to_dict()
                        for part, interval in self.intervals.get(name, {}).items()
                    },
                }
                for name, lift in self.lift().items()
            },
            "estimates": None
            if self.estimates is None
            else {
                name: estimate.to_dict("baseline", "candidate")
                for name, estimate in self.estimates.items()
            },
        }

    def table(self) -> str:
        """A Markdown table: metric, baseline, candidate, lift (95% intervals in brackets);
        the online-metric estimates on exploration requests; then the notes."""
        lines = [
            f"| metric | {self.baseline} | {self.candidate} | lift |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, lift in self.lift().items():
            ci = self.intervals.get(name, {})
            lines.append(
                f"| {name} | {_fmt(self.baseline_metrics[name])}{_fmt_ci(ci.get('baseline'))} | "
                f"{_fmt(self.candidate_metrics.get(name, math.nan))}"
                f"{_fmt_ci(ci.get('candidate'))} | "
                f"{_fmt_lift(lift)}{_fmt_ci(ci.get('lift'), lift=True)} |"
            )
        if self.estimates:
            first = next(iter(self.estimates.values()))
            few = "" if first.enough else " (too few to read the values: read the intervals)"
            lines += [
                "",
                f"Online metrics estimated on {first.requests:,} exploration requests{few} "
                f"(shuffle_top; slate: slots-aware, {first.slots} slots per request; 95% "
                "bootstrap intervals over requests):",
                "",
                f"| metric | estimator | {self.baseline} | {self.candidate} | lift |",
                "| --- | --- | ---: | ---: | ---: |",
            ]
            for name, estimate in self.estimates.items():
                for estimator in estimate.lift:
                    lines.append(
                        f"| {name} | {estimator} | {estimate.a[estimator]} | "
                        f"{estimate.b[estimator]} | {_fmt_lift(estimate.lift[estimator].value)}"
                        f"{_fmt_ci(estimate.lift[estimator], lift=True)} |"
                    )
        # A blank line ends a table, so the notes are not read as rows.
        notes = [self.selection] if self.selection else []
        notes += list(self.notes) + ([self.exposure_warning] if self.exposure_warning else [])
        return "\n".join(lines + ([""] + notes if notes else []))


def logged_name(ranker: str) -> str:
    """The name the log gives a ranker (`visit count` is logged as `visit_count`)."""
    return ranker.replace(" ", "_")


def _value(metrics: Mapping[str, float], metric: str) -> float:
    if metric not in metrics:
        raise DataError(f"evaluation: no metric {metric!r} (have {', '.join(metrics)})")
    return metrics[metric]


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4f}"


def _fmt_lift(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value * 100:+.1f}%"


def _fmt_ci(interval: Interval | None, *, lift: bool = False) -> str:
    if interval is None or not math.isfinite(interval.low):
        return ""
    if lift:
        return f" [{interval.low * 100:+.1f}%, {interval.high * 100:+.1f}%]"
    return f" [{interval.low:.4f}, {interval.high:.4f}]"


def served_by(rows: pa.Table) -> dict[str, int]:
    """Logged requests per ranker that served them (`model_version`: visit_count, vN or
    shuffle_top)."""
    if "model_version" not in rows.column_names or rows.num_rows == 0:
        return {}
    pairs = pa.table({"request_id": rows["request_id"], "ranker": rows["model_version"]})
    counts = pairs.group_by(["request_id", "ranker"]).aggregate([])["ranker"]
    values, number = np.unique(
        counts.to_numpy(zero_copy_only=False).astype(str), return_counts=True
    )
    return {str(v): int(n) for v, n in zip(values, number, strict=True)}


@dataclass(frozen=True)
class Selection:
    """The rows (of whole requests) a comparison uses, and a sentence saying which and why."""

    rows: np.ndarray  # bool per row
    description: str


def select_requests(rows: pa.Table, baseline: str, candidate: str) -> Selection:
    """The requests served by neither compared ranker when there are at least
    MIN_NEUTRAL_REQUESTS of them (their labels favour neither); otherwise every request,
    saying so (the exposure warning then tells which ranker the labels favour)."""
    everything = np.ones(rows.num_rows, dtype=bool)
    counts = served_by(rows)
    total = sum(counts.values())
    if not counts:
        return Selection(everything, "")
    # A request whose ranker was not logged (null: "None") may have been either: never neutral.
    excluded = {logged_name(baseline), logged_name(candidate), "None"}
    neutral = {name: n for name, n in counts.items() if name not in excluded}
    n_neutral = sum(neutral.values())
    names = f"neither {baseline} nor {candidate}"
    if n_neutral >= MIN_NEUTRAL_REQUESTS:
        keep = ~np.isin(
            rows["model_version"].to_numpy(zero_copy_only=False).astype(str), list(excluded)
        )
        detail = ", ".join(f"{name} {n:,}" for name, n in sorted(neutral.items()))
        return Selection(
            keep,
            f"Compared on the {n_neutral:,} of {total:,} requests served by {names} "
            f"({detail}): their labels favour neither ranker.",
        )
    return Selection(
        everything,
        f"Compared on all {total:,} requests: only {n_neutral:,} were served by {names} "
        f"(at least {MIN_NEUTRAL_REQUESTS} are needed to compare on those alone).",
    )


def compare(
    targets: Targets,
    candidate_scores: np.ndarray,
    baseline_scores: np.ndarray,
    *,
    k: int,
    candidate: str,
    baseline: str,
    window: dict[str, str | None] | None = None,
    served: Mapping[str, int] | None = None,
    selection: str = "",
    intervals: bool = True,
    seed: int = 0,
) -> Comparison:
    """Compare two score vectors over the same candidates (higher = ranked earlier).

    `served`: requests per ranker that served them (`served_by`), for the exposure warning;
    `selection`: which requests these are and why. `intervals`: bootstrap each metric over
    requests and estimate the online metrics on the exploration requests among them.
    """
    candidate_scores = np.asarray(candidate_scores, dtype=np.float64)
    baseline_scores = np.asarray(baseline_scores, dtype=np.float64)
    before = per_request_metrics(targets, baseline_scores, k)
    after = per_request_metrics(targets, candidate_scores, k)
    bounds: dict[str, dict[str, Interval]] = {}
    estimates = None
    if intervals:
        for name, (value_a, defined) in before.items():
            value_b = after[name][0]
            a = (value_a * defined, defined.astype(np.float64))
            b = (value_b * defined, defined.astype(np.float64))
            bounds[name] = {
                "baseline": ratio_interval(*a, seed=seed),
                "candidate": ratio_interval(*b, seed=seed),
                "lift": lift_interval(a, b, paired=True, seed=seed),
            }
        estimates = online_estimates(targets, baseline_scores, candidate_scores, seed=seed)
    return Comparison(
        baseline=baseline,
        candidate=candidate,
        k=k,
        requests=targets.n_requests,
        candidates=len(targets.request),
        baseline_metrics={name: _mean(values) for name, values in before.items()},
        candidate_metrics={name: _mean(values) for name, values in after.items()},
        window=dict(window or {}),
        notes=() if targets.local_note is None else (f"local_share@{k}: {targets.local_note}",),
        served_by=dict(served or {}),
        selection=selection,
        intervals=bounds,
        estimates=estimates,
    )


def client_slots(targets: Targets) -> int:
    """How many pins the client shows per request, as far as the logs tell: the most of the
    returned pins it impressed in one request (at least 1)."""
    shown = np.bincount(targets.request, weights=targets.impressed, minlength=targets.n_requests)
    return max(int(shown.max()) if len(shown) else 0, 1)


def online_estimates(
    targets: Targets, baseline_scores: np.ndarray, candidate_scores: np.ndarray, *, seed: int = 0
) -> dict[str, PolicyComparison] | None:
    """Funnel efficiency (impressions per returned pin) and actions per returned pin of both
    rankers, estimated on the exploration (shuffle_top) requests (a seeded sample of
    `MAX_EXPLORED_REQUESTS` where there are more); None without any. The slots-aware
    estimate takes the client's slots from every request of `targets`."""
    if targets.explored is None or not targets.explored.any():
        return None
    assert targets.returned is not None and targets.propensity is not None
    slots = client_slots(targets)
    rows = np.flatnonzero(targets.explored)
    ids, request = np.unique(targets.request[rows], return_inverse=True)
    if len(ids) > MAX_EXPLORED_REQUESTS:
        keep = np.zeros(len(ids), dtype=bool)
        keep[np.random.default_rng(seed).choice(len(ids), MAX_EXPLORED_REQUESTS, replace=False)] = (
            True
        )
        rows = rows[keep[request]]
        _, request = np.unique(targets.request[rows], return_inverse=True)
    outcomes = {
        "funnel_efficiency": targets.impressed[rows].astype(np.float64),
        "actions_per_returned": (
            targets.actions[rows] if targets.actions is not None else np.zeros(len(rows))
        ),
    }
    return {
        name: compare_policies(
            request,
            y,
            targets.propensity[rows],
            targets.returned[rows],
            baseline_scores[rows],
            candidate_scores[rows],
            impressed=targets.impressed[rows],
            slots=slots,
            client_score=None if targets.client_score is None else targets.client_score[rows],
            seed=seed,
        )
        for name, y in outcomes.items()
    }


def write_reports(comparison: Comparison, out_dir: Path, *, title: str) -> dict[str, Path]:
    """Write evaluation.json, evaluation.md and evaluation.png (lift per metric) to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "evaluation.json",
        "markdown": out_dir / "evaluation.md",
        "chart": out_dir / "evaluation.png",
    }
    document = {"title": title, **comparison.to_dict()}
    paths["json"].write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    window = ", ".join(f"{key} {value}" for key, value in comparison.window.items() if value)
    warning = f"**{comparison.exposure_warning}**\n\n" if comparison.exposure_warning else ""
    paths["markdown"].write_text(
        f"# {title}\n\n{warning}{comparison.requests} requests, {comparison.candidates} logged "
        f"candidates{f' ({window})' if window else ''}; K = {comparison.k}.\n\n"
        f"{comparison.table()}\n"
    )
    _write_chart(comparison, paths["chart"], title)
    return paths


def _write_chart(comparison: Comparison, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    names = list(comparison.baseline_metrics)
    before = [comparison.baseline_metrics[n] for n in names]
    after = [comparison.candidate_metrics.get(n, math.nan) for n in names]
    lifts = comparison.lift()
    x = np.arange(len(names))
    panels = 2 if comparison.estimates else 1
    fig, axes = plt.subplots(1, panels, figsize=(8 + 4 * (panels - 1), 4.5), dpi=100)
    ax = axes[0] if panels > 1 else axes
    for offset, values, part, label, color in (
        (-0.2, before, "baseline", comparison.baseline, "#9e9e9e"),
        (0.2, after, "candidate", comparison.candidate, "#e60023"),
    ):
        ax.bar(
            x + offset,
            np.nan_to_num(values),
            width=0.4,
            label=label,
            color=color,
            yerr=_error_bars(comparison, names, part, values),
            capsize=3,
        )
    for i, name in enumerate(names):
        top = max(np.nan_to_num(before[i]), np.nan_to_num(after[i]))
        ax.annotate(
            _fmt_lift(lifts[name]),
            (x[i], top),
            ha="center",
            va="bottom",
            xytext=(0, 6),
            textcoords="offset points",
            fontsize=9,
        )
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("mean per request (95% bootstrap interval)")
    ax.legend(loc="lower right")
    if comparison.estimates:
        _estimates_panel(axes[1], comparison)
    biased = f"\nbiased: most requests were served by {comparison.exposed_by}"
    fig.suptitle(title + (biased if comparison.exposed_by else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _error_bars(
    comparison: Comparison, names: list[str], part: str, values: list[float]
) -> np.ndarray | None:
    """Asymmetric error bars (2, n) from the intervals; None when there are none."""
    if not comparison.intervals:
        return None
    bars = np.zeros((2, len(names)))
    for i, name in enumerate(names):
        interval = comparison.intervals.get(name, {}).get(part)
        if interval is not None and math.isfinite(interval.low) and math.isfinite(values[i]):
            bars[:, i] = (max(values[i] - interval.low, 0), max(interval.high - values[i], 0))
    return bars


def _estimates_panel(ax: Any, comparison: Comparison) -> None:
    """The lift of each online metric under each estimator, with its interval."""
    assert comparison.estimates is not None
    labels, values, low, high = [], [], [], []
    for name, estimate in comparison.estimates.items():
        for estimator, interval in estimate.lift.items():
            labels.append(f"{name}\n{estimator}")
            values.append(interval.value * 100)
            low.append((interval.value - interval.low) * 100)
            high.append((interval.high - interval.value) * 100)
    y = np.arange(len(labels))
    ax.barh(
        y,
        np.nan_to_num(values),
        xerr=np.nan_to_num([low, high]),
        color=["#e60023" if "naive" not in label else "#9e9e9e" for label in labels],
        capsize=3,
    )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    requests = next(iter(comparison.estimates.values())).requests
    ax.set_xlabel(f"lift, % (on {requests:,} exploration requests)")
    ax.set_title("online metrics estimated (naive: biased)", fontsize=10)
