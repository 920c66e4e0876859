"""The demo world end to end (reduced size): the product's main job, checked not printed."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from walkrank.demo.run import METRICS, run_demo
from walkrank.demo.world import SIZES, ensure_world_graph
from walkrank.errors import DataError
from walkrank.graph.store import FORMAT_VERSION, GraphStore
from walkrank.training.estimators import MIN_EXPLORED_REQUESTS


@pytest.mark.slow
def test_demo_models_beat_visit_count_and_write_their_report(tmp_path: Path) -> None:
    report = run_demo(tmp_path, size="ci", progress=lambda _line: None)
    assert set(report.model_versions) == {"homefeed", "related_pins", "email"}
    for tenant, metric in report.primary.items():
        before = report.phases["visit_count"][tenant][metric]
        after = report.phases["lightweight"][tenant][metric]
        assert after > before, f"{tenant}: {metric} {after} <= visit count {before}"
    # related pins weights local labels and has the most room: its local share must rise.
    # Runs differ a little (requests are served concurrently): +4.4% to +8% seen at this size
    # with the shipped ranker defaults, so the margin is 2%.
    assert report.lift("related_pins", "local_share") > 0.02
    assert set(report.strategies) == {"engagement", "funnel", "blended_funnel", "distillation"}
    out = report.out_dir
    assert out is not None
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "demo.md").read_text()
    assert all(metric in markdown for metric in METRICS)
    assert (out / "demo.json").stat().st_size > 0
    # Offline estimate vs online lift: the naive estimate of each served model (on the phase-2
    # requests it served) and the measured online lift, beside the exposure-aware estimate.
    assert "## Offline estimate vs online lift" in markdown
    assert set(report.offline) == {"homefeed", "related_pins", "email"}
    for tenant, row in report.offline.items():
        assert row["metric"] == report.primary[tenant]
        assert row["naive"]["value"] is not None and row["served_requests"] > 0
        assert row["online"] == report.lift(tenant, row["metric"])
        # The exposure-aware (slots-aware) estimate on the exploration requests, flagged when
        # they are too few, beside the true lift the world gives on those same requests.
        if row["explored_requests"]:
            assert row["slots"] >= 1 and set(row["slate"]) == {"value", "low", "high"}
            assert row["enough_requests"] == (row["explored_requests"] >= MIN_EXPLORED_REQUESTS)
            assert row["replayed"] is None or math.isfinite(row["replayed"])
    if not all(row.get("enough_requests", True) for row in report.offline.values()):
        assert "(too few requests)" in markdown
    assert set(report.explored) == {"homefeed", "related_pins", "email"}


def test_world_graph_is_reused_and_rebuilt_when_its_format_is_stale(tmp_path: Path) -> None:
    size = dataclasses.replace(SIZES["ci"], n_pins=300, n_boards=60, n_edges=2_000)
    graph_dir = ensure_world_graph(tmp_path, size)
    manifest_path = graph_dir / "manifest.json"
    built = manifest_path.stat().st_mtime_ns
    assert ensure_world_graph(tmp_path, size) == graph_dir
    assert manifest_path.stat().st_mtime_ns == built  # reused, not rebuilt
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = FORMAT_VERSION - 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format_version"):
        GraphStore.load(graph_dir)
    ensure_world_graph(tmp_path, size)
    assert GraphStore.load(graph_dir).manifest["format_version"] == FORMAT_VERSION
