"""XGBoost booster -> ONNX bytes with one contract: input "features" float32 (N, n_features),
output "score" float32 (N,) (a probability for binary models, the raw score otherwise).

Two converters, each wrapped around its known defects (checked in tests/test_ranking_convert.py):
- onnxmltools (the default): one ONNX-ML TreeEnsemble node, exact on NaN and base_score, the
  shape the tree kernel serves. It has no ranker converter, so rankers and regressors go in as
  an XGBRegressor wrapping the same trees (both predict base + sum of leaves).
- hummingbird-ml: tensor ops traced through torch. Every model goes in as a regressor whose
  base_score is rewritten as the plain margin (hummingbird ignores a classifier's base_score
  and cannot parse xgboost 3's '[5E-1]'); binary models then get a Sigmoid. The perf_tree_trav
  strategy is used because GEMM fails on 1-row batches. It ignores missing-value directions,
  so it is only right on NaN-free rows, which is all WalkRank serves.
Either way the validation gate (gate.py) must pass before a model is published.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from walkrank.errors import ModelError
from walkrank.ranking.scorer import FEATURES_INPUT, SCORE_OUTPUT

CONVERTERS = ("onnxmltools", "hummingbird")
# xgboost objective -> link from margin to prediction.
_LINKS = {
    "binary:logistic": "logistic",
    "rank:pairwise": "identity",
    "rank:ndcg": "identity",
    "rank:map": "identity",
    "reg:squarederror": "identity",
}
_OPSET = 13
_torch_export_lock = threading.Lock()


def to_onnx(booster: Any, n_features: int, converter: str = "onnxmltools") -> bytes:
    """Converts a trained booster; the result still has to pass gate.validate before serving."""
    if converter not in CONVERTERS:
        raise ModelError(f"unknown converter {converter!r}; choose one of {list(CONVERTERS)}")
    if booster.num_features() != n_features:
        raise ModelError(
            f"booster was trained on {booster.num_features()} features, not {n_features}"
        )
    objective = booster_objective(booster)
    link = _LINKS.get(objective)
    if link is None:
        raise ModelError(
            f"xgboost objective {objective!r} is not servable; use one of {sorted(_LINKS)}"
        )
    if converter == "onnxmltools":
        model = _convert_onnxmltools(booster, n_features, link)
    else:
        model = _convert_hummingbird(booster, n_features, link)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{converter} produced an invalid ONNX graph: {exc}") from exc
    return model.SerializeToString()


def booster_objective(booster: Any) -> str:
    return json.loads(booster.save_config())["learner"]["objective"]["name"]


def base_score(booster: Any) -> float:
    """xgboost 3 stores the intercept as a vector string such as '[5E-1]'."""
    raw = json.loads(booster.save_config())["learner"]["learner_model_param"]["base_score"]
    values = json.loads(raw) if raw.startswith("[") else [float(raw)]
    if len(values) != 1:
        raise ModelError(f"booster has {len(values)} targets; WalkRank serves one score")
    return float(values[0])


def _base_margin(booster: Any, link: str) -> float:
    score = base_score(booster)
    if link == "logistic":
        return math.log(score / (1.0 - score))
    return score


def _convert_onnxmltools(booster: Any, n_features: int, link: str) -> onnx.ModelProto:
    import onnxmltools
    import xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    if link == "logistic":
        source = booster  # onnxmltools reads a bare binary booster as XGBClassifier
    else:
        source = xgboost.XGBRegressor()
        source._Booster = booster
    try:
        model = onnxmltools.convert_xgboost(
            source, initial_types=[(FEATURES_INPUT, FloatTensorType([None, n_features]))]
        )
    except Exception as exc:  # onnxmltools raises RuntimeError/ValueError/KeyError alike
        raise ModelError(f"onnxmltools could not convert the booster: {exc}") from exc
    if link == "logistic":
        # TreeEnsembleClassifier outputs (label, probabilities (N, 2)); serve P(class 1).
        probabilities = model.graph.node[0].output[1]
        index = numpy_helper.from_array(np.array(1, dtype=np.int64), "score_class_index")
        model.graph.initializer.append(index)
        head = helper.make_node(
            "Gather", [probabilities, index.name], [SCORE_OUTPUT], axis=1, name="score_head"
        )
    else:
        head = _flatten_node(model, model.graph.node[0].output[0])
    # onnxmltools names the graph with a random uuid; a fixed name makes the same booster
    # convert to the same bytes (and the same registry checksum).
    model.graph.name = "walkrank_onnxmltools"
    return _finish(model, [head])


def _flatten_node(model: onnx.ModelProto, source: str) -> onnx.NodeProto:
    shape = numpy_helper.from_array(np.array([-1], dtype=np.int64), "score_shape")
    model.graph.initializer.append(shape)
    return helper.make_node("Reshape", [source, shape.name], [SCORE_OUTPUT], name="score_head")


def _finish(model: onnx.ModelProto, head: list[onnx.NodeProto]) -> onnx.ModelProto:
    """Appends the score head, makes "score" the only output, declares the default opset."""
    model.graph.node.extend(head)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["N"]))
    if not any(op.domain in ("", "ai.onnx") for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", _OPSET))
    model.producer_name = "walkrank"
    return model


class _HummingbirdBoosterView:
    """What hummingbird reads from a booster, with base_score as a plain float (the margin)."""

    feature_names = None  # hummingbird substitutes names textually; numeric ids are safe

    def __init__(self, booster: Any, margin: float) -> None:
        self._booster = booster
        self._margin = margin

    def get_dump(self) -> list[str]:
        return self._booster.get_dump()

    def save_config(self) -> str:
        config = json.loads(self._booster.save_config())
        config["learner"]["learner_model_param"]["base_score"] = repr(self._margin)
        return json.dumps(config)


@contextlib.contextmanager
def _legacy_torch_export() -> Iterator[None]:
    """hummingbird calls torch.onnx.export without `dynamo`; torch 2.13 defaults to dynamo,
    which cannot trace hummingbird's graphs. Scoped to the conversion, one at a time."""
    import torch

    with _torch_export_lock:
        original = torch.onnx.export
        torch.onnx.export = functools.partial(original, dynamo=False)
        try:
            yield
        finally:
            torch.onnx.export = original


