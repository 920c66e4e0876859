"""A partitioned log written by a child process, so logging costs the server no GIL time.

Turning a request's 2,000 candidates into Arrow columns and Parquet pages takes about 1 ms
of CPU; in the server process that competed with the requests' own Python (measured on 2
cores: logging cost 20% of the throughput with the writer as a thread). Here a spawned child
process, at a lower CPU priority, runs an ordinary `PartitionedLog` on the records.

Records reach it through a ring of shared memory that the child polls: the submitting
thread copies a record's numeric arrays (for a dataclass record; everything else is
pickled beside them) and moves the ring's write position, nothing more. A multiprocessing
queue made each request pickle 200 kB in a feeder thread that held the GIL and woke up per
record: 14% of the server's GIL time under load.

Semantics match the in-process log: `submit` never blocks and counts what it drops when the
ring is full; `flush` and `close` wait until everything accepted before them is written.
The child ignores SIGINT/SIGTERM (the server closes it after draining its calls) and, if
the server dies without closing it, writes what it holds and exits.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from walkrank.candidate_log import Intake, PartitionedLog
from walkrank.errors import DataError

log = logging.getLogger(__name__)

R = TypeVar("R")

# How often the child checks that the server is alive, and the server that the child is
# while it waits for an answer.
_LIVENESS_CHECK_S = 1.0
# How long the child sleeps when the ring is empty: records wait at most this long (files
# are written by size or age anyway), and an idle server costs the child 100 wake-ups a
# second.
_POLL_S = 0.01
# 32 MiB holds 160 home-feed requests (200 kB each) between the server and the child.
DEFAULT_RING_BYTES = 32 << 20
_ALIGN = 64
# Each entry starts with its length and where its pickled part starts (uint64 each); a
# length of 0 means "nothing more before the end of the ring: continue at its start".
_HEADER = 16


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _Control:
    """Flush (or close) after every record queued before it; answered with `sequence`."""

    close: bool
    sequence: int


@dataclass(frozen=True)
class _Placed:
    """An array of a record, stored at `offset` from the start of its entry."""

    offset: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Shipped:
    """A dataclass record with its numeric arrays stored beside this (pickled) part."""

    kind: type
    fields: dict[str, Any]
    arrays: dict[str, _Placed]


def _numeric_arrays(record: Any) -> dict[str, np.ndarray]:
    """A dataclass record's numeric numpy fields: what can travel as raw bytes."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        return {}
    return {field.name: value for field in dataclasses.fields(record)
            if isinstance(value := getattr(record, field.name), np.ndarray)
            and value.dtype.kind in "biufc"}


class _Ring:
    """Entries in shared memory, appended by the server (one thread at a time: the caller
    holds a lock) and taken in order by the child.

    Positions count bytes from the start and only grow (`% size` is the place); an entry
    never wraps: one that does not fit before the end goes to the start of the next lap. The
    two positions are shared values whose locks order the entries' bytes with them on every
    architecture, not only x86.
    """

    def __init__(self, context: Any, size: int) -> None:
        if size < 4 * _ALIGN or size % _ALIGN:
            raise DataError(f"ring_bytes must be a multiple of {_ALIGN} and at least "
                            f"{4 * _ALIGN}, got {size}")
        self.size = size
        try:
            self._memory = context.RawArray("B", size)
        except OSError as exc:  # /dev/shm (or the temp directory) too small
            raise DataError(f"cannot allocate {size:,} bytes of shared memory for the log "
                            f"writer's ring (log_ring_mb): {exc}") from exc
        self._written = context.Value("Q", 0)  # moved by the server
        self._read = context.Value("Q", 0)  # moved by the child
        self._data: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}  # the numpy view is made again on each side

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.frombuffer(self._memory, dtype=np.uint8)
        return self._data

    def append(self, record: Any) -> bool:
        """Store a record; False (nothing stored) when it does not fit now."""
        arrays = _numeric_arrays(record)
        places, pickled_at = {}, _HEADER
        for name, array in arrays.items():
            places[name] = _Placed(pickled_at, array.dtype.str, array.shape)
            pickled_at += _aligned(array.nbytes)
        if arrays:
            fields = {field.name: getattr(record, field.name)
                      for field in dataclasses.fields(record) if field.name not in places}
            record = _Shipped(type(record), fields, places)
        pickled = np.frombuffer(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL),
                                dtype=np.uint8)
        length = _aligned(pickled_at + pickled.size)
        with self._written.get_lock():
            written = self._written.value
        with self._read.get_lock():
            read = self._read.value
        place = written % self.size
        skip = self.size - place if place + length > self.size else 0
        if written + skip + length - read > self.size:
            return False
        data = self.data
        if skip:
            data[place:place + _HEADER].view(np.uint64)[0] = 0
            place = 0
        for name, array in arrays.items():
            at = place + places[name].offset
            np.copyto(data[at:at + array.nbytes].view(array.dtype).reshape(array.shape), array)
        data[place + pickled_at:place + pickled_at + pickled.size] = pickled
        data[place:place + _HEADER].view(np.uint64)[:] = (length, pickled_at)
        with self._written.get_lock():  # publishes the bytes above with the position
            self._written.value = written + skip + length
        return True

    def take_all(self) -> list[Any]:
        """Every record appended since the last call, in order; their space is free again."""
        with self._written.get_lock():
            written = self._written.value
        with self._read.get_lock():
            read = self._read.value
        data = self.data
        records = []
        while read < written:
            place = read % self.size
            length, pickled_at = (int(v) for v in data[place:place + _HEADER].view(np.uint64))
            if length == 0:  # the rest of this lap is unused
                read += self.size - place
                continue
            entry = data[place:place + length]
            # pickle.loads ignores the alignment padding after the pickled part.
            record = pickle.loads(entry[pickled_at:])
            if isinstance(record, _Shipped):
                arrays = {}
                for name, placed in record.arrays.items():
                    dtype = np.dtype(placed.dtype)
                    nbytes = dtype.itemsize * int(np.prod(placed.shape, dtype=np.int64))
                    arrays[name] = entry[placed.offset:placed.offset + nbytes].view(
                        dtype).reshape(placed.shape).copy()
                record = record.kind(**record.fields, **arrays)
            records.append(record)
            read += length
        with self._read.get_lock():
            self._read.value = read
        return records


