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
A batch call queues one job per user, so a home-feed request waits at most one email user's
work, however many email batches are in flight.

The compute threads run at a lower CPU priority (`nice`) than the gRPC threads: receiving a
call and sending its answer are short, and a core taken from a walk for them costs the walk
little, while a gRPC thread that waits behind two walks for a core delays a whole call
(measured on 2 cores: 226 -> 243 req/s, p50 34.4 -> 30.9 ms).
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

T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), the default number of slots."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


class SlotTimeout(Exception):
    """No compute thread took the job within the wait allowed."""


@dataclass(order=True)
class _Job(Generic[T]):
    priority: int
    due: float
    sequence: int
    work: Callable[[], T] = field(compare=False)
    enqueued: float = field(compare=False, default_factory=time.perf_counter)
    started: float | None = field(compare=False, default=None)
    result: Any = field(compare=False, default=None)
    error: BaseException | None = field(compare=False, default=None)
    done: threading.Event = field(compare=False, default_factory=threading.Event)


class ComputePool:
    """`slots` threads running jobs in (priority, deadline, arrival) order."""

    def __init__(self, slots: int, nice: int = 0) -> None:
        if slots < 1:
            raise ValueError(f"compute slots must be >= 1, got {slots}")
        self.slots = slots
        self.nice = nice
        self._work = threading.Condition(threading.Lock())
        self._queue: list[_Job[Any]] = []
        self._arrivals = itertools.count()
        self._running = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, name=f"walkrank-compute-{i}",
                                          daemon=True) for i in range(slots)]
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        """Jobs no compute thread has taken yet."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Jobs being run now."""
        return self._running

    def run(self, work: Callable[[], T], priority: int, wait_s: float | None = None,
            due: float | None = None) -> tuple[T, float]:
        """Run `work` on a compute thread; its result and the seconds it waited to start.

        Jobs with a lower `priority` number start first, then the earliest `due` (the
        caller's deadline on the `time.perf_counter` clock; None: after every deadline),
        then by arrival. Raises `SlotTimeout` if no thread took the job within `wait_s`
        (None: wait as long as it takes); `work`'s own exception is raised here.
        """
        job = _Job(priority, math.inf if due is None else due, next(self._arrivals), work)
        with self._work:
            if self._closed:
                raise RuntimeError("the compute pool is closed")
            heapq.heappush(self._queue, job)
            self._work.notify()
        if not job.done.wait(wait_s):
            with self._work:
                if job.started is None:
                    self._queue.remove(job)
                    heapq.heapify(self._queue)
                    raise SlotTimeout(f"no compute slot came free within {wait_s * 1e3:.0f} ms "
                                      f"(all {self.slots} busy)")
            job.done.wait()  # it started just in time: the pipeline watches the deadline
        assert job.started is not None
        if job.error is not None:
            raise job.error
        return job.result, job.started - job.enqueued

    def close(self) -> None:
        """Let the threads finish the queued jobs and exit."""
        with self._work:
            self._closed = True
            self._work.notify_all()
        for thread in self._threads:
            thread.join()

    def _serve(self) -> None:
        if self.nice and sys.platform.startswith("linux"):
            # Linux applies niceness per thread: PRIO_PROCESS with a thread id.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
        while True:
            with self._work:
                while not self._queue and not self._closed:
                    self._work.wait()
                if not self._queue:
                    return
                job = heapq.heappop(self._queue)
                job.started = time.perf_counter()
                self._running += 1
            try:
                job.result = job.work()
            except BaseException as exc:  # handed to the caller, which raises it
                job.error = exc
            with self._work:
                self._running -= 1
            job.done.set()
