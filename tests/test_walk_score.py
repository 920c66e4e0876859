"""`Candidate.walk_score`: the boosted visit count that defines visit-count order, returned
beside the model's score, through a real server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_server import busy_pins, make_config, publish_model, running

from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import read_candidates
from walkrank.serving.pipeline import is_sampled


def test_walk_score_is_the_visit_count_order_with_or_without_a_model(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    query = busy_pins(small_graph, 1)
    # related_pins logs half of its requests: one whose id is sampled.
    request_id = next(f"ranked-{i}" for i in range(100) if is_sampled(f"ranked-{i}", 0.5))
    with running(config) as (_, client):
        plain = client.recommend("related_pins", query, seed=5, request_id="plain")
        assert plain.model_version == "visit_count"
        # Without a model the score is the walk score, and the answer is in its order.
        assert [c.walk_score for c in plain.candidates] == [c.score for c in plain.candidates]
        publish_model(config.models_dir, config.tenants_dir, "related_pins", seed=1)
        client.reload()
        ranked = client.recommend("related_pins", query, seed=5, request_id=request_id)
        assert ranked.model_version == "v1"
    walk = {c.pin_id: c.walk_score for c in ranked.candidates}
    # The model's score and the raw visit total are both something else.
    assert all(c.score != c.walk_score for c in ranked.candidates)
    assert any(c.walk_score != c.visit_count for c in ranked.candidates)
    logged = read_candidates(config.logs_dir, "related_pins").to_pandas()
    logged = logged[logged.request_id == request_id].set_index("pin_id")
    # The returned walk scores are the logged ones (the walk's own scores)...
    returned = logged[logged.returned]
    assert len(returned) == len(ranked.candidates) > 0
    assert np.array_equal(
        np.float32([walk[p] for p in returned.index]), returned.visit_score.to_numpy(np.float32)
    )
    # ...and over the whole candidate set (same seed, same walk) their order is the
    # visit-count answer.
    by_walk = np.sort(logged.visit_score.to_numpy(np.float32))[::-1][: len(plain.candidates)]
    assert by_walk.tolist() == [c.score for c in plain.candidates]
