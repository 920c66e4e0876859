"""The serving-stage candidate log: nothing accepted is lost, drops are counted, files are
atomic Hive partitions that pyarrow.dataset reads as they are."""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from walkrank.errors import DataError
from walkrank.logs.candidates import (
    CANDIDATE_COLUMNS,
    PER_FILE_TEXT,
    CandidateBatch,
    CandidateLog,
    candidates_table,
    read_candidates,
    stored_columns,
    with_visit_scores,
)
from walkrank.logs.partitioned import WriterOptions

HOUR = 3600
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
FEATURES = ("visits", "query_hits", "locale_match")


def make_batch(
    request_id: str,
    *,
    tenant: str = "home",
    ts: float = T0,
    k: int = 7,
    features: tuple[str, ...] = FEATURES,
    seed: int = 0,
) -> CandidateBatch:
    rng = np.random.default_rng(seed)
    order = rng.permutation(k).astype(np.int32)
    return CandidateBatch(
        request_id=request_id,
        tenant=tenant,
        ts=ts,
        user_id=f"user-{seed}",
        user_locale="en",
        user_interests=["travel", "food"],
        pin_ids=np.arange(1000 + seed * k, 1000 + (seed + 1) * k, dtype=np.int64),
        feature_names=list(features),
        features=rng.random((k, len(features)), dtype=np.float32),
        visit_scores=rng.random(k, dtype=np.float32),
        model_scores=rng.random(k, dtype=np.float32),
        ranks=order,
        returned=order < 3,
        model_version="4",
    )


def test_graceful_close_writes_every_accepted_row(tmp_path: Path) -> None:
    log = CandidateLog(tmp_path, WriterOptions(flush_rows=50))
    k, n = 7, 30
    batches = [
        make_batch(f"req-{i}", tenant=("home", "email")[i % 2], ts=T0 + (i % 3) * HOUR, k=k, seed=i)
        for i in range(n)
    ]
    assert all(log.submit(b) for b in batches)
    assert log.close(timeout=30)
    stats = log.stats()
    assert stats["written_rows"] == n * k and stats["dropped_rows"] == 0
    assert stats["lost_rows"] == 0 and not stats["writer_alive"]

    home, email = read_candidates(tmp_path, "home"), read_candidates(tmp_path, "email")
    assert home.num_rows + email.num_rows == n * k
    assert home.num_rows == 15 * k
    # One request read back exactly as it was submitted.
    sent = batches[4]
    got = home.filter(pc.field("request_id") == "req-4").sort_by("pin_id")
    assert got["pin_id"].to_pylist() == [str(p) for p in sent.pin_ids]
    for j, name in enumerate(FEATURES):
        np.testing.assert_array_equal(got[f"f_{name}"].to_numpy(), sent.features[:, j])
    np.testing.assert_array_equal(got["rank"].to_numpy(), sent.ranks)
    np.testing.assert_array_equal(got["returned"].to_numpy(), sent.returned)
    np.testing.assert_array_equal(got["model_score"].to_numpy(), sent.model_scores)
    assert set(got["user_interests"].to_pylist()[0]) == {"travel", "food"}
    assert got["ts"][0].as_py().timestamp() == T0 + HOUR
    assert set(got["model_version"].to_pylist()) == {"4"}


