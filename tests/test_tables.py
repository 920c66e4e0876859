"""The docs' figure tables are generated from the committed benchmark JSON: a table edited by
hand, or JSON committed without regenerating the docs, fails here."""

import json
import re
from pathlib import Path

import pytest
import tables

ROOT = Path(__file__).resolve().parents[1]

DOCS = ["README.md", "docs/performance.md", "docs/graphs.md", "docs/relevance.md"]
MARKER = re.compile(r"<!-- ([a-z_]+:[a-z_]+) -->\n(.*?)<!-- /\1 -->", re.S)


@pytest.mark.parametrize("doc", DOCS)
def test_marked_tables_match_the_committed_results(doc: str) -> None:
    rendered = tables.all_tables(tables.RESULTS)
    blocks = MARKER.findall((ROOT / doc).read_text())
    assert blocks, f"{doc}: no generated tables"
    for name, body in blocks:
        assert name in rendered, f"{doc}: <!-- {name} --> has no benchmark JSON to render it"
        assert body == rendered[name] + "\n", (
            f"{doc}: table {name} differs from its JSON; run "
            f"`python benchmarks/tables.py --write {doc}`"
        )


def _demo(online: float, slate: float, tenant: str = "homefeed") -> dict[str, object]:
    phase = {"funnel_efficiency": 0.1, "actions_per_1000": 100.0, "local_share": 0.9}
    estimate = {"value": slate, "low": slate - 0.05, "high": slate + 0.05}
    return {
        "size": "ci",
        "seconds": 10.0,
        "primary_metric": {tenant: "funnel_efficiency"},
        "phases": {
            "visit_count": {tenant: phase},
            "lightweight": {tenant: {**phase, "funnel_efficiency": 0.1 * (1 + online)}},
        },
        "offline_vs_online": {
            tenant: {
                "online": online,
                "naive": {"value": 1.0, "low": 0.9, "high": 1.1},
                "snips": estimate,
                "slate": estimate,
                "explored_requests": 40,
                "replayed": online,
            }
        },
    }


def test_demo_tables_give_lifts_and_judge_the_estimate_within_30_percent() -> None:
    assert "0.1000 -> 0.1200 (+20.0%)" in tables.demo_lifts_table(_demo(0.2, 0.2))
    surface = _demo(0.2, 0.2, tenant="new_surface")
    assert "| new_surface (funnel efficiency) |" in tables.demo_lifts_table(surface)
    assert tables.demo_estimates_table(_demo(0.2, 0.25)).endswith("| yes |")
    assert tables.demo_estimates_table(_demo(0.2, 0.1)).endswith("| no |")


def test_real_data_walks_table_reads_every_case(tmp_path: Path) -> None:
    for case, early in (("a", 0.09), ("b", 0.1)):
        figures = {
            "graph_edges": 1000,
            "queries": 10,
            "early_stop_step_fraction": 0.3,
            "early_stop_overlap_at_100": 0.9,
            "full_walk_seed_overlap_at_100": 0.95,
            "prefix_fraction_for_overlap_80": 0.1,
            "recall_seeds": 5,
            "recall_at_50_full": 0.1,
            "recall_at_50_early_stop": early,
            "recall_at_50_early_stop_change": early / 0.1 - 1,
            "recall_at_50_early_stop_change_ci95": [early / 0.1 - 1.02, early / 0.1 - 0.98],
        }
        (tmp_path / f"walks_{case}.json").write_text(json.dumps(figures))
    rows = tables.walks_real_table(tmp_path).splitlines()[2:]
    assert [row.split(" |")[0] for row in rows] == ["| a (1,000 edges)", "| b (1,000 edges)"]
    assert "| -10.0% (-12.0% to -8.0%) |" in rows[0] and "| +0.0% (-2.0% to +2.0%) |" in rows[1]
