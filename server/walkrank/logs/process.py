"""A partitioned log written by a child process, so logging costs the server no GIL time.

Turning a request's candidates into Arrow columns and Parquet pages is real CPU work; in the
server process it competed with the requests' own Python for the GIL (benchmarks/serving.py
measures what logging costs the throughput). Here a spawned child process, at a lower CPU
priority, runs an ordinary `PartitionedLog` on the records.

Records reach it through a ring of shared memory that the child polls: the submitting
thread copies a record's numeric arrays (for a dataclass record; everything else is
pickled beside them) and moves the ring's write position, nothing more (and never waits for
it: when the child holds that position's lock, the next submit or the supervisor moves it).
A multiprocessing queue made each request pickle its whole record in a feeder thread that
held the GIL and woke up per record.

Semantics match the in-process log: `submit` never blocks and counts what it drops when the
ring is full; `flush` and `close` wait until everything accepted before them is written.
The child ignores SIGINT/SIGTERM (the server closes it after draining its calls) and, if
the server dies without closing it, writes what it holds and exits.

Nothing accepted is lost without being counted. The child reports, in shared counters, the
rows it has written (after each file is renamed into place) and the rows its writer lost
(`LOSS_REASONS`). A supervisor thread waits on the child's process handle: when the child
dies it is reaped at once, replaced by a new one with a fresh ring (the old ring, and any
lock the dead child held, are abandoned), and the rows the dead child accepted but never
wrote (those in its ring, in its queue, in an unfinished file) are counted as `writer_died`:
accepted minus written minus already counted. The count is exact, except that a child killed
between renaming a file into place and counting it would count that file's rows both as
written and as lost: an upper bound, never an undercount.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from walkrank.errors import DataError
from walkrank.logs.partitioned import LOSS_REASONS, Intake, PartitionedLog, WriterOptions

log = logging.getLogger(__name__)

R = TypeVar("R")

# How often the child checks that the server is alive, and a flush that its child is.
_LIVENESS_CHECK_S = 1.0
# How often the supervisor reports the child's own losses and shows the child entries whose
# position a busy lock left unpublished (`_Ring.publish`); it hears of a death at once.
_SUPERVISE_S = 0.2
# A child that dies before it is ready is restarted at once; if the next one does too (its
# log cannot be built), after 1 s, then 2, 4, ... up to a minute, rather than in a loop.
_FIRST_BACKOFF_S = 1.0
_MAX_BACKOFF_S = 60.0
# The longest the child waits for a ring position's lock (the server never waits:
# `_Ring.publish`). Each side holds it for an instant, but a side killed while holding it
# never gives it back: the other side then gives up until the supervisor replaces the ring
# (what the server appended meanwhile is counted as the dead child's).
_LOCK_WAIT_S = 0.005
# How long the child sleeps when the ring is empty: records wait at most this long (files
# are written by size or age anyway), and an idle server costs the child 100 wake-ups a
# second.
_POLL_S = 0.01
# 32 MiB holds a burst of home-feed requests between the server and the child.
DEFAULT_RING_BYTES = 32 << 20
_ALIGN = 64
# Each entry starts with its length, where its pickled part starts and whether that is a
# shipped dataclass record (uint64 each); a length of 0 means "nothing more before the end
# of the ring: continue at its start". Arrays follow, each aligned.
_HEADER = 24
_FIRST_ARRAY = _ALIGN
# The child's progress, in shared memory that only the child writes: rows in files made
# visible, a flag set once its log is built, and rows lost per reason of LOSS_REASONS.
_WRITTEN, _READY = 0, 1
_LOST_SLOT = {reason: 2 + i for i, reason in enumerate(LOSS_REASONS)}


# glibc's malloc gives blocks over its (adaptive) mmap threshold back to the kernel when freed
# and trims its heap top, so each record's arrays (copied out of the ring) and each row group's
# columns land on fresh pages: page faults were most of the child's copying cost. The child
# keeps freed memory instead; it never holds more than a few row groups, so what it keeps is
# bounded by that peak.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREED_BYTES = 1 << 30
_MMAP_ABOVE_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit


def _keep_freed_memory() -> None:
    """Make glibc's malloc reuse freed memory in this process (no-op without glibc)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None)  # the C library the interpreter runs on
    if not hasattr(libc, "mallopt"):
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _Control:
    """Flush (or close) after every record queued before it; answered with `sequence`."""

    close: bool
    sequence: int


