"""Online experiment report: each traffic arm's measured metrics from the log and the events.

Every logged request names its arm (`walkrank.experiments`: an experiment arm, `explore` or
`default`), and the events its client reported say what the full ranker showed and what users
did with the pins WalkRank returned. Per arm, over the returned pins:

- `funnel_efficiency`: impressed / returned (how much of what it returns the full ranker shows);
- `actions_per_1000`: action events (closeup, click, save, share) per thousand returned pins;
- `local_share`: returned pins in the user's locale / returned (when the log has locale match).

Arms are assigned by user, so a user's requests move together: the intervals are bootstraps
over users (requests without a user id count as their own user), and each arm is compared with
the control arm by the lift of its ratio, resampling the two arms independently. A lift whose
interval excludes 0 is reported as significant.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from walkrank.errors import DataError
from walkrank.experiments import DEFAULT_ARM, EXPLORE_ARM
from walkrank.logs.events import ACTION_EVENTS
from walkrank.training.estimators import BOOTSTRAP_SAMPLES, Interval, lift_interval, ratio_interval
from walkrank.training.evaluate import LOCALE_MATCH_COLUMN

_SCALE = {"funnel_efficiency": 1.0, "actions_per_1000": 1000.0, "local_share": 1.0}


@dataclass(frozen=True)
class ArmResult:
    arm: str
    requests: int
    users: int
    returned: int
    metrics: dict[str, Interval]
    lift: dict[str, Interval]  # against the control arm (empty for the control itself)
    model_versions: dict[str, int]  # requests per ranker that served them

    def significant(self, metric: str) -> bool | None:
        interval = self.lift.get(metric)
        if interval is None or not math.isfinite(interval.low):
            return None
        return interval.excludes(0.0)


@dataclass(frozen=True)
class ExperimentReport:
    tenant: str
    control: str
    arms: tuple[ArmResult, ...]
    metrics: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "control": self.control,
            "arms": {
                a.arm: {
                    "requests": a.requests,
                    "users": a.users,
                    "returned": a.returned,
                    "model_versions": a.model_versions,
                    "metrics": {m: a.metrics[m].to_dict() for m in self.metrics},
                    "lift": {m: a.lift[m].to_dict() for m in a.lift},
                    "significant": {m: a.significant(m) for m in a.lift},
                }
                for a in self.arms
            },
        }

    def table(self) -> str:
        lines = [
            f"Arms of {self.tenant}, control {self.control} (95% bootstrap intervals over users; "
            "significant: the lift's interval excludes 0).",
            "",
            "| arm | requests | users | served by | "
            + " | ".join(self.metrics)
            + " | "
            + " | ".join(f"lift {m}" for m in self.metrics)
            + " |",
            "| --- | ---: | ---: | --- |" + " ---: |" * (2 * len(self.metrics)),
        ]
        for arm in self.arms:
            served = ", ".join(f"{v} {n:,}" for v, n in sorted(arm.model_versions.items()))
            cells = [str(arm.metrics[m]) for m in self.metrics]
            for m in self.metrics:
                if m not in arm.lift:
                    cells.append("control")
                    continue
                lift = arm.lift[m]
                verdict = {True: "significant", False: "not significant", None: "n/a"}
                cells.append(
                    f"{lift.value * 100:+.1f}% [{lift.low * 100:+.1f}%, {lift.high * 100:+.1f}%] "
                    f"{verdict[arm.significant(m)]}"
                    if math.isfinite(lift.value)
                    else "n/a"
                )
            lines.append(
                f"| {arm.arm} | {arm.requests:,} | {arm.users:,} | {served} | "
                + " | ".join(cells)
                + " |"
            )
        return "\n".join(lines)


def _column(table: pa.Table, name: str, default: float = 0.0) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, default)
    values = pc.fill_null(table[name].cast(pa.float64()), default)
    return np.asarray(values.to_numpy(zero_copy_only=False))


def _text(table: pa.Table, name: str, default: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, default, dtype=object)
    values = pc.fill_null(table[name].cast(pa.string()), default)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)


def experiment_report(
    joined: pa.Table,
    tenant: str,
    *,
    control: str | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> ExperimentReport:
    """Each arm's metrics and its lift over `control` from a `join_candidates_events` table
    (default control: `default` when logged, else the first arm by name that is not
    `explore`)."""
    returned = joined.filter(pc.fill_null(joined["returned"], False))
    if returned.num_rows == 0:
        raise DataError(f"tenant {tenant!r}: no returned candidates logged in the window")
    arm = _text(returned, "arm", DEFAULT_ARM)
    arm = np.where(arm == "", DEFAULT_ARM, arm)
    request_ids = _text(returned, "request_id", "")
    users = _text(returned, "user_id", "")
    users = np.where(users == "", "request:" + request_ids.astype(str), users)
    outcomes = {
        "funnel_efficiency": _column(returned, "impressed").astype(np.float64),
        "actions_per_1000": sum(
            (_column(returned, f"n_{kind}") for kind in ACTION_EVENTS), np.zeros(len(arm))
        ),
    }
    metrics = ["funnel_efficiency", "actions_per_1000"]
    if LOCALE_MATCH_COLUMN in returned.column_names:
        outcomes["local_share"] = (_column(returned, LOCALE_MATCH_COLUMN) > 0.5).astype(float)
        metrics.append("local_share")
    versions = _text(returned, "model_version", "")
    names = sorted(set(arm.tolist()))
    if control is None:
        others = [n for n in names if n != EXPLORE_ARM]
        control = DEFAULT_ARM if DEFAULT_ARM in names else (others or names)[0]
    if control not in names:
        raise DataError(
            f"tenant {tenant!r}: no logged request of control arm {control!r} "
            f"(arms logged: {', '.join(names)})"
        )
    per_user: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    results: dict[str, ArmResult] = {}
    for name in names:
        rows = arm == name
        _, user = np.unique(users[rows], return_inverse=True)
        count = np.bincount(user).astype(np.float64)
        sums = {m: np.bincount(user, weights=outcomes[m][rows]) for m in metrics}
        per_user[name] = (sums, count)
        # One (request, ranker) pair per request: requests per ranker that served them.
        pairs = np.unique(
            np.stack([request_ids[rows].astype(str), versions[rows].astype(str)]), axis=1
        )
        served, number = np.unique(pairs[1], return_counts=True)
        results[name] = ArmResult(
            arm=name,
            requests=len(np.unique(request_ids[rows])),
            users=len(count),
            returned=int(count.sum()),
            metrics={
                m: _scaled(ratio_interval(sums[m], count, samples=samples, seed=seed), m)
                for m in metrics
            },
            lift={},
            model_versions={str(v): int(n) for v, n in zip(served, number, strict=True)},
        )
    base_sums, base_count = per_user[control]
    for name in names:
        if name == control:
            continue
        sums, count = per_user[name]
        lifts = {
            m: lift_interval(
                (base_sums[m], base_count),
                (sums[m], count),
                paired=False,
                samples=samples,
                seed=seed,
            )
            for m in metrics
        }
        results[name] = dataclasses.replace(results[name], lift=lifts)
    ordered = [results[control]] + [results[n] for n in names if n != control]
    return ExperimentReport(tenant, control, tuple(ordered), tuple(metrics))


def _scaled(interval: Interval, metric: str) -> Interval:
    scale = _SCALE[metric]
    return Interval(interval.value * scale, interval.low * scale, interval.high * scale)