def test_one_file_of_many_requests_keeps_each_requests_values(tmp_path: Path) -> None:
    """A file's columns are built once from all its batches: every request-level value must
    still land on its own rows, whatever the batch sizes (an empty batch included). The
    interests are in the file on a request's first row only; the reader gives every row its
    request's list."""
    batches = []
    for i, k in enumerate((5, 0, 1, 9, 3)):
        batch = make_batch(f"req-{i}", k=k, seed=i)
        batches.append(
            CandidateBatch(
                **{
                    **vars(batch),
                    "user_interests": ["food"] * (i % 3),
                    "user_locale": None if i == 3 else f"l{i}",
                    "model_version": f"v{i}",
                }
            )
        )
    log = CandidateLog(tmp_path)
    assert all(log.submit(b) for b in batches) and log.close(timeout=30)
    [path] = (tmp_path / "candidates").rglob("*.parquet")
    stored = pq.read_table(path, columns=["user_interests"])["user_interests"].to_pylist()
    assert stored == [
        [],
        None,
        None,
        None,
        None,
        ["food", "food"],
        [],
        *[None] * 8,
        ["food"],
        None,
        None,
    ]
    table = read_candidates(tmp_path, "home")
    assert table.num_rows == 18
    start = 0
    for batch in batches:
        rows = table.slice(start, len(batch))
        start += len(batch)
        assert set(rows["request_id"].to_pylist()) <= {batch.request_id}
        assert rows["pin_id"].to_pylist() == [str(p) for p in batch.pin_ids]
        assert rows["user_id"].to_pylist() == [batch.user_id] * len(batch)
        assert rows["user_locale"].to_pylist() == [batch.user_locale] * len(batch)
        assert rows["model_version"].to_pylist() == [batch.model_version] * len(batch)
        assert rows["user_interests"].to_pylist() == [batch.user_interests] * len(batch)
        np.testing.assert_array_equal(rows["rank"].to_numpy(), batch.ranks)
        for j, name in enumerate(FEATURES):
            np.testing.assert_array_equal(rows[f"f_{name}"].to_numpy(), batch.features[:, j])
    # Never-null columns are declared so (model_version: set on each of the file's
    # requests; arm and shadow_version: on none, so left out), and only the time column
    # carries statistics.
    schema = pq.read_schema(path)
    assert [f.name for f in schema if f.nullable] == ["user_locale", "user_interests"]
    assert "arm" not in schema.names and "shadow_version" not in schema.names
    assert table["arm"].null_count == table["shadow_version"].null_count == 18
    row_group = pq.ParquetFile(path).metadata.row_group(0)
    with_stats = [
        row_group.column(c).path_in_schema
        for c in range(row_group.num_columns)
        if row_group.column(c).is_stats_set
    ]
    assert with_stats == ["ts"]


