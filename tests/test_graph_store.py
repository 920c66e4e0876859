"""GraphStore: memory-mapped loading, contract dtypes, id lookup, checksums, synthetic graphs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from walkrank.errors import DataError
from walkrank.graph.store import ARRAY_FIELDS, GraphStore, array_checksum
from walkrank.graph.synthetic import (
    PRESETS,
    ensure_graph,
    generate_graph_tables,
    locale_names,
)

CONTRACT_DTYPES = {
    "pin_offsets": np.int64,
    "board_offsets": np.int64,
    "pin_adj": np.int32,
    "board_adj": np.int32,
    "pin_locale": np.int32,
    "pin_topic": np.int32,
    "board_locale": np.int32,
    "board_topic": np.int32,
    "pin_key": np.int32,
    "board_key": np.int32,
    "pin_quality": np.float32,
    "pin_created_at": np.float64,
    "pin_ids_order": np.int32,
    "board_ids_order": np.int32,
}


def test_contract_fields_dtypes_and_mmap(small_graph: GraphStore) -> None:
    g = small_graph
    for name in ARRAY_FIELDS:
        array = getattr(g, name)
        assert isinstance(array.base, np.memmap), name  # mapped, not read into memory
        assert not array.flags.writeable, name
    for name, dtype in CONTRACT_DTYPES.items():
        assert getattr(g, name).dtype == dtype, name
    assert g.pin_ids.dtype == np.int64 and g.board_ids.dtype == np.int64
    assert g.n_locales >= 2 and g.n_topics >= 4
    assert g.manifest["counts"] == {"pins": g.n_pins, "boards": g.n_boards, "edges": g.n_edges}
    # Adjacency: 8 bytes per edge of neighbours both ways, 8 per node of offsets; the locale
    # index beside it: 2 per node and locale.
    nodes = g.n_pins + g.n_boards
    assert g.manifest["bytes_per_edge"] == pytest.approx(8 + 8 * (nodes + 2) / g.n_edges, abs=1e-4)
    assert g.manifest["locale_index_bytes_per_edge"] == pytest.approx(
        2 * g.n_locales * nodes / g.n_edges, abs=1e-4
    )
    assert g.pin_locale_ends.dtype == np.uint16 and g.board_locale_ends.dtype == np.uint16
    np.testing.assert_array_equal(g.pin_key, g.pin_locale * (g.n_topics + 1) + g.pin_topic)
    np.testing.assert_array_equal(g.board_key, g.board_locale * (g.n_topics + 1) + g.board_topic)
    assert g.pin_locale.max() <= g.n_locales and g.pin_topic.max() <= g.n_topics


def test_id_lookup_round_trip(small_graph: GraphStore) -> None:
    g = small_graph
    dense = np.arange(g.n_pins, dtype=np.int32)
    external = g.pin_external(dense)
    np.testing.assert_array_equal(g.pin_index(external), dense)
    assert np.all(np.diff(g.pin_ids_sorted) > 0)
    np.testing.assert_array_equal(g.pin_ids[g.pin_ids_order], g.pin_ids_sorted)
    boards = np.arange(g.n_boards)
    np.testing.assert_array_equal(g.board_index(g.board_external(boards)), boards)
    # Unknown, out-of-range, text and float forms of ids.
    first = int(external[0])
    query = [first, -5, 10**15]
    assert g.pin_index(query).tolist() == [0, -1, -1]
    assert g.pin_index([str(first), "not-an-id"]).tolist() == [0, -1]
    assert g.pin_index(np.array([float(first), 0.5])).tolist() == [0, -1]
    assert g.pin_index(first).tolist() == [0]
    assert g.pin_index(np.array([], dtype=np.int64)).shape == (0,)
    with pytest.raises(DataError, match="out of range"):
        g.pin_external([g.n_pins])


def test_vocab_codes(small_graph: GraphStore) -> None:
    g = small_graph
    for i, locale in enumerate(g.locales):
        assert g.locale_code(locale) == i
    for i, topic in enumerate(g.topics):
        assert g.topic_code(topic) == i
    assert g.locale_code(None) == g.n_locales and g.locale_code("xx") == g.n_locales
    assert g.topic_code(None) == g.n_topics and g.topic_code("") == g.n_topics
    assert g.bias_key(1, 2) == 1 * (g.n_topics + 1) + 2


@pytest.mark.parametrize("side", ["pin", "board"])
def test_key_runs_give_each_keys_slice(small_graph: GraphStore, side: str) -> None:
    """A key-biased step reads a node's runs, `key << shift | end`: one per distinct key among
    its neighbours, in list order, ending where that key's neighbours end."""
    g = small_graph
    offsets = getattr(g, f"{side}_offsets")
    adj = getattr(g, f"{side}_adj")
    run_offsets = getattr(g, f"{side}_run_offsets")
    assert getattr(g, f"{side}_key_runs").dtype == np.uint32  # key and end fit 32 bits
    runs = getattr(g, f"{side}_key_runs").astype(np.int64)
    neighbour_key = g.board_key if side == "pin" else g.pin_key
    assert g.run_shift == int(max(g.pin_degree().max(), g.board_degree().max())).bit_length()
    for node in range(len(offsets) - 1):
        keys = neighbour_key[adj[offsets[node] : offsets[node + 1]]]
        distinct, first = np.unique(keys, return_index=True)
        ends = np.append(first[1:], len(keys))  # keys rise along the list
        node_runs = runs[run_offsets[node] : run_offsets[node + 1]]
        np.testing.assert_array_equal(node_runs >> g.run_shift, distinct)
        np.testing.assert_array_equal(node_runs & ((1 << g.run_shift) - 1), ends)
    assert run_offsets[-1] == len(runs) < g.n_edges


