"""Booster -> gated ONNX bytes + the metadata the model registry stores with the version."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata as package_metadata
from typing import Any

import numpy as np

from walkrank.errors import ModelError
from walkrank.ranking.convert import CONVERTERS, base_score, booster_objective, to_onnx
from walkrank.ranking.fit import OBJECTIVES
from walkrank.ranking.gate import compare_scores, describe, probe_rows, validate
from walkrank.ranking.scorer import Scorer, check_rows

METADATA_FORMAT = "walkrank.ranking.model/1"
# Threshold probe rows always join the caller's sample: data alone rarely sits on a split.
PROBE_ROWS = 1024
_TREE_PARAMS = (
    "eta",
    "max_depth",
    "min_child_weight",
    "subsample",
    "colsample_bytree",
    "lambda",
    "alpha",
    "gamma",
    "max_bin",
    "tree_method",
)


@dataclass(frozen=True)
class ExportedModel:
    onnx_bytes: bytes
    metadata: dict[str, Any]


def export_model(
    booster: Any,
    feature_names: list[str],
    *,
    converter: str,
    objective: str,
    sample: np.ndarray | None = None,
    extra_metadata: dict[str, Any] | None = None,
    tolerance: float = 1e-5,
) -> ExportedModel:
    """Converts, gates (onnxruntime vs xgboost) and checks the served scorer the same way.

    Raises ModelError when any check fails, so nothing unverified reaches the registry.
    """
    names = list(feature_names)
    n_features = booster.num_features()
    if len(names) != n_features:
        raise ModelError(f"{len(names)} feature names for a booster with {n_features} features")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelError(f"duplicate feature names: {duplicates}")
    if converter not in CONVERTERS:
        raise ModelError(f"unknown converter {converter!r}; choose one of {list(CONVERTERS)}")
    if objective not in OBJECTIVES:
        raise ModelError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    trained_objective = booster_objective(booster)
    if trained_objective != OBJECTIVES[objective]:
        raise ModelError(
            f"objective {objective!r} means {OBJECTIVES[objective]}, "
            f"but the booster was trained with {trained_objective}"
        )

    probe = probe_rows(booster, n_features, PROBE_ROWS, seed=0)
    rows = probe if sample is None else np.vstack([check_rows(sample, n_features, "sample"), probe])
    onnx_bytes = to_onnx(booster, n_features, converter)
    report = validate(booster, onnx_bytes, rows, tolerance)

    scorer = Scorer.from_onnx(onnx_bytes, n_features)
    ok, max_diff, worst = compare_scores(
        booster.inplace_predict(rows), scorer.score(rows), tolerance
    )
    if not ok:
        raise ModelError(
            f"served {scorer.engine} scores differ from xgboost by more than {tolerance:g}: "
            f"{describe(worst, 'xgboost', scorer.engine)}"
        )

    trees = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    config = json.loads(booster.save_config())["learner"]
    tree_params = config["gradient_booster"]["tree_train_param"]
    metadata: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "feature_names": names,
        "n_features": n_features,
        "converter": converter,
        "objective": objective,
        "xgboost_objective": trained_objective,
        "xgboost_params": {
            "base_score": base_score(booster),
            **{k: tree_params[k] for k in _TREE_PARAMS if k in tree_params},
        },
        "n_trees": len(trees),
        "max_depth": max(_depth(tree) for tree in trees),
        "gate": {"passed": True, **report.as_dict()},
        "served_engine": scorer.engine,
        "served_engine_reason": scorer.reason,
        "served_max_abs_diff": max_diff,
        "versions": _versions(converter),
    }
    for key, value in (extra_metadata or {}).items():
        if key in metadata:
            raise ModelError(f"extra metadata key {key!r} would overwrite the exporter's own")
        metadata[key] = value
    return ExportedModel(onnx_bytes=onnx_bytes, metadata=metadata)


def _depth(tree: dict[str, Any]) -> int:
    left, right = tree["left_children"], tree["right_children"]
    deepest, stack = 0, [(0, 0)]
    while stack:
        node, level = stack.pop()
        if left[node] == -1:
            deepest = max(deepest, level)
        else:
            stack += [(left[node], level + 1), (right[node], level + 1)]
    return deepest


def _versions(converter: str) -> dict[str, str]:
    packages = ["xgboost", "xgboost-cpu", "onnx", "onnxruntime", "numba"]
    packages.append("onnxmltools" if converter == "onnxmltools" else "hummingbird-ml")
    found = {}
    for name in packages:
        try:
            found[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            continue
    return found
