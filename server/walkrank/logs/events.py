"""Downstream events: what the client's full ranker and its users did with our candidates.

Events are the labels each tenant trains on. They arrive through ReportEvents or
`walkrank events import FILE`, are validated row by row (bad rows are rejected and counted,
the rest kept), and are written by the same background Parquet writer as the candidate log
under `<root>/events/tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>/part-*.parquet`.

Every event belongs to the tenant that reported it, and labels only that tenant's candidates:
request ids are chosen by clients, so one tenant could otherwise quote another's and write
its training labels. The server also refuses, at report time, events quoting a request id it
recently served for another tenant (`RequestOwners`). Files written before events had a
tenant (directly under `events/date=...`) are read with a null tenant and still label any
tenant's candidates by request id, as they did when they were written.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from walkrank.errors import DataError
from walkrank.logs.partitioned import (
    PARTITION_VALUE,
    TIMESTAMP,
    PartitionedLog,
    Piece,
    TimeLike,
    WriterOptions,
    hour_partition,
    read_partitioned,
)
from walkrank.storage import Location, as_location, join

EVENT_TYPES: tuple[str, ...] = (
    "scored",
    "impression",
    "closeup",
    "click",
    "save",
    "share",
    "hide",
)
"""Every event type accepted, lower case:

- `scored`: the client's full ranker scored the pin (`score` holds it) but the event says
  nothing about whether it was shown; the distillation label strategy uses these scores.
- `impression`: the pin was shown to the user (it passed the full ranker).
- `closeup`, `click`, `save`, `share`: the user acted on the pin (the actions).
- `hide`: the user hid the pin (an explicit negative).

