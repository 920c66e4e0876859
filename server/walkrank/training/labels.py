"""Labels from the serving-stage candidate log and the downstream events.

The candidate log holds every generated candidate, impressed or not; the events say which
were shown, acted on, hidden or scored by the client's full ranker. Joining the two gives each
candidate its outcome; a label strategy (chosen per tenant) turns outcomes into targets and
sample weights:

- `engagement`: positives are actioned pins, weighted by the strongest action's weight;
  impressed-but-not-actioned pins are negatives.
- `funnel`: positives are impressed pins (passing the full ranker).
- `blended_funnel`: impressed and actioned pins are both positive, an actioned pin weighted by
  its strongest action's weight, an impressed-only pin by the impression weight (the article's
  best strategy).
- `distillation`: y is the full ranker's logged score (regression); unscored rows are dropped.

For the three classification strategies, generated-but-not-impressed candidates are negatives
kept with probability `negative_sample_rate` and weighted `1 / negative_sample_rate`, so the
sampled loss is an unbiased estimate of the full one; hidden pins are negatives weighted by
`weights["hide"]` and are never sampled away. Local labels multiply the weight of positives
whose pin locale matches the user's (of every row under distillation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from walkrank.errors import ConfigError, DataError
from walkrank.logs.events import ACTION_EVENTS, EVENT_TYPES

LABEL_STRATEGIES: tuple[str, ...] = ("engagement", "funnel", "blended_funnel", "distillation")
DEFAULT_EVENT_WEIGHT = 1.0
_SHOWN_EVENTS = tuple(t for t in EVENT_TYPES if t != "scored")


@dataclass(frozen=True, eq=False)
class LabelSet:
    """Training targets for the rows `indices` of the joined table (ascending)."""

    strategy: str
    y: np.ndarray
    sample_weight: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def n_positive(self) -> int:
        return int(np.count_nonzero(self.y > 0))


def join_candidates_events(
    candidates: pa.Table, events: pa.Table, tenant: str | None = None
) -> pa.Table:
    """Each logged candidate (of one tenant) with its outcome, in the candidates' row order.

    Adds `n_<event>` (int32 count of each event type on the (request_id, pin_id) pair),
    `impressed` (any event but `scored`: an action or a hide implies the pin was shown) and
    `full_score` (the largest score any event carried for the pair, null when none). Events
    about pins that were not logged as candidates are ignored. With `tenant`, events of
    other tenants are ignored too (events with a null tenant predate the tenant column and
    still join by request id): one tenant can never label another's candidates.
    """
    for name, table, needed in (
        ("candidates", candidates, ("request_id", "pin_id")),
        ("events", events, ("request_id", "pin_id", "event")),
    ):
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise DataError(
                f"join_candidates_events: {name} table lacks column(s) {', '.join(missing)}"
            )
    if tenant is not None and "tenant" in events.column_names:
        events = events.filter(pc.fill_null(pc.equal(events["tenant"], tenant), True))
    keys = ["request_id", "pin_id"]
    indicators = {k: events[k].cast(pa.string()) for k in keys}
    for kind in EVENT_TYPES:
        indicators[f"n_{kind}"] = pc.cast(pc.equal(events["event"], kind), pa.int32())
    indicators["full_score"] = (
        events["score"].cast(pa.float64())
        if "score" in events.column_names
        else pa.nulls(events.num_rows, pa.float64())
    )
    counted = [f"n_{kind}" for kind in EVENT_TYPES]
    outcomes = (
        pa.table(indicators)
        .group_by(keys)
        .aggregate([(c, "sum") for c in counted] + [("full_score", "max")])
    )
    outcomes = outcomes.rename_columns(
        [c.removesuffix("_sum").removesuffix("_max") for c in outcomes.column_names]
    )

    # Join only the keys and a row number: hash joins carry no list columns (user_interests)
    # and do not keep order, so the outcomes are put back in candidate order afterwards.
    row_keys = pa.table({k: candidates[k].cast(pa.string()) for k in keys}).append_column(
        "_row", pa.array(np.arange(candidates.num_rows, dtype=np.int64))
    )
    matched = row_keys.join(outcomes, keys=keys, join_type="left outer").sort_by("_row")

    joined = candidates
    for c in counted:
        joined = joined.append_column(c, pc.fill_null(matched[c], 0).cast(pa.int32()))
    shown = np.zeros(candidates.num_rows, dtype=bool)
    for kind in _SHOWN_EVENTS:
        shown |= joined[f"n_{kind}"].to_numpy() > 0
    joined = joined.append_column("impressed", pa.array(shown))
    return joined.append_column("full_score", matched["full_score"])


def _check_weights(
    weights: Mapping[str, float], local_label_weight: float, negative_sample_rate: float
) -> None:
    unknown = sorted(set(weights) - set(EVENT_TYPES))
    if unknown:
        raise ConfigError(
            f"label weights: unknown event type(s) {', '.join(unknown)} "
            f"(known: {', '.join(EVENT_TYPES)})"
        )
    for kind, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"label weights: {kind} must be a finite weight >= 0, got {weight!r}")
    if not (math.isfinite(local_label_weight) and local_label_weight >= 0):
        raise ConfigError(f"local_label_weight must be finite and >= 0, got {local_label_weight!r}")
    if not 0 < negative_sample_rate <= 1:
        raise ConfigError(f"negative_sample_rate must be in (0, 1], got {negative_sample_rate!r}")


def _column(joined: pa.Table, name: str) -> pa.ChunkedArray:
    if name not in joined.column_names:
        raise DataError(
            f"labels: the joined table lacks column {name!r}; build it with join_candidates_events"
        )
    return joined[name]


def locale_matches(joined: pa.Table) -> np.ndarray:
    """Rows whose pin locale equals the user's: the `f_locale_match` feature when logged,
    else a `pin_locale` column compared with `user_locale`."""
    if "f_locale_match" in joined.column_names:
        return pc.fill_null(joined["f_locale_match"], 0.0).to_numpy() > 0.5
    if "pin_locale" in joined.column_names and "user_locale" in joined.column_names:
        same = pc.equal(
            joined["pin_locale"].cast(pa.string()), joined["user_locale"].cast(pa.string())
        )
        return pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    raise DataError(
        "local labels need the pin locale: the candidate log has neither an "
        "f_locale_match feature column nor pin_locale and user_locale columns"
    )


def strongest_action_weight(joined: pa.Table, weights: Mapping[str, float]) -> np.ndarray:
    """Per row, the largest weight among the actions done on it; 0 when none.

    The tenant's actions are the action types `weights` weighs above 0: a type it does not
    name (a save, for a tenant that weights only clicks) is not an action for that tenant.
    Evaluation should use this too, so labels and metrics agree on what an action is.
    """
    strongest = np.zeros(joined.num_rows)
    for kind in ACTION_EVENTS:
        weight = float(weights.get(kind, 0.0))
        if weight > 0:
            done = pc.fill_null(_column(joined, f"n_{kind}"), 0).to_numpy() > 0
            strongest = np.where(done, np.maximum(strongest, weight), strongest)
    return strongest


def build_labels(
    joined: pa.Table,
    strategy: str,
    *,
    weights: Mapping[str, float],
    local_label_weight: float = 1.0,
    negative_sample_rate: float = 1.0,
    seed: int = 0,
) -> LabelSet:
    """Targets and sample weights for a tenant's label strategy (see the module docstring).

    `weights` maps event types to label weights (a tenant's `labels.weights`); its actions are
    those of `strongest_action_weight`. `impression` and `hide` weigh impressed-only positives
    and hidden negatives (`DEFAULT_EVENT_WEIGHT` when absent).
    """
    if strategy not in LABEL_STRATEGIES:
        raise ConfigError(
            f"unknown label strategy {strategy!r} (known: {', '.join(LABEL_STRATEGIES)})"
        )
    _check_weights(weights, local_label_weight, negative_sample_rate)
    n = joined.num_rows
    local = locale_matches(joined) if local_label_weight != 1.0 else np.zeros(n, dtype=bool)

    if strategy == "distillation":
        score = pc.cast(_column(joined, "full_score"), pa.float64())
        scored = score.is_valid().to_numpy(zero_copy_only=False)
        indices = np.flatnonzero(scored)
        y = pc.fill_null(score, 0.0).to_numpy()[indices].astype(np.float32)
        sample_weight = np.where(local[indices], local_label_weight, 1.0).astype(np.float32)
        return LabelSet(strategy, y, sample_weight, indices.astype(np.int64))

    action_weight = strongest_action_weight(joined, weights)
    actioned = action_weight > 0
    hidden = _column(joined, "n_hide").to_numpy() > 0
    impressed = _column(joined, "impressed").to_numpy(zero_copy_only=False).astype(bool)

    y = np.zeros(n)
    weight = np.ones(n)
    if strategy == "engagement":
        positive = actioned & ~hidden
        weight[positive] = action_weight[positive]
    else:
        positive = impressed & ~hidden
        weight[positive] = weights.get("impression", DEFAULT_EVENT_WEIGHT)
        if strategy == "blended_funnel":
            weight[positive & actioned] = action_weight[positive & actioned]
    y[positive] = 1.0
    weight[hidden] = weights.get("hide", DEFAULT_EVENT_WEIGHT)
    weight[positive & local] *= local_label_weight

    # One draw per row (not per negative) keeps the sample of a row independent of the others.
    unimpressed = ~impressed & ~actioned & ~hidden
    keep = np.random.default_rng(seed).random(n) < negative_sample_rate
    weight[unimpressed] /= negative_sample_rate
    indices = np.flatnonzero(~unimpressed | keep)
    return LabelSet(
        strategy,
        y[indices].astype(np.float32),
        weight[indices].astype(np.float32),
        indices.astype(np.int64),
    )
