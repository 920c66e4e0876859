"""XGBoost -> ONNX for both converters, the validation gate, probe rows and export_model."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

from walkrank.errors import DataError, ModelError
from walkrank.ranking.convert import to_onnx
from walkrank.ranking.export import export_model
from walkrank.ranking.fit import OBJECTIVES, train_model
from walkrank.ranking.gate import booster_splits, probe_rows, validate
from walkrank.ranking.scorer import onnx_session

N_FEATURES = 10
CONVERTERS = ("onnxmltools", "hummingbird")


def _imputed_rows(n: int, seed: int) -> np.ndarray:
    """Rows with ~15% missing values replaced by per-feature defaults, as the feature layer
    does before anything reaches a model."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    rows[rng.random(rows.shape) < 0.15] = np.nan
    defaults = np.linspace(-1.0, 1.0, N_FEATURES, dtype=np.float32)
    return np.where(np.isnan(rows), defaults, rows).astype(np.float32)


@pytest.fixture(scope="module")
def models():
    rows = _imputed_rows(2000, seed=0)
    signal = rows[:, 0] + rows[:, 1] * rows[:, 2] - 0.5 * rows[:, 3]
    groups = np.arange(2000) // 20
    labels = {
        "binary": (signal > 0).astype(np.float32),
        "pairwise": np.clip(np.round(signal + 1), 0, 3).astype(np.float32),
        "regression": (3.0 * signal + 10.0).astype(np.float32),  # scores far from 0..1
    }
    params = {"n_estimators": 40, "max_depth": 5}
    return {
        objective: train_model(
            rows,
            labels[objective],
            objective=objective,
            params=params,
            groups=groups if objective == "pairwise" else None,
        ).booster
        for objective in OBJECTIVES
    }


@pytest.fixture(scope="module")
def converted(models):
    return {
        (objective, converter): to_onnx(models[objective], N_FEATURES, converter)
        for objective in OBJECTIVES
        for converter in CONVERTERS
    }


