"""A partitioned log written by a child process, so logging costs the server no GIL time.

Turning a request's 2,000 candidates into Arrow columns and Parquet pages takes about 1 ms
of CPU, a third of it holding the GIL in many short Arrow calls; in the server process that
competed with the requests' own Python (measured on 2 cores: logging cost 20% of the
throughput with the writer as a thread). Here the server only pickles each record into a
bounded multiprocessing queue (numpy arrays go as buffers) and a spawned child process,
at a lower CPU priority, runs an ordinary `PartitionedLog` on them.

Semantics match the in-process log: `submit` never blocks and counts what it drops when the
queue is full; `flush` and `close` wait until everything accepted before them is written.
The child ignores SIGINT/SIGTERM (the server closes it after draining its calls) and, if
the server dies without closing it, writes what it holds and exits.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from walkrank.candidate_log import Intake, PartitionedLog
from walkrank.errors import DataError

log = logging.getLogger(__name__)

R = TypeVar("R")

# How often the child checks that the server is alive, and the server that the child is
# while it waits for an answer.
_LIVENESS_CHECK_S = 1.0


@dataclass(frozen=True)
class _Control:
    """Flush (or close) after every record queued before it; answered with `sequence`."""

    close: bool
    sequence: int


def _relay(factory: Callable[[], PartitionedLog[Any]], records: Any, acks: Any, nice: int,
           server_pid: int) -> None:
    """The child: hand each record to a local log (waiting, never dropping), answer controls.

    Records are received on a thread while the main thread watches the server: a server
    that dies mid-send leaves a half-written record that would block the receiver forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    local = factory()
    closed = threading.Event()

    def receive() -> None:
        while True:
            item = records.get()
            if isinstance(item, _Control):
                done = local.close() if item.close else local.flush()
                acks.put((item.sequence, done, local.stats()))
                if item.close:
                    closed.set()
                    return
            else:
                local.submit(item, wait=True)

    threading.Thread(target=receive, name="walkrank-log-relay", daemon=True).start()
    while not closed.wait(_LIVENESS_CHECK_S):
        # The server's pid comes from the server: it may die before this child gets here.
        if os.getppid() != server_pid:  # it died without closing the log
            log.error("log writer: the server exited without closing the log; writing what "
                      "was received")
            local.close()
            return


class ProcessLog(Intake[R]):
    """`submit` / `flush` / `close` of a `PartitionedLog` built by `factory` in a child."""

    def __init__(self, factory: Callable[[], PartitionedLog[R]], *, queue_size: int = 1024,
                 rows: Callable[[R], int] = len, on_drop: Callable[[R], None] | None = None,
                 nice: int = 0, name: str = "walkrank-log") -> None:
        if queue_size < 1:
            raise DataError(f"queue_size must be at least 1, got {queue_size}")
        # spawn, not fork: the server has threads (gRPC, numba) that a fork would copy mid-work.
        context = multiprocessing.get_context("spawn")
        self._records = context.Queue(maxsize=queue_size)
        self._acks = context.Queue()
        super().__init__(on_drop)
        self._rows = rows
        self._control_lock = threading.Lock()  # one flush/close in flight: answers in order
        self._sequence = itertools.count(1)
        #: The child's last reported `PartitionedLog.stats()` (after a flush or close).
        self.child_stats: dict[str, int | bool] = {}
        self._process = context.Process(target=_relay, name=name, daemon=True,
                                        args=(factory, self._records, self._acks, nice,
                                              os.getpid()))
        self._process.start()

    def submit(self, record: R) -> bool:
        """Queue a record without ever blocking; False when dropped (queue full or closed)."""
        return self._offer(record, self._rows(record), lambda: self._records.put_nowait(record))

    def _control(self, close: bool, timeout: float | None) -> bool:
        """Send a control after everything queued so far; wait for the child's answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._control_lock:
            sequence = next(self._sequence)
            try:
                self._records.put(_Control(close, sequence), timeout=timeout)
            except queue.Full:
                return False
            while True:
                remaining = _LIVENESS_CHECK_S if deadline is None else min(
                    _LIVENESS_CHECK_S, deadline - time.monotonic())
                if remaining <= 0:
                    return False
                try:
                    answered, done, stats = self._acks.get(timeout=remaining)
                except queue.Empty:
                    if not self._process.is_alive():
                        log.error("log writer process exited (code %s) with records unwritten",
                                  self._process.exitcode)
                        return False
                    continue
                self.child_stats = stats
                if answered == sequence:
                    return bool(done)

    def flush(self, timeout: float | None = None) -> bool:
        """Write everything submitted so far, and wait for it; False if `timeout` ran out."""
        if self._closed:
            return not self._process.is_alive()
        return self._control(False, timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting records, write everything queued, stop the child."""
        if self._mark_closed():
            self._process.join(timeout)
            return not self._process.is_alive()
        done = self._control(True, timeout)
        self._process.join(5.0 if done else 0.0)
        if self._process.is_alive():
            log.error("log writer process did not finish in time; terminating it")
            self._process.terminate()
            self._process.join()
            return False
        self._records.close()
        self._acks.close()
        return done
