"""The candidate log written by a child process: nothing accepted is lost, drops are counted,
flush/close wait for the files, and a dead server or a broken child never hangs anyone."""

from __future__ import annotations

import functools
import multiprocessing
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from test_candidate_log import make_batch

from walkrank.candidate_log import CandidateBatch, CandidateLog, read_candidates
from walkrank.errors import DataError
from walkrank.log_process import ProcessLog


def _wait_for(event: object, _batch: CandidateBatch) -> None:
    """writer_hook: hold the child's writer until the test lets it go."""
    event.wait(60)  # type: ignore[attr-defined]


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
    factory = functools.partial(CandidateLog, tmp_path, queue_size=1,
                                writer_hook=functools.partial(_wait_for, release))
    dropped: list[str] = []
    log = ProcessLog(factory, ring_bytes=4096, on_drop=lambda b: dropped.append(b.request_id))
    # The child's writer holds the first batch, its queue holds one, the relay waits with
    # what it took from the ring, and the ring holds a few more (about 1 kB each): past
    # that, submit must drop, not block.
    results = [log.submit(make_batch(f"r{i}", seed=i)) for i in range(40)]
    release.set()
    assert log.close(timeout=60)
    accepted = [f"r{i}" for i, ok in enumerate(results) if ok]
    assert dropped and len(accepted) + len(dropped) == 40
    assert log.dropped_batches == len(dropped) and log.dropped_rows == 7 * len(dropped)
    table = read_candidates(tmp_path, "home")
    assert sorted(set(table["request_id"].to_pylist())) == sorted(accepted)


def test_a_child_that_cannot_start_fails_flush_instead_of_hanging(tmp_path: Path) -> None:
    log = ProcessLog(functools.partial(CandidateLog, tmp_path, queue_size=0))
    assert log.submit(make_batch("r0"))
    assert not log.flush(timeout=30)  # the child raised DataError and exited
    assert not log.close(timeout=30)


def test_the_child_writes_what_it_holds_when_the_server_dies(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import functools, os, sys
        sys.path[:0] = {sys.path!r}
        from test_candidate_log import make_batch
        from walkrank.candidate_log import CandidateLog
        from walkrank.log_process import ProcessLog
        log = ProcessLog(functools.partial(CandidateLog, {str(tmp_path)!r}))
        for i in range(5):
            assert log.submit(make_batch(f"r{{i}}", seed=i))
        print(log._process.pid, flush=True)
        os._exit(0)  # die without closing: the child must notice and write on its own
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
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
            batch = CandidateBatch(**{**vars(batch), "pin_ids": np.array(
                [f"pin-{p}" for p in batch.pin_ids], dtype=object)})
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
