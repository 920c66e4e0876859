"""train_model: metrics, determinism, grouping and the errors callers see."""

from __future__ import annotations

import numpy as np
import pytest

from walkrank.errors import ConfigError, DataError
from walkrank.ranking.fit import train_model

SMALL = {"n_estimators": 30, "max_depth": 4}


def _signal(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A learnable binary signal: an interaction plus a linear term plus noise."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, 8)).astype(np.float32)
    logit = 1.5 * rows[:, 0] + rows[:, 1] * rows[:, 2] + 0.5 * rng.normal(size=n)
    return rows, (logit > 0).astype(np.float32)


def test_binary_learns_a_signal_with_sensible_metrics():
    rows, labels = _signal(3000, seed=1)
    valid_rows, valid_labels = _signal(1000, seed=2)
    model = train_model(
        rows,
        labels,
        objective="binary",
        params=SMALL,
        valid=(valid_rows, valid_labels, None, None),
    )
    m = model.metrics
    assert m["valid_auc"] > 0.8
    assert 0.0 < m["valid_logloss"] < np.log(2)  # better than the constant 0.5
    assert m["train_auc"] >= m["valid_auc"] - 0.05
    assert m["n_train_rows"] == 3000 and m["n_valid_rows"] == 1000
    probabilities = model.booster.inplace_predict(valid_rows)
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    assert model.params["objective"] == "binary" and model.params["n_estimators"] == 30


def test_training_is_deterministic_for_a_seed():
    rows, labels = _signal(1500, seed=3)
    params = {**SMALL, "subsample": 0.7, "colsample_bytree": 0.7}
    a = train_model(rows, labels, params=params, seed=7)
    b = train_model(rows, labels, params=params, seed=7)
    c = train_model(rows, labels, params=params, seed=8)
    assert bytes(a.booster.save_raw("json")) == bytes(b.booster.save_raw("json"))
    assert not np.array_equal(a.booster.inplace_predict(rows), c.booster.inplace_predict(rows))


def test_sample_weights_shift_the_model():
    rows, labels = _signal(2000, seed=4)
    plain = train_model(rows, labels, params=SMALL)
    weights = np.where(labels > 0, 5.0, 1.0).astype(np.float32)
    weighted = train_model(rows, labels, weights=weights, params=SMALL)
    plain_mean = plain.booster.inplace_predict(rows).mean()
    assert weighted.booster.inplace_predict(rows).mean() > plain_mean


def _requests(n_requests: int, per_request: int, seed: int):
    """Rows of interleaved (not contiguous) requests with graded relevance from feature 0."""
    rng = np.random.default_rng(seed)
    n = n_requests * per_request
    rows = rng.normal(size=(n, 6)).astype(np.float32)
    relevance = np.clip(np.round(rows[:, 0] + 0.3 * rng.normal(size=n) + 1), 0, 3)
    groups = np.tile(np.arange(n_requests), per_request)  # request ids interleaved
    return rows, relevance.astype(np.float32), groups


def test_pairwise_groups_interleaved_rows_and_beats_a_label_shuffled_model():
    rows, relevance, groups = _requests(200, 20, seed=5)
    v_rows, v_rel, v_groups = _requests(50, 20, seed=6)
    valid = (v_rows, v_rel, None, v_groups)
    model = train_model(
        rows, relevance, objective="pairwise", groups=groups, params=SMALL, valid=valid
    )
    shuffled = np.random.default_rng(0).permutation(relevance)
    baseline = train_model(
        rows, shuffled, objective="pairwise", groups=groups, params=SMALL, valid=valid
    )
    assert 0.0 < model.metrics["valid_ndcg@10"] <= 1.0
    assert model.metrics["valid_ndcg@10"] > baseline.metrics["valid_ndcg@10"] + 0.1


def test_pairwise_accepts_one_weight_per_group_and_refuses_row_weights():
    rows, relevance, groups = _requests(40, 10, seed=7)
    per_group = (groups % 3 + 1).astype(np.float32)
    model = train_model(
        rows, relevance, objective="pairwise", groups=groups, weights=per_group, params=SMALL
    )
    assert model.booster.num_boosted_rounds() == 30
    per_row = np.arange(rows.shape[0], dtype=np.float32)
    with pytest.raises(DataError, match="vary within group"):
        train_model(rows, relevance, objective="pairwise", groups=groups, weights=per_row)


def test_regression_distils_a_score():
    rng = np.random.default_rng(8)
    rows = rng.normal(size=(3000, 5)).astype(np.float32)
    target = (2.0 * rows[:, 0] - rows[:, 1] ** 2 + 0.1 * rng.normal(size=3000)).astype(np.float32)
    model = train_model(
        rows[:2000],
        target[:2000],
        objective="regression",
        params={"n_estimators": 60},
        valid=(rows[2000:], target[2000:], None, None),
    )
    assert model.metrics["valid_rmse"] < 0.5 * float(target[2000:].std())


def test_param_aliases_and_unknown_params():
    rows, labels = _signal(500, seed=9)
    assert train_model(rows, labels, params={"trees": 7}).booster.num_boosted_rounds() == 7
    with pytest.raises(ConfigError, match="unknown training param 'depth'"):
        train_model(rows, labels, params={"depth": 3})
    with pytest.raises(ConfigError, match="max_depth"):
        train_model(rows, labels, params={"max_depth": 0})
    with pytest.raises(ConfigError, match="unknown objective 'lambdamart'"):
        train_model(rows, labels, objective="lambdamart")


def test_bad_inputs_name_the_problem():
    rows, labels = _signal(200, seed=10)
    with_nan = rows.copy()
    with_nan[17, 3] = np.nan
    with pytest.raises(DataError, match="row 17, column 3; impute"):
        train_model(with_nan, labels)
    with pytest.raises(DataError, match=r"y has shape \(199,\); expected \(200,\)"):
        train_model(rows, labels[:-1])
    bad_labels = labels.copy()
    bad_labels[5] = 2.0
    with pytest.raises(DataError, match=r"y\[5\] = 2.0"):
        train_model(rows, bad_labels)
    with pytest.raises(DataError, match="groups are required"):
        train_model(rows, labels, objective="pairwise")
    with pytest.raises(DataError, match="only used by the pairwise"):
        train_model(rows, labels, groups=np.zeros(200))
    negative = np.ones(200, dtype=np.float32)
    negative[3] = -1.0
    with pytest.raises(DataError, match=r"weights\[3\] = -1.0"):
        train_model(rows, labels, weights=negative)
    with pytest.raises(DataError, match="validation X has 7 features; training X has 8"):
        train_model(rows, labels, valid=(rows[:, :7], labels, None, None))


def test_early_stopping_cuts_the_booster_back_to_its_best_round():
    rows, labels = _signal(1500, seed=11)
    noise = np.random.default_rng(12).random(1500) < 0.5  # half the labels are coin flips
    labels = np.where(noise, np.random.default_rng(13).random(1500) < 0.5, labels)
    valid = _signal(800, seed=14)
    params = {
        "n_estimators": 500,
        "max_depth": 6,
        "learning_rate": 0.3,
        "early_stopping_rounds": 10,
    }
    model = train_model(rows, labels.astype(np.float32), params=params, valid=(*valid, None, None))
    rounds = int(model.metrics["rounds"])
    assert rounds < 100 and model.booster.num_boosted_rounds() == rounds
    # The metrics are those of the kept round: the held-out loss at its best.
    full = train_model(
        rows,
        labels.astype(np.float32),
        valid=(*valid, None, None),
        params={**params, "early_stopping_rounds": 0, "n_estimators": rounds},
    )
    assert model.metrics["valid_logloss"] == pytest.approx(full.metrics["valid_logloss"])
    np.testing.assert_array_equal(
        model.booster.inplace_predict(valid[0]), full.booster.inplace_predict(valid[0])
    )
    # Without a validation set there is nothing to stop on: every round is trained.
    assert (
        train_model(rows, labels.astype(np.float32), params={**params, "n_estimators": 25}).metrics[
            "rounds"
        ]
        == 25
    )


def test_regularisation_params_reach_xgboost():
    rows, labels = _signal(1000, seed=15)
    free = train_model(rows, labels, params=SMALL)
    # A split must gain more than gamma, and a leaf hold min_child_weight of hessian: set
    # them past anything the data offers and every tree is a single leaf.
    for strict in ({"gamma": 1e6}, {"min_child_weight": 1e6}):
        stump = train_model(rows, labels, params={**SMALL, **strict})
        assert np.unique(stump.booster.inplace_predict(rows)).size == 1, strict
    assert np.unique(free.booster.inplace_predict(rows)).size > 100
    with pytest.raises(ConfigError, match="'early_stopping_rounds' must be an integer >= 0"):
        train_model(rows, labels, params={"early_stopping_rounds": -1})
    with pytest.raises(ConfigError, match="'subsample' must be in"):
        train_model(rows, labels, params={"subsample": 0.0})
