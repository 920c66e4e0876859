"""Serving-stage candidate log: every generated candidate, shown or not, with its features.

Logging at the serving stage (the article's choice) means no client needs its own logging and
the unseen candidates are there to train on. The request path only hands a columnar
`CandidateBatch` to the log (a `CandidateLog`, or the server's child-process writer,
`walkrank.logs.process.ProcessLog`); the writer (`walkrank.logs.partitioned.PartitionedLog`)
turns batches into Parquet files, grouped by Hive partitions and made visible atomically.

Layout (see docs/logging.md):
`<root>/candidates/tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>/part-<time>-<uuid>.parquet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
"""Columns of every candidate file, before the `f_<feature>` columns (float32, one per feature),
as readers get them: files store integer pin ids as int64 (`read_candidates` returns strings),
the interests on a request's first row only (`FIRST_ROW_ONLY`), and `visit_score` only as
`VISIT_SCORE_FEATURE` when the tenant's features include it, and no column of
`PER_FILE_TEXT` that is null on all of a file's rows.
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


def _pin_id_array(pin_ids: np.ndarray) -> pa.Array:
    """External pin ids as the files store them: integer ids as int64, any others as strings.
    A decimal string per candidate cost the writer a cast and more bytes to encode and
    compress; readers get strings either way."""
    array = pa.array(pin_ids)
    if array.type in (pa.int64(), pa.string()):  # the usual ones: no cast to pay for
        return array
    return array.cast(pa.int64() if pa.types.is_integer(array.type) else pa.string())


MAX_REQUEST_BYTES = 64 << 10
"""The most UTF-8 bytes of request-level text (request_id, user_id, user_locale,
model_version and the user_interests) one logged request may carry; a batch over it is
dropped alone and counted (`bad_record`). Readers expand these values to every candidate
row, so they must stay small."""
MAX_INTERESTS = 256
"""The most user_interests one logged request may carry (same rule)."""

FIRST_ROW_ONLY = "user_interests"
"""The column files hold on each request's first row only (null on its other rows);
`read_candidates` gives every row the value of its request (same `request_id` and `ts`), as
files written before did."""
WALK_SOURCE = "walk"  # walkrank.features.WALK_SOURCE (the log imports no serving code)
VISIT_SCORE_FEATURE = "f_walk_score"
"""The feature column that is the walk's score, as `visit_score` is (walkrank.features'
`walk_score`): a file whose batches all had the same values in both stores them once, in
this column, without a `visit_score` column (a twentieth of the bytes and of the encoding
time of a home-feed file). `read_candidates` and `stored_columns`/`with_visit_scores` give
readers `visit_score` back."""
PER_FILE_TEXT = ("model_version", "arm", "shadow_version")
"""Request-level values that files hold on all their rows or on none (the writer files
batches apart by which of these they lack; the server sets the first two on every request,
and the third for a tenant with a shadow model): a file declares them never null, or leaves
out a column that is null on all its rows (`read_candidates` reads it as null). The
definition levels of a nullable column were half of its encoding time."""
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


def _per_request(values: list[str | None], counts: np.ndarray) -> pa.DictionaryArray:
    """One value per request, stored once and pointed at by each of its candidates (a
    request's 2,000 copies of a long id once overflowed Arrow's 2 GB string limit). Each
    distinct value is in the dictionary once: given a dictionary with repeats (the same arm
    or locale for every request), Parquet writes the column without one, every row's string
    in full."""
    codes: dict[str, int] = {}
    code = np.fromiter(
        (-1 if v is None else codes.setdefault(v, len(codes)) for v in values),
        dtype=np.int32,
        count=len(values),
    )
    missing = code < 0
    if missing.any():
        indices = pa.array(np.repeat(np.maximum(code, 0), counts), mask=np.repeat(missing, counts))
    else:
        indices = pa.array(np.repeat(code, counts))
    return pa.DictionaryArray.from_arrays(indices, pa.array(list(codes) or [""], pa.string()))


