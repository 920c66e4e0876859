"""Shared fixtures: one small seeded synthetic graph per test session."""

from __future__ import annotations

import pytest

from walkrank.graph.build import build_graph
from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import generate_graph_tables


@pytest.fixture(scope="session")
def small_graph(tmp_path_factory: pytest.TempPathFactory) -> GraphStore:
    """~2k pins, 400 boards, 20k edges, 6 topics, 3 locales (en, ja, de); seed 11."""
    tables = generate_graph_tables(
        n_pins=2_000, n_boards=400, n_edges=20_000, n_topics=6, n_locales=3, seed=11
    )
    out = tmp_path_factory.mktemp("graphs") / "small"
    build_graph(out, tables.edges, tables.pins, tables.boards)
    return GraphStore.load(out)
