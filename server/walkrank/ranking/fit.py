"""Fit a tenant's lightweight ranker: XGBoost on float32 candidate feature matrices.

Objectives (the article's label strategies map onto the first two; distillation is ours):
- "binary": binary:logistic with per-row sample weights (engagement / funnel-efficiency
  labels, label and "local label" weights). base_score is pinned to 0.5 (margin 0) so every
  converter agrees on the intercept.
- "pairwise": rank:pairwise within groups (one group per request).
- "regression": reg:squarederror, for distilling the full ranker's score.
Rows must be NaN-free: served features never are, and hummingbird ignores the learned
missing-value directions, so missing values are imputed before training.

Early stopping (`early_stopping_rounds` > 0 with a validation set): boosting stops once the
validation metric has not improved for that many rounds, and the booster is cut back to its
best round, so `n_estimators` is an upper bound. The metric is the objective's own loss on the
validation rows: logloss (binary), ndcg@k (pairwise), rmse (regression).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from walkrank.errors import ConfigError, DataError

OBJECTIVES = {
    "binary": "binary:logistic",
    "pairwise": "rank:pairwise",
    "regression": "reg:squarederror",
}
# Low-complexity GBDT, as the article's lightweight stage; 100 x depth 6 is what the serving
# benchmark sizes.
DEFAULT_PARAMS: dict[str, Any] = {
    "n_estimators": 100,
    "max_depth": 6,
    "learning_rate": 0.1,
    "min_child_weight": 1.0,
    "subsample": 1.0,
    "colsample_bytree": 1.0,
    "reg_lambda": 1.0,
    "reg_alpha": 0.0,
    "gamma": 0.0,
    "max_bin": 256,
    "nthread": 1,
    "ndcg_at": 10,
    "early_stopping_rounds": 0,
}
# Ours, not xgboost's: how training runs rather than what a tree is.
_RUN_PARAMS = ("n_estimators", "ndcg_at", "early_stopping_rounds")
_ALIASES = {
    "trees": "n_estimators",
    "eta": "learning_rate",
    "lambda": "reg_lambda",
    "alpha": "reg_alpha",
}
_XGBOOST_NAMES = {"learning_rate": "eta", "reg_lambda": "lambda", "reg_alpha": "alpha"}


@dataclass(frozen=True)
class TrainedModel:
    booster: Any  # xgboost.Booster
    metrics: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)


def resolve_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with the caller's params; unknown names raise ConfigError."""
    resolved = dict(DEFAULT_PARAMS)
    for key, value in (params or {}).items():
        name = _ALIASES.get(key, key)
        if name not in DEFAULT_PARAMS:
            known = sorted(DEFAULT_PARAMS) + sorted(_ALIASES)
            raise ConfigError(f"unknown training param {key!r}; known: {known}")
        resolved[name] = value
    for name in (
        "n_estimators",
        "max_depth",
        "max_bin",
        "nthread",
        "ndcg_at",
        "early_stopping_rounds",
    ):
        value = resolved[name]
        low = 0 if name == "early_stopping_rounds" else 1
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            kind = "an integer >= 0" if low == 0 else "a positive integer"
            raise ConfigError(f"training param {name!r} must be {kind}, got {value!r}")
    for name in ("learning_rate", "subsample", "colsample_bytree"):
        value = resolved[name]
        if not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
            raise ConfigError(f"training param {name!r} must be in (0, 1], got {value!r}")
    for name in ("min_child_weight", "reg_lambda", "reg_alpha", "gamma"):
        value = resolved[name]
        if not isinstance(value, int | float) or float(value) < 0.0:
            raise ConfigError(f"training param {name!r} must be >= 0, got {value!r}")
    return resolved


@dataclass(frozen=True)
class _Split:
    rows: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None
    group_sizes: np.ndarray | None
    group_weights: np.ndarray | None


def _prepare(
    name: str, objective: str, X: Any, y: Any, weights: Any, groups: Any, n_features: int | None
) -> _Split:
    rows = np.asarray(X)
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise DataError(f"{name} X has shape {rows.shape}; expected (rows, features), non-empty")
    if n_features is not None and rows.shape[1] != n_features:
        raise DataError(f"{name} X has {rows.shape[1]} features; training X has {n_features}")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    bad = ~np.isfinite(rows)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(
            f"{name} X has {rows[r, c]} at row {r}, column {c}; impute missing values before "
            "training (served features are never NaN)"
        )
    labels = _vector(f"{name} y", y, rows.shape[0])
    if objective == "binary" and ((labels < 0) | (labels > 1)).any():
        r = int(np.argmax((labels < 0) | (labels > 1)))
        raise DataError(f"{name} y[{r}] = {labels[r]}; binary labels must lie in [0, 1]")
    if objective == "pairwise" and (labels < 0).any():
        r = int(np.argmax(labels < 0))
        raise DataError(f"{name} y[{r}] = {labels[r]}; pairwise relevance labels must be >= 0")
    w = None if weights is None else _vector(f"{name} weights", weights, rows.shape[0])
    if w is not None and (w < 0).any():
        r = int(np.argmax(w < 0))
        raise DataError(f"{name} weights[{r}] = {w[r]}; weights must be >= 0")

    if objective != "pairwise":
        if groups is not None:
            raise DataError(f"{name} groups are only used by the pairwise objective")
        return _Split(rows, labels, w, None, None)
    if groups is None:
        raise DataError(f"{name} groups are required for the pairwise objective")
    group_ids = np.asarray(groups)
    if group_ids.shape != (rows.shape[0],):
        raise DataError(
            f"{name} groups has shape {group_ids.shape}; expected one id per row ({rows.shape[0]},)"
        )
    # xgboost needs each group's rows contiguous; a stable sort keeps in-group order.
    order = np.argsort(group_ids, kind="stable")
    sorted_ids = group_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    sizes = np.diff(np.r_[starts, sorted_ids.size])
    group_weights = None
    if w is not None:
        # xgboost weighs whole groups in ranking; per-row importance belongs in graded labels.
        w_sorted = w[order]
        group_weights = w_sorted[starts]
        varies = np.repeat(group_weights, sizes) != w_sorted
        if varies.any():
            r = int(order[np.argmax(varies)])
            raise DataError(
                f"{name} weights vary within group {group_ids[r]!r} (row {r}); pairwise "
                "weights apply per group, so encode per-row importance in graded labels"
            )
    return _Split(rows[order], labels[order], None, sizes, group_weights)


