"""The candidate log written by a child process: nothing accepted is lost, drops are counted,
flush/close wait for the files, and a dead server or a broken child never hangs anyone."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pytest
from test_candidate_log import make_batch

from walkrank.errors import DataError
from walkrank.logs.candidates import CandidateBatch, CandidateLog, read_candidates
from walkrank.logs.partitioned import PartitionedLog, WriterOptions
from walkrank.logs.process import ProcessLog


def _wait_for(event: object, _batch: CandidateBatch) -> None:
    """writer_hook: hold the child's writer until the test lets it go."""
    event.wait(60)  # type: ignore[attr-defined]


def _hold_marked(batch: CandidateBatch) -> None:
    """writer_hook: a batch whose id starts with "held" stops the child's writer for good."""
    if batch.request_id.startswith("held"):
        threading.Event().wait(120)


def _refuse_to_start(
    _options: WriterOptions[CandidateBatch],
) -> PartitionedLog[CandidateBatch, Any]:
    """factory: a log that cannot be built (as a child whose log directory is refused)."""
    raise DataError("this log cannot start")


def _replaced(log: ProcessLog, pid: int | None, timeout_s: float = 30.0) -> float:
    """Seconds until the log runs a child other than `pid` (the supervisor replaced it)."""
    start = time.monotonic()
    tick = threading.Event()
    while log.pid == pid:
        assert time.monotonic() - start < timeout_s, "the dead writer was never replaced"
        tick.wait(0.002)
    return time.monotonic() - start


def test_flush_and_close_write_every_accepted_batch(tmp_path: Path) -> None:
    log = ProcessLog(functools.partial(CandidateLog, tmp_path))
    sent = [make_batch(f"r{i}", seed=i) for i in range(20)]
    assert all(log.submit(batch) for batch in sent[:10])
    assert log.flush(timeout=60)
    assert read_candidates(tmp_path, "home").num_rows == 70
    assert log.child_stats["written_rows"] == 70
    assert all(log.submit(batch) for batch in sent[10:])
    assert log.close(timeout=60)
    table = read_candidates(tmp_path, "home")
    assert table.num_rows == 140
    assert sorted(set(table["request_id"].to_pylist())) == sorted(b.request_id for b in sent)
    assert not log.submit(sent[0]) and log.dropped_batches == 1  # closed: refused, counted


def test_a_full_queue_drops_and_counts_but_loses_nothing_accepted(tmp_path: Path) -> None:
    release = multiprocessing.get_context("spawn").Event()
    options = WriterOptions(queue_size=1, writer_hook=functools.partial(_wait_for, release))
    lost: list[tuple[str, int]] = []
    log = ProcessLog(
        functools.partial(CandidateLog, tmp_path),
        options,
        ring_bytes=4096,
        on_lost=lambda *loss: lost.append(loss),
    )
    # The child's writer holds the first batch, its queue holds one, the relay waits with
    # what it took from the ring, and the ring holds a few more (about 1 kB each): past
    # that, submit must drop, not block.
    results = [log.submit(make_batch(f"r{i}", seed=i)) for i in range(40)]
    release.set()
    assert log.close(timeout=60)
    accepted = [f"r{i}" for i, ok in enumerate(results) if ok]
    dropped = len(results) - len(accepted)
    assert dropped and lost == [("queue_full", 7)] * dropped
    assert log.dropped_batches == dropped and log.dropped_rows == 7 * dropped
    assert log.lost == {"queue_full": 7 * dropped} and log.written_rows == 7 * len(accepted)
    table = read_candidates(tmp_path, "home")
    assert sorted(set(table["request_id"].to_pylist())) == sorted(accepted)


def test_a_busy_ring_lock_neither_stalls_nor_drops_a_submit(tmp_path: Path) -> None:
    """While the child holds the ring's write-position lock (as one descheduled between
    taking and releasing it would), submit keeps the record instead of waiting for the lock
    and then refusing it; the position is published once the lock is free (by the
    supervisor, or the control that close appends), and every row is written."""
    log = ProcessLog(functools.partial(CandidateLog, tmp_path))
    assert log.flush(timeout=60)
    lock = log._writer.ring._written.get_lock()
    assert lock.acquire(timeout=10)
    try:
        assert all(log.submit(make_batch(f"r{i}", seed=i)) for i in range(5))
        assert log.dropped_batches == 0
    finally:
        lock.release()
    assert log.close(timeout=60)
    assert read_candidates(tmp_path, "home").num_rows == 35 and not log.lost


def test_a_child_that_cannot_start_fails_flush_instead_of_hanging(tmp_path: Path) -> None:
    log = ProcessLog(_refuse_to_start)
    assert log.submit(make_batch("r0"))
    assert not log.flush(timeout=30)  # the child raised DataError and exited
    assert not log.close(timeout=30)


