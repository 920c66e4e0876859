"""Build a graph directory from edge, pin and board tables (CSV or Parquet, read with pyarrow).

Steps, each dense and vectorised so a 20M-edge build stays well under a minute:
read + validate -> dense ids (first-appearance order) -> pin/board features and vocabularies ->
collapse duplicate edges -> Pixie pruning -> CSR both ways, each list sorted by the neighbour's
bias key -> `.npy` arrays + manifest.json (counts, vocab, schema, options, stats, checksums),
written to a temporary directory and renamed into place so a reader never sees half a graph.

A published graph is never written again: its files are read-only, a rebuild into the same
path needs `replace=True` and swaps in a new directory (the old files are unlinked, never
truncated, so a process still mapping them keeps its pages), and a directory a running server
holds (`GraphLease`) is not replaced at all (docs/serving.md, "Publishing a graph").
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from walkrank.errors import ConfigError, DataError
from walkrank.graph.store import (
    FORMAT_VERSION,
    MANIFEST,
    PIN_COLUMN_PREFIX,
    PIN_EDGE_TIMES,
    array_checksum,
    exclusive_graph_lock,
)

#: What `build_graph` accepts for a table: a file path, a pyarrow Table, or named columns.
TableSource: TypeAlias = str | Path | pa.Table | Mapping[str, Any]

CATEGORICAL_COLUMNS = ("locale", "topic")


@dataclass(frozen=True)
class PruneOptions:
    """Pixie build-time pruning (Eksombatchai et al. 2018, graph pruning); None switches one off.

    max_board_entropy: drop boards whose topic distribution over their pins has a normalised
        entropy (H / log T, in [0, 1]) above this: diverse boards make walks drift.
    max_board_degree: drop boards with more pins than this.
    pin_degree_threshold: for pins with more boards than this, keep only the
        ceil(pin_keep_fraction * degree) boards whose pins most often share the pin's topic.
    """

    max_board_entropy: float | None = None
    max_board_degree: int | None = None
    pin_degree_threshold: int | None = None
    pin_keep_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.max_board_entropy is not None and not 0.0 <= self.max_board_entropy <= 1.0:
            raise ConfigError(
                f"max_board_entropy must be in [0, 1] (normalised entropy), "
                f"got {self.max_board_entropy}"
            )
        if self.max_board_degree is not None and self.max_board_degree < 1:
            raise ConfigError(f"max_board_degree must be >= 1, got {self.max_board_degree}")
        if self.pin_degree_threshold is not None and self.pin_degree_threshold < 1:
            raise ConfigError(f"pin_degree_threshold must be >= 1, got {self.pin_degree_threshold}")
        if not 0.0 < self.pin_keep_fraction <= 1.0:
            raise ConfigError(f"pin_keep_fraction must be in (0, 1], got {self.pin_keep_fraction}")


# ---------------------------------------------------------------------------------------------
# reading and validation


def read_table(source: TableSource, role: str) -> tuple[pa.Table, str]:
    """Read one input as a pyarrow Table; returns (table, name used in error messages)."""
    if isinstance(source, pa.Table):
        table, name = source, f"<{role} table>"
    elif isinstance(source, Mapping):
        name = f"<{role} table>"
        try:
            table = pa.table(
                {k: np.asarray(v) if not isinstance(v, pa.Array) else v for k, v in source.items()}
            )
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise DataError(f"{name}: cannot make a table from the given columns: {exc}") from exc
    else:
        path = Path(source)
        name = str(path)
        if path.is_dir():
            table = _read_directory(path, role)
        elif not path.is_file():
            raise DataError(f"{path}: {role} file not found")
        else:
            table = _read_file(path, role)
    if table.num_rows == 0:
        raise DataError(f"{name}: {role} table is empty (no rows)")
    return table, name


def _read_file(path: Path, role: str) -> pa.Table:
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if suffixes and suffixes[-1] in (".parquet", ".pq"):
            return pq.read_table(path)
        if ".csv" in suffixes or ".tsv" in suffixes:
            delimiter = "\t" if ".tsv" in suffixes else ","
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read {role} file: {exc}") from exc
    raise DataError(
        f"{path}: unknown {role} file format {path.suffix!r}; use .csv, .tsv, .parquet or .pq"
    )


def table_files(directory: Path, role: str) -> list[Path]:
    """The data files of a directory (a warehouse export: Parquet or CSV partitions), in name
    order, which is the row order of the table they make; names starting with '.' or '_'
    (`_SUCCESS`, `.crc`) are not data."""
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts)
    )
    if not files:
        raise DataError(f"{directory}: no {role} files in the directory")
    return files


def _read_directory(directory: Path, role: str) -> pa.Table:
    files = table_files(directory, role)
    tables = [_read_file(path, role) for path in files]
    first = tables[0].schema.remove_metadata()
    for path, table in zip(files, tables, strict=True):
        if table.schema.remove_metadata() != first:
            raise DataError(
                f"{path}: its columns ({', '.join(table.schema.names)}, with their "
                f"types) differ from those of {files[0].name} in {directory}"
            )
    return pa.concat_tables(tables)


def _require_columns(table: pa.Table, name: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(table.column_names) or 'none'})"
        )


def _row(i: int, name: str) -> str:
    line = f" (line {i + 2})" if name.lower().endswith((".csv", ".tsv")) else ""
    return f"row {i + 1}{line}"


def _id_column(table: pa.Table, name: str, column: str) -> pa.ChunkedArray:
    """An id column as int64 or string, with nulls and empty strings rejected by row."""
    ids = table.column(column)
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(ids.type.value_type)
    if pa.types.is_integer(ids.type):
        try:
            ids = ids.cast(pa.int64())
        except pa.ArrowInvalid as exc:
            raise DataError(f"{name}: column {column!r} has ids that do not fit int64") from exc
        bad = pc.is_null(ids)
    elif pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        ids = ids.cast(pa.string())
        bad = pc.or_kleene(pc.is_null(ids), pc.equal(ids, ""))
    elif pa.types.is_floating(ids.type):
        raise DataError(f"{name}: column {column!r} {_float_id_hint(ids)}")
    else:
        raise DataError(
            f"{name}: column {column!r} has type {ids.type}; ids must be integers or strings"
        )
    bad_np = bad.to_numpy(zero_copy_only=False).astype(bool, copy=False)
    if bad_np.any():
        i = int(np.argmax(bad_np))
        raise DataError(
            f"{name}: column {column!r} has {int(bad_np.sum())} null or empty id(s); "
            f"first at {_row(i, name)}"
        )
    return ids


def _float_id_hint(ids: pa.ChunkedArray) -> str:
    """Why float ids are refused, and the fix: they are usually integers read through a
    float column (a CSV or pandas column with a missing value becomes float64)."""
    values = ids.drop_null().to_numpy(zero_copy_only=False)
    if values.size and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return (
            f"has float ids ({float(values[0])!r}, ...) that are whole numbers: cast the column to "
            "int64 before building (a column with an empty cell is read as float), or write "
            "the ids as strings"
        )
    return f"has type {ids.type}; ids must be integers or strings"


def _check_id_types(
    ids: pa.ChunkedArray, edge_ids: pa.Array, name: str, column: str, edges_name: str
) -> None:
    if ids.type != edge_ids.type:
        raise DataError(
            f"{name}: column {column!r} has {ids.type} ids but {edges_name} has {edge_ids.type} "
            f"ids; both files must use the same id type"
        )


def _seconds(column: pa.ChunkedArray, name: str, col: str) -> np.ndarray:
    """Epoch seconds (float64, NaN when null) from numeric, timestamp or date columns."""
    t = column.type
    if pa.types.is_timestamp(t):
        per_second = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[t.unit]
        raw = column.cast(pa.timestamp(t.unit, tz=t.tz)).cast(pa.int64())
        return _float(raw) / per_second
    if pa.types.is_date(t):
        return _float(column.cast(pa.date32()).cast(pa.int32())) * 86400.0
    if _is_numeric(t):
        return _float(column)
    raise DataError(
        f"{name}: column {col!r} has type {t}; created_at must be epoch seconds or a timestamp"
    )


def _is_numeric(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
    )


def _float(column: pa.ChunkedArray) -> np.ndarray:
    # Unsafe: an integer past 2**53 (a nanosecond timestamp, as CSV inference and Spark's
    # Parquet give them) rounds to the nearest float instead of failing the build.
    return np.asarray(
        column.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False), dtype=np.float64
    )


def _strings(column: pa.ChunkedArray, name: str, col: str) -> np.ndarray:
    """A categorical column as an object array of str (None when null)."""
    t = column.type
    if pa.types.is_dictionary(t):
        column = column.cast(t.value_type)
        t = column.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise DataError(
            f"{name}: column {col!r} has type {t}; {col} is categorical (strings expected)"
        )
    values = column.cast(pa.string())
    values = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
    # Through the dictionary: one str object per distinct name, shared by every row that
    # has it (a str per row costs ~60 bytes, ~1 GB for two columns of 10M pins).
    encoded = values.combine_chunks().dictionary_encode()
    names = np.array([*encoded.dictionary.to_pylist(), None], dtype=object)
    return names[encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)]


def _encode_ids(ids: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dense int32 codes in first-appearance order (hash based, no sort) and the id dictionary."""
    encoded = pc.dictionary_encode(ids)
    dictionary = encoded.chunk(0).dictionary if encoded.num_chunks else pa.array([], ids.type)
    codes = np.concatenate(
        [c.indices.to_numpy(zero_copy_only=False) for c in encoded.chunks]
    ).astype(np.int32, copy=False)
    return codes, dictionary


