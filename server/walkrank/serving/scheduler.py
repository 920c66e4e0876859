"""The compute pool: how many requests run the pipeline at once, and who goes first.

A request is CPU work from start to end (walks, features and scoring release the GIL, but
each wants a core), so running more requests than cores only time-slices them: every one of
them gets slower and the tail grows (one compute thread per core serves more requests, with
a shorter tail, than one per gRPC worker). The gRPC worker threads therefore only admit
requests (tenant, auth, quota: refused at once) and hand the pipeline to one of `slots`
compute threads, in priority order: interactive tenants before batch tenants, and within
each the earliest deadline first (then arrival). A call's deadline is fixed when gRPC
receives it, so a request that was slow to reach its handler (threads and the GIL are shared)
is not also queued behind later arrivals.

Within a priority, tenants share the threads fairly: each tenant's jobs wait in a lane of
their own, and a free thread takes the head of the lane furthest behind its share (start-time
fair queueing: each job started adds 1 / weight to its lane's virtual time, the weight being
the tenant's `max_in_flight`). A lane with no backlog joins at the virtual time of the last
job started, so it keeps no credit from quiet times and is never behind another tenant's
backlog: a tenant sending one call at a time waits for a free thread, not for the jobs queued
by a tenant at (or past) its quota.
A batch call queues one job per user, so a home-feed request waits at most one email user's
work, however many email batches are in flight.

The compute threads run at a lower CPU priority (`nice`) than the gRPC threads: receiving a
call and sending its answer are short, and a core taken from a walk for them costs the walk
little, while a gRPC thread that waits behind two walks for a core delays a whole call.

No job holds a thread past its deadline: a job carries a cancel cell that the walk kernels
read once per lock-step round, and the pool sets it when the deadline passes (the caller's
thread, waiting for the answer, does it) or when the pool closes at shutdown.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from walkrank.threads import lower_thread_priority

T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), the default number of slots."""
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def slots_per_process(configured: int | None, processes: int) -> int:
    """Compute slots for each of `processes` servers sharing this host's cores (`walkrank
    serve --replicas N` or `--processes N`): `configured` (walkrank.yaml's `compute_slots`)
    when set, else an equal share of the cores, at least 1.

    One process defaults to a slot per core. N processes each doing so would run N pipelines
    per core, time-slicing them (every call slower, a longer tail) while each process's slots
    also queue for its own GIL; with a share each, the host runs one pipeline per core, as
    one process does, and the processes' GILs are separate."""
    if configured is not None:
        return configured
    return max(1, available_cores() // processes)


#: The compute threads' name prefix as the OS sees it (`top -H`, `perf`, /proc/<pid>/task/*/comm):
#: profilers and `benchmarks/serving.py` tell the pipeline's CPU from gRPC's by it.
OS_THREAD_PREFIX = "wr-compute-"


def _name_os_thread(name: str) -> None:
    """Give the calling thread `name` (at most 15 bytes) where the OS shows it: Python keeps
    thread names to itself, so every thread of the server is `python` to a profiler."""
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
                comm.write(name[:15])
        except OSError:  # a read-only /proc: the name is only a convenience
            pass


class SlotTimeout(Exception):
    """No compute thread took the job within the wait allowed."""


class _Done:
    """A job's end, waited for by its one caller until it returns True: a lock held from the
    job's creation until its thread releases it (an Event is a lock, a condition and a lock
    per wait, taken on every call)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the job ended (then never called again), False after `timeout` seconds."""
        return self._lock.acquire(timeout=-1 if timeout is None else timeout)


@dataclass(order=True)
class _Job(Generic[T]):
    priority: int
    due: float
    sequence: int
    work: Callable[[], T] = field(compare=False)
    cancel: np.ndarray | None = field(compare=False, default=None)
    enqueued: float = field(compare=False, default_factory=time.perf_counter)
    started: float | None = field(compare=False, default=None)
    result: Any = field(compare=False, default=None)
    error: BaseException | None = field(compare=False, default=None)
    done: _Done = field(compare=False, default_factory=_Done)

    def stop(self) -> None:
        """Ask the job's work to stop early (it reads `cancel[0]`; without one it runs on)."""
        if self.cancel is not None:
            self.cancel[0] = 1


@dataclass
class _Lane:
    """One tenant's waiting jobs (a heap by deadline, then arrival) and its fair-share account."""

    weight: float
    virtual: float  # its start tag: each job started adds 1 / weight
    jobs: list[_Job[Any]] = field(default_factory=list)
    running: int = 0


def _seconds_until(moment: float) -> float | None:
    """A wait timeout until `moment` on the perf_counter clock (None: forever)."""
    return None if moment == math.inf else max(0.0, moment - time.perf_counter())


class ComputePool:
    """`slots` threads running jobs by priority, then fair shares across tenants, then each
    tenant's own jobs in (deadline, arrival) order.

    A job may carry a cancel cell (`cancel`, e.g. a numpy uint8[1] the walk kernels read
    without the GIL): the pool sets it when the job's `due` passes and when the pool
    closes, so a job that reads it cannot hold a compute thread past its deadline or stop
    the server from exiting.
    """

    def __init__(self, slots: int, nice: int = 0, spare: int = 0) -> None:
        """`spare` threads beyond the `slots` start only an interactive tenant's first job
        while every slot is busy, so that job need not wait for another tenant's to end."""
        if slots < 1:
            raise ValueError(f"compute slots must be >= 1, got {slots}")
        self.slots = slots
        self.spare = spare
        if self.spare < 0:
            raise ValueError(f"spare compute threads must be >= 0, got {spare}")
        self.nice = nice
        self._work = threading.Condition(threading.Lock())
        # tenant -> its lane, while it has jobs waiting or running.
        self._lanes: dict[str, _Lane] = {}
        self._waiting = 0
        self._clock: dict[int, float] = {}  # per priority: the virtual time of the last start
        self._arrivals = itertools.count()
        self._active: dict[int, _Job[Any]] = {}
        self._last_finished = time.perf_counter()
        self._closed = False
        self._threads = [
            threading.Thread(
                target=self._serve, args=(i,), name=f"walkrank-compute-{i}", daemon=True
            )
            for i in range(slots + self.spare)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        """Jobs no compute thread has taken yet."""
        return self._waiting

    @property
    def running(self) -> int:
        """Jobs being run now."""
        return len(self._active)

    def stalled_for(self) -> float:
        """Seconds jobs have been waiting while no job finished (0 when none waits).

        Jobs wait only while every thread is busy, and each job ends by its deadline, so this
        grows past a few deadlines only if the threads are stuck: a health signal.
        """
        with self._work:
            if not self._waiting:
                return 0.0
            oldest = min(job.enqueued for lane in self._lanes.values() for job in lane.jobs)
            since = max(self._last_finished, oldest)
        return max(0.0, time.perf_counter() - since)

    def run(
        self,
        work: Callable[[], T],
        priority: int,
        wait_s: float | None = None,
        due: float | None = None,
        cancel: np.ndarray | None = None,
        tenant: str = "",
        weight: float = 1.0,
    ) -> tuple[T, float]:
        """Run `work` on a compute thread; its result and the seconds it waited to start.

        Jobs with a lower `priority` number start first, then the earliest `due` (the
        caller's deadline on the `time.perf_counter` clock; None: after every deadline),
        then by arrival; but among the `tenant`s of one priority, fair shares come first: the
        next job is the head of the tenant furthest behind its share (`weight` > 0, e.g. its
        quota). Raises `SlotTimeout` if no thread took the job within `wait_s` (None: until
        `due`, or as long as it takes); `work`'s own exception is raised here.
        When `due` passes with the job running, `cancel[0]` is set to 1 (`work` is expected
        to read it and end early) and this returns when `work` does.
        """
        if not weight > 0:
            raise ValueError(f"a tenant's compute weight must be > 0, got {weight}")
        job = _Job(priority, math.inf if due is None else due, next(self._arrivals), work, cancel)
        key = tenant
        with self._work:
            if self._closed:
                raise RuntimeError("the compute pool is closed")
            clock = self._clock.get(priority, 0.0)
            lane = self._lanes.setdefault(key, _Lane(weight, clock))
            if not lane.jobs:  # a lane that had no backlog keeps no credit from its quiet time
                lane.virtual = max(lane.virtual, clock)
            lane.weight = weight
            heapq.heappush(lane.jobs, job)
            self._waiting += 1
            self._work.notify()
        start_s = wait_s if wait_s is not None else _seconds_until(job.due)
        finished = job.done.wait(start_s)
        if not finished:
            with self._work:
                if job.started is None:
                    lane = self._lanes[key]
                    lane.jobs.remove(job)
                    heapq.heapify(lane.jobs)
                    self._waiting -= 1
                    self._retire(key, lane)
                    assert start_s is not None
                    raise SlotTimeout(
                        f"no compute slot came free within {start_s * 1e3:.0f} ms "
                        f"(all {self.slots} busy)"
                    )
            finished = job.done.wait(_seconds_until(job.due))
        if not finished:
            job.stop()
            job.done.wait()
        assert job.started is not None
        if job.error is not None:
            raise job.error
        return job.result, job.started - job.enqueued

    def close(self) -> None:
        """Stop every queued and running job that has a cancel cell, let the threads finish
        them (and any without one), and exit."""
        with self._work:
            self._closed = True
            queued = (job for lane in self._lanes.values() for job in lane.jobs)
            for job in (*queued, *self._active.values()):
                job.stop()
            self._work.notify_all()
        for thread in self._threads:
            thread.join()

    def _startable(self) -> list[tuple[str, _Lane]]:
        """The lanes a free thread may start a job of (the lock held): any waiting one while
        fewer than `slots` jobs run, past that (on a spare thread) only the first job of a
        tenant of the most urgent priority (0)."""
        full = len(self._active) >= self.slots
        return [
            (key, lane)
            for key, lane in self._lanes.items()
            if lane.jobs and not (full and (lane.running or lane.jobs[0].priority))
        ]

    def _take(self) -> tuple[str, _Job[Any]]:
        """The next job (the lock held, some startable): the most urgent priority, then the
        lane furthest behind its share, then its earliest deadline and arrival."""
        key, lane = min(
            self._startable(),
            key=lambda item: (item[1].jobs[0].priority, item[1].virtual, item[1].jobs[0]),
        )
        self._clock[lane.jobs[0].priority] = lane.virtual
        lane.virtual += 1.0 / lane.weight
        lane.running += 1
        self._waiting -= 1
        return key, heapq.heappop(lane.jobs)

    def _retire(self, key: str, lane: _Lane) -> None:
        """Forget a lane with nothing waiting or running (the lock held): tenants come and go
        with reloads, and an idle tenant's past use does not count against it."""
        if not lane.jobs and not lane.running:
            del self._lanes[key]

    def _serve(self, index: int) -> None:
        _name_os_thread(f"{OS_THREAD_PREFIX}{index}")
        lower_thread_priority(self.nice)
        while True:
            with self._work:
                while not self._closed and not self._startable():
                    self._work.wait()
                if not self._startable():
                    return
                key, job = self._take()
                job.started = time.perf_counter()
                self._active[job.sequence] = job
            try:
                job.result = job.work()
            except BaseException as exc:  # handed to the caller, which raises it
                job.error = exc
            with self._work:
                del self._active[job.sequence]
                lane = self._lanes[key]
                lane.running -= 1
                self._retire(key, lane)
                self._last_finished = time.perf_counter()
            job.done.set()
            # An idle thread must not keep its last call alive: the call holds the graph it
            # ran on, which a graph swap unmaps only once nothing holds it.
            del job
