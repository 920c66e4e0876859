"""Serving-stage candidate log: every generated candidate, shown or not, with its features.

Logging at the serving stage (the article's choice) means no client needs its own logging and
the unseen candidates are there to train on. The request path only hands a columnar
`CandidateBatch` to a bounded queue (`put_nowait`: a full queue drops the batch and counts it,
it never blocks a request); one background thread turns batches into Parquet files, grouped
by Hive partitions and made visible atomically. `PartitionedLog` is that writer, shared with
the event log (`walkrank.events.EventLog`): one writer, two record kinds.

Layout (see docs/logging.md):
`<root>/candidates/tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>/part-<time>-<uuid>.parquet`.
"""

from __future__ import annotations

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
from typing import BinaryIO, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from walkrank.errors import DataError
from walkrank.storage import Location, as_location, filesystem_of, join, store_error
from walkrank.threads import lower_thread_priority

log = logging.getLogger(__name__)

R = TypeVar("R")
P = TypeVar("P")

# (("tenant", "home"), ("date", "2024-01-05"), ("hour", "07")): the Hive path segments of a file.
Partition = tuple[tuple[str, str], ...]
TimeLike = datetime | float | int | None

TIMESTAMP = pa.timestamp("us", tz="UTC")
_US_PER_HOUR = 3_600_000_000
# Partition values go into directory names: no separators, and no leading "." or "_" (readers
# such as pyarrow.dataset and Spark skip those as hidden files).
PARTITION_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hour_partition(epoch_hour: int) -> Partition:
    """The (date, hour) partition of an hour counted from the epoch, in UTC."""
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
    built once from those pieces (Arrow calls per record cost more than the columns' data:
    0.6 ms per 2,000-candidate request, against 0.1 ms built per row group), and the writer
    never works on more than a few MB at once. Building and writing 500,000 rows in one go
    swept the shared L3 cache and slowed the walks of every request in flight: p99 57 -> 51
    ms on 2 cores when the work was cut into 64k-row pieces. Only text columns are
    dictionary-encoded: trying dictionaries on float feature columns first made writing 3x
    slower (2.1 ms of writer CPU per 2,000-candidate request, against 0.6 ms).

    `options` (a `WriterOptions`) sets the queue, the flush policy, the hooks and the writer's
    CPU priority.

    `statistics` names the columns that get Parquet min/max statistics (None: all); they cost
    encoding time and only help readers that filter on those columns. `plain_text` names text
    columns whose values are mostly distinct (ids), where a dictionary costs encoding time and
    saves no space.
    """

    def __init__(
        self,
        directory: Path,
        options: WriterOptions[R] | None = None,
        *,
        compression: str = "zstd",
        statistics: Sequence[str] | None = None,
        plain_text: Sequence[str] = (),
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
        file.handle = open(file.tmp, "wb")  # noqa: SIM115 (closed by _finish)
        # No Arrow schema in the file: readers get the Parquet types (strings, not the
        # dictionary arrays the writer builds values-once-per-request with).
        file.writer = pq.ParquetWriter(
            file.handle,
            schema,
            compression=self._compression,
            use_dictionary=[
                f.name for f in schema if _is_text(f.type) and f.name not in self._plain_text
            ],
            write_statistics=self._statistics,
            store_schema=False,
        )

    def _finish(self, file: _OpenFile[P]) -> None:
        """Write what is pending, close the file and make it visible (or count it lost)."""
        self._write_row_group(file)
        if file.writer is not None and not file.failed:
            assert file.handle is not None  # _open sets both
            try:
                file.writer.close()
                file.handle.flush()
                os.fsync(file.handle.fileno())
                file.handle.close()
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
    handle: BinaryIO | None = None
    final: Path = Path()
    tmp: Path = Path()


# --- candidates --------------------------------------------------------------------------------

CANDIDATE_COLUMNS = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("ts", TIMESTAMP, nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("user_locale", pa.string()),
        pa.field("user_interests", pa.list_(pa.string()), nullable=False),
        pa.field("pin_id", pa.string(), nullable=False),
        # The generator that proposed the candidate: "walk" or a request's extra source.
        pa.field("source", pa.string(), nullable=False),
        pa.field("visit_score", pa.float32(), nullable=False),
        pa.field("model_score", pa.float32(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("returned", pa.bool_(), nullable=False),
        pa.field("model_version", pa.string()),
        # walkrank.experiments: the request's arm, each candidate's probability of being
        # returned, and the shadow model's version and scores (NaN without one).
        pa.field("arm", pa.string()),
        pa.field("propensity", pa.float32(), nullable=False),
        pa.field("shadow_version", pa.string()),
        pa.field("shadow_score", pa.float32(), nullable=False),
    ]
)
"""Columns of every candidate file, before the `f_<feature>` columns (float32, one per feature).
The tenant, date and hour live in the partition path, not in the files. Columns that are never
null are declared so: Parquet then stores no definition levels for them (a tenth of the
writer's encoding time)."""


def candidate_schema(feature_names: Sequence[str]) -> pa.Schema:
    """The schema of a tenant's candidate files for its feature list."""
    return pa.schema(
        list(CANDIDATE_COLUMNS)
        + [pa.field(f"f_{n}", pa.float32(), nullable=False) for n in feature_names]
    )


@dataclass(frozen=True, eq=False)
class CandidateBatch:
    """All candidates generated for one request, columnar, as the request path already holds
    them: arrays are handed over (not copied), so the caller must not modify them afterwards.

    `ranks` is each candidate's position in the served order over all generated candidates;
    `returned` marks the ones sent back. `ts` is epoch seconds.
    """

    request_id: str
    tenant: str
    ts: float
    user_id: str
    user_locale: str | None
    user_interests: Sequence[str]
    pin_ids: np.ndarray
    feature_names: Sequence[str]
    features: np.ndarray
    visit_scores: np.ndarray
    model_scores: np.ndarray
    ranks: np.ndarray
    returned: np.ndarray
    model_version: str | None
    arm: str | None = None
    propensities: np.ndarray | None = None  # None: 1 where returned, else 0
    shadow_version: str | None = None
    shadow_scores: np.ndarray | None = None
    # (source names, a code per candidate into them); None: every candidate is the walk's.
    sources: tuple[Sequence[str], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if not PARTITION_VALUE.match(self.tenant or ""):
            raise DataError(
                f"candidate batch: tenant {self.tenant!r} cannot name a partition "
                "(letters, digits, '_', '.', '-'; not starting with '_' or '.')"
            )
        k = len(self.pin_ids)
        if self.features.shape != (k, len(self.feature_names)):
            raise DataError(
                f"candidate batch {self.request_id!r}: features has shape "
                f"{self.features.shape}, expected ({k}, {len(self.feature_names)})"
            )
        for name in (
            "visit_scores",
            "model_scores",
            "ranks",
            "returned",
            "propensities",
            "shadow_scores",
        ):
            if getattr(self, name) is not None and len(getattr(self, name)) != k:
                raise DataError(
                    f"candidate batch {self.request_id!r}: {name} has "
                    f"{len(getattr(self, name))} entries for {k} pins"
                )
        if self.sources is not None and len(self.sources[1]) != k:
            raise DataError(
                f"candidate batch {self.request_id!r}: sources has "
                f"{len(self.sources[1])} codes for {k} pins"
            )
        # Request-level values go into columns built for many requests at once, where one
        # bad value would cost the whole row group: refuse it here, with its request.
        for name, value, optional in (
            ("request_id", self.request_id, False),
            ("user_id", self.user_id, False),
            ("user_locale", self.user_locale, True),
            ("model_version", self.model_version, True),
            ("arm", self.arm, True),
            ("shadow_version", self.shadow_version, True),
        ):
            if not (isinstance(value, str) or (optional and value is None)):
                raise DataError(
                    f"candidate batch {self.request_id!r}: {name} must be a "
                    f"string{' or None' if optional else ''}, got {value!r}"
                )
        if isinstance(self.user_interests, str) or not all(
            isinstance(topic, str) for topic in self.user_interests
        ):
            raise DataError(
                f"candidate batch {self.request_id!r}: user_interests must be a "
                f"list of strings, got {self.user_interests!r}"
            )

    def __len__(self) -> int:
        return len(self.pin_ids)


def _pin_id_strings(pin_ids: np.ndarray) -> pa.Array:
    """External pin ids (int or str) as the log's string column."""
    array = pa.array(pin_ids)
    return array if array.type == pa.string() else array.cast(pa.string())


MAX_REQUEST_BYTES = 64 << 10
"""The most UTF-8 bytes of request-level text (request_id, user_id, user_locale,
model_version and the user_interests) one logged request may carry; a batch over it is
dropped alone and counted (`bad_record`). Readers expand these values to every candidate
row, so they must stay small."""
MAX_INTERESTS = 256
"""The most user_interests one logged request may carry (same rule)."""

_CODES = pa.dictionary(pa.int32(), pa.string())
WALK_SOURCE = "walk"  # walkrank.features.WALK_SOURCE (the log imports no serving code)
_REQUEST_TEXT = ("request_id", "user_id", "user_locale", "model_version", "arm", "shadow_version")


def _check_request_values(batch: CandidateBatch) -> None:
    """DataError when a batch's request-level values are too large for the log."""
    if len(batch.user_interests) > MAX_INTERESTS:
        raise DataError(
            f"candidate batch {batch.request_id[:64]!r}: "
            f"{len(batch.user_interests):,} user_interests, the log takes at "
            f"most {MAX_INTERESTS}"
        )
    texts = [getattr(batch, name) or "" for name in _REQUEST_TEXT] + list(batch.user_interests)
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if size > MAX_REQUEST_BYTES:
        raise DataError(
            f"candidate batch {batch.request_id[:64]!r}: request-level values "
            f"take {size:,} bytes, the log takes at most {MAX_REQUEST_BYTES:,} "
            "per request"
        )


def _per_request(values: list[str | None], owner: np.ndarray) -> pa.DictionaryArray:
    """One value per request, stored once and pointed at by each of its candidates (a
    request's 2,000 copies of a long id once overflowed Arrow's 2 GB string limit). Each
    distinct value is in the dictionary once: given a dictionary with repeats (the same arm
    or locale for every request), Parquet writes the column without one, every row's string
    in full (10% of the writer's encoding time)."""
    codes: dict[str, int] = {}
    code = np.fromiter(
        (-1 if v is None else codes.setdefault(v, len(codes)) for v in values),
        dtype=np.int32,
        count=len(values),
    )[owner]
    missing = code < 0
    indices = pa.array(np.maximum(code, 0), mask=missing if missing.any() else None)
    return pa.DictionaryArray.from_arrays(indices, pa.array(list(codes) or [""], pa.string()))


def _per_request_lists(lists: list[Sequence[str]], owner: np.ndarray) -> pa.ListArray:
    """Each request's list once, every candidate's list pointing into it."""
    lengths = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
    starts = np.cumsum(lengths) - lengths
    row_lengths = lengths[owner]
    offsets = np.zeros(len(owner) + 1, dtype=np.int64)
    np.cumsum(row_lengths, out=offsets[1:])
    # Element j of row i is value starts[owner[i]] + (j - offsets[i]).
    elements = np.arange(offsets[-1], dtype=np.int64) - np.repeat(
        offsets[:-1] - starts[owner], row_lengths
    )
    values = pa.array([topic for topics in lists for topic in topics], pa.string())
    codes = pa.DictionaryArray.from_arrays(pa.array(elements.astype(np.int32)), values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), codes)


def _sources(batches: Sequence[CandidateBatch]) -> pa.DictionaryArray:
    """Each candidate's generator, with one dictionary for all the batches."""
    names = sorted({WALK_SOURCE}.union(*(b.sources[0] for b in batches if b.sources)))
    code = {name: i for i, name in enumerate(names)}
    codes = [
        np.full(len(b), code[WALK_SOURCE], np.int32)
        if b.sources is None
        else np.array([code[name] for name in b.sources[0]], np.int32)[b.sources[1]]
        for b in batches
    ]
    return pa.DictionaryArray.from_arrays(pa.array(np.concatenate(codes)), pa.array(names))


def candidates_table(
    batches: Sequence[CandidateBatch], pin_ids: Sequence[pa.Array] | None = None
) -> pa.Table:
    """Batches with one feature list as one table of `candidate_schema`'s columns, the
    request-level text dictionary-encoded (each value once per request; readers of the
    files get plain strings). Each column is built once for all batches: per-batch Arrow
    calls were most of the writer's CPU. `pin_ids`: each batch's ids already as strings."""
    feature_names = batches[0].feature_names
    counts = np.fromiter((len(b) for b in batches), dtype=np.int64, count=len(batches))
    owner = np.repeat(np.arange(len(batches), dtype=np.int32), counts)

    def text(name: str) -> pa.DictionaryArray:
        return _per_request([getattr(b, name) for b in batches], owner)

    def concatenated(name: str, dtype: type) -> pa.Array:
        return pa.array(
            np.concatenate([np.asarray(getattr(b, name), dtype=dtype) for b in batches])
        )

    micros = np.repeat(np.array([round(b.ts * 1e6) for b in batches], dtype=np.int64), counts)
    if pin_ids is None:
        pin_ids = [_pin_id_strings(b.pin_ids) for b in batches]
    # Feature matrices are row-major per candidate: transposed batch by batch (each fits in
    # cache; the whole file's matrix at once took a fifth of the writer's time), then joined.
    features = np.concatenate([np.asarray(b.features, dtype=np.float32).T for b in batches], axis=1)
    columns = [
        text("request_id"),
        pa.array(micros, type=TIMESTAMP),
        text("user_id"),
        text("user_locale"),
        _per_request_lists([list(b.user_interests) for b in batches], owner),
        pa.concat_arrays(list(pin_ids)),
        _sources(batches),
        concatenated("visit_scores", np.float32),
        concatenated("model_scores", np.float32),
        concatenated("ranks", np.int32),
        concatenated("returned", bool),
        text("model_version"),
        text("arm"),
        pa.array(
            np.concatenate(
                [b.returned if b.propensities is None else b.propensities for b in batches]
            ).astype(np.float32)
        ),
        text("shadow_version"),
        pa.array(
            np.concatenate(
                [
                    np.full(len(b), np.nan, np.float32)
                    if b.shadow_scores is None
                    else np.asarray(b.shadow_scores, dtype=np.float32)
                    for b in batches
                ]
            )
        ),
    ]
    columns += [pa.array(column) for column in features]
    schema = pa.schema(
        [
            field.with_type(column.type)
            for field, column in zip(candidate_schema(feature_names), columns, strict=True)
        ]
    )
    return pa.Table.from_arrays(columns, schema=schema)


class CandidateSink(Protocol):
    """Where the request path hands its candidates: a `CandidateLog`, or the server's
    `walkrank.log_process.ProcessLog` of one."""

    def submit(self, record: CandidateBatch) -> bool: ...


class CandidateLog(PartitionedLog[CandidateBatch, tuple[CandidateBatch, pa.Array]]):
    """The serving-stage candidate log of one server: `submit` one batch per logged request.

    Which requests are logged (the tenant's sample rate) is decided by the caller from a hash
    of the request id (`walkrank.serving.pipeline.is_sampled`), before it builds the batch.
    """

    def __init__(
        self,
        root: Path,
        options: WriterOptions[CandidateBatch] | None = None,
    ) -> None:
        self.root = Path(root)
        # Min/max statistics only where readers prune row groups: the time window. Pin ids
        # are mostly distinct within a row group: without a dictionary the writer spends 10%
        # less CPU on them and the files are 6% smaller (40.1 against 42.7 kB per request).
        # LZ4, not zstd: the log is written on the serving machine for every request and read
        # once by training; LZ4 cuts the writer's CPU by a fifth (0.2 ms per 2,000-candidate
        # request, benchmarks/log_writer.py) for files 27-38% larger.
        super().__init__(
            self.root / "candidates",
            options,
            compression="lz4",
            statistics=("ts",),
            plain_text=("pin_id",),
        )

    def _rows(self, record: CandidateBatch) -> int:
        return len(record)

    def _pieces(self, record: CandidateBatch) -> list[Piece[tuple[CandidateBatch, pa.Array]]]:
        _check_request_values(record)
        partition = (("tenant", record.tenant),) + hour_partition(int(record.ts // 3600))
        # Pin ids are converted here, so ids that cannot be strings drop this batch only.
        return [
            Piece(
                partition,
                tuple(record.feature_names),
                len(record),
                (record, _pin_id_strings(record.pin_ids)),
            )
        ]

    def _table(self, payloads: list[tuple[CandidateBatch, pa.Array]]) -> pa.Table:
        batches, pin_ids = zip(*payloads, strict=True)
        return candidates_table(batches, pin_ids)


# --- reading back ------------------------------------------------------------------------------


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
    try:
        schema = pa.unify_schemas([base_schema] + [f.physical_schema for f in fragments])
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
    return files.to_table(filter=row_filter)


def read_candidates(
    root: Location, tenant: str, start: TimeLike = None, end: TimeLike = None
) -> pa.Table:
    """One tenant's logged candidates with `start <= ts < end` (datetimes or epoch seconds),
    in write order: the columns of `CANDIDATE_COLUMNS` then every `f_<feature>` seen."""
    return read_partitioned(
        join(as_location(root), "candidates"),
        [("tenant", pa.string()), ("date", pa.string()), ("hour", pa.int32())],
        CANDIDATE_COLUMNS,
        "ts",
        start=start,
        end=end,
        where=pc.field("tenant") == tenant,
    )
