"""The closed-loop relevance benchmark end to end on a small generated case: graph build,
serve, report saves, train, serve the model, measure — real commands, real server."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

import relevance  # noqa: E402

from walkrank.tenants import load_tenant  # noqa: E402


@pytest.mark.slow
def test_the_loop_runs_on_a_generated_case_with_sane_figures(tmp_path: Path) -> None:
    case = relevance.synthesize_case(tmp_path / "case", seed=3)
    with gzip.open(case / "requests_train.jsonl.gz", "rt") as handle:
        first = json.loads(handle.readline())
    assert {"request_key", "user_id", "request_time", "interests", "query_pins"} <= set(first)

    out = tmp_path / "result.json"
    assert (
        relevance.main([str(case), "--json", str(out), "--seed", "1", "--ranker", "max_depth=3"])
        == 0
    )
    result = json.loads(out.read_text())
    assert result["ranker_overrides"] == {"max_depth": 3} and result["ranker"]["max_depth"] == 3
    metrics = result["metrics"]
    for k in (50, 100):
        for name in ("visit_count", "ranker", "popularity"):
            assert 0.0 < metrics[f"{name}_recall_at_{k}"] <= 1.0, (name, k, metrics)
        assert metrics[f"ranker_recall_at_{k}"] >= 0.8 * metrics[f"visit_count_recall_at_{k}"]
        assert metrics[f"visit_count_recall_at_{k}"] <= result["candidate_coverage"]["test"]
    assert metrics["ranker_recall_at_100"] >= metrics["ranker_recall_at_50"]
    # Each phase's single-feature orders: the edge-time features vary at the request time.
    orders = result["feature_orders_recall_at_50"]
    assert "pin_edges_last_30d_rank" in orders["train"] and "walk_score_rank" in orders["test"]
    assert metrics["lift_vs_visit_count"] == metrics["lift_vs_visit_count_at_50"]
    # Every request was served and logged, in both phases.
    assert result["logged_requests"] == result["requests"]
    assert result["seed"] == 1 and isinstance(result["published"], bool)
    if result["published"]:
        assert result["training"]["rows"]["train_requests"] > 0
        importance = result["importance"]["drop_when_shuffled"]
        assert set(importance) == set(load_tenant(relevance.TEMPLATE).features)
    assert set(result["seconds"]) == {
        "graph_train",
        "serve_train",
        "train",
        "graph_test",
        "serve_test",
        "evaluate",
        "total",
    }