@pytest.mark.parametrize("converter", CONVERTERS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_converted_scores_equal_xgboost(models, converted, objective, converter):
    booster = models[objective]
    session = onnx_session(converted[(objective, converter)])
    rows = np.vstack([_imputed_rows(500, seed=1), probe_rows(booster, N_FEATURES, 512, seed=1)])
    expected = booster.inplace_predict(rows)
    got = session.run(["score"], {"features": rows})[0]
    assert got.dtype == np.float32 and got.shape == (rows.shape[0],)
    scale = np.maximum(1.0, np.abs(expected))
    assert np.max(np.abs(got - expected) / scale) <= 1e-5
    if objective == "binary":
        assert got.min() >= 0.0 and got.max() <= 1.0
    for r in (0, 7, rows.shape[0] - 1):  # batches of one
        one = session.run(["score"], {"features": rows[r : r + 1]})[0]
        assert one.shape == (1,)
        assert abs(float(one[0]) - float(expected[r])) <= 1e-5 * scale[r]


def test_graph_contract_is_the_same_for_both_converters(converted):
    for model_bytes in converted.values():
        model = onnx.load_from_string(model_bytes)
        assert [i.name for i in model.graph.input] == ["features"]
        assert [o.name for o in model.graph.output] == ["score"]
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert not dims[0].HasField("dim_value")  # dynamic batch
        assert dims[1].dim_value == N_FEATURES


def test_convert_refuses_wrong_feature_count_and_unknown_converter(models):
    with pytest.raises(ModelError, match="trained on 10 features, not 11"):
        to_onnx(models["binary"], 11)
    with pytest.raises(ModelError, match="unknown converter 'tvm'"):
        to_onnx(models["binary"], N_FEATURES, converter="tvm")


def test_probe_rows_take_both_sides_of_every_split(models):
    booster = models["binary"]
    probe = probe_rows(booster, N_FEATURES, 1024, seed=3)
    assert probe.shape == (1024, N_FEATURES) and probe.dtype == np.float32
    splits = booster_splits(booster)
    assert sum(s.size for s in splits) > 50
    for j, thresholds in enumerate(splits):
        column = probe[:, j]
        for t in thresholds:
            assert (column < t).any() and (column >= t).any() and (column == t).any()


def test_gate_passes_and_reports(models, converted):
    booster = models["regression"]
    sample = _imputed_rows(300, seed=4)
    report = validate(booster, converted[("regression", "onnxmltools")], sample)
    assert report.n_rows == 300 and report.single_row_batches >= 2
    assert report.max_abs_diff < 1e-4 and len(report.worst) == 5
    json.dumps(report.as_dict())  # stored with the model version


def _tree0_leaves(booster, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(leaf id of tree 0 per row, leaf values of tree 0 by id)."""
    import xgboost

    leaves = booster.predict(xgboost.DMatrix(rows), pred_leaf=True)[:, 0].astype(int)
    tree = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"][0]
    return leaves, np.asarray(tree["split_conditions"], dtype=np.float32)


def test_gate_refuses_a_tampered_leaf_and_names_the_rows(models, converted):
    booster = models["binary"]
    sample = _imputed_rows(200, seed=5)
    leaves, values = _tree0_leaves(booster, sample)
    leaf_value = values[leaves[0]]
    model = onnx.load_from_string(converted[("binary", "onnxmltools")])
    attrs = {a.name: a for a in model.graph.node[0].attribute}
    tampered = [
        k
        for k, (t, w) in enumerate(
            zip(attrs["class_treeids"].ints, attrs["class_weights"].floats, strict=True)
        )
        if t == 0 and np.float32(w) == leaf_value
    ]
    assert len(tampered) == 1
    attrs["class_weights"].floats[tampered[0]] += 0.25
    with pytest.raises(ModelError) as refused:
        validate(booster, model.SerializeToString(), sample)
    message = str(refused.value)
    assert "differs from xgboost by more than 1e-05" in message
    named = [int(r) for r in re.findall(r"row (\d+): xgboost [-0-9.e]+, onnx [-0-9.e]+", message)]
    assert len(named) == 5
    # Every row the report names went through the tampered leaf (converters renumber nodes,
    # so the leaf is found by its value; values of one tree's leaves are distinct here).
    assert all(values[leaves[r]] == leaf_value for r in named)


def test_gate_refuses_bad_samples(models, converted):
    booster = models["binary"]
    model_bytes = converted[("binary", "onnxmltools")]
    with pytest.raises(DataError, match=r"shape \(5, 9\)"):
        validate(booster, model_bytes, np.zeros((5, 9), dtype=np.float32))
    rows = _imputed_rows(5, seed=6)
    rows[2, 4] = np.nan
    with pytest.raises(DataError, match="NaN at row 2, column 4"):
        validate(booster, model_bytes, rows)
    with pytest.raises(ModelError, match="not a readable ONNX file|cannot load"):
        validate(booster, b"not a model", _imputed_rows(5, seed=6))


def test_export_model_gates_and_describes_the_model(models):
    names = [f"feature_{j}" for j in range(N_FEATURES)]
    sample = _imputed_rows(200, seed=7)
    exported = export_model(
        models["pairwise"],
        names,
        converter="onnxmltools",
        objective="pairwise",
        sample=sample,
        extra_metadata={"tenant": "home_feed"},
    )
    meta = exported.metadata
    assert meta["feature_names"] == names and meta["n_features"] == N_FEATURES
    assert meta["converter"] == "onnxmltools" and meta["objective"] == "pairwise"
    assert meta["xgboost_objective"] == "rank:pairwise"
    assert meta["n_trees"] == 40 and 1 <= meta["max_depth"] <= 5
    assert meta["gate"]["n_rows"] == 200 + 1024 and meta["gate"]["max_abs_diff"] < 1e-5
    assert meta["served_engine"] == "kernel" and meta["tenant"] == "home_feed"
    assert meta["xgboost_params"]["max_depth"] == "5"
    json.dumps(meta)
    session = onnx_session(exported.onnx_bytes)
    got = session.run(["score"], {"features": sample})[0]
    assert np.allclose(got, models["pairwise"].inplace_predict(sample), atol=1e-5)


def test_export_with_hummingbird_serves_through_onnxruntime(models):
    names = [f"feature_{j}" for j in range(N_FEATURES)]
    exported = export_model(models["binary"], names, converter="hummingbird", objective="binary")
    assert exported.metadata["served_engine"] == "onnxruntime"
    assert "TreeEnsemble" in exported.metadata["served_engine_reason"]
    assert exported.metadata["gate"]["n_rows"] == 1024  # probe rows only, no data given


def test_export_refuses_mismatches(models):
    names = [f"feature_{j}" for j in range(N_FEATURES)]
    with pytest.raises(ModelError, match="9 feature names for a booster with 10 features"):
        export_model(models["binary"], names[:9], converter="onnxmltools", objective="binary")
    with pytest.raises(ModelError, match="trained with rank:pairwise"):
        export_model(models["pairwise"], names, converter="onnxmltools", objective="binary")
    with pytest.raises(ModelError, match="duplicate feature names"):
        export_model(
            models["binary"], names[:-1] + names[:1], converter="onnxmltools", objective="binary"
        )
    with pytest.raises(ModelError, match="would overwrite"):
        export_model(
            models["binary"],
            names,
            converter="onnxmltools",
            objective="binary",
            extra_metadata={"n_trees": 1},
        )
