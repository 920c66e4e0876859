"""Scorer: the padded-tree kernel against onnxruntime, engine choice, fallbacks, threads."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import xgboost

from walkrank.errors import DataError, ModelError
from walkrank.ranking.convert import to_onnx
from walkrank.ranking.fit import train_model
from walkrank.ranking.scorer import MAX_KERNEL_DEPTH, Scorer, onnx_session, parse_tree_ensemble

N_FEATURES = 12


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, N_FEATURES)).astype(np.float32)


def _ort_scores(model_bytes: bytes, rows: np.ndarray) -> np.ndarray:
    return onnx_session(model_bytes).run(["score"], {"features": rows})[0]


@pytest.fixture(scope="module")
def models():
    rows = _rows(3000, seed=0)
    signal = rows[:, 0] + rows[:, 1] * rows[:, 2] + np.sin(3 * rows[:, 3])
    groups = np.arange(3000) // 30
    labels = {
        "binary": (signal > 0).astype(np.float32),
        "pairwise": np.clip(np.round(signal + 1), 0, 4).astype(np.float32),
        "regression": (5.0 * signal).astype(np.float32),
    }
    out = {}
    for objective, y in labels.items():
        booster = train_model(
            rows,
            y,
            objective=objective,
            params={"n_estimators": 60, "max_depth": 6},
            groups=groups if objective == "pairwise" else None,
        ).booster
        out[objective] = (booster, to_onnx(booster, N_FEATURES))
    return out


@pytest.mark.parametrize("objective", ["binary", "pairwise", "regression"])
def test_kernel_equals_onnxruntime(models, objective):
    booster, model_bytes = models[objective]
    scorer = Scorer.from_onnx(model_bytes, N_FEATURES)
    assert scorer.engine == "kernel", scorer.reason
    assert "depth 6" in scorer.reason
    # 2,003 rows: the 8-row interleaved loop plus a 3-row tail.
    rows = np.vstack([_rows(2003, seed=1), 3 * _rows(64, seed=2)])
    got = scorer.score(rows)
    assert got.dtype == np.float32 and got.shape == (rows.shape[0],)
    assert np.max(np.abs(got - _ort_scores(model_bytes, rows))) <= 1e-5 * max(
        1.0, float(np.abs(got).max())
    )
    assert np.allclose(got, booster.inplace_predict(rows), rtol=1e-5, atol=1e-5)
    for r in (0, 5, 2002):
        assert scorer.score(rows[r : r + 1]) == pytest.approx(got[r : r + 1], abs=1e-6)
    assert scorer.score(np.empty((0, N_FEATURES), dtype=np.float32)).shape == (0,)


def test_kernel_follows_missing_value_directions_like_onnxruntime():
    """A model trained on data with NaN learns per-split directions; the kernel takes the
    same side as onnxruntime (served features are never NaN, but the file says where)."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(3000, N_FEATURES)).astype(np.float32)
    labels = (rows[:, 0] + rows[:, 1] > 0).astype(np.float32)
    rows[rng.random(rows.shape) < 0.2] = np.nan
    labels[np.isnan(rows[:, 0])] = 1.0  # missing feature 0 means positive: learned direction
    booster = xgboost.train(
        {"objective": "binary:logistic", "max_depth": 5, "nthread": 1, "base_score": 0.5},
        xgboost.DMatrix(rows, label=labels),
        num_boost_round=30,
    )
    model_bytes = to_onnx(booster, N_FEATURES)
    forest = parse_tree_ensemble(onnx.load_from_string(model_bytes), N_FEATURES)
    real = np.isfinite(forest.thresholds)
    assert set(np.unique(forest.nan_right[real])) == {0, 1}  # both directions occur
    scorer = Scorer.from_onnx(model_bytes, N_FEATURES)
    assert scorer.engine == "kernel"
    test_rows = rng.normal(size=(500, N_FEATURES)).astype(np.float32)
    test_rows[rng.random(test_rows.shape) < 0.3] = np.nan
    got = scorer.score(test_rows)
    assert np.max(np.abs(got - _ort_scores(model_bytes, test_rows))) <= 1e-5
    assert np.max(np.abs(got - booster.inplace_predict(test_rows))) <= 1e-5


def _rewrite_modes(model_bytes: bytes, mode: str) -> bytes:
    """Re-expresses every `x < t` split in another ONNX branch mode, keeping the function."""
    model = onnx.load_from_string(model_bytes)
    attrs = {a.name: a for a in model.graph.node[0].attribute}
    modes = attrs["nodes_modes"].strings
    values = attrs["nodes_values"].floats
    true_ids, false_ids = attrs["nodes_truenodeids"].ints, attrs["nodes_falsenodeids"].ints
    tracks = attrs["nodes_missing_value_tracks_true"].ints
    for k in range(len(modes)):
        if modes[k] != b"BRANCH_LT":
            continue
        modes[k] = mode.encode()
        if mode == "BRANCH_LEQ":  # x < t  <=>  x <= previous float32 of t
            values[k] = float(np.nextafter(np.float32(values[k]), np.float32(-np.inf)))
        elif mode == "BRANCH_GTE":  # x < t  <=>  not (x >= t): swap the branches
            true_ids[k], false_ids[k] = false_ids[k], true_ids[k]
            tracks[k] = 1 - tracks[k]
    return model.SerializeToString()