# A dataclass record with numeric arrays is shipped as (its class, pickled once per class,
# its other fields, and a (name, offset from the start of the entry, dtype, shape) per
# array stored beside the pickled part), all plain values: pickling the record's class (or
# a dataclass per array) for every record cost more than copying its arrays.
_pickled_kind = functools.cache(pickle.dumps)
_unpickled_kind = functools.cache(pickle.loads)


@functools.cache
def _field_names(kind: type) -> tuple[str, ...]:
    """A dataclass's field names (`dataclasses.fields` per record was a tenth of `submit`)."""
    return tuple(field.name for field in dataclasses.fields(kind))


def _numeric_arrays(record: Any) -> dict[str, np.ndarray]:
    """A dataclass record's numeric numpy fields: what can travel as raw bytes."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        return {}
    return {
        name: value
        for name in _field_names(type(record))
        if isinstance(value := getattr(record, name), np.ndarray) and value.dtype.kind in "biufc"
    }


def _rebuilt(kind: type, fields: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    """The record again, without running its `__post_init__` checks a second time: the
    server built (and so checked) it, and they were a tenth of the child's Python."""
    record: Any = object.__new__(kind)
    try:
        state = vars(record)
    except TypeError:  # a class with __slots__
        return kind(**fields, **arrays)
    state.update(fields, **arrays)
    return record


class _Ring:
    """Entries in shared memory, appended by the server (one thread at a time: the caller
    holds a lock) and taken in order by the child.

    Positions count bytes from the start and only grow (`% size` is the place); an entry
    never wraps: one that does not fit before the end goes to the start of the next lap. The
    two positions are shared values whose locks order the entries' bytes with them on every
    architecture, not only x86. Each side keeps its own position and the last one it saw of
    the other, and never waits long for a lock the other may have died holding (the server
    not at all): an old read position only makes the ring look fuller, an old write position
    emptier.
    """

    def __init__(self, context: Any, size: int) -> None:
        if size < 4 * _ALIGN or size % _ALIGN:
            raise DataError(
                f"ring_bytes must be a multiple of {_ALIGN} and at least {4 * _ALIGN}, got {size}"
            )
        self.size = size
        try:
            self._memory = context.RawArray("B", size)
        except OSError as exc:  # /dev/shm (or the temp directory) too small
            raise DataError(
                f"cannot allocate {size:,} bytes of shared memory for the log "
                f"writer's ring (log_ring_mb): {exc}"
            ) from exc
        self._written = context.Value("Q", 0)  # moved by the server
        self._read = context.Value("Q", 0)  # moved by the child
        self._head = 0  # the server's write position, and the last read position it saw
        self._tail = 0
        self._published = 0  # the write position the child can see
        self._taken = 0  # the child's read position, and the last write position it saw
        self._seen = 0
        self._data: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}  # the numpy view is made again on each side

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.frombuffer(self._memory, dtype=np.uint8)
        return self._data

    @staticmethod
    def _load(shared: Any, wait: float) -> int | None:
        """The shared position, or None when its lock is not free within `wait`."""
        lock = shared.get_lock()
        if not lock.acquire(timeout=wait):
            return None
        try:
            return int(shared.get_obj().value)
        finally:
            lock.release()

    @staticmethod
    def _store(shared: Any, value: int, wait: float = _LOCK_WAIT_S) -> bool:
        lock = shared.get_lock()
        if not lock.acquire(timeout=wait):
            return False
        try:
            shared.get_obj().value = value
        finally:
            lock.release()
        return True

    def append(self, record: Any) -> bool:
        """Store a record; False (nothing stored) when it does not fit now."""
        arrays = _numeric_arrays(record)
        pickled_at = _FIRST_ARRAY
        payload: Any = record
        if arrays:
            places = []
            for name, array in arrays.items():
                places.append((name, pickled_at, array.dtype.str, array.shape))
                pickled_at += _aligned(array.nbytes)
            kind: type = type(record)
            fields = {
                name: getattr(record, name) for name in _field_names(kind) if name not in arrays
            }
            payload = (_pickled_kind(kind), fields, tuple(places))
        pickled = np.frombuffer(
            pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8
        )
        length = _aligned(pickled_at + pickled.size)
        read = self._load(self._read, 0.0)
        if read is not None:
            self._tail = read
        written = self._head
        place = written % self.size
        skip = self.size - place if place + length > self.size else 0
        if written + skip + length - self._tail > self.size:
            return False
        data = self.data
        if skip:
            data[place : place + _HEADER].view(np.uint64)[0] = 0
            place = 0
        at = place + _FIRST_ARRAY
        for array in arrays.values():
            np.copyto(data[at : at + array.nbytes].view(array.dtype).reshape(array.shape), array)
            at += _aligned(array.nbytes)
        data[place + pickled_at : place + pickled_at + pickled.size] = pickled
        data[place : place + _HEADER].view(np.uint64)[:] = (length, pickled_at, bool(arrays))
        self._head = written + skip + length
        self.publish()
        return True

    def publish(self) -> None:
        """Show the child every entry appended so far. Publishing the position (under its
        lock) publishes the entries' bytes with it. When the child holds the lock (and may
        have been descheduled holding it), the position stays unpublished until the next
        `append` or `publish`: the request path never waits on the child. Waiting up to
        5 ms here (and then refusing the record) stalled about one request in 2,000."""
        if self._published != self._head and self._store(self._written, self._head, 0.0):
            self._published = self._head

    def take_all(self) -> list[Any]:
        """Every record appended since the last call, in order; their space is free again."""
        written = self._load(self._written, _LOCK_WAIT_S)
        if written is not None:
            self._seen = written
        read = self._taken
        data = self.data
        records = []
        while read < self._seen:
            place = read % self.size
            header = data[place : place + _HEADER].view(np.uint64)
            length = int(header[0])
            if length == 0:  # the rest of this lap is unused
                read += self.size - place
                continue
            pickled_at, shipped = int(header[1]), bool(header[2])
            entry = data[place : place + length]
            # pickle.loads ignores the alignment padding after the pickled part.
            record = pickle.loads(entry[pickled_at:])  # type: ignore[arg-type]  # a buffer
            if shipped:
                kind, fields, places = record
                arrays = {}
                for name, offset, dtype_str, shape in places:
                    dtype = np.dtype(dtype_str)
                    nbytes = dtype.itemsize * math.prod(shape)
                    arrays[name] = entry[offset : offset + nbytes].view(dtype).reshape(shape).copy()
                record = _rebuilt(_unpickled_kind(kind), fields, arrays)
            records.append(record)
            read += length
        self._taken = read
        self._store(self._read, read)  # if the lock is busy, the server sees it next time
        return records


