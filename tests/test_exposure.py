"""A deliberately bad model, once serving, wins the naive offline comparison against a better
successor; the comparison on exploration traffic picks the better one. Real logs (CandidateLog
and EventLog Parquet), a real published ONNX model, `train_tenant` and `walkrank evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_training_pipeline import FEATURES, START, append_event, make_tenant, quiet, write_events

from walkrank.logs.candidates import CandidateBatch, CandidateLog
from walkrank.logs.partitioned import WriterOptions
from walkrank.model_registry import ModelRegistry
from walkrank.ranking.export import export_model
from walkrank.ranking.fit import train_model
from walkrank.training import evaluate
from walkrank.training.pipeline import evaluate_tenant, score_matrix, train_tenant

CANDIDATES, RETURNED, SHOWN = 60, 10, 4
NOISE = FEATURES.index("query_topic_share")  # what the bad model ranks by: unrelated to users


def world(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One request's candidates: features, and the latent relevance the full ranker sees."""
    walk_score = np.sort(rng.lognormal(2.0, 1.0, CANDIDATES))[::-1]
    features = np.column_stack(
        [
            walk_score,
            np.round(walk_score),
            rng.uniform(0, 1, CANDIDATES),
            rng.random(CANDIDATES) < 0.4,
            rng.random(CANDIDATES) < 0.3,
            rng.uniform(0, 1, CANDIDATES),
        ]
    ).astype(np.float32)
    latent = 2.0 * features[:, 4] + 1.5 * features[:, 2] + 1.0 * features[:, 3]
    return features, latent + rng.normal(0, 0.3, CANDIDATES)


def publish_bad_model(models: Path) -> bytes:
    """v1: a real model that ranks by the noise feature alone."""
    rng = np.random.default_rng(5)
    x = np.vstack([world(rng)[0] for _ in range(30)])
    trained = train_model(
        x,
        (x[:, NOISE] > 0.5).astype(np.float32),
        objective="binary",
        params={"n_estimators": 10, "max_depth": 2},
    )
    exported = export_model(
        trained.booster, list(FEATURES), converter="onnxmltools", objective="binary", sample=x
    )
    ModelRegistry(models).publish("homefeed", exported.onnx_bytes, exported.metadata)
    return exported.onnx_bytes


def write_served_logs(logs: Path, bad_model: bytes, explore_share: float, n: int = 400) -> None:
    """v1 serves (returns its top RETURNED); `explore_share` of the requests return RETURNED
    candidates drawn uniformly (shuffle_top, propensity RETURNED / CANDIDATES). Only returned
    pins can be impressed: the full ranker shows the SHOWN most relevant of them."""
    rng = np.random.default_rng(11)
    candidate_log = CandidateLog(logs, WriterOptions(flush_seconds=3600))
    events: dict[str, list] = {"request_id": [], "pin_id": [], "event": [], "timestamp": []}
    for r in range(n):
        features, latent = world(rng)
        request_id, ts = f"req-{r:04d}", START + 60.0 * r
        pins = np.array([f"p{r}-{i:02d}" for i in range(CANDIDATES)])  # id order = walk order
        scores = score_matrix(bad_model, features)
        explore = rng.random() < explore_share
        if explore:
            order = rng.permutation(CANDIDATES)
            propensity = np.full(CANDIDATES, RETURNED / CANDIDATES, np.float32)
        else:
            order = np.argsort(-scores, kind="stable")
            propensity = np.zeros(CANDIDATES, np.float32)
            propensity[order[:RETURNED]] = 1.0
        returned = np.zeros(CANDIDATES, dtype=bool)
        returned[order[:RETURNED]] = True
        ranks = np.empty(CANDIDATES, np.int32)
        ranks[order] = np.arange(CANDIDATES, dtype=np.int32)
        candidate_log.submit(
            CandidateBatch(
                request_id=request_id,
                tenant="homefeed",
                ts=ts,
                user_id=f"u{r}",
                user_locale="en_US",
                user_interests=["food"],
                pin_ids=pins,
                feature_names=list(FEATURES),
                features=features,
                visit_scores=features[:, 0],
                model_scores=scores,
                ranks=ranks,
                returned=returned,
                model_version="shuffle_top" if explore else "v1",
                arm="explore" if explore else "default",
                propensities=propensity,
            )
        )
        candidates = order[:RETURNED]
        shown = candidates[np.argsort(-latent[candidates])[:SHOWN]]
        for i in shown:
            for event in ("impression", "click") if latent[i] > 3 else ("impression",):
                append_event(
                    events, request_id=request_id, pin_id=pins[i], event=event, timestamp=ts + 5.0
                )
    assert candidate_log.close(60)
    write_events(logs, events)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, Path]:
    """Two logs of the same world: with exploration traffic (30%) and without."""
    root = tmp_path_factory.mktemp("exposure")
    out = {}
    for name, share in (("explored", 0.3), ("naive", 0.0)):
        models = root / name / "models"
        bad = publish_bad_model(models)
        write_served_logs(root / name / "logs", bad, share)
        out[name] = root / name
    return out