def _rows_to_dense(
    ids: pa.ChunkedArray, dictionary: pa.Array, name: str, column: str
) -> np.ndarray:
    """Dense id of each row (-1 for ids not in the edges); duplicates rejected by row."""
    dense = pc.index_in(ids, value_set=dictionary).to_numpy(zero_copy_only=False)
    dense = np.where(np.isnan(dense.astype(np.float64)), -1, dense).astype(np.int64)
    known = np.flatnonzero(dense >= 0)
    order = np.argsort(dense[known], kind="stable")
    sorted_dense = dense[known][order]
    repeated = np.flatnonzero(sorted_dense[1:] == sorted_dense[:-1])
    if repeated.size:
        i = int(known[order[repeated[0] + 1]])
        raise DataError(
            f"{name}: duplicate {column} {ids[i].as_py()!r} at {_row(i, name)}; "
            f"each id may appear once"
        )
    return dense


# ---------------------------------------------------------------------------------------------
# pruning


def sorted_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct int64 values and their counts.

    Sort-and-compare: on millions of int64 codes numpy 2.4's np.unique takes a hash path
    that is orders of magnitude slower than np.sort.
    """
    ordered = np.sort(values)
    if ordered.shape[0] == 0:
        return ordered, np.zeros(0, dtype=np.int64)
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    counts = np.diff(np.r_[first, ordered.shape[0]])
    return ordered[first], counts


def _board_topic_counts(
    pins: np.ndarray, boards: np.ndarray, pin_topic: np.ndarray, n_topics: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse (board, topic, count) over edges whose pin has a known topic, sorted by code."""
    topics = pin_topic[pins]
    known = topics < n_topics
    code = boards[known].astype(np.int64) * max(n_topics, 1) + topics[known]
    codes, counts = sorted_unique(code)
    return codes, counts, known


