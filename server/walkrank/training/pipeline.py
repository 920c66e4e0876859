"""One tenant's training loop: log window -> labels -> model -> gate -> comparison -> publish.

Steps, each timed and reported through `progress`:
1. load: the tenant's logged candidates in the window and the events that may label them
   (events are read up to `EVENT_LAG_SECONDS` past the window's end: an action happens after
   the request that produced the candidate);
2. join: each candidate gets its outcome (`walkrank.training.labels.join_candidates_events`);
3. split by time: the last `validation_fraction` of the requests (by request time) is held out,
   whole requests on one side, so validation looks like next week's traffic, not a shuffle;
4. train: labels by the tenant's strategy on the training requests, `train_model` on the
   tenant's features in the tenant's order (the served matrix, read from the `f_<name>` columns),
   with the tenant's regularisation and early stopping on the held-out requests; with `search`,
   one model per point of the tenant's `ranker.search` grid;
5. gate: export to ONNX and check it scores like XGBoost (`walkrank.ranking.export`); with
   `search`, every model goes through the gate and the best on the tenant's primary metric
   over the held-out requests is kept;
6. compare: the exported model against what it replaces (the serving version, else visit
   count) and against visit count, on the held-out requests (`walkrank.training.evaluate`); a
   model worse than either on the tenant's primary metric is refused unless forced;
7. publish: a new version in the registry; the server serves it after Admin.Reload.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from walkrank.errors import ConfigError, DataError, ModelError
from walkrank.logs.candidates import read_candidates
from walkrank.logs.events import read_events
from walkrank.logs.partitioned import TimeLike, to_epoch_seconds
from walkrank.model_registry import ModelRegistry
from walkrank.storage import Location, as_location, join
from walkrank.tenants import TenantConfig
from walkrank.training.evaluate import (
    Comparison,
    Targets,
    compare,
    ranking_metrics,
    select_requests,
    served_by,
    targets_from_joined,
    write_reports,
)
from walkrank.training.labels import LabelSet, build_labels, join_candidates_events

Progress = Callable[[str], None]
Window = tuple[TimeLike, TimeLike]
"""(start, end): datetimes (naive = UTC) or epoch seconds; None leaves that side open."""

VALIDATION_FRACTION = 0.2
EVENT_LAG_SECONDS = 86_400.0
GATE_SAMPLE_ROWS = 2_000
VISIT_COUNT = "visit count"


@dataclass(frozen=True)
class Trial:
    """One model a training run fitted: the settings it tried (ranker YAML names; empty = the
    tenant's own), the boosting rounds early stopping kept, XGBoost's train/valid metrics,
    the gate's verdict and the tenant's primary metric on the held-out requests."""

    settings: dict[str, Any]
    rounds: int
    metrics: dict[str, float]
    gate: str  # "passed", or why the gate refused the model
    primary: float | None  # None when the gate refused it
    chosen: bool = False


@dataclass(frozen=True)
class TrainReport:
    """What one training run did; `version` is None when nothing was published.

    `comparison` is the new model against what serves (the current version, else visit
    count); `visit_count` the same against visit count when a model serves (else None).
    `trials` lists every model fitted (one without `--search`)."""

    tenant: str
    strategy: str
    objective: str
    version: int | None
    refused: str | None
    forced: bool
    metrics: dict[str, float]
    validation: dict[str, float]
    comparison: Comparison
    label_stats: dict[str, float]
    rows: dict[str, int]
    window: dict[str, str | None]
    seconds: dict[str, float] = field(default_factory=dict)
    trials: tuple[Trial, ...] = ()
    visit_count: Comparison | None = None

    @property
    def published(self) -> bool:
        return self.version is not None


@dataclass(frozen=True)
class EvaluationResult:
    comparison: Comparison
    paths: dict[str, Path]


class StepTimer:
    """Times the named steps and reports each through `progress`."""

    def __init__(self, tenant: str, progress: Progress) -> None:
        self.tenant = tenant
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, step: str, detail: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._last, 3)
        self._last = now
        self.progress(f"[{self.tenant}] {step}: {detail} ({self.seconds[step]:.1f}s)")


# --- reading the log ---------------------------------------------------------------------------


def window_bounds(window: Window | None) -> tuple[float | None, float | None]:
    """Epoch-second bounds of a window; DataError when it is empty by construction."""
    if window is None:
        return None, None
    start, end = window
    lo, hi = to_epoch_seconds(start, "window start"), to_epoch_seconds(end, "window end")
    if lo is not None and hi is not None and lo >= hi:
        raise DataError(f"window: start {_iso(lo)} is not before end {_iso(hi)}")
    return lo, hi


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return (
        datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def describe_window(lo: float | None, hi: float | None) -> dict[str, str | None]:
    return {"start": _iso(lo), "end": _iso(hi)}


def load_joined(
    tenant: TenantConfig, logs_dir: Location, window: Window | None, steps: StepTimer
) -> pa.Table:
    """The tenant's candidates in the window, each joined with its events (`logs_dir` a
    local directory or a store URI)."""
    lo, hi = window_bounds(window)
    logs_dir = as_location(logs_dir)
    candidates = read_candidates(logs_dir, tenant.name, lo, hi)
    if candidates.num_rows == 0:
        bounds = describe_window(lo, hi)
        raise DataError(
            f"no logged candidates for tenant {tenant.name!r} under "
            f"{join(logs_dir, 'candidates')} in the window [{bounds['start'] or 'beginning'}, "
            f"{bounds['end'] or 'now'}): nothing to train or evaluate on"
        )
    events = read_events(
        logs_dir, lo, None if hi is None else hi + EVENT_LAG_SECONDS, tenant=tenant.name
    )
    steps.done("load", f"{candidates.num_rows:,} candidates, {events.num_rows:,} events")
    # One canonical row order: the writer's (and so the files') order follows which request
    # finished first, and negative sampling and the booster both depend on row order. Within
    # a request by pin id, not by served rank: evaluation breaks score ties by row order, and
    # the served order would hand every tie to the pins that were returned (and labelled).
    joined = join_candidates_events(candidates, events, tenant.name).sort_by(
        [("ts", "ascending"), ("request_id", "ascending"), ("pin_id", "ascending")]
    )
    impressed = int(pc.sum(joined["impressed"]).as_py() or 0)
    steps.done(
        "join",
        f"{joined.num_rows:,} candidates of "
        f"{pc.count_distinct(joined['request_id']).as_py():,} requests, "
        f"{impressed:,} impressed",
    )
    return joined


def split_by_time(
    joined: pa.Table, fraction: float = VALIDATION_FRACTION
) -> tuple[pa.Table, pa.Table]:
    """(train, validation): the last `fraction` of requests by request time, whole requests
    on one side (ties in time broken by request id, so the split is reproducible)."""
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction!r}")
    requests = (
        joined.select(["request_id", "ts"])
        .group_by("request_id")
        .aggregate([("ts", "min")])
        .sort_by([("ts_min", "ascending"), ("request_id", "ascending")])
    )
    n = requests.num_rows
    if n < 2:
        raise DataError(
            f"the window holds {n} request(s); training needs at least 2 (one to "
            "train on, one to validate on)"
        )
    n_valid = min(n - 1, max(1, math.ceil(fraction * n)))
    held_out = requests["request_id"].slice(n - n_valid)
    is_valid = pc.is_in(joined["request_id"], value_set=held_out.combine_chunks())
    return joined.filter(pc.invert(is_valid)), joined.filter(is_valid)


def feature_matrix(table: pa.Table, feature_names: Sequence[str], *, what: str) -> np.ndarray:
    """The float32 matrix of `f_<name>` columns in the given order; DataError naming every
    missing column (or a null, which the served matrix never holds)."""
    columns = [f"f_{name}" for name in feature_names]
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{what}: the candidate log has no column(s) {', '.join(missing)} "
            f"(logged features: {', '.join(_logged_features(table)) or 'none'}); "
            "features are logged from the tenant's feature list at serving time"
        )
    matrix = np.empty((table.num_rows, len(columns)), dtype=np.float32)
    for j, column in enumerate(columns):
        values = table[column]
        if values.null_count:
            raise DataError(
                f"{what}: column {column} has {values.null_count} null value(s) "
                "(logged before the feature was on the tenant's list?)"
            )
        matrix[:, j] = values.to_numpy()
    return matrix


def _logged_features(table: pa.Table) -> list[str]:
    return [c for c in table.column_names if c.startswith("f_")]


def request_groups(table: pa.Table) -> np.ndarray:
    """int64 request number per row (for pairwise groups and per-request metrics)."""
    _, codes = np.unique(table["request_id"].to_numpy(zero_copy_only=False), return_inverse=True)
    return codes.astype(np.int64)


def objective_for(tenant: TenantConfig, strategy: str) -> str:
    """Distillation regresses on the full ranker's score; every other strategy has 0/1 labels
    and keeps the tenant's objective unless that is regression (then binary)."""
    if strategy == "distillation":
        return "regression"
    return "binary" if tenant.ranker.objective == "regression" else tenant.ranker.objective