def _convert_hummingbird(booster: Any, n_features: int, link: str) -> onnx.ModelProto:
    import hummingbird.ml
    import xgboost

    wrapper = xgboost.XGBRegressor()
    # A duck-typed Booster: hummingbird reads only what the view provides.
    wrapper._Booster = _HummingbirdBoosterView(booster, _base_margin(booster, link))  # type: ignore[assignment]
    trace_rows = np.zeros((2, n_features), dtype=np.float32)
    with tempfile.TemporaryDirectory() as workdir, _legacy_torch_export():
        try:
            container = hummingbird.ml.convert(
                wrapper,
                "onnx",
                trace_rows,
                extra_config={
                    "n_features": n_features,
                    "tree_implementation": "perf_tree_trav",
                    # hummingbird writes the model file to the working directory otherwise
                    "onnx_output_model_name": os.path.join(workdir, "model"),
                    "n_threads": 1,
                },
            )
        except Exception as exc:  # hummingbird/torch raise many exception types
            raise ModelError(f"hummingbird could not convert the booster: {exc}") from exc
    model = container.model
    model.graph.name = "walkrank_hummingbird"
    _rename_input(model, model.graph.input[0].name, FEATURES_INPUT)
    margin = model.graph.output[0].name
    head = []
    if link == "logistic":
        head.append(helper.make_node("Sigmoid", [margin], ["probability"], name="score_link"))
        margin = "probability"
    head.append(_flatten_node(model, margin))
    return _finish(model, head)


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    model.graph.input[0].name = new
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