def _normalised_entropy(
    codes: np.ndarray, counts: np.ndarray, n_boards: int, n_topics: int
) -> np.ndarray:
    board = codes // max(n_topics, 1)
    total = np.bincount(board, weights=counts, minlength=n_boards)
    share = counts / total[board]
    entropy = np.bincount(board, weights=-share * np.log(share), minlength=n_boards)
    if n_topics < 2:
        return np.zeros(n_boards)
    return entropy / math.log(n_topics)


def _dominant(
    pins: np.ndarray, boards: np.ndarray, pin_values: np.ndarray, n_values: int, n_boards: int
) -> np.ndarray:
    """Most frequent known pin value per board (ties -> smallest code); n_values if none."""
    result = np.full(n_boards, n_values, dtype=np.int32)
    values = pin_values[pins]
    known = values < n_values
    if not known.any():
        return result
    code = boards[known].astype(np.int64) * n_values + values[known]
    return dominant_from_counts(*sorted_unique(code), n_values, result)


def dominant_from_counts(
    codes: np.ndarray, counts: np.ndarray, n_values: int, result: np.ndarray
) -> np.ndarray:
    """Fill `result[board]` with the value of the largest count per board (ties -> smallest
    code) from sorted distinct codes `board * n_values + value` and their counts."""
    board, value = codes // n_values, codes % n_values
    order = np.lexsort((value, -counts, board))
    first = order[np.r_[True, board[order][1:] != board[order][:-1]]]
    result[board[first]] = value[first]
    return result


def _given_or_dominant(
    given: np.ndarray, pins: np.ndarray, boards: np.ndarray, pin_values: np.ndarray, n_values: int
) -> np.ndarray:
    """A board's own value where the boards table gives one, else its pins' dominant value."""
    missing = given >= n_values
    if not missing.any():
        return given
    dominant = _dominant(pins, boards, pin_values, n_values, given.shape[0])
    return np.where(missing, dominant, given).astype(np.int32)