def tenant_labels(
    tenant: TenantConfig,
    joined: pa.Table,
    strategy: str,
    *,
    negative_sample_rate: float | None = None,
    seed: int = 0,
) -> LabelSet:
    labels = tenant.labels
    return build_labels(
        joined,
        strategy,
        weights=dict(labels.weights),
        local_label_weight=labels.local_label_weight,
        negative_sample_rate=(
            labels.negative_sample_rate if negative_sample_rate is None else negative_sample_rate
        ),
        seed=seed,
    )


def label_stats(label_set: LabelSet) -> dict[str, float]:
    y, w = label_set.y, label_set.sample_weight
    positive = y > 0
    stats = {
        "rows": len(label_set),
        "positives": int(positive.sum()),
        "positive_weight": float(w[positive].sum()),
        "negative_weight": float(w[~positive].sum()),
    }
    if label_set.strategy == "distillation":
        stats.update(
            target_mean=float(y.mean()) if len(y) else math.nan,
            target_std=float(y.std()) if len(y) else math.nan,
        )
    return stats


def _check_learnable(label_set: LabelSet, tenant: str, part: str) -> None:
    if len(label_set) == 0:
        raise DataError(
            f"tenant {tenant!r}: no {part} rows with a {label_set.strategy} label "
            "(distillation needs events carrying the full ranker's score)"
        )
    if label_set.strategy != "distillation" and (
        label_set.n_positive == 0 or label_set.n_positive == len(label_set)
    ):
        kind = "positive" if label_set.n_positive == 0 else "negative"
        raise DataError(
            f"tenant {tenant!r}: the {part} requests have no {kind} "
            f"{label_set.strategy} label; are events reported for this window?"
        )