Any event but `scored` implies the pin was shown.
"""
ACTION_EVENTS: tuple[str, ...] = ("closeup", "click", "save", "share")

EVENT_SCHEMA = pa.schema(
    [
        ("tenant", pa.string()),
        ("request_id", pa.string()),
        ("pin_id", pa.string()),
        ("event", pa.string()),
        ("timestamp", TIMESTAMP),
        ("score", pa.float64()),
    ]
)
"""Columns of accepted events, and of `read_events` (the files hold the others: the tenant
is in their path)."""

REQUIRED_COLUMNS = ("request_id", "pin_id", "event")
FOREIGN_REQUEST = "unknown request_id for this tenant"
"""The rejection of an event quoting a request served for another tenant (which tenant is
never said)."""
# Epoch seconds outside [1970, 2100) are almost always milliseconds or garbage.
MAX_EPOCH_SECONDS = 4_102_444_800.0


@dataclass(frozen=True)
class RejectedRow:
    """One rejected event: its 0-based position in the input, and why."""

    index: int
    reason: str


@dataclass(frozen=True)
class RejectionReport:
    """How many input rows were rejected, the first few with reasons, and counts per problem."""

    count: int
    examples: tuple[RejectedRow, ...] = ()
    by_problem: Mapping[str, int] = field(default_factory=dict)

    def lines(self, row_offset: int = 0) -> list[str]:
        """Human-readable lines; `row_offset` shifts indices (1 gives 1-based data rows)."""
        out = [f"row {r.index + row_offset}: {r.reason}" for r in self.examples]
        if self.count > len(self.examples):
            out.append(f"... and {self.count - len(self.examples)} more")
        return out


class _Checks:
    """Collects per-row failures; the first failing check of a row is its reason."""

    def __init__(self, n: int) -> None:
        self.bad = np.zeros(n, dtype=bool)
        self.reason_of: dict[int, str] = {}
        self.problems: Counter[str] = Counter()
        self._describers: list[tuple[np.ndarray, str, Callable[[int], str]]] = []

    def add(self, failed: np.ndarray, problem: str, describe: Callable[[int], str]) -> None:
        new = failed & ~self.bad
        self.bad |= failed
        if new.any():
            self.problems[problem] += int(new.sum())
            self._describers.append((new, problem, describe))

    def report(self, max_examples: int) -> RejectionReport:
        rows = np.flatnonzero(self.bad)[:max_examples]
        examples = []
        for row in rows:
            for failed, _, describe in self._describers:
                if failed[row]:
                    examples.append(RejectedRow(int(row), describe(int(row))))
                    break
        return RejectionReport(int(self.bad.sum()), tuple(examples), dict(self.problems))


def _as_table(events: pa.Table | pa.RecordBatch | Mapping, source: str) -> pa.Table:
    if isinstance(events, pa.Table):
        return events
    if isinstance(events, pa.RecordBatch):
        return pa.Table.from_batches([events])
    try:
        return pa.table(dict(events))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise DataError(f"{source}: cannot read the event columns: {exc}") from exc


def _id_column(table: pa.Table, name: str, source: str) -> pa.ChunkedArray:
    column = table[name]
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pc.utf8_trim_whitespace(column.cast(pa.string()))
    if pa.types.is_null(kind):
        return column.cast(pa.string())
    raise DataError(f"{source}: column {name!r} has type {kind}; ids must be strings or integers")


def _parse_timestamps(
    column: pa.ChunkedArray, now_us: int, checks: _Checks, source: str
) -> np.ndarray:
    """Epoch microseconds per row (missing -> now); rows that cannot be read are failed."""
    kind = column.type
    values = (
        column.to_pylist() if pa.types.is_string(kind) or pa.types.is_large_string(kind) else None
    )
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        if pa.types.is_date(kind):
            column = column.cast(pa.timestamp("s"))
        micros = column.cast(pa.timestamp("us")).cast(pa.int64())
        seconds = micros.fill_null(0).to_numpy().astype(np.float64) / 1e6
        missing = micros.is_null().to_numpy(zero_copy_only=False)
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
        seconds = column.cast(pa.float64()).fill_null(np.nan).to_numpy()
        missing = column.is_null().to_numpy(zero_copy_only=False)
    elif values is not None:
        seconds = np.full(len(values), np.nan)
        missing = np.zeros(len(values), dtype=bool)
        unreadable = np.zeros(len(values), dtype=bool)
        for i, text in enumerate(values):
            text = (text or "").strip()
            if not text:
                missing[i] = True
                continue
            try:
                seconds[i] = float(text)
                continue
            except ValueError:
                pass
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                unreadable[i] = True
                continue
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            seconds[i] = moment.timestamp()
        checks.add(
            unreadable,
            "unreadable timestamp",
            lambda i: f"timestamp: cannot read {values[i]!r} (epoch seconds or ISO 8601)",
        )
    elif pa.types.is_null(kind):
        seconds = np.full(len(column), np.nan)
        missing = np.ones(len(column), dtype=bool)
    else:
        raise DataError(
            f"{source}: column 'timestamp' has type {kind}; expected epoch seconds, "
            "ISO 8601 text or a timestamp"
        )
    seconds = np.where(missing, now_us / 1e6, seconds)
    with np.errstate(invalid="ignore"):
        out_of_range = ~((seconds >= 0) & (seconds < MAX_EPOCH_SECONDS))
    checks.add(
        out_of_range,
        "bad timestamp",
        lambda i: (
            f"timestamp: {float(seconds[i]):.15g} is not epoch seconds in 1970..2100"
            + (" (milliseconds?)" if seconds[i] >= MAX_EPOCH_SECONDS else "")
        ),
    )
    micros = np.where(out_of_range, 0, np.round(seconds * 1e6))
    return micros.astype(np.int64)


def _parse_scores(column: pa.ChunkedArray, checks: _Checks, source: str) -> pa.Array:
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        texts = column.to_pylist()
        scores: list[float | None] = []
        unreadable = np.zeros(len(texts), dtype=bool)
        for i, text in enumerate(texts):
            text = (text or "").strip()
            if not text:
                scores.append(None)
                continue
            try:
                scores.append(float(text))
            except ValueError:
                scores.append(None)
                unreadable[i] = True
        checks.add(unreadable, "unreadable score", lambda i: f"score: {texts[i]!r} is not a number")
        array = pa.array(scores, type=pa.float64())
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind):
        array = column.cast(pa.float64()).combine_chunks()
    else:
        raise DataError(f"{source}: column 'score' has type {kind}; expected numbers")
    values = array.fill_null(0.0).to_numpy()
    checks.add(
        ~np.isfinite(values),
        "non-finite score",
        lambda i: f"score: {float(values[i])} is not finite",
    )
    return array


def _tenants(table: pa.Table, tenant: str | None, checks: _Checks, source: str) -> pa.Array:
    """Each row's tenant: `tenant`, or the table's `tenant` column (which, when both are
    given, must agree with it); rows without a usable one are failed."""
    if tenant is not None and not PARTITION_VALUE.match(tenant):
        raise DataError(f"{source}: {tenant[:64]!r} is not a tenant name")
    if "tenant" not in table.column_names:
        if tenant is None:
            raise DataError(
                f"{source}: no tenant: name the tenant the events belong to, or "
                "give a 'tenant' column"
            )
        return pa.array([tenant] * table.num_rows, pa.string())
    names = _id_column(table, "tenant", source).combine_chunks()
    values = names.to_pylist()
    if tenant is not None:
        other = np.array([v not in ("", None, tenant) for v in values])
        checks.add(
            other,
            "other tenant",
            lambda i: (
                f"tenant: {values[i][:64]!r}, not {tenant!r} (the tenant these events are for)"
            ),
        )
        return pa.array([tenant] * table.num_rows, pa.string())
    missing = np.array([not v for v in values])
    checks.add(missing, "missing tenant", lambda i: "tenant: missing")
    unusable = np.array([bool(v) and not PARTITION_VALUE.match(v) for v in values])
    checks.add(unusable, "bad tenant", lambda i: f"tenant: {values[i][:64]!r} is not a tenant name")
    return names


def validate_events(
    events: pa.Table | pa.RecordBatch | Mapping,
    *,
    tenant: str | None = None,
    owners: RequestOwners | None = None,
    now: float | None = None,
    source: str = "events",
    max_examples: int = 10,
) -> tuple[pa.Table, RejectionReport]:
    """Split events into accepted rows (in `EVENT_SCHEMA`) and a report of the rejected ones.

    Every event belongs to a tenant: `tenant`, or the input's `tenant` column (a DataError
    when there is neither; with both, rows naming another tenant are rejected). Rows are
    rejected for a missing request_id, pin_id or tenant, an event type not in `EVENT_TYPES`
    (matched after trimming and lower-casing), an unreadable timestamp or one outside
    1970..2100 (epoch milliseconds are the usual culprit), a non-finite or unreadable score,
    and a request_id that `owners` knows was served for another tenant (`FOREIGN_REQUEST`).
    A missing timestamp means `now` (the time of the report); a missing score is allowed.
    A missing required column is a DataError naming `source` and the column.
    """
    table = _as_table(events, source)
    absent = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if absent:
        raise DataError(
            f"{source}: missing required column(s) {', '.join(absent)} "
            f"(found: {', '.join(table.column_names) or 'none'})"
        )
    n = table.num_rows
    checks = _Checks(n)
    ids = {}
    for name in ("request_id", "pin_id"):
        ids[name] = _id_column(table, name, source)
        empty = pc.fill_null(pc.equal(ids[name], ""), True).to_numpy(zero_copy_only=False)

        def missing(i: int, name: str = name) -> str:
            return f"{name}: missing"

        checks.add(empty, f"missing {name}", missing)
    tenants = _tenants(table, tenant, checks, source)

    raw_event = table["event"]
    if not (
        pa.types.is_string(raw_event.type)
        or pa.types.is_large_string(raw_event.type)
        or pa.types.is_dictionary(raw_event.type)
        or pa.types.is_null(raw_event.type)
    ):
        raise DataError(f"{source}: column 'event' has type {raw_event.type}; expected text")
    event = pc.utf8_lower(pc.utf8_trim_whitespace(raw_event.cast(pa.string())))
    no_event = pc.fill_null(pc.equal(event, ""), True).to_numpy(zero_copy_only=False)
    checks.add(no_event, "missing event", lambda i: "event: missing")
    known = pc.fill_null(pc.is_in(event, value_set=pa.array(EVENT_TYPES)), False)
    known = known.to_numpy(zero_copy_only=False)
    raw_events = raw_event.cast(pa.string())
    checks.add(
        ~known,
        "unknown event type",
        lambda i: (
            f"event: unknown type {raw_events[i].as_py()!r} (known: {', '.join(EVENT_TYPES)})"
        ),
    )

    now_us = round((time.time() if now is None else now) * 1e6)
    if "timestamp" in table.column_names:
        micros = _parse_timestamps(table["timestamp"], now_us, checks, source)
    else:
        micros = np.full(n, now_us, dtype=np.int64)
    if "score" in table.column_names:
        scores = _parse_scores(table["score"], checks, source)
    else:
        scores = pa.nulls(n, pa.float64())
    if owners is not None:
        checks.add(
            owners.foreign(ids["request_id"].to_pylist(), tenants.to_pylist()),
            FOREIGN_REQUEST,
            lambda i: f"request_id: {FOREIGN_REQUEST}",
        )

    accepted = pa.Table.from_arrays(
        [
            tenants,
            ids["request_id"],
            ids["pin_id"],
            event,
            pa.array(micros, type=TIMESTAMP),
            scores,
        ],
        schema=EVENT_SCHEMA,
    ).filter(pa.array(~checks.bad))
    return accepted, checks.report(max_examples)


class RequestOwners:
    """Which tenants recently served each request id, so that events quoting a request of
    another tenant can be refused when they are reported.

    Bounded to `capacity` request ids, the oldest forgotten first; 0 remembers nothing. An
    id it does not know (too old, or served before a restart) is not refused: the event is
    stored with the reporting tenant and can only ever label that tenant's own candidates.
    `add` runs on every served request: a hash, a dict update and a list store (about a
    microsecond). Ids are kept as Python string hashes (keyed per process, so callers cannot
    aim collisions) with a bit per tenant, since two tenants may use the same id.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise DataError(f"the request id memory must be >= 0 ids, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._owners: dict[int, int] = {}  # hash of a request id -> bits of its tenants
        self._order = [0] * capacity  # the remembered hashes, oldest at _next once full
        self._next = 0
        self._bits: dict[str, int] = {}

    def add(self, request_id: str, tenant: str) -> None:
        """Remember that `tenant` served `request_id`."""
        if not self.capacity:
            return
        key = hash(request_id)
        with self._lock:
            bit = self._bits.get(tenant)
            if bit is None:
                bit = self._bits[tenant] = 1 << len(self._bits)
            known = self._owners.get(key)
            if known is not None:
                self._owners[key] = known | bit
                return
            if len(self._owners) >= self.capacity:
                del self._owners[self._order[self._next]]
            self._order[self._next] = key
            self._next = (self._next + 1) % self.capacity
            self._owners[key] = bit

    def foreign(
        self, request_ids: Sequence[str | None], tenants: Sequence[str | None]
    ) -> np.ndarray:
        """Per row, whether its request id is known to be served for other tenants only."""
        owners, bits = self._owners, self._bits  # single lookups: safe without the lock
        out = np.zeros(len(request_ids), dtype=bool)
        for i, (request_id, tenant) in enumerate(zip(request_ids, tenants, strict=True)):
            known = owners.get(hash(request_id or ""), 0)
            out[i] = bool(known) and not known & bits.get(tenant or "", 0)
        return out


class EventLog(PartitionedLog[pa.Table, pa.Table]):
    """Accepted events (tables from `validate_events`) written as hourly Parquet partitions."""

    def __init__(
        self,
        root: Path,
        options: WriterOptions[pa.Table] | None = None,
    ) -> None:
        self.root = Path(root)
        super().__init__(self.root / "events", options)

    def submit(self, record: pa.Table, *, wait: bool = False) -> bool:
        """Queue accepted events (without blocking unless `wait`, as `PartitionedLog.submit`);
        False when dropped (queue full or closed)."""
        if not record.schema.equals(EVENT_SCHEMA):
            raise DataError(
                "EventLog.submit takes the accepted table of validate_events, got "
                f"columns {record.schema}"
            )
        return super().submit(record, wait=wait)

    def _rows(self, record: pa.Table) -> int:
        return record.num_rows

    def _pieces(self, record: pa.Table) -> list[Piece[pa.Table]]:
        # One import can span tenants and days: split by tenant and by the hour each event
        # happened in. The tenant goes into the path, not the file.
        codes = record["tenant"].combine_chunks().dictionary_encode()
        names = codes.dictionary.to_pylist()
        bad = [name for name in names if not PARTITION_VALUE.match(name or "")]
        if bad:
            raise DataError(f"events: tenant {bad[0]!r} cannot name a partition")
        tenant = codes.indices.to_numpy().astype(np.int64)
        hours = record["timestamp"].cast(pa.int64()).to_numpy() // 3_600_000_000
        order = np.lexsort((hours, tenant))
        keys = np.stack([tenant[order], hours[order]], axis=1)
        starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)])
        bounds = list(starts[1:]) + [len(order)]
        body = record.drop_columns(["tenant"])
        layout = tuple(body.column_names)
        return [
            Piece(
                (("tenant", names[tenant[order[lo]]]),) + hour_partition(int(hours[order[lo]])),
                layout,
                int(hi - lo),
                body.take(order[lo:hi]),
            )
            for lo, hi in zip(starts, bounds, strict=True)
        ]

    def _table(self, payloads: list[pa.Table]) -> pa.Table:
        return pa.concat_tables(payloads)


