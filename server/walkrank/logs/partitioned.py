"""The partitioned log writer shared by the candidate log and the event log, and its reader.

A producer hands records to a bounded queue (`submit` never blocks unless asked: a full
queue drops the record and counts it); one background thread per log turns them into
Parquet files, grouped by Hive partitions and made visible atomically. `PartitionedLog` is
that writer, `WriterOptions` its settings, `read_partitioned` the reader of what it wrote;
`walkrank.logs.candidates` and `walkrank.logs.events` are its two record kinds.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from walkrank.errors import DataError
from walkrank.pointers import fsync_path
from walkrank.storage import Location, filesystem_of, store_error
from walkrank.threads import lower_thread_priority

log = logging.getLogger(__name__)

R = TypeVar("R")
P = TypeVar("P")

# (("tenant", "home"), ("date", "2024-01-05"), ("hour", "07")): the Hive path segments of a file.
Partition = tuple[tuple[str, str], ...]
TimeLike = datetime | float | int | None

TIMESTAMP = pa.timestamp("us", tz="UTC")
# Partition values go into directory names: no separators, and no leading "." or "_" (readers
# such as pyarrow.dataset and Spark skip those as hidden files).
PARTITION_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@functools.lru_cache(maxsize=64)
def hour_partition(epoch_hour: int) -> Partition:
    """The (date, hour) partition of an hour counted from the epoch, in UTC (cached: the
    writer asks for every record, and formatting the date was a quarter of its Python per
    record)."""
    moment = datetime.fromtimestamp(epoch_hour * 3600, tz=UTC)
    return (("date", moment.strftime("%Y-%m-%d")), ("hour", moment.strftime("%H")))


def to_epoch_seconds(moment: TimeLike, name: str) -> float | None:
    """Accept a datetime (naive means UTC) or epoch seconds; None stays None (no bound)."""
    if moment is None:
        return None
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if isinstance(moment, int | float) and np.isfinite(moment):
        return float(moment)
    raise DataError(f"{name} must be a datetime or epoch seconds, got {moment!r}")


_WRITE_BUFFER = 1 << 20  # bytes a file's stream gathers before one write(2)


def _is_text(arrow_type: pa.DataType) -> bool:
    """Strings, or lists of strings, plain or dictionary-encoded: the columns worth a Parquet
    dictionary (and dictionary-encoded ones must get one: written without, they would be
    expanded to a value per row)."""
    if pa.types.is_list(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


@dataclass
class _Control:
    """A flush or stop request travelling through the queue, so it is ordered after every
    record submitted before it."""

    stop: bool
    done: threading.Event


class Piece(NamedTuple, Generic[P]):
    """The part of a record bound for one partition. Pieces of one partition with the same
    `layout` (their column list) are written together as one file."""

    partition: Partition
    layout: Hashable
    rows: int
    payload: P


LOSS_REASONS: tuple[str, ...] = ("bad_record", "write_error")
"""Why a writer loses rows it accepted: a record it cannot convert (too large, or a value
Arrow refuses: dropped alone), or a file it cannot write (every row of that file)."""


class Intake(Generic[R]):
    """The submit side of a log: accept into a bounded queue or drop and count, never lose
    silently. Shared by the in-process writer and `walkrank.log_process.ProcessLog`."""

    def __init__(self, on_drop: Callable[[R], None] | None) -> None:
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._closed = False
        self.submitted_batches = 0
        self.submitted_rows = 0
        self.dropped_batches = 0
        self.dropped_rows = 0

    def _offer(self, record: R, rows: int, put: Callable[[], None]) -> bool:
        """`put()` the record unless closed; True when it went in (queue.Full: dropped)."""
        with self._lock:
            if not self._closed:
                try:
                    put()
                except queue.Full:
                    pass
                else:
                    self.submitted_batches += 1
                    self.submitted_rows += rows
                    return True
            self.dropped_batches += 1
            self.dropped_rows += rows
        if self._on_drop is not None:
            self._on_drop(record)
        return False

    def _mark_closed(self) -> bool:
        """Refuse records from now on; True if it was closed already."""
        with self._lock:
            already = self._closed
            self._closed = True
        return already


@dataclass(frozen=True)
class WriterOptions(Generic[R]):
    """How a `PartitionedLog` queues, flushes and reports, shared by every kind of log (the
    file format choices belong to each kind).

    `queue_size` records wait at most; a file closes at `flush_rows` rows or when its oldest
    row is `flush_seconds` old (by `clock`), and is written one row group per
    `row_group_rows` rows. Hooks: `on_drop(record)` runs on the submitting thread for every
    dropped record (metrics); `on_write(path, rows)` runs on the writer thread after each file
    becomes visible; `on_lost(reason, rows)` runs on the writer thread whenever accepted rows
    are lost (a reason of `LOSS_REASONS`), so nothing accepted is lost without being counted;
    `writer_hook(record)` runs on the writer thread for each record it takes off the queue,
    before processing it (tests hold the writer with it to fill the queue deterministically).

    `writer_nice` lowers the writer thread's CPU priority (Linux thread niceness; ignored
    elsewhere): a server's log writer is background work that should take idle CPU, not CPU
    from requests, and its bounded queue absorbs the difference (or drops, counted).
    """

    queue_size: int = 1024
    flush_rows: int = 500_000
    row_group_rows: int = 65_536
    flush_seconds: float = 60.0
    clock: Callable[[], float] = time.time
    on_drop: Callable[[R], None] | None = None
    on_write: Callable[[Path, int], None] | None = None
    on_lost: Callable[[str, int], None] | None = None
    writer_hook: Callable[[R], None] | None = None
    writer_nice: int = 0

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise DataError(f"queue_size must be at least 1, got {self.queue_size}")
        if self.flush_rows < 1:
            raise DataError(f"flush_rows must be at least 1, got {self.flush_rows}")
        if self.row_group_rows < 1:
            raise DataError(f"row_group_rows must be at least 1, got {self.row_group_rows}")
        if not self.flush_seconds > 0:
            raise DataError(f"flush_seconds must be positive, got {self.flush_seconds}")


class PartitionedLog(Intake[R], Generic[R, P], ABC):
    """A bounded queue plus one writer thread that writes records as Hive-partitioned Parquet.

    Subclasses say how a record splits into pieces (one per partition it touches) and how
    pieces become one table; this class owns the queue, the drop accounting, the flush policy
    (by rows per file and by age) and atomic files (`.part-*.tmp` then `os.replace`; readers
    skip dot-files). Pieces with a different layout (a changed column list) start new files
    rather than mixing schemas inside one.

    A file is written as it fills, one row group per `row_group_rows` rows: its table is
    built once from those pieces (Arrow calls per record cost more than the columns' data),
    and the writer never works on more than a few MB at once: building and writing a whole
    file in one go swept the shared L3 cache and slowed the walks of every request in
    flight. Only text columns are dictionary-encoded: trying dictionaries on float feature
    columns first cost far more writer CPU than it saved (benchmarks/log_writer.py measures
    the writer's CPU).

    `options` (a `WriterOptions`) sets the queue, the flush policy, the hooks and the writer's
    CPU priority.

    `statistics` names the columns that get Parquet min/max statistics (None: all); they cost
    encoding time and only help readers that filter on those columns. `plain_text` names text
    columns whose values are mostly distinct (ids), where a dictionary costs encoding time and
    saves no space. `packed_integers` names integer columns stored DELTA_BINARY_PACKED
    instead of PLAIN: ids and ranks of a few significant bits, which LZ4 spent more CPU on
    than on any other column and still left larger.
    """

    def __init__(
        self,
        directory: Path,
        options: WriterOptions[R] | None = None,
        *,
        compression: str = "zstd",
        statistics: Sequence[str] | None = None,
        plain_text: Sequence[str] = (),
        packed_integers: Sequence[str] = (),
    ) -> None:
        self.options: WriterOptions[R] = WriterOptions() if options is None else options
        super().__init__(self.options.on_drop)
        self.directory = Path(directory)
        self.flush_rows = self.options.flush_rows
        self.row_group_rows = min(self.options.row_group_rows, self.flush_rows)
        self.flush_seconds = float(self.options.flush_seconds)
        self._clock = self.options.clock
        self._on_write = self.options.on_write
        self._on_lost = self.options.on_lost
        self._writer_hook = self.options.writer_hook
        self._compression = compression
        self._statistics: list[str] | bool = True if statistics is None else list(statistics)
        self._plain_text = frozenset(plain_text)
        self._packed_integers = frozenset(packed_integers)
        # Records travel with their submit time: a record's age counts from its submission.
        self._queue: queue.Queue[tuple[R, float] | _Control] = queue.Queue(
            maxsize=self.options.queue_size
        )
        # Written by the writer thread only.
        self.written_rows = 0
        self.written_files = 0
        self.write_errors = 0
        self.bad_records = 0
        self.lost_rows = 0
        self._thread = threading.Thread(
            target=self._run, name=f"walkrank-log-{self.directory.name}", daemon=True
        )
        self._thread.start()

    @abstractmethod
    def _rows(self, record: R) -> int:
        """How many rows the record will write (for drop accounting)."""

    @abstractmethod
    def _pieces(self, record: R) -> list[Piece[P]]:
        """The record split by partition (runs on the writer thread; raises on a bad record,
        which is dropped alone)."""

    @abstractmethod
    def _table(self, payloads: list[P]) -> pa.Table:
        """One file's table from the payloads of pieces sharing a partition and layout (if it
        raises, each payload is tried alone and only those that fail again are dropped)."""

    def submit(self, record: R, *, wait: bool = False) -> bool:
        """Queue a record; False when dropped (queue full or closed).

        Never blocks unless `wait`: then a full queue is waited on instead of dropping (for a
        single relay that must not lose what it was handed, `walkrank.log_process`).
        """
        item = (record, self._clock())
        return self._offer(record, self._rows(record), lambda: self._queue.put(item, block=wait))

    def flush(self, timeout: float | None = None) -> bool:
        """Write everything submitted so far, and wait for it; False if `timeout` ran out."""
        with self._lock:
            if self._closed:
                return not self._thread.is_alive()
        control = _Control(stop=False, done=threading.Event())
        try:
            self._queue.put(control, timeout=timeout)
        except queue.Full:
            return False
        return control.done.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting records, write everything queued, stop the writer.

        True when every accepted record was processed within `timeout`.
        """
        if not self._mark_closed():
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                self._queue.put(_Control(stop=True, done=threading.Event()), timeout=timeout)
            except queue.Full:
                return False
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, int | bool]:
        """Counters for metrics and tests (a snapshot; the writer keeps going)."""
        with self._lock:
            snapshot: dict[str, int | bool] = {
                "submitted_batches": self.submitted_batches,
                "submitted_rows": self.submitted_rows,
                "dropped_batches": self.dropped_batches,
                "dropped_rows": self.dropped_rows,
                "closed": self._closed,
            }
        snapshot.update(
            queued=self._queue.qsize(),
            written_rows=self.written_rows,
            written_files=self.written_files,
            write_errors=self.write_errors,
            bad_records=self.bad_records,
            lost_rows=self.lost_rows,
            writer_alive=self._thread.is_alive(),
        )
        return snapshot

    # --- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        lower_thread_priority(self.options.writer_nice)
        files: dict[tuple[Partition, Hashable], _OpenFile[P]] = {}
        oldest: float | None = None
        while True:
            timeout = (
                None if oldest is None else max(0.0, oldest + self.flush_seconds - self._clock())
            )
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, _Control):
                for key in list(files):
                    self._finish(files.pop(key))
                oldest = None
                item.done.set()
                if item.stop:
                    return
                continue
            if item is not None:
                record, submitted_at = item
                if self._writer_hook is not None:
                    self._writer_hook(record)
                try:
                    pieces = self._pieces(record)
                except Exception as exc:
                    self._drop_bad(self._rows(record), exc)
                    pieces = []
                for piece in pieces:
                    key = (piece.partition, piece.layout)
                    file = files.get(key)
                    if file is None:
                        file = files[key] = _OpenFile(piece.partition)
                    file.payloads.append(piece.payload)
                    file.payload_rows.append(piece.rows)
                    file.pending_rows += piece.rows
                    if file.pending_rows >= self.row_group_rows:
                        self._write_row_group(file)
                    if file.written_rows + file.pending_rows >= self.flush_rows:
                        self._finish(files.pop(key))
                if files:
                    oldest = submitted_at if oldest is None else min(oldest, submitted_at)
            if oldest is not None and self._clock() - oldest >= self.flush_seconds:
                for key in list(files):
                    self._finish(files.pop(key))
            if not files:
                oldest = None

    def _lose(self, reason: str, rows: int) -> None:
        self.lost_rows += rows
        if self._on_lost is not None and rows:
            self._on_lost(reason, rows)

    def _drop_bad(self, rows: int, exc: Exception) -> None:
        """Count a record that cannot be converted: it alone is dropped."""
        log.error(
            "log writer: dropped a record of %d rows under %s that cannot be written: %s",
            rows,
            self.directory,
            str(exc)[:200],
        )
        self.write_errors += 1
        self.bad_records += 1
        self._lose("bad_record", rows)

    def _row_group_table(self, file: _OpenFile[P]) -> pa.Table | None:
        """The pending pieces as one table; when that fails, the table of those that convert
        on their own (the others are dropped and counted)."""
        try:
            return self._table(file.payloads)
        except Exception:
            tables = []
            for payload, rows in zip(file.payloads, file.payload_rows, strict=True):
                try:
                    tables.append(self._table([payload]))
                except Exception as exc:
                    self._drop_bad(rows, exc)
                    file.pending_rows -= rows
            return pa.concat_tables(tables) if tables else None

    def _write_row_group(self, file: _OpenFile[P]) -> None:
        """Write the file's pending pieces as one row group (opening the file first). Once a
        write failed the file is lost: its later pieces are only counted."""
        if file.payloads and not file.failed:
            table = self._row_group_table(file)
            try:
                if table is not None:
                    if file.writer is None:
                        self._open(file, table.schema)
                    assert file.writer is not None  # _open sets it
                    file.writer.write_table(table, row_group_size=table.num_rows)
            except Exception:
                log.exception("log writer: cannot write under %s", self.directory)
                file.failed = True
        file.written_rows += file.pending_rows
        file.payloads, file.payload_rows, file.pending_rows = [], [], 0

    def _open(self, file: _OpenFile[P], schema: pa.Schema) -> None:
        """Create the file's hidden `.part-*.tmp` and its Parquet writer."""
        directory = self.directory.joinpath(*(f"{name}={value}" for name, value in file.partition))
        directory.mkdir(parents=True, exist_ok=True)
        now = self._clock()
        stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y%m%dT%H%M%S")
        name = f"part-{stamp}{int(now * 1000) % 1000:03d}-{uuid.uuid4().hex}.parquet"
        file.final = directory / name
        file.tmp = directory / f".{name}.tmp"
        # A native stream, not a Python file: Parquet writes each page header and page
        # separately, and through a Python file each write took the GIL from the thread
        # handing records to this one. Buffered, so the small headers cost no syscalls.
        file.handle = pa.BufferedOutputStream(pa.OSFile(str(file.tmp), "wb"), _WRITE_BUFFER)
        # No Arrow schema in the file: readers get the Parquet types (strings, not the
        # dictionary arrays the writer builds values-once-per-request with).
        file.writer = pq.ParquetWriter(
            file.handle,
            schema,
            compression=self._compression,
            use_dictionary=[
                f.name for f in schema if _is_text(f.type) and f.name not in self._plain_text
            ],
            column_encoding={
                f.name: "DELTA_BINARY_PACKED"
                for f in schema
                if f.name in self._packed_integers and pa.types.is_integer(f.type)
            }
            or None,
            write_statistics=self._statistics,
            store_schema=False,
            # A row group's values go to the encoders in one batch per column, not 1,024 at
            # a time: less encoding time per row group.
            write_batch_size=self.row_group_rows,
        )

    def _finish(self, file: _OpenFile[P]) -> None:
        """Write what is pending, close the file and make it visible (or count it lost)."""
        self._write_row_group(file)
        if file.writer is not None and not file.failed:
            assert file.handle is not None  # _open sets both
            try:
                file.writer.close()
                file.handle.close()
                fsync_path(file.tmp)
                os.replace(file.tmp, file.final)
            except Exception:
                log.exception("log writer: cannot finish %s", file.tmp)
                file.failed = True
        if file.failed:
            self.write_errors += 1
            self._lose("write_error", file.written_rows)
            if file.handle is not None:
                file.handle.close()
                file.tmp.unlink(missing_ok=True)
            return
        if file.writer is None:  # nothing was ever pending
            return
        self.written_rows += file.written_rows
        self.written_files += 1
        if self._on_write is not None:
            self._on_write(file.final, file.written_rows)