def model_targets(label_set: LabelSet, objective: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(y, weights) for `train_model`. A pairwise ranker weighs whole requests, not rows, so
    its positives are graded by their label weight (save > click > impression) instead; the
    negatives' sampling weights have no pairwise counterpart and are dropped."""
    if objective == "pairwise":
        return (label_set.y * label_set.sample_weight).astype(np.float32), None
    return label_set.y, label_set.sample_weight


def training_params(
    tenant: TenantConfig, settings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`train_model` params of the tenant's ranker, with `settings` (ranker YAML names, as in
    a search grid point) overriding the tenant's values. A pairwise ranker's early stopping
    watches NDCG at the primary metric's K: the cut-off the publish check compares at."""
    params = dataclasses.replace(tenant.ranker, **(settings or {})).training_params()
    return {**params, "ndcg_at": tenant.labels.primary_metric_k}


# --- scoring and comparison --------------------------------------------------------------------


def score_with_model(
    onnx_bytes: bytes, feature_names: Sequence[str], table: pa.Table, *, what: str
) -> np.ndarray:
    """Scores as served: the ONNX model through `Scorer`, on the logged feature columns."""
    return score_matrix(onnx_bytes, feature_matrix(table, feature_names, what=what))


def score_matrix(onnx_bytes: bytes, matrix: np.ndarray) -> np.ndarray:
    """Scores as served: the ONNX model through `Scorer` on a feature matrix."""
    from walkrank.ranking.scorer import Scorer

    return Scorer.from_onnx(onnx_bytes, matrix.shape[1]).score(matrix)


def serving_baseline(
    registry: ModelRegistry, tenant: str, valid: pa.Table
) -> tuple[str, np.ndarray, int | None]:
    """(name, scores, version) of what serves now: the CURRENT model, else visit count."""
    current = registry.current(tenant)
    if current is None:
        return VISIT_COUNT, _visit_scores(valid), None
    loaded = registry.load(tenant, current.version)
    scores = score_with_model(
        loaded.onnx_bytes,
        loaded.feature_names,
        valid,
        what=f"serving model v{loaded.version} of {tenant!r}",
    )
    return f"v{loaded.version}", scores, loaded.version


def _visit_scores(table: pa.Table) -> np.ndarray:
    return pc.fill_null(table["visit_score"], 0.0).to_numpy().astype(np.float64)


# --- training ----------------------------------------------------------------------------------


def train_tenant(
    tenant_config: TenantConfig,
    logs_dir: Location,
    models_dir: Path,
    *,
    window: Window | None = None,
    force: bool = False,
    strategy_override: str | None = None,
    publish: bool = True,
    dask_scheduler: str | None = None,
    search: bool = False,
    progress: Progress = print,
    validation_fraction: float = VALIDATION_FRACTION,
    seed: int = 0,
) -> TrainReport:
    """Train, check and (unless worse than what serves or than visit count, or
    `publish=False`) publish one tenant's ranker from its logged candidates and events in
    `window`. `search` fits one model per point of the tenant's `ranker.search` grid and keeps
    the best on the primary metric among those that pass the gate."""
    tenant = tenant_config
    strategy = strategy_override or tenant.labels.strategy
    objective = objective_for(tenant, strategy)
    steps = StepTimer(tenant.name, progress)
    lo, hi = window_bounds(window)
    if dask_scheduler is not None:
        if search:
            raise ConfigError("--search trains in process; drop --dask-scheduler to search")
        from walkrank.training.dask_train import train_on_dask

        trained, valid, stats, rows = train_on_dask(
            tenant,
            as_location(logs_dir),
            dask_scheduler,
            window=(lo, hi),
            strategy=strategy,
            objective=objective,
            validation_fraction=validation_fraction,
            seed=seed,
            steps=steps,
        )
        fitted: list[tuple[dict[str, Any], Any]] = [({}, trained)]
    else:
        fitted, valid, stats, rows = _train_local(
            tenant,
            as_location(logs_dir),
            window=(lo, hi),
            strategy=strategy,
            objective=objective,
            validation_fraction=validation_fraction,
            seed=seed,
            steps=steps,
            grid=tenant.ranker.search_grid() if search else [{}],
        )
    return finish_training(
        tenant,
        fitted,
        valid,
        models_dir=Path(models_dir),
        steps=steps,
        strategy=strategy,
        objective=objective,
        label_stats=stats,
        rows=rows,
        window=describe_window(lo, hi),
        force=force,
        publish=publish,
    )


def _train_local(
    tenant: TenantConfig,
    logs_dir: Location,
    *,
    window: Window,
    strategy: str,
    objective: str,
    validation_fraction: float,
    seed: int,
    steps: StepTimer,
    grid: Sequence[Mapping[str, Any]],
):
    """One model per grid point (a point overrides ranker settings; `{}` = the tenant's)."""
    from walkrank.ranking.fit import train_model

    joined = load_joined(tenant, logs_dir, window, steps)
    train, valid = split_by_time(joined, validation_fraction)
    features = list(tenant.features)
    x_train = feature_matrix(train, features, what=f"tenant {tenant.name!r}")
    x_valid = feature_matrix(valid, features, what=f"tenant {tenant.name!r}")
    train_labels = tenant_labels(tenant, train, strategy, seed=seed)
    _check_learnable(train_labels, tenant.name, "training")
    # Validation keeps every candidate: its loss must estimate serving, not the sample.
    valid_labels = tenant_labels(tenant, valid, strategy, negative_sample_rate=1.0, seed=seed)
    train_groups = request_groups(train)[train_labels.indices]
    valid_groups = request_groups(valid)[valid_labels.indices]
    stats = label_stats(train_labels)
    rows = {
        "candidates": joined.num_rows,
        "train_rows": len(train_labels),
        "valid_rows": valid.num_rows,
        "train_requests": int(train_groups.max()) + 1 if len(train_groups) else 0,
        "valid_requests": int(request_groups(valid).max()) + 1,
    }
    pairwise = objective == "pairwise"
    valid_set = None
    if len(valid_labels):
        valid_set = (
            x_valid[valid_labels.indices],
            *model_targets(valid_labels, objective),
            valid_groups if pairwise else None,
        )
    y, weights = model_targets(train_labels, objective)
    fitted = []
    for settings in grid:
        trained = train_model(
            x_train[train_labels.indices],
            y,
            objective=objective,
            weights=weights,
            groups=train_groups if pairwise else None,
            params=training_params(tenant, settings),
            valid=valid_set,
            seed=seed,
        )
        fitted.append((dict(settings), trained))
    what = (
        f"{len(grid)} models (ranker.search)" if len(grid) > 1 else f"{_fit_summary(fitted[0][1])}"
    )
    steps.done(
        "train",
        f"{objective} on {len(train_labels):,} labelled rows "
        f"({stats['positives']:,} positive, {strategy}), "
        f"{rows['train_requests']:,} requests; held out "
        f"{rows['valid_requests']:,} requests; {what}",
    )
    return fitted, valid, stats, rows


def _fit_summary(trained: Any) -> str:
    """Rounds kept and XGBoost's train vs held-out metrics: how far the model overfits."""
    metrics = trained.metrics
    pairs = [
        f"{name} {metrics[f'train_{name}']:.3f} train / {metrics[f'valid_{name}']:.3f} held out"
        for name in sorted({k.split("_", 1)[1] for k in metrics if k.startswith("valid_")})
    ]
    kept = f"{int(metrics['rounds'])} of {trained.params['n_estimators']} rounds"
    return ", ".join([kept, *pairs])


def finish_training(
    tenant: TenantConfig,
    fitted: Sequence[tuple[dict[str, Any], Any]],
    valid: pa.Table,
    *,
    models_dir: Path,
    steps: StepTimer,
    strategy: str,
    objective: str,
    label_stats: Mapping[str, float],
    rows: Mapping[str, int],
    window: dict[str, str | None],
    force: bool,
    publish: bool,
) -> TrainReport:
    """Export + gate each fitted model (keeping the best that passes on the primary metric),
    compare it with what serves and with visit count on the held-out requests, publish or
    refuse (shared by the local and the Dask paths). `fitted` holds (settings, model) pairs."""
    features = list(tenant.features)
    registry = ModelRegistry(models_dir)
    baseline, baseline_scores, _ = serving_baseline(registry, tenant.name, valid)
    # Compared on the held-out requests served by neither ranker when there are enough.
    selection = select_requests(valid, baseline, "new model")
    x_valid = feature_matrix(valid, features, what=f"tenant {tenant.name!r}")
    compared = valid.filter(pa.array(selection.rows))
    targets = targets_from_joined(compared, tenant.labels.weights)
    trials, exported, trained, candidate_scores = _gate_trials(
        tenant, fitted, x_valid, targets, objective=objective, rows=selection.rows
    )
    passed = sum(t.gate == "passed" for t in trials)
    steps.done(
        "gate",
        f"{tenant.ranker.converter} ONNX matches XGBoost on "
        f"{min(len(x_valid), GATE_SAMPLE_ROWS):,} held-out rows"
        + (f" for {passed} of {len(trials)} models" if len(trials) > 1 else ""),
    )
    primary = tenant.labels.primary_metric
    if len(trials) > 1:
        steps.progress(
            f"[{tenant.name}] models tried, best {primary} on the held-out "
            f"requests kept:\n{trials_table(trials, primary)}"
        )

    k = tenant.labels.primary_metric_k
    comparison = compare(
        targets,
        candidate_scores,
        baseline_scores[selection.rows],
        k=k,
        candidate="new model",
        baseline=baseline,
        selection=selection.description,
        **_held_out(compared),
    )
    steps.progress(
        f"[{tenant.name}] new model vs {baseline} on {comparison.requests:,} "
        f"held-out requests:\n{comparison.table()}"
    )
    versus_visits = None
    if baseline != VISIT_COUNT:
        # Its own selection: requests visit count served are neutral against the serving model.
        against_visits = select_requests(valid, VISIT_COUNT, "new model")
        visit_rows = valid.filter(pa.array(against_visits.rows))
        versus_visits = compare(
            targets_from_joined(visit_rows, tenant.labels.weights),
            score_matrix(exported.onnx_bytes, x_valid[against_visits.rows]),
            _visit_scores(visit_rows),
            k=k,
            candidate="new model",
            baseline=VISIT_COUNT,
            selection=against_visits.description,
            **_held_out(visit_rows),
        )
        steps.progress(
            f"[{tenant.name}] new model vs {VISIT_COUNT}: {versus_visits.describe(primary)}"
        )
    refused = None
    for against in (comparison, versus_visits):
        if against is not None and refused is None and against.worse_on(primary):
            refused = (
                f"the new model is worse than {against.baseline} on {tenant.name}'s "
                f"primary metric ({against.describe(primary)})"
            )

    version = None
    if publish and (refused is None or force):
        metadata = dict(exported.metadata)
        metadata.update(
            tenant=tenant.name,
            strategy=strategy,
            training_window=window,
            label_stats=dict(label_stats),
            rows=dict(rows),
            train_metrics=dict(trained.metrics),
            training_params=_json_params(trained.params),
            metrics=comparison.candidate_metrics,
            comparison=comparison.to_dict(),
            feature_defaults=dict(tenant.feature_defaults),
        )
        if versus_visits is not None:
            metadata["comparison_visit_count"] = versus_visits.to_dict()
        if len(trials) > 1:
            metadata["search"] = [dataclasses.asdict(t) for t in trials]
        version = registry.publish(tenant.name, exported.onnx_bytes, metadata).version
        note = " (forced past: " + refused + ")" if refused else ""
        steps.done("publish", f"version {version} of {tenant.name!r} in {registry.root}{note}")
    elif publish:
        steps.progress(f"[{tenant.name}] not published: {refused}; --force publishes anyway")
    return TrainReport(
        tenant=tenant.name,
        strategy=strategy,
        objective=objective,
        version=version,
        refused=refused,
        forced=bool(force and refused and version is not None),
        metrics=dict(trained.metrics),
        validation=comparison.candidate_metrics,
        comparison=comparison,
        label_stats=dict(label_stats),
        rows=dict(rows),
        window=window,
        seconds=dict(steps.seconds),
        trials=tuple(trials),
        visit_count=versus_visits,
    )


def _gate_trials(
    tenant: TenantConfig,
    fitted: Sequence[tuple[dict[str, Any], Any]],
    x_valid: np.ndarray,
    targets: Targets,
    *,
    objective: str,
    rows: np.ndarray,
):
    """Every fitted model through the gate and scored as served on the held-out requests
    (`rows` of them compared: `targets` are theirs); returns (trials, the best exported
    model, its trained model, its scores on `rows`). A lone
    model that fails the gate raises the gate's ModelError; in a search it is recorded, and
    ModelError is raised only when no model passes."""
    from walkrank.ranking.export import export_model

    features = list(tenant.features)
    primary = tenant.labels.primary_metric
    trials: list[Trial] = []
    best: tuple[float, int, Any, Any, np.ndarray] | None = None
    for index, (settings, trained) in enumerate(fitted):
        rounds = int(trained.metrics.get("rounds", trained.booster.num_boosted_rounds()))
        try:
            exported = export_model(
                trained.booster,
                features,
                converter=tenant.ranker.converter,
                objective=objective,
                sample=x_valid[:GATE_SAMPLE_ROWS],
            )
        except ModelError as exc:
            if len(fitted) == 1:
                raise
            trials.append(Trial(settings, rounds, dict(trained.metrics), str(exc), None))
            continue
        scores = score_matrix(exported.onnx_bytes, x_valid[rows])
        value = ranking_metrics(targets, scores, tenant.labels.primary_metric_k)[primary]
        trials.append(Trial(settings, rounds, dict(trained.metrics), "passed", value))
        # NaN (no held-out request defines the metric) never beats a number; ties keep the
        # earlier (grid order) model.
        key = -math.inf if math.isnan(value) else value
        if best is None or key > best[0]:
            best = (key, index, exported, trained, scores)
    if best is None:
        raise ModelError(
            f"tenant {tenant.name!r}: none of the {len(fitted)} models passed the "
            f"validation gate; first refusal: {trials[0].gate}"
        )
    _, chosen, exported, trained, scores = best
    trials[chosen] = dataclasses.replace(trials[chosen], chosen=True)
    return trials, exported, trained, scores


def trials_table(trials: Sequence[Trial], primary: str) -> str:
    """A Markdown table of the models a search tried: settings, rounds kept, held-out loss,
    primary metric, gate verdict; the kept one marked."""
    names = list(dict.fromkeys(name for t in trials for name in t.settings))
    losses = sorted({k for t in trials for k in t.metrics if k.startswith("valid_")})
    lines = [
        "| " + " | ".join(["model", *names, "rounds", *losses, primary, "gate"]) + " |",
        "|" + " --- |" * (len(names) + len(losses) + 4),
    ]
    for number, t in enumerate(trials, 1):
        cells = [
            f"{number}{' (kept)' if t.chosen else ''}",
            *(f"{t.settings.get(n, '')}" for n in names),
            str(t.rounds),
            *(f"{t.metrics.get(k, math.nan):.4f}" for k in losses),
            "n/a" if t.primary is None or math.isnan(t.primary) else f"{t.primary:.4f}",
            "passed" if t.gate == "passed" else "refused: " + t.gate[:80],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


class _HeldOut(TypedDict):
    window: dict[str, str | None]
    served: dict[str, int]


def _held_out(rows: pa.Table) -> _HeldOut:
    """`compare`'s `window` and `served` for the held-out `rows`: the report says which time
    window they span and which rankers served them (the exposure warning)."""
    return {"window": _valid_window(rows), "served": served_by(rows)}


def _valid_window(valid: pa.Table) -> dict[str, str | None]:
    ts = valid["ts"].cast(pa.int64())
    lo, hi = pc.min(ts).as_py(), pc.max(ts).as_py()
    return {
        "start": _iso(lo / 1e6) if lo is not None else None,
        "last_request": _iso(hi / 1e6) if hi is not None else None,
    }


# --- evaluation --------------------------------------------------------------------------------


def evaluate_tenant(
    tenant_config: TenantConfig,
    logs_dir: Location,
    models_dir: Path,
    *,
    window: Window | None = None,
    version: int | None = None,
    k: int = 50,
    out_dir: Path | None = None,
    progress: Progress = print,
    validation_fraction: float = VALIDATION_FRACTION,
) -> EvaluationResult:
    """A published model (default: the serving one) against visit count on logged requests.

    With a window, every request in it is evaluated; without one, the held-out part of the
    whole log (the last `validation_fraction` of requests, as `train_tenant` holds out).
    Reports go to `out_dir` (default `<logs_dir>/evaluations/<tenant>/v<version>`).
    """
    tenant = tenant_config
    if out_dir is None and isinstance(as_location(logs_dir), str):
        raise ConfigError(
            f"{logs_dir} is on object storage: name a local directory for the reports (--out)"
        )
    steps = StepTimer(tenant.name, progress)
    registry = ModelRegistry(models_dir)
    loaded = registry.load(tenant.name, version)
    joined = load_joined(tenant, logs_dir, window, steps)
    held_out = joined if window is not None else split_by_time(joined, validation_fraction)[1]
    selection = select_requests(held_out, VISIT_COUNT, f"v{loaded.version}")
    held_out = held_out.filter(pa.array(selection.rows))
    targets = targets_from_joined(held_out, tenant.labels.weights)
    scores = score_with_model(
        loaded.onnx_bytes,
        loaded.feature_names,
        held_out,
        what=f"model v{loaded.version} of {tenant.name!r}",
    )
    comparison = compare(
        targets,
        scores,
        _visit_scores(held_out),
        k=k,
        candidate=f"v{loaded.version}",
        baseline=VISIT_COUNT,
        selection=selection.description,
        **_held_out(held_out),
    )
    steps.done(
        "evaluate",
        f"v{loaded.version} on {comparison.requests:,} requests, "
        f"{comparison.candidates:,} candidates",
    )
    out = (
        Path(out_dir)
        if out_dir is not None
        else (Path(logs_dir) / "evaluations" / tenant.name / f"v{loaded.version}")
    )
    paths = write_reports(
        comparison, out, title=f"{tenant.name}: v{loaded.version} vs {VISIT_COUNT}"
    )
    progress(comparison.table())
    progress(f"wrote {', '.join(str(p) for p in paths.values())}")
    return EvaluationResult(comparison, paths)