def _first_row_lists(lists: list[Sequence[str]], counts: np.ndarray) -> pa.ListArray:
    """Each request's list on its first candidate's row, null on the others (`read_candidates`
    fills them back in): a list per candidate made Parquet write 2,000 repetition and
    definition levels and element indices per request, a quarter of the file's encoding time.
    """
    starts = (np.cumsum(counts) - counts)[counts > 0]
    lengths = np.zeros(int(counts.sum()), dtype=np.int32)
    lengths[starts] = [len(v) for v, k in zip(lists, counts, strict=True) if k]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    first = np.zeros(len(lengths), dtype=bool)
    first[starts] = True
    values = pa.array([t for v, k in zip(lists, counts, strict=True) if k for t in v], pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~first))


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
    batches: Sequence[CandidateBatch],
    pin_ids: Sequence[pa.Array] | None = None,
    *,
    visit_scores: bool = True,
) -> pa.Table:
    """Batches with one feature list as one table of `candidate_schema`'s columns, the
    request-level text dictionary-encoded (each value once per request; readers of the
    files get plain strings). Each column is built once for all batches: per-batch Arrow
    calls were most of the writer's CPU. `pin_ids`: each batch's ids already converted, all
    of one type (`_pin_id_array`); `visit_scores=False` leaves the `visit_score` column out
    (batches whose `VISIT_SCORE_FEATURE` holds the same values)."""
    feature_names = batches[0].feature_names
    counts = np.fromiter((len(b) for b in batches), dtype=np.int64, count=len(batches))

    def text(name: str) -> pa.DictionaryArray:
        return _per_request([getattr(b, name) for b in batches], counts)

    def concatenated(name: str, dtype: type) -> pa.Array:
        return pa.array(
            np.concatenate([np.asarray(getattr(b, name), dtype=dtype) for b in batches])
        )

    micros = np.repeat(np.array([round(b.ts * 1e6) for b in batches], dtype=np.int64), counts)
    if pin_ids is None:
        pin_ids = [_pin_id_array(b.pin_ids) for b in batches]
    # Feature matrices are row-major per candidate: transposed batch by batch (each fits in
    # cache; the whole file's matrix at once took a fifth of the writer's time) into one
    # row-major matrix, whose rows Arrow then takes as they are (np.concatenate of the
    # transposes laid it out column-major again: Arrow copied every strided row).
    features = np.empty((len(feature_names), int(counts.sum())), dtype=np.float32)
    for batch, start, end in zip(
        batches, np.cumsum(counts) - counts, np.cumsum(counts), strict=True
    ):
        features[:, start:end] = batch.features.T
    columns = [
        text("request_id"),
        pa.array(micros, type=TIMESTAMP),
        text("user_id"),
        text("user_locale"),
        _first_row_lists([b.user_interests for b in batches], counts),
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
            field.with_type(column.type).with_nullable(
                field.name == FIRST_ROW_ONLY
                or (field.nullable and (field.name not in PER_FILE_TEXT or column.null_count > 0))
            )
            for field, column in zip(candidate_schema(feature_names), columns, strict=True)
        ]
    )
    table = pa.Table.from_arrays(columns, schema=schema)
    left_out = [n for n in PER_FILE_TEXT if all(getattr(b, n) is None for b in batches)]
    return table.drop_columns(left_out + ([] if visit_scores else ["visit_score"]))


def _visit_scores_in_features(batch: CandidateBatch) -> bool:
    """Whether the batch's `VISIT_SCORE_FEATURE` column holds its visit scores (as stored:
    float32), so a file can store them once."""
    name = VISIT_SCORE_FEATURE.removeprefix("f_")
    if name not in batch.feature_names:
        return False
    column = batch.features[:, list(batch.feature_names).index(name)]
    return bool(
        np.array_equal(
            np.asarray(column, dtype=np.float32), np.asarray(batch.visit_scores, dtype=np.float32)
        )
    )


def stored_columns(wanted: Sequence[str], names: Sequence[str]) -> list[str]:
    """The columns to read from a candidate file with columns `names` for `wanted` columns:
    `visit_score` is read from `VISIT_SCORE_FEATURE` in files that store it there
    (`with_visit_scores` then names it again)."""
    if "visit_score" not in wanted or "visit_score" in names or VISIT_SCORE_FEATURE not in names:
        return list(wanted)
    return [c for c in wanted if c != "visit_score"] + [
        c for c in (VISIT_SCORE_FEATURE,) if c not in wanted
    ]


def with_visit_scores(table: pa.Table, wanted: Sequence[str]) -> pa.Table:
    """A table read with `stored_columns(wanted, ...)`, as the `wanted` columns."""
    if "visit_score" in wanted and "visit_score" not in table.column_names:
        table = table.append_column(
            CANDIDATE_COLUMNS.field("visit_score"), table.column(VISIT_SCORE_FEATURE)
        )
    return table.select(list(wanted))