def _relay(
    factory: Callable[[WriterOptions[Any]], PartitionedLog[Any, Any]],
    options: WriterOptions[Any],
    ring: _Ring,
    acks: Any,
    progress: Any,
    nice: int,
    server_pid: int,
) -> None:
    """The child: hand each record to a local log (waiting, never dropping), count what it
    writes and loses in `progress`, answer controls, and write what it holds if the server
    dies without closing it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    _keep_freed_memory()

    def written(_path: Any, rows: int) -> None:
        progress[_WRITTEN] += rows

    def lost(reason: str, rows: int) -> None:
        progress[_LOST_SLOT[reason]] += rows

    local = factory(dataclasses.replace(options, on_write=written, on_lost=lost))
    progress[_READY] = 1
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
                log.error(
                    "log writer: the server exited without closing the log; writing "
                    "what was received"
                )
                for item in ring.take_all():
                    if not isinstance(item, _Control):
                        local.submit(item, wait=True)
                local.close()
                return
        if not records:
            time.sleep(_POLL_S)


@dataclass(eq=False)
class _Writer:
    """One child process and what it shares with the server; replaced whole on a restart."""

    process: Any
    ring: _Ring
    acks: Any
    progress: Any  # RawArray of uint64, see _WRITTEN
    accepted_rows: int = 0  # rows stored in its ring (moved under ProcessLog._lock)
    reported: Counter[str] = field(default_factory=Counter)  # its losses already counted
    settled: bool = False

    def lost_rows(self) -> int:
        return sum(int(self.progress[slot]) for slot in _LOST_SLOT.values())


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ProcessLog(Intake[R]):
    """`submit` / `flush` / `close` of a `PartitionedLog` built by `factory` in a child.

    `factory` is called in the child with `options` (a `WriterOptions`, pickled to it) whose
    `on_write` and `on_lost` are replaced by the hooks the child counts with.
    `on_lost(reason, rows)` runs for every row offered but never written: refused
    (`queue_full`: the ring is full; `closed`), lost by the child's writer (`LOSS_REASONS`)
    or with a dead child (`writer_died`); `lost` keeps the same counts.
    """

    def __init__(
        self,
        factory: Callable[[WriterOptions[R]], PartitionedLog[R, Any]],
        options: WriterOptions[R] | None = None,
        *,
        ring_bytes: int = DEFAULT_RING_BYTES,
        rows: Callable[[R], int] = len,  # type: ignore[assignment]  # records are Sized unless given
        on_lost: Callable[[str, int], None] | None = None,
        nice: int = 0,
        name: str = "walkrank-log",
    ) -> None:
        # spawn, not fork: the server has threads (gRPC, numba) that a fork would copy mid-work.
        self._context = multiprocessing.get_context("spawn")
        super().__init__(self._refused)
        self._factory = factory
        self._options: WriterOptions[R] = WriterOptions() if options is None else options
        self._ring_bytes = ring_bytes
        self._nice = nice
        self._name = name
        self._rows = rows
        self._on_lost = on_lost
        self._control_lock = threading.Lock()  # one flush/close in flight: answers in order
        self._sequence = itertools.count(1)
        self._swap_lock = threading.Lock()  # a restart and close() never overlap
        self._ending = threading.Event()  # close() began: no more restarts
        #: Rows offered but never written, by reason (see the class docstring).
        self.lost: Counter[str] = Counter()
        #: How many times a dead child was replaced.
        self.restarts = 0
        self._settled_written = 0
        #: The child's last reported `PartitionedLog.stats()` (after a flush or close).
        self.child_stats: dict[str, int | bool] = {}
        self._writer = self._spawn()
        self._supervisor = threading.Thread(
            target=self._supervise, daemon=True, name=f"{name}-supervisor"
        )
        self._supervisor.start()

    @property
    def written_rows(self) -> int:
        """Rows in files made visible, by every child so far."""
        writer = self._writer
        live = 0 if writer.settled else int(writer.progress[_WRITTEN])
        return self._settled_written + live

    @property
    def pid(self) -> int | None:
        """The current child's process id."""
        return self._writer.process.pid

    def submit(self, record: R) -> bool:
        """Store a record for the child without ever blocking; False when dropped (the ring
        is full, or the log closed)."""
        rows = self._rows(record)
        return self._offer(record, rows, lambda: self._append(record, rows))

    def _append(self, record: Any, rows: int) -> None:
        writer = self._writer  # the caller holds self._lock: no restart swaps it meanwhile
        if not writer.ring.append(record):
            raise queue.Full
        writer.accepted_rows += rows

    def _refused(self, record: R) -> None:
        self._count("closed" if self._closed else "queue_full", self._rows(record))

    def _count(self, reason: str, rows: int) -> None:
        self.lost[reason] += rows
        if self._on_lost is not None:
            self._on_lost(reason, rows)

    def _spawn(self) -> _Writer:
        ring = _Ring(self._context, self._ring_bytes)
        progress = self._context.RawArray("Q", 2 + len(LOSS_REASONS))
        acks = self._context.Queue()
        process = self._context.Process(
            target=_relay,
            name=self._name,
            daemon=True,
            args=(self._factory, self._options, ring, acks, progress, self._nice, os.getpid()),
        )
        process.start()
        return _Writer(process, ring, acks, progress)

    # --- supervision -----------------------------------------------------------------------

    def _supervise(self) -> None:
        """Count the child's losses as they happen; replace it when it dies."""
        failures = 0  # children in a row that ended before they were ready, or never started
        dead: _Writer | None = None
        while True:
            writer = self._writer
            ended = multiprocessing.connection.wait([writer.process.sentinel], _SUPERVISE_S)
            self._report_losses(writer)
            if not ended:
                with self._lock:  # as for an append
                    writer.ring.publish()
                continue
            if self._ending.is_set():
                return
            if writer is not dead:
                dead = writer
                writer.process.join()  # reaped: no zombie
                failures = 0 if writer.progress[_READY] else failures + 1
                if failures:
                    log.error(
                        "%s: the writer process (pid %s) ended before it was ready (%s)",
                        self._name,
                        writer.process.pid,
                        _describe_exit(writer.process.exitcode),
                    )
            if failures > 1 and self._ending.wait(
                min(_FIRST_BACKOFF_S * 2 ** (failures - 2), _MAX_BACKOFF_S)
            ):
                return
            with self._swap_lock:
                if self._ending.is_set():
                    return
                try:
                    replacement = self._spawn()
                except (DataError, OSError) as exc:
                    log.error("%s: cannot start a new writer process: %s", self._name, exc)
                    failures += 1
                    continue
                with self._lock:
                    self._writer = replacement
                self.restarts += 1
            unwritten = self._settle(writer)
            log.error(
                "%s: the writer process (pid %s) died (%s); %d rows it had accepted "
                "were not written (counted as lost: writer_died); restarted as pid %s",
                self._name,
                writer.process.pid,
                _describe_exit(writer.process.exitcode),
                unwritten,
                replacement.process.pid,
            )

    def _report_losses(self, writer: _Writer) -> None:
        """Count the rows the child says its writer lost since the last report."""
        for reason, slot in _LOST_SLOT.items():
            new = int(writer.progress[slot]) - writer.reported[reason]
            if new > 0:
                writer.reported[reason] += new
                self._count(reason, new)

    def _settle(self, writer: _Writer) -> int:
        """Close the books of a child that has ended: its rows neither written nor counted
        yet are counted as `writer_died`; returns how many."""
        self._report_losses(writer)
        with self._lock:  # no record goes into its ring any more
            accepted = writer.accepted_rows
            written = int(writer.progress[_WRITTEN])
            self._settled_written += written
            writer.settled = True
        unwritten = max(0, accepted - written - writer.lost_rows())
        if unwritten:
            self._count("writer_died", unwritten)
        return unwritten

    # --- flush and close -------------------------------------------------------------------

    def _control(self, close: bool, timeout: float | None) -> bool:
        """Send a control after everything stored so far; wait for the child's answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._control_lock:
            sequence = next(self._sequence)
            while True:
                with self._lock:  # ordered with the records other threads submit
                    writer = self._writer
                    if writer.ring.append(_Control(close, sequence)):
                        break
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                if not writer.process.is_alive():
                    return False
                time.sleep(_POLL_S)  # the ring is full: the child is draining it
            while True:
                remaining = (
                    _LIVENESS_CHECK_S
                    if deadline is None
                    else min(_LIVENESS_CHECK_S, deadline - time.monotonic())
                )
                if remaining <= 0:
                    return False
                try:
                    answered, done, stats = writer.acks.get(timeout=remaining)
                except queue.Empty:
                    if not writer.process.is_alive():  # the supervisor counts and restarts
                        return False
                    continue
                self.child_stats = stats
                if answered == sequence:
                    return bool(done)

    def flush(self, timeout: float | None = None) -> bool:
        """Write everything submitted so far, and wait for it; False if `timeout` ran out or
        the child died first (its unwritten rows are then counted as lost)."""
        if self._closed:
            return not self._writer.process.is_alive()
        return self._control(False, timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting records, write everything stored, stop the child; True when every
        accepted row was written (what was not is counted as lost)."""
        with self._swap_lock:
            already = self._ending.is_set()
            self._ending.set()
        writer = self._writer
        if already:
            writer.process.join(timeout)
            return not writer.process.is_alive()
        self._mark_closed()
        done = writer.process.is_alive() and self._control(True, timeout)
        writer.process.join(5.0 if done else 0.0)
        if writer.process.is_alive():
            log.error("%s: the writer process did not finish in time; terminating it", self._name)
            writer.process.terminate()
            writer.process.join()
            done = False
        self._supervisor.join()
        unwritten = self._settle(writer)
        if unwritten:
            log.error(
                "%s: %d accepted rows were not written before the log closed (counted "
                "as lost: writer_died)",
                self._name,
                unwritten,
            )
        writer.acks.close()
        return done and not unwritten
