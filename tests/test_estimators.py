"""IPS, self-normalised IPS and bootstrap intervals against worlds whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from walkrank.training.estimators import (
    compare_policies,
    lift_interval,
    ratio_interval,
    top_sets,
)

REQUESTS, CANDIDATES, RETURNED = 400, 40, 10


def explored_world(seed: int) -> dict[str, np.ndarray]:
    """Exploration requests: RETURNED of CANDIDATES drawn uniformly (propensity 1/4); a
    returned pin is impressed with probability `truth`; the candidates outside the returned
    set carry no label. Ranker a scores by a noisy truth, b by noise."""
    rng = np.random.default_rng(seed)
    request = np.repeat(np.arange(REQUESTS), CANDIDATES)
    truth = rng.beta(1, 4, len(request))
    returned = np.zeros(len(request), dtype=bool)
    for r in range(REQUESTS):
        returned[r * CANDIDATES + rng.choice(CANDIDATES, RETURNED, replace=False)] = True
    impressed = returned & (rng.random(len(request)) < truth)
    return {
        "request": request,
        "truth": truth,
        "returned": returned,
        "impressed": impressed.astype(np.float64),
        "propensity": np.full(len(request), RETURNED / CANDIDATES),
        "good": truth + rng.normal(0, 0.05, len(request)),
        "bad": rng.random(len(request)),
    }


def true_value(world: dict[str, np.ndarray], scores: np.ndarray) -> float:
    """What the ranker would measure online: the mean truth of the pins it returns."""
    size = np.full(REQUESTS, RETURNED)
    chosen = top_sets(world["request"], scores, size)
    return float(world["truth"][chosen].mean())


def test_ips_recovers_each_rankers_true_value_and_the_naive_estimate_does_not() -> None:
    world = explored_world(0)
    result = compare_policies(
        world["request"],
        world["impressed"],
        world["propensity"],
        world["returned"],
        world["bad"],
        world["good"],
        samples=300,
    )
    good, bad = true_value(world, world["good"]), true_value(world, world["bad"])
    for estimator in ("ips", "snips"):
        assert result.b[estimator].low <= good <= result.b[estimator].high, estimator
        assert result.a[estimator].low <= bad <= result.a[estimator].high, estimator
        true_lift = good / bad - 1
        assert result.lift[estimator].low <= true_lift <= result.lift[estimator].high
        assert result.lift[estimator].low > 0  # the better ranker is found significantly
    # Naive: the ranker's unreturned pins count as failures, a quarter of the true value.
    assert result.b["naive"].value == pytest.approx(good * RETURNED / CANDIDATES, rel=0.2)
    assert result.support == {"a": 1.0, "b": 1.0}


def test_ips_interval_covers_the_truth_about_95_percent_of_the_time() -> None:
    covered = 0
    trials = 40
    for seed in range(trials):
        world = explored_world(100 + seed)
        result = compare_policies(
            world["request"],
            world["impressed"],
            world["propensity"],
            world["returned"],
            world["bad"],
            world["good"],
            samples=200,
            seed=seed,
        )
        covered += (
            result.b["snips"].low <= true_value(world, world["good"]) <= result.b["snips"].high
        )
    # Binomial(40, 0.95): at least 33 with probability > 0.99.
    assert covered >= 33


def test_ratio_and_lift_intervals() -> None:
    rng = np.random.default_rng(3)
    den = np.ones(2_000)
    num = rng.random(2_000) < 0.3
    interval = ratio_interval(num, den, samples=500)
    assert interval.value == pytest.approx(num.mean())
    half_width = 1.96 * math.sqrt(0.3 * 0.7 / 2_000)
    assert interval.high - interval.low == pytest.approx(2 * half_width, rel=0.2)
    # Independent groups: 0.30 against 0.33, a true lift of +10%.
    other = rng.random(3_000) < 0.33
    lift = lift_interval((num, den), (other, np.ones(3_000)), paired=False, samples=500)
    assert lift.low < 0.1 < lift.high
    # Paired on the same units, identical outcomes have a lift of exactly 0.
    same = lift_interval((num, den), (num, den), paired=True, samples=100)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    empty = ratio_interval(np.array([]), np.array([]))
    assert math.isnan(empty.value) and str(empty) == "n/a"