def read_events(
    root: Location, start: TimeLike = None, end: TimeLike = None, *, tenant: str | None = None
) -> pa.Table:
    """Logged events with `start <= timestamp < end` (datetimes or epoch seconds), in
    `EVENT_SCHEMA`. With `tenant`, only the events that may label that tenant's candidates:
    its own, and those of files written before events had a tenant (null `tenant`)."""
    where = (
        None if tenant is None else ((pc.field("tenant") == tenant) | pc.field("tenant").is_null())
    )
    table = read_partitioned(
        join(as_location(root), "events"),
        [("tenant", pa.string()), ("date", pa.string()), ("hour", pa.int32())],
        EVENT_SCHEMA,
        "timestamp",
        start=start,
        end=end,
        where=where,
    )
    return table.select(EVENT_SCHEMA.names)


_CSV_TEXT_COLUMNS = {
    name: pa.string() for name in (*REQUIRED_COLUMNS, "tenant", "timestamp", "score")
}


def read_event_file(path: Path) -> pa.Table:
    """An events file per the data contract (CSV, optionally compressed, or Parquet).

    CSV columns are read as text and parsed by `validate_events`, so one bad cell rejects its
    row instead of the whole file.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pq.read_table(path)
        if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zst")):
            return pa_csv.read_csv(
                path,
                convert_options=pa_csv.ConvertOptions(
                    column_types=_CSV_TEXT_COLUMNS, strings_can_be_null=True
                ),
            )
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read events: {exc}") from exc
    raise DataError(f"{path}: unknown file type; expected .csv (.gz/.bz2/.zst) or .parquet")


def import_events(
    path: Path,
    logs: Path,
    *,
    tenant: str | None = None,
    now: float | None = None,
    timeout: float = 600.0,
) -> tuple[int, RejectionReport]:
    """Validate an events file and write its accepted rows under `<logs>/events/`.

    The events belong to `tenant`, or to the file's `tenant` column (see `validate_events`).
    Returns (accepted rows, rejection report). A file without one valid row is a DataError.
    """
    table = read_event_file(path)
    accepted, report = validate_events(table, tenant=tenant, now=now, source=str(path))
    if accepted.num_rows == 0:
        detail = "; ".join(report.lines(row_offset=1)[:3])
        raise DataError(
            f"{path}: no valid event rows ({report.count} rejected"
            + (f": {detail}" if detail else "")
            + ")"
        )
    event_log = EventLog(logs)
    event_log.submit(accepted)
    finished = event_log.close(timeout)
    stats = event_log.stats()
    if not finished or stats["write_errors"] or stats["written_rows"] != accepted.num_rows:
        raise DataError(
            f"{path}: wrote only {stats['written_rows']} of {accepted.num_rows} "
            f"events under {event_log.directory} (see the log for the error)"
        )
    return accepted.num_rows, report