def test_files_are_written_a_row_group_at_a_time(tmp_path: Path) -> None:
    """The writer never holds more than a row group's pieces: each file fills as row groups
    of at least `row_group_rows` and closes at `flush_rows`; every row arrives in order."""
    written: list[int] = []
    options = WriterOptions[CandidateBatch](
        row_group_rows=10, flush_rows=35, on_write=lambda path, rows: written.append(rows)
    )
    log = CandidateLog(tmp_path, options)
    batches = [make_batch(f"r{i}", seed=i) for i in range(11)]  # 7 rows each
    assert all(log.submit(b) for b in batches) and log.close(timeout=30)
    assert written == [35, 35, 7]
    files = sorted((tmp_path / "candidates").rglob("*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in files] == [3, 3, 1]
    metadata = pq.ParquetFile(files[0]).metadata
    assert [metadata.row_group(g).num_rows for g in range(3)] == [14, 14, 7]
    table = read_candidates(tmp_path, "home")
    assert table["request_id"].to_pylist() == [b.request_id for b in batches for _ in range(7)]


def test_full_queue_drops_and_counts_but_loses_nothing_accepted(tmp_path: Path) -> None:
    holding, release = threading.Event(), threading.Event()

    def hold_writer(batch: CandidateBatch) -> None:
        holding.set()
        release.wait(30)

    dropped: list[str] = []
    log = CandidateLog(
        tmp_path,
        WriterOptions(
            queue_size=2,
            writer_hook=hold_writer,
            on_drop=lambda b: dropped.append(b.request_id),
        ),
    )
    k = 5
    assert log.submit(make_batch("taken", k=k))
    assert holding.wait(30)  # the writer holds "taken"; the queue is empty again
    assert log.submit(make_batch("queued-1", k=k, seed=1))
    assert log.submit(make_batch("queued-2", k=k, seed=2))
    assert not log.submit(make_batch("dropped-1", k=k, seed=3))
    assert not log.submit(make_batch("dropped-2", k=k, seed=4))
    stats = log.stats()
    assert (stats["dropped_batches"], stats["dropped_rows"]) == (2, 2 * k)
    assert stats["queued"] == 2
    assert dropped == ["dropped-1", "dropped-2"]

    release.set()
    assert log.close(timeout=30)
    table = read_candidates(tmp_path, "home")
    assert table.num_rows == 3 * k
    assert set(table["request_id"].to_pylist()) == {"taken", "queued-1", "queued-2"}
    assert not log.submit(make_batch("after-close", k=k))
    assert log.stats()["dropped_batches"] == 3


def test_partition_layout_atomic_files_and_hive_readers(tmp_path: Path) -> None:
    log = CandidateLog(tmp_path)
    for i, (tenant, ts) in enumerate(
        [("home", T0), ("home", T0 + 2 * HOUR), ("related_pins", T0 + 26 * HOUR)]
    ):
        log.submit(make_batch(f"r{i}", tenant=tenant, ts=ts, seed=i))
    assert log.close()
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    pattern = re.compile(
        r"candidates/tenant=([a-z_]+)/date=(\d{4}-\d\d-\d\d)/hour=(\d\d)/"
        r"part-\d{8}T\d{9}-[0-9a-f]{32}\.parquet"
    )
    assert [pattern.fullmatch(f).groups() for f in files] == [
        ("home", "2023-11-14", "22"),
        ("home", "2023-11-15", "00"),
        ("related_pins", "2023-11-16", "00"),
    ]
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left behind

    # Read as is by a generic Hive-partitioned reader, partition columns included.
    table = ds.dataset(tmp_path / "candidates", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 21
    assert sorted(
        set(zip(table["tenant"].to_pylist(), table["hour"].to_pylist(), strict=True))
    ) == [("home", 0), ("home", 22), ("related_pins", 0)]

    # Text columns are dictionary-encoded except the (mostly distinct) pin ids; float
    # features are not (that only costs time); integer pin ids and ranks are delta-packed.
    metadata = pq.ParquetFile(tmp_path / files[0]).metadata
    encodings = {
        metadata.schema.column(i).path: metadata.row_group(0).column(i).encodings
        for i in range(metadata.num_columns)
    }
    assert "RLE_DICTIONARY" in encodings["request_id"]
    assert not any("DICTIONARY" in e for e in encodings["pin_id"])  # ids: mostly distinct
    assert not any("DICTIONARY" in e for e in encodings["f_visits"])
    assert "DELTA_BINARY_PACKED" in encodings["pin_id"]
    assert "DELTA_BINARY_PACKED" in encodings["rank"]


def test_readers_skip_files_still_being_written(tmp_path: Path) -> None:
    log = CandidateLog(tmp_path)
    log.submit(make_batch("r0"))
    assert log.close()
    written = next((tmp_path / "candidates").rglob("part-*.parquet"))
    # What an in-progress write looks like: a dot-file next to the finished one.
    pq.write_table(pq.read_table(written), written.parent / f".{written.name}.tmp")
    assert read_candidates(tmp_path, "home").num_rows == 7


def test_flush_by_rows_and_by_time_without_waiting_on_real_time(tmp_path: Path) -> None:
    now = [T0]
    written: list[int] = []
    file_written = threading.Event()

    def on_write(path: Path, rows: int) -> None:
        written.append(rows)
        file_written.set()

    log = CandidateLog(
        tmp_path,
        WriterOptions(flush_rows=10, flush_seconds=60, clock=lambda: now[0], on_write=on_write),
    )
    log.submit(make_batch("a", k=6))
    log.submit(make_batch("b", k=6, seed=1))  # 12 rows >= flush_rows: written at once
    assert file_written.wait(30)
    assert written == [12]

    file_written.clear()
    log.submit(make_batch("c", k=3, seed=2))
    now[0] += 61  # the pending rows are now older than flush_seconds
    log.submit(make_batch("d", tenant="email", k=2, seed=3))
    assert file_written.wait(30)
    assert log.close()
    assert sorted(written) == [2, 3, 12]


def test_flush_makes_everything_submitted_readable(tmp_path: Path) -> None:
    log = CandidateLog(tmp_path)
    log.submit(make_batch("a"))
    assert log.flush(timeout=30)
    assert read_candidates(tmp_path, "home").num_rows == 7
    log.submit(make_batch("b", seed=1))
    assert log.close()
    assert read_candidates(tmp_path, "home").num_rows == 14


def test_feature_list_change_starts_new_columns(tmp_path: Path) -> None:
    log = CandidateLog(tmp_path)
    log.submit(make_batch("old", k=4))
    log.submit(make_batch("new", k=3, features=FEATURES + ("pin_age_days",), seed=1))
    assert log.close()
    assert len(list(tmp_path.rglob("*.parquet"))) == 2  # never two schemas in one file
    table = read_candidates(tmp_path, "home").sort_by("request_id")
    assert table.column_names[-4:] == [f"f_{n}" for n in FEATURES + ("pin_age_days",)]
    age = table["f_pin_age_days"]
    assert age.null_count == 4
    assert table.filter(pc.field("request_id") == "new")["f_pin_age_days"].null_count == 0


def test_visit_scores_equal_to_the_walk_score_feature_are_stored_once(tmp_path: Path) -> None:
    """The walk_score feature is the visit score: files store it once (as f_walk_score) and
    every reader gets visit_score back; a batch whose two columns differ keeps both, in a
    file of its own."""
    features = ("walk_score",) + FEATURES
    same = make_batch("same", k=5, features=features)
    same.features[:, 0] = same.visit_scores
    other = make_batch("other", k=4, features=features, seed=1)
    log = CandidateLog(tmp_path)
    log.submit(same)
    log.submit(other)
    assert log.close()
    files = {
        pq.read_table(p)["request_id"][0].as_py(): pq.read_schema(p).names
        for p in tmp_path.rglob("*.parquet")
    }
    assert "visit_score" not in files["same"] and "f_walk_score" in files["same"]
    assert {"visit_score", "f_walk_score"} <= set(files["other"])

    table = read_candidates(tmp_path, "home").sort_by("request_id")
    assert table.schema.field("visit_score") == CANDIDATE_COLUMNS.field("visit_score")
    assert table["visit_score"].null_count == 0
    rows = {r: table.filter(pc.field("request_id") == r) for r in ("same", "other")}
    for batch in (same, other):
        assert np.array_equal(rows[batch.request_id]["visit_score"], batch.visit_scores)
        assert np.array_equal(rows[batch.request_id]["f_walk_score"], batch.features[:, 0])

    # A reader of single files (the Dask trainer's) asks for the stored columns.
    wanted = ["request_id", "visit_score", "f_visits"]
    for path in tmp_path.rglob("*.parquet"):
        file = pq.ParquetFile(path)
        read = with_visit_scores(file.read(stored_columns(wanted, file.schema_arrow.names)), wanted)
        batch = same if read["request_id"][0].as_py() == "same" else other
        assert read.column_names == wanted
        assert np.array_equal(read["visit_score"], batch.visit_scores)


def test_time_window_reads_only_matching_rows(tmp_path: Path) -> None:
    log = CandidateLog(tmp_path)
    for hour in range(5):
        log.submit(make_batch(f"h{hour}", ts=T0 + hour * HOUR + 60, k=2, seed=hour))
    assert log.close()
    window = read_candidates(tmp_path, "home", start=T0 + HOUR, end=T0 + 3 * HOUR + 60)
    assert sorted(set(window["request_id"].to_pylist())) == ["h1", "h2"]
    since = read_candidates(tmp_path, "home", start=datetime.fromtimestamp(T0 + 4 * HOUR, UTC))
    assert set(since["request_id"].to_pylist()) == {"h4"}
    assert read_candidates(tmp_path, "nobody").num_rows == 0
    assert read_candidates(tmp_path / "missing", "home").schema.names[0] == "request_id"


def test_write_failure_is_counted_and_the_writer_survives(tmp_path: Path) -> None:
    (tmp_path / "candidates").write_text("not a directory")
    log = CandidateLog(tmp_path)
    log.submit(make_batch("a", k=5))
    assert log.flush(timeout=30)
    stats = log.stats()
    assert (stats["write_errors"], stats["lost_rows"], stats["writer_alive"]) == (1, 5, True)
    assert log.close()


def test_a_file_lost_after_row_groups_were_written_counts_all_its_rows(tmp_path: Path) -> None:
    """Row groups already in the hidden file count as lost when the file cannot be made
    visible; nothing half-written is left for readers, and the next file is written."""
    log = CandidateLog(tmp_path, WriterOptions(row_group_rows=7, flush_rows=1000))
    assert log.submit(make_batch("a")) and log.submit(make_batch("b", seed=1))
    done = threading.Event()
    for _ in range(4000):  # the first row group opened the hidden file
        hidden = list((tmp_path / "candidates").rglob(".part-*.tmp"))
        if hidden:
            break
        done.wait(0.005)
    shutil.rmtree(hidden[0].parent)  # the partition vanishes under the open file
    assert log.flush(timeout=30)
    stats = log.stats()
    assert (stats["write_errors"], stats["lost_rows"], stats["written_rows"]) == (1, 14, 0)
    assert log.submit(make_batch("c", seed=2)) and log.close(timeout=30)
    assert read_candidates(tmp_path, "home")["request_id"].to_pylist() == ["c"] * 7
    assert not list(tmp_path.rglob(".part-*"))


def test_bad_batches_are_refused_with_the_field_named() -> None:
    good = make_batch("a")
    with pytest.raises(DataError, match=r"features has shape \(7, 3\), expected \(7, 2\)"):
        CandidateBatch(**{**vars(good), "feature_names": ["visits", "query_hits"]})
    with pytest.raises(DataError, match="ranks has 6 entries for 7 pins"):
        CandidateBatch(**{**vars(good), "ranks": good.ranks[:6]})
    with pytest.raises(DataError, match="tenant '../etc'"):
        CandidateBatch(**{**vars(good), "tenant": "../etc"})
    with pytest.raises(DataError, match="user_interests must be a list of strings, got \\[1\\]"):
        CandidateBatch(**{**vars(good), "user_interests": [1]})
    with pytest.raises(DataError, match="user_id must be a string, got 7"):
        CandidateBatch(**{**vars(good), "user_id": 7})


def test_string_pin_ids_and_missing_model_version(tmp_path: Path) -> None:
    batch = make_batch("a", k=3)
    batch = CandidateBatch(
        **{
            **vars(batch),
            "pin_ids": np.array(["p-1", "p-2", "p-3"]),
            "model_version": None,
            "user_locale": None,
        }
    )
    table = candidates_table([batch])
    assert table["pin_id"].to_pylist() == ["p-1", "p-2", "p-3"]
    assert "model_version" not in table.column_names  # null on every row: left out
    assert table["user_locale"].null_count == 3
    assert table.schema.field("f_visits").type == pa.float32()


def test_requests_missing_a_per_file_value_go_to_files_of_their_own(tmp_path: Path) -> None:
    """model_version, arm and shadow_version are on all of a file's rows or on none: the
    writer files requests apart by which they lack, and readers get every row's value."""
    values = [("v1", "default", None), (None, "default", None), ("v1", "default", "v2")]
    batches = [
        CandidateBatch(
            **{
                **vars(make_batch(f"r{i}", k=3, seed=i)),
                **dict(zip(("model_version", "arm", "shadow_version"), value, strict=True)),
            }
        )
        for i, value in enumerate(values * 2)
    ]
    log = CandidateLog(tmp_path)
    assert all(log.submit(b) for b in batches) and log.close()
    schemas = [pq.read_schema(p) for p in tmp_path.rglob("*.parquet")]
    assert len(schemas) == 3
    for schema in schemas:
        assert not any(schema.field(n).nullable for n in PER_FILE_TEXT if n in schema.names)
    table = read_candidates(tmp_path, "home")
    for batch in batches:
        rows = table.filter(pc.field("request_id") == batch.request_id)
        for name in PER_FILE_TEXT:
            assert rows[name].to_pylist() == [getattr(batch, name)] * 3, name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux")
def test_writer_thread_runs_at_the_lower_priority_asked(tmp_path: Path) -> None:
    log = CandidateLog(tmp_path, WriterOptions(writer_nice=7))
    try:
        assert log.submit(make_batch("r0")) and log.flush(timeout=30)  # the writer has started
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, log._thread.native_id) == base + 7
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    finally:
        assert log.close()


def test_a_record_too_large_or_unconvertible_is_dropped_alone_and_the_file_written(
    tmp_path: Path,
) -> None:
    """A 1.1 MB request id on 2,000 candidates once overflowed Arrow's 2 GB string limit
    and cost the whole file; a batch Arrow cannot convert did too. Now each is dropped alone,
    counted, and the other batches of its row group and file are written."""
    lost: list[tuple[str, int]] = []
    log = CandidateLog(tmp_path, WriterOptions(on_lost=lambda *loss: lost.append(loss)))
    good = [make_batch(f"r{i}", seed=i) for i in range(6)]
    huge_id = make_batch("x" * 1_100_000, k=2000, seed=7)
    many_topics = CandidateBatch(
        **{**vars(make_batch("topics", seed=8)), "user_interests": [f"t{i}" for i in range(300)]}
    )
    unconvertible = CandidateBatch(
        **{**vars(make_batch("text", seed=9)), "features": np.full((7, 3), "n/a", dtype=object)}
    )
    for batch in (good[0], huge_id, good[1], many_topics, good[2], unconvertible, *good[3:]):
        assert log.submit(batch)
    assert log.close(timeout=60)
    stats = log.stats()
    assert lost == [("bad_record", 2000), ("bad_record", 7), ("bad_record", 7)]
    assert (stats["bad_records"], stats["lost_rows"], stats["written_rows"]) == (3, 2014, 42)
    table = read_candidates(tmp_path, "home")
    assert table["request_id"].to_pylist() == [b.request_id for b in good for _ in range(7)]


def test_request_level_values_are_stored_once_per_request(tmp_path: Path) -> None:
    """Request-level text is dictionary-encoded, one entry per request, however many
    candidates share it, and the interests are on a request's first row only; readers of
    the file still get plain strings, and `read_candidates` every row's interests."""
    batches = [
        CandidateBatch(
            **{
                **vars(make_batch(f"{i:04d}" + "y" * 15_000, k=2000, seed=i)),
                "user_interests": ["travel", f"topic-{i}"],
            }
        )
        for i in range(4)
    ]
    table = candidates_table(batches)
    assert table["request_id"].type == pa.dictionary(pa.int32(), pa.string())
    assert len(table["request_id"].chunk(0).dictionary) == 4
    interests = table["user_interests"]
    assert interests.null_count == 4 * 1999 and len(interests.chunk(0).values) == 8
    assert interests.to_pylist()[2000] == ["travel", "topic-1"]
    log = CandidateLog(tmp_path)
    assert all(log.submit(b) for b in batches) and log.close(timeout=60)
    [path] = (tmp_path / "candidates").rglob("*.parquet")
    assert path.stat().st_size < 1_000_000  # 8,000 rows of 15 kB ids: 120 MB if repeated
    schema = pq.read_schema(path)
    assert schema.field("request_id").type == pa.string()
    assert schema.field("user_interests").type == pa.list_(pa.string())
    first = pq.ParquetFile(path).read_row_group(0, columns=["request_id", "user_locale"])
    assert first["request_id"][0].as_py() == batches[0].request_id
    read = read_candidates(tmp_path, "home")["user_interests"].to_pylist()
    assert read == [b.user_interests for b in batches for _ in range(len(b))]


def test_files_with_interests_on_every_row_read_as_before(tmp_path: Path) -> None:
    """Files written before the interests moved to a request's first row (a list on every
    row) and integer pin ids to int64 (strings) and files written after read back alike,
    in one window; the time window keeps or drops a request's rows together, so a read
    never starts inside a request."""
    batches = [
        CandidateBatch(
            **{
                **vars(make_batch(f"r{i}", ts=T0 + i * HOUR, seed=i)),
                "user_interests": [f"t{i}"] * i,
            }
        )
        for i in range(4)
    ]
    log = CandidateLog(tmp_path)
    assert all(log.submit(b) for b in batches[1:]) and log.close(timeout=30)
    old = candidates_table(batches[:1])
    expanded = pa.array([batches[0].user_interests] * len(batches[0]))
    old = old.set_column(old.schema.get_field_index("user_interests"), "user_interests", expanded)
    old = old.set_column(
        old.schema.get_field_index("pin_id"), "pin_id", old["pin_id"].cast(pa.string())
    )
    old_dir = tmp_path / "candidates" / "tenant=home" / "date=2023-11-14" / "hour=22"
    old_dir.mkdir(parents=True)
    pq.write_table(old, old_dir / "part-00000000T000000000-old.parquet", store_schema=False)
    table = read_candidates(tmp_path, "home")
    assert table.schema.field("user_interests") == CANDIDATE_COLUMNS.field("user_interests")
    # Pin ids were strings in every file before; integer ids are int64 in files now.
    assert (
        pq.read_schema(next((tmp_path / "candidates").rglob("part-2*"))).field("pin_id").type
        == pa.int64()
    )
    assert table["pin_id"].to_pylist() == [str(p) for b in batches for p in b.pin_ids]
    assert table["user_interests"].to_pylist() == [
        b.user_interests for b in batches for _ in range(len(b))
    ]
    window = read_candidates(tmp_path, "home", T0 - HOUR, T0 + 2 * HOUR)
    assert window["user_interests"].to_pylist() == [[]] * 7 + [["t1"]] * 7
    window = read_candidates(tmp_path, "home", T0 + 2 * HOUR, T0 + 4 * HOUR)
    assert window["user_interests"].to_pylist() == [["t2"] * 2] * 7 + [["t3"] * 3] * 7


def test_interests_are_matched_by_request_not_by_position(tmp_path: Path) -> None:
    """Rows reordered and split across files (a shuffle, a compaction) still get their own
    request's interests; a request whose row holding them is gone is an error naming it."""
    batches = [
        CandidateBatch(**{**vars(make_batch(f"r{i}", seed=i)), "user_interests": [f"t{i}"]})
        for i in range(3)
    ]
    log = CandidateLog(tmp_path / "written")
    assert all(log.submit(b) for b in batches) and log.close(timeout=30)
    [path] = (tmp_path / "written").rglob("*.parquet")
    table = pq.read_table(path)
    order = np.random.default_rng(3).permutation(table.num_rows)
    target = tmp_path / "shuffled" / path.relative_to(tmp_path / "written")
    target.parent.mkdir(parents=True)
    pq.write_table(table.take(order[:10]), target.with_name("part-b.parquet"))
    pq.write_table(table.take(order[10:]), target.with_name("part-a.parquet"))
    got = read_candidates(tmp_path / "shuffled", "home")
    assert sorted(
        zip(got["request_id"].to_pylist(), got["user_interests"].to_pylist(), strict=True)
    ) == [(b.request_id, b.user_interests) for b in batches for _ in range(len(b))]
    target.with_name("part-a.parquet").unlink()
    holders = pc.is_valid(table["user_interests"])
    pq.write_table(table.filter(pc.invert(holders)), target.with_name("part-b.parquet"))
    with pytest.raises(DataError, match="request 'r0' has no row with its user_interests"):
        read_candidates(tmp_path / "shuffled", "home")


def test_values_shared_by_requests_keep_their_parquet_dictionary(tmp_path: Path) -> None:
    """Requests that share a value (the same user, locale, arm or model) put it in the
    dictionary once: given repeats, Parquet would write every row's string in full. A
    missing value stays null, apart from an empty one. Files are LZ4: the cheaper codec for
    a log written on the serving machine."""
    batches = [
        CandidateBatch(
            **{
                **vars(make_batch(f"req-{i}", k=50, seed=i)),
                "user_id": "same-user",
                "user_locale": (None, "", "en")[i % 3],
                "arm": "default",
            }
        )
        for i in range(6)
    ]
    table = candidates_table(batches)
    assert table["user_id"].chunk(0).dictionary.to_pylist() == ["same-user"]
    assert table["user_locale"].chunk(0).dictionary.to_pylist() == ["", "en"]
    log = CandidateLog(tmp_path)
    assert all(log.submit(b) for b in batches) and log.close(timeout=30)
    [path] = (tmp_path / "candidates").rglob("*.parquet")
    read = ds.dataset(path, format="parquet").to_table()
    assert read["user_locale"].to_pylist() == [
        (None, "", "en")[i % 3] for i in range(6) for _ in range(50)
    ]
    assert set(read["arm"].to_pylist()) == {"default"}
    row_group = pq.ParquetFile(path).metadata.row_group(0)
    chunks = {
        row_group.column(c).path_in_schema: row_group.column(c)
        for c in range(row_group.num_columns)
    }
    for name in ("request_id", "user_id", "user_locale", "model_version", "arm"):
        assert "RLE_DICTIONARY" in chunks[name].encodings, name
    assert {chunk.compression for chunk in chunks.values()} <= {"LZ4", "LZ4_RAW"}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"queue_size": 0}, "queue_size must be at least 1, got 0"),
        ({"flush_rows": 0}, "flush_rows must be at least 1, got 0"),
        ({"row_group_rows": 0}, "row_group_rows must be at least 1, got 0"),
        ({"flush_seconds": float("nan")}, "flush_seconds must be positive, got nan"),
    ],
)
def test_writer_options_are_checked_when_made(setting: dict[str, float], message: str) -> None:
    with pytest.raises(DataError, match=message):
        WriterOptions(**setting)  # type: ignore[arg-type]


def test_a_file_whose_column_does_not_read_as_the_logs_is_an_error(tmp_path: Path) -> None:
    """Base columns of another type are cast to the log's (integer pin ids); one that cannot
    be is a DataError naming the log's directory, a truncated file one naming the file; never
    an Arrow error."""
    log = CandidateLog(tmp_path)
    assert log.submit(make_batch("r0")) and log.close(timeout=30)
    [path] = (tmp_path / "candidates").rglob("*.parquet")
    table = pq.read_table(path)
    bad = table.set_column(
        table.schema.get_field_index("rank"), "rank", pa.array(["first"] * table.num_rows)
    )
    pq.write_table(bad, path.with_name("part-bad.parquet"))
    with pytest.raises(DataError, match="candidates: cannot read the log's files"):
        read_candidates(tmp_path, "home")
    path.with_name("part-bad.parquet").write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"part-bad\.parquet: not a readable Parquet file"):
        read_candidates(tmp_path, "home")
