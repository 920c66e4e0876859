"""Shared fixtures (seeded synthetic graphs, built once per session) and the unit/end-to-end
split: `make test-fast` runs `pytest -m "not e2e"`, `make test` runs everything."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from walkrank.graph.build import build_graph
from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import generate_graph_tables

#: Test modules that run in process only: no server on a socket, no child process, no whole
#: training run. Every other module is end to end (`e2e`), and so is any test marked `slow`;
#: a new module is end to end until it is listed here.
UNIT_MODULES = frozenset(
    {
        "test_candidate_log",
        "test_cli_models",
        "test_estimators",
        "test_evaluate",
        "test_events",
        "test_features",
        "test_graph_build",
        "test_graph_outofcore",
        "test_graph_store",
        "test_labels",
        "test_models_registry",
        "test_online_report",
        "test_protos",
        "test_ranking_convert",
        "test_ranking_fit",
        "test_scheduler",
        "test_server_config",
        "test_tables",
        "test_tenants",
        "test_walks",
        "test_wire",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem not in UNIT_MODULES or item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.e2e)


#: The small graph's size: ~2k pins, 400 boards, 20k edges, 6 topics, 3 locales (en, ja, de).
SMALL_GRAPH: dict[str, Any] = {
    "n_pins": 2_000,
    "n_boards": 400,
    "n_edges": 20_000,
    "n_topics": 6,
    "n_locales": 3,
    "seed": 11,
}


@pytest.fixture(scope="session")
def synthetic_graph(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., GraphStore]:
    """The graph factory: `synthetic_graph(**changes)` builds and loads the seeded synthetic
    graph of `SMALL_GRAPH` with `generate_graph_tables` arguments changed, once per session
    for each distinct set of arguments (graphs are read-only once loaded)."""
    built: dict[tuple[tuple[str, Any], ...], GraphStore] = {}

    def build(**changes: Any) -> GraphStore:
        params = {**SMALL_GRAPH, **changes}
        key = tuple(sorted(params.items()))
        if key not in built:
            tables = generate_graph_tables(**params)
            out = tmp_path_factory.mktemp("graphs") / "synthetic"
            build_graph(out, tables.edges, tables.pins, tables.boards)
            built[key] = GraphStore.load(out)
        return built[key]

    return build


@pytest.fixture(scope="session")
def small_graph(synthetic_graph: Callable[..., GraphStore]) -> GraphStore:
    """`SMALL_GRAPH`, seed 11."""
    return synthetic_graph()
