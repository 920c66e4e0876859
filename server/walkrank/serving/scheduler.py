"""The compute pool: how many requests run the pipeline at once, and who goes first.

A request is CPU work from start to end (walks, features and scoring release the GIL, but
each wants a core), so running more requests than cores only time-slices them: every one of
them gets slower and the tail grows. Measured on 2 cores at concurrency 8 (home feed, bench
graph): 8 threads computing at once 228 req/s, p99 71 ms; 2 at once 275 req/s, p99 47 ms.
The gRPC worker threads therefore only admit requests (tenant, auth, quota: refused at
once) and hand the pipeline to one of `slots` compute threads, in priority order:
interactive tenants before batch tenants, and within each the earliest deadline first (then
arrival). A call's deadline is fixed when gRPC receives it, so a request that was slow to
reach its handler (threads and the GIL are shared) is not also queued behind later arrivals.

Within a priority, tenants share the threads fairly: each tenant's jobs wait in a lane of
their own, and a free thread takes the head of the lane that has started the fewest jobs for
its weight (the tenant's `max_in_flight`: its share), start-time fair queueing. A lane that was
idle joins at the virtual time of the last job started, so one tenant's backlog never sits in
front of another tenant's job: measured without it, a tenant at its quota (4 calls on 2 threads)
doubled another tenant's p99, which waited behind the first tenant's queued jobs.
A batch call queues one job per user, so a home-feed request waits at most one email user's
work, however many email batches are in flight.

The compute threads run at a lower CPU priority (`nice`) than the gRPC threads: receiving a
call and sending its answer are short, and a core taken from a walk for them costs the walk
little, while a gRPC thread that waits behind two walks for a core delays a whole call
(measured on 2 cores: 226 -> 243 req/s, p50 34.4 -> 30.9 ms).

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

T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), the default number of slots."""
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


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
    done: threading.Event = field(compare=False, default_factory=threading.Event)

    def stop(self) -> None:
        """Ask the job's work to stop early (it reads `cancel[0]`; without one it runs on)."""
        if self.cancel is not None:
            self.cancel[0] = 1


def _seconds_until(moment: float) -> float | None:
    """A wait timeout until `moment` on the perf_counter clock (None: forever)."""
    return None if moment == math.inf else max(0.0, moment - time.perf_counter())


class ComputePool:
    """`slots` threads running jobs in (priority, deadline, arrival) order.

    A job may carry a cancel cell (`cancel`, e.g. a numpy uint8[1] the walk kernels read
    without the GIL): the pool sets it when the job's `due` passes and when the pool
    closes, so a job that reads it cannot hold a compute thread past its deadline or stop
    the server from exiting.
    """

    def __init__(self, slots: int, nice: int = 0) -> None:
        if slots < 1:
            raise ValueError(f"compute slots must be >= 1, got {slots}")
        self.slots = slots
        self.nice = nice
        self._work = threading.Condition(threading.Lock())
        self._queue: list[_Job[Any]] = []
        self._arrivals = itertools.count()
        self._active: dict[int, _Job[Any]] = {}
        self._last_finished = time.perf_counter()
        self._closed = False
        self._threads = [
            threading.Thread(
                target=self._serve, args=(i,), name=f"walkrank-compute-{i}", daemon=True
            )
            for i in range(slots)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        """Jobs no compute thread has taken yet."""
        return len(self._queue)

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
            if not self._queue:
                return 0.0
            since = max(self._last_finished, min(job.enqueued for job in self._queue))
        return max(0.0, time.perf_counter() - since)

    def run(
        self,
        work: Callable[[], T],
        priority: int,
        wait_s: float | None = None,
        due: float | None = None,
        cancel: np.ndarray | None = None,
    ) -> tuple[T, float]:
        """Run `work` on a compute thread; its result and the seconds it waited to start.

        Jobs with a lower `priority` number start first, then the earliest `due` (the
        caller's deadline on the `time.perf_counter` clock; None: after every deadline),
        then by arrival. Raises `SlotTimeout` if no thread took the job within `wait_s`
        (None: until `due`, or as long as it takes); `work`'s own exception is raised here.
        When `due` passes with the job running, `cancel[0]` is set to 1 (`work` is expected
        to read it and end early) and this returns when `work` does.
        """
        job = _Job(priority, math.inf if due is None else due, next(self._arrivals), work, cancel)
        with self._work:
            if self._closed:
                raise RuntimeError("the compute pool is closed")
            heapq.heappush(self._queue, job)
            self._work.notify()
        start_s = wait_s if wait_s is not None else _seconds_until(job.due)
        if not job.done.wait(start_s):
            with self._work:
                if job.started is None:
                    self._queue.remove(job)
                    heapq.heapify(self._queue)
                    assert start_s is not None
                    raise SlotTimeout(
                        f"no compute slot came free within {start_s * 1e3:.0f} ms "
                        f"(all {self.slots} busy)"
                    )
        if not job.done.wait(_seconds_until(job.due)):
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
            for job in (*self._queue, *self._active.values()):
                job.stop()
            self._work.notify_all()
        for thread in self._threads:
            thread.join()

    def _serve(self, index: int) -> None:
        _name_os_thread(f"{OS_THREAD_PREFIX}{index}")
        if self.nice and sys.platform.startswith("linux"):
            # Linux applies niceness per thread: PRIO_PROCESS with a thread id.
            os.setpriority(
                os.PRIO_PROCESS,
                threading.get_native_id(),
                os.getpriority(os.PRIO_PROCESS, 0) + self.nice,
            )
        while True:
            with self._work:
                while not self._queue and not self._closed:
                    self._work.wait()
                if not self._queue:
                    return
                job = heapq.heappop(self._queue)
                job.started = time.perf_counter()
                self._active[job.sequence] = job
            try:
                job.result = job.work()
            except BaseException as exc:  # handed to the caller, which raises it
                job.error = exc
            with self._work:
                del self._active[job.sequence]
                self._last_finished = time.perf_counter()
            job.done.set()
            # An idle thread must not keep its last call alive: the call holds the graph it
            # ran on, which a graph swap unmaps only once nothing holds it.
            del job
