"""Offline evaluation metrics against a plain per-request reference, and the reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from walkrank.errors import DataError
from walkrank.training.evaluate import (
    Targets,
    compare,
    ranking_metrics,
    targets_from_joined,
    write_reports,
)
from walkrank.training.labels import join_candidates_events


def reference_metrics(targets: Targets, scores: np.ndarray, k: int) -> dict[str, float]:
    """The metrics written plainly, one request at a time."""
    sums: dict[str, list[float]] = {
        "recall_impressions": [],
        "recall_actions": [],
        "ndcg": [],
        "auc": [],
        "local_share": [],
    }
    for r in range(targets.n_requests):
        rows = np.flatnonzero(targets.request == r)
        ranked = sorted(rows, key=lambda i: (-scores[i], i))
        top = ranked[:k]
        for name, relevant in (
            ("recall_impressions", targets.impressed),
            ("recall_actions", targets.actioned),
        ):
            total = sum(relevant[i] for i in rows)
            if total:
                sums[name].append(sum(relevant[i] for i in top) / total)
        dcg = sum(targets.gain[i] / math.log2(p + 2) for p, i in enumerate(top))
        ideal = sorted((targets.gain[i] for i in rows), reverse=True)[:k]
        idcg = sum(g / math.log2(p + 2) for p, g in enumerate(ideal))
        if idcg > 0:
            sums["ndcg"].append(dcg / idcg)
        pos = [scores[i] for i in rows if targets.impressed[i]]
        neg = [scores[i] for i in rows if not targets.impressed[i]]
        if pos and neg:
            wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
            sums["auc"].append(wins / (len(pos) * len(neg)))
        sums["local_share"].append(sum(targets.local[i] for i in top) / len(top))
    return {
        ("auc" if name == "auc" else f"{name}@{k}"): float(np.mean(values))
        for name, values in sums.items()
    }


def random_targets(seed: int, n_requests: int = 40) -> tuple[Targets, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, n_requests)
    request = np.repeat(np.arange(n_requests), sizes)
    rng.shuffle(request)  # rows of a request need not be contiguous
    n = len(request)
    impressed = rng.random(n) < 0.3
    actioned = impressed & (rng.random(n) < 0.4)
    gain = np.where(actioned, rng.choice([3.0, 8.0], n), np.where(impressed, 1.0, 0.0))
    # Few distinct values, so ties are common.
    scores = rng.integers(0, 6, n).astype(np.float64)
    return Targets(request, impressed, actioned, gain, rng.random(n) < 0.5), scores


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_metrics_match_the_per_request_reference(seed, k):
    targets, scores = random_targets(seed)
    got = ranking_metrics(targets, scores, k)
    expected = reference_metrics(targets, scores, k)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_hand_made_request():
    # One request, 4 candidates; the model puts the impressed and saved pin first.
    targets = Targets(
        request=np.zeros(4, dtype=np.int64),
        impressed=np.array([False, True, False, True]),
        actioned=np.array([False, False, False, True]),
        gain=np.array([0.0, 1.0, 0.0, 8.0]),
        local=None,
    )
    visit = np.array([4.0, 3.0, 2.0, 1.0])
    model = np.array([0.1, 0.5, 0.2, 0.9])
    before = ranking_metrics(targets, visit, k=2)
    after = ranking_metrics(targets, model, k=2)
    assert before == {
        "recall_impressions@2": 0.5,
        "recall_actions@2": 0.0,
        "ndcg@2": pytest.approx((1 / math.log2(3)) / (8 + 1 / math.log2(3))),
        "auc": 0.25,
    }  # of 4 (impressed, not) pairs only (3, 2) is ordered right
    assert after == {
        "recall_impressions@2": 1.0,
        "recall_actions@2": 1.0,
        "ndcg@2": 1.0,
        "auc": 1.0,
    }


def test_requests_without_positives_are_not_averaged():
    targets = Targets(
        request=np.array([0, 0, 1, 1]),
        impressed=np.array([True, False] * 2),
        actioned=np.array([True, False, False, False]),
        gain=np.array([5.0, 0.0, 1.0, 0.0]),
        local=None,
    )
    metrics = ranking_metrics(targets, np.array([0.0, 1.0, 1.0, 0.0]), k=1)
    # Request 1 has no action: recall_actions averages request 0 alone.
    assert metrics["recall_actions@1"] == 0.0
    assert metrics["recall_impressions@1"] == 0.5


def test_bad_scores_are_refused():
    targets, scores = random_targets(0, n_requests=3)
    with pytest.raises(DataError, match="scores for"):
        ranking_metrics(targets, scores[:-1], 5)
    with pytest.raises(DataError, match="NaN"):
        ranking_metrics(targets, np.full_like(scores, np.nan), 5)
    with pytest.raises(DataError, match="K must be"):
        ranking_metrics(targets, scores, 0)


def test_targets_follow_the_label_weights():
    candidates = pa.table(
        {
            "request_id": ["a"] * 5,
            "pin_id": ["p0", "p1", "p2", "p3", "p4"],
            "f_locale_match": pa.array([1, 0, 1, 0, 1], pa.float32()),
        }
    )
    events = pa.table(
        {
            "request_id": ["a"] * 6,
            "pin_id": ["p0", "p1", "p1", "p2", "p3", "p4"],
            "event": ["impression", "impression", "save", "hide", "click", "scored"],
            "score": pa.array([None] * 5 + [0.7], pa.float64()),
        }
    )
    joined = join_candidates_events(candidates, events)
    # Clicks weighted 0 are not actions for this tenant; saves use their weight as gain.
    targets = targets_from_joined(joined, {"impression": 1.0, "save": 8.0, "click": 0.0})
    assert targets.impressed.tolist() == [True, True, True, True, False]
    assert targets.actioned.tolist() == [False, True, False, False, False]
    assert targets.gain.tolist() == [1.0, 8.0, 0.0, 1.0, 0.0]  # a hide gains nothing
    assert targets.local.tolist() == [True, False, True, False, True]


def test_comparison_and_reports(tmp_path):
    targets, scores = random_targets(3)
    better = scores + 10.0 * targets.gain
    comparison = compare(
        targets,
        better,
        scores,
        k=5,
        candidate="v2",
        baseline="visit count",
        window={"start": "2024-05-01T10:00:00Z"},
    )
    assert not comparison.worse_on("ndcg@5")
    assert comparison.lift()["ndcg@5"] > 0
    reverse = compare(targets, scores, better, k=5, candidate="v2", baseline="v1")
    assert reverse.worse_on("ndcg@5")
    assert "ndcg@5: v2" in reverse.describe("ndcg@5")
    with pytest.raises(DataError, match="no metric 'ndcg@50'"):
        comparison.worse_on("ndcg@50")

    assert comparison.exposed_by is None and comparison.exposure_warning is None
    served = {"v1": 3, "visit_count": 1}
    exposed = compare(targets, scores, better, k=5, candidate="v2", baseline="v1", served=served)
    assert exposed.exposed_by == "v1"
    assert exposed.exposure_warning.startswith("WARNING: 75% of these 4 requests were served by v1")
    neither = compare(targets, better, scores, k=5, candidate="v3", baseline="v2", served=served)
    assert neither.exposed_by is None

    paths = write_reports(comparison, tmp_path / "out", title="homefeed: v2 vs visit count")
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(paths["json"].read_text())
    assert document["candidate"] == "v2" and document["k"] == 5
    assert document["metrics"]["ndcg@5"]["candidate"] == pytest.approx(
        comparison.candidate_metrics["ndcg@5"]
    )
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# homefeed: v2 vs visit count")
    assert "| ndcg@5 |" in markdown and "%" in markdown


def test_select_requests_keeps_those_served_by_neither_ranker():
    from walkrank.training.evaluate import select_requests

    def table(rankers: list[str | None]) -> pa.Table:
        # Two candidates per request.
        return pa.table(
            {
                "request_id": [f"r{i}" for i, _ in enumerate(rankers) for _ in range(2)],
                "model_version": [r for r in rankers for _ in range(2)],
            }
        )

    rows = table(["shuffle_top"] * 25 + ["v1"] * 10 + ["visit_count"] * 3 + [None] * 5)
    selection = select_requests(rows, "visit count", "v1")
    kept = rows.filter(pa.array(selection.rows))["model_version"].to_pylist()
    assert set(kept) == {"shuffle_top"} and len(kept) == 50
    assert selection.description.startswith(
        "Compared on the 25 of 43 requests served by neither visit count nor v1 (shuffle_top 25)"
    )
    few = select_requests(table(["shuffle_top"] * 19 + ["v1"] * 10), "visit count", "v1")
    assert few.rows.all()
    assert "only 19 were served by neither visit count nor v1 (at least 20" in few.description