def _vector(name: str, values: Any, n: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.shape != (n,):
        raise DataError(f"{name} has shape {array.shape}; expected ({n},)")
    bad = ~np.isfinite(array)
    if bad.any():
        r = int(np.argmax(bad))
        raise DataError(f"{name}[{r}] is {array[r]}; values must be finite")
    return array


def _dmatrix(split: _Split, nthread: int) -> Any:
    import xgboost

    matrix = xgboost.DMatrix(split.rows, label=split.labels, weight=split.weights, nthread=nthread)
    if split.group_sizes is not None:
        matrix.set_group(split.group_sizes)
        if split.group_weights is not None:
            matrix.set_weight(split.group_weights)
    return matrix


def xgboost_params(
    resolved: dict[str, Any], objective: str, seed: int, labels: np.ndarray | None = None
) -> dict[str, Any]:
    """The xgboost parameter dict for resolved params (shared with the Dask path). The last
    eval metric is the one early stopping watches. `labels` (pairwise) decide the NDCG gain."""
    params: dict[str, Any] = {
        "objective": OBJECTIVES[objective],
        "tree_method": "hist",
        "seed": seed,
        **{_XGBOOST_NAMES.get(k, k): v for k, v in resolved.items() if k not in _RUN_PARAMS},
    }
    if objective == "binary":
        params["base_score"] = 0.5
        params["eval_metric"] = ["auc", "logloss"]
    elif objective == "pairwise":
        params["eval_metric"] = [f"ndcg@{resolved['ndcg_at']}"]
        # Exponential gain (2^label - 1) needs small integer grades; graded weights do not.
        if labels is None or (labels != np.round(labels)).any() or labels.max() > 31:
            params["ndcg_exp_gain"] = False
    else:
        params["eval_metric"] = ["rmse"]
    return params


def train_model(
    X: np.ndarray,
    y: np.ndarray,
    *,
    objective: str = "binary",
    weights: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    params: dict[str, Any] | None = None,
    valid: tuple[Any, Any, Any, Any] | None = None,
    seed: int = 0,
) -> TrainedModel:
    """Trains one booster; deterministic for a seed. Metrics are named `<split>_<metric>`:
    binary logloss and auc, pairwise ndcg@k, regression rmse, on "train" and "valid", at the
    kept round; `rounds` is how many rounds the booster keeps (fewer than `n_estimators`
    when early stopping cut it)."""
    import xgboost

    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    resolved = resolve_params(params)
    train = _prepare("training", objective, X, y, weights, groups, None)
    evals = [(_dmatrix(train, resolved["nthread"]), "train")]
    if valid is not None:
        if len(valid) != 4:
            raise DataError("valid must be a (X, y, weights, groups) tuple")
        vx, vy, vw, vg = valid
        split = _prepare("validation", objective, vx, vy, vw, vg, train.rows.shape[1])
        evals.append((_dmatrix(split, resolved["nthread"]), "valid"))
    stop_after = resolved["early_stopping_rounds"] if valid is not None else 0

    history: dict[str, dict[str, list[float]]] = {}
    try:
        booster = xgboost.train(
            xgboost_params(resolved, objective, seed, train.labels),
            evals[0][0],
            num_boost_round=resolved["n_estimators"],
            evals=evals,
            evals_result=history,
            verbose_eval=False,
            early_stopping_rounds=stop_after or None,
        )
    except xgboost.core.XGBoostError as exc:
        raise DataError(f"xgboost refused the training data: {exc}") from exc
    rounds = booster.num_boosted_rounds()
    if stop_after:
        # Keep the best round only: the exported model must be the one that was validated.
        rounds = booster.best_iteration + 1
        booster = booster[:rounds]
    metrics: dict[str, float] = {
        f"{split}_{name}": float(values[rounds - 1])
        for split, by_metric in history.items()
        for name, values in by_metric.items()
    }
    metrics["rounds"] = float(rounds)
    metrics["n_train_rows"] = float(train.rows.shape[0])
    if valid is not None:
        metrics["n_valid_rows"] = float(evals[1][0].num_row())
    return TrainedModel(
        booster=booster,
        metrics=metrics,
        params={"objective": objective, "seed": seed, **resolved},
    )