@pytest.mark.parametrize("side", ["pin", "board"])
def test_locale_index_gives_each_locales_slice(small_graph: GraphStore, side: str) -> None:
    """A locale-biased step takes `adj[start + ends[l - 1] : start + ends[l]]`: exactly the
    neighbours of locale l, for every node and locale (the missing locale runs to the end)."""
    g = small_graph
    offsets = getattr(g, f"{side}_offsets")
    adj = getattr(g, f"{side}_adj")
    ends = getattr(g, f"{side}_locale_ends")
    neighbour_locale = g.board_locale if side == "pin" else g.pin_locale
    checked = 0
    for node in range(len(offsets) - 1):
        neighbours = adj[offsets[node] : offsets[node + 1]]
        bounds = [0, *ends[node].tolist(), len(neighbours)]
        for locale in range(g.n_locales + 1):
            expected = neighbours[neighbour_locale[neighbours] == locale]
            np.testing.assert_array_equal(neighbours[bounds[locale] : bounds[locale + 1]], expected)
            checked += expected.size
    assert checked == g.n_edges


def _copy(graph: GraphStore, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(graph.path, target)
    for path in target.iterdir():
        path.chmod(0o644)  # built read-only; these tests play the corrupting writer
    return target


def _rewrite(root: Path, name: str, change: Callable[[np.ndarray], None]) -> None:
    """Change an array in place and record its new checksum, as a buggy (or hostile) tool
    would: only the structural checks can tell."""
    path = root / f"{name}.npy"
    values = np.load(path)
    change(values)
    np.save(path, values)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["checksums"][name] = array_checksum(path)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["pin_adj", "board_offsets", "pin_ids_sorted"])
def test_checksum_tamper_detected(small_graph: GraphStore, tmp_path: Path, name: str) -> None:
    path = _copy(small_graph, tmp_path)
    with open(path / f"{name}.npy", "r+b") as f:
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0x01]))
    GraphStore.load(path, verify=False)  # an unverified load only maps the files
    with pytest.raises(DataError, match=rf"{name}\.npy: checksum mismatch for array '{name}'"):
        GraphStore.load(path)


