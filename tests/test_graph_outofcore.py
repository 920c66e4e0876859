"""The out-of-core builder (DuckDB) writes the very graph the in-memory builder writes: same
checksums, statistics, vocabularies and schema, from Parquet partitions or CSV files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from walkrank.cli import main
from walkrank.errors import ConfigError, DataError
from walkrank.graph import outofcore
from walkrank.graph.build import PruneOptions, build_graph
from walkrank.graph.outofcore import build_graph_out_of_core
from walkrank.graph.repository import resolve_graph
from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import (
    SyntheticTables,
    generate_graph_tables,
    write_graph_partitions,
)

TABLE_ROLES = ("edges", "pins", "boards")
PRUNING = PruneOptions(
    max_board_entropy=0.8, max_board_degree=150, pin_degree_threshold=15, pin_keep_fraction=0.3
)


@pytest.fixture(scope="module")
def tables() -> SyntheticTables:
    data = generate_graph_tables(
        n_pins=4_000, n_boards=800, n_edges=40_000, n_topics=7, n_locales=3, seed=5
    )
    # Repeated edges (collapsed by both builders) and rows in an order that is not the ids'.
    edges = pa.concat_tables(
        [data.edges.slice(20_000), data.edges.slice(0, 20_000), data.edges.slice(1_000, 2_500)]
    )
    return SyntheticTables(edges=edges, pins=data.pins, boards=data.boards)


def partitions(table: pa.Table, directory: Path, n: int, suffix: str = "parquet") -> Path:
    directory.mkdir(parents=True)
    step = -(-table.num_rows // n)
    for i in range(n):
        part = table.slice(i * step, step)
        if suffix == "parquet":
            pq.write_table(part, directory / f"part-{i:03d}.parquet")
        else:
            pacsv.write_csv(part, directory / f"part-{i:03d}.csv")
    (directory / "_SUCCESS").write_text("")  # what a warehouse export leaves: not data
    return directory


def same_graph(a: dict, b: dict) -> None:
    assert a["checksums"] == b["checksums"]
    for key in (
        "counts",
        "vocab",
        "schema",
        "stats",
        "degree",
        "bytes_per_edge",
        "locale_index_bytes_per_edge",
        "dtypes",
    ):
        assert a[key] == b[key], key


#: Edges per CSR bucket: the default (one bucket at these sizes), or small enough for several.
BUCKETS = pytest.mark.parametrize("bucket_edges", [None, 4_000], ids=["one bucket", "buckets"])


def check_buckets(manifest: dict, bucket_edges: int | None) -> None:
    """The CSR was sorted in one bucket, or in as many as `bucket_edges` asks for."""
    edges = manifest["counts"]["edges"]
    expected = 1 if bucket_edges is None else -(-edges // bucket_edges)
    assert manifest["build"]["csr_buckets"] == expected
    assert bucket_edges is None or expected > 5


@BUCKETS
@pytest.mark.parametrize("options", [PruneOptions(), PRUNING], ids=["no pruning", "pruning"])
def test_parquet_partitions_give_the_in_memory_graph(
    tmp_path: Path,
    tables: SyntheticTables,
    options: PruneOptions,
    bucket_edges: int | None,
) -> None:
    edges = partitions(tables.edges, tmp_path / "edges", 5)
    pins = partitions(tables.pins, tmp_path / "pins", 2)
    boards = partitions(tables.boards, tmp_path / "boards", 1)
    in_memory = build_graph(
        tmp_path / "memory", tables.edges, tables.pins, tables.boards, options=options
    )
    out_of_core = build_graph_out_of_core(
        tmp_path / "duckdb",
        edges,
        pins,
        boards,
        options=options,
        memory_limit="256MB",
        threads=2,
        bucket_edges=bucket_edges,
    )
    same_graph(in_memory, out_of_core)
    check_buckets(out_of_core, bucket_edges)
    assert out_of_core["stats"]["duplicate_edges"] == 2_500
    if options == PRUNING:
        assert set(out_of_core["stats"]["pruning"]) == {
            "board_entropy",
            "board_degree",
            "pin_degree",
        }
    # The in-memory builder reads the same directories as one table, in file-name order.
    same_graph(
        in_memory, build_graph(tmp_path / "memory-dirs", edges, pins, boards, options=options)
    )
    GraphStore.load(tmp_path / "duckdb", verify=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no work files left


@BUCKETS
def test_csv_string_ids_timestamps_and_missing_values(
    tmp_path: Path, tables: SyntheticTables, bucket_edges: int | None
) -> None:
    """Text ids, edge timestamps filling pins without created_at, boards without a locale
    (their pins' dominant one), an extra numeric pin column, pins rows without edges."""
    rng = np.random.default_rng(3)
    n = tables.edges.num_rows
    edges = pa.table(
        {
            "pin_id": pa.array([f"p{v}" for v in tables.edges["pin_id"].to_pylist()]),
            "board_id": pa.array([f"b{v}" for v in tables.edges["board_id"].to_pylist()]),
            "created_at": pa.array(
                (1_700_000_000 + rng.integers(0, 10**7, n)) * 1_000_000, pa.timestamp("us")
            ),
        }
    )
    pin_ids = [f"p{v}" for v in tables.pins["pin_id"].to_pylist()] + ["p-no-edges"]
    n_pins = len(pin_ids)
    created = rng.uniform(1.6e9, 1.7e9, n_pins)
    created[::3] = np.nan
    locale = tables.pins["locale"].cast(pa.string()).to_pylist() + ["zz"]
    pins = pa.table(
        {
            "pin_id": pin_ids,
            "locale": locale,
            "topic": tables.pins["topic"].cast(pa.string()).to_pylist() + [None],
            "created_at": created,
            "likes": rng.integers(0, 100, n_pins),
        }
    )
    board_locale = tables.boards["locale"].cast(pa.string()).to_pylist()
    boards = pa.table(
        {
            "board_id": [f"b{v}" for v in tables.boards["board_id"].to_pylist()],
            "locale": [None if i % 4 == 0 else v for i, v in enumerate(board_locale)],
            "owner": ["x"] * tables.boards.num_rows,
        }
    )
    edge_dir = partitions(edges, tmp_path / "edges", 3, suffix="csv")
    pins_csv = tmp_path / "pins.csv"
    pacsv.write_csv(pins, pins_csv)
    boards_file = tmp_path / "boards.parquet"
    pq.write_table(boards, boards_file)
    in_memory = build_graph(tmp_path / "memory", edge_dir, pins_csv, boards_file, options=PRUNING)
    out_of_core = build_graph_out_of_core(
        tmp_path / "duckdb",
        edge_dir,
        pins_csv,
        boards_file,
        options=PRUNING,
        threads=2,
        bucket_edges=bucket_edges,
    )
    same_graph(in_memory, out_of_core)
    check_buckets(out_of_core, bucket_edges)
    assert out_of_core["schema"]["pin_id"] == "string"
    assert out_of_core["schema"]["pin_columns"] == ["likes"]
    assert GraphStore.load(tmp_path / "duckdb").pin_index(["p-no-edges"])[0] == -1
    assert "zz" not in out_of_core["vocab"]["locales"]  # only pins with edges count


def test_bad_inputs_name_the_file_and_row(tmp_path: Path) -> None:
    edges = pa.table({"pin_id": [1, 2, None, 4], "board_id": [10, 11, 12, 13]})
    directory = partitions(edges, tmp_path / "edges", 2)
    with pytest.raises(
        DataError,
        match=r"null or empty id\(s\); first at .*part-001\.parquet, "
        r"row 1",
    ):
        build_graph_out_of_core(tmp_path / "g1", directory)
    good = partitions(
        pa.table({"pin_id": [1, 2, 3], "board_id": [10, 11, 12]}), tmp_path / "good", 1
    )
    pins = tmp_path / "pins.parquet"
    pq.write_table(pa.table({"pin_id": [1, 2, 2], "quality": [0.1, 0.2, 0.3]}), pins)
    with pytest.raises(DataError, match=r"pins\.parquet, row 3: duplicate pin_id 2"):
        build_graph_out_of_core(tmp_path / "g2", good, pins)
    pq.write_table(pa.table({"pin_id": ["1"], "quality": [0.1]}), pins)
    with pytest.raises(DataError, match="has string ids but the edges have int64 ids"):
        build_graph_out_of_core(tmp_path / "g3", good, pins)
    pq.write_table(pa.table({"pin": [1], "board_id": [2]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) pin_id"):
        build_graph_out_of_core(tmp_path / "g4", tmp_path / "bad.parquet")
    assert not (tmp_path / "g1").exists()


def test_cli_publishes_an_out_of_core_build(
    tmp_path: Path, tables: SyntheticTables, capsys: pytest.CaptureFixture[str]
) -> None:
    edges = partitions(tables.edges, tmp_path / "edges", 3)
    repo = tmp_path / "graphs"
    assert (
        main(
            [
                "graph",
                "build",
                "--engine",
                "duckdb",
                "--memory-limit",
                "128MB",
                "--edges",
                str(edges),
                "--publish",
                str(repo),
            ]
        )
        == 0
    )
    assert "as version 1 of" in capsys.readouterr().out
    directory, version = resolve_graph(repo)
    assert GraphStore.load(directory).manifest["build"]["engine"] == "duckdb"
    assert (
        main(
            [
                "graph",
                "build",
                "--memory-limit",
                "1GB",
                "--edges",
                str(edges),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "--memory-limit" in capsys.readouterr().err


def test_memory_settings_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What this process allocates (numpy and Python, traced) stays node-sized: six times the
    edges on the same pins and boards add no edge-sized array (both CSR directions and the key
    runs, about one per edge when neighbours' keys vary, are streamed in batches); DuckDB,
    which holds the rest, refuses a memory limit it cannot parse, by name."""
    import tracemalloc

    import duckdb  # noqa: F401  (imported before tracing: its import is not the build's)

    monkeypatch.setattr(outofcore, "_BATCH_ROWS", 4096)
    rng = np.random.default_rng(11)
    n_pins, n_boards = 5_000, 1_000
    locales, topics = [f"l{i}" for i in range(8)], [f"t{i}" for i in range(32)]
    for role, n in (("pins", n_pins), ("boards", n_boards)):
        pq.write_table(
            pa.table(
                {
                    f"{role[:-1]}_id": np.arange(n),
                    "locale": rng.choice(locales, n),
                    "topic": rng.choice(topics, n),
                }
            ),
            tmp_path / f"{role}.parquet",
        )
    peaks, runs = {}, {}
    for n_edges in (40_000, 240_000):
        edges = tmp_path / f"edges-{n_edges}.parquet"
        pq.write_table(
            pa.table(
                {
                    "pin_id": rng.integers(0, n_pins, n_edges),
                    "board_id": rng.integers(0, n_boards, n_edges),
                }
            ),
            edges,
        )
        tracemalloc.start()
        try:
            build_graph_out_of_core(
                tmp_path / f"g{n_edges}",
                edges,
                tmp_path / "pins.parquet",
                tmp_path / "boards.parquet",
                memory_limit="64MB",
                threads=2,
            )
            peaks[n_edges] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        runs[n_edges] = GraphStore.load(tmp_path / f"g{n_edges}").pin_key_runs.shape[0]
    assert runs[240_000] - runs[40_000] > 150_000  # edge-sized work, were it held here
    # Less than a byte per added edge (the added key runs alone, as int64, would be ~8).
    assert peaks[240_000] - peaks[40_000] < 200_000, peaks
    with pytest.raises(ConfigError, match=r"memory limit 'lots'"):
        build_graph_out_of_core(tmp_path / "g", edges, memory_limit="lots")
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ConfigError, match=r"bucket_edges must be a whole number of at least 1"):
            build_graph_out_of_core(tmp_path / "g", edges, bucket_edges=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "g").exists()
    assert not list(tmp_path.glob(".g.duckdb-*"))  # refused before any work directory


def _home_share(edges: pa.Table, pins: pa.Table, boards: pa.Table) -> float:
    """Share of edges whose pin has its board's (topic, locale): the generator's shape."""
    pin_row = edges.column("pin_id").to_numpy() - pins.column("pin_id").to_numpy()[0]
    board_row = edges.column("board_id").to_numpy() - boards.column("board_id").to_numpy()[0]
    same = np.ones(edges.num_rows, dtype=bool)
    for column in ("topic", "locale"):
        pin_value = np.asarray(pins.column(column).to_pylist())[pin_row]
        same &= pin_value == np.asarray(boards.column(column).to_pylist())[board_row]
    return float(same.mean())


def test_streamed_synthetic_partitions(tmp_path: Path) -> None:
    """`write_graph_partitions`: exactly the edges asked for, distinct, in (pin, board)
    order across the files, the in-memory generator's nodes and edge shape, the same files
    again for the same seed, and a graph both builders build alike."""
    params = dict(n_pins=3_000, n_boards=600, n_edges=30_000, n_topics=6, n_locales=3, seed=5)
    written = write_graph_partitions(tmp_path / "a", **params, partitions=4, chunk_draws=5_000)
    assert list(written) == [f"part-{k:04d}.parquet" for k in range(4)]
    assert sum(written.values()) == 30_000 and min(written.values()) > 5_000
    edges, pins, boards = (pq.read_table(tmp_path / "a" / role) for role in TABLE_ROLES)
    codes = edges.column("pin_id").to_numpy() * 10**10 + edges.column("board_id").to_numpy()
    assert edges.num_rows == 30_000 and (np.diff(codes) > 0).all()

    memory = generate_graph_tables(**params)
    assert pins.select(["pin_id", "locale", "topic"]).equals(
        memory.pins.select(["pin_id", "locale", "topic"])
    )
    assert boards.equals(memory.boards)
    assert (
        abs(
            _home_share(edges, pins, boards) - _home_share(memory.edges, memory.pins, memory.boards)
        )
        < 0.02
    )

    write_graph_partitions(tmp_path / "b", **params, partitions=4, chunk_draws=5_000)
    for role in TABLE_ROLES:
        assert pq.read_table(tmp_path / "b" / role).equals(pq.read_table(tmp_path / "a" / role))
    write_graph_partitions(tmp_path / "c", **{**params, "seed": 6}, partitions=4)
    assert not pq.read_table(tmp_path / "c" / "edges").equals(edges)
    assert not any(p.name.startswith(".") for p in (tmp_path / "a").iterdir())  # no scratch

    inputs = [tmp_path / "a" / role for role in TABLE_ROLES]
    same_graph(
        build_graph(tmp_path / "memory", *inputs, options=PRUNING),
        build_graph_out_of_core(
            tmp_path / "duckdb", *inputs, options=PRUNING, memory_limit="64MB", threads=2
        ),
    )
    with pytest.raises(ValueError, match="partitions must be in 1..3000"):
        write_graph_partitions(tmp_path / "d", **params, partitions=0)


def test_streamed_synthetic_memory_is_bounded(tmp_path: Path) -> None:
    """What the streamed generator allocates (numpy, traced) does not grow with the edges
    when partitions keep their size: six times the edges on the same nodes add less than a
    byte per edge (holding them, as the in-memory generator does, takes 8 or more; so do
    partitions that grow with the edges)."""
    import tracemalloc

    nodes = dict(n_pins=20_000, n_boards=4_000, n_topics=8, n_locales=4, seed=3)
    # Once untraced first: the first Parquet write's imports and caches are not the edges'.
    write_graph_partitions(tmp_path / "warm", **{**nodes, "n_edges": 1_000}, partitions=2)
    peaks = {}
    for n_edges, partitions in ((40_000, 4), (240_000, 24)):
        tracemalloc.start()
        try:
            write_graph_partitions(
                tmp_path / str(n_edges),
                **nodes,
                n_edges=n_edges,
                partitions=partitions,
                chunk_draws=4_096,
            )
            peaks[n_edges] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[240_000] - peaks[40_000] < 200_000, peaks