def test_naive_comparison_keeps_the_bad_model(served, tmp_path) -> None:
    root = served["naive"]
    report = train_tenant(
        make_tenant(), root / "logs", root / "models", publish=False, progress=quiet
    )
    comparison = report.comparison
    assert comparison.baseline == "v1"
    # Every held-out request was served by v1: its own top 10 hold every impression.
    assert comparison.served_by == {"v1": 80}
    assert comparison.baseline_metrics["recall_impressions@10"] == 1.0
    assert report.refused and "worse than v1" in report.refused
    assert comparison.exposure_warning.startswith("WARNING: 100% of these 80 requests")
    assert "only 0 were served by neither v1 nor new model" in comparison.selection
    assert comparison.estimates is None


def test_exploration_traffic_picks_the_better_successor(
    served, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = served["explored"]
    messages: list[str] = []
    report = train_tenant(make_tenant(), root / "logs", root / "models", progress=messages.append)
    comparison = report.comparison
    assert report.refused is None and report.version == 2
    explored = comparison.served_by["shuffle_top"]
    assert set(comparison.served_by) == {"shuffle_top"} and explored >= 20
    assert comparison.selection.startswith(
        f"Compared on the {explored} of 80 requests served by neither v1 nor new model"
    )
    assert comparison.exposure_warning is None
    primary = "recall_impressions@10"
    assert comparison.intervals[primary]["lift"].low > 0  # significantly better
    # The online metric the full ranker measures, estimated by IPS: the successor passes
    # more of its returned pins, and the interval excludes no change.
    funnel = comparison.estimates["funnel_efficiency"]
    assert funnel.requests == explored
    assert funnel.lift["snips"].low > 0 and funnel.lift["ips"].value > 0
    # This client shows SHOWN of any returned set and no other source's pins: no ranker can
    # change its funnel efficiency, which per-pin IPS misses and the slots-aware estimate
    # sees; the successor's shown pins are clicked more.
    assert funnel.slots == SHOWN and abs(funnel.lift["slate"].value) < 1e-9
    assert comparison.estimates["actions_per_returned"].lift["slate"].value > 0
    assert any("Compared on the" in m for m in messages)

    # `walkrank evaluate` of the published successor on the whole log: the same selection
    # (requests served by neither v2 nor visit count: v1's and shuffle_top's), intervals in
    # the JSON, the report and the chart.
    result = evaluate_tenant(
        make_tenant(), root / "logs", root / "models", k=10, out_dir=tmp_path, progress=quiet
    )
    document = json.loads(result.paths["json"].read_text())
    assert document["candidate"] == "v2" and document["exposure_warning"] is None
    assert document["selection"].startswith("Compared on the 80 of 80 requests")
    assert set(document["metrics"][primary]) >= {
        "baseline_interval",
        "candidate_interval",
        "lift_interval",
    }
    assert document["estimates"]["funnel_efficiency"]["lift"]["snips"]["value"] is not None
    assert document["estimates"]["funnel_efficiency"]["lift"]["slate"]["value"] is not None
    markdown = result.paths["markdown"].read_text()
    assert "Online metrics estimated on" in markdown and "| funnel_efficiency | snips |" in markdown
    assert result.paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Past MAX_EXPLORED_REQUESTS the estimates replay a seeded sample of that many requests.
    monkeypatch.setattr(evaluate, "MAX_EXPLORED_REQUESTS", 10)
    sampled = evaluate_tenant(
        make_tenant(), root / "logs", root / "models", k=10, out_dir=tmp_path, progress=quiet
    )
    estimates = json.loads(sampled.paths["json"].read_text())["estimates"]
    assert {estimate["requests"] for estimate in estimates.values()} == {10}
