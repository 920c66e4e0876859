"""Validation gate: a converted model serves only if onnxruntime reproduces xgboost's own scores.

Converters have shipped silent errors here before (ignored base_score, wrong NaN directions,
1-row batch failures), so the gate compares on the caller's sample, on rows placed exactly at
the model's split thresholds, and on single-row batches. Tolerance is absolute up to scores of
magnitude 1 and relative above (float32 sums of many trees round at about 1e-7 relative).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from walkrank.errors import DataError, ModelError
from walkrank.ranking.scorer import (
    FEATURES_INPUT,
    SCORE_OUTPUT,
    check_rows,
    onnx_session,
    probe_matrix,
)

_WORST_SHOWN = 5
_SINGLE_ROW_CHECKS = 8


@dataclass(frozen=True)
class RowDifference:
    row: int
    xgboost: float
    onnx: float
    abs_diff: float


@dataclass(frozen=True)
class GateReport:
    """What the gate checked; stored with the model version in the registry."""

    n_rows: int
    single_row_batches: int
    tolerance: float
    max_abs_diff: float
    worst: tuple[RowDifference, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_scores(
    reference: np.ndarray, candidate: np.ndarray, tolerance: float
) -> tuple[bool, float, tuple[RowDifference, ...]]:
    """(within tolerance?, largest absolute difference, the worst rows by scaled difference)."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    got = np.asarray(candidate, dtype=np.float64).ravel()
    if ref.shape != got.shape:
        raise ModelError(f"model returned {got.size} scores for {ref.size} rows")
    diff = np.abs(ref - got)
    diff[np.isnan(ref) != np.isnan(got)] = np.inf
    diff[np.isnan(ref) & np.isnan(got)] = 0.0
    scaled = diff / np.maximum(1.0, np.abs(np.nan_to_num(ref)))
    order = np.argsort(-scaled, kind="stable")[:_WORST_SHOWN]
    worst = tuple(
        RowDifference(int(r), float(ref[r]), float(got[r]), float(diff[r])) for r in order
    )
    max_diff = float(diff.max()) if diff.size else 0.0
    return bool(scaled.size == 0 or scaled.max() <= tolerance), max_diff, worst


def describe(worst: tuple[RowDifference, ...], reference: str, candidate: str) -> str:
    return "; ".join(
        f"row {d.row}: {reference} {d.xgboost:.9g}, {candidate} {d.onnx:.9g} "
        f"(diff {d.abs_diff:.3g})"
        for d in worst
    )


def validate(
    booster: Any, onnx_bytes: bytes, sample: np.ndarray, tolerance: float = 1e-5
) -> GateReport:
    """Checks onnxruntime's scores against xgboost's predictions (probability for binary,
    raw for rankers and regressors) on `sample` and on single-row batches.

    Raises ModelError listing the largest differences (row, xgboost value, onnx value).
    """
    n_features = booster.num_features()
    rows = check_rows(sample, n_features, "gate sample")
    if rows.shape[0] == 0:
        raise DataError("gate sample has no rows")
    if np.isnan(rows).any():
        r, c = np.argwhere(np.isnan(rows))[0]
        raise DataError(
            f"gate sample has NaN at row {r}, column {c}; served features are never NaN"
        )
    session = onnx_session(onnx_bytes)
    expected = booster.inplace_predict(rows)
    try:
        got = session.run([SCORE_OUTPUT], {FEATURES_INPUT: rows})[0]
    except Exception as exc:  # onnxruntime's own error types
        raise ModelError(f"onnxruntime failed on the gate sample: {exc}") from exc
    ok, max_diff, worst = compare_scores(expected, got, tolerance)
    if not ok:
        raise ModelError(
            f"converted model differs from xgboost by more than {tolerance:g} on "
            f"{rows.shape[0]} rows: {describe(worst, 'xgboost', 'onnx')}"
        )
    # Batches of one take other code paths in some converters (hummingbird GEMM).
    single = sorted({0, rows.shape[0] - 1, *(d.row for d in worst)})[:_SINGLE_ROW_CHECKS]
    for r in single:
        try:
            one = session.run([SCORE_OUTPUT], {FEATURES_INPUT: rows[r : r + 1]})[0]
        except Exception as exc:
            raise ModelError(f"onnxruntime failed on a 1-row batch (row {r}): {exc}") from exc
        ok_one, diff_one, worst_one = compare_scores(expected[r : r + 1], one, tolerance)
        if not ok_one or one.shape != (1,):
            raise ModelError(
                f"converted model fails on a 1-row batch (row {r}, output shape {one.shape}): "
                f"xgboost {expected[r]:.9g}, onnx {np.ravel(one)[0]:.9g}"
            )
        max_diff = max(max_diff, diff_one)
    return GateReport(
        n_rows=int(rows.shape[0]),
        single_row_batches=len(single),
        tolerance=tolerance,
        max_abs_diff=max_diff,
        worst=worst,
    )


def booster_splits(booster: Any) -> list[np.ndarray]:
    """Distinct float32 split thresholds of each feature, read from the booster's own JSON."""
    model = json.loads(booster.save_raw("json"))
    trees = model["learner"]["gradient_booster"]["model"]["trees"]
    by_feature: list[list[np.ndarray]] = [[] for _ in range(booster.num_features())]
    for tree in trees:
        internal = np.asarray(tree["left_children"]) != -1
        features = np.asarray(tree["split_indices"])[internal]
        thresholds = np.asarray(tree["split_conditions"], dtype=np.float32)[internal]
        for j in np.unique(features):
            by_feature[j].append(thresholds[features == j])
    return [
        np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.float32)
        for parts in by_feature
    ]


def probe_rows(booster: Any, n_features: int, n_rows: int, seed: int) -> np.ndarray:
    """Rows on, just below and between the booster's split thresholds, so a publish without
    data still takes both sides of every split (see scorer.probe_matrix)."""
    if booster.num_features() != n_features:
        raise ModelError(
            f"booster was trained on {booster.num_features()} features, not {n_features}"
        )
    return probe_matrix(booster_splits(booster), n_rows, seed)