@pytest.mark.parametrize("mode", ["BRANCH_LEQ", "BRANCH_GTE"])
def test_kernel_normalizes_other_branch_modes(models, mode):
    booster, model_bytes = models["regression"]
    rewritten = _rewrite_modes(model_bytes, mode)
    scorer = Scorer.from_onnx(rewritten, N_FEATURES)
    assert scorer.engine == "kernel", scorer.reason
    rows = _rows(1000, seed=4)
    reference = _ort_scores(rewritten, rows)
    assert np.allclose(reference, booster.inplace_predict(rows), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(scorer.score(rows) - reference)) <= 1e-5 * float(np.abs(reference).max())


def test_unsupported_node_mode_falls_back_to_onnxruntime(models):
    _, model_bytes = models["binary"]
    model = onnx.load_from_string(model_bytes)
    modes = next(a for a in model.graph.node[0].attribute if a.name == "nodes_modes").strings
    first_branch = next(k for k, m in enumerate(modes) if m == b"BRANCH_LT")
    modes[first_branch] = b"BRANCH_EQ"
    changed = model.SerializeToString()
    scorer = Scorer.from_onnx(changed, N_FEATURES)
    assert scorer.engine == "onnxruntime"
    assert "BRANCH_EQ" in scorer.reason
    rows = _rows(300, seed=5)
    assert np.array_equal(scorer.score(rows), _ort_scores(changed, rows))


def test_too_deep_model_falls_back_and_says_why():
    rng = np.random.default_rng(6)
    rows = rng.normal(size=(4000, N_FEATURES)).astype(np.float32)
    noise = rng.normal(size=4000).astype(np.float32)
    booster = train_model(
        rows,
        noise,
        objective="regression",
        params={
            "n_estimators": 3,
            "max_depth": MAX_KERNEL_DEPTH + 3,
            "min_child_weight": 0.0,
            "reg_lambda": 0.0,
        },
    ).booster
    model_bytes = to_onnx(booster, N_FEATURES)
    scorer = Scorer.from_onnx(model_bytes, N_FEATURES)
    assert scorer.engine == "onnxruntime"
    assert f"deeper than the kernel limit of {MAX_KERNEL_DEPTH}" in scorer.reason
    test_rows = _rows(200, seed=7)
    assert np.allclose(scorer.score(test_rows), booster.inplace_predict(test_rows), atol=1e-5)


def test_hummingbird_model_is_served_by_onnxruntime(models):
    booster, _ = models["binary"]
    model_bytes = to_onnx(booster, N_FEATURES, converter="hummingbird")
    scorer = Scorer.from_onnx(model_bytes, N_FEATURES)
    assert scorer.engine == "onnxruntime"
    assert "0 ONNX-ML TreeEnsemble nodes" in scorer.reason
    rows = _rows(100, seed=8)
    assert np.allclose(scorer.score(rows), booster.inplace_predict(rows), atol=1e-5)
    assert scorer.score(rows[:1]).shape == (1,)


def test_scorer_refuses_bad_models_and_rows(models):
    _, model_bytes = models["binary"]
    with pytest.raises(ModelError, match=r"expected \[batch, 13\]"):
        Scorer.from_onnx(model_bytes, 13)
    with pytest.raises(ModelError, match="not a readable ONNX file"):
        Scorer.from_onnx(b"\x00garbage", N_FEATURES)
    scorer = Scorer.from_onnx(model_bytes, N_FEATURES)
    with pytest.raises(DataError, match=r"shape \(4, 11\); expected \(rows, 12\)"):
        scorer.score(np.zeros((4, 11), dtype=np.float32))
    with pytest.raises(DataError, match="dtype <U1"):
        scorer.score(np.full((2, N_FEATURES), "a"))
    # float64 and non-contiguous input is converted, not rejected
    wide = _rows(50, seed=9).astype(np.float64)
    assert np.allclose(scorer.score(wide[::2]), scorer.score(wide[::2].astype(np.float32)))


def test_scoring_from_many_threads_matches_serial(models):
    _, model_bytes = models["pairwise"]
    scorer = Scorer.from_onnx(model_bytes, N_FEATURES)
    batches = [_rows(500 + 37 * k, seed=10 + k) for k in range(8)]
    serial = [scorer.score(b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            parallel = list(pool.map(scorer.score, batches))
            assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_serving_import_pulls_in_neither_torch_nor_xgboost():
    code = (
        "import sys, walkrank.ranking.scorer\n"
        "heavy = [m for m in ('torch', 'xgboost', 'hummingbird', 'onnxmltools') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
