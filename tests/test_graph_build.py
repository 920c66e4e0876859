"""Graph build: inputs (CSV/Parquet, int/string ids), CSR invariants, pruning, bad input, CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from walkrank.cli import main
from walkrank.errors import ConfigError, DataError
from walkrank.graph.build import PruneOptions, build_graph
from walkrank.graph.store import GraphStore, load_for_serving


def write_table(path: Path, columns: dict[str, list]) -> Path:
    table = pa.table(columns)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        lines = [",".join(columns)]
        for row in zip(*columns.values(), strict=True):
            lines.append(",".join("" if v is None else str(v) for v in row))
        path.write_text("\n".join(lines) + "\n")
    return path


def edge_set(graph: GraphStore) -> set[tuple]:
    pins = np.repeat(np.arange(graph.n_pins), np.diff(graph.pin_offsets))
    return set(
        zip(
            graph.pin_external(pins).tolist(),
            graph.board_external(np.asarray(graph.pin_adj)).tolist(),
            strict=True,
        )
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("id_kind", ["int", "str"])
def test_round_trip_ids_and_features(tmp_path: Path, suffix: str, id_kind: str) -> None:
    def pin(i: int):
        return 9_000_000_000 + i if id_kind == "int" else f"pin-{i}"

    def board(i: int):
        return 70 + i if id_kind == "int" else f"board-{i}"

    pairs = [(3, 0), (1, 0), (1, 1), (4, 2), (2, 1), (3, 2), (0, 2)]
    edges = write_table(
        tmp_path / f"edges{suffix}",
        {"pin_id": [pin(p) for p, _ in pairs], "board_id": [board(b) for _, b in pairs]},
    )
    pins = write_table(
        tmp_path / f"pins{suffix}",
        {
            "pin_id": [pin(i) for i in range(5)],
            "locale": ["ja", "en", None, "ja", "de"],
            "topic": ["food", "art", "food", None, "art"],
            "quality": [0.5, 0.25, None, 1.0, 0.0],
            "created_at": [1_700_000_000, 1_700_000_100, 1_700_000_200, None, 5],
            "saves": [1, 2, 3, 4, 5],
        },
    )
    out = tmp_path / "graph"
    build_graph(out, edges, pins)
    graph = GraphStore.load(out, verify=True)

    assert (graph.n_pins, graph.n_boards, graph.n_edges) == (5, 3, 7)
    expected_ids = np.array([pin(i) for i in range(5)])
    dense = graph.pin_index(expected_ids)
    assert sorted(dense.tolist()) == [0, 1, 2, 3, 4]
    assert graph.pin_external(dense).tolist() == expected_ids.tolist()
    assert graph.pin_index(np.array([pin(99)])).tolist() == [-1]
    assert edge_set(graph) == {(pin(p), board(b)) for p, b in pairs}
    # First appearance in the edges file decides dense ids.
    assert graph.pin_external([0, 1]).tolist() == [pin(3), pin(1)]

    assert graph.locales == ("de", "en", "ja") and graph.topics == ("art", "food")
    p = dense
    assert graph.pin_locale[p].tolist() == [2, 1, 3, 2, 0]
    assert graph.pin_topic[p].tolist() == [1, 0, 1, 2, 0]
    assert graph.pin_key[p].tolist() == [2 * 3 + 1, 1 * 3 + 0, 3 * 3 + 1, 2 * 3 + 2, 0]
    np.testing.assert_array_equal(graph.pin_quality[p], [0.5, 0.25, np.nan, 1.0, 0.0])
    np.testing.assert_array_equal(
        graph.pin_created_at[p], [1_700_000_000, 1_700_000_100, 1_700_000_200, np.nan, 5]
    )
    assert graph.pin_columns["saves"].dtype == np.float32
    assert graph.pin_columns["saves"][p].tolist() == [1, 2, 3, 4, 5]
    # Without a boards table a board takes its pins' dominant topic: board 2 has pins 4, 3, 0
    # with topics art, (missing), food -> tie broken towards the smaller code (art).
    assert graph.board_topic[graph.board_index([board(2)])].tolist() == [0]
    assert graph.board_topic[graph.board_index([board(0)])].tolist() == [0]  # pins 3, 1


def test_csr_both_directions_hold_each_edge_once(small_graph: GraphStore) -> None:
    g = small_graph
    assert g.pin_offsets[0] == 0 and g.pin_offsets[-1] == g.n_edges
    assert g.board_offsets[0] == 0 and g.board_offsets[-1] == g.n_edges
    from_pins = (
        np.repeat(np.arange(g.n_pins, dtype=np.int64), np.diff(g.pin_offsets)) * g.n_boards
        + g.pin_adj
    )
    from_boards = np.asarray(g.board_adj, dtype=np.int64) * g.n_boards + np.repeat(
        np.arange(g.n_boards), np.diff(g.board_offsets)
    )
    a, b = np.sort(from_pins), np.sort(from_boards)
    np.testing.assert_array_equal(a, b)
    assert np.all(a[1:] != a[:-1]), "an edge appears twice"


@pytest.mark.parametrize("side", ["pin", "board"])
def test_adjacency_sorted_by_bias_key_then_id(small_graph: GraphStore, side: str) -> None:
    g = small_graph
    offsets = getattr(g, f"{side}_offsets")
    adj = np.asarray(getattr(g, f"{side}_adj"))
    key = getattr(g, "board_key" if side == "pin" else "pin_key")[adj]
    composite = key.astype(np.int64) * (len(key) + max(g.n_pins, g.n_boards)) + adj
    row_start = np.zeros(len(adj), dtype=bool)
    row_start[offsets[:-1][np.diff(offsets) > 0]] = True
    decreasing = np.flatnonzero(np.diff(composite) <= 0) + 1
    assert row_start[decreasing].all()
    # The keys really vary inside lists, or the ordering above proves nothing.
    assert np.count_nonzero(np.diff(key)[~row_start[1:]]) > 100


def test_duplicate_edges_collapsed_and_counted(tmp_path: Path) -> None:
    edges = write_table(
        tmp_path / "edges.csv", {"pin_id": [1, 1, 2, 1, 2, 3], "board_id": [10, 10, 10, 10, 11, 11]}
    )
    manifest = build_graph(tmp_path / "g", edges)
    graph = GraphStore.load(tmp_path / "g")
    assert manifest["stats"]["duplicate_edges"] == 2
    assert graph.n_edges == 4
    assert edge_set(graph) == {(1, 10), (2, 10), (2, 11), (3, 11)}


def _star(board: str, topics: list[str], start: int) -> tuple[list, list, list, list]:
    """One board whose pins have the given topics (fresh pins numbered from start)."""
    ids = [f"p{start + i}" for i in range(len(topics))]
    return ids, [board] * len(ids), ids, topics


def _hand_made(
    tmp_path: Path, boards: dict[str, list[str]], hub: tuple[str, list[str]] | None = None
) -> tuple[Path, Path]:
    edge_pins, edge_boards, pin_ids, pin_topics = [], [], [], []
    start = 0
    for board, topics in boards.items():
        ep, eb, pids, ptopics = _star(board, topics, start)
        start += len(topics)
        edge_pins += ep
        edge_boards += eb
        pin_ids += pids
        pin_topics += ptopics
    if hub is not None:
        topic, hub_boards = hub
        edge_pins += ["hub"] * len(hub_boards)
        edge_boards += hub_boards
        pin_ids.append("hub")
        pin_topics.append(topic)
    edges = write_table(tmp_path / "edges.parquet", {"pin_id": edge_pins, "board_id": edge_boards})
    pins = write_table(tmp_path / "pins.parquet", {"pin_id": pin_ids, "topic": pin_topics})
    return edges, pins


def test_prune_diverse_boards_by_entropy(tmp_path: Path) -> None:
    edges, pins = _hand_made(
        tmp_path,
        {
            "mono": ["a", "a", "a", "a"],
            "mostly": ["a", "a", "a", "b"],  # H = 0.811 bits
            "mixed": ["a", "b", "a", "b"],  # H = 1.0
        },
    )
    manifest = build_graph(tmp_path / "g", edges, pins, options=PruneOptions(max_board_entropy=0.9))
    graph = GraphStore.load(tmp_path / "g")
    stats = manifest["stats"]["pruning"]["board_entropy"]
    assert stats["boards_dropped"] == 1 and stats["edges_removed"] == 4
    assert stats["threshold"] == 0.9
    assert manifest["build"]["options"]["max_board_entropy"] == 0.9
    assert graph.board_index(["mono", "mostly", "mixed"]).tolist()[2] == -1
    assert graph.n_boards == 2 and graph.n_edges == 8
    assert manifest["stats"]["pins_without_edges"] == 4
    assert manifest["stats"]["boards_without_edges_removed"] == 1
    # A looser threshold keeps everything; 0.8 also drops the 0.811 board.
    assert (
        build_graph(tmp_path / "g2", edges, pins, options=PruneOptions(max_board_entropy=1.0))[
            "stats"
        ]["pruning"]["board_entropy"]["boards_dropped"]
        == 0
    )
    loose = build_graph(tmp_path / "g3", edges, pins, options=PruneOptions(max_board_entropy=0.8))
    assert loose["counts"]["boards"] == 1
    assert math.isclose(0.811, -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)), abs_tol=1e-3)


def test_prune_boards_over_degree_cap(tmp_path: Path) -> None:
    edges, pins = _hand_made(tmp_path, {"s": ["a"] * 2, "m": ["a"] * 3, "l": ["b"] * 5})
    manifest = build_graph(tmp_path / "g", edges, pins, options=PruneOptions(max_board_degree=3))
    graph = GraphStore.load(tmp_path / "g")
    assert manifest["stats"]["pruning"]["board_degree"] == {
        "max_degree": 3,
        "boards_dropped": 1,
        "edges_removed": 5,
    }
    assert graph.board_index(["s", "m", "l"]).tolist()[2] == -1
    assert graph.n_edges == 5


def test_prune_high_degree_pin_keeps_boards_closest_to_its_topic(tmp_path: Path) -> None:
    # Board c<i> holds the hub (topic a) plus 9 - i pins of topic a and i pins of topic b, so its
    # share of topic a falls with i; the hub should keep c0, c1, c2 (ceil(0.3 * 10) = 3).
    boards = {f"c{i}": ["a"] * (9 - i) + ["b"] * i for i in range(10)}
    order = [f"c{i}" for i in (7, 2, 9, 0, 4, 1, 8, 3, 6, 5)]
    edges, pins = _hand_made(tmp_path, boards, hub=("a", order))
    manifest = build_graph(
        tmp_path / "g",
        edges,
        pins,
        options=PruneOptions(pin_degree_threshold=5, pin_keep_fraction=0.3),
    )
    graph = GraphStore.load(tmp_path / "g")
    hub = int(graph.pin_index(["hub"])[0])
    kept = set(graph.board_external(graph.boards_of(hub)).tolist())
    assert kept == {"c0", "c1", "c2"}
    assert manifest["stats"]["pruning"]["pin_degree"] == {
        "threshold": 5,
        "keep_fraction": 0.3,
        "pins_pruned": 1,
        "pins_skipped_without_topic": 0,
        "edges_removed": 7,
    }
    assert graph.n_boards == 10  # every board keeps its other pins
    # The board side agrees: only three boards still list the hub.
    assert int(np.count_nonzero(np.asarray(graph.board_adj) == hub)) == 3


def test_prune_options_validated() -> None:
    with pytest.raises(ConfigError, match="max_board_entropy"):
        PruneOptions(max_board_entropy=1.5)
    with pytest.raises(ConfigError, match="pin_keep_fraction"):
        PruneOptions(pin_keep_fraction=0.0)


# --- bad input -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: edges file not found"):
        build_graph(tmp_path / "g", tmp_path / "nope.csv")


def test_missing_columns(tmp_path: Path) -> None:
    edges = write_table(tmp_path / "edges.csv", {"pin_id": [1], "board": [2]})
    with pytest.raises(DataError, match=r"edges\.csv: missing column\(s\) board_id"):
        build_graph(tmp_path / "g", edges)
    good = write_table(tmp_path / "e.csv", {"pin_id": [1], "board_id": [2]})
    pins = write_table(tmp_path / "pins.csv", {"id": [1], "topic": ["a"]})
    with pytest.raises(DataError, match=r"pins\.csv: missing column\(s\) pin_id"):
        build_graph(tmp_path / "g", good, pins)


@pytest.mark.parametrize("content", ["", "pin_id,board_id\n"])
def test_empty_files(tmp_path: Path, content: str) -> None:
    edges = tmp_path / "edges.csv"
    edges.write_text(content)
    with pytest.raises(DataError, match=r"edges\.csv: .*(empty|Empty)"):
        build_graph(tmp_path / "g", edges)


def test_null_ids_named_by_row(tmp_path: Path) -> None:
    edges = write_table(
        tmp_path / "edges.csv", {"pin_id": [1, 2, None, 4], "board_id": [5, 6, 7, 8]}
    )
    with pytest.raises(
        DataError,
        match=r"edges\.csv: column 'pin_id' has 1 null .* row 3 "
        r"\(line 4\)",
    ):
        build_graph(tmp_path / "g", edges)
    string_ids = write_table(tmp_path / "s.parquet", {"pin_id": ["a", "b"], "board_id": ["x", ""]})
    with pytest.raises(DataError, match=r"s\.parquet: column 'board_id' .* row 2$"):
        build_graph(tmp_path / "g", string_ids)


def test_unknown_feature_type_named(tmp_path: Path) -> None:
    edges = write_table(tmp_path / "edges.parquet", {"pin_id": [1, 2], "board_id": [5, 5]})
    pins = write_table(
        tmp_path / "pins.parquet", {"pin_id": [1, 2], "topic": ["a", "b"], "color": ["red", "blue"]}
    )
    with pytest.raises(
        DataError,
        match=r"pins\.parquet: column 'color' has type string, "
        r"which is neither numeric nor categorical",
    ):
        build_graph(tmp_path / "g", edges, pins)
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"pin_id": [1], "tags": pa.array([[1, 2]])}), nested)
    with pytest.raises(DataError, match=r"nested\.parquet: column 'tags' has type list"):
        build_graph(tmp_path / "g", edges, nested)


def test_bad_id_and_time_types(tmp_path: Path) -> None:
    edges = write_table(tmp_path / "edges.parquet", {"pin_id": [1.5, 2.0], "board_id": [5, 5]})
    with pytest.raises(DataError, match=r"edges\.parquet: column 'pin_id' has type double"):
        build_graph(tmp_path / "g", edges)
    whole = write_table(tmp_path / "whole.csv", {"pin_id": [52.0, 53.0], "board_id": [5, 5]})
    with pytest.raises(
        DataError,
        match=r"whole\.csv: column 'pin_id' has float ids \(52\.0, .*"
        r"cast the column to int64",
    ):
        build_graph(tmp_path / "g", whole)
    edges = write_table(tmp_path / "e2.parquet", {"pin_id": [1, 2], "board_id": [5, 5]})
    pins = write_table(tmp_path / "pins.parquet", {"pin_id": ["1", "2"]})
    with pytest.raises(DataError, match=r"pins\.parquet: column 'pin_id' has string ids but"):
        build_graph(tmp_path / "g", edges, pins)
    pins = write_table(tmp_path / "p2.parquet", {"pin_id": [1, 2], "created_at": ["x", "y"]})
    with pytest.raises(DataError, match=r"p2\.parquet: column 'created_at' .* epoch seconds"):
        build_graph(tmp_path / "g", edges, pins)


def test_duplicate_feature_rows_named(tmp_path: Path) -> None:
    edges = write_table(tmp_path / "edges.csv", {"pin_id": [1, 2], "board_id": [5, 5]})
    pins = write_table(tmp_path / "pins.csv", {"pin_id": [1, 2, 1], "topic": ["a", "b", "c"]})
    with pytest.raises(DataError, match=r"pins\.csv: duplicate pin_id 1 at row 3 \(line 4\)"):
        build_graph(tmp_path / "g", edges, pins)


def test_unreadable_formats(tmp_path: Path) -> None:
    edges = tmp_path / "edges.json"
    edges.write_text('{"pin_id": 1}')
    with pytest.raises(DataError, match=r"edges\.json: unknown edges file format '\.json'"):
        build_graph(tmp_path / "g", edges)
    broken = tmp_path / "edges.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"edges\.parquet: cannot read edges file"):
        build_graph(tmp_path / "g", broken)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("pin_id,board_id\n1,2\n3\n")
    with pytest.raises(DataError, match=r"ragged\.csv: cannot read edges file"):
        build_graph(tmp_path / "g", ragged)


def test_refuses_to_replace_a_non_graph_directory(tmp_path: Path) -> None:
    edges = write_table(tmp_path / "edges.csv", {"pin_id": [1], "board_id": [2]})
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to replace"):
        build_graph(out, edges)
    assert (out / "notes.txt").read_text() == "keep me"


def test_rebuild_replaces_previous_graph_only_when_asked(tmp_path: Path) -> None:
    first = write_table(tmp_path / "a.csv", {"pin_id": [1, 2], "board_id": [5, 5]})
    second = write_table(tmp_path / "b.csv", {"pin_id": [1, 2, 3], "board_id": [5, 6, 6]})
    build_graph(tmp_path / "g", first)
    with pytest.raises(
        DataError,
        match=r"g: a graph already exists there; refusing to replace "
        r"it without --replace",
    ):
        build_graph(tmp_path / "g", second)
    assert GraphStore.load(tmp_path / "g").n_edges == 2
    build_graph(tmp_path / "g", second, replace=True)
    graph = GraphStore.load(tmp_path / "g", verify=True)
    assert graph.n_edges == 3 and graph.n_boards == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "g"]
    (tmp_path / "empty").mkdir()
    assert build_graph(tmp_path / "empty", first)["counts"]["edges"] == 2  # empty: taken as new


def test_published_files_are_never_written_again(tmp_path: Path) -> None:
    """A process mapping a graph keeps its pages whatever a rebuild does: the arrays are
    read-only, and a replace unlinks the old files (never truncates or rewrites them)."""
    first = write_table(tmp_path / "a.csv", {"pin_id": [1, 2, 3], "board_id": [5, 5, 6]})
    second = write_table(tmp_path / "b.csv", {"pin_id": [7], "board_id": [8]})
    build_graph(tmp_path / "g", first)
    assert all((p.stat().st_mode & 0o222) == 0 for p in (tmp_path / "g").glob("*.npy"))
    mapped = GraphStore.load(tmp_path / "g")
    before = np.array(mapped.pin_adj), os.stat(tmp_path / "g" / "pin_adj.npy").st_ino
    build_graph(tmp_path / "g", second, replace=True)
    np.testing.assert_array_equal(mapped.pin_adj, before[0])  # the old inode, still mapped
    assert os.stat(tmp_path / "g" / "pin_adj.npy").st_ino != before[1]
    assert GraphStore.load(tmp_path / "g").n_edges == 1


def test_replace_refused_while_a_server_holds_the_graph(tmp_path: Path) -> None:
    first = write_table(tmp_path / "a.csv", {"pin_id": [1, 2], "board_id": [5, 5]})
    build_graph(tmp_path / "g", first)
    graph, lease = load_for_serving(tmp_path / "g")
    try:
        with pytest.raises(
            DataError,
            match=r"g: a running server is serving this graph; build "
            r"into a new directory",
        ):
            build_graph(tmp_path / "g", first, replace=True)
        assert GraphStore.load(tmp_path / "g").n_edges == graph.n_edges
    finally:
        lease.release()
    build_graph(tmp_path / "g", first, replace=True)
    assert not list(tmp_path.glob(".g.*"))  # no temporary or old directory left behind


# --- CLI -------------------------------------------------------------------------------------


def test_cli_build_info_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edges = write_table(
        tmp_path / "edges.csv",
        {"pin_id": ["a", "b", "c", "a", "d"], "board_id": ["x", "x", "y", "y", "y"]},
    )
    pins = write_table(
        tmp_path / "pins.csv",
        {
            "pin_id": ["a", "b", "c", "d"],
            "locale": ["en", "ja", "ja", "en"],
            "topic": ["t1", "t1", "t2", "t2"],
        },
    )
    out = tmp_path / "graph"
    code = main(
        [
            "graph",
            "build",
            "--edges",
            str(edges),
            "--pins",
            str(pins),
            "--out",
            str(out),
            "--max-board-degree",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "pins 4  boards 1  edges 2" in printed
    assert "pruning board_degree: max_degree 2, boards_dropped 1, edges_removed 3" in printed

    assert main(["graph", "info", str(out), "--verify", "--json"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads(printed[: printed.rindex("}") + 1])
    assert manifest["counts"] == {"pins": 4, "boards": 1, "edges": 2}
    assert manifest["vocab"] == {"locales": ["en", "ja"], "topics": ["t1", "t2"]}
    assert "verified: all 24 checksums match, structure sound" in printed

    (out / "board_topic.npy").chmod(0o644)
    with open(out / "board_topic.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    assert main(["graph", "info", str(out)]) == 0
    assert main(["graph", "info", str(out), "--verify"]) == 2
    assert "checksum mismatch for array 'board_topic'" in capsys.readouterr().err


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["graph", "build", "--edges", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "g")]
    )
    assert code == 2
    assert "missing.csv: edges file not found" in capsys.readouterr().err


def test_edge_times_fill_missing_pin_creation(tmp_path: Path) -> None:
    edges = tmp_path / "edges.csv"
    edges.write_text(
        "pin_id,board_id,created_at\n"
        "1,5,2024-01-02T00:00:00\n1,6,2024-01-01T00:00:00\n2,5,2024-03-01T00:00:00\n"
    )
    pins = write_table(
        tmp_path / "pins.parquet",
        {"pin_id": [1, 2], "created_at": [None, 7.0], "promoted": [True, False]},
    )
    build_graph(tmp_path / "g", edges, pins)
    graph = GraphStore.load(tmp_path / "g")
    p = graph.pin_index([1, 2])
    # Pin 1 has no creation time of its own: its earliest edge (2024-01-01) stands in.
    assert graph.pin_created_at[p].tolist() == [1_704_067_200.0, 7.0]
    assert graph.pin_columns["promoted"][p].tolist() == [1.0, 0.0]
    assert graph.manifest["schema"]["pin_columns"] == ["promoted"]