def _move_edge(adj: np.ndarray) -> None:
    # In range, so only the degree cross-check sees it: one board gains an edge, one loses one.
    adj[0] = (adj[0] + 1) % (adj.max() + 1)


def _shift(values: np.ndarray, by: int) -> None:
    values[len(values) // 2] += by


@pytest.mark.parametrize(
    ("name", "change", "problem"),
    [
        (
            "pin_adj",
            lambda a: a.__setitem__(3, 10**9),
            r"board id 1000000000 at position 3 is "
            r"outside \[0, \d+\)",
        ),
        ("board_adj", lambda a: a.__setitem__(0, -1), r"pin id -1 at position 0 is outside"),
        ("pin_adj", _move_edge, r"the two adjacency directions disagree"),
        ("pin_offsets", lambda a: _shift(a, 10**6), r"decreases after row"),
        ("board_offsets", lambda a: a.__setitem__(-1, a[-1] - 1), r"ends at \d+, not at the"),
        ("pin_locale_ends", lambda a: a.__setitem__((0, -1), 60_000), r"row 0 ends at 60000"),
        (
            "board_locale_ends",
            lambda a: a.__setitem__((5, 0), a[5, -1] + 1),
            r"locale ends decrease in row 5",
        ),
        ("pin_key", lambda a: _shift(a, 1), r"bias key at position \d+ does not match"),
        (
            "pin_key_runs",
            lambda a: a.__setitem__(0, a[0] + 2**20),
            r"run 0 \(key \d+, end \d+\) of row 0 does not tile",
        ),
        ("board_key_runs", lambda a: a.__setitem__(1, a[0]), r"run 1 .* does not tile its"),
        ("board_run_offsets", lambda a: _shift(a, 10**6), r"decreases after row"),
        ("pin_run_offsets", lambda a: a.__setitem__(1, a[2]), r"row [01] has \d+ runs for"),
        ("pin_topic", lambda a: a.__setitem__(0, 99), r"topic code 99 at position 0"),
        ("pin_ids_order", lambda a: a.__setitem__(1, 2**30), r"dense pin id 1073741824"),
        ("board_ids_sorted", lambda a: a.__setitem__(1, a[0]), r"not strictly increasing"),
    ],
)
def test_structural_corruption_is_an_error_naming_the_file(
    small_graph: GraphStore,
    tmp_path: Path,
    name: str,
    change: Callable[[np.ndarray], None],
    problem: str,
) -> None:
    """What the walk kernels would index by: each broken invariant is a DataError naming the
    array, even when the checksums were rewritten to match (no SIGSEGV in a nogil kernel)."""
    path = _copy(small_graph, tmp_path)
    _rewrite(path, name, change)
    with pytest.raises(DataError, match=rf"{name}\.npy: .*{problem}.*the graph is corrupt"):
        GraphStore.load(path)
    GraphStore.load(path, verify=False).pin_index([1])  # mapping alone never checks


def test_kernel_dtypes_and_manifest_fields_are_checked(
    small_graph: GraphStore, tmp_path: Path
) -> None:
    path = _copy(small_graph, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    for field, value, problem in (
        ("counts", {"pins": 1}, "counts.boards: expected a count"),
        ("degree", {"pin_max": -1}, "degree.pin_max"),
        ("vocab", [], "vocab: expected an object"),
    ):
        (path / "manifest.json").write_text(json.dumps({**manifest, field: value}))
        with pytest.raises(DataError, match=rf"manifest\.json: {problem}"):
            GraphStore.load(path, verify=False)
    (path / "manifest.json").write_text(json.dumps({**manifest, "degree": {"pin_max": 1}}))
    with pytest.raises(DataError, match=r"degree\.pin_max is 1 but the largest pin degree"):
        GraphStore.load(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    np.save(path / "pin_offsets.npy", np.load(path / "pin_offsets.npy").astype(np.int32))
    _rewrite(path, "pin_offsets", lambda a: None)  # records the int32 file's checksum
    with pytest.raises(DataError, match=r"pin_offsets\.npy: dtype int32 \(expected int64\)"):
        GraphStore.load(path)


def test_missing_array_and_bad_manifest(small_graph: GraphStore, tmp_path: Path) -> None:
    path = _copy(small_graph, tmp_path)
    (path / "board_adj.npy").unlink()
    with pytest.raises(DataError, match="board_adj.npy: array 'board_adj' .*missing"):
        GraphStore.load(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format_version 99 is not supported"):
        GraphStore.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: unreadable manifest"):
        GraphStore.load(path)
    with pytest.raises(DataError, match="graph directory does not exist"):
        GraphStore.load(tmp_path / "absent")


def test_shape_mismatch_detected(small_graph: GraphStore, tmp_path: Path) -> None:
    path = _copy(small_graph, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["counts"]["edges"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"pin_adj\.npy: shape .* does not match"):
        GraphStore.load(path)


def test_synthetic_shape() -> None:
    """Power-law degrees; boards mostly one topic; a board's pins mostly share its locale."""
    t = generate_graph_tables(
        n_pins=3_000, n_boards=2_000, n_edges=30_000, n_topics=6, n_locales=3, seed=5
    )
    assert t.edges.num_rows == 30_000
    pins = t.edges.column("pin_id").to_numpy()
    boards = t.edges.column("board_id").to_numpy()
    assert np.unique(pins.astype(np.int64) * 10**10 + boards).size == 30_000
    _, pin_degree = np.unique(pins, return_counts=True)
    _, board_degree = np.unique(boards, return_counts=True)
    assert pin_degree.max() > 6 * pin_degree.mean()
    assert board_degree.max() > 6 * board_degree.mean()

    pin_row = pins - pins.min()
    board_row = boards - boards.min()
    pin_topic = np.asarray(t.pins.column("topic").to_pylist())[pin_row]
    pin_locale = np.asarray(t.pins.column("locale").to_pylist())[pin_row]
    board_topic = np.asarray(t.boards.column("topic").to_pylist())[board_row]
    board_locale = np.asarray(t.boards.column("locale").to_pylist())[board_row]
    assert np.mean(pin_topic == board_topic) > 0.7
    assert np.mean(pin_locale == board_locale) > 0.75
    assert set(pin_locale) == set(locale_names(3))

    again = generate_graph_tables(
        n_pins=3_000, n_boards=2_000, n_edges=30_000, n_topics=6, n_locales=3, seed=5
    )
    assert again.edges.equals(t.edges) and again.pins.equals(t.pins)
    other = generate_graph_tables(
        n_pins=3_000, n_boards=2_000, n_edges=30_000, n_topics=6, n_locales=3, seed=6
    )
    assert not other.edges.equals(t.edges)


def test_ensure_graph_builds_once_and_rebuilds_when_stale(tmp_path: Path) -> None:
    path = ensure_graph("tiny", cache_dir=tmp_path)
    graph = GraphStore.load(path, verify=True)
    assert graph.n_edges == PRESETS["tiny"]["n_edges"]
    assert graph.manifest["build"]["source"]["preset"] == "tiny"
    marker = path / "manifest.json"
    before = marker.stat().st_mtime_ns
    assert ensure_graph("tiny", cache_dir=tmp_path) == path
    assert marker.stat().st_mtime_ns == before

    manifest = json.loads(marker.read_text())
    manifest["build"]["source"]["seed"] = -1
    marker.write_text(json.dumps(manifest))
    ensure_graph("tiny", cache_dir=tmp_path)
    rebuilt = json.loads(marker.read_text())
    assert rebuilt["build"]["source"]["seed"] == PRESETS["tiny"]["seed"]
    with pytest.raises(DataError, match="unknown graph preset 'huge'"):
        ensure_graph("huge", cache_dir=tmp_path)