def board_rules(
    codes: np.ndarray | None,
    counts: np.ndarray | None,
    board_degree: np.ndarray,
    n_topics: int,
    options: PruneOptions,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The boards the entropy and degree rules drop, and their statistics, from each board's
    degree and its (board, topic) counts (`_board_topic_counts`)."""
    n_boards = board_degree.shape[0]
    stats: dict[str, Any] = {}
    dropped = np.zeros(n_boards, dtype=bool)
    if options.max_board_entropy is not None:
        assert codes is not None and counts is not None  # counted whenever this rule is on
        entropy = _normalised_entropy(codes, counts, n_boards, n_topics)
        diverse = entropy > options.max_board_entropy
        stats["board_entropy"] = {
            "threshold": options.max_board_entropy,
            "boards_dropped": int(diverse.sum()),
            "edges_removed": int(board_degree[diverse].sum()),
            "entropy_median": float(np.median(entropy)) if n_boards else 0.0,
        }
        dropped |= diverse
    if options.max_board_degree is not None:
        large = board_degree > options.max_board_degree
        stats["board_degree"] = {
            "max_degree": options.max_board_degree,
            "boards_dropped": int(large.sum()),
            "edges_removed": int(board_degree[large & ~dropped].sum()),
        }
        dropped |= large
    return dropped, stats


def _prune(
    pins: np.ndarray,
    boards: np.ndarray,
    pin_topic: np.ndarray,
    n_topics: int,
    n_boards: int,
    options: PruneOptions,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Keep-mask over (deduplicated) edges and statistics for every pruning rule applied."""
    codes = counts = None
    if options.max_board_entropy is not None or options.pin_degree_threshold:
        codes, counts, _ = _board_topic_counts(pins, boards, pin_topic, n_topics)
    dropped, stats = board_rules(
        codes, counts, np.bincount(boards, minlength=n_boards), n_topics, options
    )
    keep = ~dropped[boards]

    if options.pin_degree_threshold is not None:
        kept = np.flatnonzero(keep)
        pin_degree = np.bincount(pins[kept], minlength=pin_topic.shape[0])
        heavy = pin_degree > options.pin_degree_threshold
        topical = heavy & (pin_topic < n_topics)
        candidates = kept[topical[pins[kept]]]
        assert codes is not None and counts is not None  # counted above for this rule
        p, b = pins[candidates], boards[candidates]
        # Closeness of a board to the pin: the share of the board's pins with the pin's topic.
        lookup = b.astype(np.int64) * max(n_topics, 1) + pin_topic[p]
        pos = np.minimum(np.searchsorted(codes, lookup), max(codes.shape[0] - 1, 0))
        hits = np.where(codes[pos] == lookup, counts[pos], 0) if codes.size else np.zeros(0)
        board_total = np.bincount(codes // max(n_topics, 1), weights=counts, minlength=n_boards)
        closeness = hits / np.maximum(board_total[b], 1)
        order = np.lexsort((b, -closeness, p))
        p_sorted = p[order]
        starts = np.r_[0, np.flatnonzero(p_sorted[1:] != p_sorted[:-1]) + 1]
        group_size = np.diff(np.r_[starts, p_sorted.shape[0]])
        rank = np.arange(p_sorted.shape[0]) - np.repeat(starts, group_size)
        budget = np.ceil(options.pin_keep_fraction * pin_degree[p_sorted]).astype(np.int64)
        removed_idx = candidates[order[rank >= budget]]
        stats["pin_degree"] = {
            "threshold": options.pin_degree_threshold,
            "keep_fraction": options.pin_keep_fraction,
            "pins_pruned": int(topical.sum()),
            "pins_skipped_without_topic": int((heavy & ~topical).sum()),
            "edges_removed": int(removed_idx.shape[0]),
        }
        keep[removed_idx] = False
    return keep, stats


# ---------------------------------------------------------------------------------------------
# CSR


def _csr(
    rows: np.ndarray, cols: np.ndarray, col_key: np.ndarray, n_rows: int, n_keys: int
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (int64) and neighbours (int32), each list sorted by (key, neighbour id).

    Callers pass edges already sorted by neighbour id within each row (or fully), so a stable
    sort on (row, key) keeps neighbour ids ascending inside each key slice.
    """
    sort_key = rows.astype(np.int64) * n_keys + col_key[cols]
    order = np.argsort(sort_key, kind="stable")
    adj = cols[order].astype(np.int32, copy=False)
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=offsets[1:])
    return offsets, adj


def _locale_ends(
    rows: np.ndarray,
    cols: np.ndarray,
    col_locale: np.ndarray,
    n_rows: int,
    n_locales: int,
    max_degree: int,
) -> np.ndarray:
    """`[row, l]` = where locale l's neighbours end in the row's (locale-sorted) list.

    Relative to the row's offset, so uint16 when every list is shorter than 65,536. A
    locale-biased walk step reads its slice from here instead of binary-searching the list;
    the "missing locale" slice (code `n_locales`) runs to the end of the list and needs no
    column.
    """
    counts = np.bincount(
        rows.astype(np.int64) * (n_locales + 1) + col_locale[cols],
        minlength=n_rows * (n_locales + 1),
    ).reshape(n_rows, n_locales + 1)
    return locale_ends_from_counts(counts, max_degree)


def locale_ends_from_counts(counts: np.ndarray, max_degree: int) -> np.ndarray:
    """The locale index from neighbour counts per (row, locale code), the last column being
    the 'missing' locale."""
    dtype = np.uint16 if max_degree <= np.iinfo(np.uint16).max else np.uint32
    # Summed in the final dtype (exact: no end passes max_degree), not in a uint64 copy.
    return np.cumsum(counts[:, :-1], axis=1, dtype=dtype)


def run_shift(max_degree: int) -> int:
    """Bits below the key in a key run: enough for the end of the longest list."""
    return max(1, int(max_degree).bit_length())


def key_runs_from_counts(
    rows: np.ndarray, keys: np.ndarray, counts: np.ndarray, n_rows: int, n_keys: int, shift: int
) -> tuple[np.ndarray, np.ndarray]:
    """The key-run index from neighbour counts per (row, bias key), sorted by (row, key).

    A row's runs are its distinct neighbour keys in list order, each stored as
    `key << shift | where the key's neighbours end in the list`, so a topic-biased step finds
    its slice in a few runs instead of binary-searching the list (a dependent cache miss per
    probe). Returns `run_offsets` (int64, a row's runs are `runs[run_offsets[r]:
    run_offsets[r + 1]]`) and the runs: uint32 when key and end fit, else uint64; the dtype
    depends only on `n_keys` and `shift`, so every builder writes the same bytes.
    """
    rows = np.asarray(rows, np.int64)
    counts = np.asarray(counts, np.int64)
    run_offsets = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=run_offsets[1:])
    ends = np.cumsum(counts)
    row_base = np.zeros(n_rows + 1, np.int64)
    np.cumsum(
        np.bincount(rows, weights=counts, minlength=n_rows).astype(np.int64), out=row_base[1:]
    )
    return run_offsets, encode_runs(keys, ends - row_base[rows], n_keys, shift)


def encode_runs(keys: np.ndarray, ends: np.ndarray, n_keys: int, shift: int) -> np.ndarray:
    """Key runs `key << shift | end` (`end`: where the key's neighbours end in the row's
    list), uint32 when key and end fit, else uint64: the dtype depends only on `n_keys` and
    `shift`, so every builder (and every batch of a streamed build) writes the same bytes."""
    bits = max(n_keys - 1, 0).bit_length() + shift
    dtype = np.uint32 if bits <= 32 else np.uint64
    return ((np.asarray(keys, np.int64) << shift) | ends).astype(dtype)


def _key_runs(
    offsets: np.ndarray, adj: np.ndarray, col_key: np.ndarray, n_keys: int, shift: int
) -> tuple[np.ndarray, np.ndarray]:
    """The key-run index of a CSR whose lists are sorted by the neighbours' keys."""
    degree = np.diff(offsets)
    rows = np.repeat(np.arange(degree.shape[0], dtype=np.int32), degree)
    keys = col_key[adj]
    starts_run = np.ones(adj.shape[0], dtype=bool)
    starts_run[1:] = (keys[1:] != keys[:-1]) | (rows[1:] != rows[:-1])
    starts = np.flatnonzero(starts_run)
    counts = np.diff(np.append(starts, adj.shape[0]))
    return key_runs_from_counts(rows[starts], keys[starts], counts, degree.shape[0], n_keys, shift)


# ---------------------------------------------------------------------------------------------
# build


def build_graph(
    out: str | Path,
    edges: TableSource,
    pins: TableSource | None = None,
    boards: TableSource | None = None,
    *,
    options: PruneOptions | None = None,
    source: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Build a graph directory at `out` and return its manifest.

    `source` is recorded verbatim in the manifest (e.g. the synthetic preset and seed) so a
    cache can tell whether an existing directory was built from the same inputs. An existing
    graph at `out` is replaced only with `replace=True`, and never while a server holds it.
    """
    out = Path(out)
    _check_target(out, replace)  # before the work, so a refused build costs nothing
    options = options or PruneOptions()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(step: str) -> None:
        timings[step] = round(time.perf_counter() - started - sum(timings.values()), 3)

    edge_table, edges_name = read_table(edges, "edges")
    _require_columns(edge_table, edges_name, ("pin_id", "board_id"))
    pin_ids_col = _id_column(edge_table, edges_name, "pin_id")
    board_ids_col = _id_column(edge_table, edges_name, "board_id")
    raw_pins, pin_dict = _encode_ids(pin_ids_col)
    raw_boards, board_dict = _encode_ids(board_ids_col)
    n_pins, n_boards_all = len(pin_dict), len(board_dict)
    edge_created = None
    if "created_at" in edge_table.column_names:
        edge_created = _seconds(edge_table.column("created_at"), edges_name, "created_at")
    input_edges = edge_table.num_rows
    del edge_table, pin_ids_col, board_ids_col
    lap("read_edges")

    schema: dict[str, Any] = {"pin_id": str(pin_dict.type), "board_id": str(board_dict.type)}
    pin_cat, pin_quality, pin_created, pin_columns, pins_info = _pin_features(
        pins, pin_dict, n_pins, edges_name, schema
    )
    board_cat, boards_info = _board_features(boards, board_dict, n_boards_all, edges_name, schema)
    if edge_created is not None:
        from_edges = np.full(n_pins, np.nan)
        np.fmin.at(from_edges, raw_pins, edge_created)
        missing = np.isnan(pin_created)
        pin_created[missing] = from_edges[missing]
        schema["edges.created_at"] = "fills pin_created_at (earliest edge) where pins lack it"
    lap("read_features")

    vocab = vocabulary(pin_cat, board_cat)
    n_locales, n_topics = len(vocab["locale"]), len(vocab["topic"])
    pin_locale = _codes(pin_cat["locale"], vocab["locale"])
    pin_topic = _codes(pin_cat["topic"], vocab["topic"])
    given_board_locale = _codes(board_cat["locale"], vocab["locale"])
    given_board_topic = _codes(board_cat["topic"], vocab["topic"])
    del pin_cat, board_cat

    # Collapse duplicate edges; sorting also orders them by (pin, board).
    code = raw_pins.astype(np.int64) * n_boards_all + raw_boards
    edge_times = None
    if edge_created is None:
        code, _ = sorted_unique(code)
    else:
        code, edge_times = _earliest_per_edge(code, edge_created)
        del edge_created
    del raw_pins, raw_boards
    e_pins = (code // n_boards_all).astype(np.int32)
    e_boards = (code % n_boards_all).astype(np.int32)
    del code
    duplicates = input_edges - e_pins.shape[0]
    lap("dedupe")

    board_locale = _given_or_dominant(given_board_locale, e_pins, e_boards, pin_locale, n_locales)
    board_topic = _given_or_dominant(given_board_topic, e_pins, e_boards, pin_topic, n_topics)

    keep, prune_stats = _prune(e_pins, e_boards, pin_topic, n_topics, n_boards_all, options)
    e_pins, e_boards = e_pins[keep], e_boards[keep]
    if edge_times is not None:
        edge_times = edge_times[keep]
    del keep
    if e_pins.shape[0] == 0:
        raise DataError(f"{edges_name}: pruning removed every edge; loosen the pruning options")
    # Boards left without pins are unreachable: drop them and renumber the rest densely.
    board_alive = np.bincount(e_boards, minlength=n_boards_all) > 0
    new_board = np.cumsum(board_alive, dtype=np.int64).astype(np.int32) - 1
    e_boards = new_board[e_boards]
    board_dict = board_dict.filter(pa.array(board_alive))
    board_locale, board_topic = board_locale[board_alive], board_topic[board_alive]
    n_boards = int(board_alive.sum())
    lap("prune")

    pin_key = (pin_locale * (n_topics + 1) + pin_topic).astype(np.int32)
    board_key = (board_locale * (n_topics + 1) + board_topic).astype(np.int32)
    n_keys = (n_locales + 1) * (n_topics + 1)
    pin_offsets, pin_adj = _csr(e_pins, e_boards, board_key, n_pins, n_keys)
    board_offsets, board_adj = _csr(e_boards, e_pins, pin_key, n_boards, n_keys)
    max_degree = int(max(np.diff(pin_offsets).max(), np.diff(board_offsets).max()))
    pin_locale_ends = _locale_ends(e_pins, e_boards, board_locale, n_pins, n_locales, max_degree)
    board_locale_ends = _locale_ends(e_boards, e_pins, pin_locale, n_boards, n_locales, max_degree)
    if edge_times is not None:
        # Each pin's edge times ascending (NaN last), read through pin_offsets.
        edge_times = edge_times[np.lexsort((edge_times, e_pins))]
    del e_pins, e_boards
    shift = run_shift(max_degree)
    pin_run_offsets, pin_key_runs = _key_runs(pin_offsets, pin_adj, board_key, n_keys, shift)
    board_run_offsets, board_key_runs = _key_runs(board_offsets, board_adj, pin_key, n_keys, shift)
    lap("csr")

    arrays: dict[str, np.ndarray] = {
        "pin_offsets": pin_offsets,
        "pin_adj": pin_adj,
        "board_offsets": board_offsets,
        "board_adj": board_adj,
        "pin_locale": pin_locale,
        "pin_topic": pin_topic,
        "board_locale": board_locale,
        "board_topic": board_topic,
        "pin_key": pin_key,
        "board_key": board_key,
        "pin_locale_ends": pin_locale_ends,
        "board_locale_ends": board_locale_ends,
        "pin_run_offsets": pin_run_offsets,
        "pin_key_runs": pin_key_runs,
        "board_run_offsets": board_run_offsets,
        "board_key_runs": board_key_runs,
        "pin_quality": pin_quality,
        "pin_created_at": pin_created,
        **id_arrays("pin", pin_dict),
        **id_arrays("board", board_dict),
    }
    for name, values in pin_columns.items():
        arrays[PIN_COLUMN_PREFIX + name] = values
    if edge_times is not None:
        arrays[PIN_EDGE_TIMES] = edge_times
    manifest = assemble_manifest(
        arrays,
        {},
        vocab=vocab,
        schema=schema,
        pin_columns=sorted(pin_columns),
        inputs={
            "edges": edges_name,
            "pins": None if pins is None else _name(pins, "pins"),
            "boards": None if boards is None else _name(boards, "boards"),
        },
        options=options,
        source=source,
        stats=graph_stats(
            input_edges,
            duplicates,
            n_boards_all - n_boards,
            pin_offsets,
            prune_stats,
            pins_info,
            boards_info,
        ),
    )
    lap("assemble")
    return write_graph(out, _new_sibling(out), arrays, {}, manifest, timings, lap, replace)


def id_arrays(prefix: str, dictionary: pa.Array) -> dict[str, np.ndarray]:
    """External ids in dense order, and the sorted copy and order that look them up."""
    ids = _id_values(dictionary)
    order = np.argsort(ids, kind="stable")
    return {
        f"{prefix}_ids_sorted": ids[order],
        f"{prefix}_ids_order": order.astype(np.int32),
        f"{prefix}_ids": ids,
    }


def _earliest_per_edge(code: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct edge codes and each one's earliest time (NaN when none is known)."""
    order = np.argsort(code, kind="stable")
    ordered = code[order]
    if ordered.shape[0] == 0:
        return ordered, np.zeros(0, dtype=np.float64)
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return ordered[first], np.fmin.reduceat(times[order], first)


def graph_stats(
    input_edges: int,
    duplicates: int,
    boards_removed: int,
    pin_offsets: np.ndarray,
    prune_stats: dict[str, Any],
    pins_info: dict[str, Any],
    boards_info: dict[str, Any],
) -> dict[str, Any]:
    return {
        "input_edges": input_edges,
        "duplicate_edges": int(duplicates),
        "edges_after_dedupe": int(input_edges - duplicates),
        "boards_without_edges_removed": int(boards_removed),
        "pins_without_edges": int(np.count_nonzero(np.diff(pin_offsets) == 0)),
        "pruning": prune_stats,
        **pins_info,
        **boards_info,
    }


def assemble_manifest(
    arrays: Mapping[str, np.ndarray],
    streamed: Mapping[str, np.ndarray],
    *,
    vocab: dict[str, list[str]],
    schema: dict[str, Any],
    pin_columns: list[str],
    inputs: dict[str, str | None],
    options: PruneOptions,
    source: Mapping[str, Any] | None,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a graph (without checksums and timings, added when it is written).

    `streamed` holds the arrays written to disk as they were made (an out-of-core build):
    empty stand-ins of their dtype whose `shape` is the real one, used here for sizes only.
    """
    every = {**arrays, **streamed}
    n_edges = int(arrays["pin_offsets"][-1])
    sizes = {name: a.dtype.itemsize * math.prod(a.shape) for name, a in every.items()}
    adjacency_bytes = sum(
        sizes[k] for k in ("pin_offsets", "pin_adj", "board_offsets", "board_adj")
    )
    locale_index_bytes = sizes["pin_locale_ends"] + sizes["board_locale_ends"]
    key_runs_bytes = sum(
        sizes[f"{side}_{name}"] for side in ("pin", "board") for name in ("run_offsets", "key_runs")
    )
    pin_max = int(np.diff(arrays["pin_offsets"]).max(initial=0))
    board_max = int(np.diff(arrays["board_offsets"]).max(initial=0))
    return {
        "format_version": FORMAT_VERSION,
        "counts": {
            "pins": int(arrays["pin_ids"].shape[0]),
            "boards": int(arrays["board_ids"].shape[0]),
            "edges": n_edges,
        },
        "vocab": {"locales": vocab["locale"], "topics": vocab["topic"]},
        "schema": {**schema, "pin_columns": pin_columns},
        "build": {
            "inputs": inputs,
            "options": asdict(options),
            "source": dict(source) if source else None,
        },
        "stats": stats,
        "bytes_per_edge": round(adjacency_bytes / n_edges, 4),
        # The locale index beside the adjacency (biased walks read a locale's slice from it).
        "locale_index_bytes_per_edge": round(locale_index_bytes / n_edges, 4),
        # The key runs (topic-biased walks read a key's slice from them).
        "key_runs_bytes_per_edge": round(key_runs_bytes / n_edges, 4),
        "key_runs": {"shift": run_shift(max(pin_max, board_max))},
        "degree": {"pin_max": pin_max, "board_max": board_max},
        "dtypes": {name: str(a.dtype) for name, a in every.items()},
    }


def write_graph(
    out: Path,
    tmp: Path,
    arrays: dict[str, np.ndarray],
    streamed_checksums: dict[str, str],
    manifest: dict[str, Any],
    timings: dict[str, float],
    lap: Callable[[str], None],
    replace: bool,
) -> dict[str, Any]:
    """Write `arrays` into `tmp` (which may already hold arrays written as they were made,
    with their checksums), then the manifest, and publish `tmp` as `out`; `tmp` is removed
    on any failure."""
    try:
        manifest["checksums"] = {**streamed_checksums, **_write_arrays(tmp, arrays)}
        lap("write")
        manifest["build"]["seconds"] = timings
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def vocabulary(
    pin_cat: dict[str, np.ndarray], board_cat: dict[str, np.ndarray]
) -> dict[str, list[str]]:
    """Each categorical column's sorted names over pins and boards (a code is a position)."""
    return {
        col: sorted(
            {v for values in (pin_cat[col], board_cat[col]) for v in values if v is not None}
        )
        for col in CATEGORICAL_COLUMNS
    }


def _name(source: TableSource, role: str) -> str:
    return str(source) if isinstance(source, str | Path) else f"<{role} table>"


def _codes(values: np.ndarray, vocab: list[str]) -> np.ndarray:
    """Category codes by binary search over the sorted vocabulary; missing -> len(vocab)."""
    n = len(vocab)
    result = np.full(values.shape[0], n, dtype=np.int32)
    present = np.not_equal(values, None)  # type: ignore[call-overload]  # object arrays: elementwise
    if n and present.any():
        result[present] = np.searchsorted(np.asarray(vocab, dtype=str), values[present].astype(str))
    return result


def _id_values(dictionary: pa.Array) -> np.ndarray:
    if pa.types.is_integer(dictionary.type):
        return np.asarray(dictionary.to_numpy(zero_copy_only=False), dtype=np.int64)
    # Fixed-width unicode so the array memory-maps (object arrays cannot).
    return np.asarray(dictionary.to_numpy(zero_copy_only=False).astype(str))


def _pin_features(
    pins: TableSource | None,
    pin_dict: pa.Array,
    n_pins: int,
    edges_name: str,
    schema: dict[str, Any],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    if pins is None:
        return (
            *pin_columns(None, "", np.zeros(0, np.int64), np.zeros(0, np.int64), n_pins, schema),
            {},
        )
    table, name, rows, target, without_edges = _side_rows(pins, "pin", pin_dict, edges_name)
    return (
        *pin_columns(table, name, rows, target, n_pins, schema),
        {"pins_table_rows_without_edges": without_edges},
    )


def _side_rows(
    source: TableSource, kind: str, dictionary: pa.Array, edges_name: str
) -> tuple[pa.Table, str, np.ndarray, np.ndarray, int]:
    """The pins or boards table (`kind` "pin" or "board"), its name, the rows whose
    `<kind>_id` is a node of the edges (`dictionary`), those nodes' dense ids, and how many
    rows name no node."""
    table, name = read_table(source, f"{kind}s")
    column = f"{kind}_id"
    _require_columns(table, name, (column,))
    ids = _id_column(table, name, column)
    _check_id_types(ids, dictionary, name, column, edges_name)
    dense = _rows_to_dense(ids, dictionary, name, column)
    rows = np.flatnonzero(dense >= 0)
    return table, name, rows, dense[rows], int((dense < 0).sum())


def pin_columns(
    table: pa.Table | None,
    name: str,
    rows: np.ndarray,
    target: np.ndarray,
    n_pins: int,
    schema: dict[str, Any],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Pin features (categories, quality, created_at, extra numeric columns) in dense order
    from the pins table's `rows`, which belong to the dense pins `target`."""
    cat = {c: np.full(n_pins, None, dtype=object) for c in CATEGORICAL_COLUMNS}
    quality = np.full(n_pins, np.nan, dtype=np.float32)
    created = np.full(n_pins, np.nan, dtype=np.float64)
    columns: dict[str, np.ndarray] = {}
    if table is None:
        return cat, quality, created, columns
    for col in table.column_names:
        if col == "pin_id":
            continue
        column = table.column(col)
        if col in CATEGORICAL_COLUMNS:
            cat[col][target] = _strings(column, name, col)[rows]
            schema[f"pins.{col}"] = "categorical"
        elif col == "created_at":
            created[target] = _seconds(column, name, col)[rows]
            schema["pins.created_at"] = "epoch seconds (float64)"
        elif _is_numeric(column.type):
            values = _float(column)[rows].astype(np.float32)
            if col == "quality":
                quality[target] = values
            else:
                columns[col] = np.full(n_pins, np.nan, dtype=np.float32)
                columns[col][target] = values
            schema[f"pins.{col}"] = "float32"
        else:
            raise DataError(
                f"{name}: column {col!r} has type {column.type}, which is neither numeric nor "
                f"categorical (only {', '.join(CATEGORICAL_COLUMNS)} are categorical); "
                f"drop it or convert it to numbers"
            )
    return cat, quality, created, columns


def _board_features(
    boards: TableSource | None,
    board_dict: pa.Array,
    n_boards: int,
    edges_name: str,
    schema: dict[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if boards is None:
        return board_columns(
            None, "", np.zeros(0, np.int64), np.zeros(0, np.int64), n_boards, schema
        ), {}
    table, name, rows, target, without_edges = _side_rows(boards, "board", board_dict, edges_name)
    return (
        board_columns(table, name, rows, target, n_boards, schema),
        {"boards_table_rows_without_edges": without_edges},
    )


def board_columns(
    table: pa.Table | None,
    name: str,
    rows: np.ndarray,
    target: np.ndarray,
    n_boards: int,
    schema: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Board categories in dense order from the boards table's `rows` (boards `target`)."""
    cat = {c: np.full(n_boards, None, dtype=object) for c in CATEGORICAL_COLUMNS}
    if table is None:
        return cat
    ignored = []
    for col in table.column_names:
        if col in CATEGORICAL_COLUMNS:
            cat[col][target] = _strings(table.column(col), name, col)[rows]
            schema[f"boards.{col}"] = "categorical"
        elif col != "board_id":
            ignored.append(col)
    if ignored:
        schema["boards.ignored_columns"] = ignored
    return cat


def _check_target(out: Path, replace: bool) -> None:
    """Refuse what must never be replaced: a file, a directory that is not a graph, or a
    graph without `replace`. An empty directory is taken as new."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise DataError(f"{out}: directory is not empty and holds no graph; refusing to replace")
    if not replace:
        raise DataError(
            f"{out}: a graph already exists there; refusing to replace it without "
            f"--replace (or build into a new directory)"
        )


def _new_sibling(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a graph directory is shared read-only data
    return tmp


def _write_arrays(tmp: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Save each array read-only (a served file must never be rewritten); their checksums."""
    checksums = {}
    for name, values in arrays.items():
        path = tmp / f"{name}.npy"
        np.save(path, np.ascontiguousarray(values), allow_pickle=False)
        path.chmod(0o444)
        checksums[name] = array_checksum(path)
    return checksums


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the finished directory into place; a replaced graph is renamed away and deleted
    (unlinked, so a process still mapping its files keeps them), never written."""
    _check_target(out, replace)  # again: something may have appeared during the build
    if not out.is_dir():
        tmp.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        tmp.rename(out)
        return
    with exclusive_graph_lock(out):
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