def test_the_child_writes_what_it_holds_when_the_server_dies(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import functools, os, sys
        sys.path[:0] = {sys.path!r}
        from test_candidate_log import make_batch
        from walkrank.logs.candidates import CandidateLog
        from walkrank.logs.process import ProcessLog
        log = ProcessLog(functools.partial(CandidateLog, {str(tmp_path)!r}))
        for i in range(5):
            assert log.submit(make_batch(f"r{{i}}", seed=i))
        print(log.pid, flush=True)
        os._exit(0)  # die without closing: the child must notice and write on its own
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    child = int(out.stdout.split()[-1])
    gone = threading.Event()
    for _ in range(3000):  # the child checks its parent every second
        if not Path(f"/proc/{child}").exists():
            break
        gone.wait(0.01)
    assert read_candidates(tmp_path, "home").num_rows == 35


def test_records_cross_a_small_ring_many_times_intact(tmp_path: Path) -> None:
    """Entries wrap around the shared ring again and again: every array and field arrives
    as sent, and a record larger than the whole ring is refused and counted."""
    log = ProcessLog(functools.partial(CandidateLog, tmp_path), ring_bytes=8192)
    sent = []
    for i in range(60):
        batch = make_batch(f"r{i}", k=1 + i % 17, seed=i)
        if i % 3 == 0:  # text ids are pickled with the fields, numbers go as raw bytes
            batch = CandidateBatch(
                **{
                    **vars(batch),
                    "pin_ids": np.array([f"pin-{p}" for p in batch.pin_ids], dtype=object),
                }
            )
        sent.append(batch)
        assert log.submit(batch)
        if i % 4 == 3:
            assert log.flush(timeout=60)  # the child drains the ring
    assert not log.submit(make_batch("huge", k=2000)) and log.dropped_batches == 1
    assert log.close(timeout=60)
    table = read_candidates(tmp_path, "home")
    assert table.num_rows == sum(len(b) for b in sent)
    for batch in sent:
        rows = table.filter(pc.field("request_id") == batch.request_id)
        expected = [p if isinstance(p, str) else str(p) for p in batch.pin_ids]
        assert rows["pin_id"].to_pylist() == expected
        np.testing.assert_array_equal(rows["f_visits"].to_numpy(), batch.features[:, 0])
        np.testing.assert_array_equal(rows["rank"].to_numpy(), batch.ranks)
        np.testing.assert_array_equal(rows["returned"].to_numpy(), batch.returned)


def test_ring_size_is_checked() -> None:
    with pytest.raises(DataError, match="ring_bytes must be a multiple of 64"):
        ProcessLog(functools.partial(CandidateLog, "unused"), ring_bytes=1000)


def test_a_killed_writer_is_replaced_at_once_and_every_row_it_held_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The child is SIGKILLed holding rows in its writer, its queue and the ring: the server
    reaps and replaces it within a second, counts exactly those rows, and logs on."""
    lost: list[tuple[str, int]] = []
    log = ProcessLog(
        functools.partial(CandidateLog, tmp_path),
        WriterOptions(queue_size=2, writer_hook=_hold_marked),
        ring_bytes=1 << 20,
        on_lost=lambda *loss: lost.append(loss),
    )
    assert all(log.submit(make_batch(f"r{i}", seed=i)) for i in range(10))
    assert log.flush(timeout=60)  # 70 rows written
    assert all(
        log.submit(make_batch(name, seed=i))
        for i, name in enumerate(["held"] + [f"r{i}" for i in range(10, 30)])
    )
    first = log.pid
    with caplog.at_level(logging.ERROR, logger="walkrank.logs.process"):
        os.kill(first, signal.SIGKILL)
        assert _replaced(log, first) < 1.0
    assert not Path(f"/proc/{first}").exists()  # reaped, not left a zombie
    assert all(log.submit(make_batch(f"r{i}", seed=i)) for i in range(30, 40))
    assert log.close(timeout=60)

    table = read_candidates(tmp_path, "home")
    assert sorted(set(table["request_id"].to_pylist())) == sorted(
        f"r{i}" for i in [*range(10), *range(30, 40)]
    )
    assert lost == [("writer_died", 21 * 7)] and log.lost == {"writer_died": 147}
    assert log.submitted_rows == 41 * 7 == table.num_rows + 147 == log.written_rows + 147
    assert log.restarts == 1
    assert "died (killed by SIGKILL); 147 rows it had accepted were not written" in caplog.text


def test_kills_mid_stream_lose_no_row_uncounted(tmp_path: Path) -> None:
    """Kills at whatever point the child is (taking from the ring, converting, writing row
    groups): rows submitted == rows on disk + rows counted lost, after every restart."""
    lost: list[tuple[str, int]] = []
    log = ProcessLog(
        functools.partial(CandidateLog, tmp_path),
        WriterOptions(row_group_rows=50),
        ring_bytes=1 << 20,
        on_lost=lambda *loss: lost.append(loss),
    )
    sizes = []
    for round_ in range(3):
        for i in range(80):
            sizes.append(1 + (i * 7 + round_) % 23)
            log.submit(make_batch(f"r{round_}-{i}", k=sizes[-1], seed=i))
            if i == 19:
                assert log.flush(timeout=60)  # the child is up and has caught up
        pid = log.pid
        os.kill(pid, signal.SIGKILL)  # while it works through the last 60 batches
        _replaced(log, pid)
    assert log.close(timeout=60)
    on_disk = read_candidates(tmp_path, "home").num_rows
    counted = sum(rows for reason, rows in lost if reason == "writer_died")
    assert log.restarts == 3 and counted > 0
    assert log.submitted_rows == on_disk + counted == log.written_rows + counted
    assert log.submitted_rows + log.dropped_rows == sum(sizes)


def test_an_oversized_record_is_dropped_alone_and_counted(tmp_path: Path) -> None:
    lost: list[tuple[str, int]] = []
    log = ProcessLog(
        functools.partial(CandidateLog, tmp_path), on_lost=lambda *loss: lost.append(loss)
    )
    batches = [make_batch(f"r{i}", seed=i) for i in range(6)]
    batches.insert(3, make_batch("x" * 1_100_000, k=2000, seed=9))
    assert all(log.submit(batch) for batch in batches)
    assert log.close(timeout=60)
    assert lost == [("bad_record", 2000)]
    assert read_candidates(tmp_path, "home").num_rows == 42 == log.written_rows