def _relay(factory: Callable[[], PartitionedLog[Any, Any]], ring: _Ring, acks: Any, nice: int,
           server_pid: int) -> None:
    """The child: hand each record to a local log (waiting, never dropping), answer controls,
    and write what it holds if the server dies without closing it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    local = factory()
    checked = time.monotonic()
    while True:
        records = ring.take_all()
        for item in records:
            if isinstance(item, _Control):
                done = local.close() if item.close else local.flush()
                acks.put((item.sequence, done, local.stats()))
                if item.close:
                    return
            else:
                local.submit(item, wait=True)
        if time.monotonic() - checked >= _LIVENESS_CHECK_S:
            checked = time.monotonic()
            # The server's pid comes from the server: it may die before this child gets here.
            if os.getppid() != server_pid:
                log.error("log writer: the server exited without closing the log; writing "
                          "what was received")
                for item in ring.take_all():
                    if not isinstance(item, _Control):
                        local.submit(item, wait=True)
                local.close()
                return
        if not records:
            time.sleep(_POLL_S)


class ProcessLog(Intake[R]):
    """`submit` / `flush` / `close` of a `PartitionedLog` built by `factory` in a child."""

    def __init__(self, factory: Callable[[], PartitionedLog[R, Any]], *,
                 ring_bytes: int = DEFAULT_RING_BYTES, rows: Callable[[R], int] = len,
                 on_drop: Callable[[R], None] | None = None, nice: int = 0,
                 name: str = "walkrank-log") -> None:
        # spawn, not fork: the server has threads (gRPC, numba) that a fork would copy mid-work.
        context = multiprocessing.get_context("spawn")
        self._ring = _Ring(context, ring_bytes)
        self._acks = context.Queue()
        super().__init__(on_drop)
        self._rows = rows
        self._control_lock = threading.Lock()  # one flush/close in flight: answers in order
        self._sequence = itertools.count(1)
        #: The child's last reported `PartitionedLog.stats()` (after a flush or close).
        self.child_stats: dict[str, int | bool] = {}
        self._process = context.Process(target=_relay, name=name, daemon=True,
                                        args=(factory, self._ring, self._acks, nice,
                                              os.getpid()))
        self._process.start()

    def submit(self, record: R) -> bool:
        """Store a record for the child without ever blocking; False when dropped (the ring
        is full, or the log closed)."""
        return self._offer(record, self._rows(record), lambda: self._append(record))

    def _append(self, record: Any) -> None:
        if not self._ring.append(record):
            raise queue.Full

    def _control(self, close: bool, timeout: float | None) -> bool:
        """Send a control after everything stored so far; wait for the child's answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._control_lock:
            sequence = next(self._sequence)
            while True:
                with self._lock:  # ordered with the records other threads submit
                    if self._ring.append(_Control(close, sequence)):
                        break
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                if not self._process.is_alive():
                    return False
                time.sleep(_POLL_S)  # the ring is full: the child is draining it
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
        """Stop accepting records, write everything stored, stop the child."""
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
        self._acks.close()
        return done