@dataclass(eq=False)
class _OpenFile(Generic[P]):
    """One partition's file while it fills: row groups already in `tmp`, pieces pending."""

    partition: Partition
    payloads: list[P] = field(default_factory=list)
    payload_rows: list[int] = field(default_factory=list)
    pending_rows: int = 0
    written_rows: int = 0
    failed: bool = False
    writer: pq.ParquetWriter | None = None
    handle: pa.NativeFile | None = None
    final: Path = Path()
    tmp: Path = Path()


# --- candidates --------------------------------------------------------------------------------


def _partition_window(start: float | None, end: float | None) -> pc.Expression | None:
    """The date/hour partitions that can hold rows of [start, end)."""
    partition_filter = None
    if start is not None:
        (_, date), (_, hour) = hour_partition(int(start // 3600))
        partition_filter = (pc.field("date") > date) | (
            (pc.field("date") == date) & (pc.field("hour") >= int(hour))
        )
    if end is not None:
        (_, date), (_, hour) = hour_partition(int(end // 3600))
        before = (pc.field("date") < date) | (
            (pc.field("date") == date) & (pc.field("hour") <= int(hour))
        )
        partition_filter = before if partition_filter is None else partition_filter & before
    return partition_filter


def read_partitioned(
    directory: Location,
    partition_fields: Sequence[tuple[str, pa.DataType]],
    base_schema: pa.Schema,
    time_column: str,
    *,
    start: TimeLike = None,
    end: TimeLike = None,
    where: pc.Expression | None = None,
) -> pa.Table:
    """Rows of a Hive-partitioned log directory with `start <= time < end`.

    Partitions outside the window are never opened. Files may differ in columns (a tenant's
    feature list changed): the result has the union, with nulls where a file lacks a column.
    Partition columns are in the result only when `base_schema` names them (null for files
    whose path lacks that partition); the time column carries the date and hour.
    """
    lo = to_epoch_seconds(start, "start")
    hi = to_epoch_seconds(end, "end")
    # A local directory or a store URI (s3://...: walkrank.storage).
    filesystem, path = filesystem_of(directory)
    try:
        if filesystem.get_file_info(path).type != pafs.FileType.Directory:
            return base_schema.empty_table()
    except OSError as exc:
        raise store_error(str(directory), "read the logs", exc) from None
    partitioning = ds.partitioning(pa.schema(list(partition_fields)), flavor="hive")
    dataset = ds.dataset(path, filesystem=filesystem, format="parquet", partitioning=partitioning)
    partition_filter = _partition_window(lo, hi)
    if where is not None:
        partition_filter = where if partition_filter is None else where & partition_filter
    fragments = sorted(dataset.get_fragments(filter=partition_filter), key=lambda f: f.path)
    if not fragments:
        return base_schema.empty_table()
    for fragment in fragments:
        try:
            fragment.physical_schema  # noqa: B018 (reads the footer: a truncated file fails here)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{fragment.path}: not a readable Parquet file: {exc}") from exc
    # The base schema's types win: a file may store a base column in a type that casts to it
    # (the candidate log's integer pin ids, read as strings).
    try:
        schema = pa.unify_schemas(
            [base_schema]
            + [
                pa.schema([f for f in fragment.physical_schema if f.name not in base_schema.names])
                for fragment in fragments
            ]
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{directory}: files disagree on column types: {exc}") from exc
    row_filter = None
    if lo is not None:
        row_filter = pc.field(time_column) >= pa.scalar(round(lo * 1e6), TIMESTAMP)
    if hi is not None:
        upper = pc.field(time_column) < pa.scalar(round(hi * 1e6), TIMESTAMP)
        row_filter = upper if row_filter is None else row_filter & upper
    files = ds.dataset(
        [f.path for f in fragments],
        schema=schema,
        filesystem=filesystem,
        format="parquet",
        partitioning=partitioning,
        partition_base_dir=path,
    )
    try:
        return files.to_table(filter=row_filter)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as exc:
        raise DataError(f"{directory}: cannot read the log's files: {exc}") from exc
