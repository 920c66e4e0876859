"""Build a graph from tables larger than memory: DuckDB does the edge-sized work on disk.

`walkrank graph build --engine duckdb` (docs/graphs.md). The in-memory builder
(`walkrank.graph.build`) holds every edge several times over in numpy arrays; here every step
whose size grows with the edges runs in DuckDB, which sorts and aggregates beyond its
`memory_limit` by spilling to a temporary directory, and only node-sized arrays (one value per
pin or board) and the aggregates the pruning rules read are held in this process:

- dense ids in first-appearance order (files in name order, rows in file order: the order
  Parquet's `file_row_number` gives), duplicate edges collapsed, edges' `created_at` folded
  per pin, the pins and boards tables joined per node;
- the board rules (entropy, degree) from (board, topic) counts and board degrees, the pin rule
  by a window over each heavy pin's edges;
- both CSR directions as `ORDER BY` queries streamed in batches straight into the `.npy`
  files, the key runs streamed the same way from (node, neighbour key) counts (one run per
  distinct pair: about one per edge), the locale index from (node, neighbour locale) counts;
  in buckets of node ranges (each side's edges written once as Parquet partitioned by bucket,
  then each bucket's queries in node order) small enough to sort within `memory_limit`, so
  the time grows with the edges rather than as one external merge sort of them all.

So the process's own memory is node-sized, and DuckDB's is held to `memory_limit`.

Everything else is the in-memory builder's own code (feature columns, vocabularies, board
values, rules, id arrays, manifest, writing and publishing), so both builders write the same
graph, file for file (tests/test_graph_outofcore.py compares checksums). CSV inputs are
converted to Parquet first, streamed batch by batch, since only Parquet gives row numbers.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from walkrank.errors import ConfigError, DataError
from walkrank.graph.build import (
    PruneOptions,
    _check_target,
    _codes,
    _new_sibling,
    _seconds,
    assemble_manifest,
    board_columns,
    board_rules,
    dominant_from_counts,
    encode_runs,
    graph_stats,
    id_arrays,
    locale_ends_from_counts,
    pin_columns,
    run_shift,
    table_files,
    vocabulary,
    write_graph,
)
from walkrank.graph.store import PIN_COLUMN_PREFIX, PIN_EDGE_TIMES, array_checksum

#: Row positions are `file index << 40 | row number in the file`.
_FILE_SHIFT = 40
_BATCH_ROWS = 1 << 20
#: DuckDB memory a bucket's sorts and aggregates take per edge, for the bucket size.
_BUCKET_BYTES_PER_EDGE = 128
#: The units DuckDB shows its memory limit in ('953.6 MiB').
_UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_INTEGER_TYPES = (
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
    "HUGEINT",
    "UHUGEINT",
)


def build_graph_out_of_core(
    out: str | Path,
    edges: str | Path,
    pins: str | Path | None = None,
    boards: str | Path | None = None,
    *,
    options: PruneOptions | None = None,
    source: Mapping[str, Any] | None = None,
    replace: bool = False,
    memory_limit: str = "1GB",
    threads: int | None = None,
    temp_dir: str | Path | None = None,
    bucket_edges: int | None = None,
) -> dict[str, Any]:
    """Build a graph directory at `out` from Parquet or CSV files (or directories of them)
    with DuckDB held to `memory_limit`, spilling to `temp_dir` (default: beside `out`);
    returns the manifest, the same as `build_graph` would write for the same inputs.
    The CSR is sorted in buckets of about `bucket_edges` edges (default: what sorts within
    `memory_limit`, `_BUCKET_BYTES_PER_EDGE`)."""
    try:
        import duckdb
    except ModuleNotFoundError:
        raise ConfigError(
            "--engine duckdb needs the duckdb package: pip install 'walkrank[bigbuild]'"
        ) from None

    if bucket_edges is not None and (
        isinstance(bucket_edges, bool) or not isinstance(bucket_edges, int) or bucket_edges < 1
    ):
        raise ConfigError(
            f"bucket_edges must be a whole number of at least 1, not {bucket_edges!r}"
        )
    out = Path(out)
    _check_target(out, replace)
    options = options or PruneOptions()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(
        tempfile.mkdtemp(
            prefix=f".{out.name}.duckdb-", dir=temp_dir if temp_dir is not None else out.parent
        )
    )
    try:
        config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": memory_limit,
            "temp_directory": str(work / "spill"),
            "preserve_insertion_order": False,
        }
        if threads is not None:
            config["threads"] = threads
        try:
            con = duckdb.connect(str(work / "build.duckdb"), config=config)
        except duckdb.Error as exc:
            raise ConfigError(
                f"DuckDB settings (memory limit {memory_limit!r}, threads {threads}): {exc}"
            ) from exc
        try:
            con.execute("SET enable_progress_bar = false")
            if bucket_edges is None:
                bucket_edges = max(1, _limit_bytes(con) // _BUCKET_BYTES_PER_EDGE)
            return _Build(con, work, options, bucket_edges).run(
                out, Path(edges), pins, boards, source, replace
            )
        except duckdb.Error as exc:
            raise DataError(f"out-of-core build of {edges}: {exc}") from exc
        finally:
            con.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _Build:
    """One build: a DuckDB connection and the node-sized state between its steps."""

    def __init__(self, con: Any, work: Path, options: PruneOptions, bucket_edges: int) -> None:
        self.con = con
        self.work = work
        self.options = options
        self.bucket_edges = bucket_edges
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.files: dict[str, list[Path]] = {}  # view -> its files, for error messages
        self.names: dict[str, str] = {}  # view -> the path given
        self.raw_columns: list[str] = []

    def lap(self, step: str) -> None:
        self.timings[step] = round(
            time.perf_counter() - self.started - sum(self.timings.values()), 3
        )

    def sql(self, query: str, params: list[Any] | None = None) -> Any:
        return self.con.sql(query, params=params)

    def one(self, query: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
        """The first row a query returns (None without rows)."""
        rows = self.con.execute(query, params or []).fetchall()
        return rows[0] if rows else None

    def row(self, query: str) -> tuple[Any, ...]:
        """The row of an aggregate query (count, min: always exactly one)."""
        row = self.one(query)
        assert row is not None, query
        return row

    def dense_counts(self, query: str, n: int) -> np.ndarray:
        """int64[n] from a query of (dense id, count) rows; 0 where absent."""
        table = self.sql(query).to_arrow_table()
        result = np.zeros(n, dtype=np.int64)
        result[table.column(0).to_numpy()] = table.column(1).to_numpy()
        return result

    # -- the steps ---------------------------------------------------------------------------

    def run(
        self,
        out: Path,
        edges: Path,
        pins: str | Path | None,
        boards: str | Path | None,
        source: Mapping[str, Any] | None,
        replace: bool,
    ) -> dict[str, Any]:
        edges_name = str(edges)
        id_type = self._edges(edges)
        n_pins, n_boards_all = (self._dictionary(side) for side in ("pin", "board"))
        input_edges = int(self.row("SELECT count(*) FROM raw")[0])
        self.lap("read_edges")

        schema: dict[str, Any] = {"pin_id": id_type, "board_id": id_type}
        pin_cat, pin_quality, pin_created, extra, pins_info = self._pin_features(
            pins, n_pins, id_type, schema
        )
        board_cat, boards_info = self._board_features(boards, n_boards_all, id_type, schema)
        if "created_at" in self.raw_columns:
            self._fill_created_from_edges(pin_created, edges_name)
            schema["edges.created_at"] = "fills pin_created_at (earliest edge) where pins lack it"
        self.lap("read_features")

        vocab = vocabulary(pin_cat, board_cat)
        n_locales, n_topics = len(vocab["locale"]), len(vocab["topic"])
        pin_locale = _codes(pin_cat["locale"], vocab["locale"])
        pin_topic = _codes(pin_cat["topic"], vocab["topic"])
        given_locale = _codes(board_cat["locale"], vocab["locale"])
        given_topic = _codes(board_cat["topic"], vocab["topic"])
        del pin_cat, board_cat
        self.con.register(
            "pin_codes",
            pa.table(
                {"pin": np.arange(n_pins, dtype=np.int32), "locale": pin_locale, "topic": pin_topic}
            ),
        )
        edge_times = "created_at" in self.raw_columns
        if edge_times:  # a duplicated edge's earliest time, as the in-memory builder keeps
            self.con.execute(
                "CREATE TABLE e AS SELECT p.pin, b.board, min(r.created_at) AS created_at "
                "FROM raw r JOIN pin_dict p USING (pin_id) JOIN board_dict b USING (board_id) "
                "GROUP BY ALL"
            )
        else:
            self.con.execute(
                "CREATE TABLE e AS SELECT DISTINCT p.pin, b.board FROM raw "
                "JOIN pin_dict p USING (pin_id) JOIN board_dict b USING (board_id)"
            )
        n_deduped = int(self.row("SELECT count(*) FROM e")[0])
        self.lap("dedupe")

        board_locale = self._given_or_dominant(given_locale, "locale", n_locales)
        topic_codes, topic_counts = self._board_value_counts("topic", n_topics)
        board_topic = _fill_dominant(given_topic, topic_codes, topic_counts, n_topics)
        degree = self.dense_counts("SELECT board, count(*) FROM e GROUP BY board", n_boards_all)
        dropped, prune_stats = board_rules(
            topic_codes, topic_counts, degree, n_topics, self.options
        )
        self._prune_pins(
            dropped, pin_topic, n_pins, n_topics, topic_codes, topic_counts, prune_stats
        )
        final_degree = self.dense_counts(
            "SELECT board, count(*) FROM final GROUP BY board", n_boards_all
        )
        alive = final_degree > 0
        if not alive.any():
            raise DataError(f"{edges_name}: pruning removed every edge; loosen the pruning options")
        board_ids = (
            self.sql("SELECT board_id FROM board_dict ORDER BY board")
            .to_arrow_table()
            .column(0)
            .combine_chunks()
            .filter(pa.array(alive))
        )
        board_locale, board_topic = board_locale[alive], board_topic[alive]
        n_boards = int(alive.sum())
        self.lap("prune")

        pin_key = (pin_locale * (n_topics + 1) + pin_topic).astype(np.int32)
        board_key = (board_locale * (n_topics + 1) + board_topic).astype(np.int32)
        pin_degree = self.dense_counts("SELECT pin, count(*) FROM final GROUP BY pin", n_pins)
        board_degree = final_degree[alive]
        pin_offsets = _offsets(pin_degree)
        board_offsets = _offsets(board_degree)
        n_edges = int(pin_offsets[-1])
        n_buckets = max(1, -(-n_edges // self.bucket_edges))
        self.con.register(
            "board_map",
            pa.table(
                {
                    "board": np.flatnonzero(alive).astype(np.int32),
                    "nb": np.arange(n_boards, dtype=np.int32),
                    "key": board_key,
                    "locale": board_locale,
                    "bucket": _bucket_of(board_offsets, n_buckets),
                }
            ),
        )
        self.con.register(
            "pin_map",
            pa.table(
                {
                    "pin": np.arange(n_pins, dtype=np.int32),
                    "key": pin_key,
                    "locale": pin_locale,
                    "bucket": _bucket_of(pin_offsets, n_buckets),
                }
            ),
        )
        max_degree = int(max(pin_degree.max(initial=0), board_degree.max(initial=0)))
        n_keys, shift = (n_locales + 1) * (n_topics + 1), run_shift(max_degree)
        # Each side's edges as (node, neighbour's key, neighbour, neighbour's locale): each
        # list is sorted by (the neighbour's bias key, its dense id), as `_csr` does.
        sides = {
            "pin": (
                "SELECT f.pin AS node, m.key, m.nb AS neighbour, m.locale, p.bucket"
                f"{', f.created_at' if edge_times else ''} FROM final f "
                "JOIN board_map m USING (board) JOIN pin_map p USING (pin)",
                pin_offsets,
            ),
            "board": (
                "SELECT m.nb AS node, p.key, f.pin AS neighbour, p.locale, m.bucket "
                "FROM final f JOIN board_map m USING (board) JOIN pin_map p USING (pin)",
                board_offsets,
            ),
        }

        tmp = _new_sibling(out)
        try:
            locale_ends: dict[str, np.ndarray] = {}
            run_offsets: dict[str, np.ndarray] = {}
            stand_ins: dict[str, np.ndarray] = {}  # the arrays streamed to disk, for sizes
            checksums: dict[str, str] = {}
            for side, (query, offsets) in sides.items():
                buckets = self._buckets(side, query, n_buckets)
                locale_ends[side] = self._locale_ends(
                    [f"SELECT node, locale, count(*) FROM {b} GROUP BY ALL" for b in buckets],
                    offsets.shape[0] - 1,
                    n_locales,
                    max_degree,
                )
                checksums[f"{side}_adj"] = self._stream(
                    tmp / f"{side}_adj.npy",
                    [f"SELECT neighbour FROM {b} ORDER BY node, key, neighbour" for b in buckets],
                    n_edges,
                )
                stand_ins[f"{side}_adj"] = _stand_in(np.dtype(np.int32), n_edges)
                if side == "pin" and edge_times:
                    checksums[PIN_EDGE_TIMES] = self._stream(
                        tmp / f"{PIN_EDGE_TIMES}.npy",
                        [
                            f"SELECT created_at FROM {b} ORDER BY node, created_at NULLS LAST"
                            for b in buckets
                        ],
                        n_edges,
                        seconds=edges_name,
                    )
                    stand_ins[PIN_EDGE_TIMES] = _stand_in(np.dtype(np.float64), n_edges)
                # One row per run: a node's distinct neighbour keys, in list order.
                name = f"{side}_key_runs"
                run_offsets[side], stand_ins[name], checksums[name] = self._key_runs(
                    tmp / f"{name}.npy",
                    [
                        f"SELECT node, key, count(*) FROM {b} GROUP BY ALL ORDER BY ALL"
                        for b in buckets
                    ],
                    offsets,
                    n_keys,
                    shift,
                )
                shutil.rmtree(self.work / side, ignore_errors=True)
            self.lap("csr")
            arrays: dict[str, np.ndarray] = {
                "pin_offsets": pin_offsets,
                "board_offsets": board_offsets,
                "pin_locale": pin_locale,
                "pin_topic": pin_topic,
                "board_locale": board_locale,
                "board_topic": board_topic,
                "pin_key": pin_key,
                "board_key": board_key,
                "pin_locale_ends": locale_ends["pin"],
                "board_locale_ends": locale_ends["board"],
                "pin_run_offsets": run_offsets["pin"],
                "board_run_offsets": run_offsets["board"],
                "pin_quality": pin_quality,
                "pin_created_at": pin_created,
                **id_arrays(
                    "pin",
                    self.sql("SELECT pin_id FROM pin_dict ORDER BY pin")
                    .to_arrow_table()
                    .column(0)
                    .combine_chunks(),
                ),
                **id_arrays("board", board_ids),
            }
            for name, values in extra.items():
                arrays[PIN_COLUMN_PREFIX + name] = values
            manifest = assemble_manifest(
                arrays,
                stand_ins,
                vocab=vocab,
                schema=schema,
                pin_columns=sorted(extra),
                inputs={
                    "edges": edges_name,
                    "pins": None if pins is None else str(pins),
                    "boards": None if boards is None else str(boards),
                },
                options=self.options,
                source=source,
                stats=graph_stats(
                    input_edges,
                    input_edges - n_deduped,
                    n_boards_all - n_boards,
                    pin_offsets,
                    prune_stats,
                    pins_info,
                    boards_info,
                ),
            )
            manifest["build"]["engine"] = "duckdb"
            manifest["build"]["csr_buckets"] = n_buckets
            self.lap("assemble")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return write_graph(out, tmp, arrays, checksums, manifest, self.timings, self.lap, replace)

    def _edges(self, edges: Path) -> str:
        """The `raw` view over the edge files (with each row's position); the id type."""
        self.raw_columns = self._view("raw", edges, "edges", ("pin_id", "board_id"))
        types = dict(self.sql("SELECT column_name, column_type FROM (DESCRIBE raw)").fetchall())
        kinds = {
            column: _id_kind(types[column], self.files["raw"], column)
            for column in ("pin_id", "board_id")
        }
        if kinds["pin_id"] != kinds["board_id"]:
            raise DataError(
                f"{edges}: pin_id is {types['pin_id']} but board_id is "
                f"{types['board_id']}; ids must be all integers or all strings"
            )
        for column in ("pin_id", "board_id"):
            self._check_ids("raw", column, kinds[column])
        if kinds["pin_id"] == "int64":  # ids as int64, as the in-memory builder casts them
            self.con.execute(
                "CREATE OR REPLACE VIEW raw AS SELECT * REPLACE "
                "(CAST(pin_id AS BIGINT) AS pin_id, CAST(board_id AS BIGINT) AS "
                "board_id) FROM raw_files"
            )
        return kinds["pin_id"]

    def _view(self, view: str, path: Path, role: str, required: tuple[str, ...]) -> list[str]:
        """`view` over the role's files (Parquet, or CSV converted to Parquet), with `pos`;
        its data columns, checked for `required`."""
        if not path.exists():
            raise DataError(f"{path}: {role} file not found")
        files = table_files(path, role) if path.is_dir() else [path]
        parquet = [self._as_parquet(f, role, i) for i, f in enumerate(files)]
        self.files[view] = files
        self.names[view] = str(path)
        names = pa.table(
            {
                "filename": [str(p) for p in parquet],
                "file_index": np.arange(len(parquet), dtype=np.int64),
            }
        )
        self.con.register(f"{view}_names", names)
        listing = ", ".join(_quote(str(p)) for p in parquet)
        self.con.execute(
            f"CREATE OR REPLACE VIEW {view}_files AS SELECT r.* EXCLUDE (filename, "
            f"file_row_number), (n.file_index << {_FILE_SHIFT}) + r.file_row_number AS pos "
            f"FROM read_parquet([{listing}], filename = true, file_row_number = true) r "
            f"JOIN {view}_names n USING (filename)"
        )
        self.con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {view}_files")
        columns = [c for c in self.sql(f"SELECT * FROM {view} LIMIT 0").columns if c != "pos"]
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(
                f"{files[0]}: missing column(s) {', '.join(missing)} "
                f"(found: {', '.join(columns) or 'none'})"
            )
        return columns

    def _as_parquet(self, path: Path, role: str, index: int) -> Path:
        """Parquet files are read in place; a CSV/TSV file is converted batch by batch."""
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] in (".parquet", ".pq"):
            return path
        if ".csv" not in suffixes and ".tsv" not in suffixes:
            raise DataError(
                f"{path}: unknown {role} file format {path.suffix!r}; use .csv, "
                f".tsv, .parquet or .pq"
            )
        target = self.work / f"{role}-{index}.parquet"
        delimiter = "\t" if ".tsv" in suffixes else ","
        try:
            reader = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
            with pq.ParquetWriter(target, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read {role} file: {exc}") from exc
        return target

    def _where(self, view: str, pos: int) -> str:
        """'FILE, row N' for a row position of a view."""
        file = self.files[view][pos >> _FILE_SHIFT]
        row = (pos & ((1 << _FILE_SHIFT) - 1)) + 1
        line = f" (line {row + 1})" if file.suffix.lower() in (".csv", ".tsv") else ""
        return f"{file}, row {row}{line}"

    def _check_ids(self, view: str, column: str, kind: str) -> None:
        empty = f" OR {column} = ''" if kind == "string" else ""
        bad, first = self.row(
            f"SELECT count(*), min(pos) FROM {view} WHERE {column} IS NULL{empty}"
        )
        if bad:
            raise DataError(
                f"{self.names[view]}: column {column!r} has {bad} null or empty "
                f"id(s); first at {self._where(view, first)}"
            )
        if kind == "int64":
            big = self.row(
                f"SELECT min(pos) FROM {view} WHERE {column} > 9223372036854775807 "
                f"OR {column} < -9223372036854775808"
            )[0]
            if big is not None:
                raise DataError(
                    f"{self._where(view, big)}: column {column!r} has an id that does not fit int64"
                )

    def _dictionary(self, side: str) -> int:
        """`{side}_dict`: each id and its dense number, in order of first appearance."""
        self.con.execute(
            f"CREATE TABLE {side}_dict AS SELECT {side}_id, CAST(row_number() OVER "
            f"(ORDER BY first) - 1 AS INTEGER) AS {side} FROM (SELECT {side}_id, min(pos) "
            f"AS first FROM raw GROUP BY {side}_id)"
        )
        return int(self.row(f"SELECT count(*) FROM {side}_dict")[0])

    def _table_rows(
        self,
        role: str,
        path: str | Path,
        n: int,
        id_type: str,
    ) -> tuple[pa.Table, str, dict[str, Any]]:
        """The pins or boards table aligned to dense order (nulls where a node has no row),
        after the in-memory builder's checks; its name and its statistics."""
        side = role[:-1]
        view = f"{role}_src"
        columns = self._view(view, Path(path), role, (f"{side}_id",))
        name = str(path)
        types = dict(self.sql(f"SELECT column_name, column_type FROM (DESCRIBE {view})").fetchall())
        kind = _id_kind(types[f"{side}_id"], self.files[view], f"{side}_id")
        if kind != id_type:
            raise DataError(
                f"{name}: column '{side}_id' has {kind} ids but the edges have "
                f"{id_type} ids; both files must use the same id type"
            )
        self._check_ids(view, f"{side}_id", kind)
        cast = "BIGINT" if kind == "int64" else "VARCHAR"
        self.con.execute(
            f"CREATE OR REPLACE VIEW {view}_ids AS SELECT * REPLACE "
            f"(CAST({side}_id AS {cast}) AS {side}_id) FROM {view}"
        )
        repeat = self.one(
            f"SELECT s.{side}_id, max(s.pos) FROM {view}_ids s JOIN {side}_dict USING "
            f"({side}_id) GROUP BY s.{side}_id HAVING count(*) > 1 ORDER BY 2 LIMIT 1"
        )
        if repeat is not None:
            raise DataError(
                f"{self._where(view, repeat[1])}: duplicate {side}_id "
                f"{repeat[0]!r}; each id may appear once"
            )
        without = int(
            self.row(f"SELECT count(*) FROM {view}_ids ANTI JOIN {side}_dict USING ({side}_id)")[0]
        )
        selected = ", ".join(f"s.{_ident(c)}" for c in columns if c != f"{side}_id")
        table = self.sql(
            f"SELECT {selected or 'NULL AS _none'} FROM {side}_dict d LEFT JOIN {view}_ids s "
            f"USING ({side}_id) ORDER BY d.{side}"
        ).to_arrow_table()
        if not selected:
            table = table.drop_columns(["_none"])
        assert table.num_rows == n
        return table, name, {f"{role}_table_rows_without_edges": without}

    def _pin_features(
        self, pins: str | Path | None, n_pins: int, id_type: str, schema: dict[str, Any]
    ) -> tuple[Any, ...]:
        if pins is None:
            return (
                *pin_columns(
                    None, "", np.zeros(0, np.int64), np.zeros(0, np.int64), n_pins, schema
                ),
                {},
            )
        table, name, info = self._table_rows("pins", pins, n_pins, id_type)
        every = np.arange(n_pins)
        return (*pin_columns(table, name, every, every, n_pins, schema), info)

    def _board_features(
        self, boards: str | Path | None, n_boards: int, id_type: str, schema: dict[str, Any]
    ) -> tuple[dict[str, np.ndarray], dict]:
        if boards is None:
            return board_columns(
                None, "", np.zeros(0, np.int64), np.zeros(0, np.int64), n_boards, schema
            ), {}
        table, name, info = self._table_rows("boards", boards, n_boards, id_type)
        every = np.arange(n_boards)
        return board_columns(table, name, every, every, n_boards, schema), info

    def _fill_created_from_edges(self, pin_created: np.ndarray, edges_name: str) -> None:
        """Where the pins table gives no created_at, the pin's earliest edge's (converted by
        the in-memory builder's own rules: the minimum commutes with them)."""
        table = self.sql(
            "SELECT min(r.created_at) FROM raw r JOIN pin_dict d "
            "USING (pin_id) GROUP BY d.pin ORDER BY d.pin"
        ).to_arrow_table()
        earliest = _seconds(table.column(0), edges_name, "created_at")
        missing = np.isnan(pin_created)
        pin_created[missing] = earliest[missing]

    def _board_value_counts(self, column: str, n_values: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted codes `board * n_values + value` over edges whose pin has a known value,
        and their counts (`_board_topic_counts`, `_dominant`)."""
        table = self.sql(
            f"SELECT e.board::BIGINT * {max(n_values, 1)} + c.{column} AS code, count(*) "
            f"FROM e JOIN pin_codes c USING (pin) WHERE c.{column} < {n_values} "
            f"GROUP BY 1 ORDER BY 1"
        ).to_arrow_table()
        return table.column(0).to_numpy(), table.column(1).to_numpy()

    def _given_or_dominant(self, given: np.ndarray, column: str, n_values: int) -> np.ndarray:
        if not (given >= n_values).any():
            return given
        return _fill_dominant(given, *self._board_value_counts(column, n_values), n_values)

    def _prune_pins(
        self,
        dropped: np.ndarray,
        pin_topic: np.ndarray,
        n_pins: int,
        n_topics: int,
        codes: np.ndarray,
        counts: np.ndarray,
        stats: dict[str, Any],
    ) -> None:
        """`final`: the edges the board rules keep, less what the pin rule removes (a heavy
        pin keeps its boards whose pins most share its topic, as `_prune` does)."""
        self.con.register("dropped", pa.table({"board": np.flatnonzero(dropped).astype(np.int32)}))
        self.con.execute("CREATE TABLE kept AS SELECT * FROM e ANTI JOIN dropped USING (board)")
        threshold = self.options.pin_degree_threshold
        if threshold is None:
            self.con.execute("ALTER TABLE kept RENAME TO final")
            return
        degree = self.dense_counts("SELECT pin, count(*) FROM kept GROUP BY pin", n_pins)
        heavy = degree > threshold
        topical = heavy & (pin_topic < n_topics)
        heavy_pins = np.flatnonzero(topical)
        self.con.register(
            "heavy",
            pa.table(
                {
                    "pin": heavy_pins.astype(np.int32),
                    "topic": pin_topic[heavy_pins],
                    "degree": degree[heavy_pins],
                }
            ),
        )
        per = max(n_topics, 1)
        self.con.register(
            "board_topic",
            pa.table(
                {
                    "board": (codes // per).astype(np.int32),
                    "topic": (codes % per).astype(np.int32),
                    "n": counts,
                }
            ),
        )
        board_total = np.bincount(codes // per, weights=counts, minlength=dropped.shape[0])
        self.con.register(
            "board_total",
            pa.table({"board": np.arange(dropped.shape[0], dtype=np.int32), "total": board_total}),
        )
        self.con.execute(
            "CREATE TABLE removed AS SELECT pin, board FROM ("
            "  SELECT k.pin, k.board, h.degree, row_number() OVER (PARTITION BY k.pin ORDER BY "
            "    CAST(coalesce(t.n, 0) AS DOUBLE) / greatest(b.total, 1.0) DESC, k.board) - 1 "
            "    AS rank"
            "  FROM kept k JOIN heavy h USING (pin) JOIN board_total b USING (board)"
            "  LEFT JOIN board_topic t ON t.board = k.board AND t.topic = h.topic)"
            " WHERE rank >= ceil(CAST(? AS DOUBLE) * degree)",
            [self.options.pin_keep_fraction],
        )
        self.con.execute(
            "CREATE TABLE final AS SELECT * FROM kept ANTI JOIN removed USING (pin, board)"
        )
        stats["pin_degree"] = {
            "threshold": threshold,
            "keep_fraction": self.options.pin_keep_fraction,
            "pins_pruned": int(topical.sum()),
            "pins_skipped_without_topic": int((heavy & ~topical).sum()),
            "edges_removed": int(self.row("SELECT count(*) FROM removed")[0]),
        }

    def _batches(self, queries: list[str]) -> Iterator[pa.RecordBatch]:
        """The rows of each query in turn (one per bucket), in batches."""
        for query in queries:
            yield from self.sql(query).to_arrow_reader(_BATCH_ROWS)

    def _buckets(self, side: str, query: str, n_buckets: int) -> list[str]:
        """What each bucket's queries read, in node order: with one bucket, a view over
        `query`; with more, `query`'s rows written once as Parquet partitioned by the
        `bucket` column (a range of nodes with about `bucket_edges` edges), one directory
        each. Each bucket then sorts and aggregates within the memory limit, so the time
        grows with the edges, where one sort of them all spills into an external merge sort
        that grows faster."""
        if n_buckets == 1:
            self.con.execute(f"CREATE OR REPLACE VIEW {side}_edges AS {query}")
            return [f"{side}_edges"]
        directory = self.work / side
        self.con.execute(
            f"COPY ({query}) TO {_quote(str(directory))} (FORMAT parquet, PARTITION_BY (bucket))"
        )
        return [
            f"read_parquet({_quote(str(d / '*.parquet'))})"
            for d in sorted(directory.glob("bucket=*"), key=lambda d: int(d.name[7:]))
        ]

    def _locale_ends(
        self, queries: list[str], n_rows: int, n_locales: int, max_degree: int
    ) -> np.ndarray:
        counts = np.zeros((n_rows, n_locales + 1), dtype=np.uint32)
        for batch in self._batches(queries):  # up to nodes x locales
            counts[batch.column(0).to_numpy(), batch.column(1).to_numpy()] = batch.column(
                2
            ).to_numpy()
        return locale_ends_from_counts(counts, max_degree)

    def _key_runs(
        self, path: Path, queries: list[str], offsets: np.ndarray, n_keys: int, shift: int
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """The key-run index (`key_runs_from_counts`) from (node, neighbour key, count) rows
        in (node, key) order, one batch at a time: a run's end is the running edge count
        less the node's CSR offset. The runs go to a scratch file (their number is known only
        at the end), then after the `.npy` header into `path`. Returns the run offsets, a
        stand-in of the runs (`_stand_in`) and the file's checksum."""
        per_node = np.zeros(offsets.shape[0] - 1, dtype=np.int64)
        scratch = self.work / f"{path.stem}.raw"
        before = 0  # edges in the batches before this one
        with open(scratch, "wb") as f:
            for batch in self._batches(queries):
                if not batch.num_rows:
                    continue
                nodes, keys, counts = (column.to_numpy() for column in batch.columns)
                ends = before + np.cumsum(counts, dtype=np.int64)
                before = int(ends[-1])
                f.write(encode_runs(keys, ends - offsets[nodes], n_keys, shift).tobytes())
                first = np.flatnonzero(np.r_[True, nodes[1:] != nodes[:-1]])
                per_node[nodes[first]] += np.diff(np.r_[first, nodes.shape[0]])
        if before != offsets[-1]:
            raise DataError(
                f"{path}: runs of {before} of {offsets[-1]} edges; the build is inconsistent"
            )
        n_runs = int(per_node.sum())
        dtype = encode_runs(np.zeros(0, np.int64), np.zeros(0, np.int64), n_keys, shift).dtype
        with open(scratch, "rb") as source:
            checksum = _write_npy(path, dtype, n_runs, _file_chunks(source))
        scratch.unlink()
        return _offsets(per_node), _stand_in(dtype, n_runs), checksum

    def _stream(self, path: Path, queries: list[str], n: int, seconds: str | None = None) -> str:
        """Write the queries' int32 column into `path` as an `.npy` file, batch by batch (the
        same bytes `np.save` writes); returns its checksum. With `seconds` (the edges' name,
        for errors) the column is `created_at`, written as float64 epoch seconds."""

        def chunks() -> Iterator[bytes]:
            for batch in self._batches(queries):
                if seconds is None:
                    values = batch.column(0).to_numpy().astype(np.int32, copy=False)
                else:
                    values = _seconds(pa.chunked_array([batch.column(0)]), seconds, "created_at")
                yield values.tobytes()

        dtype = np.dtype(np.int32 if seconds is None else np.float64)
        return _write_npy(path, dtype, n, chunks())


def _stand_in(dtype: np.dtype, n: int) -> np.ndarray:
    """What `assemble_manifest` reads of an array written to disk as it was made: its dtype
    and shape, without its memory."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=(n,), strides=(0,))


def _write_npy(path: Path, dtype: np.dtype, n: int, chunks: Iterator[bytes]) -> str:
    """An `.npy` file of `n` values of `dtype` from their bytes in chunks, never all in
    memory (the same bytes `np.save` writes); read-only; returns its checksum."""
    header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n,))
    offset = header.offset
    del header  # the file now has its header and its full (sparse) size
    expected = n * dtype.itemsize
    written = 0
    with open(path, "r+b") as f:
        f.seek(offset)
        for chunk in chunks:
            f.write(chunk)
            written += len(chunk)
    if written != expected:
        raise DataError(f"{path}: wrote {written} of {expected} bytes; the build is inconsistent")
    path.chmod(0o444)
    return array_checksum(path)


def _file_chunks(f: BinaryIO) -> Iterator[bytes]:
    """A file's bytes in small pieces (copied from a scratch file, not read whole)."""
    while chunk := f.read(1 << 16):
        yield chunk


def _fill_dominant(
    given: np.ndarray, codes: np.ndarray, counts: np.ndarray, n_values: int
) -> np.ndarray:
    """A board's own value where given, else the most frequent of its pins' (`_dominant`)."""
    missing = given >= n_values
    if not missing.any():
        return given
    dominant = np.full(given.shape[0], n_values, dtype=np.int32)
    if codes.size:
        dominant_from_counts(codes, counts, n_values, dominant)
    return np.where(missing, dominant, given).astype(np.int32)


def _limit_bytes(con: Any) -> int:
    """DuckDB's memory limit in bytes, as it parsed the setting."""
    text = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    number, _, unit = text.partition(" ")
    if unit not in _UNITS:
        raise ConfigError(f"DuckDB's memory limit {text!r}: unknown unit")
    return int(float(number) * _UNITS[unit])


def _bucket_of(offsets: np.ndarray, n_buckets: int) -> np.ndarray:
    """Each node's bucket: `n_buckets` ranges of nodes in id order, with about as many edges
    each (a node's edges all in one), from the CSR offsets."""
    return (offsets[:-1] * n_buckets // max(int(offsets[-1]), 1)).astype(np.int32)


def _offsets(degree: np.ndarray) -> np.ndarray:
    offsets = np.zeros(degree.shape[0] + 1, dtype=np.int64)
    np.cumsum(degree, out=offsets[1:])
    return offsets


def _id_kind(duck_type: str, files: list[Path], column: str) -> str:
    if duck_type in _INTEGER_TYPES:
        return "int64"
    if duck_type == "VARCHAR":
        return "string"
    raise DataError(
        f"{files[0]}: column {column!r} has type {duck_type}; ids must be integers or strings"
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