class CandidateSink(Protocol):
    """Where the request path hands its candidates: a `CandidateLog`, or the server's
    `walkrank.logs.process.ProcessLog` of one."""

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
        # are mostly distinct within a row group: without a dictionary the writer spends less
        # CPU on them and the files are smaller. LZ4, not zstd: the log is written on the
        # serving machine for every request and read once by training; LZ4 costs the writer
        # less CPU than zstd for somewhat larger files (benchmarks/log_writer.py measures the
        # writer's CPU). Integer pin ids and ranks are delta-bit-packed: with LZ4 on PLAIN
        # values they cost the writer the most CPU of any column.
        super().__init__(
            self.root / "candidates",
            options,
            compression="lz4",
            statistics=("ts",),
            plain_text=("pin_id",),
            packed_integers=("pin_id", "rank"),
        )

    def _rows(self, record: CandidateBatch) -> int:
        return len(record)

    def _pieces(self, record: CandidateBatch) -> list[Piece[tuple[CandidateBatch, pa.Array]]]:
        _check_request_values(record)
        partition = (("tenant", record.tenant),) + hour_partition(int(record.ts // 3600))
        # Pin ids are converted here, so ids that cannot be converted drop this batch only;
        # integer and string ids never share a file, nor do batches whose visit scores are
        # stored once and those whose are not, nor batches missing other `PER_FILE_TEXT`.
        pin_ids = _pin_id_array(record.pin_ids)
        layout = (
            tuple(record.feature_names),
            pin_ids.type,
            _visit_scores_in_features(record),
            tuple(getattr(record, name) is None for name in PER_FILE_TEXT),
        )
        return [
            Piece(
                partition,
                layout,
                len(record),
                (record, pin_ids),
            )
        ]

    def _table(self, payloads: list[tuple[CandidateBatch, pa.Array]]) -> pa.Table:
        batches, pin_ids = zip(*payloads, strict=True)
        # A file's batches share their layout: the first one's says for all.
        return candidates_table(
            batches, pin_ids, visit_scores=not _visit_scores_in_features(batches[0])
        )


# --- reading back ------------------------------------------------------------------------------


def read_candidates(
    root: Location, tenant: str, start: TimeLike = None, end: TimeLike = None
) -> pa.Table:
    """One tenant's logged candidates with `start <= ts < end` (datetimes or epoch seconds),
    in write order: the columns of `CANDIDATE_COLUMNS` then every `f_<feature>` seen."""
    table = read_partitioned(
        join(as_location(root), "candidates"),
        [("tenant", pa.string()), ("date", pa.string()), ("hour", pa.int32())],
        CANDIDATE_COLUMNS,
        "ts",
        start=start,
        end=end,
        where=pc.field("tenant") == tenant,
    )
    table = _fill_first_row_only(table, f"{join(as_location(root), 'candidates')} ({tenant})")
    return _fill_visit_scores(table)


def _fill_visit_scores(table: pa.Table) -> pa.Table:
    """`visit_score` on the rows of files that store it as `VISIT_SCORE_FEATURE` only: those
    rows have none (files that have the column have it on every row)."""
    index = table.schema.get_field_index("visit_score")
    column = table.column(index)
    if not column.null_count or VISIT_SCORE_FEATURE not in table.column_names:
        return table
    filled = pc.coalesce(column, table.column(VISIT_SCORE_FEATURE))
    return table.set_column(index, CANDIDATE_COLUMNS.field("visit_score"), filled)


def _fill_first_row_only(table: pa.Table, where: str) -> pa.Table:
    """Every row gets its request's `FIRST_ROW_ONLY` value, from the row of the same
    `request_id` and `ts` that holds it: by key, not by position, so files whose rows were
    reordered or split (a shuffle, a compaction) read the same."""
    index = table.schema.get_field_index(FIRST_ROW_ONLY)
    column = table.column(index)
    if column.null_count:
        keys = ["request_id", "ts"]
        present = column.is_valid()
        holders = (
            table.select(keys)
            .append_column("holder", pa.array(np.arange(table.num_rows, dtype=np.int64)))
            .filter(present)
            .group_by(keys, use_threads=False)
            .aggregate([("holder", "min")])
        )
        rows = (
            table.select(keys)
            .append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
            .join(holders, keys, join_type="left outer", use_threads=False)
            .sort_by("row")
        )
        holder = rows["holder_min"]
        if holder.null_count:
            first = rows.filter(pc.is_null(holder)).slice(0, 1)
            raise DataError(
                f"{where}: request {first['request_id'][0].as_py()!r} has no row with its "
                f"{FIRST_ROW_ONLY} (its first candidate row is missing)"
            )
        column = column.take(holder)
    return table.set_column(index, CANDIDATE_COLUMNS.field(FIRST_ROW_ONLY), column)
