"""Bringing one's own data: what `walkrank graph build` says about it."""

from __future__ import annotations

from pathlib import Path

import pytest

from walkrank.cli import main


def test_graph_build_summarises_a_large_vocabulary_and_counts_pins_without_edges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 1_073
    edges = tmp_path / "edges.csv"
    edges.write_text("pin_id,board_id\n" + "".join(f"{i},b{i % 50}\n" for i in range(n)))
    pins = tmp_path / "pins.csv"
    # Every pin its own topic, and 7 pins that no edge mentions.
    pins.write_text("pin_id,topic\n" + "".join(f"{i},topic{i:04d}\n" for i in range(n + 7)))
    assert (
        main(
            [
                "graph",
                "build",
                "--edges",
                str(edges),
                "--pins",
                str(pins),
                "--out",
                str(tmp_path / "graph"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    topics = next(line for line in printed.splitlines() if line.startswith("topics"))
    assert topics.startswith("topics (1,073): topic0000, topic0001,")
    assert topics.endswith("(1,065 more)") and len(topics) < 200
    assert "locales (0): -" in printed
    assert "pins file rows without an edge, left out of the graph: 7" in printed


def test_the_own_data_template_loads_and_is_not_served_from_its_folder() -> None:
    from walkrank.tenants import load_tenant, load_tenants

    repo = Path(__file__).resolve().parents[1]
    template = load_tenant(repo / "tenants" / "templates" / "own_data.yaml")
    assert template.name == "own_data" and template.walk.bias.strength == 0.0
    # The client may take every candidate; saves alone make the labels.
    assert template.candidates.max_return == template.candidates.generate
    assert template.labels.strategy == "engagement" and set(template.labels.weights) == {"save"}
    assert template.ranker.early_stopping_rounds > 0 and template.ranker.max_depth <= 4
    assert "own_data" not in load_tenants(repo / "tenants").configs
